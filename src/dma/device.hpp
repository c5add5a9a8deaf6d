// The DMA device's state and what its mapping paths share. Private to the dma module:
// device.cpp (creation, stats, DMA-API debug), map_list.cpp (range lists), map_phys.cpp
// (single ranges) and iova_api.cpp (the two-step API) include it.
#pragma once

#include <absl/container/flat_hash_map.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "physr/dma.hpp"

namespace physr {
namespace dma_detail {

// IoDomain requires a 4 KiB IOVA granule (its smallest leaf).
constexpr uint64_t kGranule = 4096;
constexpr uint64_t kGMask = kGranule - 1;
constexpr uint64_t kIovaTop = uint64_t{1} << 48;

constexpr uint64_t align_up(uint64_t x) { return (x + kGMask) & ~kGMask; }

// Linux dma_info_to_prot(): what the device may do to the memory.
inline uint8_t dir_prot(DmaDirection d) {
  switch (d) {
    case DmaDirection::to_device: return kIommuRead;
    case DmaDirection::from_device: return kIommuWrite;
    default: return kIommuReadWrite;
  }
}

enum class Route : uint8_t { host, mmio, bus };


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

}  // namespace dma_detail

struct DmaDevice::Impl {
  using DebugEntry = dma_detail::DebugEntry;
  using Route = dma_detail::Route;
  static constexpr uint64_t kGMask = dma_detail::kGMask;
  static constexpr uint64_t kIovaTop = dma_detail::kIovaTop;
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
  // A provider registered without its function index is found by its owner's address
  // (a linear search of the topology, per range: registering the index avoids it).
  std::optional<pci::MapType> verdict(const Provider& p) const {
    uint32_t f = p.function();
    if (f == pci::kNoFunction) [[unlikely]] {
      const auto found = env.p2p->topology().find(p.owner());
      if (!found) return std::nullopt;
      f = *found;
    }
    if (!env.p2p->is_function(f, p.owner())) return std::nullopt;
    return env.p2p->verdict(f, cfg.function).type;
  }

  std::string who() const {
    return env.p2p->topology().functions[cfg.function].bdf.to_string();
  }

  // Classifies [addr, addr + len) of provider tag `tag` (range `i` of a list, for
  // messages): the route, whether it must bounce, and the provider (nullptr for host
  // memory). Inside a ReadGuard.
  Status classify(size_t i, uint64_t addr, uint64_t len, ProviderId tag, DmaAttrs attrs, Route* route, bool* bounce,
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

}  // namespace physr
