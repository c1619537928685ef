import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import type * as grpc from "@grpc/grpc-js";
import { InvalidArgumentError } from "../../../agent/errors.ts";
import type { PushImageRequest } from "../../../agent/gen/flexcap/v1/peer.ts";
import { type ImageManifest, manifestId, sha256Hex } from "../../../agent/image/manifest.ts";
import { ImageStore } from "../../../agent/image/store.ts";
import { checkImage, manifestBlobs, receiveImage, sendImage } from "../../../agent/migrate/image_transfer.ts";
import { randomBytes } from "./helpers.ts";

interface Fixture {
  manifest: ImageManifest;
  id: string;
  blobs: Map<string, Uint8Array>;
  kernel: string;
  initrd: string;
  rootfs: string;
}

/** A manifest whose three blobs are random bytes (the rootfs spans several chunks). */
async function fixture(): Promise<Fixture> {
  const kernelBytes = randomBytes(100_000);
  const initrdBytes = randomBytes(3000);
  const rootfsBytes = randomBytes(2_500_000);
  const [kernel, initrd, rootfs] = await Promise.all([kernelBytes, initrdBytes, rootfsBytes].map(sha256Hex));
  const manifest: ImageManifest = {
    version: 1,
    kernel: "capsule",
    kernelBlob: kernel,
    initrdBlob: initrd,
    rootfsBlob: rootfs,
    cmdline: "console=ttyS0",
    acpi: false,
    entrypoint: "/app",
    args: [],
    env: {},
    defaultMemoryMib: 128,
    minMemoryMib: 64,
    files: ["/app"],
    sizeBytes: kernelBytes.length + initrdBytes.length + rootfsBytes.length,
  };
  return {
    manifest,
    id: await manifestId(manifest),
    blobs: new Map([[kernel, kernelBytes], [initrd, initrdBytes], [rootfs, rootfsBytes]]),
    kernel,
    initrd,
    rootfs,
  };
}

const header = (imageId: string, name: string, manifest: unknown): PushImageRequest => ({
  kind: { $case: "header", value: { imageId, name, manifestJson: Buffer.from(JSON.stringify(manifest)) } },
});
const chunk = (digest: string, data: Uint8Array, last: boolean): PushImageRequest => ({
  kind: { $case: "chunk", value: { digest, data: Buffer.from(data), last } },
});

/** A blob as chunks of at most `size` bytes, the last one flagged. */
function blobChunks(digest: string, data: Uint8Array, size = 1024 * 1024): PushImageRequest[] {
  const out: PushImageRequest[] = [];
  for (let off = 0; off < data.length; off += size) {
    out.push(chunk(digest, data.subarray(off, off + size), off + size >= data.length));
  }
  return out;
}

function push(f: Fixture, name = "app", skip: string[] = []): PushImageRequest[] {
  return [
    header(f.id, name, f.manifest),
    ...[...f.blobs].filter(([d]) => !skip.includes(d)).flatMap(([d, data]) => blobChunks(d, data)),
  ];
}

async function* stream(msgs: PushImageRequest[]): AsyncIterable<PushImageRequest> {
  for (const m of msgs) {
    await Promise.resolve();
    yield m;
  }
}

async function withStore(fn: (store: ImageStore, dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "fc-imgxfer-" });
  try {
    const store = new ImageStore(dir);
    await store.open();
    await fn(store, dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function exists(p: string): Promise<boolean> {
  return await Deno.stat(p).then(() => true, () => false);
}

function blobNames(store: ImageStore): string[] {
  return [...Deno.readDirSync(join(store.root, "blobs"))].map((e) => e.name).sort();
}

/** Nothing usable: no tag for the id (also after a reload), no leftover temp files. */
async function assertNothingUsable(store: ImageStore, dir: string, f: Fixture, absentBlobs: string[]) {
  assert.equal(store.hasId(f.id), false);
  const reloaded = new ImageStore(dir);
  await reloaded.open();
  assert.equal(reloaded.hasId(f.id), false);
  assert.deepEqual(await reloaded.list(), []);
  for (const d of absentBlobs) assert.equal(await exists(store.blobPath(d)), false, `blob ${d} must not be stored`);
  const temps = blobNames(store).filter((n) => n.startsWith("."));
  assert.deepEqual(temps, [], "no temp files left in blobs/");
  assert.equal((await checkImage(store, f.id)).present, false);
}

async function refused(messages: PushImageRequest[], store: ImageStore, field: string, message?: RegExp) {
  await assert.rejects(receiveImage(stream(messages), store), (e: unknown) => {
    assert.ok(e instanceof InvalidArgumentError, `expected InvalidArgumentError, got ${e}`);
    assert.equal(e.field, field);
    if (message) assert.match(e.message, message);
    return true;
  });
}

Deno.test("receiveImage stores a pushed image and all its blobs, verified", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    assert.deepEqual(await checkImage(store, f.id), { present: false, missing: [] });
    const r = await receiveImage(stream(push(f)), store);
    assert.deepEqual(r, { blobsStored: 3, bytesStored: f.manifest.sizeBytes });
    assert.ok(store.hasId(f.id));
    assert.equal((await store.get("app")).id, f.id);
    for (const [d, data] of f.blobs) assert.deepEqual(await Deno.readFile(store.blobPath(d)), data);
    assert.deepEqual(blobNames(store), [...f.blobs.keys()].sort());
    assert.deepEqual(await checkImage(store, f.id), { present: true, missing: [] });
    // Survives a reload.
    const reloaded = new ImageStore(dir);
    await reloaded.open();
    assert.deepEqual((await reloaded.get(f.id)).manifest, f.manifest);
  }));

Deno.test("receiveImage with blobs already here: only the missing one is sent; a taken name gets the id appended", () =>
  withStore(async (store) => {
    const f = await fixture();
    // Another image already holds the name "app"; the kernel and initrd blobs are here.
    const other = { ...f.manifest, cmdline: "console=hvc0" };
    await store.put("app", other, false);
    await store.putBlob(f.blobs.get(f.kernel)!);
    await store.putBlob(f.blobs.get(f.initrd)!);
    assert.deepEqual(await checkImage(store, f.id), { present: false, missing: [] }, "no manifest yet");
    const r = await receiveImage(stream(push(f, "app", [f.kernel, f.initrd])), store);
    assert.deepEqual(r, { blobsStored: 1, bytesStored: f.blobs.get(f.rootfs)!.length });
    assert.equal((await store.get("app")).id, await manifestId(other), "the existing name is untouched");
    const renamed = `app-${f.id.slice(7, 19)}`;
    assert.equal((await store.get(renamed)).id, f.id);
    assert.deepEqual(await checkImage(store, f.id), { present: true, missing: [] });
  }));

Deno.test("checkImage lists the blobs a stored manifest lacks", () =>
  withStore(async (store) => {
    const f = await fixture();
    await receiveImage(stream(push(f)), store);
    await Deno.remove(store.blobPath(f.rootfs));
    await Deno.remove(store.blobPath(f.kernel));
    const c = await checkImage(store, f.id);
    assert.equal(c.present, false);
    assert.deepEqual(c.missing.sort(), [f.kernel, f.rootfs].sort());
    assert.deepEqual(await checkImage(store, "sha256:" + "0".repeat(64)), { present: false, missing: [] });
  }));

Deno.test("receiveImage refuses a header whose image id is not the manifest's digest", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const wrong = "sha256:" + "e".repeat(64);
    await refused([header(wrong, "app", f.manifest), ...push(f).slice(1)], store, "header.image_id");
    await assertNothingUsable(store, dir, f, [...f.blobs.keys()]);
  }));

Deno.test("receiveImage refuses a manifest that is not a manifest", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const bad = { ...f.manifest, kernelBlob: "../../etc/passwd" };
    await refused([header(f.id, "app", bad), ...push(f).slice(1)], store, "header.manifest_json");
    await assertNothingUsable(store, dir, f, [...f.blobs.keys()]);
  }));

Deno.test("receiveImage refuses a chunk before the header", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const msgs = push(f);
    await refused([msgs[1], msgs[0], ...msgs.slice(2)], store, "header", /must come first/);
    await refused([{ kind: undefined }, ...msgs], store, "header", /must come first/);
    await assertNothingUsable(store, dir, f, [...f.blobs.keys()]);
  }));

Deno.test("receiveImage refuses a blob whose bytes do not match its digest", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const forged = randomBytes(f.blobs.get(f.rootfs)!.length);
    const msgs = [
      header(f.id, "app", f.manifest),
      ...blobChunks(f.kernel, f.blobs.get(f.kernel)!),
      ...blobChunks(f.initrd, f.blobs.get(f.initrd)!),
      ...blobChunks(f.rootfs, forged), // several chunks, then last
    ];
    await refused(msgs, store, "chunk.data", /arrived with digest/);
    await assertNothingUsable(store, dir, f, [f.rootfs]);
  }));

Deno.test("receiveImage refuses a digest that is not a blob of the image", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const stray = randomBytes(1000);
    const strayDigest = await sha256Hex(stray);
    await refused(
      [...push(f, "app", [f.rootfs]), ...blobChunks(strayDigest, stray)],
      store,
      "chunk.digest",
      /is not a blob of the image/,
    );
    await assertNothingUsable(store, dir, f, [strayDigest, f.rootfs]);
    // A path instead of a digest is refused the same way, before any file is opened.
    await refused([header(f.id, "app", f.manifest), chunk("../../tags.json", stray, true)], store, "chunk.digest");
    await assertNothingUsable(store, dir, f, [f.rootfs]);
  }));

Deno.test("receiveImage refuses a push that leaves a blob missing", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    await refused(push(f, "app", [f.initrd]), store, "chunk", new RegExp(`blob ${f.initrd} of the image was not sent`));
    await assertNothingUsable(store, dir, f, [f.initrd]);
    // A header alone (the receiver has none of the blobs) is refused the same way.
    await refused([header(f.id, "app", f.manifest)], store, "chunk");
    await assertNothingUsable(store, dir, f, [f.initrd]);
  }));

Deno.test("receiveImage refuses a second header", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    const msgs = push(f);
    // In the middle of a blob: the partial blob's temp file goes too.
    const mid = [msgs[0], ...blobChunks(f.rootfs, f.blobs.get(f.rootfs)!).slice(0, 1), msgs[0]];
    await refused(mid, store, "header", /sent twice/);
    await assertNothingUsable(store, dir, f, [f.rootfs]);
    // After every blob arrived (they are verified and stay), but the image is not tagged.
    await refused([...msgs, msgs[0]], store, "header", /sent twice/);
    await assertNothingUsable(store, dir, f, []);
  }));

Deno.test("receiveImage refuses an empty stream and a blob cut short or interleaved", () =>
  withStore(async (store, dir) => {
    const f = await fixture();
    await refused([], store, "header", /missing/);
    const rootfs = blobChunks(f.rootfs, f.blobs.get(f.rootfs)!);
    assert.ok(rootfs.length > 1);
    // The stream ends in the middle of a blob.
    await refused([header(f.id, "app", f.manifest), ...rootfs.slice(0, -1)], store, "chunk.last");
    await assertNothingUsable(store, dir, f, [f.rootfs]);
    // Another blob starts before this one ended.
    await refused(
      [header(f.id, "app", f.manifest), rootfs[0], ...blobChunks(f.kernel, f.blobs.get(f.kernel)!)],
      store,
      "chunk.last",
    );
    await assertNothingUsable(store, dir, f, [f.rootfs, f.kernel]);
  }));

Deno.test("sendImage → receiveImage moves an image between two real stores", async () => {
  const a = await Deno.makeTempDir({ prefix: "fc-imgsrc-" });
  const b = await Deno.makeTempDir({ prefix: "fc-imgdst-" });
  try {
    const f = await fixture();
    const src = new ImageStore(a);
    await src.open();
    for (const data of f.blobs.values()) await src.putBlob(data);
    await src.put("app", f.manifest, false);
    const dst = new ImageStore(b);
    await dst.open();
    // Only the grpc call is stood in for: it records what sendImage writes.
    const sent: PushImageRequest[] = [];
    let ended = false;
    const call = {
      write: (m: PushImageRequest) => (sent.push(structuredClone(m)), true),
      once: () => call,
      end: () => void (ended = true),
    } as unknown as grpc.ClientWritableStream<PushImageRequest>;
    const bytes = await sendImage(call, src, f.id, "app", [f.rootfs]);
    assert.equal(bytes, f.blobs.get(f.rootfs)!.length);
    assert.ok(ended);
    assert.ok(sent.every((m) => m.kind?.$case !== "chunk" || m.kind.value.digest === f.rootfs));
    // The receiver lacks the other blobs: refused, then complete once they are here.
    await assert.rejects(receiveImage(stream(sent), dst), InvalidArgumentError);
    await dst.putBlob(f.blobs.get(f.kernel)!);
    await dst.putBlob(f.blobs.get(f.initrd)!);
    const r = await receiveImage(stream(sent), dst);
    assert.equal(r.blobsStored, 1);
    assert.deepEqual(await checkImage(dst, f.id), { present: true, missing: [] });
    assert.deepEqual(manifestBlobs((await dst.get("app")).manifest), manifestBlobs(f.manifest));
  } finally {
    await Deno.remove(a, { recursive: true });
    await Deno.remove(b, { recursive: true });
  }
});
