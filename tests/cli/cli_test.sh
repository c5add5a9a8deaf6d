#!/usr/bin/env bash
# Command-line behaviour of physr: exit codes (0 ok, 1 failure, 2 usage) and messages that
# name the bad input.
# Usage: cli_test.sh PHYSR SOURCE [SNAPSHOTS] (the extracted sysfs snapshots; default: a
# scratch folder)
set -u
physr=$1
src=$2
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
snaps=${3:-$tmp/snapshots}

expect 0 '^physr [0-9]+\.[0-9]+\.[0-9]+' -- --version
expect 0 'ranges' -- --help
expect 0 'Range lists' --
expect 0 'max-segment' -- ranges --help
expect 0 '-> 1 ranges' -- ranges --pattern contiguous --count 1000
expect 0 '-> 16 ranges' -- ranges --pattern contiguous --count 1024 --max-segment 256K
expect 0 '-> 2 ranges' -- ranges --pattern contiguous --count 16 --boundary 32K --seed 5
expect 2 'bogus' -- ranges --pattern bogus
expect 2 'count' -- ranges --count abc
expect 2 'count' -- ranges --count 0
expect 2 "'12Q'" -- ranges --max-segment 12Q
expect 2 'max_segment' -- ranges --max-segment 100
expect 2 '3K.*power of two' -- ranges --boundary 3K
expect 2 'nosuch' -- nosuch
expect 2 'frobnicate' -- ranges --frobnicate
expect 1 "cannot read pfn file '$tmp/missing'" -- ranges --pfns "$tmp/missing"

printf '0x100\n0x101\n0x102 3\n0x103 3\n# gap\n0x200\n' > "$tmp/good.txt"
expect 0 '5 pfns .* -> 3 ranges' -- ranges --pfns "$tmp/good.txt"
printf '0x100\nbanana\n' > "$tmp/bad.txt"
expect 1 "$tmp/bad.txt:2: expected a pfn" -- ranges --pfns "$tmp/bad.txt"
printf '0x100 7 9\n' > "$tmp/bad2.txt"
expect 1 "bad2.txt:1: unexpected text '9'" -- ranges --pfns "$tmp/bad2.txt"
printf '0x40000000000\n' > "$tmp/high.txt"
expect 1 'ERANGE.*2\^42' -- ranges --pfns "$tmp/high.txt"

# JSON is one object with the counts.
out=$("$physr" ranges --pattern alternating --count 64 --json)
if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["ranges"]==64 and d["pfns"]==64 and len(d["entries"])==64' "$out" 2>/dev/null \
   || { [[ $(grep -c '"addr"' <<<"$out") -eq 64 ]] && grep -q '"ranges": 64' <<<"$out"; }; then
  passes=$((passes + 1))
else
  echo "FAIL: ranges --json"; fails=$((fails + 1))
fi

# --- topo and explain ------------------------------------------------------------------
bash "$src/tests/support/sysfs_snapshots.sh" "$src/tests/data/sysfs" "$snaps" >/dev/null || { echo "FAIL: extracting the sysfs snapshots"; exit 1; }
snap="$snaps/40intel64-2g2n4c+pci"
expect 0 'B4 +B4 +H4 +H6' -- topo --machine two-socket-switch
expect 0 'pci0000:40' -- topo --sysfs-root "$snap"
expect 0 'appears under more than one bridge' -- topo --sysfs-root "$snaps/fakepcilocalities"
# A snapshot named by --machine warns once, like --sysfs-root.
n=$("$physr" topo --machine "$snaps/fakepcilocalities" 2>&1 >/dev/null | grep -c 'appears under more than one bridge')
if [[ $n -eq 1 ]]; then passes=$((passes + 1)); else echo "FAIL: topo --machine SNAPSHOT warned $n times, expected once"; fails=$((fails + 1)); fi
expect 0 'identifying device 0000:00:00.0 1022:1480' -- topo --machine amd-zen
expect 0 '^ +0 +0000:03:00.0 \(nvme0\) +B0 +B4$' -- topo --machine two-socket-switch --devices nvme0,nvme1
expect 0 'nic0\) +B4 +B4 +B4 +B0' -- topo --machine two-socket-switch --devices 0000:0 --assume-acs-off 0000:02:11.0
expect 0 'H4 +H4 +H4' -- topo --machine two-socket-switch --assume-cpu amd-zen
expect 0 'digraph physr' -- topo --machine two-socket-switch --dot
expect 0 '"0000:02:11.0" -> "0000:06:00.0"' -- topo --machine two-socket-switch --dot
expect 0 'Verdict: thru_host_bridge, distance 4' -- explain nvme0 nic0 --machine two-socket-switch
expect 0 'pci=disable_acs_redir=0000:02:11.0' -- explain nvme0 nic0 --machine two-socket-switch
expect 0 'Verdict: bus_addr, distance 4' -- explain nvme0 nic0 --machine two-socket-switch --assume-acs-off 0000:02:11.0
expect 0 'Link class: SYS' -- explain gpu0 nvme2 --machine two-socket-switch
expect 0 'only within one host bridge: fails' -- explain nvme1 gpu0 --machine xeon-e5-two-sockets
expect 0 'AMD family 0x19' -- explain gpu0 nvme1 --machine amd-zen
expect 0 'ACS is unknown' -- explain 0000:02:00.0 0000:02:00.1 --sysfs-root "$snap"
expect 0 'Verdict: not_supported, distance 4' -- explain 0000:01:00.0 0000:02:00.0 --sysfs-root "$snap"
expect 1 'no sys/devices' -- topo --sysfs-root "$tmp"
expect 1 "sysfs root '$tmp/nope': not a directory" -- topo --sysfs-root "$tmp/nope"
expect 1 'no such file and no built-in machine .*two-socket-switch' -- topo --machine nosuch
printf '[[host_bridge]]\nbus = 0\n[[function]]\nbdf = "00:00.0"\nvendr = 1\n' > "$tmp/bad.toml"
expect 1 "$tmp/bad.toml:5: function\\[0\\] \\(0000:00:00.0\\): unknown key 'vendr'" -- topo --machine "$tmp/bad.toml"
expect 1 'no PCI function 0000:09:00.0' -- explain 09:00.0 nvme0 --machine two-socket-switch
expect 1 "'banana' is neither a PCI address" -- explain banana nvme0 --machine two-socket-switch
expect 2 'provider is required|required' -- explain --machine two-socket-switch
expect 2 "--assume-cpu 'intel'" -- topo --machine amd-zen --assume-cpu intel
expect 2 "PCI address 'xyz'" -- topo --machine amd-zen --assume-acs-off xyz
expect 2 'excludes' -- topo --machine amd-zen --sysfs-root /
expect 1 'not in builtin:amd-zen' -- topo --machine amd-zen --assume-acs-off 0000:44:00.0

# --kernel: the P2P rules of that Linux release (allowlist entries, host bridge identification).
cat > "$tmp/nvidia.toml" <<'EOF2'
[[host_bridge]]
bus = 0
[[function]]
bdf = "00:00.0"
vendor = 0x10de
device = 0x2f95
class = 0x060000
[[function]]
bdf = "00:01.0"
vendor = 0x10de
device = 0x22b2
class = 0x060400
type = "root_port"
[[function]]
bdf = "00:02.0"
vendor = 0x10de
device = 0x22b2
class = 0x060400
type = "root_port"
[[function]]
bdf = "01:00.0"
vendor = 0x144d
device = 0xa80a
class = 0x010802
parent = "00:01.0"
[[function]]
bdf = "02:00.0"
vendor = 0x144d
device = 0xa80a
class = 0x010802
parent = "00:02.0"
EOF2
expect 0 'the P2P rules of Linux 7\.4 \(the newest physr knows\)' -- topo --machine two-socket-switch
expect 0 'Verdict: thru_host_bridge, distance 4' -- explain 01:00.0 02:00.0 --machine "$tmp/nvidia.toml"
expect 0 'rules +Linux 7\.2 \(--kernel\)' -- explain 01:00.0 02:00.0 --machine "$tmp/nvidia.toml" --kernel 7.2
expect 0 'Verdict: not_supported, distance 4' -- explain 01:00.0 02:00.0 --machine "$tmp/nvidia.toml" --kernel 7.2.5
expect 0 'Linux 7\.3 and newer allow this pair' -- explain 01:00.0 02:00.0 --machine "$tmp/nvidia.toml" --kernel 6.12
expect 0 '0000:02:00.0: cannot be used for peer-to-peer DMA as the client and provider \(0000:01:00.0\) do not share an upstream bridge or whitelisted host bridge' -- explain 01:00.0 02:00.0 --machine "$tmp/nvidia.toml" --kernel 6.12
expect 0 '^ +0 +0000:01:00.0 +B0 +--$' -- topo --machine "$tmp/nvidia.toml" --kernel 6.12.117-amd64
expect 0 '^ +0 +0000:01:00.0 +B0 +H4$' -- topo --machine "$tmp/nvidia.toml" --kernel 7.3-rc1
expect 0 'pci0000:00: not looked at: the first host bridge failed' -- explain nvme1 gpu0 --machine xeon-e5-two-sockets
expect 0 'to disable ACS redirect for this path, add the kernel parameter: pci=disable_acs_redir=0000:02:11.0' -- explain nvme0 nic0 --machine two-socket-switch
expect 2 "--kernel: kernel version 'banana': expected MAJOR.MINOR" -- topo --machine amd-zen --kernel banana
expect 2 '--kernel 5.4: physr models the P2P rules of Linux 5\.9 and newer' -- explain nvme0 nic0 --machine two-socket-switch --kernel 5.4
if "$physr" topo --machine "$tmp/nvidia.toml" --kernel 6.12 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); k=d["kernel"]; assert k["version"]=="6.12" and k["from"]=="--kernel"; assert [p["map_type"] for p in d["pairs"]]==["bus_addr","not_supported","not_supported","bus_addr"]'; then
  passes=$((passes + 1))
else
  echo "FAIL: topo --json --kernel 6.12: kernel field or pairs"; fails=$((fails + 1))
fi

# A machine with more devices than one matrix shows: a matrix per host bridge, then counts.
{
  printf '[[host_bridge]]\nbus = 0\n[[host_bridge]]\nbus = 0x80\n'
  for b in 00 80; do
    for d in $(seq 0 19); do
      printf '[[function]]\nbdf = "%s:%02x.0"\nvendor = 1\ndevice = 2\nclass = 0x010802\n' "$b" "$d"
    done
  done
} > "$tmp/big.toml"
expect 0 'pci0000:00 \(20 devices\)' -- topo --machine "$tmp/big.toml"
expect 0 'not_supported across host bridges +800' -- topo --machine "$tmp/big.toml"

# The live machine, where it exposes a PCI tree (containers may not: then a clear error).
if compgen -G '/sys/devices/pci*' >/dev/null; then
  expect 0 'the live sysfs \(/sys\)' -- topo
  expect 0 "the P2P rules of Linux [0-9]+\\.[0-9]+ \\(the running kernel, $(uname -r | sed 's/[.+]/\\&/g')\\)" -- topo
  expect 0 'the P2P rules of Linux 6\.12 \(--kernel\)' -- topo --kernel 6.12
  expect 0 'digraph physr' -- topo --dot
  first=$("$physr" topo --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["pairs"][0]["provider"] if d["pairs"] else "")')
  if [[ -n $first ]]; then expect 0 'Verdict: [a-z_]+, distance 0' -- explain "$first" "$first"; fi
else
  expect 1 'no pciDDDD:BB host bridge directories|no sys/devices' -- topo
fi

# topo --json: one object, one pair per ordered pair of non-bridge functions.
check_json() {
  python3 - "$1" "$2" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read())
fns = [f for f in d["functions"] if not f["class"].startswith("06")]
want = len(fns) ** 2
assert len(d["pairs"]) == want, (len(d["pairs"]), want)
seen = {(p["provider"], p["client"]) for p in d["pairs"]}
assert all(p["map_type"] in ("bus_addr", "thru_host_bridge", "not_supported") for p in d["pairs"])
assert all(isinstance(p["distance"], int) for p in d["pairs"])
if sys.argv[2] == "switch":
    by = {(p["provider"], p["client"]): p for p in d["pairs"]}
    assert by[("0000:03:00.0", "0000:05:00.0")]["map_type"] == "bus_addr"
    assert by[("0000:03:00.0", "0000:05:00.0")]["distance"] == 4
    assert by[("0000:06:00.0", "0000:03:00.0")]["map_type"] == "thru_host_bridge"
    assert len(seen) == want
PY
}
# physr map: every path on the default machine, EREMOTEIO and bouncing, argument errors.
expect 0 '0x381000001000 +8 KiB +bus_addr' -- map
expect 0 '28 KiB +iommu$' -- map  # P2P through the host bridge merges with host memory (no MMIO in a list)
expect 0 'every IOVA, page-table entry and bounce slot returned' -- map --device gpu0 --dir bidirectional
expect 1 'EREMOTEIO: range 2 .*not supported and bouncing was not allowed' -- map --machine xeon-e5-two-sockets --device nvme1
expect 0 'iommu\+bounced' -- map --machine xeon-e5-two-sockets --device nvme1 --allow-bounce
# Machine files: BARs as PCI defines them, refused at load naming FILE:LINE; a BAR inside the
# model's RAM is left out with a warning every command prints (map used to drop it silently).
bars_head='[[host_bridge]]\nbus = 0\n[[function]]\nbdf = "00:01.0"\nname = "ssd"\nvendor = 1\ndevice = 2\nclass = 0x010802\n'
printf "$bars_head"'[[function.bar]]\nstart = 0x380000000000\nsize = "3M"\n' > "$tmp/bar-size.toml"
expect 1 'bar-size.toml:11: function\[0\] \(0000:00:01.0\).bar\[0\].size: 3145728 bytes is not a power of two' -- topo --machine "$tmp/bar-size.toml"
printf "$bars_head"'[[function.bar]]\nindex = 1\nstart = 0x380000000000\nsize = "1M"\n[[function.bar]]\nindex = 1\nstart = 0x380000100000\nsize = "4K"\n' > "$tmp/bar-twice.toml"
expect 1 'BAR 1 is defined twice for this function' -- map --machine "$tmp/bar-twice.toml" --device ssd
printf "$bars_head"'[[function.bar]]\nstart = 0x10000000\nsize = "1M"\n' > "$tmp/bar-in-ram.toml"
expect 0 'warning: ssd BAR0 left out: .*ram' -- map --machine "$tmp/bar-in-ram.toml" --device ssd
expect 0 'direct\+bounced' -- map --direct --dma-mask 32 --range host:5G:8K
expect 0 '0x1000000001000 +4 KiB +direct$' -- map --direct --dma-offset 0x1000000000000 --range host:0x1000:4K
expect 0 '"unmapped_clean": true' -- map --json
expect 2 "--range 'foo'" -- map --range foo
expect 2 'no memory BAR 9' -- map --range gpu0.bar9:0:4K
expect 2 'host memory is' -- map --range host:3G:4K
expect 2 "--dir 'sideways'" -- map --dir sideways
expect 2 'bits must be 24 to 64' -- map --dma-mask 8
expect 2 'power of two' -- map --boundary 3K
expect 1 "no PCI function|neither" -- map --device nosuch
expect 1 'no PCI function 0000:99:00.0' -- explain 0000:99:00.0 nvme0 --machine two-socket-switch
expect 2 'direct devices only' -- map --dma-offset 4K
expect 1 'no such file' -- map --machine /nonexistent.toml

# physr sim: the flagship and the AMD scenario, JSON and SVG, and bad scenarios.
cat > "$tmp/small.toml" <<'TOML'
name = "small"
machine = "two-socket-switch"
[[job]]
name = "p2p"
device = "nvme0"
size = "4M"
buffer = "gpu0"
path = "p2p"
[[job]]
name = "staged"
device = "nvme0"
size = "4M"
buffer = "gpu0"
path = "bounce"
TOML
expect 0 'p2p +nvme0 +gpu0 BAR1 .* p2p bus_addr \(under the switch\)' -- sim "$tmp/small.toml"
expect 0 'staged .* bounce via a host buffer' -- sim "$tmp/small.toml"
expect 0 'Every byte verified against its source: 8 MiB in 2 jobs' -- sim "$tmp/small.toml" --svg "$tmp/chart.svg"
if grep -q '<svg' "$tmp/chart.svg" && grep -q 'staged' "$tmp/chart.svg"; then passes=$((passes + 1)); else echo "FAIL: sim --svg wrote no chart"; fails=$((fails + 1)); fi
# The chart's colours and legend come from the way each job's data went.
if grep -q 'fill="#2b7bb9"' "$tmp/chart.svg" && grep -q 'fill="#c0504d"' "$tmp/chart.svg" && grep -q 'P2P by bus address' "$tmp/chart.svg" &&
   grep -q 'staged through a host buffer' "$tmp/chart.svg" && ! grep -q 'host memory</text>' "$tmp/chart.svg"; then
  passes=$((passes + 1))
else
  echo "FAIL: sim --svg colours or legend"; fails=$((fails + 1))
fi
expect 0 '"verified_bytes": 4194304' -- sim "$tmp/small.toml" --json
expect 0 'thru_host_bridge \(through the root complex\)' -- sim amd-zen
expect 0 'The flagship scenario' --
# O_DIRECT copies: the built-in odirect scenario, the flagship's line, the tour's, and a queue
# without BLK_FEAT_PCI_P2PDMA (EREMOTEIO from pinning, as try_grab_folio()).
expect 0 'cmb-copy +nvme0 -> nvme1 +nvme1 BAR2 \(CMB\) .* p2p bus_addr \(under the switch\)' -- sim odirect
expect 0 'mixed-copy +nvme0 -> nvme1 +nvme1 BAR2 \(CMB\) \+ host memory .* 32 MiB +p2p bus_addr \(under the switch\) \+ host memory' -- sim odirect
expect 0 'Every byte verified against its source: 256 MiB in 4 jobs' -- sim odirect
expect 0 '"requests": 1024' -- sim odirect --json
expect 0 'cmb-copy-odirect +nvme0 -> nvme1 +nvme1 BAR2 \(CMB\)' -- sim flagship
expect 0 'cmb-copy-odirect: a process mapped nvme1.s p2pmem allocate file, and 2048 O_DIRECT requests' --
expect 0 'devmem-100g +[0-9.]+ GB/s +32 MiB through host memory +headers to host pages, payload to GPU net_iovs' --
expect 0 'host-copy-100g +[0-9.]+ GB/s +96 MiB through host memory +host page-pool pages, then the GPU.s copy engine' --
expect 0 'devmem-tx-100g +[0-9.]+ GB/s +32 MiB through host memory +headers from host memory, payload sent from GPU net_iovs' --
printf '[[job]]\nname = "nop2p"\ndevice = "nvme0"\ncopy_to = "nvme1"\nbuffer = "nvme1"\np2pdma = false\nsize = "1M"\n' > "$tmp/nop2p.toml"
expect 1 'nop2p .*failed: EREMOTEIO: .*O_DIRECT read of nvme0' -- sim "$tmp/nop2p.toml"
printf '[[job]]\ndevice = "nvme0"\nhost_bytes = "4K"\n' > "$tmp/badhb.toml"
expect 1 'badhb.toml:3: job.host_bytes: only O_DIRECT copies' -- sim "$tmp/badhb.toml"
printf '[[job]]\ndevice = "nvme0"\nrw = "sideways"\n' > "$tmp/bad1.toml"
expect 1 'bad1.toml:3: job.rw' -- sim "$tmp/bad1.toml"
printf '[[job]]\ndevice = "nic0"\nsize = "1M"\n' > "$tmp/bad2.toml"
expect 1 'nic0 is neither an NVMe controller nor a GPU or accelerator' -- sim "$tmp/bad2.toml"
printf 'machine = "xeon-e5-two-sockets"\n[[job]]\ndevice = "nvme1"\nbuffer = "gpu0"\npath = "p2p"\nsize = "1M"\n' > "$tmp/bad3.toml"
expect 1 'EREMOTEIO.*unsupported request' -- sim "$tmp/bad3.toml"
expect 1 "no such file and no built-in scenario" -- sim nosuch
# Jobs at once: the built-in concurrent scenario (three jobs share the switch uplink, then
# one alone after a stonewall), its group report in text and JSON, and the keys' errors.
expect 0 'gpu-upload +gpu0 +host memory write +1M +8 +1 GiB +7\.88 ' -- sim concurrent
expect 0 'group 0 \(at once: gpu-upload, ssd0-write, ssd1-write\): 2 GiB in [0-9.]+ s, 15\.75 GB/s aggregate' -- sim concurrent
expect 0 'group 1 \(alone: gpu-upload-alone\): 1 GiB in [0-9.]+ s, 15\.75 GB/s aggregate' -- sim concurrent
expect 0 '"concurrent": true' -- sim concurrent --json
expect 0 '"failed_jobs": 0' -- sim concurrent --json
printf '[options]\nconcurrent = true\n[[job]]\ndevice = "nvme0"\nstonewall = "yes"\n' > "$tmp/badsw.toml"
expect 1 'badsw.toml:5: job.stonewall: expected true or false' -- sim "$tmp/badsw.toml"
printf '[options]\nconcurrent = 1\n[[job]]\ndevice = "nvme0"\n' > "$tmp/badcc.toml"
expect 1 'badcc.toml:2: options.concurrent: expected true or false' -- sim "$tmp/badcc.toml"
# A job that fails does not lose the others (as fio): every job is reported, the failed one
# with its error, in text and JSON; then the command exits 1 naming the failed jobs.
printf '[[job]]\nname = "first"\ndevice = "nvme0"\nsize = "1M"\nbuffer = "gpu0"\n[[job]]\nname = "second"\ndevice = "nic0"\nsize = "1M"\n' > "$tmp/second-fails.toml"
expect 1 'first +nvme0 +gpu0 BAR1 .* p2p bus_addr \(under the switch\)' -- sim "$tmp/second-fails.toml"
expect 1 'second +nic0 +host +failed: EINVAL: .*second-fails.toml:6: job .second.: nic0 is neither an NVMe controller' -- sim "$tmp/second-fails.toml"
expect 1 'Every byte verified against its source: 1 MiB in 1 jobs' -- sim "$tmp/second-fails.toml"
expect 1 'error: scenario .*second-fails.toml: 1 of 2 jobs failed \(second\)' -- sim "$tmp/second-fails.toml"
"$physr" sim "$tmp/second-fails.toml" --json > "$tmp/second.json" 2>/dev/null
rc=$?
if [[ $rc -eq 1 ]] && python3 - "$tmp/second.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["failed_jobs"] == 1, d["failed_jobs"]
first, second = d["jobs"]
assert first["name"] == "first" and first["verified_bytes"] == 1 << 20 and first["via"] == ["p2p_bus_addr"], first
assert "error" not in first
assert second["name"] == "second" and second["device"] == "nic0" and second["errno"] == "EINVAL", second
assert "nic0 is neither an NVMe controller" in second["error"], second
PY
then passes=$((passes + 1)); else echo "FAIL: sim --json with a failed second job (exit $rc)"; fails=$((fails + 1)); fi
expect 1 '--svg /nonexistent/dir/x.svg' -- sim "$tmp/small.toml" --svg /nonexistent/dir/x.svg

# GPU copy-engine jobs: host to GPU memory, and GPU memory into an SSD's CMB by P2P.
printf '[[job]]\nname = "h2d"\ndevice = "gpu0"\nrw = "write"\nbs = "1M"\nsize = "8M"\n[[job]]\nname = "to-cmb"\ndevice = "gpu0"\nbuffer = "nvme1"\nsize = "4M"\npath = "p2p"\n' > "$tmp/gpu.toml"
expect 0 'h2d +gpu0 +host memory .* host memory' -- sim "$tmp/gpu.toml"
expect 0 'to-cmb +gpu0 +nvme1 BAR2 .* p2p bus_addr \(under the switch\)' -- sim "$tmp/gpu.toml"
expect 0 '"gpu0 copy engine"' -- sim "$tmp/gpu.toml" --json

# Devmem receive (header split into a host page pool and GPU net_iovs) against RX into host
# page-pool pages plus the GPU's copy, at 100 and 400 Gb/s: the built-in scenario.
expect 0 'devmem-100g +nic1->nic0 .*RX devmem with header split \(128 B headers into host page-pool pages, payload into gpu0 BAR1 net_iovs' -- sim devmem
expect 0 'host-copy-400g +nic1->nic0 .*RX host page-pool pages, then gpu0 BAR1.s copy engine' -- sim devmem
# Devmem transmit: headers from host memory, payloads from GPU net_iovs of a TX binding.
expect 0 'devmem-tx-100g +nic0->nic1 .*TX devmem \(128 B headers from host memory, payload from gpu0 BAR1 net_iovs by p2p' -- sim devmem
expect 0 'Every byte verified against its source: 192 MiB in 6 jobs' -- sim devmem
printf '[[job]]\ndevice = "nic0"\nbuffer = "gpu0"\npeer = "nic1"\ntx = "sendfile"\nsize = "1M"\nbs = "4K"\n' > "$tmp/tx.toml"
expect 1 "job.tx: 'sendfile' must be plain or devmem" -- sim "$tmp/tx.toml"
printf '[[job]]\ndevice = "nic0"\nbuffer = "gpu0"\npeer = "nic1"\npeer_buffer = "gpu1"\nrx = "copy"\ntx = "devmem"\nsize = "1M"\nbs = "4K"\n' > "$tmp/txrx.toml"
expect 1 'job.tx: a devmem sender.s receiver takes packets into its RX buffers' -- sim "$tmp/txrx.toml"
printf '[[job]]\ndevice = "nic1"\npeer = "nic0"\npeer_buffer = "gpu0"\nrx = "zerocopy"\nsize = "1M"\nbs = "4K"\n' > "$tmp/rx.toml"
expect 1 "job.rx: 'zerocopy' must be plain, devmem or copy" -- sim "$tmp/rx.toml"
printf '[[job]]\ndevice = "nic1"\npeer = "nic0"\npeer_buffer = "gpu0"\nrx = "devmem"\nheader = 4096\nsize = "1M"\nbs = "4K"\n' > "$tmp/hdr.toml"
expect 1 'header split must be 1 byte to 4 KiB and less than the packet' -- sim "$tmp/hdr.toml"
# HMM jobs: a GPU and an ODP NIC on a process buffer through a mirror while the process
# remaps it (the built-in scenario), the mirror's counts in JSON, the tour's lines, bad keys.
expect 0 'gpu-svm +gpu0 +nvme1 BAR2 \(CMB\) \+ host memory .*hmm mirror: p2p bus_addr \(under the switch\) \+ host memory; [0-9]+ faults, 5 invalidations, 1 retry, 5 of 5 events' -- sim hmm
expect 0 'rdma-odp +nic0 +gpu0 BAR1 \+ host memory .*hmm mirror: p2p thru_host_bridge \(through the root complex\) \+ host memory; [0-9]+ faults, 5 invalidations, 1 retry, 5 of 5 events' -- sim hmm
expect 0 'Every byte verified against its source: 128 MiB in 2 jobs' -- sim hmm
"$physr" sim hmm --json > "$tmp/hmm.json" 2>/dev/null
rc=$?
if [[ $rc -eq 0 ]] && python3 - "$tmp/hmm.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
gpu, nic = d["jobs"]
for j in (gpu, nic):
    assert j["hmm_events"] == 5 and j["hmm_invalidations"] == 5 and j["hmm_retries"] == 1 and j["hmm_faults"] > 32, j
    assert j["verified_bytes"] == 2 * 32 * 2**20, j
assert gpu["via"] == ["host_memory", "p2p_bus_addr"] and gpu["root_complex_bytes"] == 0, gpu
assert nic["via"] == ["host_memory", "p2p_host_bridge"] and nic["root_complex_bytes"] > 0, nic
PY
then passes=$((passes + 1)); else echo "FAIL: sim hmm --json (exit $rc)"; fails=$((fails + 1)); fi
expect 0 'gpu-svm +[0-9.]+ GB/s +faults [0-9]+, invalidations 5, retries 1, changes by the process 5 +P2P by bus address' --
expect 0 'rdma-odp +[0-9.]+ GB/s +faults [0-9]+, invalidations 5, retries 1, changes by the process 5 +P2P through the host bridge' --
printf '[[job]]\ndevice = "gpu0"\nhmm = true\nsize = "1M"\n[[job.event]]\nat_us = 1\nop = "mremap"\nlen = "4K"\n' > "$tmp/hmmop.toml"
expect 1 "hmmop.toml:7: job.event.op: 'mremap' must be anon, p2p or migrate" -- sim "$tmp/hmmop.toml"
printf '[[job]]\ndevice = "gpu0"\nfault_us = 5\n' > "$tmp/hmmkey.toml"
expect 1 'hmmkey.toml:3: job.fault_us: only HMM jobs \(hmm = true\) have one' -- sim "$tmp/hmmkey.toml"
printf '[[job]]\nname = "svm"\ndevice = "gpu0"\nhmm = true\nbuffer = "nvme1"\nbs = "64K"\nqd = 4\nsize = "1M"\n[[job.event]]\nat_us = 0\nop = "p2p"\noffset = "240K"\nlen = "32K"\n' > "$tmp/hmmrange.toml"
expect 1 'svm .*failed: EINVAL: .*event 1: \[245760, \+32768\) must be whole pages of the 256 KiB buffer' -- sim "$tmp/hmmrange.toml"
# A job's own wire rate: 400 Gb/s lifts host-to-host above the default 100 Gb/s wire.
printf '[[job]]\nname = "fast-wire"\ndevice = "nic1"\npeer = "nic0"\nwire_gbps = 50\nbs = "4K"\nqd = 64\nsize = "8M"\n[[job]]\nname = "slow-wire"\ndevice = "nic1"\npeer = "nic0"\nbs = "4K"\nqd = 64\nsize = "8M"\n' > "$tmp/wire.toml"
expect 0 'fast-wire +nic1->nic0 +host -> host +send +4K +64 +8 MiB +15\.[0-9]+ ' -- sim "$tmp/wire.toml"
expect 0 'slow-wire +nic1->nic0 +host -> host +send +4K +64 +8 MiB +12\.[0-9]+ ' -- sim "$tmp/wire.toml"
# The SSD model: 512 B reads stop at the 1 M IOPS limit, latency is a distribution, and the
# report gives each job's rw, bs, qd and size (text and JSON, as fio does).
printf 'name = "ssd"\n[[job]]\nname = "r512"\ndevice = "nvme0"\nbs = 512\nqd = 256\nsize = "8M"\n[[job]]\nname = "rand4k"\ndevice = "nvme0"\nrw = "randread"\nbs = "4K"\nqd = 1\nsize = "8M"\n' > "$tmp/ssd.toml"
expect 0 'r512 +nvme0 +host memory +read +512 +256 +8 MiB +[0-9.]+ +(9[0-9][0-9]\.[0-9]K|1\.00M) ' -- sim "$tmp/ssd.toml"
expect 0 'rand4k +nvme0 +host memory +randread +4K +1 +8 MiB ' -- sim "$tmp/ssd.toml"
"$physr" sim "$tmp/ssd.toml" --json > "$tmp/ssd.json" 2>/dev/null
if python3 - "$tmp/ssd.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r512, rnd = d["jobs"]
assert r512["rw"] == "read" and r512["bs"] == 512 and r512["qd"] == 256 and r512["size"] == 8 << 20, r512
assert r512["iops"] <= 1e6 and r512["ios"] / r512["seconds"] <= 1e6, r512
assert rnd["rw"] == "randread" and rnd["qd"] == 1, rnd
assert rnd["latency_p50_us"] < rnd["latency_p99_us"] < rnd["latency_p999_us"], rnd
PY
then passes=$((passes + 1)); else echo "FAIL: sim --json: rw/bs/qd/size/iops and p50 < p99 < p99.9 for the SSD jobs"; fails=$((fails + 1)); fi
printf '[options]\nseed = 2\n[[job]]\ndevice = "nvme0"\nrw = "randread"\nbs = "4K"\nqd = 1\nsize = "4M"\n' > "$tmp/seed2.toml"
a=$("$physr" sim "$tmp/seed2.toml" --json 2>/dev/null); b=$("$physr" sim "$tmp/seed2.toml" --json 2>/dev/null)
if [ -n "$a" ] && [ "$a" = "$b" ]; then passes=$((passes + 1)); else echo "FAIL: sim: the same seed gives the same report"; fails=$((fails + 1)); fi
printf '[[job]]\ndevice = "nvme0"\nrw = "sideways"\n' > "$tmp/rw.toml"
expect 1 "job.rw: 'sideways' must be read, write, randread or randwrite" -- sim "$tmp/rw.toml"
printf '[[job]]\ndevice = "nvme0"\nwire_gbps = 50\n' > "$tmp/wire-nvme.toml"
expect 1 'job.wire_gbps: only network jobs \(with a peer\) have a wire' -- sim "$tmp/wire-nvme.toml"

# A sysfs snapshot as the machine (a path relative to the scenario's folder): its real BARs
# and tree. Its NICs receive into the VGA BAR across root ports: bounced, or EREMOTEIO.
mkdir -p "$tmp/scen"
job='[[job]]\nname = "nic-rx-vga"\ndevice = "0000:02:00.0"\npeer = "0000:03:00.0"\npeer_buffer = "0000:09:03.0"\nbs = "4K"\nsize = "1M"\n'
printf "machine = \"%s\"\n$job" "$(realpath --relative-to="$tmp/scen" "$snap")" > "$tmp/scen/snap.toml"
expect 0 'nic-rx-vga +0000:02:00.0->0000:03:00.0 +host -> 0000:09:03.0 BAR0 .*RX host \(bounced by the DMA layer\)' -- sim "$tmp/scen/snap.toml"
expect 0 'Every byte verified against its source: 1 MiB in 1 jobs' -- sim "$tmp/scen/snap.toml"
printf "machine = \"%s\"\n${job}path = \"p2p\"\n" "$snap" > "$tmp/scen/snap-p2p.toml"
expect 1 'EREMOTEIO' -- sim "$tmp/scen/snap-p2p.toml"
expect 0 '5 +0000:03:00.1 BAR0 +0xcc001000 .*bus_addr' -- map --machine "$snap" --device 0000:03:00.0 --allow-bounce
mkdir -p "$tmp/notasnapshot"
printf 'machine = "notasnapshot"\n[[job]]\ndevice = "0000:02:00.0"\nsize = "1M"\n' > "$tmp/nosnap.toml"
expect 1 'notasnapshot.*no sys/devices' -- sim "$tmp/nosnap.toml"

# --- qemu ----------------------------------------------------------------------------------
km="$src/tests/kernel/machines"
expect 0 'pcie-root-port,id=f00-03-0,bus=pcie.0,addr=03.0,chassis=2,slot=2' -- qemu --machine "$km/switch.toml"
expect 0 'x3130-upstream,id=f02-00-0,bus=f00-03-0,addr=00.0' -- qemu --machine "$km/switch.toml"
expect 0 'xio3130-downstream,id=f03-01-0,bus=f02-00-0,addr=01.0,chassis=4,slot=4' -- qemu --machine "$km/switch.toml"
expect 0 'nvme,id=f04-00-0,bus=f03-00-0,addr=00.0,serial=sw-cmb,drive=f04-00-0-ns,cmb_size_mb=16' -- qemu --machine "$km/switch.toml"
expect 0 'driver=null-co,node-name=f04-00-0-ns' -- qemu --machine "$km/switch.toml"
expect 0 'file=/d/sw-cmb.img' -- qemu --machine "$km/switch.toml" --disk-dir /d
expect 0 '^  -machine q35,kernel-irqchip=split' -- qemu --machine "$km/switch.toml" --iommu
expect 0 '^  -device intel-iommu,intremap=on' -- qemu --machine "$km/switch.toml" --iommu
expect 0 "-append 'console=ttyS0 panic=-1 intel_iommu=on quiet'" -- qemu --machine "$km/switch.toml" --iommu --kernel bz --append quiet
expect 0 "pci=disable_acs_redir=0000:00:02.0" -- qemu --machine "$km/multifunction.toml" --iommu --disable-acs-redir 00:02.0
expect 0 "pci=disable_acs_redir=pci:1b36:000c" -- qemu --machine "$km/multifunction.toml" --iommu --disable-acs-redir all
expect 0 'root port 0000:00:02.0: ACS none in the machine; the guest kernel sets SV RR CR UF' -- qemu --machine "$km/multifunction.toml" --iommu
expect 0 'without --iommu' -- qemu --machine "$km/multifunction.toml" --disable-acs-redir all
expect 0 'nvme,id=f01-00-0,bus=f00-02-0,addr=00.0,multifunction=on' -- qemu --machine "$km/multifunction.toml"
expect 0 'nvme,id=f01-00-1,bus=f00-02-0,addr=00.1,serial=mf-cmb' -- qemu --machine "$km/multifunction.toml"
expect 0 'nvme,id=f00-04-0,bus=pcie.0,addr=04.0' -- qemu --machine "$km/root-bus.toml"
expect 0 'pxb-pcie,id=hb20,bus_nr=32,bus=pcie.0,addr=1e.0' -- qemu --machine "$km/pxb.toml"
expect 0 'pcie-root-port,id=f20-01-0,bus=hb20,addr=01.0' -- qemu --machine "$km/pxb.toml"
expect 0 '^  -cpu EPYC \\$' -- qemu --machine "$km/epyc.toml"
expect 0 'e1000e,id=f03-00-0' -- qemu --machine "$km/epyc.toml"
expect 0 'edu,id=f04-00-0.*' -- qemu --machine "$km/epyc.toml"
expect 0 '^  -cpu EPYC \\$' -- qemu --machine "$km/switch.toml" --assume-cpu amd-zen
expect 0 'GenuineIntel family 0x6: the guest keeps TCG.s default qemu64' -- qemu --machine "$km/switch.toml"
expect 0 '# cannot emulate:' -- qemu --machine two-socket-switch
expect 0 'host bridge 0000:00:00.0 8086:2020: the guest.s is q35.s 8086:29c0' -- qemu --machine two-socket-switch
expect 0 'switch port 0000:02:11.0: ACS SV RR CR UF in the machine; QEMU.s xio3130-downstream has no ACS capability, so nothing redirects there in the guest \(verdicts through it differ\)' -- qemu --machine two-socket-switch
expect 0 '3D controller 0000:05:00.0 \(gpu0\) 10de:.*stand-in \(edu' -- qemu --machine two-socket-switch
expect 0 'bus offset of 0xffff810000000000' -- qemu --machine arm64-offset
expect 1 '0000:00:01.1: device 01 on bus 00 has no function 0' -- qemu --machine amd-zen
expect 1 "machine 'nosuch'" -- qemu --machine nosuch
expect 1 '--disable-acs-redir nosuch' -- qemu --machine "$km/switch.toml" --iommu --disable-acs-redir nosuch
expect 2 'amd-zen or other' -- qemu --machine "$km/switch.toml" --assume-cpu arm
expect 2 'need --kernel' -- qemu --machine "$km/switch.toml" --initrd x
expect 2 'machine' -- qemu
qm() {  # qm NAME FUNCTION-TOML: a q35 machine with one more function
  printf '[[host_bridge]]\nbus = 0\n[[function]]\nbdf = "00:02.0"\nvendor = 0x1b36\ndevice = 0xc\nclass = 0x060400\ntype = "root_port"\n%s\n' "$2" > "$tmp/$1.toml"
}
qm pcibridge '[[function]]
bdf = "01:00.0"
vendor = 0x1b36
device = 0xe
class = 0x060400
type = "pcie_to_pci_bridge"
parent = "00:02.0"'
expect 1 '0000:01:00.0: a pcie_to_pci_bridge bridge: physr qemu builds only root ports and switch ports' -- qemu --machine "$tmp/pcibridge.toml"
qm ich9 '[[function]]
bdf = "00:1f.0"
vendor = 0x8086
device = 0x2918
class = 0x060100'
expect 0 "ISA bridge 0000:00:1f.0 8086:2918: left out; q35's own functions occupy devices 00 and 1f" -- qemu --machine "$tmp/ich9.toml"
# A real snapshot: its conventional PCI bridge (00:1e.0, inferred as a root port) has devices
# QEMU's root ports cannot hold.
expect 1 '0000:09:03.0: device 03 below the port 0000:00:1e.0: Linux scans only device 00' -- qemu --machine "$snap"
qm dev1 '[[function]]
bdf = "01:01.0"
vendor = 0x1b36
device = 0x10
class = 0x010802
parent = "00:02.0"'
expect 1 '0000:01:01.0: device 01 below the port 0000:00:02.0: Linux scans only device 00' -- qemu --machine "$tmp/dev1.toml"
qm renumber '[[function]]
bdf = "05:00.0"
vendor = 0x1b36
device = 0x10
class = 0x010802
parent = "00:02.0"'
expect 0 'bus 05 of the machine is bus 01 in the guest' -- qemu --machine "$tmp/renumber.toml"
# The output is a shell command: comments, then QEMU's arguments.
for m in "$km"/*.toml two-socket-switch arm64-offset xeon-e5-two-sockets; do
  if "$physr" qemu --machine "$m" --iommu --kernel /k --initrd /i --append 'a b' > "$tmp/q.sh" && bash -n "$tmp/q.sh" &&
     grep -q "^qemu-system-x86_64 " "$tmp/q.sh"; then
    passes=$((passes + 1))
  else
    echo "FAIL: physr qemu --machine $m is not a shell command"; fails=$((fails + 1))
  fi
done

for what in "switch:--machine two-socket-switch" "snap:--sysfs-root $snap" "zen:--machine amd-zen"; do
  kind=${what%%:*}
  # shellcheck disable=SC2086
  if "$physr" topo ${what#*:} --json > "$tmp/out.json" && check_json "$tmp/out.json" "$kind"; then
    passes=$((passes + 1))
  else
    echo "FAIL: topo --json ($kind)"; fails=$((fails + 1))
  fi
done

# A snapshot with FIFOs and a device-node symlink where attributes should be: topo finishes
# (bounded by timeout: before, it blocked forever) and warns about each skipped file.
fifo=$tmp/fifo-snap
mkdir -p "$fifo/sys/devices/pci0000:00/0000:00:01.0" "$fifo/proc"
d=$fifo/sys/devices/pci0000:00/0000:00:01.0
printf '0x8086\n' > "$d/vendor"; printf '0x1234\n' > "$d/device"; printf '0x010802\n' > "$d/class"
mkfifo "$d/numa_node" "$fifo/proc/cpuinfo"
ln -s /dev/zero "$d/config"
out=$(timeout 60 "$physr" topo --sysfs-root "$fifo" 2>&1); rc=$?
if [[ $rc -eq 0 ]] && grep -q 'numa_node: a FIFO, not a regular file; ignored' <<<"$out" &&
   grep -q 'cpuinfo: a FIFO, not a regular file; ignored' <<<"$out" && grep -q 'config: a symbolic link' <<<"$out"; then
  passes=$((passes + 1))
else
  echo "FAIL: topo on a snapshot with FIFOs (exit $rc)"; echo "$out" | head -5; fails=$((fails + 1))
fi

# Arguments that name nothing: a directory where a file is expected, an empty value.
expect 1 "pfn file '.*': is a directory" -- ranges --pfns "$tmp"
expect 1 "EISDIR: scenario '.*': is a directory" -- sim "$tmp"
expect 2 '--machine: empty argument' -- topo --machine ""
expect 2 '--sysfs-root: empty argument' -- topo --sysfs-root ""
expect 2 '--machine: empty argument' -- map --machine ""
expect 2 '--pfns: empty argument' -- ranges --pfns ""
expect 2 'scenario: empty argument' -- sim ""
if printf '0x1000\n0x1001\n' | "$physr" ranges --pfns - | grep -q '^2 pfns (-) -> 1 ranges'; then passes=$((passes + 1)); else echo "FAIL: ranges --pfns - (stdin)"; fails=$((fails + 1)); fi
# A trailing slash on --sysfs-root still names the machine after its folder.
if "$physr" topo --sysfs-root "$fifo/" --json 2>/dev/null | grep -q '"machine": *"fifo-snap"'; then passes=$((passes + 1)); else echo "FAIL: --sysfs-root with a trailing slash"; fails=$((fails + 1)); fi
# Names that could forge output lines, or that scenarios reserve, are refused; DOT escapes quotes.
printf '[[host_bridge]]\nbus = 0\n[[function]]\nbdf = "00:01.0"\nname = "a\\nb"\nvendor = 1\ndevice = 2\nclass = 0x010802\n' > "$tmp/name-nl.toml"
expect 1 'name-nl.toml:5: function\[0\] \(0000:00:01.0\).name: control character 0xa' -- topo --machine "$tmp/name-nl.toml"
printf '[[host_bridge]]\nbus = 0\n[[function]]\nbdf = "00:01.0"\nname = "q\\"x\\\\y"\nvendor = 1\ndevice = 2\nclass = 0x010802\n' > "$tmp/name-q.toml"
expect 0 '0000:00:01.0 \(q\\"x\\\\y\)' -- topo --machine "$tmp/name-q.toml" --dot
# --- the linux layer: physr p2pmem-test and physr doctor ------------------------------------
# p2pmem-test between two regular files through host memory, where O_DIRECT works (ext4, xfs;
# tmpfs only since Linux 6.6): the build tree first, else the scratch folder.
odir=""
for base in "$PWD" "$tmp"; do
  mkdir -p "$base/odirect.$$" && head -c 1048576 /dev/urandom > "$base/odirect.$$/src" && : > "$base/odirect.$$/dst"
  if python3 -c 'import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT))' "$base/odirect.$$/src" 2>/dev/null; then
    odir=$base/odirect.$$; break
  fi
  rm -rf "$base/odirect.$$"
done
if [[ -n $odir ]]; then
  expect 0 'Copied 1 MiB .* GB/s, [0-9]+ IOPS \(256 reads, 256 writes\)' -- p2pmem-test "$odir/src" "$odir/dst" -c 256 -t 2 --check
  expect 0 'Checked every byte: 1 MiB compared' -- p2pmem-test "$odir/src" "$odir/dst" -c 256 --check
  expect 0 'read: .*src .*host memory, not P2P' -- p2pmem-test "$odir/src" "$odir/dst" -c 16 -s 8K --seed 3
  if cmp -s "$odir/src" "$odir/dst"; then passes=$((passes + 1)); else echo "FAIL: p2pmem-test --check: dst differs from src"; fails=$((fails + 1)); fi
  head -c 4096 "$odir/src" > "$odir/small"
  expect 1 'EIO: .*small: short read: 0 of 4096 bytes at offset 4096' -- p2pmem-test "$odir/small" "$odir/dst" -c 2
  expect 1 'ENODEV: .*0000:00:1f.7/p2pmem|ENOENT: .*0000:00:1f.7: no such PCI function' -- p2pmem-test "$odir/src" "$odir/dst" 0000:00:1f.7
  rm -rf "$odir"
else
  echo "note: no folder here supports O_DIRECT; p2pmem-test copies not run"
fi
# tmpfs: O_DIRECT works (Linux 6.6+) or is refused with a message that says why.
if [[ -d /dev/shm && -w /dev/shm ]]; then
  shm=$(mktemp -d /dev/shm/physr-cli.XXXXXX)
  head -c 8192 /dev/zero > "$shm/a"; : > "$shm/b"
  out=$(timeout 60 "$physr" p2pmem-test "$shm/a" "$shm/b" -c 2 2>&1); rc=$?
  if [[ $rc -eq 0 ]] || { [[ $rc -eq 1 ]] && grep -q 'does not support O_DIRECT' <<<"$out"; }; then passes=$((passes + 1));
  else echo "FAIL: p2pmem-test on tmpfs (exit $rc)"; echo "$out" | head -3; fails=$((fails + 1)); fi
  rm -rf "$shm"
fi
mkfifo "$tmp/p2p-fifo"
out=$(timeout 60 "$physr" p2pmem-test "$tmp/p2p-fifo" "$tmp/nothing" 2>&1); rc=$?
if [[ $rc -eq 1 ]] && grep -q 'p2p-fifo: a FIFO, neither a block device nor a regular file' <<<"$out"; then passes=$((passes + 1));
else echo "FAIL: p2pmem-test with a FIFO (exit $rc)"; fails=$((fails + 1)); fi
expect 1 "ENOENT: .*missing-dev" -- p2pmem-test "$tmp/missing-dev" "$tmp/nothing"
expect 2 'chunk-size 1000: must be a non-zero multiple of 512' -- p2pmem-test /dev/null /dev/null -s 1000
expect 2 'chunks: must be at least 1' -- p2pmem-test /dev/null /dev/null -c 0
expect 2 "'nvme0': expected a PCI address" -- p2pmem-test /dev/null /dev/null nvme0
# A fake sysfs tree: p2pmem not published, one whose allocate is not the kernel's, a FIFO attribute.
fk=$tmp/p2pfake/sys/bus/pci/devices/0000:05:00.0/p2pmem
mkdir -p "$fk"; echo 16777216 > "$fk/size"; echo 16777216 > "$fk/available"; echo 0 > "$fk/published"; : > "$fk/allocate"
: > "$tmp/p2p-src"
expect 1 'ENODEV: .*published: 0: the P2P memory of 0000:05:00.0 is not published' -- p2pmem-test "$tmp/p2p-src" "$tmp/p2p-src" 05:00.0 --sysfs-root "$tmp/p2pfake"
expect 1 'allocate: not on sysfs' -- p2pmem-test "$tmp/p2p-src" "$tmp/p2p-src" "$tmp/p2pfake/sys/bus/pci/devices/0000:05:00.0/p2pmem" --sysfs-root "$tmp/p2pfake" --allow-unpublished
rm "$fk/available"; mkfifo "$fk/available"
out=$(timeout 60 "$physr" p2pmem-test "$tmp/p2p-src" "$tmp/p2p-src" 05:00.0 --sysfs-root "$tmp/p2pfake" 2>&1); rc=$?
if [[ $rc -eq 1 ]] && grep -q 'p2pmem/available: a FIFO, not a regular file' <<<"$out"; then passes=$((passes + 1));
else echo "FAIL: p2pmem-test with a FIFO attribute (exit $rc)"; echo "$out" | head -3; fails=$((fails + 1)); fi

# doctor on a snapshot: findings with severities and fixes, pairs with link classes, --json's keys.
expect 0 '\[ +info +\] ACS unknown on .* \(acs.unknown\)' -- doctor --sysfs-root "$snaps/40intel64-2g2n4c+pci"
expect 0 '0000:02:00.0 -> 0000:02:00.1 +bus_addr +2 +PIX +02:00.0 > 00:05.0 < 02:00.1' -- doctor --sysfs-root "$snaps/40intel64-2g2n4c+pci"
expect 0 'PIX  = Connection traversing at most a single PCIe bridge' -- doctor --sysfs-root "$snaps/40intel64-2g2n4c+pci"
if "$physr" doctor --sysfs-root "$snaps/40intel64-2g2n4c+pci" --json > "$tmp/doctor.json" && python3 - "$tmp/doctor.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["live"] is False and d["kernel"] == "", d["kernel"]
ids = {f["id"] for f in d["findings"]}
assert {"kernel.version", "kernel.p2pdma", "iommu", "pci", "acs.unknown", "p2pmem", "pairs"} <= ids, ids
for f in d["findings"]:
    assert set(f) == {"id", "severity", "title", "detail", "fix"}, f
    assert f["severity"] in ("ok", "info", "warning", "error"), f
p = d["pairs"][0]
assert set(p) == {"provider", "client", "map_type", "distance", "link_class", "path"}, p
assert set(d["link_classes"]) == {"X", "PIX", "PXB", "PHB", "NODE", "SYS"}
PY
then passes=$((passes + 1)); else echo "FAIL: doctor --json"; fails=$((fails + 1)); fi
expect 1 "ENOENT: root '$tmp/no-root': not a directory" -- doctor --sysfs-root "$tmp/no-root"
# This host, whoever runs it: it works, and unprivileged it says what root would add.
if [[ $(id -u) -ne 0 ]]; then expect 0 'Unprivileged: some facts are missing' -- doctor; else expect 0 '\(kernel.version\)' -- doctor; fi

# explain --json: the explanation as data; topo --json: BARs, link speed and width, and the
# allowlist's answer per host bridge (fields added; pairs keep provider, client, map_type, distance).
if "$physr" explain nic0 gpu0 --machine two-socket-switch --json > "$tmp/explain.json" 2>/dev/null && python3 - "$tmp/explain.json" <<'PY'
import json, sys
x = json.load(open(sys.argv[1]))
assert x["map_type"] == "thru_host_bridge" and x["link_class"] == "PHB", x["map_type"]
assert x["acs_redirecting"] == ["0000:02:11.0"] and x["common_upstream"] == "0000:01:00.0"
assert x["allowlist"][0]["listed"] and x["allowlist"][0]["passes"]
assert x["kernel_parameter"].startswith("pci=disable_acs_redir=") and "--assume-acs-off 0000:02:11.0" in x["what_if"]
assert x["provider"]["name"] == "nic0" and x["client"]["name"] == "gpu0"
assert [h["bdf"] for h in x["client_path"]] == ["0000:02:10.0", "0000:05:00.0"]
PY
then passes=$((passes + 1)); else echo "FAIL: explain --json"; fails=$((fails + 1)); fi
if "$physr" topo --machine two-socket-switch --json > "$tmp/topo.json" 2>/dev/null && python3 - "$tmp/topo.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
gpu = next(f for f in t["functions"] if f.get("name") == "gpu0")
assert gpu["link_speed_gts"] == 16.0 and gpu["link_width"] == 16, gpu
bar1 = next(b for b in gpu["bars"] if b["bar"] == 1)
assert bar1["size"] == 64 << 30 and bar1["prefetchable"] and bar1["memory"] and bar1["base"] > 0, bar1
assert all("allowlisted" in h and "identifying_device" in h for h in t["host_bridges"])
assert set(t["pairs"][0]) >= {"provider", "client", "map_type", "distance"}
PY
then passes=$((passes + 1)); else echo "FAIL: topo --json BARs, link and allowlist fields"; fails=$((fails + 1)); fi
# topo --json's link class per pair (derived from the verdict) agrees with explain's (from
# the path) on every pair of every built-in machine.
if python3 - "$physr" <<'PY'
import json, subprocess, sys
physr = sys.argv[1]
for machine in ["two-socket-switch", "amd-zen", "xeon-e5-two-sockets", "arm64-offset"]:
    topo = json.loads(subprocess.run([physr, "topo", "--machine", machine, "--json"], capture_output=True, check=True).stdout)
    for pair in topo["pairs"]:
        x = json.loads(subprocess.run([physr, "explain", pair["provider"], pair["client"], "--machine", machine, "--json"],
                                      capture_output=True, check=True).stdout)
        assert pair["link_class"] == x["link_class"], (machine, pair, x["link_class"])
PY
then passes=$((passes + 1)); else echo "FAIL: topo --json link_class differs from explain's"; fails=$((fails + 1)); fi
# The text tree tells each BAR's size and the link, as lspci -v does.
expect 0 '\(gpu0\) .*BAR0 16M BAR1 64G pref  LnkSta 16GT/s x16' -- topo --machine two-socket-switch
# The matrix's columns are headed by device names, and the link classes follow with their legend.
expect 0 'nvme0 nvme1  gpu0  nic0 nvme2  nic1' -- topo --machine two-socket-switch
expect 0 '\(gpu0\) +PIX +PIX +X +PHB +SYS +SYS' -- topo --machine two-socket-switch
expect 0 'PHB  = through a PCIe host bridge' -- topo --machine two-socket-switch
# --assume-acs-off by name as well as by address.
sed 's/^bdf = "0000:02:11.0"$/bdf = "0000:02:11.0"\nname = "sw0-dp3"/' "$src/machines/two-socket-switch.toml" > "$tmp/named-port.toml"
expect 0 'Verdict: bus_addr' -- explain nic0 gpu0 --machine "$tmp/named-port.toml" --assume-acs-off sw0-dp3
expect 0 'Verdict: bus_addr' -- explain nic0 gpu0 --machine "$tmp/named-port.toml" --assume-acs-off 0000:02:11.0
expect 2 "nosuch.*nor a device name of" -- explain nic0 gpu0 --machine "$tmp/named-port.toml" --assume-acs-off nosuch

finish cli
