#include "physr/dma.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

namespace physr {
namespace {

// Both cores bounce their own buffers through one pool: every round trip returns exactly
// the device's bytes, and the pool ends empty.
TEST(BounceConcurrencyTest, ThreadsBounceIndependently) {
  PhysMemory mem;
  ASSERT_TRUE(mem.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  auto pool = std::move(BouncePool::create(mem, BounceOptions{PhysAddr(512 * MiB), 2 * MiB, 2})).value();
  std::atomic<int> errors{0};
  auto worker = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    const PhysAddr buf(seed * 64 * MiB);
    for (int i = 0; i < 2000; ++i) {
      const uint64_t n = 1 + rng() % 20000;
      std::vector<uint8_t> dev(n), back(n);
      for (auto& b : dev) b = static_cast<uint8_t>(rng());
      auto b = pool->map(buf, n, DmaDirection::from_device, 0xfff);
      if (!b) {
        if (b.error().code != ENOMEM) errors.fetch_add(1);
        continue;
      }
      if (!mem.write(*b, dev) || !pool->unmap(*b, n, DmaDirection::from_device) || !mem.read(buf, back) || back != dev)
        errors.fetch_add(1);
    }
  };
  std::thread t1(worker, 1), t2(worker, 2);
  t1.join();
  t2.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(pool->used_slots(), 0u);
}

}  // namespace
}  // namespace physr
