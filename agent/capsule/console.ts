/**
 * Streams a capsule's console log file: QEMU appends the guest's serial output to it, so
 * it survives agent restarts and save/restore (the restored QEMU appends to the same file).
 */

const POLL_MS = 100;
const CHUNK = 64 * 1024;

/** Yields console bytes: from the start or the current end, then (if `follow`) new bytes until `signal`. */
export async function* streamConsole(
  path: string,
  opts: { fromStart: boolean; follow: boolean; signal: AbortSignal; stillExists: () => boolean },
): AsyncGenerator<Uint8Array> {
  let file: Deno.FsFile | undefined;
  let pos = 0;
  const open = async () => {
    try {
      file = await Deno.open(path, { read: true });
      if (!opts.fromStart && pos === 0) pos = (await file.stat()).size;
    } catch {
      file = undefined;
    }
  };
  await open();
  const buf = new Uint8Array(CHUNK);
  try {
    while (!opts.signal.aborted) {
      if (!file) await open();
      let n: number | null = null;
      if (file) {
        await file.seek(pos, Deno.SeekMode.Start);
        n = await file.read(buf);
      }
      if (n && n > 0) {
        pos += n;
        yield buf.slice(0, n);
        continue;
      }
      if (!opts.follow || !opts.stillExists()) return;
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  } finally {
    file?.close();
  }
}

/** The guest kernel's last "Kernel panic" line in the console log's tail, if any. */
export async function findKernelPanic(path: string, tailBytes = 16 * 1024): Promise<string | undefined> {
  try {
    using f = await Deno.open(path, { read: true });
    const size = (await f.stat()).size;
    await f.seek(Math.max(0, size - tailBytes), Deno.SeekMode.Start);
    const buf = new Uint8Array(Math.min(size, tailBytes));
    let off = 0;
    while (off < buf.length) {
      const n = await f.read(buf.subarray(off));
      if (n === null) break;
      off += n;
    }
    const lines = new TextDecoder().decode(buf.subarray(0, off)).split("\n");
    const panic = lines.reverse().find((l) => l.includes("Kernel panic - not syncing"));
    return panic?.replace(/^\[\s*[\d.]+\]\s*/, "").trim().slice(0, 200);
  } catch {
    return undefined;
  }
}
