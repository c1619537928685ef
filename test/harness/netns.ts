/**
 * Test harness: a private network of Linux network namespaces, so network tests (and later
 * fault tests) never send a packet outside this machine's sandbox.
 *
 * Topology: a hub namespace holds a bridge; N instance namespaces (where agents run) and one
 * client namespace (a stand-in for "the internet") each join it with a veth pair, all on one
 * random 172.31.k.0/24 that exists only inside these namespaces. Instances route by default via
 * the client, so a capsule's egress through an instance reaches the client.
 *
 * Deno cannot setns(2) itself, so everything inside a namespace runs through
 * `ip netns exec NS ...`; probes and load loops use the netclient.ts script this way.
 * Needs root. Callers own cleanup: `try { ... } finally { await net.cleanup(); }`.
 */
import { fileURLToPath } from "node:url";

const NETCLIENT = fileURLToPath(new URL("./netclient.ts", import.meta.url));

/** The namespace name prefix createTestNet and sweepStaleTestNamespaces use by default. */
export const DEFAULT_PREFIX = "fct";

/** Namespaces without a live owner this old (ms) count as leftovers; younger may still be mid-setup. */
const ORPHAN_AGE_MS = 60_000;
/** Instances are .10 up; the client is .100, so at most 90 instances would fit, 64 is plenty. */
const MAX_INSTANCES = 64;
const CLIENT_HOST = 100;
/** The hub's `lo` alias that records which process owns a test net (see sweepStaleTestNamespaces). */
const OWNER_TAG = "flexcap-testnet owner=";

/** What a command run in a namespace returned. */
export interface RunResult {
  /** Exit code; 124 if the harness killed it at its timeout (as timeout(1) does). */
  code: number;
  stdout: string;
  stderr: string;
}

/** One namespace of a test net with its address on the shared subnet. */
export interface NsHost {
  /** The namespace name (for `ip netns exec`, `startTestAgent({ netns })`). */
  ns: string;
  /** Its IPv4 address on the test subnet (no prefix length). */
  address: string;
  /** Its veth's name inside its namespace. */
  iface: string;
  /** Runs `cmd` in the namespace to completion (default timeout 30 s). */
  run(cmd: string[], opts?: { timeoutMs?: number; stdin?: string }): Promise<RunResult>;
  /** Starts `cmd` in the namespace with stdout/stderr piped; the caller must drain them and await status. */
  spawn(cmd: string[]): Deno.ChildProcess;
  /**
   * Runs netclient.ts with `args` in the namespace and returns its result (the JSON on its last
   * stdout line). Throws if it exits non-zero (bad args, crash) or prints no JSON. Default
   * timeout: 30 s, or the run's `--duration-ms` plus 30 s.
   */
  netclient(args: string[], opts?: { timeoutMs?: number }): Promise<unknown>;
  /** Starts netclient.ts with `args` in the namespace; finish with netclientResult(). */
  spawnNetclient(args: string[]): Deno.ChildProcess;
}

/** A running test net. */
export interface TestNet {
  /** The prefix plus a random 6-hex id all its namespace names start with. */
  id: string;
  /** The subnet, e.g. "172.31.42.0/24". */
  subnet: string;
  instances: NsHost[];
  client: NsHost;
  /** The hub namespace's name (holds bridge `br0` and the hub ends of every veth). */
  hub: string;
  /** Sets `host`'s veth end in the hub down: its link is cut, its own interface stays up. */
  linkDown(host: NsHost): Promise<void>;
  /** Undoes linkDown(). */
  linkUp(host: NsHost): Promise<void>;
  /** Kills every process left in the namespaces and deletes them. Idempotent; never throws. */
  cleanup(): Promise<void>;
}

/** Runs `ip`-level commands on the host; throws with stderr on failure. */
async function sh(cmd: string[], opts: { stdin?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: opts.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return await finish(child, cmd, opts);
}

/** Feeds stdin, enforces the timeout and collects a child's output. */
async function finish(
  child: Deno.ChildProcess,
  cmd: string[],
  opts: { stdin?: string; timeoutMs?: number },
): Promise<RunResult> {
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, opts.timeoutMs ?? 30_000);
  try {
    if (opts.stdin !== undefined) {
      const w = child.stdin.getWriter();
      // A child that exits without reading its stdin must not fail the run.
      await w.write(new TextEncoder().encode(opts.stdin)).catch(() => {});
      await w.close().catch(() => {});
    }
    const out = await child.output();
    const dec = new TextDecoder();
    let stderr = dec.decode(out.stderr);
    if (timedOut) stderr += `\n[netns harness: ${cmd.join(" ")} killed after ${opts.timeoutMs ?? 30_000} ms]`;
    return { code: timedOut ? 124 : out.code, stdout: dec.decode(out.stdout), stderr };
  } finally {
    clearTimeout(timer);
  }
}

/** Runs `ip args...`; throws on a non-zero exit. */
async function ip(args: string[], stdin?: string): Promise<string> {
  const r = await sh(["ip", ...args], { stdin });
  if (r.code !== 0) throw new Error(`ip ${args.join(" ")} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** Runs `ip -n ns -batch -` with one command per line (one process per namespace, not per step). */
async function ipBatch(ns: string, lines: string[]): Promise<void> {
  await ip(["-n", ns, "-batch", "-"], lines.join("\n") + "\n");
}

function randomHex(bytes: number): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function checkPrefix(prefix: string): void {
  // Short and plain so names stay readable in `ip netns list` and the sweep's pattern stays exact.
  if (!/^[a-z][a-z0-9]{0,5}$/.test(prefix)) {
    throw new Error(`netns prefix ${JSON.stringify(prefix)}: want [a-z][a-z0-9]{0,5}`);
  }
}

/** The names this harness gives namespaces: `<prefix><6 hex>-<role>`, role hub, cl, probe or i<N>. */
function namePattern(prefix: string): RegExp {
  return new RegExp(`^(${prefix}[0-9a-f]{6})-(hub|cl|probe|i\\d{1,2})$`);
}

/** This process's identity that survives pid reuse: pid plus start time (field 22 of /proc/pid/stat). */
function processStart(pid: number): string | undefined {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** Names of all named network namespaces on the host. */
async function listNamespaces(): Promise<string[]> {
  const r = await sh(["ip", "netns", "list"]);
  // Lines look like "name" or "name (id: 3)".
  return r.stdout.split("\n").map((l) => l.trim().split(/\s+/)[0]).filter((n) => n);
}

/** Kills whatever still runs in `ns`, waits for it to go, then deletes the namespace. Never throws. */
async function destroyNamespace(ns: string): Promise<void> {
  try {
    const deadline = Date.now() + 5_000;
    for (;;) {
      const r = await sh(["ip", "netns", "pids", ns]);
      if (r.code !== 0) return; // already gone
      const pids = r.stdout.split(/\s+/).filter((p) => /^\d+$/.test(p)).map(Number);
      if (!pids.length || Date.now() > deadline) break;
      for (const pid of pids) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* exited meanwhile */ }
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    // With processes still inside, `del` only unlinks the name; the namespace dies with them.
    await sh(["ip", "netns", "del", ns]);
  } catch { /* best effort */ }
}

/** What netclient's loops print (see test/harness/netclient.ts); the rate fields come from redis-ping-loop. */
export interface LoopStats {
  requests: number;
  failures: number;
  /** The first 10 errors. */
  errors: string[];
  /** Longest time between two consecutive successful replies. */
  max_gap_ms: number;
  p50_ms: number;
  p99_ms: number;
  elapsed_ms?: number;
  requests_per_s?: number;
}

/** Awaits a netclient child (from spawnNetclient) and returns its JSON result; throws like NsHost.netclient. */
export async function netclientResult(child: Deno.ChildProcess): Promise<unknown> {
  const out = await child.output();
  const dec = new TextDecoder();
  return parseNetclient({ code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) });
}

function parseNetclient(r: RunResult): unknown {
  const last = r.stdout.trimEnd().split("\n").pop() ?? "";
  if (r.code === 0) {
    try {
      return JSON.parse(last);
    } catch { /* reported below */ }
  }
  throw new Error(`netclient exited ${r.code}:\nstdout: ${r.stdout.trim()}\nstderr: ${r.stderr.trim()}`);
}

function netclientArgs(args: string[]): string[] {
  // --no-config: the script imports nothing, so skip the project's config and lockfile.
  return [Deno.execPath(), "run", "-A", "--no-config", NETCLIENT, ...args];
}

function nsHost(ns: string, address: string, iface: string): NsHost {
  const exec = (cmd: string[]) => ["ip", "netns", "exec", ns, ...cmd];
  const host: NsHost = {
    ns,
    address,
    iface,
    run: (cmd, opts = {}) => sh(exec(cmd), opts),
    spawn: (cmd) => {
      const full = exec(cmd);
      return new Deno.Command(full[0], { args: full.slice(1), stdin: "null", stdout: "piped", stderr: "piped" })
        .spawn();
    },
    async netclient(args, opts = {}) {
      const i = args.indexOf("--duration-ms");
      const duration = i >= 0 ? Number(args[i + 1]) || 0 : 0;
      return parseNetclient(await host.run(netclientArgs(args), { timeoutMs: opts.timeoutMs ?? duration + 30_000 }));
    },
    spawnNetclient: (args) => host.spawn(netclientArgs(args)),
  };
  return host;
}

/**
 * Creates a test net: `<prefix><hex>-hub` with bridge br0, instances `-i0`.. and client `-cl`,
 * each with `eth0` on 172.31.k.0/24 (instance i at .10+i, client at .100). On failure it
 * removes what it made and throws.
 */
export async function createTestNet(opts: { instances?: number; prefix?: string } = {}): Promise<TestNet> {
  const count = opts.instances ?? 1;
  const prefix = opts.prefix ?? DEFAULT_PREFIX;
  checkPrefix(prefix);
  if (!Number.isInteger(count) || count < 1 || count > MAX_INSTANCES) {
    throw new Error(`instances: want 1..${MAX_INSTANCES}, got ${count}`);
  }
  const id = `${prefix}${randomHex(3)}`;
  // Random third octet so concurrent runs look different in captures and logs; the namespaces isolate them anyway.
  const k = 1 + Math.floor(Math.random() * 254);
  const net24 = `172.31.${k}`;
  const hub = `${id}-hub`;
  const client = nsHost(`${id}-cl`, `${net24}.${CLIENT_HOST}`, "eth0");
  const instances = Array.from({ length: count }, (_, i) => nsHost(`${id}-i${i}`, `${net24}.${10 + i}`, "eth0"));
  const hosts = [...instances, client];
  // The hub-side veth name of each host: its role, e.g. "i0", "cl" (names are per namespace, so short is safe).
  const hubEnd = new Map<NsHost, string>(hosts.map((h) => [h, h.ns.slice(id.length + 1)]));

  const created: string[] = [];
  let cleaning: Promise<void> | undefined;
  const net: TestNet = {
    id,
    subnet: `${net24}.0/24`,
    instances,
    client,
    hub,
    linkDown: (h) => setLink(h, "down"),
    linkUp: (h) => setLink(h, "up"),
    cleanup() {
      // Hub last: its owner record keeps a concurrent sweep off the group until the end (member veths go with their ns).
      cleaning ??= (async () => {
        for (const ns of [...created].reverse()) await destroyNamespace(ns);
      })();
      return cleaning;
    },
  };
  async function setLink(h: NsHost, state: "up" | "down"): Promise<void> {
    const end = hubEnd.get(h);
    if (!end) throw new Error(`${h.ns} is not a host of test net ${id}`);
    await ip(["-n", hub, "link", "set", "dev", end, state]);
  }

  try {
    await ip(["netns", "add", hub]);
    created.push(hub);
    // Record the owner inside the hub itself so a later sweep can tell a live run from a crashed one.
    const owner = `${Deno.pid}:${processStart(Deno.pid)}`;
    await ipBatch(hub, [
      `link set lo alias "${OWNER_TAG}${owner}"`,
      "link set lo up",
      // No STP: ports forward the moment they come up, so the net is usable at once.
      "link add name br0 type bridge stp_state 0 forward_delay 0",
      "link set br0 up",
    ]);
    for (const h of hosts) {
      await ip(["netns", "add", h.ns]);
      created.push(h.ns);
      const end = hubEnd.get(h)!;
      // Created from inside the hub with the peer placed straight into the host: nothing touches the root namespace.
      await ipBatch(hub, [
        `link add name ${end} type veth peer name ${h.iface} netns ${h.ns}`,
        `link set dev ${end} master br0`,
        `link set dev ${end} up`,
      ]);
      const lines = ["link set lo up", `addr add ${h.address}/24 dev ${h.iface}`, `link set dev ${h.iface} up`];
      if (h !== client) lines.push(`route add default via ${client.address}`);
      await ipBatch(h.ns, lines);
    }
  } catch (err) {
    await net.cleanup();
    throw err;
  }
  return net;
}

let supported: Promise<boolean> | undefined;

/**
 * True if this process can build test nets here: root, and a namespace with a bridge and a
 * veth pair can be made. Cached; use it for Deno.test's `ignore`.
 */
export function netnsSupported(): Promise<boolean> {
  supported ??= (async () => {
    if (Deno.uid() !== 0) return false;
    const ns = `${DEFAULT_PREFIX}${randomHex(3)}-probe`;
    try {
      await ip(["netns", "add", ns]);
    } catch {
      return false;
    }
    try {
      await ipBatch(ns, ["link add name br0 type bridge", "link add name vp0 type veth peer name vp1"]);
      return true;
    } catch {
      return false;
    } finally {
      await destroyNamespace(ns);
    }
  })();
  return supported;
}

/**
 * Deletes namespaces left by earlier crashed runs: only names of this harness's pattern
 * (`<prefix><6 hex>-<role>`), and only groups whose owning process (recorded in the hub) is
 * gone, or that have no owner record and are over a minute old. Live nets of concurrent runs
 * are left alone. Returns the names deleted; never throws.
 */
export async function sweepStaleTestNamespaces(prefix: string = DEFAULT_PREFIX): Promise<string[]> {
  checkPrefix(prefix);
  const pattern = namePattern(prefix);
  const groups = new Map<string, string[]>();
  try {
    for (const ns of await listNamespaces()) {
      const m = pattern.exec(ns);
      if (m) groups.set(m[1], [...groups.get(m[1]) ?? [], ns]);
    }
  } catch {
    return [];
  }
  const deleted: string[] = [];
  for (const [id, names] of groups) {
    if (!await isStale(id, names)) continue;
    // Hub last, as in cleanup(): until then the group's owner record stays readable.
    const ordered = names.filter((n) => !n.endsWith("-hub")).concat(names.filter((n) => n.endsWith("-hub")));
    for (const ns of ordered) {
      await destroyNamespace(ns);
      deleted.push(ns);
    }
  }
  return deleted;
}

async function isStale(id: string, names: string[]): Promise<boolean> {
  if (names.includes(`${id}-hub`)) {
    const r = await sh(["ip", "-n", `${id}-hub`, "-o", "link", "show", "lo"]).catch(() => undefined);
    const m = r?.stdout.match(new RegExp(`${OWNER_TAG}(\\d+):(\\d+)`));
    if (m) return processStart(Number(m[1])) !== m[2];
  }
  // No owner record: a probe, a hub mid-setup or a half-built net. Judge by age (a netns file's mtime is its birth).
  const now = Date.now();
  return names.every((ns) => {
    try {
      const mtime = Deno.statSync(`/run/netns/${ns}`).mtime?.getTime() ?? 0;
      return now - mtime > ORPHAN_AGE_MS;
    } catch {
      return true;
    }
  });
}
