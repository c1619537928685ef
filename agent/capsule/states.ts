/**
 * The capsule state machine: the states, the legal transitions and the one function that
 * refuses the rest. Documented with a diagram in docs/capsule-states.md.
 */
import { FailedPreconditionError } from "../errors.ts";

export const CAPSULE_STATES = [
  "created",
  "starting",
  "running",
  "paused",
  "stopping",
  "stopped",
  "saving",
  "saved",
  "restoring",
  "migrating",
  "incoming",
] as const;
export type CapsuleStateName = typeof CAPSULE_STATES[number];

// Any state in which QEMU may be running can fall to "stopped" when QEMU dies.
const TRANSITIONS: Record<CapsuleStateName, readonly CapsuleStateName[]> = {
  created: ["starting"],
  starting: ["running", "stopped"],
  running: ["paused", "stopping", "saving", "stopped", "migrating"],
  paused: ["running", "stopping", "saving", "stopped", "migrating"],
  stopping: ["stopped"],
  stopped: ["starting"],
  // A failed save resumes the guest where it was (running or paused).
  saving: ["saved", "running", "paused", "stopped"],
  saved: ["restoring"],
  // A failed restore keeps the state file: back to saved.
  restoring: ["running", "paused", "saved", "stopped"],
  // A failed or cancelled migration leaves the guest as it was; a completed one removes the record.
  migrating: ["running", "paused", "stopped"],
  // An arriving guest runs once its memory is in; an aborted arrival removes the record.
  incoming: ["running", "paused", "stopped"],
};

/** States in which a QEMU process exists (or is being made) for the capsule. */
export const QEMU_STATES: ReadonlySet<CapsuleStateName> = new Set([
  "starting",
  "running",
  "paused",
  "stopping",
  "saving",
  "restoring",
  "migrating",
  "incoming",
]);

/** True when `from → to` is a legal transition. */
export function canTransition(from: CapsuleStateName, to: CapsuleStateName): boolean {
  return TRANSITIONS[from].includes(to);
}

/** Throws FailedPrecondition unless `from → to` is legal. */
export function assertTransition(name: string, from: CapsuleStateName, to: CapsuleStateName): void {
  if (!canTransition(from, to)) {
    throw new FailedPreconditionError(`capsule "${name}" is ${from}; cannot become ${to}`);
  }
}

/** Throws FailedPrecondition unless the capsule is in one of `allowed` for `action`. */
export function requireState(
  name: string,
  state: CapsuleStateName,
  action: string,
  allowed: readonly CapsuleStateName[],
): void {
  if (!allowed.includes(state)) {
    throw new FailedPreconditionError(
      `cannot ${action} capsule "${name}": it is ${state}, expected ${allowed.join(" or ")}`,
    );
  }
}
