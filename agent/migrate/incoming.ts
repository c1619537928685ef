/**
 * The target side of a live migration. PrepareIncoming admits the capsule (record, tap,
 * staged exposure, a QEMU waiting with `-incoming defer`) and expects one data connection;
 * the guest resumes by itself once the stream is in; CommitIncoming tells the source where
 * the guest runs; AbortIncoming drops an arrival that has not run here.
 *
 * The rule that keeps a capsule in one place: an arrival whose guest has run here is never
 * dropped on the source's word, and the source never resumes its copy unless this side
 * says ABORTED (dropped before it ran, or its QEMU died before the source let go).
 */
import { join } from "node:path";
import type { CapsuleManager } from "../capsule/manager.ts";
import type { ArrivingCapsule, PortMapping } from "../capsule/types.ts";
import { FailedPreconditionError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { announceSelf, queryMigrate, setCapabilities } from "../vmm/migration.ts";
import { failpoint } from "./failpoints.ts";
import type { OutcomeStore } from "./outcomes.ts";
import { capabilities, type MigrationMode } from "./policy.ts";
import { type DataListener, newToken } from "./relay.ts";
import type { MigrationOptions } from "./types.ts";

/** How long a prepared arrival waits for its data connection before it is dropped. */
const STREAM_WAIT_MS = 30_000;
/** How long after RESUME the guest's OS channel may take to reconnect before we call it running anyway. */
const GUEST_RECONNECT_MS = 3_000;

/** A validated PrepareIncoming. */
export interface Arrival {
  migrationId: string;
  capsule: ArrivingCapsule;
  options: MigrationOptions;
}

/** What CommitIncoming answers. */
export interface IncomingState {
  outcome: "pending" | "running" | "aborted";
  resumedAt?: Date;
  message: string;
}

/** Arrivals on this agent. */
export class Arrivals {
  #resumedAt = new Map<string, Date>();
  #log: Logger;

  constructor(
    private m: CapsuleManager,
    private data: DataListener,
    private outcomes: OutcomeStore,
    private mode: MigrationMode,
    log: Logger,
  ) {
    this.#log = log.with({ component: "migrate-in" });
  }

  /** PrepareIncoming: admits the capsule and expects its stream; returns the token and data port. */
  async prepare(
    a: Arrival,
    peer: string,
  ): Promise<{ token: string; dataPort: number; hostPorts: PortMapping[] }> {
    const log = this.#log.with({ migration: a.migrationId, capsule: a.capsule.id, from: peer });
    const { rec, vm } = await this.m.admitIncoming(a.capsule, { id: a.migrationId, peer });
    const fail = async (why: string) => {
      await this.m.abortIncoming(rec.id, why);
    };
    try {
      await setCapabilities(vm.qmp, capabilities(this.mode, a.options));
      const sock = join(this.m.paths(rec.id).dir, "incoming.sock");
      await Deno.remove(sock).catch(() => {});
      vm.qmp.on("RESUME", (e) => {
        if (!this.#resumedAt.has(a.migrationId)) this.#resumedAt.set(a.migrationId, new Date(e.timestampMs));
      });
      await vm.qmp.execute("migrate-incoming", { uri: `unix:${sock}` });
      const token = newToken();
      const withdraw = this.data.expect(a.migrationId, {
        token,
        qemuSocket: sock,
        onStream: (done) => {
          clearTimeout(timer);
          done.then(
            (c) => log.info("migration stream ended", { bytesIn: c.forward, bytesBack: c.back }),
            (err) => log.warn("migration stream broke", { error: (err as Error).message }),
          );
          void this.#watch(rec.id, a.migrationId, log);
        },
      });
      const timer = setTimeout(() => {
        withdraw();
        void fail(`no migration stream within ${STREAM_WAIT_MS} ms`);
      }, STREAM_WAIT_MS);
      log.info("ready for the migration stream", { ip: rec.net?.ip, hostPorts: rec.net?.hostPorts });
      return { token, dataPort: this.data.port, hostPorts: rec.net!.hostPorts };
    } catch (err) {
      await fail(`prepare failed: ${(err as Error).message}`);
      throw err;
    }
  }

  /** CommitIncoming: where the guest runs, waiting up to `waitMs` while it is still loading. */
  async commit(migrationId: string, waitMs: number, released: boolean): Promise<IncomingState> {
    const deadline = Date.now() + waitMs;
    for (;;) {
      const rec = this.m.list().find((r) => r.migration?.id === migrationId);
      if (rec && rec.migration!.phase === "running") {
        if (released) {
          await this.outcomes.put({
            id: migrationId,
            capsuleId: rec.id,
            outcome: "released",
            message: "source released",
          });
          await this.m.releaseIncoming(rec.id);
          this.#log.info("source released the capsule; it is ours", { migration: migrationId, capsule: rec.id });
        }
        return { outcome: "running", resumedAt: this.#resumedAt.get(migrationId), message: "running here" };
      }
      if (!rec) {
        const o = await this.outcomes.get(migrationId);
        if (o?.outcome === "released") return { outcome: "running", message: "released to this agent" };
        return { outcome: "aborted", message: o?.message ?? "this agent has no such migration" };
      }
      if (Date.now() >= deadline) return { outcome: "pending", message: `capsule is ${rec.state}` };
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** AbortIncoming: drops the arrival unless its guest has run here. */
  async abort(migrationId: string, reason: string): Promise<IncomingState> {
    const rec = this.m.list().find((r) => r.migration?.id === migrationId);
    if (!rec) return await this.commit(migrationId, 0, false);
    if (!await this.m.abortIncoming(rec.id, `aborted by the source: ${reason}`)) {
      throw new FailedPreconditionError(
        `migration ${migrationId}: the capsule already runs here; it cannot be aborted`,
      );
    }
    return { outcome: "aborted", message: reason };
  }

  /** Journals a dropped arrival (the manager's onArrivalDropped). */
  async dropped(migrationId: string, capsuleId: string, why: string): Promise<void> {
    await this.outcomes.put({ id: migrationId, capsuleId, outcome: "aborted", message: why });
  }

  // Follows the incoming QEMU until the guest runs here; its death is handled by the manager.
  async #watch(capsuleId: string, migrationId: string, log: Logger): Promise<void> {
    const vm = this.m.vmOf(capsuleId);
    if (!vm) return;
    for (;;) {
      const s = await queryMigrate(vm.qmp).catch(() => undefined);
      if (!s || s.status === "failed" || s.status === "cancelled") return; // QEMU exits; the manager drops it
      if (s.status === "completed") break;
      await new Promise((r) => setTimeout(r, 5));
    }
    await failpoint("target-after-load");
    const connected = await this.m.guestConnected(capsuleId, GUEST_RECONNECT_MS);
    if (!connected) {
      log.warn("guest os channel did not reconnect after the migration", { waitedMs: GUEST_RECONNECT_MS });
    }
    await this.m.completeIncoming(capsuleId);
    await announceSelf(vm.qmp).catch((err) => log.warn("announce-self failed", { error: err }));
    log.info("capsule runs here", { resumedAt: this.#resumedAt.get(migrationId)?.toISOString() });
  }
}
