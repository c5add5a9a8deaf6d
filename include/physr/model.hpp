// physr model: the machine model's platform: a Platform (physr/platform.hpp) over the
// model's own memory (PhysMemory) and IOMMU domains (IoDomain). Its own module, so the
// platform itself depends only on the DMA layer's seams and a live host can build one
// without the model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/iommu.hpp"
#include "physr/pci.hpp"
#include "physr/physmem.hpp"
#include "physr/platform.hpp"

namespace physr {

struct ModelOptions {
  uint64_t ram = 64 * GiB;    // host RAM: [0, 2 GiB) and from 4 GiB up (the 32-bit MMIO hole between)
  bool iommu = true;          // one IOMMU domain per device; false: direct mapping
  bool strict_iommu = true;   // strict or deferred (flush queue) invalidation
  uint64_t bounce_pool = 64 * MiB;
  pci::VerdictOptions verdicts;
  bool dma_debug = true;      // DMA-API debug on the model's devices (benchmarks turn it off)
};

/// A platform over the model's own memory and IOMMU: RAM and every P2P BAR as PhysMemory
/// regions (first-touch bytes), every P2P BAR a provider (CPU copies allowed), a bounce
/// pool at 256 MiB, and an IoDomain per device when `iommu` is set.
class ModelPlatform {
 public:
  /// `topo` must outlive it. EINVAL: under 3 GiB of RAM, a bounce pool that is not whole
  /// 256 KiB segments or over 1 GiB. BARs that overlap memory or each other are left out,
  /// with a warning.
  static Result<std::unique_ptr<ModelPlatform>> create(const pci::Topology& topo, const ModelOptions& options = {});
  ~ModelPlatform();

  /// The DMA device of function `f`, created on first use: max segment 4 MiB, min_align_mask
  /// 4 KiB - 1 (as NVMe drivers set it, harmless for others), DMA-API debug as the options say, and its own
  /// IoDomain when the model has IOMMUs.
  Result<DmaDevice*> device(uint32_t f);
  /// The function's IoDomain (created with its device), or nullptr.
  IoDomain* domain(uint32_t f) const noexcept;
  /// A fresh IoDomain owned by the model (for devices the caller configures itself), its
  /// IOVA space without the memory BARs' bus ranges (as Linux reserves the host bridge
  /// windows) and, on x86, the MSI window.
  Result<IoDomain*> new_domain(const IoDomainOptions& options = {});

  Platform& platform() noexcept { return *platform_; }
  const Platform& platform() const noexcept { return *platform_; }
  PhysMemory& memory() noexcept { return mem_; }
  const PhysMemory& memory() const noexcept { return mem_; }
  const ModelOptions& options() const noexcept { return opt_; }
  /// BARs left out and why.
  std::vector<std::string> warnings;

 private:
  ModelPlatform() = default;
  ModelOptions opt_;
  PhysMemory mem_;
  std::vector<std::unique_ptr<IoDomain>> owned_;  // every domain the model made
  std::vector<IoDomain*> domains_;                // per function
  std::unique_ptr<Platform> platform_;            // last: destroyed first, before memory and domains
};

}  // namespace physr
