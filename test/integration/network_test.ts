/**
 * The bridge network end to end, inside namespaces the test creates: an instance running
 * flexcapd and a client standing in for the internet. Ports become reachable only when the
 * app listens, capsules are isolated, hostile listens are refused, the agent's table holds
 * exactly the state, and a kill -9 of the agent costs a client nothing.
 */
import assert from "node:assert/strict";
import { CapsuleSpec, EventType, type WatchEventsResponse } from "../../agent/gen/flexcap/v1/capsule.ts";
import { buildHttpdImage, waitFor } from "../harness/agent.ts";
import { buildRedisImage, buildShellImage } from "../harness/images.ts";
import { createTestNet, netclientResult, netnsSupported, type TestNet } from "../harness/netns.ts";
import { startInstance, type TestInstance } from "../harness/instance.ts";
import { CapsuleState as S, collect, logsText, rejectsWith, Status, until } from "./_util.ts";

const supported = await netnsSupported();
const TCP = 1;

const tcpPort = (guest: number, host: number) => ({ guestPort: guest, hostPort: host, protocol: TCP });

/** Probes each "ip:port" of $TARGETS from inside the capsule and logs REACH or BLOCK per target. */
const PROBE_SCRIPT = `sleep 1
for t in $TARGETS; do
  out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc -w 3 \${t%:*} \${t#*:} 2>/dev/null | head -c 64)
  if [ -n "$out" ]; then echo "REACH $t"; else echo "BLOCK $t"; fi
done
# Then pretend to be $SPOOF (another capsule's address): the tap's guard must drop it.
if [ -n "$SPOOF" ]; then
  ip addr flush dev eth0; ip addr add $SPOOF/16 dev eth0; ip route add default via 10.200.0.1
  out=$(printf 'x\r\n' | timeout 5 nc -w 3 \${SPOOF_TARGET%:*} \${SPOOF_TARGET#*:} 2>/dev/null | head -c 64)
  if [ -n "$out" ]; then echo "SPOOF-REACH"; else echo "SPOOF-BLOCK"; fi
fi
echo PROBES-DONE
exec sleep 100000`;

Deno.test({
  name: "network: bridge, NAPT on listen, isolation, hostile listens, restart safety",
  ignore: !supported,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    let net: TestNet | undefined;
    let inst: TestInstance | undefined;
    try {
      net = await createTestNet({ instances: 1 });
      inst = await startInstance(net, 0);
      const { client: fc } = inst.agent;
      const c = fc.capsules;
      const addr = inst.host.address;
      const client = net.client;
      const watch = collect<WatchEventsResponse>(fc.raw.capsules.watchEvents({ capsule: "" }));
      const events = (name: string, type: EventType) =>
        watch.items.map((i) => i.event!).filter((e) => e.capsuleName === name && e.type === type);
      const probe = async (port: number) =>
        (await client.netclient(["tcp-probe", addr, String(port), "--timeout-ms", "1500"])) as { ok: boolean };
      const ip = async (name: string) =>
        (await c.getCapsule({ capsule: name })).capsule!.network!.address.split("/")[0];

      await buildHttpdImage(fc, "httpd", "hello through NAPT\n");
      await buildRedisImage(fc, "redis");

      await t.step("the agent built the bridge with the anycast gateway", async () => {
        const r = await inst!.host.run(["ip", "-j", "addr", "show", "dev", "fc0"]);
        const link = JSON.parse(r.stdout)[0];
        assert.equal(link.address, "02:fc:00:00:00:01");
        assert.deepEqual(link.addr_info.map((a: { local: string; prefixlen: number }) => `${a.local}/${a.prefixlen}`), [
          "10.200.0.1/32",
        ]);
      });

      await t.step("httpd becomes reachable from the client only once it listens", async () => {
        const created = (await c.createCapsule({
          name: "web",
          spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32, ports: [tcpPort(80, 8080)] }),
        })).capsule!;
        assert.equal(created.network!.backend, "bridge");
        assert.match(created.network!.address, /^10\.200\.0\.\d+\/16$/);
        assert.equal(created.network!.gateway, "10.200.0.1");
        assert.ok((await inst!.links()).includes(created.network!.tap), "tap made with the capsule");
        assert.equal((await probe(8080)).ok, false, "nothing answers before the capsule runs");
        assert.doesNotMatch(await inst!.tableText(), /dport 8080/);
        await c.startCapsule({ capsule: "web" });
        await until("EXPOSED web", () => events("web", EventType.EVENT_TYPE_EXPOSED).length > 0);
        const got = await client.netclient(["http-get", addr, "8080"]) as { ok: boolean; status: number; body: string };
        assert.equal(got.status, 200, JSON.stringify(got));
        assert.match(got.body, /hello through NAPT/);
        const table = await inst!.tableText();
        assert.match(table, new RegExp(`dport 8080 dnat ip to ${(await ip("web")).replaceAll(".", "\\.")}:80`));
        const shown = (await c.getCapsule({ capsule: "web" })).capsule!;
        assert.deepEqual(shown.exposed.map((p) => p.hostPort), [8080]);
        // A client on the instance itself, through loopback (output chain + masquerade).
        const local = await inst!.host.netclient(["http-get", "127.0.0.1", "8080"]) as { status: number };
        assert.equal(local.status, 200);
      });

      await t.step("redis answers the client at instance:6380", async () => {
        await c.createCapsule({
          name: "kv",
          spec: CapsuleSpec.fromPartial({ image: "redis", memoryMib: 48, ports: [tcpPort(6379, 6380)] }),
        });
        await c.startCapsule({ capsule: "kv" });
        await until("EXPOSED kv", () => events("kv", EventType.EVENT_TYPE_EXPOSED).length > 0);
        const set = await client.netclient(["redis", addr, "6380", "SET", "k", "v1"]) as { reply: unknown };
        assert.equal(set.reply, "OK");
        const get = await client.netclient(["redis", addr, "6380", "GET", "k"]) as { reply: unknown };
        assert.equal(get.reply, "v1");
      });

      await t.step("when the app stops listening the rule goes, while the capsule still runs", async () => {
        await buildShellImage(fc, "brief", "busybox httpd -f -p 80 -h / & sleep 12; kill $!; sleep 3; exit 0");
        await c.createCapsule({
          name: "brief",
          spec: CapsuleSpec.fromPartial({ image: "brief", memoryMib: 24, ports: [tcpPort(80, 8090)] }),
        });
        await c.startCapsule({ capsule: "brief" });
        await until("EXPOSED brief", () => events("brief", EventType.EVENT_TYPE_EXPOSED).length > 0);
        assert.equal((await probe(8090)).ok, true);
        await until("UNEXPOSED brief", () => events("brief", EventType.EVENT_TYPE_UNEXPOSED).length > 0, 30_000);
        const during = (await c.getCapsule({ capsule: "brief" })).capsule!;
        assert.equal(during.state, S.CAPSULE_STATE_RUNNING, "unlisten, not exit, removed it");
        assert.equal(during.exposed.length, 0);
        assert.doesNotMatch(await inst!.tableText(), /dport 8090/);
        assert.equal((await probe(8090)).ok, false);
        await until(
          "brief exited",
          async () => (await c.getCapsule({ capsule: "brief" })).capsule!.state === S.CAPSULE_STATE_STOPPED,
          30_000,
        );
      });

      await t.step("hostile listens are refused: outside the allowance, a port a host process holds", async () => {
        // The app listens on 80 (allowed), 22 and 81 (not in its spec).
        await buildShellImage(
          fc,
          "greedy",
          "busybox httpd -p 80 -h /; busybox httpd -p 22 -h /; busybox httpd -p 81 -h /; exec sleep 100000",
        );
        await c.createCapsule({
          name: "greedy",
          spec: CapsuleSpec.fromPartial({ image: "greedy", memoryMib: 24, ports: [tcpPort(80, 8100)] }),
        });
        await c.startCapsule({ capsule: "greedy" });
        await until("greedy refusals", () => events("greedy", EventType.EVENT_TYPE_EXPOSE_REFUSED).length >= 2);
        const refused = events("greedy", EventType.EVENT_TYPE_EXPOSE_REFUSED).map((e) => e.port!.port).sort();
        assert.deepEqual(refused, [22, 81]);
        assert.match(events("greedy", EventType.EVENT_TYPE_EXPOSE_REFUSED)[0].message, /not in spec\.ports/);
        assert.deepEqual((await c.getCapsule({ capsule: "greedy" })).capsule!.exposed.map((p) => p.hostPort), [8100]);
        const table = await inst!.tableText();
        assert.doesNotMatch(table, /dport 22 /);
        assert.doesNotMatch(table, /dport 81 /);

        // A host process takes 8110 after the capsule reserved it: the listen is refused, not stolen.
        await c.createCapsule({
          name: "late",
          spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32, ports: [tcpPort(80, 8110)] }),
        });
        const squatter = inst!.host.spawnNetclient(["listen-tcp", "8110", "--duration-ms", "60000"]);
        try {
          await waitFor(
            "squatter listening",
            async () => ((await inst!.host.netclient(["tcp-probe", "127.0.0.1", "8110"])) as { ok: boolean }).ok,
          );
          await c.startCapsule({ capsule: "late" });
          await until("late refused", () => events("late", EventType.EVENT_TYPE_EXPOSE_REFUSED).length > 0);
          assert.match(
            events("late", EventType.EVENT_TYPE_EXPOSE_REFUSED)[0].message,
            /8110\/tcp is in use by a process/,
          );
          assert.doesNotMatch(await inst!.tableText(), /dport 8110/);
          assert.equal((await probe(8110)).ok, true);
        } finally {
          squatter.kill("SIGTERM");
        }
        // Its own count proves the client's connection reached the host process, not the capsule.
        const served = await netclientResult(squatter) as { connections: number };
        assert.ok(served.connections >= 2, `host process served ${served.connections} connections`);

        // Another capsule's host port, and a port a host process holds, are refused at create.
        await rejectsWith(
          c.createCapsule({
            name: "thief",
            spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32, ports: [tcpPort(80, 8080)] }),
          }),
          Status.FAILED_PRECONDITION,
          /spec\.ports\[0\]\.host_port: 8080\/tcp is promised to capsule "web"/,
        );
        const sshd = inst!.host.spawnNetclient(["listen-tcp", "22", "--duration-ms", "60000"]);
        try {
          await waitFor(
            "fake sshd listening",
            async () => ((await inst!.host.netclient(["tcp-probe", "127.0.0.1", "22"])) as { ok: boolean }).ok,
          );
          await rejectsWith(
            c.createCapsule({
              name: "thief",
              spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32, ports: [tcpPort(22, 22)] }),
            }),
            Status.FAILED_PRECONDITION,
            /spec\.ports\[0\]\.host_port: 22\/tcp is in use/,
          );
        } finally {
          sshd.kill("SIGTERM");
          await netclientResult(sshd).catch(() => {});
        }
        assert.equal((await c.listCapsules({ labelSelector: {} })).capsules.some((x) => x.name === "thief"), false);
      });

      await t.step("isolation: from inside a capsule only allowed peers and the outside are reachable", async () => {
        const webIp = await ip("web");
        // "friend" lets "prober" in; "web" does not.
        await c.createCapsule({
          name: "friend",
          spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32, allowFrom: ["prober"] }),
        });
        await c.startCapsule({ capsule: "friend" });
        const friendIp = await ip("friend");
        // Stand-ins: a host service on the instance, the cloud metadata address and an internet server.
        const hostSvc = inst!.host.spawnNetclient(["listen-tcp", "2222", "--duration-ms", "120000"]);
        await client.run(["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
        const metadata = client.spawnNetclient(["listen-tcp", "80", "--duration-ms", "120000"]);
        const internet = client.spawnNetclient(["listen-tcp", "7000", "--duration-ms", "120000"]);
        try {
          await waitFor(
            "metadata stand-in",
            async () => ((await inst!.host.netclient(["tcp-probe", "169.254.169.254", "80"])) as { ok: boolean }).ok,
          );
          const targets = {
            [`${friendIp}:80`]: "REACH",
            [`${client.address}:7000`]: "REACH",
            [`${webIp}:80`]: "BLOCK",
            [`${addr}:8080`]: "BLOCK", // web through the instance's DNAT: still capsule to capsule
            [`${addr}:2222`]: "BLOCK",
            ["10.200.0.1:2222"]: "BLOCK",
            ["169.254.169.254:80"]: "BLOCK",
          };
          await buildShellImage(fc, "prober", PROBE_SCRIPT);
          await c.createCapsule({
            name: "prober",
            spec: CapsuleSpec.fromPartial({
              image: "prober",
              memoryMib: 24,
              env: { TARGETS: Object.keys(targets).join(" "), SPOOF: webIp, SPOOF_TARGET: `${client.address}:7000` },
            }),
          });
          await c.startCapsule({ capsule: "prober" });
          const out = await until("probes done", async () => {
            const text = await logsText(fc, "prober");
            return text.includes("PROBES-DONE") ? text : undefined;
          }, 90_000);
          for (const [target, want] of Object.entries(targets)) {
            assert.ok(out.includes(`${want} ${target}`), `${target}: expected ${want}\n${out}`);
          }
          // The same capsule reached the client with its own address; with web's it cannot.
          assert.ok(out.includes("SPOOF-BLOCK"), out);
          const tap = (await c.getCapsule({ capsule: "prober" })).capsule!.network!.tap;
          const guard = (await inst!.host.run(["nft", "list", "chain", "inet", "flexcap", `ingress_${tap}`])).stdout;
          const dropped = /counter packets (\d+) bytes \d+ drop comment "spoofed ip"/.exec(guard);
          assert.ok(dropped && Number(dropped[1]) > 0, `spoofed packets counted at the tap:\n${guard}`);
        } finally {
          for (const p of [hostSvc, metadata, internet]) {
            p.kill("SIGTERM");
            await netclientResult(p).catch(() => {});
          }
        }
      });

      await t.step("an egress limit shapes what a capsule sends (ifb + tbf on its tap)", async () => {
        // The sink reads what the sender sends. busybox nc quits at EOF on its own stdin, so that is a
        // FIFO held open for writing by nc itself.
        const sink = client.spawn([
          "bash",
          "-c",
          "f=$(mktemp -u); mkfifo $f; exec 3<>$f; rm $f; exec timeout 60 busybox nc -l -p 7001 <&3 >/dev/null",
        ]);
        try {
          await buildShellImage(
            fc,
            "sender",
            "sleep 1; dd if=/dev/zero bs=1024 count=300 2>/dev/null | nc -w 5 $SINK; echo SENT; exec sleep 100000",
          );
          await c.createCapsule({
            name: "sender",
            spec: CapsuleSpec.fromPartial({
              image: "sender",
              memoryMib: 24,
              egressKbps: 800,
              env: { SINK: `${client.address} 7001` },
            }),
          });
          const id = (await c.getCapsule({ capsule: "sender" })).capsule!.id;
          const ifb = `fq${id.slice(2)}`;
          assert.ok((await inst!.links()).includes(ifb), "the shaper exists with the capsule");
          await c.startCapsule({ capsule: "sender" });
          await until("sent", async () => (await logsText(fc, "sender")).includes("SENT") || undefined, 60_000);
          const stats = (await inst!.host.run(["tc", "-s", "qdisc", "show", "dev", ifb])).stdout;
          assert.match(stats, /tbf .*rate 800Kbit/, stats);
          const sent = Number(/Sent (\d+) bytes/.exec(stats)?.[1] ?? 0);
          const over = Number(/overlimits (\d+)/.exec(stats)?.[1] ?? 0);
          assert.ok(sent > 300 * 1024, `the capsule's traffic went through the shaper: ${stats}`);
          assert.ok(over > 0, `the limit held packets back: ${stats}`);
          // Capsules without a limit get no shaper.
          const webId = (await c.getCapsule({ capsule: "web" })).capsule!.id;
          assert.ok(!(await inst!.links()).includes(`fq${webId.slice(2)}`));
        } finally {
          try {
            sink.kill("SIGTERM");
          } catch { /* done */ }
          await sink.output().catch(() => {});
        }
      });

      await t.step("the kernel's table is exactly the rendered state (a foreign rule is replaced)", async () => {
        // Someone adds a rule to our table; the next change replaces the whole table.
        await inst!.host.run(["nft", "add", "rule", "inet", "flexcap", "input", "tcp", "dport", "9", "accept"]);
        assert.match(await inst!.tableText(), /dport 9 accept/);
        await c.stopCapsule({ capsule: "greedy", graceMs: 1000 });
        const text = await inst!.tableText();
        assert.doesNotMatch(text, /dport 9 accept/);
        assert.doesNotMatch(text, /dport 8100/, "stopped capsule's exposure withdrawn");
        assert.match(text, /dport 8080/);
        assert.doesNotMatch(inst!.agent.logs(), /nft table differs from the state/);
      });

      await t.step("kill -9 and restart of the agent: a redis client loop sees no failed request", async () => {
        const before = await inst!.tableText();
        const loop = client.spawnNetclient([
          "redis-loop",
          addr,
          "6380",
          "--duration-ms",
          "9000",
          "--interval-ms",
          "20",
        ]);
        await new Promise((r) => setTimeout(r, 2000));
        await inst!.agent.kill9();
        await new Promise((r) => setTimeout(r, 1000));
        await inst!.agent.restart();
        const res = await netclientResult(loop) as { requests: number; failures: number; errors: string[] };
        assert.ok(res.requests > 50, JSON.stringify(res));
        assert.equal(res.failures, 0, JSON.stringify(res));
        assert.equal(await inst!.tableText(), before, "the restart replaced the table with the same state");
        const kv = (await inst!.agent.client.capsules.getCapsule({ capsule: "kv" })).capsule!;
        assert.equal(kv.state, S.CAPSULE_STATE_RUNNING);
        assert.deepEqual(kv.exposed.map((p) => p.hostPort), [6380]);
        const get = await client.netclient(["redis", addr, "6380", "GET", "k"]) as { reply: unknown };
        assert.equal(get.reply, "v1");
      });

      await t.step("delete removes the tap, the rules and the address lease", async () => {
        const c2 = inst!.agent.client.capsules;
        // After the restart (the allocator's memory is gone) a new capsule still gets an unused address.
        await c2.createCapsule({ name: "fresh", spec: CapsuleSpec.fromPartial({ image: "httpd", memoryMib: 32 }) });
        const all = (await c2.listCapsules({ labelSelector: {} })).capsules.map((x) => x.network!.address);
        assert.equal(new Set(all).size, all.length, `addresses are unique: ${all.join(" ")}`);
        const web = (await c2.getCapsule({ capsule: "web" })).capsule!;
        await c2.stopCapsule({ capsule: "web", graceMs: 1000 });
        await c2.deleteCapsule({ capsule: "web" });
        assert.ok(!(await inst!.links()).includes(web.network!.tap));
        const text = await inst!.tableText();
        assert.ok(!text.includes(web.network!.tap) && !text.includes(web.id), text);
        const route = await inst!.host.run(["ip", "route", "show", `${web.network!.address.split("/")[0]}/32`]);
        assert.equal(route.stdout.trim(), "");
      });

      await t.step("uninstall removes the table, the taps and the bridge", async () => {
        const c2 = inst!.agent.client.capsules;
        for (const x of (await c2.listCapsules({ labelSelector: {} })).capsules) {
          if (x.state === S.CAPSULE_STATE_RUNNING) await c2.stopCapsule({ capsule: x.name, graceMs: 1000 });
        }
        await inst!.agent.kill9();
        const r = await inst!.host.run([
          Deno.execPath(),
          "run",
          "-A",
          new URL("../../agent/cli/flexcapd.ts", import.meta.url).pathname,
          "uninstall",
          "--state-dir",
          inst!.agent.stateDir,
          "--network-backend",
          "bridge",
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(await inst!.table(), undefined);
        const links = await inst!.links();
        assert.ok(!links.includes("fc0") && !links.some((l) => /^f[cq][0-9a-f]{12}$/.test(l)), links.join(","));
      });
      watch.cancel();
    } finally {
      await inst?.cleanup();
      await net?.cleanup();
    }
  },
});
