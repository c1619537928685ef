/**
 * The image manifest: what an image is made of and how to boot it. The image id is the
 * sha256 of the canonical manifest, so identical inputs give the same id.
 */
import { z } from "zod";

export const MANIFEST_VERSION = 1;
export const KERNEL_KINDS = ["capsule", "linux-vm"] as const;
export type KernelKind = typeof KERNEL_KINDS[number];

export const ManifestSchema = z.object({
  version: z.literal(MANIFEST_VERSION),
  kernel: z.enum(KERNEL_KINDS),
  /** sha256 hex of the kernel blob. */
  kernelBlob: z.string().regex(/^[0-9a-f]{64}$/),
  /** sha256 hex of the initramfs blob. */
  initrdBlob: z.string().regex(/^[0-9a-f]{64}$/),
  /** sha256 hex of the read-only erofs root disk holding the app, when it is not in the initramfs. */
  rootfsBlob: z.string().regex(/^[0-9a-f]{64}$/).optional(),
  /** Kernel command line the kernel kind needs (console, quiet…), without per-capsule parts. */
  cmdline: z.string(),
  /** microvm's ACPI setting for this kernel. */
  acpi: z.boolean(),
  entrypoint: z.string(),
  /** Directory the app starts in. */
  workdir: z.string().optional(),
  args: z.array(z.string()),
  env: z.record(z.string(), z.string()),
  defaultMemoryMib: z.number().int().positive(),
  /** Guest RAM below which the image cannot boot (kernel needs + the initramfs unpacked). */
  minMemoryMib: z.number().int().positive(),
  /** True when minMemoryMib was measured by booting the image, not estimated. */
  minMemoryMeasured: z.boolean().optional(),
  /** Paths packed besides the init, for people and tests. */
  files: z.array(z.string()),
  sizeBytes: z.number().int().nonnegative(),
});
export type ImageManifest = z.infer<typeof ManifestSchema>;

/** An image as the rest of the agent sees it. */
export interface ImageInfo {
  id: string;
  name: string;
  manifest: ImageManifest;
  createdAt: Date;
}

/** Canonical JSON (sorted keys) of a manifest, the input of its id. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

/** sha256 hex of bytes. */
export async function sha256Hex(data: Uint8Array): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The id ("sha256:…") of a manifest. */
export async function manifestId(m: ImageManifest): Promise<string> {
  return "sha256:" + await sha256Hex(new TextEncoder().encode(canonicalJson(m)));
}
