#!/usr/bin/env python3
"""Compares one guest boot of scripts/test-kernel: physr's verdicts on the live sysfs with
the kernel's own (tests/kernel/oracle), pair by pair, and the guest's tree with the machine
file `physr qemu` built it from.

Usage: compare.py CASE LOG MACHINE_JSON QEMU_SH [physr qemu options of the case]
  LOG           the guest's serial console (tests/kernel/guest/init's markers)
  MACHINE_JSON  `physr topo --json --machine FILE` on the host
  QEMU_SH       what `physr qemu` printed for the case (its NVMe devices with cmb_size_mb)
Prints one line per failed check and a summary line; exit 1 when anything differs.
"""
import json
import re
import sys

PAIR = re.compile(r"physr-oracle: pair provider=(\S+) client=(\S+) p2pmem=(\d) distance=(-?\d+) map=(\S+)")
DONE = re.compile(r"physr-oracle: done pairs=(\d+)")
CHECK_END = re.compile(r"PHYSR-CHECK-END (\S+) rc=(\d+)")

# What the guest kernel leaves in a QEMU pcie-root-port's ACS Control (capability SV TB RR
# CR UF DT, firmware value 0): Linux pci_enable_acs() sets SV RR CR UF when an IOMMU
# requested ACS (pci_std_enable_acs()); for a port pci=disable_acs_redir= lists,
# __pci_config_acs() takes every bit outside RR CR EC from the firmware's value, so the port
# ends with none; nothing is set without an IOMMU.
def expected_root_port_acs(iommu, redir_off):
    if redir_off or not iommu:
        return "-"
    return "SV RR CR UF"


def main():
    case, log_path, machine_path, qemu_path = sys.argv[1:5]
    opts = sys.argv[5:]
    iommu = "--iommu" in opts
    acs_off = []
    for i, o in enumerate(opts):
        if o == "--disable-acs-redir" and i + 1 < len(opts):
            acs_off = opts[i + 1].split(",")
        elif o.startswith("--disable-acs-redir="):
            acs_off = o.split("=", 1)[1].split(",")
    text = open(log_path, errors="replace").read().replace("\r", "")
    machine = json.load(open(machine_path))
    fails = []

    def fail(msg):
        fails.append(msg)

    if "PHYSR-GUEST end" not in text:
        fail("the guest did not reach the end of /init (see the log)")
    m = re.search(r"PHYSR-TOPO-BEGIN\n(.*?)\nPHYSR-TOPO-END rc=(\d+)", text, re.S)
    if not m:
        print(f"FAIL {case}: no physr topo --json output in the log")
        return 1
    if m.group(2) != "0":
        fail(f"physr topo --json exited {m.group(2)} in the guest")
    try:
        guest = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        print(f"FAIL {case}: physr topo --json output is not JSON: {e}")
        return 1
    oracle = {}
    p2pmem = set()
    for pm in PAIR.finditer(text):
        prov, cl, has, dist, mapt = pm.groups()
        oracle[(prov, cl)] = (int(dist), mapt)
        if has == "1":
            p2pmem.add(prov)
    done = DONE.search(text)
    if not done:
        fail("the oracle module printed no 'done' line")
    elif int(done.group(1)) != len(oracle):
        fail(f"the oracle reported {done.group(1)} pairs, the log has {len(oracle)}")
    for cm in CHECK_END.finditer(text):
        if cm.group(2) != "0":
            fail(f"guest check {cm.group(1)} exited {cm.group(2)}")

    # Pair by pair: the kernel's distance (-1: not supported) and, for providers with
    # p2pmem, the map type dma_map_sgtable() chose.
    physr = {(p["provider"], p["client"]): (p["map_type"], p["distance"]) for p in guest["pairs"]}
    for k in sorted(set(oracle) - set(physr)):
        fail(f"pair {k[0]} -> {k[1]}: the kernel lists it, physr does not")
    for k in sorted(set(physr) - set(oracle)):
        fail(f"pair {k[0]} -> {k[1]}: physr lists it, the kernel does not")
    compared_maps = 0
    for k in sorted(set(oracle) & set(physr)):
        kdist, kmap = oracle[k]
        ptype, pdist = physr[k]
        want = -1 if ptype == "not_supported" else pdist
        if kdist != want:
            fail(f"pair {k[0]} -> {k[1]}: kernel distance {kdist}, physr {ptype} distance {pdist}")
        if kmap != "none":
            compared_maps += 1
            if kmap != ptype:
                fail(f"pair {k[0]} -> {k[1]}: kernel dma_map_sgtable() gave {kmap}, physr says {ptype}")

    # The tree physr qemu built: every machine function at its address with its port type
    # (host-bridge functions aside: q35 has its own), and p2pmem exactly on the CMBs.
    gfn = {f["bdf"]: f for f in guest["functions"]}
    for f in machine["functions"]:
        if f["class"].startswith("0600"):
            continue
        g = gfn.get(f["bdf"])
        if not g:
            fail(f"machine function {f['bdf']} ({f.get('name', f['class_name'])}) is not in the guest")
            continue
        if f["class"].startswith("0604") or f["class"].startswith("0108"):
            if g["port_type"] != f["port_type"]:
                fail(f"{f['bdf']}: port type {g['port_type']} in the guest, {f['port_type']} in the machine")
    # physr qemu names a device f<bus>-<dev>-<fn> after its machine address.
    cmb = set()
    for qm in re.finditer(r"nvme,id=f([0-9a-f]{2})-([0-9a-f]{2})-([0-7])[^ ]*cmb_size_mb=", open(qemu_path).read()):
        cmb.add(f"0000:{qm.group(1)}:{qm.group(2)}.{qm.group(3)}")
    if cmb != p2pmem:
        fail(f"p2pmem providers in the guest {sorted(p2pmem)}, NVMe controllers with a CMB {sorted(cmb)}")

    # ACS as the guest kernel set it on the root ports, read by physr from config space.
    acs_checked = 0
    for f in guest["functions"]:
        if f["port_type"] != "root_port":
            continue
        redir_off = "all" in acs_off or f["bdf"] in acs_off or f["bdf"][5:] in acs_off
        want = expected_root_port_acs(iommu, redir_off)
        acs_checked += 1
        if f["acs"] != want:
            fail(f"root port {f['bdf']}: ACS {f['acs']} in the guest, expected {want}")

    for msg in fails:
        print(f"FAIL {case}: {msg}")
    status = "FAIL" if fails else "PASS"
    print(f"{status} {case}: {len(oracle)} pairs (distance), {compared_maps} map types, "
          f"{acs_checked} root ports' ACS, {len(machine['functions'])} machine functions; "
          f"cpu {guest['cpu']['vendor']} family {guest['cpu']['family']:#x} "
          f"amd_zen_rule={guest['cpu']['amd_zen_rule']}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
