/**
 * Length-prefixed frames: a 4-byte big-endian length, then the payload. The decoder is
 * written for an untrusted peer: a length over the limit poisons the stream (we cannot
 * resync inside a byte stream) and the caller drops the connection.
 */
import { MAX_FRAME_BYTES } from "./wire.ts";

/** Prefixes `payload` with its length. */
export function encodeFrame(payload: Uint8Array): Uint8Array {
  if (payload.length > MAX_FRAME_BYTES) throw new RangeError(`frame of ${payload.length} bytes exceeds limit`);
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, payload.length);
  out.set(payload, 4);
  return out;
}

/** Raised when the peer announces a frame larger than the limit. */
export class FrameTooLargeError extends Error {
  constructor(readonly length: number, readonly limit: number) {
    super(`frame length ${length} exceeds limit ${limit}`);
  }
}

/** Incremental decoder: push bytes, pull whole frames. */
export class FrameDecoder {
  #buf = new Uint8Array(0);
  constructor(private readonly limit = MAX_FRAME_BYTES) {}

  /** Appends bytes and returns every complete frame; throws FrameTooLargeError on a bad length. */
  push(chunk: Uint8Array): Uint8Array[] {
    const merged = new Uint8Array(this.#buf.length + chunk.length);
    merged.set(this.#buf);
    merged.set(chunk, this.#buf.length);
    const frames: Uint8Array[] = [];
    let off = 0;
    while (merged.length - off >= 4) {
      const len = new DataView(merged.buffer, merged.byteOffset + off).getUint32(0);
      if (len > this.limit) throw new FrameTooLargeError(len, this.limit);
      if (merged.length - off - 4 < len) break;
      frames.push(merged.slice(off + 4, off + 4 + len));
      off += 4 + len;
    }
    this.#buf = merged.slice(off);
    return frames;
  }

  /** Bytes held waiting for the rest of a frame. */
  get pending(): number {
    return this.#buf.length;
  }
}
