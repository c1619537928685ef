/**
 * Grace-period forwarding: after a capsule leaves, its host ports here keep leading to it
 * on its new instance for a while (clients and DNS catch up meanwhile). The entries are
 * rendered into the nftables table as redirects and persisted, so an agent restart keeps
 * them until they expire.
 */
import { join } from "node:path";
import { z } from "zod";
import type { Logger } from "../log.ts";
import type { Redirect } from "../net/nft_render.ts";
import { atomicWriteJson } from "../state/atomic.ts";

const ForwardSchema = z.object({
  migrationId: z.string(),
  capsuleId: z.string(),
  hostPort: z.number().int(),
  protocol: z.enum(["tcp", "udp"]),
  toAddress: z.string(),
  toPort: z.number().int(),
  capsuleIp: z.string(),
  /** Epoch ms after which the forward is removed. */
  until: z.number(),
});
export type Forward = z.infer<typeof ForwardSchema>;
const FileSchema = z.object({ version: z.literal(1), forwards: z.array(ForwardSchema) });

/** The forwards of this agent, persisted in <state>/migrations/forwards.json. */
export class Forwards {
  #list: Forward[] = [];
  #timer?: ReturnType<typeof setTimeout>;
  #closed = false;
  #path: string;

  /** `changed` re-applies the network (called after expiry removed entries). */
  constructor(stateDir: string, private log: Logger, private changed: () => Promise<void>) {
    this.#path = join(stateDir, "migrations", "forwards.json");
  }

  /** Loads persisted forwards, dropping expired ones. */
  async open(): Promise<void> {
    await Deno.mkdir(join(this.#path, ".."), { recursive: true, mode: 0o700 });
    try {
      this.#list = FileSchema.parse(JSON.parse(await Deno.readTextFile(this.#path))).forwards;
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) this.log.warn("forwards.json unreadable; dropped", { error: err });
    }
    this.#list = this.#list.filter((f) => f.until > Date.now());
    this.#schedule();
  }

  /** The live forwards as nftables redirects, except for capsules that are back here (`local`). */
  redirects(local: (capsuleId: string) => boolean = () => false): Redirect[] {
    const now = Date.now();
    return this.#list.filter((f) => f.until > now && !local(f.capsuleId)).map((f) => ({
      hostPort: f.hostPort,
      protocol: f.protocol,
      toAddress: f.toAddress,
      toPort: f.toPort,
      comment: `${f.capsuleId} moved (${f.migrationId})`,
      capsuleIp: f.capsuleIp,
    }));
  }

  /** Adds forwards (replacing any on the same host ports); the caller applies the network. */
  async add(list: Forward[]): Promise<void> {
    const keys = new Set(list.map((f) => `${f.hostPort}/${f.protocol}`));
    this.#list = [...this.#list.filter((f) => !keys.has(`${f.hostPort}/${f.protocol}`)), ...list];
    await this.#save();
    this.#schedule();
  }

  /** Removes the forwards of one migration (it failed after all); the caller applies the network. */
  async remove(migrationId: string): Promise<void> {
    const before = this.#list.length;
    this.#list = this.#list.filter((f) => f.migrationId !== migrationId);
    if (this.#list.length !== before) await this.#save();
  }

  /** Stops the expiry timer for good. */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
  }

  async #save(): Promise<void> {
    await atomicWriteJson(this.#path, { version: 1, forwards: this.#list });
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    if (this.#closed || this.#list.length === 0) return;
    const next = Math.min(...this.#list.map((f) => f.until));
    this.#timer = setTimeout(() => void this.#expire(), Math.max(0, next - Date.now()) + 10);
  }

  async #expire(): Promise<void> {
    const now = Date.now();
    const gone = this.#list.filter((f) => f.until <= now);
    this.#list = this.#list.filter((f) => f.until > now);
    if (gone.length > 0) {
      await this.#save().catch((err) => this.log.error("could not persist forwards", { error: err }));
      await this.changed().catch((err) => this.log.error("could not remove expired forwards", { error: err }));
      for (const f of gone) {
        this.log.info("grace forwarding ended", { capsule: f.capsuleId, hostPort: `${f.hostPort}/${f.protocol}` });
      }
    }
    this.#schedule();
  }
}
