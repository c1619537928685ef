/**
 * Host ports: which instance port a capsule may use (its allowance, fixed when the capsule
 * is created) and which of them are exposed now (the ones the guest listens on). Pure but
 * for the default probe, which asks the kernel whether a host process holds a port.
 */
import { FailedPreconditionError } from "../errors.ts";
import type { PortMapping } from "../capsule/types.ts";
import type { GuestPort } from "../osserver/guest_messages.ts";

/** "8080/tcp" style key of a host port. */
export function portKey(port: number, protocol: string): string {
  return `${port}/${protocol}`;
}

/** True if nothing on the host holds `port` on `address` right now. */
export function isPortFree(address: string, port: number, protocol: "tcp" | "udp"): boolean {
  try {
    if (protocol === "tcp") Deno.listen({ hostname: address, port, transport: "tcp" }).close();
    else Deno.listenDatagram({ hostname: address, port, transport: "udp" }).close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Resolves host ports for a capsule: fixed ones must be free and not held by another
 * capsule, 0 takes the first free port of `range`. `held` holds "port/proto" keys in use.
 */
export function resolvePorts(
  ports: PortMapping[],
  held: Set<string>,
  address: string,
  range: [number, number],
  probe: (port: number, protocol: "tcp" | "udp") => boolean = (p, proto) => isPortFree(address, p, proto),
): PortMapping[] {
  const taken = new Set(held);
  const out: PortMapping[] = [];
  for (const [i, p] of ports.entries()) {
    if (p.hostPort !== 0) {
      const k = portKey(p.hostPort, p.protocol);
      if (taken.has(k)) {
        throw new FailedPreconditionError(`spec.ports[${i}].host_port: ${k} is held by another capsule`);
      }
      if (!probe(p.hostPort, p.protocol)) {
        throw new FailedPreconditionError(`spec.ports[${i}].host_port: ${k} is in use on ${address}`);
      }
      taken.add(k);
      out.push(p);
      continue;
    }
    let chosen = 0;
    for (let port = range[0]; port <= range[1]; port++) {
      if (!taken.has(portKey(port, p.protocol)) && probe(port, p.protocol)) {
        chosen = port;
        break;
      }
    }
    if (chosen === 0) throw new FailedPreconditionError(`spec.ports[${i}]: no free host port in ${range.join("-")}`);
    taken.add(portKey(chosen, p.protocol));
    out.push({ ...p, hostPort: chosen });
  }
  return out;
}

/** A listen the agent will not expose, and why. */
export interface Refusal {
  port: GuestPort;
  reason: string;
}

/**
 * Decides which listening guest ports get their host port: only those the allowance maps,
 * and only while no host process holds the host port (`hostBusy`; never asked for a
 * mapping that is already exposed, since then our own DNAT stands in front of it).
 */
export function decideExposure(
  listening: GuestPort[],
  allowance: PortMapping[],
  exposedNow: PortMapping[],
  hostBusy: (m: PortMapping) => boolean,
): { exposed: PortMapping[]; refused: Refusal[] } {
  const exposed: PortMapping[] = [];
  const refused: Refusal[] = [];
  const already = new Set(exposedNow.map((m) => portKey(m.hostPort, m.protocol)));
  for (const port of listening) {
    const m = allowance.find((a) => a.guestPort === port.port && a.protocol === port.protocol);
    if (!m) {
      refused.push({ port, reason: `guest port ${port.port}/${port.protocol} is not in spec.ports` });
    } else if (!already.has(portKey(m.hostPort, m.protocol)) && hostBusy(m)) {
      refused.push({ port, reason: `host port ${m.hostPort}/${m.protocol} is in use by a process on the instance` });
    } else {
      exposed.push(m);
    }
  }
  return { exposed, refused };
}
