/**
 * Builds a capsule image: the app, exactly the shared libraries it needs (from its ELF
 * dependencies), extra files, the kernel's modules and capsule-init as /init, packed into
 * a deterministic cpio initramfs. Identical inputs give identical bytes, hence one id.
 */
import { basename, join } from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "../errors.ts";
import { CpioWriter } from "./cpio.ts";
import { guestLibraryPath, resolveDependencies } from "./deps.ts";
import type { KernelFiles } from "./kernels.ts";

/** One file to pack: where it goes in the guest and where its bytes come from. */
interface PackEntry {
  guestPath: string;
  hostPath: string;
  mode?: number;
}

/** What the builder needs. */
export interface InitramfsInput {
  executable: string;
  files: { hostPath: string; guestPath: string }[];
  kernel: KernelFiles;
  capsuleInit: string;
}

/** What ends up in the manifest. */
export interface InitramfsResult {
  bytes: number;
  files: string[];
  /** Environment the app needs to find its libraries (LD_LIBRARY_PATH), if any. */
  env: Record<string, string>;
}

// Mount points capsule-init uses; they must exist in the initramfs.
const GUEST_DIRS = ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root", "/lib/modules/flexcap"];

/** Writes the initramfs for `input` to `outPath`. */
export async function buildInitramfs(input: InitramfsInput, outPath: string): Promise<InitramfsResult> {
  try {
    await Deno.stat(input.capsuleInit);
  } catch {
    throw new FailedPreconditionError(
      `capsule-init not found at ${input.capsuleInit}; build it with \`make -C capsule-os/init\``,
    );
  }
  const deps = await resolveDependencies(input.executable);
  const entries: PackEntry[] = [{ guestPath: input.executable, hostPath: input.executable }];
  for (const lib of deps.libraries) entries.push({ guestPath: lib.path, hostPath: lib.realPath });
  for (const f of input.files) entries.push(...await expand(f.hostPath, f.guestPath));
  const seen = new Set<string>();
  const unique = entries.filter((e) => !seen.has(e.guestPath) && seen.add(e.guestPath));
  unique.sort((a, b) => (a.guestPath < b.guestPath ? -1 : a.guestPath > b.guestPath ? 1 : 0));

  const out = await Deno.open(outPath, { write: true, create: true, truncate: true, mode: 0o600 });
  try {
    const cpio = new CpioWriter(out);
    for (const d of GUEST_DIRS) await cpio.addDirectory(d, d === "/tmp" ? 0o1777 : 0o755);
    await cpio.addFileFromHost("/init", input.capsuleInit, 0o755);
    for (const [i, m] of input.kernel.modules.entries()) {
      // The numeric prefix fixes the load order capsule-init follows (lexical).
      await cpio.addFileFromHost(`/lib/modules/flexcap/${String(10 + i)}-${basename(m)}`, m, 0o644);
    }
    for (const e of unique) await cpio.addFileFromHost(e.guestPath, e.hostPath, e.mode);
    const { bytes } = await cpio.finish();
    await out.sync();
    const libPath = guestLibraryPath(deps);
    return { bytes, files: unique.map((e) => e.guestPath), env: libPath ? { LD_LIBRARY_PATH: libPath } : {} };
  } finally {
    out.close();
  }
}

// A directory is packed with everything below it; symlinks are followed.
async function expand(hostPath: string, guestPath: string): Promise<PackEntry[]> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(hostPath);
  } catch {
    throw new InvalidArgumentError("files.host_path", `${hostPath} does not exist on this instance`);
  }
  if (info.isFile) return [{ guestPath, hostPath }];
  if (!info.isDirectory) throw new InvalidArgumentError("files.host_path", `${hostPath} is not a file or directory`);
  const out: PackEntry[] = [];
  for await (const e of Deno.readDir(hostPath)) {
    out.push(...await expand(join(hostPath, e.name), join(guestPath, e.name)));
  }
  return out;
}
