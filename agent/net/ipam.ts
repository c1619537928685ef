/**
 * Capsule IP allocation. Each agent hands out addresses from its own slice of the cluster
 * CIDR, so two agents never pick the same one. The capsule records are the lease table: an
 * address is in use exactly while a record holds it, which survives agent restarts with no
 * second file to keep in step. Pure: the caller passes the addresses in use.
 */
import { ResourceExhaustedError } from "../errors.ts";
import { type Cidr, contains, formatCidr, formatIp, lastOf, parseIp } from "./cidr.ts";

/** Where this agent may allocate and which addresses are never handed out. */
export interface IpPool {
  slice: Cidr;
  /** The cluster network: its first and last address are never capsule addresses. */
  cluster: Cidr;
  /** The anycast gateway address. */
  gateway: number;
}

/**
 * Picks a free address in the pool. `inUse` holds addresses of live records (in any
 * slice); `after` makes allocation round-robin so a just-released address is not reused
 * at once (clients and conntrack may still remember it).
 */
export function allocateIp(pool: IpPool, inUse: Iterable<string>, after?: string): string {
  const used = new Set<number>();
  for (const ip of inUse) used.add(parseIp(ip));
  const first = pool.slice.base;
  const last = lastOf(pool.slice);
  const size = last - first + 1;
  const start = after !== undefined && contains(pool.slice, parseIp(after)) ? parseIp(after) - first + 1 : 0;
  for (let i = 0; i < size; i++) {
    const ip = first + ((start + i) % size);
    if (ip === pool.gateway || ip === pool.cluster.base || ip === lastOf(pool.cluster)) continue;
    // The slice's own network and broadcast addresses stay free too: harmless, and less surprising.
    if (size > 2 && (ip === first || ip === last)) continue;
    if (!used.has(ip)) return formatIp(ip);
  }
  throw new ResourceExhaustedError(`no free capsule address in ${formatCidr(pool.slice)}`);
}
