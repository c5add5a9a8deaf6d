// physr dma: the DMA mapping layer. So far: DMA directions and the bounce pool (swiotlb);
// map/unmap of range lists comes next (docs/ARCHITECTURE.md).
//
// Bounce pool design (Linux kernel/dma/swiotlb.c)
// - A region of host RAM cut into 2 KiB slots (IO_TLB_SIZE) grouped in segments of 128
//   slots (IO_TLB_SEGSIZE): one mapping never crosses a segment, so at most 256 KiB.
// - Areas, each with its own lock and search hint (Linux's per-CPU areas): a mapping tries
//   the area of the CPU it runs on first, then the others.
// - Alignment: the bounce address keeps the original's bits under the device's
//   min_align_mask (NVMe needs the offset within its PRP pages), and mappings of a page or
//   more start page-aligned otherwise.
// - Copies follow the direction: to the bounce buffer at map and sync_for_device (to_device,
//   bidirectional), back to the original at unmap and sync_for_cpu (from_device,
//   bidirectional), through PhysMemory, so tests can check them byte for byte.
#pragma once

#include <cstdint>
#include <memory>

#include "physr/core.hpp"
#include "physr/physmem.hpp"

namespace physr {

/// Linux enum dma_data_direction.
enum class DmaDirection : uint8_t { bidirectional, to_device, from_device, none };
const char* dma_direction_name(DmaDirection d) noexcept;

struct BounceOptions {
  PhysAddr base{0x100000};   // where the pool sits; must lie in a host RAM region of the memory
  uint64_t size = 64 * MiB;  // a multiple of 256 KiB (one segment)
  unsigned areas = 2;        // a power of two; the pool is split evenly between them
};

/// A swiotlb-style bounce pool. Thread-safe.
class BouncePool {
 public:
  static constexpr uint64_t kSlotSize = 2048;
  static constexpr unsigned kSegmentSlots = 128;
  static constexpr uint64_t kMaxMapping = kSlotSize * kSegmentSlots;  // 256 KiB

  /// EINVAL for a size or area count that does not divide into segments, or a pool not
  /// inside one host RAM region of `memory` (which must outlive the pool).
  static Result<std::unique_ptr<BouncePool>> create(PhysMemory& memory, const BounceOptions& options = {});
  ~BouncePool();

  /// Bounces [orig, orig + size): copies it in (whatever the direction, as Linux does) and
  /// returns the bounce address. A non-zero alloc_align_mask (2^k - 1, 2 KiB to 128 KiB)
  /// reserves whole aligned granules, keeps orig's offset in them and zeroes the padding
  /// (for untrusted devices behind an IOMMU). EINVAL: size 0, more than 256 KiB with the
  /// offset, direction none. ENOMEM: no area has room (nothing is reserved). EFAULT: orig
  /// is not in memory.
  Result<PhysAddr> map(PhysAddr orig, uint64_t size, DmaDirection dir, uint64_t min_align_mask = 0,
                       uint64_t alloc_align_mask = 0);
  /// Copies back if the direction says so, then frees. EINVAL: not a mapping of that size.
  Status unmap(PhysAddr bounce, uint64_t size, DmaDirection dir);
  /// Device to CPU: copies the bounce buffer back to the original (from_device, bidirectional).
  Status sync_for_cpu(PhysAddr bounce, uint64_t size, DmaDirection dir);
  /// CPU to device: copies the original into the bounce buffer (to_device, bidirectional).
  Status sync_for_device(PhysAddr bounce, uint64_t size, DmaDirection dir);

  /// Whether `a` lies in the pool (so an unmap knows a DMA address was bounced).
  bool contains(PhysAddr a) const noexcept;
  uint64_t used_slots() const;
  uint64_t total_slots() const noexcept;

  struct Impl;

 private:
  explicit BouncePool(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace physr
