/**
 * The single place where agent errors become gRPC statuses.
 */
import { type ServiceError, status } from "@grpc/grpc-js";
import { Metadata } from "@grpc/grpc-js";
import { asFlexError } from "../errors.ts";
import type { Logger } from "../log.ts";

/** Converts any thrown value into a grpc-js ServiceError with the mapped code. */
export function toGrpcStatus(err: unknown): ServiceError {
  const e = asFlexError(err);
  const out = new Error(e.message) as ServiceError;
  out.code = e.code as unknown as status;
  out.details = e.message;
  out.metadata = new Metadata();
  return out;
}

/** Logs an RPC failure at a level fitting its cause (client mistakes are not errors). */
export function logRpcError(log: Logger, method: string, err: unknown): void {
  const e = asFlexError(err);
  const fields = { method, code: status[e.code as unknown as status], error: e.message };
  if (e.code === status.INTERNAL || e.code === status.UNAVAILABLE) log.error("rpc failed", fields);
  else log.info("rpc refused", fields);
}
