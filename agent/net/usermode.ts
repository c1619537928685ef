/**
 * The user-mode (QEMU slirp) network backend: no root needed, capsules reach out through
 * QEMU, and declared ports are forwarded from one host address as soon as QEMU starts.
 * For rootless development; it gives no isolation between capsules beyond QEMU's own.
 */
import { FailedPreconditionError } from "../errors.ts";
import type { CapsuleNet, CapsuleRecord } from "../capsule/types.ts";
import { QEMU_STATES } from "../capsule/states.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";
import { type Exposure, type LaunchNet, minus, type NetworkBackend } from "./network.ts";
import { portKey, resolvePorts } from "./ports.ts";

/** Guest addressing slirp hands out; capsule-init configures it statically. */
export const USERMODE_GUEST = { addressCidr: "10.0.2.15/24", gateway: "10.0.2.2", dns: "10.0.2.3" };

/** Settings of the user-mode backend. */
export interface UsermodeOptions {
  hostAddress: string;
  portRange: [number, number];
  macFor(id: string): string;
}

/** Slirp networking: every capsule has the same private address behind its own QEMU. */
export class UsermodeNetwork implements NetworkBackend {
  readonly kind = "usermode";
  constructor(private opts: UsermodeOptions) {}

  /** Nothing lives outside QEMU, so there is nothing to reconcile. */
  open(): Promise<void> {
    return Promise.resolve();
  }

  /** Fixed identity; host ports are chosen at each start (slirp binds them then). */
  attach(rec: CapsuleRecord): Promise<CapsuleNet> {
    const [ip, prefix] = USERMODE_GUEST.addressCidr.split("/");
    return Promise.resolve({
      backend: "usermode",
      ip,
      prefix: Number(prefix),
      gateway: USERMODE_GUEST.gateway,
      dns: USERMODE_GUEST.dns,
      mac: this.opts.macFor(rec.id),
      hostPorts: rec.spec.ports,
    });
  }

  /** Live migration needs a capsule address that survives the move: bridge only. */
  adopt(): Promise<CapsuleNet> {
    return Promise.reject(
      new FailedPreconditionError("live migration needs the bridge network on both agents; this agent runs usermode"),
    );
  }

  /** Nothing to release. */
  detach(): Promise<void> {
    return Promise.resolve();
  }

  /** Resolves host ports against other running capsules and the host, and forwards them all. */
  launch(rec: CapsuleRecord, others: CapsuleRecord[]): LaunchNet {
    const held = new Set<string>();
    for (const r of others) {
      if (!QEMU_STATES.has(r.state)) continue;
      for (const p of r.runtime?.ports ?? []) held.add(portKey(p.hostPort, p.protocol));
    }
    const ports = resolvePorts(rec.spec.ports, held, this.opts.hostAddress, this.opts.portRange);
    return {
      netdev: {
        kind: "user",
        forwards: ports.map((p) => ({ ...p, hostAddress: this.opts.hostAddress })),
      },
      guest: USERMODE_GUEST,
      ports,
      hostAddress: this.opts.hostAddress,
    };
  }

  /** Slirp forwards every declared port from the start; a listen only makes it answer. */
  decide(rec: CapsuleRecord, listening: GuestPort[]): Exposure {
    const ports = rec.runtime?.ports ?? [];
    const exposed = ports.filter((p) => listening.some((l) => l.port === p.guestPort && l.protocol === p.protocol));
    const before = rec.exposed ?? [];
    return { exposed, added: minus(exposed, before), removed: minus(before, exposed), refused: [] };
  }

  /** Nothing to sync: QEMU holds the forwards. */
  sync(): Promise<void> {
    return Promise.resolve();
  }

  /** Nothing to remove. */
  uninstall(): Promise<void> {
    return Promise.resolve();
  }
}
