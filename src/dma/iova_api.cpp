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
  // Linux dma_iova_try_alloc(): false, and the caller falls back to the regular DMA API,
  // for a device that maps directly, a size of 0 (or too large) and when no IOVA is left.
  if (!m.cfg.domain) return false;
  const uint64_t off = phys.value() & kGMask;
  if (size == 0 || size > kIovaTop - off) return false;
  const uint64_t len = align_up(off + size);
  auto a = m.alloc_iova(len);
  if (!a) return false;
  state.addr = *a + off;
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
  const uint64_t pad = phys.value() & kGMask;  // iova_start_pad
  // Linux dma_iova_link(): only the first link may start inside a granule (-EIO).
  if (pad && offset > 0) return make_error(EIO, what() + ": only the link at offset 0 may start inside a granule");
  // iommu_map() refuses an IOVA and a physical address that do not line up (-EINVAL).
  if (((state.addr.value() + offset - pad) & kGMask) != 0) return make_error(EINVAL, what() + ": the IOVA at that offset is not granule-aligned");
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  ProviderId tag;
  const Provider* p = m.owner_of(phys, &tag);
  const Provider* owner = p;
  Route route;
  bool bounce;
  Status classified = m.classify(0, phys.value(), size, tag, attrs, &route, &bounce, &p);
  // dev_use_swiotlb() && iova_unaligned(): an untrusted device bounces what does not fill
  // whole granules. Memory linked with DMA_ATTR_MMIO (P2P through the host bridge) cannot
  // be bounced: -EPERM.
  const bool use_swiotlb = c.untrusted && ((phys.value() | size) & kGMask) != 0;
  if (use_swiotlb && owner && (classified || classified.error().code == EREMOTEIO) &&
      m.verdict(*owner) == pci::MapType::thru_host_bridge)
    return make_error(EPERM, what() + ": P2P memory through the host bridge (MMIO) that " + m.who() +
                                 " would have to bounce (untrusted, not granule-aligned)");
  PHYSR_RETURN_IF_ERROR(classified);
  if (route == Route::bus) return make_error(EINVAL, what() + ": P2P memory reached by bus address is not linked into an IOVA (use map_phys)");
  if (bounce && !m.env.bounce) return make_error(EIO, what() + ": must be bounced but " + m.who() + " has no bounce pool");
  const bool mmio = route == Route::mmio && !bounce;
  const IommuPerms prot = dir_prot(dir) | (mmio ? kIommuMmio : IommuPerms{});
  const bool sync = !(attrs & kDmaAttrSkipCpuSync) && !mmio;  // __dma_iova_link()'s arch_sync_dma_for_device()
  const DmaAddr at = state.addr + offset;
  if (!bounce) {  // __dma_iova_link() of the whole range
    if (auto st = c.domain->map(DmaAddr(at.value() - pad), PhysAddr(phys.value() - pad), align_up(pad + size), prot); !st)
      return std::move(st).error().with_context(what());
    if (sync) m.count_cache(1);
    return {};
  }
  // What this call has mapped and bounced so far, so a failure undoes exactly that.
  struct Undo {
    IommuDomain& domain;
    BouncePool* pool;
    DmaSpan linked[3];
    size_t nlinked = 0;
    DmaIovaState::Bounce bounces[2];
    size_t nbounces = 0;
    Error fail(Error e) {
      for (size_t i = 0; i < nlinked; ++i) (void)domain.unmap(linked[i].base, linked[i].size);
      for (size_t i = 0; i < nbounces; ++i) (void)pool->unmap(bounces[i].addr, bounces[i].size, DmaDirection::none);
      return e;
    }
  } undo{*c.domain, m.env.bounce, {}, 0, {}, 0};
  // __dma_iova_link(): [phys, phys + len) mapped at iova, both granule-aligned.
  const auto link = [&](DmaAddr iova, uint64_t ph, uint64_t len) -> Status {
    PHYSR_RETURN_IF_ERROR(c.domain->map(iova, PhysAddr(ph), len, prot));
    undo.linked[undo.nlinked++] = DmaSpan{iova, len};
    if (sync) m.count_cache(1);
    return {};
  };
  // iommu_dma_iova_bounce_and_link(): bounces [ph, ph + len) into whole zeroed granules
  // (iommu_dma_map_swiotlb()) and links them at iova - start_pad.
  const auto bounce_and_link = [&](DmaAddr iova, uint64_t ph, uint64_t len, uint64_t start_pad, const BounceParams& bp) -> Status {
    PHYSR_ASSIGN_OR_RETURN(const PhysAddr b, m.env.bounce->map(PhysAddr(ph), len, dir, bp));
    undo.bounces[undo.nbounces++] = {iova.value() - state.addr.value(), b, len};
    // The bounce keeps the offset within the granule only under a min_align_mask that
    // covers it; otherwise Linux's iommu_map() of bounce_phys - iova_start_pad fails.
    if ((b.value() & kGMask) != start_pad)
      return make_error(EINVAL, "the bounce at " + format_hex(b.value()) + " does not keep the offset " + format_hex(start_pad) +
                                    " within the granule (min_align_mask " + format_hex(c.min_align_mask) + ")");
    return link(DmaAddr(iova.value() - start_pad), b.value() - start_pad, align_up(start_pad + len));
  };
  if (route == Route::host) {
    // iommu_dma_iova_link_swiotlb(): the head up to the first granule boundary and the tail
    // after the last one are bounced, the granules between them linked in place.
    uint64_t mapped = 0, left = size;
    const uint64_t end_pad = (phys.value() + size) & kGMask;
    Status st;
    if (pad) {
      const uint64_t head = std::min(left, kGranule - pad);
      st = bounce_and_link(at, phys.value(), head, pad, bounce_params(c, kGMask));
      mapped = head;
      left -= head;
    }
    if (st && left) {
      left -= end_pad;
      if (left) st = link(at + mapped, phys.value() + mapped, left);
      mapped += left;
      if (st && end_pad) st = bounce_and_link(at + mapped, phys.value() + mapped, end_pad, 0, bounce_params(c, kGMask));
    }
    if (!st) return undo.fail(std::move(st).error().with_context(what()));
  } else {
    // P2P memory the device cannot reach, bounced (kDmaAttrAllowBounce) through host
    // memory as a whole: physr's own path, which Linux does not have. The bounce keeps the
    // offset within the granule whatever the device's min_align_mask, so it can be linked.
    BounceParams bp = bounce_params(c, kGMask);
    bp.min_align_mask |= kGMask;
    auto st = bounce_and_link(at, phys.value(), size, pad, bp);
    if (!st) return undo.fail(std::move(st).error().with_context(what()));
  }
  for (size_t i = 0; i < undo.nbounces; ++i) {
    state.bounces_.push_back(undo.bounces[i]);
    m.bounced.fetch_add(undo.bounces[i].size, std::memory_order_relaxed);
  }
  return {};
}

Status DmaDevice::iova_sync(DmaIovaState& state, uint64_t offset, uint64_t size) {
  // Linux dma_iova_sync() checks nothing and syncs the IOTLB (iommu_sync_map()); page-table
  // writes here are visible to the walker at once, so there is nothing to do. physr only
  // reports a sync of a state holding no IOVA or of bytes outside it.
  if (!state.allocated() || size == 0 || offset > state.size || size > state.size - offset)
    return make_error(EINVAL, "dma_iova_sync of offset " + format_hex(offset) + " (+" + format_hex(size) + "): outside the IOVA range");
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
