/**
 * Turns a capsule record + its image into what QEMU and capsule-init need: the QEMU
 * launch spec and the LaunchConfig bytes handed to the guest through fw_cfg.
 */
import { LaunchConfig } from "../gen/flexcap/guest/v1/guest.ts";
import type { ImageManifest } from "../image/manifest.ts";
import type { Accelerator } from "../vmm/accel.ts";
import { macForCapsule, type QemuLaunchSpec } from "../vmm/qemu_args.ts";
import type { LaunchNet } from "../net/network.ts";
import { CMDLINE_DNS, CMDLINE_GW, CMDLINE_IP, CMDLINE_ROOT } from "../osserver/wire.ts";
import type { CapsulePaths } from "./store.ts";
import type { CapsuleRecord } from "./types.ts";

/** Host settings that shape every launch. */
export interface LaunchHost {
  accelerator: Accelerator;
  cpuModel: string;
  kernelPath: string;
  initrdPath: string;
  /** The app's read-only root disk, if the image has one. */
  rootfsPath?: string;
  /** Extra kernel arguments the host needs (e.g. tsc_early_khz under TCG). */
  hostCmdline: string;
  tcgTbSizeMib: number;
}

/** The guest's argv and environment: the capsule's args replace the image's, env merges over it. */
export function guestCommand(rec: CapsuleRecord, image: ImageManifest): { argv: string[]; env: string[] } {
  const args = rec.spec.args.length > 0 ? rec.spec.args : image.args;
  const env = { ...image.env, ...rec.spec.env };
  return { argv: [image.entrypoint, ...args], env: Object.entries(env).map(([k, v]) => `${k}=${v}`) };
}

/** Encodes the LaunchConfig for fw_cfg. */
export function encodeLaunchConfig(rec: CapsuleRecord, image: ImageManifest): Uint8Array {
  const { argv, env } = guestCommand(rec, image);
  return LaunchConfig.encode({ argv, env, capsuleId: rec.id, workdir: image.workdir ?? "" }).finish();
}

/** The guest's network identity and root device as capsule-init reads them from the kernel command line. */
export function guestCmdline(net: { addressCidr: string; gateway: string; dns: string }, rootDisk: boolean): string {
  const parts = [`${CMDLINE_IP}=${net.addressCidr}`];
  if (net.gateway) parts.push(`${CMDLINE_GW}=${net.gateway}`);
  if (net.dns) parts.push(`${CMDLINE_DNS}=${net.dns}`);
  // virtio-blk-device is the only block device microvm gets from us, so it is always vda.
  if (rootDisk) parts.push(`${CMDLINE_ROOT}=vda`);
  return parts.join(" ");
}

/** The QEMU launch spec for `rec` on the network `net` gives it. */
export function qemuSpec(
  rec: CapsuleRecord,
  image: ImageManifest,
  paths: CapsulePaths,
  host: LaunchHost,
  net: LaunchNet,
  incoming: boolean,
): QemuLaunchSpec {
  return {
    capsuleId: rec.id,
    accelerator: host.accelerator,
    cpuModel: host.cpuModel,
    memoryMib: rec.spec.memoryMib,
    vcpus: rec.spec.vcpus,
    kernelPath: host.kernelPath,
    initrdPath: host.initrdPath,
    rootfsPath: host.rootfsPath,
    cmdline: [image.cmdline, host.hostCmdline, guestCmdline(net.guest, host.rootfsPath !== undefined)]
      .filter((s) => s !== "").join(" "),
    acpi: image.acpi,
    // The record's MAC: it must stay the same across restarts and migrations (ARP, FDB).
    macAddress: rec.net?.mac ?? macForCapsule(rec.id),
    netdev: net.netdev,
    qmpSocket: paths.qmpSocket,
    osSocket: paths.osSocket,
    consoleLog: paths.console,
    launchConfig: paths.launchConfig,
    pidFile: paths.pidFile,
    incoming,
    tcgTbSizeMib: host.tcgTbSizeMib,
  };
}
