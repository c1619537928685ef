import assert from "node:assert/strict";
import { probeUntil } from "../../../agent/capsule/probe.ts";

const enc = (s: string) => new TextEncoder().encode(s);

Deno.test("probe passes on the expected reply and keeps retrying a closing port", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  let conns = 0;
  const server = (async () => {
    for await (const c of listener) {
      // The first two connections close at once, like a forward whose app is not up yet.
      if (++conns <= 2) {
        c.close();
        continue;
      }
      const buf = new Uint8Array(64);
      await c.read(buf);
      await c.write(enc("+PONG\r\n"));
      c.close();
    }
  })();
  try {
    const spec = { host: "127.0.0.1", port, send: enc("PING\r\n"), expect: enc("+PONG") };
    assert.deepEqual(await probeUntil(spec, Date.now() + 5_000, () => true), { ok: true });
    assert.equal(conns, 3);
    const wrong = await probeUntil({ ...spec, expect: enc("-ERR") }, Date.now() + 300, () => true);
    assert.equal(wrong.ok, false);
    const dead = await probeUntil(spec, Date.now() + 5_000, () => false);
    assert.ok(!dead.ok && /capsule stopped/.test(dead.detail));
  } finally {
    listener.close();
    await server.catch(() => {});
  }
});
