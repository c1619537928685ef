import assert from "node:assert/strict";
import { findMinimum, type Trial } from "../../../agent/image/measure.ts";

const bootAbove = (min: number, tried: number[]) => (mib: number): Promise<Trial> => {
  tried.push(mib);
  return Promise.resolve({ memoryMib: mib, ok: mib >= min, detail: mib >= min ? "" : "panic", elapsedMs: 1 });
};

Deno.test("bisection finds the smallest size that boots, trying few sizes", async () => {
  for (const min of [4, 5, 13, 79, 128]) {
    const tried: number[] = [];
    const r = await findMinimum({ lowMib: 4, highMib: 128, attempts: 1 }, bootAbove(min, tried));
    assert.equal(r.minMib, min);
    assert.ok(tried.length <= 9, `${tried.length} boots for min ${min}`);
    assert.equal(r.steps.length, tried.length);
  }
});

Deno.test("every attempt at a size must pass", async () => {
  let n = 0;
  // Flaky at 20 MiB: every other boot fails.
  const boot = (mib: number): Promise<Trial> =>
    Promise.resolve({ memoryMib: mib, ok: mib > 20 || (mib === 20 && n++ % 2 === 0), detail: "", elapsedMs: 1 });
  const r = await findMinimum({ lowMib: 16, highMib: 24, attempts: 2 }, boot);
  assert.equal(r.minMib, 21);
});

Deno.test("an image that fails at the top of the range is an error naming why", async () => {
  await assert.rejects(
    findMinimum({ lowMib: 4, highMib: 32, attempts: 1 }, bootAbove(64, [])),
    /does not work even at 32 MiB: panic/,
  );
});
