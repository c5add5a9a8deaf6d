// Op-stream fuzzer for the DMA mapping layer: a byte stream picks a device (direct or
// IOMMU, masks, limits, trusted or not) and drives map / unmap / sync / map_phys /
// unmap_phys with lists mixing host memory and every kind of P2P provider. Invariants:
// only the documented errors, every mapped list reaches exactly the CPU's bytes, limits
// hold, a failed map leaves nothing behind, bad unmaps are refused, and after unmapping
// everything no page-table entry, IOVA or bounce slot is left.
#include <memory>
#include <vector>

#include "fuzz_check.hpp"
#include "physr/dma.hpp"
#include "support/dma_world.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  using testing::DmaWorld;
  static DmaWorld* w = new DmaWorld();  // built once: parsing the machine is the slow part
  static const uint64_t iova_free = [] {
    w->domain->iova().flush_caches();
    return w->domain->iova().stats().free_granules;
  }();
  if (size < 3) return 0;
  size_t i = 0;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  DmaDeviceConfig c;
  const uint64_t cfg = byte() | byte() << 8;
  c.function = std::vector<uint32_t>{w->f_nvme, w->f_gpu, w->f_nic, w->f_far}[cfg % 4];
  c.domain = (cfg >> 2) & 1 ? w->domain.get() : nullptr;
  c.dma_mask = (cfg >> 3) & 1 ? 0xffffffff : ~uint64_t{0};
  c.max_segment = std::vector<uint64_t>{512, 4096, 0x10000, 0xffff}[(cfg >> 4) % 4];
  c.seg_boundary_mask = std::vector<uint64_t>{0xfff, 0x7fff, 0xffffffff, ~uint64_t{0}}[(cfg >> 6) % 4];
  c.untrusted = (cfg >> 8) & 1;
  c.coherent = (cfg >> 9) & 1;
  c.min_align_mask = (cfg >> 10) & 1 ? 0xfff : 0;
  c.debug = (cfg >> 11) & 1;
  c.untrusted_one_iova = (cfg >> 12) & 1;
  c.force_bounce = !c.domain && ((cfg >> 13) & 1);
  auto dev = std::move(DmaDevice::create(w->env(), c)).value();
  std::vector<DmaMapping> live;
  std::vector<std::pair<DmaSegment, DmaDirection>> phys;
  const DmaDirection dirs[] = {DmaDirection::to_device, DmaDirection::from_device, DmaDirection::bidirectional, DmaDirection::none};
  auto piece = [&]() {
    const uint64_t kind = byte() % 5, page = byte() << 8 | byte(), len = 1 + (byte() << 8 | byte()) % (96 * KiB);
    const uint64_t off = page * 4096 % (8 * MiB) + byte() * 16;
    switch (kind) {
      case 0: return PhysRange{PhysAddr(DmaWorld::kGpuBar + off), len, w->gpu};
      case 1: return PhysRange{PhysAddr(DmaWorld::kNicBar + off), len, w->nic};
      case 2: return PhysRange{PhysAddr(DmaWorld::kFarBar + off), len, byte() & 1 ? w->far : kIndirectProvider};
      default: return PhysRange{PhysAddr((byte() & 1 ? 1 * GiB : 5 * GiB) + off), len, kHostMemory};
    }
  };
  while (i < size) {
    const uint64_t op = byte() % 6;
    const DmaDirection dir = dirs[byte() % 4];
    const DmaAttrs attrs = DmaAttrs::from_bits(static_cast<uint32_t>(byte() % 4));
    if (op == 0 || op == 1) {
      RangeList l;
      const uint64_t n = 1 + byte() % 8;
      for (uint64_t k = 0; k < n; ++k) {
        PhysRange r = piece();
        if (r.provider == kIndirectProvider) r.provider = w->far;
        CHECK(l.append(r).has_value());
      }
      const uint64_t used = w->pool->used_slots(), leaves = w->domain->stats().mapped_4k;
      auto m = dev->map(l, dir, attrs);
      if (!m) {
        const int e = m.error().code;
        CHECK(e == EREMOTEIO || e == ENOMEM || e == EIO || (e == EINVAL && dir == DmaDirection::none));
        CHECK(w->pool->used_slots() == used && w->domain->stats().mapped_4k == leaves);
        continue;
      }
      CHECK(dir != DmaDirection::none);
      uint64_t total = 0;
      for (const DmaSegment& s : m->segments()) {
        total += s.len;
        CHECK(s.len <= c.max_segment);
        CHECK(c.seg_boundary_mask == ~uint64_t{0} || (s.addr.value() & ~c.seg_boundary_mask) == ((s.addr.value() + s.len - 1) & ~c.seg_boundary_mask));
        CHECK((s.flags & kDmaSegBusAddr) || s.addr.value() + s.len - 1 <= c.dma_mask);
      }
      CHECK(total == l.total_bytes());
      auto seen = w->device_read(c, m->segments(), /*perm=*/false);
      CHECK(seen.has_value() && *seen == w->cpu_read(l));
      live.push_back(std::move(m).value());
    } else if (op == 2 && !live.empty()) {
      const size_t k = byte() % live.size();
      CHECK(dev->unmap(live[k]).has_value());
      CHECK(!dev->unmap(live[k]).has_value());  // a second unmap is refused
      live.erase(live.begin() + static_cast<long>(k));
    } else if (op == 3 && !live.empty()) {
      const DmaMapping& m = live[byte() % live.size()];
      CHECK((byte() & 1 ? dev->sync_for_cpu(m) : dev->sync_for_device(m)).has_value());
    } else if (op == 4) {
      const PhysRange r = piece();
      auto s = dev->map_phys(r.base, r.size, dir, attrs);
      if (!s) {
        const int e = s.error().code;
        CHECK(e == EREMOTEIO || e == ENOMEM || e == EIO || e == EINVAL);
        continue;
      }
      phys.emplace_back(*s, dir);
    } else if (op == 5 && !phys.empty()) {
      const size_t k = byte() % phys.size();
      CHECK(dev->unmap_phys(phys[k].first, phys[k].second).has_value());
      phys.erase(phys.begin() + static_cast<long>(k));
    }
  }
  for (auto& m : live) CHECK(dev->unmap(m).has_value());
  for (auto& [s, d] : phys) CHECK(dev->unmap_phys(s, d).has_value());
  CHECK(dev->stats().live_mappings == 0);
  CHECK(w->pool->used_slots() == 0);
  const auto ds = w->domain->stats();
  CHECK(ds.mapped_4k + ds.mapped_2m + ds.mapped_1g == 0);
  w->domain->flush();
  w->domain->iova().flush_caches();
  CHECK(w->domain->iova().stats().free_granules == iova_free);
  return 0;
}
