/**
 * An "instance" for network tests: a flexcapd running with the bridge backend inside one
 * of a TestNet's instance namespaces, plus ways to look at what it built there (its nft
 * table, its links). Reused by the network and migration tests.
 */
import { startTestAgent, type TestAgent } from "./agent.ts";
import type { NsHost, TestNet } from "./netns.ts";

/** A bridge-backed agent in its own namespace. */
export interface TestInstance {
  host: NsHost;
  agent: TestAgent;
  /** `nft -j list table inet flexcap` in the namespace, parsed (undefined if absent). */
  table(): Promise<Record<string, unknown>[] | undefined>;
  /** The table as nft prints it (for assertions on rules and for failure messages). */
  tableText(): Promise<string>;
  /** Names of the links in the namespace. */
  links(): Promise<string[]>;
  /** Stops the agent and removes its state dir and QEMUs. */
  cleanup(): Promise<void>;
}

/** Starts flexcapd in `net.instances[index]` with the bridge backend and `node_index` = index. */
export async function startInstance(
  net: TestNet,
  index: number,
  opts: { configYaml?: string; env?: Record<string, string> } = {},
): Promise<TestInstance> {
  const host = net.instances[index];
  const agent = await startTestAgent({
    netns: host.ns,
    env: opts.env,
    configYaml: `network:\n  backend: bridge\n  node_index: ${index}\n  dns: ${net.client.address}\n${
      opts.configYaml ?? ""
    }`,
  });
  return {
    host,
    agent,
    async table() {
      const r = await host.run(["nft", "-j", "list", "table", "inet", "flexcap"]);
      if (r.code !== 0) return undefined;
      return (JSON.parse(r.stdout).nftables as Record<string, unknown>[]).filter((o) => !("metainfo" in o));
    },
    async tableText() {
      return (await host.run(["nft", "list", "table", "inet", "flexcap"])).stdout;
    },
    async links() {
      const r = await host.run(["ip", "-j", "link", "show"]);
      return (JSON.parse(r.stdout) as { ifname: string }[]).map((l) => l.ifname);
    },
    cleanup: () => agent.cleanup(),
  };
}
