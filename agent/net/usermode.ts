/**
 * The user-mode (QEMU slirp) network backend: no root needed, capsules reach out through
 * QEMU, and declared ports are forwarded from the instance's host address. Kept as the
 * rootless/dev backend once the bridge backend exists.
 */
import { FailedPreconditionError } from "../errors.ts";
import type { PortMapping } from "../capsule/types.ts";

/** Guest addressing slirp hands out; capsule-init configures it statically. */
export const USERMODE_GUEST = { addressCidr: "10.0.2.15/24", gateway: "10.0.2.2", dns: "10.0.2.3" };

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
