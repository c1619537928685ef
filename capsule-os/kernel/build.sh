#!/usr/bin/env bash
# Builds the capsule kernel (Linux 6.1 from Debian's linux-source-6.1, tinyconfig + capsule.config,
# plus the small memory patches in patches/) once and caches it outside the repository:
#
#   ${FLEXCAP_CACHE_DIR:-/var/cache/flexcap}/kernels/capsule-<key>/
#     vmlinux      stripped ELF, PVH entry point (QEMU microvm loads it directly)
#     bzImage      the same kernel, compressed, for loaders that want the Linux boot protocol
#     config       the final .config
#     System.map   symbols (the kernel has no kallsyms: oops traces print bare addresses)
#     build.json   {source_version, key, build_seconds, vmlinux_bytes, bzimage_bytes}
#
# key = first 16 hex digits of sha256(capsule.config + build.sh + patches/*.patch + the
# linux-source-6.1 package version). The extracted source is shared and never modified: patches
# go to a hard-linked copy of it (patch(1) replaces the files it changes, breaking the link).
# A cache hit prints the path at once. Concurrent runs serialize on a lock in the cache dir; a build
# happens in a temporary dir under the cache dir and is renamed into place only when complete.
# The last line of stdout is the kernel directory; everything else goes to stderr.
#
# Usage: bash capsule-os/kernel/build.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/capsule.config"
self="$here/build.sh"
cache="${FLEXCAP_CACHE_DIR:-/var/cache/flexcap}"
kernels="$cache/kernels"
src_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
deps=(linux-source-6.1 flex bison bc libelf-dev libssl-dev build-essential xz-utils patch)

log() { printf 'capsule-kernel: %s\n' "$*" >&2; }
die() {
  printf 'capsule-kernel: error: %s\n' "$*" >&2
  exit 1
}

[[ -r "$fragment" ]] || die "config fragment $fragment not found"
shopt -s nullglob
patches=("$here"/patches/*.patch) # applied in name order (0001-…, 0002-…)
shopt -u nullglob
[[ "$(uname -m)" == x86_64 ]] || die "only x86_64 hosts are supported (this is $(uname -m))"

# --- build dependencies ----------------------------------------------------------------------
missing=()
for p in "${deps[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  ((EUID == 0)) || die "missing packages: ${missing[*]} (run as root, or: apt-get install -y ${missing[*]})"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    apt-get update >&2 || die "apt-get update failed"
    apt-get install -y --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
  fi
fi
[[ -r "$tarball" ]] || die "$tarball not found although $src_pkg is installed"
version="$(dpkg-query -W -f='${Version}' "$src_pkg")"
[[ -n "$version" ]] || die "cannot read the version of $src_pkg"

# --- cache key -------------------------------------------------------------------------------
key="$({
  cat "$fragment"
  printf '\0'
  cat "$self"
  for p in "${patches[@]}"; do
    printf '\0%s\0' "$(basename "$p")"
    cat "$p"
  done
  printf '\0%s' "$version"
} | sha256sum | cut -c1-16)"
out="$kernels/capsule-$key"
if [[ -f "$out/build.json" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$kernels" || die "cannot create $kernels"
exec 9>"$kernels/.lock" || die "cannot open $kernels/.lock"
if ! flock -n 9; then
  log "waiting for another build (lock $kernels/.lock)"
  flock 9
fi
if [[ -f "$out/build.json" ]]; then # built by the run we waited for
  echo "$out"
  exit 0
fi
# Temporary dirs of builds that were killed (every build holds the lock while it has any).
rm -rf "$kernels"/.capsule-*.?????? "$kernels"/.src-*.??????

# --- source tree, extracted once per package version and shared by all builds -------------------
src="$kernels/src-$version"
if [[ ! -f "$src/Makefile" ]]; then
  log "extracting $tarball into $src"
  rm -rf "$src"
  t="$(mktemp -d "$kernels/.src-$version.XXXXXX")"
  tar -xJf "$tarball" -C "$t" || {
    rm -rf "$t"
    die "extracting $tarball failed"
  }
  [[ -f "$t/linux-source-6.1/Makefile" ]] || {
    rm -rf "$t"
    die "$tarball has no linux-source-6.1/Makefile"
  }
  mv "$t/linux-source-6.1" "$src"
  rmdir "$t"
fi

# --- configure and build out of tree, in a temporary dir -------------------------------------
tmp="$(mktemp -d "$kernels/.capsule-$key.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
obj="$tmp/obj"
stage="$tmp/capsule-$key"
mkdir -p "$obj" "$stage"
build_src="$src"
if ((${#patches[@]})); then
  build_src="$tmp/src"
  cp -al "$src" "$build_src" || die "cannot hard-link $src to $build_src"
  for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$build_src" -p1 --forward --no-backup-if-mismatch --quiet <"$p" >&2 ||
      die "patch $p does not apply to linux-source-6.1 $version"
  done
fi
mk=(make -C "$build_src" O="$obj" ARCH=x86_64)
jobs="$(nproc)"
start=$(date +%s)

log "configuring in $obj (tinyconfig + $(basename "$fragment"))"
"${mk[@]}" tinyconfig >&2 || die "make tinyconfig failed"
"$build_src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment" >&2 ||
  die "merge_config.sh failed"
"${mk[@]}" olddefconfig >&2 || die "make olddefconfig failed"

# Every option the fragment sets must have exactly that value in the final .config
# ("is not set" also matches an option that is absent because its dependencies are off).
mismatches=()
while IFS= read -r line; do
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    name="${BASH_REMATCH[1]}" want="${BASH_REMATCH[2]}"
    got="$(grep -E "^$name=" "$obj/.config" | tail -n1 | cut -d= -f2- || true)"
    [[ -n "$got" ]] || got="(not set)"
    [[ "$got" == "$want" ]] || mismatches+=("$name: fragment $want, final $got")
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
    name="${BASH_REMATCH[1]}"
    got="$(grep -E "^$name=" "$obj/.config" | tail -n1 | cut -d= -f2- || true)"
    [[ -z "$got" ]] || mismatches+=("$name: fragment (not set), final $got")
  fi
done <"$fragment"
if ((${#mismatches[@]})); then
  printf 'capsule-kernel: error: %d option(s) of %s did not survive olddefconfig\n' \
    "${#mismatches[@]}" "$fragment" >&2
  printf '  %s\n' "${mismatches[@]}" >&2
  exit 1
fi

log "building with -j$jobs (logs follow on stderr)"
"${mk[@]}" -j"$jobs" vmlinux bzImage >&2 || die "kernel build failed (see the make output above)"
build_seconds=$(($(date +%s) - start))

strip -o "$stage/vmlinux" "$obj/vmlinux" || die "strip vmlinux failed"
cp "$obj/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$obj/.config" "$stage/config"
cp "$obj/System.map" "$stage/System.map"
vmlinux_bytes=$(stat -c %s "$stage/vmlinux")
bzimage_bytes=$(stat -c %s "$stage/bzImage")
printf '{"source_version":"%s","key":"%s","build_seconds":%d,"vmlinux_bytes":%d,"bzimage_bytes":%d}\n' \
  "$version" "$key" "$build_seconds" "$vmlinux_bytes" "$bzimage_bytes" >"$stage/build.json"

rm -rf "$out" # a leftover without build.json (cannot normally happen: the rename below is atomic)
mv "$stage" "$out"
log "built in ${build_seconds}s: vmlinux $vmlinux_bytes bytes, bzImage $bzimage_bytes bytes"
echo "$out"
