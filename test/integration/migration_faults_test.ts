/**
 * Live migration under faults: whatever fails, and wherever, the capsule afterwards runs
 * in exactly one place with its redis keys intact. Faults: cancel, kill -9 of either agent,
 * kill of the target QEMU, a cut link; at streaming, at switchover and after the target
 * resumed. Failpoints (agent/migrate/failpoints.ts) hold an agent at a phase long enough for
 * the test to strike there; streaming is slowed with options.max_bandwidth_mib_s.
 */
import assert from "node:assert/strict";
import { type FlexcapClient, migrate } from "../../agent/cli/client.ts";
import { CapsuleState } from "../../agent/gen/flexcap/v1/capsule.ts";
import { MigrationOptions, MigrationPhase } from "../../agent/gen/flexcap/v1/migration.ts";
import { waitFor } from "../harness/agent.ts";
import { startCluster, type TestCluster } from "../harness/cluster.ts";
import { buildRedisImage, startRedisCapsule } from "../harness/images.ts";
import { netnsSupported } from "../harness/netns.ts";

const supported = await netnsSupported();
const KEYS = 200;
const HOLD_MS = 4_000;
const SLOW = MigrationOptions.fromPartial({ maxBandwidthMibS: 6 });
const values = Array.from({ length: KEYS }, (_, i) => `v${i}-${"y".repeat(i % 40)}`);

Deno.test({
  name: "migration faults: the capsule always runs exactly once, keys intact",
  ignore: !supported,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    let c: TestCluster | undefined;
    try {
      c = await startCluster(2, { configYaml: "migration:\n  grace_ms: 5000\n" });
      const cl = c;
      const [a, b] = c.nodes;
      const node = [a, b];
      const client = c.net.client;
      await buildRedisImage(a.agent.client, "redis");
      await startRedisCapsule(a.agent.client, "kv", 6500);
      const list = async (i: number) =>
        (await node[i].agent.client.capsules.listCapsules({ labelSelector: {} })).capsules.filter((x) =>
          x.name === "kv"
        );
      const exposedOn = async (i: number) => (await list(i))[0]?.exposed.length === 1;
      await waitFor("redis exposed on A", () => exposedOn(0));
      const mset: string[] = [];
      values.forEach((v, i) => mset.push(`k${i}`, v));
      const set = await client.netclient(["redis", a.host.address, "6500", "MSET", ...mset]) as { reply: unknown };
      assert.equal(set.reply, "OK");

      /** Waits until kv runs on node `on` only, then checks every key there. */
      const exactlyOnce = async (on: number, why: string) => {
        await waitFor(`${why}: kv running on node-${on} only`, async () => {
          const here = await list(on);
          const there = await list(1 - on);
          return here.length === 1 && here[0].state === CapsuleState.CAPSULE_STATE_RUNNING && there.length === 0;
        }, 60_000);
        await waitFor(`${why}: kv exposed on node-${on}`, () => exposedOn(on), 30_000);
        const keys = values.map((_, i) => `k${i}`);
        const got = await client.netclient(["redis", node[on].host.address, "6500", "MGET", ...keys]) as {
          reply: unknown;
        };
        assert.deepEqual(got.reply, values, `${why}: keys differ`);
        // No QEMU of the capsule is left on the other node.
        const ps = await node[1 - on].host.run(["pgrep", "-f", `${node[1 - on].agent.stateDir}/capsules/`]);
        assert.equal(ps.stdout.trim(), "", `${why}: a QEMU of the capsule still runs on node-${1 - on}`);
      };
      /** Restarts node i's agent with failpoints (empty: none). */
      const failpoints = async (i: number, spec: string) => {
        await node[i].agent.kill9();
        await node[i].agent.restart(spec ? { FLEXCAPD_FAILPOINTS: spec } : {});
      };
      /** Starts a migration from `from` and resolves once it reports `phase` (or fails). */
      const start = (from: number, opts = SLOW, phase = MigrationPhase.MIGRATION_PHASE_STREAMING) => {
        let reached!: (ok: boolean) => void;
        const phaseSeen = new Promise<boolean>((r) => reached = r);
        const done = migrate(node[from].agent.client, {
          capsule: "kv",
          targetPeer: cl.names[1 - from],
          options: opts,
        }, (p) => {
          if (p.phase === phase) reached(true);
        });
        done.then(() => reached(false), (err) => {
          console.log(`migration ended: ${err.message}`);
          reached(false);
        });
        // A fault test whose migration never got to the phase would test nothing.
        const atPhase = phaseSeen.then((ok) => assert.ok(ok, `the migration never reached phase ${phase}`));
        return { done, atPhase };
      };
      const qemuPid = async (cli: FlexcapClient) =>
        (await cli.capsules.listCapsules({ labelSelector: {} })).capsules.find((x) => x.name === "kv")!.qemuPid;

      await t.step("cancel mid-stream: the capsule keeps running on A", async () => {
        const m = start(0);
        await m.atPhase;
        await a.agent.client.capsules.cancelMigration({ capsule: "kv" });
        await assert.rejects(m.done, /ABORTED|cancelled/);
        await exactlyOnce(0, "cancel");
      });

      await t.step("kill the target QEMU mid-stream", async () => {
        const m = start(0);
        await m.atPhase;
        const pid = await waitFor("target qemu", () => qemuPid(b.agent.client).catch(() => 0));
        await b.host.run(["kill", "-9", String(pid)]);
        await assert.rejects(m.done);
        await exactlyOnce(0, "target qemu killed while streaming");
      });

      await t.step("kill -9 the target agent mid-stream", async () => {
        const m = start(0);
        await m.atPhase;
        await b.agent.kill9();
        await assert.rejects(m.done);
        await b.agent.restart();
        await exactlyOnce(0, "target agent killed while streaming");
      });

      await t.step("kill -9 the source agent mid-stream", async () => {
        const m = start(0);
        await m.atPhase;
        await a.agent.kill9();
        await m.done.catch(() => {});
        await a.agent.restart();
        await exactlyOnce(0, "source agent killed while streaming");
      });

      await t.step("cut the link mid-stream: the migration times out, the capsule stays", async () => {
        const m = start(0, MigrationOptions.fromPartial({ maxBandwidthMibS: 6, timeoutMs: 3_000 }));
        await m.atPhase;
        await cl.net.linkDown(b.host);
        await assert.rejects(m.done, /timeout_ms|DEADLINE|did not finish/);
        await cl.net.linkUp(b.host);
        await exactlyOnce(0, "link cut while streaming");
      });

      await t.step("kill -9 the source agent at switchover (journaled, not continued): back on A", async () => {
        await failpoints(0, `source-before-continue=sleep(${HOLD_MS})`);
        const m = start(0, MigrationOptions.fromPartial({}), MigrationPhase.MIGRATION_PHASE_STREAMING);
        await m.atPhase;
        const id = (await list(0))[0].id;
        await waitFor(
          "source journaled switchover",
          () =>
            /"phase":\s*"switchover"/.test(Deno.readTextFileSync(`${a.agent.stateDir}/capsules/${id}/capsule.json`)),
          10_000,
        );
        await failpoints(0, "");
        await m.done.catch(() => {});
        await exactlyOnce(0, "source agent killed at switchover");
      });

      await t.step("kill -9 the source agent after the target resumed: it settles on B", async () => {
        await failpoints(0, `source-before-commit=sleep(${HOLD_MS})`);
        const m = start(0, MigrationOptions.fromPartial({}), MigrationPhase.MIGRATION_PHASE_RESUMING);
        await m.atPhase;
        await failpoints(0, "");
        await m.done.catch(() => {});
        await exactlyOnce(1, "source agent killed after resume");
      });

      await t.step("kill -9 the target agent after the guest resumed there: it stays on A's peer", async () => {
        // Now on B: move it back to A, holding A (the target) right after the load.
        await failpoints(0, `target-after-load=sleep(${HOLD_MS})`);
        const m = start(1, MigrationOptions.fromPartial({}), MigrationPhase.MIGRATION_PHASE_RESUMING);
        await m.atPhase;
        await failpoints(0, "");
        await m.done.catch(() => {});
        await exactlyOnce(0, "target agent killed after resume");
      });

      await t.step("kill the target QEMU after resume, before the source let go: the source resumes", async () => {
        await failpoints(1, `target-after-load=sleep(${HOLD_MS})`);
        const m = start(0, MigrationOptions.fromPartial({}), MigrationPhase.MIGRATION_PHASE_RESUMING);
        await m.atPhase;
        const pid = await waitFor("target qemu", () => qemuPid(b.agent.client).catch(() => 0));
        await b.host.run(["kill", "-9", String(pid)]);
        await assert.rejects(m.done, /dropped|ABORTED/);
        await exactlyOnce(0, "target qemu killed after resume");
        await failpoints(1, "");
      });

      await t.step("after all that, a clean migration still works", async () => {
        const r = await migrate(a.agent.client, { capsule: "kv", targetPeer: "node-1", options: undefined });
        assert.ok(r.totalMs > 0);
        await exactlyOnce(1, "clean move");
      });
    } finally {
      if (c) {
        if (Deno.env.get("FLEXCAP_TEST_LOGS")) { for (const n of c.nodes) console.log(n.agent.logs()); }
        await c.cleanup();
      }
    }
  },
});
