// physr iova: the IOVA allocator of an IOMMU domain (Linux drivers/iommu/iova.c).
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
//   exactly s granules stay reserved, as in Linux. A whole block of a size above the
//   magazines that comes back is kept aside for the next request of its size and coalesced
//   only when a search needs it (docs/iommu.md). One difference: a request of more than
//   32 granules that is not a power of two takes a wholly free aligned block, where Linux
//   needs only its first s granules free; physr may place it lower than Linux would, and
//   under heavy fragmentation fail (ENOMEM) where Linux would still fit it. Requests of up
//   to 32 granules and powers of two are placed exactly where Linux places them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "physr/core.hpp"

namespace physr {

struct IovaOptions {
  uint64_t granule = 4096;               // power of two
  uint64_t start = 4096;                 // lowest IOVA handed out (Linux reserves pfn 0)
  uint64_t end = uint64_t{1} << 48;      // one past the highest IOVA
  bool caching = true;                   // per-thread magazines for sizes up to 32 granules
  bool check = false;                    // record allocations: report bad frees exactly (tests, debug)
  /// IOVA ranges never handed out (Linux reserve_iova()). dma-iommu reserves the host
  /// bridges' memory windows this way (iova_reserve_pci_windows()), so no IOVA equals a
  /// bus address that a switch would route to a peer's BAR instead of the IOMMU. Rounded
  /// out to granules, clipped to [start, end); may overlap; one that wraps 2^64 is EINVAL.
  std::vector<DmaSpan> reserved{};
};

/// Statistics for tests and benchmarks.
struct IovaStats {
  uint64_t free_granules = 0;    // in the buddy free sets and the blocks kept whole (excludes cached entries)
  uint64_t cached_granules = 0;  // held in the depot and the calling thread's magazines (not other threads')
  uint64_t tree_allocs = 0, tree_frees = 0;
};

/// Allocates I/O virtual addresses for one IOMMU domain. Thread-safe.
class IovaAllocator {
 public:
  /// EINVAL for a granule that is not a power of two of at least 512, or a space
  /// [start, end) that is empty or not granule-aligned.
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
  /// refused (EINVAL) when it goes straight to the free sets and overlaps free space, and
  /// is otherwise undefined, as in Linux (one a magazine caches is never checked; a build
  /// with assertions may abort when it reaches the free sets later).
  Status free(DmaAddr iova, uint64_t size);
  /// Returns the calling thread's magazines (loaded and previous, every size class) and
  /// every magazine in the depot to the free sets, and puts the blocks kept whole back
  /// into them, coalescing (Linux free_cpu_cached_iovas() for one CPU, plus
  /// free_global_cached_iovas()). Other threads' magazines stay cached: they come back
  /// when those threads call flush_caches() or exit.
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

}  // namespace physr
