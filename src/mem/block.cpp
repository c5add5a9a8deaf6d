// The block layer model: bios from pinned memory, splitting, plug merging, O_DIRECT.
#include "physr/mem/block.hpp"

#include <algorithm>
#include <bit>
#include <limits>
#include <mutex>
#include <optional>

namespace physr::mem {

namespace {
constexpr uint64_t kBioMaxBytes = std::numeric_limits<uint32_t>::max();  // bi_size is an unsigned int
constexpr SegmentLimits kNoMerge{.merge = false};

// block/blk.h get_max_segment_size(): how far a segment from paddr may reach, by the
// segment boundary and the max segment size (min first, then + 1: no overflow at ~0).
uint64_t max_segment_bytes(const QueueLimits& l, uint64_t paddr, uint64_t len) noexcept {
  const uint64_t mask = l.seg_boundary_mask;
  return std::min(len, std::min(mask - (mask & paddr), l.max_segment_size - 1) + 1);
}

uint64_t max_io_bytes(const QueueLimits& l) noexcept {
  return (uint64_t{l.max_sectors} << kSectorShift) & ~(uint64_t{l.logical_block_size} - 1);
}

bool is_pow2(uint64_t x) noexcept { return x != 0 && (x & (x - 1)) == 0; }
}  // namespace

const char* block_op_name(BlockOp op) noexcept { return op == BlockOp::read ? "read" : "write"; }

// ---------------------------------------------------------------------------------------
// Queues

// block/blk-settings.c blk_validate_limits().
Result<Queue> Queue::create(std::string name, const QueueLimits& l, QueueFeatures features) {
  auto bad = [&](std::string what) { return make_error(EINVAL, "queue " + name + ": " + what); };
  if (!is_pow2(l.logical_block_size) || l.logical_block_size < 512 || l.logical_block_size > 65536)
    return bad("logical_block_size " + std::to_string(l.logical_block_size) + " is not a power of two in [512, 65536]");
  if (!is_pow2(uint64_t{l.dma_alignment} + 1)) return bad("dma_alignment " + format_hex(l.dma_alignment) + " is not 2^k - 1");
  if (l.max_segments == 0) return bad("max_segments is 0");
  if (l.max_segment_size < kPageSize) return bad("max_segment_size " + std::to_string(l.max_segment_size) + " is below 4 KiB");
  if (!is_pow2(l.seg_boundary_mask + 1) && l.seg_boundary_mask != ~uint64_t{0})
    return bad("seg_boundary_mask " + format_hex(l.seg_boundary_mask) + " is not 2^k - 1");
  if (l.seg_boundary_mask < kPageSize - 1) return bad("seg_boundary_mask " + format_hex(l.seg_boundary_mask) + " is below 4 KiB - 1");
  if ((uint64_t{l.max_sectors} << kSectorShift) < l.logical_block_size)
    return bad("max_sectors " + std::to_string(l.max_sectors) + " is less than one logical block");
  Queue q;
  q.name_ = std::move(name);
  q.limits_ = l;
  q.features_ = features;
  return q;
}

QueueLimits Queue::nvme_limits() noexcept {
  return QueueLimits{.logical_block_size = 512,
                     .dma_alignment = 3,  // nvme: dword-aligned buffers
                     .max_segments = 127,
                     .max_segment_size = 0xffffffffull,
                     .seg_boundary_mask = 0xffffffffull,
                     .max_sectors = 2048};
}

// drivers/nvme/host/core.c: lim.features |= BLK_FEAT_PCI_P2PDMA when
// ctrl->ops->supports_pci_p2pdma(ctrl).
Result<Queue> Queue::nvme(std::string name, bool ctrl_supports_pci_p2pdma, const QueueLimits& limits) {
  return create(std::move(name), limits, ctrl_supports_pci_p2pdma ? QueueFeatures(QueueFeature::pci_p2pdma) : QueueFeatures());
}

// ---------------------------------------------------------------------------------------
// Bios

Result<std::vector<Bio>> build_bios(const AddressSpace& space, const RangeList& data, BlockOp op, uint64_t sector,
                                    const Queue& q) {
  const uint64_t lbs = q.limits().logical_block_size;
  std::vector<Bio> out;
  std::vector<PhysRange> cur;  // the vecs of the bio being filled
  uint64_t cur_bytes = 0;
  uint64_t next_sector = sector;

  // Ends the bio being filled, aligned down to the logical block (bio_iov_iter_align_down():
  // the trimmed tail is handed back and starts the next bio).
  auto finish = [&]() -> Status {
    const uint64_t trim = cur_bytes % lbs;
    std::vector<PhysRange> carry;
    for (uint64_t left = trim; left != 0;) {
      PhysRange& last = cur.back();
      const uint64_t take = std::min(left, last.size);
      carry.insert(carry.begin(), PhysRange{last.base + (last.size - take), take, last.provider});
      last.size -= take;
      if (last.size == 0) cur.pop_back();
      left -= take;
    }
    if (cur_bytes == trim)
      return make_error(EINVAL, "bio at sector " + std::to_string(next_sector) + ": " + std::to_string(cur_bytes) +
                                    " bytes of provider " + std::to_string(cur.empty() ? carry[0].provider : cur[0].provider) +
                                    " are less than the logical block size " + std::to_string(lbs) +
                                    " (the memory changes provider inside a block)");
    Bio b;
    b.op = op;
    b.sector = next_sector;
    PHYSR_ASSIGN_OR_RETURN(b.vecs, RangeList::from_ranges(cur, kNoMerge));  // stores the tags
    b.provider = cur[0].provider;
    // block/bio.c bio_iov_iter_get_pages() (6.17+): a bio of P2P pages is REQ_NOMERGE.
    b.nomerge = b.provider != kHostMemory;
    next_sector += b.bytes() >> kSectorShift;
    out.push_back(std::move(b));
    cur = std::move(carry);
    cur_bytes = trim;
    return {};
  };

  for (const PhysRange in : data) {
    // Ids beyond the direct range share one tag: compare full ids, resolved by address.
    PhysRange r = in;
    if (r.provider == kIndirectProvider) r.provider = space.provider_at(r.base);
    for (uint64_t off = 0; off < r.size;) {
      const PhysAddr a = r.base + off;
      // lib/iov_iter.c get_contig_folio_len(): a bio_vec stays within one folio.
      const uint64_t len = std::min(r.size - off, space.folio_bytes_left(a));
      // lib/iov_iter.c iov_iter_extract_bvecs(): the bio ends where the pgmap changes
      // (zone_device_pages_have_same_pgmap()), when its vecs run out (BIO_MAX_VECS) or at
      // UINT_MAX bytes.
      if (!cur.empty() && (cur.back().provider != r.provider || cur.size() == kBioMaxVecs || cur_bytes + len > kBioMaxBytes))
        PHYSR_RETURN_IF_ERROR(finish());
      if (!cur.empty() && cur.back().provider != r.provider) PHYSR_RETURN_IF_ERROR(finish());  // a carried tail
      cur.push_back(PhysRange{a, len, r.provider});
      cur_bytes += len;
      off += len;
    }
  }
  if (!cur.empty()) {
    if (cur_bytes % lbs != 0)
      return make_error(EINVAL, "bios at sector " + std::to_string(sector) + ": " + std::to_string(data.total_bytes()) +
                                    " bytes are not a multiple of the logical block size " + std::to_string(lbs));
    PHYSR_RETURN_IF_ERROR(finish());
  }
  return out;
}

// block/blk-merge.c bvec_split_segs(), without a bytes limit.
unsigned vec_segments(const PhysRange& vec, const QueueLimits& l) noexcept {
  unsigned n = 0;
  for (uint64_t a = vec.base.value(), len = vec.size; len != 0;) {
    const uint64_t seg = max_segment_bytes(l, a, len);
    ++n;
    a += seg;
    len -= seg;
  }
  return n;
}

// block/blk-merge.c bio_split_rw_at() with bvec_split_segs(): segments are counted per
// vec, never merged across vecs; a split is rounded down to the logical block.
std::optional<unsigned> bio_fits(const Bio& bio, const QueueLimits& l, uint64_t* split_bytes) noexcept {
  const uint64_t max_bytes = max_io_bytes(l);
  unsigned nsegs = 0;
  uint64_t bytes = 0;
  for (const PhysRange v : bio.vecs) {
    const uint64_t max_len = max_bytes - bytes;
    uint64_t len = std::min(v.size, max_len), total = 0;
    while (len != 0 && nsegs < l.max_segments) {
      const uint64_t seg = max_segment_bytes(l, v.base.value() + total, len);
      ++nsegs;
      total += seg;
      len -= seg;
    }
    bytes += total;
    if (len > 0 || v.size > max_len) {
      if (split_bytes) *split_bytes = bytes & ~(uint64_t{l.logical_block_size} - 1);
      return std::nullopt;
    }
  }
  return nsegs;
}

// block/blk-merge.c __bio_split_to_limits() for reads and writes.
Result<std::vector<Bio>> split_to_limits(Bio bio, const Queue& q) {
  std::vector<Bio> out;
  for (;;) {
    uint64_t split = 0;
    if (bio_fits(bio, q.limits(), &split)) {
      out.push_back(std::move(bio));
      return out;
    }
    if (split == 0)
      return make_error(EINVAL, "bio at sector " + std::to_string(bio.sector) + " cannot be split into a logical block within the limits of queue " + q.name());
    PHYSR_ASSIGN_OR_RETURN(const RangeSlice head, bio.vecs.slice(0, split));
    PHYSR_ASSIGN_OR_RETURN(const RangeSlice tail, bio.vecs.slice(split, bio.bytes() - split));
    Bio first{bio.op, bio.sector, head.to_list(), bio.provider, bio.nomerge};
    Bio rest{bio.op, bio.sector + (split >> kSectorShift), tail.to_list(), bio.provider, bio.nomerge};
    out.push_back(std::move(first));
    bio = std::move(rest);
  }
}

// ---------------------------------------------------------------------------------------
// Requests

// block/blk-core.c blk_attempt_plug_merge() -> block/blk-merge.c blk_rq_merge_ok(),
// blk_try_merge() and ll_back_merge_fn() / ll_front_merge_fn().
Status Plug::submit(Bio bio) {
  const QueueLimits& l = q_->limits();
  const std::optional<unsigned> nsegs = bio_fits(bio, l, nullptr);
  if (!nsegs)
    return make_error(EINVAL, "bio at sector " + std::to_string(bio.sector) + " does not fit the limits of queue " +
                                  q_->name() + ": split it first");
  if (!requests_.empty()) {
    Request& rq = requests_.back();
    // rq_mergeable() / bio_mergeable(): REQ_NOMERGE; the same operation; and pieces of
    // different providers never share a request (zone_device_pages_have_same_pgmap()).
    const bool ok = !rq.nomerge && !bio.nomerge && rq.op == bio.op && rq.bios.front().provider == bio.provider &&
                    rq.sectors() + bio.sectors() <= l.max_sectors && rq.nr_phys_segments + *nsegs <= l.max_segments;
    if (ok && rq.sector + rq.sectors() == bio.sector) {  // ELEVATOR_BACK_MERGE
      rq.bytes += bio.bytes();
      rq.nr_phys_segments += *nsegs;
      rq.bios.push_back(std::move(bio));
      return {};
    }
    if (ok && rq.sector == bio.sector + bio.sectors()) {  // ELEVATOR_FRONT_MERGE
      rq.sector = bio.sector;
      rq.bytes += bio.bytes();
      rq.nr_phys_segments += *nsegs;
      rq.bios.insert(rq.bios.begin(), std::move(bio));
      return {};
    }
  }
  Request rq;
  rq.op = bio.op;
  rq.sector = bio.sector;
  rq.bytes = bio.bytes();
  rq.nr_phys_segments = *nsegs;
  rq.nomerge = bio.nomerge;
  rq.bios.push_back(std::move(bio));
  requests_.push_back(std::move(rq));
  return {};
}

// block/blk-mq-dma.c blk_map_iter_next(): a segment starts with the rest of a vec, capped by
// get_max_segment_size(); once a vec is used up, whole following vecs join while the total
// stays within that cap and biovec_phys_mergeable() holds (contiguous, same boundary window).
RangeList request_segments(const Request& rq, const QueueLimits& l) {
  std::vector<PhysRange> vecs;
  for (const Bio& b : rq.bios)
    for (const PhysRange v : b.vecs) vecs.push_back(v);
  RangeList out;
  const uint64_t mask = l.seg_boundary_mask;
  size_t i = 0;
  uint64_t done = 0;  // bytes of vecs[i] already emitted
  while (i < vecs.size()) {
    const PhysRange v = vecs[i];
    const uint64_t a = v.base.value() + done;
    const uint64_t max_size = max_segment_bytes(l, a, kBioMaxBytes);
    uint64_t len = std::min(v.size - done, max_size);
    done += len;
    if (done == v.size) {
      ++i;
      done = 0;
      while (i < vecs.size()) {
        const PhysRange n = vecs[i];
        const bool mergeable = a + len == n.base.value() && (a | mask) == ((n.base.value() + n.size - 1) | mask) &&
                               n.provider == v.provider;
        if (len + n.size > max_size || !mergeable) break;
        len += n.size;
        ++i;
      }
    }
    const Status st = out.append(PhysRange{PhysAddr(a), len, v.provider}, kNoMerge);
    PHYSR_ASSERT(st.has_value(), "a segment of pinned memory always fits a range list");
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// O_DIRECT

Result<DirectIoStats> direct_io(AddressSpace& space, const Queue& q, BlockOp op, uint64_t addr, uint64_t len,
                                uint64_t sector, const BlockDriver& driver) {
  const QueueLimits& l = q.limits();
  const std::string what = std::string("O_DIRECT ") + block_op_name(op) + " of " + q.name();
  // block/fops.c blkdev_dio_invalid(): the position and the length are logical-block
  // multiples and the buffer is dma-aligned (bdev_iter_is_aligned()).
  const uint64_t pos = sector << kSectorShift;
  if (((pos | len) & (l.logical_block_size - 1)) != 0 || len == 0)
    return make_error(EINVAL, what + ": position " + format_hex(pos) + " or length " + format_hex(len) +
                                  " is not a non-zero multiple of the logical block size " + std::to_string(l.logical_block_size));
  if ((addr & l.dma_alignment) != 0)
    return make_error(EINVAL, what + ": buffer address " + format_hex(addr) + " is not aligned to " +
                                  std::to_string(uint64_t{l.dma_alignment} + 1) + " bytes");
  // block/bio.c bio_iov_iter_get_pages(): ITER_ALLOW_P2PDMA only when blk_queue_pci_p2pdma();
  // lib/iov_iter.c iov_iter_extract_user_pages() turns it into FOLL_PCI_P2PDMA. A read fills
  // the user's memory: FOLL_WRITE.
  FollFlags flags;
  if (op == BlockOp::read) flags |= Foll::write;
  if (q.pci_p2pdma()) flags |= Foll::pci_p2pdma;
  // mm/gup.c: pinning holds mmap_lock (mmap_read_lock), the I/O does not: a provider's
  // removal may unmap the buffer meanwhile (unmap_mapping_range), and the pins keep its
  // memory until the I/O ends (the pgmap reference memunmap_pages() waits for).
  std::unique_lock lk(space.mmap_lock());
  PHYSR_ASSIGN_OR_RETURN_CTX(Pinned pinned, space.pin(addr, len, flags), what);

  DirectIoStats stats;
  stats.pinned_pages = pinned.pages();
  std::optional<Plug> plug;
  auto build = [&]() -> Status {
    PHYSR_ASSIGN_OR_RETURN_CTX(std::vector<Bio> bios, build_bios(space, pinned.ranges(), op, sector, q), what);
    plug.emplace(q);
    for (Bio& b : bios) {
      PHYSR_ASSIGN_OR_RETURN_CTX(std::vector<Bio> pieces, split_to_limits(std::move(b), q), what);
      stats.bios += pieces.size();
      for (Bio& p : pieces) PHYSR_RETURN_IF_ERROR_CTX(plug->submit(std::move(p)), what);
    }
    return {};
  };
  auto run = [&]() -> Status {
    for (const Request& rq : plug->requests()) {
      const RangeList segs = request_segments(rq, l);
      ++stats.requests;
      stats.segments += segs.size();
      PHYSR_RETURN_IF_ERROR_CTX(driver(rq, segs), what);
      stats.bytes += rq.bytes;
    }
    return {};
  };
  Status st = build();
  lk.unlock();
  if (st) st = run();
  lk.lock();
  Status un = space.unpin(std::move(pinned));
  PHYSR_RETURN_IF_ERROR(st);
  PHYSR_RETURN_IF_ERROR_CTX(std::move(un), what);
  return stats;
}

}  // namespace physr::mem
