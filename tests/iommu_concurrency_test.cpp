#include "physr/iommu.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>

namespace physr {
namespace {

// Two threads map, translate and unmap on one shared domain while a third walks the table:
// every translation a mapper sees of its own mapping is exact, and nothing is left behind.
TEST(IoDomainConcurrencyTest, SharedDomainMapUnmapAndWalk) {
  for (bool strict : {true, false}) {
    auto d = std::move(IoDomain::create(IoDomainOptions{.iova = {}, .strict = strict, .flush_queue_entries = 32})).value();
    std::atomic<bool> stop{false};
    std::atomic<int> errors{0};
    auto mapper = [&](uint64_t seed) {
      std::mt19937_64 rng(seed);
      for (int i = 0; i < 3000; ++i) {
        const uint64_t pages = 1 + rng() % 64;
        auto iova = d->iova().alloc(pages * 4096, uint64_t{1} << 40);
        if (!iova) {
          errors.fetch_add(1);
          continue;
        }
        const uint64_t phys = (seed << 40) + ((rng() % (1u << 20)) << 12);
        if (!d->map(*iova, PhysAddr(phys), pages * 4096, kIommuReadWrite)) errors.fetch_add(1);
        const uint64_t off = (rng() % pages) * 4096 + 7;
        auto t = d->walk(*iova + off);
        if (!t || t->phys.value() != phys + off) errors.fetch_add(1);
        if (!d->unmap(*iova, pages * 4096)) errors.fetch_add(1);
        if (!d->free_iova(*iova, pages * 4096)) errors.fetch_add(1);
      }
    };
    std::thread walker([&] {
      std::mt19937_64 rng(3);
      while (!stop.load(std::memory_order_relaxed)) (void)d->translate(DmaAddr((rng() % (uint64_t{1} << 28)) << 12));
    });
    std::thread m1(mapper, 1), m2(mapper, 2);
    m1.join();
    m2.join();
    stop = true;
    walker.join();
    EXPECT_EQ(errors.load(), 0) << "strict " << strict;
    const IoDomainStats s = d->stats();
    EXPECT_EQ(s.mapped_4k + s.mapped_2m + s.mapped_1g, 0u);
  }
}

}  // namespace
}  // namespace physr
