import assert from "node:assert/strict";
import { encodeFrame, FrameDecoder, FrameTooLargeError } from "../../../agent/osserver/framing.ts";

Deno.test("frame decoder reassembles frames split anywhere", () => {
  const frames = [new Uint8Array([1, 2, 3]), new Uint8Array(0), new Uint8Array(1000).fill(7)];
  const wire = new Uint8Array(frames.reduce((n, f) => n + 4 + f.length, 0));
  let off = 0;
  for (const f of frames) {
    wire.set(encodeFrame(f), off);
    off += 4 + f.length;
  }
  for (const step of [1, 3, 5, 64, wire.length]) {
    const d = new FrameDecoder();
    const out: Uint8Array[] = [];
    for (let i = 0; i < wire.length; i += step) out.push(...d.push(wire.subarray(i, i + step)));
    assert.deepEqual(out, frames, `step ${step}`);
    assert.equal(d.pending, 0);
  }
});

Deno.test("frame decoder refuses a length over the limit before buffering it", () => {
  const d = new FrameDecoder(16);
  const hdr = new Uint8Array([0, 0, 0, 17]);
  assert.throws(() => d.push(hdr), FrameTooLargeError);
  assert.throws(() => new FrameDecoder().push(new Uint8Array([0xff, 0xff, 0xff, 0xff])), /exceeds limit/);
  assert.throws(() => encodeFrame(new Uint8Array(70_000)), RangeError);
});
