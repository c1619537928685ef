import assert from "node:assert/strict";
import { findKernelPanic, streamConsole } from "../../../agent/capsule/console.ts";

Deno.test("console stream sends the log from the start and follows appended output", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/console.log`;
  await Deno.writeTextFile(path, "boot\n");
  const abort = new AbortController();
  const got: string[] = [];
  const reader = (async () => {
    for await (
      const chunk of streamConsole(path, {
        fromStart: true,
        follow: true,
        signal: abort.signal,
        stillExists: () => true,
      })
    ) {
      got.push(new TextDecoder().decode(chunk));
      if (got.join("").includes("tick 1")) abort.abort();
    }
  })();
  await Deno.writeTextFile(path, "tick 0\ntick 1\n", { append: true });
  await reader;
  assert.equal(got.join(""), "boot\ntick 0\ntick 1\n");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("console stream without from_start or follow sends nothing", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(`${dir}/c.log`, "old output\n");
  const chunks = [];
  for await (
    const c of streamConsole(`${dir}/c.log`, {
      fromStart: false,
      follow: false,
      signal: new AbortController().signal,
      stillExists: () => true,
    })
  ) chunks.push(c);
  assert.equal(chunks.length, 0);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("kernel panic line is found in the console tail", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/console.log`;
  await Deno.writeTextFile(
    path,
    "x\n".repeat(20_000) + "[    1.234567] Kernel panic - not syncing: System is deadlocked on memory\n",
  );
  assert.equal(await findKernelPanic(path), "Kernel panic - not syncing: System is deadlocked on memory");
  await Deno.writeTextFile(path, "all fine\n");
  assert.equal(await findKernelPanic(path), undefined);
  assert.equal(await findKernelPanic(`${dir}/missing.log`), undefined);
  await Deno.remove(dir, { recursive: true });
});
