// Fuzzes the text parsers: sizes and pfn lists. They must return a value or an error,
// never crash, hang or accept something they cannot represent.
#include <string_view>

#include "physr/range.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto s = physr::parse_size(text);
  if (s) {
    // Whatever parsed must print and parse back to itself.
    auto again = physr::parse_size(physr::format_size(*s).erase(physr::format_size(*s).find(' '), 1));
    if (!again || *again != *s) __builtin_trap();
  }
  auto l = physr::parse_pfn_text(text, "fuzz");
  if (l) {
    if (l->pfns.size() != l->providers.size()) __builtin_trap();
    auto built = physr::RangeList::from_pfns(l->pfns, l->providers);
    if (built && built->total_bytes() != l->pfns.size() * 4096) __builtin_trap();
  } else if (l.error().message.rfind("fuzz:", 0) != 0) {
    __builtin_trap();  // errors name the source
  }
  return 0;
}
