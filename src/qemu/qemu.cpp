// physr qemu: builds the q35 command line for a machine's PCIe tree (see physr/qemu.hpp).
#include "physr/qemu.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <string_view>
#include <type_traits>

namespace physr::qemu {
namespace {

using pci::Bdf;
using pci::Function;
using pci::PortType;
using pci::Topology;

// What QEMU's q35 itself puts on bus 0: the host bridge at 00.0 and the ICH9 functions at
// 1f.0 (LPC), 1f.2 (AHCI) and 1f.3 (SMBus), which -nodefaults does not remove.
constexpr uint16_t kQ35HostVendor = 0x8086, kQ35HostDevice = 0x29c0;
constexpr uint8_t kIch9Slot = 0x1f;
constexpr unsigned kMaxCmbMiB = 512;  // QEMU backs a CMB with host memory

// A small {}-style formatter ({} and {:x}, {:02x}, {:#x}-like hex specs): the library does
// not link fmt, and these messages need nothing more.
struct Arg {
  std::string text;
  uint64_t num = 0;
  bool is_num = false;
  Arg(const std::string& s) : text(s) {}  // NOLINT: implicit by design
  Arg(const char* s) : text(s) {}         // NOLINT
  template <class T>
    requires std::is_integral_v<T>
  Arg(T v) : num(static_cast<uint64_t>(v)), is_num(true) {}  // NOLINT
};
std::string format_args(std::string_view f, std::initializer_list<Arg> args) {
  std::string out;
  auto it = args.begin();
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] != '{') {
      out += f[i];
      continue;
    }
    const size_t close = f.find('}', i);
    const std::string_view spec = f.substr(i + 1, close - i - 1);
    const Arg& a = *it++;
    if (!a.is_num) {
      out += a.text;
    } else if (spec.empty()) {
      out += std::to_string(a.num);
    } else {  // ":x", ":02x", ":#x"
      char buf[32];
      const bool alt = spec.find('#') != std::string_view::npos;
      const int width = spec.size() > 2 && spec[1] == '0' ? spec[2] - '0' : 0;
      std::snprintf(buf, sizeof buf, alt ? "%#0*llx" : "%0*llx", width, static_cast<unsigned long long>(a.num));
      out += buf;
    }
    i = close;
  }
  return out;
}
template <class... A>
std::string format(std::string_view f, const A&... args) {
  return format_args(f, {Arg(args)...});
}

std::string hex2(unsigned v) { return format("{:02x}", v); }
std::string addr(const Bdf& b) { return format("{:02x}.{:x}", b.dev, b.fn); }
std::string ids(const Function& f) { return format("{:04x}:{:04x}", f.vendor, f.device); }
std::string label(const Function& f) {
  return f.name.empty() ? f.bdf.to_string() : format("{} ({})", f.bdf.to_string(), f.name);
}
bool is_host_bridge_fn(const Function& f) { return f.subclass() == (pci::kClassHostBridge >> 8); }

std::string acs_text(uint16_t ctrl) { return ctrl ? pci::acs_bits_string(ctrl) : "none"; }

// The ACS control the guest kernel leaves on a QEMU root port (capability SV TB RR CR UF
// DT; the firmware leaves the control 0). Linux drivers/pci/pci.c pci_enable_acs(): with an
// IOMMU (pci_request_acs()) pci_std_enable_acs() sets SV RR CR UF; then, for a port that
// pci=disable_acs_redir= lists, __pci_config_acs() takes the bits outside RR CR EC from the
// firmware's value, not the kernel's, so such a port ends with nothing set. Without an
// IOMMU nothing is set.
uint16_t guest_root_port_acs(bool iommu, bool redir_off) {
  constexpr uint16_t kFirmware = 0;
  if (redir_off) return kFirmware & static_cast<uint16_t>(~pci::acs::kRedirect);
  if (!iommu) return kFirmware;
  return pci::acs::SV | pci::acs::RR | pci::acs::CR | pci::acs::UF;
}

struct Builder {
  const Topology& t;
  const Options& o;
  CommandLine out;
  std::vector<std::vector<uint32_t>> children;       // by upstream function, in devfn order
  std::vector<std::string> id;                       // QEMU id per function
  std::vector<Bdf> guest;                            // guest address per function
  std::vector<uint8_t> emulated;                     // 0: left out
  std::vector<std::string> hb_bus;                   // QEMU bus name per host bridge
  std::set<uint32_t> acs_off;                        // functions listed for disable_acs_redir
  unsigned chassis = 0;

  Status fail(const Function& f, const std::string& why) const {
    return make_error(EINVAL, format("{}: {}", label(f), why));
  }
  void note(std::string s) { out.cannot_emulate.push_back(std::move(s)); }

  Status run();
  Status check_bus(const std::vector<uint32_t>& fns, int parent, uint32_t hb);
  void number(const std::vector<uint32_t>& fns, uint8_t bus, unsigned& next);
  Status emit(uint32_t f, const std::string& bus, bool multifunction);
  Status emit_bus(const std::vector<uint32_t>& fns, const std::string& bus);
};

// Linux scans only device 0 below a PCIe port and needs function 0 of every device
// (drivers/pci/probe.c pci_scan_slot(), only_one_child()); QEMU's switch has downstream
// ports, and only them, on its internal bus.
Status Builder::check_bus(const std::vector<uint32_t>& fns, int parent, uint32_t hb) {
  std::set<uint8_t> devs_with_fn0;
  for (uint32_t i : fns)
    if (emulated[i] && t.functions[i].bdf.fn == 0) devs_with_fn0.insert(t.functions[i].bdf.dev);
  const Function* up = parent >= 0 ? &t.functions[static_cast<uint32_t>(parent)] : nullptr;
  for (uint32_t i : fns) {
    const Function& f = t.functions[i];
    if (!emulated[i]) continue;
    if (!devs_with_fn0.count(f.bdf.dev))
      return fail(f, format("device {:02x} on bus {:02x} has no function 0 (or physr qemu left it out); QEMU and Linux need one",
                            f.bdf.dev, f.bdf.bus));
    const bool bridge = pci::is_pci_bridge(f);
    if (bridge && f.port_type != PortType::root_port && f.port_type != PortType::switch_upstream &&
        f.port_type != PortType::switch_downstream)
      return fail(f, format("a {} bridge: physr qemu builds only root ports and switch ports",
                                 pci::port_type_name(f.port_type)));
    if (!up) {
      if (bridge && f.port_type != PortType::root_port)
        return fail(f, format("a {} on a root bus: only root ports and endpoints sit there", pci::port_type_name(f.port_type)));
      const bool q35 = t.host_bridges[hb].domain == 0 && t.host_bridges[hb].bus == 0;
      if (q35 && bridge && f.bdf.dev == 0) return fail(f, "a root port at device 00 of bus 00, where q35 has its host bridge");
      if (q35 && bridge && f.bdf.dev == kIch9Slot) return fail(f, "a root port at device 1f of bus 00, where q35 has its ICH9 functions");
      continue;
    }
    if (up->port_type == PortType::switch_upstream) {
      if (f.port_type != PortType::switch_downstream)
        return fail(f, "below a switch upstream port QEMU has only downstream ports (xio3130-downstream)");
    } else {
      if (f.port_type == PortType::root_port || f.port_type == PortType::switch_downstream)
        return fail(f, format("a {} below {}: it belongs on a {}", pci::port_type_name(f.port_type), label(*up),
                                   f.port_type == PortType::root_port ? "root bus" : "switch's internal bus"));
      if (f.bdf.dev != 0)
        return fail(f, format("device {:02x} below the port {}: Linux scans only device 00 below a PCIe port", f.bdf.dev, label(*up)));
    }
  }
  return {};
}

// Guest bus numbers as the firmware (SeaBIOS pci_bios_init_bus_rec()) assigns them: depth
// first, bridges in devfn order, each secondary bus the next free number.
void Builder::number(const std::vector<uint32_t>& fns, uint8_t bus, unsigned& next) {
  for (uint32_t i : fns) {
    const Function& f = t.functions[i];
    guest[i] = Bdf{0, bus, f.bdf.dev, f.bdf.fn};
    if (!pci::is_pci_bridge(f)) continue;
    const uint8_t secondary = static_cast<uint8_t>(next++);
    number(children[i], secondary, next);
  }
}

Status Builder::emit(uint32_t i, const std::string& bus, bool multifunction) {
  const Function& f = t.functions[i];
  const std::string place = format("id={},bus={},addr={}{}", id[i], bus, addr(f.bdf), multifunction ? ",multifunction=on" : "");
  GuestFunction g{i, guest[i], "", id[i], ""};
  const bool acs_listed = acs_off.count(i) != 0;
  if (f.port_type == PortType::root_port) {
    ++chassis;
    g.device = "pcie-root-port";
    out.argv.insert(out.argv.end(), {"-device", format("pcie-root-port,{},chassis={},slot={}", place, chassis, chassis)});
    const uint16_t guest_acs = guest_root_port_acs(o.iommu, acs_listed || o.disable_acs_redir_all);
    if (f.acs.kind != pci::AcsState::Kind::unknown && (f.acs.kind == pci::AcsState::Kind::absent || f.acs.ctrl != guest_acs))
      note(format("root port {}: ACS {} in the machine; the guest kernel sets {} on QEMU's pcie-root-port", label(f),
                       f.acs.kind == pci::AcsState::Kind::absent ? "absent" : acs_text(f.acs.ctrl), acs_text(guest_acs)));
  } else if (f.port_type == PortType::switch_upstream) {
    g.device = "x3130-upstream";
    out.argv.insert(out.argv.end(), {"-device", "x3130-upstream," + place});
  } else if (f.port_type == PortType::switch_downstream) {
    ++chassis;
    g.device = "xio3130-downstream";
    out.argv.insert(out.argv.end(), {"-device", format("xio3130-downstream,{},chassis={},slot={}", place, chassis, chassis)});
    if (f.acs.kind == pci::AcsState::Kind::present && f.acs.ctrl != 0)
      note(format("switch port {}: ACS {} in the machine; QEMU's xio3130-downstream has no ACS capability, so "
                       "nothing redirects there in the guest{}",
                       label(f), pci::acs_bits_string(f.acs.ctrl), f.acs.redirects() ? " (verdicts through it differ)" : ""));
  } else if (pci::is_nvme(f)) {
    g.device = "nvme";
    g.serial = f.name.empty() ? format("physr-{:02x}{:02x}{:x}", f.bdf.bus, f.bdf.dev, f.bdf.fn) : f.name.substr(0, 20);
    const std::string disk = id[i] + "-ns";
    if (o.disk_dir.empty())
      out.argv.insert(out.argv.end(), {"-blockdev", format("driver=null-co,node-name={},size=67108864,read-zeroes=on", disk)});
    else
      out.argv.insert(out.argv.end(), {"-drive", format("if=none,id={},format=raw,cache=unsafe,file={}/{}.img", disk, o.disk_dir, g.serial)});
    std::string dev = format("nvme,{},serial={},drive={}", place, g.serial, disk);
    if (f.cmb) {
      uint64_t size = 0;
      for (const pci::Bar& b : f.bars)
        if (b.index == f.cmb->bar) size = b.size();
      uint64_t mib = std::max<uint64_t>(1, (size + (1u << 20) - 1) >> 20);
      if (mib > kMaxCmbMiB) {
        note(format("NVMe {}: a CMB of {} MiB; the guest gets {} MiB (QEMU backs it with host memory)", label(f), mib, kMaxCmbMiB));
        mib = kMaxCmbMiB;
      } else if (mib << 20 != size) {
        note(format("NVMe {}: a CMB of {} bytes; QEMU sizes it in MiB: {} MiB", label(f), size, mib));
      }
      dev += format(",cmb_size_mb={}", mib);
      if (f.cmb->bar != 2) note(format("NVMe {}: the CMB is in BAR {}; QEMU's is in BAR 2", label(f), f.cmb->bar));
      if (!f.cmb->rds || !f.cmb->wds)
        note(format("NVMe {}: a CMB without {}; QEMU's CMB has RDS and WDS, so the guest publishes it as p2pmem", label(f),
                         !f.cmb->rds && !f.cmb->wds ? "RDS and WDS" : !f.cmb->rds ? "RDS" : "WDS"));
    }
    out.argv.insert(out.argv.end(), {"-device", dev});
  } else if (pci::is_network(f)) {
    g.device = "e1000e";
    out.argv.insert(out.argv.end(), {"-device", "e1000e," + place});
    note(format("NIC {} {}: stands in as QEMU's e1000e (8086:10d3), with its BARs, not the machine's", label(f), ids(f)));
  } else if (pci::is_bridge(f)) {
    return fail(f, format("a {} (class {:06x}) QEMU cannot place here", pci::class_name(f.class_code), f.class_code));
  } else {
    g.device = "edu";
    out.argv.insert(out.argv.end(), {"-device", "edu," + place});
    uint64_t bar_bytes = 0;
    for (const pci::Bar& b : f.bars) bar_bytes = std::max(bar_bytes, b.size());
    note(format("{} {} {}: QEMU emulates no such device; a stand-in (edu, 1234:11e8, one 1 MiB BAR){} keeps its place in the tree",
                     pci::class_name(f.class_code), label(f), ids(f),
                     bar_bytes > (1u << 20) ? format(" instead of its {} MiB BAR", bar_bytes >> 20) : ""));
  }
  if (!f.bars.empty() && g.device != "edu" && g.device != "e1000e" && !pci::is_pci_bridge(f) && !f.cmb &&
      std::any_of(f.bars.begin(), f.bars.end(), [](const pci::Bar& b) { return b.size() > (1u << 20); }))
    note(format("{}: its BARs are QEMU's device's, not the machine's", label(f)));
  if (f.link_speed_gts > 0 || f.link_width > 0) {
    // one note for all links, added once
    const std::string s = "link speeds and widths: QEMU's links train at its own defaults (P2P verdicts do not depend on them)";
    if (std::find(out.cannot_emulate.begin(), out.cannot_emulate.end(), s) == out.cannot_emulate.end()) note(s);
  }
  out.functions.push_back(std::move(g));
  return {};
}

Status Builder::emit_bus(const std::vector<uint32_t>& fns, const std::string& bus) {
  std::map<uint8_t, unsigned> per_dev;
  for (uint32_t i : fns) ++per_dev[t.functions[i].bdf.dev];
  for (uint32_t i : fns) {
    const Function& f = t.functions[i];
    if (!emulated[i]) continue;
    PHYSR_RETURN_IF_ERROR(emit(i, bus, f.bdf.fn == 0 && per_dev[f.bdf.dev] > 1));
    if (pci::is_pci_bridge(f)) PHYSR_RETURN_IF_ERROR(emit_bus(children[i], id[i]));
  }
  return {};
}

Status Builder::run() {
  const size_t n = t.functions.size();
  children.assign(n, {});
  id.assign(n, "");
  guest.assign(n, Bdf{});
  emulated.assign(n, 1);
  std::vector<std::vector<uint32_t>> roots(t.host_bridges.size());
  for (uint32_t i = 0; i < n; ++i) {
    const Function& f = t.functions[i];
    if (f.upstream >= 0) children[static_cast<uint32_t>(f.upstream)].push_back(i);
    else roots[f.host_bridge].push_back(i);
    id[i] = format("f{}-{}-{}{}", hex2(f.bdf.bus), hex2(f.bdf.dev), f.bdf.fn,
                        f.bdf.domain ? format("-d{:x}", f.bdf.domain) : "");
  }
  auto by_devfn = [&](uint32_t a, uint32_t b) { return t.functions[a].bdf < t.functions[b].bdf; };
  for (auto& c : children) std::sort(c.begin(), c.end(), by_devfn);
  for (auto& r : roots) std::sort(r.begin(), r.end(), by_devfn);

  // Host bridges: domain 0 bus 0 is q35's pcie.0, every other one a pxb-pcie on it.
  std::vector<uint32_t> order(t.host_bridges.size());
  for (uint32_t h = 0; h < order.size(); ++h) order[h] = h;
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    const auto& x = t.host_bridges[a];
    const auto& y = t.host_bridges[b];
    return std::pair(x.domain, x.bus) < std::pair(y.domain, y.bus);
  });
  std::map<uint8_t, uint32_t> bus_owner;
  hb_bus.assign(t.host_bridges.size(), "");
  for (uint32_t h : order) {
    const pci::HostBridge& hb = t.host_bridges[h];
    if (auto [it, fresh] = bus_owner.emplace(hb.bus, h); !fresh)
      return make_error(EINVAL, format("host bridges {} and {} share bus {:02x}: QEMU's host bridges are all in domain 0",
                                            t.host_bridges[it->second].name(), hb.name(), hb.bus));
    hb_bus[h] = hb.domain == 0 && hb.bus == 0 ? "pcie.0" : format("hb{:02x}", hb.bus);
    if (hb.domain != 0) note(format("host bridge {}: QEMU's pxb-pcie host bridges are in domain 0: it becomes pci0000:{:02x}", hb.name(), hb.bus));
    if (hb.numa_node >= 0 && t.host_bridges.size() > 1)
      note(format("host bridge {}: NUMA node {} is not emulated (the guest has one node)", hb.name(), hb.numa_node));
    if (hb.bus_offset != 0)
      note(format("host bridge {}: a bus offset of {:#x}; q35's windows do not translate (bus address = CPU address)", hb.name(), hb.bus_offset));
  }

  // Host-bridge functions on root buses: q35's own at 00:00.0, none on a pxb-pcie bus.
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h)
    for (uint32_t i : roots[h]) {
      const Function& f = t.functions[i];
      if (!is_host_bridge_fn(f)) continue;
      emulated[i] = 0;
      if (hb_bus[h] == "pcie.0" && f.bdf.dev == 0 && f.bdf.fn == 0) {
        if (f.vendor != kQ35HostVendor || f.device != kQ35HostDevice)
          note(format("host bridge {} {}: the guest's is q35's 8086:29c0, in no P2PDMA allowlist, so the allowlist "
                           "decides as for that", label(f), ids(f)));
        out.functions.push_back(GuestFunction{i, Bdf{}, "q35", "", ""});
      } else {
        note(format("host bridge function {} {}: not emulated; a pxb-pcie root bus has no function of its own, so its "
                         "first root port identifies the host bridge to the allowlist", label(f), ids(f)));
      }
    }

  // Functions left out: bridges other than PCI bridges (ISA, host and other bridges QEMU
  // has no model of; physr lists none of them in the verdict pairs) and the chipset
  // functions a real machine has where q35 has its own (00:00.x, 00:1f.x).
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h)
    for (uint32_t i : roots[h]) {
      const Function& f = t.functions[i];
      if (hb_bus[h] != "pcie.0" || pci::is_pci_bridge(f) || is_host_bridge_fn(f)) continue;
      if (f.bdf.dev == kIch9Slot || f.bdf.dev == 0) {
        emulated[i] = 0;
        note(format("{} {} {}: left out; q35's own functions occupy devices 00 and 1f of bus 00", pci::class_name(f.class_code),
                    label(f), ids(f)));
      }
    }
  for (uint32_t i = 0; i < n; ++i) {
    const Function& f = t.functions[i];
    if (emulated[i] && pci::is_bridge(f) && !pci::is_pci_bridge(f)) {
      emulated[i] = 0;
      note(format("{} {} {}: left out (QEMU has no such bridge; not a P2P endpoint either way)", pci::class_name(f.class_code),
                  label(f), ids(f)));
    }
  }
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h) PHYSR_RETURN_IF_ERROR(check_bus(roots[h], -1, h));
  for (uint32_t i = 0; i < n; ++i)
    if (pci::is_pci_bridge(t.functions[i])) PHYSR_RETURN_IF_ERROR(check_bus(children[i], static_cast<int>(i), t.functions[i].host_bridge));
  // Guest bus numbers and the notes for those that differ.
  std::map<unsigned, unsigned> renumbered;
  for (uint32_t h : order) {
    const uint8_t root = t.host_bridges[h].bus;
    unsigned next = root + 1u;
    number(roots[h], root, next);
  }
  for (uint32_t i = 0; i < n; ++i)
    if (t.functions[i].bdf.bus != guest[i].bus || t.functions[i].bdf.domain != 0) renumbered[t.functions[i].bdf.bus] = guest[i].bus;
  for (const auto& [from, to] : renumbered)
    note(format("bus {:02x} of the machine is bus {:02x} in the guest (the firmware numbers buses depth first)", from, to));
  for (GuestFunction& g : out.functions) g.guest = guest[g.function];

  // The ports whose ACS redirect the guest kernel clears.
  std::vector<std::string> acs_list;
  for (const std::string& name : o.disable_acs_redir) {
    auto r = t.lookup(name);
    if (!r) return make_error(EINVAL, format("--disable-acs-redir {}: {}", name, r.error().message));
    acs_off.insert(*r);
    acs_list.push_back(guest[*r].to_string());
  }
  if (o.disable_acs_redir_all) acs_list.push_back("pci:1b36:000c");  // every pcie-root-port

  // The machine, the CPU, the IOMMU, then the tree.
  out.argv = {o.qemu, "-machine", o.iommu ? "q35,kernel-irqchip=split" : "q35"};
  const bool amd = t.cpu.vendor == "AuthenticAMD";
  // Linux arch/x86/kernel/cpu (cpu_supports_p2pdma() in drivers/pci/p2pdma.c): AMD family >= 0x17.
  const bool zen = o.amd_zen.value_or(amd && t.cpu.family >= 0x17);
  if (zen) {
    const bool milan = !o.amd_zen && t.cpu.family == 0x19;
    out.argv.insert(out.argv.end(), {"-cpu", milan ? "EPYC-Milan" : "EPYC"});
    if (!o.amd_zen && t.cpu.family != 0x17 && t.cpu.family != 0x19)
      note(format("CPU AMD family {:#x}: the guest's EPYC is family 0x17 (Zen as well)", t.cpu.family));
  } else if (t.cpu.known() && !(amd && t.cpu.family == 0xf)) {
    note(format("CPU {} family {:#x}: the guest keeps TCG's default qemu64 (AuthenticAMD family 0xf); neither is "
                     "AMD Zen, so P2P through the host bridge is up to the allowlist in both", t.cpu.vendor, t.cpu.family));
  }
  out.argv.insert(out.argv.end(), {"-m", std::to_string(o.memory_mb), "-smp", std::to_string(o.cpus), "-nodefaults", "-display", "none",
                                   "-serial", "stdio", "-no-reboot"});
  if (o.iommu) out.argv.insert(out.argv.end(), {"-device", "intel-iommu,intremap=on"});

  // pxb-pcie expanders take free slots of bus 00, from 1e down.
  std::set<uint8_t> used{0, kIch9Slot};
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h)
    if (hb_bus[h] == "pcie.0")
      for (uint32_t i : roots[h]) used.insert(t.functions[i].bdf.dev);
  uint8_t slot = kIch9Slot;
  for (uint32_t h : order) {
    if (hb_bus[h] == "pcie.0") continue;
    do {
      --slot;
    } while (slot > 0 && used.count(slot));
    if (slot == 0) return make_error(EINVAL, format("host bridge {}: no free slot on bus 00 for its pxb-pcie", t.host_bridges[h].name()));
    out.argv.insert(out.argv.end(), {"-device", format("pxb-pcie,id={},bus_nr={},bus=pcie.0,addr={:02x}.0", hb_bus[h],
                                                            t.host_bridges[h].bus, slot)});
    note(format("host bridge {}: a pxb-pcie (1b36:000b), which also shows as a function at 0000:00:{:02x}.0", t.host_bridges[h].name(), slot));
  }
  for (uint32_t h : order) PHYSR_RETURN_IF_ERROR(emit_bus(roots[h], hb_bus[h]));

  // The kernel command line.
  out.kernel_cmdline = "console=ttyS0 panic=-1";
  if (o.iommu) out.kernel_cmdline += " intel_iommu=on";
  if (!acs_list.empty()) {
    std::string list;
    for (const std::string& s : acs_list) list += (list.empty() ? "" : ";") + s;
    out.kernel_cmdline += " pci=disable_acs_redir=" + list;
  }
  if (!o.append.empty()) out.kernel_cmdline += " " + o.append;
  if (!o.kernel.empty()) {
    out.argv.insert(out.argv.end(), {"-kernel", o.kernel});
    if (!o.initrd.empty()) out.argv.insert(out.argv.end(), {"-initrd", o.initrd});
    out.argv.insert(out.argv.end(), {"-append", out.kernel_cmdline});
  }
  return {};
}

}  // namespace

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,:=/+@%") == std::string::npos)
    return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string CommandLine::shell() const {
  std::string s;
  for (size_t i = 0; i < argv.size(); ++i) {
    const bool option = argv[i].size() > 1 && argv[i][0] == '-' && i + 1 < argv.size() && argv[i + 1][0] != '-';
    if (i > 0) s += argv[i][0] == '-' ? " \\\n  " : " ";
    s += shell_quote(argv[i]);
    if (option) {
      s += " " + shell_quote(argv[i + 1]);
      ++i;
    }
  }
  return s + "\n";
}

Result<CommandLine> build(const Topology& topo, const Options& options) {
  PHYSR_RETURN_IF_ERROR(topo.validate(true));
  Builder b{topo, options, {}, {}, {}, {}, {}, {}, {}, 0};
  PHYSR_RETURN_IF_ERROR(b.run());
  return std::move(b.out);
}

}  // namespace physr::qemu
