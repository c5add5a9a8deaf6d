// dma-buf and devmem under concurrency (label `concurrency`, run under TSan): a thread
// receiving into a devmem binding while another revokes the buffer, directly and through a
// page pool over the devmem memory provider, and importers mapping while the exporter moves.
#include <gtest/gtest.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/dmabuf_world.hpp"

namespace physr::mem {
namespace {

using testing::DmaBufWorld;

// Revoke during receive: the receiver allocates net_iovs, looks up their DMA addresses,
// "DMAs" a pattern into the buffer's bytes, hands them to the socket and gives them back
// with tokens, until the revoke makes the binding refuse; nothing is used after the
// revoke returned, and every net_iov comes back.
TEST(DevmemConcurrencyTest, RevokeDuringReceive) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, std::vector<DmaBufBarRange>{{0, 1 * MiB}, {2 * MiB, 1 * MiB}}).value();
  auto bd = DevmemBinding::bind(b, *nic).value();
  std::atomic<uint64_t> received{0};
  std::atomic<bool> revoked_done{false};
  std::atomic<int> used_after_revoke{0};
  std::atomic<int> stop_code{0};
  {
    DevmemSocket sk(*bd);
    std::thread rx([&] {
      std::vector<uint8_t> payload(4096, 0x5a);
      for (;;) {
        auto n = bd->alloc_netmem();
        if (!n) {
          if (n.error().code == ENOMEM) {  // the user holds everything: give some back
            const DmabufToken all[] = {{0, 1024}};
            (void)sk.dontneed(all);
            continue;
          }
          stop_code = n.error().code;
          break;
        }
        const bool after = revoked_done.load();
        auto d = bd->dma_addr(*n);
        auto p = bd->phys_addr(*n);
        if (!d || !p) {
          stop_code = d ? p.error().code : d.error().code;
          (void)bd->release_netmem(*n);
          break;
        }
        if (after) ++used_after_revoke;  // a DMA address handed out after the revoke
        (void)w.mem.write(*p, payload);
        const uint32_t t = sk.deliver(*n);
        if (received.fetch_add(1) % 8 == 7) {
          const DmabufToken tk[] = {{0, t + 1}};
          (void)sk.dontneed(tk);
        }
      }
    });
    while (received.load() < 200) std::this_thread::yield();
    ASSERT_TRUE(b->revoke());
    revoked_done = true;
    rx.join();
  }
  EXPECT_EQ(stop_code.load(), ENODEV);
  EXPECT_EQ(used_after_revoke.load(), 0);
  EXPECT_TRUE(bd->revoked());
  EXPECT_EQ(bd->stats().avail, bd->stats().size);  // the socket gave everything back
  EXPECT_EQ(nic->stats().live_mappings, 0u);
}

// Revoke during receive through the provider (mp_dmabuf_devmem_alloc_netmems() behind a page
// pool): the receive thread owns the pool, allocates net_iovs, "DMAs" into their bytes and
// hands them to a consumer thread that checks and puts them back (into the ring, from
// another thread) while it also recycles some itself (into the cache); the main thread
// revokes the dma-buf. No buffer is handed out once the revoke has returned, every buffer
// comes back to the binding, and the pool's and the binding's counts agree.
// With `cached`, the receive thread pauses right after recycling a batch into its cache
// and the revoke runs then (the consumer still putting buffers back meanwhile): the revoke
// must flush what the cache holds. Without, the revoke lands wherever it lands.
void revoke_during_pool_receive(bool cached) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, std::vector<DmaBufBarRange>{{0, 256 * KiB}, {1 * MiB, 256 * KiB}}).value();
  auto bd = DevmemBinding::bind(b, *nic).value();
  auto mp = DevmemMemoryProvider::create(*bd).value();
  std::string report;
  std::mutex report_mu;
  std::atomic<PagePool*> pool{nullptr};
  std::atomic<uint64_t> received{0};
  std::atomic<bool> revoked_done{false}, rx_done{false}, rx_paused{false};
  std::atomic<int> after_revoke{0}, bad_puts{0}, bad_bytes{0};
  std::mutex qmu;
  std::deque<Netmem> q;  // received, not yet consumed
  std::thread rx([&] {
    PagePoolParams p;
    p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
    p.dev = nic.get();
    p.max_len = 4096;
    p.napi = true;  // owned by this thread: its own recycles go into the cache
    p.mp = mp.get();
    p.debug = true;
    p.report = [&](const std::string& s) {
      std::lock_guard g(report_mu);
      report += s + "\n";
    };
    PagePool* pp = PagePool::create(p).value();
    pool = pp;
    std::vector<uint8_t> payload(4096);
    std::vector<Netmem> drop;
    for (uint64_t i = 0;; ++i) {
      const bool was_revoked = revoked_done.load();  // before the allocation
      const Netmem n = pp->alloc_netmems();
      if (!n) {
        if (was_revoked) break;  // nothing more comes: the binding is gone
        std::this_thread::yield();  // everything is out with the consumer
        continue;
      }
      if (was_revoked) ++after_revoke;
      payload.assign(payload.size(), static_cast<uint8_t>(i));
      if (!w.mem.write(netmem_phys(n), payload)) ++bad_bytes;
      received.fetch_add(1);
      if (i % 3 == 0) {  // the stack drops it (page_pool_recycle_direct()), in batches: the cache holds some
        drop.push_back(n);
        if (drop.size() == 16) {
          for (Netmem d : drop)
            if (!pp->recycle_direct(d)) ++bad_puts;
          drop.clear();
          if (cached && !rx_paused.load() && received.load() >= 2000) {  // 16 in the cache now
            rx_paused = true;
            while (!revoked_done.load()) std::this_thread::yield();
          }
        }
        continue;
      }
      std::lock_guard g(qmu);
      q.push_back(n);
    }
    for (Netmem d : drop)
      if (!pp->recycle_direct(d)) ++bad_puts;
    rx_done = true;
  });
  std::thread consumer([&] {
    std::vector<uint8_t> have(4096);
    for (;;) {
      Netmem n;
      {
        std::lock_guard g(qmu);
        if (!q.empty()) {
          n = q.front();
          q.pop_front();
        }
      }
      if (!n) {
        if (rx_done.load()) {
          std::lock_guard g(qmu);
          if (q.empty()) break;
        }
        std::this_thread::yield();
        continue;
      }
      // The bytes are the receive's until the buffer goes back (a revoke does not take the
      // memory away: the BAR is still there, only the DMA mappings are gone).
      if (!w.mem.read(netmem_phys(n), have) || have[0] != have[4095]) ++bad_bytes;
      if (!pool.load()->put_full_netmem(n, false)) ++bad_puts;  // another thread: the ring
    }
  });
  if (cached) {
    while (!rx_paused.load()) std::this_thread::yield();
  } else {
    while (received.load() < 2000) std::this_thread::yield();
  }
  ASSERT_TRUE(b->revoke());
  revoked_done = true;
  rx.join();
  consumer.join();
  PagePool* pp = pool.load();
  EXPECT_EQ(after_revoke.load(), 0);
  EXPECT_EQ(bad_puts.load(), 0);
  EXPECT_EQ(bad_bytes.load(), 0);
  EXPECT_TRUE(mp->revoked());
  const PagePoolStats ps = pp->stats();
  EXPECT_GT(ps.recycle.cached, 0u);
  EXPECT_GT(ps.recycle.ring, 0u);
  // Nothing is cached any more; a buffer put into the ring while the revoke ran may still
  // sit there (a later refill would release it: dead areas are never handed out), and the
  // destroy's scrub releases it.
  pp->destroy();
  EXPECT_EQ(mp->pools(), 0u);
  const DevmemStats st = bd->stats();
  EXPECT_EQ(st.avail, st.size);  // every net_iov back in the binding
  EXPECT_EQ(st.allocs, st.releases);
  EXPECT_EQ(st.bad_releases, 0u);
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  std::lock_guard g(report_mu);
  EXPECT_EQ(report, "");
}

TEST(DevmemConcurrencyTest, RevokeDuringReceiveThroughThePagePool) { revoke_during_pool_receive(false); }
TEST(DevmemConcurrencyTest, RevokeDuringReceiveFlushesThePoolsCache) { revoke_during_pool_receive(true); }

// Importers map, check and unmap while the exporter moves the buffer back and forth; each
// mapping either stays valid until its unmap or is reported stale.
TEST(DmaBufConcurrencyTest, ImportersMapWhileTheExporterMoves) {
  DmaBufWorld w;
  auto nic = w.device(w.f_nic, true);
  auto nvme = w.device(w.f_nvme, false);
  auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, 1, std::vector<DmaBufBarRange>{{0, 64 * KiB}}).value();
  std::atomic<int> notified{0};
  DmaBufAttachOptions o;
  o.allow_peer2peer = true;
  o.move_notify = [&](DmaBufAttachment&) { ++notified; };
  std::atomic<bool> stop{false};
  std::atomic<int> stale{0}, bad{0};
  auto importer = [&](DmaDevice& dev) {
    auto a = b->attach(dev, o).value();
    while (!stop.load()) {
      auto m = a->map(DmaDirection::from_device);
      if (!m) {
        ++bad;
        continue;
      }
      const Status c = a->check(*m);
      if (!c && c.error().code == ESTALE) ++stale;
      else if (!c) ++bad;
      if (!a->unmap(*m)) ++bad;
    }
    if (!a->detach()) ++bad;
  };
  std::thread t1(importer, std::ref(*nic)), t2(importer, std::ref(*nvme));
  const uint64_t p = b->provider();
  for (int i = 0; i < 200; ++i) {
    RangeList to;
    ASSERT_TRUE(to.append(PhysRange{PhysAddr(DmaBufWorld::kGpuBar + (i % 2 ? 0 : 1 * MiB)), 64 * KiB, static_cast<ProviderId>(p)}));
    ASSERT_TRUE(b->move(to));
  }
  stop = true;
  t1.join();
  t2.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(b->stats().mappings, 0u);
  EXPECT_EQ(b->stats().attachments, 0u);
  EXPECT_EQ(nic->stats().live_mappings, 0u);
  (void)stale;
  (void)notified;
}

}  // namespace
}  // namespace physr::mem
