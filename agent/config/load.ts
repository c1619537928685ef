/**
 * Loads the config file (YAML) and applies flag overrides, all through ConfigSchema,
 * so every error names the offending key and where it came from.
 */
import { bridgePlan } from "../net/plan.ts";
import { chooseBackend } from "../net/select.ts";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { InvalidArgumentError } from "../errors.ts";
import { type Config, ConfigSchema } from "./schema.ts";

/** Flag overrides, already split into dotted config keys. */
export type ConfigOverrides = Record<string, unknown>;

/** Formats zod issues as "key.path: message" lines. */
export function formatIssues(err: z.ZodError): string {
  return err.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`).join("; ");
}

/** Parses a config document (YAML text) with overrides; throws InvalidArgumentError naming the key. */
export function parseConfig(text: string, source: string, overrides: ConfigOverrides = {}): Config {
  let doc: unknown;
  try {
    doc = text.trim() === "" ? {} : parseYaml(text);
  } catch (err) {
    throw new InvalidArgumentError(source, `not valid YAML: ${(err as Error).message}`);
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new InvalidArgumentError(source, "expected a mapping of settings at the top level");
  }
  const merged = structuredClone(doc) as Record<string, unknown>;
  for (const [key, value] of Object.entries(overrides)) {
    if (value !== undefined) setDotted(merged, key, value);
  }
  const result = ConfigSchema.safeParse(merged);
  if (!result.success) throw new InvalidArgumentError(source, formatIssues(result.error));
  const cfg = result.data;
  if (cfg.api.startsWith("tcp:") && !cfg.tls) {
    throw new InvalidArgumentError(source, "tls: required when api is tcp: (set tls.cert and tls.key)");
  }
  if (cfg.network.port_range[0] > cfg.network.port_range[1]) {
    throw new InvalidArgumentError(source, "network.port_range: first port must not exceed the second");
  }
  if (chooseBackend(cfg.network).kind === "bridge") {
    try {
      bridgePlan(cfg.network);
    } catch (err) {
      throw new InvalidArgumentError(source, (err as Error).message);
    }
  }
  return cfg;
}

/** Reads `path` (missing file = defaults when `optional`) and parses it. */
export async function loadConfig(path: string | undefined, overrides: ConfigOverrides = {}): Promise<Config> {
  if (!path) return parseConfig("", "flags", overrides);
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new InvalidArgumentError("config", `cannot read ${path}: ${(err as Error).message}`);
  }
  return parseConfig(text, `config ${path}`, overrides);
}

function setDotted(obj: Record<string, unknown>, key: string, value: unknown): void {
  const parts = key.split(".");
  let cur = obj;
  for (const p of parts.slice(0, -1)) {
    if (typeof cur[p] !== "object" || cur[p] === null) cur[p] = {};
    cur = cur[p] as Record<string, unknown>;
  }
  cur[parts[parts.length - 1]] = value;
}
