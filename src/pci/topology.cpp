#include <algorithm>
#include <cstdio>

#include "physr/pci.hpp"

namespace physr::pci {

namespace {
bool hex_field(std::string_view s, uint64_t max, uint64_t& out) {
  if (s.empty() || s.size() > 8) return false;
  auto v = consume_uint(s, 16);
  if (!v || !s.empty() || *v > max) return false;
  out = *v;
  return true;
}
}  // namespace

std::string Bdf::to_string() const {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.%x", domain, bus, dev, fn);
  return buf;
}

Result<Bdf> parse_bdf(std::string_view text) {
  auto bad = [&] {
    return make_error(EINVAL, "PCI address '" + std::string(text) + "': expected DDDD:BB:DD.F or BB:DD.F in hex");
  };
  const size_t dot = text.rfind('.');
  if (dot == std::string_view::npos) return bad();
  const std::string_view fn = text.substr(dot + 1), head = text.substr(0, dot);
  const size_t c2 = head.rfind(':');
  if (c2 == std::string_view::npos) return bad();
  const std::string_view dev = head.substr(c2 + 1), head2 = head.substr(0, c2);
  std::string_view bus = head2, dom;
  if (const size_t c1 = head2.rfind(':'); c1 != std::string_view::npos) {
    bus = head2.substr(c1 + 1);
    dom = head2.substr(0, c1);
  }
  uint64_t d = 0, b, v, f;
  if ((!dom.empty() && !hex_field(dom, 0xffffffff, d)) || bus.size() > 2 || !hex_field(bus, 0xff, b) ||
      dev.size() > 2 || !hex_field(dev, 0x1f, v) || fn.size() != 1 || !hex_field(fn, 7, f))
    return bad();
  return Bdf{static_cast<uint32_t>(d), static_cast<uint8_t>(b), static_cast<uint8_t>(v), static_cast<uint8_t>(f)};
}

namespace {
struct PortName {
  PortType type;
  const char* name;
};
constexpr PortName kPortNames[] = {
    {PortType::unknown, "unknown"},
    {PortType::conventional, "conventional"},
    {PortType::endpoint, "endpoint"},
    {PortType::legacy_endpoint, "legacy_endpoint"},
    {PortType::root_port, "root_port"},
    {PortType::switch_upstream, "switch_upstream"},
    {PortType::switch_downstream, "switch_downstream"},
    {PortType::pcie_to_pci, "pcie_to_pci_bridge"},
    {PortType::pci_to_pcie, "pci_to_pcie_bridge"},
    {PortType::rc_endpoint, "rc_integrated_endpoint"},
    {PortType::rc_event_collector, "rc_event_collector"},
};
}  // namespace

const char* port_type_name(PortType t) noexcept {
  for (const auto& p : kPortNames)
    if (p.type == t) return p.name;
  return "unknown";
}

Result<PortType> parse_port_type(std::string_view name) {
  for (const auto& p : kPortNames)
    if (name == p.name) return p.type;
  std::string all;
  for (const auto& p : kPortNames) {
    if (!all.empty()) all += ", ";
    all += p.name;
  }
  return make_error(EINVAL, "port type '" + std::string(name) + "': expected one of " + all);
}

std::string acs_bits_string(uint16_t ctrl) {
  static const std::pair<uint16_t, const char*> bits[] = {{acs::SV, "SV"}, {acs::TB, "TB"}, {acs::RR, "RR"},
                                                          {acs::CR, "CR"}, {acs::UF, "UF"}, {acs::EC, "EC"},
                                                          {acs::DT, "DT"}};
  std::string s;
  for (const auto& [bit, name] : bits)
    if (ctrl & bit) {
      if (!s.empty()) s += ' ';
      s += name;
    }
  return s.empty() ? "-" : s;
}

std::string class_name(uint32_t cc) {
  const uint32_t sub = cc >> 8;
  switch (sub) {
    case 0x0100: return "SCSI controller";
    case 0x0101: return "IDE controller";
    case 0x0104: return "RAID controller";
    case 0x0106: return "SATA controller";
    case 0x0107: return "SAS controller";
    case kSubclassNvm: return cc == kClassNvme ? "NVMe controller" : "NVM controller";
    case 0x0200: return "Ethernet controller";
    case 0x0207: return "InfiniBand controller";
    case 0x0280: return "Network controller";
    case 0x0300: return "VGA controller";
    case 0x0302: return "3D controller";
    case 0x0380: return "Display controller";
    case 0x0403: return "Audio device";
    case 0x0500: return "RAM memory";
    case 0x0580: return "Memory controller";
    case 0x0600: return "Host bridge";
    case 0x0601: return "ISA bridge";
    case kSubclassPciBridge: return "PCI bridge";
    case kSubclassPciBridgeSemiTransparent: return "PCI bridge (semi-transparent)";
    case 0x0680: return "Bridge";
    case 0x0880: return "System peripheral";
    case 0x0c03: return "USB controller";
    case 0x0c05: return "SMBus";
    case 0x0c04: return "Fibre Channel";
    case 0x0b40: return "Co-processor";
    case 0x1200: return "Processing accelerator";
    case 0x1101: return "Signal processing controller";
    default: break;
  }
  switch (cc >> 16) {
    case kBaseClassStorage: return "Storage controller";
    case kBaseClassNetwork: return "Network controller";
    case kBaseClassDisplay: return "Display controller";
    case kBaseClassBridge: return "Bridge";
    case 0x08: return "System peripheral";
    case 0x0c: return "Serial bus controller";
    case kBaseClassAccelerator: return "Processing accelerator";
    case 0xff: return "Unassigned class";
    default: break;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "class %06x", cc);
  return buf;
}

std::string HostBridge::name() const {
  char buf[32];
  std::snprintf(buf, sizeof buf, "pci%04x:%02x", domain, bus);
  return buf;
}

std::optional<uint32_t> Topology::find(const Bdf& bdf) const {
  for (uint32_t i = 0; i < functions.size(); ++i)
    if (functions[i].bdf == bdf) return i;
  return std::nullopt;
}

Result<uint32_t> Topology::lookup(std::string_view text) const {
  for (uint32_t i = 0; i < functions.size(); ++i)
    if (!functions[i].name.empty() && functions[i].name == text) return i;
  auto bdf = parse_bdf(text);
  if (!bdf) return make_error(EINVAL, "'" + std::string(text) + "' is neither a PCI address (DDDD:BB:DD.F) nor a device name in " + source);
  if (auto i = find(*bdf)) return *i;
  return make_error(ENODEV, "no PCI function " + bdf->to_string() + " in " + source);
}

Status Topology::validate(bool unique_bdfs) const {
  const auto n = static_cast<uint32_t>(functions.size());
  for (uint32_t i = 0; i < n; ++i) {
    const Function& f = functions[i];
    if (f.host_bridge >= host_bridges.size())
      return make_error(EINVAL, f.bdf.to_string() + ": host bridge index out of range");
    if (f.upstream >= 0 && static_cast<uint32_t>(f.upstream) >= n)
      return make_error(EINVAL, f.bdf.to_string() + ": upstream index out of range");
    uint32_t steps = 0;
    for (int32_t u = f.upstream; u >= 0; u = functions[static_cast<uint32_t>(u)].upstream)
      if (++steps > n) return make_error(EINVAL, f.bdf.to_string() + ": upstream bridges form a cycle");
  }
  if (unique_bdfs) {
    const auto dups = duplicate_bdfs();
    if (!dups.empty()) return make_error(EEXIST, dups.front().to_string() + " appears twice");
  }
  return {};
}

std::vector<Bdf> Topology::duplicate_bdfs() const {
  std::vector<Bdf> all, dups;
  all.reserve(functions.size());
  for (const Function& f : functions) all.push_back(f.bdf);
  std::sort(all.begin(), all.end());
  for (size_t i = 1; i < all.size(); ++i)
    if (all[i] == all[i - 1] && (dups.empty() || dups.back() != all[i])) dups.push_back(all[i]);
  return dups;
}

}  // namespace physr::pci
