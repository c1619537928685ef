/**
 * A TCP readiness probe: connect, send a request, and wait for a reply that starts with
 * the expected bytes. Retries until the deadline, because a forwarded port may accept the
 * connection before the app listens (user-mode networking) and then close it.
 */

/** What a probe needs. */
export interface ProbeSpec {
  host: string;
  port: number;
  send: Uint8Array;
  expect: Uint8Array;
}

const RETRY_MS = 200;
// One attempt gives up after this: a forward may accept and then hold the connection while
// its SYNs to a guest that is still booting back off (seconds), which would hide when the
// app really became ready.
const ATTEMPT_MS = 1_000;
const READ_LIMIT = 64 * 1024;

/** Probes until it passes (resolves) or `deadline` (ms since epoch) passes; `alive` false stops early. */
export async function probeUntil(
  spec: ProbeSpec,
  deadline: number,
  alive: () => boolean,
): Promise<{ ok: true } | { ok: false; detail: string }> {
  let last = "no attempt";
  while (Date.now() < deadline) {
    if (!alive()) return { ok: false, detail: `capsule stopped (last probe: ${last})` };
    try {
      if (await probeOnce(spec, deadline)) return { ok: true };
      last = "reply did not match";
    } catch (err) {
      last = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
  return { ok: false, detail: `no matching reply before the deadline (last probe: ${last})` };
}

async function probeOnce(spec: ProbeSpec, deadline: number): Promise<boolean> {
  const conn = await Deno.connect({ hostname: spec.host, port: spec.port, transport: "tcp" });
  const timer = setTimeout(() => {
    try {
      conn.close();
    } catch { /* closed */ }
  }, Math.max(0, Math.min(ATTEMPT_MS, deadline - Date.now())));
  try {
    let off = 0;
    while (off < spec.send.length) off += await conn.write(spec.send.subarray(off));
    const got = new Uint8Array(READ_LIMIT);
    let n = 0;
    while (n < spec.expect.length) {
      const r = await conn.read(got.subarray(n));
      if (r === null) throw new Error(`connection closed after ${n} bytes`);
      n += r;
    }
    return spec.expect.every((b, i) => got[i] === b);
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed by the timer */ }
  }
}
