import assert from "node:assert/strict";
import { atomicWrite, atomicWriteJson, removeStaleTemps } from "../../../agent/state/atomic.ts";

Deno.test("atomic write replaces content and leaves no temp files", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const p = `${dir}/rec.json`;
    await atomicWriteJson(p, { a: 1 });
    await atomicWriteJson(p, { a: 2 });
    assert.deepEqual(JSON.parse(await Deno.readTextFile(p)), { a: 2 });
    const names = [...Deno.readDirSync(dir)].map((e) => e.name);
    assert.deepEqual(names, ["rec.json"]);
    assert.equal((await Deno.stat(p)).mode! & 0o777, 0o600);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("atomic write keeps the old file when the write fails", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const p = `${dir}/rec.json`;
    await atomicWrite(p, "old");
    // Renaming onto a directory fails after the temp file was fully written.
    await Deno.mkdir(`${dir}/sub`);
    await assert.rejects(atomicWrite(`${dir}/sub`, "new"));
    assert.equal(await Deno.readTextFile(p), "old");
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), ["rec.json", "sub"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("concurrent atomic writes never expose a torn file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const p = `${dir}/rec.json`;
    const big = (n: number) => JSON.stringify({ n, pad: "x".repeat(200_000) });
    await atomicWrite(p, big(0));
    let reads = 0;
    const writer = Promise.all(Array.from({ length: 20 }, (_, i) => atomicWrite(p, big(i + 1))));
    let done = false;
    writer.then(() => (done = true));
    while (!done) {
      JSON.parse(await Deno.readTextFile(p)); // throws on a torn file
      reads++;
    }
    await writer;
    assert.ok(reads > 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stale temp files of interrupted writes are removed", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/.abc.tmp`, "partial");
    await Deno.writeTextFile(`${dir}/keep.json`, "{}");
    assert.equal(await removeStaleTemps(dir), 1);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["keep.json"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
