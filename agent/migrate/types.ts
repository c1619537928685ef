/**
 * Plain domain types of live migration. The wire types live in agent/gen and are
 * converted in agent/api/convert.ts.
 */

/** Where a migration is (MigrationPhase on the wire). */
export type MigrationPhaseName =
  | "preparing"
  | "image"
  | "streaming"
  | "switchover"
  | "resuming"
  | "completed"
  | "failed"
  | "cancelled";

/** A progress report. */
export interface MigrationProgress {
  migrationId: string;
  targetPeer: string;
  phase: MigrationPhaseName;
  bytesSent: number;
  bytesRemaining: number;
  dirtyRateBytesS: number;
  round: number;
  expectedDowntimeMs: number;
  message: string;
}

/** Validated MigrationOptions with defaults applied. */
export interface MigrationOptions {
  /** Bytes per second handed to QEMU's max-bandwidth. */
  maxBandwidthBytesS: number;
  downtimeLimitMs: number;
  autoConverge: boolean;
  allowPostcopy: boolean;
  timeoutMs: number;
  gracePeriodMs: number;
}

/** How a completed migration went. */
export interface MigrationResult {
  migrationId: string;
  capsuleId: string;
  targetPeer: string;
  totalMs: number;
  setupMs: number;
  transferMs: number;
  downtimeMs: number;
  gapMs: number;
  bytes: number;
  rounds: number;
  mode: "single-pass" | "iterative";
  resumedAt: Date;
  targetPorts: { guestPort: number; hostPort: number; protocol: "tcp" | "udp" }[];
  targetAddress: string;
}
