/**
 * Deterministic cpio "newc" (070701) writer for Linux initramfs images. Every entry has
 * uid/gid 0, mtime 0, inode numbers assigned in call order and no device numbers, so the
 * same calls always produce the same bytes. Calls are serialized internally, in call order.
 */

import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../errors.ts";

/** Anything with Deno.FsFile's write(): may write fewer bytes than asked. */
export interface CpioSink {
  write(p: Uint8Array): Promise<number>;
}

const S_IFDIR = 0o040000, S_IFREG = 0o100000, S_IFLNK = 0o120000;
const MAX_SIZE = 0xffffffff; // newc sizes are 8 hex digits
const CHUNK = 1 << 20;
const enc = new TextEncoder();

/** Streams entries into a newc archive; call finish() once at the end. */
export class CpioWriter {
  #out: CpioSink;
  #pos = 0;
  #writes = 0;
  #ino = 0;
  #entries = new Map<string, "dir" | "file" | "symlink">();
  #dirModes = new Map<string, number>();
  #tail: Promise<void> = Promise.resolve();
  #failed: unknown;
  #finished = false;

  constructor(out: CpioSink) {
    this.#out = out;
  }

  /** Adds a directory (and any missing parents, mode 0755); re-adding with the same mode is a no-op. */
  addDirectory(path: string, mode = 0o755): Promise<void> {
    return this.#call(() => {
      const name = this.#prepare(path, mode, "dir");
      return name === undefined ? undefined : () => this.#writeEntry(name, S_IFDIR | mode, 2, new Uint8Array());
    });
  }

  /** Adds a regular file with the given contents. */
  addFile(path: string, data: Uint8Array, mode = 0o644): Promise<void> {
    return this.#call(() => {
      if (data.length > MAX_SIZE) {
        throw new InvalidArgumentError("data", `at most ${MAX_SIZE} bytes expected, found ${data.length}`);
      }
      const name = this.#prepare(path, mode, "file")!;
      return () => this.#writeEntry(name, S_IFREG | mode, 1, data);
    });
  }

  /** Adds a regular file streamed from `hostPath` (symlinks followed); mode defaults to the host file's. */
  addFileFromHost(path: string, hostPath: string, mode?: number): Promise<void> {
    return this.#call(() => {
      const name = this.#prepare(path, mode ?? 0, "file")!;
      return () =>
        this.#copyHostFile(name, hostPath, mode).catch((err) => {
          this.#entries.delete(name); // only reached when nothing was written: the path may be retried
          throw err;
        });
    });
  }

  /** Adds a symbolic link pointing at `target` (stored verbatim). */
  addSymlink(path: string, target: string): Promise<void> {
    return this.#call(() => {
      if (target === "" || target.includes("\0")) {
        throw new InvalidArgumentError(
          "target",
          `non-empty symlink target without NUL expected, found ${JSON.stringify(target)}`,
        );
      }
      const name = this.#prepare(path, 0o777, "symlink")!;
      return () => this.#writeEntry(name, S_IFLNK | 0o777, 1, enc.encode(target));
    });
  }

  /** Writes the TRAILER!!! entry after all pending entries; returns the archive size. */
  async finish(): Promise<{ bytes: number }> {
    this.#checkOpen();
    this.#finished = true;
    await this.#enqueue(() => this.#writeEntry("TRAILER!!!", 0, 1, new Uint8Array(), 0));
    return { bytes: this.#pos };
  }

  /** Validation errors reject this call only; nothing is written for it. */
  #call(prepare: () => (() => Promise<void>) | undefined): Promise<void> {
    let op: (() => Promise<void>) | undefined;
    try {
      op = prepare();
    } catch (err) {
      return Promise.reject(err);
    }
    return op ? this.#enqueue(op) : this.#tail;
  }

  /** Validates at call time so auto-parents and entry order follow call order; undefined = no-op. */
  #prepare(path: string, mode: number, kind: "dir" | "file" | "symlink"): string | undefined {
    this.#checkOpen();
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
      throw new InvalidArgumentError("mode", `permission bits 0..0o7777 expected, found ${mode}`);
    }
    const name = normalize(path);
    const parts = name.split("/");
    for (let i = 1; i < parts.length; i++) {
      const parent = parts.slice(0, i).join("/");
      const have = this.#entries.get(parent);
      if (have === undefined) {
        this.#register(parent, "dir", 0o755);
        this.#enqueue(() => this.#writeEntry(parent, S_IFDIR | 0o755, 2, new Uint8Array()));
      } else if (have !== "dir") {
        throw new InvalidArgumentError("path", `${name}: parent ${parent} is a ${have}, not a directory`);
      }
    }
    const have = this.#entries.get(name);
    if (have === "dir" && kind === "dir") {
      const old = this.#dirModes.get(name)!;
      if (old === mode) return undefined;
      throw new FailedPreconditionError(
        `directory ${name} already added with mode ${old.toString(8)}, found ${mode.toString(8)} ` +
          `(add directories before their children)`,
      );
    }
    if (have !== undefined) throw new AlreadyExistsError("cpio entry", name);
    this.#register(name, kind, mode);
    return name;
  }

  #register(name: string, kind: "dir" | "file" | "symlink", mode: number): void {
    this.#entries.set(name, kind);
    if (kind === "dir") this.#dirModes.set(name, mode);
  }

  #checkOpen(): void {
    if (this.#finished) throw new FailedPreconditionError("cpio archive already finished");
  }

  /**
   * Chains I/O in call order. A failure after an entry's first byte leaves a torn archive, so
   * every later operation rejects with it; a failure before (e.g. missing host file) does not.
   */
  #enqueue(op: () => Promise<void>): Promise<void> {
    let start = 0;
    const run = this.#tail.then(() => {
      if (this.#failed !== undefined) throw this.#failed;
      start = this.#writes;
      return op();
    });
    this.#tail = run.catch((err) => {
      if (this.#writes !== start) this.#failed ??= err;
    });
    return run;
  }

  async #writeEntry(name: string, mode: number, nlink: number, data: Uint8Array, ino = ++this.#ino) {
    await this.#writeHeader(name, mode, nlink, data.length, ino);
    await this.#writeAll(data);
    await this.#pad();
  }

  async #copyHostFile(name: string, hostPath: string, mode: number | undefined): Promise<void> {
    using file = await Deno.open(hostPath).catch((err) => {
      throw err instanceof Deno.errors.NotFound ? new NotFoundError("host file", hostPath) : err;
    });
    const st = await file.stat();
    if (!st.isFile) throw new InvalidArgumentError("hostPath", `regular file expected, found ${hostPath}`);
    if (st.size > MAX_SIZE) {
      throw new InvalidArgumentError(
        "hostPath",
        `at most ${MAX_SIZE} bytes expected, ${hostPath} has ${st.size}`,
      );
    }
    await this.#writeHeader(name, S_IFREG | (mode ?? (st.mode ?? 0o644) & 0o7777), 1, st.size);
    // Stream in chunks; write exactly the stat size so the header stays truthful.
    const buf = new Uint8Array(Math.min(CHUNK, Math.max(st.size, 1)));
    for (let left = st.size; left > 0;) {
      const n = await file.read(buf.subarray(0, Math.min(buf.length, left)));
      if (n === null) throw new FailedPreconditionError(`${hostPath} shrank while being archived`);
      await this.#writeAll(buf.subarray(0, n));
      left -= n;
    }
    await this.#pad();
  }

  async #writeHeader(name: string, mode: number, nlink: number, size: number, ino = ++this.#ino) {
    const nameBytes = enc.encode(name);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    const fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, nameBytes.length + 1, 0];
    const header = "070701" + fields.map((f) => f.toString(16).padStart(8, "0")).join("");
    const padded = new Uint8Array(align4(header.length + nameBytes.length + 1));
    padded.set(enc.encode(header));
    padded.set(nameBytes, header.length);
    await this.#writeAll(padded);
  }

  async #pad(): Promise<void> {
    if (this.#pos % 4) await this.#writeAll(new Uint8Array(4 - (this.#pos % 4)));
  }

  async #writeAll(p: Uint8Array): Promise<void> {
    for (let off = 0; off < p.length;) {
      this.#writes++; // a failed write may still have written some bytes
      const n = await this.#out.write(p.subarray(off));
      if (n <= 0) throw new FailedPreconditionError("cpio output accepted no bytes");
      off += n;
      this.#pos += n;
    }
  }
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

/** Strips leading "/" and rejects empty, ".", ".." components, NUL and the trailer name. */
function normalize(path: string): string {
  const name = path.replace(/^\/+/, "");
  const bad = name === "" || name.includes("\0") || name === "TRAILER!!!" ||
    name.split("/").some((c) => c === "" || c === "." || c === "..");
  if (bad) {
    throw new InvalidArgumentError(
      "path",
      `relative path without empty, ".", ".." components or NUL expected, found ${JSON.stringify(path)}`,
    );
  }
  return name;
}
