/**
 * In-process event bus: every capsule change is published here; WatchEvents streams it.
 * Subscribers get events in order; a slow subscriber has a bounded queue and is dropped
 * with an Unavailable error rather than growing memory without limit.
 */
import { UnavailableError } from "../errors.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";
import type { LogChunk } from "./app_log.ts";
import type { CapsuleStateName } from "./states.ts";
import type { PortMapping } from "./types.ts";
import type { MigrationProgress } from "../migrate/types.ts";

export type EventType =
  | "created"
  | "state_changed"
  | "deleted"
  | "listen"
  | "unlisten"
  | "log"
  | "exited"
  | "exposed"
  | "unexposed"
  | "expose_refused"
  | "migration";

/** One thing that happened to a capsule. */
export interface CapsuleEvent {
  seq: number;
  time: Date;
  type: EventType;
  capsuleId: string;
  capsuleName: string;
  state: CapsuleStateName;
  previousState?: CapsuleStateName;
  message: string;
  /** listen, unlisten, expose_refused. */
  port?: GuestPort;
  /** exposed, unexposed. */
  mapping?: PortMapping;
  /** log. */
  log?: LogChunk;
  /** exited. */
  exit?: { code: number; signal: number };
  /** migration. */
  migration?: MigrationProgress;
}

type Listener = (e: CapsuleEvent) => void;

/** Publishes capsule events to subscribers. */
export class EventBus {
  #seq = 0;
  #listeners = new Set<Listener>();

  /** Publishes an event, stamping seq and time. */
  publish(e: Omit<CapsuleEvent, "seq" | "time">): CapsuleEvent {
    const event = { ...e, seq: ++this.#seq, time: new Date() };
    for (const l of this.#listeners) {
      try {
        l(event);
      } catch {
        // A broken subscriber must not stop the others.
      }
    }
    return event;
  }

  /** Calls `listener` for every later event; returns the unsubscribe function. */
  subscribe(listener: Listener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Returns an async iterator of events, ended by `signal`; at most `maxQueue` pending. */
  async *stream(signal: AbortSignal, maxQueue = 10_000): AsyncGenerator<CapsuleEvent> {
    const queue: CapsuleEvent[] = [];
    let wake: (() => void) | undefined;
    let overflow = false;
    const unsubscribe = this.subscribe((e) => {
      if (queue.length >= maxQueue) overflow = true;
      else queue.push(e);
      wake?.();
    });
    const onAbort = () => wake?.();
    signal.addEventListener("abort", onAbort);
    try {
      while (!signal.aborted) {
        if (overflow) {
          throw new UnavailableError(`event stream fell more than ${maxQueue} events behind; list and watch again`);
        }
        if (queue.length === 0) {
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
          continue;
        }
        yield queue.shift()!;
      }
    } finally {
      unsubscribe();
      signal.removeEventListener("abort", onAbort);
    }
  }
}
