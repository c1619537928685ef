/**
 * Failpoints for fault-injection tests (the etcd/gofail idea): named places in the
 * migration where a test can make the agent wait, so it can kill a process or cut a link
 * exactly there. Set with FLEXCAPD_FAILPOINTS="name=sleep(ms),name=sleep(ms)"; unset in
 * production, where every failpoint is a no-op.
 */

const SPEC = /^([a-z-]+)=sleep\((\d{1,6})\)$/;

/** Parses the env value; throws on a malformed entry so a test typo is loud. */
export function parseFailpoints(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const part of text.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
    const m = SPEC.exec(part);
    if (!m) throw new Error(`FLEXCAPD_FAILPOINTS: bad entry "${part}", expected name=sleep(ms)`);
    out.set(m[1], Number(m[2]));
  }
  return out;
}

const active = parseFailpoints(Deno.env.get("FLEXCAPD_FAILPOINTS") ?? "");

/** The failpoints set for this process (for the start-up log). */
export function activeFailpoints(): string[] {
  return [...active.keys()];
}

/** Waits if a test armed failpoint `name`. */
export async function failpoint(name: string): Promise<void> {
  const ms = active.get(name);
  if (ms !== undefined) await new Promise((r) => setTimeout(r, ms));
}
