/**
 * The image domain: build, list, get and delete images, refusing to delete or replace one
 * a capsule uses, and resolving an image's boot files for QEMU.
 */
import { join } from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { buildInitramfs } from "./builder.ts";
import { ensureLinuxVmKernel, type KernelFiles } from "./kernels.ts";
import { type ImageInfo, type ImageManifest, type KernelKind, MANIFEST_VERSION } from "./manifest.ts";
import type { ImageStore } from "./store.ts";

/** A build request after validation. */
export interface BuildRequest {
  name: string;
  executable: string;
  args: string[];
  env: Record<string, string>;
  files: { hostPath: string; guestPath: string }[];
  defaultMemoryMib: number;
  kernel: KernelKind;
  replace: boolean;
}

/** Builds and serves images. */
export class ImageCatalog {
  #kernel?: Promise<KernelFiles>;

  constructor(
    private store: ImageStore,
    private opts: { cacheDir: string; capsuleInit: string; log: Logger; usersOf: (imageId: string) => string[] },
  ) {}

  /** Builds an image from a host executable and stores it. */
  async build(req: BuildRequest): Promise<ImageInfo> {
    const existing = await this.store.get(req.name).catch(() => undefined);
    if (existing && req.replace) this.#refuseIfUsed(existing, "replace");
    const kernel = await this.kernel();
    const tmp = join(this.store.root, "blobs", `.build-${crypto.randomUUID()}.tmp`);
    try {
      const initrd = await buildInitramfs(
        { executable: req.executable, files: req.files, kernel, capsuleInit: this.opts.capsuleInit },
        tmp,
      );
      const minMemoryMib = kernel.minMemoryMib(initrd.bytes / 1024 / 1024);
      if (req.defaultMemoryMib && req.defaultMemoryMib < minMemoryMib) {
        throw new InvalidArgumentError(
          "default_memory_mib",
          `this image needs at least ${minMemoryMib} MiB (kernel + ${Math.ceil(initrd.bytes / 1048576)} MiB initramfs)`,
        );
      }
      const initrdBlob = await this.store.putBlobFile(tmp);
      const kernelBlob = await this.store.putBlob(await Deno.readFile(kernel.vmlinuz));
      const kernelBytes = (await Deno.stat(this.store.blobPath(kernelBlob))).size;
      const manifest: ImageManifest = {
        version: MANIFEST_VERSION,
        kernel: req.kernel,
        kernelBlob,
        initrdBlob,
        cmdline: kernel.cmdline,
        acpi: kernel.acpi,
        entrypoint: req.executable,
        args: req.args,
        env: { ...initrd.env, ...req.env },
        defaultMemoryMib: Math.max(req.defaultMemoryMib || kernel.defaultMemoryMib, minMemoryMib),
        minMemoryMib,
        files: initrd.files,
        sizeBytes: initrd.bytes + kernelBytes,
      };
      const image = await this.store.put(req.name, manifest, req.replace);
      this.opts.log.info("image built", { image: image.name, id: image.id, bytes: manifest.sizeBytes });
      return image;
    } finally {
      await Deno.remove(tmp).catch(() => {});
    }
  }

  /** All images. */
  list(): Promise<ImageInfo[]> {
    return this.store.list();
  }

  /** One image by id or name. */
  get(ref: string): Promise<ImageInfo> {
    return this.store.get(ref);
  }

  /** Deletes an image no capsule uses. */
  async delete(ref: string): Promise<void> {
    const image = await this.store.get(ref);
    this.#refuseIfUsed(image, "delete");
    await this.store.delete(ref);
    this.opts.log.info("image deleted", { image: image.name, id: image.id });
  }

  /** Kernel and initrd paths of a stored image. */
  bootFiles(m: ImageManifest): { kernelPath: string; initrdPath: string } {
    return { kernelPath: this.store.blobPath(m.kernelBlob), initrdPath: this.store.blobPath(m.initrdBlob) };
  }

  /** The linux-vm kernel, fetched once per agent run at most. */
  kernel(): Promise<KernelFiles> {
    this.#kernel ??= ensureLinuxVmKernel(this.opts.cacheDir, this.opts.log).catch((err) => {
      this.#kernel = undefined; // let the next build retry a failed download
      throw err;
    });
    return this.#kernel;
  }

  #refuseIfUsed(image: ImageInfo, action: string): void {
    const users = this.opts.usersOf(image.id);
    if (users.length > 0) {
      throw new FailedPreconditionError(
        `cannot ${action} image "${image.name}": used by capsule${users.length > 1 ? "s" : ""} ${users.join(", ")}`,
      );
    }
  }
}
