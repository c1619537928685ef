import assert from "node:assert/strict";
import { chooseAccelerator, probeHost } from "../../../agent/vmm/accel.ts";

const vmxCpu = "processor : 0\nflags\t\t: fpu vme vmx sse2\n";
const plainCpu = "processor : 0\nflags\t\t: fpu vme sse2 hypervisor\n";

Deno.test("accelerator is kvm only with /dev/kvm, vmx/svm and the kvm module", () => {
  assert.equal(
    chooseAccelerator("auto", { cpuinfo: vmxCpu, modules: "kvm_intel 1 0 - Live\n", kvmDevice: true }).accelerator,
    "kvm",
  );
  // A software KVM (PVM) exposes /dev/kvm without vmx/svm: ordinary guests hang there.
  const pvm = chooseAccelerator("auto", { cpuinfo: plainCpu, modules: "kvm 1 0 - Live\n", kvmDevice: true });
  assert.equal(pvm.accelerator, "tcg");
  assert.match(pvm.reason, /vmx\/svm absent/);
  assert.equal(chooseAccelerator("auto", { cpuinfo: vmxCpu, modules: "", kvmDevice: true }).accelerator, "tcg");
  assert.equal(
    chooseAccelerator("auto", { cpuinfo: vmxCpu, modules: "kvm_amd 1", kvmDevice: false }).accelerator,
    "tcg",
  );
});

Deno.test("accelerator honours an explicit configuration", () => {
  assert.equal(
    chooseAccelerator("tcg", { cpuinfo: vmxCpu, modules: "kvm_intel 1", kvmDevice: true }).accelerator,
    "tcg",
  );
  assert.equal(chooseAccelerator("kvm", { cpuinfo: plainCpu, modules: "", kvmDevice: false }).accelerator, "kvm");
});

Deno.test("accelerator detection picks tcg on this workplace's machines", () => {
  const host = probeHost();
  const hw = /^flags.*\b(vmx|svm)\b/m.test(host.cpuinfo) && /^kvm_(intel|amd)\s/m.test(host.modules);
  assert.equal(chooseAccelerator("auto", host).accelerator, hw ? "kvm" : "tcg");
});
