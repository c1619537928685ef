/**
 * The image domain: build, list, get and delete images, refusing to delete or replace one
 * a capsule uses, and resolving an image's boot files for QEMU.
 */
import { join } from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { buildGuestFiles } from "./builder.ts";
import { ensureCapsuleKernel, ensureLinuxVmKernel, type KernelFiles } from "./kernels.ts";
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
  workdir: string;
}

/** Where an image's boot files are on this instance. */
export interface BootFiles {
  kernelPath: string;
  initrdPath: string;
  /** The app's read-only root disk, if the image has one. */
  rootfsPath?: string;
}

/** Catalog settings. */
export interface CatalogOptions {
  cacheDir: string;
  capsuleInit: string;
  /** capsule-os/kernel/build.sh. */
  kernelBuild: string;
  log: Logger;
  usersOf: (imageId: string) => string[];
}

/** Builds and serves images. */
export class ImageCatalog {
  #kernels = new Map<KernelKind, Promise<KernelFiles>>();

  constructor(private store: ImageStore, private opts: CatalogOptions) {}

  /** Builds an image from a host executable and stores it. */
  async build(req: BuildRequest): Promise<ImageInfo> {
    const existing = await this.store.get(req.name).catch(() => undefined);
    if (existing && req.replace) this.#refuseIfUsed(existing, "replace");
    const kernel = await this.kernel(req.kernel);
    const tmp = join(this.store.root, "blobs", `.build-${crypto.randomUUID()}.tmp`);
    const tmpRoot = kernel.rootDisk ? `${tmp}.rootfs` : undefined;
    try {
      const built = await buildGuestFiles(
        { executable: req.executable, files: req.files, kernel, capsuleInit: this.opts.capsuleInit },
        tmp,
        tmpRoot,
      );
      const mib = (b: number) => b / 1024 / 1024;
      const minMemoryMib = kernel.minMemoryMib({ initrdMib: mib(built.initrdBytes), appMib: mib(built.appBytes) });
      if (req.defaultMemoryMib && req.defaultMemoryMib < minMemoryMib) {
        throw new InvalidArgumentError(
          "default_memory_mib",
          `this image needs at least ${minMemoryMib} MiB (${req.kernel} kernel + ${
            Math.ceil(mib(built.appBytes))
          } MiB of app files)`,
        );
      }
      const initrdBlob = await this.store.putBlobFile(tmp);
      const rootfsBlob = tmpRoot ? await this.store.putBlobFile(tmpRoot) : undefined;
      const kernelBlob = await this.store.putBlob(await Deno.readFile(kernel.vmlinuz));
      const kernelBytes = (await Deno.stat(this.store.blobPath(kernelBlob))).size;
      const manifest: ImageManifest = {
        version: MANIFEST_VERSION,
        kernel: req.kernel,
        kernelBlob,
        initrdBlob,
        ...(rootfsBlob ? { rootfsBlob } : {}),
        cmdline: kernel.cmdline,
        acpi: kernel.acpi,
        entrypoint: req.executable,
        ...(req.workdir && req.workdir !== "/" ? { workdir: req.workdir } : {}),
        args: req.args,
        env: { ...built.env, ...req.env },
        defaultMemoryMib: Math.max(req.defaultMemoryMib || kernel.defaultMemoryMib, minMemoryMib),
        minMemoryMib,
        files: built.files,
        sizeBytes: built.initrdBytes + built.rootfsBytes + kernelBytes,
      };
      const image = await this.store.put(req.name, manifest, req.replace);
      this.opts.log.info("image built", { image: image.name, id: image.id, bytes: manifest.sizeBytes });
      return image;
    } finally {
      await Deno.remove(tmp).catch(() => {});
      if (tmpRoot) await Deno.remove(tmpRoot).catch(() => {});
    }
  }

  /** Stores `image` again with a measured minimum memory (a new id under the same name). */
  async recordMinMemory(ref: string, minMemoryMib: number): Promise<ImageInfo> {
    const image = await this.store.get(ref);
    this.#refuseIfUsed(image, "re-measure");
    const manifest: ImageManifest = {
      ...image.manifest,
      minMemoryMib,
      minMemoryMeasured: true,
      defaultMemoryMib: Math.max(image.manifest.defaultMemoryMib, minMemoryMib),
    };
    const updated = await this.store.put(image.name, manifest, true);
    this.opts.log.info("image minimum memory recorded", { image: image.name, id: updated.id, minMemoryMib });
    return updated;
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

  /** Boot file paths of a stored image. */
  bootFiles(m: ImageManifest): BootFiles {
    return {
      kernelPath: this.store.blobPath(m.kernelBlob),
      initrdPath: this.store.blobPath(m.initrdBlob),
      rootfsPath: m.rootfsBlob ? this.store.blobPath(m.rootfsBlob) : undefined,
    };
  }

  /** A kernel of `kind`, fetched or built once per agent run at most. */
  kernel(kind: KernelKind): Promise<KernelFiles> {
    let k = this.#kernels.get(kind);
    if (!k) {
      k = (kind === "capsule"
        ? ensureCapsuleKernel(this.opts.cacheDir, this.opts.kernelBuild, this.opts.log)
        : ensureLinuxVmKernel(this.opts.cacheDir, this.opts.log)).catch((err) => {
          this.#kernels.delete(kind); // let the next build retry a failed download or build
          throw err;
        });
      this.#kernels.set(kind, k);
    }
    return k;
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
