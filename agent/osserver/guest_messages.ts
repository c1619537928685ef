/**
 * Validation of what a guest says. Decoded protobuf is only well-typed, not sane: a
 * hostile guest can send 10^5 ports, port 0 or unknown enum values. Every message that
 * reaches the rest of the agent passes a zod schema here first.
 */
import { z } from "zod";
import { LogStream, Protocol } from "../gen/flexcap/guest/v1/guest.ts";
import { MAX_LISTEN_PORTS, MAX_LOG_CHUNK } from "./wire.ts";

/** A port the guest listens on, as the agent uses it. */
export interface GuestPort {
  port: number;
  protocol: "tcp" | "udp";
}

/** A chunk of app output. */
export interface GuestLog {
  stream: "stdout" | "stderr";
  data: Uint8Array;
}

const PortSchema = z.object({
  port: z.number().int().min(1).max(65535),
  protocol: z.union([z.literal(Protocol.PROTOCOL_TCP), z.literal(Protocol.PROTOCOL_UDP)]),
});

const PortsSchema = z.object({ listening: z.array(PortSchema).max(MAX_LISTEN_PORTS) });

const LogSchema = z.object({
  stream: z.union([z.literal(LogStream.LOG_STREAM_STDOUT), z.literal(LogStream.LOG_STREAM_STDERR)]),
  data: z.instanceof(Uint8Array).refine((d) => d.length > 0 && d.length <= MAX_LOG_CHUNK, {
    message: `must be 1-${MAX_LOG_CHUNK} bytes`,
  }),
});

/** Outcome of validating one message: the clean value or why it was refused. */
export type Checked<T> = { ok: true; value: T } | { ok: false; error: string };

function describe(err: z.ZodError): string {
  const i = err.issues[0];
  return `${i.path.join(".") || "message"}: ${i.message}`;
}

/** Validates a Ports message into a sorted, duplicate-free list. */
export function checkPorts(msg: unknown): Checked<GuestPort[]> {
  const r = PortsSchema.safeParse(msg);
  if (!r.success) return { ok: false, error: describe(r.error) };
  const seen = new Map<string, GuestPort>();
  for (const p of r.data.listening) {
    const protocol = p.protocol === Protocol.PROTOCOL_TCP ? "tcp" : "udp";
    seen.set(`${protocol}/${p.port}`, { port: p.port, protocol });
  }
  return { ok: true, value: sortPorts([...seen.values()]) };
}

/** Validates a Log message. */
export function checkLog(msg: unknown): Checked<GuestLog> {
  const r = LogSchema.safeParse(msg);
  if (!r.success) return { ok: false, error: describe(r.error) };
  return {
    ok: true,
    value: { stream: r.data.stream === LogStream.LOG_STREAM_STDOUT ? "stdout" : "stderr", data: r.data.data },
  };
}

/** Ports ordered by protocol, then number. */
export function sortPorts(ports: GuestPort[]): GuestPort[] {
  return [...ports].sort((a, b) => a.protocol.localeCompare(b.protocol) || a.port - b.port);
}

/** Ports in `next` but not in `prev`, and the reverse. */
export function diffPorts(prev: GuestPort[], next: GuestPort[]): { added: GuestPort[]; removed: GuestPort[] } {
  const key = (p: GuestPort) => `${p.protocol}/${p.port}`;
  const before = new Set(prev.map(key));
  const after = new Set(next.map(key));
  return { added: next.filter((p) => !before.has(key(p))), removed: prev.filter((p) => !after.has(key(p))) };
}
