/**
 * Links the capsule network is made of: the instance's bridge (the anycast gateway), a tap
 * per capsule, the static neighbour/route/FDB entries that pin a capsule's address to its
 * tap, and the optional ifb + tbf that limits a capsule's egress. Every call is idempotent
 * (replace, not add) so reconciliation after a restart can simply run it again.
 */
import { execa } from "execa";
import { UnavailableError } from "../errors.ts";

/** Runs `ip`/`bridge`/`tc`; throws with the tool's message on failure. */
async function run(cmd: string, args: string[], okIf?: RegExp): Promise<string> {
  const r = await execa(cmd, args, { reject: false, stdin: "ignore" });
  if (r.exitCode !== 0 && !(okIf && okIf.test(String(r.stderr)))) {
    throw new UnavailableError(`${cmd} ${args.join(" ")}: ${String(r.stderr).trim() || `exit ${r.exitCode}`}`);
  }
  return String(r.stdout);
}

async function sysctl(path: string, value: string): Promise<void> {
  try {
    await Deno.writeTextFile(`/proc/sys/${path}`, value);
  } catch (err) {
    throw new UnavailableError(`setting ${path.replaceAll("/", ".")}=${value}: ${(err as Error).message}`);
  }
}

/** Names of all links in this network namespace. */
export async function listLinks(): Promise<Set<string>> {
  const out = await run("ip", ["-j", "link", "show"]);
  return new Set((JSON.parse(out) as { ifname: string }[]).map((l) => l.ifname));
}

/** True if link `name` exists. */
export async function linkExists(name: string): Promise<boolean> {
  return (await listLinks()).has(name);
}

/**
 * Creates or repairs the bridge: fixed gateway MAC and a /32 gateway address (capsule
 * routes are added one /32 at a time, so other instances' capsules are not "on link").
 * Proxy ARP with pvlan answers a capsule's ARP for any address with the gateway's MAC,
 * because isolated ports keep capsules from reaching each other at layer 2: every packet
 * between capsules is routed through the forward chain, where isolation is enforced.
 */
export async function ensureBridge(name: string, gateway: string, gatewayMac: string): Promise<void> {
  if (!await linkExists(name)) {
    await run("ip", ["link", "add", name, "type", "bridge"], /File exists/);
  }
  await run("ip", ["link", "set", name, "address", gatewayMac]);
  await sysctl(`net/ipv6/conf/${name}/disable_ipv6`, "1").catch(() => {}); // no IPv6 in capsules
  await run("ip", ["addr", "replace", `${gateway}/32`, "dev", name]);
  await run("ip", ["link", "set", name, "up"]);
  for (const [key, v] of [["proxy_arp", "1"], ["proxy_arp_pvlan", "1"], ["route_localnet", "1"], ["forwarding", "1"]]) {
    await sysctl(`net/ipv4/conf/${name}/${key}`, v);
  }
  // Capsule egress and DNAT'ed ingress are routed; without this nothing crosses the instance.
  await sysctl("net/ipv4/ip_forward", "1");
}

/** Removes the bridge if present. */
export async function removeBridge(name: string): Promise<void> {
  await run("ip", ["link", "del", name], /Cannot find device/);
}

/** A capsule's tap and the address it owns. */
export interface TapSpec {
  tap: string;
  bridge: string;
  mac: string;
  ip: string;
  gateway: string;
}

/**
 * Creates or repairs a capsule's tap: persistent (it outlives QEMU and the agent), on the
 * bridge, isolated, no MAC learning (a guest cannot steal another's MAC), and with static
 * FDB, neighbour and /32 route entries for the capsule's own MAC and address.
 */
export async function ensureTap(t: TapSpec): Promise<void> {
  if (!await linkExists(t.tap)) {
    await run("ip", ["tuntap", "add", "dev", t.tap, "mode", "tap"], /File exists|Device or resource busy/);
  }
  await sysctl(`net/ipv6/conf/${t.tap}/disable_ipv6`, "1").catch(() => {});
  await run("ip", ["link", "set", t.tap, "master", t.bridge, "up"]);
  await run("bridge", ["link", "set", "dev", t.tap, "isolated", "on", "learning", "off"]);
  await run("bridge", ["fdb", "replace", t.mac, "dev", t.tap, "master", "static"]);
  await run("ip", ["neigh", "replace", t.ip, "lladdr", t.mac, "dev", t.bridge, "nud", "permanent"]);
  await run("ip", ["route", "replace", `${t.ip}/32`, "dev", t.bridge, "src", t.gateway]);
}

/** Removes a capsule's tap with its route and neighbour entry; absent parts are fine. */
export async function removeTap(t: { tap: string; bridge: string; ip?: string }): Promise<void> {
  if (t.ip) {
    await run("ip", ["route", "del", `${t.ip}/32`, "dev", t.bridge], /No such process|Cannot find device/);
    await run("ip", ["neigh", "del", t.ip, "dev", t.bridge], /No such file|Cannot find device/);
  }
  await run("ip", ["link", "del", t.tap], /Cannot find device/);
}

/**
 * Limits what a capsule sends to `kbps` kbit/s, or removes the limit (0). The guest's
 * packets arrive on the tap's ingress, where only policing is possible, so they are
 * redirected to an ifb device whose egress a tbf shapes (queued, not dropped at once).
 */
export async function setEgressLimit(tap: string, ifb: string, kbps: number): Promise<void> {
  if (kbps <= 0) {
    await run("tc", ["qdisc", "del", "dev", tap, "ingress"], /Cannot find|No such file|Invalid handle/);
    await run("ip", ["link", "del", ifb], /Cannot find device/);
    return;
  }
  if (!await linkExists(ifb)) await run("ip", ["link", "add", ifb, "type", "ifb"], /File exists/);
  await run("ip", ["link", "set", ifb, "up"]);
  // Burst: at least 10 ms worth of bytes (and 16 KiB) so the bucket works at HZ timer ticks.
  const burst = Math.max(16 * 1024, Math.ceil((kbps * 1000) / 8 / 100));
  await run("tc", [
    "qdisc",
    "replace",
    "dev",
    ifb,
    "root",
    "tbf",
    "rate",
    `${kbps}kbit`,
    "burst",
    String(burst),
    "latency",
    "50ms",
  ]);
  await run("tc", ["qdisc", "replace", "dev", tap, "handle", "ffff:", "ingress"]);
  const filters = await run("tc", ["filter", "show", "dev", tap, "parent", "ffff:"]);
  if (!filters.includes(`Redirect to device ${ifb})`)) {
    await run("tc", [
      "filter",
      "add",
      "dev",
      tap,
      "parent",
      "ffff:",
      "protocol",
      "all",
      "u32",
      "match",
      "u32",
      "0",
      "0",
      "action",
      "mirred",
      "egress",
      "redirect",
      "dev",
      ifb,
    ]);
  }
}
