/**
 * GuestChannel against a fake guest on a real unix socket: the test plays QEMU's end of
 * the virtio-serial chardev (it listens, the agent's channel connects) and sends what a
 * guest could: well-formed sessions, invalid values, floods and random garbage.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { GuestMessage, HostMessage, LogStream, Protocol } from "../../../agent/gen/flexcap/guest/v1/guest.ts";
import { logger, setLogLevel } from "../../../agent/log.ts";
import { GuestChannel } from "../../../agent/osserver/channel.ts";
import { encodeFrame, FrameDecoder } from "../../../agent/osserver/framing.ts";
import type { GuestLog, GuestPort } from "../../../agent/osserver/guest_messages.ts";
import { MAX_FRAME_BYTES, MAX_LOG_CHUNK, PROTOCOL_VERSION } from "../../../agent/osserver/wire.ts";

setLogLevel("error");

/** A fake guest: the listening end, with helpers to send frames and read host messages. */
class FakeGuest {
  conn!: Deno.UnixConn;
  #decoder = new FrameDecoder();
  #inbox: HostMessage[] = [];
  private constructor(readonly listener: Deno.UnixListener, readonly dir: string) {}

  static async start(): Promise<FakeGuest> {
    const dir = await Deno.makeTempDir({ prefix: "fc-chan-" });
    return new FakeGuest(Deno.listen({ transport: "unix", path: join(dir, "os.sock") }), dir);
  }

  get path(): string {
    return join(this.dir, "os.sock");
  }

  async accept(): Promise<void> {
    this.conn = await this.listener.accept();
  }

  async raw(bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.length) off += await this.conn.write(bytes.subarray(off));
  }

  send(m: GuestMessage): Promise<void> {
    return this.raw(encodeFrame(GuestMessage.encode(m).finish()));
  }

  /** Next host message matching `pred` (reads the socket as needed). */
  async next(pred: (m: HostMessage) => boolean = () => true): Promise<HostMessage> {
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const i = this.#inbox.findIndex(pred);
      if (i >= 0) return this.#inbox.splice(i, 1)[0];
      const n = await this.conn.read(buf);
      if (n === null) throw new Error("host closed the channel");
      for (const f of this.#decoder.push(buf.subarray(0, n))) this.#inbox.push(HostMessage.decode(f));
    }
  }

  async hello(version = PROTOCOL_VERSION): Promise<boolean> {
    await this.send({ msg: { $case: "hello", value: { protocolVersion: version, buildId: "fake" } } });
    const reply = await this.next((m) => m.msg?.$case === "helloReply");
    return reply.msg?.$case === "helloReply" && reply.msg.value.accepted;
  }

  async close(): Promise<void> {
    try {
      this.conn?.close();
    } catch { /* closed */ }
    this.listener.close();
    await Deno.remove(this.dir, { recursive: true });
  }
}

/** Connects a GuestChannel to a fresh fake guest, recording what the channel reports. */
async function pair(knownGuest = false) {
  const guest = await FakeGuest.start();
  const seen = { ports: [] as GuestPort[][], logs: [] as GuestLog[], exits: [] as [number, number][] };
  const accepted = guest.accept();
  const ch = await GuestChannel.connect(guest.path, logger({ test: "channel" }), {
    onPorts: (p) => seen.ports.push(p),
    onLog: (l) => seen.logs.push(l),
    onExited: (c, s) => seen.exits.push([c, s]),
  }, { knownGuest });
  await accepted;
  await guest.next((m) => m.msg?.$case === "resync"); // the host asks every new connection for a Hello
  return { guest, ch, seen };
}

const ports = (...list: [number, Protocol][]): GuestMessage => ({
  msg: { $case: "ports", value: { listening: list.map(([port, protocol]) => ({ port, protocol })) } },
});

/** Waits until the channel has handled everything sent so far (a Ping round trip is not possible host->guest, so poll). */
async function settle(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.fail(`timed out waiting for ${what}`);
}

Deno.test("hello with the right version opens a session; the wrong one is refused with a reason", async () => {
  const { guest, ch } = await pair();
  try {
    await guest.send({ msg: { $case: "hello", value: { protocolVersion: 1, buildId: "old" } } });
    const refused = await guest.next((m) => m.msg?.$case === "helloReply");
    assert.ok(refused.msg?.$case === "helloReply" && !refused.msg.value.accepted);
    assert.match(refused.msg.value.reason, /protocol 1 not supported/);
    assert.equal(ch.inSession, false);
    assert.equal(await guest.hello(), true);
    assert.equal(ch.inSession, true);
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("ports, logs and exit are reported only inside a session, validated and normalised", async () => {
  const { guest, ch, seen } = await pair();
  try {
    await guest.send(ports([80, Protocol.PROTOCOL_TCP]));
    await settle(() => ch.stats.outOfSession === 1, "out-of-session frame counted");
    assert.equal(seen.ports.length, 0);
    assert.ok(await guest.hello());
    await guest.send(ports([6379, Protocol.PROTOCOL_TCP], [53, Protocol.PROTOCOL_UDP], [80, Protocol.PROTOCOL_TCP], [
      80,
      Protocol.PROTOCOL_TCP,
    ]));
    const data = Buffer.from("hello\n");
    await guest.send({ msg: { $case: "log", value: { stream: LogStream.LOG_STREAM_STDERR, data } } });
    await guest.send({ msg: { $case: "exited", value: { exitCode: 3, signal: 0 } } });
    await settle(() => seen.exits.length === 1, "exit");
    assert.deepEqual(seen.ports, [[
      { port: 80, protocol: "tcp" },
      { port: 6379, protocol: "tcp" },
      { port: 53, protocol: "udp" },
    ]]);
    assert.deepEqual(seen.logs, [{ stream: "stderr", data }]);
    assert.deepEqual(seen.exits, [[3, 0]]);
    assert.equal(ch.stats.malformed, 0);
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("a known guest (restored, migrated) is heard before its new Hello", async () => {
  const { guest, ch, seen } = await pair(true);
  try {
    await guest.send(ports([80, Protocol.PROTOCOL_TCP]));
    await settle(() => seen.ports.length === 1, "ports from a known guest");
    assert.equal(ch.stats.outOfSession, 0);
    // Its Hello still decides: a refused version ends the session.
    await guest.send({ msg: { $case: "hello", value: { protocolVersion: 99, buildId: "future" } } });
    await settle(() => !ch.inSession, "session ended by a refused Hello");
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("invalid values are dropped and counted, never reported", async () => {
  const { guest, ch, seen } = await pair();
  try {
    assert.ok(await guest.hello());
    const bad: GuestMessage[] = [
      ports([0, Protocol.PROTOCOL_TCP]),
      ports([70000, Protocol.PROTOCOL_TCP]),
      ports([80, Protocol.PROTOCOL_UNSPECIFIED]),
      ports([80, 9 as Protocol]),
      ports(...Array.from({ length: 65 }, (_, i) => [1000 + i, Protocol.PROTOCOL_TCP] as [number, Protocol])),
      { msg: { $case: "log", value: { stream: LogStream.LOG_STREAM_STDOUT, data: Buffer.alloc(MAX_LOG_CHUNK + 1) } } },
      { msg: { $case: "log", value: { stream: LogStream.LOG_STREAM_UNSPECIFIED, data: Buffer.alloc(1) } } },
      { msg: { $case: "log", value: { stream: LogStream.LOG_STREAM_STDOUT, data: Buffer.alloc(0) } } },
      { msg: { $case: "networkApplied", value: { requestId: 99, error: "" } } },
      { msg: undefined },
    ];
    for (const m of bad) await guest.send(m);
    await settle(() => ch.stats.malformed === bad.length, `${bad.length} malformed frames`);
    assert.deepEqual(seen.ports, []);
    assert.deepEqual(seen.logs, []);
    // The session still works.
    await guest.send(ports([8080, Protocol.PROTOCOL_TCP]));
    await settle(() => seen.ports.length === 1, "valid ports after garbage");
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("SetNetwork resolves on the guest's answer and rejects with its error", async () => {
  const { guest, ch } = await pair();
  try {
    await assert.rejects(ch.setNetwork({ addressCidr: "10.0.0.2/24", gateway: "", dns: "" }), /not connected/);
    assert.ok(await guest.hello());
    const net = { addressCidr: "10.9.0.7/24", gateway: "10.9.0.1", dns: "10.9.0.1" };
    const ok = ch.setNetwork(net);
    const req = await guest.next((m) => m.msg?.$case === "setNetwork");
    assert.ok(req.msg?.$case === "setNetwork");
    assert.deepEqual(req.msg.value.net, net);
    await guest.send({ msg: { $case: "networkApplied", value: { requestId: req.msg.value.requestId, error: "" } } });
    await ok;
    const failing = ch.setNetwork(net);
    const req2 = await guest.next((m) => m.msg?.$case === "setNetwork");
    assert.ok(req2.msg?.$case === "setNetwork");
    await guest.send({
      msg: { $case: "networkApplied", value: { requestId: req2.msg.value.requestId, error: "SIOCSIFADDR: EPERM" } },
    });
    await assert.rejects(failing, /could not apply the network: SIOCSIFADDR: EPERM/);
    const pending = ch.setNetwork(net, 50);
    await assert.rejects(pending, /did not apply the network within 50 ms/);
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("a flood is rate-limited and the channel keeps working", async () => {
  const { guest, ch, seen } = await pair();
  try {
    assert.ok(await guest.hello());
    const frame = encodeFrame(GuestMessage.encode(ports([80, Protocol.PROTOCOL_TCP])).finish());
    const burst = new Uint8Array(frame.length * 5000);
    for (let i = 0; i < 5000; i++) burst.set(frame, i * frame.length);
    await guest.raw(burst);
    await settle(() => ch.stats.framesIn === 5001, "all flood frames read");
    assert.ok(ch.stats.dropped > 0, `expected drops, stats ${JSON.stringify(ch.stats)}`);
    assert.ok(seen.ports.length < 5000);
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("an oversized frame header ends the connection without throwing", async () => {
  const { guest, ch } = await pair();
  try {
    const header = new Uint8Array(4);
    new DataView(header.buffer).setUint32(0, MAX_FRAME_BYTES + 1);
    await guest.raw(header);
    await ch.done;
    assert.equal(ch.stats.malformed, 1);
  } finally {
    ch.close();
    await guest.close();
  }
});

Deno.test("fuzz: random, truncated and hostile frames never crash the channel", async () => {
  // Deterministic PRNG so a failure reproduces.
  let seed = 0x2545f491;
  const rand = () => (seed = (Math.imul(seed ^ (seed >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0) / 2 ** 32;
  const bytes = (n: number) => Uint8Array.from({ length: n }, () => Math.floor(rand() * 256));
  const valid = GuestMessage.encode(ports([80, Protocol.PROTOCOL_TCP])).finish();
  for (let round = 0; round < 20; round++) {
    const { guest, ch, seen } = await pair();
    try {
      assert.ok(await guest.hello());
      for (let i = 0; i < 200; i++) {
        const kind = Math.floor(rand() * 4);
        if (kind === 0) await guest.raw(encodeFrame(bytes(Math.floor(rand() * 300)))); // random payload
        else if (kind === 1) await guest.raw(encodeFrame(valid.subarray(0, Math.floor(rand() * valid.length)))); // truncated
        else if (kind === 2) { // bit-flipped valid message
          const m = valid.slice();
          m[Math.floor(rand() * m.length)] ^= 1 << Math.floor(rand() * 8);
          await guest.raw(encodeFrame(m));
        } else await guest.raw(encodeFrame(valid));
      }
      // The channel processed everything and a session still works (the fuzz may have sent a
      // Hello with another version, which ends the session: greet again; frames are handled in order).
      await guest.send({ msg: { $case: "hello", value: { protocolVersion: PROTOCOL_VERSION, buildId: "fuzz" } } });
      await guest.send(ports([4242, Protocol.PROTOCOL_UDP]));
      await settle(
        () => seen.ports.some((p) => p.length === 1 && p[0].port === 4242 && p[0].protocol === "udp"),
        `round ${round}: a valid frame after the fuzz`,
      );
      for (const list of seen.ports) {
        for (const p of list) assert.ok(p.port >= 1 && p.port <= 65535 && ["tcp", "udp"].includes(p.protocol));
      }
      // Finally raw garbage without framing: may end the connection, must not throw.
      await guest.raw(bytes(512)).catch(() => {});
    } finally {
      ch.close();
      await ch.done;
      await guest.close();
    }
  }
});
