/**
 * Network benchmark: the bridge backend's NAPT (nftables DNAT on the instance address)
 * against the rootless usermode backend (QEMU slirp hostfwd), inside a private test net of
 * network namespaces (test/harness/netns.ts) that nothing outside this machine sees:
 *
 * - listen_to_reachable_ms: a capsule's app starts listening (`sleep 3.0xx; exec busybox httpd`);
 *   a prober in the instance namespace connects to the capsule's own address:80 every 5 ms
 *   (t_listen: first connect), another in the client namespace to instance:hostPort through
 *   NAPT (t_reachable). Both run on this machine, so their Date.now() compare; the figure is
 *   t_reachable - t_listen, median of BENCH_RUNS (default 5) fresh capsules.
 * - nft_apply_ms / nft_apply_only_ms: replacing the `inet flexcap` table for 1, 100 and 1000
 *   capsules (real taps, one exposed port each) in a namespace of the test net, through the
 *   agent's own renderTable/applyBatch/readTable/compareTable, BENCH_RUNS reps (min 5).
 * - napt / usermode: redis PING back to back (BENCH_LOOP_MS, default 8000) from the client
 *   against the same redis image (48 MiB) behind a bridge agent (instance 0) and behind a
 *   usermode agent (instance 1), plus netclient's redis-loop (INCR+PING pairs, interval 0)
 *   and bulk HTTP downloads of a 4 MiB file (BENCH_DOWNLOADS, default 8).
 *
 * Throws (non-zero exit) if any measurement failed rather than reporting zeros.
 * Run: `deno task bench network` or `deno run -A test/bench/network.ts`.
 */
import { execa } from "execa";
import type { FlexcapClient } from "../../agent/cli/client.ts";
import { BuildImageRequest, type Image, KernelKind } from "../../agent/gen/flexcap/v1/image.ts";
import { tapName } from "../../agent/net/bridge.ts";
import { applyBatch, compareTable, deleteTable, type NftCommandLine, readTable } from "../../agent/net/nft.ts";
import { type CapsuleRules, renderTable, type TableState } from "../../agent/net/nft_render.ts";
import { spec, startTestAgent, type TestAgent, waitFor } from "../harness/agent.ts";
import { buildRedisImage, buildShellImage, haveFile, REDIS } from "../harness/images.ts";
import { startInstance, type TestInstance } from "../harness/instance.ts";
import { createTestNet, type LoopStats, netclientResult, type NsHost, type TestNet } from "../harness/netns.ts";
import { envInt, main, median, positive, round1, round2 } from "./report.ts";

const TCP = 1;
const PROBE_INTERVAL_MS = 5;
const NFT_SIZES = [1, 100, 1000];
const REDIS_MIB = 48;
const BULK_MIB = 48;
const BULK_FILE_BYTES = 4 * 1024 * 1024;
/** Loops may lose this share of requests (a timeout under a noisy neighbour) before the suite fails. */
const MAX_FAILURE_SHARE = 0.01;

const log = (msg: string) => console.error(`bench network: ${msg}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const tcpPort = (guestPort: number, hostPort: number) => ({ guestPort, hostPort, protocol: TCP });

function summary(xs: number[]) {
  return { median: round1(median(xs)), p_max: round1(Math.max(...xs)), samples: xs.map(round1) };
}

// ---------------------------------------------------------------------------------------------
// listen → reachable

interface Probe {
  ok: boolean;
  at_ms: number;
  attempts: number;
  error?: string;
}

async function listenToReachable(inst: TestInstance, net: TestNet, runs: number) {
  const c = inst.agent.client.capsules;
  await buildShellImage(inst.agent.client, "late-httpd", "sleep $DELAY; exec busybox httpd -f -p 80 -h /");
  const deltas: number[] = [];
  const startToListen: number[] = [];
  for (let i = 0; i < runs; i++) {
    const name = `late-${i}`;
    const hostPort = 8080 + i;
    // 3 s and a fraction of capsule-init's 100 ms listen scan, spread over the runs: with a fixed delay the
    // listen would fall at the same phase of the scan every run and the samples would not be independent.
    const delay = (3 + ((i + Math.random()) / runs) * 0.1).toFixed(3);
    const created = (await c.createCapsule({
      name,
      spec: spec("late-httpd", { memoryMib: 32, ports: [tcpPort(80, hostPort)], env: { DELAY: delay } }),
    })).capsule!;
    const ip = created.network?.address.split("/")[0];
    if (!ip) throw new Error(`capsule ${name} has no network address`);
    const probeArgs = ["--interval-ms", String(PROBE_INTERVAL_MS), "--timeout-ms", "120000"];
    const direct = inst.host.spawnNetclient(["probe-until", ip, "80", ...probeArgs]);
    const viaNat = net.client.spawnNetclient(["probe-until", inst.host.address, String(hostPort), ...probeArgs]);
    try {
      await sleep(1_000); // both probers are up and probing before the capsule starts
      const t0 = Date.now();
      await c.startCapsule({ capsule: name });
      const [d, n] = await Promise.all([netclientResult(direct), netclientResult(viaNat)]) as [Probe, Probe];
      if (!d.ok) throw new Error(`run ${i}: capsule ${ip}:80 never answered in its namespace: ${d.error}`);
      if (!n.ok) throw new Error(`run ${i}: ${inst.host.address}:${hostPort} never answered the client: ${n.error}`);
      // A prober that succeeded on its first attempt started after the listen: the sample means nothing.
      if (d.attempts < 2 || n.attempts < 2) {
        throw new Error(`run ${i}: a prober started too late (${d.attempts}, ${n.attempts})`);
      }
      const delta = n.at_ms - d.at_ms;
      // Reachable before listening would mean the probes measure something else.
      if (delta < -2 * PROBE_INTERVAL_MS) throw new Error(`run ${i}: reachable ${-delta} ms before listening`);
      deltas.push(delta);
      startToListen.push(d.at_ms - t0);
      log(`listen run ${i + 1}/${runs}: start→listen ${d.at_ms - t0} ms, listen→reachable ${delta} ms`);
    } finally {
      for (const p of [direct, viaNat]) {
        try {
          p.kill("SIGKILL");
        } catch { /* exited */ }
      }
      await Promise.allSettled([direct.status, viaNat.status]);
      await c.stopCapsule({ capsule: name, graceMs: 1_000 }).catch(() => {});
      await c.deleteCapsule({ capsule: name }).catch(() => {});
    }
  }
  return { deltas, startToListen };
}

// ---------------------------------------------------------------------------------------------
// nft apply

/** Median of `reps` timings of `fn` after one untimed warm-up. */
async function timed(reps: number, fn: () => Promise<void>): Promise<number[]> {
  await fn();
  const out: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await fn();
    out.push(performance.now() - t0);
  }
  return out;
}

function capsuleRules(i: number): CapsuleRules {
  const id = `c-${i.toString(16).padStart(12, "0")}`;
  const n = i + 2; // .0.0 is the network, .0.1 the gateway
  const hex = (b: number) => b.toString(16).padStart(2, "0");
  return {
    id,
    tap: tapName(id),
    ip: `10.200.${n >> 8}.${n & 255}`,
    mac: `02:fc:00:00:${hex(i >> 8)}:${hex(i & 255)}`,
    exposed: [{ guestPort: 80, hostPort: 20_000 + i, protocol: "tcp" }],
  };
}

async function nftApply(host: NsHost, reps: number) {
  const nft: NftCommandLine = ["ip", "netns", "exec", host.ns, "nft"];
  // What the `ip netns exec` wrapper adds to every nft call (the agent runs nft directly).
  const wrapper = await timed(reps, async () => {
    await execa("ip", ["netns", "exec", host.ns, "true"]);
  });
  const all = Array.from({ length: Math.max(...NFT_SIZES) }, (_, i) => capsuleRules(i));
  let taps = 0;
  const total: Record<string, number[]> = {};
  const applyOnly: Record<string, number[]> = {};
  const ruleCount: Record<string, number> = {};
  const chainCount: Record<string, number> = {};
  try {
    for (const size of NFT_SIZES) {
      // Ingress chains hook their tap, so the taps must exist: add the missing ones in one batch.
      const lines = all.slice(taps, size).map((c) => `tuntap add dev ${c.tap} mode tap`);
      if (lines.length) {
        const r = await host.run(["ip", "-batch", "-"], { stdin: lines.join("\n") + "\n", timeoutMs: 120_000 });
        if (r.code !== 0) throw new Error(`creating ${lines.length} taps failed: ${r.stderr.trim()}`);
        taps = size;
      }
      const state: TableState = {
        bridge: "fc0",
        cluster: "10.200.0.0/16",
        capsules: all.slice(0, size),
        allow: [],
        redirects: [],
      };
      const fixed = renderTable(state);
      ruleCount[size] = fixed.nftables.filter((c) => c.add?.rule).length;
      chainCount[size] = fixed.nftables.filter((c) => c.add?.chain).length;
      // What the agent does on every change: render, replace in one transaction, read back, compare.
      total[size] = await timed(reps, async () => {
        const batch = renderTable(state);
        await applyBatch(batch, nft);
        const drift = compareTable(batch, (await readTable(nft)) ?? []);
        if (drift.differences.length) {
          throw new Error(`${size} capsules: table differs: ${drift.differences.slice(0, 3).join("; ")}`);
        }
      });
      applyOnly[size] = await timed(reps, () => applyBatch(fixed, nft));
      log(
        `nft ${size} capsules (${ruleCount[size]} rules): apply+verify ${round1(median(total[size]))} ms, ` +
          `apply ${round1(median(applyOnly[size]))} ms`,
      );
    }
  } finally {
    await deleteTable(nft).catch(() => {});
  }
  return { wrapper, total, applyOnly, ruleCount, chainCount };
}

// ---------------------------------------------------------------------------------------------
// NAPT vs usermode

interface Download {
  ok: boolean;
  downloads: number;
  bytes: number;
  ms: number;
  mbit_s: number;
  failures: number;
  errors: string[];
}

/** An httpd image whose /www/big is BULK_FILE_BYTES of random bytes. */
async function buildBulkImage(client: FlexcapClient): Promise<Image> {
  const www = await Deno.makeTempDir({ prefix: "flexcap-bulk-" });
  try {
    const data = new Uint8Array(BULK_FILE_BYTES);
    for (let off = 0; off < data.length; off += 65536) crypto.getRandomValues(data.subarray(off, off + 65536));
    await Deno.writeFile(`${www}/big`, data);
    return (await client.images.buildImage(BuildImageRequest.fromPartial({
      name: "bulk",
      executable: "/bin/busybox",
      args: ["httpd", "-f", "-p", "80", "-h", "/www"],
      files: [{ hostPath: www, guestPath: "/www" }],
      kernel: KernelKind.KERNEL_KIND_CAPSULE,
    }))).image!;
  } finally {
    await Deno.remove(www, { recursive: true });
  }
}

/** One agent with a path to its capsules from the client. */
interface Side {
  key: "napt" | "usermode";
  agent: TestAgent;
  address: string;
}

function checkLoop(what: string, r: LoopStats): LoopStats {
  const ok = r.requests - r.failures;
  if (ok <= 0) throw new Error(`${what}: no successful request: ${r.errors.join("; ")}`);
  if (r.failures > r.requests * MAX_FAILURE_SHARE) {
    throw new Error(`${what}: ${r.failures} of ${r.requests} requests failed: ${r.errors.join("; ")}`);
  }
  return r;
}

/** Creates and starts `name`, then waits until the client gets an answer (`ready`: netclient args with an ok field). */
async function startAndWait(
  net: TestNet,
  side: Side,
  name: string,
  image: string,
  mib: number,
  port: { guestPort: number; hostPort: number },
  ready: string[],
): Promise<void> {
  const c = side.agent.client.capsules;
  await c.createCapsule({
    name,
    spec: spec(image, { memoryMib: mib, ports: [tcpPort(port.guestPort, port.hostPort)] }),
  });
  await c.startCapsule({ capsule: name });
  await waitFor(
    `${side.key} ${name} answering at ${side.address}:${port.hostPort}`,
    async () => ((await net.client.netclient(ready)) as { ok: boolean }).ok,
    120_000,
  );
}

async function requestLoops(net: TestNet, sides: Side[], loopMs: number, downloads: number) {
  const out: Record<string, Record<string, unknown>> = {};
  for (const s of sides) out[s.key] = {};

  // Redis: both capsules run during both loops, so each loop sees the same background load.
  for (const s of sides) {
    await buildRedisImage(s.agent.client, "redis");
    await startAndWait(net, s, "kv", "redis", REDIS_MIB, { guestPort: 6379, hostPort: 6380 }, [
      "redis",
      s.address,
      "6380",
      "PING",
      "--timeout-ms",
      "1000",
    ]);
  }
  for (const s of sides) {
    const target = [s.address, "6380"];
    await net.client.netclient(["redis-ping-loop", ...target, "--duration-ms", "1000"]); // warm-up
    const ping = checkLoop(
      `${s.key} redis-ping-loop`,
      await net.client.netclient(["redis-ping-loop", ...target, "--duration-ms", String(loopMs)]) as LoopStats,
    );
    const pairs = checkLoop(
      `${s.key} redis-loop`,
      await net.client.netclient([
        "redis-loop",
        ...target,
        "--duration-ms",
        String(loopMs),
        "--interval-ms",
        "0",
      ]) as LoopStats,
    );
    Object.assign(out[s.key], {
      requests_per_s: positive(`${s.key} requests_per_s`, round1(ping.requests_per_s ?? 0)),
      p50_ms: positive(`${s.key} p50`, ping.p50_ms),
      p99_ms: positive(`${s.key} p99`, ping.p99_ms),
      failures: ping.failures,
      requests: ping.requests,
      redis_loop_interval0: {
        requests_per_s: positive(
          `${s.key} redis-loop rate`,
          round1((pairs.requests - pairs.failures) / (loopMs / 1000)),
        ),
        p50_ms: pairs.p50_ms,
        p99_ms: pairs.p99_ms,
        failures: pairs.failures,
      },
    });
    log(`${s.key}: redis PING ${out[s.key].requests_per_s}/s p50 ${ping.p50_ms} ms p99 ${ping.p99_ms} ms`);
  }
  for (const s of sides) {
    await s.agent.client.capsules.stopCapsule({ capsule: "kv", graceMs: 1_000 });
    await s.agent.client.capsules.deleteCapsule({ capsule: "kv" });
  }

  // Bulk: a 4 MiB file over HTTP, a fresh connection per download.
  for (const s of sides) {
    await buildBulkImage(s.agent.client);
    await startAndWait(net, s, "bulk", "bulk", BULK_MIB, { guestPort: 80, hostPort: 8800 }, [
      "http-get",
      s.address,
      "8800",
      "--path",
      "/big",
      "--timeout-ms",
      "5000",
    ]);
  }
  for (const s of sides) {
    const args = ["http-download", s.address, "8800", "--path", "/big", "--timeout-ms", "60000"];
    await net.client.netclient([...args, "--count", "1"], { timeoutMs: 120_000 }); // warm-up (page cache)
    const d = await net.client.netclient([...args, "--count", String(downloads)], {
      timeoutMs: downloads * 60_000 + 30_000,
    }) as Download;
    if (!d.ok) throw new Error(`${s.key} http-download: ${d.failures} of ${downloads} failed: ${d.errors.join("; ")}`);
    out[s.key].throughput_mbit_s = positive(`${s.key} throughput`, round1(d.mbit_s));
    log(`${s.key}: bulk ${d.mbit_s} Mbit/s (${downloads} x 4 MiB in ${d.ms} ms)`);
  }
  for (const s of sides) {
    await s.agent.client.capsules.stopCapsule({ capsule: "bulk", graceMs: 1_000 });
    await s.agent.client.capsules.deleteCapsule({ capsule: "bulk" });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

async function machine(agent: TestAgent) {
  const info = await agent.client.agent.getAgentInfo({});
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const nftVersion = (await execa("nft", ["--version"], { reject: false })).stdout;
  return {
    accelerator: info.accelerator,
    cpu_model: info.cpuModel,
    qemu_version: info.qemuVersion,
    agent_version: info.version,
    host_cpu: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? "unknown",
    host_cpus: navigator.hardwareConcurrency,
    host_memory_mib: Number(info.memoryTotalMib),
    kernel: Deno.osRelease(),
    nft_version: String(nftVersion).trim(),
    deno: Deno.version.deno,
  };
}

/** The suite: see the module comment. */
export async function run(): Promise<Record<string, unknown>> {
  const runs = envInt("BENCH_RUNS", 5);
  const reps = Math.max(5, runs);
  const loopMs = envInt("BENCH_LOOP_MS", 8_000);
  const downloads = envInt("BENCH_DOWNLOADS", 8);
  if (!haveFile(REDIS)) throw new Error(`${REDIS} is missing: the NAPT vs usermode loop needs it`);
  log(`test net with 3 instances (${runs} listen runs, loops ${loopMs} ms, ${downloads} downloads)`);
  const net = await createTestNet({ instances: 3 });
  let inst: TestInstance | undefined;
  let um: TestAgent | undefined;
  const cleanup = async () => {
    await um?.cleanup().catch((e) => log(`usermode agent cleanup: ${e}`));
    await inst?.cleanup().catch((e) => log(`bridge agent cleanup: ${e}`));
    await net.cleanup();
  };
  const onSignal = async () => {
    log("interrupted; cleaning up");
    await cleanup();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    inst = await startInstance(net, 0);
    um = await startTestAgent({
      netns: net.instances[1].ns,
      configYaml: "network:\n  backend: usermode\n  host_address: 0.0.0.0\n",
    });
    const mach = await machine(inst.agent);
    log(`accelerator ${mach.accelerator}, ${mach.host_cpus} host CPUs, ${mach.qemu_version}`);

    const listen = await listenToReachable(inst, net, runs);
    const listenMed = median(listen.deltas);
    if (!Number.isFinite(listenMed)) throw new Error("listen_to_reachable_ms: no samples");

    const loops = await requestLoops(
      net,
      [
        { key: "napt", agent: inst.agent, address: inst.host.address },
        { key: "usermode", agent: um, address: net.instances[1].address },
      ],
      loopMs,
      downloads,
    );
    const napt = loops.napt as { requests_per_s: number; throughput_mbit_s: number };
    const usermode = loops.usermode as { requests_per_s: number; throughput_mbit_s: number };

    const nft = await nftApply(net.instances[2], reps);
    const med = (m: Record<string, number[]>, what: string) =>
      Object.fromEntries(NFT_SIZES.map((n) => [String(n), positive(`${what} ${n}`, round1(median(m[n])))]));

    return {
      listen_to_reachable_ms: round1(listenMed),
      listen_to_reachable: summary(listen.deltas),
      start_to_listen_ms: summary(listen.startToListen),
      nft_apply_ms: med(nft.total, "nft apply+verify"),
      nft_apply_only_ms: med(nft.applyOnly, "nft apply"),
      nft_rules: nft.ruleCount,
      nft_chains: nft.chainCount,
      nft_samples_ms: Object.fromEntries(
        NFT_SIZES.map((
          n,
        ) => [String(n), { apply_verify: nft.total[n].map(round1), apply: nft.applyOnly[n].map(round1) }]),
      ),
      netns_exec_overhead_ms: round1(median(nft.wrapper)),
      napt: loops.napt,
      usermode: loops.usermode,
      ratio: round2(napt.requests_per_s / usermode.requests_per_s),
      throughput_ratio: round2(napt.throughput_mbit_s / usermode.throughput_mbit_s),
      runs,
      nft_reps: reps,
      loop_ms: loopMs,
      downloads,
      machine: mach,
      notes: {
        listen_to_reachable_ms:
          "median over fresh capsules of t_reachable - t_listen: t_listen = first TCP connect to the capsule's own " +
          "address:80 from its instance namespace (direct, not NATed), t_reachable = first connect from the client " +
          `namespace to instance:hostPort through the DNAT rule; both probers connect every ${PROBE_INTERVAL_MS} ms ` +
          "and stamp Date.now() on the same machine. capsule-init scans /proc/net/tcp every 100 ms, so ~50 ms of the " +
          "median is that scan alone; the rest is the report to the agent, its decision and the nft replace+verify. " +
          "The app's delay is 3 s plus a fraction of the 100 ms scan period spread over the runs (stratified), so " +
          "the samples cover the scan phase evenly. start_to_listen_ms is StartCapsule -> t_listen (boot + delay).",
        nft_apply_ms: "median wall time to render, apply (nft -j -f -, one transaction replacing table inet flexcap) " +
          "and read back + compare the table for N capsules, each a real tap with its ingress chain and one exposed " +
          "port, after one untimed warm-up; nft_apply_only_ms is the nft -j -f - call alone. Every nft call runs " +
          "through `ip netns exec` (netns_exec_overhead_ms each; apply+verify makes two calls); the agent calls nft " +
          "directly. nft_rules/nft_chains are the rendered counts.",
        napt_vs_usermode: "napt: a bridge-backend agent in instance 0, the client reaching instance:6380 through " +
          "nftables DNAT; usermode: a usermode agent in instance 1 (host_address 0.0.0.0), the client reaching " +
          "instance:6380 through QEMU slirp's hostfwd. Same redis image, 48 MiB, capsule kernel, both capsules " +
          "running during both loops. requests_per_s/p50_ms/p99_ms: back-to-back PINGs on one connection for " +
          "loop_ms (netclient redis-ping-loop) from the client namespace; ratio = napt/usermode requests_per_s. " +
          "redis_loop_interval0: netclient redis-loop --interval-ms 0 (INCR+PING pairs; its zero-delay timer costs " +
          "a few ms per pair in Deno, which caps both backends alike). throughput_mbit_s: busybox httpd serving a " +
          "4 MiB file, `downloads` sequential HTTP/1.0 downloads, fresh connection each, after one warm-up.",
        noise: "capsules run under this machine's accelerator (TCG: guest CPU time is host CPU time), and client, " +
          "agents and QEMU share the host CPUs with whatever else runs here.",
      },
    };
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await cleanup();
  }
}

if (import.meta.main) await main("network");
