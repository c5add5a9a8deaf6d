// Pinning user memory: pin_user_pages() / iov_iter_extract_pages() into a RangeList.
#include <algorithm>
#include <atomic>

#include "mem/uspace_detail.hpp"
#include "physr/mem/uspace.hpp"

namespace physr::mem {

namespace {
// Pin ids are unique across address spaces, so a Pinned given to the wrong one is refused.
std::atomic<uint64_t> next_pin_id{1};
}  // namespace

Result<Pinned> AddressSpace::pin(uint64_t addr, uint64_t len, FollFlags flags) {
  if (len == 0) return make_error(EINVAL, "pin: length 0");
  if (addr > kTaskSize || len > kTaskSize - addr)
    return make_error(EFAULT, "pin: " + format_hex(addr) + " + " + format_hex(len) + " runs past the top of user space");
  const uint64_t first = addr & ~(kPageSize - 1);
  const uint64_t end = (addr + len + kPageSize - 1) & ~(kPageSize - 1);

  // Pass 1, nothing changes: every page is mapped and may be pinned. All or nothing, where
  // __get_user_pages() would return a short count (see docs/mem-user.md).
  auto it = vmas_.upper_bound(first);
  if (it != vmas_.begin()) --it;
  bool missing = false;
  for (uint64_t cur = first; cur < end; ++it) {
    if (it == vmas_.end() || it->first > cur || it->second.end <= cur)
      return make_error(EFAULT, "pin: address " + format_hex(std::max(cur, addr)) + " is not mapped");
    const Vma& v = it->second;
    // mm/gup.c check_vma_flags(): FOLL_WRITE on a VMA without VM_WRITE is EFAULT.
    if ((flags & Foll::write) && !(v.prot & Prot::write))
      return make_error(EFAULT, std::string("pin: the ") + vma_kind_name(v.kind) + " VMA [" + format_hex(it->first) +
                                    ", " + format_hex(v.end) + ") is not writable");
    // mm/gup.c try_grab_folio(): a P2P page without FOLL_PCI_P2PDMA is EREMOTEIO.
    if (v.kind == VmaKind::p2p && !(flags & Foll::pci_p2pdma))
      return make_error(EREMOTEIO, "pin: address " + format_hex(std::max(cur, addr)) + " is P2P memory of provider " +
                                       std::to_string(v.chunk->c.provider) + " (" + v.chunk->source->name() +
                                       ") and FOLL_PCI_P2PDMA is not set");
    missing |= v.sparse;
    cur = v.end;
  }
  // mm/gup.c __get_user_pages() -> faultin_page(): missing pages are faulted in first
  // (and stay, as in Linux, even if the pin then fails).
  if (missing) PHYSR_RETURN_IF_ERROR(fault_in(first, end));

  // Pass 2: build the list and count the pins. Pieces of different providers never merge
  // (RangeList's builders; include/linux/memremap.h zone_device_pages_have_same_pgmap()).
  Pinned p;
  RangeList& list = p.ranges_;
  it = vmas_.upper_bound(first);
  --it;
  for (uint64_t cur = first; cur < end; ++it) {
    const uint64_t vs = it->first;
    Vma& v = it->second;
    const uint64_t stop = std::min(end, v.end);
    const uint64_t pi = (cur - vs) >> kPageShift, n = (stop - cur) >> kPageShift;
    if (v.kind == VmaKind::p2p) {
      Chunk& c = *v.chunk;
      const uint64_t cp = v.chunk_page + pi;
      PHYSR_RETURN_IF_ERROR(list.append(PhysRange{c.c.span.base + (cp << kPageShift), n << kPageShift, c.c.provider}));
      for (uint64_t k = 0; k < n; ++k) ++c.pins[cp + k];
      c.pinned += n;
    } else if (v.order == kOrder4K) {
      // Every folio of the VMA is one page: the pfn builder, then one pin per page at the
      // page itself (its own head).
      const std::span<const uint64_t> pfns(v.pfns.data() + pi, n);
      list.reserve(n);
      PHYSR_RETURN_IF_ERROR(list.append_pfns(pfns));
      uint32_t* pins = mem_->pins_.data();
      const uint64_t base = mem_->base_pfn_;
      for (uint64_t pfn : pfns) ++pins[pfn - base];
      mem_->pinned_ += n;
    } else {
      // Large folios: one piece and one pin update per run of pages within a folio, as
      // GUP grabs a folio once for all its pages (try_grab_folio(folio, refs, flags)).
      for (uint64_t i = pi; i < pi + n;) {
        const uint64_t pfn = v.pfns[i];
        const uint64_t folio_end = mem_->folio_head(pfn) + (uint64_t{1} << mem_->folio_order(pfn));
        const uint64_t k = std::min(pi + n - i, folio_end - pfn);
        PHYSR_ASSERT(v.pfns[i + k - 1] == pfn + k - 1, "a VMA maps a folio's pages in order");
        PHYSR_RETURN_IF_ERROR(list.append(PhysRange{PhysAddr(pfn << kPageShift), k << kPageShift, kHostMemory}));
        mem_->add_pins(pfn, static_cast<uint32_t>(k));
        i += k;
      }
    }
    p.pages_ += n;
    cur = stop;
  }
  if (addr != first || addr + len != end) {
    // iov_iter_extract_pages() returns whole pages and the offset into the first; the
    // caller's list holds exactly the bytes, unpin walks the whole pages.
    PHYSR_ASSIGN_OR_RETURN(const RangeSlice s, list.slice(addr - first, len));
    p.pinned_ = std::move(list);
    p.ranges_ = s.to_list();
    p.trimmed_ = true;
  }
  p.addr_ = addr;
  p.len_ = len;
  p.flags_ = flags;
  p.id_ = next_pin_id.fetch_add(1, std::memory_order_relaxed);
  live_pins_.insert(p.id_);
  pinned_pages_ += p.pages_;
  return p;
}

Status AddressSpace::unpin_list(const RangeList& list) {
  Status result;
  for (const PhysRange r : list) {
    uint64_t a = r.base.value();
    const uint64_t e = a + r.size;
    if (r.provider == kHostMemory) {
      for (uint64_t pfn = a >> kPageShift, last = e >> kPageShift; pfn < last;) {
        const uint64_t i = pfn - mem_->base_pfn_;
        if (mem_->order_[i] == kOrder4K) {  // a page of its own: the common scattered case
          PHYSR_ASSERT(mem_->pins_[i] != 0, "folio pin count underflow");
          --mem_->pinned_;
          if (--mem_->pins_[i] == 0 && mem_->refs_[i] == 0) mem_->free_folio(pfn);
          ++pfn;
          continue;
        }
        const uint64_t folio_end = mem_->folio_head(pfn) + (uint64_t{1} << mem_->folio_order(pfn));
        const uint64_t k = std::min(last, folio_end) - pfn;
        mem_->drop_pins(pfn, static_cast<uint32_t>(k));
        pfn += k;
      }
      continue;
    }
    while (a < e) {  // a range of one provider may run over adjacent chunks
      auto ci = chunks_.upper_bound(a);
      PHYSR_ASSERT(ci != chunks_.begin(), "a pinned P2P page belongs to a live chunk");
      --ci;
      const std::shared_ptr<Chunk> c = ci->second;
      const uint64_t cstart = c->c.span.base.value(), cend = cstart + c->c.span.size;
      PHYSR_ASSERT(a >= cstart && a < cend, "a pinned P2P page belongs to a live chunk");
      const uint64_t stop = std::min(e, cend);
      for (uint64_t pg = (a - cstart) >> kPageShift; pg < (stop - cstart) >> kPageShift; ++pg) --c->pins[pg];
      c->pinned -= (stop - a) >> kPageShift;
      if (Status st = maybe_release(*c); !st && result) result = std::move(st);
      a = stop;
    }
  }
  return result;
}

// mm/gup.c unpin_user_pages(): every page gives back the pin it took.
Status AddressSpace::unpin(Pinned&& p) {
  if (p.id_ == 0 || live_pins_.erase(p.id_) == 0)
    return make_error(EINVAL, "unpin: " + (p.id_ == 0 ? std::string("an empty Pinned") :
                                           "pin " + std::to_string(p.id_) + " is not live in this address space"));
  pinned_pages_ -= p.pages_;
  Status st = unpin_list(p.trimmed_ ? p.pinned_ : p.ranges_);
  p = Pinned();
  return st;
}

}  // namespace physr::mem
