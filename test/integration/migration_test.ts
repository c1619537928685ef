/**
 * Live migration between two agents, each in its own instance namespace, with a client
 * namespace: a redis capsule holding keys moves A→B and back while a client loop talks to
 * it through A's address the whole time; a memtest capsule proves guest memory integrity.
 */
import assert from "node:assert/strict";
import { migrate } from "../../agent/cli/client.ts";
import { CapsuleSpec, CapsuleState } from "../../agent/gen/flexcap/v1/capsule.ts";
import type { MigrationProgress } from "../../agent/gen/flexcap/v1/migration.ts";
import { waitFor } from "../harness/agent.ts";
import { startCluster, type TestCluster } from "../harness/cluster.ts";
import { buildRedisImage, startRedisCapsule } from "../harness/images.ts";
import { netclientResult, netnsSupported, type NsHost } from "../harness/netns.ts";
import type { TestInstance } from "../harness/instance.ts";
import { buildMemtestImage, guestCorruption, parseMemtest } from "../harness/memtest.ts";
import { consoleText, logsText } from "./_util.ts";

const supported = await netnsSupported();
const KEYS = 300;

/** Writes KEYS keys with one MSET. */
async function fillRedis(client: NsHost, addr: string, port: number): Promise<void> {
  const args: string[] = [];
  for (let i = 0; i < KEYS; i++) args.push(`key:${i}`, `value-${i}-${"x".repeat(i % 50)}`);
  const r = await client.netclient(["redis", addr, String(port), "MSET", ...args]) as {
    reply: unknown;
    error?: string;
  };
  assert.equal(r.reply, "OK", r.error ?? "");
}

/** Asserts every key is there with its value. */
async function checkRedis(client: NsHost, addr: string, port: number, where: string): Promise<void> {
  // The client loop adds a key of its own.
  const size = await client.netclient(["redis", addr, String(port), "DBSIZE"]) as { reply: number; error?: string };
  assert.ok(size.reply >= KEYS, `${where}: DBSIZE ${JSON.stringify(size)}`);
  const keys = Array.from({ length: KEYS }, (_, i) => `key:${i}`);
  const got = await client.netclient(["redis", addr, String(port), "MGET", ...keys]) as { reply: unknown[] };
  assert.deepEqual(got.reply, keys.map((_, i) => `value-${i}-${"x".repeat(i % 50)}`), `${where}: values differ`);
}

async function capsuleOn(node: TestInstance, name: string) {
  return (await node.agent.client.capsules.listCapsules({ labelSelector: {} })).capsules.find((c) => c.name === name);
}

/** Waits until `name` runs on exactly `on` and on no other node. */
async function runsOnlyOn(c: TestCluster, on: number, name: string): Promise<void> {
  await waitFor(`${name} running only on node-${on}`, async () => {
    for (const [i, n] of c.nodes.entries()) {
      const cap = await capsuleOn(n, name);
      if (i === on && cap?.state !== CapsuleState.CAPSULE_STATE_RUNNING) return false;
      if (i !== on && cap) return false;
    }
    return true;
  }, 30_000);
}

Deno.test({
  name: "migration: redis moves A→B→A with its keys, answering throughout",
  ignore: !supported,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    let c: TestCluster | undefined;
    try {
      c = await startCluster(2, { configYaml: "migration:\n  grace_ms: 20000\n" });
      const [a, b] = c.nodes;
      const client = c.net.client;
      await buildRedisImage(a.agent.client, "redis");
      await startRedisCapsule(a.agent.client, "cache", 6400);
      await waitFor("redis exposed on A", async () => (await capsuleOn(a, "cache"))?.exposed.length === 1);
      await fillRedis(client, a.host.address, 6400);
      const ipBefore = (await capsuleOn(a, "cache"))!.network!.address;

      const loop = client.spawnNetclient(["redis-loop", a.host.address, "6400", "--duration-ms", "25000"]);
      await new Promise((r) => setTimeout(r, 1500));

      await t.step("A→B: keys intact at B's address, and at A's during the grace period", async () => {
        const phases: MigrationProgress[] = [];
        const r = await migrate(
          a.agent.client,
          { capsule: "cache", targetPeer: "node-1", options: undefined },
          (p) => phases.push(p),
        );
        console.log(
          `A→B: total ${r.totalMs} ms, transfer ${r.transferMs} ms, downtime ${r.downtimeMs} ms, ` +
            `gap ${r.gapMs} ms, ${r.bytes} bytes, ${r.rounds} syncs, mode ${r.mode}`,
        );
        assert.ok(phases.some((p) => p.phase === 3), "streaming progress was reported");
        await runsOnlyOn(c!, 1, "cache");
        const onB = (await capsuleOn(b, "cache"))!;
        assert.equal(onB.network!.address, ipBefore, "the capsule keeps its IP");
        assert.equal(r.targetAddress, b.host.address);
        const port = r.targetPorts[0].hostPort;
        await checkRedis(client, b.host.address, port, "at B");
        await checkRedis(client, a.host.address, 6400, "at A (grace forwarding)");
        assert.match(await a.tableText(), /moved/, "A forwards the moved capsule's port");
      });

      await t.step("B→A: back home, keys intact", async () => {
        const r = await migrate(b.agent.client, { capsule: "cache", targetPeer: "node-0", options: undefined });
        console.log(`B→A: total ${r.totalMs} ms, gap ${r.gapMs} ms, ${r.bytes} bytes`);
        await runsOnlyOn(c!, 0, "cache");
        await checkRedis(client, a.host.address, 6400, "at A again");
      });

      await t.step("the client loop kept getting answers", async () => {
        const s = await netclientResult(loop) as { requests: number; failures: number; max_gap_ms: number };
        console.log(`client loop: ${s.requests} requests, ${s.failures} failures, longest gap ${s.max_gap_ms} ms`);
        assert.ok(s.requests - s.failures > 100, JSON.stringify(s));
      });
    } finally {
      if (c) {
        if (Deno.env.get("FLEXCAP_TEST_LOGS")) { for (const n of c.nodes) console.log(n.agent.logs()); }
        await c.cleanup();
      }
    }
  },
});

Deno.test({
  name: "migration: guest memory stays intact across many moves of a guest that writes all the time",
  ignore: !supported,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const hops = Number(Deno.env.get("FLEXCAP_MIGRATION_HOPS") ?? "8");
    let c: TestCluster | undefined;
    try {
      c = await startCluster(2);
      // 16 MiB rewritten back to back: the workload that corrupted guests under QEMU 7.2/TCG with
      // ordinary pre-copy (docs/research/migration-qemu72-tcg.md §4).
      await buildMemtestImage(c.nodes[0].agent.client, "memtest", 16, "rw", 0);
      await c.nodes[0].agent.client.capsules.createCapsule({
        name: "mem",
        spec: CapsuleSpec.fromPartial({ image: "memtest", memoryMib: 64 }),
      });
      await c.nodes[0].agent.client.capsules.startCapsule({ capsule: "mem" });
      const beats = async (i: number) => parseMemtest(await logsText(c!.nodes[i].agent.client, "mem"));
      await waitFor("memtest passes before the first move", async () => (await beats(0)).okBeats >= 2);
      const gaps: number[] = [];
      let on = 0;
      for (let hop = 1; hop <= hops; hop++) {
        const to = 1 - on;
        const r = await migrate(c.nodes[on].agent.client, {
          capsule: "mem",
          targetPeer: c.names[to],
          options: undefined,
        });
        gaps.push(r.gapMs);
        on = to;
        // Fresh heartbeats on the new instance mean whole verify passes after the move.
        const report = await waitFor(`memtest passes after hop ${hop}`, async () => {
          const rep = await beats(on);
          return rep.okBeats >= 2 || rep.mismatchLines.length > 0 ? rep : undefined;
        }, 60_000);
        assert.deepEqual(report.mismatchLines, [], `hop ${hop}: guest memory differs after the move`);
        const bad = guestCorruption(await consoleText(c.nodes[on].agent.client, "mem"));
        assert.deepEqual(bad, [], `hop ${hop}: guest kernel reports corruption`);
      }
      console.log(`memtest: ${hops} moves clean; stop→resume ms ${gaps.join(", ")}`);
    } finally {
      if (c) await c.cleanup();
    }
  },
});
