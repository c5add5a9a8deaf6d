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
using testing::free_iova;
using testing::pattern;

uint64_t mapped_pages(const IoDomain& d) {
  const auto s = d.stats();
  return s.mapped_4k + s.mapped_2m + s.mapped_1g;
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

// The same for lists (dma_direct_map_sg() -> swiotlb_map() per entry): each bounced piece is
// cut to the boundary window and its slots are searched within one window, so it stays one
// segment; a search that ignored the boundary put it across a window and the cut afterwards
// made two segments of it.
TEST(SwiotlbParityTest, MapOfAListBouncesEachPieceWithinTheSegmentBoundary) {
  DmaWorld w;
  const DmaDeviceConfig c{.function = w.f_nvme, .dma_mask = 0xffffffff, .seg_boundary_mask = 0xffff};
  auto dev = w.device(c);
  // A small bounce first, so the pool's next free slot is not on a window.
  auto small = dev->map_phys(PhysAddr(5 * GiB + 0x100), 2 * KiB, DmaDirection::to_device);
  ASSERT_TRUE(small.has_value()) << small.error().to_string();
  RangeList list;
  ASSERT_TRUE(list.append(PhysRange{PhysAddr(6 * GiB), 64 * KiB, kHostMemory}).has_value());
  ASSERT_TRUE(list.append(PhysRange{PhysAddr(7 * GiB + 0x8000), 96 * KiB, kHostMemory}).has_value());
  const auto data = pattern(64 * KiB, 3), data2 = pattern(96 * KiB, 4);
  ASSERT_TRUE(w.mem.write(PhysAddr(6 * GiB), data).has_value());
  ASSERT_TRUE(w.mem.write(PhysAddr(7 * GiB + 0x8000), data2).has_value());
  auto m = dev->map(list, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  // 64 KiB in one window; 96 KiB from mid-window: 32 KiB then 64 KiB, each bounced whole.
  ASSERT_EQ(m->segments().size(), 3u);
  for (const DmaSegment& seg : m->segments()) {
    EXPECT_EQ(seg.flags, kDmaSegBounced);
    EXPECT_EQ(seg.addr.value() >> 16, (seg.addr.value() + seg.len - 1) >> 16) << format_hex(seg.addr.value()) << " +" << seg.len;
  }
  EXPECT_EQ(m->segments()[0].len, 64 * KiB);
  EXPECT_EQ(m->segments()[1].len, 32 * KiB);
  EXPECT_EQ(m->segments()[2].len, 64 * KiB);
  EXPECT_EQ(w.device_read(dev->config(), m->segments().subspan(0, 1)), data);
  EXPECT_EQ(w.device_read(dev->config(), m->segments().subspan(1, 2)), data2);
  ASSERT_TRUE(dev->unmap(*m).has_value());
  ASSERT_TRUE(dev->unmap_phys(*small, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.pool->used_slots(), 0u);
}

// ---------------------------------------------------------------------------------------
// drivers/iommu/dma-iommu.c

// dma_iova_try_alloc(): "if (WARN_ON_ONCE(!size)) return false" and "if (!addr) return
// false": the caller falls back to the regular DMA API, there is no error to handle.
TEST(DmaIommuParityTest, DmaIovaTryAllocReturnsFalseOnSizeZeroAndWhenNoIovaIsLeft) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  DmaIovaState st;
  auto r = dev->iova_try_alloc(st, PhysAddr(0x1000), 0);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_FALSE(*r);
  r = dev->iova_try_alloc(st, PhysAddr(0x1000), 8 * GiB);  // more than the 4 GiB the mask reaches
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_FALSE(*r);
  EXPECT_FALSE(st.allocated());
  r = dev->iova_try_alloc(st, PhysAddr(0x1000), 0x2000);
  ASSERT_TRUE(r.has_value() && *r);
  ASSERT_TRUE(dev->iova_destroy(st, 0, DmaDirection::to_device).has_value());
  EXPECT_EQ(free_iova(*w.domain), before);
}

// dma_iova_link(): "if (WARN_ON_ONCE(iova_start_pad && offset > 0)) return -EIO": only
// the link at offset 0 may start inside a granule.
TEST(DmaIommuParityTest, DmaIovaLinkInsideAGranuleAtANonZeroOffsetIsEio) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x20100), 0x3000));
  auto e = dev->iova_link(st, PhysAddr(0x30100), 0x1000, 0x100, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EIO);
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x20100), 0, 0x100, DmaDirection::to_device).has_value());  // offset 0 may
  ASSERT_TRUE(dev->iova_destroy(st, 0x100, DmaDirection::to_device).has_value());
}

// dma_iova_link(): "if (dev_use_swiotlb(dev, size, dir) && iova_unaligned(iovad, phys,
// size)) { if (attrs & DMA_ATTR_MMIO) return -EPERM; ...}": MMIO (P2P through the host
// bridge) is never bounced, whether or not bouncing was allowed.
TEST(DmaIommuParityTest, DmaIovaLinkOfMmioThatWouldBounceIsEperm) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .min_align_mask = 0xfff, .untrusted = true, .domain = w.domain.get()});
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(DmaWorld::kNicBar + 0x100), 0x2000));
  for (const DmaAttrs attrs : {kDmaAttrNone, kDmaAttrAllowBounce}) {
    auto e = dev->iova_link(st, PhysAddr(DmaWorld::kNicBar + 0x100), 0, 0x100, DmaDirection::to_device, attrs);
    ASSERT_FALSE(e.has_value());
    EXPECT_EQ(e.error().code, EPERM) << e.error().to_string();
  }
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  ASSERT_TRUE(dev->iova_destroy(st, 0, DmaDirection::to_device).has_value());
  // Granule-aligned MMIO needs no bounce: linked with the MMIO attribute.
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(DmaWorld::kNicBar), 0x1000));
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(DmaWorld::kNicBar), 0, 0x1000, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.domain->walk(st.addr)->perm, kIommuRead | kIommuMmio);
  ASSERT_TRUE(dev->iova_destroy(st, 0x1000, DmaDirection::to_device).has_value());
}

// iommu_dma_iova_link_swiotlb(): an untrusted device bounces only the head (granule -
// iova_start_pad bytes) and the iova_end_pad tail, each into one whole zeroed granule
// (iommu_dma_iova_bounce_and_link()), and links the granules between in place; so a
// link is not limited to what one bounce holds.
TEST(DmaIommuParityTest, IommuDmaIovaLinkSwiotlbBouncesOnlyHeadAndTail) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .min_align_mask = 0xfff, .untrusted = true, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  // 1 MiB + 0x200 from 0x100100: head 0xf00, 255 granules in place, tail 0x300.
  const PhysAddr phys(0x100100);
  const uint64_t size = 1 * MiB + 0x200;
  const auto data = pattern(size, 3);
  ASSERT_TRUE(w.mem.write(phys, data).has_value());
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, phys, size));
  auto linked = dev->iova_link(st, phys, 0, size, DmaDirection::bidirectional);
  ASSERT_TRUE(linked.has_value()) << linked.error().to_string();
  EXPECT_EQ(w.pool->used_slots(), 4u);  // two granules: the head's and the tail's
  EXPECT_EQ(dev->stats().bounced_bytes, 0xf00u + 0x300u);
  const auto head = w.domain->walk(st.addr);
  ASSERT_TRUE(head.has_value());
  EXPECT_TRUE(w.pool->contains(head->phys));
  EXPECT_EQ(head->phys.value() & 0xfff, 0x100u);
  EXPECT_EQ(w.domain->walk(st.addr + 0xf00)->phys, PhysAddr(0x101000));  // in place
  EXPECT_EQ(w.domain->walk(st.addr + (size - 0x300 - 1))->phys, PhysAddr(0x1ff000 + 0xfff));
  const auto tail = w.domain->walk(st.addr + (size - 0x300));
  ASSERT_TRUE(tail.has_value());
  EXPECT_TRUE(w.pool->contains(tail->phys));
  // The tail's granule holds the tail and zeros only.
  std::vector<uint8_t> granule(4096), want(4096, 0);
  ASSERT_TRUE(w.mem.read(tail->phys, granule).has_value());
  std::copy(data.end() - 0x300, data.end(), want.begin());
  EXPECT_EQ(granule, want);
  ASSERT_TRUE(dev->iova_sync(st, 0, size).has_value());
  DmaSegment whole{st.addr, size, kDmaSegIommu};
  EXPECT_EQ(w.device_read(dev->config(), std::span(&whole, 1)), data);
  const auto written = pattern(size, 77);
  ASSERT_TRUE(w.device_write(dev->config(), std::span(&whole, 1), written));
  ASSERT_TRUE(dev->iova_destroy(st, size, DmaDirection::bidirectional).has_value());
  std::vector<uint8_t> back(size);
  ASSERT_TRUE(w.mem.read(phys, back).has_value());
  EXPECT_EQ(back, written);  // the bounced head and tail copied back
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  EXPECT_EQ(free_iova(*w.domain), before);
}

// iommu_dma_iova_bounce_and_link() links bounce_phys - iova_start_pad: the head's bounce
// must keep its offset within the granule, which swiotlb_align_offset() gives only under
// a min_align_mask that covers it; without one, Linux's iommu_map() refuses the unaligned
// address (-EINVAL), and nothing stays linked or bounced.
TEST(DmaIommuParityTest, IommuDmaIovaBounceAndLinkNeedsTheOffsetKept) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .untrusted = true, .domain = w.domain.get()});  // min_align_mask 0
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x9100), 0x2000));
  auto e = dev->iova_link(st, PhysAddr(0x9100), 0, 0x2000, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EINVAL) << e.error().to_string();
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  // Starting on a granule, only the tail is bounced, at offset 0: that links.
  ASSERT_TRUE(dev->iova_destroy(st, 0, DmaDirection::to_device).has_value());
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x9000), 0x1100));
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x9000), 0, 0x1100, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.pool->used_slots(), 2u);
  ASSERT_TRUE(dev->iova_destroy(st, 0x1100, DmaDirection::to_device).has_value());
}

// iommu_dma_iova_link_swiotlb()'s error path unlinks what the call mapped. Linux calls
// dma_iova_unlink(dev, state, 0, mapped, ...), from offset 0 of the state rather than from
// the link's offset; physr undoes exactly this call's mappings and bounces (the head's
// bounce too) and leaves the earlier links alone.
TEST(DmaIommuParityTest, IommuDmaIovaLinkSwiotlbFailureUndoesOnlyItsOwnLinks) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .min_align_mask = 0xfff, .untrusted = true, .domain = w.domain.get()});
  // Fill the pool, leaving no granule free.
  std::vector<std::pair<PhysAddr, uint64_t>> held;
  for (;;) {
    auto b = w.pool->map(PhysAddr(0x200000), 256 * KiB, DmaDirection::to_device);
    if (!b) break;
    held.emplace_back(*b, 256 * KiB);
  }
  ASSERT_FALSE(held.empty());
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x300000), 0x3000));
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x300000), 0, 0x1000, DmaDirection::to_device).has_value());
  // The second link's middle granule maps, its tail finds no bounce slot.
  auto e = dev->iova_link(st, PhysAddr(0x400000), 0x1000, 0x1100, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, ENOMEM) << e.error().to_string();
  EXPECT_FALSE(w.domain->walk(st.addr + 0x1000).has_value());  // its middle was unlinked
  EXPECT_EQ(w.domain->walk(st.addr)->phys, PhysAddr(0x300000));  // the first link stays
  ASSERT_TRUE(dev->iova_destroy(st, 0x1000, DmaDirection::to_device).has_value());
  // One granule free: a link's head takes it, its tail finds none; the head goes back.
  ASSERT_TRUE(w.pool->unmap(held.back().first, 256 * KiB, DmaDirection::to_device).has_value());
  held.pop_back();
  auto most = w.pool->map(PhysAddr(0x200000), 256 * KiB - 4 * KiB, DmaDirection::to_device);
  ASSERT_TRUE(most.has_value());
  held.emplace_back(*most, 256 * KiB - 4 * KiB);
  const uint64_t used = w.pool->used_slots();
  ASSERT_EQ(used, w.pool->total_slots() - 2);
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x400100), 0x1100));
  e = dev->iova_link(st, PhysAddr(0x400100), 0, 0x1100, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, ENOMEM) << e.error().to_string();
  EXPECT_EQ(w.pool->used_slots(), used);
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  ASSERT_TRUE(dev->iova_destroy(st, 0, DmaDirection::to_device).has_value());
  for (const auto& [b, n] : held) ASSERT_TRUE(w.pool->unmap(b, n, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.pool->used_slots(), 0u);
}

// dma_iova_sync() checks nothing: it syncs the IOTLB over the range (iommu_sync_map()),
// linked or not.
TEST(DmaIommuParityTest, DmaIovaSyncChecksNothing) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  DmaIovaState st;
  ASSERT_TRUE(*dev->iova_try_alloc(st, PhysAddr(0x10000), 0x4000));
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x10000), 0, 0x1000, DmaDirection::to_device).has_value());
  auto r = dev->iova_sync(st, 0, 0x4000);  // three of the four granules are not linked
  EXPECT_TRUE(r.has_value()) << r.error().to_string();
  ASSERT_TRUE(dev->iova_destroy(st, 0x1000, DmaDirection::to_device).has_value());
}

// __iommu_dma_map(): "if (dev_WARN_ONCE(dev, dma_get_min_align_mask(dev) > iova_mask(iovad),
// ...)) return DMA_MAPPING_ERROR": the IOVA allocator cannot keep an alignment above the
// granule, so a single mapping through the IOMMU is refused; a direct device keeps it.
TEST(DmaIommuParityTest, IommuDmaMapRefusesMinAlignMaskAboveTheGranule) {
  DmaWorld w;
  auto iommu = w.device({.function = w.f_nvme, .min_align_mask = 0xffff, .domain = w.domain.get()});
  auto e = iommu->map_phys(PhysAddr(0x12345), 100, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EINVAL) << e.error().to_string();
  EXPECT_EQ(mapped_pages(*w.domain), 0u);
  EXPECT_EQ(iommu->stats().live_mappings, 0u);
  auto within = w.device({.function = w.f_nvme, .min_align_mask = 0xfff, .domain = w.domain.get()});
  auto s = within->map_phys(PhysAddr(0x12345), 100, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value());
  ASSERT_TRUE(within->unmap_phys(*s, DmaDirection::to_device).has_value());
  auto direct = w.device({.function = w.f_nvme, .min_align_mask = 0xffff});
  s = direct->map_phys(PhysAddr(0x12345), 100, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value());
  ASSERT_TRUE(direct->unmap_phys(*s, DmaDirection::to_device).has_value());
}

}  // namespace
}  // namespace physr
