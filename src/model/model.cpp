// The machine model's platform: RAM and P2P BARs as PhysMemory regions, BARs as providers,
// a bounce pool, and an IoDomain per device.
#include "physr/model.hpp"

#include <algorithm>
#include <string>

namespace physr {

namespace {
constexpr uint64_t kLowRam = 2 * GiB, kHighRamBase = 4 * GiB;
constexpr uint64_t kPoolBase = 256 * MiB;
}  // namespace

ModelPlatform::~ModelPlatform() = default;

Result<std::unique_ptr<ModelPlatform>> ModelPlatform::create(const pci::Topology& topo, const ModelOptions& o) {
  if (o.ram < 3 * GiB) return make_error(EINVAL, "machine: at least 3 GiB of RAM (2 GiB below the MMIO hole, the rest above 4 GiB)");
  if (o.bounce_pool == 0 || o.bounce_pool % (256 * KiB) != 0 || o.bounce_pool > 1 * GiB)
    return make_error(EINVAL, "machine: the bounce pool must be whole 256 KiB segments, at most 1 GiB");
  std::unique_ptr<ModelPlatform> m(new ModelPlatform());
  m->opt_ = o;
  PHYSR_RETURN_IF_ERROR(m->mem_.add_region({PhysSpan{PhysAddr(0), kLowRam}, PhysRegion::Kind::host_ram, "ram (below 4 GiB)"}));
  PHYSR_RETURN_IF_ERROR(m->mem_.add_region({PhysSpan{PhysAddr(kHighRamBase), o.ram - kLowRam}, PhysRegion::Kind::host_ram, "ram (above 4 GiB)"}));
  PlatformOptions po;
  po.verdicts = o.verdicts;
  po.bounce = BounceOptions{PhysAddr(kPoolBase), o.bounce_pool, 2};
  po.bars_cpu_copy = true;
  PHYSR_ASSIGN_OR_RETURN(m->platform_, Platform::create(topo, m->mem_, po));
  for (uint32_t f = 0; f < topo.functions.size(); ++f) {
    for (const P2PBar& b : p2p_bars(topo, f)) {
      const pci::Bar& bar = *std::find_if(topo.functions[f].bars.begin(), topo.functions[f].bars.end(),
                                          [&](const pci::Bar& x) { return x.index == b.bar; });
      const std::string name = m->platform_->label(f) + " BAR" + std::to_string(b.bar);
      if (auto st = m->mem_.add_region({bar.span, PhysRegion::Kind::bar, name}); !st) {
        m->warnings.push_back(name + " left out: " + st.error().message);
        continue;
      }
      if (auto a = m->platform_->add_bar(f, b.bar, b.published); !a) m->warnings.push_back(a.error().message);
    }
  }
  m->domains_.assign(topo.functions.size(), nullptr);
  return m;
}

IoDomain* ModelPlatform::domain(uint32_t f) const noexcept { return f < domains_.size() ? domains_[f] : nullptr; }

Result<IoDomain*> ModelPlatform::new_domain(const IoDomainOptions& options) {
  // Linux dma-iommu.c iova_reserve_iommu_regions(): a DMA domain's IOVA space leaves out
  // the host bridges' memory windows (iova_reserve_pci_windows()), which contain every
  // memory BAR behind them; the model reserves each memory BAR's bus range (P2P memory or
  // registers). On x86 it also leaves out the MSI window the interrupt remapping hardware
  // claims (IOMMU_RESV_MSI, [0xfee00000, +1 MiB)).
  IoDomainOptions o = options;
  const pci::Topology& topo = platform_->topology();
  for (const pci::Function& fn : topo.functions)
    for (const pci::Bar& b : fn.bars)
      if (b.is_mem() && b.index <= 5 && b.size() != 0)
        o.iova.reserved.push_back(DmaSpan{DmaAddr(b.span.base.value() + topo.host_bridges[fn.host_bridge].bus_offset), b.size()});
  if (topo.cpu.vendor == "GenuineIntel" || topo.cpu.vendor == "AuthenticAMD")
    o.iova.reserved.push_back(DmaSpan{DmaAddr(0xfee0'0000), 1 * MiB});
  PHYSR_ASSIGN_OR_RETURN(auto d, IoDomain::create(o));
  owned_.push_back(std::move(d));
  return owned_.back().get();
}

Result<DmaDevice*> ModelPlatform::device(uint32_t f) {
  if (f >= domains_.size()) return make_error(EINVAL, "machine: no function " + std::to_string(f));
  if (DmaDevice* d = platform_->device(f)) return d;
  if (opt_.iommu) {
    PHYSR_ASSIGN_OR_RETURN(IoDomain* d, new_domain(IoDomainOptions{.iova = {}, .strict = opt_.strict_iommu}));
    domains_[f] = d;
    PHYSR_RETURN_IF_ERROR(platform_->attach(f, d));
  }
  DmaDeviceConfig c;
  c.function = f;
  c.max_segment = 4 * MiB;
  c.min_align_mask = 0xfff;  // as NVMe drivers set it, and harmless for the others
  c.debug = opt_.dma_debug;
  return platform_->add_device(c);
}

}  // namespace physr
