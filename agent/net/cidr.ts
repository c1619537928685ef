/**
 * IPv4 address and CIDR arithmetic on plain numbers. Pure; used by IP allocation, the
 * config checks and the nftables renderer.
 */

/** An IPv4 network: `base` is the first address as an unsigned 32-bit number. */
export interface Cidr {
  base: number;
  prefix: number;
}

/** Parses "a.b.c.d" to an unsigned 32-bit number, or throws. */
export function parseIp(text: string): number {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (!m) throw new RangeError(`"${text}" is not an IPv4 address`);
  const octets = m.slice(1).map(Number);
  if (octets.some((o) => o > 255)) throw new RangeError(`"${text}" is not an IPv4 address`);
  return ((octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]) >>> 0;
}

/** Formats an unsigned 32-bit number as "a.b.c.d". */
export function formatIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff].join(".");
}

/** The netmask of a prefix length as a number. */
export function maskOf(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

/** Parses "a.b.c.d/n"; the address must be the network's first (no host bits set). */
export function parseCidr(text: string): Cidr {
  const [ip, len, extra] = text.split("/");
  if (len === undefined || extra !== undefined || !/^\d{1,2}$/.test(len) || Number(len) > 32) {
    throw new RangeError(`"${text}" is not an IPv4 CIDR (a.b.c.d/n)`);
  }
  const base = parseIp(ip);
  const prefix = Number(len);
  if ((base & ~maskOf(prefix)) >>> 0 !== 0) {
    throw new RangeError(`"${text}" has host bits set; did you mean ${formatIp(base & maskOf(prefix))}/${prefix}?`);
  }
  return { base, prefix };
}

/** "a.b.c.d/n". */
export function formatCidr(c: Cidr): string {
  return `${formatIp(c.base)}/${c.prefix}`;
}

/** Number of addresses in `c`. */
export function sizeOf(c: Cidr): number {
  return 2 ** (32 - c.prefix);
}

/** The last address of `c`. */
export function lastOf(c: Cidr): number {
  return (c.base + sizeOf(c) - 1) >>> 0;
}

/** True if address `ip` lies in `c`. */
export function contains(c: Cidr, ip: number): boolean {
  return ((ip & maskOf(c.prefix)) >>> 0) === c.base;
}

/** True if `inner` lies entirely within `outer`. */
export function within(inner: Cidr, outer: Cidr): boolean {
  return inner.prefix >= outer.prefix && contains(outer, inner.base);
}

/** The `index`-th subnet of length `prefix` inside `outer`, or throws if there is none. */
export function subnet(outer: Cidr, prefix: number, index: number): Cidr {
  if (prefix < outer.prefix || prefix > 32) {
    throw new RangeError(`a /${prefix} slice does not fit in ${formatCidr(outer)}`);
  }
  const count = 2 ** (prefix - outer.prefix);
  if (!Number.isInteger(index) || index < 0 || index >= count) {
    throw new RangeError(`slice ${index} is outside ${formatCidr(outer)} (it holds ${count} /${prefix} slices)`);
  }
  return { base: (outer.base + index * 2 ** (32 - prefix)) >>> 0, prefix };
}
