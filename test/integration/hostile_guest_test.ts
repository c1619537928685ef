/**
 * A hostile guest against a real agent: a capsule whose PID 1 (test/fixtures/hostile_init.c,
 * in place of capsule-init) floods the OS-server channel with random, truncated, oversized
 * and invalid frames while a normal capsule serves HTTP next to it. The agent and the other
 * capsule must not notice.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { buildShellImage } from "../harness/images.ts";
import { CapsuleState as S, httpGet, privatePortsConfig, until } from "./_util.ts";

const SOURCE = fileURLToPath(new URL("../fixtures/hostile_init.c", import.meta.url));

Deno.test("a hostile guest cannot hurt the agent or another capsule", async () => {
  const dir = await Deno.makeTempDir({ prefix: "fc-hostile-" });
  const hostile = `${dir}/hostile-init`;
  await execa("musl-gcc", ["-static", "-Os", "-o", hostile, SOURCE]);
  // Built with the hostile binary as its PID 1; every later image gets the real capsule-init.
  const agent = await startTestAgent({ configYaml: privatePortsConfig(), env: { FLEXCAP_CAPSULE_INIT: hostile } });
  try {
    await buildShellImage(agent.client, "evil", "true");
    await agent.kill9();
    await agent.restart({});
    const c = agent.client.capsules; // the restart made a new client
    await buildHttpdImage(agent.client, "httpd", "still fine\n");

    await c.createCapsule({
      name: "web",
      spec: spec("httpd", { ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }] }),
    });
    const web = (await c.startCapsule({ capsule: "web" })).capsule!;
    const port = web.ports[0].hostPort;
    assert.equal(await waitFor("web", () => httpGet(port), 60_000), "still fine\n");
    await until("web listening", async () => (await c.getCapsule({ capsule: "web" })).capsule!.listening.length === 1);

    await c.createCapsule({ name: "evil", spec: spec("evil", { memoryMib: 32 }) });
    await c.startCapsule({ capsule: "evil" });
    await until("the attack to start", () => agent.logs().includes("guest frame dropped"), 60_000);

    // While the attack goes on, the agent answers and the neighbour keeps serving.
    for (let i = 0; i < 15; i++) {
      assert.equal(await httpGet(port, 3_000), "still fine\n", `web at second ${i}`);
      assert.ok((await agent.client.agent.getAgentInfo({})).capsules === 2);
      await new Promise((r) => setTimeout(r, 1_000));
    }
    const evil = (await c.getCapsule({ capsule: "evil" })).capsule!;
    assert.equal(evil.state, S.CAPSULE_STATE_RUNNING, evil.stateReason);
    assert.ok(evil.listening.length <= 64);
    for (const p of evil.listening) assert.ok(p.port >= 1 && p.port <= 65535 && [1, 2].includes(p.protocol));
    const neighbour = (await c.getCapsule({ capsule: "web" })).capsule!;
    assert.deepEqual(neighbour.listening.map((p) => p.port), [80], "the attack changed nothing of the neighbour");
    assert.ok(agent.logs().length < 4 * 1024 * 1024, `agent log grew to ${agent.logs().length} bytes`);

    // The hostile guest ignores Shutdown: stop falls back to killing it, and nothing else moves.
    const stopped = (await c.stopCapsule({ capsule: "evil", graceMs: 1_000 })).capsule!;
    assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED);
    assert.match(stopped.stateReason, /killed/);
    assert.equal(await httpGet(port), "still fine\n");
  } finally {
    await agent.cleanup();
    await Deno.remove(dir, { recursive: true });
  }
});
