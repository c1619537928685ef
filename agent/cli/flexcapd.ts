/**
 * flexcapd: the per-instance agent.
 *
 *   flexcapd serve [--config FILE] [--state-dir DIR] [--api unix:PATH|tcp:HOST:PORT]
 *                  [--tls-cert F --tls-key F [--tls-ca F]] [--accel auto|kvm|tcg] [--log-level L]
 *                  [--network-backend auto|bridge|usermode]
 *   flexcapd uninstall [--config FILE] [--state-dir DIR] [--force]
 *   flexcapd certs --dir DIR NAME...
 *   flexcapd version
 */
import { parseArgs } from "node:util";
import { loadConfig } from "../config/load.ts";
import { startAgent, uninstall } from "../agent.ts";
import { issueCerts } from "../migrate/pki.ts";
import { FlexError } from "../errors.ts";
import { logger } from "../log.ts";
import { VERSION } from "../version.ts";

const USAGE = `usage: flexcapd serve [--config FILE] [--state-dir DIR] [--api unix:PATH|tcp:HOST:PORT]
                     [--tls-cert FILE --tls-key FILE [--tls-ca FILE]] [--accel auto|kvm|tcg]
                     [--log-level debug|info|warn|error] [--network-backend auto|bridge|usermode]
       flexcapd uninstall [--config FILE] [--state-dir DIR] [--force]
           removes the capsule network (nftables table, taps, bridge); --force kills running capsules
       flexcapd certs --dir DIR NAME...
           makes a cluster CA in DIR (unless there) and a peer certificate for each node NAME
       flexcapd version`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: "string" },
      "state-dir": { type: "string" },
      api: { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "tls-ca": { type: "string" },
      accel: { type: "string" },
      "log-level": { type: "string" },
      "network-backend": { type: "string" },
      force: { type: "boolean" },
      dir: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  const cmd = positionals[0];
  if (values.help || !cmd) {
    console.log(USAGE);
    return cmd || values.help ? 0 : 2;
  }
  if (cmd === "version") {
    console.log(`flexcapd ${VERSION}`);
    return 0;
  }
  if (cmd === "certs") {
    if (!values.dir) {
      console.error(`flexcapd: certs needs --dir DIR\n${USAGE}`);
      return 2;
    }
    for (const f of await issueCerts(values.dir, positionals.slice(1))) console.log(f);
    return 0;
  }
  if (cmd !== "serve" && cmd !== "uninstall") {
    console.error(`flexcapd: unknown command "${cmd}"\n${USAGE}`);
    return 2;
  }
  const tls = values["tls-cert"] || values["tls-key"]
    ? { cert: values["tls-cert"], key: values["tls-key"], ca: values["tls-ca"] }
    : undefined;
  const config = await loadConfig(values.config, {
    state_dir: values["state-dir"],
    api: values.api,
    tls,
    accelerator: values.accel,
    log_level: values["log-level"],
    "network.backend": values["network-backend"],
  });
  const log = logger({ component: "flexcapd" });
  if (cmd === "uninstall") {
    for (const line of await uninstall(config, log, { force: values.force ?? false })) console.log(line);
    return 0;
  }
  const agent = await startAgent(config, log);
  const stop = async (sig: string) => {
    log.info("signal received; shutting down", { signal: sig });
    await agent.stop();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", () => void stop("SIGTERM"));
  Deno.addSignalListener("SIGINT", () => void stop("SIGINT"));
  return await new Promise<number>(() => {}); // serve until a signal
}

try {
  Deno.exit(await main(Deno.args));
} catch (err) {
  const msg = err instanceof FlexError || err instanceof TypeError ? err.message : String(err);
  console.error(`flexcapd: ${msg}`);
  Deno.exit(1);
}
