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
