// Kernel parity of the bounce pool (Linux kernel/dma/swiotlb.c) and the two-step IOVA API
// (drivers/iommu/dma-iommu.c dma_iova_*): one test per rule, named after the kernel function
// whose rule it pins.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "physr/dma.hpp"
#include "physr/iommu.hpp"
#include "support/dma_world.hpp"

namespace physr {
namespace {

using testing::DmaWorld;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 13 + (i >> 9));
  return v;
}

// A pool of its own, one area, so the slot a search starts at is known.
struct OnePool {
  PhysMemory mem;
  std::unique_ptr<BouncePool> pool;
  static constexpr uint64_t kBase = 256 * MiB;
  OnePool() {
    EXPECT_TRUE(mem.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
    pool = std::move(BouncePool::create(mem, BounceOptions{PhysAddr(kBase), 1 * MiB, 1})).value();
  }
};

// ---------------------------------------------------------------------------------------
// kernel/dma/swiotlb.c

// swiotlb_align_offset(dev, align_mask, addr) = addr & dma_get_min_align_mask(dev) &
// (align_mask | (IO_TLB_SIZE - 1)): the device's min_align_mask decides which bits are
// kept, alloc_align_mask only how far they reach. No min_align_mask: the bounce starts its
// reservation, even with an alloc_align_mask.
TEST(SwiotlbParityTest, SwiotlbAlignOffsetKeepsOnlyMinAlignMaskBits) {
  OnePool f;
  const PhysAddr orig(0x7000 + 0x9a0);
  ASSERT_TRUE(f.mem.write(orig, pattern(5000, 1)).has_value());
  // min_align_mask 0, alloc_align_mask 4 KiB - 1: offset 0, two whole granules.
  auto b = f.pool->map(orig, 5000, DmaDirection::to_device, /*min_align_mask=*/0, /*alloc_align_mask=*/0xfff);
  ASSERT_TRUE(b.has_value()) << b.error().to_string();
  EXPECT_EQ(b->value() & 0xfff, 0u);
  EXPECT_EQ(f.pool->used_slots(), 4u);
  ASSERT_TRUE(f.pool->unmap(*b, 5000, DmaDirection::to_device).has_value());
  // min_align_mask 2 KiB - 1 under a 4 KiB alloc_align_mask: only bits 0-10 are kept.
  b = f.pool->map(orig, 5000, DmaDirection::to_device, 0x7ff, 0xfff);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->value() & 0xfff, 0x9a0u & 0x7ff);
  ASSERT_TRUE(f.pool->unmap(*b, 5000, DmaDirection::to_device).has_value());
  // min_align_mask 4 KiB - 1: the whole offset within the granule, beyond one slot.
  b = f.pool->map(orig, 5000, DmaDirection::to_device, 0xfff, 0xfff);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->value() & 0xfff, 0x9a0u);
  std::vector<uint8_t> got(5000);
  ASSERT_TRUE(f.mem.read(*b, got).has_value());
  EXPECT_EQ(got, pattern(5000, 1));
  ASSERT_TRUE(f.pool->unmap(*b, 5000, DmaDirection::to_device).has_value());
  EXPECT_EQ(f.pool->used_slots(), 0u);
}

// swiotlb_search_pool_area(): "if (!alloc_align_mask && !iotlb_align_mask && alloc_size >=
// PAGE_SIZE) alloc_align_mask = PAGE_SIZE - 1": a page or more starts page-aligned only
// when the device has no min_align_mask at all, even one below the slot size.
TEST(SwiotlbParityTest, SwiotlbSearchPoolAreaPageAlignsOnlyWithoutAnyMask) {
  OnePool f;
  // Slot 0 taken; the search goes on from slot 1.
  auto small = f.pool->map(PhysAddr(0x1000), 100, DmaDirection::to_device);
  ASSERT_TRUE(small.has_value());
  EXPECT_EQ(small->value(), OnePool::kBase);
  // min_align_mask 128 B - 1: no page alignment, the first free slot (slot 1) is taken.
  auto b = f.pool->map(PhysAddr(0x20010), 8192, DmaDirection::to_device, /*min_align_mask=*/0x7f);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->value(), OnePool::kBase + BouncePool::kSlotSize + 0x10);
  // No mask: page-aligned, past the slots in use.
  auto c = f.pool->map(PhysAddr(0x40010), 8192, DmaDirection::to_device);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->value() % kPageSize, 0u);
  ASSERT_TRUE(f.pool->unmap(*c, 8192, DmaDirection::to_device).has_value());
  ASSERT_TRUE(f.pool->unmap(*b, 8192, DmaDirection::to_device).has_value());
  ASSERT_TRUE(f.pool->unmap(*small, 100, DmaDirection::to_device).has_value());
  EXPECT_EQ(f.pool->used_slots(), 0u);
}

// swiotlb_search_pool_area(): iommu_is_span_boundary(slot_index, nslots,
// nr_slots(tbl_dma_addr), max_slots) rejects runs that would cross the device's segment
// boundary (dma_get_seg_boundary()) in DMA address space. map_phys returns one segment,
// so no bounced segment may cross it; a bounce larger than the boundary cannot be made.
TEST(SwiotlbParityTest, IommuIsSpanBoundaryKeepsBouncesWithinTheSegmentBoundary) {
  DmaWorld w;
  // Above the 4 GiB mask: bounced (dma_direct_map_phys() -> swiotlb_map()). The DMA offset
  // moves the boundary windows half a window away from the pool's physical ones.
  const DmaDeviceConfig c{.function = w.f_nvme, .dma_mask = 0xffffffff, .seg_boundary_mask = 0xffff, .dma_offset = 0x8000};
  auto dev = w.device(c);
  std::mt19937_64 rng(7);
  std::vector<std::pair<DmaSegment, DmaDirection>> live;
  int bounced = 0;
  for (int i = 0; i < 400; ++i) {
    const uint64_t len = 1 + rng() % (40 * KiB);
    const PhysAddr phys(5 * GiB + (rng() % 4096) * 4096 + rng() % 4096);
    const auto data = pattern(len, static_cast<uint8_t>(i));
    ASSERT_TRUE(w.mem.write(phys, data).has_value());
    auto s = dev->map_phys(phys, len, DmaDirection::to_device);
    if (!s) {
      ASSERT_EQ(s.error().code, ENOMEM) << s.error().to_string();
      break;
    }
    ASSERT_EQ(s->flags, kDmaSegBounced);
    ++bounced;
    ASSERT_EQ(s->addr.value() & ~c.seg_boundary_mask, (s->addr.value() + len - 1) & ~c.seg_boundary_mask)
        << "bounce at " << format_hex(s->addr.value()) << " +" << len << " crosses the 64 KiB boundary";
    EXPECT_EQ(w.device_read(dev->config(), std::span(&*s, 1)), data);
    live.emplace_back(*s, DmaDirection::to_device);
    // Keep some live so later bounces land all over the pool.
    if (rng() % 3 == 0) {
      const size_t k = rng() % live.size();
      ASSERT_TRUE(dev->unmap_phys(live[k].first, live[k].second).has_value());
      live.erase(live.begin() + static_cast<long>(k));
    }
  }
  EXPECT_GT(bounced, 100);
  for (auto& [s, d] : live) ASSERT_TRUE(dev->unmap_phys(s, d).has_value());
  // 65 KiB cannot fit in a 64 KiB window.
  EXPECT_EQ(dev->map_phys(PhysAddr(5 * GiB), 65 * KiB, DmaDirection::to_device).error().code, EINVAL);
  EXPECT_EQ(w.pool->used_slots(), 0u);
}

}  // namespace
}  // namespace physr
