/**
 * QEMU's migration commands as the agent uses them for live migration: capabilities,
 * parameters, the stats of query-migrate, continue and cancel. Knows nothing about peers.
 */
import type { QmpClient } from "./qmp.ts";

/** The parts of query-migrate the agent reads. */
export interface MigrateStats {
  /** "setup", "active", "pre-switchover", "device", "completed", "failed", "cancelled"… ("none" before any). */
  status: string;
  totalTimeMs: number;
  downtimeMs: number;
  expectedDowntimeMs: number;
  transferred: number;
  remaining: number;
  dirtyPagesRate: number;
  pageSize: number;
  dirtySyncCount: number;
  /** Throughput QEMU measured, bytes/s. */
  bytesPerS: number;
  errorDesc?: string;
}

interface RawMigrate {
  status?: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "error-desc"?: string;
  ram?: {
    transferred?: number;
    remaining?: number;
    "dirty-pages-rate"?: number;
    "page-size"?: number;
    "dirty-sync-count"?: number;
    mbps?: number;
  };
}

/** Converts a raw query-migrate answer. */
export function parseMigrate(r: RawMigrate): MigrateStats {
  return {
    status: r.status ?? "none",
    totalTimeMs: r["total-time"] ?? 0,
    downtimeMs: r.downtime ?? 0,
    expectedDowntimeMs: r["expected-downtime"] ?? 0,
    transferred: r.ram?.transferred ?? 0,
    remaining: r.ram?.remaining ?? 0,
    dirtyPagesRate: r.ram?.["dirty-pages-rate"] ?? 0,
    pageSize: r.ram?.["page-size"] ?? 4096,
    dirtySyncCount: r.ram?.["dirty-sync-count"] ?? 0,
    bytesPerS: ((r.ram?.mbps ?? 0) * 1e6) / 8,
    errorDesc: r["error-desc"],
  };
}

/** query-migrate. QEMU 7.2 sometimes answers `completed` with zeroed stats once; ask again then. */
export async function queryMigrate(qmp: QmpClient): Promise<MigrateStats> {
  let s = parseMigrate(await qmp.execute<RawMigrate>("query-migrate"));
  if (s.status === "completed" && s.totalTimeMs === 0 && s.transferred === 0) {
    s = parseMigrate(await qmp.execute<RawMigrate>("query-migrate"));
  }
  return s;
}

/** Sets migration capabilities. */
export async function setCapabilities(qmp: QmpClient, caps: Record<string, boolean>): Promise<void> {
  await qmp.execute("migrate-set-capabilities", {
    capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
  });
}

/** Sets migration parameters. */
export async function setParameters(qmp: QmpClient, params: Record<string, number>): Promise<void> {
  await qmp.execute("migrate-set-parameters", params);
}

/** Lets a migration paused at pre-switchover finish. */
export async function continueSwitchover(qmp: QmpClient): Promise<void> {
  await qmp.execute("migrate-continue", { state: "pre-switchover" });
}

/** Cancels the outgoing migration; QEMU resumes the guest if it was running before. */
export async function cancelMigration(qmp: QmpClient): Promise<void> {
  await qmp.execute("migrate_cancel");
}

/** Has the guest announce its MAC (gratuitous ARP/RARP) so switches learn where it is now. */
export async function announceSelf(qmp: QmpClient): Promise<void> {
  await qmp.execute("announce-self", { initial: 50, max: 550, rounds: 3, step: 100 });
}
