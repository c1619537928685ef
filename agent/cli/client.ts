/**
 * Typed, promise-based clients for the agent's API, shared by the CLI, the demo, tests
 * and benchmarks.
 */
import type { MigrateCapsuleRequest, MigrateCapsuleResponse } from "../gen/flexcap/v1/capsule.ts";
import type { MigrationProgress, MigrationResult } from "../gen/flexcap/v1/migration.ts";
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import { AgentServiceClient } from "../gen/flexcap/v1/agent.ts";
import { CapsuleServiceClient } from "../gen/flexcap/v1/capsule.ts";
import { ImageServiceClient } from "../gen/flexcap/v1/image.ts";

/** Default local API address. */
export const DEFAULT_API = "unix:/run/flexcap/flexcapd.sock";

type Unary<Req, Res> = (req: Req, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall;
type Promisified<C> = {
  // Matched against the last overload ts-proto emits: (request, metadata, options, callback).
  [K in keyof C]: C[K] extends (
    req: infer Req,
    md: grpc.Metadata,
    o: Partial<grpc.CallOptions>,
    cb: (err: grpc.ServiceError | null, res: infer Res) => void,
  ) => grpc.ClientUnaryCall ? (req: Req) => Promise<Res>
    : C[K];
};

// Server-streaming methods return their stream; every other method is unary.
const STREAMING = new Set(["watchEvents", "streamConsole", "streamLogs", "migrateCapsule"]);

/** Wraps a grpc-js client so unary methods return promises and streaming ones their stream. */
export function promisify<C extends grpc.Client>(client: C): Promisified<C> {
  return new Proxy(client, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if (
        typeof v !== "function" || typeof prop !== "string" || !/^[a-z]/.test(prop) || prop in grpc.Client.prototype
      ) {
        return typeof v === "function" ? v.bind(target) : v;
      }
      return (req: unknown) => {
        if (STREAMING.has(prop)) return v.call(target, req);
        return new Promise((resolve, reject) =>
          (v as Unary<unknown, unknown>).call(target, req, (err, res) => (err ? reject(err) : resolve(res)))
        );
      };
    },
  }) as unknown as Promisified<C>;
}

/** All three service clients on one channel. */
export interface FlexcapClient {
  capsules: Promisified<CapsuleServiceClient>;
  images: Promisified<ImageServiceClient>;
  agent: Promisified<AgentServiceClient>;
  raw: { capsules: CapsuleServiceClient };
  close(): void;
}

/** Connects to `api` ("unix:/path" or "tcp:host:port" with TLS files). */
export function connect(
  api = DEFAULT_API,
  tls?: {
    ca?: string;
    cert?: string;
    key?: string; /** Name to verify instead of the host (IP targets). */
    serverName?: string;
  },
): FlexcapClient {
  const target = api.startsWith("tcp:") ? api.slice(4) : api;
  const creds = api.startsWith("tcp:")
    ? grpc.credentials.createSsl(
      tls?.ca ? Buffer.from(Deno.readFileSync(tls.ca)) : null,
      tls?.key ? Buffer.from(Deno.readFileSync(tls.key)) : null,
      tls?.cert ? Buffer.from(Deno.readFileSync(tls.cert)) : null,
    )
    : grpc.credentials.createInsecure();
  const opts: grpc.ChannelOptions = { "grpc.max_receive_message_length": 16 * 1024 * 1024 };
  if (tls?.serverName) opts["grpc.ssl_target_name_override"] = tls.serverName;
  const capsules = new CapsuleServiceClient(target, creds, opts);
  const images = new ImageServiceClient(target, creds, opts);
  const agent = new AgentServiceClient(target, creds, opts);
  return {
    capsules: promisify(capsules),
    images: promisify(images),
    agent: promisify(agent),
    raw: { capsules },
    close() {
      capsules.close();
      images.close();
      agent.close();
    },
  };
}

/** Runs MigrateCapsule to its end: calls `onProgress` per report, resolves with the result, rejects with the status. */
export function migrate(
  client: FlexcapClient,
  req: MigrateCapsuleRequest,
  onProgress: (p: MigrationProgress) => void = () => {},
): Promise<MigrationResult> {
  return new Promise((resolve, reject) => {
    let result: MigrationResult | undefined;
    const stream = client.raw.capsules.migrateCapsule(req);
    stream.on("data", (m: MigrateCapsuleResponse) => {
      if (m.kind?.$case === "progress") onProgress(m.kind.value);
      if (m.kind?.$case === "result") result = m.kind.value;
    });
    stream.on("error", reject);
    stream.on("end", () => result ? resolve(result) : reject(new Error("MigrateCapsule ended without a result")));
  });
}
