/**
 * Agent-to-agent peering: two flexcapd in their own namespaces reach each other's
 * PeerService over mutual TLS under a cluster CA made by `flexcapd certs`. A peer with a
 * certificate from another CA, or one issued for another name, is refused both ways.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { startTestAgent, type TestAgent } from "../harness/agent.ts";
import { createTestNet, netnsSupported, type TestNet } from "../harness/netns.ts";

const supported = await netnsSupported();
const FLEXCAPD = fileURLToPath(new URL("../../agent/cli/flexcapd.ts", import.meta.url));
const PORT = 7443;

async function certs(dir: string, ...names: string[]): Promise<void> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", FLEXCAPD, "certs", "--dir", dir, ...names],
    stderr: "piped",
  }).output();
  assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
}

function peeringYaml(name: string, pki: string, certName: string, peers: { name: string; address: string }[]) {
  return `node_name: ${name}\npeering:\n  listen: tcp:0.0.0.0:${PORT}\n  cert: ${pki}/${certName}.crt\n  key: ${pki}/${certName}.key\n  ca: ${pki}/ca.crt\n  peers:\n${
    peers.map((p) => `    - name: ${p.name}\n      address: ${p.address}\n`).join("")
  }`;
}

Deno.test({
  name: "peering: mutual TLS under the cluster CA; wrong CA or wrong name is refused",
  ignore: !supported,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    let net: TestNet | undefined;
    const agents: TestAgent[] = [];
    const pki = await Deno.makeTempDir({ prefix: "flexcap-pki-" });
    const rogue = await Deno.makeTempDir({ prefix: "flexcap-rogue-" });
    try {
      net = await createTestNet({ instances: 5 });
      const [a, b, c, d, e] = net.instances;
      await certs(pki, "node-a", "node-b", "node-c", "node-d");
      await certs(rogue, "node-e"); // a different CA
      const at = (h: { address: string }) => `${h.address}:${PORT}`;
      const start = async (host: typeof a, yaml: string) => {
        const agent = await startTestAgent({
          netns: host.ns,
          configYaml: `network:\n  backend: usermode\n${yaml}`,
        });
        agents.push(agent);
        return agent;
      };

      const agentA = await start(
        a,
        peeringYaml("node-a", pki, "node-a", [
          { name: "node-b", address: at(b) },
          { name: "node-c", address: at(c) },
        ]),
      );
      const agentB = await start(b, peeringYaml("node-b", pki, "node-b", [{ name: "node-a", address: at(a) }]));
      // node-c's agent serves a certificate issued for node-b: valid CA, wrong name.
      await start(c, peeringYaml("node-c", pki, "node-b", [{ name: "node-a", address: at(a) }]));

      await t.step("A sees B's info; C, presenting B's certificate, is refused by name", async () => {
        const peers = (await agentA.client.agent.listPeers({})).peers;
        const pb = peers.find((p) => p.name === "node-b")!;
        assert.equal(pb.error, "", pb.error);
        assert.equal(pb.info!.name, "node-b");
        assert.match(pb.info!.accelerator, /^(kvm|tcg)$/);
        assert.ok(pb.info!.memoryAllocatableMib > 0);
        const pc = peers.find((p) => p.name === "node-c")!;
        assert.equal(pc.info, undefined);
        assert.notEqual(pc.error, "", "a certificate for another name must be refused");
      });

      await t.step("B sees A too (both directions are mutual TLS)", async () => {
        const peers = (await agentB.client.agent.listPeers({})).peers;
        assert.equal(peers[0].error, "", peers[0].error);
        assert.equal(peers[0].info!.name, "node-a");
        assert.equal((await agentA.client.agent.getAgentInfo({})).nodeName, "node-a");
      });

      await t.step("a caller whose certificate names no configured peer gets PERMISSION_DENIED", async () => {
        // node-d holds a valid certificate from the cluster CA, but A does not list it.
        const agentD = await start(d, peeringYaml("node-d", pki, "node-d", [{ name: "node-a", address: at(a) }]));
        const [pa] = (await agentD.client.agent.listPeers({})).peers;
        assert.equal(pa.info, undefined);
        assert.match(pa.error, /PERMISSION_DENIED|7 /);
        assert.match(pa.error, /peer certificate for "node-d" is not a configured peer/);
      });

      await t.step("a caller with a certificate from another CA is refused by TLS", async () => {
        // node-e trusts the cluster CA (so it can verify A) but presents a certificate of a rogue CA.
        const yaml = peeringYaml("node-e", rogue, "node-e", [{ name: "node-a", address: at(a) }])
          .replace(`ca: ${rogue}/ca.crt`, `ca: ${pki}/ca.crt`);
        const agentE = await start(e, yaml);
        const [pa] = (await agentE.client.agent.listPeers({})).peers;
        assert.equal(pa.info, undefined);
        assert.notEqual(pa.error, "");
        assert.doesNotMatch(pa.error, /PERMISSION_DENIED/, "refused in the handshake, before any handler ran");
      });
    } finally {
      for (const ag of agents) await ag.cleanup();
      await net?.cleanup();
      await Deno.remove(pki, { recursive: true }).catch(() => {});
      await Deno.remove(rogue, { recursive: true }).catch(() => {});
    }
  },
});
