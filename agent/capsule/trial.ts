/**
 * MeasureImage: boots throw-away capsules of an image at decreasing memory sizes, probes
 * the app, and records the smallest size that worked in the image's manifest.
 */
import type { ImageCatalog } from "../image/catalog.ts";
import type { ImageInfo } from "../image/manifest.ts";
import { findMinimum, type Trial } from "../image/measure.ts";
import type { Logger } from "../log.ts";
import type { CapsuleManager } from "./manager.ts";
import { probeUntil } from "./probe.ts";

/** A validated MeasureImage request. */
export interface MeasureRequest {
  image: string;
  probe: { guestPort: number; send: Uint8Array; expect: Uint8Array };
  lowMib: number;
  highMib: number;
  attempts: number;
}

// Generous: at a marginal size a TCG guest may crawl rather than fail.
const TRIAL_TIMEOUT_MS = 60_000;
const DEFAULT_LOW_MIB = 4;

/** Bisects the image's minimum memory and records it; returns the updated image and every boot. */
export async function measureImage(
  deps: { catalog: ImageCatalog; manager: CapsuleManager; log: Logger },
  req: MeasureRequest,
): Promise<{ image: ImageInfo; steps: Trial[] }> {
  const image = await deps.catalog.get(req.image);
  const opts = {
    lowMib: req.lowMib || DEFAULT_LOW_MIB,
    highMib: req.highMib || image.manifest.defaultMemoryMib,
    attempts: req.attempts || 1,
  };
  const log = deps.log.with({ image: image.name });
  log.info("measuring image minimum memory", opts);
  const { minMib, steps } = await findMinimum(opts, async (mib) => {
    const t = await bootTrial(deps.manager, image, mib, req.probe);
    log.info("measure boot", { ...t });
    return t;
  });
  return { image: await deps.catalog.recordMinMemory(image.id, minMib), steps };
}

/** Boots one throw-away capsule of `image` with `memoryMib` and probes it; always cleans up. */
export async function bootTrial(
  manager: CapsuleManager,
  image: ImageInfo,
  memoryMib: number,
  probe: MeasureRequest["probe"],
): Promise<Trial> {
  const t0 = performance.now();
  const name = `measure-${crypto.randomUUID().slice(0, 8)}`;
  const view = await manager.create(name, {
    image: image.id,
    memoryMib,
    vcpus: 1,
    args: [],
    env: {},
    labels: { "flexcap.io/measure": image.name },
    ports: [{ guestPort: probe.guestPort, hostPort: 0, protocol: "tcp" }],
    egressKbps: 0,
    allowFrom: [],
  }, { belowImageMinimum: true });
  const id = view.record.id;
  try {
    const started = (await manager.start(id)).record;
    // On the bridge the agent reaches the guest's address directly, without waiting for exposure.
    const target = started.net?.backend === "bridge"
      ? { host: started.net.ip, port: probe.guestPort }
      : { host: started.runtime!.hostAddress, port: started.runtime!.ports[0].hostPort };
    const r = await probeUntil(
      { ...target, send: probe.send, expect: probe.expect },
      Date.now() + TRIAL_TIMEOUT_MS,
      () => manager.resolve(id).state === "running",
    );
    const elapsedMs = Math.round(performance.now() - t0);
    if (r.ok) return { memoryMib, ok: true, detail: "", elapsedMs };
    const rec = manager.resolve(id);
    const detail = rec.state === "running" ? r.detail : `${r.detail}; ${rec.stateReason}`;
    return { memoryMib, ok: false, detail, elapsedMs };
  } catch (err) {
    return { memoryMib, ok: false, detail: (err as Error).message, elapsedMs: Math.round(performance.now() - t0) };
  } finally {
    if (["running", "paused"].includes(manager.resolve(id).state)) await manager.stop(id, 500).catch(() => {});
    await manager.delete(id).catch(() => {});
  }
}
