#!/usr/bin/env bash
# Installs what flexcapd and its tests need on a Debian 12 instance (run as root), then
# builds capsule-init and the capsule kernel. Idempotent: already-installed packages, an
# up-to-date capsule-init and a cached kernel are left alone, so every `deno task` that
# needs the host can call it cheaply (the first kernel build takes a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86   # the VMM (microvm machine, TCG fallback)
  busybox-static    # demo app (httpd) and test apps
  redis-server      # a real dynamically linked test app
  python3-grpcio python3-grpc-tools  # the other-language client test
  musl-tools nanopb libnanopb-dev protobuf-compiler make  # capsule-init
  erofs-utils       # read-only root disks of capsule images
  nftables          # the capsule network's `inet flexcap` table
  openssl           # `flexcapd certs`: the cluster CA and node certificates
  cpio kmod iproute2 curl
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup-host: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup-host: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  # Debian starts redis-server as a service on install; flexcapd only needs the binary.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
fi

make -s -C capsule-os/init >&2
# The capsule kernel (capsule-os/kernel): built once, cached under the cache dir by its config's hash.
bash capsule-os/kernel/build.sh >/dev/null
