// Single physical ranges (Linux dma_map_phys) and their syncs.
#include "dma/device.hpp"

namespace physr {

using namespace dma_detail;

// ---------------------------------------------------------------------------------------
// Single ranges

Result<DmaSegment> DmaDevice::map_phys(PhysAddr phys, uint64_t size, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  if (dir == DmaDirection::none) return make_error(EINVAL, "DMA map_phys: direction none");
  if (size == 0) return make_error(EINVAL, "DMA map_phys of " + format_hex(phys.value()) + ": size 0");
  if (phys.value() + (size - 1) < phys.value()) return make_error(EINVAL, "DMA map_phys of " + format_hex(phys.value()) + ": wraps the address space");
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  ProviderId tag;
  const Provider* p = m.owner_of(phys, &tag);
  Route route;
  bool bounce;
  if (auto st = m.classify(0, phys.value(), size, tag, attrs, &route, &bounce, &p); !st) {
    m.failed.fetch_add(1, std::memory_order_relaxed);
    return std::move(st).error();
  }
  // Linux __iommu_dma_map(): an alignment the IOVA allocator cannot keep is refused.
  if (c.domain && route != Route::bus && c.min_align_mask > kGMask) {
    m.failed.fetch_add(1, std::memory_order_relaxed);
    return make_error(EINVAL, "DMA map_phys of " + format_hex(phys.value()) + " on " + m.who() + ": min_align_mask " +
                                  format_hex(c.min_align_mask) + " exceeds the IOVA granule mask " + format_hex(kGMask) +
                                  " (unsupported alignment constraint)");
  }
  DmaSegment seg{};
  seg.len = size;
  if (route == Route::bus) {
    seg.addr = DmaAddr(p->to_bus(phys).value());
    seg.flags = kDmaSegBusAddr;
  } else {
    PhysAddr a = phys;
    if (bounce) {
      if (!m.env.bounce) return make_error(EIO, "DMA map_phys: " + format_hex(phys.value()) + " must be bounced but " + m.who() + " has no bounce pool");
      PHYSR_ASSIGN_OR_RETURN(a, m.env.bounce->map(phys, size, dir, bounce_params(c, c.domain ? kGMask : 0)));
      m.bounced.fetch_add(size, std::memory_order_relaxed);
    }
    const DmaSegFlags mmio = route == Route::mmio && !bounce ? kDmaSegMmio : DmaSegFlags{};
    seg.flags = (bounce ? kDmaSegBounced : DmaSegFlags{}) | mmio;
    if (!c.domain) {
      // Linux dma_direct_map_phys(): phys_to_dma() (the offset), but with DMA_ATTR_MMIO the
      // physical address itself.
      seg.addr = DmaAddr(a.value() + (mmio ? 0 : c.dma_offset));
      if (bounce && !m.capable(seg.addr.value(), size)) {
        (void)m.env.bounce->unmap(a, size, DmaDirection::none);
        return make_error(EIO, "DMA map_phys: the bounce buffer at " + format_hex(a.value()) + " is above " + m.who() + "'s DMA mask");
      }
    } else {
      const uint64_t off = a.value() & kGMask, len = align_up(off + size);
      auto iova = m.alloc_iova(len);
      Status st = iova ? c.domain->map(*iova, PhysAddr(a.value() - off), len, dir_prot(dir) | (mmio ? kIommuMmio : IommuPerms{}))
                       : Status(std::move(iova).error());
      if (!st) {
        if (iova) (void)c.domain->free_iova(*iova, len);
        if (bounce) (void)m.env.bounce->unmap(a, size, DmaDirection::none);
        m.failed.fetch_add(1, std::memory_order_relaxed);
        return std::move(st).error().with_context("DMA map_phys for " + m.who());
      }
      seg.addr = *iova + off;
      seg.flags |= kDmaSegIommu;
    }
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && (route == Route::host || bounce)) m.count_cache(1);
  if (c.debug) {
    std::lock_guard lock(m.dbg_mu);
    m.dbg_phys[seg.addr.value()].push_back(DebugEntry{size, dir});
  }
  m.maps.fetch_add(1, std::memory_order_relaxed);
  return seg;
}

Status DmaDevice::unmap_phys(const DmaSegment& seg, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  const auto what = [&] { return "DMA unmap_phys on " + m.who() + " of " + format_hex(seg.addr.value()) + " (+" + format_hex(seg.len) + ")"; };
  if (seg.len == 0) return make_error(EINVAL, what() + ": size 0");
  // DMA-API debug: the record is taken out before anything is torn down (a second unmap
  // racing this one is reported, not run) and goes back only if nothing was torn down.
  bool taken = false;
  if (c.debug) {
    std::lock_guard lock(m.dbg_mu);
    auto it = m.dbg_phys.find(seg.addr.value());
    if (it == m.dbg_phys.end()) return make_error(EINVAL, "DMA-API debug: " + what() + ": not mapped");
    auto& v = it->second;
    auto e = std::find_if(v.begin(), v.end(), [&](const DebugEntry& d) { return d.len == seg.len && d.dir == dir; });
    if (e == v.end()) {
      const DebugEntry& d = v.front();
      if (d.len != seg.len) return make_error(EINVAL, "DMA-API debug: " + what() + ": mapped with size " + format_hex(d.len));
      return make_error(EINVAL, "DMA-API debug: " + what() + ": mapped " + dma_direction_name(d.dir) + ", unmapped " + dma_direction_name(dir));
    }
    v.erase(e);
    if (v.empty()) m.dbg_phys.erase(it);
    taken = true;
  }
  const auto untouched = [&](Error e) -> Status {  // nothing was torn down: the record goes back
    if (taken) {
      std::lock_guard lock(m.dbg_mu);
      m.dbg_phys[seg.addr.value()].push_back(DebugEntry{seg.len, dir});
    }
    return e;
  };
  const DmaDirection back = (attrs & kDmaAttrSkipCpuSync) ? DmaDirection::none : dir;
  if (!(seg.flags & kDmaSegBusAddr)) {
    if (seg.flags & kDmaSegIommu) {
      if (!c.domain) return untouched(make_error(EINVAL, what() + ": an IOMMU segment, but the device maps directly"));
      const uint64_t off = seg.addr.value() & kGMask, len = align_up(off + seg.len);
      std::optional<IoTranslation> t;
      if (seg.flags & kDmaSegBounced) t = c.domain->walk(seg.addr);
      if (Status st = c.domain->unmap(seg.addr - off, len); !st) return untouched(std::move(st).error());  // nothing changed
      PHYSR_RETURN_IF_ERROR(c.domain->free_iova(seg.addr - off, len));
      if (t) PHYSR_RETURN_IF_ERROR(m.env.bounce->unmap(t->phys, seg.len, back));
    } else if (seg.flags & kDmaSegBounced) {
      if (!m.env.bounce) return untouched(make_error(EINVAL, what() + ": flagged bounced, but there is no bounce pool"));
      // BouncePool::unmap's EINVAL (not a mapping of the pool) changes nothing; a failed copy
      // back (EFAULT) has still freed the slots.
      if (Status st = m.env.bounce->unmap(PhysAddr(seg.addr.value() - c.dma_offset), seg.len, back); !st)
        return st.error().code == EINVAL ? untouched(std::move(st).error()) : st;
    }
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && dir != DmaDirection::to_device && !(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  m.unmaps.fetch_add(1, std::memory_order_relaxed);
  return {};
}

namespace {
// The bounce address behind a bounced single segment.
Result<PhysAddr> bounce_of(const DmaSegment& seg, const DmaDeviceConfig& c) {
  if (!(seg.flags & kDmaSegIommu)) return PhysAddr(seg.addr.value() - c.dma_offset);
  auto t = c.domain ? c.domain->walk(seg.addr) : std::nullopt;
  if (!t) return make_error(EINVAL, "DMA sync of " + format_hex(seg.addr.value()) + ": not mapped in the IOMMU");
  return t->phys;
}
}  // namespace

Status DmaDevice::sync_phys_for_cpu(const DmaSegment& seg, DmaDirection dir) {
  Impl& m = *impl_;
  if (seg.flags & kDmaSegBounced) {
    PHYSR_ASSIGN_OR_RETURN(const PhysAddr b, bounce_of(seg, m.cfg));
    PHYSR_RETURN_IF_ERROR(m.env.bounce->sync_for_cpu(b, seg.len, dir));
  }
  if (dir != DmaDirection::to_device && !(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  return {};
}

Status DmaDevice::sync_phys_for_device(const DmaSegment& seg, DmaDirection dir) {
  Impl& m = *impl_;
  if (seg.flags & kDmaSegBounced) {
    PHYSR_ASSIGN_OR_RETURN(const PhysAddr b, bounce_of(seg, m.cfg));
    PHYSR_RETURN_IF_ERROR(m.env.bounce->sync_for_device(b, seg.len, dir));
  }
  if (!(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  return {};
}

}  // namespace physr
