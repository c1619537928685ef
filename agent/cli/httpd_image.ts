/**
 * The busybox-httpd image used by the demo, the tests and the benchmarks.
 */
import { BuildImageRequest, type Image, KernelKind } from "../gen/flexcap/v1/image.ts";
import type { FlexcapClient } from "./client.ts";

/** Builds an image named `name` whose busybox httpd serves `text` at / on port 80. */
export async function buildHttpdImage(
  client: FlexcapClient,
  name = "httpd",
  text = "hello from a capsule\n",
  kernel: KernelKind = KernelKind.KERNEL_KIND_CAPSULE,
): Promise<Image> {
  const www = await Deno.makeTempDir({ prefix: "flexcap-www-" });
  await Deno.writeTextFile(`${www}/index.html`, text);
  try {
    return (await client.images.buildImage(BuildImageRequest.fromPartial({
      name,
      executable: "/bin/busybox",
      args: ["httpd", "-f", "-p", "80", "-h", "/www"],
      files: [{ hostPath: www, guestPath: "/www" }],
      kernel,
    }))).image!;
  } finally {
    await Deno.remove(www, { recursive: true });
  }
}
