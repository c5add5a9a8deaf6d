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
inline IommuPerms dir_prot(DmaDirection d) {
  switch (d) {
    case DmaDirection::to_device: return kIommuRead;
    case DmaDirection::from_device: return kIommuWrite;
    default: return kIommuReadWrite;
  }
}

enum class Route : uint8_t { host, mmio, bus };

// Whose rules classify() applies to P2P memory.
enum class MapForm : uint8_t {
  // One range (Linux dma_map_phys(), dma_iova_link()): memory through the host bridge is
  // mapped with DMA_ATTR_MMIO, so it is never bounced by Linux and a direct device gets
  // the physical address as the DMA address.
  phys,
  // A list (Linux dma_direct_map_sg(), iommu_dma_map_sg()): memory through the host bridge
  // is mapped as host memory (no MMIO attribute, the list's permissions).
  list,
  // An untrusted device's list behind an IOMMU (Linux iommu_dma_map_sg_swiotlb()): no P2P
  // classification at all.
  list_swiotlb,
};


// First chunk of [a, a + len) that stays within max_seg and does not cross a multiple of
// bmask + 1, in whatever address space a lives in.
inline uint64_t first_chunk(uint64_t a, uint64_t len, uint64_t max_seg, uint64_t bmask) {
  uint64_t n = std::min(len, max_seg);
  if (bmask != ~uint64_t{0}) n = std::min(n, bmask - (a & bmask) + 1);
  return n;
}

// The verdicts of the last two providers a list met, for the rest of one map call (inside
// its ReadGuard, so a provider pointer cannot be freed and its id not reused meanwhile). A
// list alternating between a few providers then skips the verdict lookup (the provider's
// function index, its check against the topology, the engine's row and entry: dependent
// loads) for all but their first ranges.
struct VerdictMemo {
  const Provider* p[2] = {nullptr, nullptr};
  std::optional<pci::MapType> t[2];
  unsigned next = 0;  // the entry a miss replaces (the older one)
  template <class F>
  std::optional<pci::MapType> get(const Provider* q, F&& compute) {
    if (q == p[0]) return t[0];
    if (q == p[1]) return t[1];
    const unsigned k = next;
    next ^= 1;
    p[k] = q;
    t[k] = compute();
    return t[k];
  }
};

struct DebugEntry {
  uint64_t len;
  DmaDirection dir;
};

}  // namespace dma_detail

struct DmaDevice::Impl {
  using DebugEntry = dma_detail::DebugEntry;
  using Route = dma_detail::Route;
  using MapForm = dma_detail::MapForm;
  using VerdictMemo = dma_detail::VerdictMemo;
  static constexpr uint64_t kGMask = dma_detail::kGMask;
  static constexpr uint64_t kIovaTop = dma_detail::kIovaTop;
  DmaEnv env;
  DmaDeviceConfig cfg;
  // Linux iommu_dma_alloc_iova(): PCI devices try below 4 GiB first (single-address-cycle
  // addresses) until that fails once.
  std::atomic<bool> sac_first{true};
  // Live mappings are maps - unmaps (stats()): a counter of its own cost every map/unmap
  // cycle two more locked read-modify-writes (~5 ns of MapUnmap/direct/1's ~40).
  std::atomic<uint64_t> maps{0}, unmaps{0}, failed{0}, bounced{0}, cache_ops{0};
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
  // messages) by the rules of `form`: the route, whether it must bounce, and the provider
  // (nullptr for host memory). Inside a ReadGuard. `memo` (a list's, or null) remembers
  // the last providers' verdicts for the rest of the call. The hot cases (host memory,
  // P2P by bus address, P2P through the host bridge in a list) stay in this function;
  // messages are built out of line, on failure only. Always inlined: as a call, its ten
  // arguments (six on the stack), the saved registers and the outputs through memory cost
  // MapUnmap/bus_addr/1 77 of its 601 instructions per map + unmap (callgrind).
  [[gnu::always_inline]] Status classify(size_t i, uint64_t addr, uint64_t len, ProviderId tag, DmaAttrs attrs, Route* route, bool* bounce,
                  const Provider** provider, MapForm form = MapForm::phys, VerdictMemo* memo = nullptr) {
    const ProviderRegistry* reg = env.providers;
    const Provider* p = nullptr;
    if (tag == kHostMemory) {
      if (reg) {  // host memory must not lie in a BAR: a list built wrongly is caught here
        for (uint64_t done = 0, ext = 0; done < len; done += ext)
          if (const Provider* q = reg->find_extent(PhysAddr(addr + done), ext)) [[unlikely]]
            return bad_range(i, addr, len, tag, q, addr + done);
      }
    } else {
      if (!reg) [[unlikely]] return bad_range(i, addr, len, tag, nullptr, 0);
      p = tag == kIndirectProvider ? reg->find(PhysAddr(addr)) : reg->get(tag);
      if (!p || !p->phys().contains(PhysSpan{PhysAddr(addr), len}) || p->revoked()) [[unlikely]]
        return bad_range(i, addr, len, tag, p, 0);
    }
    *provider = p;
    const bool unaligned = ((addr | len) & kGMask) != 0;  // Linux iova_unaligned()
    // Linux iommu_dma_map_sg_swiotlb(): each entry goes to iommu_dma_map_phys() with the
    // list's attributes and no pci_p2pdma_state(): P2P memory of any verdict is mapped (and
    // bounced when unaligned) as host memory is.
    if (p && form != MapForm::list_swiotlb) {
      const auto t = memo ? memo->get(p, [&] { return verdict(*p); }) : verdict(*p);
      if (t == pci::MapType::bus_addr) {
        *route = Route::bus;
        *bounce = false;
        return {};
      }
      // Linux dma_direct_map_sg() (PCI_P2PDMA_MAP_THRU_HOST_BRIDGE falls through to the
      // host case) and iommu_dma_map_sg() ("mapped with regular IOVAs", the list-wide prot):
      // in a list, memory through the host bridge is host memory. physr's
      // untrusted_one_iova option is the exception: MMIO is not bounced piecewise for an
      // untrusted device.
      const bool thru_host_bridge = t == pci::MapType::thru_host_bridge;
      if (!(thru_host_bridge && form == MapForm::list && !(cfg.domain && cfg.untrusted && unaligned))) {
        // A single range through the host bridge (MMIO), or memory Linux refuses. Linux
        // dma_direct_map_phys() with DMA_ATTR_MMIO: DMA address = phys, dma_capable() of it,
        // never swiotlb (forced bouncing refuses it); iommu_dma_map_phys(): DMA_ATTR_MMIO is
        // never bounced, so an untrusted device cannot take it unaligned.
        *route = Route::mmio;
        *bounce = false;
        if (thru_host_bridge && (cfg.domain ? !(cfg.untrusted && unaligned) : !cfg.force_bounce && capable(addr, len))) return {};
        if ((attrs & kDmaAttrAllowBounce) && p->cpu_copy_allowed()) {  // physr's own: bounce what Linux refuses
          *bounce = true;
          return {};
        }
        return unreachable(i, addr, len, *p, t, attrs);
      }
    }
    // Host memory, and P2P memory mapped as host memory: Linux iommu_dma_map_phys() bounces
    // when dev_use_swiotlb() (untrusted) and iova_unaligned(); dma_direct_map_phys() when
    // is_swiotlb_force_bounce() or !dma_capable() of phys_to_dma() (untrusted plays no part).
    *route = Route::host;
    *bounce = cfg.domain ? cfg.untrusted && unaligned : cfg.force_bounce || !capable(addr + cfg.dma_offset, len);
    if (*bounce && p && !p->cpu_copy_allowed()) [[unlikely]]  // swiotlb would copy it; this provider forbids that
      return make_error(EIO, range_name(i, addr, len) + " in provider " + std::to_string(p->id()) + " must be bounced for " +
                                 who() + " but the provider does not allow CPU copies");
    return {};
  }

  // The EREMOTEIO for P2P memory classify() found unreachable and not to be bounced.
  [[gnu::cold, gnu::noinline]] Status unreachable(size_t i, uint64_t addr, uint64_t len, const Provider& p, std::optional<pci::MapType> t, DmaAttrs attrs) const {
    std::string why = !t ? "its owner " + p.owner().to_string() + " is not function " + std::to_string(p.function()) + " of the topology"
                         : *t == pci::MapType::not_supported ? "P2P from " + p.owner().to_string() + " to " + who() + " is not supported"
                         : cfg.domain       ? "it is not granule-aligned and " + who() + " is untrusted (MMIO is not bounced)"
                         : cfg.force_bounce ? who() + " bounces everything (MMIO is not bounced)"
                                            : "it lies above " + who() + "'s DMA mask " + format_hex(cfg.dma_mask);
    why += (attrs & kDmaAttrAllowBounce) ? " and provider " + std::to_string(p.id()) + " does not allow CPU copies"
                                         : " and bouncing was not allowed";
    return make_error(EREMOTEIO, range_name(i, addr, len) + " in provider " + std::to_string(p.id()) + " is unreachable: " + why);
  }

  static std::string range_name(size_t i, uint64_t addr, uint64_t len) {
    return "range " + std::to_string(i) + " [" + format_hex(addr) + ", +" + format_hex(len) + ")";
  }

  // The error for a range whose tag does not fit: host memory inside provider q's aperture
  // (at `at`), no registry, an unregistered provider, outside its aperture, revoked.
  [[gnu::cold, gnu::noinline]] Status bad_range(size_t i, uint64_t addr, uint64_t len, ProviderId tag, const Provider* q, uint64_t at) const {
    const std::string where = range_name(i, addr, len);
    if (tag == kHostMemory)
      return make_error(EINVAL, where + " is tagged host memory but " + format_hex(at) + " is in provider " + std::to_string(q->id()) + " (" +
                                    q->owner().to_string() + " BAR" + std::to_string(q->bar()) + ")");
    if (!env.providers) return make_error(EINVAL, where + " names provider " + std::to_string(tag) + " but the device has no provider registry");
    if (!q)
      return make_error(EINVAL, where + " names provider " + (tag == kIndirectProvider ? std::string("(by address)") : std::to_string(tag)) +
                                    ", which is not registered");
    if (!q->phys().contains(PhysSpan{PhysAddr(addr), len}))
      return make_error(EINVAL, where + " lies outside provider " + std::to_string(q->id()) + "'s aperture [" + format_hex(q->phys().base.value()) +
                                    ", +" + format_hex(q->phys().size) + ")");
    return make_error(EFAULT, where + " is in provider " + std::to_string(q->id()) + ", which was revoked");
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

  // map_into's undo on failure (the first `nops` of `ops` were written to the page table)
  // and one bounced piece of a list (map_list.cpp).
  [[gnu::cold, gnu::noinline]] Status undo_map(DmaMapping& out, Error e, const IoMapOp* ops, size_t nops);
  [[gnu::noinline]] Status bounce_piece(DmaMapping& out, uint64_t phys, uint64_t len, DmaDirection dir, bool iommu, PhysAddr* b);
  // unmap()'s refusal of a mapping not live on this device; DMA-API debug: take a list
  // mapping's record out (EINVAL when it is not live), put it back (map_list.cpp).
  [[gnu::cold, gnu::noinline]] Status unmap_refused(const DmaMapping& mp) const;
  [[gnu::noinline]] Status debug_take(uint64_t id, DebugEntry* rec);
  [[gnu::cold, gnu::noinline]] void debug_put_back(uint64_t id, const DebugEntry& rec);
};

}  // namespace physr
