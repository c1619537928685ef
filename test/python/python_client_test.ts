/**
 * The API from another language: test/python/flexcap_client.py (Debian's python3-grpcio,
 * stubs generated at run time from proto/) drives a real flexcapd, and what it created is
 * then checked through the TypeScript client.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { buildHttpdImage, startTestAgent } from "../harness/agent.ts";
import { CapsuleState } from "../../agent/gen/flexcap/v1/capsule.ts";

const SCRIPT = fileURLToPath(new URL("./flexcap_client.py", import.meta.url));
// Debian's python, which sees python3-grpcio; not whatever python3 is first on PATH.
const PYTHON = "/usr/bin/python3";

interface PyResult {
  ok: boolean;
  error?: string;
  codegen: string;
  capsule: { id: string; name: string; state: string; image_id: string; memory_mib: number };
  listed_before: number;
  listed_after: number;
  invalid_argument: { field: string; code: string; details: string }[];
  health: Record<string, string>;
  reflection_services: string[];
  reflected_methods: number;
}

async function runPython(...args: string[]): Promise<{ code: number; json: PyResult; stderr: string }> {
  const out = await new Deno.Command(PYTHON, {
    args: [SCRIPT, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { PYTHONDONTWRITEBYTECODE: "1" },
  }).output();
  const stdout = new TextDecoder().decode(out.stdout).trim();
  const stderr = new TextDecoder().decode(out.stderr);
  const last = stdout.split("\n").at(-1) ?? "";
  let json: PyResult;
  try {
    json = JSON.parse(last);
  } catch {
    throw new Error(`python printed no JSON (exit ${out.code}):\n${stdout}\n${stderr}`);
  }
  return { code: out.code, json, stderr };
}

Deno.test({
  name: "a Python gRPC client creates, gets and lists capsules; errors, health and reflection work",
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const agent = await startTestAgent();
  try {
    const image = await buildHttpdImage(agent.client);
    const { code, json, stderr } = await runPython(agent.api, "from-python", image.id);
    assert.equal(code, 0, `python client failed: ${json.error}\n${stderr}`);
    assert.equal(json.ok, true);
    assert.equal(json.capsule.name, "from-python");
    assert.equal(json.capsule.state, "CAPSULE_STATE_CREATED");
    assert.equal(json.capsule.image_id, image.id);
    assert.equal(json.capsule.memory_mib, 128);
    assert.equal(json.listed_after, json.listed_before + 1);
    assert.deepEqual(json.invalid_argument.map((e) => e.field), ["name", "spec.ports[0].guest_port", "capsule"]);
    for (const e of json.invalid_argument) assert.equal(e.code, "INVALID_ARGUMENT");
    assert.deepEqual(json.health, { "(server)": "SERVING", "flexcap.v1.CapsuleService": "SERVING" });
    assert.ok(json.reflection_services.includes("flexcap.v1.CapsuleService"), String(json.reflection_services));
    assert.equal(json.reflected_methods, 15);

    // What Python created is what the TypeScript client sees.
    const c = (await agent.client.capsules.getCapsule({ capsule: json.capsule.id })).capsule!;
    assert.equal(c.name, "from-python");
    assert.equal(c.state, CapsuleState.CAPSULE_STATE_CREATED);
    assert.equal(c.imageId, image.id);
    assert.equal(c.spec!.memoryMib, 128);
    const all = (await agent.client.capsules.listCapsules({ labelSelector: {} })).capsules;
    assert.deepEqual(all.map((x) => x.id), [json.capsule.id]);

    // Its failures are reported as such: the name is taken now, so a second run must fail.
    const again = await runPython(agent.api, "from-python", image.id);
    assert.notEqual(again.code, 0);
    assert.equal(again.json.ok, false);
    assert.match(again.json.error ?? "", /exists before CreateCapsule/);
  } finally {
    await agent.cleanup();
  }
});
