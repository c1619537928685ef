/**
 * Memory benchmark: the smallest guest RAM in which each image boots and serves a request,
 * found by MeasureImage (real boots under this machine's accelerator, bisection over MiB,
 * BENCH_ATTEMPTS boots per size, default 2) and recorded in each image's manifest:
 *
 * - capsule_httpd / capsule_redis: the tiny capsule kernel, capsule-init as PID 1 and the
 *   app on a read-only erofs root disk;
 * - linuxvm_httpd / linuxvm_redis: Debian's cloud kernel with the same apps in its initramfs
 *   (the "Linux VM" baseline).
 *
 * It also reports capsule-init's size and its resident memory inside a running capsule
 * (read from /proc/1/status by an app in the guest), the guest's own view of its memory at
 * the minimum, and each image's sizes. Last stdout line: one JSON object.
 * Run: `deno task bench memory`.
 */
import { Buffer } from "node:buffer";
import { defaultCapsuleInit } from "../../agent/agent.ts";
import type { Image } from "../../agent/gen/flexcap/v1/image.ts";
import { buildHttpdImage, spec, startTestAgent, type TestAgent, waitFor } from "../harness/agent.ts";
import { buildRedisImage, buildShellImage, haveFile, KernelKind, REDIS } from "../harness/images.ts";
import { logsText, privatePortsConfig } from "../integration/_util.ts";
import { main } from "./report.ts";

const log = (msg: string) => console.error(`bench memory: ${msg}`);
const enc = (s: string) => Buffer.from(s);

const HTTP = { guestPort: 80, send: enc("GET / HTTP/1.0\r\n\r\n"), expect: enc("HTTP/1.") };
const REDIS_PING = { guestPort: 6379, send: enc("PING\r\n"), expect: enc("+PONG") };

interface Case {
  key: string;
  build(a: TestAgent): Promise<Image>;
  probe: typeof HTTP;
  lowMib: number;
  highMib: number;
}

function attempts(): number {
  const n = Number(Deno.env.get("BENCH_ATTEMPTS") ?? 2);
  if (!Number.isInteger(n) || n < 1) throw new Error("BENCH_ATTEMPTS must be a positive integer");
  return n;
}

const CASES: Case[] = [
  {
    key: "capsule_httpd",
    build: (a) => buildHttpdImage(a.client, "capsule-httpd", "hi\n", KernelKind.KERNEL_KIND_CAPSULE),
    probe: HTTP,
    lowMib: 4,
    highMib: 64,
  },
  {
    key: "capsule_redis",
    build: (a) => buildRedisImage(a.client, "capsule-redis", KernelKind.KERNEL_KIND_CAPSULE),
    probe: REDIS_PING,
    lowMib: 4,
    highMib: 96,
  },
  {
    key: "linuxvm_httpd",
    build: (a) => buildHttpdImage(a.client, "linuxvm-httpd", "hi\n", KernelKind.KERNEL_KIND_LINUX_VM),
    probe: HTTP,
    lowMib: 40,
    highMib: 192,
  },
  {
    key: "linuxvm_redis",
    build: (a) => buildRedisImage(a.client, "linuxvm-redis", KernelKind.KERNEL_KIND_LINUX_VM),
    probe: REDIS_PING,
    lowMib: 40,
    highMib: 256,
  },
];

/** capsule-init's own resident memory and the guest's MemTotal/MemAvailable, from inside a capsule of `mib`. */
async function guestView(a: TestAgent, want: number): Promise<Record<string, number>> {
  const image = await buildShellImage(
    a.client,
    "meminfo",
    "grep -E '^(VmRSS|VmHWM)' /proc/1/status; grep -E '^(MemTotal|MemFree|MemAvailable)' /proc/meminfo; sleep 3600",
  );
  // The estimate of this unmeasured image may be above the measured httpd minimum.
  const mib = Math.max(want, image.minMemoryMib);
  const c = a.client.capsules;
  await c.createCapsule({ name: "meminfo", spec: spec("meminfo", { memoryMib: mib }) });
  await c.startCapsule({ capsule: "meminfo" });
  try {
    const text = await waitFor("guest meminfo", async () => {
      const t = await logsText(a.client, "meminfo");
      return /MemAvailable/.test(t) ? t : undefined;
    }, 60_000);
    const kib = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
    return {
      memory_mib: mib,
      capsule_init_rss_kib: kib("VmRSS"),
      capsule_init_hwm_kib: kib("VmHWM"),
      guest_mem_total_kib: kib("MemTotal"),
      guest_mem_available_kib: kib("MemAvailable"),
    };
  } finally {
    await c.stopCapsule({ capsule: "meminfo", graceMs: 1000 }).catch(() => {});
    await c.deleteCapsule({ capsule: "meminfo" }).catch(() => {});
  }
}

/** Runs the suite. */
export async function run(): Promise<Record<string, unknown>> {
  const n = attempts();
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  try {
    const min: Record<string, number | null> = {};
    const images: Record<string, unknown> = {};
    for (const k of CASES) {
      if (k.key.endsWith("redis") && !haveFile(REDIS)) {
        log(`${k.key}: ${REDIS} missing, skipped`);
        min[k.key] = null;
        continue;
      }
      log(`${k.key}: building`);
      const built = await k.build(agent);
      log(`${k.key}: measuring between ${k.lowMib} and ${k.highMib} MiB, ${n} boot(s) per size`);
      const t0 = performance.now();
      const r = await agent.client.images.measureImage({
        image: built.id,
        probe: k.probe,
        lowMib: k.lowMib,
        highMib: k.highMib,
        attempts: n,
      });
      min[k.key] = r.image!.minMemoryMib;
      images[k.key] = {
        estimated_min_mib: built.minMemoryMib,
        size_bytes: Number(built.sizeBytes),
        files: built.files.length,
        boots: r.steps.length,
        measure_s: Math.round((performance.now() - t0) / 100) / 10,
        steps: r.steps.map((s) =>
          `${s.memoryMib}:${s.ok ? "ok" : "fail"}:${s.elapsedMs}ms${s.ok ? "" : ":" + s.detail.slice(0, 120)}`
        ),
      };
      log(`${k.key}: minimum ${min[k.key]} MiB after ${r.steps.length} boots`);
    }
    const capsuleMin = min.capsule_httpd ?? 32;
    return {
      min_memory_mib: min,
      ratio_linuxvm_to_capsule: {
        httpd: min.linuxvm_httpd && min.capsule_httpd
          ? Math.round(min.linuxvm_httpd / min.capsule_httpd * 10) / 10
          : null,
        redis: min.linuxvm_redis && min.capsule_redis
          ? Math.round(min.linuxvm_redis / min.capsule_redis * 10) / 10
          : null,
      },
      capsule_init_bytes: (await Deno.stat(defaultCapsuleInit())).size,
      // The guest's view inside a capsule given (about) the httpd minimum.
      guest_at_min: await guestView(agent, capsuleMin),
      attempts_per_size: n,
      images,
    };
  } finally {
    await agent.cleanup();
  }
}

if (import.meta.main) await main("memory");
