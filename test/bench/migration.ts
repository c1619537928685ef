/**
 * Migration benchmark: live migration of one redis server (Debian's redis-server, a key set
 * before every move) in three ways, BENCH_RUNS times each (default 5):
 *
 * - capsule: the capsule kernel, 48 MiB, between two peered bridge-backed agents in their own
 *   namespaces (test/harness/cluster.ts), moved with MigrateCapsule A→B, B→A, … The memory
 *   stream goes QEMU → unix socket → agent → TLS → peer agent → unix socket → QEMU.
 * - linuxvm: the same redis image on Debian's kernel (KERNEL_KIND_LINUX_VM), with the image's
 *   default memory (256 MiB if it does not come up in that), moved the same way.
 * - direct: the capsule kernel, 48 MiB, QEMU → unix socket → QEMU with no agent in between: a
 *   capsule is started by a usermode agent, the agent is killed (its QEMU keeps running; QEMU's
 *   QMP monitor takes one client at a time and the agent holds it), a second QEMU is launched
 *   from the first one's argv with its own QMP/pidfile/console/OS-channel paths and
 *   `-incoming defer`, and the bench drives both QMPs with the agent's own capabilities and
 *   parameters (agent/migrate/policy.ts) and its pre-switchover step.
 *
 * Per run (medians on top, every run under `samples`):
 * - total_ms: capsule/linuxvm: MigrateCapsule's total (request → capsule running on the target
 *   and released at the source, incl. setup_ms); direct: QEMU's total-time on the source.
 * - setup_ms: capsule/linuxvm: checks, image check and PrepareIncoming before streaming;
 *   direct: launching the target QEMU, both QMP sessions and migrate-incoming.
 * - transfer_ms: `migrate` issued → target QEMU's RESUME event.
 * - downtime_ms: the guest's stop as the source QEMU measured it (query-migrate downtime).
 * - stop_to_resume_ms: source STOP event → target RESUME event (QEMU event timestamps).
 * - gap_ms: capsule/linuxvm: the longest time between two answers a client saw (netclient
 *   redis-loop, INCR+PING pairs every 10 ms, 2 s request timeout, through node-0's address the
 *   whole time: node-0 forwards to node-1 while the capsule is there); direct: stop_to_resume_ms
 *   (no client can follow a QEMU to a new slirp port).
 * - bytes: RAM bytes sent (query-migrate ram.transferred on the source).
 *
 * After every migration redis must still hold the key (GET at the target's own address and
 * port, and for capsule/linuxvm also through node-0). Throws (non-zero exit) if any
 * measurement fails rather than reporting zeros.
 * Run: `deno task bench migration` or `deno run -A test/bench/migration.ts`.
 */
import { fileURLToPath } from "node:url";
import { type FlexcapClient, migrate } from "../../agent/cli/client.ts";
import { type Capsule, CapsuleState } from "../../agent/gen/flexcap/v1/capsule.ts";
import type { MigrationResult } from "../../agent/gen/flexcap/v1/migration.ts";
import {
  capabilities,
  chooseMode,
  type MigrationMode,
  resolveOptions,
  SINGLE_PASS_SYNCS,
  sourceParameters,
} from "../../agent/migrate/policy.ts";
import type { MigrationOptions } from "../../agent/migrate/types.ts";
import { continueSwitchover, queryMigrate, setCapabilities, setParameters } from "../../agent/vmm/migration.ts";
import { QmpClient } from "../../agent/vmm/qmp.ts";
import { spec, startTestAgent, type TestAgent, waitFor } from "../harness/agent.ts";
import { startCluster, type TestCluster } from "../harness/cluster.ts";
import { buildRedisImage, haveFile, KernelKind, REDIS } from "../harness/images.ts";
import type { TestInstance } from "../harness/instance.ts";
import { type LoopStats, netclientResult } from "../harness/netns.ts";
import { envInt, main, median, positive, round1, round2 } from "./report.ts";

const TCP = 1;
const REDIS_PORT = 6379;
const HOST_PORT = 6400;
const CAPSULE_MIB = 48;
/** linuxvm memory when the image's default does not boot redis. */
const LINUXVM_FALLBACK_MIB = 256;
const BOOT_TIMEOUT_MS = { capsule: 60_000, linuxvm: 180_000 } as const;
/** How long a source forwards a moved capsule's ports: longer than any run, so node-0 always answers. */
const GRACE_MS = 600_000;
/** The client loop runs this long before MigrateCapsule is called (netclient's own startup included). */
const LOOP_LEAD_MS = 2_500;
/** …and at least this long after it returned (a hung request times out after 2 s, then reconnects). */
const LOOP_TAIL_MS = 4_000;
/** The first run's loop length, before a migration time is known; later runs use 3× the longest so far. */
const FIRST_LOOP_MS = { capsule: 15_000, linuxvm: 30_000 } as const;
const PAUSE_BETWEEN_MS = 1_000;
const KEY = "bench:migration";
const NETCLIENT = fileURLToPath(new URL("../harness/netclient.ts", import.meta.url));
/** What an interrupt must tear down (clusters, agents). */
const cleanups = new Set<() => Promise<void>>();

const log = (msg: string) => console.error(`bench migration: ${msg}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One migration's figures. */
interface Sample {
  total_ms: number;
  setup_ms: number;
  transfer_ms: number;
  downtime_ms: number;
  stop_to_resume_ms: number;
  gap_ms: number;
  bytes: number;
  rounds: number;
}

/** Medians of the headline figures, every sample, and what else a variant reports. */
function summarize(variant: string, samples: Sample[], extra: Record<string, unknown>) {
  const col = (k: keyof Sample) => samples.map((s) => s[k]);
  const med = (k: keyof Sample) => positive(`${variant} ${k}`, round1(median(col(k))));
  return {
    total_ms: med("total_ms"),
    downtime_ms: med("downtime_ms"),
    gap_ms: med("gap_ms"),
    bytes: med("bytes"),
    transfer_ms: med("transfer_ms"),
    setup_ms: med("setup_ms"),
    stop_to_resume_ms: med("stop_to_resume_ms"),
    ...extra,
    samples: Object.fromEntries((Object.keys(samples[0]) as (keyof Sample)[]).map((k) => [k, col(k)])),
  };
}

/** A capsule's figures from MigrateCapsule, checked. */
function fromResult(
  what: string,
  r: { totalMs: number; setupMs: number; transferMs: number; downtimeMs: number; gapMs: number; bytes: number },
) {
  return {
    total_ms: positive(`${what} total_ms`, r.totalMs),
    setup_ms: positive(`${what} setup_ms`, r.setupMs),
    transfer_ms: positive(`${what} transfer_ms`, r.transferMs),
    downtime_ms: positive(`${what} downtime_ms`, r.downtimeMs),
    stop_to_resume_ms: positive(`${what} stop_to_resume_ms`, r.gapMs),
    bytes: positive(`${what} bytes`, r.bytes),
  };
}

// ---------------------------------------------------------------------------------------------
// capsule / linuxvm: MigrateCapsule between two agents

type ClusterVariant = "capsule" | "linuxvm";

async function capsuleOn(node: TestInstance, name: string): Promise<Capsule | undefined> {
  return (await node.agent.client.capsules.listCapsules({ labelSelector: {} })).capsules.find((c) => c.name === name);
}

/** A redis reply through netclient in the client namespace; throws unless it is `want` (if given). */
async function redisCmd(c: TestCluster, where: string, port: number, args: string[], want?: unknown) {
  const r = await c.net.client.netclient(["redis", where, String(port), ...args, "--timeout-ms", "5000"]) as {
    ok: boolean;
    reply: unknown;
    error?: string;
  };
  if (!r.ok) throw new Error(`redis ${args[0]} at ${where}:${port}: ${r.error}`);
  if (want !== undefined && r.reply !== want) {
    throw new Error(`redis ${args.join(" ")} at ${where}:${port}: got ${JSON.stringify(r.reply)}, want ${want}`);
  }
  return r.reply;
}

/** Creates and starts `name` on node-0 with `memoryMib` (0: the image's default); resolves once it is exposed. */
async function startExposed(c: TestCluster, variant: ClusterVariant, name: string, image: string, memoryMib: number) {
  const node = c.nodes[0];
  const caps = node.agent.client.capsules;
  await caps.createCapsule({
    name,
    spec: spec(image, { memoryMib, ports: [{ guestPort: REDIS_PORT, hostPort: HOST_PORT, protocol: TCP }] }),
  });
  const t0 = performance.now();
  await caps.startCapsule({ capsule: name });
  const deadline = Date.now() + BOOT_TIMEOUT_MS[variant];
  for (;;) {
    const cap = await capsuleOn(node, name);
    if (cap?.exposed.length === 1) return { cap, bootMs: performance.now() - t0 };
    if (cap?.state === CapsuleState.CAPSULE_STATE_STOPPED) throw new Error(`${name} stopped: ${cap.stateReason}`);
    if (Date.now() > deadline) throw new Error(`${name} not exposed within ${BOOT_TIMEOUT_MS[variant]} ms`);
    await sleep(100);
  }
}

async function removeCapsule(client: FlexcapClient, name: string): Promise<void> {
  await client.capsules.stopCapsule({ capsule: name, graceMs: 1_000 }).catch(() => {});
  await client.capsules.deleteCapsule({ capsule: name }).catch(() => {});
}

/**
 * Debian's kernel comes from apt, which agents in the test net cannot reach: an agent on this
 * host's network builds the image once, which caches the kernel where every agent looks.
 */
async function cacheLinuxVmKernel(): Promise<void> {
  const agent = await startTestAgent();
  cleanups.add(agent.cleanup);
  try {
    await buildRedisImage(agent.client, "redis-vm", KernelKind.KERNEL_KIND_LINUX_VM);
  } finally {
    await agent.cleanup();
    cleanups.delete(agent.cleanup);
  }
}

async function clusterVariant(variant: ClusterVariant, runs: number) {
  const kernel = variant === "capsule" ? KernelKind.KERNEL_KIND_CAPSULE : KernelKind.KERNEL_KIND_LINUX_VM;
  const image = variant === "capsule" ? "redis" : "redis-vm";
  const name = `kv-${variant}`;
  if (variant === "linuxvm") {
    log("linuxvm: caching Debian's kernel from this host's network (the test net has no route to apt)");
    await cacheLinuxVmKernel();
  }
  log(`${variant}: starting a 2-node cluster`);
  const c = await startCluster(2, { configYaml: `migration:\n  grace_ms: ${GRACE_MS}\n` });
  cleanups.add(c.cleanup);
  try {
    const front = c.nodes[0].host.address;
    // The image on both nodes, so no run pays for pushing it (same inputs, same content-addressed id).
    const ids = [];
    for (const n of c.nodes) ids.push((await buildRedisImage(n.agent.client, image, kernel)).id);
    if (ids[0] !== ids[1]) log(`${variant}: image ids differ per node (${ids.join(", ")}); run 1 pushes it`);

    let started: Awaited<ReturnType<typeof startExposed>>;
    const mibs = variant === "capsule" ? [CAPSULE_MIB] : [0, LINUXVM_FALLBACK_MIB];
    for (let k = 0;; k++) {
      try {
        started = await startExposed(c, variant, name, image, mibs[k]);
        break;
      } catch (err) {
        await removeCapsule(c.nodes[0].agent.client, name);
        if (k + 1 >= mibs.length) throw err;
        log(`${variant}: did not come up with ${mibs[k] || "the default"} MiB (${err}); trying ${mibs[k + 1]} MiB`);
      }
    }
    const memoryMib = positive(`${variant} memory`, started.cap.spec?.memoryMib ?? 0);
    log(`${variant}: ${memoryMib} MiB guest exposed ${round1(started.bootMs)} ms after StartCapsule`);

    const samples: Sample[] = [];
    const loops: LoopStats[] = [];
    const directions: string[] = [];
    let mode = "";
    let on = 0;
    for (let i = 0; i < runs; i++) {
      const from = c.nodes[on];
      const to = 1 - on;
      await waitFor(
        `${name} exposed on node-${on}`,
        async () => (await capsuleOn(from, name))?.exposed.length === 1,
        30_000,
      );
      const value = `run-${i}-${crypto.randomUUID()}`;
      await redisCmd(c, front, HOST_PORT, ["SET", KEY, value], "OK");

      const maxTotal = Math.max(0, ...samples.map((s) => s.total_ms));
      const loopMs = Math.round(
        i === 0 ? FIRST_LOOP_MS[variant] : Math.max(LOOP_LEAD_MS + 3 * maxTotal + LOOP_TAIL_MS, 8_000),
      );
      const loopStart = Date.now();
      const loop = c.net.client.spawnNetclient([
        "redis-loop",
        front,
        String(HOST_PORT),
        "--duration-ms",
        String(loopMs),
      ]);
      let r: MigrationResult;
      let loopRes: LoopStats;
      try {
        await sleep(LOOP_LEAD_MS);
        r = await migrate(from.agent.client, { capsule: name, targetPeer: c.names[to], options: undefined });
        const migrated = Date.now();
        loopRes = await netclientResult(loop) as LoopStats;
        // The loop must have seen the service come back, not ended while it was away.
        if (migrated + LOOP_TAIL_MS > loopStart + loopMs) {
          throw new Error(
            `run ${i + 1}: the client loop (${loopMs} ms) ended ${loopStart + loopMs - migrated} ms after the ` +
              `migration; its gap may be cut short`,
          );
        }
      } finally {
        try {
          loop.kill("SIGKILL");
        } catch { /* exited */ }
        await loop.status;
      }
      if (loopRes.requests - loopRes.failures < 2) {
        throw new Error(`run ${i + 1}: client loop got no answers: ${loopRes.errors.join("; ")}`);
      }
      const port = r.targetPorts.find((p) => p.guestPort === REDIS_PORT)?.hostPort;
      if (!port || !r.targetAddress) throw new Error(`run ${i + 1}: no target port in ${JSON.stringify(r)}`);
      // Sanity: the key at the target's own address, and through node-0 (forwarding or home again).
      await redisCmd(c, r.targetAddress, port, ["GET", KEY], value);
      await redisCmd(c, front, HOST_PORT, ["GET", KEY], value);
      const s: Sample = {
        ...fromResult(`${variant} run ${i + 1}`, r),
        gap_ms: positive(`${variant} run ${i + 1} client gap`, loopRes.max_gap_ms),
        rounds: r.rounds,
      };
      samples.push(s);
      loops.push(loopRes);
      directions.push(`node-${on}→node-${to}`);
      mode = r.mode;
      log(
        `${variant} run ${i + 1}/${runs} node-${on}→node-${to}: total ${s.total_ms} ms (setup ${s.setup_ms}, ` +
          `transfer ${s.transfer_ms}), downtime ${s.downtime_ms} ms, stop→resume ${s.stop_to_resume_ms} ms, ` +
          `client gap ${s.gap_ms} ms (${loopRes.failures}/${loopRes.requests} failed), ` +
          `${round1(s.bytes / 1048576)} MiB, ${s.rounds} syncs, ${r.mode}`,
      );
      on = to;
      await sleep(PAUSE_BETWEEN_MS);
    }
    await removeCapsule(c.nodes[on].agent.client, name);
    return summarize(variant, samples, {
      memory_mib: memoryMib,
      boot_to_exposed_ms: round1(started.bootMs),
      mode,
      directions,
      loop_failures: loops.map((l) => l.failures),
      loop_requests: loops.map((l) => l.requests),
      loop_errors: [...new Set(loops.flatMap((l) => l.errors))].slice(0, 5),
    });
  } finally {
    await c.cleanup();
    cleanups.delete(c.cleanup);
  }
}

// ---------------------------------------------------------------------------------------------
// direct: QEMU → unix socket → QEMU

/** netclient on this host's network (the usermode agent's forwards are on 127.0.0.1). */
async function hostRedis(port: number, args: string[], want: unknown): Promise<void> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-config", NETCLIENT, "redis", "127.0.0.1", String(port), ...args, "--timeout-ms", "5000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  const last = dec.decode(out.stdout).trimEnd().split("\n").pop() ?? "";
  let r: { ok?: boolean; reply?: unknown; error?: string } = {};
  try {
    r = JSON.parse(last);
  } catch { /* reported below */ }
  if (out.code !== 0 || !r.ok || r.reply !== want) {
    throw new Error(
      `redis ${args.join(" ")} at 127.0.0.1:${port}: got ${JSON.stringify(r)} (exit ${out.code}), want ${want}: ` +
        dec.decode(out.stderr).trim(),
    );
  }
}

/** A TCP port on 127.0.0.1 that is free right now. */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** `-opt key=value,…` → the value of `key`. */
function optValue(arg: string, key: string): string | undefined {
  return arg.split(",").find((p) => p.startsWith(`${key}=`))?.slice(key.length + 1);
}

/**
 * The target's argv: the source's with its own per-instance paths under `dir` (QMP, pidfile,
 * console log, OS channel socket), a slirp netdev of the same id whose only forward is
 * 127.0.0.1:`port` → redis (for the sanity check; no clash with the source's), a different
 * -name, and `-incoming defer`. Devices, ids, memory backend, kernel, initrd and disk are kept.
 */
function targetArgs(src: string[], dir: string, port: number): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < src.length; i++) {
    const a = src[i];
    const v = src[i + 1];
    const take = (nv: string) => {
      out.push(a, nv);
      seen.add(a);
      i++;
    };
    switch (a) {
      case "-name":
        take("guest=bench-direct-target,process=flexcap-bench-direct");
        break;
      case "-qmp":
        take(`unix:${dir}/qmp.sock,server=on,wait=off`);
        break;
      case "-pidfile":
        take(`${dir}/qemu.pid`);
        break;
      case "-chardev": {
        const id = optValue(v, "id");
        if (v.startsWith("file,") && id) take(`file,id=${id},path=${dir}/${id}.log,append=on`);
        else if (v.startsWith("socket,") && id) take(`socket,id=${id},path=${dir}/${id}.sock,server=on,wait=off`);
        else throw new Error(`unexpected -chardev ${v}`);
        break;
      }
      case "-netdev": {
        if (!v.startsWith("user,")) throw new Error(`direct needs a usermode (slirp) capsule, got -netdev ${v}`);
        const kept = v.split(",").filter((p) => !p.startsWith("hostfwd="));
        take(`${kept.join(",")},hostfwd=tcp:127.0.0.1:${port}-:${REDIS_PORT}`);
        break;
      }
      case "-incoming":
        throw new Error("the source QEMU was started with -incoming");
      default:
        out.push(a);
    }
  }
  for (const f of ["-name", "-qmp", "-pidfile", "-chardev", "-netdev"]) {
    if (!seen.has(f)) throw new Error(`source argv has no ${f}`);
  }
  return [...out, "-incoming", "defer"];
}

/** QMP sessions and pids of one direct migration's two QEMUs, for cleanup. */
interface DirectEnds {
  sq?: QmpClient;
  tq?: QmpClient;
  targetPid?: number;
}

/** Migrates the (agent-less) source QEMU with `argv` to a new QEMU; returns the figures and the target's port. */
async function directOnce(
  argv: string[],
  sourcePid: number,
  dir: string,
  mode: MigrationMode,
  opts: MigrationOptions,
  ends: DirectEnds,
): Promise<{ sample: Sample; port: number }> {
  const qmpArg = argv[argv.indexOf("-qmp") + 1] ?? "";
  const sourceQmp = /^unix:([^,]+)/.exec(qmpArg)?.[1];
  if (!sourceQmp) throw new Error(`source QMP not found in ${qmpArg}`);
  const capsuleDir = sourceQmp.slice(0, sourceQmp.lastIndexOf("/"));
  const port = freePort();
  const args = targetArgs(argv.slice(1), dir, port);
  // What is left of the source's own directory must be read-only inputs (the fw_cfg launch config).
  const leftover = args.filter((a) => a.includes(capsuleDir) && !a.startsWith("name=opt/"));
  if (leftover.length) throw new Error(`target argv still names source paths: ${leftover.join(" ")}`);

  const t0 = performance.now();
  const launched = await new Deno.Command(argv[0], { args, stdout: "piped", stderr: "piped" }).output();
  if (launched.code !== 0) {
    throw new Error(`target QEMU exited ${launched.code}: ${new TextDecoder().decode(launched.stderr).trim()}`);
  }
  ends.targetPid = Number((await Deno.readTextFile(`${dir}/qemu.pid`)).trim());
  const tq = ends.tq = await QmpClient.connect(`${dir}/qmp.sock`);
  const sq = ends.sq = await QmpClient.connect(sourceQmp);
  const caps = capabilities(mode, opts);
  await setCapabilities(tq, caps);
  await setCapabilities(sq, caps);
  await setParameters(sq, sourceParameters(mode, opts));
  const resumed = tq.waitForEvent("RESUME", { timeoutMs: opts.timeoutMs });
  let stopAt: number | undefined;
  sq.on("STOP", (e) => stopAt ??= e.timestampMs);
  const sock = `${dir}/migrate.sock`;
  await tq.execute("migrate-incoming", { uri: `unix:${sock}` });
  const setupMs = performance.now() - t0;

  const paused = sq.waitForEvent("MIGRATION", {
    timeoutMs: opts.timeoutMs,
    predicate: (e) => ["pre-switchover", "failed", "cancelled"].includes(String(e.data.status)),
  });
  const tMigrate = Date.now();
  await sq.execute("migrate", { uri: `unix:${sock}` });
  const ev = await paused;
  if (ev.data.status !== "pre-switchover") {
    const s = await queryMigrate(sq).catch(() => undefined);
    throw new Error(`source migration ${ev.data.status}: ${s?.errorDesc ?? "no detail"}`);
  }
  const atSwitch = await queryMigrate(sq);
  // The agent refuses to continue here otherwise (see policy.ts switchoverDecision): the guest could be corrupt.
  if (mode === "single-pass" && atSwitch.dirtySyncCount !== SINGLE_PASS_SYNCS) {
    throw new Error(`single pass ran past an intermediate dirty sync (${atSwitch.dirtySyncCount} syncs)`);
  }
  await continueSwitchover(sq);
  const deadline = Date.now() + opts.timeoutMs;
  let done = await queryMigrate(sq);
  while (done.status !== "completed") {
    if (["failed", "cancelled"].includes(done.status) || Date.now() > deadline) {
      throw new Error(`source migration ${done.status}: ${done.errorDesc ?? "no detail"}`);
    }
    await sleep(5);
    done = await queryMigrate(sq);
  }
  const resume = await resumed;
  const incoming = await queryMigrate(tq);
  if (incoming.status !== "completed") throw new Error(`target migration status ${incoming.status}`);
  if (stopAt === undefined) throw new Error("the source QEMU sent no STOP event");
  const what = "direct";
  const stopToResume = positive(`${what} stop_to_resume_ms`, resume.timestampMs - stopAt);
  const sample: Sample = {
    total_ms: positive(`${what} total_ms`, done.totalTimeMs),
    setup_ms: positive(`${what} setup_ms`, round1(setupMs)),
    transfer_ms: positive(`${what} transfer_ms`, resume.timestampMs - tMigrate),
    downtime_ms: positive(`${what} downtime_ms`, done.downtimeMs),
    stop_to_resume_ms: stopToResume,
    gap_ms: stopToResume,
    bytes: positive(`${what} bytes`, done.transferred),
    rounds: done.dirtySyncCount,
  };
  // The source's guest must never run again: it goes before anything else happens.
  sq.close();
  await sq.closed;
  Deno.kill(sourcePid, "SIGKILL");
  return { sample, port };
}

/** Ends one direct run's QEMUs and QMP sessions. Never throws. */
async function endDirect(ends: DirectEnds): Promise<void> {
  ends.sq?.close();
  ends.tq?.close();
  if (ends.targetPid) {
    try {
      Deno.kill(ends.targetPid, "SIGKILL");
    } catch { /* gone */ }
  }
  await Promise.allSettled([ends.sq?.closed, ends.tq?.closed]);
}

async function directVariant(runs: number) {
  log("direct: starting a usermode agent");
  const agent: TestAgent = await startTestAgent();
  cleanups.add(agent.cleanup);
  const scratch = await Deno.makeTempDir({ prefix: "flexcap-bench-migration-" });
  try {
    const info = await agent.client.agent.getAgentInfo({});
    const { mode, why } = chooseMode(info.qemuVersion, info.accelerator === "kvm" ? "kvm" : "tcg");
    const opts = resolveOptions(undefined, mode, 0);
    log(`direct: mode ${mode} (${why})`);
    await buildRedisImage(agent.client, "redis");
    const samples: Sample[] = [];
    for (let i = 0; i < runs; i++) {
      const name = `kv-direct-${i}`;
      const caps = agent.client.capsules;
      await caps.createCapsule({
        name,
        spec: spec("redis", {
          memoryMib: CAPSULE_MIB,
          ports: [{ guestPort: REDIS_PORT, hostPort: 0, protocol: TCP }],
        }),
      });
      await caps.startCapsule({ capsule: name });
      const cap = await waitFor(`${name} exposed`, async () => {
        const c = (await caps.getCapsule({ capsule: name })).capsule;
        return c?.exposed.length === 1 ? c : undefined;
      }, BOOT_TIMEOUT_MS.capsule);
      const sourcePort = cap.ports[0]?.hostPort;
      if (!sourcePort || !cap.qemuPid) throw new Error(`${name}: no host port or QEMU pid`);
      const value = `run-${i}-${crypto.randomUUID()}`;
      await hostRedis(sourcePort, ["SET", KEY, value], "OK");
      const argv = (await Deno.readTextFile(`/proc/${cap.qemuPid}/cmdline`)).split("\0").filter((a) => a !== "");
      const dir = `${scratch}/run-${i}`;
      await Deno.mkdir(dir);
      // QMP serves one client at a time and the agent holds it: the agent goes (its QEMU stays).
      await agent.kill9();
      const ends: DirectEnds = {};
      try {
        const { sample, port } = await directOnce(argv, cap.qemuPid, dir, mode, opts, ends);
        // Sanity: the key in the target QEMU's guest.
        await hostRedis(port, ["GET", KEY], value);
        samples.push(sample);
        log(
          `direct run ${i + 1}/${runs}: total ${sample.total_ms} ms (setup ${sample.setup_ms}, transfer ` +
            `${sample.transfer_ms}), downtime ${sample.downtime_ms} ms, stop→resume ${sample.stop_to_resume_ms} ms, ` +
            `${round1(sample.bytes / 1048576)} MiB, ${sample.rounds} syncs`,
        );
      } finally {
        try {
          Deno.kill(cap.qemuPid, "SIGKILL");
        } catch { /* gone */ }
        await endDirect(ends);
        await agent.restart();
        await removeCapsule(agent.client, name);
      }
      await sleep(PAUSE_BETWEEN_MS);
    }
    return summarize("direct", samples, {
      memory_mib: CAPSULE_MIB,
      mode,
      network: "usermode (slirp)",
      transport: "unix socket, QEMU to QEMU",
    });
  } finally {
    await agent.cleanup();
    cleanups.delete(agent.cleanup);
    await Deno.remove(scratch, { recursive: true }).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------

/** The suite: see the module comment. */
export async function run(): Promise<Record<string, unknown>> {
  const runs = envInt("BENCH_RUNS", 5);
  if (!haveFile(REDIS)) throw new Error(`${REDIS} is missing: every variant migrates redis`);
  const onSignal = async () => {
    log("interrupted; cleaning up");
    for (const f of cleanups) await f().catch(() => {});
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    log(`${runs} runs per variant`);
    const capsule = await clusterVariant("capsule", runs);
    const linuxvm = await clusterVariant("linuxvm", runs);
    const direct = await directVariant(runs);
    return {
      capsule,
      linuxvm,
      direct,
      capsule_vs_linuxvm_total: round2(linuxvm.total_ms / capsule.total_ms),
      capsule_vs_linuxvm_gap: round2(linuxvm.gap_ms / capsule.gap_ms),
      capsule_vs_linuxvm_bytes: round2(linuxvm.bytes / capsule.bytes),
      relay_vs_direct_transfer: round2(capsule.transfer_ms / direct.transfer_ms),
      relay_vs_direct_downtime: round2(capsule.downtime_ms / direct.downtime_ms),
      runs,
      notes: {
        total_ms: "capsule/linuxvm: MigrateCapsule request -> capsule running on the target and released at the " +
          "source (includes setup_ms and the commit); direct: QEMU's total-time on the source (migrate -> " +
          "completed), without the target's launch (its setup_ms).",
        gap_ms: "capsule/linuxvm: longest time between two answers of a client loop (netclient redis-loop: INCR+PING " +
          "every 10 ms, 2 s request timeout, reconnect after failures) through node-0's address during the whole " +
          "migration; a request stuck on a dead connection counts its timeout. direct: stop_to_resume_ms.",
        downtime_ms: "the source QEMU's own downtime figure (query-migrate)",
        stop_to_resume_ms: "source QEMU STOP event -> target QEMU RESUME event (QMP timestamps, same machine)",
        transfer_ms: "QMP migrate on the source -> target RESUME event",
        bytes: "RAM bytes sent, query-migrate ram.transferred on the source",
        direct: "same redis image and guest size as capsule, but a usermode (slirp) agent outside any namespace, " +
          "killed before each migration (its QEMU keeps running) because QMP serves one client at a time; the " +
          "target QEMU is the source's argv with its own QMP/pidfile/console/OS-channel paths, a slirp netdev of " +
          "the same id forwarding a fresh 127.0.0.1 port (for the sanity GET) and -incoming defer; same " +
          "capabilities, parameters and pre-switchover check as the agent. Each run migrates a freshly booted " +
          "capsule.",
        linuxvm: "Debian's kernel boots the same redis; memory_mib is the image default unless it did not come up",
        ratios: "capsule_vs_linuxvm_* = linuxvm / capsule; relay_vs_direct_* = capsule / direct",
        images: "built on both nodes before the runs (same content id), so no run pushes the image",
        noise: "QEMU runs under this machine's accelerator (TCG: guest CPU time is host CPU time); agents, relays, " +
          "client and QEMUs share the host CPUs.",
      },
    };
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
}

if (import.meta.main) await main("migration");
