import assert from "node:assert/strict";
import { buildQemuArgs, macForCapsule, type QemuLaunchSpec } from "../../../agent/vmm/qemu_args.ts";

const base: QemuLaunchSpec = {
  capsuleId: "c-123",
  accelerator: "tcg",
  cpuModel: "Westmere",
  memoryMib: 96,
  vcpus: 2,
  kernelPath: "/k",
  initrdPath: "/i",
  cmdline: "console=ttyS0",
  acpi: true,
  macAddress: "52:54:00:00:00:01",
  netdev: { kind: "user", forwards: [{ protocol: "tcp", hostAddress: "127.0.0.1", hostPort: 8080, guestPort: 80 }] },
  qmpSocket: "/s/qmp.sock",
  osSocket: "/s/os.sock",
  consoleLog: "/s/console.log",
  launchConfig: "/s/launch.bin",
  pidFile: "/s/qemu.pid",
  incoming: false,
  tcgTbSizeMib: 64,
};

const opt = (args: string[], flag: string) => args.filter((_, i) => args[i - 1] === flag);

Deno.test("qemu args describe a daemonized microvm with QMP, channel and fw_cfg", () => {
  const a = buildQemuArgs(base);
  assert.deepEqual(opt(a, "-name"), ["guest=c-123,process=flexcap-c-123"]);
  assert.match(opt(a, "-machine")[0], /^microvm,.*acpi=on,/);
  assert.deepEqual(opt(a, "-accel"), ["tcg,tb-size=64"]);
  assert.deepEqual(opt(a, "-cpu"), ["Westmere"]);
  assert.deepEqual(opt(a, "-smp"), ["2"]);
  assert.ok(opt(a, "-object")[0].includes("size=96M"));
  assert.ok(opt(a, "-netdev")[0].includes("hostfwd=tcp:127.0.0.1:8080-:80"));
  assert.ok(opt(a, "-device").includes("virtserialport,chardev=os0,name=org.flexcap.os.0"));
  assert.deepEqual(opt(a, "-fw_cfg"), ["name=opt/org.flexcap/launch,file=/s/launch.bin"]);
  assert.deepEqual(opt(a, "-qmp"), ["unix:/s/qmp.sock,server=on,wait=off"]);
  assert.ok(a.includes("-daemonize") && a.includes("-no-reboot") && a.includes("-nodefaults"));
  assert.ok(!a.includes("-incoming"));
  // The bridge network hands QEMU the agent's own persistent tap and forbids scripts on it.
  const tap = buildQemuArgs({ ...base, netdev: { kind: "tap", ifname: "fc0123456789ab" } });
  assert.deepEqual(opt(tap, "-netdev"), ["tap,id=net0,ifname=fc0123456789ab,script=no,downscript=no"]);
});

Deno.test("qemu args wait for an incoming stream on restore and use kvm when chosen", () => {
  const a = buildQemuArgs({ ...base, incoming: true, accelerator: "kvm", acpi: false });
  assert.deepEqual(opt(a, "-incoming"), ["defer"]);
  assert.deepEqual(opt(a, "-accel"), ["kvm"]);
  assert.match(opt(a, "-machine")[0], /acpi=off,pit=on,pic=on/);
});

Deno.test("capsule MACs are stable, unicast and locally administered", () => {
  const m = macForCapsule("c-abc");
  assert.equal(m, macForCapsule("c-abc"));
  assert.notEqual(m, macForCapsule("c-abd"));
  const first = parseInt(m.slice(0, 2), 16);
  assert.equal(first & 1, 0);
  assert.equal(first & 2, 2);
});

Deno.test("a root disk is attached read-only as the only virtio-blk device", () => {
  assert.ok(!buildQemuArgs(base).includes("-drive"));
  const a = buildQemuArgs({ ...base, rootfsPath: "/s/blobs/abc" });
  const drive = a[a.indexOf("-drive") + 1];
  assert.match(drive, /file=\/s\/blobs\/abc,format=raw,readonly=on/);
  assert.equal(a[a.indexOf("-drive") + 3], "virtio-blk-device,drive=root");
});
