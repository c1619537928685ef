/**
 * The app's output as capsule-init forwards it (stdout/stderr chunks), kept per capsule
 * in <capsule dir>/app.log as JSON lines {"t": ISO time, "s": "stdout"|"stderr", "d":
 * base64}. Bounded: past `maxBytes` the file becomes app.log.1 (replacing the older
 * one), so a chatty or hostile app costs at most twice that on disk.
 */
import { Buffer } from "node:buffer";
import type { GuestLog } from "../osserver/guest_messages.ts";

/** One stored chunk of output. */
export interface LogChunk {
  time: Date;
  stream: "stdout" | "stderr";
  data: Uint8Array;
}

const DEFAULT_MAX_BYTES = 4 * 1024 * 1024;
const POLL_MS = 100;

/** Appends chunks to one capsule's log; writes are serialised and never throw into callers. */
export class AppLogWriter {
  #file?: Deno.FsFile;
  #size = -1;
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(readonly path: string, private onError: (err: unknown) => void, readonly maxBytes = DEFAULT_MAX_BYTES) {}

  /** Queues a chunk; returns the stored form (with its time). */
  append(log: GuestLog): LogChunk {
    const chunk = { time: new Date(), stream: log.stream, data: log.data };
    const line = new TextEncoder().encode(
      JSON.stringify({ t: chunk.time.toISOString(), s: chunk.stream, d: Buffer.from(chunk.data).toString("base64") }) +
        "\n",
    );
    this.#chain = this.#chain.then(() => this.#write(line)).catch(this.onError);
    return chunk;
  }

  /** Resolves when everything queued so far is written. */
  flush(): Promise<void> {
    return this.#chain;
  }

  /** Flushes and closes the file. */
  async close(): Promise<void> {
    await this.#chain;
    this.#closed = true;
    this.#file?.close();
    this.#file = undefined;
  }

  async #write(line: Uint8Array): Promise<void> {
    if (this.#closed) return;
    if (!this.#file) {
      this.#file = await Deno.open(this.path, { append: true, create: true, mode: 0o600 });
      this.#size = (await this.#file.stat()).size;
    }
    if (this.#size > 0 && this.#size + line.length > this.maxBytes) {
      this.#file.close();
      await Deno.rename(this.path, `${this.path}.1`);
      this.#file = await Deno.open(this.path, { append: true, create: true, mode: 0o600 });
      this.#size = 0;
    }
    let off = 0;
    while (off < line.length) off += await this.#file.write(line.subarray(off));
    this.#size += line.length;
  }
}

/** Parses one stored line; a torn or foreign line yields undefined. */
export function parseLogLine(line: string): LogChunk | undefined {
  try {
    const v = JSON.parse(line) as { t?: unknown; s?: unknown; d?: unknown };
    if (typeof v.t !== "string" || (v.s !== "stdout" && v.s !== "stderr") || typeof v.d !== "string") return undefined;
    return { time: new Date(v.t), stream: v.s, data: new Uint8Array(Buffer.from(v.d, "base64")) };
  } catch {
    return undefined;
  }
}

/** Yields stored chunks (from the start, or only new ones), then follows the file until `signal`. */
export async function* readAppLog(
  path: string,
  opts: { fromStart: boolean; follow: boolean; signal: AbortSignal; stillExists: () => boolean },
): AsyncGenerator<LogChunk> {
  const lines = async function* (p: string, from: number): AsyncGenerator<[string, number]> {
    let text: Uint8Array;
    try {
      using f = await Deno.open(p, { read: true });
      await f.seek(from, Deno.SeekMode.Start);
      text = await readToEnd(f);
    } catch {
      return;
    }
    // Only whole lines: a line still being written is read on the next poll.
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      if (text[i] !== 0x0a) continue;
      yield [new TextDecoder().decode(text.subarray(start, i)), from + i + 1];
      start = i + 1;
    }
  };
  const size = async (p: string) => (await Deno.stat(p).catch(() => undefined))?.size ?? 0;
  let pos = 0;
  if (opts.fromStart) {
    for await (const [l] of lines(`${path}.1`, 0)) {
      const c = parseLogLine(l);
      if (c) yield c;
    }
  } else {
    pos = await size(path);
  }
  while (!opts.signal.aborted) {
    if (await size(path) < pos) pos = 0; // rotated: the new file starts over
    let any = false;
    for await (const [l, next] of lines(path, pos)) {
      pos = next;
      any = true;
      const c = parseLogLine(l);
      if (c) yield c;
    }
    if (any) continue;
    if (!opts.follow || !opts.stillExists()) return;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function readToEnd(f: Deno.FsFile): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let total = 0;
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await f.read(buf);
    if (n === null) break;
    parts.push(buf.slice(0, n));
    total += n;
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}
