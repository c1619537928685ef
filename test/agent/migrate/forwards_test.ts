import assert from "node:assert/strict";
import { join } from "node:path";
import { type Forward, Forwards } from "../../../agent/migrate/forwards.ts";
import { type LogLine, recordingLogger, withTimeout } from "./helpers.ts";

const fwd = (o: Partial<Forward> = {}): Forward => ({
  migrationId: "m-0123456789ab",
  capsuleId: "c-aaaaaaaaaaaa",
  hostPort: 8080,
  protocol: "tcp",
  toAddress: "172.31.1.11",
  toPort: 20001,
  capsuleIp: "10.200.0.2",
  until: Date.now() + 3600_000,
  ...o,
});

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "fc-forwards-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("forwards: added entries become redirects carrying the capsule address", () =>
  withDir(async (dir) => {
    const f = new Forwards(dir, recordingLogger(), () => Promise.resolve());
    try {
      await f.open();
      assert.deepEqual(f.redirects(), []);
      await f.add([fwd(), fwd({ hostPort: 5353, protocol: "udp", toPort: 20002 })]);
      assert.deepEqual(f.redirects(), [
        {
          hostPort: 8080,
          protocol: "tcp",
          toAddress: "172.31.1.11",
          toPort: 20001,
          comment: "c-aaaaaaaaaaaa moved (m-0123456789ab)",
          capsuleIp: "10.200.0.2",
        },
        {
          hostPort: 5353,
          protocol: "udp",
          toAddress: "172.31.1.11",
          toPort: 20002,
          comment: "c-aaaaaaaaaaaa moved (m-0123456789ab)",
          capsuleIp: "10.200.0.2",
        },
      ]);
      // Same host port and protocol: the newer forward replaces the older one.
      await f.add([fwd({ migrationId: "m-bbbbbbbbbbbb", capsuleId: "c-bbbbbbbbbbbb", toPort: 20009 })]);
      assert.deepEqual(f.redirects().map((r) => [r.hostPort, r.protocol, r.toPort]), [
        [5353, "udp", 20002],
        [8080, "tcp", 20009],
      ]);
      // remove() drops one migration's forwards only.
      await f.remove("m-bbbbbbbbbbbb");
      assert.deepEqual(f.redirects().map((r) => r.hostPort), [5353]);
    } finally {
      f.close();
    }
  }));

Deno.test("forwards: a capsule that is local again is not redirected", () =>
  withDir(async (dir) => {
    const f = new Forwards(dir, recordingLogger(), () => Promise.resolve());
    try {
      await f.open();
      await f.add([fwd(), fwd({ capsuleId: "c-bbbbbbbbbbbb", hostPort: 9090, capsuleIp: "10.200.0.3" })]);
      assert.deepEqual(f.redirects((id) => id === "c-aaaaaaaaaaaa").map((r) => r.hostPort), [9090]);
      assert.deepEqual(f.redirects(() => true), []);
      assert.equal(f.redirects().length, 2);
    } finally {
      f.close();
    }
  }));

Deno.test("forwards: persisted across instances; expired entries are dropped at open", () =>
  withDir(async (dir) => {
    const a = new Forwards(dir, recordingLogger(), () => Promise.resolve());
    await a.open();
    await a.add([fwd()]);
    a.close();
    const file = join(dir, "migrations", "forwards.json");
    assert.equal(JSON.parse(await Deno.readTextFile(file)).forwards.length, 1);

    const b = new Forwards(dir, recordingLogger(), () => Promise.resolve());
    try {
      await b.open();
      assert.deepEqual(b.redirects().map((r) => [r.hostPort, r.capsuleIp]), [[8080, "10.200.0.2"]]);
    } finally {
      b.close();
    }

    // An entry that expired while the agent was down is gone at open.
    const kept = fwd({ hostPort: 7000 });
    await Deno.writeTextFile(
      file,
      JSON.stringify({ version: 1, forwards: [fwd({ until: Date.now() - 1000 }), kept] }),
    );
    const c = new Forwards(dir, recordingLogger(), () => Promise.resolve());
    try {
      await c.open();
      assert.deepEqual(c.redirects().map((r) => r.hostPort), [7000]);
    } finally {
      c.close();
    }
  }));

Deno.test("forwards: an unreadable file is reported and dropped, not fatal", () =>
  withDir(async (dir) => {
    await Deno.mkdir(join(dir, "migrations"));
    await Deno.writeTextFile(join(dir, "migrations", "forwards.json"), '{"version": 2}');
    const lines: LogLine[] = [];
    const f = new Forwards(dir, recordingLogger(lines), () => Promise.resolve());
    try {
      await f.open();
      assert.deepEqual(f.redirects(), []);
      assert.ok(lines.some((l) => l.level === "warn" && /forwards\.json unreadable/.test(l.msg)));
    } finally {
      f.close();
    }
  }));

Deno.test("forwards: the timer removes an expired entry, persists it and calls changed", () =>
  withDir(async (dir) => {
    let fired!: () => void;
    const changed = new Promise<void>((r) => fired = r);
    let calls = 0;
    const lines: LogLine[] = [];
    const f = new Forwards(dir, recordingLogger(lines), () => {
      calls++;
      fired();
      return Promise.resolve();
    });
    try {
      await f.open();
      await f.add([fwd({ until: Date.now() + 50 }), fwd({ hostPort: 9999 })]);
      assert.equal(f.redirects().length, 2);
      await withTimeout(changed, 10_000, "changed() after expiry");
      // Let the expiry finish its synchronous tail (logging, re-arming the timer) before close().
      await new Promise((r) => setTimeout(r, 0));
      assert.equal(calls, 1);
      assert.deepEqual(f.redirects().map((r) => r.hostPort), [9999]);
      // The file was saved before changed() ran.
      const saved = JSON.parse(await Deno.readTextFile(join(dir, "migrations", "forwards.json")));
      assert.deepEqual(saved.forwards.map((x: Forward) => x.hostPort), [9999]);
      assert.ok(lines.some((l) => l.msg === "grace forwarding ended"));
    } finally {
      f.close();
    }
  }));
