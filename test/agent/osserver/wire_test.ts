import assert from "node:assert/strict";
import * as wire from "../../../agent/osserver/wire.ts";
import { LAUNCH_FW_CFG, OS_CHANNEL_PORT } from "../../../agent/vmm/qemu_args.ts";

const header = await Deno.readTextFile(new URL("../../../capsule-os/include/flexcap_wire.h", import.meta.url));
const define = (name: string) => new RegExp(`#define ${name}\\s+(.+)`).exec(header)?.[1].trim();

Deno.test("wire constants agree between capsule-os and the agent", () => {
  assert.equal(define("FLEXCAP_OS_PORT_NAME"), JSON.stringify(wire.CHANNEL_PORT_NAME));
  assert.equal(define("FLEXCAP_FWCFG_LAUNCH_NAME"), JSON.stringify(wire.LAUNCH_FW_CFG_NAME));
  assert.equal(Number(define("FLEXCAP_PROTOCOL_VERSION")), wire.PROTOCOL_VERSION);
  assert.equal(Number(define("FLEXCAP_MAX_FRAME_BYTES")), wire.MAX_FRAME_BYTES);
  assert.equal(define("FLEXCAP_CMDLINE_IP"), JSON.stringify(wire.CMDLINE_IP));
  assert.equal(define("FLEXCAP_CMDLINE_GW"), JSON.stringify(wire.CMDLINE_GW));
  assert.equal(define("FLEXCAP_CMDLINE_DNS"), JSON.stringify(wire.CMDLINE_DNS));
  assert.equal(define("FLEXCAP_CMDLINE_ROOT"), JSON.stringify(wire.CMDLINE_ROOT));
  assert.equal(Number(define("FLEXCAP_MAX_LISTEN_PORTS")), wire.MAX_LISTEN_PORTS);
  assert.equal(Number(define("FLEXCAP_MAX_LOG_CHUNK")), wire.MAX_LOG_CHUNK);
  assert.equal(OS_CHANNEL_PORT, wire.CHANNEL_PORT_NAME);
  assert.equal(LAUNCH_FW_CFG, wire.LAUNCH_FW_CFG_NAME);
});
