// Op-stream fuzzer for the IOVA allocator: allocations with random sizes and limits, frees
// of live ranges and bogus frees, against a model of live ranges. Alternates check mode
// (bogus frees must be refused) and the cached fast paths.
#include <bit>
#include <map>

#include "fuzz_check.hpp"
#include "physr/iova.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  if (size < 1) return 0;
  const bool check = data[0] & 1, caching = data[0] & 2;
  const uint64_t end = uint64_t{1} << (20 + (data[0] >> 2) % 12);  // 256 .. 512K granules
  auto a = std::move(IovaAllocator::create(IovaOptions{.end = end, .caching = caching, .check = check})).value();
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> live;  // iova -> (bytes, reserved end)
  size_t i = 1;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  while (i < size) {
    const uint64_t op = byte() % 4;
    if (op <= 1) {
      const uint64_t bytes = 1 + (byte() << 8 | byte()) * (op ? 4096 : 64);
      const uint64_t limit = byte() % 4 == 0 ? end >> (1 + byte() % 4) : end;
      auto r = a->alloc(bytes, limit);
      if (!r) {
        CHECK(r.error().code == ENOMEM || r.error().code == EINVAL);
        continue;
      }
      const uint64_t g = (bytes + 4095) / 4096, res = g < 32 ? std::bit_ceil(g) : g;
      const uint64_t x = r->value();
      CHECK(x % (std::bit_ceil(res) * 4096) == 0);
      CHECK(x >= 4096 && x + res * 4096 <= limit);
      auto next = live.lower_bound(x);
      CHECK(next == live.end() || x + res * 4096 <= next->first);
      CHECK(next == live.begin() || std::prev(next)->second.second <= x);
      live[x] = {bytes, x + res * 4096};
    } else if (op == 2 && !live.empty()) {
      auto it = std::next(live.begin(), static_cast<long>(byte() % live.size()));
      CHECK(a->free(DmaAddr(it->first), it->second.first).has_value());
      live.erase(it);
    } else if (check) {
      // A free of something not live must be refused (and change nothing).
      const uint64_t x = (byte() << 12 | byte() << 4) * 4096 % end;
      if (!live.count(x)) CHECK(!a->free(DmaAddr(x), 4096).has_value());
    }
  }
  for (const auto& [x, v] : live) CHECK(a->free(DmaAddr(x), v.first).has_value());
  a->flush_caches();
  CHECK(a->stats().free_granules == end / 4096 - 1);
  return 0;
}
