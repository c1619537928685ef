/**
 * The switchover hook: a user command told about a capsule's move (JSON on stdin) so it
 * can update DNS or a load balancer. It runs while the guest is stopped, so it gets a
 * short timeout; a failing hook is logged and does not stop the migration (the grace
 * forwarding keeps the old address working).
 */
import type { Logger } from "../log.ts";

/** What the hook is told. */
export interface MoveNotice {
  event: "switchover";
  migrationId: string;
  capsule: { id: string; name: string; ip: string };
  from: { node: string };
  to: { node: string; address: string; ports: { guestPort: number; hostPort: number; protocol: string }[] };
}

/** Runs `argv` with `notice` on stdin; resolves with how it went (never rejects). */
export async function runHook(argv: string[], notice: MoveNotice, timeoutMs: number, log: Logger): Promise<string> {
  if (argv.length === 0) return "no hook";
  const t0 = performance.now();
  try {
    const child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(timeoutMs),
    }).spawn();
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(JSON.stringify(notice) + "\n")).catch(() => {});
    await w.close().catch(() => {});
    const out = await child.output();
    const ms = Math.round(performance.now() - t0);
    const stderr = new TextDecoder().decode(out.stderr).trim().slice(0, 500);
    if (out.success) {
      log.info("switchover hook ran", { migration: notice.migrationId, ms });
      return `hook ok in ${ms} ms`;
    }
    log.warn("switchover hook failed", { migration: notice.migrationId, code: out.code, signal: out.signal, stderr });
    return `hook failed (code ${out.code}${out.signal ? `, ${out.signal}` : ""}) in ${ms} ms`;
  } catch (err) {
    log.warn("switchover hook could not run", { migration: notice.migrationId, error: err });
    return `hook could not run: ${(err as Error).message}`;
  }
}
