/**
 * Network probes and load loops run inside a test namespace, since a Deno process cannot enter
 * one itself: `ip netns exec NS deno run -A test/harness/netclient.ts SUBCOMMAND ...` (netns.ts
 * does this). Its last stdout line is exactly one JSON object, the result; it exits 0 when it
 * produced one (also for a failed probe: see "ok"), 2 on bad arguments, 1 on a crash.
 *
 *   tcp-probe HOST PORT [--timeout-ms N]                   {ok, ms, error?}
 *   http-get HOST PORT [--path P] [--timeout-ms N]         {ok, status, body (first 4 KiB), ms, error?}
 *   redis HOST PORT CMD [ARG...] [--timeout-ms N]          {ok, reply, error?}
 *   redis-loop HOST PORT --duration-ms N [--interval-ms M] loop stats (below)
 *   http-loop HOST PORT --duration-ms N [--interval-ms M] [--path P]  loop stats
 *   listen-tcp PORT --duration-ms N                        {connections}; SIGTERM ends it early
 *   probe-until HOST PORT [--interval-ms N] [--timeout-ms N] [--attempt-timeout-ms N]
 *                                                          {ok, at_ms, attempts, error?}
 *   redis-ping-loop HOST PORT --duration-ms N              loop stats + {elapsed_ms, requests_per_s}
 *   http-download HOST PORT --count N [--path P] [--timeout-ms N]
 *                                                          {ok, downloads, bytes, ms, mbit_s, failures, errors}
 *
 * Loop stats: {requests, failures, errors (first 10), max_gap_ms, p50_ms, p99_ms}. max_gap_ms
 * is the longest time between two consecutive successful replies (the whole run if fewer than
 * two succeeded); the percentiles are over successful requests (0 if none).
 *
 * probe-until starts a TCP connect every --interval-ms (default 5; earlier attempts may still
 * be pending, each gives up after --attempt-timeout-ms, default 1000) until one connects or
 * --timeout-ms (default 60000) passes; at_ms is Date.now() when the first connect succeeded,
 * so two probers in different namespaces of one machine can be compared. redis-ping-loop
 * sends PING back to back on one connection, without the loops' sleep between requests (a
 * zero-delay timer still costs a few ms in Deno); requests_per_s counts successful replies.
 * http-download GETs --path --count times, one connection each, and checks every body
 * against its Content-Length; mbit_s is body bits over the wall time of all downloads.
 *
 * Self-contained (Deno built-ins only) so it starts fast with --no-config.
 */

const USAGE = `usage: netclient.ts tcp-probe HOST PORT [--timeout-ms N]
       netclient.ts http-get HOST PORT [--path /] [--timeout-ms N]
       netclient.ts redis HOST PORT CMD [ARG...] [--timeout-ms N]
       netclient.ts redis-loop HOST PORT --duration-ms N [--interval-ms M]
       netclient.ts http-loop HOST PORT --duration-ms N [--interval-ms M] [--path /]
       netclient.ts listen-tcp PORT --duration-ms N
       netclient.ts probe-until HOST PORT [--interval-ms N] [--timeout-ms N] [--attempt-timeout-ms N]
       netclient.ts redis-ping-loop HOST PORT --duration-ms N
       netclient.ts http-download HOST PORT --count N [--path /] [--timeout-ms N]`;

/** Per-request timeout in the loops. */
const REQUEST_TIMEOUT_MS = 2_000;
const BODY_LIMIT = 4096;
const enc = new TextEncoder();
const dec = new TextDecoder();

class UsageError extends Error {}

/** Positional args and `--name value` flags; only the flags in `allowed` are accepted. */
function parseArgs(argv: string[], allowed: string[]): { pos: string[]; flags: Map<string, string> } {
  const pos: string[] = [];
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith("--")) {
      const name = a.slice(2);
      if (!allowed.includes(name)) throw new UsageError(`unknown flag ${a}`);
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      flags.set(name, argv[++i]);
    } else pos.push(a);
  }
  return { pos, flags };
}

function int(what: string, v: string | undefined, min: number, max: number): number {
  const n = Number(v);
  if (v === undefined || !/^\d+$/.test(v) || n < min || n > max) {
    throw new UsageError(`${what}: want an integer ${min}..${max}, got ${JSON.stringify(v)}`);
  }
  return n;
}

function hostPort(pos: string[]): { hostname: string; port: number } {
  if (!pos[0]) throw new UsageError("missing HOST");
  return { hostname: pos[0], port: int("PORT", pos[1], 1, 65535) };
}

function optInt(flags: Map<string, string>, name: string, def: number, min = 1): number {
  return flags.has(name) ? int(`--${name}`, flags.get(name), min, 3_600_000) : def;
}

function path(flags: Map<string, string>): string {
  const p = flags.get("path") ?? "/";
  if (!p.startsWith("/") || /[\s]/.test(p)) throw new UsageError(`--path: want /... without spaces, got ${p}`);
  return p;
}

const round = (ms: number) => Math.round(ms * 100) / 100;
const errText = (e: unknown) => e instanceof Error ? e.message : String(e);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Rejects after `ms` with "timeout after N ms" and runs `onTimeout` (closing the conn unblocks its reads). */
async function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => void = () => {}): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      onTimeout();
      reject(new Error(`timeout after ${ms} ms`));
    }, ms);
  });
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

/** Connects with a deadline; a late connect is aborted rather than left pending. */
async function connect(hostname: string, port: number, timeoutMs: number): Promise<Deno.TcpConn> {
  const ac = new AbortController();
  return await withTimeout(Deno.connect({ hostname, port, signal: ac.signal }), timeoutMs, () => ac.abort());
}

function close(c: Deno.Conn | undefined): void {
  try {
    c?.close();
  } catch { /* already closed */ }
}

async function tcpProbe(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["timeout-ms"]);
  if (pos.length !== 2) throw new UsageError("tcp-probe wants HOST PORT");
  const { hostname, port } = hostPort(pos);
  const timeout = optInt(flags, "timeout-ms", 3_000);
  const t0 = performance.now();
  try {
    close(await connect(hostname, port, timeout));
    return { ok: true, ms: round(performance.now() - t0) };
  } catch (e) {
    return { ok: false, ms: round(performance.now() - t0), error: errText(e) };
  }
}

/** One HTTP/1.0 GET over raw TCP (busybox httpd speaks nothing newer), read to EOF. */
async function httpOnce(
  hostname: string,
  port: number,
  reqPath: string,
  timeoutMs: number,
): Promise<{ status: number; body: string }> {
  const deadline = performance.now() + timeoutMs;
  const conn = await connect(hostname, port, timeoutMs);
  try {
    return await withTimeout(
      (async () => {
        await writeAll(conn, enc.encode(`GET ${reqPath} HTTP/1.0\r\nHost: ${hostname}\r\n\r\n`));
        const chunks: Uint8Array[] = [];
        for await (const c of conn.readable) chunks.push(c);
        const raw = concat(chunks);
        const headEnd = indexOf(raw, enc.encode("\r\n\r\n"));
        const head = dec.decode(headEnd >= 0 ? raw.subarray(0, headEnd) : raw);
        const m = /^HTTP\/\d\.\d (\d{3})/.exec(head);
        if (!m) throw new Error(`not an HTTP response: ${JSON.stringify(head.slice(0, 80))}`);
        const body = headEnd >= 0 ? raw.subarray(headEnd + 4, headEnd + 4 + BODY_LIMIT) : new Uint8Array();
        return { status: Number(m[1]), body: dec.decode(body) };
      })(),
      Math.max(1, deadline - performance.now()),
      () => close(conn),
    );
  } finally {
    close(conn);
  }
}

async function httpGet(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["timeout-ms", "path"]);
  if (pos.length !== 2) throw new UsageError("http-get wants HOST PORT");
  const { hostname, port } = hostPort(pos);
  const timeout = optInt(flags, "timeout-ms", 5_000);
  const p = path(flags);
  const t0 = performance.now();
  try {
    const { status, body } = await httpOnce(hostname, port, p, timeout);
    return { ok: status >= 200 && status < 400, status, body, ms: round(performance.now() - t0) };
  } catch (e) {
    return { ok: false, status: 0, body: "", ms: round(performance.now() - t0), error: errText(e) };
  }
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
}

function concat(chunks: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

function indexOf(hay: Uint8Array, needle: Uint8Array, from = 0): number {
  outer: for (let i = from; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** A RESP value: simple/bulk strings, integers, nil and arrays of them. */
type Resp = string | number | null | Resp[];

/** A Redis connection: one command at a time, replies parsed from a byte buffer. */
class RedisConn {
  #buf: Uint8Array = new Uint8Array();
  #reader: ReadableStreamDefaultReader<Uint8Array>;

  private constructor(readonly conn: Deno.TcpConn) {
    this.#reader = conn.readable.getReader();
  }

  static async open(hostname: string, port: number, timeoutMs: number): Promise<RedisConn> {
    return new RedisConn(await connect(hostname, port, timeoutMs));
  }

  /** Sends one command and returns its reply; a timeout closes the connection. */
  async command(args: string[], timeoutMs: number): Promise<Resp> {
    const parts = [`*${args.length}\r\n`];
    for (const a of args) parts.push(`$${enc.encode(a).length}\r\n${a}\r\n`);
    return await withTimeout(
      (async () => {
        await writeAll(this.conn, enc.encode(parts.join("")));
        return await this.#value();
      })(),
      timeoutMs,
      () => this.close(),
    );
  }

  close(): void {
    close(this.conn);
  }

  async #fill(): Promise<void> {
    const { value, done } = await this.#reader.read();
    if (done) throw new Error("connection closed by server");
    this.#buf = concat([this.#buf, value]);
  }

  async #line(): Promise<string> {
    for (;;) {
      const i = indexOf(this.#buf, enc.encode("\r\n"));
      if (i >= 0) {
        const line = dec.decode(this.#buf.subarray(0, i));
        this.#buf = this.#buf.subarray(i + 2);
        return line;
      }
      await this.#fill();
    }
  }

  async #value(): Promise<Resp> {
    const line = await this.#line();
    const rest = line.slice(1);
    switch (line[0]) {
      case "+":
        return rest;
      case "-":
        throw new Error(rest); // the server's -ERR reply
      case ":":
        return Number(rest);
      case "$": {
        const n = Number(rest);
        if (n < 0) return null;
        while (this.#buf.length < n + 2) await this.#fill();
        const s = dec.decode(this.#buf.subarray(0, n));
        this.#buf = this.#buf.subarray(n + 2);
        return s;
      }
      case "*": {
        const n = Number(rest);
        if (n < 0) return null;
        const items: Resp[] = [];
        for (let i = 0; i < n; i++) items.push(await this.#value());
        return items;
      }
      default:
        throw new Error(`bad RESP line ${JSON.stringify(line.slice(0, 80))}`);
    }
  }
}

async function redis(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["timeout-ms"]);
  if (pos.length < 3) throw new UsageError("redis wants HOST PORT CMD [ARG...]");
  const { hostname, port } = hostPort(pos);
  const timeout = optInt(flags, "timeout-ms", 5_000);
  let r: RedisConn | undefined;
  try {
    r = await RedisConn.open(hostname, port, timeout);
    return { ok: true, reply: await r.command(pos.slice(2), timeout) };
  } catch (e) {
    return { ok: false, reply: null, error: errText(e) };
  } finally {
    r?.close();
  }
}

/** Counts successes and failures of a request loop and summarizes them. */
class LoopStats {
  requests = 0;
  failures = 0;
  errors: string[] = [];
  #latencies: number[] = [];
  #lastOk: number | undefined;
  #maxGap = 0;
  #start = performance.now();

  ok(latencyMs: number): void {
    this.requests++;
    this.#latencies.push(latencyMs);
    const now = performance.now();
    if (this.#lastOk !== undefined) this.#maxGap = Math.max(this.#maxGap, now - this.#lastOk);
    this.#lastOk = now;
  }

  fail(e: unknown): void {
    this.requests++;
    this.failures++;
    if (this.errors.length < 10) this.errors.push(errText(e));
  }

  result(): object {
    const lat = this.#latencies.sort((a, b) => a - b);
    // Nearest-rank percentile.
    const pct = (p: number) => lat.length ? lat[Math.min(lat.length - 1, Math.ceil(p * lat.length) - 1)] : 0;
    const gap = lat.length >= 2 ? this.#maxGap : performance.now() - this.#start;
    return {
      requests: this.requests,
      failures: this.failures,
      errors: this.errors,
      max_gap_ms: round(gap),
      p50_ms: round(pct(0.5)),
      p99_ms: round(pct(0.99)),
    };
  }
}

async function redisLoop(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["duration-ms", "interval-ms"]);
  if (pos.length !== 2) throw new UsageError("redis-loop wants HOST PORT --duration-ms N");
  const { hostname, port } = hostPort(pos);
  if (!flags.has("duration-ms")) throw new UsageError("redis-loop needs --duration-ms");
  const duration = optInt(flags, "duration-ms", 0);
  const interval = optInt(flags, "interval-ms", 10, 0);
  const stats = new LoopStats();
  const end = performance.now() + duration;
  let r: RedisConn | undefined;
  // One request; on failure drop the connection so the next one reconnects.
  const request = async (args: string[], check: (v: Resp) => boolean): Promise<boolean> => {
    const t0 = performance.now();
    try {
      r ??= await RedisConn.open(hostname, port, REQUEST_TIMEOUT_MS);
      const v = await r.command(args, REQUEST_TIMEOUT_MS);
      if (!check(v)) throw new Error(`${args[0]}: unexpected reply ${JSON.stringify(v)}`);
      stats.ok(performance.now() - t0);
      return true;
    } catch (e) {
      stats.fail(e);
      r?.close();
      r = undefined;
      return false;
    }
  };
  while (performance.now() < end) {
    const ok = await request(["INCR", "flexcap:loop"], (v) => typeof v === "number") &&
      await request(["PING"], (v) => v === "PONG");
    // After a failure wait at least a little so a dead server is not hammered with connects.
    await sleep(ok ? interval : Math.max(interval, 100));
  }
  r?.close();
  return stats.result();
}

async function httpLoop(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["duration-ms", "interval-ms", "path"]);
  if (pos.length !== 2) throw new UsageError("http-loop wants HOST PORT --duration-ms N");
  const { hostname, port } = hostPort(pos);
  if (!flags.has("duration-ms")) throw new UsageError("http-loop needs --duration-ms");
  const duration = optInt(flags, "duration-ms", 0);
  const interval = optInt(flags, "interval-ms", 10, 0);
  const p = path(flags);
  const stats = new LoopStats();
  const end = performance.now() + duration;
  while (performance.now() < end) {
    const t0 = performance.now();
    let ok = false;
    try {
      const { status } = await httpOnce(hostname, port, p, REQUEST_TIMEOUT_MS);
      if (status < 200 || status >= 400) throw new Error(`HTTP ${status}`);
      stats.ok(performance.now() - t0);
      ok = true;
    } catch (e) {
      stats.fail(e);
    }
    await sleep(ok ? interval : Math.max(interval, 100));
  }
  return stats.result();
}

/** The name of the namespace this runs in (matched by inode under /run/netns), else the hostname. */
function whoAmI(): string {
  try {
    const self = Deno.statSync("/proc/self/ns/net").ino;
    for (const e of Deno.readDirSync("/run/netns")) {
      try {
        if (Deno.statSync(`/run/netns/${e.name}`).ino === self) return e.name;
      } catch { /* deleted meanwhile */ }
    }
  } catch { /* no named namespaces */ }
  return Deno.hostname();
}

async function listenTcp(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["duration-ms"]);
  if (pos.length !== 1) throw new UsageError("listen-tcp wants PORT --duration-ms N");
  const port = int("PORT", pos[0], 1, 65535);
  if (!flags.has("duration-ms")) throw new UsageError("listen-tcp needs --duration-ms");
  const duration = optInt(flags, "duration-ms", 0);
  const greeting = enc.encode(`hello from ${whoAmI()}\n`);
  const listener = Deno.listen({ hostname: "0.0.0.0", port });
  let connections = 0;
  const stop = () => {
    try {
      listener.close();
    } catch { /* already closed */ }
  };
  const timer = setTimeout(stop, duration);
  // SIGTERM ends the run early but still reports, so a test can stop it when it is done.
  Deno.addSignalListener("SIGTERM", stop);
  console.error(`listening on 0.0.0.0:${port}`);
  try {
    for await (const conn of listener) {
      connections++;
      writeAll(conn, greeting).catch(() => {}).finally(() => close(conn));
    }
  } catch { /* listener closed */ }
  clearTimeout(timer);
  return { connections };
}

async function probeUntil(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["interval-ms", "timeout-ms", "attempt-timeout-ms"]);
  if (pos.length !== 2) throw new UsageError("probe-until wants HOST PORT");
  const { hostname, port } = hostPort(pos);
  const interval = optInt(flags, "interval-ms", 5);
  const timeout = optInt(flags, "timeout-ms", 60_000);
  const attemptTimeout = optInt(flags, "attempt-timeout-ms", 1_000);
  const deadline = performance.now() + timeout;
  let attempts = 0;
  let lastError = "";
  let at: number | undefined;
  let wake: () => void = () => {};
  while (at === undefined && performance.now() < deadline) {
    attempts++;
    connect(hostname, port, Math.min(attemptTimeout, Math.max(1, deadline - performance.now()))).then(
      (conn) => {
        // Date.now() first: the moment of the connect, before anything else runs.
        const now = Date.now();
        close(conn);
        if (at === undefined) {
          at = now;
          wake();
        }
      },
      (e) => lastError = errText(e),
    );
    // Sleep one interval, or less if a connect succeeds meanwhile.
    await new Promise<void>((r) => {
      const timer = setTimeout(r, interval);
      wake = () => {
        clearTimeout(timer);
        r();
      };
    });
  }
  if (at !== undefined) return { ok: true, at_ms: at, attempts };
  return { ok: false, at_ms: 0, attempts, error: lastError || `no connect in ${timeout} ms` };
}

async function redisPingLoop(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["duration-ms"]);
  if (pos.length !== 2) throw new UsageError("redis-ping-loop wants HOST PORT --duration-ms N");
  const { hostname, port } = hostPort(pos);
  if (!flags.has("duration-ms")) throw new UsageError("redis-ping-loop needs --duration-ms");
  const duration = optInt(flags, "duration-ms", 0);
  const stats = new LoopStats();
  const start = performance.now();
  const end = start + duration;
  let ok = 0;
  let r: RedisConn | undefined;
  while (performance.now() < end) {
    const t0 = performance.now();
    try {
      r ??= await RedisConn.open(hostname, port, REQUEST_TIMEOUT_MS);
      const v = await r.command(["PING"], REQUEST_TIMEOUT_MS);
      if (v !== "PONG") throw new Error(`PING: unexpected reply ${JSON.stringify(v)}`);
      stats.ok(performance.now() - t0);
      ok++;
    } catch (e) {
      stats.fail(e);
      r?.close();
      r = undefined;
      await sleep(100); // a dead server is not hammered with connects
    }
  }
  const elapsed = performance.now() - start;
  r?.close();
  return { ...stats.result(), elapsed_ms: round(elapsed), requests_per_s: round(ok / (elapsed / 1000)) };
}

/** One HTTP/1.0 GET read to EOF, counting body bytes; throws unless 200 with a full Content-Length body. */
async function downloadOnce(hostname: string, port: number, reqPath: string, timeoutMs: number): Promise<number> {
  const conn = await connect(hostname, port, timeoutMs);
  try {
    return await withTimeout(
      (async () => {
        await writeAll(conn, enc.encode(`GET ${reqPath} HTTP/1.0\r\nHost: ${hostname}\r\n\r\n`));
        let head = new Uint8Array();
        let body = -1;
        for await (const c of conn.readable) {
          if (body >= 0) {
            body += c.length;
            continue;
          }
          head = concat([head, c]);
          const i = indexOf(head, enc.encode("\r\n\r\n"));
          if (i >= 0) {
            body = head.length - i - 4;
            head = head.subarray(0, i);
          }
        }
        const text = dec.decode(head);
        const m = /^HTTP\/\d\.\d (\d{3})/.exec(text);
        if (!m || m[1] !== "200" || body < 0) throw new Error(`bad response: ${JSON.stringify(text.slice(0, 80))}`);
        const len = /\r\ncontent-length:\s*(\d+)/i.exec(text);
        if (!len) throw new Error("no Content-Length");
        if (Number(len[1]) !== body) throw new Error(`short body: ${body} of ${len[1]} bytes`);
        return body;
      })(),
      timeoutMs,
      () => close(conn),
    );
  } finally {
    close(conn);
  }
}

async function httpDownload(argv: string[]): Promise<object> {
  const { pos, flags } = parseArgs(argv, ["count", "path", "timeout-ms"]);
  if (pos.length !== 2) throw new UsageError("http-download wants HOST PORT --count N");
  const { hostname, port } = hostPort(pos);
  if (!flags.has("count")) throw new UsageError("http-download needs --count");
  const count = optInt(flags, "count", 1);
  const timeout = optInt(flags, "timeout-ms", 60_000);
  const p = path(flags);
  let bytes = 0;
  let downloads = 0;
  const errors: string[] = [];
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    try {
      bytes += await downloadOnce(hostname, port, p, timeout);
      downloads++;
    } catch (e) {
      if (errors.length < 10) errors.push(errText(e));
    }
  }
  const ms = performance.now() - t0;
  return {
    ok: downloads === count,
    downloads,
    bytes,
    ms: round(ms),
    mbit_s: round(bytes * 8 / 1e6 / (ms / 1000)),
    failures: count - downloads,
    errors,
  };
}

const COMMANDS: Record<string, (argv: string[]) => Promise<object>> = {
  "tcp-probe": tcpProbe,
  "http-get": httpGet,
  "redis": redis,
  "redis-loop": redisLoop,
  "http-loop": httpLoop,
  "listen-tcp": listenTcp,
  "probe-until": probeUntil,
  "redis-ping-loop": redisPingLoop,
  "http-download": httpDownload,
};

if (import.meta.main) {
  const [sub, ...rest] = Deno.args;
  let code = 0;
  try {
    const run = COMMANDS[sub ?? ""];
    if (!run) throw new UsageError(sub ? `unknown subcommand ${sub}` : "missing subcommand");
    console.log(JSON.stringify(await run(rest)));
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`netclient: ${e.message}\n${USAGE}`);
      code = 2;
    } else {
      console.log(JSON.stringify({ ok: false, error: `netclient crashed: ${errText(e)}` }));
      code = 1;
    }
  }
  // Exit now: a connect to a dead address may still be pending in the runtime and would hold the process open.
  Deno.exit(code);
}
