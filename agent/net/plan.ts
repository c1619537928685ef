/**
 * The bridge network's addressing, derived from config and checked once: cluster CIDR,
 * this agent's slice of it, the anycast gateway and the DNS server capsules are given.
 */
import type { Config } from "../config/schema.ts";
import { InvalidArgumentError } from "../errors.ts";
import { type Cidr, contains, formatCidr, formatIp, parseCidr, parseIp, subnet, within } from "./cidr.ts";

/** Everything the bridge backend needs to know about addresses. */
export interface BridgePlan {
  bridge: string;
  cluster: Cidr;
  slice: Cidr;
  gateway: string;
  gatewayMac: string;
  dns: string;
  portRange: [number, number];
}

/** Builds and checks the plan; errors name the config key at fault. */
export function bridgePlan(net: Config["network"], resolvConf = readResolvConf()): BridgePlan {
  const cluster = field("network.cluster_cidr", () => parseCidr(net.cluster_cidr));
  if (cluster.prefix > 28) throw new InvalidArgumentError("network.cluster_cidr", "must be /28 or larger");
  const slice = net.slice !== undefined
    ? field("network.slice", () => parseCidr(net.slice!))
    : field("network.node_index", () => subnet(cluster, net.slice_prefix, net.node_index));
  if (!within(slice, cluster)) {
    throw new InvalidArgumentError("network.slice", `${formatCidr(slice)} is not inside ${formatCidr(cluster)}`);
  }
  const gw = net.gateway !== undefined ? field("network.gateway", () => parseIp(net.gateway!)) : cluster.base + 1;
  if (!contains(cluster, gw) || gw === cluster.base) {
    throw new InvalidArgumentError(
      "network.gateway",
      `${formatIp(gw)} is not a host address of ${formatCidr(cluster)}`,
    );
  }
  const dns = net.dns ?? firstNameserver(resolvConf) ?? "";
  if (dns !== "") field("network.dns", () => parseIp(dns));
  return {
    bridge: net.bridge,
    cluster,
    slice,
    gateway: formatIp(gw),
    gatewayMac: net.gateway_mac,
    dns,
    portRange: net.port_range,
  };
}

function field<T>(name: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new InvalidArgumentError(name, (err as Error).message);
  }
}

function readResolvConf(): string {
  try {
    return Deno.readTextFileSync("/etc/resolv.conf");
  } catch {
    return "";
  }
}

/** The first IPv4 nameserver that is not loopback (a capsule cannot reach the host's stub resolver). */
export function firstNameserver(text: string): string | undefined {
  for (const line of text.split("\n")) {
    const m = /^\s*nameserver\s+(\d+\.\d+\.\d+\.\d+)\s*$/.exec(line);
    if (m && !m[1].startsWith("127.")) return m[1];
  }
  return undefined;
}
