/**
 * The peer listener: PeerService on its own TCP port with mutual TLS under the cluster CA.
 * TLS proves the caller holds a key the CA certified; the name check here proves it is
 * one of this agent's configured peers (a valid certificate for another node is refused).
 */
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import type { PeerCertificate } from "node:tls";
import { PermissionDeniedError, UnavailableError } from "../errors.ts";
import { IncomingOutcome, type PeerInfo, type PeerServiceServer, PeerServiceService } from "../gen/flexcap/v1/peer.ts";
import type { Logger } from "../log.ts";
import { unary } from "../api/rpc.ts";
import { logRpcError, toGrpcStatus } from "../api/status.ts";
import { validate } from "../api/validate.ts";
import type { ImageStore } from "../image/store.ts";
import { checkImage, receiveImage } from "./image_transfer.ts";
import type { Arrivals } from "./incoming.ts";
import { AbortIncomingSchema, CheckImageSchema, CommitIncomingSchema, parseArrival } from "./peer_validate.ts";
import type { MigrationMode } from "./policy.ts";
import { shutdownGracefully } from "../api/server.ts";

/** Where and as whom to serve, and whom to let in. */
export interface PeerServerOptions {
  listen: string;
  cert: string;
  key: string;
  ca: string;
  peers: string[];
}

/** A running peer listener. */
export interface PeerServer {
  port: number;
  shutdown(): Promise<void>;
}

/** The node name a caller's certificate was issued for (its DNS SAN, else its CN). */
export function certName(call: { getAuthContext(): { sslPeerCertificate?: PeerCertificate } }): string | undefined {
  const cert: PeerCertificate | undefined = call.getAuthContext().sslPeerCertificate;
  const san = cert?.subjectaltname?.split(",").map((s: string) => s.trim()).find((s: string) => s.startsWith("DNS:"));
  if (san) return san.slice(4);
  const cn = cert?.subject?.CN;
  return Array.isArray(cn) ? cn[0] : cn;
}

// The caller's peer name, or PERMISSION_DENIED if its certificate names no configured peer.
function peerOf(call: { getAuthContext(): { sslPeerCertificate?: PeerCertificate } }, peers: Set<string>): string {
  const name = certName(call);
  if (!name || !peers.has(name)) {
    throw new PermissionDeniedError(
      `peer certificate for "${name ?? "(no name)"}" is not a configured peer of this agent`,
    );
  }
  return name;
}

/** Refuses callers whose certificate names no configured peer; `fn` gets the peer's name. */
export function authorize<Req, Res>(
  log: Logger,
  method: string,
  peers: Set<string>,
  fn: (req: Req, peer: string) => Promise<Res>,
) {
  return (call: grpc.ServerUnaryCall<Req, Res>, cb: grpc.sendUnaryData<Res>): void => {
    unary<Req, Res>(log, method, (req) => fn(req, peerOf(call, peers)))(call, cb);
  };
}

/** The same for a client-streaming method: `fn` consumes the messages. */
export function authorizeStream<Req, Res>(
  log: Logger,
  method: string,
  peers: Set<string>,
  fn: (messages: AsyncIterable<Req>, peer: string) => Promise<Res>,
) {
  return (call: grpc.ServerReadableStream<Req, Res>, cb: grpc.sendUnaryData<Res>): void => {
    Promise.resolve().then(() => fn(call as AsyncIterable<Req>, peerOf(call, peers))).then(
      (res) => cb(null, res),
      (err) => {
        logRpcError(log, method, err);
        call.destroy(); // stop reading a stream we refused
        cb(toGrpcStatus(err));
      },
    );
  };
}

/** What PeerService serves from. */
export interface PeerServiceDeps {
  log: Logger;
  /** Names of the configured peers: the only callers let in. */
  peers: Set<string>;
  info(): PeerInfo;
  images: ImageStore;
  arrivals: Arrivals;
  mode: MigrationMode;
  graceMs: number;
}

const OUTCOME = {
  pending: IncomingOutcome.INCOMING_OUTCOME_PENDING,
  running: IncomingOutcome.INCOMING_OUTCOME_RUNNING,
  aborted: IncomingOutcome.INCOMING_OUTCOME_ABORTED,
} as const;

/** Builds the PeerService implementation. */
export function peerService(d: PeerServiceDeps): PeerServiceServer {
  const { log, peers } = d;
  return {
    getPeerInfo: authorize(log, "GetPeerInfo", peers, () => Promise.resolve({ info: d.info() })),
    checkImage: authorize(log, "CheckImage", peers, async (req) => {
      const { imageId } = validate(CheckImageSchema, req);
      const r = await checkImage(d.images, imageId);
      return { present: r.present, missingBlobs: r.missing };
    }),
    pushImage: authorizeStream(log, "PushImage", peers, (messages) => receiveImage(messages, d.images)),
    prepareIncoming: authorize(log, "PrepareIncoming", peers, async (req, peer) => {
      const r = await d.arrivals.prepare(parseArrival(req, d.mode, d.graceMs), peer);
      return {
        token: r.token,
        dataPort: r.dataPort,
        hostPorts: r.hostPorts.map((p) => ({ ...p, protocol: p.protocol === "udp" ? 2 : 1 })),
      };
    }),
    commitIncoming: authorize(log, "CommitIncoming", peers, async (req) => {
      const { migrationId, waitMs, released } = validate(CommitIncomingSchema, req);
      const r = await d.arrivals.commit(migrationId, waitMs, released);
      return { outcome: OUTCOME[r.outcome], resumedAt: r.resumedAt, message: r.message };
    }),
    abortIncoming: authorize(log, "AbortIncoming", peers, async (req) => {
      const { migrationId, reason } = validate(AbortIncomingSchema, req);
      return { outcome: OUTCOME[(await d.arrivals.abort(migrationId, reason)).outcome] };
    }),
  };
}

/** Starts the peer listener. */
export async function startPeerServer(
  opts: PeerServerOptions,
  service: PeerServiceServer,
  log: Logger,
): Promise<PeerServer> {
  const read = (p: string) => Buffer.from(Deno.readFileSync(p));
  const server = new grpc.Server({ "grpc.max_receive_message_length": 16 * 1024 * 1024 });
  server.addService(PeerServiceService, service);
  // checkClientCertificate: no certificate from the cluster CA, no connection.
  const creds = grpc.ServerCredentials.createSsl(read(opts.ca), [{
    private_key: read(opts.key),
    cert_chain: read(opts.cert),
  }], true);
  const target = opts.listen.slice("tcp:".length);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(
      target,
      creds,
      (err, p) =>
        err ? reject(new UnavailableError(`cannot listen for peers on ${target}: ${err.message}`)) : resolve(p),
    )
  );
  log.info("peer listener ready", { listen: opts.listen, peers: [...opts.peers] });
  return { port, shutdown: () => shutdownGracefully(server) };
}
