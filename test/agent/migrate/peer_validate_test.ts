import assert from "node:assert/strict";
import { FailedPreconditionError, InvalidArgumentError } from "../../../agent/errors.ts";
import { Protocol } from "../../../agent/gen/flexcap/v1/capsule.ts";
import type { IncomingCapsule, PrepareIncomingRequest } from "../../../agent/gen/flexcap/v1/peer.ts";
import { parseArrival } from "../../../agent/migrate/peer_validate.ts";
import { DEFAULT_DOWNTIME_LIMIT_MS, DEFAULT_TIMEOUT_MS, UNCAPPED_BANDWIDTH } from "../../../agent/migrate/policy.ts";

const IMAGE = "sha256:" + "ab".repeat(32);

function request(capsule: Partial<IncomingCapsule> = {}, rest: Partial<PrepareIncomingRequest> = {}) {
  const req: PrepareIncomingRequest = {
    migrationId: "m-0123456789ab",
    capsule: {
      id: "c-aaaaaaaaaaaa",
      name: "web",
      imageId: IMAGE,
      spec: {
        image: "web-image",
        memoryMib: 256,
        vcpus: 1,
        args: ["--port", "80"],
        env: { MODE: "prod" },
        labels: { tier: "front" },
        ports: [
          { guestPort: 80, hostPort: 0, protocol: Protocol.PROTOCOL_TCP },
          { guestPort: 53, hostPort: 5353, protocol: Protocol.PROTOCOL_UDP },
        ],
        egressKbps: 0,
        allowFrom: ["db"],
      },
      ip: "10.200.0.7",
      prefix: 16,
      mac: "52:54:00:ab:cd:ef",
      hostPorts: [
        { guestPort: 80, hostPort: 20001, protocol: Protocol.PROTOCOL_UNSPECIFIED },
        { guestPort: 53, hostPort: 5353, protocol: Protocol.PROTOCOL_UDP },
      ],
      listening: [{ port: 80, protocol: Protocol.PROTOCOL_TCP }, { port: 53, protocol: Protocol.PROTOCOL_UDP }],
      paused: false,
      ...capsule,
    },
    options: undefined,
    ...rest,
  };
  return req;
}

function refused(req: PrepareIncomingRequest, field: string, message?: RegExp) {
  assert.throws(
    () => parseArrival(req, "iterative", 1000),
    (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError, `expected InvalidArgumentError, got ${e}`);
      assert.equal(e.field, field);
      if (message) assert.match(e.message, message);
      return true;
    },
  );
}

Deno.test("parseArrival maps a valid PrepareIncoming to an Arrival with defaults applied", () => {
  const a = parseArrival(request(), "single-pass", 4321);
  assert.deepEqual(a, {
    migrationId: "m-0123456789ab",
    capsule: {
      id: "c-aaaaaaaaaaaa",
      name: "web",
      imageId: IMAGE,
      spec: {
        image: "web-image",
        memoryMib: 256,
        vcpus: 1,
        args: ["--port", "80"],
        env: { MODE: "prod" },
        labels: { tier: "front" },
        ports: [
          { guestPort: 80, hostPort: 0, protocol: "tcp" },
          { guestPort: 53, hostPort: 5353, protocol: "udp" },
        ],
        egressKbps: 0,
        allowFrom: ["db"],
      },
      net: {
        ip: "10.200.0.7",
        prefix: 16,
        mac: "52:54:00:ab:cd:ef",
        hostPorts: [
          { guestPort: 80, hostPort: 20001, protocol: "tcp" }, // unspecified means tcp
          { guestPort: 53, hostPort: 5353, protocol: "udp" },
        ],
      },
      listening: [{ port: 80, protocol: "tcp" }, { port: 53, protocol: "udp" }],
      paused: false,
    },
    options: {
      maxBandwidthBytesS: UNCAPPED_BANDWIDTH,
      downtimeLimitMs: DEFAULT_DOWNTIME_LIMIT_MS,
      autoConverge: false,
      allowPostcopy: false,
      timeoutMs: DEFAULT_TIMEOUT_MS,
      gracePeriodMs: 4321,
    },
  });
});

Deno.test("parseArrival passes options through resolveOptions (post-copy refused in single-pass)", () => {
  const options = {
    maxBandwidthMibS: 10,
    downtimeLimitMs: 100,
    autoConverge: true,
    allowPostcopy: true,
    timeoutMs: 5000,
    gracePeriodMs: 0,
  };
  const a = parseArrival(request({}, { options }), "iterative", 777);
  assert.deepEqual(a.options, {
    maxBandwidthBytesS: 10 * 1024 * 1024,
    downtimeLimitMs: 100,
    autoConverge: true,
    allowPostcopy: true,
    timeoutMs: 5000,
    gracePeriodMs: 777,
  });
  assert.throws(() => parseArrival(request({}, { options }), "single-pass", 777), FailedPreconditionError);
  refused(request({}, { options: { ...options, downtimeLimitMs: 60_001 } }), "options.downtime_limit_ms");
});

Deno.test("parseArrival refuses a malformed request with INVALID_ARGUMENT naming the field", () => {
  refused(request({}, { migrationId: "m-XYZ" }), "migration_id", /expected m- and 12 hex digits/);
  refused(request({}, { migrationId: "../../etc" }), "migration_id");
  refused(request({}, { capsule: undefined }), "capsule", /required/);
  refused(request({ id: "c-123" }), "capsule.id");
  refused(request({ name: "Web" }), "capsule.name");
  refused(request({ imageId: "sha256:xyz" }), "capsule.image_id");
  refused(request({ spec: undefined }), "capsule.spec", /required/);
  refused(request({ ip: "10.200.0" }), "capsule.ip");
  refused(request({ prefix: 31 }), "capsule.prefix");
  refused(request({ mac: "52:54:00:AB:CD:EF" }), "capsule.mac", /lowercase MAC/);
  refused(request({ mac: "52:54:00:ab:cd" }), "capsule.mac");
  refused(
    request({ hostPorts: [{ guestPort: 80, hostPort: 20001, protocol: Protocol.PROTOCOL_TCP }] }),
    "capsule.host_ports",
    /must match spec\.ports/,
  );
  refused(
    request({
      hostPorts: [
        { guestPort: 80, hostPort: 70000, protocol: Protocol.PROTOCOL_TCP },
        { guestPort: 53, hostPort: 5353, protocol: Protocol.PROTOCOL_UDP },
      ],
    }),
    "capsule.host_ports[0].host_port",
  );
  const spec = request().capsule!.spec!;
  refused(request({ spec: { ...spec, vcpus: 0 } }), "capsule.spec.vcpus");
  refused(request({ spec: { ...spec, memoryMib: 0 } }), "capsule.spec.memory_mib");
  refused(
    request({ spec: { ...spec, ports: [{ guestPort: 0, hostPort: 0, protocol: 1 }, spec.ports[1]] } }),
    "capsule.spec.ports[0].guest_port",
  );
  refused(request({ listening: [{ port: 0, protocol: 1 }] }), "capsule.listening[0].port");
});
