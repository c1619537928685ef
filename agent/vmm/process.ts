/**
 * QEMU processes as the agent sees them: launched daemonized (own session, reparented
 * away from the agent so killing the agent never kills a capsule), identified later by
 * pid + start time + command line, measured through /proc.
 */
import { execa } from "execa";
import { InternalError, UnavailableError } from "../errors.ts";

/** Identity of a process, enough to detect pid reuse. */
export interface ProcIdentity {
  pid: number;
  startTicks: number;
}

// QEMU must inherit nothing from the agent: a leaked listening socket would keep the
// agent's API address "in use" after the agent dies. The runtime does not mark every fd
// close-on-exec, so a tiny bash prologue closes all fds above stderr, then execs QEMU.
const CLOSE_FDS_THEN_EXEC =
  'for n in $(ls /proc/$$/fd); do if [ "$n" -gt 2 ]; then eval "exec $n>&-"; fi; done; exec "$0" "$@"';

/** Launches QEMU with `-daemonize`; resolves once QEMU is initialised, with its pid. */
export async function launchDaemonized(binary: string, args: string[], pidFile: string): Promise<ProcIdentity> {
  await Deno.remove(pidFile).catch(() => {});
  const r = await execa("bash", ["-c", CLOSE_FDS_THEN_EXEC, binary, ...args], {
    reject: false,
    stdin: "ignore",
    timeout: 60_000,
    all: true,
  });
  if (r.exitCode !== 0) {
    const why = (r.all ?? "").toString().trim().split("\n").slice(-5).join(" | ");
    throw new UnavailableError(`qemu failed to start (exit ${r.exitCode ?? r.signal}): ${why}`);
  }
  // QEMU removes its pidfile when it exits: a guest that dies at once (panic + -no-reboot) leaves none.
  const text = await Deno.readTextFile(pidFile).catch((err) => {
    if (err instanceof Deno.errors.NotFound) throw new UnavailableError("qemu exited right after starting");
    throw err;
  });
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0) throw new InternalError(`qemu pidfile ${pidFile} holds no pid`);
  const startTicks = readStartTicks(pid);
  if (startTicks === undefined) throw new UnavailableError(`qemu (pid ${pid}) exited right after starting`);
  return { pid, startTicks };
}

/** Field 22 of /proc/PID/stat (start time in clock ticks), or undefined if gone. */
export function readStartTicks(pid: number): number | undefined {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return undefined;
  }
  // comm (field 2) may contain spaces and parens: split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (rest[0] === "Z") return undefined; // a zombie is as good as dead
  return Number(rest[19]);
}

/** True if `id` is still the same live process. */
export function isAlive(id: ProcIdentity): boolean {
  return readStartTicks(id.pid) === id.startTicks;
}

/** Checks that `id` is a live QEMU started for `capsuleId`; returns why not, or undefined if it is. */
export function verifyQemu(id: ProcIdentity, capsuleId: string): string | undefined {
  if (!isAlive(id)) return `qemu (pid ${id.pid}) is no longer running`;
  let cmdline: string[];
  try {
    cmdline = Deno.readTextFileSync(`/proc/${id.pid}/cmdline`).split("\0");
  } catch {
    return `qemu (pid ${id.pid}) vanished`;
  }
  if (!cmdline[0]?.includes("qemu-system")) return `pid ${id.pid} is not qemu (${cmdline[0]})`;
  const nameArg = cmdline[cmdline.indexOf("-name") + 1] ?? "";
  if (!nameArg.startsWith(`guest=${capsuleId},`)) return `pid ${id.pid} is a qemu of another guest (${nameArg})`;
  return undefined;
}

/** Sends `signal` to the process if it is still `id`. */
export function signalProcess(id: ProcIdentity, signal: Deno.Signal): void {
  if (!isAlive(id)) return;
  try {
    Deno.kill(id.pid, signal);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
}

/** Polls until the process is gone or `timeoutMs` passes; true if it exited. */
export async function waitForExit(id: ProcIdentity, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isAlive(id)) {
    if (Date.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
  return true;
}

/** Resident memory of a QEMU process, split into guest RAM and QEMU's own. */
export interface QemuMemory {
  rssKib: number;
  guestResidentKib: number;
  overheadKib: number;
}

/** Reads /proc/PID/smaps_rollup-like totals; guest RAM is the memory-backend-memfd mapping. */
export function readQemuMemory(pid: number): QemuMemory | undefined {
  let smaps: string;
  try {
    smaps = Deno.readTextFileSync(`/proc/${pid}/smaps`);
  } catch {
    return undefined;
  }
  let rss = 0;
  let guest = 0;
  let inGuest = false;
  for (const line of smaps.split("\n")) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) {
      inGuest = line.includes("/memfd:memory-backend-memfd");
    } else if (line.startsWith("Rss:")) {
      const kib = Number(line.split(/\s+/)[1]);
      rss += kib;
      if (inGuest) guest += kib;
    }
  }
  return { rssKib: rss, guestResidentKib: guest, overheadKib: rss - guest };
}

/** `qemu-system-x86_64 --version`'s first line, or the error. */
export async function qemuVersion(binary: string): Promise<string> {
  const r = await execa(binary, ["--version"], { reject: false });
  return r.exitCode === 0 ? r.stdout.split("\n")[0] : `unavailable: ${r.stderr || r.shortMessage}`;
}
