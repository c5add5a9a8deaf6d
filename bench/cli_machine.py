#!/usr/bin/env python3
"""Writes a large physr machine file for the CLI benchmarks (bench/cli_bench.sh).

  cli_machine.py wide N    N functions: PCI domains of one host bridge each, a root port, a
                           switch with 16 downstream ports and up to 15 endpoints (NVMe with
                           a 16 MiB BAR, GPU with a 256 MiB BAR, NIC) behind each port, the
                           ports of every other switch redirecting (ACS RR CR)
  cli_machine.py chain N   a chain of N bridges below one root port, an NVMe SSD at its end

The machine goes to stdout.
"""
import sys

PORTS = 16
ENDPOINTS = 15
BAR_BASE = 0x1000_0000_0000


def wide(n):
    out = ['name = "wide-%d"' % n, "", "[cpu]", 'vendor = "GenuineIntel"', "family = 6", ""]
    bar = BAR_BASE
    count = 0
    domain = 0
    while count < n:
        out += ["[[host_bridge]]", "domain = %d" % domain, "bus = 0", "numa_node = %d" % (domain % 2), ""]
        d = "%04x" % domain

        def fn(bdf, vendor, device, cls, typ=None, parent=None, acs=None, bar_size=None):
            nonlocal bar, count
            lines = ["[[function]]", 'bdf = "%s:%s"' % (d, bdf), "vendor = 0x%04x" % vendor,
                     "device = 0x%04x" % device, "class = 0x%06x" % cls]
            if typ:
                lines.append('type = "%s"' % typ)
            if parent:
                lines.append('parent = "%s:%s"' % (d, parent))
            if acs:
                lines.append('acs = "%s"' % acs)
            if bar_size:
                bar = (bar + bar_size - 1) // bar_size * bar_size
                lines += ["  [[function.bar]]", "  index = 0", "  start = 0x%x" % bar, "  size = %d" % bar_size]
                bar += bar_size
            out.extend(lines + [""])
            count += 1
            return count < n

        if not fn("00:00.0", 0x8086, 0x2020, 0x060000, "rc_integrated_endpoint"):
            break
        if not fn("00:01.0", 0x8086, 0x2030, 0x060400, "root_port", acs="SV RR CR UF"):
            break
        if not fn("01:00.0", 0x10B5, 0x8747, 0x060400, "switch_upstream", parent="00:01.0"):
            break
        done = False
        for p in range(PORTS):
            port = "02:%02x.0" % p
            redirect = "SV RR CR" if p % 2 else "SV"
            if not fn(port, 0x10B5, 0x8747, 0x060400, "switch_downstream", parent="01:00.0", acs=redirect):
                done = True
                break
            for e in range(ENDPOINTS):
                kind = e % 3
                ep = "%02x:%02x.0" % (3 + p, e)
                if kind == 0:
                    more = fn(ep, 0x144D, 0xA808, 0x010802, parent=port, bar_size=16 << 20)
                elif kind == 1:
                    more = fn(ep, 0x10DE, 0x20B0, 0x030200, parent=port, bar_size=256 << 20)
                else:
                    more = fn(ep, 0x15B3, 0x101B, 0x020000, parent=port, bar_size=32 << 20)
                if not more:
                    done = True
                    break
            if done:
                break
        if done:
            break
        domain += 1
    return "\n".join(out) + "\n"


def chain(n):
    out = ['name = "chain-%d"' % n, "", "[[host_bridge]]", "bus = 0", ""]
    # Bus numbers run out at 256, so deeper levels reuse them in other domains' style: the
    # loader checks the depth before any bus rule (there is none for bus reuse below a port).
    parent = None
    for i in range(n):
        bdf = "%04x:%02x:00.0" % (i // 256, i % 256)
        lines = ["[[function]]", 'bdf = "%s"' % bdf, "vendor = 0x8086", "device = 0x2030", "class = 0x060400",
                 'type = "%s"' % ("root_port" if i == 0 else "switch_downstream")]
        if parent:
            lines.append('parent = "%s"' % parent)
        out.extend(lines + [""])
        parent = bdf
    out += ["[[function]]", 'bdf = "%04x:%02x:00.0"' % (n // 256, n % 256), "vendor = 0x144d", "device = 0xa808",
            "class = 0x010802", 'parent = "%s"' % parent, ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("wide", "chain"):
        sys.exit(__doc__)
    sys.stdout.write(wide(int(sys.argv[2])) if sys.argv[1] == "wide" else chain(int(sys.argv[2])))
