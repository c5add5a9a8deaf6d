// physr iommu: the machine model's IOMMU domain: a 4-level I/O page table with 4 KiB,
// 2 MiB and 1 GiB leaves, an IOTLB with strict or deferred invalidation, and the domain's
// IOVA allocator (physr/iova.hpp).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/iova.hpp"

namespace physr {

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

/// The machine model's IOMMU domain (an IommuDomain of the DMA layer), shared by the
/// devices attached to it: a 4-level I/O page table (x86-64 and Arm64 style: 9 bits a
/// level, leaves of 4 KiB, 2 MiB and 1 GiB), its IOVA allocator, and an IOTLB whose
/// invalidation is strict or deferred. Thread-safe: map and unmap serialise; translate()
/// runs concurrently with them (entries are atomic, tables are published after they are
/// filled and freed only with the domain). `final`, so the model's own calls (the devices'
/// per-page translate) bind statically.
class IoDomain final : public IommuDomain {
 public:
  static Result<std::unique_ptr<IoDomain>> create(const IoDomainOptions& options = {});
  ~IoDomain() override;
  IoDomain(const IoDomain&) = delete;
  IoDomain& operator=(const IoDomain&) = delete;

  /// Maps [iova, iova + size) to [phys, phys + size), with the largest leaves that the
  /// alignment of both allows. EINVAL: zero or unaligned size/addresses, no permission,
  /// beyond the 48-bit IOVA or 52-bit physical space. EEXIST: part of the range is mapped
  /// (named); nothing stays mapped.
  Status map(DmaAddr iova, PhysAddr phys, uint64_t size, IommuPerms perm) override;
  /// Maps a batch under one lock, all or nothing (Linux iommu_map_sg()): on any error
  /// nothing of the batch stays mapped. Errors as map(), prefixed "batch entry N: ".
  Status map_many(std::span<const IoMapOp> ops) override;
  /// Unmaps exactly what map() mapped. ENOENT names the first unmapped page; EINVAL a range
  /// that would split a large leaf. Nothing changes on error. Strict mode invalidates the
  /// IOTLB for the range now; deferred mode leaves it stale until the flush.
  Status unmap(DmaAddr iova, uint64_t size) override;
  /// Unmaps several ranges under one lock, all or nothing: every range is validated as
  /// unmap() does before any is changed.
  Status unmap_many(std::span<const DmaSpan> ranges) override;
  /// Returns an IOVA range to the allocator: at once in strict mode, after the next IOTLB
  /// flush in deferred mode (so a stale IOTLB entry can never point at a reused IOVA).
  Status free_iova(DmaAddr iova, uint64_t size) override;
  /// The translation a device gets: from the IOTLB if cached there (possibly stale in
  /// deferred mode), else by walking the page table (and filling the IOTLB). nullopt: an
  /// IOMMU fault (unmapped).
  std::optional<IoTranslation> translate(DmaAddr iova) override;
  /// Walks the page table only (what is mapped now), ignoring the IOTLB.
  std::optional<IoTranslation> walk(DmaAddr iova) const override;
  /// Invalidates the whole IOTLB and releases the IOVAs queued for reuse.
  void flush() override;

  IovaAllocator& iova() noexcept override { return *iova_; }
  IoDomainStats stats() const;
  bool strict() const noexcept;

  struct Impl;

 private:
  IoDomain(std::unique_ptr<Impl> impl, std::unique_ptr<IovaAllocator> iova);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<IovaAllocator> iova_;
};

}  // namespace physr
