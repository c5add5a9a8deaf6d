// physr iova: the IOVA allocator of an IOMMU domain (Linux drivers/iommu/iova.c).
//
// Design rationale
// - Linux drivers/iommu/iova.c with size_aligned = true, as dma-iommu uses it, address for
//   address: a request of s granules is aligned to the next power of two >= s, requests
//   below 32 granules are first rounded up to a power of two (alloc_iova_fast()), and the
//   tree fallback is Linux's own walk (__alloc_and_insert_iova_range()): down from the
//   cached node of the last allocation (cached32_node below 4 GiB, cached_node above), then
//   once more down from the limit to the cached node, with the max32_alloc_size fast fail;
//   reserve_iova() and the cached-node updates as Linux. A limit above the space is
//   clamped to its end. tests/support/kernel_iova.hpp transcribes the kernel functions and
//   IovaTest.PlacementMatchesLinuxIovaC checks every address against it.
// - Per-thread magazine caches in the manner of Linux's per-CPU rcaches: for each size
//   class up to 32 granules, a loaded and a previous magazine of 127 entries, and a shared
//   depot of full magazines with no cap, trimmed to one magazine per CPU by a delayed work
//   (iova_depot_work_func(), every 100 ms while it frees one). A cached alloc or free
//   touches only thread-local memory with no lock and no atomic read-modify-write (Linux
//   takes a per-CPU spinlock; a user-space thread can be migrated between CPUs at any
//   moment, so physr caches per thread). It marks itself busy with a plain store and steps
//   aside while a flush is under way; the flusher (an allocation that failed, which frees
//   every thread's magazines as Linux frees every CPU's) pairs that with membarrier().
// - The tree is an ordered map of allocated ranges, as Linux's rbtree. A freed node stays
//   in the map until the next search, which erases it unless the walk's first step lands
//   on it again with the same size: an alloc/free cycle of one size (a DMA map and unmap)
//   then costs a few compares. Linux's walk can take time linear in the live ranges it
//   steps over when the space is fragmented below the cached node.
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
  /// Delay of the depot's trim (Linux IOVA_DEPOT_DELAY): after a full magazine enters the
  /// depot, one magazine per delay goes back to the tree while the depot of its size class
  /// holds more than one per CPU (std::thread::hardware_concurrency()). The trim runs when
  /// the depot is next touched after the delay, not in a background thread. 0: no timed
  /// trim (run_depot_work() only), for tests that must not depend on time.
  uint32_t depot_delay_ms = 100;
  /// IOVA ranges never handed out (Linux reserve_iova()). dma-iommu reserves the host
  /// bridges' memory windows this way (iova_reserve_pci_windows()), so no IOVA equals a
  /// bus address that a switch would route to a peer's BAR instead of the IOMMU. Rounded
  /// out to granules, clipped to [start, end); may overlap; one that wraps 2^64 is EINVAL.
  std::vector<DmaSpan> reserved{};
};

/// Statistics for tests and benchmarks.
struct IovaStats {
  uint64_t free_granules = 0;    // not in any allocated or reserved range (cached entries stay allocated, as in Linux)
  uint64_t cached_granules = 0;  // held in the depot and the calling thread's magazines (not other threads')
  uint64_t depot_magazines = 0;  // full magazines in the depot, every size class
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

  /// `size` bytes (rounded up to granules, then as described above) ending at or below
  /// `limit` (exclusive; e.g. DMA mask + 1), where Linux alloc_iova_fast() places them: a
  /// cached range first, else the tree; when the tree has no room, every thread's
  /// magazines and the depot go back to it and it is searched once more. EINVAL for size
  /// 0 or a size the space cannot hold; ENOMEM when nothing fits.
  Result<DmaAddr> alloc(uint64_t size, uint64_t limit);
  /// Returns what alloc(size, ...) gave. With check on, EINVAL names a free of an address
  /// not allocated with that size (double free, wrong size); without it, such a free is
  /// refused (EINVAL) when it goes straight to the tree and is not an allocated range of
  /// that size, and is otherwise undefined, as in Linux (one a magazine caches is never
  /// checked; a build with assertions aborts when it reaches the tree later).
  Status free(DmaAddr iova, uint64_t size);
  /// Returns every thread's magazines (loaded and previous, every size class) and every
  /// magazine in the depot to the tree (Linux free_cpu_cached_iovas() for every CPU, then
  /// free_global_cached_iovas()), as a failed allocation does. Another thread's cached
  /// fast path waits for it or steps aside to its locked path meanwhile. Where the kernel
  /// has no membarrier(), other threads' magazines stay cached (they come back when those
  /// threads exit).
  void flush_caches();
  /// Runs each size class's depot trim once now, as if its delay had passed (Linux
  /// iova_depot_work_func()): one magazine goes back to the tree when the depot holds more
  /// than one per CPU.
  void run_depot_work();

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
