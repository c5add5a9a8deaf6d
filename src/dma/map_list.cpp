// map/unmap/sync of mixed host + P2P range lists (Linux dma_map_sg with P2P).
#include "dma/device.hpp"

namespace physr {

using namespace dma_detail;

// Per-thread buffers of map_into and unmap (kept between calls so the hot path does not
// allocate). The hot path reads a constant-initialised thread-local pointer: a
// thread_local Scratch itself (two vectors, a destructor) is reached through g++'s TLS
// init wrapper on every access, which cost MapUnmap/direct/1 6 instructions per call. Its
// owner, with the destructor, is touched once per thread.
struct Scratch {
  std::vector<IoMapOp> ops;
  std::vector<DmaSpan> runs;
};
constinit thread_local Scratch* t_scratch = nullptr;

[[gnu::cold, gnu::noinline]] Scratch& first_scratch() {
  thread_local struct Owner {
    Scratch s;
    ~Owner() { t_scratch = nullptr; }
  } owner;
  t_scratch = &owner.s;
  return owner.s;
}

inline Scratch& scratch() {
  Scratch* s = t_scratch;
  return s ? *s : first_scratch();
}

// Undo for every failure of map_into: nothing the call did stays behind. `ops[0, nops)`
// are the page-table operations written (none when the batch was not written). Out of
// line, on failure only: as a lambda capturing map_into's locals by reference it kept them
// in memory on the hot path.
Status DmaDevice::Impl::undo_map(DmaMapping& out, Error e, const IoMapOp* ops, size_t nops) {
  if (nops) {
    std::vector<DmaSpan> runs;
    runs.reserve(nops);
    for (size_t k = 0; k < nops; ++k) runs.push_back(DmaSpan{ops[k].iova, ops[k].size});
    (void)cfg.domain->unmap_many(runs);
  }
  if (out.iova_len_) (void)cfg.domain->free_iova(out.iova_, out.iova_len_);
  for (const auto& b : out.bounces_) (void)env.bounce->unmap(b.addr, b.size, DmaDirection::none);
  out.nseg_ = 0;
  out.bounces_.clear();
  out.iova_len_ = 0;
  failed.fetch_add(1, std::memory_order_relaxed);
  return e;
}

// One piece of a list bounced (map_into's rule): into *b, recorded in out's bounces. Out of
// line for the same reason as undo_map().
Status DmaDevice::Impl::bounce_piece(DmaMapping& out, uint64_t phys, uint64_t len, DmaDirection dir, bool iommu, PhysAddr* b) {
  if (!env.bounce) return make_error(EIO, "DMA map: " + format_hex(phys) + " must be bounced but " + who() + " has no bounce pool");
  // Linux swiotlb_search_pool_area(): the slot search keeps the bounce within the device's
  // segment boundary (iommu_is_span_boundary() over the pool's DMA addresses), with or
  // without an IOMMU; the pieces bounced here are already cut to the boundary window.
  PHYSR_ASSIGN_OR_RETURN(*b, env.bounce->map(PhysAddr(phys), len, dir, bounce_params(cfg, iommu ? kGMask : 0)));
  out.bounces_.push_back({*b, len});
  return {};
}

Status DmaDevice::map_into(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  if (out.mapped()) return make_error(EBUSY, "DMA map: the output mapping is still live (unmap it first)");
  if (dir == DmaDirection::none) return make_error(EINVAL, "DMA map: direction none");
  if (list.empty()) return make_error(EINVAL, "DMA map: empty range list");
  out.bounces_.clear();
  out.iova_len_ = 0;
  out.per_range_iova_ = false;
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  const bool iommu = c.domain != nullptr;
  // Linux iommu_dma_map_sg(): dev_use_sg_swiotlb() is true for an untrusted device.
  if (iommu && c.untrusted && !c.untrusted_one_iova) [[unlikely]] return map_into_swiotlb(out, list, dir, attrs);
  const uint64_t mask = c.seg_boundary_mask;

  // Segments and page-table operations are written through raw pointers into buffers that
  // only grow: vector's push_back reloads its members after every store and cost ~20
  // instructions a segment. The per-thread buffer of operations only behind an IOMMU.
  if (out.segs_.size() < list.size() + 16) out.segs_.resize(2 * list.size() + 16);
  DmaSegment* seg = out.segs_.data();
  size_t nseg = 0;
  const auto push_seg = [&](DmaSegment g) {
    if (nseg == out.segs_.size()) [[unlikely]] {
      out.segs_.resize(2 * nseg);
      seg = out.segs_.data();
    }
    seg[nseg++] = g;
  };
  Scratch* s = nullptr;
  IoMapOp* ops = nullptr;
  if (iommu) {
    s = &scratch();
    if (s->ops.size() < list.size() + 16) s->ops.resize(2 * list.size() + 16);
    ops = s->ops.data();
  }
  size_t nops = 0;

  // Undo for every failure (undo_map()); the page-table operations once the batch is written.
  bool iova_mapped = false;
  const auto fail = [&](Error e) -> Status { return m.undo_map(out, std::move(e), ops, iova_mapped ? nops : 0); };
  uint64_t bounced = 0;
  const auto bounce_one = [&](uint64_t phys, uint64_t len, PhysAddr* b) -> Status {
    PHYSR_RETURN_IF_ERROR(m.bounce_piece(out, phys, len, dir, iommu, b));
    bounced += len;
    return {};
  };

  // One pass over the ranges, each mapped by one of three paths after its classification:
  // bus address (P2P under a shared switch: cut to the limits in bus space, never in the
  // IOMMU), direct (Linux dma_direct_map_sg(): bounced where the device cannot reach it),
  // or IOMMU. The paths stay inline in the one loop: as lambdas over these locals they cost
  // the direct path a third more time (measured: MapUnmap/direct/256 2.0 -> 2.7 us). IOMMU devices: Linux iommu_dma_map_sg() and __finalise_sg()
  // in one go, with IOVA-relative addresses (fixed up once the IOVA is allocated):
  //  - each range is cut into pieces within the boundary window and the max segment
  //    (bounce pieces also within 256 KiB);
  //  - each piece is placed at its offset within the granule, after padding if it would
  //    cross the boundary (if the boundary is at least the whole IOVA, the size-aligned
  //    allocation cannot cross it; below the granule no piece can; in between, pad);
  //  - a piece merges into the previous segment when it starts on a granule, not on a
  //    boundary, and the result stays within the max segment. The allocation is aligned
  //    to at least min(its size rounded up to a power of two, boundary), so whether a
  //    relative address sits on a boundary is the same as for the absolute one.
  // Every IOMMU piece has the list-wide permissions (Linux iommu_dma_map_sg():
  // dma_info_to_prot() once; memory through the host bridge gets no IOMMU_MMIO there).
  const IommuPerms prot = dir_prot(dir);
  uint64_t iova_len = 0, cur_len = 0, cacheable = 0;
  uint64_t op_iova_end = 0, op_phys_end = 0;
  size_t idx = 0;
  // Host memory needs classify() only behind an IOMMU for an untrusted device (here: the
  // untrusted_one_iova option); a direct device bounces it by the same rule either way.
  const bool host_inline = !(iommu && c.untrusted);
  VerdictMemo memo;
  for (const PhysRange r : list) {
    const uint64_t addr = r.base.value(), len = r.size;
    Route route = Route::host;
    bool bounce = false;
    const Provider* p = nullptr;
    uint64_t ext = 0;
    // The hot case inline: host memory with no provider in the way (Linux
    // dma_direct_map_phys(): bounced when forced or not dma_capable()).
    if (r.provider == kHostMemory && host_inline &&
        (!m.env.providers || m.env.providers->surely_host(r.base, len) ||
         (!m.env.providers->find_extent(r.base, ext) && ext >= len))) {
      bounce = !iommu && (c.force_bounce || !m.capable(addr + c.dma_offset, len));
    } else if (auto st = m.classify(idx, addr, len, r.provider, attrs, &route, &bounce, &p, MapForm::list, &memo); !st) {
      return fail(std::move(st).error());
    }
    ++idx;
    // Cache maintenance for everything but bus addresses (Linux syncs the memory through the
    // host bridge in a list too: it is mapped without DMA_ATTR_MMIO).
    cacheable += route != Route::bus;
    if (route == Route::bus) {
      // The provider is the same for the whole range (ranges never cross providers).
      for (uint64_t a = p->to_bus(r.base).value(), left = len; left != 0;) {  // cut to the limits in bus space
        const uint64_t n = first_chunk(a, left, c.max_segment, mask);
        push_seg(DmaSegment{DmaAddr(a), n, kDmaSegBusAddr});
        a += n;
        left -= n;
      }
      cur_len = 0;
      continue;
    }
    if (!iommu) {
      const DmaSegFlags flags = bounce ? kDmaSegBounced : DmaSegFlags{};
      for (uint64_t a = addr, left = len; left != 0;) {
        uint64_t n = left, d = a + c.dma_offset;
        if (bounce) {
          n = first_chunk(a, left, ~uint64_t{0}, std::min(mask, BouncePool::kMaxMapping - 1));
          PhysAddr b;
          if (auto st = bounce_one(a, n, &b); !st) return fail(std::move(st).error());
          d = b.value() + c.dma_offset;
          if (!m.capable(d, n))
            return fail(make_error(EIO, "DMA map: the bounce buffer at " + format_hex(b.value()) + " is above " + m.who() + "'s DMA mask " + format_hex(c.dma_mask)));
        }
        for (uint64_t k = n; k != 0;) {  // cut to the limits in DMA address space
          const uint64_t q = first_chunk(d, k, c.max_segment, mask);
          push_seg(DmaSegment{DmaAddr(d), q, flags});
          d += q;
          k -= q;
        }
        a += n;
        left -= n;
      }
      continue;
    }
    const DmaSegFlags flags = kDmaSegIommu | (bounce ? kDmaSegBounced : DmaSegFlags{});
    const uint64_t wmask = bounce ? std::min(mask, BouncePool::kMaxMapping - 1) : mask;
    for (uint64_t a = addr, left = len; left != 0;) {
      const uint64_t n = first_chunk(a, left, c.max_segment, wmask);
      uint64_t phys = a;
      if (bounce) {  // the bounce keeps the offset within the granule
        PhysAddr b;
        if (auto st = bounce_one(a, n, &b); !st) return fail(std::move(st).error());
        phys = b.value();
      }
      const uint64_t off = phys & kGMask, s_length = align_up(off + n);
      const uint64_t pad_len = (mask - iova_len + 1) & mask;
      if (pad_len && pad_len < s_length - 1) {
        iova_len += pad_len;  // the padding stays unmapped
        cur_len = 0;
      }
      const uint64_t ph = phys - off;
      // One op per physically and virtually contiguous run; the last op's ends are kept in
      // locals (reading them back from the buffer cost a third of this loop).
      if (nops && op_iova_end == iova_len && op_phys_end == ph) {
        ops[nops - 1].size += s_length;
      } else {
        if (nops == s->ops.size()) [[unlikely]] {
          s->ops.resize(2 * nops);
          ops = s->ops.data();
        }
        // Field by field: g++ 12 builds an aggregate with a class-type member (the typed
        // permissions) on the stack and copies it with two overlapping 16-byte moves, whose
        // load cannot be forwarded from the byte store before it (same instruction count,
        // MapUnmap/iommu/256 3.7 -> 5.9 us).
        IoMapOp& op = ops[nops++];
        op.iova = DmaAddr(iova_len);
        op.phys = PhysAddr(ph);
        op.size = s_length;
        op.perm = prot;
      }
      op_iova_end = iova_len + s_length;
      op_phys_end = ph + s_length;
      if (cur_len && !off && (iova_len & mask) && c.max_segment - cur_len >= n) {
        cur_len += n;
        seg[nseg - 1].len = cur_len;
        seg[nseg - 1].flags |= flags;
      } else {
        push_seg(DmaSegment{DmaAddr(iova_len + off), n, flags});
        cur_len = n;
      }
      iova_len += s_length;
      if (n + off < s_length) cur_len = 0;
      a += n;
      left -= n;
    }
  }
  out.nseg_ = nseg;  // no resize: shrinking the vector would make the next map value-initialise it again

  if (iova_len) {
    // One IOVA allocation, the relative addresses fixed up, the page table written in one
    // batch (all or nothing).
    auto a = m.alloc_iova(iova_len);
    if (!a) return fail(std::move(a).error().with_context("DMA map for " + m.who()));
    const uint64_t base = a->value();
    out.iova_ = *a;
    out.iova_len_ = iova_len;
    for (size_t k = 0; k < nops; ++k) ops[k].iova += base;
    for (size_t k = 0; k < nseg; ++k)
      if (seg[k].flags & kDmaSegIommu) seg[k].addr += base;
    if (auto st = c.domain->map_many(std::span<const IoMapOp>(ops, nops)); !st)
      return fail(std::move(st).error().with_context("DMA map for " + m.who()));
    iova_mapped = true;
  }

  // Cache maintenance before the device owns the memory (Linux arch_sync_dma_for_device;
  // none for bus addresses).
  if (!(attrs & kDmaAttrSkipCpuSync)) m.count_cache(cacheable);
  finish_map(out, list, dir, attrs, bounced);
  return {};
}

// Inline (its callers are in this file): as an out-of-line member of a class with default
// visibility, g++ does not inline it into -fPIC code, which cost MapUnmap/direct/1 about 23
// instructions per call (docs/ARCHITECTURE.md, "Architecture A/B").
inline void DmaDevice::finish_map(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs, uint64_t bounced) {
  Impl& m = *impl_;
  out.dev_ = this;
  out.dir_ = dir;
  out.attrs_ = attrs;
  out.bytes_ = list.total_bytes();
  if (m.cfg.debug) {
    out.debug_id_ = m.next_id.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(m.dbg_mu);
    m.dbg_lists.emplace(out.debug_id_, DebugEntry{out.bytes_, dir});
  }
  if (bounced) m.bounced.fetch_add(bounced, std::memory_order_relaxed);
  m.maps.fetch_add(1, std::memory_order_relaxed);
}

// Linux iommu_dma_map_sg_swiotlb(): an untrusted device behind an IOMMU maps each entry with
// iommu_dma_map_phys(), with the list's attributes and no P2P classification: its own IOVA
// (__iommu_dma_map(): the granules it touches, the SAC rule), bounced in whole zeroed
// granules when not aligned to the granule (iommu_dma_map_swiotlb()), no merging. physr cuts
// each range to the device's limits first (a bounced piece also within 256 KiB), each piece
// with its own IOVA; the page table is written in one batch at the end (all or nothing).
// Called by map_into inside its ReadGuard.
Status DmaDevice::map_into_swiotlb(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  Scratch& s = scratch();
  size_t nseg = 0, nops = 0;
  const auto fail = [&](Error e) -> Status {
    for (size_t k = 0; k < nops; ++k) (void)c.domain->free_iova(s.ops[k].iova, s.ops[k].size);
    for (const auto& b : out.bounces_) (void)m.env.bounce->unmap(b.addr, b.size, DmaDirection::none);
    out.nseg_ = 0;
    out.bounces_.clear();
    m.failed.fetch_add(1, std::memory_order_relaxed);
    return e;
  };
  const IommuPerms prot = dir_prot(dir);
  const uint64_t mask = c.seg_boundary_mask;
  uint64_t bounced = 0;
  size_t idx = 0;
  for (const PhysRange r : list) {
    Route route = Route::host;
    bool bounce = false;
    const Provider* p = nullptr;
    if (auto st = m.classify(idx, r.base.value(), r.size, r.provider, attrs, &route, &bounce, &p, MapForm::list_swiotlb); !st)
      return fail(std::move(st).error());
    ++idx;
    const uint64_t wmask = bounce ? std::min(mask, BouncePool::kMaxMapping - 1) : mask;
    for (uint64_t a = r.base.value(), left = r.size; left != 0;) {
      const uint64_t n = first_chunk(a, left, c.max_segment, wmask);
      uint64_t phys = a;
      if (bounce) {  // the bounce keeps the offset within the granule and zeroes the rest
        if (!m.env.bounce) return fail(make_error(EIO, "DMA map: " + format_hex(a) + " must be bounced but " + m.who() + " has no bounce pool"));
        auto b = m.env.bounce->map(PhysAddr(a), n, dir, c.min_align_mask, kGMask);
        if (!b) return fail(std::move(b).error());
        out.bounces_.push_back({*b, n});
        bounced += n;
        phys = b->value();
      }
      const uint64_t off = phys & kGMask, size = align_up(off + n);
      auto iova = m.alloc_iova(size);
      if (!iova) return fail(std::move(iova).error().with_context("DMA map for " + m.who()));
      if (nops == s.ops.size()) s.ops.resize(2 * nops + 16);
      IoMapOp& op = s.ops[nops++];  // field by field, as in map_into()
      op.iova = *iova;
      op.phys = PhysAddr(phys - off);
      op.size = size;
      op.perm = prot;
      if (nseg == out.segs_.size()) out.segs_.resize(2 * nseg + 16);
      out.segs_[nseg++] = DmaSegment{*iova + off, n, kDmaSegIommu | (bounce ? kDmaSegBounced : DmaSegFlags{})};
      a += n;
      left -= n;
    }
  }
  if (auto st = c.domain->map_many(std::span<const IoMapOp>(s.ops.data(), nops)); !st)
    return fail(std::move(st).error().with_context("DMA map for " + m.who()));
  out.nseg_ = nseg;
  out.per_range_iova_ = true;
  // iommu_dma_map_phys() syncs every entry (none is mapped with DMA_ATTR_MMIO).
  if (!(attrs & kDmaAttrSkipCpuSync)) m.count_cache(list.size());
  finish_map(out, list, dir, attrs, bounced);
  return {};
}

// unmap()'s refusals and its DMA-API debug bookkeeping, out of line: their messages kept
// registers and stack in use on the hot path (MapUnmap/direct/1).
[[gnu::cold, gnu::noinline]] Status DmaDevice::Impl::unmap_refused(const DmaMapping& mp) const {
  if (!mp.mapped()) return make_error(EINVAL, "DMA unmap: the mapping is not live (never mapped, or already unmapped)");
  return make_error(EINVAL, "DMA unmap on " + who() + ": the mapping belongs to another device");
}

[[gnu::noinline]] Status DmaDevice::Impl::debug_take(uint64_t id, DebugEntry* rec) {
  std::lock_guard lock(dbg_mu);
  auto it = dbg_lists.find(id);
  if (it == dbg_lists.end())
    return make_error(EINVAL, "DMA-API debug: unmap on " + who() + " of mapping " + std::to_string(id) + ", which is not live");
  *rec = it->second;
  dbg_lists.erase(it);
  return {};
}

[[gnu::cold, gnu::noinline]] void DmaDevice::Impl::debug_put_back(uint64_t id, const DebugEntry& rec) {
  std::lock_guard lock(dbg_mu);
  dbg_lists.emplace(id, rec);
}

Status DmaDevice::unmap(DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped() || mp.dev_ != this) [[unlikely]] return m.unmap_refused(mp);
  // DMA-API debug: the record is taken out before anything is torn down, so a second unmap
  // of the same mapping racing this one is reported rather than run (it could otherwise
  // unmap an IOVA that a third mapping got in between); it goes back only if nothing was
  // torn down.
  DebugEntry rec{};
  if (m.cfg.debug) [[unlikely]]
    PHYSR_RETURN_IF_ERROR(m.debug_take(mp.debug_id_, &rec));
  // Past the first teardown step the mapping is gone whatever else fails: it is marked
  // unmapped, so a retry is refused instead of tearing down twice.
  const auto done = [&] {
    mp.dev_ = nullptr;
    mp.nseg_ = 0;
    mp.bounces_.clear();
    mp.iova_len_ = 0;
    mp.per_range_iova_ = false;
    m.unmaps.fetch_add(1, std::memory_order_relaxed);
  };
  if (mp.per_range_iova_) {
    // Linux iommu_dma_unmap_sg_swiotlb(): each IOMMU segment is its own IOVA allocation.
    Scratch& s = scratch();
    s.runs.clear();
    for (const DmaSegment& seg : mp.segments()) {
      const uint64_t a = seg.addr.value() & ~kGMask, e = align_up(seg.addr.value() + seg.len);
      s.runs.push_back(DmaSpan{DmaAddr(a), e - a});
    }
    if (Status st = m.cfg.domain->unmap_many(s.runs); !st) {  // all or nothing: nothing was torn down
      if (m.cfg.debug) m.debug_put_back(mp.debug_id_, rec);
      return st;
    }
    Status freed;
    for (const DmaSpan& run : s.runs)
      if (Status st = m.cfg.domain->free_iova(run.base, run.size); !st && freed) freed = st;
    if (!freed) {
      done();
      return freed;
    }
  } else if (mp.iova_len_) {
    // The mapped runs: every IOMMU segment's granules (merged segments never span padding).
    Scratch& s = scratch();
    s.runs.clear();
    for (const DmaSegment& seg : mp.segments()) {
      if (!(seg.flags & kDmaSegIommu)) continue;
      const uint64_t a = seg.addr.value() & ~kGMask, e = align_up(seg.addr.value() + seg.len);
      if (!s.runs.empty() && s.runs.back().base + s.runs.back().size == DmaAddr(a)) s.runs.back().size += e - a;
      else s.runs.push_back(DmaSpan{DmaAddr(a), e - a});
    }
    if (Status st = m.cfg.domain->unmap_many(s.runs); !st) {  // all or nothing: nothing was torn down
      if (m.cfg.debug) m.debug_put_back(mp.debug_id_, rec);
      return st;
    }
    if (Status st = m.cfg.domain->free_iova(mp.iova_, mp.iova_len_); !st) {
      done();
      return st;
    }
  }
  const bool cpu_sync = !(mp.attrs_ & kDmaAttrSkipCpuSync);
  Status st;
  for (const auto& b : mp.bounces_) {
    auto r = m.env.bounce->unmap(b.addr, b.size, cpu_sync ? mp.dir_ : DmaDirection::none);
    if (!r && st) st = r;
  }
  // Linux arch_sync_dma_for_cpu() at unmap, unless the device only read.
  if (cpu_sync && !m.cfg.coherent && mp.dir_ != DmaDirection::to_device) m.count_cache(mp.nseg_);
  done();
  return st;
}

Status DmaDevice::sync_for_cpu(const DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped() || mp.dev_ != this) return make_error(EINVAL, "DMA sync_for_cpu on " + m.who() + ": the mapping is not live on this device");
  for (const auto& b : mp.bounces_) PHYSR_RETURN_IF_ERROR(m.env.bounce->sync_for_cpu(b.addr, b.size, mp.dir_));
  if (mp.dir_ != DmaDirection::to_device) m.count_cache(mp.nseg_);
  return {};
}

Status DmaDevice::sync_for_device(const DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped() || mp.dev_ != this) return make_error(EINVAL, "DMA sync_for_device on " + m.who() + ": the mapping is not live on this device");
  for (const auto& b : mp.bounces_) PHYSR_RETURN_IF_ERROR(m.env.bounce->sync_for_device(b.addr, b.size, mp.dir_));
  m.count_cache(mp.nseg_);
  return {};
}

}  // namespace physr
