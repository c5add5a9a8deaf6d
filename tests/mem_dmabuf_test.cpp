// dma-buf export and import: VFIO's BAR export checks, the peer2peer rule, the verdict per
// importer (dma_buf_phys_vec_to_sgt()), move_notify and revoke, and bad input.
#include <gtest/gtest.h>

#include <vector>

#include "physr/mem.hpp"
#include "support/dmabuf_world.hpp"
#include "support/mem_world.hpp"

namespace physr::mem {
namespace {

using testing::DmaBufWorld;

constexpr uint64_t kGpu = DmaBufWorld::kGpuBar;

DmaBufAttachOptions dynamic_p2p(int* calls = nullptr) {
  DmaBufAttachOptions o;
  o.allow_peer2peer = true;
  o.move_notify = [calls](DmaBufAttachment&) {
    if (calls) ++*calls;
  };
  return o;
}

std::shared_ptr<DmaBuf> gpu_buffer(DmaBufWorld& w, std::vector<DmaBufBarRange> r) {
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, r);
  EXPECT_TRUE(b.has_value()) << b.error().to_string();
  return std::move(b).value();
}

// Linux vfio_pci_core_feature_dma_buf(), validate_dmabuf_input(), pcim_p2pdma_provider()
// and vfio_pci_core_fill_phys_vec(): each refusal with its code.
TEST(DmaBufTest, BarExportValidatesLikeVfio) {
  DmaBufWorld w;
  Platform& p = *w.platform;
  auto code = [&](uint32_t f, unsigned bar, std::vector<DmaBufBarRange> r) {
    auto b = DmaBuf::export_bar(p, f, bar, r);
    return b ? 0 : b.error().code;
  };
  EXPECT_EQ(code(w.f_gpu, 1, {}), EINVAL);                                  // no ranges
  EXPECT_EQ(code(w.f_gpu, 6, {{0, 4096}}), ENODEV);                         // the ROM region
  EXPECT_EQ(code(w.f_gpu, 1, {{0, 0}}), EINVAL);                            // empty range
  EXPECT_EQ(code(w.f_gpu, 1, {{512, 4096}}), EINVAL);                       // offset not page-aligned
  EXPECT_EQ(code(w.f_gpu, 1, {{0, 4097}}), EINVAL);                         // length not page-aligned
  EXPECT_EQ(code(w.f_gpu, 1, {{0, ~uint64_t{0} & ~uint64_t{4095}}, {0, 8192}}), EINVAL);  // lengths overflow
  EXPECT_EQ(code(w.f_gpu, 1, {{uint64_t{1} << 62, uint64_t{1} << 62}, {0, uint64_t{1} << 62}}), EINVAL);  // bit 63
  EXPECT_EQ(code(w.f_gpu, 1, {{~uint64_t{0} & ~uint64_t{4095}, 4096}}), EOVERFLOW);  // start + offset overflows
  EXPECT_EQ(code(w.f_gpu, 1, {{DmaBufWorld::kGpuSize - 4096, 8192}}), EINVAL);       // ends past the BAR
  EXPECT_EQ(code(w.f_gpu, 0, {{0, 4096}}), EINVAL);                         // no such BAR
  EXPECT_EQ(code(w.f_far, 4, {{0, 4096}}), EINVAL);                         // an I/O BAR has no provider
  // Good: the ranges stay as given (adjacent ones are not merged), at the BAR's addresses.
  auto b = gpu_buffer(w, {{0, 4096}, {4096, 8192}, {64 * KiB, 4096}});
  const RangeList r = b->ranges();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].base.value(), kGpu);
  EXPECT_EQ(r[1].base.value(), kGpu + 4096);
  EXPECT_EQ(r[2].base.value(), kGpu + 64 * KiB);
  EXPECT_EQ(b->size(), 16 * KiB);
  EXPECT_NE(b->provider(), kHostMemory);
}

// Linux vfio_pci_dma_buf_attach(): P2P memory needs attach->peer2peer, which
// dma_buf_dynamic_attach() takes only from a dynamic importer's ops.
TEST(DmaBufTest, PeerToPeerNeedsADynamicImporterThatAllowsIt) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto b = gpu_buffer(w, {{0, 4096}});
  auto r = b->attach(*nvme);  // static
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EOPNOTSUPP);
  DmaBufAttachOptions o;
  o.allow_peer2peer = true;  // static with the flag: still no peer2peer
  r = b->attach(*nvme, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EOPNOTSUPP);
  o = dynamic_p2p();
  o.allow_peer2peer = false;
  EXPECT_EQ(b->attach(*nvme, o).error().code, EOPNOTSUPP);
  auto a = b->attach(*nvme, dynamic_p2p());
  ASSERT_TRUE(a) << a.error().to_string();
  EXPECT_TRUE((*a)->peer2peer());
  EXPECT_TRUE((*a)->dynamic());
  // Host memory needs no peer2peer.
  RangeList host;
  ASSERT_TRUE(host.append(PhysRange{PhysAddr(64 * MiB), 64 * KiB, kHostMemory}));
  auto hb = DmaBuf::export_ranges(*w.platform, host);
  ASSERT_TRUE(hb);
  EXPECT_TRUE((*hb)->attach(*nvme).has_value());
}

// Linux dma_buf_phys_vec_to_sgt(): pci_p2pdma_map_type() per importer picks bus addresses,
// an IOVA with every range linked (DMA_ATTR_MMIO), dma_map_phys() per range for a direct
// device, or refuses.
TEST(DmaBufTest, EachImporterGetsItsOwnVerdict) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto nic = w.device(w.f_nic, true);
  auto nic_direct = w.device(w.f_nic, false);
  auto far = w.device(w.f_far, true);
  auto b = gpu_buffer(w, {{0, 4096}, {1 * MiB, 64 * KiB}, {32 * MiB, 8192}});
  const RangeList ranges = b->ranges();

  auto a1 = b->attach(*nvme, dynamic_p2p()).value();
  auto m1 = a1->map(DmaDirection::from_device);
  ASSERT_TRUE(m1) << m1.error().to_string();
  EXPECT_EQ(m1->path(), DmaBufPath::bus_addr);
  ASSERT_EQ(m1->segments().size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(m1->segments()[i].addr.value(), ranges[i].base.value());  // bus offset 0 here
    EXPECT_EQ(m1->segments()[i].len, ranges[i].size);
    EXPECT_TRUE(m1->segments()[i].flags & kDmaSegBusAddr);
  }
  EXPECT_EQ(nvme->stats().live_mappings, 0u);  // no IOVA, nothing in the DMA layer

  auto a2 = b->attach(*nic, dynamic_p2p()).value();
  auto m2 = a2->map(DmaDirection::bidirectional);
  ASSERT_TRUE(m2) << m2.error().to_string();
  EXPECT_EQ(m2->path(), DmaBufPath::iova);
  ASSERT_EQ(m2->segments().size(), 1u);
  const DmaSegment s = m2->segments()[0];
  EXPECT_EQ(s.len, b->size());
  EXPECT_TRUE(s.flags & kDmaSegIommu);
  EXPECT_TRUE(s.flags & kDmaSegMmio);
  // Every page of the IOVA range reaches the buffer's bytes in order, as MMIO.
  uint64_t at = 0;
  for (const PhysRange r : ranges)
    for (uint64_t off = 0; off < r.size; off += 4096, at += 4096) {
      auto t = w.domain->translate(DmaAddr(s.addr.value() + at));
      ASSERT_TRUE(t.has_value());
      EXPECT_EQ(t->phys.value(), r.base.value() + off);
      EXPECT_TRUE(t->perm & kIommuMmio);
    }

  auto a3 = b->attach(*nic_direct, dynamic_p2p()).value();
  auto m3 = a3->map(DmaDirection::to_device);
  ASSERT_TRUE(m3) << m3.error().to_string();
  EXPECT_EQ(m3->path(), DmaBufPath::phys);
  ASSERT_EQ(m3->segments().size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(m3->segments()[i].addr.value(), ranges[i].base.value());  // DMA_ATTR_MMIO: phys, no offset
    EXPECT_TRUE(m3->segments()[i].flags & kDmaSegMmio);
  }
  EXPECT_EQ(nic_direct->stats().live_mappings, 3u);

  auto a4 = b->attach(*far, dynamic_p2p()).value();
  const uint64_t iova_before = testing::free_iova(*w.domain);
  auto m4 = a4->map(DmaDirection::from_device);
  ASSERT_FALSE(m4);
  EXPECT_EQ(m4.error().code, EREMOTEIO);
  EXPECT_EQ(far->stats().live_mappings, 0u);
  EXPECT_EQ(testing::free_iova(*w.domain), iova_before);

  ASSERT_TRUE(a2->unmap(*m2));
  ASSERT_TRUE(a3->unmap(*m3));
  EXPECT_EQ(nic_direct->stats().live_mappings, 0u);
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  EXPECT_FALSE(w.domain->translate(s.addr).has_value());
}

// Linux fill_sg_entry(): no DMA segment longer than MAX_SG_ENT_SZ (UINT_MAX aligned down
// to a page), the sg entry's 32-bit length.
TEST(DmaBufTest, SegmentsStopAtTheScatterlistEntryLimit) {
  testing::MemWorld w(64 * GiB);
  auto nic = DmaDevice::create(w.platform->dma_env(), DmaDeviceConfig{.function = w.nic}).value();
  auto b = DmaBuf::export_bar(*w.platform, w.gpu, 0, std::vector<DmaBufBarRange>{{0, 8 * GiB}}).value();
  DmaBufAttachOptions o;
  o.allow_peer2peer = true;
  o.move_notify = [](DmaBufAttachment&) {};
  auto a = b->attach(*nic, o).value();
  auto m = a->map(DmaDirection::to_device).value();
  ASSERT_EQ(m.path(), DmaBufPath::bus_addr);
  ASSERT_EQ(m.segments().size(), 3u);
  EXPECT_EQ(m.segments()[0].len, 0xfffff000u);
  EXPECT_EQ(m.segments()[1].addr.value(), testing::MemWorld::kGpuBar + 0xfffff000u);
  EXPECT_EQ(m.segments()[1].len, 0xfffff000u);
  EXPECT_EQ(m.segments()[2].len, 8 * KiB);
  EXPECT_EQ(kDmaBufMaxSegment, 0xfffff000u);
}

// A host-memory buffer maps as an sg exporter's dma_map_sgtable(): through DmaDevice::map().
TEST(DmaBufTest, HostMemoryMapsThroughTheDmaLayer) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  RangeList host;
  ASSERT_TRUE(host.append(PhysRange{PhysAddr(64 * MiB), 16 * KiB, kHostMemory}));
  ASSERT_TRUE(host.append(PhysRange{PhysAddr(80 * MiB), 8 * KiB, kHostMemory}));
  auto b = DmaBuf::export_ranges(*w.platform, host).value();
  EXPECT_EQ(b->provider(), kHostMemory);
  auto a = b->attach(*nic).value();
  auto m = a->map(DmaDirection::to_device).value();
  EXPECT_EQ(m.path(), DmaBufPath::host);
  uint64_t at = 0;
  for (const DmaSegment& s : m.segments())
    for (uint64_t off = 0; off < s.len; off += 4096, at += 4096) {
      auto t = w.domain->translate(DmaAddr(s.addr.value() + off));
      ASSERT_TRUE(t.has_value());
      EXPECT_EQ(t->phys.value(), (at < 16 * KiB ? 64 * MiB + at : 80 * MiB + at - 16 * KiB));
    }
  EXPECT_EQ(nic->stats().live_mappings, 1u);
  ASSERT_TRUE(a->detach());
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  EXPECT_EQ(a->leaked_mappings(), 1u);
}

// A chunk of the GPU's P2P memory pool exported as a dma-buf and imported by a peer.
TEST(DmaBufTest, P2pMemoryChunkExport) {
  DmaBufWorld w;
  auto pool = P2PMemory::create(*w.platform).value();
  ASSERT_TRUE(pool->add_resource(w.f_gpu, 1, 0, 0));
  auto c = pool->alloc(w.f_gpu, 64 * KiB).value();
  auto nvme = w.device(w.f_nvme, false);
  {
    auto b = DmaBuf::export_chunk(*w.platform, c).value();
    EXPECT_EQ(b->provider(), c.provider);
    auto a = b->attach(*nvme, dynamic_p2p()).value();
    auto m = a->map(DmaDirection::from_device).value();
    ASSERT_EQ(m.segments().size(), 1u);
    EXPECT_EQ(m.segments()[0].addr.value(), pool->virt_to_bus(w.f_gpu, c.span.base)->value());
    // A chunk the provider does not hold is refused.
    P2PChunk bad = c;
    bad.span.base = PhysAddr(0x10'0000);
    EXPECT_EQ(DmaBuf::export_chunk(*w.platform, bad).error().code, EINVAL);
  }
  ASSERT_TRUE(pool->free(c));
}

// Linux dma_buf_move_notify(): every dynamic importer's mapping is invalidated and the
// importer remaps; a static importer pins the buffer (dma_buf_pin()).
TEST(DmaBufTest, MoveInvalidatesEveryDynamicImporterWhoRemaps) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto nic = w.device(w.f_nic, true);
  auto b = gpu_buffer(w, {{0, 64 * KiB}});
  int calls = 0;
  std::vector<DmaBufMapping> remapped;
  DmaBufAttachOptions o = dynamic_p2p();
  o.move_notify = [&](DmaBufAttachment& a) {
    ++calls;
    auto m = a.map(DmaDirection::from_device);  // the callback may remap at once
    ASSERT_TRUE(m) << m.error().to_string();
    remapped.push_back(std::move(m).value());
  };
  auto a1 = b->attach(*nvme, o).value();
  auto a2 = b->attach(*nic, o).value();
  auto m1 = a1->map(DmaDirection::from_device).value();
  auto m2 = a2->map(DmaDirection::from_device).value();
  EXPECT_TRUE(a1->check(m1));
  RangeList to;
  ASSERT_TRUE(to.append(PhysRange{PhysAddr(kGpu + 128 * MiB), 64 * KiB, b->provider()}));
  ASSERT_TRUE(b->move(to));
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(a1->check(m1).error().code, ESTALE);
  EXPECT_EQ(a2->check(m2).error().code, ESTALE);
  ASSERT_EQ(remapped.size(), 2u);
  EXPECT_EQ(remapped[0].segments()[0].addr.value(), kGpu + 128 * MiB);
  auto t = w.domain->translate(remapped[1].segments()[0].addr);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->phys.value(), kGpu + 128 * MiB);
  EXPECT_TRUE(a1->check(remapped[0]));
  EXPECT_TRUE(a1->unmap(m1));  // releasing an invalidated mapping is fine
  EXPECT_EQ(b->stats().invalidated, 2u);
  EXPECT_EQ(b->stats().moves, 1u);
  // A move to a different size is EINVAL; a static importer pins the buffer.
  RangeList small;
  ASSERT_TRUE(small.append(PhysRange{PhysAddr(kGpu), 4096, b->provider()}));
  EXPECT_EQ(b->move(small).error().code, EINVAL);
  RangeList host;
  ASSERT_TRUE(host.append(PhysRange{PhysAddr(64 * MiB), 16 * KiB, kHostMemory}));
  auto hb = DmaBuf::export_ranges(*w.platform, host).value();
  auto pinned = hb->attach(*nvme).value();
  EXPECT_EQ(hb->move().error().code, EBUSY);
  ASSERT_TRUE(pinned->detach());
  EXPECT_TRUE(hb->move());
  for (size_t i = 0; i < remapped.size(); ++i) ASSERT_TRUE((i ? a2 : a1)->unmap(remapped[i]));
  EXPECT_EQ(nic->stats().live_mappings, 0u);
}

// VFIO's revoke (vfio_pci_dma_buf_move(vdev, true)): every mapping invalidated, the IOVA
// gone (a device access faults), later maps and attaches ENODEV; enabled again, maps work.
TEST(DmaBufTest, RevokeInvalidatesEveryMappingAndLaterMapsFailWithEnodev) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto nic = w.device(w.f_nic, true);
  auto b = gpu_buffer(w, {{0, 64 * KiB}, {1 * MiB, 4096}});
  int calls = 0;
  auto a1 = b->attach(*nvme, dynamic_p2p(&calls)).value();
  auto a2 = b->attach(*nic, dynamic_p2p(&calls)).value();
  auto m1 = a1->map(DmaDirection::from_device).value();
  auto m2 = a2->map(DmaDirection::from_device).value();
  const DmaAddr iova = m2.segments()[0].addr;
  ASSERT_TRUE(w.domain->translate(iova).has_value());
  ASSERT_TRUE(b->revoke());
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(b->revoked());
  EXPECT_EQ(a1->check(m1).error().code, ENODEV);
  EXPECT_EQ(a2->check(m2).error().code, ENODEV);
  EXPECT_FALSE(w.domain->translate(iova).has_value());  // the stale IOVA faults
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  EXPECT_EQ(a1->map(DmaDirection::from_device).error().code, ENODEV);
  EXPECT_EQ(b->attach(*nvme, dynamic_p2p()).error().code, ENODEV);
  EXPECT_EQ(b->revoke().error().code, EINVAL);
  EXPECT_EQ(b->move().error().code, ENODEV);
  ASSERT_TRUE(a2->unmap(m2));
  ASSERT_TRUE(b->unrevoke());
  EXPECT_EQ(calls, 4);
  EXPECT_EQ(b->unrevoke().error().code, EINVAL);
  auto again = a2->map(DmaDirection::from_device);
  ASSERT_TRUE(again) << again.error().to_string();
  EXPECT_TRUE(a2->check(*again));
  EXPECT_TRUE(a2->unmap(*again));
}

TEST(DmaBufTest, BadInputIsRefusedAndLeaksNothing) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto nvme = w.device(w.f_nvme, false);
  const uint64_t iova0 = testing::free_iova(*w.domain);
  auto b = gpu_buffer(w, {{0, 64 * KiB}});
  auto a = b->attach(*nic, dynamic_p2p()).value();
  auto other = b->attach(*nvme, dynamic_p2p()).value();
  EXPECT_EQ(a->map(DmaDirection::none).error().code, EINVAL);
  auto m = a->map(DmaDirection::from_device).value();
  auto mo = other->map(DmaDirection::from_device).value();
  EXPECT_EQ(a->unmap(mo).error().code, EINVAL);  // another attachment's
  EXPECT_EQ(a->check(mo).error().code, EINVAL);
  ASSERT_TRUE(a->unmap(m));
  EXPECT_EQ(a->unmap(m).error().code, EINVAL);  // double unmap
  EXPECT_EQ(a->check(m).error().code, EINVAL);
  auto m2 = a->map(DmaDirection::from_device).value();
  ASSERT_TRUE(a->detach());  // with a live mapping: unmapped and counted
  EXPECT_EQ(a->leaked_mappings(), 1u);
  EXPECT_EQ(a->detach().error().code, EINVAL);  // double detach
  EXPECT_EQ(a->map(DmaDirection::from_device).error().code, EINVAL);  // map after detach
  EXPECT_EQ(a->unmap(m2).error().code, EINVAL);
  EXPECT_FALSE(a->attached());
  ASSERT_TRUE(other->unmap(mo));
  EXPECT_EQ(b->stats().attachments, 1u);
  EXPECT_EQ(b->stats().mappings, 0u);
  other.reset();  // the destructor detaches
  EXPECT_EQ(b->stats().attachments, 0u);
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  EXPECT_EQ(testing::free_iova(*w.domain), iova0);
  // export_ranges input.
  RangeList unaligned;
  ASSERT_TRUE(unaligned.append(PhysRange{PhysAddr(64 * MiB + 512), 4096, kHostMemory}));
  EXPECT_EQ(DmaBuf::export_ranges(*w.platform, unaligned).error().code, EINVAL);
  EXPECT_EQ(DmaBuf::export_ranges(*w.platform, RangeList{}).error().code, EINVAL);
}

}  // namespace
}  // namespace physr::mem
