#!/usr/bin/env bash
# Command-line behaviour of physr: exit codes (0 ok, 1 failure, 2 usage) and messages that
# name the bad input.
# Usage: cli_test.sh PHYSR SOURCE [SNAPSHOTS] (the extracted sysfs snapshots; default: a
# scratch folder)
set -u
physr=$1
src=$2
tmp=$(mktemp -d)
snaps=${3:-$tmp/snapshots}
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
expect 2 "'banana' is neither a PCI address" -- explain banana nvme0 --machine two-socket-switch
expect 2 'provider is required|required' -- explain --machine two-socket-switch
expect 2 "--assume-cpu 'intel'" -- topo --machine amd-zen --assume-cpu intel
expect 2 "PCI address 'xyz'" -- topo --machine amd-zen --assume-acs-off xyz
expect 2 'excludes' -- topo --machine amd-zen --sysfs-root /
expect 1 'not in builtin:amd-zen' -- topo --machine amd-zen --assume-acs-off 0000:44:00.0

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
expect 0 'iommu\+mmio' -- map
expect 0 'every IOVA, page-table entry and bounce slot returned' -- map --device gpu0 --dir bidirectional
expect 1 'EREMOTEIO: range 2 .*not supported and bouncing was not allowed' -- map --machine xeon-e5-two-sockets --device nvme1
expect 0 'iommu\+bounced' -- map --machine xeon-e5-two-sockets --device nvme1 --allow-bounce
expect 0 'direct\+bounced' -- map --direct --dma-mask 32 --range host:5G:8K
expect 0 '0x1000000001000 +4 KiB +direct$' -- map --direct --dma-offset 0x1000000000000 --range host:0x1000:4K
expect 0 '"unmapped_clean": true' -- map --json
expect 2 "--range 'foo'" -- map --range foo
expect 2 'no memory BAR 9' -- map --range gpu0.bar9:0:4K
expect 2 'host memory is' -- map --range host:3G:4K
expect 2 "--dir 'sideways'" -- map --dir sideways
expect 2 'bits must be 24 to 64' -- map --dma-mask 8
expect 2 'power of two' -- map --boundary 3K
expect 2 "no PCI function|neither" -- map --device nosuch
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
printf '[[job]]\ndevice = "nvme0"\nrw = "sideways"\n' > "$tmp/bad1.toml"
expect 1 'bad1.toml:3: job.rw' -- sim "$tmp/bad1.toml"
printf '[[job]]\ndevice = "nic0"\nsize = "1M"\n' > "$tmp/bad2.toml"
expect 1 'nic0 is neither an NVMe controller nor a GPU or accelerator' -- sim "$tmp/bad2.toml"
printf 'machine = "xeon-e5-two-sockets"\n[[job]]\ndevice = "nvme1"\nbuffer = "gpu0"\npath = "p2p"\nsize = "1M"\n' > "$tmp/bad3.toml"
expect 1 'EREMOTEIO.*unsupported request' -- sim "$tmp/bad3.toml"
expect 1 "no such file and no built-in scenario" -- sim nosuch
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

echo "cli: $passes passed, $fails failed"
[[ $fails -eq 0 ]]
