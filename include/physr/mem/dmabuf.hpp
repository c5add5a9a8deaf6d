// physr mem dma-buf: buffers shared between devices by a range list (Linux drivers/dma-buf,
// VFIO's dma-buf export of a BAR region, drivers/vfio/pci/vfio_pci_dmabuf.c), and the
// devmem-TCP binding that turns one into 4 KiB net_iovs for an RX queue (net/core/devmem.c).
//
// Design rationale
// - An exporter is a DmaBuf: a physical range list (page-aligned ranges, Linux's phys_vec
//   array) and the provider(s) behind it, made from a BAR region (VFIO
//   VFIO_DEVICE_FEATURE_DMA_BUF: offsets and lengths validated against the BAR), from a
//   P2PMemory chunk, or from host memory (a system-heap style buffer).
// - An importer attaches with its DmaDevice and maps: the buffer's ranges go through physr's
//   DMA layer for that device. A buffer of one P2P provider maps as
//   dma_buf_phys_vec_to_sgt() does: the P2P verdict for (provider, importer) picks bus
//   addresses (no IOVA), an IOVA with every range linked (dma_iova_try_alloc/link/sync) or,
//   for a direct device, one dma_map_phys() per range; not_supported is EREMOTEIO. Host
//   memory (and mixed lists) map as an sg exporter's dma_map_sgtable(): DmaDevice::map().
// - Locking: one mutex per buffer stands in for its dma_resv lock. Linux holds dma_resv
//   across map/unmap of dynamic attachments and across move_notify (importers unmap inside
//   the callback and wait for their fences there); physr invalidates and unmaps every
//   importer's mapping itself under the mutex and then calls the callbacks without it held,
//   so a callback may remap at once.
// - Invalidation is visible: every mapping carries the generation it was made in, and
//   DmaBufAttachment::check() fails (ESTALE after a move, ENODEV after a revoke) for a
//   mapping made before the last invalidation; its IOVA is unmapped, so a device access
//   through it faults in the IOMMU.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/platform.hpp"
#include "physr/range.hpp"
#include "physr/mem/uspace.hpp"

namespace physr::mem {

/// One range of a BAR to export (Linux struct vfio_region_dma_range): bytes
/// [offset, offset + length) of the BAR.
struct DmaBufBarRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

/// Largest DMA segment a dma-buf mapping emits (Linux MAX_SG_ENT_SZ: UINT_MAX aligned down
/// to a page, the limit of an sg entry's 32-bit length).
inline constexpr uint64_t kDmaBufMaxSegment = 0xfffff000u;

/// How a mapping reaches the buffer (what dma_buf_phys_vec_to_sgt() picked).
enum class DmaBufPath : uint8_t {
  bus_addr,    // PCI_P2PDMA_MAP_BUS_ADDR: bus addresses, no IOVA
  iova,        // through the host bridge, one IOVA range with every range linked (MMIO)
  phys,        // through the host bridge, a direct device: dma_map_phys() per range (MMIO)
  host,        // host memory (or a mixed list): DmaDevice::map(), dma_map_sgtable()
};
const char* dmabuf_path_name(DmaBufPath p) noexcept;

struct DmaBufStats {
  uint64_t attachments = 0;    // live
  uint64_t mappings = 0;       // live, made since the last invalidation
  uint64_t moves = 0, revokes = 0;
  uint64_t invalidated = 0;    // mappings torn down by move or revoke
};

class DmaBufAttachment;

/// Options of an attachment (Linux struct dma_buf_attach_ops).
struct DmaBufAttachOptions {
  /// dma_buf_attach_ops.allow_peer2peer: the importer can take P2P memory. It counts only
  /// for a dynamic importer (one with move_notify), as dma_buf_dynamic_attach() sets
  /// attach->peer2peer from importer_ops. Without it a P2P buffer refuses the attach
  /// (EOPNOTSUPP, vfio_pci_dma_buf_attach()).
  bool allow_peer2peer = false;
  /// dma_buf_attach_ops.move_notify: a dynamic importer. Called after a move or revoke of
  /// the buffer, once per attachment, without the buffer's lock held and after every
  /// mapping of the attachment has been unmapped; it may call map() again (which fails with
  /// ENODEV after a revoke). Null: a static importer, which pins the buffer (a move fails
  /// with EBUSY while one is attached); a revoke still invalidates its mappings.
  std::function<void(DmaBufAttachment&)> move_notify{};
  const char* name = nullptr;  // reported in errors (a string that outlives the attachment)
};

/// A mapping of an attachment: the DMA segments a device uses. Move-only; valid until
/// unmapped or until the buffer moves or is revoked (check() says which).
class DmaBufMapping {
 public:
  DmaBufMapping() = default;
  DmaBufMapping(DmaBufMapping&&) noexcept = default;
  DmaBufMapping& operator=(DmaBufMapping&&) noexcept = default;
  DmaBufMapping(const DmaBufMapping&) = delete;
  DmaBufMapping& operator=(const DmaBufMapping&) = delete;

  /// The DMA list (each segment at most kDmaBufMaxSegment), in buffer order.
  std::span<const DmaSegment> segments() const noexcept { return segs_; }
  DmaBufPath path() const noexcept { return path_; }
  DmaDirection direction() const noexcept { return dir_; }
  /// Non-zero while the mapping is held (ids are unique per buffer).
  uint64_t id() const noexcept { return id_; }

 private:
  friend class DmaBufAttachment;
  std::vector<DmaSegment> segs_;
  uint64_t id_ = 0;
  uint64_t generation_ = 0;
  DmaBufPath path_ = DmaBufPath::host;
  DmaDirection dir_ = DmaDirection::none;
};

/// An exported buffer (Linux struct dma_buf with its exporter's private data). Thread-safe.
class DmaBuf : public std::enable_shared_from_this<DmaBuf> {
 public:
  /// VFIO VFIO_DEVICE_FEATURE_DMA_BUF of BAR `bar` of `function`: validate_dmabuf_input()
  /// (no ranges, a zero or unaligned offset or length, a total that overflows: EINVAL),
  /// region index 6 (ROM) or above: ENODEV, no P2P provider for the BAR
  /// (pcim_p2pdma_provider(): not a page-aligned memory BAR): EINVAL,
  /// vfio_pci_core_fill_phys_vec() (offset + length overflowing: EOVERFLOW, ending past the
  /// BAR: EINVAL). Registers the BAR with the platform (unpublished) if needed.
  static Result<std::shared_ptr<DmaBuf>> export_bar(Platform& platform, uint32_t function, unsigned bar,
                                                    std::span<const DmaBufBarRange> ranges);
  /// A buffer over a chunk of P2P memory (one provider, one range). EINVAL: empty, not
  /// page-aligned, or a provider that does not hold the chunk.
  static Result<std::shared_ptr<DmaBuf>> export_chunk(Platform& platform, const P2PChunk& chunk);
  /// A buffer over any list (host memory, P2P ranges of registered providers, or both).
  /// EINVAL: empty, a range not page-aligned, a P2P range outside its provider; ENODEV: a
  /// revoked provider.
  static Result<std::shared_ptr<DmaBuf>> export_ranges(Platform& platform, const RangeList& ranges);

  /// Every attachment holds a reference to its buffer, so none outlives it.
  ~DmaBuf();
  DmaBuf(const DmaBuf&) = delete;
  DmaBuf& operator=(const DmaBuf&) = delete;

  /// Linux dma_buf_dynamic_attach(): a new attachment for `device` (which must outlive it).
  /// EOPNOTSUPP: P2P memory and no peer2peer; ENODEV: revoked (vfio_pci_dma_buf_attach()).
  Result<std::shared_ptr<DmaBufAttachment>> attach(DmaDevice& device, DmaBufAttachOptions options = {});

  /// The exporter moves the memory (Linux dma_buf_move_notify()): every mapping of every
  /// attachment is unmapped and invalidated, then each dynamic importer's move_notify runs.
  /// `to` (same total size, page-aligned) replaces the ranges; empty keeps them. EBUSY: a
  /// static importer pins the buffer; ENODEV: revoked; EINVAL: a bad `to`. Not from a
  /// move_notify callback.
  Status move(const RangeList& to = {});
  /// VFIO's revoke (vfio_pci_dma_buf_move(vdev, true) on BAR disable or reset, and
  /// vfio_pci_dma_buf_cleanup()): revoked at once, every mapping is unmapped and
  /// invalidated, move_notify runs for each dynamic importer; later attach and map fail with
  /// ENODEV. EINVAL: already revoked. Not from a move_notify callback.
  Status revoke();
  /// The BAR enabled again (vfio_pci_dma_buf_move(vdev, false)): maps work again; dynamic
  /// importers are notified. EINVAL: not revoked.
  Status unrevoke();

  /// Whether revoke() ran (and unrevoke() did not follow).
  bool revoked() const;
  /// The buffer's ranges now (a copy: a move may replace them).
  RangeList ranges() const;
  /// Bytes in the buffer (fixed for its life).
  uint64_t size() const;
  /// The P2P provider of a single-provider buffer, or kHostMemory (host or mixed).
  ProviderId provider() const;
  /// Attachments and mappings live now, moves, revokes and mappings invalidated so far.
  DmaBufStats stats() const;

  struct Impl;

 private:
  friend class DmaBufAttachment;
  explicit DmaBuf(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// An importer's attachment (Linux struct dma_buf_attachment). Thread-safe; holds its buffer.
class DmaBufAttachment {
 public:
  /// Detaches if still attached (unmapping what is mapped).
  ~DmaBufAttachment();
  DmaBufAttachment(const DmaBufAttachment&) = delete;
  DmaBufAttachment& operator=(const DmaBufAttachment&) = delete;

  /// Linux dma_buf_map_attachment(): maps the buffer for this device. ENODEV: revoked;
  /// EINVAL: detached or direction none; EREMOTEIO: P2P memory the device cannot reach
  /// (named); errors of the DMA layer otherwise. Nothing stays mapped on error.
  Result<DmaBufMapping> map(DmaDirection dir);
  /// Linux dma_buf_unmap_attachment(). A mapping invalidated by a move or revoke is already
  /// unmapped: this only releases it. EINVAL: not a live mapping of this attachment.
  Status unmap(DmaBufMapping& m);
  /// Whether `m` may still be used by the device: ESTALE after a move, ENODEV after a
  /// revoke, EINVAL for a mapping unmapped or of another attachment.
  Status check(const DmaBufMapping& m) const;
  /// Linux dma_buf_detach(): unmaps what is still mapped (counted in leaked_mappings()).
  /// EINVAL: already detached.
  Status detach();

  /// False after detach().
  bool attached() const;
  /// Whether the importer gave a move_notify (Linux dma_buf_attachment_is_dynamic()).
  bool dynamic() const noexcept;
  /// Linux attach->peer2peer: the importer may be given P2P memory.
  bool peer2peer() const noexcept;
  /// The importer's DMA device.
  DmaDevice& device() const noexcept;
  /// The buffer attached to (held alive by the attachment).
  DmaBuf& buffer() const noexcept;
  /// Mappings detach() had to unmap (the importer forgot them).
  uint64_t leaked_mappings() const;

  struct Impl;

 private:
  friend class DmaBuf;
  explicit DmaBufAttachment(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace physr::mem
