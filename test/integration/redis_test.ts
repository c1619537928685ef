/**
 * A real dynamically linked app on the Debian-kernel "Linux VM" baseline: redis-server
 * packed with its shared libraries into the initramfs, reached over its forwarded TCP port
 * with raw RESP. (capsule_os_test.ts runs redis on the capsule kernel.)
 */
import assert from "node:assert/strict";
import { BuildImageRequest, KernelKind } from "../../agent/gen/flexcap/v1/image.ts";
import { spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { CapsuleState as S, consoleText, logsText, privatePortsConfig, stateName } from "./_util.ts";

const REDIS = "/usr/bin/redis-server";
const enc = new TextEncoder();
const dec = new TextDecoder();

/** RESP encoding of one command. */
function resp(args: string[]): Uint8Array {
  return enc.encode(`*${args.length}\r\n` + args.map((a) => `$${enc.encode(a).length}\r\n${a}\r\n`).join(""));
}

/** True once `s` holds one whole RESP reply (simple, error, integer or bulk string). */
function complete(s: string): boolean {
  const bulk = /^\$(-?\d+)\r\n/.exec(s);
  if (bulk) return Number(bulk[1]) < 0 || enc.encode(s).length >= bulk[0].length + Number(bulk[1]) + 2;
  return /^[+\-:].*\r\n/.test(s);
}

/** Sends raw bytes on a fresh connection and returns the first whole reply. */
async function talk(port: number, bytes: Uint8Array, timeoutMs = 3_000): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => conn.close(), timeoutMs);
  let out = "";
  try {
    await conn.write(bytes);
    const buf = new Uint8Array(4096);
    while (!complete(out)) {
      const n = await conn.read(buf);
      if (n === null) break;
      out += dec.decode(buf.subarray(0, n));
    }
    return out;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed by the timer */ }
  }
}

Deno.test("redis runs in a capsule and answers over its forwarded port", {
  ignore: !(() => {
    try {
      return Deno.statSync(REDIS).isFile;
    } catch {
      return false;
    }
  })(),
}, async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const c = agent.client.capsules;
  try {
    let port = 0;

    await t.step("image packs redis with its shared libraries", async () => {
      const image = (await agent.client.images.buildImage(BuildImageRequest.fromPartial({
        name: "redis",
        executable: REDIS,
        args: ["--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
        kernel: KernelKind.KERNEL_KIND_LINUX_VM,
      }))).image!;
      assert.equal(image.kernel, KernelKind.KERNEL_KIND_LINUX_VM);
      assert.equal(image.entrypoint, REDIS);
      for (const lib of ["libc.so.6", "libjemalloc.so.2", "libssl.so.3", "ld-linux-x86-64.so.2"]) {
        assert.ok(image.files.some((f) => f.endsWith(`/${lib}`)), `${lib} packed (${image.files})`);
      }
    });

    await t.step("redis answers PING with PONG", async () => {
      await c.createCapsule({
        name: "redis",
        spec: spec("redis", { memoryMib: 128, ports: [{ guestPort: 6379, hostPort: 0, protocol: 0 }] }),
      });
      const started = (await c.startCapsule({ capsule: "redis" })).capsule!;
      assert.equal(started.state, S.CAPSULE_STATE_RUNNING);
      port = started.ports[0].hostPort;
      const reply = await waitFor("redis PONG", async () => {
        const r = await talk(port, enc.encode("PING\r\n"), 2_000);
        if (r.startsWith("+PONG")) return r;
        // A connection reset while redis is still starting reads as empty: retry.
        assert.equal(r, "", `unexpected reply ${JSON.stringify(r)}`);
      }, 60_000);
      assert.equal(reply, "+PONG\r\n");
      assert.match(await logsText(agent.client, "redis"), /Ready to accept connections/);
      assert.doesNotMatch(await consoleText(agent.client, "redis"), /Kernel panic|Out of memory/);
    });

    await t.step("SET then GET returns the value", async () => {
      assert.equal(await talk(port, resp(["SET", "greeting", "hello capsule"])), "+OK\r\n");
      assert.equal(await talk(port, resp(["GET", "greeting"])), "$13\r\nhello capsule\r\n");
      assert.equal(await talk(port, resp(["GET", "missing"])), "$-1\r\n");
      assert.equal(await talk(port, resp(["INCR", "n"])), ":1\r\n");
    });

    await t.step("the data survives save and restore", async () => {
      const saved = await c.saveCapsule({ capsule: "redis" });
      assert.equal(saved.capsule!.state, S.CAPSULE_STATE_SAVED);
      const restored = (await c.restoreCapsule({ capsule: "redis" })).capsule!;
      assert.equal(restored.state, S.CAPSULE_STATE_RUNNING, `${stateName(restored.state)}: ${restored.stateReason}`);
      port = restored.ports[0].hostPort;
      const v = await waitFor("GET after restore", async () => {
        const r = await talk(port, resp(["GET", "greeting"]), 2_000);
        return r || undefined;
      }, 30_000);
      assert.equal(v, "$13\r\nhello capsule\r\n");
    });

    await t.step("stop lets redis exit cleanly on SIGTERM", async () => {
      const stopped = (await c.stopCapsule({ capsule: "redis", graceMs: 0 })).capsule!;
      assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED);
      assert.equal(stopped.exitCode, 0, stopped.stateReason);
      assert.match(stopped.stateReason, /app exited with code 0/);
      assert.match(await logsText(agent.client, "redis"), /ready to exit, bye bye/);
    });
  } finally {
    await agent.cleanup();
  }
});
