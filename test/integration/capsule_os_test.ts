/**
 * The capsule OS end to end: the tiny kernel, capsule-init as PID 1, the app on a
 * read-only root disk, and the OS-server channel carrying listen/unlisten, the app's
 * output, its exit status and graceful stop, across save/restore. Real flexcapd, real QEMU.
 */
import assert from "node:assert/strict";
import { EventType, Protocol, type WatchEventsResponse } from "../../agent/gen/flexcap/v1/capsule.ts";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { buildRedisImage, buildShellImage, haveFile, KernelKind, REDIS } from "../harness/images.ts";
import {
  CapsuleState as S,
  collect,
  consoleText,
  httpGet,
  logsText,
  privatePortsConfig,
  stateName,
  until,
} from "./_util.ts";

const INDEX = "served by a tiny capsule\n";

Deno.test("capsule OS: tiny kernel, capsule-init and the OS-server channel", async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const c = agent.client.capsules;
  const watch = collect<WatchEventsResponse>(agent.client.raw.capsules.watchEvents({ capsule: "" }));
  const events = (name: string, type: EventType) =>
    watch.items.map((i) => i.event!).filter((e) => e.capsuleName === name && e.type === type);
  try {
    let port = 0;

    await t.step("an httpd image on the capsule kernel keeps the app off the initramfs", async () => {
      const image = await buildHttpdImage(agent.client, "httpd", INDEX);
      assert.equal(image.kernel, KernelKind.KERNEL_KIND_CAPSULE);
      assert.ok(image.files.includes("/bin/busybox") && image.files.includes("/www/index.html"), `${image.files}`);
      assert.ok(image.minMemoryMib > 0 && image.minMemoryMib <= 16, `min ${image.minMemoryMib} MiB`);
    });

    await t.step("it serves HTTP at the memory its manifest claims, and reports listen 80/tcp", async () => {
      const image = (await agent.client.images.getImage({ image: "httpd" })).image!;
      await c.createCapsule({
        name: "web",
        spec: spec("httpd", { memoryMib: image.minMemoryMib, ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }] }),
      });
      const started = (await c.startCapsule({ capsule: "web" })).capsule!;
      port = started.ports[0].hostPort;
      assert.equal(await waitFor("http", () => httpGet(port), 60_000), INDEX);
      const listening = await until("listening 80", async () => {
        const got = (await c.getCapsule({ capsule: "web" })).capsule!.listening;
        return got.some((p) => p.port === 80) ? got : undefined;
      });
      assert.deepEqual(listening, [{ port: 80, protocol: Protocol.PROTOCOL_TCP }]);
      await until("LISTEN event", () => events("web", EventType.EVENT_TYPE_LISTEN).length > 0);
      assert.deepEqual(events("web", EventType.EVENT_TYPE_LISTEN)[0].port, {
        port: 80,
        protocol: Protocol.PROTOCOL_TCP,
      });
      const console = await consoleText(agent.client, "web");
      assert.doesNotMatch(console, /Kernel panic|Out of memory/);
    });

    await t.step("the channel survives save/restore: ports resync, stop stays graceful", async () => {
      await c.saveCapsule({ capsule: "web" });
      const saved = (await c.getCapsule({ capsule: "web" })).capsule!;
      assert.deepEqual(saved.listening, [], "nothing listens while the capsule is saved");
      await until("UNLISTEN on save", () => events("web", EventType.EVENT_TYPE_UNLISTEN).length > 0);
      const restored = (await c.restoreCapsule({ capsule: "web" })).capsule!;
      assert.equal(restored.state, S.CAPSULE_STATE_RUNNING, `${stateName(restored.state)}: ${restored.stateReason}`);
      assert.equal(await waitFor("http after restore", () => httpGet(restored.ports[0].hostPort), 30_000), INDEX);
      await until("listening again after restore", async () => {
        return (await c.getCapsule({ capsule: "web" })).capsule!.listening.length === 1;
      }, 30_000);
      const stopped = (await c.stopCapsule({ capsule: "web", graceMs: 5_000 })).capsule!;
      assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED);
      // busybox httpd dies of SIGTERM: the guest reported the signal, so no QMP kill was needed.
      assert.match(stopped.stateReason, /guest powered off; app exited with code 143/);
    });

    await t.step("the app's exit code reaches the API and an EXITED event", async () => {
      await buildShellImage(agent.client, "exit7", "echo to stdout; echo to stderr >&2; exit 7");
      await c.createCapsule({ name: "exit7", spec: spec("exit7", { memoryMib: 32 }) });
      await c.startCapsule({ capsule: "exit7" });
      const stopped = await until("exit7 stopped", async () => {
        const cap = (await c.getCapsule({ capsule: "exit7" })).capsule!;
        return cap.state === S.CAPSULE_STATE_STOPPED ? cap : undefined;
      });
      assert.equal(stopped.exitCode, 7, stopped.stateReason);
      assert.match(stopped.stateReason, /app exited with code 7/);
      assert.deepEqual(events("exit7", EventType.EVENT_TYPE_EXITED).map((e) => e.exit), [{ code: 7, signal: 0 }]);
      const out = await logsText(agent.client, "exit7");
      assert.match(out, /to stdout/);
      assert.match(out, /to stderr/);
      assert.ok(events("exit7", EventType.EVENT_TYPE_LOG).length > 0);
    });

    await t.step("stop is graceful: the app sees SIGTERM and its handler runs", async () => {
      await buildShellImage(
        agent.client,
        "trapper",
        "trap 'echo got SIGTERM; exit 0' TERM; echo waiting; while true; do sleep 1; done",
      );
      await c.createCapsule({ name: "trapper", spec: spec("trapper", { memoryMib: 32 }) });
      await c.startCapsule({ capsule: "trapper" });
      await until("trapper waiting", async () => /waiting/.test(await logsText(agent.client, "trapper")));
      const stopped = (await c.stopCapsule({ capsule: "trapper", graceMs: 10_000 })).capsule!;
      assert.equal(stopped.exitCode, 0, stopped.stateReason);
      assert.match(await logsText(agent.client, "trapper"), /got SIGTERM/);
      assert.doesNotMatch(stopped.stateReason, /killed/);
    });

    await t.step("output written after a restore still reaches the logs", async () => {
      await buildShellImage(agent.client, "ticker", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done");
      await c.createCapsule({ name: "ticker", spec: spec("ticker", { memoryMib: 32 }) });
      await c.startCapsule({ capsule: "ticker" });
      await until("tick 1", async () => /tick 1\n/.test(await logsText(agent.client, "ticker")));
      await c.saveCapsule({ capsule: "ticker" });
      const before = (await logsText(agent.client, "ticker")).match(/tick \d+/g)!.length;
      await c.restoreCapsule({ capsule: "ticker" });
      await until("more ticks after restore", async () => {
        return ((await logsText(agent.client, "ticker")).match(/tick \d+/g)?.length ?? 0) >= before + 2;
      }, 30_000);
      const ticks = (await logsText(agent.client, "ticker")).match(/tick (\d+)/g)!.map((s) => Number(s.slice(5)));
      // Nothing lost or repeated across the restore: the counter continues where it was.
      assert.deepEqual(ticks, ticks.map((_, i) => i));
      await c.stopCapsule({ capsule: "ticker", graceMs: 2_000 });
    });

    await t.step({
      name: "redis on the capsule kernel reports listen on 6379 and answers at its claimed minimum",
      ignore: !haveFile(REDIS),
      fn: async () => {
        const image = await buildRedisImage(agent.client, "redis");
        await c.createCapsule({
          name: "redis",
          spec: spec("redis", {
            memoryMib: image.minMemoryMib,
            ports: [{ guestPort: 6379, hostPort: 0, protocol: 0 }],
          }),
        });
        const started = (await c.startCapsule({ capsule: "redis" })).capsule!;
        await until(
          "redis LISTEN 6379",
          () => events("redis", EventType.EVENT_TYPE_LISTEN).some((e) => e.port?.port === 6379),
          60_000,
        );
        const reply = await waitFor("PONG", async () => {
          const conn = await Deno.connect({ hostname: "127.0.0.1", port: started.ports[0].hostPort });
          try {
            await conn.write(new TextEncoder().encode("PING\r\n"));
            const buf = new Uint8Array(64);
            const n = await conn.read(buf);
            return n ? new TextDecoder().decode(buf.subarray(0, n)) : undefined;
          } finally {
            conn.close();
          }
        }, 30_000);
        assert.equal(reply, "+PONG\r\n");
        assert.match(await logsText(agent.client, "redis"), /Ready to accept connections/);
        const stopped = (await c.stopCapsule({ capsule: "redis", graceMs: 5_000 })).capsule!;
        assert.equal(stopped.exitCode, 0, stopped.stateReason);
        assert.ok(events("redis", EventType.EVENT_TYPE_UNLISTEN).some((e) => e.port?.port === 6379));
      },
    });
  } finally {
    watch.cancel();
    await agent.cleanup();
  }
});
