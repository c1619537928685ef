/**
 * Lifecycle benchmark: a real flexcapd (test harness, temp state dir) runs the busybox httpd
 * image, 128 MiB, BENCH_RUNS times (default 5), one fresh capsule per run, on the kernel
 * BENCH_KERNEL names ("linux-vm", the Debian-kernel baseline, by default; or "capsule"), and
 * measures:
 *
 * - cold_start_ms: StartCapsule call -> first HTTP 200 through the forwarded port;
 * - save_ms: SaveCapsule call duration (guest written to its state file, QEMU gone);
 * - restore_ms: RestoreCapsule call -> first HTTP 200 after the restore;
 * - agent_rss_mib: VmRSS of the flexcapd process while the capsule runs;
 * - qemu_overhead_mib / qemu_rss_mib / guest_resident_mib: GetCapsule's memory figures
 *   while the capsule runs and is idle (BENCH_IDLE_MS after its first reply, default 3000).
 *
 * Top-level figures are medians; `samples` has every run's value.
 * Run: `deno run -A test/bench/lifecycle.ts` or `deno run -A test/bench/main.ts lifecycle`.
 */
import { KernelKind } from "../../agent/gen/flexcap/v1/image.ts";
import { buildHttpdImage, spec, startTestAgent, type TestAgent } from "../harness/agent.ts";
import { envInt, main, median, round1 } from "./report.ts";

const MEMORY_MIB = 128;
const KERNEL = Deno.env.get("BENCH_KERNEL") ?? "linux-vm";
if (!["linux-vm", "capsule"].includes(KERNEL)) {
  throw new Error(`BENCH_KERNEL must be linux-vm or capsule, got ${KERNEL}`);
}
const BODY = "flexcap lifecycle bench\n";
/** A new probe connection is opened this often until one gets a reply. */
const PROBE_INTERVAL_MS = 20;
/** Each probe gives up after this long (slirp accepts at once and holds until the guest answers). */
const PROBE_TIMEOUT_MS = 500;
const READY_TIMEOUT_MS = 120_000;

const log = (msg: string) => console.error(`bench lifecycle: ${msg}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One HTTP/1.0 GET over a fresh TCP connection; true if it got a 200 with BODY. */
async function httpOnce(port: number, timeoutMs: number): Promise<boolean> {
  let conn: Deno.TcpConn | undefined;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      conn?.close();
    } catch { /* already closed */ }
  }, timeoutMs);
  try {
    conn = await Deno.connect({ hostname: "127.0.0.1", port });
    if (timedOut) return false;
    await conn.write(new TextEncoder().encode("GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"));
    const dec = new TextDecoder();
    const buf = new Uint8Array(4096);
    let text = "";
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      text += dec.decode(buf.subarray(0, n), { stream: true });
      if (/^HTTP\/1\.[01] 200 /.test(text) && text.includes(BODY)) return true;
    }
    return false;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch { /* already closed */ }
  }
}

/**
 * Resolves with performance.now() of the first successful reply. Probes overlap: a new one
 * starts every PROBE_INTERVAL_MS while earlier ones may still hang in slirp, so the moment
 * the guest starts answering is seen within about one interval.
 */
async function firstReply(port: number): Promise<number> {
  const deadline = performance.now() + READY_TIMEOUT_MS;
  let done: number | undefined;
  const inflight = new Set<Promise<void>>();
  while (done === undefined) {
    if (performance.now() > deadline) throw new Error(`no HTTP reply on port ${port} in ${READY_TIMEOUT_MS} ms`);
    const p: Promise<void> = httpOnce(port, PROBE_TIMEOUT_MS).then((ok) => {
      if (ok && done === undefined) done = performance.now();
      inflight.delete(p);
    });
    inflight.add(p);
    await Promise.race([sleep(PROBE_INTERVAL_MS), p]);
  }
  await Promise.all(inflight);
  return done;
}

/** The flexcapd child of the harness: the deno process serving on `stateDir`. */
async function findAgentPid(stateDir: string): Promise<number> {
  for await (const e of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const argv = (await Deno.readTextFile(`/proc/${e.name}/cmdline`)).split("\0");
      if (argv.some((a) => a.endsWith("flexcapd.ts")) && argv.includes(stateDir) && !argv[0].includes("qemu")) {
        return Number(e.name);
      }
    } catch { /* gone */ }
  }
  throw new Error(`no flexcapd process for ${stateDir}`);
}

function rssKib(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

interface RunSample {
  cold_start_ms: number;
  start_rpc_ms: number;
  save_ms: number;
  state_mib: number;
  restore_ms: number;
  restore_rpc_ms: number;
  agent_rss_mib: number;
  qemu_rss_mib: number;
  qemu_overhead_mib: number;
  guest_resident_mib: number;
}

async function oneRun(agent: TestAgent, agentPid: number, image: string, i: number, idleMs: number) {
  const c = agent.client.capsules;
  const name = `bench-${i}`;
  await c.createCapsule({
    name,
    spec: spec(image, { memoryMib: MEMORY_MIB, ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }] }),
  });

  const t0 = performance.now();
  const started = (await c.startCapsule({ capsule: name })).capsule!;
  const startRpc = performance.now() - t0;
  const port = started.ports[0]?.hostPort;
  if (!port) throw new Error(`capsule ${name} started without a host port`);
  const cold = (await firstReply(port)) - t0;

  await sleep(idleMs);
  const running = (await c.getCapsule({ capsule: name })).capsule!;
  const mem = running.memory;
  if (!mem || !mem.qemuRssKib) throw new Error(`capsule ${name} reports no memory figures`);
  const agentRss = rssKib(agentPid);

  const t1 = performance.now();
  const saved = await c.saveCapsule({ capsule: name });
  const save = performance.now() - t1;

  const t2 = performance.now();
  const restored = (await c.restoreCapsule({ capsule: name })).capsule!;
  const restoreRpc = performance.now() - t2;
  const port2 = restored.ports[0]?.hostPort;
  if (!port2) throw new Error(`capsule ${name} restored without a host port`);
  const restore = (await firstReply(port2)) - t2;

  await c.stopCapsule({ capsule: name, graceMs: 5_000 });
  await c.deleteCapsule({ capsule: name });

  const s: RunSample = {
    cold_start_ms: round1(cold),
    start_rpc_ms: round1(startRpc),
    save_ms: round1(save),
    state_mib: round1(Number(saved.stateBytes) / 1048576),
    restore_ms: round1(restore),
    restore_rpc_ms: round1(restoreRpc),
    agent_rss_mib: round1(agentRss / 1024),
    qemu_rss_mib: round1(Number(mem.qemuRssKib) / 1024),
    qemu_overhead_mib: round1(Number(mem.qemuOverheadKib) / 1024),
    guest_resident_mib: round1(Number(mem.guestResidentKib) / 1024),
  };
  return s;
}

/** The suite: see the module comment. */
export async function run(): Promise<Record<string, unknown>> {
  const runs = envInt("BENCH_RUNS", 5);
  const idleMs = envInt("BENCH_IDLE_MS", 3_000);
  log(`starting a test agent (${runs} runs, ${MEMORY_MIB} MiB, idle ${idleMs} ms)`);
  const agent = await startTestAgent();
  const onSignal = async () => {
    log("interrupted; cleaning up");
    await agent.cleanup();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    const info = await agent.client.agent.getAgentInfo({});
    const agentPid = await findAgentPid(agent.stateDir);
    const image = await buildHttpdImage(
      agent.client,
      "httpd",
      BODY,
      KERNEL === "capsule" ? KernelKind.KERNEL_KIND_CAPSULE : KernelKind.KERNEL_KIND_LINUX_VM,
    );
    log(`accelerator ${info.accelerator}, ${info.qemuVersion}, image ${image.id.slice(0, 19)}…`);
    const samples: RunSample[] = [];
    for (let i = 0; i < runs; i++) {
      const s = await oneRun(agent, agentPid, image.id, i, idleMs);
      samples.push(s);
      log(
        `run ${i + 1}/${runs}: cold start ${s.cold_start_ms} ms, save ${s.save_ms} ms, restore ${s.restore_ms} ms, ` +
          `agent ${s.agent_rss_mib} MiB, qemu overhead ${s.qemu_overhead_mib} MiB`,
      );
    }
    const col = (k: keyof RunSample) => samples.map((s) => s[k]);
    const med = (k: keyof RunSample) => round1(median(col(k)));
    return {
      cold_start_ms: med("cold_start_ms"),
      save_ms: med("save_ms"),
      restore_ms: med("restore_ms"),
      agent_rss_mib: med("agent_rss_mib"),
      qemu_overhead_mib: med("qemu_overhead_mib"),
      qemu_rss_mib: med("qemu_rss_mib"),
      guest_resident_mib: med("guest_resident_mib"),
      start_rpc_ms: med("start_rpc_ms"),
      restore_rpc_ms: med("restore_rpc_ms"),
      state_mib: med("state_mib"),
      runs,
      accelerator: info.accelerator,
      memory_mib: MEMORY_MIB,
      kernel: KERNEL,
      cpu_model: info.cpuModel,
      qemu_version: info.qemuVersion,
      agent_version: info.version,
      idle_ms: idleMs,
      samples: Object.fromEntries((Object.keys(samples[0] ?? {}) as (keyof RunSample)[]).map((k) => [k, col(k)])),
    };
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await agent.cleanup();
  }
}

if (import.meta.main) await main("lifecycle");
