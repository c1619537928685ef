import assert from "node:assert/strict";
import { CapsuleSpec } from "../../../agent/gen/flexcap/v1/capsule.ts";
import { BuildImageRequest } from "../../../agent/gen/flexcap/v1/image.ts";
import { BuildImageSchema, CreateCapsuleSchema, validate } from "../../../agent/api/validate.ts";
import { InvalidArgumentError } from "../../../agent/errors.ts";
import { toGrpcStatus } from "../../../agent/api/status.ts";
import { FailedPreconditionError, NotFoundError, ResourceExhaustedError } from "../../../agent/errors.ts";

const spec = CapsuleSpec.fromPartial({ image: "httpd" });

function field(input: unknown): string {
  try {
    validate(CreateCapsuleSchema, input);
  } catch (err) {
    assert.ok(err instanceof InvalidArgumentError);
    return err.field;
  }
  throw new Error("accepted");
}

Deno.test("request validation accepts a minimal create", () => {
  assert.equal(validate(CreateCapsuleSchema, { name: "web-1", spec }).name, "web-1");
});

Deno.test("request validation names the proto field that is wrong", () => {
  assert.equal(field({ name: "Web", spec }), "name");
  assert.equal(field({ name: "x".repeat(64), spec }), "name");
  assert.equal(field({ name: "web", spec: undefined }), "spec");
  assert.equal(field({ name: "web", spec: { ...spec, image: "" } }), "spec.image");
  assert.equal(field({ name: "web", spec: { ...spec, memoryMib: 2_000_000 } }), "spec.memory_mib");
  assert.equal(field({ name: "web", spec: { ...spec, vcpus: 65 } }), "spec.vcpus");
  assert.equal(field({ name: "web", spec: { ...spec, args: ["ok", "x".repeat(5000)] } }), "spec.args[1]");
  assert.equal(field({ name: "web", spec: { ...spec, args: Array(300).fill("a") } }), "spec.args");
  assert.equal(field({ name: "web", spec: { ...spec, env: { "1BAD": "v" } } }), "spec.env.1BAD");
  assert.equal(
    field({ name: "web", spec: { ...spec, ports: [{ guestPort: 0, hostPort: 0, protocol: 1 }] } }),
    "spec.ports[0].guest_port",
  );
});

Deno.test("image build validation refuses relative paths and '..'", () => {
  const ok = BuildImageRequest.fromPartial({ name: "httpd", executable: "/bin/busybox" });
  assert.equal(validate(BuildImageSchema, ok).name, "httpd");
  assert.throws(() => validate(BuildImageSchema, { ...ok, executable: "busybox" }), /executable/);
  assert.throws(
    () => validate(BuildImageSchema, { ...ok, files: [{ hostPath: "/a/../etc/shadow", guestPath: "" }] }),
    /files\[0\]\.host_path/,
  );
});

Deno.test("errors map to their gRPC status codes with their message", () => {
  assert.equal(toGrpcStatus(new InvalidArgumentError("spec.memory_mib", "too big")).code, 3);
  assert.equal(toGrpcStatus(new NotFoundError("capsule", "x")).code, 5);
  assert.equal(toGrpcStatus(new FailedPreconditionError("no")).code, 9);
  assert.equal(toGrpcStatus(new ResourceExhaustedError("full")).code, 8);
  const internal = toGrpcStatus(new Error("boom"));
  assert.equal(internal.code, 13);
  assert.equal(internal.details, "boom");
});
