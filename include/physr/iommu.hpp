// physr iommu: an IOMMU domain: its IOVA allocator, its I/O page table and invalidation.
//
// Design rationale
// - Semantics follow Linux drivers/iommu/iova.c with size_aligned = true, as dma-iommu uses
//   it: a request of s granules is aligned to the next power of two >= s and placed at the
//   highest address that fits below the caller's limit (the device's DMA mask); requests
//   below 32 granules are rounded up to a power of two first (alloc_iova_fast()).
// - Per-thread magazine caches in the manner of Linux's per-CPU rcaches: for each size
//   class up to 32 granules, a loaded and a previous magazine of 127 entries, and a shared
//   depot of full magazines. A cached alloc or free touches only thread-local memory: no
//   lock, no atomic (Linux needs a per-CPU spinlock; a user-space thread can be migrated
//   between CPUs at any moment, so physr caches per thread instead).
// - The fallback is a buddy allocator over the granule space with an ordered free set per
//   order, instead of Linux's rbtree walk (which can degrade to a linear scan). An
//   allocation looks at most two blocks per order and splits one, a free coalesces with
//   its buddies: O(log n) per order whatever the history, so O(bits x log n) in all cases.
//   The unused tail of a non-power-of-two request goes straight back to the free sets, so
//   exactly s granules stay reserved, as in Linux. One difference: a request of more than
//   32 granules that is not a power of two takes a wholly free aligned block, where Linux
//   needs only its first s granules free; physr may place it lower than Linux would, and
//   under heavy fragmentation fail (ENOMEM) where Linux would still fit it. Requests of up
//   to 32 granules and powers of two are placed exactly where Linux places them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "physr/core.hpp"

namespace physr {

struct IovaOptions {
  uint64_t granule = 4096;               // power of two
  uint64_t start = 4096;                 // lowest IOVA handed out (Linux reserves pfn 0)
  uint64_t end = uint64_t{1} << 48;      // one past the highest IOVA
  bool caching = true;                   // per-thread magazines for sizes up to 32 granules
  bool check = false;                    // record allocations: report bad frees exactly (tests, debug)
};

/// Statistics for tests and benchmarks.
struct IovaStats {
  uint64_t free_granules = 0;    // in the buddy free sets (excludes cached entries)
  uint64_t cached_granules = 0;  // held in magazines and the depot
  uint64_t tree_allocs = 0, tree_frees = 0;
};

/// Allocates I/O virtual addresses for one IOMMU domain. Thread-safe.
class IovaAllocator {
 public:
  /// EINVAL for a granule that is not a power of two, or start/end not granule-aligned,
  /// empty or with start 0 excluded wrongly.
  static Result<std::unique_ptr<IovaAllocator>> create(const IovaOptions& options = {});
  ~IovaAllocator();
  IovaAllocator(const IovaAllocator&) = delete;
  IovaAllocator& operator=(const IovaAllocator&) = delete;

  /// `size` bytes (rounded up to granules, then as described above) at the highest
  /// suitably aligned address ending at or below `limit` (exclusive; e.g. DMA mask + 1).
  /// EINVAL for size 0 or a size the space cannot hold; ENOMEM when nothing fits.
  Result<DmaAddr> alloc(uint64_t size, uint64_t limit);
  /// Returns what alloc(size, ...) gave. With check on, EINVAL names a free of an address
  /// not allocated with that size (double free, wrong size); without it, such a free is
  /// detected when it reaches the free sets and otherwise undefined, as in Linux.
  Status free(DmaAddr iova, uint64_t size);
  /// Returns every cached entry to the free sets (Linux free_cpu_cached_iovas + depot).
  void flush_caches();

  IovaStats stats() const;
  uint64_t granule() const noexcept;

  struct Impl;

 private:
  explicit IovaAllocator(std::unique_ptr<Impl> impl);
  Result<DmaAddr> alloc_general(uint64_t size, uint64_t limit);
  Status free_general(DmaAddr iova, uint64_t size);
  std::unique_ptr<Impl> impl_;
};

/// Access rights of a mapping, plus the MMIO attribute (Linux IOMMU_MMIO: device memory,
/// mapped uncached; P2P through the host bridge carries it).
enum IommuPerm : uint8_t { kIommuRead = 1, kIommuWrite = 2, kIommuReadWrite = 3, kIommuMmio = 4 };

/// One mapping of a batch: [iova, iova + size) -> [phys, phys + size).
struct IoMapOp {
  DmaAddr iova;
  PhysAddr phys;
  uint64_t size = 0;
  uint8_t perm = 0;
};

/// What the IOMMU answers for one DMA address.
struct IoTranslation {
  PhysAddr phys;           // the translated address (page base + offset)
  uint64_t page_size = 0;  // 4 KiB, 2 MiB or 1 GiB: the leaf that mapped it
  uint8_t perm = 0;
};

struct IoDomainOptions {
  IovaOptions iova;
  /// Strict: every unmap invalidates the IOTLB at once. Deferred: unmapped IOVAs and their
  /// IOTLB entries wait in a flush queue (Linux's lazy mode) until flush() or the queue fills.
  bool strict = true;
  size_t flush_queue_entries = 256;
};

struct IoDomainStats {
  uint64_t mapped_4k = 0, mapped_2m = 0, mapped_1g = 0;  // leaves in the page table
  uint64_t table_pages = 0;                              // 4 KiB page-table pages
  uint64_t iotlb_flushes = 0, queued_frees = 0;
};

/// An IOMMU domain shared by the devices attached to it: a 4-level I/O page table (x86-64
/// and Arm64 style: 9 bits a level, leaves of 4 KiB, 2 MiB and 1 GiB), its IOVA allocator,
/// and an IOTLB whose invalidation is strict or deferred. Thread-safe: map and unmap
/// serialise; translate() runs concurrently with them (entries are atomic, tables are
/// published after they are filled and freed only with the domain).
class IoDomain {
 public:
  static Result<std::unique_ptr<IoDomain>> create(const IoDomainOptions& options = {});
  ~IoDomain();
  IoDomain(const IoDomain&) = delete;
  IoDomain& operator=(const IoDomain&) = delete;

  /// Maps [iova, iova + size) to [phys, phys + size), with the largest leaves that the
  /// alignment of both allows. EINVAL: zero or unaligned size/addresses, no permission,
  /// beyond 48 bits. EEXIST: part of the range is mapped (named); nothing stays mapped.
  Status map(DmaAddr iova, PhysAddr phys, uint64_t size, uint8_t perm);
  /// Maps a batch under one lock, all or nothing (Linux iommu_map_sg()): on any error
  /// nothing of the batch stays mapped. Errors as map(), naming the operation.
  Status map_many(std::span<const IoMapOp> ops);
  /// Unmaps exactly what map() mapped. ENOENT names the first unmapped page; EINVAL a range
  /// that would split a large leaf. Nothing changes on error. Strict mode invalidates the
  /// IOTLB for the range now; deferred mode leaves it stale until the flush.
  Status unmap(DmaAddr iova, uint64_t size);
  /// Unmaps several ranges under one lock, all or nothing: every range is validated as
  /// unmap() does before any is changed.
  Status unmap_many(std::span<const DmaSpan> ranges);
  /// Returns an IOVA range to the allocator: at once in strict mode, after the next IOTLB
  /// flush in deferred mode (so a stale IOTLB entry can never point at a reused IOVA).
  Status free_iova(DmaAddr iova, uint64_t size);
  /// The translation a device gets: from the IOTLB if cached there (possibly stale in
  /// deferred mode), else by walking the page table (and filling the IOTLB). nullopt: an
  /// IOMMU fault (unmapped).
  std::optional<IoTranslation> translate(DmaAddr iova);
  /// Walks the page table only (what is mapped now), ignoring the IOTLB.
  std::optional<IoTranslation> walk(DmaAddr iova) const;
  /// Invalidates the whole IOTLB and releases the IOVAs queued for reuse.
  void flush();

  IovaAllocator& iova() noexcept { return *iova_; }
  IoDomainStats stats() const;
  bool strict() const noexcept;

  struct Impl;

 private:
  IoDomain(std::unique_ptr<Impl> impl, std::unique_ptr<IovaAllocator> iova);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<IovaAllocator> iova_;
};

}  // namespace physr
