/**
 * Host end of one capsule's OS-server channel. QEMU owns the listening unix socket (so
 * the guest's port stays open while the agent restarts); the agent connects, greets with
 * a Ping, answers Hello, and reports what the guest says. The guest is untrusted: frames
 * are size-limited, malformed ones are counted and dropped, a flood is rate-limited, and
 * nothing here can throw into the rest of the agent.
 */
import { GuestMessage, HostMessage } from "../gen/flexcap/guest/v1/guest.ts";
import type { Logger } from "../log.ts";
import { encodeFrame, FrameDecoder, FrameTooLargeError } from "./framing.ts";
import { PROTOCOL_VERSION } from "./wire.ts";

/** What the channel reports to the capsule's owner. */
export interface ChannelEvents {
  onHello?(buildId: string, accepted: boolean): void;
  onExited?(exitCode: number, signal: number): void;
}

/** Counters exposed for tests and metrics. */
export interface ChannelStats {
  framesIn: number;
  malformed: number;
  dropped: number;
}

// Token bucket: a guest may send bursts of 200 frames, 100/s sustained; the rest is dropped.
const RATE_PER_SEC = 100;
const BURST = 200;

/** One connection to a guest's channel socket. */
export class GuestChannel {
  readonly stats: ChannelStats = { framesIn: 0, malformed: 0, dropped: 0 };
  #conn: Deno.UnixConn;
  #closed = false;
  #tokens = BURST;
  #lastRefill = performance.now();
  #writeChain: Promise<void> = Promise.resolve();
  /** Resolves when the connection ends. */
  readonly done: Promise<void>;

  private constructor(conn: Deno.UnixConn, private log: Logger, private events: ChannelEvents) {
    this.#conn = conn;
    this.done = this.#readLoop();
  }

  /** Connects to QEMU's end of the channel and pings the guest (which then says Hello if new). */
  static async connect(path: string, log: Logger, events: ChannelEvents): Promise<GuestChannel> {
    const conn = await Deno.connect({ transport: "unix", path });
    const ch = new GuestChannel(conn, log, events);
    ch.send({ msg: { $case: "ping", value: { nonce: Date.now() } } });
    return ch;
  }

  /** Asks the guest to stop its app (SIGTERM, SIGKILL after graceMs) and power off. */
  requestShutdown(graceMs: number): void {
    this.send({ msg: { $case: "shutdown", value: { graceMs } } });
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
      this.stats.malformed++;
      this.log.warn("malformed frame from guest dropped", { error: err });
      return;
    }
    try {
      switch (msg.msg?.$case) {
        case "hello": {
          const { protocolVersion, buildId } = msg.msg.value;
          const accepted = protocolVersion === PROTOCOL_VERSION;
          const reason = accepted ? "" : `protocol ${protocolVersion} not supported (agent speaks ${PROTOCOL_VERSION})`;
          this.send({ msg: { $case: "helloReply", value: { accepted, reason } } });
          this.log.info("guest said hello", { buildId: buildId.slice(0, 64), protocolVersion, accepted });
          this.events.onHello?.(buildId.slice(0, 64), accepted);
          break;
        }
        case "exited":
          this.events.onExited?.(msg.msg.value.exitCode, msg.msg.value.signal);
          break;
        case "pong":
          break;
        default:
          this.stats.malformed++;
          this.log.warn("frame from guest without a known message dropped");
      }
    } catch (err) {
      // A handler bug must not let a guest crash the agent.
      this.log.error("os channel handler failed", { error: err });
    }
  }
}
