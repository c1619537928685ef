/**
 * How a migration drives QEMU, decided from the QEMU version and accelerator. Pure, so
 * the decisions are unit-tested.
 *
 * QEMU before 9.0 under TCG loses guest writes made after an intermediate dirty-bitmap
 * sync (upstream fix 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
 * memory access"); short downtime limits, busy guests and post-copy all corrupt guests
 * there (docs/research/migration-qemu72-tcg.md §4). On such a QEMU the agent migrates in
 * one guarded pass: with downtime-limit 0 QEMU never syncs the dirty bitmap while the
 * guest runs (its pending check only syncs when the unsent rest is below the threshold,
 * bandwidth × 0); it sends every page once, stops the guest when the pass is done, and
 * sends what the guest dirtied meanwhile after the final sync, with the guest stopped.
 * At pre-switchover the agent continues only if the setup sync is still the only one.
 * Everywhere else: ordinary iterative pre-copy with the caller's downtime limit.
 */
import { FailedPreconditionError } from "../errors.ts";
import type { MigrationOptions as WireMigrationOptions } from "../gen/flexcap/v1/migration.ts";
import type { MigrationOptions } from "./types.ts";

export type MigrationMode = "single-pass" | "iterative";

/** Defaults for zero-valued MigrationOptions fields. */
export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
export const DEFAULT_TIMEOUT_MS = 120_000;
/** What "no bandwidth cap" means to QEMU (its default cap is 128 MiB/s). */
export const UNCAPPED_BANDWIDTH = 10 * 1024 * 1024 * 1024;
/** The downtime limit that makes QEMU send one pass and switch over without a sync in between. */
export const SINGLE_PASS_DOWNTIME_LIMIT_MS = 0;
/** dirty-sync-count at pre-switchover after one pass: the setup sync only. */
export const SINGLE_PASS_SYNCS = 1;

/** Parses "QEMU emulator version 7.2.22 (…)" → [7, 2]; undefined if it is not there. */
export function parseQemuVersion(text: string): [number, number] | undefined {
  const m = /version (\d+)\.(\d+)/.exec(text);
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

/** The mode for this QEMU and accelerator, and why. */
export function chooseMode(qemuVersion: string, accelerator: "kvm" | "tcg"): { mode: MigrationMode; why: string } {
  if (accelerator === "kvm") return { mode: "iterative", why: "kvm logs dirty pages itself" };
  const v = parseQemuVersion(qemuVersion);
  if (!v) return { mode: "single-pass", why: `unknown QEMU version "${qemuVersion}" under tcg: assume the bug` };
  if (v[0] >= 9) return { mode: "iterative", why: `QEMU ${v.join(".")} has the TCG dirty-bitmap fix` };
  return { mode: "single-pass", why: `QEMU ${v.join(".")} under tcg loses writes after an intermediate dirty sync` };
}

/** Options with zero values replaced by defaults; refuses what the mode cannot do safely. */
export function resolveOptions(
  wire: Partial<WireMigrationOptions> | undefined,
  mode: MigrationMode,
  defaultGraceMs: number,
): MigrationOptions {
  const o = wire ?? {};
  if (o.allowPostcopy && mode === "single-pass") {
    throw new FailedPreconditionError(
      "options.allow_postcopy: post-copy corrupts guests on this QEMU under tcg (fixed in QEMU 9.0, commit 03bfc2188f)",
    );
  }
  return {
    maxBandwidthBytesS: o.maxBandwidthMibS ? o.maxBandwidthMibS * 1024 * 1024 : UNCAPPED_BANDWIDTH,
    downtimeLimitMs: o.downtimeLimitMs || DEFAULT_DOWNTIME_LIMIT_MS,
    autoConverge: o.autoConverge ?? false,
    allowPostcopy: o.allowPostcopy ?? false,
    timeoutMs: o.timeoutMs || DEFAULT_TIMEOUT_MS,
    gracePeriodMs: o.gracePeriodMs || defaultGraceMs,
  };
}

/** QMP capabilities for both ends (the target ignores the source-only ones). */
export function capabilities(mode: MigrationMode, opts: MigrationOptions): Record<string, boolean> {
  return {
    // The target acknowledges over the same connection, so failures there reach the source.
    "return-path": true,
    // MIGRATION events: the agent learns of pre-switchover at once instead of at its next poll.
    events: true,
    // The guest stops, then QEMU waits for us: the moment to check the pass and move the network.
    "pause-before-switchover": true,
    "auto-converge": mode === "iterative" && opts.autoConverge,
    "postcopy-ram": mode === "iterative" && opts.allowPostcopy,
  };
}

/** QMP migrate-set-parameters for the source. */
export function sourceParameters(mode: MigrationMode, opts: MigrationOptions): Record<string, number> {
  return {
    "max-bandwidth": opts.maxBandwidthBytesS,
    "downtime-limit": mode === "single-pass" ? SINGLE_PASS_DOWNTIME_LIMIT_MS : opts.downtimeLimitMs,
  };
}

/** What query-migrate says at pre-switchover, as the decision needs it. */
export interface SwitchoverStats {
  dirtySyncCount: number;
  /** Bytes not sent yet. */
  remaining: number;
  /** Throughput so far, bytes/s (0 if unknown). */
  bytesPerS: number;
}

/** Whether to continue at pre-switchover, with the stop we expect it to cost. */
export function switchoverDecision(
  mode: MigrationMode,
  s: SwitchoverStats,
): { go: true; expectedMs: number } | { go: false; expectedMs: number; reason: string } {
  const expectedMs = s.bytesPerS > 0 ? Math.round((s.remaining / s.bytesPerS) * 1000) : 0;
  if (mode === "single-pass" && s.dirtySyncCount !== SINGLE_PASS_SYNCS) {
    return {
      go: false,
      expectedMs,
      reason: `guest ran past an intermediate dirty sync (${s.dirtySyncCount} syncs, expected ` +
        `${SINGLE_PASS_SYNCS}); switching over could corrupt it on this QEMU`,
    };
  }
  return { go: true, expectedMs };
}
