// A consumer of range lists alone: links physr::range (pkg-config physr-range) and so
// physr_core, nothing else of physr.
#include <physr/range.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<uint64_t> pfns{0x100, 0x101, 0x300};
  auto l = physr::RangeList::from_pfns(pfns);
  if (!l) return 1;
  std::printf("ranges=%zu bytes=%llu\n", l->size(), static_cast<unsigned long long>(l->total_bytes()));
  return 0;
}
