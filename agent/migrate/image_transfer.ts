/**
 * Moving an image to a peer that lacks it, content-addressed: the receiver checks every
 * blob against its sha256 digest and the manifest against the image id before storing
 * anything under a name, so a corrupt or hostile push stores nothing usable.
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { join } from "node:path";
import type * as grpc from "@grpc/grpc-js";
import { InvalidArgumentError } from "../errors.ts";
import type { PushImageHeader, PushImageRequest, PushImageResponse } from "../gen/flexcap/v1/peer.ts";
import { manifestId, ManifestSchema } from "../image/manifest.ts";
import type { ImageManifest } from "../image/manifest.ts";
import type { ImageStore } from "../image/store.ts";

const CHUNK_BYTES = 1024 * 1024;
/** Largest blob accepted (a root disk); guards the receiver's disk against a hostile sender. */
const MAX_BLOB_BYTES = 4 * 1024 * 1024 * 1024;

/** Blob digests a manifest refers to. */
export function manifestBlobs(m: ImageManifest): string[] {
  return [m.kernelBlob, m.initrdBlob, ...(m.rootfsBlob ? [m.rootfsBlob] : [])];
}

/** Which blobs of image `id` this store lacks; `present` when the manifest and all blobs are here. */
export async function checkImage(store: ImageStore, id: string): Promise<{ present: boolean; missing: string[] }> {
  let manifest: ImageManifest | undefined;
  try {
    manifest = await store.manifestById(id);
  } catch {
    return { present: false, missing: [] }; // no manifest: the sender sends everything
  }
  const missing: string[] = [];
  for (const b of manifestBlobs(manifest)) {
    try {
      await Deno.stat(store.blobPath(b));
    } catch {
      missing.push(b);
    }
  }
  return { present: missing.length === 0 && store.hasId(id), missing };
}

/** Sends image `id` (named `name`) on a PushImage call, only the blobs in `only` if given. */
export async function sendImage(
  call: grpc.ClientWritableStream<PushImageRequest>,
  store: ImageStore,
  id: string,
  name: string,
  only?: string[],
): Promise<number> {
  const manifest = await store.manifestById(id);
  const write = (msg: PushImageRequest) =>
    call.write(msg) ? Promise.resolve() : new Promise<void>((r) => call.once("drain", () => r()));
  await write({
    kind: {
      $case: "header",
      value: { imageId: id, name, manifestJson: Buffer.from(JSON.stringify(manifest)) },
    },
  });
  let sent = 0;
  for (const digest of manifestBlobs(manifest)) {
    if (only && only.length > 0 && !only.includes(digest)) continue;
    const f = await Deno.open(store.blobPath(digest));
    try {
      const buf = new Uint8Array(CHUNK_BYTES);
      for (;;) {
        const n = await f.read(buf);
        if (n === null) break;
        sent += n;
        await write({
          kind: { $case: "chunk", value: { digest, data: Buffer.from(buf.subarray(0, n)), last: false } },
        });
      }
      await write({ kind: { $case: "chunk", value: { digest, data: Buffer.alloc(0), last: true } } });
    } finally {
      f.close();
    }
  }
  call.end();
  return sent;
}

/** Receives a PushImage stream into `store`; every blob and the manifest are verified first. */
export async function receiveImage(
  messages: AsyncIterable<PushImageRequest>,
  store: ImageStore,
): Promise<PushImageResponse> {
  let header: PushImageHeader | undefined;
  let manifest: ImageManifest | undefined;
  let current:
    | { digest: string; file: Deno.FsFile; tmp: string; hash: ReturnType<typeof createHash>; size: number }
    | undefined;
  let blobsStored = 0;
  let bytesStored = 0;
  const done = new Set<string>();
  try {
    for await (const msg of messages) {
      if (msg.kind?.$case === "header") {
        if (header) throw new InvalidArgumentError("header", "sent twice");
        header = msg.kind.value;
        let raw: unknown;
        try {
          raw = JSON.parse(new TextDecoder().decode(header.manifestJson));
        } catch {
          throw new InvalidArgumentError("header.manifest_json", "not JSON");
        }
        const parsed = ManifestSchema.safeParse(raw);
        if (!parsed.success) throw new InvalidArgumentError("header.manifest_json", parsed.error.issues[0].message);
        manifest = parsed.data;
        if (await manifestId(manifest) !== header.imageId) {
          throw new InvalidArgumentError("header.image_id", "does not match the manifest's digest");
        }
        continue;
      }
      const c = msg.kind?.$case === "chunk" ? msg.kind.value : undefined;
      if (!c || !manifest) throw new InvalidArgumentError("header", "must come first");
      if (!manifestBlobs(manifest).includes(c.digest)) {
        throw new InvalidArgumentError("chunk.digest", `${c.digest} is not a blob of the image`);
      }
      if (!current || current.digest !== c.digest) {
        if (current) throw new InvalidArgumentError("chunk.last", `blob ${current.digest} ended without last`);
        const tmp = join(store.root, "blobs", `.push-${crypto.randomUUID()}.tmp`);
        current = {
          digest: c.digest,
          tmp,
          file: await Deno.open(tmp, { write: true, createNew: true, mode: 0o600 }),
          hash: createHash("sha256"),
          size: 0,
        };
      }
      current.size += c.data.length;
      if (current.size > MAX_BLOB_BYTES) throw new InvalidArgumentError("chunk.data", "blob too large");
      current.hash.update(c.data);
      let off = 0;
      while (off < c.data.length) off += await current.file.write(c.data.subarray(off));
      if (c.last) {
        current.file.close();
        const got = current.hash.digest("hex");
        if (got !== c.digest) {
          await Deno.remove(current.tmp).catch(() => {});
          const d = current.digest;
          current = undefined;
          throw new InvalidArgumentError("chunk.data", `blob ${d} arrived with digest ${got}`);
        }
        await Deno.rename(current.tmp, store.blobPath(current.digest));
        done.add(current.digest);
        blobsStored++;
        bytesStored += current.size;
        current = undefined;
      }
    }
    if (!header || !manifest) throw new InvalidArgumentError("header", "missing");
    if (current) throw new InvalidArgumentError("chunk.last", `blob ${current.digest} ended without last`);
    for (const b of manifestBlobs(manifest)) {
      try {
        await Deno.stat(store.blobPath(b));
      } catch {
        throw new InvalidArgumentError("chunk", `blob ${b} of the image was not sent and is not here`);
      }
    }
    if (!store.hasId(header.imageId)) {
      // A name taken by another image here gets the id appended instead of replacing it.
      const taken = await store.get(header.name).then(() => true, () => false);
      await store.put(taken ? `${header.name}-${header.imageId.slice(7, 19)}` : header.name, manifest, false);
    }
    return { blobsStored, bytesStored };
  } finally {
    if (current) {
      try {
        current.file.close();
      } catch { /* closed */ }
      await Deno.remove(current.tmp).catch(() => {});
    }
  }
}
