// Fuzzes the configuration-space parser: any bytes must give a result or an error, with
// bounded capability walks, and what it reports must be consistent.
#include <span>

#include "physr/pci.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) size = 4096;
  auto r = physr::pci::parse_config(std::span<const uint8_t>(data, size));
  if (!r) {
    if (size >= 64) __builtin_trap();
    return 0;
  }
  if (size < 64) __builtin_trap();
  if (r->acs.kind == physr::pci::AcsState::Kind::present && size < 4096) __builtin_trap();
  if (size < 256 && (r->has_pcie || r->port_type != physr::pci::PortType::unknown)) __builtin_trap();
  return 0;
}
