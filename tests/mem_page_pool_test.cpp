// Page pools (physr/mem/page_pool.hpp) and netmem handles (physr/mem/netmem.hpp): the rules
// of net/core/page_pool.c (init, the alloc cache and its refills, recycling, DMA map and
// sync, fragments, inflight, deferred destroy), the memory providers (host memory, device
// memory from a P2P pool, as net/core/devmem.c's), and bad input.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/page_pool_world.hpp"

namespace physr::mem {
namespace {

using physr::testing::PagePoolWorld;

PagePoolParams host_params(PagePoolWorld& pw) {
  PagePoolParams p;
  p.pages = pw.pages.get();
  p.report = [](const std::string&) {};
  return p;
}

PagePool* make(PagePoolParams p) {
  auto r = PagePool::create(std::move(p));
  EXPECT_TRUE(r) << r.error().to_string();
  return r ? *r : nullptr;
}

// Destroys a pool whose buffers are all back (freed at once, disconnect called).
void destroy_now(PagePool* pool) {
  ASSERT_EQ(pool->inflight(), 0);
  pool->destroy();
}

// ---------------------------------------------------------------------------------------
// netmem handles

TEST(NetmemTest, HandleIsEightBytesWithTheNetIovBit) {
  static_assert(sizeof(Netmem) == 8);
  const Netmem a = Netmem::make(true, 7, 12345);
  EXPECT_TRUE(a.is_net_iov());
  EXPECT_EQ(a.raw() & 1, 1u);  // include/net/netmem.h NET_IOV
  EXPECT_EQ(a.area_id(), 7u);
  EXPECT_EQ(a.index(), 12345u);
  const Netmem b = Netmem::make(false, 7, 12345);
  EXPECT_FALSE(b.is_net_iov());
  EXPECT_FALSE(Netmem{});
}

TEST(NetmemTest, MetadataIsFoundFromTheHandleAndFromProviderAndAddress) {
  auto area = NetIovArea::create({.count = 256, .base = PhysAddr(0x40'0000'0000), .provider = 5, .name = "bar"}).value();
  const Netmem n = area->netmem(17);
  EXPECT_EQ(netmem_area(n), area.get());
  EXPECT_EQ(&netmem_meta(n), &area->meta(17));
  EXPECT_EQ(netmem_phys(n), PhysAddr(0x40'0000'0000 + 17 * kPageSize));
  auto found = netmem_find(5, PhysAddr(0x40'0000'0000 + 17 * kPageSize + 100));
  ASSERT_TRUE(found) << found.error().to_string();
  EXPECT_EQ(*found, n);
  EXPECT_EQ(netmem_find(5, PhysAddr(0x40'0000'0000 + 256 * kPageSize)).error().code, ENOENT);
  EXPECT_EQ(netmem_find(6, PhysAddr(0x40'0000'0000)).error().code, ENOENT);
  EXPECT_EQ(NetIovArea::create({.count = 0}).error().code, EINVAL);
  EXPECT_EQ(NetIovArea::create({.count = 1, .base = PhysAddr(0x1001)}).error().code, EINVAL);
  EXPECT_NE(netmem_name(n).find("bar #17"), std::string::npos) << netmem_name(n);
  area.reset();
  EXPECT_EQ(netmem_area(n), nullptr);  // a destroyed area's handles decode to nothing
  EXPECT_EQ(netmem_find(5, PhysAddr(0x40'0000'0000)).error().code, ENOENT);
}

// ---------------------------------------------------------------------------------------
// page_pool_init()

TEST(PagePoolTest, CreateFollowsPagePoolInitRules) {
  PagePoolWorld pw;
  auto with = [&](auto edit) {
    PagePoolParams p = host_params(pw);
    p.dev = pw.nic.get();
    edit(p);
    return PagePool::create(std::move(p));
  };
  // PP_FLAG_DMA_MAP: DMA_FROM_DEVICE or DMA_BIDIRECTIONAL only.
  EXPECT_EQ(with([](PagePoolParams& p) { p.flags = kPPFlagDmaMap; p.dma_dir = DmaDirection::to_device; }).error().code, EINVAL);
  EXPECT_EQ(with([](PagePoolParams& p) { p.flags = kPPFlagDmaMap; p.dma_dir = DmaDirection::none; }).error().code, EINVAL);
  // PP_FLAG_DMA_SYNC_DEV needs DMA_MAP and max_len.
  EXPECT_EQ(with([](PagePoolParams& p) { p.flags = kPPFlagDmaSyncDev; p.max_len = 4096; }).error().code, EINVAL);
  auto no_len = with([](PagePoolParams& p) { p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev; });
  ASSERT_FALSE(no_len);
  EXPECT_EQ(no_len.error().code, EINVAL);
  EXPECT_NE(no_len.error().message.find("max_len 0"), std::string::npos) << no_len.error().message;
  // physr: offset + max_len must fit the page.
  EXPECT_EQ(with([](PagePoolParams& p) {
              p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
              p.offset = 256;
              p.max_len = 4096 - 255;
            }).error().code,
            EINVAL);
  EXPECT_EQ(with([](PagePoolParams& p) { p.order = 11; }).error().code, EINVAL);  // MAX_PAGE_ORDER
  EXPECT_EQ(with([](PagePoolParams& p) { p.pages = nullptr; }).error().code, EINVAL);
  EXPECT_EQ(with([](PagePoolParams& p) { p.flags = PagePoolFlags::from_bits(4); }).error().code, EINVAL);
  EXPECT_EQ(with([](PagePoolParams& p) { p.flags = kPPFlagDmaMap; p.dev = nullptr; }).error().code, EINVAL);

  // The ring: 1024 by default, pool_size up to 16384 (min(pool_size, 16384)).
  for (const auto& size : {std::pair{0u, 1024u}, {5000u, 5000u}, {16384u, 16384u}, {40000u, 16384u}}) {
    PagePoolParams p = host_params(pw);
    p.pool_size = size.first;
    PagePool* pool = make(p);
    ASSERT_NE(pool, nullptr);
    EXPECT_EQ(pool->ring_size(), size.second) << size.first;
    destroy_now(pool);
  }
  PagePool* sync = make([&] {
    PagePoolParams p = host_params(pw);
    p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
    p.dev = pw.nic.get();
    p.max_len = 4096;
    p.dma_dir = DmaDirection::bidirectional;
    return p;
  }());
  ASSERT_NE(sync, nullptr);
  EXPECT_TRUE(sync->dma_sync());
  destroy_now(sync);
}

// page_pool_init() with a memory provider: DMA map and sync or EOPNOTSUPP; then the
// provider's init: order 0 or E2BIG (mp_dmabuf_devmem_init()).
TEST(PagePoolTest, AProviderNeedsDmaMapAndSyncAndOrderZero) {
  PagePoolWorld pw;
  auto dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 64 * KiB).value();
  PagePoolParams p;
  p.mp = dev.get();
  p.dev = pw.nic.get();
  p.flags = kPPFlagDmaMap;
  EXPECT_EQ(PagePool::create(p).error().code, EOPNOTSUPP);
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.max_len = 4096;
  p.order = 1;
  auto big = PagePool::create(p);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, E2BIG);
  p.order = 0;
  p.flags = kPPFlagDmaSyncDev;
  EXPECT_EQ(PagePool::create(p).error().code, EINVAL);  // sync without map: page_pool's own check first
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);          // failures leave nothing mapped
}

// ---------------------------------------------------------------------------------------
// The alloc cache, the ring and the slow path

// __page_pool_alloc_netmems_slow(): 64 at once, the last returned; __page_pool_get_cached()
// serves the rest; an empty ring is counted before the next slow allocation.
TEST(PagePoolTest, SlowPathBulkAllocatesSixtyFourThenTheCacheServes) {
  PagePoolWorld pw;
  PagePool* pool = make(host_params(pw));
  std::vector<Netmem> got;
  got.push_back(pool->alloc_netmems());
  ASSERT_TRUE(got[0]);
  EXPECT_FALSE(got[0].is_net_iov());
  EXPECT_EQ(pool->stats().alloc.slow, 1u);
  EXPECT_EQ(pool->stats().alloc.empty, 1u);  // the refill found the ring empty first
  EXPECT_EQ(pool->cache_count(), 63u);
  EXPECT_EQ(pool->inflight(), 64);  // hold counts at allocation from the page allocator
  EXPECT_EQ(pw.pages->allocated_pages(), 64u);
  for (int i = 0; i < 63; ++i) got.push_back(pool->alloc_netmems());
  EXPECT_EQ(pool->stats().alloc.fast, 63u);
  EXPECT_EQ(pool->stats().alloc.empty, 1u);
  got.push_back(pool->alloc_netmems());
  PagePoolStats s = pool->stats();
  EXPECT_EQ(s.alloc.empty, 2u);  // page_pool_refill_alloc_cache() found the ring empty again
  EXPECT_EQ(s.alloc.slow, 2u);
  EXPECT_EQ(pool->inflight(), 128);
  std::set<uint64_t> distinct;
  for (Netmem n : got) distinct.insert(n.raw());
  EXPECT_EQ(distinct.size(), got.size());
  for (Netmem n : got) ASSERT_TRUE(pool->put_full_netmem(n, true));
  EXPECT_EQ(pool->stats().recycle.cached, 65u);
  pool->destroy();  // the caches are emptied into the page allocator
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// page_pool_put_unrefed_netmem(): into the cache only with allow_direct (or from the owning
// thread) and while it holds fewer than 128; else the ring; a full ring releases.
TEST(PagePoolTest, RecyclingRulesCacheThenRingThenRelease) {
  PagePoolWorld pw;
  PagePoolParams p = host_params(pw);
  p.pool_size = 4;  // a ring of 4 (batch 1: 16 is more than half of it)
  PagePool* pool = make(p);
  std::vector<Netmem> out;
  for (int i = 0; i < 200; ++i) out.push_back(pool->alloc_netmems());
  ASSERT_EQ(pool->cache_count(), 56u);  // 256 allocated, 200 handed out
  // Not direct, not the owner: the ring, 4 of them; then ring_full releases.
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(pool->put_full_netmem(out[i], false));
  PagePoolStats s = pool->stats();
  EXPECT_EQ(s.recycle.ring, 4u);
  EXPECT_EQ(s.recycle.ring_full, 2u);
  EXPECT_EQ(s.recycle.cached, 0u);
  EXPECT_EQ(pool->ring_count(), 4u);
  EXPECT_EQ(pool->inflight(), 254);  // two released to the page allocator
  EXPECT_EQ(pw.pages->allocated_pages(), 254u);
  // Direct: the cache, until it holds 128; then cache_full and the ring (full: released).
  for (int i = 6; i < 6 + 72; ++i) ASSERT_TRUE(pool->recycle_direct(out[i]));
  EXPECT_EQ(pool->cache_count(), 128u);
  EXPECT_EQ(pool->stats().recycle.cached, 72u);
  ASSERT_TRUE(pool->recycle_direct(out[78]));
  s = pool->stats();
  EXPECT_EQ(s.recycle.cache_full, 1u);
  EXPECT_EQ(s.recycle.ring_full, 3u);
  EXPECT_EQ(pool->inflight(), 253);
  // The owning thread (page_pool_napi_local()) recycles into the cache without
  // allow_direct once it has room.
  std::vector<Netmem> more;
  for (int i = 0; i < 128; ++i) more.push_back(pool->alloc_netmems());  // cache empty, ring untouched
  EXPECT_EQ(pool->ring_count(), 4u);
  pool->enable_direct_recycling();
  ASSERT_TRUE(pool->put_full_netmem(out[79], false));
  EXPECT_EQ(pool->stats().recycle.cached, 73u);
  pool->disable_direct_recycling();
  ASSERT_TRUE(pool->put_full_netmem(out[80], false));
  EXPECT_EQ(pool->stats().recycle.cached, 73u);  // not the owner any more: the ring (full)
  EXPECT_EQ(pool->stats().recycle.ring_full, 4u);
  // The rest go back; destroy releases the caches.
  for (size_t i = 81; i < out.size(); ++i) ASSERT_TRUE(pool->put_full_netmem(out[i], true));
  for (Netmem n : more) ASSERT_TRUE(pool->put_full_netmem(n, true));
  EXPECT_EQ(pool->inflight(), static_cast<int32_t>(pool->cache_count() + pool->ring_count()));
  pool->destroy();
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// params.napi: the creating thread owns the pool; another thread's recycle goes to the ring.
TEST(PagePoolTest, NapiOwnerRecyclesDirectOthersIntoTheRing) {
  PagePoolWorld pw;
  PagePoolParams p = host_params(pw);
  p.napi = true;
  PagePool* pool = make(p);
  const Netmem a = pool->alloc_netmems(), b = pool->alloc_netmems();
  ASSERT_TRUE(pool->put_full_netmem(a, false));
  EXPECT_EQ(pool->stats().recycle.cached, 1u);
  std::thread([&] { ASSERT_TRUE(pool->put_full_netmem(b, false)); }).join();
  EXPECT_EQ(pool->stats().recycle.ring, 1u);
  EXPECT_EQ(pool->ring_count(), 1u);
  pool->destroy();
}

// page_pool_refill_alloc_cache(): up to 64 from the ring, counted once as refill.
TEST(PagePoolTest, RefillTakesUpToSixtyFourFromTheRing) {
  PagePoolWorld pw;
  PagePool* pool = make(host_params(pw));
  std::vector<Netmem> out;
  for (int i = 0; i < 128; ++i) out.push_back(pool->alloc_netmems());
  ASSERT_EQ(pool->cache_count(), 0u);
  for (Netmem n : out) ASSERT_TRUE(pool->put_full_netmem(n, false));
  EXPECT_EQ(pool->ring_count(), 128u);
  const Netmem first = pool->alloc_netmems();
  ASSERT_TRUE(first);
  EXPECT_EQ(first, out[63]);  // the 64th consumed is returned (cache[--count])
  PagePoolStats s = pool->stats();
  EXPECT_EQ(s.alloc.refill, 1u);
  EXPECT_EQ(pool->cache_count(), 63u);
  EXPECT_EQ(pool->ring_count(), 64u);
  EXPECT_EQ(pool->inflight(), 128);  // nothing new from the page allocator
  ASSERT_TRUE(pool->recycle_direct(first));
  pool->destroy();
}

// __page_pool_put_page(): a page with references beyond the pool's is released
// (released_refcnt), not recycled.
TEST(PagePoolTest, APageWithExtraReferencesIsReleased) {
  PagePoolWorld pw;
  PagePool* pool = make(host_params(pw));
  const Netmem n = pool->alloc_netmems();
  pw.pages->get_page(n);  // someone else holds the page too
  ASSERT_TRUE(pool->recycle_direct(n));
  EXPECT_EQ(pool->stats().recycle.released_refcnt, 1u);
  EXPECT_EQ(pool->stats().recycle.cached, 0u);
  EXPECT_EQ(pool->inflight(), 63);
  pool->destroy();
  EXPECT_EQ(pw.pages->allocated_pages(), 1u);  // the other reference keeps it
  pw.pages->put_page(n);
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// ---------------------------------------------------------------------------------------
// DMA: mapping at allocation, sync for device up to max_len, unmapping at release

TEST(PagePoolTest, DmaMapAtAllocationUnmapAtRelease) {
  PagePoolWorld pw;
  PagePoolParams p = host_params(pw);
  p.flags = kPPFlagDmaMap;
  p.dev = pw.nic.get();
  PagePool* pool = make(p);
  const Netmem n = pool->alloc_netmems();
  EXPECT_EQ(pw.nic->stats().live_mappings, 64u);  // page_pool_dma_map() for each of the bulk
  EXPECT_EQ(PagePool::dma_addr(n).value(), netmem_phys(n).value());  // direct, no offset
  EXPECT_FALSE(pool->dma_sync());
  ASSERT_TRUE(pool->recycle_direct(n));
  EXPECT_EQ(pw.nic->stats().live_mappings, 64u);  // kept while in the pool
  pool->destroy();
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);
  EXPECT_TRUE(pw.nic->debug_live().empty());
}

// page_pool_dma_sync_for_device(): at mapping (max_len) and on every recycle with
// DMA_SYNC_DEV; none without it; page_pool_dma_sync_netmem_for_cpu().
TEST(PagePoolTest, SyncForDeviceOnRecycleOnlyWithSyncDev) {
  PagePoolWorld pw;
  for (const bool sync : {false, true}) {
    PagePoolParams p = host_params(pw);
    p.flags = sync ? kPPFlagDmaMap | kPPFlagDmaSyncDev : kPPFlagDmaMap;
    p.dev = pw.nic_nc.get();
    p.max_len = 2048;
    p.offset = 64;
    PagePool* pool = make(p);
    const uint64_t before = pw.nic_nc->stats().cache_maintenance;
    const Netmem n = pool->alloc_netmems();
    const uint64_t mapped = pw.nic_nc->stats().cache_maintenance;
    EXPECT_EQ(mapped - before, sync ? 64u : 0u) << sync;  // one sync per mapped page
    ASSERT_TRUE(pool->put_netmem(n, 100, true));
    EXPECT_EQ(pw.nic_nc->stats().cache_maintenance - mapped, sync ? 1u : 0u) << sync;
    const Netmem m = pool->alloc_netmems();
    pool->dma_sync_for_cpu(m, 0, 1500);
    EXPECT_EQ(pw.nic_nc->stats().cache_maintenance - mapped, sync ? 2u : 1u) << sync;
    ASSERT_TRUE(pool->recycle_direct(m));
    pool->destroy();
    EXPECT_EQ(pw.nic_nc->stats().live_mappings, 0u);
  }
}

// ---------------------------------------------------------------------------------------
// Fragments (page_pool_alloc_frag_netmem(), page_pool_drain_frag(), pp_ref_count)

TEST(PagePoolTest, FragmentsShareAPageUntilTheLastReferenceRecyclesIt) {
  PagePoolWorld pw;
  PagePool* pool = make(host_params(pw));
  uint32_t off[4];
  const Netmem a = pool->alloc_frag(&off[0], 1500);
  const Netmem b = pool->alloc_frag(&off[1], 1500);
  ASSERT_TRUE(a);
  EXPECT_EQ(a, b);
  EXPECT_EQ(off[0], 0u);
  EXPECT_EQ(off[1], 1500u);
  // 3000 + 1500 > 4096: the page is drained (two users still hold it) and a new one starts.
  const Netmem c = pool->alloc_frag(&off[2], 1500);
  EXPECT_NE(c, a);
  EXPECT_EQ(off[2], 0u);
  EXPECT_EQ(netmem_meta(a).pp_ref_count.load(), 2);
  ASSERT_TRUE(pool->put_full_netmem(a, true));  // one fragment: the page stays out
  EXPECT_EQ(pool->stats().recycle.cached, 0u);
  ASSERT_TRUE(pool->put_full_netmem(b, true));  // the last: recycled
  EXPECT_EQ(pool->stats().recycle.cached, 1u);
  EXPECT_EQ(netmem_meta(a).pp_ref_count.load(), 1);
  EXPECT_EQ(pool->alloc_frag(&off[3], 5000), Netmem{});  // more than the page
  // page_pool_alloc_netmem(): more than half a page is a whole page; a small one is a
  // fragment, the page's last one gets the rest.
  uint32_t o = 7, size = 3000;
  const Netmem whole = pool->alloc_netmem(&o, &size);
  EXPECT_EQ(size, 4096u);
  EXPECT_EQ(o, 0u);
  size = 1500;
  const Netmem f = pool->alloc_netmem(&o, &size);  // on c's page, after c's 1500
  EXPECT_EQ(f, c);
  EXPECT_EQ(o, 1500u);
  EXPECT_EQ(size, 4096u - 1500u);  // 3000 + 1500 would not fit: the rest of the page
  ASSERT_TRUE(pool->recycle_direct(whole));
  ASSERT_TRUE(pool->recycle_direct(c));
  ASSERT_TRUE(pool->recycle_direct(f));
  pool->destroy();  // page_pool_free_frag() drops the pool's bias on c's page
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// ---------------------------------------------------------------------------------------
// Destroy with buffers out (page_pool_release_retry())

struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> reports;
  bool disconnected = false;
  void report(const std::string& s) {
    std::lock_guard g(mu);
    reports.push_back(s);
    cv.notify_all();
  }
  void disconnect() {
    std::lock_guard g(mu);
    disconnected = true;
    cv.notify_all();
  }
  template <class Pred>
  bool wait(Pred pred) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(30), pred);
  }
};

TEST(PagePoolTest, DestroyWithBuffersOutIsDeferredAndReportsThemStalled) {
  PagePoolWorld pw;
  Waiter w;
  PagePoolParams p = host_params(pw);
  p.flags = kPPFlagDmaMap;
  p.dev = pw.nic.get();
  p.name = "rxq 3";
  p.report = [&](const std::string& s) { w.report(s); };
  p.disconnect = [&] { w.disconnect(); };
  p.defer_time = std::chrono::milliseconds(2);
  p.defer_warn = std::chrono::milliseconds(0);
  PagePool* pool = make(p);
  const Netmem a = pool->alloc_netmems(), b = pool->alloc_netmems();
  EXPECT_EQ(pool->inflight(), 64);
  pool->destroy();
  // The caches went back; the two out stay counted and are named in the report.
  ASSERT_TRUE(w.wait([&] { return !w.reports.empty(); }));
  {
    std::lock_guard g(w.mu);
    const std::string& r = w.reports[0];
    EXPECT_NE(r.find("page_pool_release_retry() stalled pool shutdown: id"), std::string::npos) << r;
    EXPECT_NE(r.find(", 2 inflight"), std::string::npos) << r;
    EXPECT_NE(r.find("rxq 3"), std::string::npos) << r;
    EXPECT_NE(r.find(netmem_name(a)), std::string::npos) << r;
    EXPECT_NE(r.find(netmem_name(b)), std::string::npos) << r;
    EXPECT_FALSE(w.disconnected);
  }
  EXPECT_EQ(pw.pages->allocated_pages(), 2u);
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);  // page_pool_scrub() unmapped the pages out too
  ASSERT_TRUE(pool->put_full_netmem(a, false));
  std::thread([&] { ASSERT_TRUE(pool->put_full_netmem(b, false)); }).join();
  ASSERT_TRUE(w.wait([&] { return w.disconnected; }));
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);
}

TEST(PagePoolTest, DestroyWithEverythingBackFreesAtOnce) {
  PagePoolWorld pw;
  bool disconnected = false;
  PagePoolParams p = host_params(pw);
  p.disconnect = [&] { disconnected = true; };
  PagePool* pool = make(p);
  ASSERT_TRUE(pool->recycle_direct(pool->alloc_netmems()));
  pool->destroy();
  EXPECT_TRUE(disconnected);
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// ---------------------------------------------------------------------------------------
// Bad input (debug mode): refused with EINVAL, counters unchanged

TEST(PagePoolTest, DoubleRecycleIsRefusedAndChangesNothing) {
  PagePoolWorld pw;
  PagePool* pool = make(host_params(pw));
  const Netmem n = pool->alloc_netmems();
  ASSERT_TRUE(pool->recycle_direct(n));
  const PagePoolStats before = pool->stats();
  const uint32_t cached = pool->cache_count();
  auto again = pool->recycle_direct(n);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EINVAL);
  EXPECT_NE(again.error().message.find("double recycle"), std::string::npos) << again.error().message;
  EXPECT_EQ(pool->cache_count(), cached);
  EXPECT_EQ(pool->stats().recycle.cached, before.recycle.cached);
  EXPECT_EQ(pool->inflight(), 64);
  pool->destroy();
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

TEST(PagePoolTest, RecycleIntoTheWrongPoolIsRefused) {
  PagePoolWorld pw;
  PagePool* a = make(host_params(pw));
  PagePool* b = make(host_params(pw));
  const Netmem n = a->alloc_netmems();
  auto wrong = b->recycle_direct(n);
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error().code, EINVAL);
  EXPECT_NE(wrong.error().message.find("wrong pool"), std::string::npos) << wrong.error().message;
  EXPECT_NE(wrong.error().message.find("belongs to page_pool " + std::to_string(a->id())), std::string::npos);
  EXPECT_EQ(b->inflight(), 0);
  EXPECT_EQ(b->stats().recycle.cached, 0u);
  ASSERT_TRUE(a->recycle_direct(n));
  a->destroy();
  b->destroy();
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

TEST(PagePoolTest, UseAfterReleaseIsRefused) {
  PagePoolWorld pw;
  PagePoolParams p = host_params(pw);
  p.pool_size = 2;
  PagePool* pool = make(p);
  std::vector<Netmem> out;
  for (int i = 0; i < 64; ++i) out.push_back(pool->alloc_netmems());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(pool->put_full_netmem(out[i], false));  // the third: ring full, released
  EXPECT_EQ(pool->stats().recycle.ring_full, 1u);
  const int32_t inflight = pool->inflight();
  auto late = pool->put_full_netmem(out[2], false);
  ASSERT_FALSE(late);
  EXPECT_NE(late.error().message.find("use after release"), std::string::npos) << late.error().message;
  EXPECT_EQ(pool->inflight(), inflight);
  // A handle whose memory is gone altogether.
  auto gone = pool->put_full_netmem(Netmem::make(true, Netmem::kMaxAreas - 1, 0), false);
  ASSERT_FALSE(gone);
  EXPECT_NE(gone.error().message.find("its memory is gone"), std::string::npos) << gone.error().message;
  for (int i = 3; i < 64; ++i) ASSERT_TRUE(pool->recycle_direct(out[i]));
  pool->destroy();
  EXPECT_EQ(pw.pages->allocated_pages(), 0u);
}

// ---------------------------------------------------------------------------------------
// Memory providers

// Device memory from the GPU's P2P pool for the NIC under the same switch: net_iovs with
// bus addresses, no DMA sync (mp_dmabuf_devmem_init()), found from provider and address.
TEST(PagePoolTest, DeviceMemoryProviderHandsOutNetIovsOfTheGpuBar) {
  PagePoolWorld pw;
  auto dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 256 * KiB).value();
  PagePoolParams p;
  p.mp = dev.get();
  p.dev = pw.nic.get();
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.max_len = 4096;
  PagePool* pool = make(p);
  ASSERT_NE(pool, nullptr);
  EXPECT_FALSE(pool->dma_sync());  // the provider turned it off
  EXPECT_EQ(pw.nic->stats().live_mappings, 1u);  // one mapping of the whole chunk
  std::vector<Netmem> out;
  for (int i = 0; i < 64; ++i) {
    const Netmem n = pool->alloc_netmems();
    ASSERT_TRUE(n);
    EXPECT_TRUE(n.is_net_iov());
    EXPECT_TRUE(dev->chunk().span.contains(PhysSpan{netmem_phys(n), kPageSize}));
    EXPECT_TRUE(DmaSegFlags::from_bits(netmem_meta(n).dma_flags) & kDmaSegBusAddr);
    EXPECT_EQ(netmem_find(dev->chunk().provider, netmem_phys(n)).value(), n);
    out.push_back(n);
  }
  EXPECT_EQ(pool->inflight(), 64);  // net_mp_niov_set_page_pool() counts each
  EXPECT_EQ(pool->alloc_netmems(), Netmem{});  // the chunk's 64 buffers are all out
  EXPECT_EQ(dev->outstanding(), 64u);
  for (Netmem n : out) ASSERT_TRUE(pool->recycle_direct(n));
  const Netmem again = pool->alloc_netmems();  // recycled, not from the provider
  EXPECT_EQ(again, out.back());
  ASSERT_TRUE(pool->recycle_direct(again));
  pool->destroy();
  EXPECT_EQ(dev->outstanding(), 0u);  // mp_dmabuf_devmem_release_page() for each
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);
}

// The far device (another host bridge, not allowlisted) cannot reach the GPU: the
// provider's mapping fails and so does the pool.
TEST(PagePoolTest, DeviceMemoryTheDeviceCannotReachIsEremoteio) {
  PagePoolWorld pw;
  auto dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 64 * KiB).value();
  PagePoolParams p;
  p.mp = dev.get();
  p.dev = pw.far.get();
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.max_len = 4096;
  auto r = PagePool::create(p);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EREMOTEIO) << r.error().to_string();
  EXPECT_EQ(DeviceMemoryProvider::create(*pw.p2p, pw.w.nvme, 4096).error().code, ENODEV);  // no P2P memory
}

TEST(PagePoolTest, HostMemoryProviderKeepsSyncAndServesOnePoolAtATime) {
  PagePoolWorld pw;
  auto host = HostMemoryProvider::create(PhysSpan{PhysAddr(0x2'0000'0000), 1 * MiB}).value();
  PagePoolParams p;
  p.mp = host.get();
  p.dev = pw.nic_nc.get();
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.max_len = 1024;
  PagePool* pool = make(p);
  ASSERT_NE(pool, nullptr);
  EXPECT_TRUE(pool->dma_sync());
  EXPECT_EQ(PagePool::create(p).error().code, EBUSY);
  const Netmem n = pool->alloc_netmems();
  ASSERT_TRUE(n.is_net_iov());
  EXPECT_EQ(PagePool::dma_addr(n).value(), netmem_phys(n).value());
  const uint64_t before = pw.nic_nc->stats().cache_maintenance;
  ASSERT_TRUE(pool->recycle_direct(n));
  EXPECT_EQ(pw.nic_nc->stats().cache_maintenance, before + 1);
  pool->destroy();
  EXPECT_EQ(host->outstanding(), 0u);
  EXPECT_EQ(pw.nic_nc->stats().live_mappings, 0u);
}

// Provider removal with buffers in flight: new allocations stop, cached buffers are
// dropped, buffers coming back are released instead of recycled, P2P removal waits
// (EBUSY) until they are all back and the pool is gone, then the chunk is freed.
TEST(PagePoolTest, ProviderRemovedWhileBuffersAreInFlight) {
  PagePoolWorld pw;
  auto dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 64 * KiB).value();
  pw.p2p->on_revoke(pw.w.gpu, [&](const P2PChunk&) { dev->revoke(); });
  PagePoolParams p;
  p.mp = dev.get();
  p.dev = pw.nic.get();
  p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  p.max_len = 4096;
  PagePool* pool = make(p);
  std::vector<Netmem> out;
  for (int i = 0; i < 16; ++i) out.push_back(pool->alloc_netmems());
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(pool->recycle_direct(out[i]));  // cached
  for (int i = 8; i < 12; ++i) ASSERT_TRUE(pool->put_full_netmem(out[i], false));  // ring
  auto removed = pw.p2p->remove(pw.w.gpu);
  ASSERT_FALSE(removed);
  EXPECT_EQ(removed.error().code, EBUSY);  // the chunk is still held, and the error says so
  EXPECT_NE(removed.error().message.find("still has 1 chunk(s) held; they must be freed first"), std::string::npos)
      << removed.error().message;
  EXPECT_TRUE(dev->revoked());
  EXPECT_EQ(pool->alloc_netmems(), Netmem{});  // the cache and ring of the dead area dropped
  EXPECT_EQ(pool->inflight(), 4);
  EXPECT_EQ(dev->outstanding(), 4u);
  for (int i = 12; i < 16; ++i) ASSERT_TRUE(pool->recycle_direct(out[i]));  // released, not cached
  EXPECT_EQ(pool->cache_count(), 0u);
  EXPECT_EQ(pool->inflight(), 0);
  EXPECT_FALSE(dev->chunk_freed());  // still bound to the pool (mapped)
  pool->destroy();
  EXPECT_TRUE(dev->chunk_freed());
  EXPECT_EQ(pw.nic->stats().live_mappings, 0u);
  ASSERT_TRUE(pw.p2p->remove(pw.w.gpu));  // finishes now
}

}  // namespace
}  // namespace physr::mem
