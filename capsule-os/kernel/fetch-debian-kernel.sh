#!/bin/sh
# Fetch and unpack the Debian 12 cloud kernel used by FlexCapsule guests.
#
# Usage: fetch-debian-kernel.sh [CACHE_DIR]
#   CACHE_DIR defaults to /var/cache/flexcap/kernels/debian-cloud.
#
# Resolves the concrete package that the meta package linux-image-cloud-amd64
# depends on (e.g. linux-image-6.1.0-56-cloud-amd64), downloads it with
# `apt-get download` (the only download this script does), unpacks it with
# `dpkg-deb -x` into CACHE_DIR/<package>_<version>/ and runs `depmod -b` there
# so lib/modules/<kver>/modules.dep exists (the .deb does not ship it; the
# package's postinst normally generates it). Idempotent: a completed unpack
# (marked by a .complete file) is reused without touching the network.
#
# Prints the absolute path of the vmlinuz on stdout (everything else goes to
# stderr). The guest needs these modules from that tree, in this load order
# (all are =m in the Debian cloud config, plain uncompressed .ko files):
#   kernel/drivers/virtio/virtio_ring.ko
#   kernel/drivers/virtio/virtio.ko
#   kernel/drivers/virtio/virtio_mmio.ko     (matches ACPI id LNRO0005)
#   kernel/net/core/failover.ko
#   kernel/drivers/net/net_failover.ko
#   kernel/drivers/net/virtio_net.ko
#   kernel/drivers/char/virtio_console.ko
set -eu

CACHE=${1:-/var/cache/flexcap/kernels/debian-cloud}
META=linux-image-cloud-amd64

log() { echo "fetch-debian-kernel: $*" >&2; }

resolve_pkg() {
    apt-cache depends "$META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

PKG=$(resolve_pkg || true)
if [ -z "$PKG" ]; then
    log "apt lists do not know $META; running apt-get update"
    apt-get update >&2
    PKG=$(resolve_pkg || true)
fi
[ -n "$PKG" ] || { log "cannot resolve the package behind $META"; exit 1; }

VER=$(apt-cache policy "$PKG" | awk '$1 == "Candidate:" { print $2; exit }')
[ -n "$VER" ] && [ "$VER" != "(none)" ] || { log "no candidate version for $PKG"; exit 1; }

DEST="$CACHE/${PKG}_${VER}"
find_vmlinuz() { ls "$DEST"/boot/vmlinuz-* 2>/dev/null | head -n1; }

if [ -f "$DEST/.complete" ] && [ -n "$(find_vmlinuz)" ]; then
    log "already unpacked: $DEST"
    find_vmlinuz
    exit 0
fi

mkdir -p "$CACHE"
TMP=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM
# apt drops privileges to _apt for downloads; let it write into the temp dir.
chmod 0777 "$TMP"

log "downloading $PKG=$VER"
(cd "$TMP" && apt-get download "$PKG=$VER" >&2)
DEB=$(ls "$TMP"/*.deb | head -n1)

log "unpacking $(basename "$DEB")"
mkdir -p "$TMP/root"
dpkg-deb -x "$DEB" "$TMP/root"

KVER=$(ls "$TMP/root/lib/modules" | head -n1)
if command -v depmod >/dev/null 2>&1; then
    depmod -b "$TMP/root" "$KVER"
else
    log "warning: depmod not found (install kmod); modules.dep not generated"
fi

rm -rf "$DEST"
mv "$TMP/root" "$DEST"
touch "$DEST/.complete"
log "unpacked $PKG $VER (kernel $KVER) into $DEST"
find_vmlinuz
