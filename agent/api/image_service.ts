/**
 * flexcap.v1.ImageService: thin handlers over the image builder and store.
 */
import type { CapsuleManager } from "../capsule/manager.ts";
import { measureImage } from "../capsule/trial.ts";
import { KernelKind } from "../gen/flexcap/v1/image.ts";
import type { ImageServiceServer } from "../gen/flexcap/v1/image.ts";
import type { ImageCatalog } from "../image/catalog.ts";
import type { Logger } from "../log.ts";
import { imageToPb } from "./convert.ts";
import { unary } from "./rpc.ts";
import { BuildImageSchema, ImageRefSchema, MeasureImageSchema, validate } from "./validate.ts";

/** Builds the ImageService implementation over `images` (MeasureImage boots capsules through `manager`). */
export function imageService(images: ImageCatalog, manager: CapsuleManager, log: Logger): ImageServiceServer {
  const ref = (req: unknown) => validate(ImageRefSchema, req).image;
  return {
    buildImage: unary(log, "BuildImage", async (req) => {
      const r = validate(BuildImageSchema, req);
      const image = await images.build({
        name: r.name,
        executable: r.executable,
        args: r.args,
        env: r.env,
        files: r.files.map((f) => ({ hostPath: f.hostPath, guestPath: f.guestPath || f.hostPath })),
        defaultMemoryMib: r.defaultMemoryMib,
        kernel: r.kernel === KernelKind.KERNEL_KIND_LINUX_VM ? "linux-vm" : "capsule",
        replace: r.replace,
        workdir: r.workdir,
      });
      return { image: imageToPb(image) };
    }),
    listImages: unary(log, "ListImages", async () => ({ images: (await images.list()).map(imageToPb) })),
    getImage: unary(log, "GetImage", async (req) => ({ image: imageToPb(await images.get(ref(req))) })),
    deleteImage: unary(log, "DeleteImage", async (req) => {
      await images.delete(ref(req));
      return {};
    }),
    measureImage: unary(log, "MeasureImage", async (req) => {
      const r = validate(MeasureImageSchema, req);
      const { image, steps } = await measureImage({ catalog: images, manager, log }, r);
      return {
        image: imageToPb(image),
        steps: steps.map((s) => ({ memoryMib: s.memoryMib, ok: s.ok, detail: s.detail, elapsedMs: s.elapsedMs })),
      };
    }),
  };
}
