/**
 * The agent's configuration: one zod schema for the config file and the flags that
 * override it. Keys are snake_case in the file; defaults are explained where set.
 */
import { z } from "zod";

/** `unix:/path` or `tcp:host:port`. */
const apiAddress = z.string().regex(/^(unix:\/.+|tcp:[^:]+:\d{1,5})$/, {
  message: 'expected "unix:/abs/path" or "tcp:HOST:PORT"',
});

// DNS-label style: it is a certificate name and appears in logs and events.
const nodeName = z.string().regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, {
  message: "expected 1-63 lowercase letters, digits and '-'",
});

function defaultNodeName(): string {
  const h = Deno.hostname().toLowerCase().split(".")[0].replace(/[^a-z0-9-]/g, "-").replace(/^-+|-+$/g, "");
  return h.slice(0, 63) || "node";
}

export const ConfigSchema = z.strictObject({
  // Everything the agent persists lives here (specs, states, images, sockets).
  // No ',' or quotes: paths end up inside QEMU option strings.
  state_dir: z.string().regex(/^\/[^,'"\\]*$/, { message: "expected an absolute path without , ' \" or \\" })
    .default("/var/lib/flexcap"),
  // Root-only unix socket by default: the local API is as powerful as root.
  api: apiAddress.default("unix:/run/flexcap/flexcapd.sock"),
  // Mode of the API unix socket.
  api_socket_mode: z.number().int().min(0).max(0o777).default(0o600),
  // Required for tcp: listeners; ca makes the server demand client certificates.
  tls: z.strictObject({ cert: z.string(), key: z.string(), ca: z.string().optional() }).optional(),
  // auto: KVM only where hardware virtualisation is usable, else TCG.
  accelerator: z.enum(["auto", "kvm", "tcg"]).default("auto"),
  // One named CPU model for the whole cluster so capsules can migrate between instance types.
  // Westmere-v1: x86-64-v2 (SSE4.2, POPCNT, AES) that TCG emulates without warnings; +rdrand
  // lets the capsule kernel seed its RNG at once (without it getrandom() blocks ~2.6 s under TCG).
  cpu_model: z.string().regex(/^[A-Za-z0-9_.,=+-]+$/).default("Westmere-v1,+rdrand"),
  qemu_binary: z.string().default("qemu-system-x86_64"),
  // TCG translation cache per capsule; QEMU's 1 GiB default lets RSS balloon for tiny guests.
  tcg_tb_size_mib: z.number().int().min(1).max(2048).default(64),
  memory: z.strictObject({
    // 1.0: never promise capsules more guest RAM than the instance has.
    overcommit_ratio: z.number().positive().max(16).default(1.0),
    // Left for the host, the agent and QEMU's own overhead.
    reserve_mib: z.number().int().min(0).default(512),
  }).default({ overcommit_ratio: 1.0, reserve_mib: 512 }),
  network: z.strictObject({
    // auto: the bridge backend when running as root, else usermode (QEMU slirp, for rootless dev).
    backend: z.enum(["auto", "bridge", "usermode"]).default("auto"),
    // usermode only: where slirp binds forwarded ports; loopback keeps dev capsules private.
    host_address: z.string().default("127.0.0.1"),
    // Range for host_port 0 ("auto").
    port_range: z.tuple([z.number().int().min(1024).max(65535), z.number().int().min(1024).max(65535)])
      .default([20000, 29999]),
    // Bridge backend.
    bridge: z.string().regex(/^[a-z][a-z0-9]{0,7}$/, { message: "expected 1-8 lowercase letters/digits" })
      .default("fc0"),
    // Capsule addresses of the whole cluster; every agent must be configured with the same value.
    cluster_cidr: z.string().default("10.200.0.0/16"),
    // The anycast gateway: the same address and MAC on every instance, so a capsule that moves
    // keeps its route and ARP entry. Default: the first address of cluster_cidr.
    gateway: z.string().optional(),
    gateway_mac: z.string().regex(/^02(:[0-9a-f]{2}){5}$/, {
      message: "expected a locally administered unicast MAC 02:xx:xx:xx:xx:xx (lowercase)",
    }).default("02:fc:00:00:00:01"),
    // This agent's own slice of cluster_cidr: `slice` as a CIDR, or slice number `node_index`
    // of size /slice_prefix. Slices must not overlap between agents.
    slice: z.string().optional(),
    node_index: z.number().int().min(0).default(0),
    slice_prefix: z.number().int().min(8).max(30).default(24),
    // DNS server handed to capsules; default: the first non-loopback nameserver of /etc/resolv.conf.
    dns: z.string().optional(),
  }).prefault({}),
  // This agent's name in the cluster: the name in its peer certificate. Default: the host name.
  node_name: nodeName.default(() => defaultNodeName()),
  // Agent-to-agent API (PeerService) with mutual TLS under the cluster CA (`flexcapd certs`).
  peering: z.strictObject({
    // Where PeerService listens, "tcp:HOST:PORT".
    listen: z.string().regex(/^tcp:[^:]+:\d{1,5}$/, { message: 'expected "tcp:HOST:PORT"' }),
    // This node's certificate and key (issued for node_name) and the cluster CA.
    cert: z.string().startsWith("/"),
    key: z.string().startsWith("/"),
    ca: z.string().startsWith("/"),
    // The other agents; only these names may call PeerService here.
    peers: z.array(z.strictObject({
      name: nodeName,
      // host:port of the peer's peering listener.
      address: z.string().regex(/^[^:\s]+:\d{1,5}$/, { message: 'expected "HOST:PORT"' }),
    })).max(256).default([]),
    // Where migration data connections are accepted (TLS, same certificate), "tcp:HOST:PORT";
    // default: the peering host, port + 1. Port 0 picks a free one.
    data_listen: z.string().regex(/^tcp:[^:]+:\d{1,5}$/, { message: 'expected "tcp:HOST:PORT"' }).optional(),
  }).optional(),
  // Live migration.
  migration: z.strictObject({
    // How long a source keeps forwarding a migrated capsule's host ports to its new instance.
    grace_ms: z.number().int().min(0).max(86_400_000).default(30_000),
    // Command run at switchover with JSON about the move on stdin (update DNS, a load balancer…);
    // argv, no shell. Empty: none.
    hook: z.array(z.string()).default([]),
    // The hook is waited for at most this long (the guest is stopped meanwhile).
    hook_timeout_ms: z.number().int().min(0).max(60_000).default(2_000),
  }).prefault({}),
  // How long a guest gets to power off before QEMU is killed.
  stop_grace_ms: z.number().int().min(0).max(600_000).default(10_000),
  // Where downloaded kernels are cached (outside the state dir: shared, re-creatable).
  cache_dir: z.string().startsWith("/").default("/var/cache/flexcap"),
  log_level: z.enum(["debug", "info", "warn", "error"]).default("info"),
});

export type Config = z.infer<typeof ConfigSchema>;
