#include "physr/iommu.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace physr {
namespace {

// Both cores allocate and free through per-thread magazines, the depot and the free sets.
// Every live allocation is recorded in a shared map: two live ones must never overlap, and
// after the threads exit (returning their magazines) the whole space is free again.
class IovaConcurrencyTest : public ::testing::TestWithParam<bool> {};

TEST_P(IovaConcurrencyTest, ThreadsNeverGetOverlappingRanges) {
  auto a = std::move(IovaAllocator::create(IovaOptions{.end = uint64_t{1} << 32, .check = GetParam()})).value();
  std::mutex mu;
  std::map<uint64_t, uint64_t> live;  // iova -> end
  std::atomic<int> errors{0};
  auto worker = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::pair<DmaAddr, uint64_t>> mine;
    for (int step = 0; step < 20000; ++step) {
      if (mine.empty() || rng() % 2) {
        const uint64_t bytes = rng() % 8 == 0 ? (33 + rng() % 100) * 4096 : (1 + rng() % 16) * 4096;
        auto r = a->alloc(bytes, uint64_t{1} << 32);
        if (!r) {
          errors.fetch_add(1);
          continue;
        }
        const uint64_t g = bytes / 4096 < 32 ? std::bit_ceil(bytes / 4096) : bytes / 4096;
        std::lock_guard lock(mu);
        auto next = live.lower_bound(r->value());
        if ((next != live.end() && next->first < r->value() + g * 4096) ||
            (next != live.begin() && std::prev(next)->second > r->value()))
          errors.fetch_add(1);
        live[r->value()] = r->value() + g * 4096;
        mine.emplace_back(*r, bytes);
      } else {
        const size_t i = rng() % mine.size();
        {
          std::lock_guard lock(mu);
          live.erase(mine[i].first.value());
        }
        if (!a->free(mine[i].first, mine[i].second)) errors.fetch_add(1);
        mine[i] = mine.back();
        mine.pop_back();
      }
    }
    for (auto& [x, bytes] : mine) {
      {
        std::lock_guard lock(mu);
        live.erase(x.value());
      }
      if (!a->free(x, bytes)) errors.fetch_add(1);
    }
  };
  std::thread t1(worker, 1), t2(worker, 2);
  t1.join();
  t2.join();
  EXPECT_EQ(errors.load(), 0);
  a->flush_caches();
  EXPECT_EQ(a->stats().free_granules, (uint64_t{1} << 20) - 1);
}

INSTANTIATE_TEST_SUITE_P(CheckMode, IovaConcurrencyTest, ::testing::Bool());

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
