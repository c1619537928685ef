/**
 * CapsuleManager: the capsule lifecycle. Every operation takes the capsule's lock,
 * checks the state machine, does the work through vmm/ and osserver/, persists the new
 * record atomically and publishes an event. gRPC handlers call these methods and nothing
 * else; this file knows nothing about protobuf on the wire.
 */
import type { Config } from "../config/schema.ts";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  UnavailableError,
} from "../errors.ts";
import type { ImageStore } from "../image/store.ts";
import type { ImageManifest } from "../image/manifest.ts";
import type { Logger } from "../log.ts";
import type { LaunchNet, NetworkBackend } from "../net/network.ts";
import { portKey } from "../net/ports.ts";
import { diffPorts, type GuestLog, type GuestPort } from "../osserver/guest_messages.ts";
import { atomicWrite } from "../state/atomic.ts";
import type { AccelChoice } from "../vmm/accel.ts";
import type { QemuMemory } from "../vmm/process.ts";
import { QemuVm } from "../vmm/vm.ts";
import { checkFits, type MemoryBudget } from "./capacity.ts";
import { AppLogWriter, type LogChunk, readAppLog } from "./app_log.ts";
import { findKernelPanic, streamConsole } from "./console.ts";
import { GuestLink } from "./guest_link.ts";
import type { CapsuleEvent, EventBus } from "./events.ts";
import { encodeLaunchConfig, type LaunchHost, qemuSpec } from "./launch.ts";
import { KeyedMutex } from "./lock.ts";
import { assertTransition, type CapsuleStateName, QEMU_STATES, requireState } from "./states.ts";
import type { CapsuleStore } from "./store.ts";
import type { ArrivingCapsule, CapsuleRecord, CapsuleSpec, MigrationMark, PortMapping } from "./types.ts";

/** A capsule plus live figures, as returned to callers. */
export interface CapsuleView {
  record: CapsuleRecord;
  memory?: QemuMemory;
}

/** Everything the manager is built from. */
export interface ManagerDeps {
  config: Config;
  log: Logger;
  store: CapsuleStore;
  images: ImageStore;
  bus: EventBus;
  accel: AccelChoice;
  budget: MemoryBudget;
  /** The instance network: addresses, taps, host ports and rules. */
  net: NetworkBackend;
  /** Told when an arriving capsule is dropped (aborted, or its QEMU died before the source let go). */
  onArrivalDropped?(rec: CapsuleRecord, why: string): Promise<void>;
  /** Resolves an image's kernel, initrd, root disk and host kernel arguments. */
  bootFiles(
    image: ImageManifest,
  ): Promise<{ kernelPath: string; initrdPath: string; rootfsPath?: string; hostCmdline: string }>;
}

const SAVE_TIMEOUT_MS = 120_000;
const RESTORE_TIMEOUT_MS = 120_000;
const KILL_WAIT_MS = 5_000;
const RECONNECT_BEFORE_RESUME_MS = 2_000;
const CREATE_LOCK = "#create";

/** Owns all capsules of this agent. */
export class CapsuleManager {
  #records = new Map<string, CapsuleRecord>();
  #vms = new Map<string, QemuVm>();
  #links = new Map<string, GuestLink>();
  #appLogs = new Map<string, AppLogWriter>();
  #exitCodes = new Map<string, number>();
  /** Listens already reported as refused, per capsule ("port/proto"), so each is reported once. */
  #refused = new Map<string, Set<string>>();
  #lock = new KeyedMutex();
  #log: Logger;

  constructor(private deps: ManagerDeps) {
    this.#log = deps.log.with({ component: "capsule" });
  }

  /** Loads records and re-adopts or settles every capsule (see reconcile()). */
  async open(): Promise<void> {
    for (const rec of await this.deps.store.loadAll()) this.#records.set(rec.id, rec);
    // Taps and rules first, from the persisted exposures: capsules stay reachable while we re-adopt.
    await this.deps.net.open(this.list());
    for (const rec of [...this.#records.values()]) {
      await this.#lock.run(rec.id, () => this.#reconcile(rec));
    }
  }

  /** Detaches from every QEMU (they keep running) and closes guest channels. */
  close(): void {
    for (const link of this.#links.values()) link.close();
    for (const vm of this.#vms.values()) vm.detach();
    for (const w of this.#appLogs.values()) void w.close();
    this.#links.clear();
    this.#appLogs.clear();
    this.#vms.clear();
  }

  /** Guest RAM of capsules that hold memory now. */
  committedMib(exceptId?: string): number {
    let sum = 0;
    for (const r of this.#records.values()) if (r.id !== exceptId && QEMU_STATES.has(r.state)) sum += r.spec.memoryMib;
    return sum;
  }

  /** Number of capsules. */
  get count(): number {
    return this.#records.size;
  }

  /** Ids of capsules built from image `imageId`. */
  usersOfImage(imageId: string): string[] {
    return [...this.#records.values()].filter((r) => r.imageId === imageId).map((r) => r.name);
  }

  /** All capsules, oldest first. */
  list(): CapsuleRecord[] {
    return [...this.#records.values()];
  }

  /** Finds a capsule by id or name. */
  resolve(ref: string): CapsuleRecord {
    const rec = this.#records.get(ref) ?? [...this.#records.values()].find((r) => r.name === ref);
    if (!rec) throw new NotFoundError("capsule", ref);
    return rec;
  }

  /** A capsule with live memory figures. */
  view(rec: CapsuleRecord): CapsuleView {
    return { record: rec, memory: this.#vms.get(rec.id)?.memory() };
  }

  /**
   * Creates a capsule (not started); 0 memory/vcpus and empty args take the image's defaults.
   * `belowImageMinimum` is for MeasureImage, which must try sizes below the recorded minimum.
   */
  async create(name: string, input: CapsuleSpec, opts: { belowImageMinimum?: boolean } = {}): Promise<CapsuleView> {
    if ([...this.#records.values()].some((r) => r.name === name)) throw new AlreadyExistsError("capsule", name);
    const image = await this.deps.images.get(input.image);
    const spec: CapsuleSpec = {
      ...input,
      memoryMib: input.memoryMib || image.manifest.defaultMemoryMib,
      vcpus: input.vcpus || 1,
    };
    if (spec.memoryMib < image.manifest.minMemoryMib && !opts.belowImageMinimum) {
      throw new InvalidArgumentError(
        "spec.memory_mib",
        `image "${image.name}" needs at least ${image.manifest.minMemoryMib} MiB, got ${spec.memoryMib}`,
      );
    }
    checkFits(this.deps.budget, 0, spec.memoryMib, "spec.memory_mib");
    const now = new Date().toISOString();
    const rec: CapsuleRecord = {
      id: `c-${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`,
      name,
      imageId: image.id,
      spec,
      state: "created",
      stateReason: "created",
      createdAt: now,
      updatedAt: now,
    };
    // Creates run one at a time: names, addresses and host ports are allocated against all records.
    return await this.#lock.run(CREATE_LOCK, async () => {
      if ([...this.#records.values()].some((r) => r.name === name)) throw new AlreadyExistsError("capsule", name);
      this.#checkFixedPorts(spec, undefined);
      rec.net = await this.deps.net.attach(rec, this.list());
      this.#records.set(rec.id, rec);
      try {
        await this.deps.store.create(rec);
        await this.deps.net.sync(); // its tap's guard chain, before anything can run on it
      } catch (err) {
        this.#records.delete(rec.id);
        await this.deps.store.remove(rec.id).catch(() => {});
        await this.deps.net.sync().catch(() => {});
        await this.deps.net.detach(rec).catch(() => {});
        throw err;
      }
      this.#publish(rec, "created", undefined, "created");
      this.#log.info("capsule created", {
        capsule: rec.id,
        name,
        image: image.name,
        memoryMib: spec.memoryMib,
        ip: rec.net.ip,
      });
      return this.view(rec);
    });
  }

  /** Boots a created or stopped capsule. */
  start(ref: string): Promise<CapsuleView> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "start", ["created", "stopped"]);
      checkFits(this.deps.budget, this.committedMib(rec.id), rec.spec.memoryMib, `capsule "${rec.name}"`);
      const manifest = await this.deps.images.manifestById(rec.imageId);
      const net = await this.#launchNet(rec);
      const paths = this.deps.store.paths(rec.id);
      await atomicWrite(paths.launchConfig, encodeLaunchConfig(rec, manifest));
      await this.#setState(rec, "starting", "starting qemu");
      let vm: QemuVm;
      try {
        vm = await QemuVm.launch(
          this.deps.config.qemu_binary,
          qemuSpec(rec, manifest, paths, await this.#host(manifest), net, false),
          this.#log.with({ capsule: rec.id }),
        );
      } catch (err) {
        const panic = await findKernelPanic(paths.console);
        const why = `start failed: ${(err as Error).message}${panic ? `; guest ${panic}` : ""}`;
        await this.#setState(rec, "stopped", why);
        throw panic ? new UnavailableError(why) : err;
      }
      rec.exitCode = undefined;
      this.#exitCodes.delete(rec.id); // a code from the previous run must not be reported for this one
      this.#attach(rec, vm, net, false);
      await this.#setState(rec, "running", "started");
      return this.view(rec);
    });
  }

  /** Asks the guest to power off; kills QEMU after `graceMs`. */
  stop(ref: string, graceMs = 0): Promise<CapsuleView> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "stop", ["running", "paused"]);
      await this.#stopLocked(rec, graceMs || this.deps.config.stop_grace_ms);
      return this.view(rec);
    });
  }

  /** Deletes a capsule that is not running. */
  delete(ref: string): Promise<void> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "delete", ["created", "stopped", "saved"]);
      await this.#appLogs.get(rec.id)?.close();
      this.#appLogs.delete(rec.id);
      await this.deps.store.remove(rec.id);
      this.#records.delete(rec.id);
      this.#exitCodes.delete(rec.id);
      this.#refused.delete(rec.id);
      // Rules first (they name the tap), then the tap; the address is free once the record is gone.
      await this.deps.net.sync().catch((err) => this.#log.warn("network sync after delete failed", { error: err }));
      await this.deps.net.detach(rec).catch((err) =>
        this.#log.warn("could not remove capsule network; it is swept at next start", { capsule: rec.id, error: err })
      );
      this.#publish(rec, "deleted", rec.state, "deleted");
      this.#log.info("capsule deleted", { capsule: rec.id, name: rec.name });
    });
  }

  /** Stops the guest's vCPUs. */
  pause(ref: string): Promise<CapsuleView> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "pause", ["running"]);
      await this.#vm(rec).pause();
      await this.#setState(rec, "paused", "paused by request");
      return this.view(rec);
    });
  }

  /** Resumes a paused guest. */
  resume(ref: string): Promise<CapsuleView> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "resume", ["paused"]);
      await this.#vm(rec).resume();
      await this.#setState(rec, "running", "resumed by request");
      return this.view(rec);
    });
  }

  /** Suspends the guest to its state file; QEMU exits. */
  save(ref: string): Promise<{ view: CapsuleView; stateBytes: number }> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "save", ["running", "paused"]);
      const vm = this.#vm(rec);
      const from = rec.state as "running" | "paused";
      const paths = this.deps.store.paths(rec.id);
      const tmp = `${paths.stateFile}.partial`;
      rec.savedFrom = from;
      await this.#setState(rec, "saving", "saving state");
      try {
        if (from === "running") await vm.pause();
        await vm.saveTo(tmp, SAVE_TIMEOUT_MS);
        const f = await Deno.open(tmp, { read: true, write: true });
        await f.sync();
        f.close();
        await Deno.rename(tmp, paths.stateFile);
      } catch (err) {
        await Deno.remove(tmp).catch(() => {});
        if (from === "running") await vm.resume().catch(() => {});
        await this.#setState(rec, from, `save failed: ${(err as Error).message}`);
        throw err;
      }
      const stateBytes = (await Deno.stat(paths.stateFile)).size;
      await this.#detachVm(rec, vm);
      await this.#setState(rec, "saved", `saved ${stateBytes} bytes`);
      return { view: this.view(rec), stateBytes };
    });
  }

  /** Restores a saved capsule from its state file; the guest continues where it was. */
  restore(ref: string): Promise<CapsuleView> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "restore", ["saved"]);
      checkFits(this.deps.budget, this.committedMib(rec.id), rec.spec.memoryMib, `capsule "${rec.name}"`);
      const manifest = await this.deps.images.manifestById(rec.imageId);
      const paths = this.deps.store.paths(rec.id);
      const net = await this.#launchNet(rec);
      await this.#setState(rec, "restoring", "restoring state");
      let vm: QemuVm | undefined;
      try {
        vm = await QemuVm.launch(
          this.deps.config.qemu_binary,
          qemuSpec(rec, manifest, paths, await this.#host(manifest), net, true),
          this.#log.with({ capsule: rec.id }),
        );
        await vm.loadFrom(paths.stateFile, RESTORE_TIMEOUT_MS);
        // Reconnect the OS channel before the guest runs, so none of its output is lost.
        this.#attach(rec, vm, net, true);
        if (!await this.#links.get(rec.id)!.connected(RECONNECT_BEFORE_RESUME_MS)) {
          this.#log.warn("os channel not connected before resume", { capsule: rec.id });
        }
        if (rec.savedFrom !== "paused") await vm.resume();
      } catch (err) {
        if (vm) {
          this.#forget(rec.id);
          vm.kill();
          vm.detach();
        }
        await this.#setState(rec, "saved", `restore failed: ${(err as Error).message}`);
        throw err;
      }
      await Deno.remove(paths.stateFile).catch(() => {});
      await this.#setState(rec, rec.savedFrom === "paused" ? "paused" : "running", "restored");
      return this.view(rec);
    });
  }

  /** Console bytes of a capsule (see streamConsole). */
  console(ref: string, fromStart: boolean, follow: boolean, signal: AbortSignal): AsyncGenerator<Uint8Array> {
    const { paths, opts } = this.#tail(ref, fromStart, follow, signal);
    return streamConsole(paths.console, opts);
  }

  /** The app's output (see app_log.ts). */
  logs(ref: string, fromStart: boolean, follow: boolean, signal: AbortSignal): AsyncGenerator<LogChunk> {
    const { paths, opts } = this.#tail(ref, fromStart, follow, signal);
    return readAppLog(paths.appLog, opts);
  }

  // What following one of a capsule's files needs: its paths, and a stream that ends with the capsule.
  #tail(ref: string, fromStart: boolean, follow: boolean, signal: AbortSignal) {
    const id = this.resolve(ref).id;
    const opts = { fromStart, follow, signal, stillExists: () => this.#records.has(id) };
    return { paths: this.deps.store.paths(id), opts };
  }

  /** Events, optionally of one capsule only. */
  async *events(ref: string, signal: AbortSignal): AsyncGenerator<CapsuleEvent> {
    const id = ref ? this.resolve(ref).id : undefined;
    for await (const e of this.deps.bus.stream(signal)) if (!id || e.capsuleId === id) yield e;
  }

  // --- live migration (agent/migrate drives these) ---------------------------------------

  /** Marks a running or paused capsule as migrating out; returns its record and QEMU. */
  beginOutgoing(ref: string, mark: Pick<MigrationMark, "id" | "peer">): Promise<{ rec: CapsuleRecord; vm: QemuVm }> {
    return this.#withCapsule(ref, async (rec) => {
      requireState(rec.name, rec.state, "migrate", ["running", "paused"]);
      if (rec.net?.backend !== "bridge" || this.deps.net.kind !== "bridge") {
        throw new FailedPreconditionError(
          `cannot migrate capsule "${rec.name}": live migration needs the bridge network (this agent runs ${this.deps.net.kind})`,
        );
      }
      const vm = this.#vm(rec);
      rec.migration = {
        ...mark,
        role: "source",
        phase: "preparing",
        startedAt: new Date().toISOString(),
        resumeTo: rec.state as "running" | "paused",
      };
      await this.#setState(rec, "migrating", `migrating to ${mark.peer}`);
      return { rec, vm };
    });
  }

  /** Where a capsule's files live. */
  paths(id: string) {
    return this.deps.store.paths(id);
  }

  /** Waits up to `ms` for the capsule's OS channel to connect; false if it did not. */
  async guestConnected(id: string, ms: number): Promise<boolean> {
    return await this.#links.get(id)?.connected(ms) ?? false;
  }

  /** The QEMU of a capsule, if one runs. */
  vmOf(id: string): QemuVm | undefined {
    return this.#vms.get(id);
  }

  /** Journals the phase of a migration (either side) before the step it names is taken. */
  setMigrationPhase(id: string, phase: MigrationMark["phase"]): Promise<void> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec?.migration) return;
      rec.migration.phase = phase;
      await this.deps.store.save(rec);
    });
  }

  /**
   * Source side of the switchover: the capsule's host ports stop leading here (the caller
   * installs forwarding to the target in the same table apply). Journals "switchover".
   */
  withdrawForSwitchover(id: string): Promise<PortMapping[]> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id)!;
      rec.migration!.exposed = rec.exposed ?? [];
      rec.migration!.phase = "switchover";
      rec.exposed = [];
      await this.deps.store.save(rec);
      return rec.migration!.exposed;
    });
  }

  /** A failed or cancelled outgoing migration: the capsule is back as it was (exposure included). */
  endOutgoing(id: string, reason: string): Promise<void> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec?.migration) return;
      const mark = rec.migration;
      rec.migration = undefined;
      if (rec.state !== "migrating") {
        // QEMU died meanwhile: the record already says stopped.
        await this.deps.store.save(rec);
        return;
      }
      if (mark.exposed) rec.exposed = mark.exposed;
      await this.#setState(rec, mark.resumeTo, reason);
      await this.deps.net.sync().catch((err) => this.#log.error("could not restore exposure", { error: err }));
    });
  }

  /** The capsule runs on the target: ends the source QEMU, removes the record and its network here. */
  releaseOutgoing(id: string, reason: string): Promise<void> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec) return;
      const vm = this.#vms.get(id);
      this.#forget(id);
      if (vm) await vm.quitAndWait(KILL_WAIT_MS);
      await this.#appLogs.get(id)?.close();
      this.#appLogs.delete(id);
      this.#records.delete(id);
      this.#exitCodes.delete(id);
      this.#refused.delete(id);
      await this.deps.store.remove(id);
      await this.deps.net.sync().catch((err) => this.#log.warn("network sync after migration failed", { error: err }));
      await this.deps.net.detach(rec).catch((err) =>
        this.#log.warn("could not remove migrated capsule's network; swept at next start", { error: err })
      );
      this.#publish(rec, "deleted", rec.state, reason);
      this.#log.info("capsule left this agent", { capsule: id, name: rec.name, reason });
    });
  }

  /**
   * Target side: records an arriving capsule (state incoming), takes over its address and
   * MAC, stages its exposure and launches a QEMU waiting for the memory stream.
   */
  admitIncoming(
    input: ArrivingCapsule,
    mark: Pick<MigrationMark, "id" | "peer">,
  ): Promise<{ rec: CapsuleRecord; vm: QemuVm }> {
    return this.#lock.run(CREATE_LOCK, async () => {
      if (this.#records.has(input.id)) throw new AlreadyExistsError("capsule", input.id);
      if ([...this.#records.values()].some((r) => r.name === input.name)) {
        throw new AlreadyExistsError("capsule", input.name);
      }
      if (!this.deps.images.hasId(input.imageId)) {
        throw new FailedPreconditionError(`capsule.image_id: image ${input.imageId} is not on this agent`);
      }
      const manifest = await this.deps.images.manifestById(input.imageId);
      checkFits(this.deps.budget, this.committedMib(), input.spec.memoryMib, "capsule.spec.memory_mib");
      const now = new Date().toISOString();
      const rec: CapsuleRecord = {
        id: input.id,
        name: input.name,
        imageId: input.imageId,
        spec: input.spec,
        state: "incoming",
        stateReason: `arriving from ${mark.peer}`,
        createdAt: now,
        updatedAt: now,
        migration: {
          ...mark,
          role: "target",
          phase: "incoming",
          startedAt: now,
          resumeTo: input.paused ? "paused" : "running",
        },
      };
      rec.net = await this.deps.net.adopt(rec, input.net, this.list());
      this.#records.set(rec.id, rec);
      let vm: QemuVm | undefined;
      try {
        // Exposure is staged now so the switchover has nothing left to do here.
        rec.listening = input.listening;
        rec.exposed = this.deps.net.decide(rec, input.listening).exposed;
        await this.deps.store.create(rec);
        await this.deps.net.sync();
        const paths = this.deps.store.paths(rec.id);
        await atomicWrite(paths.launchConfig, encodeLaunchConfig(rec, manifest));
        const net = this.deps.net.launch(rec, this.list().filter((r) => r.id !== rec.id));
        vm = await QemuVm.launch(
          this.deps.config.qemu_binary,
          qemuSpec(rec, manifest, paths, await this.#host(manifest), net, true),
          this.#log.with({ capsule: rec.id }),
        );
        // The OS channel is opened before the guest runs (as for restore), so none of its output is lost.
        this.#attach(rec, vm, net, true);
        await this.deps.store.save(rec);
      } catch (err) {
        if (vm) {
          this.#forget(rec.id);
          vm.kill();
          vm.detach();
        }
        this.#records.delete(rec.id);
        await this.deps.store.remove(rec.id).catch(() => {});
        await this.deps.net.sync().catch(() => {});
        await this.deps.net.detach(rec).catch(() => {});
        throw err;
      }
      this.#publish(rec, "created", undefined, `arriving from ${mark.peer}`);
      this.#log.info("capsule arriving", { capsule: rec.id, name: rec.name, from: mark.peer, ip: rec.net.ip });
      return { rec, vm };
    });
  }

  /** Target side: the guest resumed here; the capsule is running (the source has not let go yet). */
  completeIncoming(id: string): Promise<void> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec || rec.state !== "incoming") return;
      await this.#arrived(rec, `arrived from ${rec.migration?.peer}`);
    });
  }

  /** Target side: the source ended its copy; the capsule is simply ours now. */
  releaseIncoming(id: string): Promise<void> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec?.migration || rec.migration.role !== "target") return;
      rec.migration = undefined;
      await this.deps.store.save(rec);
    });
  }

  /** Target side: drops an arriving capsule that must not run here; false if it has already run. */
  abortIncoming(id: string, why: string): Promise<boolean> {
    return this.#lock.run(id, async () => {
      const rec = this.#records.get(id);
      if (!rec) return true;
      if (rec.migration?.role !== "target" || rec.migration.phase === "running") return false;
      const vm = this.#vms.get(id);
      this.#forget(id);
      if (vm) {
        vm.kill();
        await vm.exited;
      }
      await this.#dropArrival(rec, why);
      return true;
    });
  }

  // The arriving guest runs here.
  async #arrived(rec: CapsuleRecord, reason: string): Promise<void> {
    rec.migration!.phase = "running";
    await this.#forceState(rec, rec.migration!.resumeTo, reason);
  }

  // Removes an arriving capsule's record, rules and tap; its QEMU is already gone.
  async #dropArrival(rec: CapsuleRecord, why: string): Promise<void> {
    // The outcome first: a source asking meanwhile must hear why, not "no such migration".
    await this.deps.onArrivalDropped?.(rec, why).catch((err) =>
      this.#log.error("could not journal a dropped arrival", { capsule: rec.id, error: err })
    );
    this.#records.delete(rec.id);
    this.#exitCodes.delete(rec.id);
    this.#refused.delete(rec.id);
    await this.#appLogs.get(rec.id)?.close();
    this.#appLogs.delete(rec.id);
    await this.deps.store.remove(rec.id).catch(() => {});
    await this.deps.net.sync().catch((err) =>
      this.#log.warn("network sync after dropped arrival failed", { error: err })
    );
    await this.deps.net.detach(rec).catch(() => {});
    this.#publish(rec, "deleted", rec.state, why);
    this.#log.warn("arriving capsule dropped", { capsule: rec.id, why });
  }

  // --- internals -------------------------------------------------------------------------

  #withCapsule<T>(ref: string, fn: (rec: CapsuleRecord) => Promise<T>): Promise<T> {
    const id = this.resolve(ref).id;
    return this.#lock.run(id, () => fn(this.resolve(id)));
  }

  #vm(rec: CapsuleRecord): QemuVm {
    const vm = this.#vms.get(rec.id);
    if (!vm) throw new FailedPreconditionError(`capsule "${rec.name}" has no running qemu`);
    return vm;
  }

  async #host(manifest: ImageManifest): Promise<LaunchHost> {
    const boot = await this.deps.bootFiles(manifest);
    return {
      accelerator: this.deps.accel.accelerator,
      cpuModel: this.deps.config.cpu_model,
      tcgTbSizeMib: this.deps.config.tcg_tb_size_mib,
      ...boot,
    };
  }

  // The network part of a launch. A record from another backend (or from before the network
  // existed) gets an identity from this one first; only stopped capsules get here that way.
  async #launchNet(rec: CapsuleRecord): Promise<LaunchNet> {
    const others = this.list().filter((r) => r.id !== rec.id);
    if (rec.net?.backend !== this.deps.net.kind) {
      const old = rec.net;
      rec.net = await this.deps.net.attach(rec, others);
      await this.deps.store.save(rec);
      await this.deps.net.sync();
      this.#log.info("capsule moved to this agent's network backend", {
        capsule: rec.id,
        from: old?.backend ?? "none",
        to: rec.net.backend,
      });
    }
    return this.deps.net.launch(rec, others);
  }

  // Fixed host ports may not be promised to two capsules.
  #checkFixedPorts(spec: CapsuleSpec, exceptId: string | undefined): void {
    const mine = new Map(spec.ports.map((p, i) => [portKey(p.hostPort, p.protocol), i]));
    for (const [k, i] of mine) {
      if (k.startsWith("0/")) continue;
      if (spec.ports.some((p, j) => portKey(p.hostPort, p.protocol) === k && j !== i)) {
        throw new InvalidArgumentError(`spec.ports[${i}].host_port`, `${k} listed twice`);
      }
    }
    for (const r of this.#records.values()) {
      if (r.id === exceptId) continue;
      for (const p of r.spec.ports) {
        const i = mine.get(portKey(p.hostPort, p.protocol));
        if (p.hostPort !== 0 && i !== undefined) {
          throw new FailedPreconditionError(
            `spec.ports[${i}].host_port: ${p.hostPort}/${p.protocol} is promised to capsule "${r.name}"`,
          );
        }
      }
    }
  }

  // `knownGuest`: the guest was running before this QEMU (restore) or this agent (re-adoption).
  #attach(rec: CapsuleRecord, vm: QemuVm, net: Pick<LaunchNet, "ports" | "hostAddress">, knownGuest: boolean): void {
    this.#vms.set(rec.id, vm);
    rec.runtime = {
      pid: vm.ident.pid,
      startTicks: vm.ident.startTicks,
      accelerator: this.deps.accel.accelerator,
      ports: net.ports,
      hostAddress: net.hostAddress,
    };
    this.#link(rec, vm, knownGuest);
    void vm.exited.then((exit) =>
      this.#lock.run(rec.id, async () => {
        if (this.#vms.get(rec.id) !== vm || exit.reason === "detached") return; // an operation already handled it
        this.#forget(rec.id);
        if (rec.migration?.role === "target") {
          // Not ours until the source lets go: the source may still resume its copy.
          await this.#dropArrival(rec, `qemu exited before the source released the capsule: ${exit.reason}`);
          return;
        }
        const code = this.#exitCodes.get(rec.id);
        rec.exitCode = code;
        // A guest that dies without reporting an exit often left the reason on its console.
        const panic = code === undefined ? await findKernelPanic(this.deps.store.paths(rec.id).console) : undefined;
        const why = code !== undefined
          ? `app exited with code ${code}; ${exit.reason}`
          : panic
          ? `${exit.reason}: guest ${panic}`
          : exit.reason;
        this.#log.info("capsule's qemu exited", { capsule: rec.id, reason: why });
        await this.#setState(rec, "stopped", why);
      })
    ).catch((err) => this.#log.error("exit handling failed", { capsule: rec.id, error: err }));
  }

  // Opens the OS-server link to `vm`'s guest; what the guest says lands on `rec`.
  #link(rec: CapsuleRecord, vm: QemuVm, knownGuest: boolean): void {
    const log = this.#log.with({ capsule: rec.id, component: "osserver" });
    const current = () => this.#vms.get(rec.id) === vm;
    const link = new GuestLink(this.deps.store.paths(rec.id).osSocket, log, {
      onExited: (code, signal) => {
        this.#exitCodes.set(rec.id, signal ? 128 + signal : code);
        if (current()) this.#publish(rec, "exited", undefined, exitText(code, signal), { exit: { code, signal } });
      },
      onPorts: (ports) => void this.#lock.run(rec.id, async () => current() && await this.#setListening(rec, ports)),
      onLog: (chunk) => {
        if (current()) this.#appendLog(rec, chunk);
      },
    }, knownGuest);
    this.#links.set(rec.id, link);
  }

  #appendLog(rec: CapsuleRecord, chunk: GuestLog): void {
    let w = this.#appLogs.get(rec.id);
    if (!w) {
      const path = this.deps.store.paths(rec.id).appLog;
      w = new AppLogWriter(path, (err) => this.#log.warn("app log write failed", { capsule: rec.id, error: err }));
      this.#appLogs.set(rec.id, w);
    }
    const stored = w.append(chunk);
    this.#publish(rec, "log", undefined, `${chunk.data.length} bytes on ${chunk.stream}`, { log: stored });
  }

  // Records the guest's listening set and publishes what changed; persisted so the network
  // layer can rebuild exposure from the state dir after an agent restart.
  // Exposure follows: allowed listens get their host port (DNAT), the rest are refused once.
  async #setListening(rec: CapsuleRecord, ports: GuestPort[]): Promise<void> {
    const { added, removed } = diffPorts(rec.listening ?? [], ports);
    if (added.length === 0 && removed.length === 0) return;
    const ex = this.deps.net.decide(rec, ports);
    const before = rec.exposed ?? [];
    rec.listening = ports;
    rec.exposed = ex.exposed;
    if (ex.added.length > 0 || ex.removed.length > 0) {
      try {
        await this.deps.net.sync();
      } catch (err) {
        // Keep the record truthful: what could not be applied is not exposed.
        rec.exposed = before;
        this.#log.error("could not apply exposure", { capsule: rec.id, error: err });
        ex.added = [];
        ex.removed = [];
      }
    }
    await this.deps.store.save(rec);
    for (const p of removed) {
      this.#publish(rec, "unlisten", undefined, `stopped listening on ${p.port}/${p.protocol}`, { port: p });
    }
    for (const p of added) this.#publish(rec, "listen", undefined, `listening on ${p.port}/${p.protocol}`, { port: p });
    this.#publishExposure(rec, ex.added, ex.removed, "");
    const seen = this.#refused.get(rec.id) ?? new Set<string>();
    const now = new Set(ex.refused.map((r) => portKey(r.port.port, r.port.protocol)));
    for (const r of ex.refused) {
      const k = portKey(r.port.port, r.port.protocol);
      if (seen.has(k)) continue;
      this.#log.warn("listen refused", { capsule: rec.id, port: k, reason: r.reason });
      this.#publish(rec, "expose_refused", undefined, `not exposing ${k}: ${r.reason}`, { port: r.port });
    }
    this.#refused.set(rec.id, now); // a port that stops and starts listening again is judged afresh
    this.#log.info("guest listening set changed", {
      capsule: rec.id,
      listening: ports.map((p) => `${p.port}/${p.protocol}`),
      exposed: (rec.exposed ?? []).map((p) => `${p.hostPort}->${p.guestPort}/${p.protocol}`),
    });
  }

  #publishExposure(rec: CapsuleRecord, added: PortMapping[], removed: PortMapping[], why: string): void {
    const addr = (p: PortMapping) => `${p.hostPort}/${p.protocol} -> ${rec.net?.ip ?? "guest"}:${p.guestPort}`;
    for (const p of removed) this.#publish(rec, "unexposed", undefined, `unexposed ${addr(p)}${why}`, { mapping: p });
    for (const p of added) this.#publish(rec, "exposed", undefined, `exposed ${addr(p)}`, { mapping: p });
  }

  #forget(id: string): void {
    this.#vms.delete(id);
    this.#links.get(id)?.close();
    this.#links.delete(id);
  }

  // Ends a QEMU the manager is done with (after save): quit, then kill if it lingers.
  async #detachVm(rec: CapsuleRecord, vm: QemuVm): Promise<void> {
    await this.#links.get(rec.id)?.drainAndClose(); // the paused guest's last output is in flight
    this.#forget(rec.id);
    await vm.quitAndWait(KILL_WAIT_MS);
    rec.runtime = undefined;
  }

  async #stopLocked(rec: CapsuleRecord, graceMs: number): Promise<void> {
    const vm = this.#vm(rec);
    const wasPaused = rec.state === "paused";
    await this.#setState(rec, "stopping", `stopping (grace ${graceMs} ms)`);
    let how = "guest powered off";
    if (wasPaused) await vm.resume().catch(() => {}); // a paused guest cannot act on the request
    if (!this.#links.get(rec.id)?.requestShutdown(graceMs)) {
      how = "guest powered off (no os channel: ACPI power button)";
      await vm.qmp.execute("system_powerdown").catch(() => {});
    }
    // Give the guest the grace period plus time to power off after its app exits.
    const exited = await Promise.race([
      vm.exited.then(() => true),
      new Promise<false>((r) => setTimeout(() => r(false), graceMs + 2_000)),
    ]);
    if (!exited) {
      how = `guest did not power off within ${graceMs} ms; killed`;
      await vm.quitAndWait(KILL_WAIT_MS);
    }
    this.#forget(rec.id);
    rec.runtime = undefined;
    const code = this.#exitCodes.get(rec.id);
    rec.exitCode = code;
    await this.#setState(rec, "stopped", code === undefined ? how : `${how}; app exited with code ${code}`);
  }

  async #setState(rec: CapsuleRecord, to: CapsuleStateName, reason: string): Promise<void> {
    const from = rec.state;
    if (from !== to) assertTransition(rec.name, from, to);
    rec.state = to;
    rec.stateReason = reason;
    rec.updatedAt = new Date().toISOString();
    const gone = !QEMU_STATES.has(to) ? this.#clearListening(rec) : [];
    const unexposed = !QEMU_STATES.has(to) ? rec.exposed ?? [] : [];
    if (!QEMU_STATES.has(to)) {
      rec.runtime = undefined;
      rec.exposed = undefined;
      this.#refused.delete(rec.id);
    }
    await this.deps.store.save(rec);
    if (unexposed.length > 0) {
      await this.deps.net.sync().catch((err) => this.#log.error("could not withdraw exposure", { error: err }));
    }
    for (const p of gone) {
      this.#publish(rec, "unlisten", undefined, `stopped listening on ${p.port}/${p.protocol}: ${reason}`, { port: p });
    }
    this.#publishExposure(rec, [], unexposed, `: ${reason}`);
    this.#publish(rec, "state_changed", from, reason);
  }

  // Without a QEMU nothing listens; the caller persists and publishes.
  #clearListening(rec: CapsuleRecord): GuestPort[] {
    const gone = rec.listening ?? [];
    rec.listening = undefined;
    return gone;
  }

  #publish(
    rec: CapsuleRecord,
    type: CapsuleEvent["type"],
    prev: CapsuleStateName | undefined,
    msg: string,
    extra: Pick<CapsuleEvent, "port" | "log" | "exit" | "mapping"> = {},
  ): void {
    this.deps.bus.publish({
      type,
      capsuleId: rec.id,
      capsuleName: rec.name,
      state: rec.state,
      previousState: prev,
      message: msg,
      ...extra,
    });
  }

  // Settles one capsule after an agent (re)start: adopt its QEMU if it lives, else mark it.
  async #reconcile(rec: CapsuleRecord): Promise<void> {
    const log = this.#log.with({ capsule: rec.id });
    if (!QEMU_STATES.has(rec.state)) return;
    let vm: QemuVm | undefined;
    if (rec.runtime) {
      try {
        vm = await QemuVm.adopt(rec.id, rec.runtime, this.deps.store.paths(rec.id).qmpSocket, log);
      } catch (err) {
        log.info("qemu not adoptable", { error: (err as Error).message });
      }
    }
    if (rec.state === "incoming") {
      // Arrived while we were down (QEMU resumes the guest by itself once the stream is in), or not.
      const status = vm ? await vm.status().catch(() => "gone") : "gone";
      if (vm && status === "running") {
        this.#attach(rec, vm, { ports: rec.runtime!.ports, hostAddress: rec.runtime!.hostAddress }, true);
        await this.#arrived(rec, "arrived while the agent was down");
        return;
      }
      if (vm) {
        vm.kill();
        vm.detach();
      }
      await this.#dropArrival(rec, `agent restarted while the guest was arriving (qemu ${status})`);
      return;
    }
    if (rec.state === "migrating") {
      // Only the target can say where the guest runs now: agent/migrate settles it (recoverOutgoing).
      if (vm) this.#attach(rec, vm, { ports: rec.runtime!.ports, hostAddress: rec.runtime!.hostAddress }, true);
      else rec.runtime = undefined;
      log.info("capsule was migrating when the agent stopped; settling it with the target", {
        migration: rec.migration?.id,
        qemu: vm ? "alive" : "gone",
      });
      return;
    }
    if (!vm) {
      const settled = rec.state === "restoring" ? "saved" : "stopped";
      const why = rec.state === "restoring"
        ? "restore interrupted: agent restarted; state file kept"
        : `qemu exited while the agent was down (was ${rec.state})`;
      await this.#setState(rec, settled, why);
      return;
    }
    const status = await vm.status();
    const net = { ports: rec.runtime!.ports, hostAddress: rec.runtime!.hostAddress };
    if (rec.state === "restoring" && status === "inmigrate") {
      vm.kill();
      vm.detach();
      await this.#setState(rec, "saved", "restore interrupted: agent restarted; state file kept");
      return;
    }
    if (rec.state === "saving" && rec.savedFrom === "running" && status !== "running") {
      await vm.resume().catch(() => {}); // save interrupted: the guest carries on
    }
    this.#attach(rec, vm, net, true);
    const now = await vm.status();
    const to: CapsuleStateName = now === "running" ? "running" : "paused";
    log.info("re-adopted running qemu", { pid: vm.ident.pid, status: now });
    if (rec.state === "stopping") {
      await this.#forceState(rec, "running", "re-adopted after agent restart");
      await this.#stopLocked(rec, this.deps.config.stop_grace_ms);
      return;
    }
    await this.#forceState(rec, to, rec.state === to ? rec.stateReason : "re-adopted after agent restart");
  }

  // Reconciliation may need moves the normal table forbids (e.g. saving → running after a crash).
  async #forceState(rec: CapsuleRecord, to: CapsuleStateName, reason: string): Promise<void> {
    if (rec.state === to) return;
    const from = rec.state;
    rec.state = to;
    rec.stateReason = reason;
    rec.updatedAt = new Date().toISOString();
    await this.deps.store.save(rec);
    this.#publish(rec, "state_changed", from, reason);
  }
}

function exitText(code: number, signal: number): string {
  return signal ? `app killed by signal ${signal}` : `app exited with code ${code}`;
}
