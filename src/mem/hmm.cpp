// A mirror without GUP: interval notifiers (mm/mmu_notifier.c), hmm_range_fault() and the
// DMA mapping of its pfns (mm/hmm.c), a device page table on top, and the AddressSpace
// operations that invalidate (mprotect, migration, P2P revocation; munmap is in uspace.cpp).
#include "physr/mem/hmm.hpp"

#include <algorithm>
#include <utility>

#include "mem/uspace_detail.hpp"

namespace physr::mem {

namespace {
constexpr uint64_t kPmdPages = uint64_t{1} << kOrder2M;
constexpr uint64_t kPmdSize = kPmdPages << kPageShift;

bool overlaps(const MmuIntervalNotifier& n, const MmuNotifierRange& r) noexcept {
  return r.start <= n.end() - 1 && r.end - 1 >= n.start();  // interval_tree_iter_first(start, end - 1)
}
}  // namespace

const char* mmu_notify_event_name(MmuNotifyEvent e) noexcept {
  switch (e) {
    case MmuNotifyEvent::unmap: return "unmap";
    case MmuNotifyEvent::clear: return "clear";
    case MmuNotifyEvent::protection_vma: return "protection_vma";
    case MmuNotifyEvent::protection_page: return "protection_page";
    case MmuNotifyEvent::soft_dirty: return "soft_dirty";
    case MmuNotifyEvent::release: return "release";
    case MmuNotifyEvent::migrate: return "migrate";
    case MmuNotifyEvent::exclusive: return "exclusive";
    case MmuNotifyEvent::p2p_revoke: return "p2p_revoke";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------
// The subscriptions of one address space (mm/mmu_notifier.c)

uint64_t MmuNotifierSubscriptions::invalidate_seq() const {
  std::lock_guard g(lock_);
  return seq_;
}

size_t MmuNotifierSubscriptions::notifiers() const {
  std::lock_guard g(lock_);
  return tree_.size();
}

// mm/mmu_notifier.c mn_itree_inv_start_range() and mn_itree_invalidate(): the sequence
// turns odd only when the range hits a notifier; the tree cannot change while it is odd
// (inserts and removes are deferred), so the callbacks run without the lock.
void MmuNotifierSubscriptions::invalidate_start(const MmuNotifierRange& range) {
  uint64_t cur_seq = 0;
  {
    std::lock_guard g(lock_);
    ++active_;
    const bool hit = std::any_of(tree_.begin(), tree_.end(), [&](const MmuIntervalNotifier* n) { return overlaps(*n, range); });
    if (!hit) return;
    seq_ |= 1;
    cur_seq = seq_;
  }
  for (MmuIntervalNotifier* n : tree_)
    if (overlaps(*n, range)) (void)n->invalidate_(*n, range, cur_seq);
}

// mm/mmu_notifier.c mn_itree_inv_end(): the last active range makes the sequence even
// again, applies the deferred inserts and removes, and wakes read_begin() and remove().
void MmuNotifierSubscriptions::invalidate_end() {
  {
    std::lock_guard g(lock_);
    PHYSR_ASSERT(active_ != 0, "invalidate_end() without invalidate_start()");
    if (--active_ != 0 || !is_invalidating()) return;
    ++seq_;
    for (MmuIntervalNotifier* n : deferred_) {
      if (!n->in_tree_) {
        tree_.push_back(n);
        n->in_tree_ = true;
      } else {
        tree_.erase(std::find(tree_.begin(), tree_.end(), n));
        n->in_tree_ = false;
      }
    }
    deferred_.clear();
  }
  wq_.notify_all();
}

// ---------------------------------------------------------------------------------------
// Interval notifiers

// mm/mmu_notifier.c mmu_interval_notifier_insert() / __mmu_interval_notifier_insert().
Result<std::unique_ptr<MmuIntervalNotifier>> MmuIntervalNotifier::insert(AddressSpace& space, uint64_t start, uint64_t length,
                                                                         InvalidateFn invalidate) {
  if (!invalidate) return make_error(EINVAL, "mmu_interval_notifier_insert: no invalidate callback");
  if (length == 0 || start + (length - 1) < start)
    return make_error(EOVERFLOW, "mmu_interval_notifier_insert: [" + format_hex(start) + ", +" + format_hex(length) +
                                     ") is empty or wraps");
  std::shared_ptr<MmuNotifierSubscriptions> subs;
  {
    // mmu_notifier_register(): the subscriptions are made once, under the mmap lock.
    std::lock_guard g(space.mmap_lock_);
    if (!space.notifiers_) space.notifiers_ = std::make_shared<MmuNotifierSubscriptions>();
    subs = space.notifiers_;
  }
  std::unique_ptr<MmuIntervalNotifier> n(new MmuIntervalNotifier());
  n->space_ = &space;
  n->subs_ = subs;
  n->start_ = start;
  n->last_ = start + (length - 1);
  n->invalidate_ = std::move(invalidate);
  std::lock_guard g(subs->lock_);
  if (subs->active_ != 0) {
    if (subs->is_invalidating()) {
      subs->deferred_.push_back(n.get());
    } else {
      subs->seq_ |= 1;
      subs->tree_.push_back(n.get());
      n->in_tree_ = true;
    }
    n->seq_.store(subs->seq_, std::memory_order_relaxed);
  } else {
    // "The starting seq for a subscription not under invalidation should be odd, not equal
    // to the current invalidate_seq".
    n->seq_.store(subs->seq_ - 1, std::memory_order_relaxed);
    subs->tree_.push_back(n.get());
    n->in_tree_ = true;
  }
  return n;
}

MmuIntervalNotifier::~MmuIntervalNotifier() { remove(); }

// mm/mmu_notifier.c mmu_interval_notifier_remove(): during an invalidation the removal is
// deferred and the caller waits until that invalidation ends (mmu_interval_seq_released()).
void MmuIntervalNotifier::remove() {
  if (removed_.exchange(true, std::memory_order_acq_rel)) return;
  MmuNotifierSubscriptions& s = *subs_;
  std::unique_lock g(s.lock_);
  uint64_t seq = 0;
  if (s.is_invalidating()) {
    if (!in_tree_) {
      s.deferred_.erase(std::find(s.deferred_.begin(), s.deferred_.end(), this));  // inserted but never in the tree
    } else {
      s.deferred_.push_back(this);
      seq = s.seq_;
    }
  } else {
    s.tree_.erase(std::find(s.tree_.begin(), s.tree_.end(), this));
    in_tree_ = false;
  }
  if (seq != 0) s.wq_.wait(g, [&] { return s.seq_ != seq; });
}

// mm/mmu_notifier.c mmu_interval_read_begin(): the subscription's sequence equal to the
// address space's means an invalidation of it is running: wait for mn_itree_inv_end().
uint64_t MmuIntervalNotifier::read_begin() {
  MmuNotifierSubscriptions& s = *subs_;
  std::unique_lock g(s.lock_);
  const uint64_t seq = seq_.load(std::memory_order_relaxed);
  if (seq == s.seq_) s.wq_.wait(g, [&] { return s.seq_ != seq; });
  return seq;
}

// ---------------------------------------------------------------------------------------
// The walk (mm/hmm.c)

struct HmmWalk {
  enum : unsigned { kNeedFault = 1, kNeedWriteFault = 2, kNeedAll = 3 };  // HMM_NEED_*

  // mm/hmm.c hmm_pte_need_fault(): the request is the entry masked by pfn_flags_mask, or-ed
  // with default_flags; a write request on a page the CPU may not write needs a write fault.
  static unsigned pte_need_fault(const HmmRange& r, uint64_t pfn_req_flags, uint64_t cpu_flags) noexcept {
    pfn_req_flags &= r.pfn_flags_mask;
    pfn_req_flags |= r.default_flags;
    if (!(pfn_req_flags & kHmmPfnReqFault)) return 0;
    if ((pfn_req_flags & kHmmPfnReqWrite) && !(cpu_flags & kHmmPfnWrite)) return kNeedFault | kNeedWriteFault;
    if (!(cpu_flags & kHmmPfnValid)) return kNeedFault;
    return 0;
  }

  // mm/hmm.c hmm_range_need_fault(): nothing can be requested when neither the defaults
  // nor the mask carry REQ_FAULT.
  static unsigned range_need_fault(const HmmRange& r, size_t i, size_t n, uint64_t cpu_flags) noexcept {
    if (!((r.default_flags | r.pfn_flags_mask) & kHmmPfnReqFault)) return 0;
    unsigned need = 0;
    for (size_t k = i; k < i + n; ++k) {
      need |= pte_need_fault(r, r.hmm_pfns[k], cpu_flags);
      if (need == kNeedAll) break;
    }
    return need;
  }

  // mm/hmm.c hmm_pfns_fill(): the sticky flags stay.
  static void fill(HmmRange& r, size_t i, size_t n, uint64_t cpu_flags) noexcept {
    for (size_t k = i; k < i + n; ++k) r.hmm_pfns[k] = (r.hmm_pfns[k] & kHmmPfnInoutFlags) | cpu_flags;
  }

  static std::string at(uint64_t a) { return "hmm_range_fault: " + format_hex(a); }

  // One pass of walk_page_range() from *last. 0: done; EBUSY with *last moved: a fault was
  // handled, walk again (the entries before *last hold their output); else the error.
  static Status walk(AddressSpace& as, HmmRange& r, uint64_t* last, bool* again) {
    *again = false;
    uint64_t cur = *last;
    auto it = as.vmas_.upper_bound(cur);
    if (it != as.vmas_.begin() && std::prev(it)->second.end > cur) --it;
    while (cur < r.end) {
      const size_t i = (cur - r.start) >> kPageShift;
      if (it == as.vmas_.end() || it->first > cur) {
        // mm/hmm.c hmm_vma_walk_hole() with no vma: EFAULT if a fault was asked, else ERROR.
        const uint64_t hole_end = it == as.vmas_.end() ? r.end : std::min(r.end, it->first);
        const size_t n = (hole_end - cur) >> kPageShift;
        if (range_need_fault(r, i, n, 0)) return make_error(EFAULT, at(cur) + " has no VMA");
        fill(r, i, n, kHmmPfnError);
        cur = hole_end;
        continue;
      }
      const uint64_t vs = it->first;
      AddressSpace::Vma& v = it->second;
      const uint64_t vend = std::min(r.end, v.end);
      const size_t n = (vend - cur) >> kPageShift;
      const uint64_t cpu = kHmmPfnValid | ((v.prot & Prot::write) ? kHmmPfnWrite : 0);
      // mm/hmm.c hmm_vma_walk_test(): VM_IO | VM_PFNMAP | VM_MIXEDMAP (a p2pmem VMA: its
      // pages went in with vm_insert_page()) or no VM_READ: ERROR, or EFAULT when a fault
      // was asked. physr resolves P2P VMAs through their chunk unless told not to.
      if (!(v.prot & Prot::read) || (v.kind == VmaKind::p2p && !r.resolve_p2p)) {
        if (range_need_fault(r, i, n, 0))
          return make_error(EFAULT, at(cur) + ": the " + std::string(vma_kind_name(v.kind)) + " VMA [" + format_hex(vs) +
                                        ", " + format_hex(v.end) + ") cannot be mirrored (" +
                                        (!(v.prot & Prot::read) ? "no read permission" : "VM_MIXEDMAP") + ")");
        fill(r, i, n, kHmmPfnError);
        cur = vend;
        ++it;
        continue;
      }
      if (range_need_fault(r, i, n, cpu) & kNeedWriteFault) {
        // mm/hmm.c hmm_vma_fault(): a write fault on a VMA without VM_WRITE.
        if (!(v.prot & Prot::write))
          return make_error(EPERM, at(cur) + ": write requested on the read-only " + std::string(vma_kind_name(v.kind)) +
                                       " VMA [" + format_hex(vs) + ", " + format_hex(v.end) + ")");
      }
      if (v.kind == VmaKind::p2p) {
        const uint64_t pfn = (v.chunk->c.span.base.value() >> kPageShift) + v.chunk_page + ((cur - vs) >> kPageShift);
        uint64_t* out = r.hmm_pfns.data() + i;
        for (size_t k = 0; k < n; ++k) out[k] = (out[k] & kHmmPfnInoutFlags) | (pfn + k) | cpu;
        cur = vend;
        ++it;
        continue;
      }
      const uint64_t* pfns = v.pfns.data() + ((cur - vs) >> kPageShift);
      uint64_t* out = r.hmm_pfns.data() + i;
      const bool may_fault = (r.default_flags | r.pfn_flags_mask) & kHmmPfnReqFault;
      for (size_t k = 0; k < n;) {
        const uint64_t pfn = pfns[k];
        if (pfn == 0) {
          // pte_none(): fault if asked, else 0 (sticky flags kept).
          if (may_fault && pte_need_fault(r, out[k], 0)) {
            // hmm_vma_fault() faults every page to the end of the PMD range, then the walk
            // restarts from this address (-EBUSY inside hmm_range_fault()).
            const uint64_t a = cur + (k << kPageShift);
            const uint64_t fend = std::min(vend, (a + kPmdSize) & ~(kPmdSize - 1));
            if (Status st = as.fault_in(a, fend); !st)
              return make_error(EFAULT, at(a) + ": the fault failed (" + st.error().to_string() + ")");
            *last = a;
            *again = true;
            return {};
          }
          out[k] &= kHmmPfnInoutFlags;
          ++k;
          continue;
        }
        if (v.order == kOrder2M && as.mem_->folio_order(pfn) == kOrder2M) {
          // A 2 MiB folio mapped whole at a 2 MiB aligned address is a PMD mapping:
          // pmd_to_hmm_pfn_flags() adds the order (PMD_SHIFT - PAGE_SHIFT).
          const uint64_t head = as.mem_->folio_head(pfn);
          const uint64_t fva = cur + (k << kPageShift) - ((pfn - head) << kPageShift);
          const uint64_t run = std::min<uint64_t>(n - k, kPmdPages - (pfn - head));
          const bool pmd = fva % kPmdSize == 0 && fva >= vs && fva + kPmdSize <= v.end;
          const uint64_t flags = cpu | (pmd ? uint64_t{kOrder2M} << kHmmPfnOrderShift : 0);
          for (uint64_t j = 0; j < run; ++j) out[k + j] = (out[k + j] & kHmmPfnInoutFlags) | (pfn + j) | flags;
          k += run;
          continue;
        }
        out[k] = (out[k] & kHmmPfnInoutFlags) | pfn | cpu;
        ++k;
      }
      cur = vend;
      ++it;
    }
    return {};
  }

  static const HostMemory& memory(const AddressSpace& as) noexcept { return *as.mem_; }

  static std::optional<PhysAddr> translate(const AddressSpace& as, uint64_t va) {
    uint64_t vs = 0;
    const AddressSpace::Vma* v = as.vma_at(va, &vs);
    if (!v) return std::nullopt;
    const uint64_t page = (va - vs) >> kPageShift, off = va & (kPageSize - 1);
    if (v->kind == VmaKind::p2p) return v->chunk->c.span.base + (((v->chunk_page + page) << kPageShift) + off);
    if (v->pfns[page] == 0) return std::nullopt;
    return PhysAddr((v->pfns[page] << kPageShift) + off);
  }

  // The provider and the bounds of the live chunk holding a (kInvalidProvider if none).
  static ProviderId chunk_of(const AddressSpace& as, uint64_t a, uint64_t* lo, uint64_t* hi) {
    auto it = as.chunks_.upper_bound(a);
    if (it == as.chunks_.begin()) return kInvalidProvider;
    --it;
    const PhysSpan s = it->second->c.span;
    if (!s.contains(PhysAddr(a))) return kInvalidProvider;
    *lo = s.base.value();
    *hi = s.base.value() + s.size;
    return it->second->c.provider;
  }
};

// mm/hmm.c hmm_range_fault(): walk, and walk again after each fault, giving up with EBUSY
// as soon as the notifier's sequence moved (mmu_interval_check_retry()).
Status hmm_range_fault(HmmRange& r) {
  if (!r.notifier) return make_error(EINVAL, "hmm_range_fault: no notifier");
  if (!r.notifier->inserted()) return make_error(EINVAL, "hmm_range_fault: the notifier was removed");
  if (r.start % kPageSize != 0 || r.end % kPageSize != 0 || r.start >= r.end)
    return make_error(EINVAL, "hmm_range_fault: [" + format_hex(r.start) + ", " + format_hex(r.end) +
                                  ") is not a non-empty span of whole 4 KiB pages");
  if (r.start < r.notifier->start() || r.end - 1 > r.notifier->end() - 1)
    return make_error(EINVAL, "hmm_range_fault: [" + format_hex(r.start) + ", " + format_hex(r.end) +
                                  ") lies outside the notifier's [" + format_hex(r.notifier->start()) + ", " +
                                  format_hex(r.notifier->end()) + ")");
  if (r.hmm_pfns.size() != (r.end - r.start) >> kPageShift)
    return make_error(EINVAL, "hmm_range_fault: " + std::to_string(r.hmm_pfns.size()) + " pfn entries for " +
                                  std::to_string((r.end - r.start) >> kPageShift) + " pages");
  AddressSpace& as = r.notifier->space();
  uint64_t last = r.start;
  for (;;) {
    if (r.notifier->check_retry(r.notifier_seq))
      return make_error(EBUSY, "hmm_range_fault: [" + format_hex(r.start) + ", " + format_hex(r.end) +
                                   ") was invalidated since read_begin() (sequence " + std::to_string(r.notifier_seq) + ")");
    bool again = false;
    PHYSR_RETURN_IF_ERROR(HmmWalk::walk(as, r, &last, &again));
    if (!again) return {};
  }
}

Result<RangeList> hmm_pfns_to_ranges(const AddressSpace& space, std::span<const uint64_t> pfns, uint64_t start) {
  RangeList list;
  const HostMemory& mem = HmmWalk::memory(space);
  uint64_t run_pfn = 0, run_len = 0, lo = 0, hi = 0;  // [lo, hi): the chunk last looked up, of provider `cached`
  ProviderId run_prov = kInvalidProvider, cached = kInvalidProvider;
  for (size_t i = 0; i < pfns.size(); ++i) {
    if (!(pfns[i] & kHmmPfnValid))
      return make_error(EFAULT, "hmm ranges: the page at " + format_hex(start + (i << kPageShift)) + " has no HMM_PFN_VALID");
    const uint64_t pfn = pfns[i] & ~kHmmPfnFlags, a = pfn << kPageShift;
    ProviderId prov = kHostMemory;
    if (!mem.contains(PhysAddr(a))) {
      if (a < lo || a >= hi) cached = HmmWalk::chunk_of(space, a, &lo, &hi);
      prov = cached;
      if (prov == kInvalidProvider)
        return make_error(EFAULT, "hmm ranges: the page at " + format_hex(start + (i << kPageShift)) + " maps " +
                                      format_hex(a) + ", which is neither host memory nor a live P2P chunk");
    }
    if (run_len != 0 && pfn == run_pfn + run_len && prov == run_prov) {
      ++run_len;
      continue;
    }
    if (run_len != 0) PHYSR_RETURN_IF_ERROR(list.append(PhysRange{PhysAddr(run_pfn << kPageShift), run_len << kPageShift, run_prov}));
    run_pfn = pfn;
    run_len = 1;
    run_prov = prov;
  }
  if (run_len != 0) PHYSR_RETURN_IF_ERROR(list.append(PhysRange{PhysAddr(run_pfn << kPageShift), run_len << kPageShift, run_prov}));
  return list;
}

std::optional<PhysAddr> cpu_translate(const AddressSpace& space, uint64_t va) { return HmmWalk::translate(space, va); }

// ---------------------------------------------------------------------------------------
// DMA mapping of HMM pfns (mm/hmm.c)

Status hmm_dma_map_alloc(HmmDmaMap& map, size_t n) {
  if (n == 0) return make_error(EINVAL, "hmm_dma_map_alloc: no entries");
  map.pfn_list.assign(n, 0);
  map.dma_list.assign(n, DmaSegment{});
  return {};
}

// mm/hmm.c hmm_dma_map_pfn(): an entry mapped already keeps its address; P2P memory is
// classified first (pci_p2pdma_state()): through the host bridge it is mapped with
// DMA_ATTR_MMIO and flagged HMM_PFN_P2PDMA, a bus address is returned as is with
// HMM_PFN_P2PDMA_BUS (physr's map_phys records it for DMA-API debug, so the record is
// dropped at once: the entry holds no mapping, as in Linux).
Result<DmaAddr> hmm_dma_map_pfn(DmaDevice& dev, HmmDmaMap& map, size_t idx) {
  if (idx >= map.pfn_list.size())
    return make_error(EINVAL, "hmm_dma_map_pfn: entry " + std::to_string(idx) + " of " + std::to_string(map.pfn_list.size()));
  uint64_t& e = map.pfn_list[idx];
  if (!(e & kHmmPfnValid)) return make_error(EINVAL, "hmm_dma_map_pfn: entry " + std::to_string(idx) + " is not HMM_PFN_VALID");
  if ((e & kHmmPfnDmaMapped) && !(e & kHmmPfnP2pdmaBus)) return map.dma_list[idx].addr;
  e &= ~(kHmmPfnP2pdma | kHmmPfnP2pdmaBus);
  PHYSR_ASSIGN_OR_RETURN_CTX(const DmaSegment seg, dev.map_phys(hmm_pfn_to_phys(e), kPageSize, DmaDirection::bidirectional),
                             "hmm_dma_map_pfn of entry " + std::to_string(idx));
  map.dma_list[idx] = seg;
  if (seg.flags & kDmaSegBusAddr) {
    PHYSR_RETURN_IF_ERROR(dev.unmap_phys(seg, DmaDirection::bidirectional));
    e |= kHmmPfnP2pdmaBus | kHmmPfnDmaMapped;
    return seg.addr;
  }
  if (seg.flags & kDmaSegMmio) e |= kHmmPfnP2pdma;
  e |= kHmmPfnDmaMapped;
  return seg.addr;
}

// mm/hmm.c hmm_dma_unmap_pfn(): only valid, mapped entries; bus addresses need no unmap.
Result<bool> hmm_dma_unmap_pfn(DmaDevice& dev, HmmDmaMap& map, size_t idx) {
  if (idx >= map.pfn_list.size())
    return make_error(EINVAL, "hmm_dma_unmap_pfn: entry " + std::to_string(idx) + " of " + std::to_string(map.pfn_list.size()));
  uint64_t& e = map.pfn_list[idx];
  constexpr uint64_t kValidDma = kHmmPfnValid | kHmmPfnDmaMapped;
  if ((e & kValidDma) != kValidDma) return false;
  if (!(e & kHmmPfnP2pdmaBus)) PHYSR_RETURN_IF_ERROR(dev.unmap_phys(map.dma_list[idx], DmaDirection::bidirectional));
  e &= ~(kHmmPfnDmaMapped | kHmmPfnP2pdma | kHmmPfnP2pdmaBus);
  map.dma_list[idx] = DmaSegment{};
  return true;
}

// ---------------------------------------------------------------------------------------
// The device page table

Result<std::unique_ptr<HmmMirror>> HmmMirror::create(AddressSpace& space, DmaDevice& dev, const HmmMirrorOptions& o) {
  if (o.len == 0 || o.start % kPageSize != 0 || o.len % kPageSize != 0)
    return make_error(EINVAL, "hmm mirror: [" + format_hex(o.start) + ", +" + format_hex(o.len) + ") is not a non-empty span of whole pages");
  if (o.fault_pages == 0) return make_error(EINVAL, "hmm mirror: fault_pages 0");
  std::unique_ptr<HmmMirror> m(new HmmMirror(space, dev, o));
  PHYSR_RETURN_IF_ERROR(hmm_dma_map_alloc(m->map_, o.len >> kPageShift));
  HmmMirror* self = m.get();
  PHYSR_ASSIGN_OR_RETURN(m->notifier_, MmuIntervalNotifier::insert(space, o.start, o.len,
      [self](MmuIntervalNotifier& sub, const MmuNotifierRange& r, uint64_t seq) { return self->invalidate(sub, r, seq); }));
  return m;
}

HmmMirror::~HmmMirror() { detach(); }

void HmmMirror::detach() {
  if (notifier_) notifier_->remove();  // waits for a running invalidation; callbacks stop
  std::lock_guard g(lock_);
  detached_ = true;
  unmap_locked(0, map_.pfn_list.size());
}

// The notifier's callback (Documentation/mm/hmm.rst): under the driver lock, set the
// sequence, then drop every entry of the span from the device page table.
bool HmmMirror::invalidate(MmuIntervalNotifier& sub, const MmuNotifierRange& r, uint64_t cur_seq) {
  std::lock_guard g(lock_);
  sub.set_seq(cur_seq);
  ++stats_.invalidations;
  const uint64_t s = std::max(r.start, opt_.start), e = std::min(r.end, opt_.start + opt_.len);
  if (s < e) unmap_locked((s - opt_.start) >> kPageShift, (e - opt_.start + kPageSize - 1) >> kPageShift);
  return true;
}

void HmmMirror::unmap_locked(size_t first, size_t last) {
  for (size_t i = first; i < last; ++i) {
    uint64_t& e = map_.pfn_list[i];
    if (e == 0) continue;
    auto r = hmm_dma_unmap_pfn(*dev_, map_, i);
    PHYSR_ASSERT(r.has_value(), "the mirror's DMA unmap failed");
    if (r.has_value() && *r) --stats_.mapped_pages;
    e = 0;
  }
}

std::optional<DeviceTranslation> HmmMirror::entry_locked(uint64_t va, bool write) const {
  const size_t i = (va - opt_.start) >> kPageShift;
  const uint64_t e = map_.pfn_list[i];
  if (!(e & kHmmPfnValid) || !(e & kHmmPfnDmaMapped) || (write && !(e & kHmmPfnWrite))) return std::nullopt;
  const DmaSegment& seg = map_.dma_list[i];
  return DeviceTranslation{seg.addr + (va & (kPageSize - 1)), e, seg.flags};
}

std::optional<DeviceTranslation> HmmMirror::lookup(uint64_t va, bool write) const {
  if (va < opt_.start || va - opt_.start >= opt_.len) return std::nullopt;
  std::lock_guard g(lock_);
  if (detached_) return std::nullopt;
  return entry_locked(va, write);
}

HmmMirrorStats HmmMirror::stats() const {
  std::lock_guard g(lock_);
  return stats_;
}

Result<DeviceTranslation> HmmMirror::access(uint64_t va, bool write, const DmaFn& dma) {
  if (va < opt_.start || va - opt_.start >= opt_.len)
    return make_error(EFAULT, "device access at " + format_hex(va) + ": outside the mirror's [" + format_hex(opt_.start) + ", " +
                                  format_hex(opt_.start + opt_.len) + ")");
  {
    std::lock_guard g(lock_);
    if (detached_) return make_error(ENODEV, "device access at " + format_hex(va) + ": the mirror is detached");
    if (auto t = entry_locked(va, write)) {
      if (dma) dma(*t);
      return *t;
    }
    ++stats_.faults;
  }
  return fault(va, write, dma);
}

// The driver's fault loop of Documentation/mm/hmm.rst (and ib_umem_odp_map_dma_and_lock()):
// read_begin, hmm_range_fault under the mmap lock, then under the driver lock read_retry and
// only then the device page table. hmm_range_fault fills a private array, copied into the
// table under the lock, so an invalidation never races with the walk's writes.
Result<DeviceTranslation> HmmMirror::fault(uint64_t va, bool write, const DmaFn& dma) {
  const uint64_t window = uint64_t{opt_.fault_pages} << kPageShift;
  const uint64_t end_all = opt_.start + opt_.len;
  const uint64_t first = std::max(opt_.start, va - (va - opt_.start) % window);
  const uint64_t last = std::min(end_all, first + window);
  const size_t n = (last - first) >> kPageShift, at = (va - first) >> kPageShift;
  std::vector<uint64_t> pfns(n);
  const auto deadline = std::chrono::steady_clock::now() + opt_.retry_timeout;
  uint32_t retries = 0;
  auto give_up = [&]() -> Status {
    {
      std::lock_guard g(lock_);
      ++stats_.retries;
    }
    if (++retries <= opt_.max_retries && std::chrono::steady_clock::now() < deadline) return {};
    return make_error(EBUSY, "device fault at " + format_hex(va) + ": the notifier's sequence did not settle after " +
                                 std::to_string(retries) + " retries (limits: " + std::to_string(opt_.max_retries) + " retries, " +
                                 std::to_string(opt_.retry_timeout.count()) + " ms); is a stale notifier_seq being checked?");
  };
  for (;;) {
    std::fill(pfns.begin(), pfns.end(), 0);
    pfns[at] = kHmmPfnReqFault | (write ? kHmmPfnReqWrite : 0);
    HmmRange r{.notifier = notifier_.get(), .notifier_seq = notifier_->read_begin(), .start = first, .end = last,
               .hmm_pfns = pfns, .default_flags = 0, .pfn_flags_mask = kHmmPfnReqFault | kHmmPfnReqWrite};
    Status st;
    {
      std::lock_guard g(space_->mmap_lock());
      st = hmm_range_fault(r);
    }
    if (opt_.after_walk) opt_.after_walk(va);
    if (!st) {
      if (st.error().code != EBUSY) return std::move(st).error().with_context("device fault at " + format_hex(va));
      PHYSR_RETURN_IF_ERROR(give_up());
      continue;
    }
    std::unique_lock g(lock_);
    if (detached_) return make_error(ENODEV, "device fault at " + format_hex(va) + ": the mirror was detached during the fault");
    if (notifier_->read_retry(r.notifier_seq)) {
      g.unlock();
      PHYSR_RETURN_IF_ERROR(give_up());
      continue;
    }
    const size_t base = (first - opt_.start) >> kPageShift;
    for (size_t k = 0; k < n; ++k) {
      uint64_t& e = map_.pfn_list[base + k];
      const uint64_t in = pfns[k];
      if (!(in & kHmmPfnValid) || (in & kHmmPfnError)) continue;
      const uint64_t want = in & ~kHmmPfnInoutFlags;
      if ((e & kHmmPfnDmaMapped) && (e & ~kHmmPfnInoutFlags) == want) continue;  // mapped already
      if (e != 0) {
        auto u = hmm_dma_unmap_pfn(*dev_, map_, base + k);
        if (u.has_value() && *u) --stats_.mapped_pages;
      }
      e = want;
      auto d = hmm_dma_map_pfn(*dev_, map_, base + k);
      if (!d) {
        e = 0;
        if (k == at) return std::move(d).error().with_context("device fault at " + format_hex(va));
        continue;
      }
      ++stats_.mapped_pages;
    }
    if (auto t = entry_locked(va, write)) {
      if (dma) dma(*t);
      return *t;
    }
    return make_error(EFAULT, "device fault at " + format_hex(va) + ": no entry after the fault");
  }
}

// ---------------------------------------------------------------------------------------
// AddressSpace operations that invalidate (munmap is in uspace.cpp)

void AddressSpace::split_at(uint64_t a) {
  auto it = vmas_.upper_bound(a);
  if (it == vmas_.begin()) return;
  --it;
  if (it->first >= a || it->second.end <= a) return;
  Vma& v = it->second;
  const uint64_t off = (a - it->first) >> kPageShift;
  Vma right{.end = v.end, .kind = v.kind, .prot = v.prot, .shared = v.shared, .order = v.order, .file = v.file, .sparse = v.sparse};
  if (v.kind == VmaKind::p2p) {
    right.chunk = v.chunk;
    right.chunk_page = v.chunk_page + off;
  } else {
    right.pfns.assign(v.pfns.begin() + static_cast<std::ptrdiff_t>(off), v.pfns.end());
    v.pfns.resize(off);
  }
  v.end = a;
  vmas_.emplace_hint(std::next(it), a, std::move(right));
}

// The fault path (handle_mm_fault() of anonymous memory, do_anonymous_page()): every
// missing page of [first, end) gets a new 4 KiB page.
Status AddressSpace::fault_in(uint64_t first, uint64_t end) {
  auto it = vmas_.upper_bound(first);
  if (it != vmas_.begin()) --it;
  for (; it != vmas_.end() && it->first < end; ++it) {
    Vma& v = it->second;
    if (!v.sparse || v.end <= first) continue;
    const uint64_t s = std::max(first, it->first), e = std::min(end, v.end);
    for (uint64_t a = s; a < e; a += kPageSize) {
      uint64_t& pfn = v.pfns[(a - it->first) >> kPageShift];
      if (pfn != 0) continue;
      PHYSR_ASSIGN_OR_RETURN_CTX(pfn, mem_->alloc_folio(kOrder4K), "fault at " + format_hex(a));
    }
  }
  return {};
}

// mm/mprotect.c do_mprotect_pkey(): the start page-aligned (EINVAL), length 0 is success,
// every page mapped (ENOMEM; physr checks before changing anything), VMAs split at the ends;
// change_protection() notifies MMU_NOTIFY_PROTECTION_VMA.
Status AddressSpace::mprotect(uint64_t addr, uint64_t len_in, ProtFlags prot) {
  if (addr % kPageSize != 0) return make_error(EINVAL, "mprotect: address " + format_hex(addr) + " is not 4 KiB aligned");
  if (len_in == 0) return {};
  const uint64_t len = (len_in + kPageSize - 1) & ~(kPageSize - 1);
  if (len < len_in || addr > kTaskSize || len > kTaskSize - addr)
    return make_error(ENOMEM, "mprotect: " + format_hex(addr) + " + " + format_hex(len_in) + " runs past the top of user space");
  const uint64_t end = addr + len;
  auto it = vmas_.upper_bound(addr);
  if (it != vmas_.begin()) --it;
  for (uint64_t cur = addr; cur < end; ++it) {
    if (it == vmas_.end() || it->first > cur || it->second.end <= cur)
      return make_error(ENOMEM, "mprotect: address " + format_hex(cur) + " is not mapped");
    cur = it->second.end;
  }
  const MmuNotifierScope notify(notifiers_.get(), {addr, end, MmuNotifyEvent::protection_vma});
  split_at(addr);
  split_at(end);
  for (it = vmas_.find(addr); it != vmas_.end() && it->first < end; ++it) it->second.prot = prot;
  return {};
}

// Page migration: mm/migrate_device.c migrate_vma_collect() notifies MMU_NOTIFY_MIGRATE;
// a pinned folio cannot move (folio_maybe_dma_pinned(): its expected reference count does
// not match, migrate_folio() fails with -EAGAIN).
Result<uint64_t> AddressSpace::migrate(uint64_t addr, uint64_t len_in) {
  if (addr % kPageSize != 0) return make_error(EINVAL, "migrate: address " + format_hex(addr) + " is not 4 KiB aligned");
  if (len_in == 0) return make_error(EINVAL, "migrate: length 0");
  const uint64_t len = (len_in + kPageSize - 1) & ~(kPageSize - 1);
  if (len < len_in || addr > kTaskSize || len > kTaskSize - addr)
    return make_error(EINVAL, "migrate: " + format_hex(addr) + " + " + format_hex(len_in) + " runs past the top of user space");
  const uint64_t end = addr + len;
  auto it = vmas_.upper_bound(addr);
  if (it != vmas_.begin() && std::prev(it)->second.end > addr) --it;
  const MmuNotifierScope notify(notifiers_.get(), {addr, end, MmuNotifyEvent::migrate}, it != vmas_.end() && it->first < end);
  uint64_t moved = 0;
  for (; it != vmas_.end() && it->first < end; ++it) {
    Vma& v = it->second;
    if (v.kind != VmaKind::anon || v.order != kOrder4K) continue;
    const uint64_t s = std::max(addr, it->first), e = std::min(end, v.end);
    for (uint64_t a = s; a < e; a += kPageSize) {
      uint64_t& pfn = v.pfns[(a - it->first) >> kPageShift];
      if (pfn == 0 || mem_->maybe_dma_pinned(pfn)) continue;
      auto np = mem_->alloc_folio(kOrder4K);
      if (!np) {
        if (moved == 0) return std::move(np).error().with_context("migrate " + format_hex(a));
        return moved;
      }
      mem_->put_folio(pfn, 1);
      pfn = *np;
      ++moved;
    }
  }
  return moved;
}

Result<size_t> AddressSpace::revoke_p2p(PhysSpan span) {
  std::vector<std::pair<uint64_t, uint64_t>> hit;
  for (const auto& [s, v] : vmas_)
    if (v.kind == VmaKind::p2p && v.chunk->c.span.overlaps(span)) hit.emplace_back(s, v.end);
  for (const auto& [s, e] : hit) PHYSR_RETURN_IF_ERROR(unmap_range(s, e - s, MmuNotifyEvent::p2p_revoke));
  return hit.size();
}

}  // namespace physr::mem
