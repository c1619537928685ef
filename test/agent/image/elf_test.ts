import assert from "node:assert/strict";
import { ElfError, type ElfInfo, parseElf } from "../../../agent/image/elf.ts";
import { Code } from "../../../agent/errors.ts";

const REDIS = "/usr/bin/redis-server";
const BUSYBOX = "/bin/busybox";
const LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6";

/** A minimal valid ELF64 LE x86_64: ehdr, PT_LOAD over the whole file, PT_INTERP, PT_DYNAMIC, strtab. */
function makeElf(
  o: { interp?: string; needed?: string[]; soname?: string; rpath?: string; runpath?: string },
) {
  const strs = ["", ...(o.needed ?? []), o.soname ?? "", o.rpath ?? "", o.runpath ?? ""];
  const enc = new TextEncoder();
  const strtab: number[] = [];
  const off = new Map<string, number>();
  for (const s of strs) if (!off.has(s)) off.set(s, strtab.length), strtab.push(...enc.encode(s), 0);
  const dyn: [number, number][] = [];
  for (const n of o.needed ?? []) dyn.push([1, off.get(n)!]);
  if (o.soname) dyn.push([14, off.get(o.soname)!]);
  if (o.rpath) dyn.push([15, off.get(o.rpath)!]);
  if (o.runpath) dyn.push([29, off.get(o.runpath)!]);
  const phnum = o.interp ? 3 : 2;
  const interpOff = 64 + phnum * 56;
  const interp = o.interp ? [...enc.encode(o.interp), 0] : [];
  const strOff = interpOff + interp.length;
  const dynOff = (strOff + strtab.length + 7) & ~7;
  const base = 0x400000;
  dyn.push([5, base + strOff], [10, strtab.length], [0, 0]);
  const size = dynOff + dyn.length * 16;
  const b = new Uint8Array(size);
  const v = new DataView(b.buffer);
  b.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 3, true); // ET_DYN
  v.setUint16(18, 62, true);
  v.setUint32(20, 1, true);
  v.setBigUint64(32, 64n, true);
  v.setUint16(52, 64, true);
  v.setUint16(54, 56, true);
  v.setUint16(56, phnum, true);
  const ph = (i: number, type: number, offset: number, filesz: number) => {
    const p = 64 + i * 56;
    v.setUint32(p, type, true);
    v.setBigUint64(p + 8, BigInt(offset), true);
    v.setBigUint64(p + 16, BigInt(base + offset), true);
    v.setBigUint64(p + 32, BigInt(filesz), true);
    v.setBigUint64(p + 40, BigInt(filesz), true);
  };
  ph(0, 1, 0, size);
  ph(1, 2, dynOff, dyn.length * 16);
  if (o.interp) ph(2, 3, interpOff, interp.length);
  b.set(interp, interpOff);
  b.set(strtab, strOff);
  dyn.forEach(([t, val], i) => {
    v.setBigInt64(dynOff + i * 16, BigInt(t), true);
    v.setBigUint64(dynOff + i * 16 + 8, BigInt(val), true);
  });
  return { bytes: b, view: v, dynOff, strOff, interpOff };
}

function parseOrElfError(bytes: Uint8Array): ElfInfo | ElfError {
  try {
    return parseElf(bytes);
  } catch (err) {
    if (err instanceof ElfError) return err;
    throw new Error(`non-ElfError ${err} for input of ${bytes.length} bytes`, { cause: err });
  }
}

function assertElfError(bytes: Uint8Array, re: RegExp) {
  assert.throws(() => parseElf(bytes), (e: unknown) => {
    assert.ok(e instanceof ElfError, `ElfError expected, found ${e}`);
    assert.equal(e.code, Code.INVALID_ARGUMENT);
    assert.match(e.message, re);
    return true;
  });
}

/** Small deterministic PRNG so fuzz failures reproduce. */
function rng(seed: number) {
  return () => (seed = (Math.imul(seed ^ (seed >>> 15), 0x2c1b3c6d) + 0x9e3779b9) >>> 0) / 2 ** 32;
}

Deno.test("elf parser reads a synthetic ELF", () => {
  const { bytes } = makeElf({
    interp: "/lib64/ld-linux-x86-64.so.2",
    needed: ["liba.so.1", "libc.so.6"],
    soname: "libme.so.2",
    rpath: "/opt/a:/opt/b",
    runpath: "$ORIGIN/../lib",
  });
  assert.deepEqual(parseElf(bytes), {
    type: "dyn",
    machine: 62,
    interpreter: "/lib64/ld-linux-x86-64.so.2",
    needed: ["liba.so.1", "libc.so.6"],
    soname: "libme.so.2",
    rpath: ["/opt/a", "/opt/b"],
    runpath: ["$ORIGIN/../lib"],
    isStatic: false,
  });
  assert.equal(parseElf(makeElf({}).bytes).isStatic, true);
});

Deno.test("elf parser reads redis-server as a dynamic PIE", () => {
  const info = parseElf(Deno.readFileSync(REDIS));
  assert.equal(info.type, "dyn");
  assert.equal(info.machine, 62);
  assert.equal(info.interpreter, "/lib64/ld-linux-x86-64.so.2");
  assert.ok(info.needed.includes("libc.so.6"), `needed: ${info.needed}`);
  assert.equal(info.isStatic, false);
  assert.equal(info.soname, undefined);
});

Deno.test("elf parser reads static busybox", () => {
  const info = parseElf(Deno.readFileSync(BUSYBOX));
  assert.equal(info.type, "exec");
  assert.equal(info.interpreter, undefined);
  assert.deepEqual(info.needed, []);
  assert.equal(info.isStatic, true);
});

Deno.test("elf parser reads a shared library's soname", () => {
  const info = parseElf(Deno.readFileSync(LIBC));
  assert.equal(info.type, "dyn");
  assert.equal(info.soname, "libc.so.6");
  assert.deepEqual(info.needed, ["ld-linux-x86-64.so.2"]);
});

Deno.test("elf parser agrees with readelf on system binaries", async () => {
  const files = [REDIS, BUSYBOX, LIBC, "/usr/bin/apropos", "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"];
  for (const f of files) {
    try {
      Deno.statSync(f);
    } catch {
      continue;
    }
    const out = await new Deno.Command("readelf", { args: ["-d", "-l", "-W", f], stdout: "piped" }).output();
    const text = new TextDecoder().decode(out.stdout);
    const all = (re: RegExp) => [...text.matchAll(re)].map((m) => m[1]);
    const info = parseElf(Deno.readFileSync(f));
    assert.deepEqual(info.needed, all(/\(NEEDED\)\s+Shared library: \[(.*)\]/g), f);
    assert.equal(info.soname, all(/\(SONAME\)\s+Library soname: \[(.*)\]/g)[0], f);
    assert.deepEqual(
      info.runpath,
      all(/\(RUNPATH\)\s+Library runpath: \[(.*)\]/g).flatMap((s) => s.split(":")),
      f,
    );
    assert.deepEqual(info.rpath, all(/\(RPATH\)\s+Library rpath: \[(.*)\]/g).flatMap((s) => s.split(":")), f);
    assert.equal(info.interpreter, all(/Requesting program interpreter: (.*)\]/g)[0], f);
  }
});

Deno.test("elf parser rejects bad magic and empty input", () => {
  assertElfError(new TextEncoder().encode("#!/bin/sh\necho hi\n"), /magic 7f454c46 expected, found 23212f62/);
  assertElfError(new Uint8Array(), /not an ELF file.*empty input/);
});

Deno.test("elf parser rejects 32-bit, big-endian and foreign-machine headers", () => {
  const b = makeElf({ needed: ["libc.so.6"] }).bytes;
  const with_ = (i: number, val: number[]) => ((c) => (c.set(val, i), c))(b.slice());
  assertElfError(with_(4, [1]), /32-bit ELF not supported/);
  assertElfError(with_(4, [7]), /ELF class 7/);
  assertElfError(with_(5, [2]), /little-endian = 1 expected/);
  assertElfError(with_(18, [183, 0]), /machine 183 not supported \(x86_64 = 62 expected\)/);
});

Deno.test("elf parser rejects truncated program headers", () => {
  // Every prefix of the first 4 KiB of a real ELF: its dynamic section lies far beyond.
  const real = Deno.readFileSync(REDIS).subarray(0, 4096);
  for (let n = 0; n <= real.length; n++) {
    const r = parseOrElfError(real.subarray(0, n));
    assert.ok(r instanceof ElfError, `prefix of ${n} bytes parsed`);
  }
  assertElfError(real.subarray(0, 40), /truncated ELF header/);
  assertElfError(real.subarray(0, 200), /program header table .* exceeds file size 200/);
});

Deno.test("elf parser handles every prefix of a small synthetic ELF", () => {
  const { bytes } = makeElf({ interp: "/lib/ld.so", needed: ["libx.so"], soname: "liby.so" });
  for (let n = 0; n < bytes.length; n++) {
    assert.ok(parseOrElfError(bytes.subarray(0, n)) instanceof ElfError, `${n}`);
  }
  assert.ok(!(parseOrElfError(bytes) instanceof ElfError));
});

Deno.test("elf parser rejects huge phnum and offsets", () => {
  const mk = () => makeElf({ interp: "/lib/ld.so", needed: ["libx.so"] });
  let e = mk();
  e.view.setBigUint64(32, 0xffffffffffffffffn, true); // e_phoff
  assertElfError(e.bytes, /e_phoff 0xffffffffffffffff is out of range/);
  e = mk();
  e.view.setBigUint64(32, 2n ** 52n, true);
  assertElfError(e.bytes, /program header table/);
  e = mk();
  e.view.setUint16(56, 0xfffe, true); // phnum
  assertElfError(e.bytes, /program header table \(65534 entries\)/);
  e = mk();
  e.view.setUint16(56, 0xffff, true); // PN_XNUM with e_shoff pointing nowhere
  e.view.setBigUint64(40, 1n << 40n, true);
  assertElfError(e.bytes, /section header 0/);
  e = mk();
  e.view.setUint16(54, 32, true);
  assertElfError(e.bytes, /e_phentsize 32/);
  e = mk();
  e.view.setBigUint64(64 + 56 + 32, 1n << 62n, true); // PT_DYNAMIC p_filesz
  assertElfError(e.bytes, /PT_DYNAMIC/);
  e = mk();
  e.view.setBigUint64(64 + 2 * 56 + 8, 0x7fffffffn, true); // PT_INTERP p_offset
  assertElfError(e.bytes, /PT_INTERP/);
  e = mk();
  e.bytes[e.interpOff + "/lib/ld.so".length] = 0x41; // unterminated interpreter
  assertElfError(e.bytes, /unterminated string in PT_INTERP/);
  e = mk();
  e.view.setBigUint64(e.dynOff + 8, 1n << 40n, true); // DT_NEEDED string offset
  assertElfError(e.bytes, /beyond string table/);
  e = mk();
  e.view.setBigUint64(e.dynOff + 16 + 8, 0x10n, true); // DT_STRTAB vaddr below PT_LOAD
  assertElfError(e.bytes, /DT_STRTAB 0x10 is not inside any PT_LOAD/);
  e = mk();
  e.view.setBigInt64(e.dynOff + 16, 7n, true); // DT_STRTAB replaced by DT_RELA
  assertElfError(e.bytes, /no DT_STRTAB/);
});

Deno.test("elf parser survives random bytes", () => {
  const rand = rng(1);
  for (let i = 0; i < 3000; i++) {
    const b = new Uint8Array(Math.floor(rand() * 600));
    for (let j = 0; j < b.length; j++) b[j] = rand() * 256;
    // Most iterations get a valid ident so the fuzzing reaches the header fields.
    if (i % 4 && b.length >= 20) b.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]), b.set([62, 0], 18);
    parseOrElfError(b);
  }
});

Deno.test("elf parser survives mutated headers", () => {
  const rand = rng(2);
  const synth = makeElf({ interp: "/lib/ld.so", needed: ["a.so", "b.so"], soname: "c.so", runpath: "/x" }).bytes;
  const real = Deno.readFileSync("/lib64/ld-linux-x86-64.so.2"); // small, always present
  for (let i = 0; i < 4000; i++) {
    const b = (i % 8 ? synth : real).slice();
    const span = i % 8 ? b.length : 64 + 12 * 56; // real file: hit ehdr and program headers
    for (let k = 1 + Math.floor(rand() * 4); k > 0; k--) b[Math.floor(rand() * span)] = rand() * 256;
    parseOrElfError(b);
  }
});
