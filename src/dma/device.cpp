// DMA devices: creation and parameter checks, statistics, DMA-API debug (the leak report).
#include "dma/device.hpp"

#include <cstdio>

namespace physr {

using namespace dma_detail;

std::string dma_seg_path(DmaSegFlags flags) {
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
  per_range_iova_ = std::exchange(o.per_range_iova_, false);
  bytes_ = std::exchange(o.bytes_, 0);
  debug_id_ = std::exchange(o.debug_id_, 0);
  dir_ = o.dir_;
  attrs_ = o.attrs_;
  return *this;
}


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
  // By kind, then by id or address, numerically: reports stay the same run to run (hash
  // order is not an order) and read in mapping order.
  std::vector<std::pair<uint64_t, std::string>> lists, phys;
  {
    std::lock_guard lock(m.dbg_mu);
    for (const auto& [id, e] : m.dbg_lists)
      lists.emplace_back(id, "map of " + format_size(e.len) + " " + dma_direction_name(e.dir) + ", id " + std::to_string(id));
    for (const auto& [addr, v] : m.dbg_phys)
      for (const DebugEntry& e : v)
        phys.emplace_back(addr, "map_phys of " + format_size(e.len) + " at " + format_hex(addr) + " " + dma_direction_name(e.dir));
  }
  std::stable_sort(lists.begin(), lists.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::stable_sort(phys.begin(), phys.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::string> out;
  for (auto* v : {&lists, &phys})
    for (auto& [k, line] : *v) out.push_back(std::move(line));
  return out;
}
const DmaDeviceConfig& DmaDevice::config() const noexcept { return impl_->cfg; }

DmaDeviceStats DmaDevice::stats() const noexcept {
  const Impl& m = *impl_;
  DmaDeviceStats s;
  // Live mappings: maps - unmaps, clamped (a reader racing other threads' map and unmap
  // calls may see their counts in either order; the counts are a snapshot either way).
  s.unmaps = m.unmaps.load(std::memory_order_relaxed);
  s.maps = m.maps.load(std::memory_order_relaxed);
  s.live_mappings = s.maps >= s.unmaps ? s.maps - s.unmaps : 0;
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
  if (c.domain && c.force_bounce) return make_error(EINVAL, "DMA device: forced bouncing applies to direct mapping only, not with an IOMMU domain");
  auto impl = std::make_unique<Impl>();
  impl->env = env;
  impl->cfg = c;
  return std::unique_ptr<DmaDevice>(new DmaDevice(std::move(impl)));
}

Result<DmaMapping> DmaDevice::map(const RangeList& list, DmaDirection dir, DmaAttrs attrs) {
  DmaMapping out;
  PHYSR_RETURN_IF_ERROR(map_into(out, list, dir, attrs));
  return out;
}

}  // namespace physr
