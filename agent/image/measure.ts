/**
 * Finds an image's minimum memory the only honest way: boot it for real at a given size
 * and check the app answers a request. Bisection over integer MiB; each size must pass
 * `attempts` boots. The boot itself is injected, so the search is unit-tested without QEMU.
 */
import { FailedPreconditionError } from "../errors.ts";

/** One boot: did the app answer, and why not. */
export interface Trial {
  memoryMib: number;
  ok: boolean;
  detail: string;
  elapsedMs: number;
}

/** Bisection bounds and repetitions. */
export interface SearchOptions {
  lowMib: number;
  highMib: number;
  attempts: number;
}

/** Smallest size in [low, high] at which `boot` passes, assuming failures below it. */
export async function findMinimum(
  opts: SearchOptions,
  boot: (memoryMib: number) => Promise<Trial>,
): Promise<{ minMib: number; steps: Trial[] }> {
  const steps: Trial[] = [];
  const passes = async (mib: number) => {
    for (let i = 0; i < Math.max(1, opts.attempts); i++) {
      const t = await boot(mib);
      steps.push(t);
      if (!t.ok) return false;
    }
    return true;
  };
  if (!await passes(opts.highMib)) {
    const last = steps.at(-1)!;
    throw new FailedPreconditionError(`image does not work even at ${opts.highMib} MiB: ${last.detail}`);
  }
  let lo = opts.lowMib;
  let hi = opts.highMib;
  while (lo < hi) {
    const mid = Math.floor((lo + hi) / 2);
    if (await passes(mid)) hi = mid;
    else lo = mid + 1;
  }
  return { minMib: hi, steps };
}
