// The two-step IOVA API (Linux drivers/iommu/dma-iommu.c dma_iova_*).
#include "dma/device.hpp"

namespace physr {

using namespace dma_detail;

// ---------------------------------------------------------------------------------------
// Two-step API (Linux drivers/iommu/dma-iommu.c dma_iova_*)

Result<bool> DmaDevice::iova_try_alloc(DmaIovaState& state, PhysAddr phys, uint64_t size) {
  Impl& m = *impl_;
  if (state.allocated()) return make_error(EBUSY, "dma_iova_try_alloc: the state already holds an IOVA range");
  state.bounces_.clear();
  if (!m.cfg.domain) return false;  // direct mapping: the caller uses map_phys
  if (size == 0) return make_error(EINVAL, "dma_iova_try_alloc: size 0");
  const uint64_t off = phys.value() & kGMask;
  if (size > kIovaTop - off) return make_error(EINVAL, "dma_iova_try_alloc: size " + format_hex(size) + " exceeds the IOVA space");
  const uint64_t len = align_up(off + size);
  PHYSR_ASSIGN_OR_RETURN_CTX(const DmaAddr a, m.alloc_iova(len), "dma_iova_try_alloc for " + m.who());
  state.addr = a + off;
  state.size = size;
  state.alloc_len_ = len;
  return true;
}

Status DmaDevice::iova_link(DmaIovaState& state, PhysAddr phys, uint64_t offset, uint64_t size, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  const auto what = [&] { return "dma_iova_link of " + format_hex(phys.value()) + " (+" + format_hex(size) + ") at offset " + format_hex(offset); };
  if (!state.allocated()) return make_error(EINVAL, what() + ": no IOVA range allocated");
  if (dir == DmaDirection::none) return make_error(EINVAL, what() + ": direction none");
  if (size == 0 || offset > state.size || size > state.size - offset) return make_error(EINVAL, what() + ": outside the " + format_hex(state.size) + " bytes allocated");
  const uint64_t pad = phys.value() & kGMask;
  // Linux: only the first link may start inside a granule, and the IOVA must line up.
  if (pad && offset > 0) return make_error(EINVAL, what() + ": only the link at offset 0 may start inside a granule");
  if (((state.addr.value() + offset - pad) & kGMask) != 0) return make_error(EINVAL, what() + ": the IOVA at that offset is not granule-aligned");
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  ProviderId tag;
  const Provider* p = m.owner_of(phys, &tag);
  Route route;
  bool bounce;
  PHYSR_RETURN_IF_ERROR(m.classify(0, phys.value(), size, tag, attrs, &route, &bounce, &p));
  if (route == Route::bus) return make_error(EINVAL, what() + ": P2P memory reached by bus address is not linked into an IOVA (use map_phys)");
  PhysAddr a = phys;
  if (bounce) {
    if (!m.env.bounce) return make_error(EIO, what() + ": must be bounced but " + m.who() + " has no bounce pool");
    PHYSR_ASSIGN_OR_RETURN(a, m.env.bounce->map(phys, size, dir, c.min_align_mask, kGMask));
  }
  const uint8_t prot = static_cast<uint8_t>(dir_prot(dir) | (route == Route::mmio && !bounce ? kIommuMmio : 0));
  if (auto st = c.domain->map(state.addr + offset - pad, PhysAddr(a.value() - pad), align_up(pad + size), prot); !st) {
    if (bounce) (void)m.env.bounce->unmap(a, size, DmaDirection::none);
    return std::move(st).error().with_context(what());
  }
  if (bounce) {
    state.bounces_.push_back({offset, a, size});
    m.bounced.fetch_add(size, std::memory_order_relaxed);
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && (route == Route::host || bounce)) m.count_cache(1);
  return {};
}

Status DmaDevice::iova_sync(DmaIovaState& state, uint64_t offset, uint64_t size) {
  Impl& m = *impl_;
  if (!state.allocated() || size == 0 || offset > state.size || size > state.size - offset)
    return make_error(EINVAL, "dma_iova_sync of offset " + format_hex(offset) + " (+" + format_hex(size) + "): outside the IOVA range");
  // Page-table writes are visible to the walker at once and non-present entries are never
  // cached, so the sync (iommu_sync_map) only checks that the range is linked.
  const uint64_t start = (state.addr.value() + offset) & ~kGMask, end = state.addr.value() + offset + size;
  for (uint64_t a = start; a < end; a += kGranule)
    if (!m.cfg.domain->walk(DmaAddr(a)))
      return make_error(EINVAL, "dma_iova_sync of offset " + format_hex(offset) + " (+" + format_hex(size) + "): IOVA " + format_hex(a) + " is not linked");
  return {};
}

Status DmaDevice::iova_unlink(DmaIovaState& state, uint64_t offset, uint64_t size, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  if (!state.allocated() || size == 0 || offset > state.size || size > state.size - offset)
    return make_error(EINVAL, "dma_iova_unlink of offset " + format_hex(offset) + " (+" + format_hex(size) + "): outside the IOVA range");
  const uint64_t addr = state.addr.value() + offset, pad = addr & kGMask;
  PHYSR_RETURN_IF_ERROR(m.cfg.domain->unmap(DmaAddr(addr - pad), align_up(pad + size)));
  const DmaDirection back = (attrs & kDmaAttrSkipCpuSync) ? DmaDirection::none : dir;
  Status st;
  std::erase_if(state.bounces_, [&](const DmaIovaState::Bounce& b) {
    if (b.offset < offset || b.offset >= offset + size) return false;
    if (auto r = m.env.bounce->unmap(b.addr, b.size, back); !r && st) st = r;
    return true;
  });
  if (!(attrs & kDmaAttrSkipCpuSync) && dir != DmaDirection::to_device) m.count_cache(1);
  return st;
}

Status DmaDevice::iova_destroy(DmaIovaState& state, uint64_t mapped_len, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  if (!state.allocated()) return make_error(EINVAL, "dma_iova_destroy: no IOVA range allocated");
  for (const auto& b : state.bounces_)
    if (b.offset >= mapped_len)
      return make_error(EINVAL, "dma_iova_destroy with mapped_len " + format_hex(mapped_len) + ": offset " + format_hex(b.offset) + " is still linked");
  if (mapped_len) PHYSR_RETURN_IF_ERROR(iova_unlink(state, 0, mapped_len, dir, attrs));
  const DmaAddr base(state.addr.value() & ~kGMask);
  PHYSR_RETURN_IF_ERROR(m.cfg.domain->free_iova(base, state.alloc_len_));
  state = DmaIovaState{};
  return {};
}

}  // namespace physr
