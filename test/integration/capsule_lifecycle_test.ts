/**
 * Every CapsuleService RPC (and AgentService.GetAgentInfo) against a real flexcapd and
 * real QEMU: one agent, one busybox httpd image, steps in lifecycle order.
 */
import assert from "node:assert/strict";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { EventType, type WatchEventsResponse } from "../../agent/gen/flexcap/v1/capsule.ts";
import {
  CapsuleState as S,
  collect,
  consoleText,
  httpGet,
  pidAlive,
  privatePortsConfig,
  rejectsWith,
  stateName,
  Status,
  until,
} from "./_util.ts";

const INDEX = "hello from the lifecycle test\n";

Deno.test("capsule lifecycle works end to end over gRPC", async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const c = agent.client.capsules;
  const watch = collect<WatchEventsResponse>(agent.client.raw.capsules.watchEvents({ capsule: "" }));
  try {
    let id = "";
    let hostPort = 0;
    let qemuPid = 0;

    await t.step("agent info reports tcg and why", async () => {
      const info = await agent.client.agent.getAgentInfo({});
      assert.equal(info.accelerator, "tcg");
      assert.match(info.acceleratorReason, /vmx\/svm/);
      assert.match(info.qemuVersion, /QEMU emulator version/);
      assert.ok(info.memoryTotalMib > 0 && info.memoryAllocatableMib > 0);
      assert.equal(info.capsules, 0);
      assert.equal(info.memoryCommittedMib, 0);
    });

    const image = await buildHttpdImage(agent.client, "httpd", INDEX);

    await t.step("create applies the image defaults", async () => {
      const created = (await c.createCapsule({
        name: "web",
        spec: spec("httpd", {
          memoryMib: 0,
          vcpus: 0,
          labels: { tier: "web", team: "a" },
          ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }],
        }),
      })).capsule!;
      id = created.id;
      assert.match(id, /^c-[0-9a-f]{12}$/);
      assert.equal(created.name, "web");
      assert.equal(created.state, S.CAPSULE_STATE_CREATED);
      assert.equal(created.spec!.memoryMib, image.defaultMemoryMib);
      assert.ok(image.defaultMemoryMib >= 16);
      assert.equal(created.spec!.vcpus, 1);
      assert.equal(created.imageId, image.id);
      assert.equal(created.qemuPid, 0);
      assert.deepEqual(created.ports, []);
      assert.equal(created.spec!.ports[0].protocol, 1, "unspecified protocol becomes TCP");
      await c.createCapsule({ name: "other", spec: spec(image.id, { labels: { tier: "db", team: "a" } }) });
    });

    await t.step("get finds a capsule by id and by name", async () => {
      const byId = (await c.getCapsule({ capsule: id })).capsule!;
      const byName = (await c.getCapsule({ capsule: "web" })).capsule!;
      assert.equal(byId.id, id);
      assert.deepEqual(byName, byId);
      assert.equal((await c.getCapsule({ capsule: "other" })).capsule!.spec!.image, image.id);
    });

    await t.step("list filters by label selector", async () => {
      const names = async (sel: Record<string, string>) =>
        (await c.listCapsules({ labelSelector: sel })).capsules.map((x) => x.name).sort();
      assert.deepEqual(await names({}), ["other", "web"]);
      assert.deepEqual(await names({ tier: "web" }), ["web"]);
      assert.deepEqual(await names({ team: "a" }), ["other", "web"]);
      assert.deepEqual(await names({ team: "a", tier: "db" }), ["other"]);
      assert.deepEqual(await names({ tier: "nope" }), []);
      assert.equal((await agent.client.agent.getAgentInfo({})).capsules, 2);
    });

    await t.step("start boots the guest and httpd answers on the forwarded port", async () => {
      const started = (await c.startCapsule({ capsule: "web" })).capsule!;
      assert.equal(started.state, S.CAPSULE_STATE_RUNNING);
      assert.ok(started.qemuPid > 0 && pidAlive(started.qemuPid));
      assert.equal(started.accelerator, "tcg");
      assert.equal(started.hostAddress, "127.0.0.1");
      assert.equal(started.ports.length, 1);
      assert.equal(started.ports[0].guestPort, 80);
      assert.ok(started.ports[0].hostPort > 0);
      assert.ok(started.memory && started.memory.guestMib === image.defaultMemoryMib && started.memory.qemuRssKib > 0);
      hostPort = started.ports[0].hostPort;
      qemuPid = started.qemuPid;
      const body = await waitFor("httpd to answer", () => httpGet(hostPort, 2_000), 60_000);
      assert.equal(body, INDEX);
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, image.defaultMemoryMib);
    });

    await t.step("console from the start shows the app being started", async () => {
      const text = await consoleText(agent.client, "web");
      assert.match(text, /capsule-init: started \/bin\/busybox/);
    });

    await t.step("pause freezes the guest and resume thaws it", async () => {
      const paused = (await c.pauseCapsule({ capsule: "web" })).capsule!;
      assert.equal(paused.state, S.CAPSULE_STATE_PAUSED);
      assert.equal(paused.qemuPid, qemuPid);
      await assert.rejects(httpGet(hostPort, 1_500), "a paused guest must not answer");
      const resumed = (await c.resumeCapsule({ capsule: id })).capsule!;
      assert.equal(resumed.state, S.CAPSULE_STATE_RUNNING);
      assert.equal(await waitFor("httpd after resume", () => httpGet(hostPort, 2_000), 30_000), INDEX);
    });

    await t.step("stop ends the app with SIGTERM and powers the guest off", async () => {
      const stopped = (await c.stopCapsule({ capsule: "web", graceMs: 0 })).capsule!;
      assert.equal(stopped.state, S.CAPSULE_STATE_STOPPED, stopped.stateReason);
      assert.match(stopped.stateReason, /app exited with code 143/);
      assert.match(stopped.stateReason, /powered off/);
      assert.equal(stopped.exitCode, 143);
      assert.equal(stopped.qemuPid, 0);
      assert.equal(stopped.memory, undefined);
      assert.deepEqual(stopped.ports, []);
      await waitFor("qemu to be gone", () => !pidAlive(qemuPid), 10_000);
      await assert.rejects(httpGet(hostPort, 1_000));
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, 0);
    });

    await t.step("start after stop boots again and a followed console delivers the new output", async () => {
      const follow = agent.client.raw.capsules.streamConsole({ capsule: "web", fromStart: false, follow: true });
      const dec = new TextDecoder();
      let followed = "";
      follow.on("data", (m: { data: Uint8Array }) => (followed += dec.decode(m.data, { stream: true })));
      follow.on("error", () => {});
      try {
        const again = (await c.startCapsule({ capsule: "web" })).capsule!;
        assert.equal(again.state, S.CAPSULE_STATE_RUNNING);
        assert.equal(again.exitCode, undefined, "exit code of the previous run is cleared");
        assert.notEqual(again.qemuPid, qemuPid);
        qemuPid = again.qemuPid;
        hostPort = again.ports[0].hostPort;
        await waitFor("followed console to show the new boot", () => /capsule-init: started/.test(followed), 60_000);
        assert.doesNotMatch(followed, /app killed by signal 15/, "follow without from_start skips old output");
        assert.equal(await waitFor("httpd after restart", () => httpGet(hostPort, 2_000), 60_000), INDEX);
      } finally {
        follow.cancel();
      }
    });

    await t.step("a qemu killed from outside leaves the capsule stopped without a stale exit code", async () => {
      Deno.kill(qemuPid, "SIGKILL");
      const got = await until("capsule to be stopped", async () => {
        const x = (await c.getCapsule({ capsule: "web" })).capsule!;
        return x.state === S.CAPSULE_STATE_STOPPED ? x : undefined;
      }, 20_000);
      assert.match(got.stateReason, /qemu exited/);
      assert.doesNotMatch(got.stateReason, /143/, `stale exit code in "${got.stateReason}"`);
      assert.equal(got.exitCode, undefined);
    });

    await t.step("delete removes the capsule", async () => {
      await c.deleteCapsule({ capsule: "web" });
      await c.deleteCapsule({ capsule: "other" });
      await rejectsWith(c.getCapsule({ capsule: "web" }), Status.NOT_FOUND, '"web"');
      await rejectsWith(c.getCapsule({ capsule: id }), Status.NOT_FOUND, id);
      assert.deepEqual((await c.listCapsules({ labelSelector: {} })).capsules, []);
    });

    await t.step("watch events reports every transition in order", async () => {
      await waitFor(
        "deleted event",
        () => watch.items.some((e) => e.event!.type === EventType.EVENT_TYPE_DELETED && e.event!.capsuleName === "web"),
        10_000,
      );
      assert.equal(watch.error(), undefined);
      const all = watch.items.map((e) => e.event!);
      for (let i = 1; i < all.length; i++) assert.equal(all[i].seq, all[i - 1].seq + 1, "seq increases by one");
      const lifecycle = [
        EventType.EVENT_TYPE_CREATED,
        EventType.EVENT_TYPE_STATE_CHANGED,
        EventType.EVENT_TYPE_DELETED,
      ];
      const mine = all.filter((e) => e.capsuleId === id && lifecycle.includes(e.type));
      const seq = mine.map((e) =>
        e.type === EventType.EVENT_TYPE_CREATED
          ? "created"
          : e.type === EventType.EVENT_TYPE_DELETED
          ? "deleted"
          : stateName(e.state)
      );
      assert.deepEqual(seq, [
        "created",
        "STARTING",
        "RUNNING",
        "PAUSED",
        "RUNNING",
        "STOPPING",
        "STOPPED",
        "STARTING",
        "RUNNING",
        "STOPPED",
        "deleted",
      ]);
      for (let i = 1; i < mine.length; i++) {
        if (mine[i].type === EventType.EVENT_TYPE_STATE_CHANGED) {
          assert.equal(mine[i].previousState, mine[i - 1].state, `previous state of event ${i}`);
        }
        assert.equal(mine[i].capsuleName, "web");
      }
      assert.ok(mine.every((e) => e.time instanceof Date && e.message.length > 0));
    });

    await t.step("watch events of one capsule filters the others out", async () => {
      await c.createCapsule({ name: "solo", spec: spec("httpd") });
      await c.createCapsule({ name: "noise", spec: spec("httpd") });
      const one = collect<WatchEventsResponse>(agent.client.raw.capsules.watchEvents({ capsule: "solo" }));
      try {
        await new Promise((r) => setTimeout(r, 1_000)); // let the subscription reach the agent
        await c.deleteCapsule({ capsule: "noise" });
        await c.deleteCapsule({ capsule: "solo" });
        await waitFor("solo's deleted event", () => one.items.length > 0, 10_000);
        await new Promise((r) => setTimeout(r, 300));
        assert.deepEqual(one.items.map((e) => [e.event!.capsuleName, e.event!.type]), [
          ["solo", EventType.EVENT_TYPE_DELETED],
        ]);
      } finally {
        one.cancel();
      }
      const unknown = collect<WatchEventsResponse>(agent.client.raw.capsules.watchEvents({ capsule: "ghost" }));
      try {
        const err = await until("watch of an unknown capsule to fail", () => unknown.error(), 10_000);
        assert.equal((err as { code?: number }).code, Status.NOT_FOUND);
        assert.match(err.message, /ghost/);
      } finally {
        unknown.cancel();
      }
      await agent.client.images.deleteImage({ image: "httpd" });
      assert.deepEqual((await agent.client.images.listImages({})).images, []);
    });
  } finally {
    watch.cancel();
    await agent.cleanup();
  }
});
