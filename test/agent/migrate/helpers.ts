/** Shared bits of the migration unit tests (not a test file itself). */
import type { Logger } from "../../../agent/log.ts";

/** A line a recording logger kept. */
export interface LogLine {
  level: string;
  msg: string;
  fields?: Record<string, unknown>;
}

/** A Logger that keeps its lines in `lines`, so a test can see what was reported. */
export function recordingLogger(lines: LogLine[] = []): Logger {
  const rec = (level: string) => (msg: string, fields?: Record<string, unknown>) =>
    void lines.push({ level, msg, fields });
  const l: Logger = { debug: rec("debug"), info: rec("info"), warn: rec("warn"), error: rec("error"), with: () => l };
  return l;
}

/** Rejects if `p` has not settled within `ms` (a guard against hangs, not a timing assertion). */
export function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => t = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)),
  ]).finally(() => clearTimeout(t));
}

/** `n` random bytes. */
export function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) crypto.getRandomValues(out.subarray(off, Math.min(n, off + 65536)));
  return out;
}
