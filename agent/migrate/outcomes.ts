/**
 * The target's memory of migrations it no longer tracks in a capsule record: whether the
 * guest ran here or was dropped. A source that lost its connection (or restarted) asks the
 * target, and the answer must survive the target restarting too, so it is on disk:
 * <state>/migrations/<id>.json, written atomically before the record changes.
 */
import { join } from "node:path";
import { z } from "zod";
import { atomicWriteJson } from "../state/atomic.ts";

const OutcomeSchema = z.object({
  id: z.string(),
  capsuleId: z.string(),
  /** aborted: never ran here (or its QEMU died before the source let go); released: ours for good. */
  outcome: z.enum(["aborted", "released"]),
  message: z.string(),
  at: z.string(),
});
export type Outcome = z.infer<typeof OutcomeSchema>;

const KEEP_MS = 7 * 24 * 3600_000;

/** Outcome files under <state>/migrations. */
export class OutcomeStore {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, "migrations");
  }

  /** Creates the directory and drops outcomes older than a week. */
  async open(): Promise<void> {
    await Deno.mkdir(this.dir, { recursive: true, mode: 0o700 });
    for await (const e of Deno.readDir(this.dir)) {
      if (!e.name.endsWith(".json") || e.name === "forwards.json") continue;
      const p = join(this.dir, e.name);
      const st = await Deno.stat(p);
      if (Date.now() - (st.mtime?.getTime() ?? 0) > KEEP_MS) await Deno.remove(p).catch(() => {});
    }
  }

  /** Writes an outcome durably. */
  async put(o: Omit<Outcome, "at">): Promise<void> {
    await atomicWriteJson(this.#path(o.id), { ...o, at: new Date().toISOString() });
  }

  /** The outcome of migration `id`, if this agent recorded one. */
  async get(id: string): Promise<Outcome | undefined> {
    try {
      return OutcomeSchema.parse(JSON.parse(await Deno.readTextFile(this.#path(id))));
    } catch {
      return undefined;
    }
  }

  #path(id: string): string {
    if (!/^[A-Za-z0-9-]{1,64}$/.test(id)) throw new Error(`bad migration id ${id}`);
    return join(this.dir, `${id}.json`);
  }
}
