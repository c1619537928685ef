/**
 * Output helpers for the CLI: aligned tables for people, JSON for scripts.
 */

/** Renders rows as a left-aligned table with a header. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** JSON with enum numbers kept and Dates as ISO strings. */
export function json(value: unknown): string {
  return JSON.stringify(value, (_k, v) => (v instanceof Uint8Array ? new TextDecoder().decode(v) : v), 2);
}

/** "12.3 MiB" style sizes. */
export function mib(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** Strips a proto enum prefix: CAPSULE_STATE_RUNNING → running. */
export function enumName(all: Record<string, unknown>, value: number, prefix: string): string {
  const name = Object.entries(all).find(([, v]) => v === value)?.[0] ?? String(value);
  return name.replace(prefix, "").toLowerCase();
}
