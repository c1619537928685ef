/**
 * Crash-safe file writes: a reader sees the old content or the new, never a torn file.
 * Write to a temp file in the same directory, fsync it, rename over the target, fsync
 * the directory so the rename itself survives a power cut.
 */
import { dirname, join } from "node:path";

/** Atomically replaces `path` with `data` (created with `mode`). */
export async function atomicWrite(path: string, data: Uint8Array | string, mode = 0o600): Promise<void> {
  const dir = dirname(path);
  const tmp = join(dir, `.${crypto.randomUUID()}.tmp`);
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const file = await Deno.open(tmp, { write: true, createNew: true, mode });
  try {
    let off = 0;
    while (off < bytes.length) off += await file.write(bytes.subarray(off));
    await file.sync();
  } catch (err) {
    file.close();
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
  file.close();
  try {
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
  await syncDir(dir);
}

/** fsyncs a directory so entries created or renamed in it are durable. */
export async function syncDir(dir: string): Promise<void> {
  const d = await Deno.open(dir, { read: true });
  try {
    await d.sync();
  } finally {
    d.close();
  }
}

/** Atomically writes `value` as pretty JSON. */
export function atomicWriteJson(path: string, value: unknown, mode = 0o600): Promise<void> {
  return atomicWrite(path, JSON.stringify(value, null, 2) + "\n", mode);
}

/** Removes leftover temp files of interrupted writes in `dir`. */
export async function removeStaleTemps(dir: string): Promise<number> {
  let n = 0;
  for await (const e of Deno.readDir(dir)) {
    if (e.isFile && e.name.startsWith(".") && e.name.endsWith(".tmp")) {
      await Deno.remove(join(dir, e.name)).catch(() => {});
      n++;
    }
  }
  return n;
}
