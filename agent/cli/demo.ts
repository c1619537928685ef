/**
 * The README's demo: starts flexcapd in the background (if it is not running yet), builds
 * the busybox-httpd image, runs it as capsule "demo-web" and prints how to reach it.
 * Re-running it is safe: existing pieces are reused.
 */
import { fileURLToPath } from "node:url";
import { CapsuleSpec, CapsuleState, Protocol } from "../gen/flexcap/v1/capsule.ts";
import { connect, DEFAULT_API } from "./client.ts";
import { buildHttpdImage } from "./httpd_image.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const LOG = "/var/log/flexcap/flexcapd.log";
const NAME = "demo-web";

async function agentUp(): Promise<boolean> {
  const c = connect(DEFAULT_API);
  try {
    await Promise.race([
      c.agent.getAgentInfo({}),
      new Promise((_, r) => setTimeout(() => r(new Error("timeout")), 1000)),
    ]);
    return true;
  } catch {
    return false;
  } finally {
    c.close();
  }
}

async function startAgentInBackground(): Promise<void> {
  await Deno.mkdir("/var/log/flexcap", { recursive: true });
  // setsid: the agent outlives this demo process and the terminal it ran in.
  const cmd =
    `exec setsid "${Deno.execPath()}" run -A "${ROOT}agent/cli/flexcapd.ts" serve >>"${LOG}" 2>&1 </dev/null &`;
  await new Deno.Command("bash", { args: ["-c", cmd] }).output();
  for (let i = 0; i < 100; i++) {
    if (await agentUp()) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`flexcapd did not start; see ${LOG}`);
}

async function main(): Promise<void> {
  if (await agentUp()) console.log(`flexcapd already running on ${DEFAULT_API}`);
  else {
    console.log("starting flexcapd …");
    await startAgentInBackground();
    console.log(`flexcapd running on ${DEFAULT_API} (log: ${LOG})`);
  }
  const c = connect(DEFAULT_API);
  try {
    const images = (await c.images.listImages({})).images;
    if (!images.some((i) => i.name === "httpd")) {
      console.log("building image httpd (busybox httpd on the capsule kernel, app on a read-only disk) …");
      await buildHttpdImage(c, "httpd", "<h1>Hello from a FlexCapsule capsule</h1>\n");
    }
    const existing = (await c.capsules.listCapsules({ labelSelector: {} })).capsules.find((x) => x.name === NAME);
    if (!existing) {
      await c.capsules.createCapsule({
        name: NAME,
        spec: CapsuleSpec.fromPartial({
          image: "httpd",
          labels: { app: "demo" },
          ports: [{ guestPort: 80, hostPort: 0, protocol: Protocol.PROTOCOL_TCP }],
        }),
      });
    }
    let cap = (await c.capsules.getCapsule({ capsule: NAME })).capsule!;
    if (cap.state === CapsuleState.CAPSULE_STATE_SAVED) {
      cap = (await c.capsules.restoreCapsule({ capsule: NAME })).capsule!;
    } else if (cap.state !== CapsuleState.CAPSULE_STATE_RUNNING) {
      console.log(`starting capsule ${NAME} …`);
      cap = (await c.capsules.startCapsule({ capsule: NAME })).capsule!;
    }
    // The bridge network exposes on every instance address (hostAddress ""), loopback included.
    const url = `http://${cap.hostAddress || "127.0.0.1"}:${cap.ports[0].hostPort}/`;
    const t0 = Date.now();
    for (;;) {
      try {
        const r = await fetch(url, { signal: AbortSignal.timeout(1000) });
        console.log(
          `capsule ${NAME} (${cap.id}, ${cap.network?.address ?? "?"} on ${
            cap.network?.backend ?? "?"
          }, ${cap.spec?.memoryMib} MiB, qemu pid ${cap.qemuPid}) answered after ${Date.now() - t0} ms: ` +
            (await r.text()).trim(),
        );
        break;
      } catch {
        if (Date.now() - t0 > 120_000) throw new Error(`capsule did not answer on ${url}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    }
    console.log(`
Reach it:        curl ${url}
Inspect it:      npx -y deno@2.9.6 task flexcap capsule list
App output:      npx -y deno@2.9.6 task flexcap capsule logs ${NAME}
Guest console:   npx -y deno@2.9.6 task flexcap capsule console ${NAME}
Events:          npx -y deno@2.9.6 task flexcap events ${NAME}   (listen, log, state changes; Ctrl-C ends)
Save / restore:  npx -y deno@2.9.6 task flexcap capsule save ${NAME}   (then: capsule restore ${NAME})
Stop it:         npx -y deno@2.9.6 task flexcap capsule stop ${NAME}
Remove network:  npx -y deno@2.9.6 task flexcapd uninstall   (after stopping the agent and its capsules)`);
  } finally {
    c.close();
  }
}

await main();
