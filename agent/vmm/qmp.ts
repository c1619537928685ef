/**
 * QMP client for one QEMU process: a single reader loop dispatches replies (matched by
 * id, so order does not matter) and events; writes are serialized so command lines never
 * interleave. Every promise it hands out is pre-marked as handled, because an abandoned
 * one rejecting later (e.g. when QEMU exits) would otherwise kill the Deno process.
 */

import { Code, DeadlineExceededError, FlexError, InternalError, UnavailableError } from "../errors.ts";
import { type Logger, logger } from "../log.ts";
import { encodeQmpCommand, type QmpDecoded, QmpDecoder, type QmpEvent, type QmpVersion } from "./qmp_framing.ts";

export type { QmpEvent, QmpVersion } from "./qmp_framing.ts";

/** QEMU answered a command with an error reply. */
export class QmpError extends FlexError {
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super(Code.INTERNAL, `qmp ${command}: ${errorClass}: ${desc}`);
  }
}

/** Options for QmpClient.connect. */
export interface QmpConnectOptions {
  /** Total budget for socket appearance, greeting and negotiation (default 10 s). */
  timeoutMs?: number;
  log?: Logger;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
const DEFAULT_EVENT_TIMEOUT_MS = 30_000;

interface Pending {
  command: string;
  resolve(v: unknown): void;
  reject(e: Error): void;
}

/** A negotiated QMP session over a unix socket. */
export class QmpClient {
  /** Resolves once the connection has ended and the reader has stopped. */
  readonly closed: Promise<void>;
  #conn: Deno.UnixConn;
  #log: Logger;
  #decoder = new QmpDecoder();
  #nextId = 1;
  #pending = new Map<number, Pending>();
  #handlers = new Map<string, Set<(e: QmpEvent) => void>>();
  #onShutdown = new Set<(err: UnavailableError) => void>();
  #writeTail: Promise<void> = Promise.resolve();
  #version: QmpVersion | undefined;
  #greeting: { resolve(v: QmpVersion): void; reject(e: Error): void } | undefined;
  #shutdownReason: string | undefined;

  private constructor(conn: Deno.UnixConn, log: Logger) {
    this.#conn = conn;
    this.#log = log;
    this.closed = this.#readLoop();
  }

  /** Connects to QEMU's QMP socket, retrying until it appears, and negotiates capabilities. */
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const log = (opts.log ?? logger()).with({ component: "qmp", socket: path });
    const deadline = Date.now() + timeoutMs;
    const conn = await dialUntil(path, deadline, timeoutMs);
    const client = new QmpClient(conn, log);
    try {
      const greeting = new Promise<QmpVersion>((resolve, reject) => client.#greeting = { resolve, reject });
      client.#version = await withTimeout(
        greeting,
        deadline - Date.now(),
        () => new DeadlineExceededError(`qmp connect ${path}: no greeting within ${timeoutMs}ms`),
      );
      await client.execute("qmp_capabilities", undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
      log.debug("qmp connected", { version: client.#version });
      return client;
    } catch (err) {
      client.close();
      await client.closed;
      throw err;
    }
  }

  /** QEMU version from the greeting. */
  get version(): QmpVersion {
    return this.#version!;
  }

  /**
   * Runs a command and resolves with its `return` value. Rejects with QmpError on an
   * error reply, DeadlineExceededError after `timeoutMs` (default 30 s), and
   * UnavailableError if the connection is or becomes closed.
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this.#shutdownReason !== undefined) {
      return handled(Promise.reject(this.#closedError(command)));
    }
    const id = this.#nextId++;
    let line: Uint8Array;
    try {
      line = encodeQmpCommand(command, args, id);
    } catch (err) {
      return handled(
        Promise.reject(new InternalError(`qmp ${command}: cannot encode arguments`, { cause: err })),
      );
    }
    const timeoutMs = opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    const reply = new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new DeadlineExceededError(`qmp ${command}: no reply within ${timeoutMs}ms`));
      }, timeoutMs);
      const settle = () => {
        clearTimeout(timer);
        this.#pending.delete(id);
      };
      // Registered before the write so even an immediate reply finds its entry.
      this.#pending.set(id, {
        command,
        resolve: (v) => (settle(), resolve(v)),
        reject: (e) => (settle(), reject(e)),
      });
    });
    this.#write(line).catch((err) => {
      // Only this command fails: the peer may have closed its read side with replies and
      // events (e.g. SHUTDOWN after quit) still queued for us; the read loop drains them
      // and ends the session at EOF.
      this.#pending.get(id)?.reject(new UnavailableError(`qmp ${command}: write failed`, { cause: err }));
    });
    return handled(reply as Promise<T>);
  }

  /** Subscribes to an event name (or "*" for all); returns the unsubscribe function. */
  on(event: string | "*", handler: (e: QmpEvent) => void): () => void {
    let set = this.#handlers.get(event);
    if (!set) this.#handlers.set(event, set = new Set());
    set.add(handler);
    return () => {
      set.delete(handler);
      if (set.size === 0 && this.#handlers.get(event) === set) this.#handlers.delete(event);
    };
  }

  /**
   * Resolves with the next matching event. Call it BEFORE issuing the command that causes
   * the event, or a fast event can arrive first and be missed. Rejects with
   * DeadlineExceededError after `timeoutMs` (default 30 s) and UnavailableError on close.
   */
  waitForEvent(
    event: string,
    opts: { timeoutMs?: number; predicate?: (e: QmpEvent) => boolean } = {},
  ): Promise<QmpEvent> {
    if (this.#shutdownReason !== undefined) {
      return handled(Promise.reject(this.#closedError(`wait ${event}`)));
    }
    const timeoutMs = opts.timeoutMs ?? DEFAULT_EVENT_TIMEOUT_MS;
    return handled(
      new Promise<QmpEvent>((resolve, reject) => {
        const done = () => {
          clearTimeout(timer);
          unsubscribe();
          this.#onShutdown.delete(onShutdown);
        };
        const timer = setTimeout(() => {
          done();
          reject(new DeadlineExceededError(`qmp: no ${event} event within ${timeoutMs}ms`));
        }, timeoutMs);
        const onShutdown = (err: UnavailableError) => (done(), reject(err));
        this.#onShutdown.add(onShutdown);
        const unsubscribe = this.on(event, (e) => {
          let match: boolean;
          try {
            match = opts.predicate ? opts.predicate(e) : true;
          } catch (err) {
            done();
            reject(new InternalError(`qmp: ${event} predicate threw`, { cause: err }));
            return;
          }
          if (match) (done(), resolve(e));
        });
      }),
    );
  }

  /** Closes the connection; pending commands reject with UnavailableError. Idempotent. */
  close(): void {
    this.#shutdown("closed by client");
  }

  #write(bytes: Uint8Array): Promise<void> {
    // Chain writes so a partially written line is never interleaved with another.
    const p = this.#writeTail.then(async () => {
      if (this.#shutdownReason !== undefined) throw new Error(this.#shutdownReason);
      for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
    });
    this.#writeTail = p.catch(() => {});
    return p;
  }

  async #readLoop(): Promise<void> {
    let reason = "connection closed by QEMU";
    try {
      while (true) {
        const buf = new Uint8Array(64 * 1024);
        const n = await this.#conn.read(buf);
        if (n === null) break;
        for (const item of this.#decoder.push(buf.subarray(0, n))) this.#dispatch(item);
      }
      for (const item of this.#decoder.end()) this.#dispatch(item);
    } catch (err) {
      if (this.#shutdownReason === undefined) {
        reason = `read failed: ${(err as Error).message}`;
        this.#log.warn("qmp read failed", { err });
      }
    }
    this.#shutdown(reason);
  }

  #dispatch(msg: QmpDecoded): void {
    switch (msg.kind) {
      case "greeting":
        if (this.#greeting) this.#greeting.resolve(msg.version.qemu);
        else this.#log.warn("qmp unexpected second greeting");
        this.#greeting = undefined;
        return;
      case "return":
      case "error": {
        const p = typeof msg.id === "number" ? this.#pending.get(msg.id) : undefined;
        if (!p) {
          // Late reply to a timed-out command, or an id-less error for an unparsable request.
          this.#log.warn("qmp reply matches no pending command", { id: msg.id, kind: msg.kind });
          return;
        }
        if (msg.kind === "return") p.resolve(msg.value);
        else p.reject(new QmpError(p.command, msg.errorClass, msg.desc));
        return;
      }
      case "event": {
        const e: QmpEvent = { event: msg.event, data: msg.data, timestampMs: msg.timestampMs };
        this.#log.debug("qmp event", { event: e.event });
        for (const key of [e.event, "*"]) {
          for (const h of [...(this.#handlers.get(key) ?? [])]) {
            try {
              h(e);
            } catch (err) {
              this.#log.error("qmp event handler threw", { event: e.event, err });
            }
          }
        }
        return;
      }
      case "invalid":
        this.#log.warn("qmp invalid message", { err: msg.error, excerpt: msg.error.excerpt });
        return;
    }
  }

  #shutdown(reason: string): void {
    if (this.#shutdownReason !== undefined) return;
    this.#shutdownReason = reason;
    this.#log.debug("qmp connection ended", { reason });
    try {
      this.#conn.close(); // also unblocks the pending read, which ends the reader loop
    } catch {
      // already closed by the peer side; nothing to release
    }
    this.#greeting?.reject(this.#closedError("connect"));
    this.#greeting = undefined;
    for (const p of [...this.#pending.values()]) p.reject(this.#closedError(p.command));
    for (const f of [...this.#onShutdown]) f(this.#closedError("wait"));
  }

  #closedError(what: string): UnavailableError {
    return new UnavailableError(`qmp ${what}: connection closed (${this.#shutdownReason})`);
  }
}

/** Dials the unix socket, retrying while it is missing or not yet listening. */
async function dialUntil(path: string, deadline: number, timeoutMs: number): Promise<Deno.UnixConn> {
  let delay = 10;
  while (true) {
    try {
      return await Deno.connect({ transport: "unix", path });
    } catch (err) {
      const retriable = err instanceof Deno.errors.NotFound || err instanceof Deno.errors.ConnectionRefused;
      if (!retriable) {
        throw new UnavailableError(`qmp connect ${path}: ${(err as Error).message}`, { cause: err });
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new DeadlineExceededError(
          `qmp connect ${path}: socket not ready within ${timeoutMs}ms (${(err as Error).message})`,
        );
      }
      await new Promise((r) => setTimeout(r, Math.min(delay, left)));
      delay = Math.min(delay * 2, 200);
    }
  }
}

/** Races `p` against a timer that is always cleared. */
function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const t = new Promise<never>((_, reject) => timer = setTimeout(() => reject(onTimeout()), Math.max(0, ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}
