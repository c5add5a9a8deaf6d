// The DMA mapping layer: every path, the Linux map_sg layout, errors and rollback, the
// single-range and two-step APIs, and a property test over random lists and devices.
#include <gtest/gtest.h>

#include <algorithm>
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
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
  return v;
}

RangeList list_of(std::initializer_list<PhysRange> pieces) {
  RangeList l;
  for (const PhysRange& p : pieces) EXPECT_TRUE(l.append(p, SegmentLimits{.merge = false}).has_value());
  return l;
}

PhysRange host(uint64_t a, uint64_t len) { return PhysRange{PhysAddr(a), len, kHostMemory}; }
PhysRange prov(ProviderId id, uint64_t a, uint64_t len) { return PhysRange{PhysAddr(a), len, id}; }

void fill(DmaWorld& w, const RangeList& l, uint8_t seed) {
  const auto data = pattern(l.total_bytes(), seed);
  size_t at = 0;
  for (const PhysRange r : l) {
    ASSERT_TRUE(w.mem.write(r.base, std::span<const uint8_t>(data.data() + at, r.size)).has_value());
    at += r.size;
  }
}

uint64_t free_iova(IoDomain& d) {
  d.flush();
  d.iova().flush_caches();
  return d.iova().stats().free_granules;
}

// Nothing left anywhere: no page-table leaf, bounce slot or live mapping.
void expect_clean(DmaWorld& w, const DmaDevice& dev, uint64_t iova_free_before) {
  const auto ds = w.domain->stats();
  EXPECT_EQ(ds.mapped_4k + ds.mapped_2m + ds.mapped_1g, 0u);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(dev.stats().live_mappings, 0u);
  EXPECT_EQ(free_iova(*w.domain), iova_free_before);
}

TEST(DmaMapTest, IommuLaysOutLikeLinuxMapSg) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  // Three scattered pieces, the first starting 0x200 into its page: one IOVA range of three
  // granules, and since the later pieces start on granules they merge into one segment.
  const RangeList l = list_of({host(0x1200, 0xe00), host(0x5000, 0x1000), host(0x9000, 0x800)});
  fill(w, l, 1);
  auto m = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  // 3 granules round up to 4 (iova.c), placed top-down below 4 GiB first (the SAC rule).
  EXPECT_EQ(m->iova().base, DmaAddr(0x1'0000'0000 - 0x4000));
  EXPECT_EQ(m->iova().size, 0x3000u);
  ASSERT_EQ(m->segments().size(), 1u);
  EXPECT_EQ(m->segments()[0].addr, m->iova().base + 0x200);
  EXPECT_EQ(m->segments()[0].len, 0x2600u);
  EXPECT_EQ(m->segments()[0].flags, kDmaSegIommu);
  EXPECT_EQ(w.device_read(dev->config(), m->segments()), w.cpu_read(l));
  // to_device: the device may read, not write.
  EXPECT_FALSE(w.device_write(dev->config(), m->segments(), pattern(l.total_bytes(), 9)));
  ASSERT_TRUE(dev->unmap(*m).has_value());
  expect_clean(w, *dev, before);
}

TEST(DmaMapTest, IommuPadsToTheBoundaryAndRespectsMaxSegment) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .max_segment = 0x3000, .seg_boundary_mask = 0x1fff, .domain = w.domain.get()});
  const RangeList l = list_of({host(0x10000, 0x1000), host(0x20000, 0x1800), host(0x30000, 0x1000), host(0x40000, 0x1000),
                               host(0x50000, 0x1000), host(0x60000, 0x1000)});
  fill(w, l, 2);
  auto m = dev->map(l, DmaDirection::bidirectional);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  const DmaAddr b = m->iova().base;
  // 0x1800 would cross the 8 KiB boundary after the first granule: padded to the boundary.
  // Then pieces merge within a boundary window only.
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const DmaSegment& s : m->segments()) got.emplace_back(s.addr - b, s.len);
  const std::vector<std::pair<uint64_t, uint64_t>> want = {{0x0, 0x1000}, {0x2000, 0x1800}, {0x4000, 0x2000}, {0x6000, 0x2000}};
  EXPECT_EQ(got, want);
  for (const DmaSegment& s : m->segments()) {
    EXPECT_LE(s.len, 0x3000u);
    EXPECT_EQ(s.addr.value() >> 13, (s.addr.value() + s.len - 1) >> 13) << "crosses the boundary";
  }
  EXPECT_EQ(w.device_read(dev->config(), m->segments()), w.cpu_read(l));
  // The padding granule is not mapped.
  EXPECT_FALSE(w.domain->walk(b + 0x1000).has_value());
  const auto data = pattern(l.total_bytes(), 33);
  ASSERT_TRUE(w.device_write(dev->config(), m->segments(), data));
  ASSERT_TRUE(dev->unmap(*m).has_value());
  EXPECT_EQ(w.cpu_read(l), data);
}

TEST(DmaMapTest, MixedListBusAddrSkipsTheIommuAndThruHostBridgeIsMappedAsHostMemory) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  const RangeList l = list_of({host(0x100000, 0x1000), prov(w.gpu, DmaWorld::kGpuBar + 0x3000, 0x2000),
                               host(0x200000, 0x1000), prov(w.nic, DmaWorld::kNicBar + 0x1000, 0x1000)});
  fill(w, l, 3);
  auto m = dev->map(l, DmaDirection::from_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  const auto segs = m->segments();
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_EQ(segs[0].flags, kDmaSegIommu);
  EXPECT_EQ(segs[1].flags, kDmaSegBusAddr);  // never put in the IOMMU
  EXPECT_EQ(segs[1].addr.value(), DmaWorld::kGpuBar + 0x3000 + DmaWorld::kGpuBusOffset);
  EXPECT_EQ(segs[1].len, 0x2000u);
  // Not merged across the bus-address segment; the host page and the nic page after it
  // are IOVA-contiguous and merge as Linux's __finalise_sg() merges them.
  EXPECT_EQ(segs[2].addr, segs[0].addr + 0x1000);
  EXPECT_EQ(segs[2].len, 0x2000u);
  EXPECT_EQ(segs[2].flags, kDmaSegIommu);  // Linux iommu_dma_map_sg(): no MMIO attribute in a list
  EXPECT_EQ(m->iova().size, 0x3000u);  // only the three IOMMU pages
  EXPECT_EQ(w.domain->walk(segs[2].addr)->perm, kIommuWrite);
  auto t = w.domain->walk(segs[2].addr + 0x1000);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->perm, kIommuWrite);  // the list-wide permissions
  EXPECT_EQ(t->phys.value(), DmaWorld::kNicBar + 0x1000);
  const auto data = pattern(l.total_bytes(), 77);
  ASSERT_TRUE(w.device_write(dev->config(), segs, data));
  ASSERT_TRUE(dev->unmap(*m).has_value());
  EXPECT_EQ(w.cpu_read(l), data);
  expect_clean(w, *dev, before);
}

TEST(DmaMapTest, UnreachableP2PIsEremoteioAndLeavesNothing) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  const RangeList l = list_of({host(0x100000, 0x3000), prov(w.far2, DmaWorld::kFar2Bar, 0x1000)});
  auto m = dev->map(l, DmaDirection::to_device, kDmaAttrAllowBounce);  // far2 forbids CPU copies
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().code, EREMOTEIO);
  EXPECT_NE(m.error().message.find("range 1"), std::string::npos) << m.error().message;
  EXPECT_NE(m.error().message.find("not supported"), std::string::npos) << m.error().message;
  // Bounce not allowed by the caller: EREMOTEIO too. (An untrusted device would map these
  // without looking at the verdict, as Linux iommu_dma_map_sg_swiotlb() does.)
  const RangeList l2 = list_of({prov(w.far, DmaWorld::kFarBar, 0x1000), prov(w.far, DmaWorld::kFarBar + 0x4000, 0x1000)});
  auto d2 = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  m = d2->map(l2, DmaDirection::to_device);
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().code, EREMOTEIO);
  EXPECT_NE(m.error().message.find("bouncing was not allowed"), std::string::npos) << m.error().message;
  // An allocation failure after bounces and IOVA: everything undone too.
  auto tiny = w.device({.function = w.f_nvme, .untrusted = true, .domain = w.domain.get()});
  auto big = w.pool->map(PhysAddr(0x400000), 200 * KiB, DmaDirection::to_device);  // keep slots busy
  std::vector<PhysAddr> hold;
  for (;;) {  // fill the pool so the second bounce fails
    auto b = w.pool->map(PhysAddr(0x800000), 4096, DmaDirection::to_device);
    if (!b) break;
    hold.push_back(*b);
  }
  ASSERT_TRUE(w.pool->unmap(hold.back(), 4096, DmaDirection::to_device).has_value());
  hold.pop_back();  // room for exactly one granule-aligned bounce
  const uint64_t used = w.pool->used_slots();
  auto r = tiny->map(list_of({host(0x1000, 0x800), host(0x2000, 0x800)}), DmaDirection::to_device);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOMEM);
  EXPECT_EQ(w.pool->used_slots(), used);
  for (PhysAddr h : hold) ASSERT_TRUE(w.pool->unmap(h, 4096, DmaDirection::to_device).has_value());
  ASSERT_TRUE(w.pool->unmap(*big, 200 * KiB, DmaDirection::to_device).has_value());
  expect_clean(w, *dev, before);
  EXPECT_EQ(dev->stats().failed_maps, 1u);
}

TEST(DmaMapTest, NotSupportedP2PBouncesWhenAllowed) {
  DmaWorld w;
  for (bool iommu : {false, true}) {
    SCOPED_TRACE(iommu ? "iommu" : "direct");
    auto dev = w.device({.function = w.f_nvme, .domain = iommu ? w.domain.get() : nullptr});
    const RangeList l = list_of({prov(w.far, DmaWorld::kFarBar + 0x10, 300 * KiB), host(0x300000, 0x1000)});
    fill(w, l, 5);
    auto m = dev->map(l, DmaDirection::bidirectional, kDmaAttrAllowBounce);
    ASSERT_TRUE(m.has_value()) << m.error().to_string();
    EXPECT_TRUE(m->segments()[0].flags & kDmaSegBounced);
    EXPECT_FALSE(m->segments()[0].flags & kDmaSegMmio);
    EXPECT_EQ(w.device_read(dev->config(), m->segments()), w.cpu_read(l));
    EXPECT_GT(w.pool->used_slots(), 0u);
    const auto data = pattern(l.total_bytes(), 99);
    ASSERT_TRUE(w.device_write(dev->config(), m->segments(), data));
    EXPECT_NE(w.cpu_read(l), data);  // still in the bounce buffer
    ASSERT_TRUE(dev->sync_for_cpu(*m).has_value());
    EXPECT_EQ(w.cpu_read(l), data);
    ASSERT_TRUE(dev->unmap(*m).has_value());
    EXPECT_EQ(w.pool->used_slots(), 0u);
    EXPECT_EQ(dev->stats().bounced_bytes, 300 * KiB);
  }
}

TEST(DmaMapTest, DirectBouncesAboveTheMaskAndAppliesTheOffset) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .max_segment = 0x10000, .dma_offset = 0x1000'0000'0000});
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = w.f_nvme, .dma_offset = 1, .domain = w.domain.get()}).error().code, EINVAL);
  auto narrow = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff});
  const RangeList l = list_of({host(0x1000, 0x1000), host(5 * GiB + 0x123, 0x20000)});
  fill(w, l, 6);
  auto m = narrow->map(l, DmaDirection::from_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  const auto segs = m->segments();
  ASSERT_EQ(segs.size(), 3u);  // the bounced 128 KiB is cut to the 64 KiB max segment
  EXPECT_EQ(segs[0].addr.value(), 0x1000u);
  EXPECT_EQ(segs[0].flags, DmaSegFlags{});
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_EQ(segs[i].flags, kDmaSegBounced);
    EXPECT_LE(segs[i].addr.value() + segs[i].len - 1, 0xffffffffu);
    EXPECT_TRUE(w.pool->contains(PhysAddr(segs[i].addr.value())));
  }
  const auto data = pattern(l.total_bytes(), 8);
  ASSERT_TRUE(w.device_write(narrow->config(), segs, data));
  ASSERT_TRUE(narrow->unmap(*m).has_value());
  EXPECT_EQ(w.cpu_read(l), data);
  // With an offset whose result is above a 32-bit mask, everything bounces... and the pool
  // itself is above the mask, which is an EIO naming the bounce buffer.
  auto off = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff, .dma_offset = 0x1'0000'0000});
  auto bad = off->map(l, DmaDirection::to_device);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, EIO);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  m = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->segments()[0].addr.value(), 0x1000'0000'1000u);
  ASSERT_TRUE(dev->unmap(*m).has_value());
}

TEST(DmaMapTest, UntrustedBouncesOnlyUnalignedHostRangesInWholeZeroedGranules) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .untrusted = true, .domain = w.domain.get()});
  // Secrets next to the buffer must not be visible to the device.
  ASSERT_TRUE(w.mem.write(PhysAddr(0x7000), std::vector<uint8_t>(4096, 0xee)).has_value());
  const RangeList l = list_of({host(0x7100, 0x100), host(0x10000, 0x2000)});
  ASSERT_TRUE(w.mem.write(PhysAddr(0x7100), pattern(0x100, 1)).has_value());
  auto m = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  ASSERT_EQ(m->segments().size(), 2u);
  EXPECT_EQ(m->segments()[0].flags, kDmaSegIommu | kDmaSegBounced);
  EXPECT_EQ(m->segments()[1].flags, kDmaSegIommu);  // aligned: mapped in place
  // The whole granule the device can reach holds only the buffer and zeros.
  const DmaAddr g(m->segments()[0].addr.value() & ~uint64_t{4095});
  std::vector<uint8_t> granule(4096);
  auto t = w.domain->walk(g);
  ASSERT_TRUE(t.has_value());
  ASSERT_TRUE(w.mem.read(t->phys, granule).has_value());
  std::vector<uint8_t> want(4096, 0);
  const auto buf = pattern(0x100, 1);
  std::copy(buf.begin(), buf.end(), want.begin() + (m->segments()[0].addr.value() & 4095));
  EXPECT_EQ(granule, want);
  ASSERT_TRUE(dev->unmap(*m).has_value());
  // A trusted device maps the same list in place.
  auto trusted = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  m = trusted->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->segments()[0].flags, kDmaSegIommu);
  ASSERT_TRUE(trusted->unmap(*m).has_value());
  // Direct with forced bouncing: all host memory bounces (untrusted alone does nothing
  // there: DmaParityMapTest.DirectUntrustedMapsInPlaceForcedBouncingBouncesEverything).
  auto direct = w.device({.function = w.f_nvme, .force_bounce = true});
  m = direct->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  for (const DmaSegment& s : m->segments()) EXPECT_EQ(s.flags, kDmaSegBounced);
  ASSERT_TRUE(direct->unmap(*m).has_value());
}

TEST(DmaMapTest, MisuseIsReportedNotUndefined) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  auto other = w.device({.function = w.f_gpu, .domain = w.domain.get()});
  EXPECT_EQ(dev->map(RangeList{}, DmaDirection::to_device).error().code, EINVAL);
  const RangeList l = list_of({host(0x1000, 0x1000)});
  EXPECT_EQ(dev->map(l, DmaDirection::none).error().code, EINVAL);
  // Host-tagged memory inside a BAR, an unregistered provider, a range outside its aperture.
  auto e = dev->map(list_of({host(DmaWorld::kNicBar, 0x1000)}), DmaDirection::to_device);
  EXPECT_EQ(e.error().code, EINVAL);
  EXPECT_NE(e.error().message.find("tagged host memory"), std::string::npos) << e.error().message;
  EXPECT_EQ(dev->map(list_of({prov(77, 0x1000, 0x1000)}), DmaDirection::to_device).error().code, EINVAL);
  EXPECT_EQ(dev->map(list_of({prov(w.nic, DmaWorld::kGpuBar, 0x1000)}), DmaDirection::to_device).error().code, EINVAL);
  auto m = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(other->unmap(*m).error().code, EINVAL);  // another device's mapping
  EXPECT_EQ(dev->map_into(*m, l, DmaDirection::to_device).error().code, EBUSY);
  ASSERT_TRUE(dev->unmap(*m).has_value());
  auto twice = dev->unmap(*m);
  ASSERT_FALSE(twice.has_value());
  EXPECT_NE(twice.error().message.find("not live"), std::string::npos);
  EXPECT_EQ(dev->sync_for_cpu(*m).error().code, EINVAL);
  // Revoked provider: EFAULT.
  ASSERT_TRUE(w.reg.revoke(w.nic).has_value());
  EXPECT_EQ(dev->map(list_of({prov(w.nic, DmaWorld::kNicBar, 0x1000)}), DmaDirection::to_device).error().code, EFAULT);
  // Bad device parameters.
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = 999}).error().code, EINVAL);
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = w.f_nvme, .seg_boundary_mask = 0x1000}).error().code, EINVAL);
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = w.f_nvme, .max_segment = 100}).error().code, EINVAL);
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = w.f_nvme, .min_align_mask = 0x1001}).error().code, EINVAL);
  EXPECT_EQ(DmaDevice::create(DmaEnv{}, {}).error().code, EINVAL);
}

TEST(DmaMapTest, NonCoherentDevicesDoCacheMaintenance) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .coherent = false, .domain = w.domain.get()});
  const RangeList l = list_of({host(0x1000, 0x1000), host(0x3000, 0x1000), prov(w.gpu, DmaWorld::kGpuBar, 0x1000)});
  auto m = dev->map(l, DmaDirection::from_device);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(dev->stats().cache_maintenance, 2u);  // the two host ranges, not the BAR
  ASSERT_TRUE(dev->unmap(*m).has_value());
  EXPECT_GT(dev->stats().cache_maintenance, 2u);
  const uint64_t n = dev->stats().cache_maintenance;
  m = dev->map(l, DmaDirection::from_device, kDmaAttrSkipCpuSync);
  ASSERT_TRUE(m.has_value());
  ASSERT_TRUE(dev->unmap(*m).has_value());
  EXPECT_EQ(dev->stats().cache_maintenance, n);
  auto coherent = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  m = coherent->map(l, DmaDirection::from_device);
  ASSERT_TRUE(coherent->unmap(*m).has_value());
  EXPECT_EQ(coherent->stats().cache_maintenance, 0u);
}

// DmaDeviceStats: live mappings are the list and phys maps not yet unmapped; refused maps
// and unmaps change neither count.
TEST(DmaMapTest, StatsCountLiveMappings) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  auto m1 = dev->map(list_of({host(0x10000, 0x1000)}), DmaDirection::to_device);
  ASSERT_TRUE(m1.has_value());
  auto s = dev->map_phys(PhysAddr(0x20000), 4096, DmaDirection::from_device);
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(dev->map(list_of({host(0x30000, 0x1000)}), DmaDirection::none).has_value());
  EXPECT_EQ(dev->stats().live_mappings, 2u);
  EXPECT_EQ(dev->stats().maps, 2u);
  ASSERT_TRUE(dev->unmap(*m1).has_value());
  EXPECT_FALSE(dev->unmap(*m1).has_value());  // no longer live
  EXPECT_EQ(dev->stats().live_mappings, 1u);
  EXPECT_EQ(dev->stats().unmaps, 1u);
  ASSERT_TRUE(dev->unmap_phys(*s, DmaDirection::from_device).has_value());
  EXPECT_EQ(dev->stats().live_mappings, 0u);
  EXPECT_EQ(dev->stats().maps, 2u);
  EXPECT_EQ(dev->stats().unmaps, 2u);
}

TEST(DmaMapTest, MapPhysEveryPathAndBadUnmaps) {
  DmaWorld w;
  w.debug = false;  // this device shows what is caught without DMA-API debug
  auto iommu = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  w.debug = true;
  auto direct = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff, .debug = true});
  ASSERT_TRUE(w.mem.write(PhysAddr(0x5123), pattern(100, 4)).has_value());
  auto s = iommu->map_phys(PhysAddr(0x5123), 100, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->flags, kDmaSegIommu);
  EXPECT_EQ(s->addr.value() & 4095, 0x123u);
  EXPECT_EQ(w.device_read(iommu->config(), std::span(&*s, 1)), pattern(100, 4));
  ASSERT_TRUE(iommu->unmap_phys(*s, DmaDirection::to_device).has_value());
  EXPECT_EQ(iommu->unmap_phys(*s, DmaDirection::to_device).error().code, ENOENT);  // detected by the IOMMU
  auto bus = iommu->map_phys(PhysAddr(DmaWorld::kGpuBar + 0x40), 64, DmaDirection::to_device);
  ASSERT_TRUE(bus.has_value());
  EXPECT_EQ(bus->flags, kDmaSegBusAddr);
  EXPECT_EQ(bus->addr.value(), DmaWorld::kGpuBar + 0x40 + DmaWorld::kGpuBusOffset);
  ASSERT_TRUE(iommu->unmap_phys(*bus, DmaDirection::to_device).has_value());
  EXPECT_EQ(iommu->map_phys(PhysAddr(DmaWorld::kFarBar), 64, DmaDirection::to_device).error().code, EREMOTEIO);
  // Direct, above the mask: bounced; sync and unmap copy back.
  ASSERT_TRUE(w.mem.write(PhysAddr(6 * GiB), pattern(5000, 1)).has_value());
  auto b = direct->map_phys(PhysAddr(6 * GiB), 5000, DmaDirection::from_device);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->flags, kDmaSegBounced);
  ASSERT_TRUE(w.device_write(direct->config(), std::span(&*b, 1), pattern(5000, 50)));
  ASSERT_TRUE(direct->sync_phys_for_cpu(*b, DmaDirection::from_device).has_value());
  std::vector<uint8_t> got(5000);
  ASSERT_TRUE(w.mem.read(PhysAddr(6 * GiB), got).has_value());
  EXPECT_EQ(got, pattern(5000, 50));
  // Debug mode: wrong direction and wrong size are reported exactly, then the real unmap works.
  EXPECT_NE(direct->unmap_phys(*b, DmaDirection::to_device).error().message.find("mapped from_device"), std::string::npos);
  DmaSegment wrong = *b;
  wrong.len = 10;
  EXPECT_NE(direct->unmap_phys(wrong, DmaDirection::from_device).error().message.find("mapped with size"), std::string::npos);
  ASSERT_TRUE(direct->unmap_phys(*b, DmaDirection::from_device).has_value());
  auto plain = direct->map_phys(PhysAddr(0x1000), 64, DmaDirection::to_device);
  ASSERT_TRUE(direct->unmap_phys(*plain, DmaDirection::to_device).has_value());
  EXPECT_NE(direct->unmap_phys(*plain, DmaDirection::to_device).error().message.find("not mapped"), std::string::npos);
  EXPECT_EQ(direct->map_phys(PhysAddr(6 * GiB), 300 * KiB, DmaDirection::to_device).error().code, EINVAL);  // bounce > 256 KiB
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(iommu->stats().live_mappings + direct->stats().live_mappings, 0u);
}

TEST(DmaMapTest, TwoStepApi) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  auto direct = w.device({.function = w.f_nvme});
  DmaIovaState st;
  auto r = direct->iova_try_alloc(st, PhysAddr(0x1000), 0x3000);
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(*r);  // direct mapping: use map_phys
  const uint64_t before = free_iova(*w.domain);
  r = dev->iova_try_alloc(st, PhysAddr(0x10200), 0x2e00 + 0x1000);
  ASSERT_TRUE(r.has_value() && *r);
  EXPECT_EQ(st.addr.value() & 4095, 0x200u);
  ASSERT_TRUE(w.mem.write(PhysAddr(0x10200), pattern(0xe00, 1)).has_value());
  ASSERT_TRUE(w.mem.write(PhysAddr(0x50000), pattern(0x2000, 2)).has_value());
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x10200), 0, 0xe00, DmaDirection::to_device).has_value());
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(0x50000), 0xe00, 0x2000, DmaDirection::to_device).has_value());
  // Only the first link may start inside a granule; bus-address P2P is not linked;
  // unreachable P2P is EREMOTEIO; MMIO through the host bridge is linked with the attribute.
  EXPECT_EQ(dev->iova_link(st, PhysAddr(0x60100), 0x2e00, 0x100, DmaDirection::to_device).error().code, EIO);
  EXPECT_EQ(dev->iova_link(st, PhysAddr(DmaWorld::kGpuBar), 0x2e00, 0x1000, DmaDirection::to_device).error().code, EINVAL);
  EXPECT_EQ(dev->iova_link(st, PhysAddr(DmaWorld::kFarBar), 0x2e00, 0x1000, DmaDirection::to_device).error().code, EREMOTEIO);
  ASSERT_TRUE(dev->iova_link(st, PhysAddr(DmaWorld::kNicBar), 0x2e00, 0x1000, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.domain->walk(st.addr + 0x2e00)->perm, kIommuRead | kIommuMmio);
  EXPECT_EQ(dev->iova_link(st, PhysAddr(0x70000), 0x2e00, 0x1000, DmaDirection::to_device).error().code, EEXIST);
  ASSERT_TRUE(dev->iova_sync(st, 0, 0x3e00).has_value());
  DmaSegment whole{st.addr, 0x2e00, kDmaSegIommu};
  auto seen = w.device_read(dev->config(), std::span(&whole, 1));
  ASSERT_TRUE(seen.has_value());
  auto want = pattern(0xe00, 1);
  auto second = pattern(0x2000, 2);
  want.insert(want.end(), second.begin(), second.end());
  EXPECT_EQ(*seen, want);
  ASSERT_TRUE(dev->iova_unlink(st, 0x2e00, 0x1000, DmaDirection::to_device).has_value());
  ASSERT_TRUE(dev->iova_destroy(st, 0x2e00, DmaDirection::to_device).has_value());
  EXPECT_FALSE(st.allocated());
  expect_clean(w, *dev, before);
  // Untrusted: an unaligned host link bounces, unlink copies back.
  auto untrusted = w.device({.function = w.f_nvme, .min_align_mask = 0xfff, .untrusted = true, .domain = w.domain.get()});
  ASSERT_TRUE(*untrusted->iova_try_alloc(st, PhysAddr(0x9100), 0x100));
  ASSERT_TRUE(untrusted->iova_link(st, PhysAddr(0x9100), 0, 0x100, DmaDirection::from_device).has_value());
  EXPECT_EQ(w.pool->used_slots(), 2u);  // one whole granule
  DmaSegment s{st.addr, 0x100, kDmaSegIommu};
  ASSERT_TRUE(w.device_write(untrusted->config(), std::span(&s, 1), pattern(0x100, 9)));
  ASSERT_TRUE(untrusted->iova_destroy(st, 0x100, DmaDirection::from_device).has_value());
  std::vector<uint8_t> got(0x100);
  ASSERT_TRUE(w.mem.read(PhysAddr(0x9100), got).has_value());
  EXPECT_EQ(got, pattern(0x100, 9));
  expect_clean(w, *untrusted, before);
}

TEST(DmaMapTest, DeferredDomainKeepsIovasUntilTheFlush) {
  DmaWorld w(/*strict=*/false);
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const RangeList l = list_of({host(0x1000, 0x1000)});
  auto m = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  const DmaAddr first = m->segments()[0].addr;
  ASSERT_TRUE(w.device_read(dev->config(), m->segments()).has_value());  // fills the IOTLB
  ASSERT_TRUE(dev->unmap(*m).has_value());
  EXPECT_TRUE(w.domain->translate(first).has_value());  // stale IOTLB entry until the flush
  EXPECT_FALSE(w.domain->walk(first).has_value());
  m = dev->map(l, DmaDirection::to_device);
  EXPECT_NE(m->segments()[0].addr, first);  // the IOVA is not reused before the flush
  ASSERT_TRUE(dev->unmap(*m).has_value());
  w.domain->flush();
  EXPECT_FALSE(w.domain->translate(first).has_value());
}

std::string describe(const DmaDeviceConfig& c, DmaDirection dir, const RangeList& l, const DmaMapping& m) {
  std::string s = std::string("device fn ") + std::to_string(c.function) + (c.domain ? " iommu" : " direct") + " mask " +
                  format_hex(c.dma_mask) + " max_seg " + format_hex(c.max_segment) + " boundary " + format_hex(c.seg_boundary_mask) +
                  " min_align " + format_hex(c.min_align_mask) + (c.untrusted ? " untrusted" : "") + " offset " + format_hex(c.dma_offset) +
                  " dir " + dma_direction_name(dir) + "\nranges:";
  for (const PhysRange r : l) s += " [" + format_hex(r.base.value()) + " +" + format_hex(r.size) + " p" + std::to_string(r.provider) + "]";
  s += "\nsegments:";
  for (const DmaSegment& g : m.segments()) s += " [" + format_hex(g.addr.value()) + " +" + format_hex(g.len) + " " + dma_seg_path(g.flags) + "]";
  return s;
}

// Random lists on random devices: every DMA segment reaches exactly the original bytes,
// limits hold, written bytes arrive, EREMOTEIO exactly when a range is unreachable, and
// nothing is left behind, whatever happened.
TEST(DmaMapTest, PropertyRandomListsAndDevices) {
  DmaWorld w;
  std::mt19937_64 rng(42);
  const uint64_t before = free_iova(*w.domain);
  int ok = 0, remote = 0;
  for (int iter = 0; iter < 1000; ++iter) {
    DmaDeviceConfig c;
    c.function = std::vector<uint32_t>{w.f_nvme, w.f_gpu, w.f_nic, w.f_far}[rng() % 4];
    const bool iommu = rng() % 2;
    c.domain = iommu ? w.domain.get() : nullptr;
    c.dma_mask = std::vector<uint64_t>{0xffffffff, 0xfffffffff, ~uint64_t{0}}[rng() % 3];
    c.max_segment = std::vector<uint64_t>{4096, 0x10000, 0xffff, 1 << 20, ~uint64_t{0} >> 1}[rng() % 5];
    c.seg_boundary_mask = std::vector<uint64_t>{0xfff, 0xffff, 0xffffffff, ~uint64_t{0}}[rng() % 4];
    c.min_align_mask = rng() % 2 ? 0xfff : 0;
    c.untrusted = rng() % 4 == 0;
    c.untrusted_one_iova = c.untrusted && rng() % 2;
    c.force_bounce = !iommu && rng() % 8 == 0;
    c.coherent = rng() % 2;
    c.dma_offset = !iommu && rng() % 3 == 0 ? 0x100000000 : 0;
    c.dma_mask = c.dma_offset ? ~uint64_t{0} : c.dma_mask;
    auto dev = w.device(c);
    const DmaDirection dir = std::vector<DmaDirection>{DmaDirection::to_device, DmaDirection::from_device, DmaDirection::bidirectional}[rng() % 3];
    const DmaAttrs attrs = rng() % 2 ? kDmaAttrAllowBounce : kDmaAttrNone;
    // A list of 1-12 ranges: host anywhere in 8 GiB (some above 4 GiB), or in one of the BARs.
    RangeList l;
    std::vector<PhysSpan> used;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) {
      const uint64_t len = rng() % 3 == 0 ? 1 + rng() % 512 : 1 + rng() % (64 * KiB);
      PhysRange r;
      switch (rng() % 6) {
        case 0: r = prov(w.gpu, DmaWorld::kGpuBar + (rng() % 4096) * 4096 + rng() % 4096, len); break;
        case 1: r = prov(w.nic, DmaWorld::kNicBar + (rng() % 1024) * 4096 + rng() % 4096, len); break;
        case 2: r = prov(rng() % 2 ? w.far : w.far2, (rng() % 2 ? DmaWorld::kFarBar : DmaWorld::kFar2Bar) + (rng() % 1024) * 4096 + rng() % 4096, len);
                r.provider = r.base.value() >= DmaWorld::kFar2Bar ? w.far2 : w.far;
                break;
        default: r = host((rng() % 2 ? 0x4000'0000 : 5 * GiB) + (rng() % 65536) * 4096 + rng() % 4096, len); break;
      }
      // Ranges of one list never overlap (the device would write the same bytes twice).
      const PhysSpan span{r.base, r.size};
      if (std::any_of(used.begin(), used.end(), [&](const PhysSpan& u) { return u.overlaps(span); })) continue;
      used.push_back(span);
      ASSERT_TRUE(l.append(r).has_value());
    }
    // The expected failure, from the first range that has one: EREMOTEIO for a range no
    // path reaches and that may not be bounced; EIO for one that must be bounced but whose
    // provider forbids CPU copies. An untrusted device behind an IOMMU classifies nothing
    // (Linux iommu_dma_map_sg_swiotlb()) unless it keeps one IOVA; in a list, P2P through
    // the host bridge is host memory, which Linux bounces itself.
    int want_error = 0;
    {
      ProviderRegistry::ReadGuard g;
      for (const PhysRange r : l) {
        if (r.provider == kHostMemory) continue;
        const Provider* p = w.reg.get(r.provider);
        const bool unaligned = ((r.base.value() | r.size) & 4095) != 0;
        int code = 0;
        if (iommu && c.untrusted && !c.untrusted_one_iova) {
          if (unaligned && !p->cpu_copy_allowed()) code = EIO;
        } else {
          const auto v = w.engine->compute(*w.topo.find(p->owner()), c.function).type;
          bool reach = v != pci::MapType::not_supported;
          if (v == pci::MapType::thru_host_bridge && !iommu && (c.force_bounce || r.base.value() + r.size - 1 > c.dma_mask) &&
              !p->cpu_copy_allowed())
            code = EIO;
          if (v == pci::MapType::thru_host_bridge && iommu && c.untrusted && unaligned) reach = false;
          if (!reach && !((attrs & kDmaAttrAllowBounce) && p->cpu_copy_allowed())) code = EREMOTEIO;
        }
        if (code) {
          want_error = code;
          break;
        }
      }
    }
    const bool unreachable = want_error == EREMOTEIO;
    fill(w, l, static_cast<uint8_t>(iter));
    const auto original = w.cpu_read(l);
    auto m = dev->map(l, dir, attrs);
    if (!m) {
      if (want_error) ASSERT_EQ(m.error().code, want_error) << m.error().to_string();
      else ASSERT_TRUE(m.error().code == ENOMEM || m.error().code == EIO) << m.error().to_string();
      remote += unreachable;
      ASSERT_EQ(w.pool->used_slots(), 0u);
      ASSERT_EQ(w.domain->stats().mapped_4k, 0u);
      continue;
    }
    ASSERT_EQ(want_error, 0) << "mapped a list with a range that should have failed it\n" << describe(c, dir, l, *m);
    ++ok;
    uint64_t total = 0;
    for (const DmaSegment& s : m->segments()) {
      total += s.len;
      ASSERT_LE(s.len, c.max_segment);
      if (c.seg_boundary_mask != ~uint64_t{0}) {
        ASSERT_EQ(s.addr.value() & ~c.seg_boundary_mask, (s.addr.value() + s.len - 1) & ~c.seg_boundary_mask) << "crosses the boundary";
      }
      if (!(s.flags & kDmaSegBusAddr)) {
        ASSERT_LE(s.addr.value() + s.len - 1, c.dma_mask) << "above the DMA mask";
      }
      if (!(s.flags & kDmaSegBusAddr)) {
        ASSERT_EQ(iommu, static_cast<bool>(s.flags & kDmaSegIommu));
      }
    }
    ASSERT_EQ(total, l.total_bytes());
    // from_device maps are write-only: look through the permission (the bytes behind it
    // are the original's, bounced or not, as Linux's swiotlb keeps them).
    const auto seen = w.device_read(c, m->segments(), dir != DmaDirection::from_device);
    ASSERT_TRUE(seen.has_value()) << "IOMMU fault reading a mapped list\n" << describe(c, dir, l, *m);
    ASSERT_EQ(*seen, original);
    std::vector<uint8_t> expect = original;
    if (dir != DmaDirection::to_device) {
      expect = pattern(l.total_bytes(), static_cast<uint8_t>(iter + 100));
      ASSERT_TRUE(w.device_write(c, m->segments(), expect));
    }
    ASSERT_TRUE(dev->unmap(*m).has_value());
    ASSERT_EQ(w.cpu_read(l), expect);
    ASSERT_EQ(w.pool->used_slots(), 0u);
    ASSERT_EQ(w.domain->stats().mapped_4k + w.domain->stats().mapped_2m, 0u);
    ASSERT_EQ(dev->stats().live_mappings, 0u);
  }
  EXPECT_GT(ok, 300);
  EXPECT_GT(remote, 25);
  EXPECT_EQ(free_iova(*w.domain), before);
}

// DMA-API debug reports the mappings still live when a device goes away (Linux
// CONFIG_DMA_API_DEBUG at driver unbind), and nothing when everything was unmapped; an
// unmap that fails keeps its mapping tracked.
TEST(DmaMapTest, DebugReportsMappingsLiveAtDestruction) {
  DmaWorld w;
  std::vector<std::string> reports;
  const auto capture = [&](const std::string& r) { reports.push_back(r); };
  RangeList l;
  ASSERT_TRUE(l.append(PhysRange{PhysAddr(0x10000), 8192, kHostMemory}).has_value());
  {
    auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get(), .debug_report = capture});
    auto m = dev->map(l, DmaDirection::to_device);
    ASSERT_TRUE(m.has_value());
    auto s = dev->map_phys(PhysAddr(0x30000), 4096, DmaDirection::from_device);
    ASSERT_TRUE(s.has_value());
    const auto live = dev->debug_live();
    ASSERT_EQ(live.size(), 2u);
    EXPECT_NE(live[0].find("map of 8 KiB to_device"), std::string::npos) << live[0];
    EXPECT_NE(live[1].find("map_phys of 4 KiB at " + format_hex(s->addr.value()) + " from_device"), std::string::npos) << live[1];
    ASSERT_TRUE(dev->unmap_phys(*s, DmaDirection::from_device).has_value());
    EXPECT_EQ(dev->debug_live().size(), 1u);
  }  // destroyed with the map() result still live
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_NE(reports[0].find("destroyed with 1 mapping still live"), std::string::npos) << reports[0];
  EXPECT_NE(reports[0].find("map of 8 KiB to_device"), std::string::npos) << reports[0];
  w.domain->flush();
  {
    auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get(), .debug_report = capture});
    auto m = dev->map(l, DmaDirection::bidirectional);
    ASSERT_TRUE(m.has_value());
    // Pull the page table out from under the mapping: its unmap fails and it stays live.
    ASSERT_TRUE(w.domain->unmap(m->segments()[0].addr, 8192).has_value());
    EXPECT_FALSE(dev->unmap(*m).has_value());
    EXPECT_EQ(dev->debug_live().size(), 1u);
    ASSERT_TRUE(w.domain->map(m->segments()[0].addr, PhysAddr(0x10000), 8192, kIommuReadWrite).has_value());
    ASSERT_TRUE(dev->unmap(*m).has_value());
    EXPECT_TRUE(dev->debug_live().empty());
  }
  EXPECT_EQ(reports.size(), 1u);  // the clean device said nothing
  {
    auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get(), .debug_report = capture});
    auto s = dev->map_phys(PhysAddr(0x30000), 4096, DmaDirection::from_device);
    ASSERT_TRUE(s.has_value());
    // A second unmap of the same segment is refused (the first took its record out), and
    // an unmap that fails before tearing anything down keeps it.
    ASSERT_TRUE(dev->unmap_phys(*s, DmaDirection::from_device).has_value());
    EXPECT_EQ(dev->unmap_phys(*s, DmaDirection::from_device).error().code, EINVAL);
    s = dev->map_phys(PhysAddr(0x30000), 4096, DmaDirection::from_device);
    ASSERT_TRUE(s.has_value());
    auto direct_seg = *s;
    direct_seg.flags = kDmaSegBounced;  // claims a direct bounce: no bounce pool mapping there
    EXPECT_FALSE(dev->unmap_phys(direct_seg, DmaDirection::from_device).has_value());
  }  // destroyed with the map_phys result still live (the failed unmap tore down nothing)
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_NE(reports[1].find("map_phys of 4 KiB at"), std::string::npos) << reports[1];
}

}  // namespace
}  // namespace physr
