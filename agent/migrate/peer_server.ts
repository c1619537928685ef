/**
 * The peer listener: PeerService on its own TCP port with mutual TLS under the cluster CA.
 * TLS proves the caller holds a key the CA certified; the name check here proves it is
 * one of this agent's configured peers (a valid certificate for another node is refused).
 */
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import type { PeerCertificate } from "node:tls";
import { PermissionDeniedError, UnavailableError } from "../errors.ts";
import { type PeerInfo, type PeerServiceServer, PeerServiceService } from "../gen/flexcap/v1/peer.ts";
import type { Logger } from "../log.ts";
import { unary } from "../api/rpc.ts";
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
export function certName(call: grpc.ServerUnaryCall<unknown, unknown>): string | undefined {
  const cert: PeerCertificate | undefined = call.getAuthContext().sslPeerCertificate;
  const san = cert?.subjectaltname?.split(",").map((s: string) => s.trim()).find((s: string) => s.startsWith("DNS:"));
  if (san) return san.slice(4);
  const cn = cert?.subject?.CN;
  return Array.isArray(cn) ? cn[0] : cn;
}

/** Refuses callers whose certificate names no configured peer; `fn` gets the peer's name. */
export function authorize<Req, Res>(
  log: Logger,
  method: string,
  peers: Set<string>,
  fn: (req: Req, peer: string) => Promise<Res>,
) {
  return (call: grpc.ServerUnaryCall<Req, Res>, cb: grpc.sendUnaryData<Res>): void => {
    const name = certName(call as grpc.ServerUnaryCall<unknown, unknown>);
    const handler = unary<Req, Res>(log, method, (req) => {
      if (!name || !peers.has(name)) {
        throw new PermissionDeniedError(
          `peer certificate for "${name ?? "(no name)"}" is not a configured peer of this agent`,
        );
      }
      return fn(req, name);
    });
    handler(call, cb);
  };
}

/** Builds the PeerService implementation. */
export function peerService(log: Logger, peers: Set<string>, info: () => PeerInfo): PeerServiceServer {
  return {
    getPeerInfo: authorize(log, "GetPeerInfo", peers, () => Promise.resolve({ info: info() })),
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
