/**
 * The migration data path over real sockets: unix socket pairs for the pumps, and a real
 * TLS listener with certificates made by `flexcapd certs` for the authenticated handover.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  DataListener,
  dialData,
  encodeHeader,
  newToken,
  parseHeader,
  pump,
  type RelayCounts,
  sameToken,
  splice,
} from "../../../agent/migrate/relay.ts";
import { type LogLine, randomBytes, recordingLogger, withTimeout } from "./helpers.ts";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const GUARD_MS = 15_000;
const MIB = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Header and token

Deno.test("relay header: encode/parse round trip", () => {
  const token = newToken();
  const bytes = encodeHeader("m-0123456789ab", token);
  const text = new TextDecoder().decode(bytes);
  assert.equal(text, `FCMIG1 m-0123456789ab ${token}\n`);
  assert.deepEqual(parseHeader(text.slice(0, -1)), { migrationId: "m-0123456789ab", token });
  const longest = "A".repeat(64);
  assert.deepEqual(parseHeader(`FCMIG1 ${longest} ${token}`), { migrationId: longest, token });
});

Deno.test("relay header: malformed lines are not headers", () => {
  const token = "0123456789abcdef".repeat(4);
  const ok = `FCMIG1 m-1 ${token}`;
  assert.ok(parseHeader(ok));
  for (
    const bad of [
      "",
      `FCMIG2 m-1 ${token}`, // wrong magic
      `fcmig1 m-1 ${token}`,
      `XFCMIG1 m-1 ${token}`,
      `FCMIG1 m-1 ${token.slice(1)}`, // 63 hex digits
      `FCMIG1 m-1 ${token}0`, // 65
      `FCMIG1 m-1 ${token.slice(0, -1)}g`, // not hex
      `FCMIG1 m-1 ${token.toUpperCase()}`, // upper-case hex is not what newToken makes
      `FCMIG1 ${"a".repeat(65)} ${token}`, // id too long
      `FCMIG1  ${token}`, // empty id
      `FCMIG1 m/1 ${token}`, // id with a slash
      `FCMIG1 m_1 ${token}`,
      `FCMIG1 m-1  ${token}`, // two spaces
      `FCMIG1 m-1 ${token} `, // trailing space
      `FCMIG1 m-1 ${token}\n`, // the newline is not part of the line
      `FCMIG1 m-1`,
    ]
  ) {
    assert.equal(parseHeader(bad), undefined, JSON.stringify(bad));
  }
});

Deno.test("relay tokens: 64 lowercase hex digits, fresh each time; sameToken compares exactly", () => {
  const seen = new Set<string>();
  for (let i = 0; i < 100; i++) {
    const t = newToken();
    assert.match(t, /^[0-9a-f]{64}$/);
    seen.add(t);
  }
  assert.equal(seen.size, 100);
  const t = newToken();
  assert.equal(sameToken(t, t), true);
  assert.equal(sameToken(t, t.slice()), true);
  assert.equal(sameToken(t, t.slice(0, -1)), false);
  assert.equal(sameToken(t, t.slice(0, -1) + (t.endsWith("0") ? "1" : "0")), false);
  assert.equal(sameToken(t, "1" + t.slice(1) === t ? "2" + t.slice(1) : "1" + t.slice(1)), false);
  assert.equal(sameToken("", ""), true);
  assert.equal(sameToken(t, ""), false);
});

// ---------------------------------------------------------------------------------------
// Pumps over real unix sockets

/** A connected pair of unix stream sockets in `dir`: [dialer, accepted]. */
async function unixPair(dir: string, name: string): Promise<[Deno.UnixConn, Deno.UnixConn]> {
  const path = join(dir, name);
  const l = Deno.listen({ transport: "unix", path });
  try {
    const [c, s] = await Promise.all([Deno.connect({ transport: "unix", path }), l.accept()]);
    return [c, s];
  } finally {
    l.close();
  }
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "fc-relay-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes `data` in pieces of varied size, then half-closes. */
async function send(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  let piece = 1000;
  while (off < data.length) {
    off += await conn.write(data.subarray(off, Math.min(data.length, off + piece)));
    piece = piece * 3 % (512 * 1024) + 1;
  }
  await conn.closeWrite();
}

/** Reads to EOF; returns the byte count and sha256. */
async function drain(conn: Deno.Conn): Promise<{ bytes: number; sha: string }> {
  const h = createHash("sha256");
  const buf = new Uint8Array(256 * 1024);
  let bytes = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    h.update(buf.subarray(0, n));
    bytes += n;
  }
  return { bytes, sha: h.digest("hex") };
}

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

function closeAll(...conns: Deno.Conn[]) {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed */ }
  }
}

Deno.test("pump copies everything, counts it and half-closes the destination", () =>
  withDir(async (dir) => {
    const [x, a] = await unixPair(dir, "in.sock");
    const [b, y] = await unixPair(dir, "out.sock");
    try {
      const data = randomBytes(5 * MIB + 123);
      let counted = 0;
      const [copied, , got] = await withTimeout(
        Promise.all([pump(a, b, (n) => counted += n), send(x, data), drain(y)]),
        GUARD_MS,
        "pump",
      );
      assert.equal(copied, data.length);
      assert.equal(counted, data.length);
      assert.deepEqual(got, { bytes: data.length, sha: sha(data) }); // y saw EOF: b was half-closed
      // Only the write half of b is closed: y can still send to b.
      await y.write(new Uint8Array([7]));
      const one = new Uint8Array(1);
      assert.equal(await b.read(one), 1);
      assert.equal(one[0], 7);
    } finally {
      closeAll(x, a, b, y);
    }
  }));

Deno.test("pump finishes short writes before reading more", async () => {
  // Pure logic over the write contract: a writer that takes at most 1000 bytes per call.
  const data = randomBytes(3 * MIB);
  let readAt = 0;
  const from = {
    read(p: Uint8Array): Promise<number | null> {
      if (readAt >= data.length) return Promise.resolve(null);
      const n = Math.min(p.length, data.length - readAt, 700_000);
      p.set(data.subarray(readAt, readAt + n));
      readAt += n;
      return Promise.resolve(n);
    },
  };
  const chunks: Uint8Array[] = [];
  let closed = 0;
  const to = {
    write(p: Uint8Array): Promise<number> {
      const n = Math.min(p.length, 1000);
      chunks.push(p.slice(0, n));
      return Promise.resolve(n);
    },
    closeWrite(): Promise<void> {
      closed++;
      return Promise.reject(new Error("already closed")); // a failing half-close is ignored
    },
  };
  assert.equal(await pump(from, to), data.length);
  assert.equal(closed, 1);
  const out = new Uint8Array(data.length);
  let off = 0;
  for (const c of chunks) (out.set(c, off), off += c.length);
  assert.equal(off, data.length);
  assert.equal(sha(out), sha(data));
});

Deno.test("splice relays 20 MiB each way at once, intact, and closes both ends", () =>
  withDir(async (dir) => {
    const [x, a] = await unixPair(dir, "src.sock"); // x plays the source QEMU
    const [b, y] = await unixPair(dir, "dst.sock"); // y plays the target QEMU
    try {
      const fwd = randomBytes(20 * MIB);
      const back = randomBytes(20 * MIB - 7);
      const counts: RelayCounts = { forward: 0, back: 0 };
      const [, , , gotFwd, gotBack] = await withTimeout(
        Promise.all([splice(a, b, counts), send(x, fwd), send(y, back), drain(y), drain(x)]),
        GUARD_MS,
        "splice",
      );
      assert.deepEqual(gotFwd, { bytes: fwd.length, sha: sha(fwd) });
      assert.deepEqual(gotBack, { bytes: back.length, sha: sha(back) });
      assert.deepEqual(counts, { forward: fwd.length, back: back.length });
      // splice closed its ends.
      assert.throws(() => a.close(), Deno.errors.BadResource);
      assert.throws(() => b.close(), Deno.errors.BadResource);
    } finally {
      closeAll(x, a, b, y);
    }
  }));

/** Writes until the connection fails; never throws. */
async function flood(conn: Deno.Conn): Promise<void> {
  const buf = randomBytes(256 * 1024);
  try {
    for (;;) await conn.write(buf);
  } catch { /* the other end went away */ }
}

/** Reads until the connection ends or fails; never throws. */
async function sink(conn: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(256 * 1024);
  try {
    while (await conn.read(buf) !== null) { /* discard */ }
  } catch { /* reset */ }
}

for (const dies of ["target", "source"] as const) {
  Deno.test(`splice ends when the ${dies} side goes away mid-stream, and closes the other side`, () =>
    withDir(async (dir) => {
      const [x, a] = await unixPair(dir, "src.sock");
      const [b, y] = await unixPair(dir, "dst.sock");
      const [victim, survivor] = dies === "target" ? [y, x] : [x, y];
      try {
        const counts: RelayCounts = { forward: 0, back: 0 };
        const relay = splice(a, b, counts).then(() => "resolved", (e: Error) => `rejected: ${e.name}`);
        // Both sides send; the victim reads a little, then closes with unread data queued (a reset).
        const survivorSends = flood(survivor);
        const victimSends = flood(victim);
        const survivorReads = sink(survivor);
        const some = new Uint8Array(64 * 1024);
        assert.ok(await victim.read(some));
        victim.close();
        const outcome = await withTimeout(relay, GUARD_MS, "splice after a reset");
        assert.match(outcome, /^(resolved|rejected: )/);
        // The survivor sees its end closed: its writes fail and its reads end.
        await withTimeout(Promise.all([survivorSends, survivorReads, victimSends]), GUARD_MS, "survivor noticed");
        assert.ok(counts.forward > 0 || counts.back > 0);
        assert.throws(() => a.close(), Deno.errors.BadResource);
        assert.throws(() => b.close(), Deno.errors.BadResource);
      } finally {
        closeAll(x, a, b, y);
      }
    }));
}

// ---------------------------------------------------------------------------------------
// DataListener over real TLS

async function makeCerts(dir: string): Promise<void> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "agent/cli/flexcapd.ts", "certs", "--dir", dir, "node-a", "node-b"],
    cwd: REPO,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`flexcapd certs: ${new TextDecoder().decode(out.stderr)}`);
}

/** Reads until the peer ends the connection; true if it did (EOF or an error such as a reset). */
async function endedByPeer(conn: Deno.Conn): Promise<boolean> {
  const buf = new Uint8Array(1024);
  try {
    while (await conn.read(buf) !== null) { /* nothing is expected */ }
  } catch { /* reset or unexpected EOF also end it */ }
  return true;
}

async function readExactly(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let off = 0;
  while (off < n) {
    const got = await conn.read(out.subarray(off));
    if (got === null) throw new Error(`EOF after ${off} of ${n} bytes`);
    off += got;
  }
  return out;
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

Deno.test("DataListener splices an authenticated connection into QEMU's socket once, refusing the rest", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "fc-datalistener-" });
  const pki = join(dir, "pki");
  await makeCerts(pki);
  const caPem = await Deno.readTextFile(join(pki, "ca.crt"));
  for (const f of ["ca.crt", "node-a.crt", "node-a.key", "node-b.crt", "node-b.key"]) {
    await Deno.stat(join(pki, f));
  }

  // Where the target QEMU would wait: every connection the listener makes is recorded.
  const qemuSocket = join(dir, "incoming.sock");
  const qemu = Deno.listen({ transport: "unix", path: qemuSocket });
  const accepted: Deno.Conn[] = [];
  const unclaimed: Deno.Conn[] = [];
  const waiting: ((c: Deno.Conn) => void)[] = [];
  const acceptLoop = (async () => {
    for (;;) {
      let c: Deno.Conn;
      try {
        c = await qemu.accept();
      } catch {
        return;
      }
      accepted.push(c);
      const w = waiting.shift();
      if (w) w(c);
      else unclaimed.push(c);
    }
  })();
  const nextQemuConn = () =>
    new Promise<Deno.Conn>((r) => {
      const c = unclaimed.shift();
      if (c) r(c);
      else waiting.push(r);
    });

  const lines: LogLine[] = [];
  const dl = new DataListener(
    { hostname: "127.0.0.1", port: 0, cert: join(pki, "node-a.crt"), key: join(pki, "node-a.key") },
    recordingLogger(lines),
  );
  const addr = { hostname: "127.0.0.1", port: dl.port };
  const refusals = () => lines.filter((l) => l.msg === "data connection refused").length;
  // How each spliced stream ended (handled at once: a relay that breaks must not go unobserved).
  const streams: Promise<RelayCounts | Error>[] = [];
  const expectStream = (id: string, token: string) =>
    dl.expect(id, { token, qemuSocket, onStream: (done) => void streams.push(done.catch((e: Error) => e)) });
  const lastStream = () => withTimeout(streams[streams.length - 1], GUARD_MS, "relay ended");

  /** Dials with `token` and checks the listener ends the connection without reaching QEMU. */
  const assertRefused = async (id: string, token: string) => {
    const before = refusals();
    const qemuConns = accepted.length;
    const conn = await dialData(addr, "node-a", caPem, id, token);
    try {
      assert.ok(await withTimeout(endedByPeer(conn), GUARD_MS, "refused connection closed"));
    } finally {
      conn.close();
    }
    assert.equal(refusals(), before + 1, "the refusal is logged");
    assert.equal(accepted.length, qemuConns, "nothing reached the QEMU socket");
  };

  try {
    assert.ok(dl.port > 0);

    await t.step("the right token reaches QEMU; bytes flow both ways; the counts arrive", async () => {
      const id = "m-0123456789ab";
      const token = newToken();
      expectStream(id, token);
      const conn = await dialData(addr, "node-a", caPem, id, token);
      try {
        const q = await withTimeout(nextQemuConn(), GUARD_MS, "qemu socket connected");
        const fwd = randomBytes(3 * MIB + 5);
        const back = randomBytes(64 * 1024 + 3);
        // The header is not passed on: QEMU sees exactly the stream.
        const [gotFwd, gotBack] = await withTimeout(
          Promise.all([
            (async () => {
              await writeAll(conn, fwd);
              return await readExactly(q, fwd.length);
            })(),
            (async () => {
              await writeAll(q, back);
              return await readExactly(conn, back.length);
            })(),
          ]),
          GUARD_MS,
          "relay both ways",
        );
        assert.equal(sha(gotFwd), sha(fwd));
        assert.equal(sha(gotBack), sha(back));
        assert.equal(streams.length, 1, "onStream was called once");
        // Each side ends its direction; the relay then finishes with the counts.
        await conn.closeWrite();
        assert.equal(await withTimeout(q.read(new Uint8Array(1)), GUARD_MS, "qemu EOF"), null);
        await q.closeWrite();
        assert.ok(await withTimeout(endedByPeer(conn), GUARD_MS, "dialer EOF"));
        assert.deepEqual(await lastStream(), {
          forward: fwd.length,
          back: back.length,
        });
        q.close();
      } finally {
        conn.close();
      }

      // The token was used: the same token again is refused.
      await assertRefused(id, token);
    });

    await t.step("a wrong token is refused and does not use up the expected connection", async () => {
      const id = "m-aaaaaaaaaaaa";
      const token = newToken();
      expectStream(id, token);
      await assertRefused(id, newToken());
      await assertRefused(id, token.slice(0, -1) + (token.endsWith("a") ? "b" : "a"));
      await assertRefused("m-bbbbbbbbbbbb", token); // right token, another migration
      await assertRefused("bad id!", token); // not a header at all
      // The real sender still gets through.
      const conn = await dialData(addr, "node-a", caPem, id, token);
      const q = await withTimeout(nextQemuConn(), GUARD_MS, "qemu socket connected");
      await writeAll(conn, new TextEncoder().encode("ok"));
      assert.equal(new TextDecoder().decode(await readExactly(q, 2)), "ok");
      conn.close();
      q.close();
      await lastStream();
    });

    await t.step("a withdrawn expectation is refused", async () => {
      const id = "m-cccccccccccc";
      const token = newToken();
      const withdraw = expectStream(id, token);
      withdraw();
      await assertRefused(id, token);
      // Withdrawing an old registration does not remove a newer one for the same id.
      const token2 = newToken();
      expectStream(id, token2);
      withdraw();
      const conn = await dialData(addr, "node-a", caPem, id, token2);
      const q = await withTimeout(nextQemuConn(), GUARD_MS, "qemu socket connected");
      conn.close();
      q.close();
      await lastStream();
    });

    await t.step("a dialer expecting node-b fails the handshake against node-a's certificate", async () => {
      const id = "m-dddddddddddd";
      const token = newToken();
      expectStream(id, token);
      const qemuConns = accepted.length;
      await assert.rejects(dialData(addr, "node-b", caPem, id, token), /not valid for name "node-b"/);
      // A CA the listener's certificate is not from is refused too.
      const otherPki = join(dir, "other-pki");
      await makeCerts(otherPki);
      await assert.rejects(dialData(addr, "node-a", await Deno.readTextFile(join(otherPki, "ca.crt")), id, token));
      assert.equal(accepted.length, qemuConns);
      // The expectation is still there for the legitimate dialer.
      const conn = await dialData(addr, "node-a", caPem, id, token);
      const q = await withTimeout(nextQemuConn(), GUARD_MS, "qemu socket connected");
      conn.close();
      q.close();
      await lastStream();
    });
  } finally {
    await dl.close();
    qemu.close();
    await acceptLoop;
    closeAll(...accepted);
    await Deno.remove(dir, { recursive: true });
  }
});
