/**
 * Bad input against a real flexcapd: each refusal carries the right gRPC status and a
 * message naming the offending field, and none of them changes any state.
 */
import assert from "node:assert/strict";
import { BuildImageRequest } from "../../agent/gen/flexcap/v1/image.ts";
import { buildHttpdImage, spec, startTestAgent, waitFor } from "../harness/agent.ts";
import { CapsuleState as S, consoleText, httpGet, privatePortsConfig, rejectsWith, Status } from "./_util.ts";

const { INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED, FAILED_PRECONDITION } = Status;

Deno.test("bad input is refused with the right status and changes nothing", async (t) => {
  const agent = await startTestAgent({ configYaml: privatePortsConfig() });
  const c = agent.client.capsules;
  const img = agent.client.images;
  const create = (name: string, over: Record<string, unknown> = {}) =>
    c.createCapsule({ name, spec: spec("httpd", over) });
  const created: string[] = [];
  try {
    await buildHttpdImage(agent.client);

    await t.step("unknown capsule is NOT_FOUND for every capsule RPC", async () => {
      const ref = { capsule: "no-such-capsule" };
      for (
        const [rpc, call] of [
          ["get", () => c.getCapsule(ref)],
          ["start", () => c.startCapsule(ref)],
          ["stop", () => c.stopCapsule({ ...ref, graceMs: 0 })],
          ["delete", () => c.deleteCapsule(ref)],
          ["pause", () => c.pauseCapsule(ref)],
          ["resume", () => c.resumeCapsule(ref)],
          ["save", () => c.saveCapsule(ref)],
          ["restore", () => c.restoreCapsule(ref)],
        ] as const
      ) {
        await rejectsWith(call(), NOT_FOUND, /capsule "no-such-capsule" not found/).catch((e) => {
          throw new Error(`${rpc}: ${e.message}`);
        });
      }
      await rejectsWith(
        consoleText(agent.client, "no-such-capsule"),
        NOT_FOUND,
        /capsule "no-such-capsule" not found/,
      );
    });

    await t.step("empty or oversized capsule reference is INVALID_ARGUMENT naming capsule", async () => {
      await rejectsWith(c.getCapsule({ capsule: "" }), INVALID_ARGUMENT, /^capsule: required/);
      await rejectsWith(c.startCapsule({ capsule: "x".repeat(200) }), INVALID_ARGUMENT, /^capsule: at most 128/);
      await rejectsWith(consoleText(agent.client, ""), INVALID_ARGUMENT, /^capsule: required/);
      await rejectsWith(c.stopCapsule({ capsule: "a", graceMs: 700_000 }), INVALID_ARGUMENT, /^grace_ms:/);
    });

    await t.step("memory 0 takes the image default", async () => {
      const cap = (await create("mem-default", { memoryMib: 0 })).capsule!;
      created.push(cap.name);
      const image = (await img.getImage({ image: "httpd" })).image!;
      assert.equal(cap.spec!.memoryMib, image.defaultMemoryMib);
    });

    await t.step("too little memory is INVALID_ARGUMENT naming spec.memory_mib", async () => {
      await rejectsWith(
        create("mem-small", { memoryMib: 8 }),
        INVALID_ARGUMENT,
        /^spec\.memory_mib: image "[a-z0-9-]+" needs at least \d+ MiB, got 8/,
      );
    });

    await t.step("absurd memory is INVALID_ARGUMENT naming spec.memory_mib", async () => {
      await rejectsWith(create("mem-absurd", { memoryMib: 2_000_000 }), INVALID_ARGUMENT, /^spec\.memory_mib: at most/);
    });

    await t.step("memory beyond the instance is RESOURCE_EXHAUSTED naming spec.memory_mib", async () => {
      const info = await agent.client.agent.getAgentInfo({});
      assert.ok(1_000_000 > info.memoryAllocatableMib, "test assumes an instance smaller than ~1 TB");
      await rejectsWith(
        create("mem-huge", { memoryMib: 1_000_000 }),
        RESOURCE_EXHAUSTED,
        /^spec\.memory_mib: needs 1000000 MiB/,
      );
    });

    await t.step("other out-of-range spec fields are INVALID_ARGUMENT naming the field", async () => {
      await rejectsWith(create("bad-vcpus", { vcpus: 65 }), INVALID_ARGUMENT, /^spec\.vcpus:/);
      await rejectsWith(
        create("bad-port", { ports: [{ guestPort: 0, hostPort: 0, protocol: 0 }] }),
        INVALID_ARGUMENT,
        /^spec\.ports\[0\]\.guest_port:/,
      );
      await rejectsWith(
        create("bad-port", {
          ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }, { guestPort: 80, hostPort: 70_000, protocol: 0 }],
        }),
        INVALID_ARGUMENT,
        /^spec\.ports\[1\]\.host_port:/,
      );
      await rejectsWith(
        create("bad-port", { ports: [{ guestPort: 80, hostPort: 0, protocol: 7 }] }),
        INVALID_ARGUMENT,
        /^spec\.ports\[0\]\.protocol:/,
      );
      await rejectsWith(
        create("dup-port", {
          ports: [{ guestPort: 80, hostPort: 28080, protocol: 0 }, { guestPort: 81, hostPort: 28080, protocol: 0 }],
        }),
        INVALID_ARGUMENT,
        /^spec\.ports\[1\]\.host_port: .*listed twice/,
      );
      const fixed = (await create("fixed-port", { ports: [{ guestPort: 80, hostPort: 28081, protocol: 0 }] })).capsule!;
      created.push(fixed.name);
      await rejectsWith(
        create("same-port", { ports: [{ guestPort: 81, hostPort: 28081, protocol: 0 }] }),
        FAILED_PRECONDITION,
        /^spec\.ports\[0\]\.host_port: 28081\/tcp is promised to capsule "fixed-port"/,
      );
      await rejectsWith(create("bad-env", { env: { "1BAD": "x" } }), INVALID_ARGUMENT, /^spec\.env/);
      await rejectsWith(create("bad-env", { env: { OK: "a\0b" } }), INVALID_ARGUMENT, /^spec\.env\.OK: contains NUL/);
      await rejectsWith(create("bad-label", { labels: { "bad key!": "x" } }), INVALID_ARGUMENT, /^spec\.labels/);
      await rejectsWith(
        c.listCapsules({ labelSelector: { "bad key!": "x" } }),
        INVALID_ARGUMENT,
        /^label_selector/,
      );
    });

    await t.step("oversized strings are INVALID_ARGUMENT naming the field", async () => {
      await rejectsWith(create("n".repeat(100)), INVALID_ARGUMENT, /^name: at most 63 characters/);
      await rejectsWith(
        create("long-arg", { args: ["a".repeat(10_000)] }),
        INVALID_ARGUMENT,
        /^spec\.args\[0\]: at most 4096/,
      );
      await rejectsWith(
        create("many-args", { args: Array.from({ length: 1000 }, (_, i) => `a${i}`) }),
        INVALID_ARGUMENT,
        /^spec\.args: at most 256 arguments/,
      );
      await rejectsWith(
        create("long-label", { labels: { k: "v".repeat(300) } }),
        INVALID_ARGUMENT,
        /^spec\.labels\.k: at most 256/,
      );
      await rejectsWith(
        create("long-image", { image: "i".repeat(200) }),
        INVALID_ARGUMENT,
        /^spec\.image: at most 128/,
      );
    });

    await t.step("bad name characters are INVALID_ARGUMENT naming name", async () => {
      for (const bad of ["Web", "web_1", "1web", "-web", "web site", "wéb", ""]) {
        await rejectsWith(create(bad), INVALID_ARGUMENT, /^name: /).catch((e) => {
          throw new Error(`${JSON.stringify(bad)}: ${e.message}`);
        });
      }
    });

    await t.step("missing spec is INVALID_ARGUMENT naming spec", async () => {
      await rejectsWith(c.createCapsule({ name: "no-spec", spec: undefined }), INVALID_ARGUMENT, /^spec: required/);
    });

    await t.step("unknown image is NOT_FOUND naming the image", async () => {
      await rejectsWith(
        c.createCapsule({ name: "no-image", spec: spec("no-such-image") }),
        NOT_FOUND,
        /image "no-such-image" not found/,
      );
      await rejectsWith(img.getImage({ image: "no-such-image" }), NOT_FOUND, /no-such-image/);
      await rejectsWith(img.deleteImage({ image: "no-such-image" }), NOT_FOUND, /no-such-image/);
      await rejectsWith(img.getImage({ image: "" }), INVALID_ARGUMENT, /^image: required/);
    });

    await t.step("duplicate name is ALREADY_EXISTS", async () => {
      await rejectsWith(create("mem-default"), ALREADY_EXISTS, /capsule "mem-default" already exists/);
      await rejectsWith(buildHttpdImage(agent.client, "httpd"), ALREADY_EXISTS, /image "httpd" already exists/);
    });

    let port = 0;
    await t.step("a running capsule refuses start, resume, restore and delete", async () => {
      const run = (await create("run", { ports: [{ guestPort: 80, hostPort: 0, protocol: 0 }] })).capsule!;
      created.push(run.name);
      const started = (await c.startCapsule({ capsule: "run" })).capsule!;
      assert.equal(started.state, S.CAPSULE_STATE_RUNNING);
      port = started.ports[0].hostPort;
      await rejectsWith(
        c.startCapsule({ capsule: "run" }),
        FAILED_PRECONDITION,
        /cannot start capsule "run": it is running/,
      );
      await rejectsWith(
        c.resumeCapsule({ capsule: "run" }),
        FAILED_PRECONDITION,
        /cannot resume capsule "run": it is running/,
      );
      await rejectsWith(
        c.deleteCapsule({ capsule: run.id }),
        FAILED_PRECONDITION,
        /cannot delete capsule "run": it is running/,
      );
      await rejectsWith(
        c.restoreCapsule({ capsule: "run" }),
        FAILED_PRECONDITION,
        /cannot restore capsule "run": it is running, expected saved/,
      );
    });

    await t.step("a created capsule refuses pause, resume, stop, save and restore", async () => {
      const ref = { capsule: "mem-default" };
      await rejectsWith(
        c.pauseCapsule(ref),
        FAILED_PRECONDITION,
        /cannot pause capsule "mem-default": it is created, expected running/,
      );
      await rejectsWith(c.resumeCapsule(ref), FAILED_PRECONDITION, /cannot resume .* it is created/);
      await rejectsWith(c.stopCapsule({ ...ref, graceMs: 0 }), FAILED_PRECONDITION, /cannot stop .* it is created/);
      await rejectsWith(c.saveCapsule(ref), FAILED_PRECONDITION, /cannot save .* it is created/);
      await rejectsWith(c.restoreCapsule(ref), FAILED_PRECONDITION, /cannot restore .* it is created, expected saved/);
    });

    await t.step("starting beyond the free memory is RESOURCE_EXHAUSTED naming the capsule", async () => {
      const info = await agent.client.agent.getAgentInfo({});
      assert.equal(info.memoryCommittedMib, 128);
      const big = info.memoryAllocatableMib - 64; // fits alone, not next to "run"
      const cap = (await create("big", { memoryMib: big })).capsule!;
      created.push(cap.name);
      await rejectsWith(c.startCapsule({ capsule: "big" }), RESOURCE_EXHAUSTED, /capsule "big": needs \d+ MiB/);
      const after = (await c.getCapsule({ capsule: "big" })).capsule!;
      assert.equal(after.state, S.CAPSULE_STATE_CREATED, "a refused start leaves the capsule as it was");
    });

    await t.step("image delete while used is FAILED_PRECONDITION naming the users", async () => {
      await rejectsWith(
        img.deleteImage({ image: "httpd" }),
        FAILED_PRECONDITION,
        /cannot delete image "httpd": used by capsules .*run/,
      );
      await rejectsWith(
        img.buildImage(BuildImageRequest.fromPartial({
          name: "httpd",
          executable: "/bin/busybox",
          replace: true,
        })),
        FAILED_PRECONDITION,
        /cannot replace image "httpd": used by/,
      );
    });

    await t.step("image build of a bad executable or file is refused with a clear message", async () => {
      const build = (over: Record<string, unknown>) =>
        img.buildImage(BuildImageRequest.fromPartial({
          name: "broken",
          executable: "/bin/busybox",
          ...over,
        }));
      const err = await build({ executable: "/no/such/executable" }).then(
        () => assert.fail("build of a missing executable succeeded"),
        (e) => e,
      );
      assert.ok([INVALID_ARGUMENT, NOT_FOUND].includes(err.code), `code ${err.code}: ${err.details}`);
      assert.match(err.details, /\/no\/such\/executable/);
      await rejectsWith(
        build({ defaultMemoryMib: 4 }),
        INVALID_ARGUMENT,
        /^default_memory_mib: this image needs at least \d+ MiB/,
      );
      await rejectsWith(
        build({ executable: "bin/busybox" }),
        INVALID_ARGUMENT,
        /^executable: expected an absolute path/,
      );
      await rejectsWith(
        build({ executable: "/bin/../bin/busybox" }),
        INVALID_ARGUMENT,
        /^executable: must not contain/,
      );
      await rejectsWith(build({ executable: "/etc/hostname" }), INVALID_ARGUMENT, /\/etc\/hostname: not an ELF file/);
      await rejectsWith(build({ executable: "/etc" }), INVALID_ARGUMENT, /executable \/etc: is a directory/);
      await rejectsWith(
        build({ files: [{ hostPath: "/no/such/dir", guestPath: "" }] }),
        INVALID_ARGUMENT,
        /files.*host_path: \/no\/such\/dir does not exist/,
      );
      await rejectsWith(build({ name: "Bad Name" }), INVALID_ARGUMENT, /^name: /);
      await rejectsWith(build({ kernel: 5 }), INVALID_ARGUMENT, /^kernel: unknown kernel kind/);
      await rejectsWith(build({ workdir: "srv" }), INVALID_ARGUMENT, /^workdir: expected an absolute path/);
    });

    await t.step("bad input changed nothing", async () => {
      const caps = (await c.listCapsules({ labelSelector: {} })).capsules;
      assert.deepEqual(caps.map((x) => x.name).sort(), [...created].sort());
      assert.deepEqual((await img.listImages({})).images.map((i) => i.name), ["httpd"]);
      const run = caps.find((x) => x.name === "run")!;
      assert.equal(run.state, S.CAPSULE_STATE_RUNNING);
      assert.equal(await waitFor("httpd", () => httpGet(port, 2_000), 60_000), "hello from a capsule\n");
      for (const x of caps.filter((x) => x.name !== "run")) assert.equal(x.state, S.CAPSULE_STATE_CREATED, x.name);
      assert.equal((await agent.client.agent.getAgentInfo({})).memoryCommittedMib, 128);
    });
  } finally {
    await agent.cleanup();
  }
});
