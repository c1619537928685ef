import assert from "node:assert/strict";
import { join } from "node:path";
import { OutcomeStore } from "../../../agent/migrate/outcomes.ts";

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "fc-outcomes-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("outcomes: put then get round-trips, also through a new store on the same dir", () =>
  withDir(async (dir) => {
    const s = new OutcomeStore(dir);
    await s.open();
    const before = Date.now();
    await s.put({ id: "m-0123456789ab", capsuleId: "c-aaaaaaaaaaaa", outcome: "released", message: "source released" });
    await s.put({ id: "m-ffffffffffff", capsuleId: "c-bbbbbbbbbbbb", outcome: "aborted", message: "qemu died" });
    const again = new OutcomeStore(dir);
    await again.open();
    for (const store of [s, again]) {
      const o = await store.get("m-0123456789ab");
      assert.ok(o);
      assert.deepEqual({ ...o, at: undefined }, {
        id: "m-0123456789ab",
        capsuleId: "c-aaaaaaaaaaaa",
        outcome: "released",
        message: "source released",
        at: undefined,
      });
      assert.ok(Date.parse(o.at) >= before - 1000 && Date.parse(o.at) <= Date.now() + 1000);
      assert.equal((await store.get("m-ffffffffffff"))?.outcome, "aborted");
    }
    // A later put replaces the outcome.
    await s.put({ id: "m-ffffffffffff", capsuleId: "c-bbbbbbbbbbbb", outcome: "released", message: "x" });
    assert.equal((await again.get("m-ffffffffffff"))?.outcome, "released");
    assert.equal((await Deno.stat(join(dir, "migrations"))).mode! & 0o777, 0o700);
  }));

Deno.test("outcomes: an unknown or unreadable id is undefined", () =>
  withDir(async (dir) => {
    const s = new OutcomeStore(dir);
    await s.open();
    assert.equal(await s.get("m-000000000000"), undefined);
    await Deno.writeTextFile(join(s.dir, "m-111111111111.json"), "{not json");
    assert.equal(await s.get("m-111111111111"), undefined);
    await Deno.writeTextFile(join(s.dir, "m-222222222222.json"), JSON.stringify({ id: "m-222222222222" }));
    assert.equal(await s.get("m-222222222222"), undefined);
  }));

Deno.test("outcomes: a bad id is refused by put and never leaves the directory on get", () =>
  withDir(async (dir) => {
    const s = new OutcomeStore(dir);
    await s.open();
    for (const id of ["", "../escape", "a/b", "m 1", "x".repeat(65)]) {
      await assert.rejects(
        s.put({ id, capsuleId: "c-aaaaaaaaaaaa", outcome: "aborted", message: "" }),
        /bad migration id/,
        JSON.stringify(id),
      );
    }
    // A file outside <state>/migrations that parses as an outcome is not reachable by a crafted id.
    await Deno.writeTextFile(
      join(dir, "escape.json"),
      JSON.stringify({ id: "x", capsuleId: "c", outcome: "released", message: "", at: "" }),
    );
    assert.equal(await s.get("../escape"), undefined);
    assert.deepEqual([...Deno.readDirSync(s.dir)], []);
  }));

Deno.test("outcomes: open drops outcomes older than a week and keeps forwards.json", () =>
  withDir(async (dir) => {
    const s = new OutcomeStore(dir);
    await s.open();
    await s.put({ id: "m-aaaaaaaaaaaa", capsuleId: "c-aaaaaaaaaaaa", outcome: "aborted", message: "old" });
    await s.put({ id: "m-bbbbbbbbbbbb", capsuleId: "c-bbbbbbbbbbbb", outcome: "aborted", message: "new" });
    await Deno.writeTextFile(join(s.dir, "forwards.json"), "{}");
    const eightDaysAgo = new Date(Date.now() - 8 * 24 * 3600_000);
    await Deno.utime(join(s.dir, "m-aaaaaaaaaaaa.json"), eightDaysAgo, eightDaysAgo);
    await Deno.utime(join(s.dir, "forwards.json"), eightDaysAgo, eightDaysAgo);
    await new OutcomeStore(dir).open();
    assert.deepEqual([...Deno.readDirSync(s.dir)].map((e) => e.name).sort(), ["forwards.json", "m-bbbbbbbbbbbb.json"]);
    assert.equal(await s.get("m-aaaaaaaaaaaa"), undefined);
    assert.equal((await s.get("m-bbbbbbbbbbbb"))?.message, "new");
  }));
