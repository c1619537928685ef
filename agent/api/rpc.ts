/**
 * Glue between grpc-js callbacks and async domain calls: every handler becomes
 * "validate, call one domain function, convert", with errors mapped in one place.
 */
import type { sendUnaryData, ServerUnaryCall, ServerWritableStream } from "@grpc/grpc-js";
import type { Logger } from "../log.ts";
import { logRpcError, toGrpcStatus } from "./status.ts";

/** Wraps an async unary handler. */
export function unary<Req, Res>(log: Logger, method: string, fn: (req: Req) => Promise<Res>) {
  return (call: ServerUnaryCall<Req, Res>, cb: sendUnaryData<Res>): void => {
    // Promise.resolve().then: a synchronous throw in fn becomes a rejection, not an UNKNOWN.
    Promise.resolve().then(() => fn(call.request)).then((res) => cb(null, res), (err) => {
      logRpcError(log, method, err);
      cb(toGrpcStatus(err));
    });
  };
}

/** Wraps an async-generator server-streaming handler, honouring backpressure and cancellation. */
export function serverStream<Req, Res>(
  log: Logger,
  method: string,
  fn: (req: Req, signal: AbortSignal) => AsyncIterable<Res>,
) {
  return (call: ServerWritableStream<Req, Res>): void => {
    const abort = new AbortController();
    call.on("cancelled", () => abort.abort());
    call.on("close", () => abort.abort());
    (async () => {
      for await (const msg of fn(call.request, abort.signal)) {
        if (abort.signal.aborted) break;
        if (!call.write(msg)) {
          await new Promise<void>((resolve) => {
            call.once("drain", resolve);
            abort.signal.addEventListener("abort", () => resolve(), { once: true });
          });
        }
      }
    })().then(() => {
      if (!abort.signal.aborted) call.end();
    }, (err) => {
      if (abort.signal.aborted) return;
      logRpcError(log, method, err);
      call.emit("error", toGrpcStatus(err)); // grpc-js sends the status on "error"; destroy() would drop it
    });
  };
}
