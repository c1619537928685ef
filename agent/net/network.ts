/**
 * The seam between the capsule lifecycle and the instance network. The manager calls a
 * NetworkBackend at create, launch, listen changes and delete; the backend owns addresses,
 * host ports, taps and rules. Two backends: `bridge` (the real capsule network, root) and
 * `usermode` (QEMU slirp, for rootless development).
 */
import type { ArrivingCapsule, CapsuleNet, CapsuleRecord, PortMapping } from "../capsule/types.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";
import type { HostForward } from "../vmm/qemu_args.ts";
import type { Refusal } from "./ports.ts";

/** How QEMU connects the capsule's NIC. */
export type QemuNetdev = { kind: "user"; forwards: HostForward[] } | { kind: "tap"; ifname: string };

/** What a launch needs from the network. */
export interface LaunchNet {
  netdev: QemuNetdev;
  /** Guest addressing for the kernel command line. */
  guest: { addressCidr: string; gateway: string; dns: string };
  /** Host ports as resolved for this run (shown as Capsule.ports). */
  ports: PortMapping[];
  /** Address the ports are reachable on ("" = every address of the instance). */
  hostAddress: string;
}

/** The outcome of a listen change. */
export interface Exposure {
  /** Mappings exposed after the change. */
  exposed: PortMapping[];
  added: PortMapping[];
  removed: PortMapping[];
  /** Listens refused; the caller reports each once. */
  refused: Refusal[];
}

/** The instance network as the capsule manager uses it. */
export interface NetworkBackend {
  readonly kind: "bridge" | "usermode";
  /** Brings links and rules in line with the records (agent start-up); replaces, never flushes. */
  open(records: CapsuleRecord[]): Promise<void>;
  /** Gives a new capsule its address, MAC, host ports and link; `others` are all other records. */
  attach(rec: CapsuleRecord, others: CapsuleRecord[]): Promise<CapsuleNet>;
  /**
   * Gives a capsule arriving by live migration the identity it had at its source (address,
   * MAC), host ports resolved here (the source's where free) and its tap.
   */
  adopt(rec: CapsuleRecord, from: ArrivingNet, others: CapsuleRecord[]): Promise<CapsuleNet>;
  /** Releases what attach created (delete). */
  detach(rec: CapsuleRecord): Promise<void>;
  /** The network part of a launch; `others` are all other records. */
  launch(rec: CapsuleRecord, others: CapsuleRecord[]): LaunchNet;
  /** Decides what the guest's listening set exposes (nothing is applied yet). */
  decide(rec: CapsuleRecord, listening: GuestPort[]): Exposure;
  /** Makes the kernel match the records' exposures; called after rec.exposed changed. */
  sync(): Promise<void>;
  /** Removes everything the agent created on the instance (uninstall). */
  uninstall(records: CapsuleRecord[]): Promise<void>;
}

/** A migrating capsule's network identity as its source had it; spec ports with host_port 0 keep theirs here when free. */
export type ArrivingNet = ArrivingCapsule["net"];

/** Mappings in `a` missing from `b`, by host port and protocol. */
export function minus(a: PortMapping[], b: PortMapping[]): PortMapping[] {
  return a.filter((x) => !b.some((y) => y.hostPort === x.hostPort && y.protocol === x.protocol));
}
