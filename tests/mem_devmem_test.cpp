// The devmem binding: chunks per DMA segment, genalloc's allocation of 4 KiB net_iovs,
// SO_DEVMEM_DONTNEED's limits, what a move or revoke does to the binding, and devmem TX
// (a TX binding's tx_vec and sendmsg with SCM_DEVMEM_DMABUF).
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

// Linux net_devmem_bind_dmabuf() with DMA_TO_DEVICE (netdev_nl_bind_tx_doit()): the buffer
// mapped TO_DEVICE, tx_vec filled (net_devmem_get_niov_at(): NULL at or past the size);
// only from_device and to_device bind; a TX binding feeds no RX queue.
TEST(DevmemTest, TxBindingMapsToDeviceAndFindsNetIovsByOffset) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 16 * KiB}});
  for (DmaDirection d : {DmaDirection::bidirectional, DmaDirection::none}) {
    auto r = DevmemBinding::bind(b, *nvme, d);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find("direction"), std::string::npos) << r.error().message;
  }
  EXPECT_EQ(b->stats().attachments, 0u);
  auto tx = DevmemBinding::bind(b, *nvme, DmaDirection::to_device).value();
  auto rx = DevmemBinding::bind(b, *nvme).value();
  EXPECT_EQ(tx->direction(), DmaDirection::to_device);
  EXPECT_EQ(rx->direction(), DmaDirection::from_device);
  EXPECT_NE(tx->id(), 0u);
  EXPECT_NE(tx->id(), rx->id());
  // tx_vec[virt / PAGE_SIZE]: the second chunk starts 8 KiB into the buffer.
  const DevmemTxSlice s = tx->niov_at(8 * KiB + 5 * KiB + 100).value();
  EXPECT_EQ(s.niov, (NetIov{1, 1}));
  EXPECT_EQ(s.offset, 1 * KiB + 100);
  EXPECT_EQ(s.size, 3 * KiB - 100);
  EXPECT_EQ(tx->dma_addr(s.niov)->value(), kGpu + 1 * MiB + 4 * KiB);  // no allocation needed for TX
  EXPECT_EQ(tx->phys_addr(s.niov)->value(), kGpu + 1 * MiB + 4 * KiB);
  EXPECT_EQ(tx->niov_at(24 * KiB - 1)->niov, (NetIov{1, 3}));
  EXPECT_EQ(tx->niov_at(24 * KiB).error().code, EFAULT);
  EXPECT_EQ(rx->niov_at(0).error().code, EINVAL);
  EXPECT_EQ(tx->alloc_netmem().error().code, EINVAL);
  auto p = DevmemMemoryProvider::create(*tx);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, EINVAL);
}

// Linux tcp_sendmsg_locked() with SCM_DEVMEM_DMABUF: EINVAL without MSG_ZEROCOPY or
// SO_ZEROCOPY; net_devmem_get_binding(): EINVAL for an unknown id or an RX binding, ENODEV
// for another device; zerocopy_fill_skb_from_devmem(): frags cut at 4 KiB boundaries,
// EFAULT past the buffer.
TEST(DevmemTest, SendmsgFollowsTcpSendmsgLockedDevmemRules) {
  DmaBufWorld w;
  auto nvme = w.device(w.f_nvme, false);
  auto nic = w.device(w.f_nic, true);
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 16 * KiB}});
  auto tx = DevmemBinding::bind(b, *nvme, DmaDirection::to_device).value();
  auto rx = DevmemBinding::bind(b, *nvme).value();
  DevmemTxSocket sk(*nvme);
  const DevmemIov iov[] = {{6 * KiB, 4 * KiB}, {20 * KiB, 100}};
  const auto code = [&](const DevmemMsg& m) { auto r = sk.sendmsg(m); return r ? 0 : r.error().code; };
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = tx->id()}), EINVAL);  // no SO_ZEROCOPY
  sk.set_zerocopy(true);
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = false, .dmabuf_id = tx->id()}), EINVAL);  // no MSG_ZEROCOPY
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = 0}), EINVAL);
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = rx->id()}), EINVAL);  // not a TX binding
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = tx->id() + rx->id() + 1000}), EINVAL);
  DevmemTxSocket other(*nic);
  other.set_zerocopy(true);
  auto r = other.sendmsg({.iov = iov, .msg_zerocopy = true, .dmabuf_id = tx->id()});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ENODEV);  // the binding is nvme's, the route nic's
  // Past the end: one byte over, or an offset at the size.
  const DevmemIov over[] = {{0, 4 * KiB}, {20 * KiB, 4 * KiB + 1}};
  EXPECT_EQ(code({.iov = over, .msg_zerocopy = true, .dmabuf_id = tx->id()}), EFAULT);
  const DevmemIov at_end[] = {{24 * KiB, 1}};
  EXPECT_EQ(code({.iov = at_end, .msg_zerocopy = true, .dmabuf_id = tx->id()}), EFAULT);
  // The frags: 6K..8K in chunk 0, 8K..10K in chunk 1 (a chunk boundary), 20K +100.
  auto f = sk.sendmsg({.iov = iov, .msg_zerocopy = true, .dmabuf_id = tx->id()});
  ASSERT_TRUE(f) << f.error().to_string();
  ASSERT_EQ(f->size(), 3u);
  EXPECT_EQ((*f)[0].niov, (NetIov{0, 1}));
  EXPECT_EQ((*f)[0].offset, 2 * KiB);
  EXPECT_EQ((*f)[0].len, 2 * KiB);
  EXPECT_EQ((*f)[0].dma.value(), kGpu + 6 * KiB);
  EXPECT_EQ((*f)[1].niov, (NetIov{1, 0}));
  EXPECT_EQ((*f)[1].len, 2 * KiB);
  EXPECT_EQ((*f)[1].dma.value(), kGpu + 1 * MiB);
  EXPECT_EQ((*f)[2].niov, (NetIov{1, 3}));
  EXPECT_EQ((*f)[2].len, 100u);
  EXPECT_EQ((*f)[2].dma.value(), kGpu + 1 * MiB + 12 * KiB);
  // A binding gone is an unknown id; a revoked one is ENODEV.
  const uint32_t id = rx->id();
  rx.reset();
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = id}), EINVAL);
  ASSERT_TRUE(b->revoke());
  EXPECT_EQ(code({.iov = iov, .msg_zerocopy = true, .dmabuf_id = tx->id()}), ENODEV);
}

}  // namespace
}  // namespace physr::mem
