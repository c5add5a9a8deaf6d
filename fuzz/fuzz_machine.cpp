// Fuzzes the TOML machine-file loader, then runs every verdict and explanation on what it
// accepts: errors are fine, crashes, hangs and inconsistent verdicts are not.
#include <string_view>

#include "physr/pci.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr::pci;
  auto t = parse_machine(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.toml");
  if (!t) {
    if (t.error().message.rfind("fuzz.toml", 0) != 0) __builtin_trap();  // errors name the file
    return 0;
  }
  if (t->functions.size() > 200) return 0;
  auto e = P2PEngine::create(*t);
  if (!e) __builtin_trap();  // a loaded machine is always valid for the engine
  const auto n = static_cast<uint32_t>(t->functions.size());
  for (uint32_t p = 0; p < n; ++p)
    for (uint32_t c = 0; c < n; ++c) {
      const Verdict v = e->verdict(p, c);
      const Explanation x = e->explain(p, c);
      if (x.verdict.type != v.type || x.verdict.distance != v.distance) __builtin_trap();
      if (p == c && v.distance != 0) __builtin_trap();
      if (v.type == MapType::bus_addr && !x.common) __builtin_trap();
    }
  return 0;
}
