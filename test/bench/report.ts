/**
 * Reporting shared by the benchmark dispatcher (main.ts) and suites run directly: runs a
 * suite's `run()`, prints the result as ONE JSON object on the last line of stdout and
 * writes it, pretty-printed, to bench-results/SUITE.json. Progress goes to stderr.
 * (Separate from main.ts so a suite can import it without an import cycle through
 * main.ts's top-level await.)
 */
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** What every suite module exports. */
export interface BenchSuite {
  run(): Promise<Record<string, unknown>>;
}

/** Runs one suite and reports it; resolves with the result. */
export async function runSuite(suite: string): Promise<Record<string, unknown>> {
  if (!/^[a-z][a-z0-9_-]*$/.test(suite) || ["main", "report"].includes(suite)) {
    throw new Error(`bad suite name ${JSON.stringify(suite)}`);
  }
  const path = fileURLToPath(new URL(`./${suite}.ts`, import.meta.url));
  try {
    await Deno.stat(path);
  } catch {
    throw new Error(`no benchmark suite ${JSON.stringify(suite)} (expected ${path})`);
  }
  const mod = await import(new URL(`./${suite}.ts`, import.meta.url).href) as Partial<BenchSuite>;
  if (typeof mod.run !== "function") throw new Error(`${path} exports no run()`);
  const started = new Date();
  const result = {
    suite,
    ...await mod.run(),
    started_at: started.toISOString(),
    duration_s: Math.round((Date.now() - started.getTime()) / 100) / 10,
  };
  const dir = `${ROOT}/bench-results`;
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/${suite}.json`, JSON.stringify(result, null, 2) + "\n");
  console.error(`bench: wrote bench-results/${suite}.json`);
  console.log(JSON.stringify(result));
  return result;
}

/** Entry point shared by main.ts and suites run directly; exits non-zero on failure. */
export async function main(suite: string | undefined): Promise<void> {
  if (!suite) {
    console.error("usage: deno run -A test/bench/main.ts SUITE   (e.g. lifecycle)");
    Deno.exit(2);
  }
  try {
    await runSuite(suite);
  } catch (err) {
    console.error(`bench ${suite} failed:`, err);
    Deno.exit(1);
  }
  // grpc-js may keep timers or sockets alive; the suite has cleaned up, so leave now.
  Deno.exit(0);
}

/** A positive integer from the environment (e.g. BENCH_RUNS), or `dflt` when unset. */
export function envInt(name: string, dflt: number): number {
  const v = Deno.env.get(name);
  if (v === undefined || v === "") return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${JSON.stringify(v)}`);
  return n;
}

/** Median of the samples (mean of the middle two for an even count). */
export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Throws unless `x` is a finite number above zero: a measurement that silently failed reads as 0 or NaN. */
export function positive(what: string, x: number): number {
  if (!Number.isFinite(x) || x <= 0) throw new Error(`${what}: measurement failed (got ${x})`);
  return x;
}

/** `x` rounded to one decimal. */
export const round1 = (x: number): number => Math.round(x * 10) / 10;
/** `x` rounded to two decimals. */
export const round2 = (x: number): number => Math.round(x * 100) / 100;
