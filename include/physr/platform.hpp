// physr platform: one machine as the DMA layer sees it, built once and shared by everything
// that maps on it (the machine model, `physr map` and the tour; later a live host).
//
// Design rationale
// - One object holds what a DMA device maps with: the topology, the one P2P engine (whose
//   verdict cache is per (provider, client) and thread-safe, like Linux's
//   p2pdma->map_types), the provider registry, the memory (a MemoryAccess), the bounce
//   pool, the IOMMU domain of each function and the DMA devices. Before it, the model, the
//   map command and the tour each built their own engines and registered BARs by their own
//   rules.
// - Which BARs are P2P memory is one rule (p2p_bars()): memory BARs 0-5, page-aligned and at
//   least a page; an NVMe controller with a declared CMB offers only its CMB BAR, published
//   only when CMBSZ has both RDS and WDS (Linux nvme_map_cmb() calls pci_p2pmem_publish()).
// - Each provider records its owner's function index, so a verdict is two loads, and its bus
//   offset comes from its host bridge (HostBridge::bus_offset), so bus addresses differ from
//   CPU addresses where the host bridge translates.
// - Platform depends only on the DMA layer's seams: the machine model fills it with
//   PhysMemory and IoDomain (ModelPlatform, physr/model.hpp, a module of its own); a live
//   host would fill it with its own.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/pci.hpp"
#include "physr/provider.hpp"

namespace physr {

/// One memory BAR registered as a P2P provider.
struct Aperture {
  ProviderId id = 0;
  uint32_t function = 0;
  unsigned bar = 0;
  PhysSpan span;            // CPU physical
  uint64_t bus_offset = 0;  // PCI bus address = CPU address + bus_offset (mod 2^64)
  std::string name;         // "gpu0 BAR1", "nvme1 BAR2 (CMB)"
  bool published = true;    // found by nearest_provider (an NVMe CMB only with RDS and WDS)
  /// The aperture as peers address it on the PCI fabric.
  BusSpan bus() const noexcept { return BusSpan{BusAddr(span.base.value() + bus_offset), span.size}; }
};

/// A BAR that holds P2P memory, by the rule in the header comment.
struct P2PBar {
  unsigned bar = 0;
  bool published = true;
  bool cmb = false;  // an NVMe controller memory buffer
};
/// The BARs of function `f` that are P2P memory, by index.
std::vector<P2PBar> p2p_bars(const pci::Topology& topo, uint32_t f);

struct PlatformOptions {
  pci::VerdictOptions verdicts;  // what-if settings for the P2P engine
  /// The bounce pool; size 0: none (a range that needs bouncing fails with EIO).
  BounceOptions bounce{};
  /// Whether registered BARs allow CPU copies (the DMA layer may bounce them).
  bool bars_cpu_copy = true;
};

/// One machine for the DMA layer. Set-up (add_bar, attach, add_device) is single-threaded;
/// afterwards the devices map concurrently as DmaDevice allows.
class Platform {
 public:
  /// `topo` and `memory` must outlive the platform. Errors as P2PEngine::create and
  /// BouncePool::create.
  static Result<std::unique_ptr<Platform>> create(const pci::Topology& topo, MemoryAccess& memory, const PlatformOptions& options = {});
  ~Platform();
  Platform(const Platform&) = delete;
  Platform& operator=(const Platform&) = delete;

  /// Registers BAR `bar` of function `f` as a published (or not) provider, with its host
  /// bridge's bus offset. EINVAL: no such memory BAR, one not page-aligned, or bus addresses
  /// that run past 2^64; EEXIST: it overlaps a registered provider. The pointer stays valid
  /// as long as the platform.
  Result<const Aperture*> add_bar(uint32_t f, unsigned bar, bool published);
  /// Attaches an IOMMU domain to function `f` (shared domains allowed; null: direct). Must
  /// come before the function's device is created; the domain must outlive the platform.
  Status attach(uint32_t f, IommuDomain* domain);
  /// Creates the DMA device of config.function (its domain: the attached one, unless the
  /// config names its own, which then becomes the attached one). EEXIST: the function has
  /// one; errors as DmaDevice::create. The machine model decodes a function's DMA through
  /// the domain and device registered here: devices made with DmaDevice::create() outside
  /// the platform are not known to it.
  Result<DmaDevice*> add_device(DmaDeviceConfig config);
  /// The function's DMA device, or nullptr before add_device.
  DmaDevice* device(uint32_t f) const noexcept;
  /// The IOMMU domain attached to `f`, or nullptr (direct mapping).
  IommuDomain* domain(uint32_t f) const noexcept;

  const pci::Topology& topology() const noexcept { return *topo_; }
  const pci::P2PEngine& p2p() const noexcept { return *engine_; }
  ProviderRegistry& providers() noexcept { return reg_; }
  const ProviderRegistry& providers() const noexcept { return reg_; }
  MemoryAccess& memory() noexcept { return *mem_; }
  BouncePool* bounce() noexcept { return pool_.get(); }
  /// What a DmaDevice needs to map here (for devices the caller configures itself).
  DmaEnv dma_env() noexcept { return DmaEnv{&*engine_, &reg_, pool_.get()}; }

  /// Every registered BAR, in registration order; a deque, so pointers to its elements stay valid.
  const std::deque<Aperture>& apertures() const noexcept { return apertures_; }
  /// The function's largest P2P BAR, or nullptr.
  const Aperture* largest_bar(uint32_t f) const noexcept;
  /// The aperture registered as provider `id`, or nullptr.
  const Aperture* aperture(ProviderId id) const noexcept;
  /// The aperture behind host bridge `host_bridge` whose bus range holds [a, a + len) whole,
  /// or nullptr: what a switch below that host bridge decodes a peer address to (each host
  /// bridge has a bus address space of its own). O(log n).
  const Aperture* aperture_at_bus(uint32_t host_bridge, BusAddr a, uint64_t len) const noexcept;
  /// Published providers nearest to `clients` (Linux pci_p2pmem_find_many, ties to the
  /// first): the owner's largest BAR, or nullptr.
  const Aperture* nearest_provider(std::span<const uint32_t> clients) const;
  /// Name of a function for reports ("nvme0", or its address).
  std::string label(uint32_t f) const;

 private:
  Platform() = default;
  const pci::Topology* topo_ = nullptr;
  MemoryAccess* mem_ = nullptr;
  std::optional<pci::P2PEngine> engine_;
  ProviderRegistry reg_;
  std::unique_ptr<BouncePool> pool_;
  bool cpu_copy_ = true;
  std::deque<Aperture> apertures_;
  // Per host bridge: its apertures' bus ranges, sorted by base. Contiguous, so the lookup
  // of every decoded page does not index the deque.
  struct BusEntry {
    uint64_t base, last;  // the bus range [base, last]
    const Aperture* ap;
  };
  std::vector<std::vector<BusEntry>> by_bus_;
  std::vector<IommuDomain*> domains_;
  std::vector<std::unique_ptr<DmaDevice>> devices_;
};

}  // namespace physr
