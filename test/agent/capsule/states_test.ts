import assert from "node:assert/strict";
import { assertTransition, canTransition, CAPSULE_STATES, requireState } from "../../../agent/capsule/states.ts";
import { FailedPreconditionError } from "../../../agent/errors.ts";

Deno.test("capsule state machine allows the documented lifecycle", () => {
  const path = ["created", "starting", "running", "paused", "running", "saving", "saved", "restoring", "running"];
  for (let i = 1; i < path.length; i++) {
    assert.ok(canTransition(path[i - 1] as never, path[i] as never), `${path[i - 1]} -> ${path[i]}`);
  }
  assert.ok(canTransition("running", "stopping") && canTransition("stopping", "stopped"));
  assert.ok(canTransition("stopped", "starting"));
});

Deno.test("capsule state machine refuses illegal transitions with FailedPrecondition", () => {
  assert.ok(!canTransition("created", "running"));
  assert.ok(!canTransition("saved", "running"));
  assert.ok(!canTransition("stopped", "paused"));
  assert.throws(() => assertTransition("web", "created", "paused"), FailedPreconditionError);
  assert.throws(
    () => requireState("web", "created", "pause", ["running"]),
    /cannot pause capsule "web": it is created/,
  );
  // Every state can be left somehow: no state is a trap.
  for (const s of CAPSULE_STATES) assert.ok(CAPSULE_STATES.some((t) => canTransition(s, t)), s);
});
