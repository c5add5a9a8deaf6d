#!/usr/bin/env bash
# The layer check can fail: on fixture/ (four modules with one violation of each kind) it
# exits 1 with exactly fixture/expected.txt; on physr's own tree with a dependency taken
# out of GRAPH, or with a module made to depend on one below it in the file, it exits 1
# naming the file, line, module and header; with GRAPH as CMake wrote it, it exits 0.
# Usage: selftest.sh GRAPH ROOT
set -uo pipefail
graph=$1
root=$2
here=$(cd "$(dirname "$0")" && pwd)
check="$here/check_layers.py"
python=${PYTHON3:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect CODE PATTERN GRAPH ROOT: the checker exits CODE and prints a line matching PATTERN.
expect() {
  local code=$1 pattern=$2 out rc
  out=$("$python" "$check" "$3" "$4" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    echo "FAIL: check_layers.py $3 $4 exited $rc, expected $code"; echo "$out"; fails=$((fails + 1)); return
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: check_layers.py $3 $4 printed no line matching /$pattern/:"; echo "$out"; fails=$((fails + 1)); return
  fi
  echo "ok: exit $code, /$pattern/"
}

out=$("$python" "$check" "$here/fixture/modules.txt" "$here/fixture")
rc=$?
if [[ $rc -ne 1 ]] || ! diff <(echo "$out") "$here/fixture/expected.txt"; then
  echo "FAIL: check_layers.py on the fixture exited $rc (expected 1) or printed other than fixture/expected.txt"; fails=$((fails + 1))
else
  echo "ok: the fixture's $(($(wc -l <"$here/fixture/expected.txt") - 1)) violations, exactly"
fi

expect 0 '^layers: [0-9]+ files of [0-9]+ modules include only' "$graph" "$root"
sed -E 's/^range:.*/range: |/' "$graph" >"$tmp/no-core.txt"
expect 1 '^include/physr/range\.hpp:[0-9]+: module range includes physr/core\.hpp, a header of module core, which range does not depend on' "$tmp/no-core.txt" "$root"
{ echo "core: range |"; grep -vE '^core:' "$graph"; } >"$tmp/upward.txt"
expect 1 'module core depends on range, which is not a module above it' "$tmp/upward.txt" "$root"
grep -vE '^sim:' "$graph" >"$tmp/no-sim.txt"
expect 1 '^src/sim/: a folder of no module' "$tmp/no-sim.txt" "$root"

[[ $fails -eq 0 ]]
