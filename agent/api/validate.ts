/**
 * zod schemas for every request at the API boundary. A request that fails here is
 * refused with INVALID_ARGUMENT naming the proto field, before any state changes.
 */
import { z } from "zod";
import { InvalidArgumentError } from "../errors.ts";

/** Largest guest RAM accepted at all (1 TiB); capacity is checked separately. */
export const MAX_MEMORY_MIB = 1024 * 1024;
export const MAX_VCPUS = 64;

const name = z.string().max(63, "at most 63 characters").regex(
  /^[a-z][a-z0-9-]*$/,
  "expected lowercase letters, digits and '-', starting with a letter",
);
const ref = z.string().min(1, "required").max(128, "at most 128 characters");
const shortText = (max: number) => z.string().max(max, `at most ${max} characters`);
const labelKey = z.string().min(1).max(63, "at most 63 characters").regex(/^[A-Za-z0-9._/-]+$/, "invalid label key");
const envKey = z.string().min(1).max(255).regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "invalid environment variable name");
const noNul = (s: string) => !s.includes("\0");

const port = z.object({
  guestPort: z.number().int().min(1, "expected 1-65535").max(65535, "expected 1-65535"),
  hostPort: z.number().int().min(0).max(65535, "expected 0 (auto) or 1-65535"),
  protocol: z.number().int().min(0).max(2, "unknown protocol"),
});

const spec = z.object({
  image: ref,
  memoryMib: z.number().int().min(0).max(MAX_MEMORY_MIB, `at most ${MAX_MEMORY_MIB} MiB`),
  vcpus: z.number().int().min(0).max(MAX_VCPUS, `at most ${MAX_VCPUS}`),
  args: z.array(shortText(4096).refine(noNul, "contains NUL")).max(256, "at most 256 arguments"),
  env: z.record(envKey, shortText(4096).refine(noNul, "contains NUL")).refine(
    (r) => Object.keys(r).length <= 256,
    "at most 256 variables",
  ),
  labels: z.record(labelKey, shortText(256)).refine((r) => Object.keys(r).length <= 64, "at most 64 labels"),
  ports: z.array(port).max(64, "at most 64 ports"),
  // 10 Gbit/s is far beyond what a capsule can send; larger values are typos.
  egressKbps: z.number().int().min(0).max(10_000_000, "at most 10000000 (10 Gbit/s)"),
  allowFrom: z.array(
    z.string().min(1, "empty entry").max(128, "at most 128 characters").regex(
      /^[a-z0-9][a-z0-9-]*$/,
      "expected a capsule name or id",
    ),
  ).max(64, "at most 64 entries"),
}, { message: "required" });

export const CreateCapsuleSchema = z.object({ name, spec });
export const CapsuleRefSchema = z.object({ capsule: ref });
export const StopCapsuleSchema = z.object({ capsule: ref, graceMs: z.number().int().min(0).max(600_000) });
export const StreamConsoleSchema = z.object({ capsule: ref, fromStart: z.boolean(), follow: z.boolean() });
export const WatchEventsSchema = z.object({ capsule: z.string().max(128) });
export const MigrateCapsuleSchema = z.object({
  capsule: ref,
  targetPeer: z.string().min(1, "required").max(253, "at most 253 characters"),
  options: z.object({
    // 0 lifts the cap; beyond 100 GiB/s is a typo.
    maxBandwidthMibS: z.number().int().min(0).max(102_400, "at most 102400 MiB/s"),
    downtimeLimitMs: z.number().int().min(0).max(60_000, "at most 60000 ms"),
    autoConverge: z.boolean(),
    allowPostcopy: z.boolean(),
    timeoutMs: z.number().int().min(0).max(3_600_000, "at most 3600000 ms (1 hour)"),
    gracePeriodMs: z.number().int().min(0).max(86_400_000, "at most 86400000 ms (1 day)"),
  }).optional(),
});
export const ListCapsulesSchema = z.object({ labelSelector: z.record(labelKey, shortText(256)) });

const absPath = z.string().min(1, "required").max(4096).startsWith("/", "expected an absolute path").refine(
  (s) => !s.includes("\0") && !s.split("/").includes(".."),
  "must not contain NUL or '..'",
);
export const BuildImageSchema = z.object({
  name: z.string().max(63, "at most 63 characters").regex(
    /^[a-z0-9][a-z0-9._-]*$/,
    "expected lowercase letters, digits, '.', '_' and '-', starting with a letter or digit",
  ),
  executable: absPath,
  args: z.array(shortText(4096)).max(256),
  env: z.record(envKey, shortText(4096)),
  files: z.array(z.object({ hostPath: absPath, guestPath: z.union([z.literal(""), absPath]) })).max(1024),
  defaultMemoryMib: z.number().int().min(0).max(MAX_MEMORY_MIB),
  kernel: z.number().int().min(0).max(2, "unknown kernel kind"),
  replace: z.boolean(),
  workdir: z.union([z.literal(""), absPath]),
});
export const ImageRefSchema = z.object({ image: ref });
export const StreamLogsSchema = StreamConsoleSchema;
export const MeasureImageSchema = z.object({
  image: ref,
  probe: z.object(
    {
      guestPort: z.number().int().min(1, "expected 1-65535").max(65535, "expected 1-65535"),
      send: z.instanceof(Uint8Array).refine((b) => b.length <= 4096, "at most 4096 bytes"),
      expect: z.instanceof(Uint8Array).refine((b) => b.length >= 1 && b.length <= 4096, "expected 1-4096 bytes"),
    },
    { error: "required" },
  ),
  lowMib: z.number().int().min(0).max(MAX_MEMORY_MIB),
  highMib: z.number().int().min(0).max(MAX_MEMORY_MIB),
  attempts: z.number().int().min(0).max(10),
}).refine((r) => r.highMib === 0 || r.lowMib <= r.highMib, { path: ["lowMib"], message: "must not exceed high_mib" });

// Map fields: the segment after one of these is a user's key and stays as typed.
const MAP_FIELDS = new Set(["env", "labels", "labelSelector"]);

/** Turns camelCase zod paths into the proto's snake_case field names. */
function fieldPath(path: PropertyKey[]): string {
  return path.map((p, i) => {
    if (typeof p === "number") return `[${p}]`;
    if (i > 0 && MAP_FIELDS.has(String(path[i - 1]))) return `.${String(p)}`;
    return `.${String(p).replace(/[A-Z]/g, (c) => "_" + c.toLowerCase())}`;
  }).join("").replace(/^\./, "") || "request";
}

/** Parses `input` with `schema` or throws InvalidArgumentError naming the first bad field. */
export function validate<T>(schema: z.ZodType<T>, input: unknown): T {
  const r = schema.safeParse(input);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  throw new InvalidArgumentError(fieldPath(issue.path), issue.message);
}
