# The p2pmem data path: for every p2pmem provider and every ordered pair of NVMe
# namespaces (READ, WRITE), `physr p2pmem-test READ WRITE PROVIDER`: O_DIRECT reads from
# READ's controller into the provider's p2pmem, writes from there to WRITE's controller.
# Without an IOMMU each run seeds READ with a pattern, checks every chunk in p2pmem after its
# read (--seed) and both ranges after the copy (--check), so the bytes must round-trip. With
# a vIOMMU, QEMU sends all device DMA through it: bus-address transfers fault there while the
# NVMe command reports success, so only the outcome (EREMOTEIO or not) is recorded.
#
# One result line per run, judged on the host by tests/kernel/compare.py against physr's
# verdicts (physr topo --json in this guest) and the oracle's map types:
#   PHYSR-P2PMEM provider=BDF read=BDF write=BDF mode=data|verdict rc=N failed=-|read|write errno=NAME|-
# followed by p2pmem-test's output, indented. This script fails only when it cannot run.
iommu=0
for u in /sys/class/iommu/*; do [ -e "$u" ] && iommu=1; done
mode=data
[ $iommu = 1 ] && mode=verdict

providers=
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/p2pmem/allocate" ] && providers="$providers $(basename "$d")"
done
namespaces=
for b in /sys/block/nvme*n1; do
  [ -e "$b" ] && namespaces="$namespaces /dev/$(basename "$b")"
done
if [ -z "$providers" ] || [ -z "$namespaces" ]; then
  echo "PHYSR-P2PMEM skipped: providers=[$providers ] namespaces=[$namespaces ]"
  exit 0
fi

# The PCI function of a namespace's controller: /sys/block/X/device is the nvme controller,
# its device the PCI function (what physr's probe_device() finds through /sys/dev/block).
ctrl_of() { basename "$(readlink -f "/sys/block/$(basename "$1")/device/device")"; }

for ns in $namespaces; do
  [ -w "$ns" ] || { echo "PHYSR-P2PMEM cannot write $ns"; exit 1; }
done
count=0
for ns in $namespaces; do count=$((count + 1)); done
echo "PHYSR-P2PMEM mode=$mode providers=$(printf %s "${providers# }" | tr ' ' ,) namespaces=$count"

# The kernel's "critical target error" lines for refused I/O would interleave with the
# result lines on the serial console: keep them in the ring buffer only while this runs.
level=$(cut -f1 /proc/sys/kernel/printk)
dmesg -n 1

# run LABEL READ WRITE [PROVIDER]: one p2pmem-test and its result line.
run() {
  label=$1
  r=$2
  w=$3
  shift 3
  seed=$((seed + 1))
  if [ $mode = data ]; then
    physr p2pmem-test "$r" "$w" "$@" -s 4K -c 32 -t 2 --seed $seed --check >/tmp/p2pmem.out 2>&1
  else
    physr p2pmem-test "$r" "$w" "$@" -s 4K -c 32 -t 2 >/tmp/p2pmem.out 2>&1
  fi
  rc=$?
  failed=-
  errno=-
  if [ $rc != 0 ]; then
    # the engine's message: "DEV: O_DIRECT read of N bytes at offset X into ... failed: EREMOTEIO ..."
    failed=$(grep -o 'O_DIRECT [a-z]* of' /tmp/p2pmem.out | head -1 | cut -d' ' -f2)
    [ -n "$failed" ] || failed=other
    errno=$(grep -oE 'failed: E[A-Z0-9]+' /tmp/p2pmem.out | head -1 | cut -d' ' -f2)
    [ -n "$errno" ] || errno=$(grep -oE '\bE[A-Z0-9]{3,}\b' /tmp/p2pmem.out | head -1)
    [ -n "$errno" ] || errno=unknown
  fi
  echo "PHYSR-P2PMEM provider=$label read=$(ctrl_of "$r") write=$(ctrl_of "$w") mode=$mode rc=$rc failed=$failed errno=$errno"
  # its output up to physr explain's account of a refused pair (the first blank line)
  sed -n '1,/^$/p' /tmp/p2pmem.out | sed '/^$/d; s/^/    /'
}

seed=1
# host memory first: the engine and the namespaces work at all
# shellcheck disable=SC2086  # a word list by design
set -- $namespaces
if [ $count -gt 1 ]; then run host "$1" "$2"; else run host "$1" "$1"; fi
for p in $providers; do
  for r in $namespaces; do
    for w in $namespaces; do
      # READ and WRITE differ, unless there is only one namespace.
      [ "$r" = "$w" ] && [ $count -gt 1 ] && continue
      run "$p" "$r" "$w" "$p"
    done
  done
done
dmesg -n "$level"
exit 0
