/**
 * Talks to nftables: applies a rendered batch with `nft -j -f -`, reads the table back
 * with `nft -j list table` and compares the two, so the agent knows the kernel holds
 * exactly what the state says and nothing else.
 */
import { execa } from "execa";
import { InternalError, UnavailableError } from "../errors.ts";
import { FAMILY, type NftCommand, renderDelete, TABLE } from "./nft_render.ts";

/** A difference between the rendered table and the kernel's. */
export interface TableDrift {
  /** Human-readable lines, e.g. `rule 3 of chain "input": expected … got …`. */
  differences: string[];
}

/** How to run nft: the binary, or a prefix such as ["ip", "netns", "exec", NS, "nft"] in tests. */
export type NftCommandLine = string[];
const NFT: NftCommandLine = ["nft"];

/** Applies a JSON batch in one transaction; throws with nft's message if the kernel refuses it. */
export async function applyBatch(batch: { nftables: NftCommand[] }, nft = NFT): Promise<void> {
  const r = await execa(nft[0], [...nft.slice(1), "-j", "-f", "-"], { input: JSON.stringify(batch), reject: false });
  if (r.exitCode !== 0) {
    throw new UnavailableError(`nft refused the flexcap table: ${String(r.stderr).trim().slice(0, 2000)}`);
  }
}

/** The table as the kernel reports it (JSON objects without handles), or undefined if absent. */
export async function readTable(nft = NFT): Promise<Record<string, unknown>[] | undefined> {
  const r = await execa(nft[0], [...nft.slice(1), "-j", "list", "table", FAMILY, TABLE], { reject: false });
  if (r.exitCode !== 0) {
    if (/No such file or directory/.test(String(r.stderr))) return undefined;
    throw new UnavailableError(`nft list table ${FAMILY} ${TABLE} failed: ${String(r.stderr).trim()}`);
  }
  let parsed: { nftables?: Record<string, Record<string, unknown>>[] };
  try {
    parsed = JSON.parse(String(r.stdout));
  } catch (err) {
    throw new InternalError(`nft printed unparsable JSON: ${(err as Error).message}`);
  }
  return (parsed.nftables ?? []).filter((o) => !("metainfo" in o)).map(stripHandle);
}

/** Removes the table (no error if it is not there). */
export async function deleteTable(nft = NFT): Promise<void> {
  await applyBatch(renderDelete(), nft);
}

/**
 * Compares what the batch added with what the kernel holds: the same chains and, per
 * chain, the same rules in the same order. Counter values are ignored (they count
 * packets), and so is an ingress chain's device, which nft 1.0.6 leaves out of its JSON
 * (the chain's name carries the tap's).
 */
export function compareTable(batch: { nftables: NftCommand[] }, kernel: Record<string, unknown>[]): TableDrift {
  const want = expected(batch);
  const got = { chains: [] as Record<string, unknown>[], rules: new Map<string, Record<string, unknown>[]>() };
  let hasTable = false;
  const other: string[] = [];
  for (const o of kernel) {
    const [kind, body] = Object.entries(o)[0] as [string, Record<string, unknown>];
    if (kind === "table") hasTable = true;
    else if (kind === "chain") got.chains.push(body);
    else if (kind === "rule") push(got.rules, String(body.chain), body);
    else other.push(`unexpected ${kind} ${JSON.stringify(body).slice(0, 200)}`);
  }
  const diff: string[] = [...other];
  if (!hasTable) diff.push(`table ${FAMILY} ${TABLE} is missing`);
  const wantChains = new Map(want.chains.map((c) => [String(c.name), c]));
  const gotChains = new Map(got.chains.map((c) => [String(c.name), c]));
  for (const [name, c] of wantChains) {
    const g = gotChains.get(name);
    if (!g) diff.push(`chain "${name}" is missing`);
    else if (canon(chainSansDev(c)) !== canon(chainSansDev(g))) {
      diff.push(`chain "${name}": expected ${canon(c)}, got ${canon(g)}`);
    }
  }
  for (const name of gotChains.keys()) if (!wantChains.has(name)) diff.push(`chain "${name}" is not in the state`);
  const names = new Set([...want.rules.keys(), ...got.rules.keys()]);
  for (const name of names) {
    const w = want.rules.get(name) ?? [];
    const g = got.rules.get(name) ?? [];
    for (let i = 0; i < Math.max(w.length, g.length); i++) {
      const a = w[i] ? canon(w[i]) : "(none)";
      const b = g[i] ? canon(g[i]) : "(none)";
      if (a !== b) diff.push(`rule ${i} of chain "${name}": expected ${a}, got ${b}`);
    }
  }
  return { differences: diff };
}

function expected(batch: { nftables: NftCommand[] }) {
  const chains: Record<string, unknown>[] = [];
  const rules = new Map<string, Record<string, unknown>[]>();
  // Only what follows the last delete survives the transaction.
  const cmds = batch.nftables;
  let start = 0;
  cmds.forEach((c, i) => {
    if ("delete" in c) start = i + 1;
  });
  for (const c of cmds.slice(start)) {
    const add = c.add;
    if (!add) continue;
    if (add.chain) chains.push(add.chain);
    if (add.rule) push(rules, String(add.rule.chain), add.rule);
  }
  return { chains, rules };
}

function push<T>(m: Map<string, T[]>, k: string, v: T): void {
  const list = m.get(k);
  if (list) list.push(v);
  else m.set(k, [v]);
}

function stripHandle(o: Record<string, unknown>): Record<string, unknown> {
  const [kind, body] = Object.entries(o)[0] as [string, Record<string, unknown>];
  const { handle: _h, ...rest } = body;
  return { [kind]: rest };
}

function chainSansDev(c: Record<string, unknown>): Record<string, unknown> {
  const { dev: _d, ...rest } = c;
  return rest;
}

// Stable text of a value with sorted keys and counters zeroed.
function canon(v: unknown): string {
  return JSON.stringify(v, (k, val) => {
    if (k === "counter" && val && typeof val === "object") return { packets: 0, bytes: 0 };
    if (val && typeof val === "object" && !Array.isArray(val)) {
      return Object.fromEntries(Object.entries(val as Record<string, unknown>).sort(([a], [b]) => a.localeCompare(b)));
    }
    return val;
  });
}
