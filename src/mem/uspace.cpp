// Host pages, files and process address spaces: mmap and munmap. Pinning is in pin.cpp.
#include "physr/mem/uspace.hpp"

#include <algorithm>
#include <utility>

#include "mem/uspace_detail.hpp"
#include "physr/mem/hmm.hpp"

namespace physr::mem {

namespace {
constexpr uint64_t kFolio2MPages = uint64_t{1} << kOrder2M;

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string span_text(uint64_t start, uint64_t end) { return "[" + format_hex(start) + ", " + format_hex(end) + ")"; }
}  // namespace

const char* vma_kind_name(VmaKind k) noexcept {
  switch (k) {
    case VmaKind::anon: return "anonymous";
    case VmaKind::file: return "file-backed";
    case VmaKind::p2p: return "P2P";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------
// HostMemory

Result<std::unique_ptr<HostMemory>> HostMemory::create(PhysSpan ram, uint64_t seed) {
  const uint64_t align = kFolio2MPages << kPageShift;
  if (ram.empty() || ram.base.value() % align != 0 || ram.size % align != 0 || ram.wraps() ||
      ram.base.value() + ram.size > kPhysAddrLimit || ram.base.value() == 0)
    return make_error(EINVAL, "host memory [" + format_hex(ram.base.value()) + ", +" + format_hex(ram.size) +
                                  ") must be non-empty, 2 MiB aligned, above 0 and below 2^52");
  std::unique_ptr<HostMemory> m(new HostMemory());
  m->ram_ = ram;
  m->base_pfn_ = ram.base.value() >> kPageShift;
  m->seed_ = seed;
  const uint64_t pages = ram.size >> kPageShift;
  m->refs_.assign(pages, 0);
  m->pins_.assign(pages, 0);
  m->order_.assign(pages, 0);
  for (uint64_t b = pages; b >= kFolio2MPages; b -= kFolio2MPages) m->free_blocks_.push_back(m->base_pfn_ + b - kFolio2MPages);
  return m;
}

Result<uint64_t> HostMemory::alloc_folio(unsigned order) {
  if (order != kOrder4K && order != kOrder2M)
    return make_error(EINVAL, "folio order " + std::to_string(order) + " is neither 0 (4 KiB) nor 9 (2 MiB)");
  uint64_t head = 0;
  if (order == kOrder2M) {
    if (free_blocks_.empty()) return make_error(ENOMEM, "host memory has no free 2 MiB block");
    head = free_blocks_.back();
    free_blocks_.pop_back();
    std::fill_n(order_.begin() + static_cast<std::ptrdiff_t>(head - base_pfn_), kFolio2MPages, uint8_t{kOrder2M});
  } else {
    if (free_pages_.empty()) {
      if (free_blocks_.empty()) return make_error(ENOMEM, "host memory has no free page");
      // Split a block into pages handed out in a shuffled order: user buffers get scattered pfns.
      const uint64_t b = free_blocks_.back();
      free_blocks_.pop_back();
      const size_t at = free_pages_.size();
      for (uint64_t i = 0; i < kFolio2MPages; ++i) free_pages_.push_back(b + i);
      for (size_t i = free_pages_.size() - 1; i > at; --i)
        std::swap(free_pages_[i], free_pages_[at + splitmix(seed_) % (i - at + 1)]);
    }
    head = free_pages_.back();
    free_pages_.pop_back();
    order_[head - base_pfn_] = kOrder4K;
  }
  refs_[head - base_pfn_] = 1;
  ++folios_;
  return head;
}

void HostMemory::get_folio(uint64_t pfn, uint32_t n) noexcept { refs_[folio_head(pfn) - base_pfn_] += n; }

void HostMemory::put_folio(uint64_t pfn, uint32_t n) noexcept {
  const uint64_t head = folio_head(pfn);
  uint32_t& r = refs_[head - base_pfn_];
  PHYSR_ASSERT(r >= n, "folio reference count underflow");
  r -= n;
  if (r == 0 && pins_[head - base_pfn_] == 0) free_folio(head);
}

void HostMemory::drop_pins(uint64_t pfn, uint32_t pages) noexcept {
  const uint64_t head = folio_head(pfn);
  uint32_t& p = pins_[head - base_pfn_];
  PHYSR_ASSERT(p >= pages, "folio pin count underflow");
  p -= pages;
  pinned_ -= pages;
  if (p == 0 && refs_[head - base_pfn_] == 0) free_folio(head);
}

void HostMemory::free_folio(uint64_t head) noexcept {
  --folios_;
  if (order_[head - base_pfn_] == kOrder2M) {
    std::fill_n(order_.begin() + static_cast<std::ptrdiff_t>(head - base_pfn_), kFolio2MPages, uint8_t{0});
    free_blocks_.push_back(head);
  } else {
    free_pages_.push_back(head);
  }
}

HostMemoryStats HostMemory::stats() const noexcept {
  return HostMemoryStats{.total_pages = ram_.size >> kPageShift,
                         .free_pages = free_blocks_.size() * kFolio2MPages + free_pages_.size(),
                         .folios = folios_,
                         .pinned_pages = pinned_};
}

// ---------------------------------------------------------------------------------------
// HostFile

Result<std::unique_ptr<HostFile>> HostFile::create(HostMemory& memory, std::string name, uint64_t size, unsigned order) {
  if (size == 0) return make_error(EINVAL, "file " + name + ": size 0");
  if (order != kOrder4K && order != kOrder2M)
    return make_error(EINVAL, "file " + name + ": folio order " + std::to_string(order) + " is neither 0 nor 9");
  const uint64_t unit = kPageSize << order;
  if (size > kPhysAddrLimit) return make_error(EINVAL, "file " + name + ": size " + format_hex(size) + " is too large");
  size = (size + unit - 1) / unit * unit;
  std::unique_ptr<HostFile> f(new HostFile(memory, std::move(name), size, order));
  f->folios_.assign(size / unit, 0);
  return f;
}

HostFile::~HostFile() {
  for (uint64_t head : folios_)
    if (head != 0) mem_->put_folio(head, 1);
}

size_t HostFile::cached_pages() const noexcept {
  return static_cast<size_t>(std::count_if(folios_.begin(), folios_.end(), [](uint64_t h) { return h != 0; })) << order_;
}

Result<uint64_t> HostFile::page(uint64_t index) {
  uint64_t& head = folios_[index >> order_];
  if (head == 0) {
    PHYSR_ASSIGN_OR_RETURN(head, mem_->alloc_folio(order_));  // the page cache's reference
  }
  return head + (index & ((uint64_t{1} << order_) - 1));
}

// ---------------------------------------------------------------------------------------
// AddressSpace: mmap and munmap

AddressSpace::~AddressSpace() {
  PHYSR_ASSERT(live_pins_.empty(), "an AddressSpace destroyed with pins still live");
  // First out of every allocate file's i_mapping (waiting for an unmap_mapping_range() in
  // progress on another thread), so no provider removal reaches it while it goes.
  for (P2PChunkSource* s : sources_) s->unmapped_by(*this);
  (void)munmap(0, kTaskSize);
}

// mm/mmap.c do_mmap() and __get_unmapped_area(): the length is page-aligned, a fixed address
// must end below TASK_SIZE (ENOMEM) and be page-aligned (EINVAL), and MAP_FIXED_NOREPLACE
// refuses an overlap (EEXIST).
Result<uint64_t> AddressSpace::place(const MmapOptions& opt, uint64_t len) {
  if (opt.len == 0) return make_error(EINVAL, "mmap: length 0");
  if (len > kTaskSize || len < opt.len) return make_error(ENOMEM, "mmap: length " + format_hex(opt.len) + " exceeds the address space");
  if (opt.addr != 0) {
    if (opt.addr > kTaskSize - len)
      return make_error(ENOMEM, "mmap: " + span_text(opt.addr, opt.addr + len) + " runs past the top of user space " +
                                    format_hex(kTaskSize));
    if (opt.addr % kPageSize != 0) return make_error(EINVAL, "mmap: address " + format_hex(opt.addr) + " is not 4 KiB aligned");
    auto it = vmas_.lower_bound(opt.addr + len);
    if (it != vmas_.begin() && std::prev(it)->second.end > opt.addr) {
      --it;
      return make_error(EEXIST, "mmap: " + span_text(opt.addr, opt.addr + len) + " overlaps the " +
                                    vma_kind_name(it->second.kind) + " VMA " + span_text(it->first, it->second.end));
    }
    return opt.addr;
  }
  uint64_t cand = kMmapBase;
  auto it = vmas_.lower_bound(cand);
  if (it != vmas_.begin() && std::prev(it)->second.end > cand) cand = std::prev(it)->second.end;
  for (; it != vmas_.end() && it->first < cand + len; ++it) cand = std::max(cand, it->second.end);
  if (cand > kTaskSize - len) return make_error(ENOMEM, "mmap: no gap of " + format_hex(len) + " bytes is left");
  return cand;
}

void AddressSpace::insert(uint64_t start, Vma v) { vmas_.emplace(start, std::move(v)); }

Result<uint64_t> AddressSpace::mmap_anon(const MmapOptions& opt) {
  if (opt.order != kOrder4K && opt.order != kOrder2M)
    return make_error(EINVAL, "mmap: folio order " + std::to_string(opt.order) + " is neither 0 (4 KiB) nor 9 (2 MiB)");
  const uint64_t unit = kPageSize << opt.order;
  const uint64_t len = (opt.len + unit - 1) & ~(unit - 1);
  if (!opt.populate && opt.order != kOrder4K)
    return make_error(EINVAL, "mmap: only 4 KiB anonymous memory may be left unpopulated");
  PHYSR_ASSIGN_OR_RETURN(const uint64_t start, place(opt, len));
  Vma v{.end = start + len, .kind = VmaKind::anon, .prot = opt.prot, .shared = opt.shared, .order = opt.order};
  const uint64_t pages = len >> kPageShift;
  if (!opt.populate) {  // every page missing (pfn 0) until faulted in
    v.pfns.assign(pages, 0);
    v.sparse = true;
    insert(start, std::move(v));
    return start;
  }
  v.pfns.reserve(pages);
  for (uint64_t i = 0; i < pages; i += uint64_t{1} << opt.order) {
    auto head = mem_->alloc_folio(opt.order);
    if (!head) {
      drop_pages(v, 0, v.pfns.size());
      return std::move(head).error().with_context("mmap " + span_text(start, start + len));
    }
    // The folio's first reference becomes the mapping's reference on its first page.
    if (opt.order == kOrder2M) mem_->get_folio(*head, static_cast<uint32_t>(kFolio2MPages - 1));
    for (uint64_t k = 0; k < (uint64_t{1} << opt.order); ++k) v.pfns.push_back(*head + k);
  }
  insert(start, std::move(v));
  return start;
}

Result<uint64_t> AddressSpace::mmap_file(HostFile& file, const MmapOptions& opt) {
  const uint64_t len = (opt.len + kPageSize - 1) & ~(kPageSize - 1);
  if (opt.offset % kPageSize != 0)
    return make_error(EINVAL, "mmap " + file.name() + ": offset " + format_hex(opt.offset) + " is not 4 KiB aligned");
  PHYSR_ASSIGN_OR_RETURN(const uint64_t start, place(opt, len));
  if (opt.offset > file.size() || len > file.size() - opt.offset)
    return make_error(EINVAL, "mmap " + file.name() + ": offset " + format_hex(opt.offset) + " + " + format_hex(len) +
                                  " runs past the file's " + format_hex(file.size()) + " bytes");
  Vma v{.end = start + len, .kind = VmaKind::file, .prot = opt.prot, .shared = opt.shared, .order = file.order(), .file = &file};
  const uint64_t first = opt.offset >> kPageShift, pages = len >> kPageShift;
  v.pfns.reserve(pages);
  for (uint64_t i = 0; i < pages; ++i) {
    auto pfn = file.page(first + i);
    if (!pfn) {
      drop_pages(v, 0, v.pfns.size());
      return std::move(pfn).error().with_context("mmap " + file.name());
    }
    mem_->get_folio(*pfn, 1);
    v.pfns.push_back(*pfn);
  }
  // A VMA of a 2 MiB-folio file may start or end inside a folio; pinning walks it by folio.
  insert(start, std::move(v));
  return start;
}

// drivers/pci/p2pdma.c p2pmem_alloc_mmap(): the driver's checks, in its order, after the
// generic ones of do_mmap().
Result<uint64_t> AddressSpace::mmap_p2p(P2PChunkSource& source, const MmapOptions& opt) {
  const uint64_t len = (opt.len + kPageSize - 1) & ~(kPageSize - 1);
  PHYSR_ASSIGN_OR_RETURN(const uint64_t start, place(opt, len));
  const std::string who = "p2pmem mmap of " + source.name();
  if (!opt.shared) return make_error(EINVAL, who + ": fail, attempted private mapping (MAP_PRIVATE)");
  if (opt.offset != 0) return make_error(EINVAL, who + ": fail, attempted mapping with non-zero offset " + format_hex(opt.offset));
  if (!source.has_p2pdma()) return make_error(ENODEV, who + ": the device has no p2pdma");
  PHYSR_ASSIGN_OR_RETURN_CTX(const P2PChunk c, source.alloc(len), who);
  if (c.span.size != len || c.span.base.value() % kPageSize != 0 || c.provider == kHostMemory ||
      c.provider == kInvalidProvider) {
    (void)source.release(c.span);
    return make_error(EINVAL, who + ": the pool returned [" + format_hex(c.span.base.value()) + ", +" +
                                  format_hex(c.span.size) + ") of provider " + std::to_string(c.provider) +
                                  " for a request of " + format_hex(len) + " bytes");
  }
  auto chunk = std::make_shared<Chunk>();
  chunk->source = &source;
  chunk->c = c;
  chunk->pins.assign(len >> kPageShift, 0);
  chunk->mapped = len >> kPageShift;
  chunks_.emplace(c.span.base.value(), chunk);
  Vma v{.end = start + len, .kind = VmaKind::p2p, .prot = opt.prot, .shared = true, .order = kOrder4K};
  v.chunk = std::move(chunk);
  v.chunk_page = 0;
  insert(start, std::move(v));
  // The VMA joins the file's i_mapping (vma_interval_tree_insert in __mmap_region()).
  if (std::find(sources_.begin(), sources_.end(), &source) == sources_.end()) {
    sources_.push_back(&source);
    source.mapped_by(*this);
  }
  return start;
}

void AddressSpace::drop_pages(const Vma& v, uint64_t first, uint64_t n) {
  if (v.kind == VmaKind::p2p) {
    v.chunk->mapped -= n;
    return;
  }
  for (uint64_t i = first; i < first + n;) {
    const uint64_t pfn = v.pfns[i];
    if (pfn == 0) {  // a missing page of an unpopulated VMA
      ++i;
      continue;
    }
    // A run of pages of one folio drops its references at once.
    const uint64_t folio_end = mem_->folio_head(pfn) + (uint64_t{1} << mem_->folio_order(pfn));
    uint64_t k = 1;
    while (i + k < first + n && v.pfns[i + k] == pfn + k && pfn + k < folio_end) ++k;
    mem_->put_folio(pfn, static_cast<uint32_t>(k));
    i += k;
  }
}

Status AddressSpace::maybe_release(Chunk& c) {
  if (c.mapped != 0 || c.pinned != 0) return {};
  const PhysSpan span = c.c.span;
  P2PChunkSource* src = c.source;
  chunks_.erase(span.base.value());  // may destroy c
  return src->release(span);
}

Status AddressSpace::munmap(uint64_t addr, uint64_t len) { return unmap_range(addr, len, MmuNotifyEvent::unmap); }

// mm/vma.c do_vmi_munmap(): the start must be page-aligned and the range below TASK_SIZE;
// VMAs across either end are split; nothing mapped there is not an error.
Status AddressSpace::unmap_range(uint64_t addr, uint64_t len_in, MmuNotifyEvent event) {
  if (addr % kPageSize != 0) return make_error(EINVAL, "munmap: address " + format_hex(addr) + " is not 4 KiB aligned");
  if (len_in == 0) return make_error(EINVAL, "munmap: length 0");
  const uint64_t len = (len_in + kPageSize - 1) & ~(kPageSize - 1);
  if (len < len_in || addr > kTaskSize || len > kTaskSize - addr)
    return make_error(EINVAL, "munmap: " + format_hex(addr) + " + " + format_hex(len_in) + " runs past the top of user space");
  const uint64_t end = addr + len;
  Status result;
  auto it = vmas_.upper_bound(addr);
  if (it != vmas_.begin() && std::prev(it)->second.end > addr) --it;
  // mm/memory.c unmap_vmas(): the notifiers hear of [addr, end) before any page goes.
  const MmuNotifierScope notify(notifiers_.get(), {addr, end, event}, it != vmas_.end() && it->first < end);
  while (it != vmas_.end() && it->first < end) {
    const uint64_t vs = it->first;
    Vma v = std::move(it->second);
    it = vmas_.erase(it);
    const uint64_t s = std::max(vs, addr), e = std::min(v.end, end);
    drop_pages(v, (s - vs) >> kPageShift, (e - s) >> kPageShift);
    if (e < v.end) {  // the part after the hole
      Vma right{.end = v.end, .kind = v.kind, .prot = v.prot, .shared = v.shared, .order = v.order, .file = v.file,
                .sparse = v.sparse};
      if (v.kind == VmaKind::p2p) {
        right.chunk = v.chunk;
        right.chunk_page = v.chunk_page + ((e - vs) >> kPageShift);
      } else {
        right.pfns.assign(v.pfns.begin() + static_cast<std::ptrdiff_t>((e - vs) >> kPageShift), v.pfns.end());
      }
      it = vmas_.emplace_hint(it, e, std::move(right));
      ++it;
    }
    if (s > vs) {  // the part before the hole
      v.end = s;
      if (v.kind != VmaKind::p2p) v.pfns.resize((s - vs) >> kPageShift);
      vmas_.emplace_hint(it, vs, std::move(v));
    } else if (v.kind == VmaKind::p2p) {
      // The chunk goes back to the pool once no page of it is mapped or pinned.
      const std::shared_ptr<Chunk> chunk = v.chunk;
      if (Status st = maybe_release(*chunk); !st && result) result = std::move(st);
    }
  }
  return result;
}

const AddressSpace::Vma* AddressSpace::vma_at(uint64_t addr, uint64_t* start) const {
  auto it = vmas_.upper_bound(addr);
  if (it == vmas_.begin()) return nullptr;
  --it;
  if (it->second.end <= addr) return nullptr;
  if (start) *start = it->first;
  return &it->second;
}

std::optional<VmaInfo> AddressSpace::find_vma(uint64_t addr) const {
  uint64_t start = 0;
  const Vma* v = vma_at(addr, &start);
  if (!v) return std::nullopt;
  return VmaInfo{start, v->end, v->kind, v->prot, v->shared, v->chunk ? v->chunk->c.provider : kHostMemory};
}

std::vector<VmaInfo> AddressSpace::vmas() const {
  std::vector<VmaInfo> out;
  for (const auto& [s, v] : vmas_) out.push_back({s, v.end, v.kind, v.prot, v.shared, v.chunk ? v.chunk->c.provider : kHostMemory});
  return out;
}

AddressSpaceStats AddressSpace::stats() const noexcept {
  AddressSpaceStats st;
  st.vmas = vmas_.size();
  for (const auto& [s, v] : vmas_) st.mapped_bytes += v.end - s;
  st.live_pins = live_pins_.size();
  st.pinned_pages = pinned_pages_;
  st.p2p_chunks = chunks_.size();
  for (const auto& [a, c] : chunks_) st.p2p_chunks_unmapped += c->mapped == 0;
  return st;
}

uint32_t AddressSpace::pins_at(uint64_t addr) const {
  uint64_t start = 0;
  const Vma* v = vma_at(addr, &start);
  if (!v) return 0;
  const uint64_t page = (addr - start) >> kPageShift;
  if (v->kind == VmaKind::p2p) return v->chunk->pins[v->chunk_page + page];
  return v->pfns[page] == 0 ? 0 : mem_->folio_pins(v->pfns[page]);
}

ProviderId AddressSpace::provider_at(PhysAddr a) const noexcept {
  if (mem_->contains(a)) return kHostMemory;
  auto it = chunks_.upper_bound(a.value());
  if (it == chunks_.begin()) return kInvalidProvider;
  --it;
  return it->second->c.span.contains(a) ? it->second->c.provider : kInvalidProvider;
}

uint64_t AddressSpace::folio_bytes_left(PhysAddr a) const noexcept {
  if (!mem_->contains(a)) return kPageSize - (a.value() & (kPageSize - 1));  // a ZONE_DEVICE page: order 0
  const uint64_t pfn = a.value() >> kPageShift;
  return ((mem_->folio_head(pfn) + (uint64_t{1} << mem_->folio_order(pfn))) << kPageShift) - a.value();
}

}  // namespace physr::mem
