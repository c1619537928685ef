/**
 * Content-addressed image storage under <state>/images:
 *   blobs/<sha256>       kernels and initramfs files, shared between images
 *   manifests/<sha256>.json
 *   tags.json            name -> image id (versioned)
 * Blobs no manifest refers to are removed when an image is deleted.
 */
import { join } from "node:path";
import { z } from "zod";
import { AlreadyExistsError, InternalError, NotFoundError } from "../errors.ts";
import { atomicWrite, atomicWriteJson, removeStaleTemps } from "../state/atomic.ts";
import { type ImageInfo, type ImageManifest, manifestId, ManifestSchema, sha256Hex } from "./manifest.ts";

const TagsSchema = z.object({
  version: z.literal(1),
  tags: z.record(z.string(), z.object({ id: z.string(), createdAt: z.string() })),
});
type Tags = z.infer<typeof TagsSchema>["tags"];

/** Reads and writes images; one instance per agent. */
export class ImageStore {
  readonly root: string;
  #tags: Tags = {};

  constructor(stateDir: string) {
    this.root = join(stateDir, "images");
  }

  /** Creates the directories and loads the tag index. */
  async open(): Promise<void> {
    for (const d of ["blobs", "manifests"]) await Deno.mkdir(join(this.root, d), { recursive: true, mode: 0o700 });
    await removeStaleTemps(join(this.root, "blobs"));
    try {
      this.#tags = TagsSchema.parse(JSON.parse(await Deno.readTextFile(join(this.root, "tags.json")))).tags;
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw new InternalError(`images/tags.json unreadable: ${err}`);
    }
  }

  /** Path of a blob by digest. */
  blobPath(hex: string): string {
    return join(this.root, "blobs", hex);
  }

  /** Moves a finished temp file into the blob store; returns its digest. */
  async putBlobFile(tmpPath: string): Promise<string> {
    const hex = await sha256Hex(await Deno.readFile(tmpPath));
    const dest = this.blobPath(hex);
    try {
      await Deno.stat(dest);
      await Deno.remove(tmpPath); // already stored: content addressing dedupes it
    } catch {
      await Deno.rename(tmpPath, dest);
    }
    return hex;
  }

  /** Stores a blob from memory; returns its digest. */
  async putBlob(data: Uint8Array): Promise<string> {
    const hex = await sha256Hex(data);
    const dest = this.blobPath(hex);
    try {
      await Deno.stat(dest);
    } catch {
      await atomicWrite(dest, data, 0o600);
    }
    return hex;
  }

  /** Stores a manifest under `name`; refuses an existing name unless `replace`. */
  async put(name: string, manifest: ImageManifest, replace: boolean): Promise<ImageInfo> {
    if (this.#tags[name] && !replace) throw new AlreadyExistsError("image", name);
    const id = await manifestId(manifest);
    await atomicWriteJson(this.#manifestPath(id), manifest);
    const previous = this.#tags[name]?.id;
    const createdAt = new Date();
    await this.#writeTags({ ...this.#tags, [name]: { id, createdAt: createdAt.toISOString() } });
    if (previous && previous !== id) await this.#gc();
    return { id, name, manifest, createdAt };
  }

  /** Looks an image up by id or name. */
  async get(ref: string): Promise<ImageInfo> {
    const entry = Object.entries(this.#tags).find(([n, t]) => n === ref || t.id === ref);
    if (!entry) throw new NotFoundError("image", ref);
    const [name, tag] = entry;
    return { id: tag.id, name, manifest: await this.#readManifest(tag.id), createdAt: new Date(tag.createdAt) };
  }

  /** All images, by name. */
  async list(): Promise<ImageInfo[]> {
    const names = Object.keys(this.#tags).sort();
    return await Promise.all(names.map((n) => this.get(n)));
  }

  /** Removes the name; the manifest and unreferenced blobs go with it. */
  async delete(ref: string): Promise<ImageInfo> {
    const img = await this.get(ref);
    const tags = { ...this.#tags };
    delete tags[img.name];
    await this.#writeTags(tags);
    await this.#gc();
    return img;
  }

  /** True if some name still points at `id`. */
  hasId(id: string): boolean {
    return Object.values(this.#tags).some((t) => t.id === id);
  }

  /** Reads a manifest by id even if no name points to it any more. */
  async manifestById(id: string): Promise<ImageManifest> {
    return await this.#readManifest(id);
  }

  #manifestPath(id: string): string {
    return join(this.root, "manifests", `${id.replace(/^sha256:/, "")}.json`);
  }

  async #readManifest(id: string): Promise<ImageManifest> {
    try {
      return ManifestSchema.parse(JSON.parse(await Deno.readTextFile(this.#manifestPath(id))));
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) throw new NotFoundError("image", id);
      throw new InternalError(`manifest of ${id} unreadable: ${err}`);
    }
  }

  async #writeTags(tags: Tags): Promise<void> {
    await atomicWriteJson(join(this.root, "tags.json"), { version: 1, tags });
    this.#tags = tags;
  }

  // Keeps tagged manifests and their blobs; callers refuse to untag an image a capsule uses.
  async #gc(): Promise<void> {
    const live = new Set(Object.values(this.#tags).map((t) => t.id));
    const blobs = new Set<string>();
    for await (const e of Deno.readDir(join(this.root, "manifests"))) {
      const id = "sha256:" + e.name.replace(/\.json$/, "");
      if (!live.has(id)) {
        await Deno.remove(join(this.root, "manifests", e.name));
        continue;
      }
      const m = await this.#readManifest(id);
      blobs.add(m.kernelBlob).add(m.initrdBlob);
      if (m.rootfsBlob) blobs.add(m.rootfsBlob);
    }
    for await (const e of Deno.readDir(join(this.root, "blobs"))) {
      // Dot files are builds in progress.
      if (!blobs.has(e.name) && !e.name.startsWith(".")) await Deno.remove(join(this.root, "blobs", e.name));
    }
  }
}
