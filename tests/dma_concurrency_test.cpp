#include "physr/dma.hpp"
#include "physr/physmem.hpp"
#include "support/dma_world.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

namespace physr {
namespace {

// Both cores bounce their own buffers through one pool: every round trip returns exactly
// the device's bytes, and the pool ends empty.
TEST(BounceConcurrencyTest, ThreadsBounceIndependently) {
  PhysMemory mem;
  ASSERT_TRUE(mem.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  auto pool = std::move(BouncePool::create(mem, BounceOptions{PhysAddr(512 * MiB), 2 * MiB, 2})).value();
  std::atomic<int> errors{0};
  auto worker = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    const PhysAddr buf(seed * 64 * MiB);
    for (int i = 0; i < 2000; ++i) {
      const uint64_t n = 1 + rng() % 20000;
      std::vector<uint8_t> dev(n), back(n);
      for (auto& b : dev) b = static_cast<uint8_t>(rng());
      auto b = pool->map(buf, n, DmaDirection::from_device, 0xfff);
      if (!b) {
        if (b.error().code != ENOMEM) errors.fetch_add(1);
        continue;
      }
      if (!mem.write(*b, dev) || !pool->unmap(*b, n, DmaDirection::from_device) || !mem.read(buf, back) || back != dev)
        errors.fetch_add(1);
    }
  };
  std::thread t1(worker, 1), t2(worker, 2);
  t1.join();
  t2.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(pool->used_slots(), 0u);
}

// Three threads map and unmap mixed lists (host, bus-address P2P, P2P through the host
// bridge, bounced P2P) on three devices sharing one IOMMU domain and one bounce pool: a
// trusted one, an untrusted one keeping one IOVA per list, and an untrusted one mapping
// each range at its own IOVA (Linux iommu_dma_map_sg_swiotlb(); its P2P ranges are
// granule-aligned, as the gpu BAR may not be bounced); every byte is checked.
TEST(DmaMapConcurrencyTest, DevicesShareADomainAndAPool) {
  testing::DmaWorld w;
  auto d1 = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  auto d2 = w.device({.function = w.f_gpu, .untrusted = true, .untrusted_one_iova = true, .domain = w.domain.get()});
  auto d3 = w.device({.function = w.f_nvme, .untrusted = true, .domain = w.domain.get()});
  std::atomic<int> errors{0};
  auto worker = [&](DmaDevice* dev, uint64_t seed) {
    const bool align_p2p = dev->config().untrusted && !dev->config().untrusted_one_iova;
    std::mt19937_64 rng(seed);
    const uint64_t host_base = (2 + seed) * GiB, bar_off = seed * 4 * MiB;
    DmaMapping m;
    for (int i = 0; i < 300; ++i) {
      RangeList l;
      for (int k = 0; k < 8; ++k) {
        const uint64_t off = static_cast<uint64_t>(k) * 64 * KiB + rng() % 4096, len = 1 + rng() % 16384;
        PhysRange r{PhysAddr(host_base + off), len, kHostMemory};
        if (k % 4 == 1) r = PhysRange{PhysAddr(testing::DmaWorld::kGpuBar + bar_off + off), len, w.gpu};
        if (k % 4 == 2) r = PhysRange{PhysAddr(testing::DmaWorld::kNicBar + bar_off + off), len, w.nic};
        if (k % 4 == 3) r = PhysRange{PhysAddr(testing::DmaWorld::kFarBar + bar_off / 2 + off / 8), len, w.far};
        if (align_p2p && r.provider != kHostMemory) r = PhysRange{PhysAddr(r.base.value() & ~uint64_t{4095}), (len + 4095) & ~uint64_t{4095}, r.provider};
        if (!l.append(r)) errors.fetch_add(1);
      }
      const auto data = std::vector<uint8_t>(l.total_bytes(), static_cast<uint8_t>(rng()));
      if (auto r = dev->map_into(m, l, DmaDirection::from_device, kDmaAttrAllowBounce); !r) {
        if (r.error().code != ENOMEM && r.error().code != EREMOTEIO) errors.fetch_add(1);
        continue;
      }
      if (!w.device_write(dev->config(), m.segments(), data) || !dev->unmap(m) || w.cpu_read(l) != data) errors.fetch_add(1);
    }
  };
  std::thread t1(worker, d1.get(), 1), t2(worker, d2.get(), 2), t3(worker, d3.get(), 3);
  t1.join();
  t2.join();
  t3.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(w.pool->used_slots(), 0u);
  EXPECT_EQ(w.domain->stats().mapped_4k, 0u);
  EXPECT_EQ(d1->stats().live_mappings + d2->stats().live_mappings + d3->stats().live_mappings, 0u);
  EXPECT_GT(d1->stats().maps + d2->stats().maps, 300u);
  EXPECT_GT(d3->stats().maps, 150u);
}

}  // namespace
}  // namespace physr
