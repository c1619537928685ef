/**
 * flexcap.v1.CapsuleService: thin handlers, one domain call each.
 */
import type { CapsuleServiceServer, MigrateCapsuleResponse } from "../gen/flexcap/v1/capsule.ts";
import type { CapsuleManager } from "../capsule/manager.ts";
import type { Logger } from "../log.ts";
import {
  capsuleToPb,
  eventToPb,
  logChunkToPb,
  migrationProgressToPb,
  migrationResultToPb,
  protocolFromPb,
} from "./convert.ts";
import { FailedPreconditionError } from "../errors.ts";
import type { Departures } from "../migrate/outgoing.ts";
import { serverStream, unary } from "./rpc.ts";
import {
  CapsuleRefSchema,
  CreateCapsuleSchema,
  ListCapsulesSchema,
  MigrateCapsuleSchema,
  StopCapsuleSchema,
  StreamConsoleSchema,
  StreamLogsSchema,
  validate,
  WatchEventsSchema,
} from "./validate.ts";

/** Builds the CapsuleService implementation over `m`; `departures` is absent without peering. */
export function capsuleService(m: CapsuleManager, log: Logger, departures?: Departures): CapsuleServiceServer {
  const mig = () => {
    if (!departures) throw new FailedPreconditionError("live migration needs `peering` in this agent's config");
    return departures;
  };
  const one = async (v: ReturnType<CapsuleManager["view"]> | Promise<ReturnType<CapsuleManager["view"]>>) => ({
    capsule: capsuleToPb(await v),
  });
  const ref = (req: unknown) => validate(CapsuleRefSchema, req).capsule;
  return {
    createCapsule: unary(log, "CreateCapsule", (req) => {
      const { name, spec } = validate(CreateCapsuleSchema, req);
      return one(
        m.create(name, { ...spec, ports: spec.ports.map((p) => ({ ...p, protocol: protocolFromPb(p.protocol) })) }),
      );
    }),
    getCapsule: unary(log, "GetCapsule", (req) => one(m.view(m.resolve(ref(req))))),
    listCapsules: unary(log, "ListCapsules", (req) => {
      const { labelSelector } = validate(ListCapsulesSchema, req);
      const sel = Object.entries(labelSelector);
      const capsules = m.list().filter((r) => sel.every(([k, v]) => r.spec.labels[k] === v));
      return Promise.resolve({ capsules: capsules.map((r) => capsuleToPb(m.view(r))) });
    }),
    startCapsule: unary(log, "StartCapsule", (req) => one(m.start(ref(req)))),
    stopCapsule: unary(log, "StopCapsule", (req) => {
      const { capsule, graceMs } = validate(StopCapsuleSchema, req);
      return one(m.stop(capsule, graceMs));
    }),
    deleteCapsule: unary(log, "DeleteCapsule", async (req) => {
      await m.delete(ref(req));
      return {};
    }),
    pauseCapsule: unary(log, "PauseCapsule", (req) => one(m.pause(ref(req)))),
    resumeCapsule: unary(log, "ResumeCapsule", (req) => one(m.resume(ref(req)))),
    saveCapsule: unary(log, "SaveCapsule", async (req) => {
      const { view, stateBytes } = await m.save(ref(req));
      return { capsule: capsuleToPb(view), stateBytes };
    }),
    restoreCapsule: unary(log, "RestoreCapsule", (req) => one(m.restore(ref(req)))),
    watchEvents: serverStream(log, "WatchEvents", async function* (req, signal) {
      const { capsule } = validate(WatchEventsSchema, req);
      for await (const e of m.events(capsule, signal)) yield { event: eventToPb(e) };
    }),
    streamConsole: serverStream(log, "StreamConsole", async function* (req, signal) {
      const { capsule, fromStart, follow } = validate(StreamConsoleSchema, req);
      for await (const data of m.console(capsule, fromStart, follow, signal)) yield { data };
    }),
    streamLogs: serverStream(log, "StreamLogs", async function* (req, signal) {
      const { capsule, fromStart, follow } = validate(StreamLogsSchema, req);
      for await (const c of m.logs(capsule, fromStart, follow, signal)) yield { chunk: logChunkToPb(c) };
    }),
    // The migration belongs to the agent: a caller that goes away stops watching, not migrating.
    migrateCapsule: serverStream(log, "MigrateCapsule", async function* (req) {
      const { capsule, targetPeer, options } = validate(MigrateCapsuleSchema, req);
      const queue: MigrateCapsuleResponse[] = [];
      let wake: (() => void) | undefined;
      let finished = false;
      const run = mig().migrate(capsule, targetPeer, options, (p) => {
        queue.push({ kind: { $case: "progress", value: migrationProgressToPb(p) } });
        wake?.();
      }).then((r) => {
        queue.push({ kind: { $case: "result", value: migrationResultToPb(r) } });
      }).finally(() => {
        finished = true;
        wake?.();
      });
      run.catch(() => {});
      while (!finished || queue.length > 0) {
        if (queue.length === 0) {
          await new Promise<void>((r) => wake = r);
          wake = undefined;
          continue;
        }
        yield queue.shift()!;
      }
      await run; // rethrows the failure as the call's status
    }),
    cancelMigration: unary(log, "CancelMigration", (req) => {
      return Promise.resolve({ migrationId: mig().cancel(ref(req)) });
    }),
  };
}
