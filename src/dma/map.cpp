// DMA devices: map/unmap/sync of mixed host + P2P range lists, map_phys, the two-step API.
#include <absl/container/flat_hash_map.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "physr/dma.hpp"

namespace physr {

namespace {

// IoDomain requires a 4 KiB IOVA granule (its smallest leaf).
constexpr uint64_t kGranule = 4096;
constexpr uint64_t kGMask = kGranule - 1;
constexpr uint64_t kIovaTop = uint64_t{1} << 48;

constexpr uint64_t align_up(uint64_t x) { return (x + kGMask) & ~kGMask; }

// Linux dma_info_to_prot(): what the device may do to the memory.
uint8_t dir_prot(DmaDirection d) {
  switch (d) {
    case DmaDirection::to_device: return kIommuRead;
    case DmaDirection::from_device: return kIommuWrite;
    default: return kIommuReadWrite;
  }
}

enum class Route : uint8_t { host, mmio, bus };

// Per-thread buffers of map_into (kept between calls so the hot path does not allocate).
struct Scratch {
  std::vector<IoMapOp> ops;
  std::vector<DmaSpan> runs;
  size_t nops = 0;
};
thread_local Scratch t_scratch;

// First chunk of [a, a + len) that stays within max_seg and does not cross a multiple of
// bmask + 1, in whatever address space a lives in.
inline uint64_t first_chunk(uint64_t a, uint64_t len, uint64_t max_seg, uint64_t bmask) {
  uint64_t n = std::min(len, max_seg);
  if (bmask != ~uint64_t{0}) n = std::min(n, bmask - (a & bmask) + 1);
  return n;
}

struct DebugEntry {
  uint64_t len;
  DmaDirection dir;
};

}  // namespace

std::string dma_seg_path(uint32_t flags) {
  if (flags & kDmaSegBusAddr) return "bus_addr";
  std::string s = (flags & kDmaSegIommu) ? "iommu" : "direct";
  if (flags & kDmaSegMmio) s += "+mmio";
  if (flags & kDmaSegBounced) s += "+bounced";
  return s;
}

DmaMapping::DmaMapping(DmaMapping&& o) noexcept { *this = std::move(o); }
DmaMapping& DmaMapping::operator=(DmaMapping&& o) noexcept {
  segs_ = std::move(o.segs_);
  nseg_ = std::exchange(o.nseg_, 0);
  bounces_ = std::move(o.bounces_);
  dev_ = std::exchange(o.dev_, nullptr);
  iova_ = o.iova_;
  iova_len_ = std::exchange(o.iova_len_, 0);
  bytes_ = std::exchange(o.bytes_, 0);
  debug_id_ = std::exchange(o.debug_id_, 0);
  dir_ = o.dir_;
  attrs_ = o.attrs_;
  return *this;
}

struct DmaDevice::Impl {
  DmaEnv env;
  DmaDeviceConfig cfg;
  // Linux iommu_dma_alloc_iova(): PCI devices try below 4 GiB first (single-address-cycle
  // addresses) until that fails once.
  std::atomic<bool> sac_first{true};
  std::atomic<uint64_t> live{0}, maps{0}, unmaps{0}, failed{0}, bounced{0}, cache_ops{0};
  // DMA-API debug (Linux CONFIG_DMA_API_DEBUG): live mappings, so misuse is reported exactly.
  std::mutex dbg_mu;
  absl::flat_hash_map<uint64_t, DebugEntry> dbg_lists;  // map() results by id
  // map_phys() results by DMA address; one address can be mapped more than once (the same
  // host page for two transfers, a bus address), as dma-debug's hash buckets allow.
  absl::flat_hash_map<uint64_t, std::vector<DebugEntry>> dbg_phys;
  std::atomic<uint64_t> next_id{1};

  uint64_t iova_limit() const { return std::min(cfg.dma_mask, kIovaTop - 1) + 1; }

  // Direct mapping: the device reaches [dma, dma + len) (Linux dma_capable()).
  bool capable(uint64_t dma, uint64_t len) const {
    const uint64_t last = dma + (len - 1);
    return last >= dma && last <= cfg.dma_mask;
  }

  Result<DmaAddr> alloc_iova(uint64_t len) {
    IovaAllocator& a = cfg.domain->iova();
    const uint64_t limit = iova_limit();
    if (limit > (uint64_t{1} << 32) && sac_first.load(std::memory_order_relaxed)) {
      auto r = a.alloc(len, uint64_t{1} << 32);
      if (r) return r;
      sac_first.store(false, std::memory_order_relaxed);
    }
    return a.alloc(len, limit);
  }

  // The verdict for a provider's memory and this device (the engine caches it per pair);
  // nullopt when the provider names no function of this topology (treated as unreachable).
  std::optional<pci::MapType> verdict(const Provider& p) const {
    const uint32_t f = p.function();
    const auto& fns = env.p2p->topology().functions;
    if (f >= fns.size() || !(fns[f].bdf == p.owner())) return std::nullopt;
    return env.p2p->verdict(f, cfg.function).type;
  }

  std::string who() const {
    return env.p2p->topology().functions[cfg.function].bdf.to_string();
  }

  // Classifies [addr, addr + len) of provider tag `tag` (range `i` of a list, for
  // messages): the route, whether it must bounce, and the provider (nullptr for host
  // memory). Inside a ReadGuard.
  Status classify(size_t i, uint64_t addr, uint64_t len, ProviderId tag, uint32_t attrs, Route* route, bool* bounce,
                  const Provider** provider) {
    const auto where = [&] {
      return "range " + std::to_string(i) + " [" + format_hex(addr) + ", +" + format_hex(len) + ")";
    };
    const ProviderRegistry* reg = env.providers;
    const Provider* p = nullptr;
    if (tag == kHostMemory) {
      if (reg) {  // host memory must not lie in a BAR: a list built wrongly is caught here
        for (uint64_t done = 0, ext = 0; done < len; done += ext) {
          if (const Provider* q = reg->find_extent(PhysAddr(addr + done), ext))
            return make_error(EINVAL, where() + " is tagged host memory but " + format_hex(addr + done) + " is in provider " +
                                          std::to_string(q->id()) + " (" + q->owner().to_string() + " BAR" + std::to_string(q->bar()) + ")");
        }
      }
    } else {
      if (!reg) return make_error(EINVAL, where() + " names provider " + std::to_string(tag) + " but the device has no provider registry");
      p = tag == kIndirectProvider ? reg->find(PhysAddr(addr)) : reg->get(tag);
      if (!p) return make_error(EINVAL, where() + " names provider " + (tag == kIndirectProvider ? std::string("(by address)") : std::to_string(tag)) + ", which is not registered");
      if (!p->phys().contains(PhysSpan{PhysAddr(addr), len}))
        return make_error(EINVAL, where() + " lies outside provider " + std::to_string(p->id()) + "'s aperture [" +
                                      format_hex(p->phys().base.value()) + ", +" + format_hex(p->phys().size) + ")");
      if (p->revoked()) return make_error(EFAULT, where() + " is in provider " + std::to_string(p->id()) + ", which was revoked");
    }
    *bounce = false;
    *provider = p;
    if (!p) {
      *route = Route::host;
      if (cfg.domain) *bounce = cfg.untrusted && ((addr | len) & kGMask) != 0;  // Linux iova_unaligned()
      else *bounce = cfg.untrusted || !capable(addr + cfg.dma_offset, len);
      return {};
    }
    const auto t = verdict(*p);
    bool reachable = t.has_value() && *t != pci::MapType::not_supported;
    if (t == pci::MapType::bus_addr) {
      *route = Route::bus;
      return {};
    }
    *route = Route::mmio;
    // MMIO cannot be bounced piecewise for an untrusted device, nor reached above the mask.
    if (reachable && !cfg.domain && !capable(addr + cfg.dma_offset, len)) reachable = false;
    if (reachable && cfg.domain && cfg.untrusted && ((addr | len) & kGMask) != 0) reachable = false;
    if (reachable) return {};
    if ((attrs & kDmaAttrAllowBounce) && p->cpu_copy_allowed()) {
      *bounce = true;
      return {};
    }
    std::string why = !t ? "its owner " + p->owner().to_string() + " is not function " + std::to_string(p->function()) + " of the topology"
                         : *t == pci::MapType::not_supported ? "P2P from " + p->owner().to_string() + " to " + who() + " is not supported"
                         : cfg.domain ? "it is not granule-aligned and " + who() + " is untrusted"
                                      : "it lies above " + who() + "'s DMA mask " + format_hex(cfg.dma_mask);
    why += (attrs & kDmaAttrAllowBounce) ? " and provider " + std::to_string(p->id()) + " does not allow CPU copies"
                                         : " and bouncing was not allowed";
    return make_error(EREMOTEIO, where() + " in provider " + std::to_string(p->id()) + " is unreachable: " + why);
  }

  // The provider owning `phys` (nullptr: host memory), and the tag a range list carries
  // for it. Inside a ReadGuard when there is a registry.
  const Provider* owner_of(PhysAddr phys, ProviderId* tag) const {
    const Provider* p = env.providers ? env.providers->find(phys) : nullptr;
    *tag = p ? provider_tag(p->id()) : kHostMemory;
    return p;
  }

  void count_cache(uint64_t n) {
    if (!cfg.coherent) cache_ops.fetch_add(n, std::memory_order_relaxed);
  }
};

DmaDevice::DmaDevice(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DmaDevice::~DmaDevice() {
  // Linux kernel/dma/debug.c: a device released with mappings still live is reported
  // ("device driver has pending DMA allocations while released from device").
  if (!impl_ || !impl_->cfg.debug) return;
  const std::vector<std::string> live = debug_live();
  if (live.empty()) return;
  std::string report = "DMA-API debug: " + impl_->who() + " destroyed with " + std::to_string(live.size()) + " mapping" +
                       (live.size() == 1 ? "" : "s") + " still live:";
  for (const std::string& l : live) report += "\n  " + l;
  if (impl_->cfg.debug_report) impl_->cfg.debug_report(report);
  else std::fprintf(stderr, "physr: %s\n", report.c_str());
}

std::vector<std::string> DmaDevice::debug_live() const {
  Impl& m = *impl_;
  std::vector<std::string> out;
  std::lock_guard lock(m.dbg_mu);
  for (const auto& [id, e] : m.dbg_lists)
    out.push_back("map of " + format_size(e.len) + " " + dma_direction_name(e.dir) + ", id " + std::to_string(id));
  for (const auto& [addr, v] : m.dbg_phys)
    for (const DebugEntry& e : v)
      out.push_back("map_phys of " + format_size(e.len) + " at " + format_hex(addr) + " " + dma_direction_name(e.dir));
  std::sort(out.begin(), out.end());  // hash order is not an order: reports stay the same run to run
  return out;
}
const DmaDeviceConfig& DmaDevice::config() const noexcept { return impl_->cfg; }

DmaDeviceStats DmaDevice::stats() const noexcept {
  const Impl& m = *impl_;
  DmaDeviceStats s;
  s.live_mappings = m.live.load(std::memory_order_relaxed);
  s.maps = m.maps.load(std::memory_order_relaxed);
  s.unmaps = m.unmaps.load(std::memory_order_relaxed);
  s.failed_maps = m.failed.load(std::memory_order_relaxed);
  s.bounced_bytes = m.bounced.load(std::memory_order_relaxed);
  s.cache_maintenance = m.cache_ops.load(std::memory_order_relaxed);
  return s;
}

Result<std::unique_ptr<DmaDevice>> DmaDevice::create(const DmaEnv& env, const DmaDeviceConfig& c) {
  if (!env.p2p) return make_error(EINVAL, "DMA device: the environment has no P2P engine (a device is a function of its topology)");
  if (c.function >= env.p2p->topology().functions.size())
    return make_error(EINVAL, "DMA device: function index " + std::to_string(c.function) + " is not in topology " + env.p2p->topology().source);
  if (c.seg_boundary_mask < kGMask || (c.seg_boundary_mask & (c.seg_boundary_mask + 1)) != 0)
    return make_error(EINVAL, "DMA device: segment boundary mask " + format_hex(c.seg_boundary_mask) + " must be 2^k - 1 and at least 0xfff");
  if (c.max_segment < 512) return make_error(EINVAL, "DMA device: max segment " + std::to_string(c.max_segment) + " is below 512 bytes");
  if (c.dma_mask < 0xffffff) return make_error(EINVAL, "DMA device: DMA mask " + format_hex(c.dma_mask) + " is below 24 bits");
  if ((c.min_align_mask & (c.min_align_mask + 1)) != 0 || c.min_align_mask >= 128 * KiB)
    return make_error(EINVAL, "DMA device: min_align_mask " + format_hex(c.min_align_mask) + " must be 2^k - 1 below 128 KiB");
  if (c.domain && c.dma_offset != 0) return make_error(EINVAL, "DMA device: a DMA offset applies to direct mapping only, not with an IOMMU domain");
  auto impl = std::make_unique<Impl>();
  impl->env = env;
  impl->cfg = c;
  return std::unique_ptr<DmaDevice>(new DmaDevice(std::move(impl)));
}

Result<DmaMapping> DmaDevice::map(const RangeList& list, DmaDirection dir, uint32_t attrs) {
  DmaMapping out;
  PHYSR_TRY(map_into(out, list, dir, attrs));
  return out;
}

Status DmaDevice::map_into(DmaMapping& out, const RangeList& list, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  if (out.mapped()) return make_error(EBUSY, "DMA map: the output mapping is still live (unmap it first)");
  if (dir == DmaDirection::none) return make_error(EINVAL, "DMA map: direction none");
  if (list.empty()) return make_error(EINVAL, "DMA map: empty range list");
  out.bounces_.clear();
  out.iova_len_ = 0;
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  const bool iommu = c.domain != nullptr;
  const uint64_t mask = c.seg_boundary_mask;

  // Segments and page-table operations are written through raw pointers into buffers that
  // only grow: vector's push_back reloads its members after every store and cost ~20
  // instructions a segment.
  Scratch& s = t_scratch;
  s.nops = 0;
  if (out.segs_.size() < list.size() + 16) out.segs_.resize(2 * list.size() + 16);
  DmaSegment* seg = out.segs_.data();
  size_t nseg = 0;
  const auto push_seg = [&](DmaSegment g) {
    if (nseg == out.segs_.size()) [[unlikely]] {
      out.segs_.resize(2 * nseg);
      seg = out.segs_.data();
    }
    seg[nseg++] = g;
  };
  if (iommu && s.ops.size() < list.size() + 16) s.ops.resize(2 * list.size() + 16);
  IoMapOp* ops = s.ops.data();
  size_t nops = 0;

  // Undo for every failure: nothing the call did stays behind.
  bool iova_mapped = false;
  const auto fail = [&](Error e) -> Status {
    if (iova_mapped) {
      s.runs.clear();
      for (size_t k = 0; k < nops; ++k) s.runs.push_back(DmaSpan{ops[k].iova, ops[k].size});
      (void)c.domain->unmap_many(s.runs);
    }
    if (out.iova_len_) (void)c.domain->free_iova(out.iova_, out.iova_len_);
    for (const auto& b : out.bounces_) (void)m.env.bounce->unmap(b.addr, b.size, DmaDirection::none);
    out.nseg_ = 0;
    out.bounces_.clear();
    out.iova_len_ = 0;
    m.failed.fetch_add(1, std::memory_order_relaxed);
    return e;
  };
  uint64_t bounced = 0;
  const auto bounce_one = [&](uint64_t phys, uint64_t len, PhysAddr* b) -> Status {
    if (!m.env.bounce) return make_error(EIO, "DMA map: " + format_hex(phys) + " must be bounced but " + m.who() + " has no bounce pool");
    auto r = m.env.bounce->map(PhysAddr(phys), len, dir, c.min_align_mask, iommu ? kGMask : 0);
    if (!r) return std::move(r).error();
    out.bounces_.push_back({*r, len});
    bounced += len;
    *b = *r;
    return {};
  };

  // One pass over the ranges. Direct devices get their segments here, bouncing as they go
  // (Linux dma_direct_map_sg). IOMMU devices: Linux iommu_dma_map_sg() and __finalise_sg()
  // in one go, with IOVA-relative addresses (fixed up once the IOVA is allocated):
  //  - each range is cut into pieces within the boundary window and the max segment
  //    (bounce pieces also within 256 KiB);
  //  - each piece is placed at its offset within the granule, after padding if it would
  //    cross the boundary (if the boundary is at least the whole IOVA, the size-aligned
  //    allocation cannot cross it; below the granule no piece can; in between, pad);
  //  - a piece merges into the previous segment when it starts on a granule, not on a
  //    boundary, and the result stays within the max segment. The allocation is aligned
  //    to at least min(its size rounded up to a power of two, boundary), so whether a
  //    relative address sits on a boundary is the same as for the absolute one.
  const uint8_t prot = dir_prot(dir);
  uint64_t iova_len = 0, cur_len = 0, cacheable = 0;
  uint64_t op_iova_end = 0, op_phys_end = 0;
  uint8_t op_perm = 0;
  size_t idx = 0;
  for (const PhysRange r : list) {
    const uint64_t addr = r.addr.value(), len = r.len;
    Route route = Route::host;
    bool bounce = false;
    const Provider* p = nullptr;
    uint64_t ext = 0;
    // The hot case inline: trusted host memory with no provider in the way.
    if (r.provider == kHostMemory && !c.untrusted &&
        (!m.env.providers || m.env.providers->surely_host(r.addr, len) ||
         (!m.env.providers->find_extent(r.addr, ext) && ext >= len))) {
      bounce = !iommu && !m.capable(addr + c.dma_offset, len);
    } else if (auto st = m.classify(idx, addr, len, r.provider, attrs, &route, &bounce, &p); !st) {
      return fail(std::move(st).error());
    }
    ++idx;
    cacheable += route == Route::host || bounce;
    if (route == Route::bus) {
      // The provider is the same for the whole range (ranges never cross providers).
      for (uint64_t a = p->to_bus(r.addr).value(), left = len; left != 0;) {  // cut to the limits in bus space
        const uint64_t n = first_chunk(a, left, c.max_segment, mask);
        push_seg(DmaSegment{DmaAddr(a), n, kDmaSegBusAddr});
        a += n;
        left -= n;
      }
      cur_len = 0;
      continue;
    }
    if (!iommu) {
      const uint32_t flags = bounce ? kDmaSegBounced : route == Route::mmio ? kDmaSegMmio : 0;
      for (uint64_t a = addr, left = len; left != 0;) {
        uint64_t n = left, d = a + c.dma_offset;
        if (bounce) {
          n = first_chunk(a, left, ~uint64_t{0}, BouncePool::kMaxMapping - 1);
          PhysAddr b;
          if (auto st = bounce_one(a, n, &b); !st) return fail(std::move(st).error());
          d = b.value() + c.dma_offset;
          if (!m.capable(d, n))
            return fail(make_error(EIO, "DMA map: the bounce buffer at " + format_hex(b.value()) + " is above " + m.who() + "'s DMA mask " + format_hex(c.dma_mask)));
        }
        for (uint64_t k = n; k != 0;) {  // cut to the limits in DMA address space
          const uint64_t q = first_chunk(d, k, c.max_segment, mask);
          push_seg(DmaSegment{DmaAddr(d), q, flags});
          d += q;
          k -= q;
        }
        a += n;
        left -= n;
      }
      continue;
    }
    const bool mmio = route == Route::mmio && !bounce;
    const uint8_t pr = static_cast<uint8_t>(prot | (mmio ? kIommuMmio : 0));
    const uint32_t flags = kDmaSegIommu | (bounce ? kDmaSegBounced : 0) | (mmio ? kDmaSegMmio : 0);
    const uint64_t wmask = bounce ? std::min(mask, BouncePool::kMaxMapping - 1) : mask;
    for (uint64_t a = addr, left = len; left != 0;) {
      const uint64_t n = first_chunk(a, left, c.max_segment, wmask);
      uint64_t phys = a;
      if (bounce) {  // the bounce keeps the offset within the granule
        PhysAddr b;
        if (auto st = bounce_one(a, n, &b); !st) return fail(std::move(st).error());
        phys = b.value();
      }
      const uint64_t off = phys & kGMask, s_length = align_up(off + n);
      const uint64_t pad_len = (mask - iova_len + 1) & mask;
      if (pad_len && pad_len < s_length - 1) {
        iova_len += pad_len;  // the padding stays unmapped
        cur_len = 0;
      }
      const uint64_t ph = phys - off;
      // One op per physically and virtually contiguous run; the last op's ends are kept in
      // locals (reading them back from the buffer cost a third of this loop).
      if (nops && op_perm == pr && op_iova_end == iova_len && op_phys_end == ph) {
        ops[nops - 1].size += s_length;
      } else {
        if (nops == s.ops.size()) [[unlikely]] {
          s.ops.resize(2 * nops);
          ops = s.ops.data();
        }
        ops[nops++] = IoMapOp{DmaAddr(iova_len), PhysAddr(ph), s_length, pr};
        op_perm = pr;
      }
      op_iova_end = iova_len + s_length;
      op_phys_end = ph + s_length;
      if (cur_len && !off && (iova_len & mask) && c.max_segment - cur_len >= n) {
        cur_len += n;
        seg[nseg - 1].len = cur_len;
        seg[nseg - 1].flags |= flags;
      } else {
        push_seg(DmaSegment{DmaAddr(iova_len + off), n, flags});
        cur_len = n;
      }
      iova_len += s_length;
      if (n + off < s_length) cur_len = 0;
      a += n;
      left -= n;
    }
  }
  out.nseg_ = nseg;  // no resize: shrinking the vector would make the next map value-initialise it again

  if (iova_len) {
    // One IOVA allocation, the relative addresses fixed up, the page table written in one
    // batch (all or nothing).
    auto a = m.alloc_iova(iova_len);
    if (!a) return fail(make_error(a.error().code, "DMA map for " + m.who() + ": " + a.error().message));
    const uint64_t base = a->value();
    out.iova_ = *a;
    out.iova_len_ = iova_len;
    for (size_t k = 0; k < nops; ++k) ops[k].iova += base;
    for (size_t k = 0; k < nseg; ++k)
      if (seg[k].flags & kDmaSegIommu) seg[k].addr += base;
    s.nops = nops;
    if (auto st = c.domain->map_many(std::span<const IoMapOp>(ops, nops)); !st)
      return fail(make_error(st.error().code, "DMA map for " + m.who() + ": " + st.error().message));
    iova_mapped = true;
  }

  // Cache maintenance before the device owns the memory (Linux arch_sync_dma_for_device;
  // none for MMIO).
  if (!(attrs & kDmaAttrSkipCpuSync)) m.count_cache(cacheable);
  out.dev_ = this;
  out.dir_ = dir;
  out.attrs_ = attrs;
  out.bytes_ = list.total_bytes();
  if (c.debug) {
    out.debug_id_ = m.next_id.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(m.dbg_mu);
    m.dbg_lists.emplace(out.debug_id_, DebugEntry{out.bytes_, dir});
  }
  if (bounced) m.bounced.fetch_add(bounced, std::memory_order_relaxed);
  m.maps.fetch_add(1, std::memory_order_relaxed);
  m.live.fetch_add(1, std::memory_order_relaxed);
  return {};
}

Status DmaDevice::unmap(DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped()) return make_error(EINVAL, "DMA unmap: the mapping is not live (never mapped, or already unmapped)");
  if (mp.dev_ != this) return make_error(EINVAL, "DMA unmap on " + m.who() + ": the mapping belongs to another device");
  if (m.cfg.debug) {
    std::lock_guard lock(m.dbg_mu);
    if (!m.dbg_lists.contains(mp.debug_id_))
      return make_error(EINVAL, "DMA-API debug: unmap on " + m.who() + " of mapping " + std::to_string(mp.debug_id_) + ", which is not live");
  }
  if (mp.iova_len_) {
    // The mapped runs: every IOMMU segment's granules (merged segments never span padding).
    Scratch& s = t_scratch;
    s.runs.clear();
    for (const DmaSegment& seg : mp.segments()) {
      if (!(seg.flags & kDmaSegIommu)) continue;
      const uint64_t a = seg.addr.value() & ~kGMask, e = align_up(seg.addr.value() + seg.len);
      if (!s.runs.empty() && s.runs.back().base + s.runs.back().size == DmaAddr(a)) s.runs.back().size += e - a;
      else s.runs.push_back(DmaSpan{DmaAddr(a), e - a});
    }
    PHYSR_TRY(m.cfg.domain->unmap_many(s.runs));
    PHYSR_TRY(m.cfg.domain->free_iova(mp.iova_, mp.iova_len_));
  }
  const bool cpu_sync = !(mp.attrs_ & kDmaAttrSkipCpuSync);
  Status st;
  for (const auto& b : mp.bounces_) {
    auto r = m.env.bounce->unmap(b.addr, b.size, cpu_sync ? mp.dir_ : DmaDirection::none);
    if (!r && st) st = r;
  }
  // Linux arch_sync_dma_for_cpu() at unmap, unless the device only read.
  if (cpu_sync && !m.cfg.coherent && mp.dir_ != DmaDirection::to_device) m.count_cache(mp.nseg_);
  if (m.cfg.debug) {  // dropped only now: until here an unmap could still fail and leave it live
    std::lock_guard lock(m.dbg_mu);
    m.dbg_lists.erase(mp.debug_id_);
  }
  mp.dev_ = nullptr;
  mp.nseg_ = 0;
  mp.bounces_.clear();
  mp.iova_len_ = 0;
  m.unmaps.fetch_add(1, std::memory_order_relaxed);
  m.live.fetch_sub(1, std::memory_order_relaxed);
  return st;
}

Status DmaDevice::sync_for_cpu(const DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped() || mp.dev_ != this) return make_error(EINVAL, "DMA sync_for_cpu on " + m.who() + ": the mapping is not live on this device");
  for (const auto& b : mp.bounces_) PHYSR_TRY(m.env.bounce->sync_for_cpu(b.addr, b.size, mp.dir_));
  if (mp.dir_ != DmaDirection::to_device) m.count_cache(mp.nseg_);
  return {};
}

Status DmaDevice::sync_for_device(const DmaMapping& mp) {
  Impl& m = *impl_;
  if (!mp.mapped() || mp.dev_ != this) return make_error(EINVAL, "DMA sync_for_device on " + m.who() + ": the mapping is not live on this device");
  for (const auto& b : mp.bounces_) PHYSR_TRY(m.env.bounce->sync_for_device(b.addr, b.size, mp.dir_));
  m.count_cache(mp.nseg_);
  return {};
}

// ---------------------------------------------------------------------------------------
// Single ranges

Result<DmaSegment> DmaDevice::map_phys(PhysAddr phys, uint64_t size, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  if (dir == DmaDirection::none) return make_error(EINVAL, "DMA map_phys: direction none");
  if (size == 0) return make_error(EINVAL, "DMA map_phys of " + format_hex(phys.value()) + ": size 0");
  if (phys.value() + (size - 1) < phys.value()) return make_error(EINVAL, "DMA map_phys of " + format_hex(phys.value()) + ": wraps the address space");
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  ProviderId tag;
  const Provider* p = m.owner_of(phys, &tag);
  Route route;
  bool bounce;
  if (auto st = m.classify(0, phys.value(), size, tag, attrs, &route, &bounce, &p); !st) {
    m.failed.fetch_add(1, std::memory_order_relaxed);
    return std::move(st).error();
  }
  DmaSegment seg{};
  seg.len = size;
  if (route == Route::bus) {
    seg.addr = DmaAddr(p->to_bus(phys).value());
    seg.flags = kDmaSegBusAddr;
  } else {
    PhysAddr a = phys;
    if (bounce) {
      if (!m.env.bounce) return make_error(EIO, "DMA map_phys: " + format_hex(phys.value()) + " must be bounced but " + m.who() + " has no bounce pool");
      auto b = m.env.bounce->map(phys, size, dir, c.min_align_mask, c.domain ? kGMask : 0);
      if (!b) return std::move(b).error();
      a = *b;
      m.bounced.fetch_add(size, std::memory_order_relaxed);
    }
    const uint32_t mmio = route == Route::mmio && !bounce ? kDmaSegMmio : 0;
    seg.flags = (bounce ? kDmaSegBounced : 0) | mmio;
    if (!c.domain) {
      seg.addr = DmaAddr(a.value() + c.dma_offset);
      if (bounce && !m.capable(seg.addr.value(), size)) {
        (void)m.env.bounce->unmap(a, size, DmaDirection::none);
        return make_error(EIO, "DMA map_phys: the bounce buffer at " + format_hex(a.value()) + " is above " + m.who() + "'s DMA mask");
      }
    } else {
      const uint64_t off = a.value() & kGMask, len = align_up(off + size);
      auto iova = m.alloc_iova(len);
      Status st = iova ? c.domain->map(*iova, PhysAddr(a.value() - off), len, static_cast<uint8_t>(dir_prot(dir) | (mmio ? kIommuMmio : 0)))
                       : Status(std::move(iova).error());
      if (!st) {
        if (iova) (void)c.domain->free_iova(*iova, len);
        if (bounce) (void)m.env.bounce->unmap(a, size, DmaDirection::none);
        m.failed.fetch_add(1, std::memory_order_relaxed);
        return make_error(st.error().code, "DMA map_phys for " + m.who() + ": " + st.error().message);
      }
      seg.addr = *iova + off;
      seg.flags |= kDmaSegIommu;
    }
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && (route == Route::host || bounce)) m.count_cache(1);
  if (c.debug) {
    std::lock_guard lock(m.dbg_mu);
    m.dbg_phys[seg.addr.value()].push_back(DebugEntry{size, dir});
  }
  m.maps.fetch_add(1, std::memory_order_relaxed);
  m.live.fetch_add(1, std::memory_order_relaxed);
  return seg;
}

Status DmaDevice::unmap_phys(const DmaSegment& seg, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  const auto what = [&] { return "DMA unmap_phys on " + m.who() + " of " + format_hex(seg.addr.value()) + " (+" + format_hex(seg.len) + ")"; };
  if (seg.len == 0) return make_error(EINVAL, what() + ": size 0");
  if (c.debug) {
    std::lock_guard lock(m.dbg_mu);
    auto it = m.dbg_phys.find(seg.addr.value());
    if (it == m.dbg_phys.end()) return make_error(EINVAL, "DMA-API debug: " + what() + ": not mapped");
    auto& v = it->second;
    auto e = std::find_if(v.begin(), v.end(), [&](const DebugEntry& d) { return d.len == seg.len && d.dir == dir; });
    if (e == v.end()) {
      const DebugEntry& d = v.front();
      if (d.len != seg.len) return make_error(EINVAL, "DMA-API debug: " + what() + ": mapped with size " + format_hex(d.len));
      return make_error(EINVAL, "DMA-API debug: " + what() + ": mapped " + dma_direction_name(d.dir) + ", unmapped " + dma_direction_name(dir));
    }
  }
  const DmaDirection back = (attrs & kDmaAttrSkipCpuSync) ? DmaDirection::none : dir;
  if (!(seg.flags & kDmaSegBusAddr)) {
    if (seg.flags & kDmaSegIommu) {
      if (!c.domain) return make_error(EINVAL, what() + ": an IOMMU segment, but the device maps directly");
      const uint64_t off = seg.addr.value() & kGMask, len = align_up(off + seg.len);
      std::optional<IoTranslation> t;
      if (seg.flags & kDmaSegBounced) t = c.domain->walk(seg.addr);
      PHYSR_TRY(c.domain->unmap(seg.addr - off, len));
      PHYSR_TRY(c.domain->free_iova(seg.addr - off, len));
      if (t) PHYSR_TRY(m.env.bounce->unmap(t->phys, seg.len, back));
    } else if (seg.flags & kDmaSegBounced) {
      if (!m.env.bounce) return make_error(EINVAL, what() + ": flagged bounced, but there is no bounce pool");
      PHYSR_TRY(m.env.bounce->unmap(PhysAddr(seg.addr.value() - c.dma_offset), seg.len, back));
    }
  }
  if (c.debug) {  // dropped only now: until here the unmap could still fail and leave it live
    std::lock_guard lock(m.dbg_mu);
    auto it = m.dbg_phys.find(seg.addr.value());
    if (it != m.dbg_phys.end()) {
      auto& v = it->second;
      auto e = std::find_if(v.begin(), v.end(), [&](const DebugEntry& d) { return d.len == seg.len && d.dir == dir; });
      if (e != v.end()) v.erase(e);
      if (v.empty()) m.dbg_phys.erase(it);
    }
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && dir != DmaDirection::to_device && !(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  m.unmaps.fetch_add(1, std::memory_order_relaxed);
  m.live.fetch_sub(1, std::memory_order_relaxed);
  return {};
}

namespace {
// The bounce address behind a bounced single segment.
Result<PhysAddr> bounce_of(const DmaSegment& seg, const DmaDeviceConfig& c) {
  if (!(seg.flags & kDmaSegIommu)) return PhysAddr(seg.addr.value() - c.dma_offset);
  auto t = c.domain ? c.domain->walk(seg.addr) : std::nullopt;
  if (!t) return make_error(EINVAL, "DMA sync of " + format_hex(seg.addr.value()) + ": not mapped in the IOMMU");
  return t->phys;
}
}  // namespace

Status DmaDevice::sync_phys_for_cpu(const DmaSegment& seg, DmaDirection dir) {
  Impl& m = *impl_;
  if (seg.flags & kDmaSegBounced) {
    auto b = bounce_of(seg, m.cfg);
    if (!b) return std::move(b).error();
    PHYSR_TRY(m.env.bounce->sync_for_cpu(*b, seg.len, dir));
  }
  if (dir != DmaDirection::to_device && !(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  return {};
}

Status DmaDevice::sync_phys_for_device(const DmaSegment& seg, DmaDirection dir) {
  Impl& m = *impl_;
  if (seg.flags & kDmaSegBounced) {
    auto b = bounce_of(seg, m.cfg);
    if (!b) return std::move(b).error();
    PHYSR_TRY(m.env.bounce->sync_for_device(*b, seg.len, dir));
  }
  if (!(seg.flags & (kDmaSegBusAddr | kDmaSegMmio))) m.count_cache(1);
  return {};
}

// ---------------------------------------------------------------------------------------
// Two-step API (Linux drivers/iommu/dma-iommu.c dma_iova_*)

Result<bool> DmaDevice::iova_try_alloc(DmaIovaState& state, PhysAddr phys, uint64_t size) {
  Impl& m = *impl_;
  if (state.allocated()) return make_error(EBUSY, "dma_iova_try_alloc: the state already holds an IOVA range");
  state.bounces_.clear();
  if (!m.cfg.domain) return false;  // direct mapping: the caller uses map_phys
  if (size == 0) return make_error(EINVAL, "dma_iova_try_alloc: size 0");
  const uint64_t off = phys.value() & kGMask;
  if (size > kIovaTop - off) return make_error(EINVAL, "dma_iova_try_alloc: size " + format_hex(size) + " exceeds the IOVA space");
  const uint64_t len = align_up(off + size);
  auto a = m.alloc_iova(len);
  if (!a) return make_error(a.error().code, "dma_iova_try_alloc for " + m.who() + ": " + a.error().message);
  state.addr = *a + off;
  state.size = size;
  state.alloc_len_ = len;
  return true;
}

Status DmaDevice::iova_link(DmaIovaState& state, PhysAddr phys, uint64_t offset, uint64_t size, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  const DmaDeviceConfig& c = m.cfg;
  const auto what = [&] { return "dma_iova_link of " + format_hex(phys.value()) + " (+" + format_hex(size) + ") at offset " + format_hex(offset); };
  if (!state.allocated()) return make_error(EINVAL, what() + ": no IOVA range allocated");
  if (dir == DmaDirection::none) return make_error(EINVAL, what() + ": direction none");
  if (size == 0 || offset > state.size || size > state.size - offset) return make_error(EINVAL, what() + ": outside the " + format_hex(state.size) + " bytes allocated");
  const uint64_t pad = phys.value() & kGMask;
  // Linux: only the first link may start inside a granule, and the IOVA must line up.
  if (pad && offset > 0) return make_error(EINVAL, what() + ": only the link at offset 0 may start inside a granule");
  if (((state.addr.value() + offset - pad) & kGMask) != 0) return make_error(EINVAL, what() + ": the IOVA at that offset is not granule-aligned");
  std::optional<ProviderRegistry::ReadGuard> guard;
  if (m.env.providers) guard.emplace();
  ProviderId tag;
  const Provider* p = m.owner_of(phys, &tag);
  Route route;
  bool bounce;
  PHYSR_TRY(m.classify(0, phys.value(), size, tag, attrs, &route, &bounce, &p));
  if (route == Route::bus) return make_error(EINVAL, what() + ": P2P memory reached by bus address is not linked into an IOVA (use map_phys)");
  PhysAddr a = phys;
  if (bounce) {
    if (!m.env.bounce) return make_error(EIO, what() + ": must be bounced but " + m.who() + " has no bounce pool");
    auto b = m.env.bounce->map(phys, size, dir, c.min_align_mask, kGMask);
    if (!b) return std::move(b).error();
    a = *b;
  }
  const uint8_t prot = static_cast<uint8_t>(dir_prot(dir) | (route == Route::mmio && !bounce ? kIommuMmio : 0));
  if (auto st = c.domain->map(state.addr + offset - pad, PhysAddr(a.value() - pad), align_up(pad + size), prot); !st) {
    if (bounce) (void)m.env.bounce->unmap(a, size, DmaDirection::none);
    return make_error(st.error().code, what() + ": " + st.error().message);
  }
  if (bounce) {
    state.bounces_.push_back({offset, a, size});
    m.bounced.fetch_add(size, std::memory_order_relaxed);
  }
  if (!(attrs & kDmaAttrSkipCpuSync) && (route == Route::host || bounce)) m.count_cache(1);
  return {};
}

Status DmaDevice::iova_sync(DmaIovaState& state, uint64_t offset, uint64_t size) {
  Impl& m = *impl_;
  if (!state.allocated() || size == 0 || offset > state.size || size > state.size - offset)
    return make_error(EINVAL, "dma_iova_sync of offset " + format_hex(offset) + " (+" + format_hex(size) + "): outside the IOVA range");
  // Page-table writes are visible to the walker at once and non-present entries are never
  // cached, so the sync (iommu_sync_map) only checks that the range is linked.
  const uint64_t start = (state.addr.value() + offset) & ~kGMask, end = state.addr.value() + offset + size;
  for (uint64_t a = start; a < end; a += kGranule)
    if (!m.cfg.domain->walk(DmaAddr(a)))
      return make_error(EINVAL, "dma_iova_sync of offset " + format_hex(offset) + " (+" + format_hex(size) + "): IOVA " + format_hex(a) + " is not linked");
  return {};
}

Status DmaDevice::iova_unlink(DmaIovaState& state, uint64_t offset, uint64_t size, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  if (!state.allocated() || size == 0 || offset > state.size || size > state.size - offset)
    return make_error(EINVAL, "dma_iova_unlink of offset " + format_hex(offset) + " (+" + format_hex(size) + "): outside the IOVA range");
  const uint64_t addr = state.addr.value() + offset, pad = addr & kGMask;
  PHYSR_TRY(m.cfg.domain->unmap(DmaAddr(addr - pad), align_up(pad + size)));
  const DmaDirection back = (attrs & kDmaAttrSkipCpuSync) ? DmaDirection::none : dir;
  Status st;
  std::erase_if(state.bounces_, [&](const DmaIovaState::Bounce& b) {
    if (b.offset < offset || b.offset >= offset + size) return false;
    if (auto r = m.env.bounce->unmap(b.addr, b.size, back); !r && st) st = r;
    return true;
  });
  if (!(attrs & kDmaAttrSkipCpuSync) && dir != DmaDirection::to_device) m.count_cache(1);
  return st;
}

Status DmaDevice::iova_destroy(DmaIovaState& state, uint64_t mapped_len, DmaDirection dir, uint32_t attrs) {
  Impl& m = *impl_;
  if (!state.allocated()) return make_error(EINVAL, "dma_iova_destroy: no IOVA range allocated");
  for (const auto& b : state.bounces_)
    if (b.offset >= mapped_len)
      return make_error(EINVAL, "dma_iova_destroy with mapped_len " + format_hex(mapped_len) + ": offset " + format_hex(b.offset) + " is still linked");
  if (mapped_len) PHYSR_TRY(iova_unlink(state, 0, mapped_len, dir, attrs));
  const DmaAddr base(state.addr.value() & ~kGMask);
  PHYSR_TRY(m.cfg.domain->free_iova(base, state.alloc_len_));
  state = DmaIovaState{};
  return {};
}

}  // namespace physr
