#include "physr/iova.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
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

// Linux alloc_iova_fast(): when the tree has no room, every CPU's cached ranges and the
// depot go back to it (free_cpu_cached_iovas() for each online CPU,
// free_global_cached_iovas()) before the one retry. Thread A holds the whole space in its
// magazines (and one live range); thread B's allocation must still succeed while A lives.
TEST(IovaConcurrencyTest, FailedAllocFlushesOtherThreadsMagazines) {
  auto a = std::move(IovaAllocator::create(IovaOptions{.end = uint64_t{1} << 20, .depot_delay_ms = 0})).value();  // 255 granules
  const uint64_t limit = uint64_t{1} << 20;
  std::mutex mu;
  std::condition_variable cv;
  bool cached = false, done = false;
  std::thread ta([&] {
    std::vector<DmaAddr> all;
    for (;;) {
      auto r = a->alloc(4096, limit);
      if (!r) break;
      all.push_back(*r);
    }
    EXPECT_EQ(all.size(), 255u);
    all.pop_back();  // stays live
    for (DmaAddr x : all) EXPECT_TRUE(a->free(x, 4096).has_value());  // 254: loaded and prev full, depot empty
    EXPECT_EQ(a->stats().cached_granules, 254u);
    EXPECT_EQ(a->stats().free_granules, 0u);
    std::unique_lock lock(mu);
    cached = true;
    cv.notify_all();
    cv.wait(lock, [&] { return done; });
  });
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return cached; });
  }
  auto one = a->alloc(4096, limit);
  auto pair = a->alloc(2 * 4096, limit);
  EXPECT_TRUE(one.has_value()) << one.error().to_string();
  EXPECT_TRUE(pair.has_value()) << pair.error().to_string();
  {
    std::lock_guard lock(mu);
    done = true;
    cv.notify_all();
  }
  ta.join();
}

// Two threads in a space small enough that allocations keep failing and flushing each
// other's magazines while the other runs its lock-free fast paths: no two live ranges
// overlap, and once both exit the whole space is free again.
TEST(IovaConcurrencyTest, FlushesRaceWithFastPaths) {
  auto a = std::move(IovaAllocator::create(IovaOptions{.end = uint64_t{1} << 24, .depot_delay_ms = 1})).value();  // 4095 granules
  const uint64_t limit = uint64_t{1} << 24;
  std::mutex mu;
  std::map<uint64_t, uint64_t> live;  // iova -> end
  std::atomic<int> errors{0}, enomem{0};
  auto worker = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::pair<DmaAddr, uint64_t>> mine;
    for (int step = 0; step < 20000; ++step) {
      if (mine.size() < 300 && (mine.empty() || rng() % 2)) {
        const uint64_t bytes = (uint64_t{1} << (rng() % 3)) * 4096;
        auto r = a->alloc(bytes, limit);
        if (!r) {
          if (r.error().code != ENOMEM) errors.fetch_add(1);
          enomem.fetch_add(1);
          continue;
        }
        std::lock_guard lock(mu);
        auto next = live.lower_bound(r->value());
        if ((next != live.end() && next->first < r->value() + bytes) || (next != live.begin() && std::prev(next)->second > r->value()))
          errors.fetch_add(1);
        live[r->value()] = r->value() + bytes;
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
      if (step % 997 == 0) a->flush_caches();
    }
    for (auto& [x, bytes] : mine) {
      {
        std::lock_guard lock(mu);
        live.erase(x.value());
      }
      if (!a->free(x, bytes)) errors.fetch_add(1);
    }
  };
  std::thread t1(worker, 3), t2(worker, 4);
  t1.join();
  t2.join();
  EXPECT_EQ(errors.load(), 0);
  a->flush_caches();
  EXPECT_EQ(a->stats().free_granules, (uint64_t{1} << 12) - 1);
}

INSTANTIATE_TEST_SUITE_P(CheckMode, IovaConcurrencyTest, ::testing::Bool());

}  // namespace
}  // namespace physr
