/*
 * Wire constants shared by capsule-init (guest PID 1) and flexcapd (host).
 *
 * This is the single source of truth for these values; the TypeScript side
 * mirrors them. The message schema itself lives in
 * proto/flexcap/guest/v1/guest.proto.
 */
#ifndef FLEXCAP_WIRE_H
#define FLEXCAP_WIRE_H

/* Name of the virtio-serial port carrying the OS-server protocol
 * (QEMU: -device virtserialport,name=...; guest: /sys/class/virtio-ports/X/name). */
#define FLEXCAP_OS_PORT_NAME "org.flexcap.os.0"

/* Hello.protocol_version sent by this guest. */
#define FLEXCAP_PROTOCOL_VERSION 2

/* Every frame is a 4-byte big-endian length followed by that many bytes of
 * protobuf (GuestMessage guest->host, HostMessage host->guest). */
#define FLEXCAP_FRAME_HEADER_BYTES 4

/* Largest protobuf payload accepted in one frame (header excluded). */
#define FLEXCAP_MAX_FRAME_BYTES 65536

/* QEMU fw_cfg file holding the LaunchConfig message (no length prefix):
 * -fw_cfg name=opt/org.flexcap/launch,file=... */
#define FLEXCAP_FWCFG_LAUNCH_NAME "opt/org.flexcap/launch"

/* Directory in the guest image whose *.ko files capsule-init loads, in
 * lexical order, before anything else (e.g. 10-virtio_ring.ko). */
#define FLEXCAP_MODULE_DIR "/lib/modules/flexcap"

/* Kernel command-line keys capsule-init reads from /proc/cmdline. Dotted names
 * are ignored by the kernel (taken as module parameters), so they reach no one
 * else. flexcap.ip is ADDR/PREFIX, flexcap.gw and flexcap.dns are ADDR;
 * flexcap.root is the block device (e.g. "vda") holding the app's read-only
 * erofs root, absent when the app lives in the initramfs. */
#define FLEXCAP_CMDLINE_IP "flexcap.ip"
#define FLEXCAP_CMDLINE_GW "flexcap.gw"
#define FLEXCAP_CMDLINE_DNS "flexcap.dns"
#define FLEXCAP_CMDLINE_ROOT "flexcap.root"

/* Ports.listening holds at most this many entries. */
#define FLEXCAP_MAX_LISTEN_PORTS 64

/* Log.data holds at most this many bytes. */
#define FLEXCAP_MAX_LOG_CHUNK 16384

#endif /* FLEXCAP_WIRE_H */
