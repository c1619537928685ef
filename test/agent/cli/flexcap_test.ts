import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { startTestAgent } from "../../harness/agent.ts";

const CLI = fileURLToPath(new URL("../../../agent/cli/flexcap.ts", import.meta.url));

async function flexcap(api: string, ...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), { args: ["run", "-A", CLI, "--api", api, ...args] }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test({
  name: "flexcap cli prints tables, json and one-line errors with non-zero exit",
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const agent = await startTestAgent();
  try {
    const info = await flexcap(agent.api, "--json", "info");
    assert.equal(info.code, 0, info.stderr);
    assert.match(JSON.parse(info.stdout).accelerator, /^(kvm|tcg)$/);

    const list = await flexcap(agent.api, "capsule", "list");
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /^NAME\s+ID\s+STATE/);

    const missing = await flexcap(agent.api, "capsule", "get", "nope");
    assert.equal(missing.code, 1);
    assert.equal(missing.stderr.trim(), 'flexcap: NOT_FOUND: capsule "nope" not found');

    const bad = await flexcap(agent.api, "capsule", "create", "Bad", "--image", "x");
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^flexcap: INVALID_ARGUMENT: name: /);

    const usage = await flexcap(agent.api, "capsule", "create", "web", "--image", "x", "--port", "eighty");
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--port expects HOST:GUEST/);

    const images = await flexcap(agent.api, "--json", "image", "list");
    assert.equal(images.code, 0, images.stderr);
    assert.deepEqual(JSON.parse(images.stdout), []);

    const down = await flexcap("unix:/nonexistent/flexcapd.sock", "info");
    assert.equal(down.code, 1);
    assert.match(down.stderr, /^flexcap: UNAVAILABLE/);
  } finally {
    await agent.cleanup();
  }
});
