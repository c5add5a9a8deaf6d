#!/usr/bin/env bash
# physr at scale: JSON written as a stream (byte for byte what the whole-document writer
# printed, in bounded memory), out of memory as a clean exit 1, the limits of machine
# files, and tables that stay aligned. No timing: time and memory targets are in
# bench/cli_bench.sh.
# Usage: cli_limits_test.sh PHYSR SOURCE
set -u
physr=$1
src=$2
golden=$src/tests/cli/golden
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- the same JSON, byte for byte ------------------------------------------------------
# The golden files are what physr printed when it built each document with nlohmann::json
# and dumped it whole.
same_json() {
  local name=$1
  shift
  "$physr" "$@" > "$tmp/$name" 2>/dev/null
  if cmp -s "$tmp/$name" "$golden/$name"; then pass; else fail "physr $* differs from $name"; diff "$tmp/$name" "$golden/$name" | head -5; fi
}
same_json topo-two-socket-switch.json topo --machine two-socket-switch --json
same_json ranges-alternating-64.json ranges --pattern alternating --count 64 --max-segment 8K --json
same_json map-two-socket-switch.json map --machine two-socket-switch --allow-bounce --json
same_json map-xeon-e5-nvme1-eremoteio.json map --machine xeon-e5-two-sockets --device nvme1 --json

# --- bounded memory under a limit ------------------------------------------------------
# A wide machine: 768 NVMe functions on the root buses of three host bridges, 589,824 pairs.
wide=$tmp/wide.toml
{
  printf 'name = "wide"\n[cpu]\nvendor = "GenuineIntel"\nfamily = 6\n'
  for b in 0 1 2; do printf '[[host_bridge]]\nbus = %d\n' $((b * 0x40)); done
  for b in 0 1 2; do
    for d in $(seq 0 31); do
      for f in $(seq 0 7); do
        printf '[[function]]\nbdf = "0000:%02x:%02x.%d"\nvendor = 0x144d\ndevice = 0xa808\nclass = 0x010802\n' $((b * 0x40)) "$d" "$f"
      done
    done
  done
} > "$wide"
# AddressSanitizer reserves terabytes of address space: a ulimit -v cannot apply to it.
if grep -qa __asan_init "$physr"; then
  echo "cli_limits: AddressSanitizer build, the ulimit -v checks are skipped"
else
  limit=300000  # KiB of address space; the whole documents below need more than 1 GB
  out=$( (ulimit -v $limit; "$physr" ranges --pattern random --count 1000000 --json) 2>"$tmp/err"); rc=$?
  if [[ $rc -eq 0 ]] && [[ $(grep -c '"addr"' <<<"$out") -eq 1000000 ]] && tail -1 <<<"$out" | grep -q '^}$'; then pass
  else fail "ranges --count 1000000 --json under ulimit -v $limit exited $rc"; head -3 "$tmp/err"; fi
  n=$( (ulimit -v $limit; "$physr" topo --machine "$wide" --json) 2>"$tmp/err" | grep -c '"map_type"'); rc=${PIPESTATUS[0]}
  if [[ $n -eq 589824 ]]; then pass; else fail "topo --json of 768 functions under ulimit -v $limit printed $n pairs"; head -3 "$tmp/err"; fi
  # Out of memory is a failure like any other: exit 1 and a message, never an abort.
  out=$( (ulimit -v $limit; "$physr" ranges --pattern random --count 100000000 --json) 2>&1 >/dev/null); rc=$?
  if [[ $rc -eq 1 ]] && grep -q '^physr: error: ENOMEM: out of memory' <<<"$out"; then pass
  else fail "ranges --count 100000000 under ulimit -v $limit exited $rc: $out"; fi
fi

# --- machine files: depth, and matrices that stay aligned ------------------------------
# chain DOMAIN N: N bridges below a root port of its own host bridge (domain DOMAIN),
# an NVMe SSD below the last, so the SSD is N levels below the host bridge.
chain() {
  local d=$1 n=$2 i parent=""
  printf '[[host_bridge]]\ndomain = %d\n' "$d"
  for i in $(seq 0 $((n - 1))); do
    printf '[[function]]\nbdf = "%04x:%02x:00.0"\nvendor = 0x8086\ndevice = 0x2030\nclass = 0x060400\ntype = "%s"\n' \
      "$d" "$i" "$([[ $i -eq 0 ]] && echo root_port || echo switch_downstream)"
    [[ -n $parent ]] && printf 'parent = "%s"\n' "$parent"
    parent=$(printf '%04x:%02x:00.0' "$d" "$i")
  done
  printf '[[function]]\nbdf = "%04x:%02x:00.0"\nvendor = 0x144d\ndevice = 0xa808\nclass = 0x010802\nparent = "%s"\n' "$d" "$n" "$parent"
}
chain 0 63 > "$tmp/levels64.toml"
chain 0 64 > "$tmp/levels65.toml"
out=$("$physr" topo --machine "$tmp/levels64.toml" 2>&1); rc=$?
if [[ $rc -eq 0 ]]; then pass; else fail "a tree of 64 levels exited $rc: $(head -2 <<<"$out")"; fi
line=$(grep -n 'parent = "0000:3f:00.0"' "$tmp/levels65.toml" | cut -d: -f1)
out=$("$physr" topo --machine "$tmp/levels65.toml" 2>&1); rc=$?
if [[ $rc -eq 1 ]] && grep -q "levels65.toml:$line: function\[64\] (0000:40:00.0): more than 64 levels below its host bridge" <<<"$out"; then pass
else fail "a tree of 65 levels exited $rc: $(head -2 <<<"$out")"; fi
# Two SSDs 50 levels deep under two host bridges: distance 102, and the columns still part.
{ chain 0 50; chain 1 50; } > "$tmp/deep2.toml"
out=$("$physr" topo --machine "$tmp/deep2.toml" --assume-cpu amd-zen 2>&1)
if grep -qE '^ +0 +0000:32:00.0 +B0 +H102$' <<<"$out" && grep -qE '^ +1 +0001:32:00.0 +H102 +B0$' <<<"$out"; then pass
else fail "matrix with distance 102"; grep -A3 'row = provider' <<<"$out"; fi

# --- every pair counted, nothing cached: 16,384 functions in bounded memory ------------
many=$tmp/many.toml
{
  for b in $(seq 0 63); do printf '[[host_bridge]]\nbus = %d\n' $((b * 4)); done
  for b in $(seq 0 63); do
    for d in $(seq 0 31); do
      for f in $(seq 0 7); do
        printf '[[function]]\nbdf = "0000:%02x:%02x.%d"\nvendor = 0x144d\ndevice = 0xa808\nclass = 0x010802\n' $((b * 4)) "$d" "$f"
      done
    done
  done
} > "$many"
if grep -qa __asan_init "$physr"; then :; else
  out=$( (ulimit -v 300000; "$physr" topo --machine "$many") 2>&1); rc=$?
  if [[ $rc -eq 0 ]] && grep -qE '^  not_supported across host bridges +264241152$' <<<"$out" \
     && grep -qE '^  bus_addr within pci0000:fc +256$' <<<"$out"; then pass
  else fail "topo of 16,384 functions under ulimit -v 300000 exited $rc"; grep -A3 'Other pairs\|error' <<<"$out" | head -5; fi
fi

# --- sim: a job that writes more than $TMPDIR holds is refused before it starts ----------
printf 'name = "big-write"\nmachine = "two-socket-switch"\n[[job]]\nname = "w"\ndevice = "nvme0"\nrw = "write"\nsize = "16T"\nbuffer = "host"\n' > "$tmp/big-write.toml"
if [[ $(df -Pk "$tmp" | awk 'NR == 2 { print $4 }') -lt $((16 << 30)) ]]; then
  out=$(TMPDIR=$tmp timeout 120 "$physr" sim "$tmp/big-write.toml" 2>&1); rc=$?
  if [[ $rc -eq 1 ]] && grep -q "ENOSPC: NVMe namespace: the job writes 16 TiB into a file in $tmp (TMPDIR), which has [0-9]* GiB free" <<<"$out"; then pass
  else fail "sim writing 16 TiB into TMPDIR exited $rc"; head -3 <<<"$out"; fi
fi

# --- sim: progress inside a job on a terminal, none in a pipe ----------------------------
printf 'name = "long-read"\nmachine = "two-socket-switch"\n[[job]]\nname = "r"\ndevice = "nvme0"\nrw = "read"\nsize = "4G"\nbuffer = "gpu0"\n' > "$tmp/long-read.toml"
out=$("$physr" sim "$tmp/long-read.toml" 2>&1 >/dev/null)
if grep -q 'ETA' <<<"$out"; then fail "sim printed a progress bar into a pipe"; else pass; fi
if command -v script >/dev/null; then
  out=$(script -qec "$(printf '%q ' "$physr" sim "$tmp/long-read.toml")" /dev/null 2>&1)
  if grep -qE '\[1/1\] r +\[#*-*\] +[0-9]+%  ETA [0-9]+ s' <<<"$out"; then pass; else fail "sim on a terminal showed no progress inside the job"; tail -c 300 <<<"$out"; fi
fi

finish cli_limits
