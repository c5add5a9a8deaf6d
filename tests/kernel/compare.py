#!/usr/bin/env python3
"""Compares one guest boot of scripts/test-kernel: physr's verdicts on the live sysfs with
the kernel's own (tests/kernel/oracle), pair by pair, and the guest's tree with the machine
file `physr qemu` built it from, and judges the guest checks: the p2pmem data path
(checks.d/p2pmem.sh, check_p2pmem()) and physr doctor (checks.d/doctor.sh, check_doctor()).

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


ACS_RR, ACS_CR, ACS_EC = 0x0004, 0x0008, 0x0020
# The ACS Control Linux writes on a QEMU pcie-root-port (SV RR CR UF with an IOMMU, nothing
# without one or for a port pci=disable_acs_redir= lists): expected_root_port_acs() as bits.
def expected_root_port_acs_ctl(iommu, redir_off):
    return 0x001D if iommu and not redir_off else 0x0000


def check_doctor(text, guest, oracle, p2pmem, iommu, acs_off, fail):
    """`physr doctor --json` in the guest (guest/checks.d/doctor.sh) against what the guest
    kernel set, read there without physr: every root port's ACS Control from config space
    (0x001d with intel-iommu, 0 for a port pci=disable_acs_redir= names, 0 without an IOMMU)
    and doctor's acs.BDF findings (one per port with RR, CR or EC set, its value and fix);
    the IOMMU finding (translating with --iommu, none without) and /sys/class/iommu; the
    p2pmem providers, sizes and free bytes sysfs shows; the kernel release and
    CONFIG_PCI_P2PDMA; and every pair doctor gives against the kernel's distance."""
    m = re.search(r"PHYSR-DOCTOR-BEGIN\n(.*?)\nPHYSR-DOCTOR-END rc=(\d+)", text, re.S)
    if not m:
        fail("doctor check: no physr doctor --json output in the log")
        return "no doctor"
    if m.group(2) != "0":
        fail(f"doctor check: physr doctor --json exited {m.group(2)}")
    try:
        doc = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        fail(f"doctor check: physr doctor --json output is not JSON: {e}")
        return "doctor not JSON"
    findings = {f["id"]: f for f in doc["findings"]}
    if not doc.get("live") or not doc.get("privileged"):
        fail(f"doctor check: live={doc.get('live')} privileged={doc.get('privileged')}, expected both (root on /)")

    # ACS: config space as the kernel left it, then doctor's findings on it.
    raw = {am.group(1): int(am.group(2), 16) for am in re.finditer(r"^PHYSR-DOCTOR acs (\S+) ctl=([0-9a-f]{4})$", text, re.M)}
    root_ports = [f["bdf"] for f in guest["functions"] if f["port_type"] == "root_port"]
    for bdf in root_ports:
        redir_off = "all" in acs_off or bdf in acs_off or bdf[5:] in acs_off
        want = expected_root_port_acs_ctl(iommu, redir_off)
        if bdf not in raw:
            fail(f"doctor check: root port {bdf} has no ACS capability in config space")
        elif raw[bdf] != want:
            fail(f"doctor check: root port {bdf}: ACS Control {raw[bdf]:04x} in config space, the kernel should have set {want:04x}")
    redirecting = sorted(b for b, c in raw.items() if c & (ACS_RR | ACS_CR | ACS_EC))
    reported = sorted(i[4:] for i in findings if i.startswith("acs.") and i != "acs.unknown")
    if reported != redirecting:
        fail(f"doctor check: acs findings for {reported}, ports redirecting in config space {redirecting}")
    for bdf in set(reported) & set(redirecting):
        f = findings["acs." + bdf]
        ctl = raw[bdf]
        if f"ACS Control {ctl:04x}" not in f["detail"]:
            fail(f"doctor check: acs.{bdf} detail lacks 'ACS Control {ctl:04x}': {f['detail']}")
        for want in (f"pci=disable_acs_redir={bdf}", f"setpci -s {bdf} ECAP_ACS+6.w={ctl & ~(ACS_RR | ACS_CR | ACS_EC):04x}",
                     f"revert with: setpci -s {bdf} ECAP_ACS+6.w={ctl:04x}"):
            if want not in f["fix"]:
                fail(f"doctor check: acs.{bdf} fix lacks '{want}': {f['fix']}")
    agg = findings.get("acs")
    if not agg:
        fail("doctor check: no acs finding")
    elif (agg["severity"] == "warning") != bool(redirecting) or (redirecting and not agg["title"].startswith(f"{len(redirecting)} port(s)")):
        fail(f"doctor check: acs finding '{agg['severity']}: {agg['title']}' with {len(redirecting)} redirecting port(s)")
    if "acs.unknown" in findings:
        fail(f"doctor check: {findings['acs.unknown']['title']} (root reads the whole config space)")

    # IOMMU: the case's --iommu, sysfs, and doctor's word.
    im = re.search(r"^PHYSR-DOCTOR iommu units=(\d+) groups=(\d+)$", text, re.M)
    units, groups = (int(im.group(1)), int(im.group(2))) if im else (-1, -1)
    f = findings.get("iommu", {"title": "(none)", "detail": ""})
    if iommu:
        if units < 1 or groups < 1:
            fail(f"doctor check: --iommu, but the guest has {units} IOMMU units and {groups} groups")
        if not f["title"].startswith("IOMMU translating") or "intel_iommu=on" not in f["detail"] or f"{groups} IOMMU groups" not in f["detail"]:
            fail(f"doctor check: iommu finding '{f['title']}: {f['detail']}', expected translating, intel_iommu=on, {groups} groups")
    else:
        if units != 0 or groups != 0:
            fail(f"doctor check: no --iommu, but the guest has {units} IOMMU units and {groups} groups")
        if f["title"] != "No IOMMU":
            fail(f"doctor check: iommu finding '{f['title']}', expected No IOMMU")

    # p2pmem: exactly what sysfs shows, and the providers the oracle saw.
    sysfs = {pm.group(1): (int(pm.group(2)), int(pm.group(3)), pm.group(4) == "1")
             for pm in re.finditer(r"^PHYSR-DOCTOR p2pmem (\S+) size=(\d+) available=(\d+) published=(\d)$", text, re.M)}
    dp = {p["bdf"]: (p["size"], p["available"], p["published"]) for p in doc["p2pmem"]}
    if dp != sysfs:
        fail(f"doctor check: p2pmem {dp}, sysfs {sysfs}")
    if set(sysfs) != p2pmem:
        fail(f"doctor check: p2pmem in sysfs on {sorted(sysfs)}, the oracle saw it on {sorted(p2pmem)}")
    for bdf, (size, avail, pub) in sysfs.items():
        f = findings.get("p2pmem." + bdf)
        if not f or f["severity"] != "ok" or f"size {size_text(size)}" not in f["detail"] or f"available {size_text(avail)}" not in f["detail"]:
            fail(f"doctor check: p2pmem.{bdf} finding {f}, sysfs size {size} available {avail} published {pub}")
    if not sysfs and findings.get("p2pmem", {}).get("title") != "No p2pmem providers":
        fail("doctor check: no p2pmem in sysfs, doctor does not say so")

    # The kernel: release and CONFIG_PCI_P2PDMA (/proc/config.gz).
    km = re.search(r"^PHYSR-DOCTOR kernel release=(\S+) config=(\S*)$", text, re.M)
    if not km or doc.get("kernel") != km.group(1) or km.group(1) not in findings.get("kernel.version", {}).get("title", ""):
        fail(f"doctor check: kernel {doc.get('kernel')} / {findings.get('kernel.version', {}).get('title')}, uname -r {km.group(1) if km else '?'}")
    kp = findings.get("kernel.p2pdma", {})
    if not km or km.group(2) != "CONFIG_PCI_P2PDMA=y" or kp.get("title") != "CONFIG_PCI_P2PDMA=y" or "/proc/config.gz" not in kp.get("detail", ""):
        fail(f"doctor check: kernel.p2pdma '{kp.get('title')}' ({kp.get('detail')}), /proc/config.gz says {km.group(2) if km else '?'}")

    # Doctor's pairs: the kernel's distance (-1 not supported) and map type.
    for p in doc["pairs"]:
        k = oracle.get((p["provider"], p["client"]))
        want = -1 if p["map_type"] == "not_supported" else p["distance"]
        if k is None:
            fail(f"doctor check: pair {p['provider']} -> {p['client']}: the kernel lists no such pair")
        elif k[0] != want or (k[1] != "none" and k[1] != p["map_type"]):
            fail(f"doctor check: pair {p['provider']} -> {p['client']}: doctor {p['map_type']} distance {p['distance']}, kernel {k[1]} distance {k[0]}")
    return f"doctor: {len(raw)} ACS controls, {len(redirecting)} redirecting, {len(sysfs)} p2pmem, {len(doc['pairs'])} pairs"


def size_text(n):
    """physr's format_size() (src/core/core.cpp): the largest binary unit that divides n."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    u = 0
    while u < 6 and n != 0 and n % 1024 == 0:
        n //= 1024
        u += 1
    return f"{n} {units[u]}"


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
    doctor_summary = check_doctor(text, guest, oracle, p2pmem, iommu, acs_off, fail)

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
          f"{acs_checked} root ports' ACS, {len(machine['functions'])} machine functions, {p2pmem_summary}, {doctor_summary}; "
          f"cpu {guest['cpu']['vendor']} family {guest['cpu']['family']:#x} "
          f"amd_zen_rule={guest['cpu']['amd_zen_rule']}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
