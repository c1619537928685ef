/**
 * Memory accounting: the agent never promises capsules more guest RAM than
 * total x overcommit_ratio - reserve.
 */
import { ResourceExhaustedError } from "../errors.ts";

/** The instance's memory budget. */
export interface MemoryBudget {
  totalMib: number;
  allocatableMib: number;
}

/** Budget from /proc/meminfo and the configured ratio and reserve. */
export function memoryBudget(ratio: number, reserveMib: number, meminfo?: string): MemoryBudget {
  const text = meminfo ?? Deno.readTextFileSync("/proc/meminfo");
  const kib = Number(/^MemTotal:\s+(\d+) kB/m.exec(text)?.[1] ?? 0);
  const totalMib = Math.floor(kib / 1024);
  return { totalMib, allocatableMib: Math.max(0, Math.floor(totalMib * ratio) - reserveMib) };
}

/** Throws ResourceExhausted unless `wantMib` fits next to `committedMib`. */
export function checkFits(budget: MemoryBudget, committedMib: number, wantMib: number, what: string): void {
  if (committedMib + wantMib > budget.allocatableMib) {
    throw new ResourceExhaustedError(
      `${what}: needs ${wantMib} MiB but only ${Math.max(0, budget.allocatableMib - committedMib)} MiB of ` +
        `${budget.allocatableMib} MiB allocatable are free (${committedMib} MiB committed)`,
    );
  }
}
