/**
 * Converters between wire (agent/gen) and domain types. The only file that knows both.
 */
import { Buffer } from "node:buffer";
import * as pb from "../gen/flexcap/v1/capsule.ts";
import * as ipb from "../gen/flexcap/v1/image.ts";
import * as mpb from "../gen/flexcap/v1/migration.ts";
import type { MigrationPhaseName, MigrationProgress, MigrationResult } from "../migrate/types.ts";
import type { CapsuleView } from "../capsule/manager.ts";
import type { CapsuleEvent } from "../capsule/events.ts";
import type { LogChunk } from "../capsule/app_log.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";
import type { CapsuleStateName } from "../capsule/states.ts";
import type { PortMapping, Protocol } from "../capsule/types.ts";
import type { ImageInfo } from "../image/manifest.ts";

const STATE: Record<CapsuleStateName, pb.CapsuleState> = {
  created: pb.CapsuleState.CAPSULE_STATE_CREATED,
  starting: pb.CapsuleState.CAPSULE_STATE_STARTING,
  running: pb.CapsuleState.CAPSULE_STATE_RUNNING,
  paused: pb.CapsuleState.CAPSULE_STATE_PAUSED,
  stopping: pb.CapsuleState.CAPSULE_STATE_STOPPING,
  stopped: pb.CapsuleState.CAPSULE_STATE_STOPPED,
  saving: pb.CapsuleState.CAPSULE_STATE_SAVING,
  saved: pb.CapsuleState.CAPSULE_STATE_SAVED,
  restoring: pb.CapsuleState.CAPSULE_STATE_RESTORING,
  migrating: pb.CapsuleState.CAPSULE_STATE_MIGRATING,
  incoming: pb.CapsuleState.CAPSULE_STATE_INCOMING,
};

const EVENT: Record<CapsuleEvent["type"], pb.EventType> = {
  created: pb.EventType.EVENT_TYPE_CREATED,
  state_changed: pb.EventType.EVENT_TYPE_STATE_CHANGED,
  deleted: pb.EventType.EVENT_TYPE_DELETED,
  listen: pb.EventType.EVENT_TYPE_LISTEN,
  unlisten: pb.EventType.EVENT_TYPE_UNLISTEN,
  log: pb.EventType.EVENT_TYPE_LOG,
  exited: pb.EventType.EVENT_TYPE_EXITED,
  exposed: pb.EventType.EVENT_TYPE_EXPOSED,
  unexposed: pb.EventType.EVENT_TYPE_UNEXPOSED,
  expose_refused: pb.EventType.EVENT_TYPE_EXPOSE_REFUSED,
  migration: pb.EventType.EVENT_TYPE_MIGRATION,
};

/** Wire protocol enum → domain ("tcp" when unspecified). */
export function protocolFromPb(p: pb.Protocol): Protocol {
  return p === pb.Protocol.PROTOCOL_UDP ? "udp" : "tcp";
}

function protocolToPb(p: Protocol): pb.Protocol {
  return p === "udp" ? pb.Protocol.PROTOCOL_UDP : pb.Protocol.PROTOCOL_TCP;
}

function listenToPb(p: GuestPort): pb.ListenPort {
  return { port: p.port, protocol: protocolToPb(p.protocol) };
}

/** Domain log chunk → wire LogChunk. */
export function logChunkToPb(c: LogChunk): pb.LogChunk {
  return {
    stream: c.stream === "stdout" ? pb.LogStream.LOG_STREAM_STDOUT : pb.LogStream.LOG_STREAM_STDERR,
    data: Buffer.from(c.data),
    time: c.time,
  };
}

function portToPb(p: PortMapping): pb.PortMapping {
  return {
    guestPort: p.guestPort,
    hostPort: p.hostPort,
    protocol: protocolToPb(p.protocol),
  };
}

/** Domain capsule → wire Capsule. */
export function capsuleToPb(v: CapsuleView): pb.Capsule {
  const r = v.record;
  return {
    id: r.id,
    name: r.name,
    state: STATE[r.state],
    stateReason: r.stateReason,
    spec: {
      image: r.spec.image,
      memoryMib: r.spec.memoryMib,
      vcpus: r.spec.vcpus,
      args: r.spec.args,
      env: r.spec.env,
      labels: r.spec.labels,
      ports: r.spec.ports.map(portToPb),
      egressKbps: r.spec.egressKbps,
      allowFrom: r.spec.allowFrom,
    },
    imageId: r.imageId,
    createdAt: new Date(r.createdAt),
    updatedAt: new Date(r.updatedAt),
    qemuPid: r.runtime?.pid ?? 0,
    memory: v.memory
      ? {
        guestMib: r.spec.memoryMib,
        qemuRssKib: v.memory.rssKib,
        qemuOverheadKib: v.memory.overheadKib,
        guestResidentKib: v.memory.guestResidentKib,
      }
      : undefined,
    ports: (r.runtime?.ports ?? (r.net?.backend === "bridge" ? r.net.hostPorts : [])).map(portToPb),
    hostAddress: r.runtime?.hostAddress ?? "",
    accelerator: r.runtime?.accelerator ?? "",
    exitCode: r.exitCode,
    listening: (r.listening ?? []).map(listenToPb),
    network: r.net
      ? {
        backend: r.net.backend,
        address: `${r.net.ip}/${r.net.prefix}`,
        gateway: r.net.gateway,
        mac: r.net.mac,
        tap: r.net.tap ?? "",
      }
      : undefined,
    exposed: (r.exposed ?? []).map(portToPb),
  };
}

/** Domain event → wire Event. */
export function eventToPb(e: CapsuleEvent): pb.Event {
  return {
    seq: e.seq,
    time: e.time,
    type: EVENT[e.type],
    capsuleId: e.capsuleId,
    capsuleName: e.capsuleName,
    state: STATE[e.state],
    previousState: e.previousState ? STATE[e.previousState] : pb.CapsuleState.CAPSULE_STATE_UNSPECIFIED,
    message: e.message,
    port: e.port ? listenToPb(e.port) : undefined,
    log: e.log ? logChunkToPb(e.log) : undefined,
    exit: e.exit,
    mapping: e.mapping ? portToPb(e.mapping) : undefined,
    migration: e.migration ? migrationProgressToPb(e.migration) : undefined,
  };
}

const PHASE: Record<MigrationPhaseName, mpb.MigrationPhase> = {
  preparing: mpb.MigrationPhase.MIGRATION_PHASE_PREPARING,
  image: mpb.MigrationPhase.MIGRATION_PHASE_IMAGE,
  streaming: mpb.MigrationPhase.MIGRATION_PHASE_STREAMING,
  switchover: mpb.MigrationPhase.MIGRATION_PHASE_SWITCHOVER,
  resuming: mpb.MigrationPhase.MIGRATION_PHASE_RESUMING,
  completed: mpb.MigrationPhase.MIGRATION_PHASE_COMPLETED,
  failed: mpb.MigrationPhase.MIGRATION_PHASE_FAILED,
  cancelled: mpb.MigrationPhase.MIGRATION_PHASE_CANCELLED,
};

/** Domain migration progress → wire MigrationProgress. */
export function migrationProgressToPb(p: MigrationProgress): mpb.MigrationProgress {
  return { ...p, phase: PHASE[p.phase] };
}

/** Domain migration result → wire MigrationResult. */
export function migrationResultToPb(r: MigrationResult): mpb.MigrationResult {
  return { ...r, targetPorts: r.targetPorts.map((p) => ({ ...p })) };
}

/** Domain image → wire Image. */
export function imageToPb(i: ImageInfo): ipb.Image {
  const m = i.manifest;
  return {
    id: i.id,
    name: i.name,
    kernel: m.kernel === "capsule" ? ipb.KernelKind.KERNEL_KIND_CAPSULE : ipb.KernelKind.KERNEL_KIND_LINUX_VM,
    entrypoint: m.entrypoint,
    args: m.args,
    env: m.env,
    defaultMemoryMib: m.defaultMemoryMib,
    sizeBytes: m.sizeBytes,
    files: m.files,
    createdAt: i.createdAt,
    minMemoryMib: m.minMemoryMib,
    minMemoryMeasured: m.minMemoryMeasured ?? false,
    workdir: m.workdir ?? "/",
  };
}
