/**
 * Chooses QEMU's accelerator. KVM only where hardware virtualisation is really usable:
 * /dev/kvm alone is not proof (software "PVM" KVMs expose it but hang ordinary guests),
 * so we also require vmx/svm in the CPU flags and the kvm_intel/kvm_amd module loaded.
 */

export type Accelerator = "kvm" | "tcg";

/** The decision and the reason, reported by the API. */
export interface AccelChoice {
  accelerator: Accelerator;
  reason: string;
}

/** Host facts the decision is made from; injectable for tests. */
export interface HostProbe {
  cpuinfo: string;
  modules: string;
  kvmDevice: boolean;
}

/** Reads the host facts from /proc and /dev. */
export function probeHost(): HostProbe {
  const read = (p: string) => {
    try {
      return Deno.readTextFileSync(p);
    } catch {
      return "";
    }
  };
  let kvmDevice = false;
  try {
    kvmDevice = Deno.statSync("/dev/kvm").isCharDevice === true;
  } catch { /* absent */ }
  return { cpuinfo: read("/proc/cpuinfo"), modules: read("/proc/modules"), kvmDevice };
}

/** Pure decision from host facts and the configured preference. */
export function chooseAccelerator(pref: "auto" | Accelerator, host: HostProbe): AccelChoice {
  if (pref === "tcg") return { accelerator: "tcg", reason: "configured: tcg" };
  const flags = host.cpuinfo.split("\n").find((l) => l.startsWith("flags"))?.split(/\s+/) ?? [];
  const hwVirt = flags.includes("vmx") || flags.includes("svm");
  const kvmModule = /^kvm_(intel|amd)\s/m.test(host.modules);
  const usable = host.kvmDevice && hwVirt && kvmModule;
  const facts = `/dev/kvm ${host.kvmDevice ? "present" : "absent"}, vmx/svm ${hwVirt ? "present" : "absent"}, ` +
    `kvm_intel/kvm_amd ${kvmModule ? "loaded" : "not loaded"}`;
  if (pref === "kvm") {
    // An explicit choice is honoured; the reason records whether it looks usable.
    return { accelerator: "kvm", reason: `configured: kvm (${facts})` };
  }
  return usable
    ? { accelerator: "kvm", reason: `auto: hardware virtualisation usable (${facts})` }
    : { accelerator: "tcg", reason: `auto: no usable hardware virtualisation (${facts})` };
}
