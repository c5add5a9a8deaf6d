#!/usr/bin/env bash
# physr as a new user meets it: hints that work when pasted, errors that name the option or
# file and the cause, per-job results, link classes that agree with the verdict, charts that
# parse.
# Usage: cli_user_test.sh PHYSR SOURCE
set -u
physr=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
passes=0

# expect CODE PATTERN -- ARGS...: run physr ARGS, check the exit code and that PATTERN
# appears in stdout+stderr.
expect() {
  local code=$1 pattern=$2
  shift 3
  local out rc
  out=$("$physr" "$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    echo "FAIL: physr $* exited $rc, expected $code"; echo "$out" | head -5; fails=$((fails + 1)); return
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: physr $* output lacks /$pattern/"; echo "$out" | head -5; fails=$((fails + 1)); return
  fi
  passes=$((passes + 1))
}
# check NAME COMMAND...: a pass if COMMAND succeeds.
check() {
  local name=$1
  shift
  if "$@"; then passes=$((passes + 1)); else echo "FAIL: $name"; fails=$((fails + 1)); fi
}

# A switch whose two downstream ports both redirect peer requests (ACS RR), below a root port.
cat > "$tmp/two-redirects.toml" <<'TOML'
name = "two-redirects"
[[host_bridge]]
bus = 0
[[function]]
bdf = "00:00.0"
vendor = 0x8086
device = 0x2020
class = 0x060000
[[function]]
bdf = "00:01.0"
vendor = 0x8086
device = 0x2030
class = 0x060400
type = "root_port"
[[function]]
bdf = "01:00.0"
name = "sw"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_upstream"
parent = "00:01.0"
[[function]]
bdf = "02:00.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
acs = "SV RR CR UF"
[[function]]
bdf = "02:01.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
acs = "SV RR CR UF"
[[function]]
bdf = "03:00.0"
name = "ssd"
vendor = 0x144d
device = 0xa80a
class = 0x010802
parent = "02:00.0"
[[function]]
bdf = "04:00.0"
name = "gpu"
vendor = 0x10de
device = 0x20b0
class = 0x030200
parent = "02:01.0"
TOML

# --- explain's what-if hint: a command that works when pasted ---------------------------------
# The kernel parameter keeps Linux's ';' (calc_map_type_and_dist() prints it so); the hint
# is a physr command with --assume-acs-off's commas, which, run, gives bus_addr.
expect 0 'boot with: pci=disable_acs_redir=0000:02:00.0;0000:02:01.0' -- explain ssd gpu --machine "$tmp/two-redirects.toml"
hint=$("$physr" explain ssd gpu --machine "$tmp/two-redirects.toml" | sed -n 's/^(what-if: \(.*\))$/\1/p')
check "explain's what-if hint uses commas: '$hint'" grep -q -- '--assume-acs-off 0000:02:00.0,0000:02:01.0' <<<"$hint"
if [[ $hint == physr\ * ]]; then
  out=$(eval "\"$physr\" ${hint#physr }" 2>&1)
  check "the pasted what-if hint runs and gives bus_addr: $hint" grep -q 'Verdict: bus_addr, distance 4' <<<"$out"
else
  echo "FAIL: the what-if hint is not a physr command: '$hint'"; fails=$((fails + 1))
fi
# With one port already assumed off, the hint names both (the option replaces, not adds).
hint=$("$physr" explain ssd gpu --machine "$tmp/two-redirects.toml" --assume-acs-off 02:00.0 | sed -n 's/^(what-if: \(.*\))$/\1/p')
check "the what-if hint keeps the ports already assumed off: '$hint'" grep -q -- '--assume-acs-off 02:00.0,0000:02:01.0' <<<"$hint"

# --- map --range DEVICE.barN:OFFSET:LEN with DEVICE a BDF (snapshot machines have no names) ------
expect 0 '0 +gpu0 BAR1 +0x381000000000 +4 KiB +bus_addr' -- map --range 0000:05:00.0.bar1:0:4K
expect 0 '0 +gpu0 BAR1 .* 4 KiB +bus_addr' -- map --range 05:00.0.bar1:4K:4K
expect 0 '0 +gpu0 BAR1 .* 4 KiB +bus_addr' -- map --range gpu0.bar1:0:4K
expect 2 "no PCI function 0000:09:00.0" -- map --range 0000:09:00.0.bar1:0:4K

# --- map's hint follows the cause -------------------------------------------------------------
# A direct device with a 24-bit mask and memory above 16 MiB needs a bounce buffer below the
# mask; the pool is above it, so --allow-bounce cannot help and is not suggested.
out=$("$physr" map --direct --dma-mask 24 --range host:0x2000000:8K 2>&1); rc=$?
check "map --dma-mask 24 names the bounce pool above the mask (exit $rc): $out" \
  bash -c '[[ $1 -eq 1 ]] && grep -q "bounce pool lies above the 24-bit DMA mask" <<<"$2" && ! grep -q -- "--allow-bounce" <<<"$2"' _ "$rc" "$out"
expect 1 'EREMOTEIO.*--allow-bounce lets the DMA layer bounce it' -- map --machine xeon-e5-two-sockets --device nvme1

echo "cli_user: $passes passed, $fails failed"
[[ $fails -eq 0 ]]
