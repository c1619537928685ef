/**
 * The network-namespace harness (test/harness/netns.ts) and its netclient: the topology really
 * isolates and connects what it says, link control really cuts one host, cleanup leaves nothing,
 * and an agent can run inside an instance namespace. Needs root; skipped otherwise.
 */
import assert from "node:assert/strict";
import { startTestAgent, waitFor } from "../../harness/agent.ts";
import { haveFile, REDIS } from "../../harness/images.ts";
import {
  createTestNet,
  type LoopStats,
  netclientResult,
  netnsSupported,
  type NsHost,
  sweepStaleTestNamespaces,
  type TestNet,
} from "../../harness/netns.ts";

const supported = await netnsSupported();
const BUSYBOX = "/bin/busybox";

interface Probe {
  ok: boolean;
  ms: number;
  error?: string;
}

async function namespaces(): Promise<string[]> {
  const out = await new Deno.Command("ip", { args: ["netns", "list"], stdout: "piped", stderr: "null" }).output();
  return new TextDecoder().decode(out.stdout).split("\n").map((l) => l.trim().split(/\s+/)[0]).filter((n) => n);
}

function probe(from: NsHost, to: NsHost, port: number, timeoutMs = 1_000): Promise<Probe> {
  return from.netclient(["tcp-probe", to.address, String(port), "--timeout-ms", String(timeoutMs)]) as Promise<Probe>;
}

/** Stops still-running spawned children after net.cleanup() killed them, releasing their pipes. */
async function reap(children: Deno.ChildProcess[]): Promise<void> {
  await Promise.allSettled(children.map((c) => c.output()));
}

Deno.test({
  name: "test net: the client reaches each instance, linkDown cuts only that one, cleanup leaves no namespace",
  ignore: !supported,
}, async () => {
  const net = await createTestNet({ instances: 2 });
  const names = [net.hub, net.client.ns, ...net.instances.map((h) => h.ns)];
  const servers: Deno.ChildProcess[] = [];
  try {
    assert.deepEqual((await namespaces()).filter((n) => n.startsWith(net.id)).sort(), [...names].sort());
    const [i0, i1] = net.instances;
    // The same port in both instances: each namespace has its own stack.
    for (const h of net.instances) servers.push(h.spawnNetclient(["listen-tcp", "7000", "--duration-ms", "60000"]));
    for (const h of net.instances) {
      await waitFor(`listener in ${h.ns}`, async () => (await probe(net.client, h, 7000)).ok, 15_000);
    }
    // A port nobody listens on is refused at once, so the probe does reach the instance's stack.
    const refused = await probe(net.client, i0, 7001);
    assert.equal(refused.ok, false);
    assert.match(refused.error ?? "", /refused/i);

    await net.linkDown(i0);
    const cut = await probe(net.client, i0, 7000);
    assert.equal(cut.ok, false, `probe through a downed link succeeded: ${JSON.stringify(cut)}`);
    assert.ok((await probe(net.client, i1, 7000)).ok, "instance 1 lost its link with instance 0's");
    // The cut is two-way: the instance cannot reach the client either.
    assert.equal((await probe(i0, net.client, 7000)).ok, false);

    await net.linkUp(i0);
    await waitFor("instance 0 back after linkUp", async () => (await probe(net.client, i0, 7000)).ok, 15_000);

    for (const s of servers) s.kill("SIGTERM");
    const counts = await Promise.all(servers.map((s) => netclientResult(s) as Promise<{ connections: number }>));
    // Instance 0 saw the probes before and after the cut, instance 1 its readiness probe and the one during the cut.
    assert.ok(counts[0].connections >= 2, JSON.stringify(counts));
    assert.ok(counts[1].connections >= 2, JSON.stringify(counts));
  } finally {
    await net.cleanup();
    await reap(servers);
  }
  const left = (await namespaces()).filter((n) => names.includes(n));
  assert.deepEqual(left, [], `namespaces left after cleanup: ${left}`);
  await net.cleanup(); // idempotent
});

Deno.test({
  name: "test net: instances route by default via the client, which has no default route",
  ignore: !supported,
}, async () => {
  const net = await createTestNet();
  const servers: Deno.ChildProcess[] = [];
  try {
    const [i0] = net.instances;
    const route = await i0.run(["ip", "route", "show", "default"]);
    assert.match(route.stdout, new RegExp(`default via ${net.client.address.replaceAll(".", "\\.")} dev ${i0.iface}`));
    assert.equal((await net.client.run(["ip", "route", "show", "default"])).stdout.trim(), "");
    // The client answers as "the internet" for an instance.
    servers.push(net.client.spawnNetclient(["listen-tcp", "8000", "--duration-ms", "60000"]));
    await waitFor("client listener", async () => (await probe(i0, net.client, 8000)).ok, 15_000);
    servers[0].kill("SIGTERM");
    assert.ok(((await netclientResult(servers[0])) as { connections: number }).connections >= 1);
    // Nothing off the test subnet is reachable: no route leaves the namespaces.
    const off = await net.client.netclient(["tcp-probe", "172.31.0.1", "80", "--timeout-ms", "500"]) as Probe;
    assert.equal(off.ok, false);
    assert.match(off.error ?? "", /unreachable/i);
  } finally {
    await net.cleanup();
    await reap(servers);
  }
});

Deno.test({
  name: "netclient: redis and http requests and loops against real servers, a cut link counts as failures and a gap",
  ignore: !supported || !haveFile(REDIS) || !haveFile(BUSYBOX),
}, async () => {
  const net = await createTestNet({ instances: 2 });
  const children: Deno.ChildProcess[] = [];
  const www = await Deno.makeTempDir({ prefix: "flexcap-netns-www-" });
  try {
    const [ri, hi] = net.instances;
    await Deno.writeTextFile(`${www}/index.html`, "hello netns\n");
    children.push(ri.spawn([REDIS, "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"]));
    children.push(hi.spawn([BUSYBOX, "httpd", "-f", "-p", "8080", "-h", www]));
    const redis = (...args: string[]) => net.client.netclient(["redis", ri.address, "6379", ...args]);
    await waitFor("redis", async () => ((await redis("PING")) as { reply: unknown }).reply === "PONG", 15_000);
    await waitFor("httpd", async () => (await probe(net.client, hi, 8080)).ok, 15_000);

    assert.deepEqual(await redis("SET", "k", "v 1"), { ok: true, reply: "OK" });
    assert.deepEqual(await redis("GET", "k"), { ok: true, reply: "v 1" });
    assert.deepEqual(await redis("GET", "missing"), { ok: true, reply: null });
    assert.deepEqual(await redis("RPUSH", "l", "a", "b"), { ok: true, reply: 2 });
    assert.deepEqual(await redis("LRANGE", "l", "0", "-1"), { ok: true, reply: ["a", "b"] });
    const bad = await redis("INCR", "k") as { ok: boolean; error?: string };
    assert.equal(bad.ok, false);
    assert.match(bad.error ?? "", /not an integer/);

    const page = await net.client.netclient(["http-get", hi.address, "8080"]) as {
      ok: boolean;
      status: number;
      body: string;
    };
    assert.deepEqual([page.ok, page.status, page.body], [true, 200, "hello netns\n"]);
    const missing = await net.client.netclient(["http-get", hi.address, "8080", "--path", "/nope"]) as {
      ok: boolean;
      status: number;
    };
    assert.deepEqual([missing.ok, missing.status], [false, 404]);

    // Both loops run 7 s; both links are cut for 3 s in the middle, longer than the 2 s request timeout.
    const loops = [
      net.client.spawnNetclient(["redis-loop", ri.address, "6379", "--duration-ms", "7000", "--interval-ms", "20"]),
      net.client.spawnNetclient(["http-loop", hi.address, "8080", "--duration-ms", "7000", "--interval-ms", "20"]),
    ];
    children.push(...loops);
    await new Promise((r) => setTimeout(r, 1_500));
    await net.linkDown(ri);
    await net.linkDown(hi);
    await new Promise((r) => setTimeout(r, 3_000));
    await net.linkUp(ri);
    await net.linkUp(hi);
    const [rs, hs] = await Promise.all(loops.map((l) => netclientResult(l) as Promise<LoopStats>));
    for (const [what, s] of [["redis-loop", rs], ["http-loop", hs]] as const) {
      const msg = `${what}: ${JSON.stringify(s)}`;
      assert.ok(s.failures >= 1, msg);
      assert.ok(s.requests - s.failures >= 20, msg);
      assert.ok(s.errors.length >= 1 && s.errors.length <= 10, msg);
      // The outage spans the cut; a loop that never recovered would have no success after it.
      assert.ok(s.max_gap_ms >= 2_500 && s.max_gap_ms < 6_500, msg);
      assert.ok(s.p50_ms > 0 && s.p50_ms <= s.p99_ms, msg);
    }
    // Every successful INCR was counted by the server: two requests per loop iteration.
    const n = await redis("GET", "flexcap:loop") as { reply: string };
    assert.ok(Number(n.reply) >= (rs.requests - rs.failures) / 2 - 1, `${n.reply} vs ${JSON.stringify(rs)}`);
  } finally {
    await net.cleanup();
    await reap(children);
    await Deno.remove(www, { recursive: true }).catch(() => {});
  }
});

Deno.test(
  { name: "netclient: bad arguments exit 2 with usage, so harness callers fail loudly", ignore: !supported },
  async () => {
    const net = await createTestNet();
    try {
      for (
        const args of [
          ["tcp-probe", net.instances[0].address],
          ["tcp-probe", net.instances[0].address, "99999"],
          ["redis-loop", net.instances[0].address, "6379"],
          ["listen-tcp", "7000", "--bogus", "1"],
          ["frobnicate"],
        ]
      ) {
        await assert.rejects(net.client.netclient(args), /exited 2[\s\S]*usage:/, args.join(" "));
      }
    } finally {
      await net.cleanup();
    }
  },
);

Deno.test({
  name: "sweepStaleTestNamespaces deletes a dead run's namespaces and spares live, young and foreign ones",
  ignore: !supported,
}, async () => {
  // A prefix of its own, so this test neither sees nor sweeps other runs' nets.
  const prefix = "fctsw";
  const hex = () =>
    Array.from(crypto.getRandomValues(new Uint8Array(3)), (b) => b.toString(16).padStart(2, "0")).join("");
  const dead = `${prefix}${hex()}`;
  const young = `${prefix}${hex()}-cl`;
  const foreign = `${prefix}${hex()}-other`;
  const made: string[] = [];
  const ip = async (...args: string[]) => {
    const out = await new Deno.Command("ip", { args, stdout: "null", stderr: "piped" }).output();
    if (!out.success) throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  };
  let live: TestNet | undefined;
  try {
    live = await createTestNet({ prefix });
    // A crashed run: its hub names an owner that has exited.
    const gone = new Deno.Command("true").spawn();
    await gone.status;
    for (const ns of [`${dead}-hub`, `${dead}-i0`, `${dead}-cl`, young, foreign]) {
      await ip("netns", "add", ns);
      made.push(ns);
    }
    await ip("-n", `${dead}-hub`, "link", "set", "lo", "alias", `flexcap-testnet owner=${gone.pid}:1`);

    const deleted = await sweepStaleTestNamespaces(prefix);
    assert.deepEqual(deleted.sort(), [`${dead}-cl`, `${dead}-hub`, `${dead}-i0`]);
    const now = await namespaces();
    for (const ns of [live.hub, live.client.ns, live.instances[0].ns, young, foreign]) {
      assert.ok(now.includes(ns), `${ns} was swept`);
    }
    assert.ok(!now.some((n) => n.startsWith(dead)), "the dead run's namespaces remain");
    assert.ok((await probe(live.client, live.instances[0], 1)).error?.match(/refused/i), "the live net broke");
  } finally {
    await live?.cleanup();
    for (const ns of made) await ip("netns", "del", ns).catch(() => {});
  }
});

Deno.test({
  name: "startTestAgent({ netns }) runs the agent in that namespace, also after kill9 and restart",
  ignore: !supported,
}, async () => {
  const net = await createTestNet();
  try {
    const ns = net.instances[0].ns;
    const agent = await startTestAgent({ netns: ns, configYaml: "network:\n  backend: usermode\n" });
    try {
      const netnsOf = (pid: number | string) => Deno.readLinkSync(`/proc/${pid}/ns/net`);
      const inNs = async () => {
        const pid = agent.pid();
        assert.ok(pid, "no agent pid");
        // The child is the agent itself (ip netns exec execs it), not a wrapper around it.
        assert.match(Deno.readTextFileSync(`/proc/${pid}/cmdline`), /flexcapd\.ts/);
        assert.notEqual(netnsOf(pid), netnsOf("self"));
        // The namespace is the one asked for: `ip netns pids` lists the agent.
        const pids = await new Deno.Command("ip", { args: ["netns", "pids", ns], stdout: "piped" }).output();
        assert.ok(
          new TextDecoder().decode(pids.stdout).split(/\s+/).includes(String(pid)),
          `agent ${pid} not in ${ns}`,
        );
        assert.ok(await agent.client.agent.getAgentInfo({}));
      };
      await inNs();
      const first = agent.pid()!;
      await agent.kill9();
      assert.equal(agent.pid(), undefined);
      assert.throws(() => netnsOf(first), "the killed agent still runs");
      await agent.restart();
      await inNs();
    } finally {
      await agent.cleanup();
    }
  } finally {
    await net.cleanup();
  }
});
