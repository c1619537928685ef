/**
 * The memory-integrity guest workload for live-migration tests (test/fixtures/memtest.c):
 * building it, an image running it, and reading its output and the guest console.
 */
import { fileURLToPath } from "node:url";
import type { FlexcapClient } from "../../agent/cli/client.ts";
import { BuildImageRequest, type Image, KernelKind } from "../../agent/gen/flexcap/v1/image.ts";

const SOURCE = fileURLToPath(new URL("../fixtures/memtest.c", import.meta.url));
const BIN_DIR = "/var/cache/flexcap/test-bin";

/** What a memtest run printed, as read by parseMemtest. */
export interface MemtestReport {
  /** `MEMTEST OK` heartbeats. */
  okBeats: number;
  /** Highest pass number any heartbeat or the exit line gave (0 if none). */
  lastPass: number;
  /** Every `MEMTEST MISMATCH` line. */
  mismatchLines: string[];
  /** The `MEMTEST EXIT` line, if the program got as far. */
  exit?: { passes: number; mismatches: number };
}

/** Compiles memtest.c (cached by the source's sha256) and returns the static binary's path. */
export async function memtestBinary(): Promise<string> {
  const source = await Deno.readFile(SOURCE);
  const hex = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", source)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  const out = `${BIN_DIR}/memtest-${hex.slice(0, 12)}`;
  try {
    if ((await Deno.stat(out)).isFile) return out;
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  await Deno.mkdir(BIN_DIR, { recursive: true });
  const tmp = `${out}.tmp-${Deno.pid}`;
  let r: Deno.CommandOutput;
  try {
    r = await new Deno.Command("musl-gcc", {
      args: ["-static", "-O2", "-Wall", "-Wextra", "-o", tmp, SOURCE],
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error("memtest: musl-gcc not found; install musl-tools (apt-get install -y musl-tools)");
    }
    throw err;
  }
  if (!r.success) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`memtest: musl-gcc failed (exit ${r.code}):\n${new TextDecoder().decode(r.stderr)}`);
  }
  await Deno.rename(tmp, out); // atomic: a concurrent build of the same source writes the same bytes
  return out;
}

/** Builds an image whose app is `memtest mib mode sleepMs` on the capsule kernel. */
export async function buildMemtestImage(
  client: FlexcapClient,
  name: string,
  mib: number,
  mode: "rw" | "ro",
  sleepMs = 0,
): Promise<Image> {
  return (await client.images.buildImage(BuildImageRequest.fromPartial({
    name,
    executable: await memtestBinary(),
    args: [String(mib), mode, String(sleepMs)],
    kernel: KernelKind.KERNEL_KIND_CAPSULE,
  }))).image!;
}

/** Reads memtest's output lines (anywhere in a line, so log prefixes are fine). */
export function parseMemtest(text: string): MemtestReport {
  const report: MemtestReport = { okBeats: 0, lastPass: 0, mismatchLines: [] };
  for (const line of text.split(/\r?\n/)) {
    let m: RegExpMatchArray | null;
    if ((m = line.match(/MEMTEST (?:OK|BAD) pass=(\d+)/))) {
      if (line.includes("MEMTEST OK")) report.okBeats++;
      report.lastPass = Math.max(report.lastPass, Number(m[1]));
    } else if (line.includes("MEMTEST MISMATCH")) {
      report.mismatchLines.push(line);
    } else if ((m = line.match(/MEMTEST EXIT passes=(\d+) mismatches=(\d+)/))) {
      report.exit = { passes: Number(m[1]), mismatches: Number(m[2]) };
      report.lastPass = Math.max(report.lastPass, report.exit.passes);
    }
  }
  return report;
}

/** Lines of a guest console log that report memory corruption or a kernel crash. */
export function guestCorruption(consoleText: string): string[] {
  return consoleText.split(/\r?\n/).filter((line) =>
    /MISMATCH|BUG:|Oops|Kernel panic|corrupted|general protection/.test(line)
  );
}
