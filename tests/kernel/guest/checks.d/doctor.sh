# physr doctor on the live guest, and the facts its findings must match, read here without
# physr; tests/kernel/compare.py (check_doctor()) compares them:
#   PHYSR-DOCTOR-BEGIN / the JSON of `physr doctor --json` / PHYSR-DOCTOR-END rc=N
#   PHYSR-DOCTOR acs BDF ctl=XXXX     ACS Control of every function with an ACS capability,
#                                     read from config space with od (extended capability 0x000d)
#   PHYSR-DOCTOR iommu units=N groups=N   /sys/class/iommu, /sys/kernel/iommu_groups
#   PHYSR-DOCTOR p2pmem BDF size=N available=N published=N   sysfs p2pmem attributes
#   PHYSR-DOCTOR kernel release=R config=LINE   uname -r, CONFIG_PCI_P2PDMA from /proc/config.gz
# This script fails only when it cannot run.
echo "PHYSR-DOCTOR-BEGIN"
physr doctor --json
echo "PHYSR-DOCTOR-END rc=$?"

# A little-endian 32-bit word of a config space at an offset.
rd32() { od -An -t x4 -j "$2" -N 4 "$1" 2>/dev/null | tr -d ' \n'; }
for d in /sys/bus/pci/devices/*; do
  off=256
  n=0
  # the extended capability list (PCIe 4 KiB config space): header ID[15:0] next[31:20]
  while [ $off -ne 0 ] && [ $n -lt 64 ]; do
    h=$(rd32 "$d/config" $off)
    { [ -z "$h" ] || [ "$h" = 00000000 ] || [ "$h" = ffffffff ]; } && break
    if [ $((0x$h & 0xffff)) -eq 13 ]; then
      v=$(rd32 "$d/config" $((off + 4)))
      printf 'PHYSR-DOCTOR acs %s ctl=%04x\n' "$(basename "$d")" $((0x$v >> 16))
    fi
    off=$(((0x$h >> 20) & 0xffc))
    n=$((n + 1))
  done
done

units=0
for u in /sys/class/iommu/*; do [ -e "$u" ] && units=$((units + 1)); done
groups=0
for g in /sys/kernel/iommu_groups/*; do [ -e "$g" ] && groups=$((groups + 1)); done
echo "PHYSR-DOCTOR iommu units=$units groups=$groups"

for d in /sys/bus/pci/devices/*; do
  [ -e "$d/p2pmem/size" ] || continue
  echo "PHYSR-DOCTOR p2pmem $(basename "$d") size=$(cat "$d/p2pmem/size") available=$(cat "$d/p2pmem/available") published=$(cat "$d/p2pmem/published")"
done

echo "PHYSR-DOCTOR kernel release=$(uname -r) config=$(zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_PCI_P2PDMA[= ]' | tr ' ' _)"
exit 0
