// physr dma: the DMA mapping layer: DMA devices, map/unmap/sync of mixed host + P2P range
// lists, single-range map_phys, the two-step IOVA API, and the bounce pool (swiotlb).
//
// Mapping design (Linux kernel/dma/direct.c, drivers/iommu/dma-iommu.c, p2pdma.c)
// - Each range of a list is classified by its provider tag and the P2P verdict for
//   (provider owner, device): host memory; bus_addr (DMA address = phys + the provider's bus
//   offset, never put in the IOMMU, flagged BUS_ADDR); thru_host_bridge (in a list, mapped
//   as host memory, as Linux dma_direct_map_sg() and iommu_dma_map_sg() do; a single range,
//   map_phys or iova_link, gets the MMIO attribute); not_supported (EREMOTEIO for the whole
//   call, or, with kDmaAttrAllowBounce, bounced when the provider allows CPU copies).
// - Direct devices (Linux dma_direct_map_phys()): DMA address = phys + dma_offset; bounced
//   when above the DMA mask or when the device forces bouncing (swiotlb=force). One
//   segment per range, split to the device's max segment and boundary (Linux leaves that
//   to the block layer).
// - IOMMU devices: Linux iommu_dma_map_sg(): one IOVA allocation for every IOMMU-mapped
//   segment, each aligned to the granule, padded so no segment crosses the boundary mask,
//   bus-address segments skipped, then __finalise_sg()'s merge of adjacent results within
//   the device's limits. The page table is written in one batch (IommuDomain::map_many).
// - Untrusted devices behind an IOMMU: Linux iommu_dma_map_sg_swiotlb(): each range (cut to
//   the limits) gets its own IOVA, with no P2P classification; ranges not aligned to the
//   granule (iova_unaligned()) are bounced in whole zeroed granules. With
//   DmaDeviceConfig::untrusted_one_iova they are laid out as a trusted device's, with the
//   verdicts applied, bouncing the same ranges.
// - Any failure undoes everything the call did: no IOVA, page-table entry or bounce slot
//   stays behind.
//
// Bounce pool design (Linux kernel/dma/swiotlb.c)
// - A region of host RAM cut into 2 KiB slots (IO_TLB_SIZE) grouped in segments of 128
//   slots (IO_TLB_SEGSIZE): one mapping never crosses a segment, so at most 256 KiB.
// - Areas, each with its own lock and search hint (Linux's per-CPU areas): a mapping tries
//   the area of the CPU it runs on first, then the others.
// - Alignment: the bounce address keeps the original's bits under the device's
//   min_align_mask (NVMe needs the offset within its PRP pages), and mappings of a page or
//   more start page-aligned when the device has no such mask; no mapping crosses the
//   device's segment boundary.
// - Copies follow the direction: to the bounce buffer at map and sync_for_device (to_device,
//   bidirectional), back to the original at unmap and sync_for_cpu (from_device,
//   bidirectional), through the MemoryAccess the pool was created on (the model's
//   PhysMemory, so tests can check them byte for byte; real memory on a live host).
//
// Seams (SPDK's memory domains, QEMU's IOMMU memory regions)
// - The DMA layer owns the two interfaces it calls: MemoryAccess (read, write, copy of
//   physical bytes: what the bounce pool needs) and IommuDomain (map, unmap, translate,
//   flush, and the domain's IOVA space). The machine model implements them with PhysMemory
//   (physr/physmem.hpp) and IoDomain (physr/iommu.hpp); a real host implements them with
//   its own memory and IOMMU. Calls through them are per mapping or per bounce, never per
//   byte: a map of 256 ranges makes four virtual calls.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/iova.hpp"
#include "physr/pci.hpp"
#include "physr/provider.hpp"
#include "physr/range.hpp"

namespace physr {

// -------------------------------------------------------------------------------------
// Seams: what the DMA layer needs from memory and from an IOMMU

/// Physical memory as the DMA layer's CPU side reaches it: bounce copies, the zeroed
/// padding of an untrusted device's bounce. Implementations are thread-safe for disjoint
/// bytes. Every call fails with EFAULT, naming the first address outside memory, and then
/// moves nothing.
class MemoryAccess {
 public:
  virtual ~MemoryAccess() = default;
  /// Writes bytes at `a`.
  virtual Status write(PhysAddr a, std::span<const uint8_t> bytes) = 0;
  /// Reads bytes at `a`.
  virtual Status read(PhysAddr a, std::span<uint8_t> out) const = 0;
  /// Copies len bytes from src to dst (the ranges do not overlap).
  virtual Status copy(PhysAddr dst, PhysAddr src, uint64_t len) = 0;
  /// Whether all of `span` is host RAM (where a bounce pool may live), not device memory.
  virtual bool is_host_ram(PhysSpan span) const noexcept = 0;
};

/// Access rights of a mapping, plus the MMIO attribute (Linux IOMMU_MMIO: device memory,
/// mapped uncached; P2P through the host bridge carries it).
enum class IommuPerm : uint8_t { read = 1, write = 2, mmio = 4 };
using IommuPerms = Flags<IommuPerm>;
inline constexpr IommuPerms kIommuRead = IommuPerm::read;
inline constexpr IommuPerms kIommuWrite = IommuPerm::write;
inline constexpr IommuPerms kIommuReadWrite = kIommuRead | kIommuWrite;
inline constexpr IommuPerms kIommuMmio = IommuPerm::mmio;

/// One mapping of a batch: [iova, iova + size) -> [phys, phys + size).
struct IoMapOp {
  DmaAddr iova;
  PhysAddr phys;
  uint64_t size = 0;
  IommuPerms perm{};
};

/// What the IOMMU answers for one DMA address.
struct IoTranslation {
  PhysAddr phys;           // the translated address (page base + offset)
  uint64_t page_size = 0;  // 4 KiB, 2 MiB or 1 GiB: the leaf that mapped it
  IommuPerms perm{};
};


/// An IOMMU domain as the DMA layer drives it (QEMU's IOMMU memory region: translate gives
/// the page, its mask and the permissions), with the IOVA space of the devices attached to
/// it. Implementations are thread-safe: map and unmap may serialise, translate and walk run
/// concurrently with them.
class IommuDomain {
 public:
  virtual ~IommuDomain() = default;
  /// The domain's IOVA allocator; lives as long as the domain.
  virtual IovaAllocator& iova() noexcept = 0;
  /// Maps [iova, iova + size) to [phys, phys + size) with `perm`. EINVAL:
  /// zero or unaligned sizes or addresses, no permission; EEXIST: part of it is mapped.
  /// Nothing stays mapped on error.
  virtual Status map(DmaAddr iova, PhysAddr phys, uint64_t size, IommuPerms perm) = 0;
  /// Maps a batch, all or nothing (Linux iommu_map_sg()). Errors as map(), naming the op.
  virtual Status map_many(std::span<const IoMapOp> ops) = 0;
  /// Unmaps exactly what was mapped. ENOENT names the first unmapped page; nothing changes
  /// on error.
  virtual Status unmap(DmaAddr iova, uint64_t size) = 0;
  /// Unmaps several ranges, all or nothing.
  virtual Status unmap_many(std::span<const DmaSpan> ranges) = 0;
  /// Returns IOVA to the allocator once no IOTLB entry can still point into it (at once in
  /// strict mode, after the next flush in deferred mode).
  virtual Status free_iova(DmaAddr iova, uint64_t size) = 0;
  /// The translation a device gets for `iova` (possibly a stale IOTLB entry in deferred
  /// mode), or nullopt: an IOMMU fault.
  virtual std::optional<IoTranslation> translate(DmaAddr iova) = 0;
  /// What is mapped at `iova` now (the page table, not the IOTLB), or nullopt.
  virtual std::optional<IoTranslation> walk(DmaAddr iova) const = 0;
  /// Invalidates the IOTLB and releases IOVA waiting for it.
  virtual void flush() = 0;
};

/// Linux enum dma_data_direction.
enum class DmaDirection : uint8_t { bidirectional, to_device, from_device, none };
const char* dma_direction_name(DmaDirection d) noexcept;

struct BounceOptions {
  PhysAddr base{0x100000};   // where the pool sits; must lie in a host RAM region of the memory
  uint64_t size = 64 * MiB;  // a multiple of 256 KiB (one segment)
  unsigned areas = 2;        // a power of two; the pool is split evenly between them
};

/// What a bounce must respect: the device's parameters Linux's swiotlb reads, and the
/// alignment its caller asks for.
struct BounceParams {
  uint64_t min_align_mask = 0;    // dma_get_min_align_mask(): original bits the bounce address keeps
  /// Alignment of the reservation (2^k - 1, 2 KiB - 1 to 128 KiB - 1), or 0: none asked.
  /// iommu_dma_map_swiotlb() passes the IOVA granule's: the reservation is then whole
  /// granules and its padding is zeroed.
  uint64_t alloc_align_mask = 0;
  uint64_t seg_boundary_mask = ~uint64_t{0};  // dma_get_seg_boundary(): no bounce crosses it
  uint64_t dma_offset = 0;        // DMA address - physical address of the pool (phys_to_dma())
};

/// A swiotlb-style bounce pool. Thread-safe.
class BouncePool {
 public:
  static constexpr unsigned kSlotShift = 11;
  static constexpr uint64_t kSlotSize = uint64_t{1} << kSlotShift;
  static constexpr unsigned kSegmentSlots = 128;
  static constexpr uint64_t kMaxMapping = kSlotSize * kSegmentSlots;  // 256 KiB

  /// EINVAL for a size or area count that does not divide into segments, or a pool not
  /// inside host RAM of `memory` (which must outlive the pool).
  static Result<std::unique_ptr<BouncePool>> create(MemoryAccess& memory, const BounceOptions& options = {});
  ~BouncePool();

  /// Bounces [orig, orig + size): copies it in (whatever the direction, as Linux does) and
  /// returns the bounce address (Linux swiotlb_tbl_map_single()). The address keeps orig's
  /// bits under min_align_mask (below the slot size, or up to alloc_align_mask when one is
  /// given), the reservation starts on alloc_align_mask (on a page for a page or more when
  /// neither mask is set) and covers whole alloc_align_mask + 1 units, whose padding is
  /// zeroed; the bounce never crosses seg_boundary_mask in DMA address space. EINVAL: size
  /// 0, more than 256 KiB with the offset, more than the boundary allows, a bad
  /// alloc_align_mask, direction none. ENOMEM: no area has room (nothing is reserved).
  /// EFAULT: orig is not in memory.
  Result<PhysAddr> map(PhysAddr orig, uint64_t size, DmaDirection dir, const BounceParams& params);
  /// The same with no segment boundary and no DMA offset.
  Result<PhysAddr> map(PhysAddr orig, uint64_t size, DmaDirection dir, uint64_t min_align_mask = 0,
                       uint64_t alloc_align_mask = 0) {
    return map(orig, size, dir, BounceParams{.min_align_mask = min_align_mask, .alloc_align_mask = alloc_align_mask});
  }
  /// Copies back if the direction says so, then frees. EINVAL: not a mapping of that size
  /// (nothing changes); EFAULT: the copy back failed (the slots are freed all the same).
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

// -------------------------------------------------------------------------------------
// Devices and mappings

/// DMA attributes (Linux DMA_ATTR_*); a set of them is DmaAttrs.
enum class DmaAttr : uint32_t {
  /// DMA_ATTR_SKIP_CPU_SYNC: unmap copies nothing back from bounce buffers and no cache
  /// maintenance is done at map or unmap; the caller syncs explicitly.
  skip_cpu_sync = 1,
  /// physr's own (no Linux counterpart): P2P memory that Linux refuses to map is bounced
  /// through host memory instead, when its provider allows CPU copies: a not_supported
  /// verdict, and MMIO (map_phys, iova_link) a device cannot take in place (above a direct
  /// device's mask, with forced bouncing, unaligned for an untrusted device behind an
  /// IOMMU; also unaligned in a list with untrusted_one_iova). Without it such a range
  /// fails the call with EREMOTEIO. Memory that Linux bounces itself (host memory, and P2P
  /// through the host bridge in a list) needs no attribute.
  allow_bounce = 2,
};
using DmaAttrs = Flags<DmaAttr>;
inline constexpr DmaAttrs kDmaAttrNone{};
inline constexpr DmaAttrs kDmaAttrSkipCpuSync = DmaAttr::skip_cpu_sync;
inline constexpr DmaAttrs kDmaAttrAllowBounce = DmaAttr::allow_bounce;

/// What a DMA segment is, so unmap and tools know what was done; a set of them is DmaSegFlags.
enum class DmaSeg : uint32_t {
  bus_addr = 1,  // a PCI bus address (P2P under a shared switch): not in the IOMMU
  iommu = 2,     // an IOVA in the device's IOMMU domain
  bounced = 4,   // (some of) its bytes go through the bounce pool
  mmio = 8,      // mapped with the MMIO attribute (Linux DMA_ATTR_MMIO: map_phys of P2P memory
                 // through the host bridge; direct: the DMA address is phys, no offset)
};
using DmaSegFlags = Flags<DmaSeg>;
inline constexpr DmaSegFlags kDmaSegBusAddr = DmaSeg::bus_addr;
inline constexpr DmaSegFlags kDmaSegIommu = DmaSeg::iommu;
inline constexpr DmaSegFlags kDmaSegBounced = DmaSeg::bounced;
inline constexpr DmaSegFlags kDmaSegMmio = DmaSeg::mmio;

/// One entry of a DMA list.
struct DmaSegment {
  DmaAddr addr;
  uint64_t len = 0;
  DmaSegFlags flags{};
};
/// "bus_addr", "iommu+mmio+bounced", "direct", ...: the path a segment's flags describe.
std::string dma_seg_path(DmaSegFlags flags);

/// What a device maps with. Non-owning; everything must outlive the devices using it.
struct DmaEnv {
  const pci::P2PEngine* p2p = nullptr;          // required: the topology the device is a function of, and its verdicts
  const ProviderRegistry* providers = nullptr;  // null: every range must be host memory
  BouncePool* bounce = nullptr;                 // null: a range that needs bouncing fails with EIO
};

/// A DMA device: a PCI function of the topology plus its DMA parameters.
struct DmaDeviceConfig {
  uint32_t function = 0;                // the client: an index into the P2P engine's topology
  uint64_t dma_mask = ~uint64_t{0};     // highest DMA address the device can issue
  uint64_t max_segment = 64 * KiB;      // Linux's default dma_max_seg_size
  uint64_t seg_boundary_mask = 0xffffffff;  // Linux's default; 2^k - 1, at least 4 KiB - 1
  uint64_t min_align_mask = 0;          // offset bits a bounce must keep (NVMe: 4 KiB - 1)
  bool coherent = true;                 // false: map, unmap and sync do cache maintenance
  /// An external device (Linux pci_dev->untrusted). Matters only behind an IOMMU (Linux
  /// dev_use_swiotlb()): ranges not aligned to the granule are bounced in whole zeroed
  /// granules, and a list maps each range at its own IOVA (below).
  bool untrusted = false;
  /// Untrusted behind an IOMMU: map a list as a trusted device does (one IOVA, merged
  /// segments, the P2P verdicts applied), bouncing the same unaligned host ranges; MMIO is
  /// then not bounced (EREMOTEIO unless kDmaAttrAllowBounce). physr's option; false is
  /// Linux (dev_use_sg_swiotlb() -> iommu_dma_map_sg_swiotlb()).
  bool untrusted_one_iova = false;
  /// Direct mapping: every host range is bounced (Linux is_swiotlb_force_bounce():
  /// swiotlb=force, confidential-computing guests); MMIO (map_phys) is then refused. EINVAL
  /// with a domain.
  bool force_bounce = false;
  uint64_t dma_offset = 0;              // direct mapping: DMA address = phys + dma_offset
  IommuDomain* domain = nullptr;        // the IOMMU domain (may be shared), or null: direct
  bool debug = false;                   // DMA-API debug: track every mapping, report misuse exactly
  /// With debug on: receives the report of mappings still live when the device is
  /// destroyed (Linux CONFIG_DMA_API_DEBUG's leak report at driver unbind). Null: the
  /// report goes to stderr.
  std::function<void(const std::string& report)> debug_report{};
};

/// What a device's bounces respect (the parameters Linux's swiotlb reads from the device),
/// with the reservation alignment its caller asks for.
inline BounceParams bounce_params(const DmaDeviceConfig& c, uint64_t alloc_align_mask = 0) noexcept {
  return BounceParams{.min_align_mask = c.min_align_mask, .alloc_align_mask = alloc_align_mask,
                      .seg_boundary_mask = c.seg_boundary_mask, .dma_offset = c.dma_offset};
}

struct DmaDeviceStats {
  uint64_t live_mappings = 0;    // map() and map_phys() results not yet unmapped
  uint64_t maps = 0, unmaps = 0, failed_maps = 0;
  uint64_t bounced_bytes = 0;    // bytes that went through the bounce pool at map time
  uint64_t cache_maintenance = 0;  // cache clean/invalidate operations (non-coherent devices)
};

class DmaDevice;

/// The result of DmaDevice::map(): the DMA list and what unmap needs. Move-only; after
/// unmap() it is empty and a second unmap() is an error.
class DmaMapping {
 public:
  DmaMapping() = default;
  DmaMapping(DmaMapping&& o) noexcept;
  DmaMapping& operator=(DmaMapping&& o) noexcept;
  DmaMapping(const DmaMapping&) = delete;
  DmaMapping& operator=(const DmaMapping&) = delete;

  std::span<const DmaSegment> segments() const noexcept { return {segs_.data(), nseg_}; }
  bool mapped() const noexcept { return dev_ != nullptr; }
  DmaDirection direction() const noexcept { return dir_; }
  uint64_t bytes() const noexcept { return bytes_; }
  /// The IOVA range the call allocated (size 0 when nothing went through the IOMMU, and for
  /// an untrusted device's list, whose IOMMU segments each have their own IOVA).
  DmaSpan iova() const noexcept { return DmaSpan{iova_, iova_len_}; }

 private:
  friend class DmaDevice;
  struct Bounce {
    PhysAddr addr;  // in the bounce pool
    uint64_t size;
  };
  std::vector<DmaSegment> segs_;  // capacity kept across maps: only the first nseg_ are the list
  size_t nseg_ = 0;
  std::vector<Bounce> bounces_;
  const DmaDevice* dev_ = nullptr;
  DmaAddr iova_;
  uint64_t iova_len_ = 0;
  uint64_t bytes_ = 0;
  uint64_t debug_id_ = 0;
  DmaDirection dir_ = DmaDirection::none;
  bool per_range_iova_ = false;  // Linux sg_dma_mark_swiotlb(): each IOMMU segment is its own IOVA
  DmaAttrs attrs_{};
};

/// State of the two-step API (Linux struct dma_iova_state).
struct DmaIovaState {
  DmaAddr addr;       // the IOVA of byte 0 (keeps the first range's offset in its granule)
  uint64_t size = 0;  // bytes reserved from addr
  bool allocated() const noexcept { return size != 0; }

 private:
  friend class DmaDevice;
  struct Bounce {
    uint64_t offset;  // from addr
    PhysAddr addr;
    uint64_t size;
  };
  std::vector<Bounce> bounces_;
  uint64_t alloc_len_ = 0;
};

/// A DMA device. Thread-safe: any number of threads may map and unmap concurrently.
class DmaDevice {
 public:
  /// EINVAL: no P2P engine, a function not in its topology,
  /// a boundary mask not 2^k - 1 of at least 4 KiB, a max segment below 512 bytes, a DMA
  /// mask below 4 GiB - 1 with an IOMMU or a min_align_mask not 2^k - 1 below 128 KiB.
  static Result<std::unique_ptr<DmaDevice>> create(const DmaEnv& env, const DmaDeviceConfig& config);
  ~DmaDevice();
  DmaDevice(const DmaDevice&) = delete;
  DmaDevice& operator=(const DmaDevice&) = delete;

  /// Maps a range list for this device (Linux dma_map_sg / dma_map_sgtable with P2P).
  /// EINVAL: empty list, direction none, a range naming an unregistered provider or lying
  /// outside its aperture, host memory inside a provider's aperture. EFAULT: a revoked
  /// provider. EREMOTEIO: a P2P range the device cannot reach and may not bounce (named).
  /// ENOMEM: no IOVA space or bounce slots. EIO: a bounce the device cannot address, no
  /// bounce pool, or P2P memory to bounce whose provider forbids CPU copies (Linux's code
  /// when dma_direct_map_phys() or iommu_dma_map_phys() fails in a list). On any error
  /// nothing stays mapped.
  Result<DmaMapping> map(const RangeList& list, DmaDirection dir, DmaAttrs attrs = {});
  /// The same into `out`, reusing its storage (the hot path: no allocation once warm).
  /// `out` must not hold a live mapping (EBUSY).
  Status map_into(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs = {});
  /// Undoes map(): copies bounced data back (per direction, unless kDmaAttrSkipCpuSync was
  /// given), unmaps and frees the IOVA, frees bounce slots. EINVAL for a mapping that is
  /// not live or belongs to another device; nothing changes then.
  Status unmap(DmaMapping& m);
  /// Device to CPU ownership: bounced bytes copied back (from_device, bidirectional).
  Status sync_for_cpu(const DmaMapping& m);
  /// CPU to device ownership: bounced bytes copied out (to_device, bidirectional).
  Status sync_for_device(const DmaMapping& m);

  /// One physical range (Linux dma_map_phys): host or P2P memory, classified as map()
  /// does; the result is one segment (never split; a bounce never crosses the segment
  /// boundary). Errors as map(), plus EINVAL when a needed bounce exceeds 256 KiB or the
  /// boundary, and for an IOMMU device whose min_align_mask exceeds the 4 KiB granule's
  /// (Linux __iommu_dma_map()).
  Result<DmaSegment> map_phys(PhysAddr phys, uint64_t size, DmaDirection dir, DmaAttrs attrs = {});
  /// Undoes map_phys(), from the segment's flags. EINVAL/ENOENT for a segment that is not
  /// mapped (detected through the IOMMU or the bounce pool; always with debug on).
  Status unmap_phys(const DmaSegment& seg, DmaDirection dir, DmaAttrs attrs = {});
  Status sync_phys_for_cpu(const DmaSegment& seg, DmaDirection dir);
  Status sync_phys_for_device(const DmaSegment& seg, DmaDirection dir);

  // Two-step API (Linux 6.16+, dma_iova_*): reserve IOVA once, link ranges into it.
  /// Reserves IOVA for `size` bytes starting at phys's offset in its granule. false (Linux
  /// dma_iova_try_alloc(): the caller falls back to map_phys): the device maps directly,
  /// size is 0 or beyond the IOVA space, or no IOVA is left. EBUSY: the state already
  /// holds an IOVA range (Linux would overwrite it and leak the range).
  Result<bool> iova_try_alloc(DmaIovaState& state, PhysAddr phys, uint64_t size);
  /// Maps [phys, phys + size) at state.addr + offset (Linux dma_iova_link()). EIO: a link
  /// at offset > 0 that starts inside a granule (only the first may). P2P memory through
  /// the host bridge gets the MMIO attribute, and is EPERM when an untrusted device would
  /// have to bounce it (not granule-aligned); bus-address P2P memory is EINVAL (it is not
  /// linked: use map_phys); unreachable P2P is EREMOTEIO. An untrusted device bounces the
  /// head of an unaligned host range up to its first granule boundary and the tail after
  /// its last one, and links the granules between in place (iommu_dma_iova_link_swiotlb();
  /// the head keeps its offset only under a min_align_mask of the granule, else EINVAL as
  /// Linux's iommu_map() gives). On any error this call leaves nothing linked or bounced.
  Status iova_link(DmaIovaState& state, PhysAddr phys, uint64_t offset, uint64_t size, DmaDirection dir,
                   DmaAttrs attrs = {});
  /// Makes linked mappings visible to the device (iommu_sync_map). Like Linux, it does
  /// not check that the range is linked; EINVAL only for a state holding no IOVA or a
  /// range outside it.
  Status iova_sync(DmaIovaState& state, uint64_t offset, uint64_t size);
  /// Unmaps [offset, offset + size) of the state, keeping the IOVA reserved.
  Status iova_unlink(DmaIovaState& state, uint64_t offset, uint64_t size, DmaDirection dir, DmaAttrs attrs = {});
  /// Unlinks the first mapped_len bytes (0: nothing linked) and frees the IOVA.
  Status iova_destroy(DmaIovaState& state, uint64_t mapped_len, DmaDirection dir, DmaAttrs attrs = {});

  const DmaDeviceConfig& config() const noexcept;
  DmaDeviceStats stats() const noexcept;
  /// With debug on: one line per mapping still live ("map of 8 KiB to_device, id 3",
  /// "map_phys of 4 KiB at 0x1000 from_device"); empty without debug or when all are
  /// unmapped. The destructor reports these.
  std::vector<std::string> debug_live() const;

  struct Impl;

 private:
  explicit DmaDevice(std::unique_ptr<Impl> impl);
  // An untrusted device's list behind an IOMMU (Linux iommu_dma_map_sg_swiotlb()).
  Status map_into_swiotlb(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs);
  // What every successful map_into does last: the mapping's fields, DMA-API debug, stats.
  void finish_map(DmaMapping& out, const RangeList& list, DmaDirection dir, DmaAttrs attrs, uint64_t bounced);
  std::unique_ptr<Impl> impl_;
};

}  // namespace physr
