// Page pools under concurrency (run under TSan: label concurrency): the owning thread
// allocates and recycles directly while other threads recycle into the ptr_ring
// (page_pool_put_unrefed_netmem() from outside NAPI), and a destroy while other threads
// still hold buffers, which the retry thread finishes when they come back.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/page_pool_world.hpp"

namespace physr::mem {
namespace {

using physr::testing::PagePoolWorld;

// A queue of buffers handed from the owner to a recycling thread (the skb's journey).
struct Handoff {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Netmem> q;
  bool done = false;
  void push(Netmem n) {
    std::lock_guard g(mu);
    q.push_back(n);
    cv.notify_one();
  }
  bool pop(Netmem& n) {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return done || !q.empty(); });
    if (q.empty()) return false;
    n = q.front();
    q.pop_front();
    return true;
  }
  void finish() {
    std::lock_guard g(mu);
    done = true;
    cv.notify_all();
  }
};

void run(bool provider) {
  PagePoolWorld pw;
  std::unique_ptr<DeviceMemoryProvider> dev;
  PagePoolParams p;
  p.napi = true;
  p.pool_size = 256;
  p.report = [](const std::string&) {};
  if (provider) {
    dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 2 * MiB).value();
    p.mp = dev.get();
    p.dev = pw.nic.get();
    p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
    p.max_len = 4096;
  } else {
    p.pages = pw.pages.get();
  }
  PagePool* pool = PagePool::create(p).value();
  Handoff hand[2];
  std::atomic<uint64_t> recycled{0}, errors{0};
  std::vector<std::thread> recyclers;
  for (auto& h : hand) {
    recyclers.emplace_back([&] {
      for (Netmem n; h.pop(n);) {
        if (!pool->put_full_netmem(n, false)) errors.fetch_add(1);
        recycled.fetch_add(1);
      }
    });
  }
  std::mt19937_64 rng(7);
  uint64_t handed = 0;
  std::vector<Netmem> local;
  for (int i = 0; i < 20000; ++i) {
    const Netmem n = pool->alloc_netmems();
    if (!n) continue;  // everything is in flight
    switch (rng() % 4) {
      case 0:
        ASSERT_TRUE(pool->recycle_direct(n));
        break;
      case 1:
        local.push_back(n);
        if (local.size() > 32) {
          ASSERT_TRUE(pool->put_full_netmem(local.front(), false));  // the owner: direct
          local.erase(local.begin());
        }
        break;
      default:
        hand[rng() % 2].push(n);
        ++handed;
        break;
    }
    if (i % 1000 == 0) (void)pool->stats();  // read while others write
  }
  for (Netmem n : local) ASSERT_TRUE(pool->recycle_direct(n));
  for (auto& h : hand) h.finish();
  for (auto& t : recyclers) t.join();
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_EQ(recycled.load(), handed);
  const PagePoolStats s = pool->stats();
  // Every buffer is in the cache or the ring, or was released (ring full).
  EXPECT_EQ(pool->inflight(), static_cast<int32_t>(pool->cache_count() + pool->ring_count()));
  EXPECT_GT(s.recycle.ring, 0u);
  EXPECT_GT(s.recycle.cached, 0u);
  std::atomic<bool> gone{false};
  pool->destroy();
  (void)gone;
  if (provider) {
    EXPECT_EQ(dev->outstanding(), 0u);
  } else {
    EXPECT_EQ(pw.pages->allocated_pages(), 0u);
  }
}

TEST(PagePoolConcurrencyTest, OwnerAllocatesOthersRecycleIntoTheRing) { run(false); }
TEST(PagePoolConcurrencyTest, DeviceMemoryRecycledFromOtherThreads) { run(true); }

// Destroy while other threads still hold buffers: their returns, concurrent with the
// retry thread's releases, finish the pool.
TEST(PagePoolConcurrencyTest, DestroyWhileOtherThreadsHoldBuffers) {
  PagePoolWorld pw;
  std::mutex mu;
  std::condition_variable cv;
  bool disconnected = false;
  PagePoolParams p;
  p.pages = pw.pages.get();
  p.report = [](const std::string&) {};
  p.defer_time = std::chrono::milliseconds(1);
  p.defer_warn = std::chrono::milliseconds(1);
  p.disconnect = [&] {
    std::lock_guard g(mu);
    disconnected = true;
    cv.notify_all();
  };
  PagePool* pool = PagePool::create(p).value();
  std::vector<Netmem> held[3];
  for (auto& h : held)
    for (int i = 0; i < 50; ++i) h.push_back(pool->alloc_netmems());
  std::atomic<bool> go{false};
  std::vector<std::thread> ts;
  for (auto& h : held) {
    ts.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      for (Netmem n : h) ASSERT_TRUE(pool->put_full_netmem(n, false));
    });
  }
  pool->destroy();
  go.store(true);
  for (auto& t : ts) t.join();
  std::unique_lock lk(mu);
  ASSERT_TRUE(cv.wait_for(lk, std::chrono::seconds(30), [&] { return disconnected; }));
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

}  // namespace
}  // namespace physr::mem
