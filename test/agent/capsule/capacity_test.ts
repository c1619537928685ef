import assert from "node:assert/strict";
import { checkFits, memoryBudget } from "../../../agent/capsule/capacity.ts";
import { ResourceExhaustedError } from "../../../agent/errors.ts";

const meminfo = "MemTotal:        2097152 kB\nMemFree: 1 kB\n";

Deno.test("memory budget is total x ratio - reserve", () => {
  assert.deepEqual(memoryBudget(1, 512, meminfo), { totalMib: 2048, allocatableMib: 1536 });
  assert.deepEqual(memoryBudget(1.5, 0, meminfo), { totalMib: 2048, allocatableMib: 3072 });
  assert.equal(memoryBudget(0.1, 512, meminfo).allocatableMib, 0);
});

Deno.test("memory check refuses overcommit with RESOURCE_EXHAUSTED and the figures", () => {
  const b = { totalMib: 2048, allocatableMib: 1536 };
  checkFits(b, 1000, 536, "capsule a");
  assert.throws(() => checkFits(b, 1000, 537, "capsule a"), (e: unknown) => {
    assert.ok(e instanceof ResourceExhaustedError);
    assert.match(e.message, /capsule a: needs 537 MiB but only 536 MiB/);
    return true;
  });
});
