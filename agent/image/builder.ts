/**
 * Builds a capsule image's guest files: the app, exactly the shared libraries it needs
 * (from its ELF dependencies), extra files, the kernel's modules and capsule-init as
 * /init; packed into a deterministic cpio initramfs, or (capsule kernel) capsule-init in
 * the initramfs and the app on a read-only erofs disk. Identical inputs give identical
 * bytes, hence one id.
 */
import { execa } from "execa";
import { basename, dirname, join } from "node:path";
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
export interface BuildInput {
  executable: string;
  files: { hostPath: string; guestPath: string }[];
  kernel: KernelFiles;
  capsuleInit: string;
}

/** What ends up in the manifest. */
export interface BuildResult {
  /** Bytes of the initramfs. */
  initrdBytes: number;
  /** Bytes of the root disk, when the app lives on one. */
  rootfsBytes: number;
  /** Bytes of the app's files (what a guest holds in RAM when they sit in its initramfs). */
  appBytes: number;
  files: string[];
  /** Environment the app needs to find its libraries (LD_LIBRARY_PATH), if any. */
  env: Record<string, string>;
}

// Mount points capsule-init uses; they must exist in the initramfs.
const INITRAMFS_DIRS = ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root", "/newroot", "/lib/modules/flexcap"];
// ... and in a root disk, which is read-only: only these tmpfs mounts are writable.
const ROOTFS_DIRS = ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc"];
// capsule-init writes the resolver into the writable /run.
const RESOLV_LINK = { path: "/etc/resolv.conf", target: "/run/resolv.conf" };
// erofs metadata is made reproducible: fixed timestamps, owner and UUID.
const EROFS_UUID = "f1e0ca95-0000-4000-8000-000000000000";

/** The app's files: the executable, exactly its shared libraries and the extra files. */
async function collect(input: BuildInput): Promise<{ entries: PackEntry[]; env: Record<string, string> }> {
  const deps = await resolveDependencies(input.executable);
  const entries: PackEntry[] = [{ guestPath: input.executable, hostPath: input.executable }];
  for (const lib of deps.libraries) entries.push({ guestPath: lib.path, hostPath: lib.realPath });
  for (const f of input.files) entries.push(...await expand(f.hostPath, f.guestPath));
  const seen = new Set<string>();
  const unique = entries.filter((e) => !seen.has(e.guestPath) && seen.add(e.guestPath));
  unique.sort((a, b) => (a.guestPath < b.guestPath ? -1 : a.guestPath > b.guestPath ? 1 : 0));
  const libPath = guestLibraryPath(deps);
  return { entries: unique, env: libPath ? { LD_LIBRARY_PATH: libPath } : {} };
}

async function checkInit(path: string): Promise<void> {
  try {
    await Deno.stat(path);
  } catch {
    throw new FailedPreconditionError(`capsule-init not found at ${path}; build it with \`make -C capsule-os/init\``);
  }
}

async function totalBytes(entries: PackEntry[]): Promise<number> {
  let n = 0;
  for (const e of entries) n += (await Deno.stat(e.hostPath)).size;
  return n;
}

/**
 * Builds the image's guest files. With `rootfsPath` the app goes on a read-only erofs disk
 * and the initramfs holds only capsule-init: file pages then come from the disk on demand
 * and can be dropped again, instead of sitting in guest RAM for good (twice while the
 * kernel unpacks the initramfs). Without it everything goes in the initramfs.
 */
export async function buildGuestFiles(
  input: BuildInput,
  initrdPath: string,
  rootfsPath?: string,
): Promise<BuildResult> {
  await checkInit(input.capsuleInit);
  const { entries, env } = await collect(input);
  const appBytes = await totalBytes(entries);
  const initrdBytes = await writeInitramfs(input, rootfsPath ? [] : entries, initrdPath);
  const rootfsBytes = rootfsPath ? await writeErofs(entries, rootfsPath) : 0;
  return { initrdBytes, rootfsBytes, appBytes, files: entries.map((e) => e.guestPath), env };
}

async function writeInitramfs(input: BuildInput, entries: PackEntry[], outPath: string): Promise<number> {
  const out = await Deno.open(outPath, { write: true, create: true, truncate: true, mode: 0o600 });
  try {
    const cpio = new CpioWriter(out);
    for (const d of INITRAMFS_DIRS) await cpio.addDirectory(d, d === "/tmp" ? 0o1777 : 0o755);
    await cpio.addFileFromHost("/init", input.capsuleInit, 0o755);
    for (const [i, m] of input.kernel.modules.entries()) {
      // The numeric prefix fixes the load order capsule-init follows (lexical).
      await cpio.addFileFromHost(`/lib/modules/flexcap/${String(10 + i)}-${basename(m)}`, m, 0o644);
    }
    for (const e of entries) await cpio.addFileFromHost(e.guestPath, e.hostPath, e.mode);
    const { bytes } = await cpio.finish();
    await out.sync();
    return bytes;
  } finally {
    out.close();
  }
}

async function writeErofs(entries: PackEntry[], outPath: string): Promise<number> {
  const stage = await Deno.makeTempDir({ dir: dirname(outPath), prefix: ".rootfs-" });
  try {
    await Deno.chmod(stage, 0o755); // the image's "/" (makeTempDir makes it 0700: non-root apps could not traverse it)
    for (const d of ROOTFS_DIRS) await Deno.mkdir(join(stage, d), { recursive: true, mode: 0o755 });
    await Deno.chmod(join(stage, "tmp"), 0o1777);
    for (const e of entries) {
      const dst = join(stage, e.guestPath);
      await Deno.mkdir(dirname(dst), { recursive: true });
      await Deno.copyFile(e.hostPath, dst);
      if (e.mode !== undefined) await Deno.chmod(dst, e.mode);
    }
    const link = join(stage, RESOLV_LINK.path);
    await Deno.remove(link).catch(() => {});
    await Deno.symlink(RESOLV_LINK.target, link);
    const r = await execa(
      "mkfs.erofs",
      ["--quiet", "-x-1", "-T0", `-U${EROFS_UUID}`, "--all-root", outPath, stage],
      { reject: false, stdin: "ignore" },
    );
    if (r.exitCode !== 0) {
      const why = r.exitCode === undefined || /ENOENT/.test(String(r.message))
        ? "mkfs.erofs not found (apt-get install erofs-utils)"
        : (r.stderr || r.stdout).trim().slice(-300);
      throw new FailedPreconditionError(`building the root disk failed: ${why}`);
    }
    return (await Deno.stat(outPath)).size;
  } finally {
    await Deno.remove(stage, { recursive: true }).catch(() => {});
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
