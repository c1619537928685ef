/**
 * flexcap.v1.CapsuleService: thin handlers, one domain call each.
 */
import type { CapsuleServiceServer } from "../gen/flexcap/v1/capsule.ts";
import type { CapsuleManager } from "../capsule/manager.ts";
import type { Logger } from "../log.ts";
import { capsuleToPb, eventToPb, logChunkToPb, protocolFromPb } from "./convert.ts";
import { serverStream, unary } from "./rpc.ts";
import {
  CapsuleRefSchema,
  CreateCapsuleSchema,
  ListCapsulesSchema,
  StopCapsuleSchema,
  StreamConsoleSchema,
  StreamLogsSchema,
  validate,
  WatchEventsSchema,
} from "./validate.ts";

/** Builds the CapsuleService implementation over `m`. */
export function capsuleService(m: CapsuleManager, log: Logger): CapsuleServiceServer {
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
  };
}
