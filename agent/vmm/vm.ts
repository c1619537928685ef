/**
 * A running QEMU, driven over QMP: launch or re-adopt, pause/resume, save to and load
 * from a state file, quit. Knows nothing about capsules beyond the id QEMU was named for.
 */
import { FailedPreconditionError, InternalError, UnavailableError } from "../errors.ts";
import type { Logger } from "../log.ts";
import {
  launchDaemonized,
  type ProcIdentity,
  readQemuMemory,
  signalProcess,
  verifyQemu,
  waitForExit,
} from "./process.ts";
import { buildQemuArgs, type QemuLaunchSpec } from "./qemu_args.ts";
import { QmpClient } from "./qmp.ts";

/** Why a QEMU process ended. */
export interface VmExit {
  reason: string;
}

// Saving a stopped guest is one pass over its RAM: no reason to throttle it.
const UNLIMITED_BANDWIDTH = 64 * 1024 * 1024 * 1024;

/** Handle on one QEMU process. */
export class QemuVm {
  /** Resolves when QEMU has exited (QMP closed and the process is gone). */
  readonly exited: Promise<VmExit>;
  #shutdownReason?: string;
  #detached = false;

  private constructor(readonly ident: ProcIdentity, readonly qmp: QmpClient, private log: Logger) {
    qmp.on("SHUTDOWN", (e) => {
      this.#shutdownReason = String(e.data.reason ?? "shutdown");
    });
    this.exited = this.#watchExit();
  }

  /** Launches QEMU for `spec` and connects to its QMP socket. */
  static async launch(binary: string, spec: QemuLaunchSpec, log: Logger): Promise<QemuVm> {
    const ident = await launchDaemonized(binary, buildQemuArgs(spec), spec.pidFile);
    try {
      const qmp = await QmpClient.connect(spec.qmpSocket, { timeoutMs: 10_000, log });
      return new QemuVm(ident, qmp, log);
    } catch (err) {
      signalProcess(ident, "SIGKILL");
      throw new UnavailableError(`qemu started (pid ${ident.pid}) but its QMP socket did not answer: ${err}`);
    }
  }

  /** Re-attaches to a QEMU started by an earlier agent run, after checking it is really that capsule's. */
  static async adopt(capsuleId: string, ident: ProcIdentity, qmpSocket: string, log: Logger): Promise<QemuVm> {
    const why = verifyQemu(ident, capsuleId);
    if (why) throw new FailedPreconditionError(why);
    const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 5_000, log });
    const name = await qmp.execute<{ name?: string }>("query-name");
    if (name.name !== capsuleId) {
      qmp.close();
      throw new FailedPreconditionError(`qemu pid ${ident.pid} answers as "${name.name}", not ${capsuleId}`);
    }
    return new QemuVm(ident, qmp, log);
  }

  /** QEMU's run state ("running", "paused", "inmigrate", "postmigrate"…). */
  async status(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>("query-status")).status;
  }

  /** Stops the vCPUs. */
  async pause(): Promise<void> {
    await this.qmp.execute("stop");
  }

  /** Resumes the vCPUs. */
  async resume(): Promise<void> {
    await this.qmp.execute("cont");
  }

  /** Writes the paused guest's full state to `path` (via QEMU's migration stream). */
  async saveTo(path: string, timeoutMs: number): Promise<void> {
    if (/['\\]/.test(path)) throw new InternalError(`state path ${path} cannot be quoted for qemu`);
    await this.qmp.execute("migrate-set-parameters", { "max-bandwidth": UNLIMITED_BANDWIDTH });
    await this.qmp.execute("migrate", { uri: `exec:cat > '${path}'` });
    await this.#waitMigration(timeoutMs);
  }

  /** Loads guest state from `path` into a QEMU started with `incoming`. */
  async loadFrom(path: string, timeoutMs: number): Promise<void> {
    if (/['\\]/.test(path)) throw new InternalError(`state path ${path} cannot be quoted for qemu`);
    await this.qmp.execute("migrate-incoming", { uri: `exec:cat '${path}'` });
    await this.#waitMigration(timeoutMs);
  }

  /** Asks QEMU to exit now (no guest shutdown). */
  async quit(): Promise<void> {
    await this.qmp.execute("quit").catch(() => {/* QEMU may close before replying */});
  }

  /** Quits QEMU and waits for it to exit, SIGKILLing it if it lingers past `killAfterMs`. */
  async quitAndWait(killAfterMs: number): Promise<void> {
    await this.quit();
    const t = setTimeout(() => this.kill(), killAfterMs);
    await this.exited;
    clearTimeout(t);
  }

  /** SIGKILLs QEMU if it is still this process. */
  kill(): void {
    signalProcess(this.ident, "SIGKILL");
  }

  /** Drops the QMP connection without touching QEMU (agent shutdown). */
  detach(): void {
    this.#detached = true;
    this.qmp.close();
  }

  /** Resident memory figures, or undefined if QEMU is gone. */
  memory() {
    return readQemuMemory(this.ident.pid);
  }

  async #waitMigration(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      // On the incoming side QEMU reports no status until the stream starts; keep polling.
      if (info.status === "completed") return;
      if (info.status === "failed" || info.status === "cancelled") {
        throw new UnavailableError(`qemu migration ${info.status}: ${info["error-desc"] ?? "no detail"}`);
      }
      if (Date.now() > deadline) {
        await this.qmp.execute("migrate_cancel").catch(() => {});
        throw new UnavailableError(`qemu migration did not complete within ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  async #watchExit(): Promise<VmExit> {
    await this.qmp.closed;
    if (this.#detached) return { reason: "detached" };
    // QMP closes a moment before the process is reaped; a QMP drop with a live QEMU is odd but possible.
    if (!await waitForExit(this.ident, 5_000)) {
      this.log.warn("qmp connection closed but qemu still runs", { pid: this.ident.pid });
      while (!await waitForExit(this.ident, 60_000)) { /* keep waiting */ }
    }
    const reason = this.#shutdownReason ? `qemu exited: ${this.#shutdownReason}` : "qemu exited unexpectedly";
    return { reason };
  }
}
