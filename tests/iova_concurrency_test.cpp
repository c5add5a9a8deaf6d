#include "physr/iova.hpp"

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

}  // namespace
}  // namespace physr
