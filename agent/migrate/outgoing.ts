/**
 * The source side of a live migration, and the one place that decides it. Phases, each
 * journaled in the capsule record before it starts:
 *
 *   preparing  check the peer, push the image if it lacks it, PrepareIncoming
 *   streaming  QEMU → unix socket → TLS → peer → its QEMU, the guest running here
 *   switchover the guest is stopped (pause-before-switchover): check the pass, move the
 *              host ports to forwarding, run the hook, migrate-continue
 *   then       CommitIncoming until the peer says the guest runs there, end our QEMU
 *
 * Before "switchover" any failure cancels the migration: QEMU resumes the guest here and
 * the peer drops its arrival. From "switchover" on only the peer can say where the guest
 * runs, so we ask it (settle()), also after a restart (recover()).
 */
import { join } from "node:path";
import type { CapsuleManager } from "../capsule/manager.ts";
import type { CapsuleRecord } from "../capsule/types.ts";
import type { EventBus } from "../capsule/events.ts";
import {
  AbortedError,
  DeadlineExceededError,
  FailedPreconditionError,
  FlexError,
  InvalidArgumentError,
  ResourceExhaustedError,
  UnavailableError,
} from "../errors.ts";
import { MigrationOptions as MigrationOptionsPb } from "../gen/flexcap/v1/migration.ts";
import { IncomingOutcome, type PeerInfo, type PeerServiceClient } from "../gen/flexcap/v1/peer.ts";
import { CapsuleSpec as PbSpec, Protocol as PbProtocol } from "../gen/flexcap/v1/capsule.ts";
import type { ImageStore } from "../image/store.ts";
import type { Logger } from "../log.ts";
import type { NetworkBackend } from "../net/network.ts";
import type { QemuVm } from "../vmm/vm.ts";
import {
  cancelMigration,
  continueSwitchover,
  type MigrateStats,
  queryMigrate,
  setCapabilities,
  setParameters,
} from "../vmm/migration.ts";
import { failpoint } from "./failpoints.ts";
import type { Forwards } from "./forwards.ts";
import { runHook } from "./hook.ts";
import { abortOn, checkImageOn, commitOn, prepareOn, pushImageTo } from "./peer_calls.ts";
import type { Peers } from "./peers.ts";
import {
  capabilities,
  type MigrationMode,
  parseQemuVersion,
  resolveOptions,
  sourceParameters,
  switchoverDecision,
} from "./policy.ts";
import { dialData, type RelayCounts, splice } from "./relay.ts";
import type { MigrationPhaseName, MigrationProgress, MigrationResult } from "./types.ts";

const POLL_MS = 5;
const PROGRESS_EVERY_MS = 250;
const QEMU_ACCEPT_MS = 10_000;
const COMMIT_WAIT_MS = 30_000;
const SETTLE_RETRY_MS = 2_000;
const ABORT_ATTEMPTS = 90;

/** What the source side is built from. */
export interface DeparturesDeps {
  manager: CapsuleManager;
  peers: Peers;
  images: ImageStore;
  net: NetworkBackend;
  forwards: Forwards;
  bus: EventBus;
  log: Logger;
  mode: MigrationMode;
  nodeName: string;
  accelerator: "kvm" | "tcg";
  cpuModel: string;
  qemuVersion: string;
  caPem: string;
  graceMs: number;
  hook: string[];
  hookTimeoutMs: number;
}

interface Active {
  id: string;
  capsuleId: string;
  phase: MigrationPhaseName;
  cancel: AbortController;
}

/** Outgoing migrations of this agent. */
export class Departures {
  #active = new Map<string, Active>();
  #log: Logger;

  constructor(private d: DeparturesDeps) {
    this.#log = d.log.with({ component: "migrate-out" });
  }

  /** Moves capsule `ref` to `peer`; `onProgress` sees every report. Throws with the capsule still here. */
  async migrate(
    ref: string,
    peer: string,
    wire: Parameters<typeof resolveOptions>[0],
    onProgress: (p: MigrationProgress) => void = () => {},
  ): Promise<MigrationResult> {
    const t0 = performance.now();
    const rec0 = this.d.manager.resolve(ref);
    if (peer === this.d.nodeName) throw new InvalidArgumentError("target_peer", "is this agent itself");
    const peerCfg = this.d.peers.list().find((p) => p.name === peer);
    if (!peerCfg) {
      throw new InvalidArgumentError("target_peer", `"${peer}" is not a configured peer (flexcap peers lists them)`);
    }
    const opts = resolveOptions(wire, this.d.mode, this.d.graceMs);
    if (this.#active.has(rec0.id)) throw new FailedPreconditionError(`capsule "${rec0.name}" is already migrating`);
    const client = this.d.peers.client(peer);
    this.#checkPeer(await this.d.peers.info(peer), rec0);

    const id = `m-${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
    const { rec, vm } = await this.d.manager.beginOutgoing(ref, { id, peer });
    const active: Active = { id, capsuleId: rec.id, phase: "preparing", cancel: new AbortController() };
    this.#active.set(rec.id, active);
    const log = this.#log.with({ migration: id, capsule: rec.id, to: peer });
    const report = this.#reporter(rec, active, peer, onProgress);
    log.info("migration started", { mode: this.d.mode, options: opts });
    const deadline = setTimeout(() =>
      active.cancel.abort(
        new DeadlineExceededError(
          `options.timeout_ms: migration did not finish within ${opts.timeoutMs} ms`,
        ),
      ), opts.timeoutMs);
    let relay: Promise<void> | undefined;
    const counts: RelayCounts = { forward: 0, back: 0 };
    let data: Deno.TlsConn | undefined;
    let stopAt: number | undefined;
    const offStop = vm.qmp.on("STOP", (e) => stopAt ??= e.timestampMs);
    try {
      report("preparing", `checking ${peer}`);
      const check = await checkImageOn(client, rec.imageId);
      if (!check.present) {
        report("image", `sending image (${check.missingBlobs.length || "all"} blobs)`);
        const img = await this.d.images.get(rec.imageId).catch(() => undefined);
        await pushImageTo(client, this.d.images, rec.imageId, img?.name ?? rec.spec.image, check.missingBlobs);
      }
      this.#throwIfCancelled(active);
      const prep = await prepareOn(client, {
        migrationId: id,
        capsule: {
          id: rec.id,
          name: rec.name,
          imageId: rec.imageId,
          spec: PbSpec.fromPartial({
            ...rec.spec,
            ports: rec.spec.ports.map((p) => ({ ...p, protocol: pbProtocol(p.protocol) })),
          }),
          ip: rec.net!.ip,
          prefix: rec.net!.prefix,
          mac: rec.net!.mac,
          hostPorts: rec.net!.hostPorts.map((p) => ({ ...p, protocol: pbProtocol(p.protocol) })),
          listening: (rec.listening ?? []).map((p) => ({ port: p.port, protocol: pbProtocol(p.protocol) })),
          paused: rec.migration!.resumeTo === "paused",
        },
        options: wire ? MigrationOptionsPb.fromPartial(wire) : undefined,
      });
      const setupMs = performance.now() - t0;
      this.#throwIfCancelled(active);

      await setCapabilities(vm.qmp, capabilities(this.d.mode, opts));
      await setParameters(vm.qmp, sourceParameters(this.d.mode, opts));
      data = await dialData(
        { hostname: peerHost(peerCfg.address), port: prep.dataPort },
        peer,
        this.d.caPem,
        id,
        prep.token,
      );
      const sock = join(this.d.manager.paths(rec.id).dir, "migrate.sock");
      await Deno.remove(sock).catch(() => {});
      const listener = Deno.listen({ transport: "unix", path: sock });
      await this.d.manager.setMigrationPhase(rec.id, "streaming");
      const tMigrate = Date.now();
      let qemuConn: Deno.Conn;
      try {
        await vm.qmp.execute("migrate", { uri: `unix:${sock}` });
        qemuConn = await withTimeout(listener.accept(), QEMU_ACCEPT_MS, "qemu did not connect to the migration socket");
      } finally {
        listener.close();
        await Deno.remove(sock).catch(() => {});
      }
      relay = splice(qemuConn, data, counts);
      relay.catch(() => {}); // failures surface through QEMU's status
      report("streaming", "memory streaming");

      const stats = await this.#stream(vm, active, report);
      const decision = switchoverDecision(this.d.mode, {
        dirtySyncCount: stats.dirtySyncCount,
        remaining: stats.remaining,
        bytesPerS: stats.bytesPerS,
      });
      if (!decision.go) throw new AbortedError(decision.reason);
      await failpoint("source-pre-switchover");
      this.#throwIfCancelled(active);

      // The guest is stopped from here on: journal, continue, and move the network while the last
      // pages travel (the stop lasts until the target resumes; none of this work adds to it).
      active.phase = "switchover";
      const exposed = await this.d.manager.withdrawForSwitchover(rec.id); // journals "switchover"
      await failpoint("source-before-continue");
      await continueSwitchover(vm.qmp);
      const targetPorts = prep.hostPorts;
      const handover = this.d.forwards.add(exposed.flatMap((p) => {
        const to = targetPorts.find((t) => t.guestPort === p.guestPort && protoName(t.protocol) === p.protocol);
        return to
          ? [{
            migrationId: id,
            capsuleId: rec.id,
            hostPort: p.hostPort,
            protocol: p.protocol,
            toAddress: peerHost(peerCfg.address),
            toPort: to.hostPort,
            capsuleIp: rec.net!.ip,
            until: Date.now() + opts.gracePeriodMs,
          }]
          : [];
      })).then(() => this.d.net.sync());
      const [, hookNote] = await Promise.all([
        handover,
        runHook(
          this.d.hook,
          {
            event: "switchover",
            migrationId: id,
            capsule: { id: rec.id, name: rec.name, ip: rec.net!.ip },
            from: { node: this.d.nodeName },
            to: {
              node: peer,
              address: peerHost(peerCfg.address),
              ports: targetPorts.map((p) => ({ ...p, protocol: protoName(p.protocol) })),
            },
          },
          this.d.hookTimeoutMs,
          log,
        ),
      ]);
      report("switchover", `guest stopped; host ports forwarded to ${peer}; ${hookNote}`);
      const done = await this.#waitSource(vm);
      report("resuming", "waiting for the target to run the guest");
      await failpoint("source-before-commit");
      const commit = await this.#settle(rec, client, log);
      if (commit.outcome !== "running") throw new AbortedError(`the target dropped the capsule: ${commit.message}`);
      const resumedAt = commit.resumedAt ?? new Date();
      const result: MigrationResult = {
        migrationId: id,
        capsuleId: rec.id,
        targetPeer: peer,
        totalMs: Math.round(performance.now() - t0),
        setupMs: Math.round(setupMs),
        transferMs: Math.max(0, resumedAt.getTime() - tMigrate),
        downtimeMs: done.downtimeMs,
        gapMs: stopAt !== undefined ? Math.max(0, resumedAt.getTime() - stopAt) : done.downtimeMs,
        bytes: done.transferred || counts.forward,
        rounds: done.dirtySyncCount,
        mode: this.d.mode,
        resumedAt,
        targetPorts: targetPorts.map((p) => ({ ...p, protocol: protoName(p.protocol) })),
        targetAddress: peerHost(peerCfg.address),
      };
      report("completed", `runs on ${peer}: ${result.totalMs} ms total, ${result.gapMs} ms stopped`);
      log.info("migration completed", { ...result, relayBytes: counts.forward, returnBytes: counts.back });
      return result;
    } catch (err) {
      const why = active.cancel.signal.aborted && active.cancel.signal.reason instanceof Error
        ? active.cancel.signal.reason
        : err as Error;
      await this.#fail(rec, vm, active, client, why, log, report);
      throw why instanceof FlexError ? why : new UnavailableError(`migration failed: ${why.message}`, { cause: why });
    } finally {
      clearTimeout(deadline);
      offStop();
      this.#active.delete(rec.id);
      if (relay) await Promise.race([relay.catch(() => {}), new Promise((r) => setTimeout(r, 1_000))]);
      try {
        data?.close();
      } catch { /* closed */ }
    }
  }

  /** Cancels the migration of `ref` if it has not reached switchover; returns its id. */
  cancel(ref: string): string {
    const rec = this.d.manager.resolve(ref);
    const a = this.#active.get(rec.id);
    if (!a) throw new FailedPreconditionError(`capsule "${rec.name}" is not migrating from this agent`);
    if (a.phase === "switchover" || a.phase === "resuming") {
      throw new FailedPreconditionError(`migration ${a.id} is past its switchover; it can no longer be cancelled`);
    }
    a.cancel.abort(new AbortedError(`migration ${a.id} cancelled on request`));
    return a.id;
  }

  /** After a restart: settles every capsule left "migrating" by the previous run, in the background. */
  recover(): void {
    for (const rec of this.d.manager.list()) {
      if (rec.state !== "migrating" && !(rec.migration?.role === "source")) continue;
      const log = this.#log.with({ migration: rec.migration?.id, capsule: rec.id });
      void this.#recoverOne(rec, log).catch((err) => log.error("could not settle migration", { error: err }));
    }
  }

  async #recoverOne(rec: CapsuleRecord, log: Logger): Promise<void> {
    const mark = rec.migration!;
    const vm = this.d.manager.vmOf(rec.id);
    let client: PeerServiceClient | undefined;
    try {
      client = this.d.peers.client(mark.peer);
    } catch {
      client = undefined;
    }
    if (mark.phase !== "switchover") {
      // migrate-continue was never sent: the target cannot have run the guest.
      if (vm) await this.#resumeHere(vm, log);
      if (client) void this.#abortTarget(client, mark.id, "source restarted before switchover", log);
      await this.d.manager.endOutgoing(rec.id, "migration interrupted by an agent restart; capsule kept here");
      log.info("interrupted migration rolled back", { phase: mark.phase });
      return;
    }
    if (!client) throw new FailedPreconditionError(`peer ${mark.peer} is no longer configured; cannot settle`);
    const { outcome } = await this.#settle(rec, client, log);
    if (outcome === "running") {
      log.info("migration settled after restart: capsule runs on the target");
    } else {
      if (vm) await this.#resumeHere(vm, log);
      await this.d.forwards.remove(mark.id);
      await this.d.manager.endOutgoing(rec.id, `migration failed (target: ${outcome}); capsule kept here`);
      log.info("migration settled after restart: capsule kept here", { target: outcome });
    }
  }

  // Polls the source until pre-switchover (or completion), reporting progress.
  async #stream(vm: QemuVm, a: Active, report: Reporter): Promise<MigrateStats> {
    let last = 0;
    // QEMU's MIGRATION event wakes us the moment the guest stops; polling only paces progress reports.
    let wake: (() => void) | undefined;
    const off = vm.qmp.on("MIGRATION", () => wake?.());
    try {
      for (;;) {
        this.#throwIfCancelled(a);
        const s = await queryMigrate(vm.qmp);
        if (s.status === "pre-switchover" || s.status === "device" || s.status === "completed") return s;
        if (s.status === "failed" || s.status === "cancelled") {
          throw new UnavailableError(`qemu migration ${s.status}: ${s.errorDesc ?? "no detail"}`);
        }
        if (Date.now() - last >= PROGRESS_EVERY_MS) {
          last = Date.now();
          report("streaming", `${s.status}`, s);
        }
        await new Promise<void>((r) => {
          const t = setTimeout(r, PROGRESS_EVERY_MS);
          wake = () => (clearTimeout(t), r());
        });
        wake = undefined;
      }
    } finally {
      off();
    }
  }

  // After migrate-continue: the source's last pages go out and QEMU completes (guest stays stopped).
  async #waitSource(vm: QemuVm): Promise<MigrateStats> {
    for (;;) {
      const s = await queryMigrate(vm.qmp).catch(() => undefined);
      if (!s) throw new UnavailableError("source qemu went away after switchover");
      if (s.status === "completed") return s;
      if (s.status === "failed" || s.status === "cancelled") {
        // The target may still have everything it needs; settle() asks it.
        return s;
      }
      await sleep(POLL_MS);
    }
  }

  // Asks the target where the guest runs until it knows (never guesses: a wrong guess runs it twice).
  // On RUNNING it also releases the capsule here.
  async #settle(
    rec: CapsuleRecord,
    client: PeerServiceClient,
    log: Logger,
  ): Promise<{ outcome: "running" | "aborted"; message: string; resumedAt?: Date }> {
    const id = rec.migration!.id;
    for (let attempt = 1;; attempt++) {
      try {
        const r = await commitOn(client, { migrationId: id, waitMs: COMMIT_WAIT_MS, released: false });
        if (r.outcome === IncomingOutcome.INCOMING_OUTCOME_RUNNING) {
          await failpoint("source-before-release");
          await this.d.manager.releaseOutgoing(rec.id, `migrated to ${rec.migration!.peer}`);
          void commitOn(client, { migrationId: id, waitMs: 0, released: true }).catch((err) =>
            log.warn("could not tell the target it owns the capsule; it will be asked again", { error: err })
          );
          return { outcome: "running", message: r.message, resumedAt: r.resumedAt };
        }
        if (r.outcome === IncomingOutcome.INCOMING_OUTCOME_ABORTED) {
          log.warn("target dropped the capsule after switchover", { why: r.message });
          return { outcome: "aborted", message: r.message };
        }
        log.info("target still loading", { attempt });
      } catch (err) {
        log.warn("cannot reach the target to settle the migration; retrying", {
          attempt,
          error: (err as Error).message,
        });
        await sleep(SETTLE_RETRY_MS);
      }
    }
  }

  // Any failure: before switchover roll back here; after it, only the target can say.
  async #fail(
    rec: CapsuleRecord,
    vm: QemuVm,
    a: Active,
    client: PeerServiceClient,
    err: Error,
    log: Logger,
    report: Reporter,
  ): Promise<void> {
    const cancelled = err instanceof AbortedError && /cancelled on request/.test(err.message);
    log.warn("migration failed", { phase: a.phase, error: err.message });
    if (a.phase === "switchover" || a.phase === "resuming") {
      if (!this.d.manager.list().some((r) => r.id === rec.id)) return; // already released
      const { outcome } = await this.#settle(rec, client, log);
      if (outcome === "running") return; // it moved after all; released in settle()
    } else {
      await cancelMigration(vm.qmp).catch(() => {});
      void this.#abortTarget(client, a.id, err.message, log);
    }
    await this.#resumeHere(vm, log);
    await this.d.forwards.remove(a.id);
    await this.d.manager.endOutgoing(
      rec.id,
      `${cancelled ? "migration cancelled" : "migration failed"}: ${err.message}`,
    );
    report(cancelled ? "cancelled" : "failed", err.message);
  }

  // Tells the target to drop its arrival, retrying for a while (a cut link heals, a restarted peer returns).
  async #abortTarget(client: PeerServiceClient, id: string, why: string, log: Logger): Promise<void> {
    for (let attempt = 1; attempt <= ABORT_ATTEMPTS; attempt++) {
      try {
        await abortOn(client, id, why);
        return;
      } catch (err) {
        if (attempt === 1) log.warn("could not tell the target to drop its arrival; retrying", { error: err });
        await sleep(SETTLE_RETRY_MS);
      }
    }
    log.error("gave up telling the target to drop its arrival; it drops it when its stream times out", { id });
  }

  // Waits for QEMU to leave migration and makes the guest run (unless it was paused before).
  async #resumeHere(vm: QemuVm, log: Logger): Promise<void> {
    for (let i = 0; i < 400; i++) {
      const s = await queryMigrate(vm.qmp).catch(() => undefined);
      if (!s) return; // QEMU gone: the record settles to stopped
      if (!["active", "setup", "pre-switchover", "device", "cancelling"].includes(s.status)) break;
      if (s.status === "pre-switchover") await cancelMigration(vm.qmp).catch(() => {});
      await sleep(POLL_MS);
    }
    const rec = this.d.manager.list().find((r) => this.d.manager.vmOf(r.id) === vm);
    const status = await vm.status().catch(() => "gone");
    if (rec?.migration?.resumeTo === "running" && status !== "running" && status !== "gone") {
      await vm.resume().catch((err) => log.error("could not resume the guest here", { error: err }));
    }
  }

  #checkPeer(info: PeerInfo, rec: CapsuleRecord): void {
    const mine = parseQemuVersion(this.d.qemuVersion)?.join(".");
    const theirs = parseQemuVersion(info.qemuVersion)?.join(".");
    const diff = info.accelerator !== this.d.accelerator
      ? `accelerator ${info.accelerator}, this agent ${this.d.accelerator}`
      : info.cpuModel !== this.d.cpuModel
      ? `cpu model ${info.cpuModel}, this agent ${this.d.cpuModel}`
      : mine !== theirs
      ? `QEMU ${theirs}, this agent ${mine}`
      : "";
    if (diff) throw new FailedPreconditionError(`target_peer: ${info.name} cannot take this capsule (${diff})`);
    if (info.memoryFreeMib < rec.spec.memoryMib) {
      throw new ResourceExhaustedError(
        `target_peer: ${info.name} has ${info.memoryFreeMib} MiB free, capsule "${rec.name}" needs ${rec.spec.memoryMib}`,
      );
    }
  }

  #throwIfCancelled(a: Active): void {
    if (a.cancel.signal.aborted) throw a.cancel.signal.reason;
  }

  #reporter(rec: CapsuleRecord, a: Active, peer: string, sink: (p: MigrationProgress) => void): Reporter {
    return (phase, message, s) => {
      if (phase !== "failed" && phase !== "cancelled" && phase !== "completed") a.phase = phase;
      const p: MigrationProgress = {
        migrationId: a.id,
        targetPeer: peer,
        phase,
        bytesSent: s?.transferred ?? 0,
        bytesRemaining: s?.remaining ?? 0,
        dirtyRateBytesS: (s?.dirtyPagesRate ?? 0) * (s?.pageSize ?? 4096),
        round: s?.dirtySyncCount ?? 0,
        expectedDowntimeMs: s?.expectedDowntimeMs ?? 0,
        message,
      };
      try {
        sink(p);
      } catch { /* a gone caller must not break the migration */ }
      this.d.bus.publish({
        type: "migration",
        capsuleId: rec.id,
        capsuleName: rec.name,
        state: rec.state,
        message: `migration ${a.id} to ${peer}: ${phase}: ${message}`,
        migration: p,
      });
    };
  }
}

type Reporter = (phase: MigrationPhaseName, message: string, s?: MigrateStats) => void;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, rej) => t = setTimeout(() => rej(new UnavailableError(what)), ms)),
    ]);
  } finally {
    clearTimeout(t);
  }
}

/** The host part of a peer's "host:port" address. */
export function peerHost(address: string): string {
  return address.slice(0, address.lastIndexOf(":"));
}

function pbProtocol(p: "tcp" | "udp"): PbProtocol {
  return p === "udp" ? PbProtocol.PROTOCOL_UDP : PbProtocol.PROTOCOL_TCP;
}

function protoName(p: PbProtocol | "tcp" | "udp"): "tcp" | "udp" {
  return p === PbProtocol.PROTOCOL_UDP || p === "udp" ? "udp" : "tcp";
}
