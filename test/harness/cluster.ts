/**
 * A small cluster for migration tests and benchmarks: N bridge-backed agents in their own
 * instance namespaces, peered with each other over mutual TLS under a CA made by
 * `flexcapd certs`, plus the test net's client namespace.
 */
import { fileURLToPath } from "node:url";
import { createTestNet, type TestNet } from "./netns.ts";
import { startInstance, type TestInstance } from "./instance.ts";

const FLEXCAPD = fileURLToPath(new URL("../../agent/cli/flexcapd.ts", import.meta.url));
/** The peering port every test agent listens on (data connections: the next one). */
export const PEER_PORT = 7443;

/** A running test cluster. */
export interface TestCluster {
  net: TestNet;
  nodes: TestInstance[];
  /** Node names, "node-0"… in the order of `nodes`. */
  names: string[];
  /** The PKI dir (ca.crt, node-i.crt/.key). */
  pki: string;
  /** Stops the agents, removes their QEMUs and the namespaces. Never throws. */
  cleanup(): Promise<void>;
}

/** Makes a CA and certificates for `names` in `dir` with `flexcapd certs`. */
export async function makeCerts(dir: string, names: string[]): Promise<void> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", FLEXCAPD, "certs", "--dir", dir, ...names],
    stderr: "piped",
  }).output();
  if (r.code !== 0) throw new Error(`flexcapd certs failed: ${new TextDecoder().decode(r.stderr)}`);
}

/** Peering YAML for node `i` of `names` at `addresses`. */
export function peeringYaml(i: number, names: string[], addresses: string[], pki: string, extra = ""): string {
  const peers = names.flatMap((n, j) =>
    j === i ? [] : [`    - name: ${n}\n      address: ${addresses[j]}:${PEER_PORT}\n`]
  );
  return `node_name: ${names[i]}\npeering:\n  listen: tcp:0.0.0.0:${PEER_PORT}\n  cert: ${pki}/${names[i]}.crt\n` +
    `  key: ${pki}/${names[i]}.key\n  ca: ${pki}/ca.crt\n  peers:\n${peers.join("")}${extra}`;
}

/** Starts `n` peered agents; `env` per node (e.g. FLEXCAPD_FAILPOINTS), `configYaml` appended to each config. */
export async function startCluster(
  n: number,
  opts: { env?: (i: number) => Record<string, string>; configYaml?: string } = {},
): Promise<TestCluster> {
  const net = await createTestNet({ instances: n });
  const nodes: TestInstance[] = [];
  const pki = await Deno.makeTempDir({ prefix: "flexcap-pki-" });
  const names = Array.from({ length: n }, (_, i) => `node-${i}`);
  const cleanup = async () => {
    for (const node of nodes) await node.cleanup().catch(() => {});
    await net.cleanup();
    await Deno.remove(pki, { recursive: true }).catch(() => {});
  };
  try {
    await makeCerts(pki, names);
    const addresses = net.instances.map((h) => h.address);
    for (let i = 0; i < n; i++) {
      nodes.push(
        await startInstance(net, i, {
          env: opts.env?.(i),
          configYaml: peeringYaml(i, names, addresses, pki) + (opts.configYaml ?? ""),
        }),
      );
    }
  } catch (err) {
    await cleanup();
    throw err;
  }
  return { net, nodes, names, pki, cleanup };
}
