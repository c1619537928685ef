import assert from "node:assert/strict";
import { join } from "node:path";
import { AppLogWriter, parseLogLine, readAppLog } from "../../../agent/capsule/app_log.ts";

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

async function collect(path: string, fromStart: boolean): Promise<string[]> {
  const out: string[] = [];
  const signal = new AbortController().signal;
  for await (const c of readAppLog(path, { fromStart, follow: false, signal, stillExists: () => true })) {
    out.push(`${c.stream}:${dec(c.data)}`);
  }
  return out;
}

Deno.test("app log keeps binary chunks per stream, in order, and rotates at its limit", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = join(dir, "app.log");
    const errors: unknown[] = [];
    const w = new AppLogWriter(path, (e) => errors.push(e), 400);
    w.append({ stream: "stdout", data: enc("one\n") });
    w.append({ stream: "stderr", data: new Uint8Array([0xff, 0x00, 0x0a]) });
    await w.flush();
    const first = await collect(path, true);
    assert.deepEqual(first[0], "stdout:one\n");
    assert.equal(first.length, 2);
    for (let i = 0; i < 10; i++) w.append({ stream: "stdout", data: enc(`line ${i} `.repeat(5)) });
    await w.close();
    assert.deepEqual(errors, []);
    // Bounded: the current file and one rotated file, each under the limit plus a line.
    assert.ok((await Deno.stat(path)).size <= 400);
    assert.ok((await Deno.stat(`${path}.1`)).size <= 400);
    const all = await collect(path, true);
    assert.equal(all.at(-1), `stdout:${"line 9 ".repeat(5)}`);
    assert.ok(all.length < 12, "the oldest chunks were rotated away");
    assert.deepEqual(await collect(path, false), [], "not from start: only new output");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a torn or foreign log line is skipped", () => {
  assert.equal(parseLogLine('{"t":"2026-01-01T00:00:00Z","s":"stdout","d":"aGk="'), undefined);
  assert.equal(parseLogLine('{"t":"2026-01-01T00:00:00Z","s":"tty","d":"aGk="}'), undefined);
  assert.equal(dec(parseLogLine('{"t":"2026-01-01T00:00:00Z","s":"stdout","d":"aGk="}')!.data), "hi");
});

Deno.test("following the log yields chunks written later", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = join(dir, "app.log");
    const w = new AppLogWriter(path, () => {});
    const ac = new AbortController();
    const got: string[] = [];
    const reader = (async () => {
      for await (
        const c of readAppLog(path, {
          fromStart: true,
          follow: true,
          signal: ac.signal,
          stillExists: () => true,
        })
      ) {
        got.push(dec(c.data));
        if (got.length === 2) ac.abort();
      }
    })();
    w.append({ stream: "stdout", data: enc("a") });
    await new Promise((r) => setTimeout(r, 250));
    w.append({ stream: "stdout", data: enc("b") });
    await reader;
    await w.close();
    assert.deepEqual(got, ["a", "b"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
