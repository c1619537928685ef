/**
 * flexcap.v1.ImageService: thin handlers over the image builder and store.
 */
import type { ImageServiceServer } from "../gen/flexcap/v1/image.ts";
import type { ImageCatalog } from "../image/catalog.ts";
import type { Logger } from "../log.ts";
import { imageToPb } from "./convert.ts";
import { unary } from "./rpc.ts";
import { BuildImageSchema, ImageRefSchema, validate } from "./validate.ts";

/** Builds the ImageService implementation over `images`. */
export function imageService(images: ImageCatalog, log: Logger): ImageServiceServer {
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
        kernel: "linux-vm",
        replace: r.replace,
      });
      return { image: imageToPb(image) };
    }),
    listImages: unary(log, "ListImages", async () => ({ images: (await images.list()).map(imageToPb) })),
    getImage: unary(log, "GetImage", async (req) => ({ image: imageToPb(await images.get(ref(req))) })),
    deleteImage: unary(log, "DeleteImage", async (req) => {
      await images.delete(ref(req));
      return {};
    }),
  };
}
