import assert from "node:assert/strict";
import { CpioWriter } from "../../../agent/image/cpio.ts";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
} from "../../../agent/errors.ts";

/** In-memory sink; `maxWrite` simulates short writes. */
class MemSink {
  chunks: Uint8Array[] = [];
  constructor(private maxWrite = Infinity) {}
  write(p: Uint8Array): Promise<number> {
    const n = Math.min(p.length, this.maxWrite);
    this.chunks.push(p.slice(0, n));
    return Promise.resolve(n);
  }
  bytes(): Uint8Array {
    const out = new Uint8Array(this.chunks.reduce((a, c) => a + c.length, 0));
    let o = 0;
    for (const c of this.chunks) out.set(c, o), o += c.length;
    return out;
  }
}

interface Entry {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  name: string;
  data: Uint8Array;
}

/** Independent newc reader used to check the writer's framing. */
function readNewc(b: Uint8Array): Entry[] {
  const dec = new TextDecoder();
  const out: Entry[] = [];
  for (let p = 0;;) {
    assert.equal(p % 4, 0, "entry aligned");
    assert.equal(dec.decode(b.subarray(p, p + 6)), "070701");
    const f = (i: number) => parseInt(dec.decode(b.subarray(p + 6 + i * 8, p + 14 + i * 8)), 16);
    const namesize = f(11), size = f(6);
    const name = dec.decode(b.subarray(p + 110, p + 110 + namesize - 1));
    assert.equal(b[p + 110 + namesize - 1], 0, "name NUL-terminated");
    const dataAt = (p + 110 + namesize + 3) & ~3;
    out.push({
      ino: f(0),
      mode: f(1),
      uid: f(2),
      gid: f(3),
      nlink: f(4),
      mtime: f(5),
      name,
      data: b.slice(dataAt, dataAt + size),
    });
    p = (dataAt + size + 3) & ~3;
    if (name === "TRAILER!!!") {
      assert.equal(p, b.length, "nothing after the trailer");
      return out;
    }
  }
}

const enc = new TextEncoder();
const BIG = (() => {
  const b = new Uint8Array(3 * 1024 * 1024 + 5); // > one 1 MiB chunk, not 4-aligned
  for (let i = 0; i < b.length; i++) b[i] = (i * 2654435761) >>> 24;
  return b;
})();

/** The same archive every time: dirs, nested files (auto-parents), host files, symlinks. */
async function writeSample(out: { write(p: Uint8Array): Promise<number> }, hostFile: string) {
  const w = new CpioWriter(out);
  await w.addDirectory("/dev");
  await w.addDirectory("/root", 0o700);
  await w.addFile("/init", enc.encode("#!/bin/sh\necho hi\n"), 0o755);
  await w.addFile("/etc/hostname", enc.encode("capsule\n"));
  await w.addFile("/etc/empty", new Uint8Array(), 0o600);
  await w.addFileFromHost("/lib/x86_64-linux-gnu/libbig.so.1", hostFile);
  await w.addFileFromHost("/usr/bin/tool", hostFile, 0o4755);
  await w.addSymlink("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
  await w.addSymlink("/bin", "usr/bin");
  return await w.finish();
}

Deno.test("cpio archive extracts with GNU cpio -idm", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp" });
  try {
    await Deno.writeFile(`${dir}/big`, BIG, { mode: 0o640 });
    await Deno.chmod(`${dir}/big`, 0o640);
    const archive = `${dir}/initrd.cpio`;
    {
      using f = await Deno.open(archive, { write: true, create: true, truncate: true });
      const { bytes } = await writeSample(f, `${dir}/big`);
      assert.equal(bytes, (await Deno.stat(archive)).size);
    }
    const root = `${dir}/root`;
    await Deno.mkdir(root);
    const r = await new Deno.Command("cpio", {
      args: ["-idm", "--quiet", "-F", archive],
      cwd: root,
      stderr: "piped",
    })
      .output();
    assert.ok(r.success, new TextDecoder().decode(r.stderr));
    const mode = (p: string) => Deno.lstatSync(`${root}/${p}`).mode! & 0o7777;
    assert.equal(Deno.readTextFileSync(`${root}/init`), "#!/bin/sh\necho hi\n");
    assert.equal(mode("init"), 0o755);
    assert.equal(Deno.readTextFileSync(`${root}/etc/hostname`), "capsule\n");
    assert.equal(mode("etc/hostname"), 0o644);
    assert.equal(Deno.statSync(`${root}/etc/empty`).size, 0);
    assert.equal(mode("etc/empty"), 0o600);
    assert.deepEqual(Deno.readFileSync(`${root}/lib/x86_64-linux-gnu/libbig.so.1`), BIG);
    assert.equal(mode("lib/x86_64-linux-gnu/libbig.so.1"), 0o640, "host mode by default");
    assert.equal(mode("usr/bin/tool"), 0o4755);
    assert.equal(mode("root"), 0o700);
    assert.equal(mode("lib"), 0o755);
    assert.ok(Deno.lstatSync(`${root}/dev`).isDirectory);
    assert.equal(
      Deno.readLinkSync(`${root}/lib64/ld-linux-x86-64.so.2`),
      "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    assert.equal(Deno.readLinkSync(`${root}/bin`), "usr/bin");
    assert.equal(Deno.lstatSync(`${root}/init`).mtime?.getTime(), 0, "mtime 0");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cpio output is byte-identical for identical input, even with short writes", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp" });
  try {
    await Deno.writeFile(`${dir}/big`, BIG);
    const a = new MemSink(), b = new MemSink(), c = new MemSink(61);
    const sizes = [await writeSample(a, `${dir}/big`), await writeSample(b, `${dir}/big`)];
    await writeSample(c, `${dir}/big`);
    assert.deepEqual(sizes[0], sizes[1]);
    assert.deepEqual(a.bytes(), b.bytes());
    assert.deepEqual(c.bytes(), a.bytes());
    assert.equal(a.bytes().length % 4, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cpio headers: auto-parents once and first, monotonic inodes, root-owned, mtime 0", async () => {
  const sink = new MemSink();
  const w = new CpioWriter(sink);
  await w.addFile("a/b/c.txt", enc.encode("x"));
  await w.addFile("/a/b/d.txt", enc.encode("yz"), 0o600);
  await w.addDirectory("a/b"); // same mode as the auto-parent: no-op
  await w.addSymlink("a/l", "b/c.txt");
  await w.finish();
  const entries = readNewc(sink.bytes());
  assert.deepEqual(entries.map((e) => e.name), ["a", "a/b", "a/b/c.txt", "a/b/d.txt", "a/l", "TRAILER!!!"]);
  assert.deepEqual(entries.map((e) => e.ino), [1, 2, 3, 4, 5, 0]);
  assert.deepEqual(entries.map((e) => e.mode.toString(8)), [
    "40755",
    "40755",
    "100644",
    "100600",
    "120777",
    "0",
  ]);
  for (const e of entries) assert.deepEqual([e.uid, e.gid, e.mtime], [0, 0, 0], e.name);
  assert.equal(new TextDecoder().decode(entries[4].data), "b/c.txt");
  assert.equal(new TextDecoder().decode(entries[3].data), "yz");
});

Deno.test("cpio rejects bad paths, duplicates and use after finish", async () => {
  const w = new CpioWriter(new MemSink());
  for (const p of ["", "/", "a/../b", "..", "./a", "a//b", "a/", "a\0b", "TRAILER!!!"]) {
    await assert.rejects(w.addFile(p, new Uint8Array()), InvalidArgumentError, JSON.stringify(p));
  }
  await assert.rejects(w.addDirectory("d", 0o10000), InvalidArgumentError);
  await assert.rejects(w.addSymlink("s", ""), InvalidArgumentError);
  await w.addFile("f", new Uint8Array());
  await assert.rejects(w.addFile("/f", new Uint8Array()), AlreadyExistsError);
  await assert.rejects(w.addSymlink("f", "x"), AlreadyExistsError);
  await assert.rejects(w.addFile("f/child", new Uint8Array()), InvalidArgumentError);
  await w.addFile("d/x", new Uint8Array());
  await assert.rejects(w.addDirectory("d", 0o700), FailedPreconditionError, "auto-parent mode conflict");
  await w.finish();
  await assert.rejects(w.addFile("g", new Uint8Array()), FailedPreconditionError);
  await assert.rejects(w.finish(), FailedPreconditionError);
});

Deno.test("cpio write failure rejects that entry and every later call", async () => {
  let full = false;
  const w = new CpioWriter({
    write: (p) => full ? Promise.reject(new Error("disk full")) : Promise.resolve(p.length),
  });
  await w.addFile("a", enc.encode("a"));
  full = true;
  await assert.rejects(w.addFile("b", enc.encode("b")), /disk full/);
  full = false; // a half-written archive stays poisoned even if the sink recovers
  await assert.rejects(w.addFile("c", enc.encode("c")), /disk full/);
  await assert.rejects(w.finish(), /disk full/);
});

Deno.test("cpio failure before any byte of an entry leaves the archive usable", async () => {
  const sink = new MemSink();
  const w = new CpioWriter(sink);
  await assert.rejects(w.addFileFromHost("etc/h", "/nonexistent/file"), NotFoundError);
  await w.addFileFromHost("etc/h", "/etc/hostname", 0o644);
  await w.finish();
  const entries = readNewc(sink.bytes());
  assert.deepEqual(entries.map((e) => [e.name, e.ino]), [["etc", 1], ["etc/h", 2], ["TRAILER!!!", 0]]);
  assert.deepEqual(entries[1].data, Deno.readFileSync("/etc/hostname"));
});
