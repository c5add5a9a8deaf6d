// dma-buf and devmem under concurrency (label `concurrency`, run under TSan): a thread
// receiving into a devmem binding while another revokes the buffer, and importers mapping
// while the exporter moves.
#include <gtest/gtest.h>

#include <atomic>
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
