/**
 * Test harness: runs a real flexcapd as a child process on a temp state dir and unix
 * socket, with helpers to kill -9 and restart it and to clean up every QEMU it started.
 */
import { fileURLToPath } from "node:url";
import { connect, type FlexcapClient } from "../../agent/cli/client.ts";
import { CapsuleSpec } from "../../agent/gen/flexcap/v1/capsule.ts";
export { buildHttpdImage } from "../../agent/cli/httpd_image.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** A flexcapd child process plus a client for it. */
export interface TestAgent {
  stateDir: string;
  api: string;
  client: FlexcapClient;
  /** The agent process's pid while it runs (the same process under `netns`: ip netns exec execs). */
  pid(): number | undefined;
  /** The agent's stderr (JSON log lines) so far. */
  logs(): string;
  /** SIGKILLs the agent (its capsules keep running). */
  kill9(): Promise<void>;
  /** Starts the agent again on the same state dir, with `env` (added to this process's) if given. */
  restart(env?: Record<string, string>): Promise<void>;
  /** Stops the agent, kills every QEMU under the state dir and removes it. */
  cleanup(): Promise<void>;
}

/** Starts flexcapd on a fresh temp state dir. */
export async function startTestAgent(
  opts: {
    extraArgs?: string[];
    configYaml?: string;
    /** Extra environment for the agent process. */
    env?: Record<string, string>;
    /** Where to reach the agent when extraArgs moves its API (e.g. to tcp: with TLS). */
    ready?: { api: string; tls?: { ca?: string; cert?: string; key?: string; serverName?: string } };
    /** Runs the agent inside this network namespace (`ip netns exec`; see netns.ts). */
    netns?: string;
  } = {},
): Promise<TestAgent> {
  const base = await Deno.makeTempDir({ prefix: "flexcap-test-" });
  const stateDir = `${base}/state`;
  const api = opts.ready?.api ?? `unix:${base}/api.sock`;
  const args = ["run", "-A", `${ROOT}/agent/cli/flexcapd.ts`, "serve", "--state-dir", stateDir, "--api", api];
  if (opts.configYaml) {
    await Deno.writeTextFile(`${base}/config.yaml`, opts.configYaml);
    args.push("--config", `${base}/config.yaml`);
  }
  // Outside a namespace of the test's own, the agent must not build a bridge and nft table in the
  // host's network: it gets the rootless backend unless the caller chose one.
  const chosen = (opts.extraArgs ?? []).includes("--network-backend") || /^\s*backend:/m.test(opts.configYaml ?? "");
  if (!opts.netns && !chosen) args.push("--network-backend", "usermode");
  args.push(...(opts.extraArgs ?? []));
  let child: Deno.ChildProcess | undefined;
  let logText = "";
  let client: FlexcapClient | undefined;
  let pump: Promise<void> = Promise.resolve();
  let env = opts.env ?? {};

  const spawn = async () => {
    // ip netns exec enters the namespace and execs the agent, so `child` is still the agent itself.
    const cmd = opts.netns ? ["ip", "netns", "exec", opts.netns, Deno.execPath(), ...args] : [Deno.execPath(), ...args];
    child = new Deno.Command(cmd[0], { args: cmd.slice(1), env, stdin: "null", stdout: "null", stderr: "piped" })
      .spawn();
    const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    pump = (async () => {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        logText += value;
      }
    })();
    client = connect(api, opts.ready?.tls);
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        await client.agent.getAgentInfo({});
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`agent did not come up: ${err}\n${logText}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  };
  await spawn();

  const agent: TestAgent = {
    stateDir,
    api,
    get client() {
      return client!;
    },
    pid: () => child?.pid,
    logs: () => logText,
    async kill9() {
      client?.close();
      child?.kill("SIGKILL");
      await child?.status;
      await pump;
      child = undefined;
    },
    async restart(newEnv?: Record<string, string>) {
      if (newEnv) env = newEnv;
      await spawn();
    },
    async cleanup() {
      client?.close();
      if (child) {
        try {
          child.kill("SIGTERM");
        } catch { /* already gone, e.g. its namespace was torn down first */ }
        await child.status;
        await pump;
      }
      await killQemusUnder(stateDir);
      await Deno.remove(base, { recursive: true }).catch(() => {});
    },
  };
  return agent;
}

/** Kills every QEMU whose command line mentions `dir` (a test's leftovers). */
export async function killQemusUnder(dir: string): Promise<void> {
  for await (const e of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const cmd = await Deno.readTextFile(`/proc/${e.name}/cmdline`);
      if (cmd.includes("qemu-system") && cmd.includes(dir)) Deno.kill(Number(e.name), "SIGKILL");
    } catch { /* gone */ }
  }
}

/** Polls `fn` until it returns a truthy value or `timeoutMs` passes. */
export async function waitFor<T>(
  what: string,
  fn: () => Promise<T | undefined> | T | undefined,
  timeoutMs = 60_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as T;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ""}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** A capsule spec for `image` (128 MiB, 1 vCPU) with overrides. */
export function spec(image: string, over: Partial<CapsuleSpec> = {}): CapsuleSpec {
  return CapsuleSpec.fromPartial({ image, memoryMib: 128, vcpus: 1, ...over });
}
