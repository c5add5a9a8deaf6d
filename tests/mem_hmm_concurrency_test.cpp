// The mirror's retry protocol under concurrency (run under TSan: ctest -L concurrency):
// device threads fault and access a process buffer while the process thread unmaps and
// remaps parts of it. Every access runs while its translation is valid, so it must reach
// exactly the page the CPU maps there at that moment.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/dma_world.hpp"

namespace physr::mem {
namespace {

constexpr uint64_t kBase = 0x10000000, kPages = 64;

TEST(HmmConcurrencyTest, RetryProtocolAgainstConcurrentMunmap) {
  physr::testing::DmaWorld world;
  world.debug = true;
  DmaDeviceConfig cfg{.function = world.f_nvme};  // direct, no DMA offset: the DMA address is the page
  auto dev = world.device(cfg);
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 64 * MiB}, 3)).value();
  AddressSpace as(*mem);
  // What the CPU maps at each page, published by the process thread under the mmap lock
  // after each change (0: nothing).
  std::vector<std::atomic<uint64_t>> oracle(kPages);
  {
    std::lock_guard g(as.mmap_lock());
    ASSERT_TRUE(as.mmap_anon({.addr = kBase, .len = kPages * 4096}).has_value());
    for (uint64_t p = 0; p < kPages; ++p) oracle[p] = cpu_translate(as, kBase + p * 4096)->value();
  }
  auto mirror = std::move(HmmMirror::create(as, *dev, {.start = kBase, .len = kPages * 4096, .fault_pages = 4})).value();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> bad{0}, ok{0};
  std::vector<std::thread> devices;
  for (int t = 0; t < 2; ++t) {
    devices.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t p = rng() % kPages;
        auto r = mirror->access(kBase + p * 4096, rng() % 2, [&](const DeviceTranslation& tr) {
          // The device's DMA, while the entry is valid: it must land on the CPU's page.
          if (tr.dma.value() != oracle[p].load()) bad.fetch_add(1);
        });
        if (r.has_value()) ok.fetch_add(1, std::memory_order_relaxed);
        else if (r.error().code != EFAULT && r.error().code != EBUSY) bad.fetch_add(1);
      }
    });
  }
  std::mt19937_64 rng(7);
  // At least 800 changes, and on until the devices made 2000 accesses (bounded).
  for (int step = 0; step < 800 || (ok.load() < 2000 && step < 20000); ++step) {
    std::this_thread::yield();
    const uint64_t p = rng() % kPages, n = 1 + rng() % std::min<uint64_t>(8, kPages - p);
    std::lock_guard g(as.mmap_lock());
    EXPECT_TRUE(as.munmap(kBase + p * 4096, n * 4096).has_value());
    for (uint64_t k = p; k < p + n; ++k) oracle[k] = 0;
    if (rng() % 4 != 0) {
      EXPECT_TRUE(as.mmap_anon({.addr = kBase + p * 4096, .len = n * 4096}).has_value());
      for (uint64_t k = p; k < p + n; ++k) oracle[k] = cpu_translate(as, kBase + k * 4096)->value();
    }
    if (step % 16 == 0) {
      EXPECT_TRUE(as.migrate(kBase, kPages * 4096).has_value());
      for (uint64_t k = 0; k < kPages; ++k) {
        auto a = cpu_translate(as, kBase + k * 4096);
        oracle[k] = a ? a->value() : 0;
      }
    }
  }
  stop = true;
  for (auto& t : devices) t.join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GT(mirror->stats().faults, 0u);
  mirror.reset();
  EXPECT_EQ(dev->stats().live_mappings, 0u);
  std::lock_guard g(as.mmap_lock());
  ASSERT_TRUE(as.munmap(kBase, kPages * 4096).has_value());
}

}  // namespace
}  // namespace physr::mem
