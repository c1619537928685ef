/**
 * The data path of a live migration: QEMU's migration stream carried between agents on
 * one TLS connection per migration, gRPC kept for control (grpc-js framing under Deno is
 * 2-4x slower for bulk bytes; docs/research/migration-qemu72-tcg.md §2).
 *
 * source QEMU ─unix─▶ source agent ─TLS─▶ target agent ─unix─▶ target QEMU
 *
 * Both directions are pumped (QEMU's return path flows back). Each pump moves one
 * bounded buffer at a time and awaits the write before reading more, so a slow side
 * holds the other back through TCP instead of growing memory.
 *
 * The connection is authenticated by TLS (the target's certificate for its peer name,
 * under the cluster CA) and a one-time 256-bit token the target issued over mutually
 * authenticated PeerService.PrepareIncoming: only that peer knows it.
 */
import { UnavailableError } from "../errors.ts";
import type { Logger } from "../log.ts";

const MAGIC = "FCMIG1";
const HEADER_MAX = 256;
const HEADER_TIMEOUT_MS = 5_000;
const BUFFER_BYTES = 1024 * 1024;

/** Byte counts of one relayed migration. */
export interface RelayCounts {
  /** Source → target (the memory stream). */
  forward: number;
  /** Target → source (the return path). */
  back: number;
}

/** Copies `from` to `to` until EOF, then half-closes `to`; returns the bytes copied. */
export async function pump(
  from: { read(p: Uint8Array): Promise<number | null> },
  to: { write(p: Uint8Array): Promise<number>; closeWrite(): Promise<void> },
  count: (n: number) => void = () => {},
): Promise<number> {
  const buf = new Uint8Array(BUFFER_BYTES);
  let total = 0;
  for (;;) {
    const n = await from.read(buf);
    if (n === null) break;
    let off = 0;
    while (off < n) off += await to.write(buf.subarray(off, n));
    total += n;
    count(n);
  }
  await to.closeWrite().catch(() => {});
  return total;
}

/** Pumps both ways between `a` (source side) and `b` until both directions end; closes both. */
export async function splice(a: Deno.Conn, b: Deno.Conn, counts: RelayCounts): Promise<void> {
  const closeBoth = () => {
    for (const c of [a, b]) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
  };
  const fwd = pump(a, b, (n) => counts.forward += n);
  const back = pump(b, a, (n) => counts.back += n);
  try {
    // One side failing (reset, QEMU killed) ends the other too.
    await Promise.all([
      fwd.catch((e) => (closeBoth(), Promise.reject(e))),
      back.catch((e) => (closeBoth(), Promise.reject(e))),
    ]);
  } finally {
    closeBoth();
  }
}

/** The first line on a data connection. */
export function encodeHeader(migrationId: string, token: string): Uint8Array {
  return new TextEncoder().encode(`${MAGIC} ${migrationId} ${token}\n`);
}

/** Parses a header line; undefined if it is not one. */
export function parseHeader(line: string): { migrationId: string; token: string } | undefined {
  const m = /^FCMIG1 ([A-Za-z0-9-]{1,64}) ([0-9a-f]{64})$/.exec(line);
  return m ? { migrationId: m[1], token: m[2] } : undefined;
}

/** A random one-time token (hex). */
export function newToken(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(32)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Constant-time comparison of two tokens. */
export function sameToken(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

// Reads one header line byte by byte (it is tiny) so no stream bytes are consumed past it.
async function readHeader(conn: Deno.Conn): Promise<string> {
  const bytes: number[] = [];
  const one = new Uint8Array(1);
  while (bytes.length < HEADER_MAX) {
    if (await conn.read(one) === null) break;
    if (one[0] === 0x0a) return new TextDecoder().decode(new Uint8Array(bytes));
    bytes.push(one[0]);
  }
  throw new UnavailableError("data connection sent no valid header");
}

/** An expected data connection, registered by PrepareIncoming. */
export interface ExpectedStream {
  token: string;
  /** Where the target QEMU waits for the stream (`migrate-incoming unix:…`). */
  qemuSocket: string;
  /** Called once the connection is spliced; resolves when both directions ended. */
  onStream(done: Promise<RelayCounts>): void;
}

/** The target's data listener: accepts TLS connections and splices each into its QEMU. */
export class DataListener {
  #listener: Deno.TlsListener;
  #expected = new Map<string, ExpectedStream>();
  #log: Logger;
  #loop: Promise<void>;

  constructor(opts: { hostname: string; port: number; cert: string; key: string }, log: Logger) {
    this.#log = log.with({ component: "migrate-data" });
    this.#listener = Deno.listenTls({
      hostname: opts.hostname,
      port: opts.port,
      cert: Deno.readTextFileSync(opts.cert),
      key: Deno.readTextFileSync(opts.key),
    });
    this.#loop = this.#accept();
  }

  /** The port it listens on. */
  get port(): number {
    return (this.#listener.addr as Deno.NetAddr).port;
  }

  /** Expects one connection for `migrationId`; returns the function that withdraws it. */
  expect(migrationId: string, e: ExpectedStream): () => void {
    this.#expected.set(migrationId, e);
    return () => {
      if (this.#expected.get(migrationId) === e) this.#expected.delete(migrationId);
    };
  }

  /** Stops listening (connections already spliced carry on). */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch { /* closed */ }
    await this.#loop;
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.TlsConn;
      try {
        conn = await this.#listener.accept();
      } catch {
        return; // closed
      }
      this.#serve(conn).catch((err) => {
        this.#log.warn("data connection refused", { error: (err as Error).message });
        try {
          conn.close();
        } catch { /* closed */ }
      });
    }
  }

  async #serve(conn: Deno.TlsConn): Promise<void> {
    // One deadline for the handshake and the header: a silent client must not hold a connection.
    const deadline = setTimeout(() => conn.close(), HEADER_TIMEOUT_MS);
    let line: string;
    try {
      await conn.handshake();
      line = await readHeader(conn);
    } finally {
      clearTimeout(deadline);
    }
    const header = parseHeader(line);
    const e = header && this.#expected.get(header.migrationId);
    if (!header || !e || !sameToken(e.token, header.token)) {
      throw new UnavailableError("data connection with an unknown migration or a wrong token");
    }
    this.#expected.delete(header.migrationId); // one use
    const qemu = await Deno.connect({ transport: "unix", path: e.qemuSocket });
    const counts: RelayCounts = { forward: 0, back: 0 };
    this.#log.info("migration stream connected", { migration: header.migrationId });
    e.onStream(splice(conn, qemu, counts).then(() => counts));
  }
}

/** Dials the target's data listener, checks its certificate is for `peerName`, and sends the header. */
export async function dialData(
  address: { hostname: string; port: number },
  peerName: string,
  caPem: string,
  migrationId: string,
  token: string,
): Promise<Deno.TlsConn> {
  const tcp = await Deno.connect({ hostname: address.hostname, port: address.port });
  tcp.setNoDelay(true);
  // startTls checks the certificate against the peer's name, whatever address we dialled.
  const tls = await Deno.startTls(tcp, { hostname: peerName, caCerts: [caPem] });
  await tls.handshake();
  const h = encodeHeader(migrationId, token);
  let off = 0;
  while (off < h.length) off += await tls.write(h.subarray(off));
  return tls;
}
