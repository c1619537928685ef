/**
 * One error taxonomy for the whole agent. Domain code throws these; the API layer maps
 * them to gRPC status codes in one place (agent/api/status.ts). Messages say what was
 * expected and what was found, and name the field when input is at fault.
 */

/** gRPC status codes used by the agent (numeric values from the gRPC spec). */
export const Code = {
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  PERMISSION_DENIED: 7,
  UNAUTHENTICATED: 16,
} as const;
export type Code = typeof Code[keyof typeof Code];

/** Base of all agent errors; `code` is the gRPC status it maps to. */
export class FlexError extends Error {
  constructor(readonly code: Code, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Input is malformed; `field` names the offending request field. */
export class InvalidArgumentError extends FlexError {
  constructor(readonly field: string, message: string) {
    super(Code.INVALID_ARGUMENT, `${field}: ${message}`);
  }
}

/** A named thing does not exist. */
export class NotFoundError extends FlexError {
  constructor(readonly kind: string, readonly key: string) {
    super(Code.NOT_FOUND, `${kind} "${key}" not found`);
  }
}

/** A thing with that identity exists already. */
export class AlreadyExistsError extends FlexError {
  constructor(readonly kind: string, readonly key: string) {
    super(Code.ALREADY_EXISTS, `${kind} "${key}" already exists`);
  }
}

/** The operation is not allowed in the current state. */
export class FailedPreconditionError extends FlexError {
  constructor(message: string) {
    super(Code.FAILED_PRECONDITION, message);
  }
}

/** The instance lacks capacity (memory) for the request. */
export class ResourceExhaustedError extends FlexError {
  constructor(message: string) {
    super(Code.RESOURCE_EXHAUSTED, message);
  }
}

/** A dependency (QEMU, a peer) is not reachable now; retrying may help. */
export class UnavailableError extends FlexError {
  constructor(message: string, options?: ErrorOptions) {
    super(Code.UNAVAILABLE, message, options);
  }
}

/** The caller is authenticated but not allowed (e.g. a peer certificate for an unknown node). */
export class PermissionDeniedError extends FlexError {
  constructor(message: string) {
    super(Code.PERMISSION_DENIED, message);
  }
}

/** An operation ran out of time. */
export class DeadlineExceededError extends FlexError {
  constructor(message: string) {
    super(Code.DEADLINE_EXCEEDED, message);
  }
}

/** A bug or an unexpected failure of the host. */
export class InternalError extends FlexError {
  constructor(message: string, options?: ErrorOptions) {
    super(Code.INTERNAL, message, options);
  }
}

/** Returns `err` as a FlexError, wrapping anything else as Internal. */
export function asFlexError(err: unknown): FlexError {
  if (err instanceof FlexError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  return new InternalError(msg, { cause: err });
}

/** The operation was abandoned part-way (a migration cancelled or failed); nothing changed. */
export class AbortedError extends FlexError {
  constructor(message: string, options?: ErrorOptions) {
    super(Code.ABORTED, message, options);
  }
}
