/**
 * Guest kernels. "capsule" is our tiny kernel (capsule-os/kernel), built once from
 * Debian's linux-source by build.sh and cached by the hash of its config; QEMU loads its
 * uncompressed vmlinux directly (PVH). "linux-vm" is Debian's stock cloud kernel, fetched
 * with apt (the only source these machines reach) and cached by package version; its
 * virtio drivers are modules that capsule-init loads from /lib/modules/flexcap in order.
 */
import { execa } from "execa";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { UnavailableError } from "../errors.ts";
import type { Logger } from "../log.ts";

/** Sizes an image's minimum memory depends on (MiB). */
export interface ImageSizes {
  initrdMib: number;
  appMib: number;
}

/** A kernel ready to pack: vmlinuz plus the modules the guest must load, in order. */
export interface KernelFiles {
  kind: "capsule" | "linux-vm";
  vmlinuz: string;
  /** The app goes on a read-only erofs disk rather than into the initramfs. */
  rootDisk: boolean;
  /** Host paths of uncompressed .ko files, in load order. */
  modules: string[];
  /** Kernel arguments this kernel always needs. */
  cmdline: string;
  acpi: boolean;
  /** RAM an image gets unless it asks for more. */
  defaultMemoryMib: number;
  /** Estimated smallest RAM an image of these sizes runs in (MeasureImage finds the real one). */
  minMemoryMib(sizes: ImageSizes): number;
}

const META_PACKAGE = "linux-image-cloud-amd64";

// Dependency order from the package's modules.dep: transport, then net (failover first), then console.
// virtio_mmio matches the LNRO0005 devices microvm describes in ACPI.
const LINUX_VM_MODULES = [
  "kernel/drivers/virtio/virtio_ring.ko",
  "kernel/drivers/virtio/virtio.ko",
  "kernel/drivers/virtio/virtio_mmio.ko",
  "kernel/net/core/failover.ko",
  "kernel/drivers/net/net_failover.ko",
  "kernel/drivers/net/virtio_net.ko",
  "kernel/drivers/char/virtio_console.ko",
];

async function sh(cmd: string, args: string[], cwd?: string): Promise<string> {
  const r = await execa(cmd, args, { cwd, reject: false, stdin: "ignore" });
  if (r.exitCode !== 0) {
    throw new UnavailableError(`${cmd} ${args.join(" ")} failed: ${(r.stderr || r.stdout).trim().slice(-400)}`);
  }
  return r.stdout;
}

async function resolvePackage(): Promise<{ pkg: string; version: string }> {
  const find = async () => {
    const deps = await sh("apt-cache", ["depends", META_PACKAGE]).catch(() => "");
    return /Depends: (linux-image-\S+)/.exec(deps)?.[1];
  };
  let pkg = await find();
  if (!pkg) {
    await sh("apt-get", ["update"]);
    pkg = await find();
  }
  if (!pkg) throw new UnavailableError(`apt knows no package behind ${META_PACKAGE}`);
  const policy = await sh("apt-cache", ["policy", pkg]);
  const version = /Candidate: (\S+)/.exec(policy)?.[1];
  if (!version || version === "(none)") throw new UnavailableError(`no candidate version of ${pkg}`);
  return { pkg, version };
}

/** Ensures the Debian cloud kernel is unpacked under `cacheDir`; returns its files. */
export async function ensureLinuxVmKernel(cacheDir: string, log: Logger): Promise<KernelFiles> {
  const root = join(cacheDir, "kernels", "debian-cloud");
  const existing = await findComplete(root);
  const dest = existing ?? await fetchKernel(root, log);
  const kver = (await readDirNames(join(dest, "lib", "modules")))[0];
  const vmlinuz = join(dest, "boot", (await readDirNames(join(dest, "boot"))).find((n) => n.startsWith("vmlinuz-"))!);
  return {
    kind: "linux-vm",
    vmlinuz,
    rootDisk: false,
    modules: LINUX_VM_MODULES.map((m) => join(dest, "lib", "modules", kver, m)),
    // quiet keeps the console readable; panic=-1 + -no-reboot turns a guest panic into a QEMU exit.
    cmdline: "console=ttyS0 quiet panic=-1 random.trust_cpu=on",
    acpi: true,
    // Boots and serves HTTP from 80 MiB (measured under TCG); the rest is room for the app.
    defaultMemoryMib: 128,
    // Measured under TCG: httpd (2.6 MiB initramfs) boots from 80 MiB, redis (18 MiB) from 112 MiB;
    // the initramfs is held twice while the kernel unpacks it.
    minMemoryMib: ({ initrdMib }) => Math.max(80, 76 + Math.ceil(2 * initrdMib)),
  };
}

/** capsule-os/kernel/build.sh of this checkout (FLEXCAP_KERNEL_BUILD overrides it). */
export function defaultCapsuleKernelBuild(): string {
  return Deno.env.get("FLEXCAP_KERNEL_BUILD") ??
    fileURLToPath(new URL("../../capsule-os/kernel/build.sh", import.meta.url));
}

/**
 * Ensures the capsule kernel is built and cached under `cacheDir` (build.sh is a no-op on
 * a cache hit; the first build takes minutes); returns its files.
 */
export async function ensureCapsuleKernel(cacheDir: string, buildScript: string, log: Logger): Promise<KernelFiles> {
  log.info("ensuring the capsule kernel (first build takes a few minutes)", { script: buildScript });
  const r = await execa("bash", [buildScript], {
    reject: false,
    stdin: "ignore",
    env: { FLEXCAP_CACHE_DIR: cacheDir },
  });
  const dir = r.stdout.trim().split("\n").at(-1) ?? "";
  if (r.exitCode !== 0 || !dir.startsWith("/")) {
    throw new UnavailableError(
      `building the capsule kernel failed (${buildScript}): ${(r.stderr || r.stdout).trim().slice(-600)}`,
    );
  }
  return {
    kind: "capsule",
    vmlinuz: join(dir, "vmlinux"),
    rootDisk: true,
    modules: [],
    cmdline: CAPSULE_CMDLINE,
    acpi: false,
    defaultMemoryMib: 32,
    // The app's files are on the root disk: only the pages it touches count, about a quarter
    // of them for the apps measured (redis: 20 MiB of files, 12 MiB minimum).
    minMemoryMib: ({ appMib }) => CAPSULE_BASE_MIB + Math.ceil(appMib / 4),
  };
}

// quiet keeps boot fast on the serial console; panic=-1 + -no-reboot make a panic end QEMU.
// Without ACPI the guest cannot power off, so capsule-init reboots; reboot=t (triple fault)
// makes that immediate, and -no-reboot turns it into QEMU exiting.
const CAPSULE_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t";
// Measured under TCG (see docs/design.md, bench memory): the kernel plus capsule-init and
// a small app's working set. Estimates only: MeasureImage records the real figure.
// measured minimum 7 MiB for busybox httpd, 12 MiB for redis; the estimate keeps a margin.
const CAPSULE_BASE_MIB = 8;

async function readDirNames(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

// Any completed unpack is reused: the agent never needs the network once a kernel is cached.
async function findComplete(root: string): Promise<string | undefined> {
  try {
    for (const name of (await readDirNames(root)).reverse()) {
      if (name.startsWith(".")) continue;
      try {
        await Deno.stat(join(root, name, ".complete"));
        return join(root, name);
      } catch { /* incomplete */ }
    }
  } catch { /* no cache yet */ }
  return undefined;
}

async function fetchKernel(root: string, log: Logger): Promise<string> {
  const { pkg, version } = await resolvePackage();
  const dest = join(root, `${pkg}_${version}`);
  await Deno.mkdir(root, { recursive: true });
  const tmp = await Deno.makeTempDir({ dir: root, prefix: ".fetch-" });
  try {
    await Deno.chmod(tmp, 0o777); // apt drops to the _apt user for downloads
    log.info("downloading guest kernel", { package: pkg, version });
    await sh("apt-get", ["download", `${pkg}=${version}`], tmp);
    const deb = (await readDirNames(tmp)).find((n) => n.endsWith(".deb"))!;
    await sh("dpkg-deb", ["-x", join(tmp, deb), join(tmp, "root")]);
    await Deno.writeTextFile(join(tmp, "root", ".complete"), `${pkg} ${version}\n`);
    await Deno.remove(dest, { recursive: true }).catch(() => {});
    await Deno.rename(join(tmp, "root"), dest);
    log.info("guest kernel cached", { path: dest });
    return dest;
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
}

/** Host-specific kernel arguments: under TCG the Debian kernel may hang calibrating the TSC without this. */
export function hostKernelArgs(accelerator: "kvm" | "tcg", cpuinfo?: string): string {
  if (accelerator !== "tcg") return "";
  const text = cpuinfo ?? Deno.readTextFileSync("/proc/cpuinfo");
  const mhz = Number(/^cpu MHz\s*:\s*([\d.]+)/m.exec(text)?.[1] ?? 0);
  return mhz > 0 ? `tsc_early_khz=${Math.round(mhz * 1000)}` : "";
}
