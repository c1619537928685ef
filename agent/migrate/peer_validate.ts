/**
 * zod schemas for PeerService requests. A peer is authenticated, not trusted: everything
 * it sends is validated like user input, and refused with INVALID_ARGUMENT naming the field.
 */
import { z } from "zod";
import { validate } from "../api/validate.ts";
import type { PrepareIncomingRequest } from "../gen/flexcap/v1/peer.ts";
import { type Arrival } from "./incoming.ts";
import { type MigrationMode, resolveOptions } from "./policy.ts";
import { CreateCapsuleSchema, MigrateCapsuleSchema } from "../api/validate.ts";

const migrationId = z.string().regex(/^m-[0-9a-f]{12}$/, "expected m- and 12 hex digits");
const digest = z.string().regex(/^sha256:[0-9a-f]{64}$/, 'expected "sha256:" and 64 hex digits');
const port = z.object({
  guestPort: z.number().int().min(1).max(65535),
  hostPort: z.number().int().min(0).max(65535),
  protocol: z.number().int().min(0).max(2),
});
const proto = (p: number): "tcp" | "udp" => p === 2 ? "udp" : "tcp";

export const CheckImageSchema = z.object({ imageId: digest });
export const CommitIncomingSchema = z.object({
  migrationId,
  waitMs: z.number().int().min(0).max(120_000),
  released: z.boolean(),
});
export const AbortIncomingSchema = z.object({ migrationId, reason: z.string().max(1000) });

const PrepareSchema = z.object({
  migrationId,
  capsule: z.object({
    id: z.string().regex(/^c-[0-9a-f]{12}$/, "expected c- and 12 hex digits"),
    name: z.string().regex(/^[a-z][a-z0-9-]{0,62}$/, "expected a capsule name"),
    imageId: digest,
    // The API's own rules, with memory and vCPUs resolved (never 0) on the source.
    spec: CreateCapsuleSchema.shape.spec.extend({
      memoryMib: z.number().int().min(1).max(1024 * 1024),
      vcpus: z.number().int().min(1).max(64),
    }),
    ip: z.string().regex(/^\d{1,3}(\.\d{1,3}){3}$/, "expected an IPv4 address"),
    prefix: z.number().int().min(8).max(30),
    mac: z.string().regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/, "expected a lowercase MAC"),
    hostPorts: z.array(port).max(64),
    listening: z.array(z.object({ port: z.number().int().min(1).max(65535), protocol: z.number().int().min(0).max(2) }))
      .max(1024),
    paused: z.boolean(),
  }, { error: "required" }).refine((c) => c.hostPorts.length === c.spec.ports.length, {
    path: ["hostPorts"],
    message: "must match spec.ports",
  }),
  options: MigrateCapsuleSchema.shape.options,
});

/** Validates a PrepareIncoming into an Arrival. */
export function parseArrival(req: PrepareIncomingRequest, mode: MigrationMode, graceMs: number): Arrival {
  const r = validate(PrepareSchema, req);
  const c = r.capsule;
  return {
    migrationId: r.migrationId,
    capsule: {
      id: c.id,
      name: c.name,
      imageId: c.imageId,
      spec: { ...c.spec, ports: c.spec.ports.map((p) => ({ ...p, protocol: proto(p.protocol) })) },
      net: {
        ip: c.ip,
        prefix: c.prefix,
        mac: c.mac,
        hostPorts: c.hostPorts.map((p) => ({ ...p, protocol: proto(p.protocol) })),
      },
      listening: c.listening.map((l) => ({ port: l.port, protocol: proto(l.protocol) })),
      paused: c.paused,
    },
    options: resolveOptions(r.options, mode, graceMs),
  };
}
