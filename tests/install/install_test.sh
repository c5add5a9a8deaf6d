#!/usr/bin/env bash
# Installs physr twice: the libraries of BUILD (static, or shared in a PHYSR_SHARED build),
# and a build of the other kind from SOURCE made here while the first is tested (the
# libraries only, unoptimised to keep it quick). Each goes into a scratch prefix that is then moved elsewhere (the CMake
# package and the .pc files are relocatable). For each install it builds and runs the
# consumers of CONSUMER, through find_package(physr) and through pkg-config (--static for
# the static install):
#   every_module  includes every public header and calls one function of each module
#   range_only    range lists only, linked with physr::range / pkg-config physr-range: its
#                 link line and its binary hold physr_range and physr_core and nothing
#                 else of physr, and no toml++, absl or liburcu; and once more through
#                 find_package(physr COMPONENTS range) with toml++, absl, zlib and
#                 pkg-config hidden (CMAKE_DISABLE_FIND_PACKAGE_*), which must configure,
#                 build and run, while COMPONENTS pci so hidden must fail for the static
#                 install (pci links toml++ privately) and configure for the shared one
#   one_module    once per module, with only that module's header and pkg-config physr-<module>
# Usage: install_test.sh BUILD CONSUMER CXX SOURCE
set -euo pipefail
build=$1
consumer=$2
cxx=$3
src=$4
tmp=$(mktemp -d)
trap 'wait; rm -rf "$tmp"' EXIT  # wait: for the build in the background
export PKG_CONFIG_PATH=

fail() {
  echo "install: FAIL: $*" >&2
  exit 1
}

# shellcheck disable=SC2034  # expected_NAME is read as ${!want}
expected_every_module='core size=16777216
range ranges=2 bytes=12288
pci functions=1 first=0000:00:00.0
provider found=1
iova addr=0xfffff000
iommu phys=0x5000123
physmem same=1
dma addr=0x80010000
platform verdict=bus_addr
mem pages=2
mem align=1073741824 nodev=1
model devices=1
builtin default=1
qemu argv0=qemu-system-x86_64 functions=1
sim jobs=1 machine=two-socket-switch
linux provider=0000:03:00.0'
# shellcheck disable=SC2034
expected_range_only='ranges=2 bytes=12288'

# run_and_check NAME BINARY: BINARY prints exactly what consumer NAME should.
run_and_check() {
  local name=$1 bin=$2 want out
  want=expected_$name
  out=$("$bin") || fail "$bin exited $?"
  [[ $out == "${!want}" ]] || fail "$bin printed:"$'\n'"$out"$'\n'"expected:"$'\n'"${!want}"
}

# check_range_only_link WHAT LINKLINE BINARY: the range-only consumer links physr_range and
# physr_core and nothing else of physr, nor toml++, absl or liburcu.
check_range_only_link() {
  local what=$1 line=$2 bin=$3 physr needed
  physr=$(grep -oE 'physr_[a-z]+' <<<"$line" | sort -u | tr '\n' ' ')
  [[ $physr == "physr_core physr_range " ]] || fail "$what: range-only link line holds $physr: $line"
  if grep -qiE 'toml|absl|urcu' <<<"$line"; then fail "$what: range-only link line names toml++, absl or urcu: $line"; fi
  needed=$(readelf -d "$bin" | grep NEEDED || true)
  if grep -qiE 'toml|absl|urcu' <<<"$needed"; then fail "$what: range_only needs $needed"; fi
  if grep -oE 'libphysr_[a-z]+' <<<"$needed" | grep -qvE 'libphysr_(range|core)$'; then fail "$what: range_only needs $needed"; fi
}

# consume_each_module KIND PCDIR STATIC RPATH: every module of src/CMakeLists.txt has its
# physr-<module>.pc, and one_module.cpp built for that module alone, with only what
# `pkg-config [--static] physr-<module>` gives, links and prints that module's line.
consume_each_module() {
  local kind=$1 pcdir=$2 static=$3 rpath=$4 modules m flags want out n=0
  modules=$(grep -oE 'physr_add_module\(NAME [a-z]+' "$src/src/CMakeLists.txt" | awk '{print $2}')
  [[ -n $modules ]] || fail "no physr_add_module in $src/src/CMakeLists.txt"
  for m in $modules; do
    [[ -f $pcdir/physr-$m.pc ]] || fail "$kind: module $m has no physr-$m.pc in $pcdir"
    flags=$(PKG_CONFIG_PATH=$pcdir pkg-config $static --cflags --libs "physr-$m") || fail "$kind: pkg-config $static physr-$m"
    # shellcheck disable=SC2086
    "$cxx" -DPHYSR_MODULE_$m "$consumer/one_module.cpp" -o "$tmp/pc-$m-$kind" $flags $rpath >"$tmp/log" 2>&1 ||
      { cat "$tmp/log"; fail "$kind: the $m consumer does not build with pkg-config $static physr-$m: $flags"; }
    want=$(grep -m1 "^$m " <<<"$expected_every_module") || fail "no expected line for module $m"
    out=$("$tmp/pc-$m-$kind") || fail "$kind: the $m consumer exited $?"
    [[ $out == "$want" ]] || fail "$kind: the $m consumer printed '$out', expected '$want'"
    n=$((n + 1))
  done
  # The control: a physr-iova.pc that forgets its library must fail to link.
  mkdir -p "$tmp/broken-pc-$kind" && cp "$pcdir"/*.pc "$tmp/broken-pc-$kind/"
  sed -i "s|^prefix=.*|prefix=$pcdir/../..|; s|^Libs:.*|Libs:|" "$tmp/broken-pc-$kind/physr-iova.pc"
  flags=$(PKG_CONFIG_PATH=$tmp/broken-pc-$kind pkg-config $static --cflags --libs physr-iova)
  # shellcheck disable=SC2086
  if "$cxx" -DPHYSR_MODULE_iova "$consumer/one_module.cpp" -o "$tmp/pc-broken-$kind" $flags $rpath >"$tmp/log" 2>&1; then
    fail "$kind: the iova consumer linked with a physr-iova.pc that has no Libs (the per-module check cannot fail)"
  fi
  echo "install: $kind: each of the $n modules built alone with pkg-config ${static:+$static }physr-<module> and ran; a .pc without its library fails to link"
}

# consume KIND PREFIX: builds and runs both consumers against the install in PREFIX.
consume() {
  local kind=$1 prefix=$2 cbuild line pcdir static rpath flags hidden
  cbuild=$tmp/consumer-$kind
  # find_package(physr)
  cmake -S "$consumer" -B "$cbuild" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" >"$tmp/log" 2>&1 ||
    { cat "$tmp/log"; fail "$kind: configuring the find_package consumer"; }
  cmake --build "$cbuild" >"$tmp/log" 2>&1 || { cat "$tmp/log"; fail "$kind: building the find_package consumer"; }
  run_and_check every_module "$cbuild/every_module"
  run_and_check range_only "$cbuild/range_only"
  line=$(ninja -C "$cbuild" -t commands range_only)
  check_range_only_link "$kind find_package" "${line##*$'\n'}" "$cbuild/range_only"

  # find_package(physr COMPONENTS ...) finds only what those modules need
  hidden=(-DCMAKE_DISABLE_FIND_PACKAGE_tomlplusplus=ON -DCMAKE_DISABLE_FIND_PACKAGE_absl=ON
          -DCMAKE_DISABLE_FIND_PACKAGE_ZLIB=ON -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON)
  cmake -S "$consumer" -B "$cbuild-range" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" \
        -DPHYSR_CONSUMER_COMPONENTS=range "${hidden[@]}" >"$tmp/log" 2>&1 ||
    { cat "$tmp/log"; fail "$kind: find_package(physr COMPONENTS range) asks for a package range does not need"; }
  cmake --build "$cbuild-range" >"$tmp/log" 2>&1 || { cat "$tmp/log"; fail "$kind: building the COMPONENTS range consumer"; }
  run_and_check range_only "$cbuild-range/range_only"
  if cmake -S "$consumer" -B "$cbuild-pci" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" \
           -DPHYSR_CONSUMER_COMPONENTS=pci "${hidden[@]}" >"$tmp/log" 2>&1; then
    [[ $kind == shared ]] || fail "$kind: find_package(physr COMPONENTS pci) configured without toml++"
  else
    [[ $kind == static ]] || { cat "$tmp/log"; fail "$kind: find_package(physr COMPONENTS pci) needs an external package"; }
    grep -q tomlplusplus "$tmp/log" || { cat "$tmp/log"; fail "$kind: COMPONENTS pci failed, but not for toml++"; }
  fi

  # pkg-config: physr (every module) and physr-range
  pcdir=$(dirname "$(ls "$prefix"/lib*/pkgconfig/physr.pc)")
  static=""
  rpath=""
  if [[ $kind == static ]]; then
    static=--static
  else
    rpath="-Wl,-rpath,$(PKG_CONFIG_PATH=$pcdir pkg-config --variable=libdir physr-core)"
  fi
  flags=$(PKG_CONFIG_PATH=$pcdir pkg-config $static --cflags --libs physr)
  # shellcheck disable=SC2086
  "$cxx" "$consumer/every_module.cpp" -o "$tmp/pc-every_module-$kind" $flags $rpath || fail "$kind: pkg-config $static physr: $flags"
  run_and_check every_module "$tmp/pc-every_module-$kind"
  flags=$(PKG_CONFIG_PATH=$pcdir pkg-config $static --cflags --libs physr-range)
  # shellcheck disable=SC2086
  "$cxx" "$consumer/range_only.cpp" -o "$tmp/pc-range_only-$kind" $flags $rpath || fail "$kind: pkg-config $static physr-range: $flags"
  run_and_check range_only "$tmp/pc-range_only-$kind"
  check_range_only_link "$kind pkg-config" "$flags" "$tmp/pc-range_only-$kind"
  consume_each_module "$kind" "$pcdir" "$static" "$rpath"
  echo "install: $kind: find_package and pkg-config ${static:+$static }consumers built and ran; range-only links physr_range and physr_core only and finds no external package"
}

# install KIND BUILD: installs BUILD into a scratch prefix, moves it to $tmp/KIND, checks
# the TLS model of libphysr_iova (initial-exec only in the static library), runs consume.
install() {
  local kind=$1 from=$2 out
  cmake --install "$from" --prefix "$tmp/stage" >/dev/null
  mv "$tmp/stage" "$tmp/$kind"
  if [[ $kind == static ]]; then
    out=$(readelf -r "$tmp"/static/lib*/libphysr_iova.a)
    grep -q GOTTPOFF <<<"$out" || fail "static libphysr_iova.a has no initial-exec TLS"
  else
    out=$(readelf -d "$tmp"/shared/lib*/libphysr_iova.so)
    if grep -q STATIC_TLS <<<"$out"; then fail "libphysr_iova.so uses initial-exec TLS, which a shared library must not"; fi
  fi
  consume "$kind" "$tmp/$kind"
}

# BUILD as it is, and the other kind: the libraries alone, built here meanwhile.
if [[ -n $(ls "$build"/src/libphysr_core.so* 2>/dev/null) ]]; then
  kind=shared other=static shared=OFF
else
  kind=static other=shared shared=ON
fi
start=$SECONDS
(cmake -S "$src" -B "$tmp/$other-build" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DPHYSR_SHARED=$shared \
       -DPHYSR_BUILD_TESTS=OFF -DPHYSR_BUILD_BENCH=OFF -DPHYSR_BUILD_TOOLS=OFF &&
   cmake --build "$tmp/$other-build" -j "$(nproc)") >"$tmp/other-build.log" 2>&1 &
other_build=$!
install "$kind" "$build"
wait "$other_build" || { cat "$tmp/other-build.log"; fail "building the $other libraries"; }
echo "install: $other libraries built in $((SECONDS - start)) s (beside the $kind consumers)"
install "$other" "$tmp/$other-build"
