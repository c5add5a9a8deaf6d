#include "physr/dma.hpp"
#include "physr/physmem.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

namespace physr {
namespace {

struct Fixture {
  PhysMemory mem;
  std::unique_ptr<BouncePool> pool;
  explicit Fixture(uint64_t pool_size = 4 * MiB, unsigned areas = 2) {
    EXPECT_TRUE(mem.add_region({PhysSpan{PhysAddr(0), 4 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
    EXPECT_TRUE(mem.add_region({PhysSpan{PhysAddr(64 * GiB), 1 * GiB}, PhysRegion::Kind::bar, "bar"}).has_value());
    auto p = BouncePool::create(mem, BounceOptions{PhysAddr(256 * MiB), pool_size, areas});
    EXPECT_TRUE(p.has_value());
    pool = std::move(p).value();
  }
  std::vector<uint8_t> bytes(PhysAddr a, size_t n) {
    std::vector<uint8_t> v(n);
    EXPECT_TRUE(mem.read(a, v).has_value());
    return v;
  }
};

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 31);
  return v;
}

TEST(BouncePoolTest, CopiesFollowTheDirection) {
  Fixture f;
  const PhysAddr orig(64 * GiB + 0x1230);
  const auto data = pattern(10000, 1);
  ASSERT_TRUE(f.mem.write(orig, data).has_value());
  // to_device: copied in at map, not back at unmap.
  auto b = f.pool->map(orig, data.size(), DmaDirection::to_device);
  ASSERT_TRUE(b.has_value());
  EXPECT_TRUE(f.pool->contains(*b));
  EXPECT_EQ(f.bytes(*b, data.size()), data);
  ASSERT_TRUE(f.mem.write(*b, pattern(data.size(), 9)).has_value());  // the device writes anyway
  ASSERT_TRUE(f.pool->unmap(*b, data.size(), DmaDirection::to_device).has_value());
  EXPECT_EQ(f.bytes(orig, data.size()), data);
  // from_device: the original is copied in too (Linux swiotlb_tbl_map_single(): a partial
  // device write must not bring stale pool bytes back), the device's bytes come back at unmap.
  // (The slots about to be reused still hold the bytes the device wrote above.)
  b = f.pool->map(orig, data.size(), DmaDirection::from_device);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(f.bytes(*b, data.size()), data);
  const auto dev = pattern(data.size(), 77);
  ASSERT_TRUE(f.mem.write(*b, dev).has_value());
  ASSERT_TRUE(f.pool->sync_for_cpu(*b, data.size(), DmaDirection::from_device).has_value());
  EXPECT_EQ(f.bytes(orig, data.size()), dev);
  ASSERT_TRUE(f.mem.write(orig, data).has_value());  // the CPU refills the buffer
  ASSERT_TRUE(f.pool->sync_for_device(*b, data.size(), DmaDirection::from_device).has_value());
  EXPECT_EQ(f.bytes(*b, data.size()), dev);  // from_device: sync_for_device copies nothing
  ASSERT_TRUE(f.pool->unmap(*b, data.size(), DmaDirection::from_device).has_value());
  EXPECT_EQ(f.bytes(orig, data.size()), dev);
  // bidirectional: both ways.
  ASSERT_TRUE(f.mem.write(orig, data).has_value());
  b = f.pool->map(orig, data.size(), DmaDirection::bidirectional);
  EXPECT_EQ(f.bytes(*b, data.size()), data);
  ASSERT_TRUE(f.mem.write(*b, dev).has_value());
  ASSERT_TRUE(f.pool->unmap(*b, data.size(), DmaDirection::bidirectional).has_value());
  EXPECT_EQ(f.bytes(orig, data.size()), dev);
  EXPECT_EQ(f.pool->used_slots(), 0u);
}

TEST(BouncePoolTest, AlignmentSegmentsAndLimits) {
  Fixture f;
  // NVMe-style min_align_mask 0xfff: the offset within the 4 KiB page is kept.
  for (uint64_t off : {uint64_t{0}, uint64_t{0x10}, uint64_t{0x7f8}, uint64_t{0x800}, uint64_t{0xff0}}) {
    auto b = f.pool->map(PhysAddr(0x40000 + off), 3000, DmaDirection::to_device, 0xfff);
    ASSERT_TRUE(b.has_value());
    EXPECT_EQ(b->value() & 0xfff, off);
  }
  // A page or more, no mask: page-aligned.
  auto big = f.pool->map(PhysAddr(0x123), 8192, DmaDirection::to_device);
  EXPECT_EQ(big->value() & 0xfff, 0u);
  // Never across a 128-slot (256 KiB) segment, whatever the sizes.
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200; ++i) {
    const uint64_t size = 1 + rng() % (64 * KiB);
    auto b = f.pool->map(PhysAddr(0x100000 + rng() % 4096), size, DmaDirection::to_device);
    if (!b) break;
    const uint64_t first = (b->value() - 256 * MiB) / BouncePool::kSlotSize;
    const uint64_t last = (b->value() + size - 1 - 256 * MiB) / BouncePool::kSlotSize;
    ASSERT_EQ(first / 128, last / 128);
  }
  EXPECT_EQ(f.pool->map(PhysAddr(0), 256 * KiB + 1, DmaDirection::to_device).error().code, EINVAL);
  EXPECT_EQ(f.pool->map(PhysAddr(0x10), 256 * KiB, DmaDirection::to_device, 0xfff).error().code, EINVAL);
  EXPECT_TRUE(f.pool->map(PhysAddr(0), 256 * KiB, DmaDirection::none).has_value() == false);
  EXPECT_EQ(f.pool->map(PhysAddr(0), 0, DmaDirection::to_device).error().code, EINVAL);
}

TEST(BouncePoolTest, AllocAlignMaskReservesWholeZeroedGranules) {
  Fixture f(512 * KiB, 1);
  // Dirty the pool so that padding left unzeroed would show.
  auto dirty = f.pool->map(PhysAddr(0x200000), 256 * KiB, DmaDirection::to_device);
  ASSERT_TRUE(dirty.has_value());
  ASSERT_TRUE(f.mem.write(*dirty, pattern(256 * KiB, 5)).has_value());
  ASSERT_TRUE(f.pool->unmap(*dirty, 256 * KiB, DmaDirection::to_device).has_value());
  const auto data = pattern(5000, 3);
  const PhysAddr orig(0x7000 + 0x9a0);
  ASSERT_TRUE(f.mem.write(orig, data).has_value());
  auto b = f.pool->map(orig, data.size(), DmaDirection::from_device, 0xfff, 0xfff);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->value() & 0xfff, 0x9a0u);  // offset within the granule kept (under min_align_mask)
  EXPECT_EQ(f.pool->used_slots(), 4u);    // [0x9a0, 0x9a0 + 5000) covers two whole 4 KiB granules
  const PhysAddr g0(b->value() & ~uint64_t{0xfff});
  EXPECT_EQ(f.bytes(g0, 0x9a0), std::vector<uint8_t>(0x9a0, 0));            // pre-padding zeroed
  EXPECT_EQ(f.bytes(*b, data.size()), data);                                // the data copied in
  const uint64_t post = 8192 - 0x9a0 - data.size();
  EXPECT_EQ(f.bytes(*b + data.size(), post), std::vector<uint8_t>(post, 0));  // post-padding zeroed
  // A second mapping never shares those granules.
  auto c = f.pool->map(PhysAddr(0x20010), 16, DmaDirection::to_device, 0, 0xfff);
  ASSERT_TRUE(c.has_value());
  EXPECT_FALSE(c->value() >= g0.value() && c->value() < g0.value() + 8192);
  EXPECT_EQ(f.pool->map(orig, 10, DmaDirection::to_device, 0, 0x1000).error().code, EINVAL);  // not 2^k - 1
  ASSERT_TRUE(f.pool->unmap(*c, 16, DmaDirection::to_device).has_value());
  ASSERT_TRUE(f.pool->unmap(*b, data.size(), DmaDirection::from_device).has_value());
  EXPECT_EQ(f.pool->used_slots(), 0u);
}

TEST(BouncePoolTest, ExhaustionIsEnomemAndEverythingComesBack) {
  Fixture f(512 * KiB, 1);  // two segments
  std::vector<std::pair<PhysAddr, uint64_t>> live;
  for (;;) {
    auto b = f.pool->map(PhysAddr(0x1000), 100 * KiB, DmaDirection::to_device);
    if (!b) {
      EXPECT_EQ(b.error().code, ENOMEM);
      break;
    }
    live.emplace_back(*b, 100 * KiB);
  }
  EXPECT_EQ(live.size(), 4u);  // two 100 KiB mappings fit in each 256 KiB segment
  const uint64_t used = f.pool->used_slots();
  EXPECT_FALSE(f.pool->map(PhysAddr(0x1000), 100 * KiB, DmaDirection::to_device).has_value());
  EXPECT_EQ(f.pool->used_slots(), used);  // a failed map reserves nothing
  for (auto [b, n] : live) ASSERT_TRUE(f.pool->unmap(b, n, DmaDirection::to_device).has_value());
  EXPECT_EQ(f.pool->used_slots(), 0u);
  EXPECT_TRUE(f.pool->map(PhysAddr(0x1000), 256 * KiB, DmaDirection::to_device).has_value());
}

TEST(BouncePoolTest, BadUnmapsAreDetected) {
  Fixture f;
  auto b = f.pool->map(PhysAddr(0x5000), 5000, DmaDirection::to_device);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(f.pool->unmap(*b, 4000, DmaDirection::to_device).error().code, EINVAL);  // wrong size
  EXPECT_EQ(f.pool->unmap(*b + 2048, 5000, DmaDirection::to_device).error().code, EINVAL);  // not its start
  EXPECT_EQ(f.pool->unmap(PhysAddr(0x5000), 5000, DmaDirection::to_device).error().code, EINVAL);  // outside
  ASSERT_TRUE(f.pool->unmap(*b, 5000, DmaDirection::to_device).has_value());
  auto twice = f.pool->unmap(*b, 5000, DmaDirection::to_device);
  ASSERT_FALSE(twice.has_value());
  EXPECT_NE(twice.error().message.find("already unmapped"), std::string::npos);
  EXPECT_EQ(f.pool->map(PhysAddr(100 * GiB), 10, DmaDirection::to_device).error().code, EFAULT);
  EXPECT_EQ(f.pool->used_slots(), 0u);  // the failed copy released its slots
}

TEST(BouncePoolTest, BadPools) {
  PhysMemory mem;
  ASSERT_TRUE(mem.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  ASSERT_TRUE(mem.add_region({PhysSpan{PhysAddr(4 * GiB), 1 * GiB}, PhysRegion::Kind::bar, "bar"}).has_value());
  EXPECT_EQ(BouncePool::create(mem, {PhysAddr(0), 100 * KiB, 1}).error().code, EINVAL);
  EXPECT_EQ(BouncePool::create(mem, {PhysAddr(0), 768 * KiB, 2}).error().code, EINVAL);  // 3 segments, 2 areas
  EXPECT_EQ(BouncePool::create(mem, {PhysAddr(4 * GiB), 1 * MiB, 1}).error().code, EINVAL);  // not host RAM
  EXPECT_EQ(BouncePool::create(mem, {PhysAddr(1 * GiB - 256 * KiB), 1 * MiB, 1}).error().code, EINVAL);  // runs out
  EXPECT_TRUE(BouncePool::create(mem, {PhysAddr(0), 1 * MiB, 4}).has_value());
}

}  // namespace
}  // namespace physr
