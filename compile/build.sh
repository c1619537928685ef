#!/usr/bin/env bash
# Builds the single flexcapd binary (and the flexcap CLI) with `deno compile`.
# deno compile needs Deno's runtime ("denort"), which it downloads from Deno's servers
# unless DENORT_BIN points at a local copy. Machines that reach only npm and Debian cannot
# download it: set DENORT_BIN, or FLEXCAP_DOWNLOAD_DENORT=1 where downloads work. Without
# either this script says so and fails rather than produce anything fake.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-dist}
mkdir -p "$out"
if [[ -z "${DENORT_BIN:-}" && "${FLEXCAP_DOWNLOAD_DENORT:-}" != 1 ]]; then
  echo "compile: DENORT_BIN is not set and FLEXCAP_DOWNLOAD_DENORT=1 is not given; no binary built." >&2
  echo "compile: set DENORT_BIN=/path/to/denort (same Deno version), or run where Deno's runtime can be downloaded" >&2
  exit 3
fi
# capsule-init and the proto descriptors travel inside the binary's virtual file system.
make -s -C capsule-os/init
deno compile -A --include capsule-os/init/build/capsule-init -o "$out/flexcapd" agent/cli/flexcapd.ts
deno compile -A -o "$out/flexcap" agent/cli/flexcap.ts
"$out/flexcapd" version
