/**
 * The agent's side of one running capsule's OS-server session: keeps a GuestChannel
 * connected to the QEMU it belongs to (reconnecting after an agent restart, save/restore
 * or a guest that dropped the line) and turns what the guest says into calls on its owner.
 * One link per QEMU process; it ends when that QEMU is gone or close() is called.
 */
import type { NetConfig } from "../gen/flexcap/guest/v1/guest.ts";
import { UnavailableError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { GuestChannel } from "../osserver/channel.ts";
import type { GuestLog, GuestPort } from "../osserver/guest_messages.ts";

/** What a link reports to its owner. */
export interface LinkEvents {
  onExited(code: number, signal: number): void;
  onPorts(ports: GuestPort[]): void;
  onLog(log: GuestLog): void;
}

const RECONNECT_MS = 500;
// The read loop drains a socket buffer in well under this.
const DRAIN_MS = 100;

/** A self-healing connection to one capsule's guest channel socket. */
export class GuestLink {
  #channel?: GuestChannel;
  #closed = false;
  #known: boolean;
  #connected = Promise.withResolvers<void>();
  readonly done: Promise<void>;

  /** `knownGuest`: the guest was accepted before (restore, migration, re-adoption after an agent restart). */
  constructor(private socketPath: string, private log: Logger, private events: LinkEvents, knownGuest: boolean) {
    this.#known = knownGuest;
    this.done = this.#run();
  }

  /** Resolves once the first connection is up, or after `timeoutMs` (the link keeps trying). */
  async connected(timeoutMs: number): Promise<boolean> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<boolean>((r) => timer = setTimeout(() => r(false), timeoutMs));
    try {
      return await Promise.race([this.#connected.promise.then(() => true), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** The live channel, if connected. */
  get channel(): GuestChannel | undefined {
    return this.#channel;
  }

  /** Asks the guest to shut its app down; false when no guest is listening. */
  requestShutdown(graceMs: number): boolean {
    if (!this.#channel?.inSession) return false;
    this.#channel.requestShutdown(graceMs);
    return true;
  }

  /** Gives the guest a new network identity. */
  setNetwork(net: NetConfig): Promise<void> {
    if (!this.#channel) return Promise.reject(new UnavailableError("guest channel is not connected"));
    return this.#channel.setNetwork(net);
  }

  /**
   * Closes after the channel has read what is already buffered. For a guest that can no
   * longer write (paused for save or migration), so its last output is not dropped.
   */
  async drainAndClose(ms = DRAIN_MS): Promise<void> {
    await new Promise((r) => setTimeout(r, ms));
    this.close();
  }

  /** Stops reconnecting and closes the channel. */
  close(): void {
    this.#closed = true;
    this.#channel?.close();
  }

  async #run(): Promise<void> {
    while (!this.#closed) {
      try {
        const ch = await GuestChannel.connect(this.socketPath, this.log, {
          onHello: (_id, accepted) => this.#known = accepted,
          onExited: (code, signal) => this.events.onExited(code, signal),
          onPorts: (ports) => this.events.onPorts(ports),
          onLog: (log) => this.events.onLog(log),
        }, { knownGuest: this.#known });
        this.#channel = ch;
        this.#connected.resolve();
        if (this.#closed) ch.close();
        await ch.done;
        if (this.#channel === ch) this.#channel = undefined;
      } catch (err) {
        this.log.debug("os channel connect failed; retrying", { error: err });
      }
      if (!this.#closed) await new Promise((r) => setTimeout(r, RECONNECT_MS));
    }
  }
}
