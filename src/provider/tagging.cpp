// Range-list integration: tag physical pieces with their providers.
#include <cstdio>
#include <string>

#include "physr/provider.hpp"

namespace physr {

Result<RangeList> tag_ranges(const ProviderRegistry& registry, std::span<const PhysSpan> pieces, const SegmentLimits& limits) {
  RangeList out;
  for (size_t i = 0; i < pieces.size(); ++i) {
    uint64_t addr = pieces[i].base.value();
    uint64_t left = pieces[i].size;
    if (left == 0) return make_error(EINVAL, "piece " + std::to_string(i) + " has length 0");
    while (left != 0) {
      uint64_t extent = 0;
      const Provider* p = registry.find_extent(PhysAddr(addr), extent);
      if (p && p->revoked()) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(addr));
        return make_error(EFAULT, "piece " + std::to_string(i) + " at " + buf + " lies in revoked provider " +
                                      std::to_string(p->id()) + " (" + p->owner().to_string() + ")");
      }
      const uint64_t take = std::min(left, extent);
      // append() merges contiguous pieces of one provider and never merges across two.
      PHYSR_RETURN_IF_ERROR(out.append(PhysRange{PhysAddr(addr), take, p ? p->id() : kHostMemory}, limits));
      addr += take;
      left -= take;
    }
  }
  return out;
}

}  // namespace physr
