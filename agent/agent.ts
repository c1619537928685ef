/**
 * Composition root: builds every part of flexcapd from a Config and starts serving.
 * Start-up order matters: state dir lock → stores → reconcile capsules → listen.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { agentService } from "./api/agent_service.ts";
import { capsuleService } from "./api/capsule_service.ts";
import { imageService } from "./api/image_service.ts";
import { type ApiServer, startServer } from "./api/server.ts";
import { memoryBudget } from "./capsule/capacity.ts";
import { EventBus } from "./capsule/events.ts";
import { CapsuleManager } from "./capsule/manager.ts";
import { CapsuleStore } from "./capsule/store.ts";
import { QEMU_STATES } from "./capsule/states.ts";
import { QemuVm } from "./vmm/vm.ts";
import { createNetwork } from "./net/select.ts";
import type { PeerInfo } from "./gen/flexcap/v1/peer.ts";
import { type PeerServer, peerService, startPeerServer } from "./migrate/peer_server.ts";
import { Peers } from "./migrate/peers.ts";
import { activeFailpoints } from "./migrate/failpoints.ts";
import { Forwards } from "./migrate/forwards.ts";
import { Arrivals } from "./migrate/incoming.ts";
import { OutcomeStore } from "./migrate/outcomes.ts";
import { Departures } from "./migrate/outgoing.ts";
import { chooseMode } from "./migrate/policy.ts";
import { DataListener } from "./migrate/relay.ts";
import type { Config } from "./config/schema.ts";
import { FailedPreconditionError, UnavailableError } from "./errors.ts";
import { ImageCatalog } from "./image/catalog.ts";
import { defaultCapsuleKernelBuild, hostKernelArgs } from "./image/kernels.ts";
import { ImageStore } from "./image/store.ts";
import { type Logger, setLogLevel } from "./log.ts";
import { VERSION } from "./version.ts";
import { chooseAccelerator, probeHost } from "./vmm/accel.ts";
import { qemuVersion } from "./vmm/process.ts";

/** Where capsule-init is found: FLEXCAP_CAPSULE_INIT, else the repo's build output. */
export function defaultCapsuleInit(): string {
  return Deno.env.get("FLEXCAP_CAPSULE_INIT") ??
    fileURLToPath(new URL("../capsule-os/init/build/capsule-init", import.meta.url));
}

/** A running agent. */
export interface RunningAgent {
  manager: CapsuleManager;
  server: ApiServer;
  stop(): Promise<void>;
}

/** Starts flexcapd with `config`. */
export async function startAgent(config: Config, log: Logger): Promise<RunningAgent> {
  setLogLevel(config.log_level);
  await Deno.mkdir(config.state_dir, { recursive: true, mode: 0o700 });
  const lock = await lockStateDir(config.state_dir);
  const accel = chooseAccelerator(config.accelerator, probeHost());
  const budget = memoryBudget(config.memory.overcommit_ratio, config.memory.reserve_mib);
  const qemu = await qemuVersion(config.qemu_binary);
  log.info("flexcapd starting", {
    version: VERSION,
    stateDir: config.state_dir,
    accelerator: accel.accelerator,
    why: accel.reason,
    qemu,
    allocatableMib: budget.allocatableMib,
  });

  const images = new ImageStore(config.state_dir);
  await images.open();
  const bus = new EventBus();
  const hostCmdline = hostKernelArgs(accel.accelerator);
  // deno-lint-ignore prefer-const
  let manager: CapsuleManager;
  const catalog = new ImageCatalog(images, {
    cacheDir: config.cache_dir,
    capsuleInit: defaultCapsuleInit(),
    kernelBuild: defaultCapsuleKernelBuild(),
    log: log.with({ component: "image" }),
    usersOf: (id) => manager.usersOfImage(id),
  });
  const outcomes = new OutcomeStore(config.state_dir);
  await outcomes.open();
  const forwards = new Forwards(config.state_dir, log.with({ component: "migrate" }), () => network.backend.sync());
  await forwards.open();
  const network = createNetwork(
    config,
    log,
    () => manager.list(),
    () => forwards.redirects((id) => manager.list().some((r) => r.id === id)),
  );
  const mode = chooseMode(qemu, accel.accelerator);
  // Set once peering is up; the manager's drop hook may run before (agent start-up).
  let arrivals: Arrivals | undefined;
  log.info("capsule network backend", { backend: network.backend.kind, why: network.reason });
  manager = new CapsuleManager({
    config,
    log,
    store: new CapsuleStore(config.state_dir, log),
    images,
    bus,
    accel,
    budget,
    net: network.backend,
    bootFiles: (m) => Promise.resolve({ ...catalog.bootFiles(m), hostCmdline }),
    onArrivalDropped: (rec, why) =>
      arrivals?.dropped(rec.migration!.id, rec.id, why) ??
        outcomes.put({ id: rec.migration!.id, capsuleId: rec.id, outcome: "aborted", message: why }),
  });
  await manager.open();

  const apiLog = log.with({ component: "api" });
  const peerInfo = (): PeerInfo => ({
    name: config.node_name,
    version: VERSION,
    accelerator: accel.accelerator,
    cpuModel: config.cpu_model,
    qemuVersion: qemu,
    memoryAllocatableMib: budget.allocatableMib,
    memoryFreeMib: Math.max(0, budget.allocatableMib - manager.committedMib()),
    capsules: manager.count,
  });
  let peers: Peers | undefined;
  let peerServer: PeerServer | undefined;
  let dataListener: DataListener | undefined;
  let departures: Departures | undefined;
  if (config.peering) {
    const p = config.peering;
    const peerLog = log.with({ component: "peer" });
    peers = new Peers(p.peers, p);
    const [, host, port] = /^tcp:(.+):(\d+)$/.exec(p.listen)!;
    const data = p.data_listen ? /^tcp:(.+):(\d+)$/.exec(p.data_listen)! : [p.listen, host, String(Number(port) + 1)];
    dataListener = new DataListener({ hostname: data[1], port: Number(data[2]), cert: p.cert, key: p.key }, log);
    arrivals = new Arrivals(manager, dataListener, outcomes, mode.mode, log);
    departures = new Departures({
      manager,
      peers,
      images,
      net: network.backend,
      forwards,
      bus,
      log,
      mode: mode.mode,
      nodeName: config.node_name,
      accelerator: accel.accelerator,
      cpuModel: config.cpu_model,
      qemuVersion: qemu,
      caPem: await Deno.readTextFile(p.ca),
      graceMs: config.migration.grace_ms,
      hook: config.migration.hook,
      hookTimeoutMs: config.migration.hook_timeout_ms,
    });
    peerServer = await startPeerServer(
      { ...p, peers: p.peers.map((x) => x.name) },
      peerService({
        log: peerLog,
        peers: new Set(p.peers.map((x) => x.name)),
        info: peerInfo,
        images,
        arrivals,
        mode: mode.mode,
        graceMs: config.migration.grace_ms,
      }),
      peerLog,
    );
    log.info("live migration ready", {
      mode: mode.mode,
      why: mode.why,
      dataPort: dataListener.port,
      failpoints: activeFailpoints(),
    });
    departures.recover();
  }
  const server = await startServer({
    capsule: capsuleService(manager, apiLog, departures),
    image: imageService(catalog, manager, apiLog),
    agent: agentService({
      version: VERSION,
      accelerator: accel.accelerator,
      acceleratorReason: accel.reason,
      cpuModel: config.cpu_model,
      qemuVersion: qemu,
      memoryTotalMib: budget.totalMib,
      memoryAllocatableMib: budget.allocatableMib,
      committedMib: () => manager.committedMib(),
      capsules: () => manager.count,
      nodeName: config.node_name,
      peers: () => peers?.status() ?? Promise.resolve([]),
    }, apiLog),
  }, { address: config.api, socketMode: config.api_socket_mode, tls: config.tls });
  log.info("flexcapd ready", { api: config.api, capsules: manager.count });

  return {
    manager,
    server,
    async stop() {
      await server.shutdown();
      await peerServer?.shutdown();
      await dataListener?.close();
      forwards.close();
      peers?.close();
      manager.close(); // capsules keep running; the next agent re-adopts them
      lock.close();
      log.info("flexcapd stopped; capsules left running");
    },
  };
}

// One agent per state dir: a second one would fight over QEMU sockets and records.
async function lockStateDir(stateDir: string): Promise<Deno.FsFile> {
  const f = await Deno.open(join(stateDir, "agent.lock"), { read: true, write: true, create: true, mode: 0o600 });
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      f.lock(true),
      new Promise((_, reject) => timer = setTimeout(() => reject(new Error("timeout")), 2_000)),
    ]);
  } catch {
    f.close();
    throw new UnavailableError(`state dir ${stateDir} is locked by another flexcapd`);
  } finally {
    clearTimeout(timer);
  }
  return f;
}

/**
 * Removes what the agent put on the instance outside its state dir: the nftables table,
 * every capsule tap and the bridge. Refuses while capsules run unless `force`, which
 * kills their QEMUs first. The state dir (records, images) is left for the operator.
 */
export async function uninstall(config: Config, log: Logger, opts: { force: boolean }): Promise<string[]> {
  await Deno.mkdir(config.state_dir, { recursive: true, mode: 0o700 });
  const lock = await lockStateDir(config.state_dir);
  try {
    const store = new CapsuleStore(config.state_dir, log);
    const records = await store.loadAll();
    const live = records.filter((r) => QEMU_STATES.has(r.state) && r.runtime);
    if (live.length > 0 && !opts.force) {
      throw new FailedPreconditionError(
        `capsules still run: ${live.map((r) => r.name).join(", ")}; stop them first or pass --force`,
      );
    }
    const done: string[] = [];
    for (const r of live) {
      try {
        const vm = await QemuVm.adopt(r.id, r.runtime!, store.paths(r.id).qmpSocket, log);
        await vm.quitAndWait(5_000);
        done.push(`killed qemu of ${r.name}`);
      } catch {
        // Not adoptable: its QEMU is already gone.
      }
    }
    const network = createNetwork(config, log, () => records);
    await network.backend.uninstall(records);
    done.push(`removed ${network.backend.kind} network`);
    return done;
  } finally {
    lock.close();
  }
}
