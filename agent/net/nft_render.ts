/**
 * Renders the agent's nftables table, `inet flexcap`, from the desired network state as
 * one libnftables JSON batch. Pure: the same state always gives the same batch, which is
 * what lets the agent compare it with what the kernel reports back.
 *
 * The batch creates the table (so deleting cannot fail), deletes it and builds it anew:
 * nft commits a batch as one transaction, so packets see the old table or the new one,
 * never a half-built one, and nothing outside this table is touched.
 */
import type { PortMapping } from "../capsule/types.ts";

export const TABLE = "flexcap";
export const FAMILY = "inet";

/** What one capsule contributes to the table. */
export interface CapsuleRules {
  id: string;
  tap: string;
  ip: string;
  mac: string;
  /** Host ports currently DNAT'ed to this capsule. */
  exposed: PortMapping[];
}

/** A host port forwarded to another instance (a migrated capsule's grace period). */
export interface Redirect {
  hostPort: number;
  protocol: "tcp" | "udp";
  toAddress: string;
  toPort: number;
  comment: string;
  /**
   * The moved capsule's address. Connections made before the move are DNAT'ed to it and
   * cannot follow it (their TCP state is in the guest, their NAT state here): they get a
   * reset at once, so clients reconnect (and are forwarded) instead of timing out.
   */
  capsuleIp?: string;
}

/** The desired state the table is rendered from. */
export interface TableState {
  bridge: string;
  /** The cluster CIDR: capsule addresses of every instance. */
  cluster: string;
  capsules: CapsuleRules[];
  /** Capsule-to-capsule flows a spec allows, by address. */
  allow: { from: string; to: string }[];
  redirects: Redirect[];
}

type Expr = Record<string, unknown>;
export type NftCommand = Record<string, Record<string, Record<string, unknown>>>;

/** Cloud metadata lives in link-local space; capsules get none of it. */
const LINK_LOCAL = { addr: "169.254.0.0", len: 16 };

const match = (left: Expr, right: unknown, op = "=="): Expr => ({ match: { op, left, right } });
const payload = (protocol: string, field: string): Expr => ({ payload: { protocol, field } });
const meta = (key: string): Expr => ({ meta: { key } });
const ct = (key: string): Expr => ({ ct: { key } });
const prefix = (cidr: string) => {
  const [addr, len] = cidr.split("/");
  return { prefix: { addr, len: Number(len) } };
};
const counter: Expr = { counter: { packets: 0, bytes: 0 } };
const accept: Expr = { accept: null };
const drop: Expr = { drop: null };
const jump = (target: string): Expr => ({ jump: { target } });
const established = match(ct("state"), ["established", "related"], "in");
const localDest = match({ fib: { result: "type", flags: ["daddr"] } }, "local");

/** Name of the ingress chain guarding one tap. */
export function ingressChain(tap: string): string {
  return `ingress_${tap}`;
}

/** The JSON batch (`{"nftables": [...]}`) that replaces the table with `state`. */
export function renderTable(state: TableState): { nftables: NftCommand[] } {
  const cmds: NftCommand[] = [];
  const table = { family: FAMILY, name: TABLE };
  cmds.push({ add: { table } }, { delete: { table } }, { add: { table } });
  for (const c of chains(state)) cmds.push({ add: { chain: c } });
  for (const r of rules(state)) cmds.push({ add: { rule: r } });
  return { nftables: cmds };
}

/** The batch that removes the table (uninstall). */
export function renderDelete(): { nftables: NftCommand[] } {
  const table = { family: FAMILY, name: TABLE };
  return { nftables: [{ add: { table } }, { delete: { table } }] };
}

/** Chain definitions in table order. */
export function chains(state: TableState): Record<string, unknown>[] {
  const base = (name: string, type: string, hook: string, prio: number) => ({
    family: FAMILY,
    table: TABLE,
    name,
    type,
    hook,
    prio,
    policy: "accept",
  });
  const out: Record<string, unknown>[] = [
    base("prerouting", "nat", "prerouting", -100),
    base("output", "nat", "output", -100),
    base("postrouting", "nat", "postrouting", 100),
    // Accept policies: these chains judge capsule traffic only and must not change the
    // fate of anything else the instance routes or receives.
    base("input", "filter", "input", 0),
    base("forward", "filter", "forward", 0),
    { family: FAMILY, table: TABLE, name: "from_capsules" },
    { family: FAMILY, table: TABLE, name: "to_capsules" },
  ];
  for (const c of state.capsules) {
    // Runs on the tap before bridging: the only place that still knows which capsule
    // sent a frame, so spoofed addresses are dropped here.
    out.push({ ...base(ingressChain(c.tap), "filter", "ingress", -500), dev: c.tap });
  }
  return out;
}

/** Rules in table order, each `{family, table, chain, expr, comment?}`. */
export function rules(state: TableState): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  const add = (chain: string, expr: Expr[], comment?: string) =>
    out.push({ family: FAMILY, table: TABLE, chain, expr, ...(comment ? { comment } : {}) });
  const fromBridge = match(meta("iifname"), state.bridge);
  const toBridge = match(meta("oifname"), state.bridge);

  // DNAT: instance addresses → capsule, from outside (prerouting) and from the instance itself (output).
  const dnats: { expr: Expr[]; comment: string }[] = [];
  for (const c of state.capsules) {
    for (const p of c.exposed) {
      dnats.push({
        expr: [
          localDest,
          match(payload(p.protocol, "dport"), p.hostPort),
          { dnat: { family: "ip", addr: c.ip, port: p.guestPort } },
        ],
        comment: `${c.id} ${p.hostPort}/${p.protocol}`,
      });
    }
  }
  for (const r of state.redirects) {
    dnats.push({
      expr: [
        localDest,
        match(payload(r.protocol, "dport"), r.hostPort),
        { dnat: { family: "ip", addr: r.toAddress, port: r.toPort } },
      ],
      comment: r.comment,
    });
  }
  for (const chain of ["prerouting", "output"]) for (const d of dnats) add(chain, d.expr, d.comment);

  // Egress: capsules leave through the instance's own address.
  add("postrouting", [
    match(payload("ip", "saddr"), prefix(state.cluster)),
    match(meta("oifname"), state.bridge, "!="),
    { masquerade: null },
  ], "capsule egress");
  // A client on the instance connecting to 127.0.0.1:port: the capsule cannot answer a loopback source.
  add("postrouting", [
    toBridge,
    match(payload("ip", "saddr"), prefix("127.0.0.0/8")),
    { masquerade: null },
  ], "local clients via loopback");
  // Redirected ports: the peer instance must answer through us, so conntrack can undo the DNAT.
  if (state.redirects.length > 0) {
    for (const r of state.redirects) {
      add("postrouting", [
        match(payload("ip", "daddr"), r.toAddress),
        match(payload(r.protocol, "dport"), r.toPort),
        match(ct("status"), "dnat", "in"),
        { masquerade: null },
      ], r.comment);
    }
  }

  // Capsules may not reach the instance's own services (agent API, sshd…).
  add("input", [fromBridge, established, accept]);
  add("input", [fromBridge, match(payload("icmp", "type"), "echo-request"), accept], "ping the gateway");
  add("input", [fromBridge, counter, drop], "capsule to host");

  for (const ip of new Set(state.redirects.flatMap((r) => r.capsuleIp ? [r.capsuleIp] : []))) {
    add("forward", [
      match(payload("ip", "daddr"), ip),
      match(meta("l4proto"), "tcp"),
      { reject: { type: "tcp reset" } },
    ], "moved capsule: reset old connections");
  }
  add("forward", [fromBridge, jump("from_capsules")]);
  add("forward", [toBridge, jump("to_capsules")]);

  add("from_capsules", [established, accept]);
  add("from_capsules", [match(payload("ip", "daddr"), { prefix: LINK_LOCAL }), counter, drop], "metadata");
  for (const a of state.allow) {
    add("from_capsules", [
      toBridge,
      match(payload("ip", "saddr"), a.from),
      match(payload("ip", "daddr"), a.to),
      accept,
    ], "allowed capsule pair");
  }
  add("from_capsules", [match(payload("ip", "daddr"), prefix(state.cluster)), counter, drop], "capsule to capsule");

  add("to_capsules", [established, accept]);
  add("to_capsules", [match(ct("status"), "dnat", "in"), accept], "exposed ports");
  add("to_capsules", [counter, drop], "unsolicited");

  for (const c of state.capsules) {
    const chain = ingressChain(c.tap);
    add(chain, [match(payload("ether", "saddr"), c.mac, "!="), counter, drop], "spoofed mac");
    add(chain, [match(meta("protocol"), "ip"), match(payload("ip", "saddr"), c.ip, "!="), counter, drop], "spoofed ip");
    add(chain, [match(meta("protocol"), "ip6"), counter, drop], "no ipv6");
  }
  return out;
}
