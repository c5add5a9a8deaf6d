// The devmem binding: chunks per DMA segment, genalloc's allocation of 4 KiB net_iovs,
// SO_DEVMEM_DONTNEED's limits, and what a move or revoke does to the binding.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "physr/mem.hpp"
#include "support/dmabuf_world.hpp"

namespace physr::mem {
namespace {

using testing::DmaBufWorld;

constexpr uint64_t kGpu = DmaBufWorld::kGpuBar;

std::shared_ptr<DmaBuf> gpu_buffer(DmaBufWorld& w, std::vector<DmaBufBarRange> r) {
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, r);
  EXPECT_TRUE(b.has_value()) << b.error().to_string();
  return std::move(b).value();
}

// Linux net_devmem_bind_dmabuf(): one dmabuf_genpool_chunk_owner per sg entry of the
// mapping, at its DMA address, base_virtual the running offset in the buffer.
TEST(DevmemTest, BindMakesOneChunkPerDmaSegment) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto nic = w.device(w.f_nic, true);
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 16 * KiB}, {4 * MiB, 4 * KiB}});
  auto bus = DevmemBinding::bind(b, *nvme);
  ASSERT_TRUE(bus) << bus.error().to_string();
  const auto c = (*bus)->chunks();
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].base_dma.value(), kGpu);
  EXPECT_EQ(c[1].base_dma.value(), kGpu + 1 * MiB);
  EXPECT_EQ(c[2].base_virtual, 24 * KiB);
  EXPECT_EQ(c[1].num_niovs, 4u);
  EXPECT_EQ((*bus)->stats().size, 28 * KiB);
  // Through the host bridge with an IOMMU the mapping is one IOVA range: one chunk.
  auto iommu = DevmemBinding::bind(b, *nic).value();
  ASSERT_EQ(iommu->chunks().size(), 1u);
  EXPECT_EQ(iommu->chunks()[0].num_niovs, 7u);
  // An importer that cannot reach the memory cannot bind (EREMOTEIO from the map).
  auto far = w.device(w.f_far, true);
  auto r = DevmemBinding::bind(b, *far);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EREMOTEIO);
  EXPECT_EQ(b->stats().attachments, 2u);  // the failed bind detached again
}

// Linux net_devmem_alloc_dmabuf() over gen_pool_alloc_owner(): the newest chunk first
// (gen_pool_add_owner() adds at the head), first fit inside it; net_devmem_get_dma_addr().
TEST(DevmemTest, AllocIsGenallocFirstFitNewestChunkFirst) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 8 * KiB}});
  auto bd = DevmemBinding::bind(b, *nvme).value();
  std::vector<NetIov> got;
  for (int i = 0; i < 4; ++i) got.push_back(bd->alloc_netmem().value());
  EXPECT_EQ(got[0], (NetIov{1, 0}));
  EXPECT_EQ(got[1], (NetIov{1, 1}));
  EXPECT_EQ(got[2], (NetIov{0, 0}));
  EXPECT_EQ(got[3], (NetIov{0, 1}));
  EXPECT_EQ(bd->dma_addr(got[1])->value(), kGpu + 1 * MiB + 4096);
  EXPECT_EQ(*bd->offset(got[1]), 12 * KiB);
  EXPECT_EQ(bd->phys_addr(got[1])->value(), kGpu + 1 * MiB + 4096);
  auto none = bd->alloc_netmem();
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, ENOMEM);
  ASSERT_TRUE(bd->release_netmem(got[2]));
  EXPECT_EQ(bd->alloc_netmem().value(), got[2]);
  for (const NetIov& n : got) ASSERT_TRUE(bd->release_netmem(n));
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
  NetIov bulk[8];
  EXPECT_EQ(*bd->alloc_netmems(bulk), 4u);
  for (size_t i = 0; i < 4; ++i) ASSERT_TRUE(bd->release_netmem(bulk[i]));
}

// Linux net_devmem_free_dmabuf(): WARN_ON(!gen_pool_has_addr()); genalloc's double free.
TEST(DevmemTest, ReleaseOfABadNetIovIsEinvalAndChangesNothing) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 8 * KiB}}), *nvme).value();
  auto n = bd->alloc_netmem().value();
  ASSERT_TRUE(bd->release_netmem(n));
  EXPECT_EQ(bd->release_netmem(n).error().code, EINVAL);  // double release
  EXPECT_EQ(bd->release_netmem(NetIov{0, 2}).error().code, EINVAL);  // past the chunk
  EXPECT_EQ(bd->release_netmem(NetIov{3, 0}).error().code, EINVAL);  // no such chunk
  EXPECT_EQ(bd->dma_addr(n).error().code, EINVAL);  // not allocated
  EXPECT_EQ(bd->stats().bad_releases, 3u);
  EXPECT_EQ(bd->stats().avail, 8 * KiB);
}

// Linux sock_devmem_dontneed(): more than MAX_DONTNEED_TOKENS (128) tokens is EINVAL; the
// loop stops after MAX_DONTNEED_FRAGS (1024) frags looked at, held or not; tokens the
// socket does not hold are skipped.
TEST(DevmemTest, DontneedKeepsSockDevmemDontneedLimits) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 8 * MiB}}), *nvme).value();
  DevmemSocket sk(*bd);
  for (uint32_t i = 0; i < 1100; ++i) EXPECT_EQ(sk.deliver(bd->alloc_netmem().value()), i);
  std::vector<DmabufToken> many(129, DmabufToken{0, 1});
  auto r = sk.dontneed(many);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_EQ(sk.outstanding(), 1100u);  // nothing given back
  many.resize(128);
  EXPECT_EQ(*sk.dontneed(many), 1u);  // 128 tokens is allowed; token 0 once
  // Unknown tokens count against the frag limit: 1024 of them and nothing is freed.
  const DmabufToken unknown_then_real[] = {{5000, 1024}, {1, 10}};
  EXPECT_EQ(*sk.dontneed(unknown_then_real), 0u);
  EXPECT_EQ(sk.outstanding(), 1099u);
  const DmabufToken all[] = {{0, 1100}};
  EXPECT_EQ(*sk.dontneed(all), 1023u);  // token 0 is gone; the 1024th frag looked at is 1023
  EXPECT_EQ(sk.outstanding(), 76u);
  EXPECT_EQ(*sk.dontneed(all), 0u);  // the first 1024 tokens are not held any more: the limit
  const DmabufToken rest[] = {{1024, 76}};
  EXPECT_EQ(*sk.dontneed(rest), 76u);
  EXPECT_EQ(*sk.dontneed(rest), 0u);  // given back twice: skipped
  EXPECT_EQ(sk.outstanding(), 0u);
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
  EXPECT_EQ(*sk.dontneed({}), 0u);
  // Freed tokens are handed out again smallest first (xa_alloc).
  EXPECT_EQ(sk.deliver(bd->alloc_netmem().value()), 0u);
  EXPECT_EQ(sk.deliver(bd->alloc_netmem().value()), 1u);
}

// A revoke of the buffer: the binding's move_notify makes every lookup and allocation
// ENODEV; net_iovs still come back; unbinding reports those still out.
TEST(DevmemTest, RevokeMakesTheBindingRefuseEveryUse) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto b = gpu_buffer(w, {{0, 64 * KiB}});
  auto bd = DevmemBinding::bind(b, *nic).value();
  std::string report;
  bd->on_report([&](const std::string& s) { report = s; });
  auto n1 = bd->alloc_netmem().value();
  auto n2 = bd->alloc_netmem().value();
  const DmaAddr d = bd->dma_addr(n1).value();
  ASSERT_TRUE(w.domain->translate(d).has_value());
  ASSERT_TRUE(b->revoke());
  EXPECT_TRUE(bd->revoked());
  EXPECT_EQ(bd->alloc_netmem().error().code, ENODEV);
  EXPECT_EQ(bd->dma_addr(n1).error().code, ENODEV);
  EXPECT_EQ(bd->phys_addr(n1).error().code, ENODEV);
  EXPECT_FALSE(w.domain->translate(d).has_value());  // the NIC's DMA through it faults
  ASSERT_TRUE(bd->release_netmem(n1));
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  (void)n2;
  bd.reset();
  EXPECT_NE(report.find("1 net_iov(s) still allocated"), std::string::npos) << report;
  EXPECT_EQ(b->stats().attachments, 0u);
}

// A move: the binding remaps and its chunks follow to the new DMA addresses.
TEST(DevmemTest, MoveRemapsTheChunks) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 8 * KiB}});
  auto bd = DevmemBinding::bind(b, *nvme).value();
  auto n = bd->alloc_netmem().value();
  EXPECT_EQ(bd->dma_addr(n)->value(), kGpu + 1 * MiB);
  RangeList to;
  ASSERT_TRUE(to.append(PhysRange{PhysAddr(kGpu + 2 * MiB), 8 * KiB, b->provider()}, SegmentLimits{.merge = false}));
  ASSERT_TRUE(to.append(PhysRange{PhysAddr(kGpu + 3 * MiB), 8 * KiB, b->provider()}, SegmentLimits{.merge = false}));
  ASSERT_TRUE(b->move(to));
  EXPECT_FALSE(bd->revoked());
  EXPECT_EQ(bd->stats().remaps, 1u);
  EXPECT_EQ(bd->dma_addr(n)->value(), kGpu + 3 * MiB);
  EXPECT_EQ(bd->phys_addr(n)->value(), kGpu + 3 * MiB);
  // A move to another layout cannot be followed: the binding stops.
  RangeList one;
  ASSERT_TRUE(one.append(PhysRange{PhysAddr(kGpu + 4 * MiB), 16 * KiB, b->provider()}));
  ASSERT_TRUE(b->move(one));
  EXPECT_TRUE(bd->revoked());
  EXPECT_EQ(bd->dma_addr(n).error().code, ENODEV);
  ASSERT_TRUE(bd->release_netmem(n));
}

}  // namespace
}  // namespace physr::mem
