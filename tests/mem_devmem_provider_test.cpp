// A devmem binding as a page pool's memory provider (net/core/devmem.c dmabuf_devmem_ops):
// init's rules, net_iovs at the binding's DMA addresses, revoke with buffers in flight, and
// SO_DEVMEM_DONTNEED tokens giving buffers back to the pool.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "physr/mem.hpp"
#include "support/dmabuf_world.hpp"

namespace physr::mem {
namespace {

using testing::DmaBufWorld;

std::shared_ptr<DmaBuf> gpu_buffer(DmaBufWorld& w, std::vector<DmaBufBarRange> r) {
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, r);
  EXPECT_TRUE(b.has_value()) << b.error().to_string();
  return std::move(b).value();
}

PagePoolParams rx_params(DmaDevice& nic, MemoryProvider& mp, std::string* report = nullptr) {
  PagePoolParams p;
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.dev = &nic;
  p.max_len = 4096;
  p.napi = true;
  p.mp = &mp;
  p.defer_time = std::chrono::milliseconds(1);
  if (report) p.report = [report](const std::string& s) { *report += s + "\n"; };
  return p;
}

// Linux mp_dmabuf_devmem_init(): dma_sync and dma_sync_for_cpu forced off, then E2BIG for
// order != 0; page_pool_init() before it: EOPNOTSUPP without DMA_MAP | DMA_SYNC_DEV.
TEST(DevmemProviderTest, InitTurnsDmaSyncOffAndRefusesOrderAboveZero) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 64 * KiB}}), *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  PagePoolParams p = rx_params(*nic, *mp);
  p.order = 1;
  auto r = PagePool::create(p);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, E2BIG);
  p.order = 0;
  p.flags = kPPFlagDmaMap;
  r = PagePool::create(p);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EOPNOTSUPP);
  EXPECT_EQ(mp->pools(), 0u);
  PagePool* pool = PagePool::create(rx_params(*nic, *mp)).value();
  EXPECT_FALSE(pool->dma_sync());
  EXPECT_EQ(mp->pools(), 1u);
  pool->destroy();
  EXPECT_EQ(mp->pools(), 0u);  // mp_dmabuf_devmem_destroy()
}

// mp_dmabuf_devmem_alloc_netmems(): net_iovs from the binding's genpool, each with the
// binding's DMA address (net_devmem_get_dma_addr()) and the buffer's bytes behind it; a
// chunk over several ranges (one IOVA segment) is cut into one area per range.
TEST(DevmemProviderTest, PoolHandsOutNetIovsAtTheBindingsDmaAddresses) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  constexpr uint64_t kGpu = DmaBufWorld::kGpuBar;
  auto b = gpu_buffer(w, {{0, 8 * KiB}, {1 * MiB, 16 * KiB}, {4 * MiB, 4 * KiB}});
  auto bd = DevmemBinding::bind(b, *nic).value();
  ASSERT_EQ(bd->chunks().size(), 1u);
  auto mp = DevmemMemoryProvider::create(*bd).value();
  EXPECT_EQ(mp->areas().size(), 3u);
  PagePool* pool = PagePool::create(rx_params(*nic, *mp)).value();
  std::vector<Netmem> got;
  std::set<uint64_t> phys;
  for (int i = 0; i < 7; ++i) {
    const Netmem n = pool->alloc_netmems();
    ASSERT_TRUE(n);
    EXPECT_TRUE(n.is_net_iov());
    const NetIov v = mp->niov(n).value();
    EXPECT_EQ(mp->netmem(v).value(), n);
    EXPECT_EQ(PagePool::dma_addr(n), bd->dma_addr(v).value());
    EXPECT_EQ(netmem_phys(n), bd->phys_addr(v).value());
    phys.insert(netmem_phys(n).value());
    got.push_back(n);
  }
  EXPECT_EQ(phys, (std::set<uint64_t>{kGpu, kGpu + 4 * KiB, kGpu + 1 * MiB, kGpu + 1 * MiB + 4 * KiB,
                                      kGpu + 1 * MiB + 8 * KiB, kGpu + 1 * MiB + 12 * KiB, kGpu + 4 * MiB}));
  EXPECT_FALSE(pool->alloc_netmems());  // the binding is exhausted: the kernel's NULL
  EXPECT_EQ(bd->stats().avail, 0u);
  EXPECT_EQ(pool->inflight(), 7);
  for (Netmem n : got) ASSERT_TRUE(pool->recycle_direct(n));
  EXPECT_EQ(pool->inflight(), 7);         // in the pool's cache, still the binding's
  EXPECT_EQ(pool->alloc_netmems(), got.back());  // the cache first
  ASSERT_TRUE(pool->recycle_direct(got.back()));
  pool->destroy();
  EXPECT_EQ(bd->stats().avail, bd->stats().size);  // every net_iov back in the genpool
  EXPECT_EQ(bd->stats().releases, 7u);
  EXPECT_FALSE(mp->niov(Netmem{}).has_value());
  EXPECT_EQ(mp->netmem(NetIov{0, 7}).error().code, EINVAL);
}

// Two RX queues bound to one dma-buf: two pools share the binding's genpool.
TEST(DevmemProviderTest, TwoPoolsShareOneBinding) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 8 * KiB}}), *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  PagePool* a = PagePool::create(rx_params(*nic, *mp)).value();
  PagePool* b = PagePool::create(rx_params(*nic, *mp)).value();
  EXPECT_EQ(mp->pools(), 2u);
  const Netmem x = a->alloc_netmems(), y = b->alloc_netmems();
  ASSERT_TRUE(x && y);
  EXPECT_NE(x, y);
  EXPECT_FALSE(a->alloc_netmems());
  ASSERT_TRUE(a->put_full_netmem(x, false));
  ASSERT_TRUE(b->put_full_netmem(y, false));
  a->destroy();
  b->destroy();
  EXPECT_EQ(mp->pools(), 0u);
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
}

// A revoke of the dma-buf while the NIC holds buffers: the pool hands out no more, flushes
// its cache, and every buffer coming back goes to the binding instead of the cache.
TEST(DevmemProviderTest, RevokeWithBuffersInFlightReleasesThemToTheBinding) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto buf = gpu_buffer(w, {{0, 64 * KiB}});
  auto bd = DevmemBinding::bind(buf, *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  std::string report;
  PagePool* pool = PagePool::create(rx_params(*nic, *mp, &report)).value();
  std::vector<Netmem> out;
  for (int i = 0; i < 10; ++i) out.push_back(pool->alloc_netmems());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(pool->recycle_direct(out[i]));  // cached
  ASSERT_TRUE(buf->revoke());
  EXPECT_TRUE(mp->revoked());
  EXPECT_FALSE(pool->alloc_netmems());  // the cache is flushed, the binding refuses
  EXPECT_EQ(bd->stats().releases, 4u);
  for (int i = 4; i < 10; ++i) ASSERT_TRUE(pool->put_full_netmem(out[i], false));
  EXPECT_EQ(bd->stats().releases, 10u);
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
  EXPECT_EQ(pool->inflight(), 0);
  EXPECT_EQ(pool->stats().recycle.cached, 4u);  // only those before the revoke
  pool->destroy();
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  EXPECT_EQ(report, "");
  // A pool cannot be made over a revoked binding (physr: the kernel's devmem pins).
  auto r = PagePool::create(rx_params(*nic, *mp));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ENODEV);
}

// sock_devmem_dontneed(): the user's tokens put the frags back to their page pool
// (napi_pp_put_page()), which recycles them; the net_iovs stay the pool's.
TEST(DevmemProviderTest, DontneedTokensGiveBuffersBackToThePool) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 64 * KiB}}), *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  PagePool* pool = PagePool::create(rx_params(*nic, *mp)).value();
  {
    DevmemSocket sk([&](NetIov v) -> Status {
      PHYSR_ASSIGN_OR_RETURN(Netmem n, mp->netmem(v));
      return pool->put_full_netmem(n, false);
    });
    std::vector<Netmem> got;
    for (uint32_t i = 0; i < 5; ++i) {
      got.push_back(pool->alloc_netmems());
      EXPECT_EQ(sk.deliver(mp->niov(got.back()).value()), i);
    }
    const DmabufToken some[] = {{1, 3}};
    EXPECT_EQ(*sk.dontneed(some), 3u);
    EXPECT_EQ(sk.outstanding(), 2u);
    EXPECT_EQ(pool->inflight(), 5);  // back in the pool, not in the binding
    EXPECT_EQ(pool->stats().recycle.cached, 3u);
    EXPECT_EQ(bd->stats().releases, 0u);
    EXPECT_EQ(pool->alloc_netmems(), got[3]);  // the pool hands them out again
    ASSERT_TRUE(pool->recycle_direct(got[3]));
  }  // the socket's destruction gives the rest back
  EXPECT_EQ(pool->stats().recycle.cached, 6u);
  pool->destroy();
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
}

// mp_dmabuf_devmem_release_page(): WARN_ON_ONCE(refcount != 1) and the net_iov is kept.
TEST(DevmemProviderTest, ReleaseWithPpReferencesLeftIsReportedAndKept) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto bd = DevmemBinding::bind(gpu_buffer(w, {{0, 8 * KiB}}), *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  std::string report;
  PagePool* pool = PagePool::create(rx_params(*nic, *mp, &report)).value();
  const Netmem n = pool->alloc_netmems();
  PagePool::fragment_netmem(n, 2);
  EXPECT_FALSE(mp->release_netmem(*pool, n));
  EXPECT_NE(report.find("pp_ref_count 2"), std::string::npos) << report;
  EXPECT_EQ(bd->stats().releases, 0u);
  ASSERT_TRUE(pool->put_full_netmem(n, false));
  ASSERT_TRUE(pool->put_full_netmem(n, false));
  pool->destroy();
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
}

// The bad input on devmem buffers (debug mode): a double recycle, a recycle into the
// other pool sharing the binding, a put after the buffer went back to the binding, and the
// dma-buf revoked with buffers in flight: each refused with EINVAL naming the buffer and
// the rule, nothing changed, and at the end every net_iov is back in the binding.
TEST(DevmemProviderTest, BadInputOnDevmemBuffersIsRefusedWithAClearMessage) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto buf = gpu_buffer(w, {{0, 32 * KiB}});
  auto bd = DevmemBinding::bind(buf, *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  std::string report;
  PagePool* a = PagePool::create(rx_params(*nic, *mp, &report)).value();
  PagePool* b = PagePool::create(rx_params(*nic, *mp, &report)).value();
  const auto msg = [](const Status& s) { return s ? std::string("ok") : s.error().message; };
  const Netmem n = a->alloc_netmems(), k = a->alloc_netmems();
  ASSERT_TRUE(n && k);
  ASSERT_TRUE(a->recycle_direct(n));
  const PagePoolStats before = a->stats();
  Status again = a->recycle_direct(n);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EINVAL);
  EXPECT_NE(msg(again).find("double recycle: " + netmem_name(n) + " is already back in the pool"), std::string::npos) << msg(again);
  EXPECT_EQ(a->stats().recycle.cached, before.recycle.cached);
  Status wrong = b->put_full_netmem(k, false);
  ASSERT_FALSE(wrong);
  EXPECT_NE(msg(wrong).find("recycle into the wrong pool: " + netmem_name(k) + " belongs to page_pool " + std::to_string(a->id())),
            std::string::npos)
      << msg(wrong);
  EXPECT_EQ(b->inflight(), 0);
  // The provider's memory revoked with k in flight: k goes back to the binding when put,
  // after which it belongs to no pool.
  ASSERT_TRUE(buf->revoke());
  EXPECT_FALSE(a->alloc_netmems());
  ASSERT_TRUE(a->put_full_netmem(k, false));
  const DevmemStats released = bd->stats();
  Status late = a->put_full_netmem(k, false);
  ASSERT_FALSE(late);
  EXPECT_NE(msg(late).find("use after release: " + netmem_name(k) + " belongs to no page pool"), std::string::npos) << msg(late);
  EXPECT_EQ(bd->stats().releases, released.releases);
  EXPECT_EQ(bd->stats().bad_releases, 0u);
  EXPECT_EQ(a->inflight(), 0);
  a->destroy();
  b->destroy();
  EXPECT_EQ(bd->stats().avail, bd->stats().size);
  EXPECT_EQ(bd->stats().allocs, bd->stats().releases);
  EXPECT_EQ(report, "");
  EXPECT_EQ(nic->stats().live_mappings, 0u);
}

}  // namespace
}  // namespace physr::mem
