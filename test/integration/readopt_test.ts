/**
 * Agent crash and restart against real QEMU: running capsules survive a kill -9 of the
 * agent and are re-adopted; a QEMU that died meanwhile is settled as stopped; a second
 * agent on the same state dir is refused.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { CapsuleState as S, httpGet, pidAlive, privatePortsConfig, stateName, until } from "./_util.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const INDEX = "hello from a capsule\n";

Deno.test("agent restart re-adopts running capsules and settles dead ones", async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const get = async (ref: string) => (await agent.client.capsules.getCapsule({ capsule: ref })).capsule!;
  try {
    await buildHttpdImage(agent.client);
    const port80 = [{ guestPort: 80, hostPort: 0, protocol: 0 }];
    await agent.client.capsules.createCapsule({ name: "web", spec: spec("httpd", { ports: port80 }) });
    await agent.client.capsules.createCapsule({ name: "frozen", spec: spec("httpd", { ports: port80 }) });
    const web = (await agent.client.capsules.startCapsule({ capsule: "web" })).capsule!;
    const frozen = (await agent.client.capsules.startCapsule({ capsule: "frozen" })).capsule!;
    const port = web.ports[0].hostPort;
    assert.equal(await waitFor("web to serve", () => httpGet(port, 2_000), 60_000), INDEX);
    await waitFor("frozen to serve", () => httpGet(frozen.ports[0].hostPort, 2_000), 60_000);
    await agent.client.capsules.pauseCapsule({ capsule: "frozen" });

    await t.step("capsules keep running while the agent is dead", async () => {
      await agent.kill9();
      assert.ok(pidAlive(web.qemuPid), `qemu ${web.qemuPid} died with the agent`);
      assert.ok(pidAlive(frozen.qemuPid), `qemu ${frozen.qemuPid} died with the agent`);
      assert.equal(await httpGet(port, 5_000), INDEX);
    });

    await t.step("restart re-adopts the running and the paused capsule", async () => {
      await agent.restart();
      const w = await get("web");
      assert.equal(w.state, S.CAPSULE_STATE_RUNNING, `${stateName(w.state)}: ${w.stateReason}`);
      assert.equal(w.qemuPid, web.qemuPid);
      assert.equal(w.ports[0].hostPort, port);
      assert.ok(w.memory && w.memory.qemuRssKib > 0, "live memory figures after re-adoption");
      assert.equal(await httpGet(port, 5_000), INDEX);
      const f = await get("frozen");
      assert.equal(f.state, S.CAPSULE_STATE_PAUSED, `${stateName(f.state)}: ${f.stateReason}`);
      assert.equal(f.qemuPid, frozen.qemuPid);
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, 256);
    });

    await t.step("a re-adopted capsule can be driven again", async () => {
      const resumed = (await agent.client.capsules.resumeCapsule({ capsule: "frozen" })).capsule!;
      assert.equal(resumed.state, S.CAPSULE_STATE_RUNNING);
      assert.equal(
        await waitFor("frozen after resume", () => httpGet(resumed.ports[0].hostPort, 2_000), 30_000),
        INDEX,
      );
      // The guest channel is re-established too: a graceful stop reports the app's exit code.
      const stopped = (await agent.client.capsules.stopCapsule({ capsule: "frozen", graceMs: 0 })).capsule!;
      assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED);
      assert.match(stopped.stateReason, /app exited with code 143/);
      assert.ok(!pidAlive(frozen.qemuPid));
    });

    await t.step("a second agent on the same state dir is refused", async () => {
      const base = await Deno.makeTempDir({ prefix: "flexcap-second-" });
      try {
        const out = await new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            `${ROOT}/agent/cli/flexcapd.ts`,
            "serve",
            "--state-dir",
            agent.stateDir,
            "--api",
            `unix:${base}/api.sock`,
          ],
          cwd: ROOT,
          stdin: "null",
          stdout: "piped",
          stderr: "piped",
          signal: AbortSignal.timeout(60_000),
        }).output();
        const stderr = new TextDecoder().decode(out.stderr);
        assert.notEqual(out.code, 0, `second agent exited ${out.code}: ${stderr}`);
        assert.match(stderr, /locked/);
        assert.match(stderr, new RegExp(agent.stateDir.replaceAll("/", "\\/")));
      } finally {
        await Deno.remove(base, { recursive: true });
      }
      // The first agent and its capsule are unaffected.
      assert.equal((await get("web")).state, S.CAPSULE_STATE_RUNNING);
      assert.equal(await httpGet(port, 5_000), INDEX);
    });

    await t.step("a qemu that dies while the agent is down leaves the capsule stopped", async () => {
      await agent.kill9();
      Deno.kill(web.qemuPid, "SIGKILL");
      await waitFor("qemu to die", () => !pidAlive(web.qemuPid), 10_000);
      await agent.restart();
      const w = await get("web");
      assert.equal(w.state, S.CAPSULE_STATE_STOPPED, `${stateName(w.state)}: ${w.stateReason}`);
      assert.match(w.stateReason, /qemu exited while the agent was down \(was running\)/);
      assert.equal(w.qemuPid, 0);
      assert.deepEqual(w.ports, []);
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, 0);
    });

    await t.step("a capsule settled as stopped starts again", async () => {
      const again = (await agent.client.capsules.startCapsule({ capsule: "web" })).capsule!;
      assert.equal(again.state, S.CAPSULE_STATE_RUNNING);
      assert.equal(await until("web to serve again", () => httpGet(again.ports[0].hostPort, 2_000), 60_000), INDEX);
    });
  } finally {
    await agent.cleanup();
  }
});
