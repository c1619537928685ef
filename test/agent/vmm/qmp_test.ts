import assert from "node:assert/strict";
import { QmpClient, QmpError, type QmpEvent } from "../../../agent/vmm/qmp.ts";
import { DeadlineExceededError, UnavailableError } from "../../../agent/errors.ts";
import type { Logger } from "../../../agent/log.ts";

// ---- helpers -------------------------------------------------------------------------

/** A logger that records lines instead of writing them, to keep test output clean. */
function captureLog(): { log: Logger; lines: { level: string; msg: string }[] } {
  const lines: { level: string; msg: string }[] = [];
  const make = (): Logger => ({
    debug: (msg) => void lines.push({ level: "debug", msg }),
    info: (msg) => void lines.push({ level: "info", msg }),
    warn: (msg) => void lines.push({ level: "warn", msg }),
    error: (msg) => void lines.push({ level: "error", msg }),
    with: () => make(),
  });
  return { log: make(), lines };
}

/** Starts a paused microvm with a QMP socket (not waiting for it), runs fn, then kills QEMU. */
async function withQemu(fn: (sock: string, child: Deno.ChildProcess) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "qmp-test-" });
  const sock = `${dir}/qmp.sock`;
  const child = new Deno.Command("qemu-system-x86_64", {
    args: [
      ...["-M", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none"],
      ...["-S", "-m", "16", "-name", "qmptest", "-qmp", `unix:${sock},server=on,wait=off`],
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  try {
    await fn(sock, child);
  } catch (err) {
    try {
      child.kill("SIGKILL");
    } catch { /* already exited */ }
    await child.status;
    throw new Error(`${(err as Error).message}\nqemu stderr: ${await stderr}`, { cause: err });
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* already exited */ }
    await child.status;
    await stderr;
    await Deno.remove(dir, { recursive: true });
  }
}

type Cmd = { execute: string; id?: unknown; arguments?: unknown };

/** A scripted QMP server on a unix socket for one client connection. */
class FakeQmp {
  #listener: Deno.Listener;
  #conn: Deno.Conn | undefined;
  #buf = "";
  #dec = new TextDecoder();
  #enc = new TextEncoder();

  private constructor(readonly path: string, readonly dir: string) {
    this.#listener = Deno.listen({ transport: "unix", path });
  }

  static async start(): Promise<FakeQmp> {
    const dir = await Deno.makeTempDir({ prefix: "qmp-fake-" });
    return new FakeQmp(`${dir}/qmp.sock`, dir);
  }

  /** Accepts the client, greets it and answers qmp_capabilities. */
  async handshake(): Promise<void> {
    this.#conn = await this.#listener.accept();
    await this.send({
      QMP: { version: { qemu: { major: 9, minor: 1, micro: 2 }, package: "" }, capabilities: [] },
    });
    const cmd = await this.next();
    assert.equal(cmd.execute, "qmp_capabilities");
    await this.send({ return: {}, id: cmd.id });
  }

  async next(): Promise<Cmd> {
    while (!this.#buf.includes("\n")) {
      const chunk = new Uint8Array(4096);
      const n = await this.#conn!.read(chunk);
      if (n === null) throw new Error("client hung up");
      this.#buf += this.#dec.decode(chunk.subarray(0, n), { stream: true });
    }
    const i = this.#buf.indexOf("\n");
    const line = this.#buf.slice(0, i);
    this.#buf = this.#buf.slice(i + 1);
    return JSON.parse(line);
  }

  async send(msg: unknown): Promise<void> {
    const text = typeof msg === "string" ? msg : JSON.stringify(msg) + "\r\n";
    const bytes = this.#enc.encode(text);
    for (let off = 0; off < bytes.length;) off += await this.#conn!.write(bytes.subarray(off));
  }

  hangUp(): void {
    this.#conn?.close();
    this.#conn = undefined;
  }

  async stop(): Promise<void> {
    this.hangUp();
    this.#listener.close();
    await Deno.remove(this.dir, { recursive: true });
  }
}

const ts = { seconds: 1700000000, microseconds: 500000 };

// ---- against a real QEMU -------------------------------------------------------------

Deno.test("qmp client connects to a starting qemu and parses its version", async () => {
  await withQemu(async (sock) => {
    // Connecting right after spawn exercises the retry while the socket does not exist yet.
    const client = await QmpClient.connect(sock, { timeoutMs: 10_000, log: captureLog().log });
    try {
      assert.equal(client.version.major, 7);
      assert.equal(typeof client.version.minor, "number");
      assert.equal(typeof client.version.micro, "number");
      const v = await client.execute<{ qemu: { major: number; minor: number; micro: number } }>(
        "query-version",
      );
      assert.deepEqual(v.qemu, client.version);
    } finally {
      client.close();
      await client.closed;
    }
  });
});

Deno.test("qmp client query-status reports a paused prelaunch vm", async () => {
  await withQemu(async (sock) => {
    const client = await QmpClient.connect(sock, { log: captureLog().log });
    try {
      const st = await client.execute<{ status: string; running: boolean }>("query-status");
      assert.equal(st.status, "prelaunch");
      assert.equal(st.running, false);
    } finally {
      client.close();
      await client.closed;
    }
  });
});

Deno.test("qmp client rejects an unknown command with QmpError CommandNotFound", async () => {
  await withQemu(async (sock) => {
    const client = await QmpClient.connect(sock, { log: captureLog().log });
    try {
      const err = await client.execute("no-such-command").then(() => undefined, (e) => e);
      assert.ok(err instanceof QmpError, String(err));
      assert.equal(err.errorClass, "CommandNotFound");
      assert.equal(err.command, "no-such-command");
      assert.equal(err.code, 13);
      assert.match(err.message, /^qmp no-such-command: CommandNotFound: /);
      // Bad arguments are a GenericError; the session stays usable afterwards.
      await assert.rejects(client.execute("stop", { bogus: 1 }), (e) => e instanceof QmpError);
      assert.equal((await client.execute<{ name: string }>("query-name")).name, "qmptest");
    } finally {
      client.close();
      await client.closed;
    }
  });
});

Deno.test("qmp client matches concurrent executes to their replies", async () => {
  await withQemu(async (sock) => {
    const client = await QmpClient.connect(sock, { log: captureLog().log });
    try {
      const calls = Array.from({ length: 30 }, (_, i) => {
        switch (i % 3) {
          case 0:
            return client.execute("query-name").then((r) => ["name", r]);
          case 1:
            return client.execute("query-status").then((r) => ["status", r]);
          default:
            return client.execute(`missing-${i}`).then(
              (r) => ["unexpected", r],
              (e: QmpError) => ["error", e.desc],
            );
        }
      });
      const results = await Promise.all(calls);
      results.forEach(([kind, r], i) => {
        if (i % 3 === 0) assert.deepEqual([kind, r], ["name", { name: "qmptest" }]);
        else if (i % 3 === 1) {
          assert.deepEqual([kind, (r as { status: string }).status], ["status", "prelaunch"]);
        } else assert.deepEqual([kind, r], ["error", `The command missing-${i} has not been found`]);
      });
    } finally {
      client.close();
      await client.closed;
    }
  });
});

Deno.test("qmp client sees RESUME and STOP events after cont and stop", async () => {
  await withQemu(async (sock) => {
    const client = await QmpClient.connect(sock, { log: captureLog().log });
    try {
      const all: string[] = [];
      const off = client.on("*", (e) => all.push(e.event));
      const resumed = client.waitForEvent("RESUME", { timeoutMs: 5000 });
      await client.execute("cont");
      const r = await resumed;
      assert.equal(r.event, "RESUME");
      assert.ok(Math.abs(r.timestampMs - Date.now()) < 60_000, "timestamp is wall-clock ms");
      assert.equal((await client.execute<{ running: boolean }>("query-status")).running, true);

      const stopped = client.waitForEvent("STOP", {
        timeoutMs: 5000,
        predicate: (e) => e.data !== undefined,
      });
      await client.execute("stop");
      assert.equal((await stopped).event, "STOP");
      assert.equal((await client.execute<{ status: string }>("query-status")).status, "paused");
      off();
      assert.deepEqual(all, ["RESUME", "STOP"]);
    } finally {
      client.close();
      await client.closed;
    }
  });
});

Deno.test("qmp client quit resolves closed and rejects later commands as unavailable", async () => {
  await withQemu(async (sock, child) => {
    const client = await QmpClient.connect(sock, { log: captureLog().log });
    const shutdown = client.waitForEvent("SHUTDOWN", { timeoutMs: 5000 });
    const never = client.waitForEvent("NEVER-HAPPENS", { timeoutMs: 60_000 });
    // QEMU may exit before its reply (or before reading the next command) reaches us.
    const quit = client.execute("quit").then(() => "ok", (e) => e);
    // Sent behind quit: QEMU may or may not answer it before exiting, but it must settle.
    const racing = client.execute("query-status").then(() => "ok", (e) => e);
    const q = await quit;
    assert.ok(q === "ok" || q instanceof UnavailableError, String(q));
    assert.equal((await shutdown).data.reason, "host-qmp-quit");
    await client.closed;
    const r = await racing;
    assert.ok(r === "ok" || r instanceof UnavailableError, String(r));
    await assert.rejects(never, UnavailableError);
    await assert.rejects(client.execute("query-status"), UnavailableError);
    await assert.rejects(client.waitForEvent("STOP"), UnavailableError);
    assert.equal((await child.status).code, 0);
    client.close(); // idempotent after the peer closed
  });
});

// ---- against a scripted fake server --------------------------------------------------

Deno.test("qmp client matches out-of-order replies by id", async () => {
  const fake = await FakeQmp.start();
  try {
    const [client] = await Promise.all([
      QmpClient.connect(fake.path, { log: captureLog().log }),
      fake.handshake(),
    ]);
    assert.deepEqual(client.version, { major: 9, minor: 1, micro: 2 });
    const events: QmpEvent[] = [];
    client.on("*", (e) => events.push(e));
    const stopEvent = client.waitForEvent("STOP");
    const a = client.execute("cmd-a", { n: 1 });
    const b = client.execute("cmd-b");
    const c = client.execute("cmd-c");
    const cmds = [await fake.next(), await fake.next(), await fake.next()];
    assert.deepEqual(cmds.map((x) => x.execute), ["cmd-a", "cmd-b", "cmd-c"]);
    assert.deepEqual(cmds[0].arguments, { n: 1 });
    assert.equal(new Set(cmds.map((x) => x.id)).size, 3, "ids are unique");
    // Reverse order, with an event and a malformed line interleaved; b fails.
    await fake.send({ return: "C", id: cmds[2].id });
    await fake.send({ event: "STOP", data: { why: "test" }, timestamp: ts });
    await fake.send("this is not json\r\n");
    await fake.send({ error: { class: "DeviceNotFound", desc: "no b" }, id: cmds[1].id });
    await fake.send({ return: "A", id: cmds[0].id });
    assert.equal(await a, "A");
    assert.equal(await c, "C");
    await assert.rejects(b, (e) => {
      assert.ok(e instanceof QmpError);
      assert.equal(e.message, "qmp cmd-b: DeviceNotFound: no b");
      assert.equal(e.errorClass, "DeviceNotFound");
      return true;
    });
    assert.deepEqual(await stopEvent, { event: "STOP", data: { why: "test" }, timestampMs: 1700000000500 });
    assert.deepEqual(events.map((e) => e.event), ["STOP"]);
    client.close();
    await client.closed;
  } finally {
    await fake.stop();
  }
});

Deno.test("qmp client rejects pending commands as unavailable when the peer hangs up", async () => {
  const fake = await FakeQmp.start();
  try {
    const [client] = await Promise.all([
      QmpClient.connect(fake.path, { log: captureLog().log }),
      fake.handshake(),
    ]);
    const p1 = client.execute("slow-1");
    const p2 = client.execute("slow-2", undefined, { timeoutMs: 60_000 });
    const ev = client.waitForEvent("STOP");
    await fake.next();
    await fake.next();
    fake.hangUp();
    await client.closed;
    await assert.rejects(p1, (e) => e instanceof UnavailableError && /slow-1/.test(e.message));
    await assert.rejects(p2, UnavailableError);
    await assert.rejects(ev, UnavailableError);
    await assert.rejects(client.execute("after"), UnavailableError);
  } finally {
    await fake.stop();
  }
});

Deno.test("qmp client times out a command and ignores its late reply", async () => {
  const fake = await FakeQmp.start();
  try {
    const cap = captureLog();
    const [client] = await Promise.all([QmpClient.connect(fake.path, { log: cap.log }), fake.handshake()]);
    await assert.rejects(client.execute("hang", undefined, { timeoutMs: 50 }), DeadlineExceededError);
    const late = await fake.next();
    await fake.send({ return: "late", id: late.id });
    const ok = client.execute("after");
    const cmd = await fake.next();
    await fake.send({ return: "fine", id: cmd.id });
    assert.equal(await ok, "fine");
    assert.ok(cap.lines.some((l) => l.level === "warn" && /no pending command/.test(l.msg)));
    await assert.rejects(client.waitForEvent("STOP", { timeoutMs: 20 }), DeadlineExceededError);
    client.close();
    client.close();
    await client.closed;
    await assert.rejects(client.execute("closed"), UnavailableError);
  } finally {
    await fake.stop();
  }
});

Deno.test("qmp client event handlers unsubscribe and survive a throwing handler", async () => {
  const fake = await FakeQmp.start();
  try {
    const cap = captureLog();
    const [client] = await Promise.all([QmpClient.connect(fake.path, { log: cap.log }), fake.handshake()]);
    const seen: string[] = [];
    client.on("STOP", () => {
      throw new Error("boom");
    });
    const off = client.on("STOP", (e) => seen.push(e.event));
    client.on("*", (e) => seen.push(`*${e.event}`));
    const first = client.waitForEvent("STOP");
    await fake.send({ event: "STOP", timestamp: ts });
    await first;
    off();
    const second = client.waitForEvent("RESUME", { predicate: (e) => e.data.n === 2 });
    await fake.send({ event: "RESUME", data: { n: 1 }, timestamp: ts });
    await fake.send({ event: "STOP", timestamp: ts });
    await fake.send({ event: "RESUME", data: { n: 2 }, timestamp: ts });
    assert.equal((await second).data.n, 2);
    assert.deepEqual(seen, ["STOP", "*STOP", "*RESUME", "*STOP", "*RESUME"]);
    assert.ok(cap.lines.some((l) => l.level === "error" && /handler threw/.test(l.msg)));
    client.close();
    await client.closed;
  } finally {
    await fake.stop();
  }
});

Deno.test("qmp client connect times out when no socket appears", async () => {
  const dir = await Deno.makeTempDir({ prefix: "qmp-none-" });
  try {
    const t0 = Date.now();
    await assert.rejects(
      QmpClient.connect(`${dir}/missing.sock`, { timeoutMs: 150, log: captureLog().log }),
      DeadlineExceededError,
    );
    assert.ok(Date.now() - t0 >= 140);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("qmp client connect times out when the server never greets", async () => {
  const dir = await Deno.makeTempDir({ prefix: "qmp-silent-" });
  const listener = Deno.listen({ transport: "unix", path: `${dir}/silent.sock` });
  try {
    // Accept but stay silent; the client must give up and close its side.
    const conn = listener.accept();
    await assert.rejects(
      QmpClient.connect(`${dir}/silent.sock`, { timeoutMs: 100, log: captureLog().log }),
      DeadlineExceededError,
    );
    const server = await conn;
    assert.equal(await server.read(new Uint8Array(16)), null, "client closed the connection");
    server.close();
  } finally {
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("qmp client connect retries until the socket appears", async () => {
  const dir = await Deno.makeTempDir({ prefix: "qmp-late-" });
  const path = `${dir}/late.sock`;
  let listener: Deno.Listener | undefined;
  try {
    const connecting = QmpClient.connect(path, { timeoutMs: 5000, log: captureLog().log });
    await new Promise((r) => setTimeout(r, 150));
    listener = Deno.listen({ transport: "unix", path });
    const conn = await listener.accept();
    const enc = new TextEncoder();
    await conn.write(enc.encode('{"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 0}}}}\r\n'));
    const buf = new Uint8Array(256);
    const n = await conn.read(buf);
    const cmd = JSON.parse(new TextDecoder().decode(buf.subarray(0, n!)));
    assert.equal(cmd.execute, "qmp_capabilities");
    await conn.write(enc.encode(JSON.stringify({ return: {}, id: cmd.id }) + "\r\n"));
    const client = await connecting;
    assert.deepEqual(client.version, { major: 8, minor: 0, micro: 0 });
    client.close();
    await client.closed;
    conn.close();
  } finally {
    listener?.close();
    await Deno.remove(dir, { recursive: true });
  }
});
