// physr mem: process address spaces and pinning (mm/mmap.c, mm/gup.c, drivers/pci/p2pdma.c).
//
// Design rationale
// - HostMemory is the host's struct page array for one RAM region: a reference count and a
//   pin count per folio (a 4 KiB page, or a naturally aligned 2 MiB folio) kept at the
//   folio's head pfn, as Linux keeps them in the head struct page. It hands out scattered
//   4 KiB pages (a deterministic shuffle) or contiguous 2 MiB folios, so pinning meets both
//   shapes. A folio is free again when its references and its pins are both zero.
// - An AddressSpace is a process's VMAs (an ordered map by start address): anonymous
//   memory, file-backed memory (the pages of a HostFile's page cache) and P2P memory made
//   by mmap of a provider's p2pmem allocate file. VMAs are populated at mmap time
//   (MAP_POPULATE) unless anonymous 4 KiB memory asks otherwise (its missing pages are
//   faulted in by pin() and hmm_range_fault()): host VMAs keep one pfn per virtual page,
//   P2P VMAs one chunk of the provider's pool. There is no swap, COW or mremap.
//   munmap, mprotect, migrate and P2P revocation tell interval notifiers (hmm.hpp).
// - pin() is pin_user_pages() / iov_iter_extract_pages(): a byte span of user addresses
//   becomes a RangeList tagged with providers (built by the pfn builder), and each page
//   it covers gains one pin, counted at its folio as GUP's try_grab_folio(folio, refs)
//   does. Pins of P2P pages are per 4 KiB page (ZONE_DEVICE pages are order 0).
//   unpin() walks the list back (unpin_user_pages()).
// - P2P memory comes through P2PChunkSource, a seam the P2P memory pool implements
//   (alloc, and release after the source's own grace period). munmap drops the mapping's
//   reference to every page; a P2P chunk goes back through release() once none of its
//   pages is mapped or pinned, as Linux's p2pdma_page_free() runs when a page's last
//   reference (the mapping's or a pin's) is dropped.
//
// Nothing here is thread-safe: one AddressSpace (with its HostMemory and files) is used by
// one thread at a time, as mmap_lock would serialise it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "physr/core.hpp"
#include "physr/range.hpp"

namespace physr::mem {

/// Folio orders HostMemory hands out: a 4 KiB page or a 2 MiB folio (PMD size on x86-64).
inline constexpr unsigned kOrder4K = 0;
inline constexpr unsigned kOrder2M = 9;

/// Counters of a HostMemory, for leak checks.
struct HostMemoryStats {
  uint64_t total_pages = 0;
  uint64_t free_pages = 0;   // in no folio
  uint64_t folios = 0;       // folios handed out and not yet freed
  uint64_t pinned_pages = 0; // sum of pin counts
};

/// The host RAM behind anonymous and file-backed VMAs: a region of physical pages with a
/// reference count and a pin count per folio.
class HostMemory {
 public:
  /// `ram` must be 2 MiB aligned, non-empty and below 2^52 (EINVAL naming it). `seed`
  /// fixes the order in which 4 KiB pages are handed out (scattered, deterministic).
  static Result<std::unique_ptr<HostMemory>> create(PhysSpan ram, uint64_t seed = 1);

  /// A folio of `order` (kOrder4K or kOrder2M) with one reference, its head pfn. ENOMEM when
  /// no free 2 MiB block is left (for 4 KiB pages: and no free page), EINVAL for another order.
  Result<uint64_t> alloc_folio(unsigned order);
  /// Takes n more references on the folio holding `pfn`.
  void get_folio(uint64_t pfn, uint32_t n = 1) noexcept;
  /// Drops n references; the folio is freed when no reference and no pin is left.
  void put_folio(uint64_t pfn, uint32_t n = 1) noexcept;

  /// The folio holding `pfn`: its head pfn and order. pfn must lie in the region.
  uint64_t folio_head(uint64_t pfn) const noexcept { return pfn & ~((uint64_t{1} << order_[pfn - base_pfn_]) - 1); }
  unsigned folio_order(uint64_t pfn) const noexcept { return order_[pfn - base_pfn_]; }
  /// The folio's references (mappings and page-cache entries) and pins (pages pinned).
  uint32_t folio_refs(uint64_t pfn) const noexcept { return refs_[folio_head(pfn) - base_pfn_]; }
  uint32_t folio_pins(uint64_t pfn) const noexcept { return pins_[folio_head(pfn) - base_pfn_]; }
  /// folio_maybe_dma_pinned(): the folio has at least one pin.
  bool maybe_dma_pinned(uint64_t pfn) const noexcept { return folio_pins(pfn) != 0; }
  bool contains(PhysAddr a) const noexcept { return ram_.contains(a); }
  PhysSpan ram() const noexcept { return ram_; }
  HostMemoryStats stats() const noexcept;

 private:
  friend class AddressSpace;
  HostMemory() = default;
  void add_pins(uint64_t pfn, uint32_t pages) noexcept {
    pins_[folio_head(pfn) - base_pfn_] += pages;
    pinned_ += pages;
  }
  void drop_pins(uint64_t pfn, uint32_t pages) noexcept;
  void free_folio(uint64_t head) noexcept;

  PhysSpan ram_;
  uint64_t base_pfn_ = 0;
  std::vector<uint32_t> refs_, pins_;  // at the head pfn of each folio
  std::vector<uint8_t> order_;         // of the folio each pfn belongs to
  std::vector<uint64_t> free_blocks_;  // head pfns of free 2 MiB blocks, handed out lowest first
  std::vector<uint64_t> free_pages_;   // free 4 KiB pages, in a shuffled order
  uint64_t folios_ = 0, pinned_ = 0, seed_ = 1;
};

/// A file whose page cache lives in HostMemory: the pages of file-backed VMAs. Pages are
/// created when first mapped, hold one page-cache reference each and are shared by every
/// mapping of the same file offset. The file must outlive its mappings.
class HostFile {
 public:
  /// `size` bytes (rounded up to pages), cached in folios of `order` (kOrder4K or kOrder2M;
  /// with kOrder2M the size rounds up to 2 MiB). EINVAL for a zero size or another order.
  static Result<std::unique_ptr<HostFile>> create(HostMemory& memory, std::string name, uint64_t size,
                                                  unsigned order = kOrder4K);
  ~HostFile();  // drops the page cache's references
  HostFile(const HostFile&) = delete;
  HostFile& operator=(const HostFile&) = delete;

  const std::string& name() const noexcept { return name_; }
  uint64_t size() const noexcept { return size_; }
  unsigned order() const noexcept { return order_; }
  /// Pages in the page cache.
  size_t cached_pages() const noexcept;

 private:
  friend class AddressSpace;
  HostFile(HostMemory& m, std::string name, uint64_t size, unsigned order) : mem_(&m), name_(std::move(name)), size_(size), order_(order) {}
  /// The pfn caching file page `index`, created (ENOMEM) when absent.
  Result<uint64_t> page(uint64_t index);
  HostMemory* mem_;
  std::string name_;
  uint64_t size_;
  unsigned order_;
  std::vector<uint64_t> folios_;  // head pfn per folio index, 0 = not cached (pfn 0 is never RAM here)
};

/// One chunk of P2P memory: bytes of a provider's BAR (CPU physical), as the provider's pool
/// (P2PMemory, physr/mem.hpp) hands it out, with the function that owns the BAR.
struct P2PChunk {
  PhysSpan span;
  ProviderId provider = kHostMemory;
  uint32_t function = 0;
};

class AddressSpace;

/// Where P2P VMAs get their memory: the p2pmem pool of one provider (implemented by the P2P
/// memory pool; tests implement it directly). The source must outlive every VMA and pin of
/// its memory.
class P2PChunkSource {
 public:
  virtual ~P2PChunkSource() = default;
  /// pdev->p2pdma is set: the device has a P2P memory pool at all.
  virtual bool has_p2pdma() const = 0;
  /// The provider whose memory alloc() hands out (the pgmap of its pages).
  virtual ProviderId provider() const = 0;
  /// `size` bytes (a page multiple), 4 KiB aligned. ENOMEM when the pool has no such room
  /// (gen_pool_alloc_owner failed); ENODEV when the pool is dying (percpu_ref_tryget_live
  /// failed). Fails leaving the pool unchanged.
  virtual Result<P2PChunk> alloc(uint64_t size) = 0;
  /// Returns a chunk exactly as alloc() made it, once nothing maps or pins it; the source
  /// may defer the free by a grace period. An error means the span was not the source's.
  virtual Status release(PhysSpan span) = 0;
  /// The device, for messages ("0000:03:00.0").
  virtual std::string name() const = 0;
  /// `space` maps the source's memory (its first mmap_p2p of it): the allocate file's
  /// i_mapping, which the source's unmap_mapping_range() walks. Nothing by default.
  virtual void mapped_by(AddressSpace& space) { (void)space; }
  /// `space` is going away (its destructor, before it unmaps): waits for an unmap of the
  /// source's mappings in progress, then forgets it. Nothing by default.
  virtual void unmapped_by(AddressSpace& space) { (void)space; }
};

/// Memory protections of a VMA.
enum class Prot : uint8_t { read = 1, write = 2 };
using ProtFlags = Flags<Prot>;

/// How a VMA came to be.
enum class VmaKind : uint8_t { anon, file, p2p };
const char* vma_kind_name(VmaKind k) noexcept;

/// mmap's arguments. addr 0 lets the address space choose (the lowest gap above
/// kMmapBase); otherwise the mapping is placed exactly there, as MAP_FIXED_NOREPLACE.
struct MmapOptions {
  uint64_t addr = 0;
  uint64_t len = 0;           // rounded up to 4 KiB, as do_mmap() does
  ProtFlags prot = ProtFlags(Prot::read) | Prot::write;
  bool shared = false;        // MAP_SHARED (true) or MAP_PRIVATE (false)
  uint64_t offset = 0;        // file offset (vm_pgoff << PAGE_SHIFT)
  unsigned order = kOrder4K;  // anonymous memory: 4 KiB pages or 2 MiB folios (THP)
  /// MAP_POPULATE (true). false, for anonymous 4 KiB memory only: every page is missing
  /// until pin() or hmm_range_fault() faults it in.
  bool populate = true;
};

/// A VMA as reported to callers.
struct VmaInfo {
  uint64_t start = 0, end = 0;
  VmaKind kind = VmaKind::anon;
  ProtFlags prot;
  bool shared = false;
  ProviderId provider = kHostMemory;  // of P2P VMAs
};

/// gup flags (include/linux/mm_types.h FOLL_*).
enum class Foll : uint32_t {
  write = 1,        // FOLL_WRITE: the pages will be written (a device read into memory)
  longterm = 2,     // FOLL_LONGTERM: recorded, not otherwise modelled
  pci_p2pdma = 4,   // FOLL_PCI_P2PDMA: P2P pages may be returned
};
using FollFlags = Flags<Foll>;

/// A pinned user span: its physical ranges, tagged with providers (the merged list Linux's
/// callers build from the page array). Move-only; give it back with AddressSpace::unpin().
class Pinned {
 public:
  Pinned() = default;
  /// A moved-from Pinned is empty.
  Pinned(Pinned&& o) noexcept
      : ranges_(std::move(o.ranges_)), pinned_(std::move(o.pinned_)), addr_(o.addr_), len_(o.len_), pages_(o.pages_),
        id_(std::exchange(o.id_, 0)), flags_(o.flags_), trimmed_(o.trimmed_) {}
  Pinned& operator=(Pinned&& o) noexcept {
    if (this != &o) {
      ranges_ = std::move(o.ranges_);
      pinned_ = std::move(o.pinned_);
      addr_ = o.addr_;
      len_ = o.len_;
      pages_ = o.pages_;
      id_ = std::exchange(o.id_, 0);
      flags_ = o.flags_;
      trimmed_ = o.trimmed_;
    }
    return *this;
  }
  Pinned(const Pinned&) = delete;
  Pinned& operator=(const Pinned&) = delete;

  /// The bytes [addr, addr + len) as physical ranges, in address order.
  const RangeList& ranges() const noexcept { return ranges_; }
  uint64_t addr() const noexcept { return addr_; }
  uint64_t len() const noexcept { return len_; }
  /// Pages pinned (each page the span touches, once).
  uint64_t pages() const noexcept { return pages_; }
  FollFlags flags() const noexcept { return flags_; }
  bool empty() const noexcept { return id_ == 0; }

 private:
  friend class AddressSpace;
  RangeList ranges_;   // what the caller sees: exactly the bytes
  RangeList pinned_;   // whole pages, what unpin walks (shared with ranges_ when aligned)
  uint64_t addr_ = 0, len_ = 0, pages_ = 0, id_ = 0;
  FollFlags flags_;
  bool trimmed_ = false;
};

/// Counters of an AddressSpace.
struct AddressSpaceStats {
  size_t vmas = 0;
  uint64_t mapped_bytes = 0;
  size_t live_pins = 0;           // Pinned objects not yet unpinned
  uint64_t pinned_pages = 0;      // pages they hold
  size_t p2p_chunks = 0;          // chunks still held (mapped or pinned)
  size_t p2p_chunks_unmapped = 0; // of which no longer mapped: held only by pins
};

class MmuNotifierSubscriptions;  // physr/mem/hmm.hpp
enum class MmuNotifyEvent : uint8_t;

/// A process's virtual address space.
class AddressSpace {
 public:
  /// Where mmap(addr = 0) starts looking, and the top of user addresses (47-bit x86-64).
  static constexpr uint64_t kMmapBase = uint64_t{1} << 32;
  static constexpr uint64_t kTaskSize = (uint64_t{1} << 47) - kPageSize;

  explicit AddressSpace(HostMemory& memory) : mem_(&memory) {}
  /// Unmaps everything. Every Pinned must have been unpinned first (asserted): a pin
  /// outliving its address space would hold its pages forever. Every P2PChunkSource it
  /// mapped from must still exist (it is told first: unmapped_by).
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  /// Anonymous memory (MAP_ANONYMOUS), populated with folios of opt.order. Returns the
  /// start address. EINVAL: zero length, unaligned or out-of-range address, bad order,
  /// offset; EEXIST: overlaps a VMA (named); ENOMEM: no host memory or no gap.
  Result<uint64_t> mmap_anon(const MmapOptions& opt);
  /// The pages of `file` from opt.offset (4 KiB aligned, within the file: EINVAL), shared
  /// with every other mapping of them. Errors as mmap_anon.
  Result<uint64_t> mmap_file(HostFile& file, const MmapOptions& opt);
  /// mmap of a provider's p2pmem allocate file (drivers/pci/p2pdma.c p2pmem_alloc_mmap()):
  /// after mmap_anon's checks, MAP_PRIVATE is EINVAL, a non-zero offset EINVAL, a device
  /// without p2pdma ENODEV, and the source's alloc() errors pass through (ENOMEM pool empty,
  /// ENODEV dying). Nothing is mapped on failure.
  Result<uint64_t> mmap_p2p(P2PChunkSource& source, const MmapOptions& opt);
  /// Unmaps [addr, addr + len) (len rounded up to pages): VMAs inside go, VMAs across the
  /// ends are split. Pages whose last reference was the mapping are freed; pinned pages
  /// stay until unpin. EINVAL: unaligned addr, zero length, past kTaskSize. Unmapping
  /// addresses with no VMA is not an error (Linux returns 0).
  Status munmap(uint64_t addr, uint64_t len);
  /// mprotect(): [addr, addr + len) (len rounded up) gets `prot`, VMAs across the ends are
  /// split. EINVAL: unaligned addr; ENOMEM: a page of the span is not mapped (named; then
  /// nothing changes). Length 0 does nothing (Linux returns 0). Notifies protection_vma.
  Status mprotect(uint64_t addr, uint64_t len, ProtFlags prot);
  /// Page migration (migrate_pages()): every present, unpinned 4 KiB page of anonymous
  /// memory in [addr, addr + len) moves to a new physical page; pinned pages, 2 MiB folios,
  /// file and P2P pages stay. Returns the pages moved. EINVAL: unaligned addr, len 0;
  /// ENOMEM: no free page for the first one. Notifies migrate.
  Result<uint64_t> migrate(uint64_t addr, uint64_t len);
  /// Revocation of P2P memory (p2pdma's unmap_mapping_range() when the provider goes
  /// away, what P2PMemory's revoke callback calls): every P2P VMA mapping a chunk that
  /// overlaps `span` is unmapped, notifying p2p_revoke. Returns the VMAs unmapped.
  Result<size_t> revoke_p2p(PhysSpan span);
  /// mm->mmap_lock. Mutations and hmm_range_fault() need it held when a mirror works on
  /// another thread (physr's lock is exclusive; Linux's is an rwsem).
  std::mutex& mmap_lock() noexcept { return mmap_lock_; }
  /// The interval notifiers (physr/mem/hmm.hpp), null before the first insert.
  MmuNotifierSubscriptions* notifiers() const noexcept { return notifiers_.get(); }

  /// pin_user_pages() of the bytes [addr, addr + len): every page must be mapped (EFAULT
  /// naming the first unmapped address), writable with Foll::write (EFAULT naming the VMA),
  /// and P2P pages need Foll::pci_p2pdma (EREMOTEIO naming the address, as try_grab_folio()).
  /// EINVAL for a zero length. All or nothing: on failure nothing is pinned.
  Result<Pinned> pin(uint64_t addr, uint64_t len, FollFlags flags);
  /// unpin_user_pages(): drops the pins of `p`; pages no longer mapped nor pinned are
  /// freed (P2P chunks released to their source). EINVAL for an empty or foreign Pinned.
  Status unpin(Pinned&& p);

  /// The VMA holding addr, if any.
  std::optional<VmaInfo> find_vma(uint64_t addr) const;
  std::vector<VmaInfo> vmas() const;
  AddressSpaceStats stats() const noexcept;
  /// Pins counted where the page holding user address addr keeps them: its host folio
  /// (every pinned page of the folio counts), or the P2P page itself. 0 when unmapped.
  uint32_t pins_at(uint64_t addr) const;
  HostMemory& memory() noexcept { return *mem_; }
  /// The full provider id of physical address a: kHostMemory for host RAM, else the
  /// provider of the live P2P chunk holding it (kInvalidProvider when none does). What
  /// resolves a range list's kIndirectProvider tag for memory of this address space.
  ProviderId provider_at(PhysAddr a) const noexcept;
  /// Bytes to the end of the folio holding physical address a: a host folio, or 4 KiB for a
  /// P2P page (ZONE_DEVICE pages are order 0). What bounds a bio_vec (get_contig_folio_len()).
  uint64_t folio_bytes_left(PhysAddr a) const noexcept;

 private:
  struct Chunk;  // a P2P chunk: its source, pages' pins, how many pages are still mapped
  struct Vma {
    uint64_t end = 0;
    VmaKind kind = VmaKind::anon;
    ProtFlags prot;
    bool shared = false;
    unsigned order = kOrder4K;               // of every host folio it maps
    std::vector<uint64_t> pfns{};            // host VMAs: one pfn per page
    std::shared_ptr<Chunk> chunk{};          // P2P VMAs
    uint64_t chunk_page = 0;                 // the chunk page of the VMA's first page
    HostFile* file = nullptr;
    bool sparse = false;                     // made without MAP_POPULATE: pfns may be 0 (missing)
  };
  friend struct HmmWalk;        // hmm.cpp: hmm_range_fault() walks the VMAs
  friend class MmuIntervalNotifier;
  Status unmap_range(uint64_t addr, uint64_t len, MmuNotifyEvent event);
  void split_at(uint64_t addr);
  Status fault_in(uint64_t first, uint64_t end);
  Result<uint64_t> place(const MmapOptions& opt, uint64_t len);
  void insert(uint64_t start, Vma v);
  void drop_pages(const Vma& v, uint64_t first_page, uint64_t npages);
  Status maybe_release(Chunk& c);
  Status unpin_list(const RangeList& list);
  const Vma* vma_at(uint64_t addr, uint64_t* start) const;

  HostMemory* mem_;
  std::map<uint64_t, Vma> vmas_;  // by start address
  std::map<uint64_t, std::shared_ptr<Chunk>> chunks_;  // live P2P chunks by physical start
  std::unordered_set<uint64_t> live_pins_;
  uint64_t pinned_pages_ = 0;
  std::shared_ptr<MmuNotifierSubscriptions> notifiers_;
  std::vector<P2PChunkSource*> sources_;  // every source mmap_p2p mapped from (told at destruction)
  std::mutex mmap_lock_;
};

}  // namespace physr::mem
