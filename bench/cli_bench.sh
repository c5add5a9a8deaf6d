#!/usr/bin/env bash
# The physr command at scale: wall time, CPU time and peak RSS (GNU time) of each case, as
# a table and as JSON (bench-results/cli.json), against the targets physr holds itself to
# (the time target is on wall time: on a loaded machine read the CPU seconds too).
# Usage: bench/cli_bench.sh [PHYSR] (default: build/release/tools/physr/physr)
# Machines come from bench/cli_machine.py: 4,096 and 65,535 functions (domains of a root
# port and a 16-port switch of NVMe, GPU and NIC endpoints), a 32,700-deep chain.
set -euo pipefail
cd "$(dirname "$0")/.."
physr=$(realpath "${1:-build/release/tools/physr/physr}")
[[ -x $physr ]] || { echo "cli_bench.sh: no physr at $physr (build the release preset first)" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "cli_bench.sh: needs GNU time (/usr/bin/time, Debian package time)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p bench-results
python3 bench/cli_machine.py wide 4096 > "$tmp/wide-4096.toml"
python3 bench/cli_machine.py wide 65535 > "$tmp/wide-65535.toml"
python3 bench/cli_machine.py chain 32700 > "$tmp/chain-32700.toml"
# One 4 KiB read job of 64 K, 256 K and 1 M I/Os: a job's memory is bounded by its I/Os in
# flight, so the three peaks match (before: 23, 71 and 261 MB).
for n in 256M 1G 4G; do
  printf '[[job]]\nname = "r"\ndevice = "nvme0"\nbs = "4K"\nqd = 32\nsize = "%s"\n' "$n" > "$tmp/sim-$n.toml"
done

rows=()
# run NAME TARGET_S TARGET_MB OUTPUT_LIMIT -- ARGS...: physr ARGS with stdout to /dev/null
# (or its first OUTPUT_LIMIT bytes, for output too big to wait for); "-" for no target.
run() {
  local name=$1 tsec=$2 tmb=$3 limit=$4
  shift 5
  local t rc
  if [[ $limit == - ]]; then
    /usr/bin/time -o "$tmp/time" -f '%e %U %S %M' "$physr" "$@" >/dev/null 2>"$tmp/err" && rc=0 || rc=$?
  else
    { /usr/bin/time -o "$tmp/time" -f '%e %U %S %M' "$physr" "$@" 2>"$tmp/err" | head -c "$limit" >/dev/null; } && rc=0 || rc=$?
  fi
  read -r sec usr sys kb < <(tail -1 "$tmp/time")
  local mb=$((kb / 1024)) verdict=ok cpu
  cpu=$(awk -v u="$usr" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
  if [[ $tsec != - ]] && awk -v a="$sec" -v b="$tsec" 'BEGIN { exit !(a >= b) }'; then verdict=SLOW; fi
  if [[ $tmb != - && $mb -ge $tmb ]]; then verdict=$([[ $verdict == ok ]] && echo OVER || echo "$verdict+OVER"); fi
  rows+=("$name|$sec|$cpu|$mb|$tsec|$tmb|$verdict")
}
run "topo --json, 4,096 functions" 2 200 - -- topo --machine "$tmp/wide-4096.toml" --json
run "topo, 65,535 functions" - 1024 - -- topo --machine "$tmp/wide-65535.toml"
run "topo --json, 65,535 functions, 2 domains' pairs" - 1024 - -- topo --machine "$tmp/wide-65535.toml" --json --devices 0000:,0001:
run "topo --json, 65,535 functions, first 4 GB" - 1024 4000000000 -- topo --machine "$tmp/wide-65535.toml" --json
run "explain, 65,535 functions" - 1024 - -- explain 0000:03:00.0 00fc:12:00.0 --machine "$tmp/wide-65535.toml"
run "topo, 32,700-deep chain (refused)" - 1024 - -- topo --machine "$tmp/chain-32700.toml"
run "ranges --count 10000000 --json (random)" - 500 - -- ranges --pattern random --count 10000000 --json
run "ranges --count 10000000 --json (mixed)" - 500 - -- ranges --count 10000000 --json
run "ranges --count 20000000 --json (random)" - 1024 - -- ranges --pattern random --count 20000000 --json
run "map --json, 64 GiB, --max-segment 4K" - - - -- map --range host:0:2G --range host:0x100000000:62G --max-segment 4K --json
run "sim, 4 KiB reads, 64 K I/Os" - 64 - -- sim "$tmp/sim-256M.toml"
run "sim, 4 KiB reads, 256 K I/Os" - 64 - -- sim "$tmp/sim-1G.toml"
run "sim, 4 KiB reads, 1 M I/Os" - 64 - -- sim "$tmp/sim-4G.toml"

printf '%-52s %8s %8s %8s %6s %6s  %s\n' case wall-s cpu-s "peak MB" "< s" "< MB" result
json="["
for r in "${rows[@]}"; do
  IFS='|' read -r name sec cpu mb tsec tmb verdict <<<"$r"
  printf '%-52s %8s %8s %8s %6s %6s  %s\n' "$name" "$sec" "$cpu" "$mb" "$tsec" "$tmb" "$verdict"
  json+=$(printf '%s\n  {"case": "%s", "seconds": %s, "cpu_seconds": %s, "peak_rss_mb": %s, "target_seconds": %s, "target_mb": %s, "result": "%s"}' \
    "$([[ $json == "[" ]] || echo ,)" "$name" "$sec" "$cpu" "$mb" "$([[ $tsec == - ]] && echo null || echo "$tsec")" \
    "$([[ $tmb == - ]] && echo null || echo "$tmb")" "$verdict")
done
json+=$'\n]'
echo "$json" > bench-results/cli.json
echo "(JSON: bench-results/cli.json; the machine is $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
