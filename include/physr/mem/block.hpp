// physr mem: a block layer model (block/bio.c, block/blk-merge.c, block/fops.c): bios that
// carry range lists, splitting to queue limits, request merging, O_DIRECT over pinned
// user memory, and the queue feature that lets P2P memory in (BLK_FEAT_PCI_P2PDMA).
//
// Design rationale
// - A Bio is (op, sector, vecs): vecs is a RangeList built without merging, one entry per
//   bio_vec, each within one folio as iov_iter_extract_bvecs() makes them (a host folio,
//   or one 4 KiB ZONE_DEVICE page of P2P memory). A bio holds pages of one provider only
//   and ends where the provider changes (zone_device_pages_have_same_pgmap()); a bio of P2P
//   memory is REQ_NOMERGE (block/bio.c bio_iov_iter_get_pages(), 6.17+), so no request
//   ever mixes providers.
// - Segments are counted per bio_vec as bio_split_rw_at() / bvec_split_segs() do (max
//   segment size and segment boundary split a vec, adjacent vecs are not merged), and a
//   request's nr_phys_segments is the sum over its bios. The list a driver maps is built as
//   blk_rq_dma_map_iter / blk_map_iter_next() does: physically contiguous vecs merge up to
//   the max segment size and within the boundary (biovec_phys_mergeable()).
// - Merging is plug merging: a bio may join the last request (back or front) when
//   blk_rq_merge_ok() and ll_back_merge_fn() / ll_front_merge_fn() allow it. No elevator, no
//   virt_boundary_mask, no zones, no integrity.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/mem/uspace.hpp"
#include "physr/range.hpp"

namespace physr::mem {

inline constexpr unsigned kSectorShift = 9;
/// BIO_MAX_VECS: the most bio_vecs one bio holds.
inline constexpr size_t kBioMaxVecs = 256;

/// A block operation. read moves data from the device into memory (its pages are pinned
/// with FOLL_WRITE), write from memory to the device.
enum class BlockOp : uint8_t { read, write };
const char* block_op_name(BlockOp op) noexcept;

/// struct queue_limits, the fields physr models (defaults: blk_set_default_limits()).
struct QueueLimits {
  uint32_t logical_block_size = 512;
  uint32_t dma_alignment = 511;               // user buffer addresses must be aligned to this + 1
  uint32_t max_segments = 128;                // BLK_MAX_SEGMENTS
  uint64_t max_segment_size = 65536;          // BLK_MAX_SEGMENT_SIZE
  uint64_t seg_boundary_mask = 0xffffffffull; // BLK_SEG_BOUNDARY_MASK
  uint32_t max_sectors = 2560;                // BLK_DEF_MAX_SECTORS_CAP (1280 KiB)
};

/// Queue features (BLK_FEAT_*; QUEUE_FLAG_PCI_P2PDMA before Linux 6.11).
enum class QueueFeature : uint32_t { pci_p2pdma = 1 };
using QueueFeatures = Flags<QueueFeature>;

/// A request queue: its limits and features.
class Queue {
 public:
  /// blk_validate_limits(): logical_block_size a power of two in [512, 64 KiB], dma_alignment
  /// + 1 a power of two, max_segments >= 1, max_segment_size >= 4 KiB, seg_boundary_mask of the
  /// form 2^k - 1 and >= 4 KiB - 1, max_sectors at least one logical block. EINVAL naming the field.
  static Result<Queue> create(std::string name, const QueueLimits& limits, QueueFeatures features = {});
  /// The limits of an NVMe namespace on nvme-pci: 127 segments (NVME_MAX_SEGS), 4 GiB - 1
  /// segments, 1 MiB transfers (a common MDTS).
  static QueueLimits nvme_limits() noexcept;
  /// An NVMe namespace's queue: drivers/nvme/host/core.c sets BLK_FEAT_PCI_P2PDMA when the
  /// controller's supports_pci_p2pdma() says so (nvme-pci: its DMA ops can map P2P pages).
  static Result<Queue> nvme(std::string name, bool ctrl_supports_pci_p2pdma, const QueueLimits& limits = nvme_limits());

  /// blk_queue_pci_p2pdma(): O_DIRECT may bring P2P memory to this queue.
  bool pci_p2pdma() const noexcept { return features_.has(QueueFeature::pci_p2pdma); }
  const QueueLimits& limits() const noexcept { return limits_; }
  QueueFeatures features() const noexcept { return features_; }
  const std::string& name() const noexcept { return name_; }

 private:
  Queue() = default;
  std::string name_;
  QueueLimits limits_;
  QueueFeatures features_;
};

/// A bio: an operation at a sector over the memory its vecs name.
struct Bio {
  BlockOp op = BlockOp::read;
  uint64_t sector = 0;
  RangeList vecs;                       // one entry per bio_vec, never merged
  ProviderId provider = kHostMemory;    // of every vec
  bool nomerge = false;                 // REQ_NOMERGE
  uint64_t bytes() const noexcept { return vecs.total_bytes(); }
  uint64_t sectors() const noexcept { return vecs.total_bytes() >> kSectorShift; }
};

/// A request: bios of consecutive sectors, one operation.
struct Request {
  BlockOp op = BlockOp::read;
  uint64_t sector = 0;
  uint64_t bytes = 0;
  unsigned nr_phys_segments = 0;
  bool nomerge = false;
  std::vector<Bio> bios;
  uint64_t sectors() const noexcept { return bytes >> kSectorShift; }
};

/// bio_iov_iter_get_pages() over pinned memory: `data` (bytes starting at `sector`) becomes
/// bios of at most kBioMaxVecs vecs and 4 GiB - 1 bytes, each ending where the provider
/// changes, each a logical-block multiple (bio_iov_iter_align_down(): the rest starts the
/// next bio). Vecs end at folio ends (`space` knows the folios). EINVAL when a bio would
/// hold less than one logical block (a provider change inside a block).
Result<std::vector<Bio>> build_bios(const AddressSpace& space, const RangeList& data, BlockOp op, uint64_t sector,
                                    const Queue& q);

/// Segments of one vec as bvec_split_segs() counts them (split at max_segment_size and at
/// the segment boundary).
unsigned vec_segments(const PhysRange& vec, const QueueLimits& limits) noexcept;
/// bio_split_rw_at(): the bio's segments when it fits the limits (max_segments, max_sectors),
/// else nullopt and in `split_bytes` the logical-block-aligned bytes of the first piece.
std::optional<unsigned> bio_fits(const Bio& bio, const QueueLimits& limits, uint64_t* split_bytes) noexcept;
/// bio_split_to_limits(): the bio cut into pieces that each fit the limits.
Result<std::vector<Bio>> split_to_limits(Bio bio, const Queue& q);

/// A plug: requests built from submitted bios, each bio merged into the last request when
/// blk_rq_merge_ok() and the back/front merge checks allow (blk_attempt_plug_merge()).
class Plug {
 public:
  explicit Plug(const Queue& q) : q_(&q) {}
  /// Adds a bio that fits the limits (split_to_limits() first): merged or a new request.
  /// EINVAL for a bio that does not fit.
  Status submit(Bio bio);
  const std::vector<Request>& requests() const noexcept { return requests_; }
  std::vector<Request> take() noexcept { return std::move(requests_); }

 private:
  const Queue* q_;
  std::vector<Request> requests_;
};

/// The physical segments a driver maps for a request, as blk_map_iter_next() walks them:
/// contiguous vecs of one provider merge within max_segment_size and the segment boundary.
RangeList request_segments(const Request& rq, const QueueLimits& limits);

/// What a direct_io() did.
struct DirectIoStats {
  size_t bios = 0;       // after splitting
  size_t requests = 0;
  size_t segments = 0;   // ranges handed to the driver
  uint64_t bytes = 0;
  uint64_t pinned_pages = 0;
};

/// The driver: called once per request, in order, with the segments to map. Returning an
/// error stops the I/O (later requests are not issued) and direct_io returns it.
using BlockDriver = std::function<Status(const Request& rq, const RangeList& segments)>;

/// O_DIRECT on a block device (block/fops.c): checks alignment as blkdev_dio_invalid()
/// (the position and length a logical-block multiple, the buffer address aligned to
/// dma_alignment + 1: EINVAL), pins [addr, addr + len) with FOLL_WRITE for reads and with
/// FOLL_PCI_P2PDMA iff the queue has BLK_FEAT_PCI_P2PDMA (so P2P memory on a queue without
/// it fails EREMOTEIO), builds bios and requests, hands each request's segments to the
/// driver, then unpins, whatever happened.
Result<DirectIoStats> direct_io(AddressSpace& space, const Queue& q, BlockOp op, uint64_t addr, uint64_t len,
                                uint64_t sector, const BlockDriver& driver);

}  // namespace physr::mem
