/**
 * Save/restore against real QEMU: a saved guest frees its QEMU, and a restored one carries
 * on exactly where it was (a counting shell loop keeps counting; httpd keeps serving).
 */
import assert from "node:assert/strict";
import { BuildImageRequest } from "../../agent/gen/flexcap/v1/image.ts";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { CapsuleState as S, httpGet, logsText, pidAlive, privatePortsConfig, stateName } from "./_util.ts";

const TICKER = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done";

/** Every "tick N" number in console order. */
function ticks(text: string): number[] {
  return [...text.matchAll(/tick (\d+)/g)].map((m) => Number(m[1]));
}

/** Asserts `seq` is 0, 1, 2, … with no gap and no restart. */
function assertCounting(seq: number[], what: string): void {
  seq.forEach((n, i) => assert.equal(n, i, `${what}: tick #${i} is ${n} (${seq.slice(Math.max(0, i - 3), i + 3)})`));
}

Deno.test("save and restore continue the guest where it was", async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const c = agent.client.capsules;
  const text = () => logsText(agent.client, "ticker");
  try {
    await agent.client.images.buildImage(BuildImageRequest.fromPartial({
      name: "ticker",
      executable: "/bin/busybox",
      args: ["sh", "-c", TICKER],
    }));
    await c.createCapsule({ name: "ticker", spec: spec("ticker") });
    const started = (await c.startCapsule({ capsule: "ticker" })).capsule!;
    await waitFor("tick 3", async () => ticks(await text()).some((n) => n >= 3), 60_000);

    let lastBeforeSave = -1;
    let saveOffset = 0;
    await t.step("save writes the state file and ends qemu", async () => {
      const res = await c.saveCapsule({ capsule: "ticker" });
      assert.equal(res.capsule!.state, S.CAPSULE_STATE_SAVED, res.capsule!.stateReason);
      assert.ok(res.stateBytes > 0, "state_bytes");
      assert.match(res.capsule!.stateReason, new RegExp(`saved ${res.stateBytes} bytes`));
      assert.equal(res.capsule!.qemuPid, 0);
      assert.equal(res.capsule!.memory, undefined);
      await waitFor("qemu to be gone", () => !pidAlive(started.qemuPid), 10_000);
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, 0);
      const before = await text();
      saveOffset = before.length;
      lastBeforeSave = Math.max(...ticks(before));
      assert.ok(lastBeforeSave >= 3);
      assertCounting(ticks(before), "before save");
    });

    await t.step("a saved guest does not run", async () => {
      await new Promise((r) => setTimeout(r, 2_000));
      assert.equal((await text()).length, saveOffset, "output grew while saved");
      assert.equal((await c.getCapsule({ capsule: "ticker" })).capsule!.state, S.CAPSULE_STATE_SAVED);
    });

    await t.step("restore resumes the count where it stopped", async () => {
      const restored = (await c.restoreCapsule({ capsule: "ticker" })).capsule!;
      assert.equal(restored.state, S.CAPSULE_STATE_RUNNING, `${stateName(restored.state)}: ${restored.stateReason}`);
      assert.ok(restored.qemuPid > 0 && restored.qemuPid !== started.qemuPid && pidAlive(restored.qemuPid));
      await waitFor("ticks after restore", async () => ticks(await text()).at(-1)! >= lastBeforeSave + 3, 30_000);
      const all = await text();
      const after = all.slice(saveOffset);
      assert.ok(Math.min(...ticks(after.slice(after.indexOf("tick ")))) > lastBeforeSave, "first tick after restore");
      assertCounting(ticks(all), "across save/restore");
      assert.doesNotMatch(after, /capsule-init: started/, "the guest must not boot again");
      assert.doesNotMatch(after, /\btick 0\b/);
    });

    await t.step("pause, save and restore gives a paused guest", async () => {
      const paused = (await c.pauseCapsule({ capsule: "ticker" })).capsule!;
      assert.equal(paused.state, S.CAPSULE_STATE_PAUSED);
      const saved = await c.saveCapsule({ capsule: "ticker" });
      assert.equal(saved.capsule!.state, S.CAPSULE_STATE_SAVED);
      const restored = (await c.restoreCapsule({ capsule: "ticker" })).capsule!;
      assert.equal(restored.state, S.CAPSULE_STATE_PAUSED, `${stateName(restored.state)}: ${restored.stateReason}`);
      assert.ok(pidAlive(restored.qemuPid));
      const frozen = await text();
      await new Promise((r) => setTimeout(r, 2_000));
      assert.equal((await text()).length, frozen.length, "a restored paused guest must not run");
      const resumed = (await c.resumeCapsule({ capsule: "ticker" })).capsule!;
      assert.equal(resumed.state, S.CAPSULE_STATE_RUNNING);
      const last = Math.max(...ticks(frozen));
      await waitFor("ticks after resume", async () => ticks(await text()).at(-1)! >= last + 2, 30_000);
      assertCounting(ticks(await text()), "across pause/save/restore/resume");
    });

    await t.step("a saved capsule can be deleted", async () => {
      const saved = await c.saveCapsule({ capsule: "ticker" });
      assert.equal(saved.capsule!.state, S.CAPSULE_STATE_SAVED);
      const capsuleDir = `${agent.stateDir}/capsules/${saved.capsule!.id}`;
      await Deno.stat(capsuleDir);
      await c.deleteCapsule({ capsule: "ticker" });
      await assert.rejects(Deno.stat(capsuleDir), Deno.errors.NotFound, "state file and logs are removed");
    });

    await t.step("a saved and restored httpd keeps serving", async () => {
      await buildHttpdImage(agent.client);
      await c.createCapsule({
        name: "web",
        spec: spec("httpd", { ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }] }),
      });
      const web = (await c.startCapsule({ capsule: "web" })).capsule!;
      assert.equal(
        await waitFor("httpd", () => httpGet(web.ports[0].hostPort, 2_000), 60_000),
        "hello from a capsule\n",
      );
      const saved = await c.saveCapsule({ capsule: "web" });
      assert.equal(saved.capsule!.state, S.CAPSULE_STATE_SAVED);
      assert.deepEqual(saved.capsule!.ports, []);
      await assert.rejects(httpGet(web.ports[0].hostPort, 1_000), "nothing serves while saved");
      const restored = (await c.restoreCapsule({ capsule: "web" })).capsule!;
      assert.equal(restored.state, S.CAPSULE_STATE_RUNNING);
      assert.equal(restored.ports.length, 1);
      assert.equal(
        await waitFor("httpd after restore", () => httpGet(restored.ports[0].hostPort, 2_000), 30_000),
        "hello from a capsule\n",
      );
      // The guest channel comes back too: a graceful stop still reaches the app.
      const stopped = (await c.stopCapsule({ capsule: "web", graceMs: 0 })).capsule!;
      assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED);
      assert.match(stopped.stateReason, /app exited with code 143/);
    });
  } finally {
    await agent.cleanup();
  }
});
