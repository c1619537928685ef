/**
 * Plain domain types of a capsule. The wire types live in agent/gen and are converted
 * in agent/api/convert.ts; nothing here knows about protobuf.
 */
import type { GuestPort } from "../osserver/guest_messages.ts";
import type { CapsuleStateName } from "./states.ts";

export type Protocol = "tcp" | "udp";

/** A guest port exposed on the instance; hostPort 0 = pick one at start. */
export interface PortMapping {
  guestPort: number;
  hostPort: number;
  protocol: Protocol;
}

/** What the user asked for, with image defaults already applied. */
export interface CapsuleSpec {
  image: string;
  memoryMib: number;
  vcpus: number;
  args: string[];
  env: Record<string, string>;
  labels: Record<string, string>;
  ports: PortMapping[];
  /** Egress limit in kbit/s; 0 = none. */
  egressKbps: number;
  /** Names or ids of capsules (on this agent) whose traffic may reach this one. */
  allowFrom: string[];
}

/** A capsule's network identity, fixed when it is created and kept for life. */
export interface CapsuleNet {
  backend: "bridge" | "usermode";
  /** Guest address and the prefix it is configured with. */
  ip: string;
  prefix: number;
  gateway: string;
  dns: string;
  mac: string;
  /** The tap on the instance bridge (bridge backend). */
  tap?: string;
  /** spec.ports with host ports resolved (bridge: reserved at create; usermode: at each start). */
  hostPorts: PortMapping[];
}

/** Facts about the QEMU process currently running the capsule. */
export interface VmRuntime {
  pid: number;
  /** Process start time (clock ticks since boot, /proc/PID/stat field 22): guards against pid reuse. */
  startTicks: number;
  accelerator: "kvm" | "tcg";
  /** Ports with resolved host ports. */
  ports: PortMapping[];
  hostAddress: string;
}

/** Where a live migration of this capsule stands; journaled so a restarted agent can settle it. */
export interface MigrationMark {
  id: string;
  /** source: the capsule leaves this agent; target: it arrives here. */
  role: "source" | "target";
  /** The other agent's peer name. */
  peer: string;
  /**
   * source: preparing → streaming → switchover (from the moment migrate-continue may have been sent, only the
   * target can say where the guest runs). target: incoming → running (ran here; the source not yet released it).
   */
  phase: "preparing" | "streaming" | "switchover" | "incoming" | "running";
  startedAt: string;
  /** The run state to return to when the migration fails. */
  resumeTo: "running" | "paused";
  /** source: exposure withdrawn at switchover, put back if the migration fails. */
  exposed?: PortMapping[];
}

/** A capsule arriving by live migration, as its source describes it. */
export interface ArrivingCapsule {
  id: string;
  name: string;
  imageId: string;
  spec: CapsuleSpec;
  /** Address, MAC and host ports at the source. */
  net: { ip: string; prefix: number; mac: string; hostPorts: PortMapping[] };
  /** What the app listens on now, so the target stages its exposure. */
  listening: GuestPort[];
  /** The guest was paused, not running, when the migration began. */
  paused: boolean;
}

/** The persisted record of a capsule (capsules/<id>/capsule.json). */
export interface CapsuleRecord {
  id: string;
  name: string;
  imageId: string;
  spec: CapsuleSpec;
  state: CapsuleStateName;
  stateReason: string;
  createdAt: string;
  updatedAt: string;
  runtime?: VmRuntime;
  exitCode?: number;
  /** Ports the app listens on, as capsule-init last reported them; empty while no QEMU runs. */
  listening?: GuestPort[];
  /** Network identity (absent only in records written before the network existed). */
  net?: CapsuleNet;
  /** Host ports DNAT'ed to the capsule now: the allowed ports its app listens on. */
  exposed?: PortMapping[];
  /** Run state at the moment of the last save, restored with it. */
  savedFrom?: "running" | "paused";
  /** Set while the capsule is being live-migrated (either side). */
  migration?: MigrationMark;
}
