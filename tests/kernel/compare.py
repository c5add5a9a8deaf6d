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
P2PMEM_HEAD = re.compile(r"^PHYSR-P2PMEM mode=(\S+) providers=(\S*) namespaces=(\d+)$", re.M)
P2PMEM_RUN = re.compile(r"^PHYSR-P2PMEM provider=(\S+) read=(\S+) write=(\S+) mode=(\S+) rc=(\d+) failed=(\S+) errno=(\S+)\n((?:    .*\n)*)", re.M)
SIDE_VERDICT = re.compile(r"^ +(read|write): +\S+ \((\S+)\): P2P with p2pmem of (\S+); physr's verdict (\S+),", re.M)

# What the guest kernel leaves in a QEMU pcie-root-port's ACS Control (capability SV TB RR
# CR UF DT, firmware value 0): Linux pci_enable_acs() sets SV RR CR UF when an IOMMU
# requested ACS (pci_std_enable_acs()); for a port pci=disable_acs_redir= lists,
# __pci_config_acs() takes every bit outside RR CR EC from the firmware's value, so the port
# ends with none; nothing is set without an IOMMU.
def expected_root_port_acs(iommu, redir_off):
    if redir_off or not iommu:
        return "-"
    return "SV RR CR UF"


def check_p2pmem(text, physr, oracle, p2pmem, fail):
    """The p2pmem data path (guest/checks.d/p2pmem.sh): each `physr p2pmem-test READ WRITE
    PROVIDER` must fail with EREMOTEIO on the read exactly when physr's verdict for
    (provider, READ's controller) is not_supported, else on the write exactly when it is for
    (provider, WRITE's controller), and succeed otherwise, with every byte checked when the
    guest has no IOMMU. The expectation is physr's verdict in this guest (topo --json), which
    must also be the kernel's map type (the oracle) and what p2pmem-test itself printed."""
    head = P2PMEM_HEAD.search(text)
    if not head:
        skipped = "PHYSR-P2PMEM skipped" in text
        if p2pmem and not skipped:
            fail("p2pmem check: no result (the guest has p2pmem)")
        return "p2pmem-test skipped (no p2pmem or no namespace)" if skipped else "no p2pmem-test"
    mode, providers, namespaces = head.group(1), [p for p in head.group(2).split(",") if p], int(head.group(3))
    if set(providers) != p2pmem:
        fail(f"p2pmem check: providers {providers}, the oracle saw p2pmem on {sorted(p2pmem)}")
    runs = list(P2PMEM_RUN.finditer(text))
    per_provider = namespaces * (namespaces - 1) if namespaces > 1 else 1
    if len(runs) != 1 + len(providers) * per_provider:
        fail(f"p2pmem check: {len(runs)} runs, expected {1 + len(providers) * per_provider}")
    outcomes = {"ok": 0, "read": 0, "write": 0}
    data_checked = 0
    for m in runs:
        prov, rd, wr, rmode, rc, failed, err, out = m.groups()
        what = f"p2pmem-test {rd} -> {prov} -> {wr}"
        checked = "Checked every byte" in out
        if prov == "host":
            if rc != "0" or (rmode == "data" and not checked):
                fail(f"{what}: through host memory it must copy every byte: rc={rc} failed={failed} errno={err}")
            continue
        want = "ok"
        for side, client in (("read", rd), ("write", wr)):
            v = physr.get((prov, client))
            if v is None:
                fail(f"{what}: physr lists no pair {prov} -> {client}")
                want = None
                break
            k = oracle.get((prov, client))
            if k is None or k[1] != v[0]:
                fail(f"{what}: physr's verdict {v[0]} for {prov} -> {client}, the kernel's map type {k[1] if k else 'missing'}")
            if v[0] == "not_supported":
                want = side
                break
        for sm in SIDE_VERDICT.finditer(out):
            side, client, sprov, verdict = sm.groups()
            pv = physr.get((sprov, client))
            if pv and pv[0] != verdict:
                fail(f"{what}: p2pmem-test printed {side} verdict {verdict} for {sprov} -> {client}, physr topo says {pv[0]}")
        if want is None:
            continue
        got = "ok" if rc == "0" else failed if err == "EREMOTEIO" else f"{failed} {err}"
        if got != want:
            expect = "success" if want == "ok" else f"EREMOTEIO on the {want}"
            fail(f"{what}: expected {expect} (physr's verdicts), got rc={rc} failed={failed} errno={err}")
            continue
        outcomes[want] += 1
        if want == "ok" and rmode == "data":
            if checked:
                data_checked += 1
            else:
                fail(f"{what}: succeeded without checking the bytes")
    return (f"{len(runs)} p2pmem-tests ({mode}: {outcomes['ok']} copied{f', {data_checked} byte-checked' if mode == 'data' else ''}, "
            f"{outcomes['read']} + {outcomes['write']} EREMOTEIO on read + write)")


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

    p2pmem_summary = check_p2pmem(text, physr, oracle, p2pmem, fail)

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
          f"{acs_checked} root ports' ACS, {len(machine['functions'])} machine functions, {p2pmem_summary}; "
          f"cpu {guest['cpu']['vendor']} family {guest['cpu']['family']:#x} "
          f"amd_zen_rule={guest['cpu']['amd_zen_rule']}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
