/**
 * flexcap: the command-line client of a local flexcapd.
 *
 *   flexcap [--api ADDR] [--json] capsule create NAME --image IMG [--memory MIB] [--vcpus N]
 *           [--port HOST:GUEST[/udp]]… [--env K=V]… [--label K=V]… [-- ARGS…]
 *   flexcap capsule list|get|start|stop|delete|pause|resume|save|restore|logs [-f]|console [-f] NAME
 *   flexcap capsule migrate NAME --to PEER [--max-bandwidth MIB_S] [--downtime-limit MS] [--timeout MS]
 *           [--grace MS] [--auto-converge] [--allow-postcopy]
 *   flexcap capsule cancel-migration NAME
 *   flexcap image build NAME --exec PATH [--kernel capsule|linux-vm] [--workdir DIR] [--file HOST[:GUEST]]…
 *           [--env K=V]… [--memory MIB] [--replace] [-- ARGS…]
 *   flexcap image measure NAME --port GUEST --expect TEXT [--send TEXT] [--low MIB] [--high MIB] [--attempts N]
 *   flexcap image list|get|delete NAME
 *   flexcap events [CAPSULE]
 *   flexcap info
 */
import { Buffer } from "node:buffer";
import { parseArgs } from "node:util";
import type { ServiceError } from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";
import { type Capsule, CapsuleState, type Event, EventType, LogStream, Protocol } from "../gen/flexcap/v1/capsule.ts";
import { type Image, KernelKind } from "../gen/flexcap/v1/image.ts";
import { MigrationPhase } from "../gen/flexcap/v1/migration.ts";
import { connect, DEFAULT_API, type FlexcapClient, migrate } from "./client.ts";
import { enumName, json, mib, table } from "./format.ts";

const USAGE = `usage: flexcap [--api ADDR] [--json] <noun> <verb> [args]
  capsule create NAME --image IMG [--memory MIB] [--vcpus N] [--port HOST:GUEST[/udp]]...
                      [--env K=V]... [--label K=V]... [--egress-kbps N] [--allow-from CAPSULE]... [-- ARGS...]
  capsule list [--label K=V]...
  capsule get|start|pause|resume|save|restore|delete NAME
  capsule stop NAME [--grace-ms MS]
  capsule migrate NAME --to PEER [--max-bandwidth MIB_S] [--downtime-limit MS] [--timeout MS] [--grace MS]
                   [--auto-converge] [--allow-postcopy]   live-migrate to a peer agent
  capsule cancel-migration NAME
  capsule logs NAME [-f]       the app's stdout/stderr
  capsule console NAME [-f]    the guest's serial console
  image build NAME --exec PATH [--kernel capsule|linux-vm] [--workdir DIR] [--file HOST[:GUEST]]...
                   [--env K=V]... [--memory MIB] [--replace] [-- ARGS...]
  image measure NAME --port GUEST --expect TEXT [--send TEXT] [--low MIB] [--high MIB] [--attempts N]
                   (TEXT understands \r and \n)
  image list
  image get|delete NAME
  events [CAPSULE]
  info
  peers                        configured peers as this agent sees them (mutual TLS)`;

class UsageError extends Error {}

const stateName = (s: number) => enumName(CapsuleState, s, "CAPSULE_STATE_");

function pairs(list: string[] | undefined, flag: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of list ?? []) {
    const i = item.indexOf("=");
    if (i <= 0) throw new UsageError(`${flag} expects K=V, got "${item}"`);
    out[item.slice(0, i)] = item.slice(i + 1);
  }
  return out;
}

function parsePort(s: string, i: number) {
  const m = /^(\d+):(\d+)(?:\/(tcp|udp))?$/.exec(s);
  if (!m) throw new UsageError(`--port expects HOST:GUEST[/udp] (HOST 0 = auto), got "${s}" (#${i + 1})`);
  return {
    hostPort: Number(m[1]),
    guestPort: Number(m[2]),
    protocol: m[3] === "udp" ? Protocol.PROTOCOL_UDP : Protocol.PROTOCOL_TCP,
  };
}

function capsuleRow(c: Capsule): string[] {
  // Ports marked (idle) wait for the app to listen; the others reach it now. '*': every instance address.
  const exposed = new Set(c.exposed.map((p) => `${p.hostPort}/${p.protocol}`));
  const ports = c.ports.map((p) =>
    `${c.hostAddress || "*"}:${p.hostPort}->${p.guestPort}${exposed.has(`${p.hostPort}/${p.protocol}`) ? "" : "(idle)"}`
  ).join(",");
  const memory = c.memory
    ? `${c.spec?.memoryMib}M (+${Math.round(c.memory.qemuOverheadKib / 1024)}M)`
    : `${c.spec?.memoryMib}M`;
  const listening = c.listening.map((p) => `${p.port}/${p.protocol === Protocol.PROTOCOL_UDP ? "udp" : "tcp"}`);
  return [
    c.name,
    c.id,
    stateName(c.state),
    c.network?.address.replace(/\/\d+$/, "") ?? "-",
    memory,
    c.qemuPid ? String(c.qemuPid) : "-",
    ports || "-",
    listening.join(",") || "-",
    c.stateReason,
  ];
}

function printCapsules(list: Capsule[], asJson: boolean): void {
  if (asJson) return console.log(json(list.length === 1 ? list[0] : list));
  console.log(
    table(["NAME", "ID", "STATE", "IP", "MEMORY", "PID", "PORTS", "LISTENING", "REASON"], list.map(capsuleRow)),
  );
}

function printImages(list: Image[], asJson: boolean): void {
  if (asJson) return console.log(json(list.length === 1 ? list[0] : list));
  console.log(table(
    ["NAME", "ID", "KERNEL", "ENTRYPOINT", "MEMORY", "MIN", "SIZE"],
    list.map((i) => [
      i.name,
      i.id.slice(0, 19),
      enumName(KernelKind, i.kernel, "KERNEL_KIND_"),
      i.entrypoint,
      `${i.defaultMemoryMib}M`,
      `${i.minMemoryMib}M${i.minMemoryMeasured ? "" : " (est.)"}`,
      mib(i.sizeBytes),
    ]),
  ));
}

function printEvent(e: Event, asJson: boolean): void {
  if (asJson) return console.log(JSON.stringify(e));
  const what = e.type === EventType.EVENT_TYPE_STATE_CHANGED
    ? `${stateName(e.previousState)} -> ${stateName(e.state)}`
    : enumName(EventType, e.type, "EVENT_TYPE_");
  const text = e.type === EventType.EVENT_TYPE_LOG && e.log
    ? new TextDecoder().decode(e.log.data).trimEnd()
    : e.message;
  console.log(`${e.time?.toISOString()}  ${e.capsuleName}  ${what}  ${text}`);
}

async function run(c: FlexcapClient, noun: string, verb: string | undefined, rest: string[], asJson: boolean) {
  const name = () => {
    if (!rest[0]) throw new UsageError(`${noun} ${verb} needs a NAME`);
    return rest[0];
  };
  if (noun === "info") return console.log(json(await c.agent.getAgentInfo({})));
  if (noun === "peers") {
    const peers = (await c.agent.listPeers({})).peers;
    if (asJson) return console.log(json(peers));
    return console.log(table(
      ["NAME", "ADDRESS", "ACCEL", "CPU", "FREE", "CAPSULES", "ERROR"],
      peers.map((p) => [
        p.name,
        p.address,
        p.info?.accelerator ?? "-",
        p.info?.cpuModel ?? "-",
        p.info ? `${p.info.memoryFreeMib}M` : "-",
        p.info ? String(p.info.capsules) : "-",
        p.error || "-",
      ]),
    ));
  }
  if (noun === "events") {
    const stream = c.raw.capsules.watchEvents({ capsule: verb ?? "" });
    for await (const msg of stream) printEvent(msg.event!, asJson);
    return;
  }
  if (noun === "capsule") {
    switch (verb) {
      case "create": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: {
            image: { type: "string" },
            memory: { type: "string" },
            vcpus: { type: "string" },
            port: { type: "string", multiple: true },
            env: { type: "string", multiple: true },
            label: { type: "string", multiple: true },
            "egress-kbps": { type: "string" },
            "allow-from": { type: "string", multiple: true },
          },
        });
        if (!positionals[0] || !values.image) throw new UsageError("capsule create NAME --image IMG");
        const r = await c.capsules.createCapsule({
          name: positionals[0],
          spec: {
            image: values.image,
            memoryMib: Number(values.memory ?? 0),
            vcpus: Number(values.vcpus ?? 0),
            args: positionals.slice(1),
            env: pairs(values.env, "--env"),
            labels: pairs(values.label, "--label"),
            ports: (values.port ?? []).map(parsePort),
            egressKbps: Number(values["egress-kbps"] ?? 0),
            allowFrom: values["allow-from"] ?? [],
          },
        });
        return printCapsules([r.capsule!], asJson);
      }
      case "list": {
        const { values } = parseArgs({ args: rest, options: { label: { type: "string", multiple: true } } });
        return printCapsules(
          (await c.capsules.listCapsules({ labelSelector: pairs(values.label, "--label") })).capsules,
          asJson,
        );
      }
      case "get":
        return printCapsules([(await c.capsules.getCapsule({ capsule: name() })).capsule!], asJson);
      case "start":
        return printCapsules([(await c.capsules.startCapsule({ capsule: name() })).capsule!], asJson);
      case "stop": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: { "grace-ms": { type: "string" } },
        });
        const r = await c.capsules.stopCapsule({
          capsule: positionals[0] ?? name(),
          graceMs: Number(values["grace-ms"] ?? 0),
        });
        return printCapsules([r.capsule!], asJson);
      }
      case "pause":
        return printCapsules([(await c.capsules.pauseCapsule({ capsule: name() })).capsule!], asJson);
      case "resume":
        return printCapsules([(await c.capsules.resumeCapsule({ capsule: name() })).capsule!], asJson);
      case "save": {
        const r = await c.capsules.saveCapsule({ capsule: name() });
        if (!asJson) console.error(`saved ${mib(r.stateBytes)}`);
        return printCapsules([r.capsule!], asJson);
      }
      case "restore":
        return printCapsules([(await c.capsules.restoreCapsule({ capsule: name() })).capsule!], asJson);
      case "migrate": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: {
            to: { type: "string" },
            "max-bandwidth": { type: "string" },
            "downtime-limit": { type: "string" },
            timeout: { type: "string" },
            grace: { type: "string" },
            "auto-converge": { type: "boolean" },
            "allow-postcopy": { type: "boolean" },
          },
        });
        if (!values.to) throw new UsageError("capsule migrate needs --to PEER");
        const num = (v: string | undefined, flag: string) => {
          if (v === undefined) return 0;
          if (!/^\d+$/.test(v)) throw new UsageError(`${flag} expects a whole number, got "${v}"`);
          return Number(v);
        };
        const result = await migrate(c, {
          capsule: positionals[0] ?? name(),
          targetPeer: values.to,
          options: {
            maxBandwidthMibS: num(values["max-bandwidth"], "--max-bandwidth"),
            downtimeLimitMs: num(values["downtime-limit"], "--downtime-limit"),
            timeoutMs: num(values.timeout, "--timeout"),
            gracePeriodMs: num(values.grace, "--grace"),
            autoConverge: Boolean(values["auto-converge"]),
            allowPostcopy: Boolean(values["allow-postcopy"]),
          },
        }, (p) => {
          if (!asJson) {
            console.error(
              `${enumName(MigrationPhase, p.phase, "MIGRATION_PHASE_").padEnd(10)} ${mib(p.bytesSent)} sent, ` +
                `${mib(p.bytesRemaining)} left  ${p.message}`,
            );
          }
        });
        if (asJson) return console.log(json(result));
        const ports = result.targetPorts.map((p) =>
          `${result.targetAddress}:${p.hostPort}->${p.guestPort}/${p.protocol}`
        );
        console.log(
          `migrated to ${result.targetPeer} in ${result.totalMs} ms (guest stopped ${result.gapMs} ms, ` +
            `QEMU downtime ${result.downtimeMs} ms, ${mib(result.bytes)}, ${result.mode}); ports ${
              ports.join(" ") || "none"
            }`,
        );
        return;
      }
      case "cancel-migration": {
        const r = await c.capsules.cancelMigration({ capsule: name() });
        return asJson ? console.log(json(r)) : console.error(`cancelled ${r.migrationId}`);
      }
      case "delete":
        await c.capsules.deleteCapsule({ capsule: name() });
        return asJson ? console.log("{}") : console.error(`deleted ${rest[0]}`);
      case "logs":
      case "console": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: { follow: { type: "boolean", short: "f" } },
        });
        const req = { capsule: positionals[0] ?? name(), fromStart: true, follow: Boolean(values.follow) };
        if (verb === "console") {
          for await (const msg of c.raw.capsules.streamConsole(req)) await Deno.stdout.write(msg.data);
          return;
        }
        for await (const { chunk } of c.raw.capsules.streamLogs(req)) {
          if (!chunk) continue;
          const out = chunk.stream === LogStream.LOG_STREAM_STDERR ? Deno.stderr : Deno.stdout;
          await out.write(chunk.data);
        }
        return;
      }
    }
  }
  if (noun === "image") {
    switch (verb) {
      case "build": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: {
            exec: { type: "string" },
            file: { type: "string", multiple: true },
            env: { type: "string", multiple: true },
            memory: { type: "string" },
            replace: { type: "boolean" },
            kernel: { type: "string" },
            workdir: { type: "string" },
          },
        });
        if (!positionals[0] || !values.exec) throw new UsageError("image build NAME --exec PATH");
        const kernels: Record<string, KernelKind> = {
          capsule: KernelKind.KERNEL_KIND_CAPSULE,
          "linux-vm": KernelKind.KERNEL_KIND_LINUX_VM,
        };
        const kernel = kernels[values.kernel ?? "capsule"];
        if (kernel === undefined) throw new UsageError(`--kernel expects capsule or linux-vm, got "${values.kernel}"`);
        const r = await c.images.buildImage({
          name: positionals[0],
          executable: values.exec,
          args: positionals.slice(1),
          env: pairs(values.env, "--env"),
          files: (values.file ?? []).map((f) => {
            const [hostPath, guestPath = ""] = f.split(":");
            return { hostPath, guestPath };
          }),
          defaultMemoryMib: Number(values.memory ?? 0),
          kernel,
          replace: Boolean(values.replace),
          workdir: values.workdir ?? "",
        });
        return printImages([r.image!], asJson);
      }
      case "measure": {
        const { values, positionals } = parseArgs({
          args: rest,
          allowPositionals: true,
          options: {
            port: { type: "string" },
            send: { type: "string" },
            expect: { type: "string" },
            low: { type: "string" },
            high: { type: "string" },
            attempts: { type: "string" },
          },
        });
        if (!positionals[0] || !values.port || !values.expect) {
          throw new UsageError("image measure NAME --port GUEST --expect TEXT");
        }
        const bytes = (t = "") => new TextEncoder().encode(t.replaceAll("\\r", "\r").replaceAll("\\n", "\n"));
        const r = await c.images.measureImage({
          image: positionals[0],
          probe: {
            guestPort: Number(values.port),
            send: Buffer.from(bytes(values.send)),
            expect: Buffer.from(bytes(values.expect)),
          },
          lowMib: Number(values.low ?? 0),
          highMib: Number(values.high ?? 0),
          attempts: Number(values.attempts ?? 0),
        });
        if (asJson) return console.log(json(r));
        for (const s of r.steps) {
          console.error(`${s.memoryMib} MiB: ${s.ok ? "ok" : "FAIL"} (${s.elapsedMs} ms) ${s.detail}`);
        }
        return printImages([r.image!], false);
      }
      case "list":
        return printImages((await c.images.listImages({})).images, asJson);
      case "get":
        return printImages([(await c.images.getImage({ image: name() })).image!], asJson);
      case "delete":
        await c.images.deleteImage({ image: name() });
        return asJson ? console.log("{}") : console.error(`deleted image ${rest[0]}`);
    }
  }
  throw new UsageError(`unknown command "${[noun, verb].filter(Boolean).join(" ")}"`);
}

async function main(argv: string[]): Promise<number> {
  // Global flags come before the noun; everything after belongs to the verb.
  let api = Deno.env.get("FLEXCAP_API") ?? DEFAULT_API;
  let asJson = false;
  let i = 0;
  for (; i < argv.length; i++) {
    if (argv[i] === "--api") api = argv[++i];
    else if (argv[i].startsWith("--api=")) api = argv[i].slice(6);
    else if (argv[i] === "--json") asJson = true;
    else if (argv[i] === "-h" || argv[i] === "--help") return (console.log(USAGE), 0);
    else break;
  }
  const [noun, verb, ...rest] = argv.slice(i);
  if (!noun) return (console.error(USAGE), 2);
  const client = connect(api);
  try {
    await run(client, noun, verb, rest, asJson);
    return 0;
  } catch (err) {
    if (err instanceof UsageError || (err as Error).name === "TypeError") {
      console.error(`flexcap: ${(err as Error).message}\n${USAGE}`);
      return 2;
    }
    const e = err as ServiceError;
    if (typeof e.code === "number") {
      console.error(`flexcap: ${status[e.code]}: ${e.details || e.message}`);
      return 1;
    }
    console.error(`flexcap: ${(err as Error).message ?? err}`);
    return 1;
  } finally {
    client.close();
  }
}

Deno.exit(await main(Deno.args));
