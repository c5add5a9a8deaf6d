// P2P memory pools under concurrency (run under TSan by scripts/test): allocators and
// freers on several threads, RCU readers holding chunks across their free, and removal
// while all of it runs.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/mem_world.hpp"

namespace physr::mem {
namespace {

using physr::testing::MemWorld;

// One bit per granule of the GPU BAR: set while some thread holds the granule.
struct Owners {
  std::vector<std::atomic<uint64_t>> bits;
  Owners() : bits(MemWorld::kGpuSize / kPageSize / 64) {}
  // False when some granule of c was already held: handed out twice.
  bool take(const P2PChunk& c) {
    bool ok = true;
    for (uint64_t i = (c.span.base.value() - MemWorld::kGpuBar) / kPageSize, n = c.span.size / kPageSize; n--; ++i)
      ok &= !(bits[i / 64].fetch_or(uint64_t{1} << (i % 64)) >> (i % 64) & 1);
    return ok;
  }
  void give(const P2PChunk& c) {
    for (uint64_t i = (c.span.base.value() - MemWorld::kGpuBar) / kPageSize, n = c.span.size / kPageSize; n--; ++i)
      bits[i / 64].fetch_and(~(uint64_t{1} << (i % 64)));
  }
};

TEST(MemPoolConcurrencyTest, AllocatorsReadersAndRemoval) {
  for (const bool track : {false, true}) {
    SCOPED_TRACE(track ? "tracking" : "no tracking");
    MemWorld w;
    P2PMemoryOptions o;
    o.track = track;
    auto m = P2PMemory::create(*w.platform, o).value();
    ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
    Owners owners;
    std::atomic<uint64_t> shared{0};   // a chunk base a reader may find (0: none)
    std::atomic<uint64_t> reading{0};  // the chunk a reader holds inside its section
    std::atomic<bool> stop{false}, removed{false};
    std::atomic<int> violations{0}, twice{0}, revokes{0};
    std::atomic<uint64_t> ops{0};
    m->on_revoke(w.gpu, [&](const P2PChunk&) { revokes.fetch_add(1); });

    auto allocator = [&](unsigned seed) {
      std::mt19937_64 rng(seed);
      std::vector<P2PChunk> held;
      const uint64_t sizes[] = {4096, 4096, 8192, 65536, 2 * MiB, 12288};
      while (!stop.load()) {
        if (held.size() < 64 && (held.empty() || rng() % 2)) {
          auto c = m->alloc(w.gpu, sizes[rng() % std::size(sizes)]);
          if (!c) {
            if (c.error().code != ENODEV && c.error().code != ENOMEM) violations.fetch_add(1);
            if (c.error().code == ENODEV) break;
            continue;
          }
          if (!owners.take(*c)) twice.fetch_add(1);
          if (reading.load() == c->span.base.value()) violations.fetch_add(1);  // reused under a reader
          held.push_back(*c);
          if (c->span.size == 4096) {
            uint64_t expected = 0;
            shared.compare_exchange_strong(expected, c->span.base.value());
          }
        } else {
          const size_t i = rng() % held.size();
          const P2PChunk c = held[i];
          held[i] = held.back();
          held.pop_back();
          uint64_t mine = c.span.base.value();
          shared.compare_exchange_strong(mine, 0);  // readers find it no more, then it is freed
          owners.give(c);
          if (!m->free(c)) violations.fetch_add(1);
        }
        ops.fetch_add(1, std::memory_order_relaxed);
      }
      for (const P2PChunk& c : held) {
        uint64_t mine = c.span.base.value();
        shared.compare_exchange_strong(mine, 0);
        owners.give(c);
        if (!m->free(c)) violations.fetch_add(1);
      }
    };
    auto reader = [&] {
      while (!removed.load()) {
        P2PMemory::ReadGuard guard;
        const uint64_t a = shared.load();
        if (a) {
          reading.store(a);
          for (int i = 0; i < 50; ++i) std::this_thread::yield();
          reading.store(0);
        }
      }
    };
    std::vector<std::thread> threads;
    threads.emplace_back(allocator, 1);
    threads.emplace_back(allocator, 2);
    threads.emplace_back(allocator, 3);
    threads.emplace_back(reader);
    while (ops.load() < 20000) std::this_thread::yield();
    // Removal while the allocators run: they see ENODEV, free what they hold and stop.
    Status r = m->remove(w.gpu);
    EXPECT_TRUE(r) << r.error().to_string();
    removed.store(true);
    stop.store(true);
    for (auto& t : threads) t.join();
    EXPECT_EQ(violations.load(), 0);
    EXPECT_EQ(twice.load(), 0);
    EXPECT_EQ(m->alloc(w.gpu, 4096).error().code, ENODEV);
    EXPECT_EQ(m->stats(w.gpu).chunks, 0u);
  }
}

TEST(MemPoolConcurrencyTest, BarrierAndStatsWhileOthersFree) {
  MemWorld w;
  P2PMemoryOptions o;
  o.track = false;
  auto m = P2PMemory::create(*w.platform, o).value();
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  auto worker = [&] {
    std::vector<P2PChunk> held;
    while (!stop.load()) {
      auto c = m->alloc(w.nvme, 4096);
      if (c) held.push_back(*c);
      else if (c.error().code != ENOMEM) failures.fetch_add(1);
      if (held.size() > 100 || !c) {
        for (const P2PChunk& x : held)
          if (!m->free(x)) failures.fetch_add(1);
        held.clear();
      }
    }
    for (const P2PChunk& x : held)
      if (!m->free(x)) failures.fetch_add(1);
  };
  std::thread a(worker), b(worker);
  for (int i = 0; i < 50; ++i) {
    m->barrier();
    (void)m->stats(w.nvme);
  }
  stop.store(true);
  a.join();
  b.join();
  m->barrier();
  EXPECT_EQ(failures.load(), 0);
  const PoolStats s = m->stats(w.nvme);
  EXPECT_EQ(s.chunks, 0u);
  EXPECT_EQ(s.deferred, 0u);
}

// off_revoke() while remove() runs the subscriber's callback on another thread: it returns
// only once that call is over, and the callback is not called again.
TEST(MemPoolConcurrencyTest, OffRevokeWaitsForACallInProgress) {
  MemWorld w;
  auto m = P2PMemory::create(*w.platform).value();
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  std::vector<P2PChunk> held;
  for (int i = 0; i < 4; ++i) held.push_back(m->alloc(w.gpu, 4096).value());
  std::atomic<bool> in_call{false}, off_started{false}, off_returned{false}, seen_return_in_call{false};
  std::atomic<int> calls{0};
  const auto t = m->on_revoke(w.gpu, [&](const P2PChunk&) {
    calls.fetch_add(1);
    in_call = true;
    while (!off_started.load()) std::this_thread::yield();
    for (int i = 0; i < 200; ++i) {
      if (off_returned.load()) seen_return_in_call = true;  // off_revoke did not wait
      std::this_thread::yield();
    }
    in_call = false;
  });
  // The holder frees everything once its subscription is over.
  std::thread remover([&] { EXPECT_TRUE(m->remove(w.gpu)); });
  while (!in_call.load()) std::this_thread::yield();
  off_started = true;
  ASSERT_TRUE(m->off_revoke(t));
  off_returned = true;
  const int at_return = calls.load();
  EXPECT_FALSE(in_call.load());
  for (const P2PChunk& c : held) ASSERT_TRUE(m->free(c));
  remover.join();
  EXPECT_FALSE(seen_return_in_call.load());
  EXPECT_EQ(calls.load(), at_return);  // not called again once off_revoke returned (how many
                                       // calls ran before depends on who takes the lock first)
}

}  // namespace
}  // namespace physr::mem
