/**
 * The bridge network backend: one bridge per instance carrying the anycast gateway, a
 * persistent tap per capsule, cluster-unique capsule addresses from this agent's slice,
 * and the `inet flexcap` nftables table rendered from the capsule records. The records
 * are the desired state; sync() makes the kernel match them with one atomic replacement
 * and reads the table back to prove it.
 */
import { QEMU_STATES } from "../capsule/states.ts";
import type { CapsuleNet, CapsuleRecord, PortMapping } from "../capsule/types.ts";
import { FailedPreconditionError, InternalError, InvalidArgumentError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";
import { contains, formatCidr, lastOf, parseIp } from "./cidr.ts";
import { allocateIp } from "./ipam.ts";
import { ensureBridge, ensureTap, listLinks, removeBridge, removeTap, setEgressLimit } from "./links.ts";
import { type ArrivingNet, type Exposure, type LaunchNet, minus, type NetworkBackend } from "./network.ts";
import { applyBatch, compareTable, deleteTable, type NftCommandLine, readTable } from "./nft.ts";
import { type Redirect, renderTable, type TableState } from "./nft_render.ts";
import type { BridgePlan } from "./plan.ts";
import { decideExposure, isPortFree, portKey, resolvePorts } from "./ports.ts";

/** The tap of a capsule: "fc" + the id's 12 hex digits (IFNAMSIZ allows 15). */
export function tapName(capsuleId: string): string {
  return `fc${capsuleId.replace(/^c-/, "")}`;
}

/** The ifb device shaping a capsule's egress. */
export function ifbName(capsuleId: string): string {
  return `fq${capsuleId.replace(/^c-/, "")}`;
}

const OUR_LINK = /^f[cq][0-9a-f]{12}$/;

/** Options beyond the plan; the defaults talk to the real host. */
export interface BridgeOptions {
  macFor(id: string): string;
  /** True if a host process holds the port (default: try to bind it on every address). */
  hostBusy?(m: PortMapping): boolean;
  nft?: NftCommandLine;
  /** Host ports forwarded to other instances (migrated capsules' grace periods). */
  redirects?(): Redirect[];
}

/** The real capsule network (root only). */
export class BridgeNetwork implements NetworkBackend {
  readonly kind = "bridge";
  #log: Logger;
  #lastIp?: string;
  #pending?: Promise<void>;
  #tail: Promise<void> = Promise.resolve();
  /** Wall time of the last apply + verify, for logs and benchmarks. */
  lastApplyMs = 0;

  constructor(
    private plan: BridgePlan,
    log: Logger,
    private records: () => CapsuleRecord[],
    private opts: BridgeOptions,
  ) {
    this.#log = log.with({ component: "net" });
  }

  /** Creates or repairs the bridge and every capsule's tap, drops strays, then replaces the table. */
  async open(records: CapsuleRecord[]): Promise<void> {
    await ensureBridge(this.plan.bridge, this.plan.gateway, this.plan.gatewayMac);
    const wanted = new Set<string>();
    for (const r of records) {
      if (r.net?.backend !== "bridge" || !r.net.tap) continue;
      wanted.add(r.net.tap);
      await this.#ensureLinks(r);
      if (r.spec.egressKbps > 0) wanted.add(ifbName(r.id));
    }
    for (const name of await listLinks()) {
      // A tap whose record never got written (crash during create), or one of a deleted capsule.
      if (OUR_LINK.test(name) && !wanted.has(name)) {
        this.#log.info("removing stray capsule link", { link: name });
        await removeTap({ tap: name, bridge: this.plan.bridge }).catch((err) =>
          this.#log.warn("could not remove stray link", { link: name, error: err })
        );
      }
    }
    await this.sync();
    this.#log.info("capsule network ready", {
      bridge: this.plan.bridge,
      gateway: this.plan.gateway,
      slice: formatCidr(this.plan.slice),
      capsules: wanted.size,
      applyMs: Math.round(this.lastApplyMs),
    });
  }

  /** Allocates an address from the slice, reserves host ports and creates the tap. */
  async attach(rec: CapsuleRecord, others: CapsuleRecord[]): Promise<CapsuleNet> {
    const ip = allocateIp(
      { slice: this.plan.slice, cluster: this.plan.cluster, gateway: parseIp(this.plan.gateway) },
      others.flatMap((r) => r.net?.backend === "bridge" ? [r.net.ip] : []),
      this.#lastIp,
    );
    const held = new Set<string>();
    for (const r of others) for (const p of r.net?.hostPorts ?? []) held.add(portKey(p.hostPort, p.protocol));
    const hostPorts = resolvePorts(
      rec.spec.ports,
      held,
      "0.0.0.0",
      this.plan.portRange,
      (port, proto) => !this.#hostBusy({ hostPort: port, guestPort: 0, protocol: proto }),
    );
    const net = await this.#plug(rec, {
      ip,
      prefix: this.plan.cluster.prefix,
      mac: this.opts.macFor(rec.id),
      hostPorts,
    });
    this.#lastIp = ip;
    this.#log.info("capsule network attached", { capsule: rec.id, ip, tap: net.tap, hostPorts: hostPorts.map(fmt) });
    return net;
  }

  /** Takes over an arriving capsule's address and MAC; resolves its host ports here and creates its tap. */
  async adopt(rec: CapsuleRecord, from: ArrivingNet, others: CapsuleRecord[]): Promise<CapsuleNet> {
    const ip = parseIp(from.ip);
    const cluster = this.plan.cluster;
    if (!contains(cluster, ip) || ip === cluster.base || ip === lastOf(cluster) || from.ip === this.plan.gateway) {
      throw new InvalidArgumentError("capsule.ip", `${from.ip} is not a capsule address of ${formatCidr(cluster)}`);
    }
    const holder = others.find((r) => r.net?.backend === "bridge" && r.net.ip === from.ip);
    if (holder) {
      throw new FailedPreconditionError(`capsule.ip: ${from.ip} is held by capsule "${holder.name}" on this agent`);
    }
    const held = new Set<string>();
    for (const r of others) for (const p of r.net?.hostPorts ?? []) held.add(portKey(p.hostPort, p.protocol));
    const probe = (port: number, proto: "tcp" | "udp") =>
      !this.#hostBusy({ hostPort: port, guestPort: 0, protocol: proto });
    // Ports the spec leaves to the agent keep their source number where it is free here: clients
    // that learned it keep working.
    const wanted = rec.spec.ports.map((p, i) => {
      const was = from.hostPorts[i];
      const free = was && p.hostPort === 0 && !held.has(portKey(was.hostPort, p.protocol)) &&
        probe(was.hostPort, p.protocol);
      return free ? { ...p, hostPort: was.hostPort } : p;
    });
    const hostPorts = resolvePorts(wanted, held, "0.0.0.0", this.plan.portRange, probe);
    const net = await this.#plug(rec, { ...from, hostPorts });
    this.#log.info("arriving capsule's network adopted", {
      capsule: rec.id,
      ip: from.ip,
      tap: net.tap,
      hostPorts: hostPorts.map(fmt),
    });
    return net;
  }

  /** Removes the tap, its route and neighbour entry, and the shaper; call after sync() without the record. */
  async detach(rec: CapsuleRecord): Promise<void> {
    if (rec.net?.backend !== "bridge") return;
    await this.#removeLinks(rec);
    this.#log.info("capsule network detached", { capsule: rec.id, ip: rec.net.ip });
  }

  /** The capsule's tap and its cluster address. */
  launch(rec: CapsuleRecord): LaunchNet {
    const net = rec.net!;
    return {
      netdev: { kind: "tap", ifname: net.tap! },
      guest: { addressCidr: `${net.ip}/${net.prefix}`, gateway: net.gateway, dns: net.dns },
      ports: net.hostPorts,
      hostAddress: "",
    };
  }

  /** Exposes allowed listens whose host port no host process holds. */
  decide(rec: CapsuleRecord, listening: GuestPort[]): Exposure {
    const before = rec.exposed ?? [];
    const { exposed, refused } = decideExposure(listening, rec.net?.hostPorts ?? [], before, (m) => this.#hostBusy(m));
    return { exposed, added: minus(exposed, before), removed: minus(before, exposed), refused };
  }

  /**
   * Replaces the table with the one the records describe and verifies it. Calls made
   * while an apply is waiting share it; one made during an apply queues the next.
   */
  sync(): Promise<void> {
    if (this.#pending) return this.#pending;
    const p = this.#tail.then(() => {
      this.#pending = undefined;
      return this.#apply();
    });
    this.#pending = p;
    this.#tail = p.catch(() => {});
    return p;
  }

  /** Deletes the table, every capsule link and the bridge. */
  async uninstall(records: CapsuleRecord[]): Promise<void> {
    await deleteTable(this.opts.nft);
    for (const r of records) await this.#removeLinks(r).catch(() => {});
    for (const name of await listLinks()) {
      if (OUR_LINK.test(name)) await removeTap({ tap: name, bridge: this.plan.bridge }).catch(() => {});
    }
    await removeBridge(this.plan.bridge);
    this.#log.info("capsule network removed", { bridge: this.plan.bridge });
  }

  /** The desired table state from the records. */
  tableState(): TableState {
    const recs = this.records().filter((r) => r.net?.backend === "bridge" && r.net.tap);
    const allow: TableState["allow"] = [];
    for (const to of recs) {
      for (const ref of to.spec.allowFrom) {
        const from = recs.find((r) => r.name === ref || r.id === ref);
        if (from && from.id !== to.id) allow.push({ from: from.net!.ip, to: to.net!.ip });
      }
    }
    return {
      bridge: this.plan.bridge,
      cluster: formatCidr(this.plan.cluster),
      capsules: recs.map((r) => ({
        id: r.id,
        tap: r.net!.tap!,
        ip: r.net!.ip,
        mac: r.net!.mac,
        exposed: QEMU_STATES.has(r.state) ? r.exposed ?? [] : [],
      })),
      allow,
      redirects: this.opts.redirects?.() ?? [],
    };
  }

  async #apply(): Promise<void> {
    const t0 = performance.now();
    const state = this.tableState();
    // A tap someone removed would make the whole batch fail: put it back first.
    const links = await listLinks();
    for (const c of state.capsules) {
      if (!links.has(c.tap)) {
        const rec = this.records().find((r) => r.id === c.id);
        if (rec) {
          this.#log.warn("capsule tap was missing; recreating it", { capsule: c.id, tap: c.tap });
          await this.#ensureLinks(rec);
        }
      }
    }
    const batch = renderTable(state);
    for (let attempt = 1;; attempt++) {
      await applyBatch(batch, this.opts.nft);
      const drift = compareTable(batch, (await readTable(this.opts.nft)) ?? []);
      if (drift.differences.length === 0) break;
      this.#log.error("nft table differs from the state after apply", {
        attempt,
        differences: drift.differences.slice(0, 20),
      });
      if (attempt >= 2) {
        throw new InternalError(`nft table does not match the state: ${drift.differences.slice(0, 3).join("; ")}`);
      }
    }
    this.lastApplyMs = performance.now() - t0;
    this.#log.debug("nft table replaced", {
      capsules: state.capsules.length,
      exposed: state.capsules.reduce((n, c) => n + c.exposed.length, 0),
      ms: Math.round(this.lastApplyMs),
    });
  }

  // The capsule's identity on this bridge plus its links; nothing is left behind if the links fail.
  async #plug(rec: CapsuleRecord, id: ArrivingNet): Promise<CapsuleNet> {
    const net: CapsuleNet = {
      backend: "bridge",
      ...id,
      gateway: this.plan.gateway,
      dns: this.plan.dns,
      tap: tapName(rec.id),
    };
    try {
      await this.#ensureLinks({ ...rec, net });
    } catch (err) {
      await this.#removeLinks({ ...rec, net }).catch(() => {});
      throw err;
    }
    return net;
  }

  async #ensureLinks(rec: CapsuleRecord): Promise<void> {
    const net = rec.net!;
    await ensureTap({ tap: net.tap!, bridge: this.plan.bridge, mac: net.mac, ip: net.ip, gateway: this.plan.gateway });
    await setEgressLimit(net.tap!, ifbName(rec.id), rec.spec.egressKbps);
  }

  async #removeLinks(rec: CapsuleRecord): Promise<void> {
    const net = rec.net!;
    await setEgressLimit(net.tap!, ifbName(rec.id), 0);
    await removeTap({ tap: net.tap!, bridge: this.plan.bridge, ip: net.ip });
  }

  #hostBusy(m: PortMapping): boolean {
    return this.opts.hostBusy ? this.opts.hostBusy(m) : !isPortFree("0.0.0.0", m.hostPort, m.protocol);
  }
}

function fmt(p: PortMapping): string {
  return `${p.hostPort}->${p.guestPort}/${p.protocol}`;
}
