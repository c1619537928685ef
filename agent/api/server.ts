/**
 * The gRPC server: our services plus grpc.health.v1 and server reflection, on a unix
 * socket (0600 by default) or TCP with TLS.
 */
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import * as protoLoader from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { dirname } from "node:path";
import { InvalidArgumentError, UnavailableError } from "../errors.ts";
import { type AgentServiceServer, AgentServiceService } from "../gen/flexcap/v1/agent.ts";
import { type CapsuleServiceServer, CapsuleServiceService } from "../gen/flexcap/v1/capsule.ts";
import { type ImageServiceServer, ImageServiceService } from "../gen/flexcap/v1/image.ts";
import { descriptorSetBase64 } from "../gen/descriptor_set.ts";

/** What the server serves. */
export interface ServerServices {
  capsule: CapsuleServiceServer;
  image: ImageServiceServer;
  agent: AgentServiceServer;
}

/** Where and how to listen. */
export interface ListenOptions {
  address: string;
  socketMode: number;
  tls?: { cert: string; key: string; ca?: string };
}

/** A started server. */
export interface ApiServer {
  health: HealthImplementation;
  shutdown(): Promise<void>;
}

/** Starts serving; resolves once the listener is bound (and, for unix, chmod'ed). */
export async function startServer(services: ServerServices, listen: ListenOptions): Promise<ApiServer> {
  const server = new grpc.Server({ "grpc.max_receive_message_length": 16 * 1024 * 1024 });
  server.addService(CapsuleServiceService, services.capsule);
  server.addService(ImageServiceService, services.image);
  server.addService(AgentServiceService, services.agent);
  const health = new HealthImplementation({
    "": "SERVING",
    "flexcap.v1.CapsuleService": "SERVING",
    "flexcap.v1.ImageService": "SERVING",
    "flexcap.v1.AgentService": "SERVING",
  });
  health.addToServer(server);
  new ReflectionService(reflectionPackage()).addToServer(server);

  let creds = grpc.ServerCredentials.createInsecure();
  let target: string;
  if (listen.address.startsWith("unix:")) {
    const path = listen.address.slice("unix:".length);
    await Deno.mkdir(dirname(path), { recursive: true, mode: 0o755 });
    await removeStaleSocket(path);
    target = `unix:${path}`;
  } else {
    if (!listen.tls) throw new InvalidArgumentError("tls", "a tcp: API address needs tls.cert and tls.key");
    const read = (p: string) => Buffer.from(Deno.readFileSync(p));
    creds = grpc.ServerCredentials.createSsl(
      listen.tls.ca ? read(listen.tls.ca) : null,
      [{ private_key: read(listen.tls.key), cert_chain: read(listen.tls.cert) }],
      Boolean(listen.tls.ca),
    );
    target = listen.address.slice("tcp:".length);
  }
  // Umask-free: the socket is chmod'ed before we report ready, and its directory is root's.
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(
      target,
      creds,
      (err) => err ? reject(new UnavailableError(`cannot listen on ${target}: ${err.message}`)) : resolve(),
    )
  );
  if (listen.address.startsWith("unix:")) await Deno.chmod(target.slice(5), listen.socketMode);
  return { health, shutdown: () => shutdownGracefully(server) };
}

/** Lets in-flight calls finish for up to 2 s, then cuts the rest. */
export function shutdownGracefully(server: grpc.Server): Promise<void> {
  return new Promise<void>((resolve) => {
    const t = setTimeout(() => server.forceShutdown(), 2_000);
    server.tryShutdown(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

// proto-loader merges each package into one synthetic file without dependencies, which
// strict reflection clients (grpcurl, protobuf-es) cannot link; serve the original files.
function reflectionPackage(): protoLoader.PackageDefinition {
  const bytes = Uint8Array.from(atob(descriptorSetBase64), (c) => c.charCodeAt(0));
  const pkg = protoLoader.loadFileDescriptorSetFromBuffer(bytes as unknown as Buffer);
  const originals = fromBinary(FileDescriptorSetSchema, bytes).file.map((f) =>
    toBinary(FileDescriptorProtoSchema, f) as unknown as Buffer
  );
  for (const def of Object.values(pkg)) {
    if ("fileDescriptorProtos" in def) (def as { fileDescriptorProtos: Buffer[] }).fileDescriptorProtos = originals;
  }
  return pkg;
}

// A socket file left by a killed agent blocks bind; one that still answers means another agent runs.
async function removeStaleSocket(path: string): Promise<void> {
  try {
    await Deno.lstat(path);
  } catch {
    return;
  }
  try {
    const c = await Deno.connect({ transport: "unix", path });
    c.close();
    throw new UnavailableError(`another process serves ${path}; is flexcapd already running?`);
  } catch (err) {
    if (err instanceof UnavailableError) throw err;
    await Deno.remove(path);
  }
}
