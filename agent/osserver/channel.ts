/**
 * Host end of one capsule's OS-server channel. QEMU owns the listening unix socket (so
 * the guest's port stays open while the agent restarts); the agent connects, greets with
 * a Ping, answers Hello, and reports what the guest says. The guest is untrusted: frames
 * are size-limited, malformed ones are counted and dropped, a flood is rate-limited, and
 * nothing here can throw into the rest of the agent.
 */
import { GuestMessage, HostMessage, type NetConfig } from "../gen/flexcap/guest/v1/guest.ts";
import { UnavailableError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { encodeFrame, FrameDecoder, FrameTooLargeError } from "./framing.ts";
import { checkLog, checkPorts, type GuestLog, type GuestPort } from "./guest_messages.ts";
import { PROTOCOL_VERSION } from "./wire.ts";

/** What the channel reports to the capsule's owner; every value is validated first. */
export interface ChannelEvents {
  onHello?(buildId: string, accepted: boolean): void;
  onExited?(exitCode: number, signal: number): void;
  /** The complete set of ports the guest listens on. */
  onPorts?(ports: GuestPort[]): void;
  onLog?(log: GuestLog): void;
}

/** Counters exposed for tests and metrics. */
export interface ChannelStats {
  framesIn: number;
  /** Undecodable, invalid or unknown frames. */
  malformed: number;
  /** Frames over the rate limit. */
  dropped: number;
  /** Valid frames sent before an accepted Hello. */
  outOfSession: number;
}

// Token bucket: bursts of 2000 frames, 1000/s sustained (log output comes in chunks of
// up to 16 KiB, so this still passes 16 MB/s of output); the rest is dropped.
const RATE_PER_SEC = 1000;
const BURST = 2000;
// A guest that stays silent this long after SetNetwork is treated as not having applied it.
const SET_NETWORK_TIMEOUT_MS = 10_000;

/** One connection to a guest's channel socket. */
export class GuestChannel {
  readonly stats: ChannelStats = { framesIn: 0, malformed: 0, dropped: 0, outOfSession: 0 };
  #conn: Deno.UnixConn;
  #closed = false;
  #session = false;
  #nextRequest = 1;
  #pendingNet = new Map<number, { resolve(): void; reject(e: Error): void; timer: ReturnType<typeof setTimeout> }>();
  #tokens = BURST;
  #lastRefill = performance.now();
  #writeChain: Promise<void> = Promise.resolve();
  /** Resolves when the connection ends. */
  readonly done: Promise<void>;

  private constructor(conn: Deno.UnixConn, private log: Logger, private events: ChannelEvents) {
    this.#conn = conn;
    this.done = this.#readLoop();
  }

  /**
   * Connects to QEMU's end of the channel and asks the guest to greet again (Resync).
   * `knownGuest`: this guest was accepted before (restored, migrated, re-adopted), so what
   * it sends before its new Hello is accepted too; a new guest must say Hello first.
   */
  static async connect(
    path: string,
    log: Logger,
    events: ChannelEvents,
    opts: { knownGuest?: boolean } = {},
  ): Promise<GuestChannel> {
    const conn = await Deno.connect({ transport: "unix", path });
    const ch = new GuestChannel(conn, log, events);
    ch.#session = opts.knownGuest ?? false;
    ch.send({ msg: { $case: "resync", value: {} } });
    return ch;
  }

  /** Asks the guest to stop its app (SIGTERM, SIGKILL after graceMs) and power off. */
  requestShutdown(graceMs: number): void {
    this.send({ msg: { $case: "shutdown", value: { graceMs } } });
  }

  /** True once the guest's Hello was accepted on this connection. */
  get inSession(): boolean {
    return this.#session;
  }

  /** Gives the guest a new network identity; resolves when it reports the change applied. */
  setNetwork(net: NetConfig, timeoutMs = SET_NETWORK_TIMEOUT_MS): Promise<void> {
    if (this.#closed || !this.#session) return Promise.reject(new UnavailableError("guest channel is not connected"));
    const requestId = this.#nextRequest++;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pendingNet.delete(requestId);
        reject(new UnavailableError(`guest did not apply the network within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pendingNet.set(requestId, { resolve, reject, timer });
      this.send({ msg: { $case: "setNetwork", value: { requestId, net } } });
    });
  }

  /** Queues a message; failures close the channel instead of throwing. */
  send(msg: HostMessage): void {
    if (this.#closed) return;
    const frame = encodeFrame(HostMessage.encode(msg).finish());
    this.#writeChain = this.#writeChain.then(async () => {
      let off = 0;
      while (off < frame.length) off += await this.#conn.write(frame.subarray(off));
    }).catch((err) => {
      this.log.warn("os channel write failed", { error: err });
      this.close();
    });
  }

  /** Closes the connection; idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#session = false;
    for (const p of this.#pendingNet.values()) {
      clearTimeout(p.timer);
      p.reject(new UnavailableError("guest channel closed before the guest applied the network"));
    }
    this.#pendingNet.clear();
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  async #readLoop(): Promise<void> {
    const decoder = new FrameDecoder();
    const buf = new Uint8Array(16 * 1024);
    try {
      while (!this.#closed) {
        const n = await this.#conn.read(buf);
        if (n === null) break;
        for (const frame of decoder.push(buf.subarray(0, n))) this.#handle(frame);
      }
    } catch (err) {
      if (err instanceof FrameTooLargeError) {
        this.stats.malformed++;
        this.log.warn("guest sent an oversized frame; dropping the connection", { error: err.message });
      } else if (!this.#closed) {
        this.log.debug("os channel read ended", { error: err });
      }
    } finally {
      this.close();
    }
  }

  #allow(): boolean {
    const now = performance.now();
    this.#tokens = Math.min(BURST, this.#tokens + ((now - this.#lastRefill) / 1000) * RATE_PER_SEC);
    this.#lastRefill = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }

  #handle(frame: Uint8Array): void {
    this.stats.framesIn++;
    if (!this.#allow()) {
      if (this.stats.dropped++ % 1000 === 0) this.log.warn("guest is flooding the os channel; dropping frames");
      return;
    }
    let msg: GuestMessage;
    try {
      msg = GuestMessage.decode(frame);
    } catch (err) {
      return this.#malformed(`undecodable frame: ${(err as Error).message}`);
    }
    try {
      const m = msg.msg;
      if (m && m.$case !== "hello" && m.$case !== "pong" && !this.#session) {
        // A guest speaks only after its Hello was accepted; anything else is noise or an attack.
        this.stats.outOfSession++;
        return;
      }
      switch (m?.$case) {
        case "hello": {
          const { protocolVersion, buildId } = m.value;
          const accepted = protocolVersion === PROTOCOL_VERSION;
          const reason = accepted ? "" : `protocol ${protocolVersion} not supported (agent speaks ${PROTOCOL_VERSION})`;
          this.#session = accepted;
          this.send({ msg: { $case: "helloReply", value: { accepted, reason } } });
          this.log.info("guest said hello", { buildId: buildId.slice(0, 64), protocolVersion, accepted });
          this.events.onHello?.(buildId.slice(0, 64), accepted);
          break;
        }
        case "exited":
          this.events.onExited?.(m.value.exitCode, m.value.signal);
          break;
        case "pong":
          break;
        case "ports": {
          const r = checkPorts(m.value);
          if (!r.ok) return this.#malformed(`invalid Ports: ${r.error}`);
          this.events.onPorts?.(r.value);
          break;
        }
        case "log": {
          const r = checkLog(m.value);
          if (!r.ok) return this.#malformed(`invalid Log: ${r.error}`);
          this.events.onLog?.(r.value);
          break;
        }
        case "networkApplied": {
          const p = this.#pendingNet.get(m.value.requestId);
          if (!p) return this.#malformed(`NetworkApplied for unknown request ${m.value.requestId}`);
          this.#pendingNet.delete(m.value.requestId);
          clearTimeout(p.timer);
          if (m.value.error === "") p.resolve();
          else p.reject(new UnavailableError(`guest could not apply the network: ${m.value.error.slice(0, 256)}`));
          break;
        }
        default:
          this.#malformed("frame from guest without a known message");
      }
    } catch (err) {
      // A handler bug must not let a guest crash the agent.
      this.log.error("os channel handler failed", { error: err });
    }
  }

  #malformed(why: string): void {
    // Logged with a budget: a guest must not be able to fill the agent's log.
    if (this.stats.malformed++ < 20 || this.stats.malformed % 1000 === 0) {
      this.log.warn("guest frame dropped", { reason: why, malformed: this.stats.malformed });
    }
  }
}
