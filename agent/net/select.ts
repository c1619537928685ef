/**
 * Picks and builds the network backend from config: `auto` means the bridge network when
 * running as root (it needs to create links and nftables rules), usermode otherwise.
 */
import type { CapsuleRecord } from "../capsule/types.ts";
import type { Config } from "../config/schema.ts";
import type { Logger } from "../log.ts";
import { macForCapsule } from "../vmm/qemu_args.ts";
import { BridgeNetwork } from "./bridge.ts";
import type { NetworkBackend } from "./network.ts";
import type { Redirect } from "./nft_render.ts";
import { bridgePlan } from "./plan.ts";
import { UsermodeNetwork } from "./usermode.ts";

/** Which backend `config` selects on this host, and why. */
export function chooseBackend(net: Config["network"], uid: number | null = Deno.uid()): {
  kind: "bridge" | "usermode";
  reason: string;
} {
  if (net.backend !== "auto") return { kind: net.backend, reason: "configured" };
  return uid === 0
    ? { kind: "bridge", reason: "auto: running as root" }
    : { kind: "usermode", reason: "auto: not root (bridge needs CAP_NET_ADMIN)" };
}

/**
 * Builds the backend; `records` returns the manager's records (the desired state),
 * `redirects` the host ports forwarded to other instances after migrations.
 */
export function createNetwork(
  config: Config,
  log: Logger,
  records: () => CapsuleRecord[],
  redirects: () => Redirect[] = () => [],
): { backend: NetworkBackend; reason: string } {
  const choice = chooseBackend(config.network);
  if (choice.kind === "bridge") {
    return {
      backend: new BridgeNetwork(bridgePlan(config.network), log, records, { macFor: macForCapsule, redirects }),
      reason: choice.reason,
    };
  }
  return {
    backend: new UsermodeNetwork({
      hostAddress: config.network.host_address,
      portRange: config.network.port_range,
      macFor: macForCapsule,
    }),
    reason: choice.reason,
  };
}
