/**
 * Promise wrappers for the PeerService calls a migration makes, with deadlines, so the
 * orchestration reads as a sequence of awaits.
 */
import * as grpc from "@grpc/grpc-js";
import type {
  AbortIncomingResponse,
  CheckImageResponse,
  CommitIncomingRequest,
  CommitIncomingResponse,
  PeerServiceClient,
  PrepareIncomingRequest,
  PrepareIncomingResponse,
  PushImageResponse,
} from "../gen/flexcap/v1/peer.ts";
import type { ImageStore } from "../image/store.ts";
import { sendImage } from "./image_transfer.ts";

const CALL_MS = 10_000;
const PREPARE_MS = 30_000;
const PUSH_MS = 600_000;

function call<Req, Res>(
  fn: (
    req: Req,
    md: grpc.Metadata,
    opts: grpc.CallOptions,
    cb: (err: grpc.ServiceError | null, res: Res) => void,
  ) => unknown,
  req: Req,
  ms: number,
): Promise<Res> {
  return new Promise((resolve, reject) =>
    fn(req, new grpc.Metadata(), { deadline: Date.now() + ms }, (err, res) => err ? reject(err) : resolve(res))
  );
}

/** CheckImage. */
export function checkImageOn(c: PeerServiceClient, imageId: string): Promise<CheckImageResponse> {
  return call(c.checkImage.bind(c), { imageId }, CALL_MS);
}

/** PushImage: sends the image, only `missing` blobs when the peer named them. */
export function pushImageTo(
  c: PeerServiceClient,
  store: ImageStore,
  imageId: string,
  name: string,
  missing: string[],
): Promise<PushImageResponse> {
  return new Promise((resolve, reject) => {
    const stream = c.pushImage(
      new grpc.Metadata(),
      { deadline: Date.now() + PUSH_MS },
      (err, res) => err ? reject(err) : resolve(res!),
    );
    sendImage(stream, store, imageId, name, missing).catch((err) => {
      stream.cancel();
      reject(err);
    });
  });
}

/** PrepareIncoming. */
export function prepareOn(c: PeerServiceClient, req: PrepareIncomingRequest): Promise<PrepareIncomingResponse> {
  return call(c.prepareIncoming.bind(c), req, PREPARE_MS);
}

/** CommitIncoming (the deadline covers its wait). */
export function commitOn(c: PeerServiceClient, req: CommitIncomingRequest): Promise<CommitIncomingResponse> {
  return call(c.commitIncoming.bind(c), req, req.waitMs + CALL_MS);
}

/** AbortIncoming. */
export function abortOn(c: PeerServiceClient, migrationId: string, reason: string): Promise<AbortIncomingResponse> {
  return call(c.abortIncoming.bind(c), { migrationId, reason: reason.slice(0, 1000) }, CALL_MS);
}
