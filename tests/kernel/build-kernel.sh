#!/usr/bin/env bash
# tests/kernel/build-kernel.sh OUT: builds the guest kernel of scripts/test-kernel into OUT
# (a directory outside the clone) from Debian's linux-source-6.12 and tests/kernel/kernel.config:
#   OUT/src            the extracted source tree
#   OUT/build          the O= build tree (bzImage, Module.symvers: what out-of-tree modules need)
#   OUT/done           written last: a tree without it is rebuilt from scratch
# Runs `make allnoconfig` with the fragment, merges it once more so options whose dependencies
# appeared in the first pass stick, and fails when any fragment line is not in the .config.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
frag=$here/kernel.config
tarball=/usr/src/linux-source-6.12.tar.xz
jobs=${PHYSR_KERNEL_JOBS:-2}

[[ -r $tarball ]] || { echo "build-kernel: $tarball missing (scripts/setup installs linux-source-6.12)" >&2; exit 1; }
rm -rf "$out/src" "$out/build" "$out/done"
mkdir -p "$out/src" "$out/build"
echo "build-kernel: extracting $tarball"
tar -xf "$tarball" -C "$out/src" --strip-components=1
cd "$out/src"
make -s O="$out/build" KCONFIG_ALLCONFIG="$frag" allnoconfig
scripts/kconfig/merge_config.sh -m -O "$out/build" "$out/build/.config" "$frag" >/dev/null
make -s O="$out/build" olddefconfig
missing=0
while IFS= read -r line; do
  case $line in '' | '#'*) continue ;; esac
  if ! grep -qxF "$line" "$out/build/.config"; then
    echo "build-kernel: $line did not apply (.config has: $(grep -E "^${line%%=*}=|^# ${line%%=*} is not set" "$out/build/.config" || echo nothing))" >&2
    missing=1
  fi
done <"$frag"
[[ $missing -eq 0 ]] || exit 1
echo "build-kernel: make -j$jobs bzImage modules"
nice -n 10 make -s O="$out/build" -j"$jobs" bzImage modules
touch "$out/done"
