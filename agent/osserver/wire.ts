/**
 * Wire constants of the OS-server channel. They mirror capsule-os/include/flexcap_wire.h;
 * test/agent/osserver/wire_test.ts checks the two agree.
 */

/** Version both sides must speak. */
export const PROTOCOL_VERSION = 2;
/** Largest frame payload either side accepts. */
export const MAX_FRAME_BYTES = 65536;
/** virtio-serial port name. */
export const CHANNEL_PORT_NAME = "org.flexcap.os.0";
/** fw_cfg file with the LaunchConfig. */
export const LAUNCH_FW_CFG_NAME = "opt/org.flexcap/launch";
/** Kernel command-line keys capsule-init reads. */
export const CMDLINE_IP = "flexcap.ip";
export const CMDLINE_GW = "flexcap.gw";
export const CMDLINE_DNS = "flexcap.dns";
export const CMDLINE_ROOT = "flexcap.root";
/** Most entries a Ports message may carry. */
export const MAX_LISTEN_PORTS = 64;
/** Most bytes one Log chunk may carry. */
export const MAX_LOG_CHUNK = 16384;
