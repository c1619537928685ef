/**
 * Renders the QEMU command line for one capsule. Pure: every input is explicit, so the
 * argv is unit-tested and identical for start, restore and (later) migration targets.
 */
import type { Accelerator } from "./accel.ts";
import { CHANNEL_PORT_NAME, LAUNCH_FW_CFG_NAME } from "../osserver/wire.ts";

/** Name of the virtio-serial port capsule-init opens (capsule-os/include/flexcap_wire.h). */
export const OS_CHANNEL_PORT = CHANNEL_PORT_NAME;
/** fw_cfg file carrying the LaunchConfig (capsule-os/include/flexcap_wire.h). */
export const LAUNCH_FW_CFG = LAUNCH_FW_CFG_NAME;

/** A host→guest port forward of the user-mode network backend. */
export interface HostForward {
  protocol: "tcp" | "udp";
  hostAddress: string;
  hostPort: number;
  guestPort: number;
}

/** Everything the command line depends on. */
export interface QemuLaunchSpec {
  capsuleId: string;
  accelerator: Accelerator;
  cpuModel: string;
  memoryMib: number;
  vcpus: number;
  kernelPath: string;
  initrdPath: string;
  /** Read-only raw disk with the app's files (virtio-blk), if the image has one. */
  rootfsPath?: string;
  cmdline: string;
  acpi: boolean;
  macAddress: string;
  /** slirp with host forwards (usermode), or a tap the agent created (bridge). */
  netdev: { kind: "user"; forwards: HostForward[] } | { kind: "tap"; ifname: string };
  qmpSocket: string;
  osSocket: string;
  consoleLog: string;
  launchConfig: string;
  pidFile: string;
  /** Start paused, waiting for `migrate-incoming` (restore, migration target). */
  incoming: boolean;
  /** TCG translation cache; QEMU's default (1 GiB) lets RSS grow far beyond a small guest. */
  tcgTbSizeMib: number;
}

/** The argv (without the binary) for `spec`. */
export function buildQemuArgs(spec: QemuLaunchSpec): string[] {
  const accel = spec.accelerator === "kvm" ? "kvm" : `tcg,tb-size=${spec.tcgTbSizeMib}`;
  const args = [
    // process= names the thread group so `ps` shows which capsule a QEMU belongs to;
    // guest= is checked by query-name when the agent re-adopts the process.
    "-name",
    `guest=${spec.capsuleId},process=flexcap-${spec.capsuleId}`,
    "-machine",
    // Without ACPI (the capsule kernel) the guest finds no timer but the PIT behind the PIC:
    // with both off under TCG it has no timer interrupts at all and sleep() never returns.
    `microvm,x-option-roms=off,acpi=${
      spec.acpi ? "on,pit=off,pic=off" : "off,pit=on,pic=on"
    },rtc=on,memory-backend=ram0`,
    "-accel",
    accel,
    "-cpu",
    spec.cpuModel,
    "-smp",
    String(spec.vcpus),
    "-m",
    `${spec.memoryMib}M`,
    // memfd backing makes guest RAM one named mapping, so its RSS can be told apart from QEMU's own.
    "-object",
    `memory-backend-memfd,id=ram0,size=${spec.memoryMib}M,share=on`,
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    spec.kernelPath,
    "-initrd",
    spec.initrdPath,
    "-append",
    spec.cmdline,
    "-chardev",
    `file,id=console,path=${spec.consoleLog},append=on`,
    "-serial",
    "chardev:console",
    "-netdev",
    netdevArg(spec.netdev),
    "-device",
    `virtio-net-device,netdev=net0,mac=${spec.macAddress}`,
    "-device",
    "virtio-serial-device,max_ports=2",
    "-chardev",
    `socket,id=os0,path=${spec.osSocket},server=on,wait=off`,
    "-device",
    `virtserialport,chardev=os0,name=${OS_CHANNEL_PORT}`,
    "-fw_cfg",
    `name=${LAUNCH_FW_CFG},file=${spec.launchConfig}`,
    "-qmp",
    `unix:${spec.qmpSocket},server=on,wait=off`,
    "-pidfile",
    spec.pidFile,
    "-daemonize",
  ];
  if (spec.rootfsPath) {
    // Read-only and shareable: many capsules (and a migration's two ends) use one image file.
    args.push(
      "-drive",
      `if=none,id=root,file=${spec.rootfsPath},format=raw,readonly=on,file.locking=off`,
      "-device",
      "virtio-blk-device,drive=root",
    );
  }
  if (spec.incoming) args.push("-incoming", "defer");
  return args;
}

function netdevArg(n: QemuLaunchSpec["netdev"]): string {
  if (n.kind === "tap") {
    // The agent owns the tap's life (persistent, outlives QEMU): QEMU must not run scripts on it.
    // vhost stays off: vhost-net needs /dev/vhost-net and KVM; under TCG it buys nothing.
    return `tap,id=net0,ifname=${n.ifname},script=no,downscript=no`;
  }
  const fwds = n.forwards.map((f) => `,hostfwd=${f.protocol}:${f.hostAddress}:${f.hostPort}-:${f.guestPort}`);
  return `user,id=net0,ipv6=off${fwds.join("")}`;
}

/** A stable, locally administered MAC derived from the capsule id. */
export function macForCapsule(capsuleId: string): string {
  let h = 0x811c9dc5;
  for (const c of capsuleId) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0;
  const b = [0x52, 0x54, 0x00, (h >>> 16) & 0xff, (h >>> 8) & 0xff, h & 0xff];
  return b.map((x) => x.toString(16).padStart(2, "0")).join(":");
}
