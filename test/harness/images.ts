/**
 * Images the tests and benchmarks share, besides busybox httpd (agent/cli/httpd_image.ts).
 */
import type { FlexcapClient } from "../../agent/cli/client.ts";
import { CapsuleSpec, Protocol } from "../../agent/gen/flexcap/v1/capsule.ts";
import { BuildImageRequest, type Image, KernelKind } from "../../agent/gen/flexcap/v1/image.ts";

export { KernelKind };

/** Debian's redis-server, dynamically linked. */
export const REDIS = "/usr/bin/redis-server";

/** True if this machine has `path` (tests of optional apps skip without it). */
export function haveFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Builds a redis image: no persistence (the root disk is read-only), reachable from outside. */
export async function buildRedisImage(
  client: FlexcapClient,
  name = "redis",
  kernel: KernelKind = KernelKind.KERNEL_KIND_CAPSULE,
): Promise<Image> {
  return (await client.images.buildImage(BuildImageRequest.fromPartial({
    name,
    executable: REDIS,
    args: ["--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
    kernel,
  }))).image!;
}

/** Builds a busybox image whose app is `sh -c script` (for exit codes, signals and output). */
export async function buildShellImage(
  client: FlexcapClient,
  name: string,
  script: string,
  kernel: KernelKind = KernelKind.KERNEL_KIND_CAPSULE,
): Promise<Image> {
  return (await client.images.buildImage(BuildImageRequest.fromPartial({
    name,
    executable: "/bin/busybox",
    args: ["sh", "-c", script],
    kernel,
  }))).image!;
}

/** Creates and starts capsule `name` from image `image` (a redis image) with guest port 6379 on `hostPort`. */
export async function startRedisCapsule(
  client: FlexcapClient,
  name: string,
  hostPort: number,
  opts: { image?: string; memoryMib?: number } = {},
): Promise<void> {
  await client.capsules.createCapsule({
    name,
    spec: CapsuleSpec.fromPartial({
      image: opts.image ?? "redis",
      memoryMib: opts.memoryMib ?? 48,
      ports: [{ guestPort: 6379, hostPort, protocol: Protocol.PROTOCOL_TCP }],
    }),
  });
  await client.capsules.startCapsule({ capsule: name });
}
