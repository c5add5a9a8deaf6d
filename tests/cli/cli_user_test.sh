#!/usr/bin/env bash
# physr as a new user meets it: hints that work when pasted, errors that name the option or
# file and the cause, per-job results, link classes that agree with the verdict, charts that
# parse.
# Usage: cli_user_test.sh PHYSR SOURCE
set -u
physr=$1
src=$2
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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

# --- a job that fails in the middle of a scenario: the others' results stay (as fio) -----------
printf 'machine = "xeon-e5-two-sockets"\n[[job]]\nname = "ok"\ndevice = "nvme1"\nsize = "1M"\n[[job]]\nname = "refused"\ndevice = "nvme1"\nbuffer = "gpu0"\npath = "p2p"\nsize = "1M"\n[[job]]\nname = "after"\ndevice = "nvme1"\nsize = "1M"\n' > "$tmp/mid-fails.toml"
expect 1 'refused +nvme1 +gpu0 +failed: EREMOTEIO' -- sim "$tmp/mid-fails.toml"
expect 1 'Every byte verified against its source: 2 MiB in 2 jobs' -- sim "$tmp/mid-fails.toml"
"$physr" sim "$tmp/mid-fails.toml" --json > "$tmp/mid.json" 2>/dev/null; rc=$?
check "sim --json with a job refused by EREMOTEIO (exit $rc)" python3 - "$tmp/mid.json" "$rc" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert sys.argv[2] == "1"
assert d["failed_jobs"] == 1
ok, refused, after = d["jobs"]
assert ok["verified_bytes"] == 1 << 20 and after["verified_bytes"] == 1 << 20
assert refused["errno"] == "EREMOTEIO" and "refused" in refused["error"], refused
PY

# --- errors name the option or file and the cause -------------------------------------------------
expect 2 "--max-segment: size '-5': expected a number" -- map --max-segment -5
expect 2 "--boundary: size '5Q': unknown unit" -- ranges --boundary 5Q
expect 2 "--dma-offset: size 'x': expected a number" -- map --direct --dma-offset x
expect 2 "--chunk-size: size 'big': expected a number" -- p2pmem-test /dev/null /dev/null -s big
expect 2 "--range 'host:-5:4K': address: size '-5'" -- map --range host:-5:4K
# Out of memory: a clear error, exit 1 (an address-space limit makes 2^28 pfns fail; skipped
# where the limit stops the program itself, as under ASan).
if bash -c 'ulimit -v 400000 && "$0" --version; exit $?' "$physr" >/dev/null 2>&1; then
  out=$(ulimit -v 400000; "$physr" ranges --count 200000000 --pattern contiguous 2>&1); rc=$?
  check "out of memory names the command (exit $rc): $out" bash -c '[[ $1 -eq 1 ]] && grep -q "ENOMEM: out of memory while running physr ranges" <<<"$2"' _ "$rc" "$out"
fi
# A scenario's machine that does not exist: the scenario's key, FILE:LINE.
printf 'name = "n"\nmachine = "nope"\n[[job]]\ndevice = "nvme0"\nsize = "1M"\n' > "$tmp/nope.toml"
expect 1 "nope.toml:2: machine: machine 'nope': no such file" -- sim "$tmp/nope.toml"
# A network job whose buffer device has no memory BAR: named.
printf '[[job]]\nname = "rx"\ndevice = "nic0"\npeer = "nic1"\npeer_buffer = "switch0"\nbs = "4K"\nsize = "1M"\n' > "$tmp/nobar.toml"
expect 1 "job 'rx': the RX buffer device switch0 has no memory BAR" -- sim "$tmp/nobar.toml"
# Invalid UTF-8 (a Latin-1 file name, a byte of cpuinfo) in --json output: replaced, and
# the output is JSON.
lat=$tmp/$(printf 'caf\xe9').txt
printf '0x100\n' > "$lat"
"$physr" ranges --pfns "$lat" --json > "$tmp/lat.json" 2>&1
check "ranges --json with a Latin-1 file name is JSON" python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["source"].endswith("caf\ufffd.txt"), d["source"]' "$tmp/lat.json"
ls1=$tmp/latin-snap
mkdir -p "$ls1/sys/devices/pci0000:00/0000:00:01.0" "$ls1/proc"
d=$ls1/sys/devices/pci0000:00/0000:00:01.0
printf '0x8086\n' > "$d/vendor"; printf '0x1234\n' > "$d/device"; printf '0x010802\n' > "$d/class"
printf 'processor\t: 0\nvendor_id\t: Genu\xefneIntel\ncpu family\t: 6\n' > "$ls1/proc/cpuinfo"
"$physr" topo --sysfs-root "$ls1" --json > "$tmp/ls1.json" 2>/dev/null
check "topo --json with a Latin-1 byte in cpuinfo is JSON" python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$tmp/ls1.json"

# --- what is used, not what was typed; negative numbers refused, not wrapped ---------------------
expect 0 'max segment 4 KiB \(--max-segment 4097 rounded down to whole 4 KiB pages' -- ranges --max-segment 4097 --count 64 --pattern contiguous
check "ranges --json reports the max segment used" python3 -c 'import json,sys; assert json.loads(sys.argv[1])["max_segment_bytes"] == 4096' \
  "$("$physr" ranges --max-segment 4097 --count 8 --pattern contiguous --json)"
expect 2 '--max-segment 100: .*below one 4 KiB page' -- ranges --max-segment 100
expect 2 '--seed: must not be negative' -- ranges --seed -1
expect 2 '--show: must not be negative' -- ranges --show -1
expect 2 '--chunks: must not be negative' -- p2pmem-test /dev/null /dev/null -c -1
expect 2 '--max-devices: must not be negative' -- doctor --max-devices -1
expect 0 'seed 18446744073709551615' -- ranges --seed 18446744073709551615 --count 4

# --- --assume-cpu against the detected CPU: said to be an override ------------------------------
expect 0 'CPU rule overridden: detected GenuineIntel family 0x6 \(not AMD Zen\), assuming AMD Zen' -- explain nvme0 nic0 --machine two-socket-switch --assume-cpu amd-zen
expect 0 'CPU rule overridden: detected AuthenticAMD family 0x19 \(AMD Zen\), assuming a CPU other than AMD Zen' -- explain gpu0 nvme1 --machine amd-zen --assume-cpu other
expect 0 'CPU GenuineIntel family 0x6 \(CPU rule overridden: assuming AMD Zen' -- topo --machine two-socket-switch --assume-cpu amd-zen
expect 0 'CPU: AuthenticAMD family 0x19: not AMD Zen|CPU: AMD family 0x19 \(Zen or newer\)' -- explain gpu0 nvme1 --machine amd-zen --assume-cpu amd-zen
out=$("$physr" explain nvme0 nic0 --machine two-socket-switch --assume-cpu amd-zen 2>&1)
check "an overridden CPU is not described as AMD Zen" bash -c '! grep -q "AMD family 0x6" <<<"$1"' _ "$out"

# --- the link class agrees with the verdict --------------------------------------------------------
# Under a switch whose ports redirect, the pair goes through the host bridge: PHB, not PIX;
# with the ports assumed off it is bus_addr below the switch: PIX.
expect 0 'Link class: PHB' -- explain ssd gpu --machine "$tmp/two-redirects.toml"
expect 0 'Link class: PIX' -- explain ssd gpu --machine "$tmp/two-redirects.toml" --assume-acs-off 02:00.0,02:01.0
# Two functions of one device below a root port: bus_addr, distance 2, PIX (not PHB).
cat > "$tmp/mf.toml" <<'TOML'
[[host_bridge]]
bus = 0
[[function]]
bdf = "00:01.0"
vendor = 0x8086
device = 0x2030
class = 0x060400
type = "root_port"
[[function]]
bdf = "01:00.0"
vendor = 0x15b3
device = 0x1017
class = 0x020000
parent = "00:01.0"
[[function]]
bdf = "01:00.1"
vendor = 0x15b3
device = 0x1017
class = 0x020000
parent = "00:01.0"
TOML
out=$("$physr" explain 01:00.0 01:00.1 --machine "$tmp/mf.toml" 2>&1)
check "explain: two functions below one root port are bus_addr and PIX: $out" \
  bash -c 'grep -q "Verdict: bus_addr, distance 2" <<<"$1" && grep -q "Link class: PIX" <<<"$1"' _ "$out"
expect 0 'through a PCIe host bridge' -- explain ssd gpu --machine "$tmp/two-redirects.toml"

# --- buffer = "nearest": a provider that can serve the job -------------------------------------
printf '[[job]]\nname = "ssd"\ndevice = "nvme2"\nsize = "4M"\nbuffer = "nearest"\n[[job]]\nname = "copy"\ndevice = "gpu0"\nsize = "4M"\nbuffer = "nearest"\n' > "$tmp/nearest.toml"
out=$("$physr" sim "$tmp/nearest.toml" 2>&1); rc=$?
check "sim: nearest picks memory that serves each job (exit $rc): $out" \
  bash -c '[[ $1 -eq 0 ]] && ! grep -q "nvme2 BAR0" <<<"$2" && ! grep -qE "^  copy +gpu0 +gpu0" <<<"$2"' _ "$rc" "$out"
printf 'machine = "xeon-e5-two-sockets"\n[[job]]\nname = "big"\ndevice = "nvme1"\nbs = "128K"\nqd = 1024\nsize = "128M"\nbuffer = "nearest"\n' > "$tmp/nearest-none.toml"
expect 1 "job 'big': buffer = .nearest.: no published P2P memory of at least 128 MiB \(bs x qd\)" -- sim "$tmp/nearest-none.toml"

# --- sim --svg: XML that parses whatever the names, a legend from the data, an axis with units ---
cat > "$tmp/hostile.toml" <<'TOML'
name = "x<y & \"z\""
[[job]]
name = "a<b & \"c\" 'd'"
device = "nvme0"
size = "4M"
buffer = "gpu0"
[[job]]
name = "staged</text><x>"
device = "nvme0"
size = "4M"
buffer = "gpu0"
path = "bounce"
[[job]]
name = "net & p2p"
device = "nic0"
peer = "nic1"
peer_buffer = "gpu0"
bs = "4K"
size = "1M"
[[job]]
name = "a-very-long-job-name-that-used-to-be-cut-off-at-the-edge-of-the-chart"
device = "nvme1"
size = "1M"
TOML
"$physr" sim "$tmp/hostile.toml" --svg "$tmp/hostile.svg" >/dev/null 2>&1
check "sim --svg with hostile names parses as XML, with a truthful legend and an axis" python3 - "$tmp/hostile.svg" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
texts = [t.text or "" for t in root.iter(ns + "text")]
for name in ["a<b & \"c\" 'd'", "staged</text><x>", "net & p2p"]:
    assert name in texts, (name, texts)
assert any("GB/s" in t and "10^9 bytes" in t for t in texts), texts
legend = {t for t in texts if t in ("staged through a host buffer", "bounced through host memory",
                                     "P2P through the root complex", "P2P by bus address", "host memory")}
# The P2P network job sends from host memory and receives into gpu0 through the root
# complex: both drawn, both in the legend; nothing was bounced, so that is not.
assert legend == {"staged through a host buffer", "P2P through the root complex", "P2P by bus address", "host memory"}, legend
fills = {r.get("fill") for r in root.iter(ns + "rect")}
assert "#e08a1e" not in fills, fills
# No label runs past the picture's right edge (7 px per character is generous at 12 px).
width = float(root.get("width"))
for t in root.iter(ns + "text"):
    anchor = t.get("text-anchor", "start")
    if anchor == "start":
        assert float(t.get("x")) + 7 * len(t.text or "") <= width, (t.text, width)
PY
# The chart's path is checked before any job runs.
out=$("$physr" sim "$tmp/hostile.toml" --svg "$tmp/no/such/dir/x.svg" 2>&1); rc=$?
check "sim --svg to a folder that does not exist fails before running (exit $rc): $out" \
  bash -c '[[ $1 -eq 1 ]] && grep -q -- "--svg .*no/such/dir/x.svg: cannot write the file" <<<"$2" && ! grep -q "running job" <<<"$2"' _ "$rc" "$out"

# --- what users of lspci, nvidia-smi and fio miss -------------------------------------------------
# CLI11's own errors in physr's form.
expect 2 '^physr: error: .*--frobnicate' -- map --frobnicate
expect 2 '^physr: error: .*--dma-mask' -- map --dma-mask
# --assume-acs-off by device name as well as BDF.
expect 0 'Verdict: bus_addr, distance 4' -- explain nvme0 nic0 --machine two-socket-switch --assume-acs-off 0000:02:11.0
sed -e 's/^bdf = "02:00.0"$/bdf = "02:00.0"\nname = "port0"/' -e 's/^bdf = "02:01.0"$/bdf = "02:01.0"\nname = "port1"/' "$tmp/two-redirects.toml" > "$tmp/named-ports.toml"
expect 0 'Verdict: bus_addr, distance 4' -- explain ssd gpu --machine "$tmp/named-ports.toml" --assume-acs-off port0,port1
expect 2 "--assume-acs-off: PCI address 'nosuch'.*nor a device name" -- explain ssd gpu --machine "$tmp/named-ports.toml" --assume-acs-off nosuch
# map --show N.
out=$("$physr" map --show 2 2>&1); rc=$?
check "map --show 2 prints two rows of each table and says how many more (exit $rc)" \
  bash -c '[[ $1 -eq 0 ]] && [[ $(grep -cE "^  [0-9]+ " <<<"$2") -eq 4 ]] && [[ $(grep -cE "^  \([0-9]+ more\)$" <<<"$2") -eq 2 ]]' _ "$rc" "$out"
# JSON rates in bytes per second, beside the old keys.
"$physr" sim "$tmp/nearest.toml" --json > "$tmp/rate.json" 2>/dev/null
check "sim --json has bytes_per_second beside gbps" python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; assert abs(j["bytes_per_second"] - j["gbps"] * 1e9) < 1, j' "$tmp/rate.json"

finish cli_user
