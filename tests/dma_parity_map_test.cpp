// Kernel parity of list and single-range mapping: each test pins one rule of
// kernel/dma/direct.c (dma_direct_map_sg, dma_direct_map_phys) or
// drivers/iommu/dma-iommu.c (iommu_dma_map_sg, dev_use_sg_swiotlb,
// iommu_dma_map_sg_swiotlb, iommu_dma_map_phys) of the newest mainline.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "physr/dma.hpp"
#include "physr/iommu.hpp"
#include "support/dma_world.hpp"

namespace physr {
namespace {

using testing::DmaWorld;
using testing::free_iova;
using testing::pattern;

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

void expect_clean(DmaWorld& w, const DmaDevice& dev, uint64_t iova_free_before) {
  const auto ds = w.domain->stats();
  EXPECT_EQ(ds.mapped_4k + ds.mapped_2m + ds.mapped_1g, 0u);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(dev.stats().live_mappings, 0u);
  EXPECT_EQ(free_iova(*w.domain), iova_free_before);
}

// Maps `l`, checks the device reads the CPU's bytes, writes new ones, unmaps and checks
// they arrived.
void round_trip(DmaWorld& w, DmaDevice& dev, const RangeList& l, DmaMapping& m, uint8_t seed) {
  EXPECT_EQ(w.device_read(dev.config(), m.segments(), /*perm=*/false), w.cpu_read(l));
  const auto data = pattern(l.total_bytes(), seed);
  ASSERT_TRUE(w.device_write(dev.config(), m.segments(), data));
  ASSERT_TRUE(dev.unmap(m).has_value());
  EXPECT_EQ(w.cpu_read(l), data);
}

// A second BAR of the nic (through the host bridge for nvme) whose provider forbids CPU
// copies.
constexpr uint64_t kNic2Bar = 0x44'0000'0000, kNic2Size = 16 * MiB;
ProviderId add_nic2(DmaWorld& w) {
  DmaWorld::check(w.mem.add_region({PhysSpan{PhysAddr(kNic2Bar), kNic2Size}, PhysRegion::Kind::bar, "nic BAR2"}));
  auto id = w.reg.add(ProviderDesc{w.topo.functions[w.f_nic].bdf, w.f_nic, 2, PhysSpan{PhysAddr(kNic2Bar), kNic2Size}, 0, true, false, {}});
  if (!id) DmaWorld::abort_with(id.error());
  return *id;
}

// Linux dma_direct_map_sg(): PCI_P2PDMA_MAP_THRU_HOST_BRIDGE falls through to the host-memory
// case, dma_direct_map_phys() without DMA_ATTR_MMIO: DMA address phys_to_dma() (with the
// offset), bounced through swiotlb when not dma_capable(), -EIO when that fails.
TEST(DmaParityMapTest, DirectMapSgMapsThruHostBridgeLikeHostMemory) {
  DmaWorld w;
  const RangeList l = list_of({prov(w.nic, DmaWorld::kNicBar + 0x2000, 0x1800), host(0x10000, 0x1000)});
  fill(w, l, 1);
  // Within the mask, on a device with a DMA offset: phys + offset, no MMIO attribute.
  auto off = w.device({.function = w.f_nvme, .dma_offset = 0x1000'0000'0000});
  auto m = off->map(l, DmaDirection::bidirectional);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  ASSERT_EQ(m->segments().size(), 2u);
  EXPECT_EQ(m->segments()[0].addr.value(), DmaWorld::kNicBar + 0x2000 + 0x1000'0000'0000);
  EXPECT_EQ(m->segments()[0].flags, DmaSegFlags{});
  round_trip(w, *off, l, *m, 2);
  // Above a 32-bit mask: bounced without any attribute, as host memory is.
  auto narrow = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff});
  m = narrow->map(l, DmaDirection::bidirectional);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  EXPECT_EQ(m->segments()[0].flags, kDmaSegBounced);
  EXPECT_TRUE(w.pool->contains(PhysAddr(m->segments()[0].addr.value())));
  EXPECT_EQ(m->segments()[1].flags, DmaSegFlags{});
  round_trip(w, *narrow, l, *m, 3);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  // No bounce pool (swiotlb inactive): -EIO, not EREMOTEIO.
  DmaEnv env = w.env();
  env.bounce = nullptr;
  auto nopool = std::move(DmaDevice::create(env, {.function = w.f_nvme, .dma_mask = 0xffffffff, .debug = true})).value();
  auto e = nopool->map(l, DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EIO) << e.error().to_string();
  // A provider that forbids CPU copies cannot be bounced: EIO as well.
  const ProviderId nic2 = add_nic2(w);
  e = narrow->map(list_of({prov(nic2, kNic2Bar, 0x1000)}), DmaDirection::to_device);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EIO) << e.error().to_string();
  EXPECT_NE(e.error().message.find("CPU copies"), std::string::npos) << e.error().message;
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(narrow->stats().live_mappings, 0u);
}

// Linux dma_direct_map_phys() with DMA_ATTR_MMIO (what a caller passes for
// PCI_P2PDMA_MAP_THRU_HOST_BRIDGE): the DMA address is the physical address, without the
// device's DMA offset; dma_capable() is checked on it; swiotlb is never used.
TEST(DmaParityMapTest, DirectMapPhysOfMmioIsThePhysicalAddressWithoutTheOffset) {
  DmaWorld w;
  const uint64_t a = DmaWorld::kNicBar + 0x3040;
  ASSERT_TRUE(w.mem.write(PhysAddr(a), pattern(0x200, 4)).has_value());
  // 44-bit mask and a 2^44 offset: phys + offset is above the mask, phys is not.
  auto dev = w.device({.function = w.f_nvme, .dma_mask = 0xfff'ffff'ffff, .dma_offset = 0x1000'0000'0000});
  auto s = dev->map_phys(PhysAddr(a), 0x200, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value()) << s.error().to_string();
  EXPECT_EQ(s->addr.value(), a);
  EXPECT_EQ(s->flags, kDmaSegMmio);
  EXPECT_EQ(w.device_read(dev->config(), std::span(&*s, 1)), pattern(0x200, 4));
  ASSERT_TRUE(dev->unmap_phys(*s, DmaDirection::to_device).has_value());
  // Host memory on the same device still gets the offset (and is bounced here, above the
  // mask, into a pool that is above it as well: EIO).
  auto h = dev->map_phys(PhysAddr(0x1000), 64, DmaDirection::to_device);
  ASSERT_FALSE(h.has_value());
  EXPECT_EQ(h.error().code, EIO);
  auto plain = w.device({.function = w.f_nvme, .dma_offset = 0x1000'0000'0000});
  h = plain->map_phys(PhysAddr(0x1000), 64, DmaDirection::to_device);
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->addr.value(), 0x1000'0000'1000u);
  ASSERT_TRUE(plain->unmap_phys(*h, DmaDirection::to_device).has_value());
  // MMIO above the mask is refused (never bounced by Linux): physr's EREMOTEIO.
  auto narrow = w.device({.function = w.f_nvme, .dma_mask = 0xffffffff});
  EXPECT_EQ(narrow->map_phys(PhysAddr(a), 0x200, DmaDirection::to_device).error().code, EREMOTEIO);
  // Forced bouncing refuses DMA_ATTR_MMIO too.
  auto forced = w.device({.function = w.f_nvme, .force_bounce = true});
  EXPECT_EQ(forced->map_phys(PhysAddr(a), 0x200, DmaDirection::to_device).error().code, EREMOTEIO);
  EXPECT_EQ(w.pool->used_slots(), 0u);
}

// Linux dma_direct_map_phys(): a direct device bounces on is_swiotlb_force_bounce(), when
// not dma_capable(), or for kmalloc bounce; whether it is untrusted does not matter there
// (that is dma-iommu's rule).
TEST(DmaParityMapTest, DirectUntrustedMapsInPlaceForcedBouncingBouncesEverything) {
  DmaWorld w;
  const RangeList l = list_of({host(0x7100, 0x100), host(0x10000, 0x2000), prov(w.nic, DmaWorld::kNicBar, 0x1000)});
  fill(w, l, 5);
  auto untrusted = w.device({.function = w.f_nvme, .untrusted = true});
  auto m = untrusted->map(l, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  for (const DmaSegment& s : m->segments()) EXPECT_EQ(s.flags, DmaSegFlags{});
  EXPECT_EQ(m->segments()[0].addr.value(), 0x7100u);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  round_trip(w, *untrusted, l, *m, 6);
  auto s = untrusted->map_phys(PhysAddr(0x7100), 0x100, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->flags, DmaSegFlags{});
  ASSERT_TRUE(untrusted->unmap_phys(*s, DmaDirection::to_device).has_value());
  // swiotlb=force: every range of a list bounces, P2P through the host bridge included.
  auto forced = w.device({.function = w.f_nvme, .force_bounce = true});
  m = forced->map(l, DmaDirection::bidirectional);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  for (const DmaSegment& seg : m->segments()) EXPECT_EQ(seg.flags, kDmaSegBounced);
  round_trip(w, *forced, l, *m, 7);
  s = forced->map_phys(PhysAddr(0x10000), 0x2000, DmaDirection::to_device);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->flags, kDmaSegBounced);
  ASSERT_TRUE(forced->unmap_phys(*s, DmaDirection::to_device).has_value());
  EXPECT_EQ(w.pool->used_slots(), 0u);
  // Forced bouncing is a direct-mapping rule.
  EXPECT_EQ(DmaDevice::create(w.env(), {.function = w.f_nvme, .force_bounce = true, .domain = w.domain.get()}).error().code, EINVAL);
}

// Linux iommu_dma_map_sg(): dev_use_sg_swiotlb() is true for an untrusted device, so
// iommu_dma_map_sg_swiotlb() maps each entry with iommu_dma_map_phys(): its own IOVA, no
// merging, bounced in whole zeroed granules when unaligned, and no P2P classification
// (P2P memory of any verdict gets an IOVA with the list's permissions).
TEST(DmaParityMapTest, UntrustedIommuMapsEachRangeAtItsOwnIovaWithoutP2PVerdicts) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .untrusted = true, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  const RangeList aligned = list_of({host(0x10000, 0x1000), host(0x30000, 0x1000)});
  fill(w, aligned, 8);
  auto m = dev->map(aligned, DmaDirection::from_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  ASSERT_EQ(m->segments().size(), 2u);  // a trusted device merges these into one segment
  EXPECT_EQ(m->iova().size, 0u);        // no one IOVA range for the list
  for (const DmaSegment& s : m->segments()) {
    EXPECT_EQ(s.flags, kDmaSegIommu);
    EXPECT_EQ(s.len, 0x1000u);
  }
  round_trip(w, *dev, aligned, *m, 9);
  expect_clean(w, *dev, before);
  // P2P of every verdict, for nvme: gpu (bus_addr), nic (thru_host_bridge), far
  // (not_supported, unaligned: bounced), all behind IOVAs with the list's permissions.
  const RangeList p2p = list_of({prov(w.gpu, DmaWorld::kGpuBar + 0x1000, 0x1000), prov(w.nic, DmaWorld::kNicBar + 0x4000, 0x2000),
                                 prov(w.far, DmaWorld::kFarBar + 0x80, 0x100), host(0x50000, 0x1000)});
  fill(w, p2p, 10);
  m = dev->map(p2p, DmaDirection::bidirectional);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  ASSERT_EQ(m->segments().size(), 4u);
  for (const DmaSegment& s : m->segments()) EXPECT_TRUE(s.flags & kDmaSegIommu) << dma_seg_path(s.flags);
  EXPECT_EQ(m->segments()[2].flags, kDmaSegIommu | kDmaSegBounced);
  EXPECT_EQ(w.domain->walk(m->segments()[0].addr)->phys.value(), DmaWorld::kGpuBar + 0x1000);
  EXPECT_EQ(w.domain->walk(m->segments()[1].addr)->perm, kIommuReadWrite);
  round_trip(w, *dev, p2p, *m, 11);
  expect_clean(w, *dev, before);
  // Unaligned memory of a provider that forbids CPU copies cannot be bounced: EIO, nothing
  // left behind.
  m = dev->map(list_of({host(0x60000, 0x1000), prov(w.far2, DmaWorld::kFar2Bar + 0x10, 0x100)}), DmaDirection::to_device);
  ASSERT_FALSE(m.has_value());
  EXPECT_EQ(m.error().code, EIO) << m.error().to_string();
  expect_clean(w, *dev, before);
  // physr's option: one IOVA for the list and the verdicts applied, as for a trusted device.
  auto one = w.device({.function = w.f_nvme, .untrusted = true, .untrusted_one_iova = true, .domain = w.domain.get()});
  m = one->map(aligned, DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  ASSERT_EQ(m->segments().size(), 1u);
  EXPECT_EQ(m->iova().size, 0x2000u);
  ASSERT_TRUE(one->unmap(*m).has_value());
  EXPECT_EQ(one->map(p2p, DmaDirection::to_device).error().code, EREMOTEIO);  // far is not_supported
  m = one->map(list_of({prov(w.gpu, DmaWorld::kGpuBar + 0x1000, 0x1000)}), DmaDirection::to_device);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->segments()[0].flags, kDmaSegBusAddr);
  ASSERT_TRUE(one->unmap(*m).has_value());
  expect_clean(w, *one, before);
}

// Linux iommu_dma_map_sg(): PCI_P2PDMA_MAP_THRU_HOST_BRIDGE entries are "mapped with
// regular IOVAs": the list-wide prot from dma_info_to_prot(), no IOMMU_MMIO. A single range
// (iommu_dma_map_phys() with DMA_ATTR_MMIO) does get IOMMU_MMIO.
TEST(DmaParityMapTest, IommuMapSgMapsThruHostBridgeWithTheListPermissions) {
  DmaWorld w;
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const uint64_t before = free_iova(*w.domain);
  const RangeList l = list_of({host(0x100000, 0x1000), prov(w.nic, DmaWorld::kNicBar + 0x1000, 0x1000)});
  fill(w, l, 12);
  auto m = dev->map(l, DmaDirection::from_device);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  ASSERT_EQ(m->segments().size(), 1u);  // merged: same permissions, IOVA-contiguous
  EXPECT_EQ(m->segments()[0].flags, kDmaSegIommu);
  auto t = w.domain->walk(m->segments()[0].addr + 0x1000);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->phys.value(), DmaWorld::kNicBar + 0x1000);
  EXPECT_EQ(t->perm, kIommuWrite);
  round_trip(w, *dev, l, *m, 13);
  auto s = dev->map_phys(PhysAddr(DmaWorld::kNicBar + 0x1000), 0x1000, DmaDirection::from_device);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->flags, kDmaSegIommu | kDmaSegMmio);
  EXPECT_EQ(w.domain->walk(s->addr)->perm, kIommuWrite | kIommuMmio);
  ASSERT_TRUE(dev->unmap_phys(*s, DmaDirection::from_device).has_value());
  expect_clean(w, *dev, before);
}

}  // namespace
}  // namespace physr
