#!/usr/bin/env bash
# Installs physr into a scratch prefix and builds a consumer against it with find_package
# and with pkg-config.
set -eu
build=$1
consumer=$2
cxx=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S "$consumer" -B "$tmp/cbuild" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/cbuild" >/dev/null
"$tmp/cbuild/consumer" | grep -q '^ranges=2 bytes=12288$'
libdir=$(ls -d "$tmp"/prefix/lib*/pkgconfig | head -1)
flags=$(PKG_CONFIG_PATH="$libdir" pkg-config --define-variable=prefix="$tmp/prefix" --cflags --libs physr)
# shellcheck disable=SC2086
"$cxx" "$consumer/main.cpp" -o "$tmp/pc_consumer" $flags
"$tmp/pc_consumer" | grep -q '^ranges=2 bytes=12288$'
echo "install: find_package and pkg-config consumers built and ran"
