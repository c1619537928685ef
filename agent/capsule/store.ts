/**
 * Persists capsule records, one directory per capsule under <state>/capsules/<id>/.
 * The record is versioned so later agents can migrate it; writes are atomic.
 */
import { join } from "node:path";
import { z } from "zod";
import { atomicWriteJson, removeStaleTemps } from "../state/atomic.ts";
import type { CapsuleRecord } from "./types.ts";
import { CAPSULE_STATES } from "./states.ts";
import type { Logger } from "../log.ts";

const RECORD_VERSION = 1;

const PortSchema = z.object({
  guestPort: z.number().int(),
  hostPort: z.number().int(),
  protocol: z.enum(["tcp", "udp"]),
});

// Validates what we read back: a hand-edited or half-migrated file is reported, not trusted.
const RecordSchema = z.object({
  version: z.literal(RECORD_VERSION),
  capsule: z.object({
    id: z.string(),
    name: z.string(),
    imageId: z.string(),
    spec: z.object({
      image: z.string(),
      memoryMib: z.number().int(),
      vcpus: z.number().int(),
      args: z.array(z.string()),
      env: z.record(z.string(), z.string()),
      labels: z.record(z.string(), z.string()),
      ports: z.array(PortSchema),
      // Absent in records written before the network issue.
      egressKbps: z.number().int().min(0).default(0),
      allowFrom: z.array(z.string()).default([]),
    }),
    state: z.enum(CAPSULE_STATES),
    stateReason: z.string(),
    createdAt: z.string(),
    updatedAt: z.string(),
    runtime: z.object({
      pid: z.number().int(),
      startTicks: z.number(),
      accelerator: z.enum(["kvm", "tcg"]),
      ports: z.array(PortSchema),
      hostAddress: z.string(),
    }).optional(),
    exitCode: z.number().int().optional(),
    listening: z.array(z.object({ port: z.number().int(), protocol: z.enum(["tcp", "udp"]) })).optional(),
    savedFrom: z.enum(["running", "paused"]).optional(),
    net: z.object({
      backend: z.enum(["bridge", "usermode"]),
      ip: z.string().regex(/^\d+\.\d+\.\d+\.\d+$/),
      prefix: z.number().int().min(0).max(32),
      gateway: z.string(),
      dns: z.string(),
      mac: z.string().regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/),
      tap: z.string().regex(/^[a-z0-9]{1,15}$/).optional(),
      hostPorts: z.array(PortSchema),
    }).optional(),
    exposed: z.array(PortSchema).optional(),
    migration: z.object({
      id: z.string(),
      role: z.enum(["source", "target"]),
      peer: z.string(),
      phase: z.enum(["preparing", "streaming", "switchover", "incoming", "running"]),
      startedAt: z.string(),
      resumeTo: z.enum(["running", "paused"]),
      exposed: z.array(PortSchema).optional(),
    }).optional(),
  }),
});

/** Paths of everything a capsule owns in the state dir. */
export interface CapsulePaths {
  dir: string;
  record: string;
  qmpSocket: string;
  osSocket: string;
  console: string;
  /** The app's stdout/stderr (see app_log.ts). */
  appLog: string;
  launchConfig: string;
  pidFile: string;
  stateFile: string;
}

/** Reads and writes capsule records under `<stateDir>/capsules`. */
export class CapsuleStore {
  readonly root: string;
  constructor(stateDir: string, private log: Logger) {
    this.root = join(stateDir, "capsules");
  }

  /** Paths for capsule `id`. */
  paths(id: string): CapsulePaths {
    const dir = join(this.root, id);
    return {
      dir,
      record: join(dir, "capsule.json"),
      qmpSocket: join(dir, "qmp.sock"),
      osSocket: join(dir, "os.sock"),
      console: join(dir, "console.log"),
      appLog: join(dir, "app.log"),
      launchConfig: join(dir, "launch.bin"),
      pidFile: join(dir, "qemu.pid"),
      stateFile: join(dir, "state.bin"),
    };
  }

  /** Loads every record; unreadable ones are logged and skipped, never deleted. */
  async loadAll(): Promise<CapsuleRecord[]> {
    await Deno.mkdir(this.root, { recursive: true, mode: 0o700 });
    const out: CapsuleRecord[] = [];
    for await (const e of Deno.readDir(this.root)) {
      if (!e.isDirectory) continue;
      const p = this.paths(e.name);
      await removeStaleTemps(p.dir);
      try {
        const parsed = RecordSchema.parse(JSON.parse(await Deno.readTextFile(p.record)));
        out.push(parsed.capsule);
      } catch (err) {
        this.log.error("skipping unreadable capsule record", { path: p.record, error: err });
      }
    }
    return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  /** Creates the capsule's directory and writes its first record. */
  async create(rec: CapsuleRecord): Promise<void> {
    await Deno.mkdir(this.paths(rec.id).dir, { recursive: true, mode: 0o700 });
    await this.save(rec);
  }

  /** Atomically writes the record. */
  async save(rec: CapsuleRecord): Promise<void> {
    await atomicWriteJson(this.paths(rec.id).record, { version: RECORD_VERSION, capsule: rec });
  }

  /** Removes the capsule's directory and everything in it. */
  async remove(id: string): Promise<void> {
    await Deno.remove(this.paths(id).dir, { recursive: true }).catch((err) => {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    });
  }
}
