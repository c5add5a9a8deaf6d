// Configuration-space parsing. Input may come from an untrusted snapshot: every offset is
// bounds-checked and both capability walks are bounded, like Linux's
// drivers/pci/pci.c __pci_find_next_cap_ttl() (TTL 48) and pci_find_next_ext_capability()
// (TTL (4096 - 256) / 8).
#include "physr/pci.hpp"

namespace physr::pci {

namespace {
constexpr uint8_t kCapPcie = 0x10;
constexpr uint16_t kExtCapAcs = 0x000d;

uint16_t rd16(std::span<const uint8_t> b, size_t off) { return static_cast<uint16_t>(b[off] | b[off + 1] << 8); }
uint32_t rd32(std::span<const uint8_t> b, size_t off) {
  return static_cast<uint32_t>(b[off]) | static_cast<uint32_t>(b[off + 1]) << 8 | static_cast<uint32_t>(b[off + 2]) << 16 |
         static_cast<uint32_t>(b[off + 3]) << 24;
}

PortType port_type_from_pcie(unsigned t) {
  switch (t) {
    case 0x0: return PortType::endpoint;
    case 0x1: return PortType::legacy_endpoint;
    case 0x4: return PortType::root_port;
    case 0x5: return PortType::switch_upstream;
    case 0x6: return PortType::switch_downstream;
    case 0x7: return PortType::pcie_to_pci;
    case 0x8: return PortType::pci_to_pcie;
    case 0x9: return PortType::rc_endpoint;
    case 0xa: return PortType::rc_event_collector;
    default: return PortType::unknown;
  }
}
}  // namespace

Result<ConfigInfo> parse_config(std::span<const uint8_t> b) {
  if (b.size() < 64)
    return make_error(EINVAL, "config space has " + std::to_string(b.size()) + " bytes; the header alone is 64");
  ConfigInfo info;
  info.vendor = rd16(b, 0x00);
  info.device = rd16(b, 0x02);
  info.class_code = rd32(b, 0x08) >> 8;
  info.header_type = b[0x0e] & 0x7f;
  info.multifunction = (b[0x0e] & 0x80) != 0;
  if (b.size() < 256) return info;  // header only (read without root): capabilities unknown

  const bool has_caps = (rd16(b, 0x06) & 0x0010) != 0;  // Status: Capabilities List
  if (has_caps) {
    size_t pos = info.header_type == 2 ? b[0x14] : b[0x34];
    uint64_t seen[4] = {0, 0, 0, 0};
    for (int ttl = 48; ttl > 0; --ttl) {
      pos &= ~size_t{3};
      if (pos < 0x40 || pos + 4 > 256) break;
      if (seen[pos / 64] & (uint64_t{1} << (pos % 64))) break;  // a loop
      seen[pos / 64] |= uint64_t{1} << (pos % 64);
      const uint8_t id = b[pos];
      if (id == 0xff) break;
      if (id == kCapPcie) {
        info.has_pcie = true;
        info.port_type = port_type_from_pcie((rd16(b, pos + 2) >> 4) & 0xf);
      }
      pos = b[pos + 1];
    }
  }
  if (!info.has_pcie) {
    // Conventional PCI: no extended configuration space, so no ACS.
    info.port_type = PortType::conventional;
    info.acs.kind = AcsState::Kind::absent;
    return info;
  }
  if (b.size() < 4096) return info;  // extended space not read: ACS unknown

  info.acs.kind = AcsState::Kind::absent;
  size_t pos = 0x100;
  for (int ttl = (4096 - 256) / 8; ttl > 0; --ttl) {
    const uint32_t header = rd32(b, pos);
    if (header == 0 || header == 0xffffffff) break;
    if ((header & 0xffff) == kExtCapAcs) {
      if (pos + 8 <= b.size()) {
        info.acs.kind = AcsState::Kind::present;
        info.acs.cap = rd16(b, pos + 4);
        info.acs.ctrl = rd16(b, pos + 6);
      }
      break;
    }
    const size_t next = (header >> 20) & 0xffc;
    if (next < 0x100 || next + 4 > b.size()) break;
    pos = next;
  }
  return info;
}

}  // namespace physr::pci
