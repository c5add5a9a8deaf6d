// The platform: topology, the one P2P engine, providers, memory, bounce pool, domains, devices.
#include "physr/platform.hpp"

#include <algorithm>
#include <string>

namespace physr {

std::vector<P2PBar> p2p_bars(const pci::Topology& topo, uint32_t f) {
  std::vector<P2PBar> out;
  const pci::Function& fn = topo.functions[f];
  const std::optional<pci::NvmeCmb>& cmb = fn.cmb;
  for (const pci::Bar& b : fn.bars) {
    // An NVMe controller with a declared CMB offers that BAR only (the others hold its
    // registers), published only when CMBSZ has both RDS and WDS, as Linux nvme_map_cmb()
    // calls pci_p2pmem_publish(); unpublished, it is still P2P memory a job may name.
    if (cmb && b.index != cmb->bar) continue;
    // BARs 0-5 only: sysfs also lists the expansion ROM (6) and a bridge's forwarding
    // windows (13-15), which contain the BARs below the bridge rather than being memory.
    if (b.index > 5 || !b.is_mem() || b.size() < kPageSize || (b.start & (kPageSize - 1)) || (b.size() & (kPageSize - 1))) continue;
    out.push_back(P2PBar{b.index, !cmb || (cmb->rds && cmb->wds), cmb.has_value()});
  }
  return out;
}

Platform::~Platform() = default;

Result<std::unique_ptr<Platform>> Platform::create(const pci::Topology& topo, MemoryAccess& memory, const PlatformOptions& o) {
  std::unique_ptr<Platform> p(new Platform());
  p->topo_ = &topo;
  p->mem_ = &memory;
  p->cpu_copy_ = o.bars_cpu_copy;
  PHYSR_ASSIGN_OR_RETURN(p->engine_, pci::P2PEngine::create(topo, o.verdicts));
  if (o.bounce.size != 0) {
    PHYSR_ASSIGN_OR_RETURN(p->pool_, BouncePool::create(memory, o.bounce));
  }
  p->domains_.assign(topo.functions.size(), nullptr);
  p->devices_.resize(topo.functions.size());
  p->by_bus_.resize(topo.host_bridges.size());
  return p;
}

std::string Platform::label(uint32_t f) const {
  const auto& fn = topo_->functions[f];
  return fn.name.empty() ? fn.bdf.to_string() : fn.name;
}

Result<const Aperture*> Platform::add_bar(uint32_t f, unsigned bar, bool published) {
  if (f >= topo_->functions.size()) return make_error(EINVAL, "platform: no function " + std::to_string(f) + " in " + topo_->source);
  const pci::Function& fn = topo_->functions[f];
  const auto b = std::find_if(fn.bars.begin(), fn.bars.end(), [&](const pci::Bar& x) { return x.index == bar; });
  const std::string name = label(f) + " BAR" + std::to_string(bar);
  if (b == fn.bars.end() || !b->is_mem()) return make_error(EINVAL, "platform: " + name + " is not a memory BAR");
  const PhysSpan span{PhysAddr(b->start), b->size()};
  const uint64_t offset = topo_->host_bridges[fn.host_bridge].bus_offset;
  PHYSR_ASSIGN_OR_RETURN_CTX(const ProviderId id, reg_.add(ProviderDesc{fn.bdf, f, bar, span, offset, published, cpu_copy_, {}}),
                             name + " is not a provider");
  const bool cmb = fn.cmb && fn.cmb->bar == bar;
  apertures_.push_back(Aperture{id, f, bar, span, offset, name + (cmb ? " (CMB)" : ""), published});
  // Keep the host bridge's bus-address index sorted (apertures never overlap in CPU space,
  // and one host bridge's single offset keeps them apart in its bus space too).
  const auto i = static_cast<uint32_t>(apertures_.size() - 1);
  PHYSR_ASSERT(fn.host_bridge < by_bus_.size(), "every host bridge has a bus-address index");
  std::vector<uint32_t>& index = by_bus_[fn.host_bridge];
  const auto by_base = [&](uint32_t x, uint32_t y) { return apertures_[x].bus().base < apertures_[y].bus().base; };
  const auto pos = std::upper_bound(index.begin(), index.end(), i, by_base);
  index.insert(pos, i);
  PHYSR_ASSERT(std::is_sorted(index.begin(), index.end(), by_base), "a host bridge's bus-address index stays sorted");
  return &apertures_.back();
}

Status Platform::attach(uint32_t f, IommuDomain* domain) {
  if (f >= domains_.size()) return make_error(EINVAL, "platform: no function " + std::to_string(f) + " in " + topo_->source);
  if (devices_[f]) return make_error(EBUSY, "platform: " + label(f) + " already has a DMA device; attach its domain first");
  domains_[f] = domain;
  return {};
}

Result<DmaDevice*> Platform::add_device(DmaDeviceConfig c) {
  if (c.function >= devices_.size()) return make_error(EINVAL, "platform: no function " + std::to_string(c.function) + " in " + topo_->source);
  if (devices_[c.function]) return make_error(EEXIST, "platform: " + label(c.function) + " already has a DMA device");
  if (!c.domain) c.domain = domains_[c.function];
  PHYSR_ASSIGN_OR_RETURN(devices_[c.function], DmaDevice::create(dma_env(), c));
  return devices_[c.function].get();
}

DmaDevice* Platform::device(uint32_t f) const noexcept { return f < devices_.size() ? devices_[f].get() : nullptr; }
IommuDomain* Platform::domain(uint32_t f) const noexcept { return f < domains_.size() ? domains_[f] : nullptr; }

const Aperture* Platform::largest_bar(uint32_t f) const noexcept {
  const Aperture* best = nullptr;
  for (const Aperture& a : apertures_)
    if (a.function == f && (!best || a.span.size > best->span.size)) best = &a;
  return best;
}

const Aperture* Platform::aperture(ProviderId id) const noexcept {
  for (const Aperture& a : apertures_)
    if (a.id == id) return &a;
  return nullptr;
}

const Aperture* Platform::aperture_at_bus(uint32_t host_bridge, BusAddr a, uint64_t len) const noexcept {
  if (host_bridge >= by_bus_.size()) return nullptr;
  const std::vector<uint32_t>& index = by_bus_[host_bridge];
  // The last aperture starting at or below `a`.
  auto it = std::upper_bound(index.begin(), index.end(), a, [&](BusAddr x, uint32_t i) { return x < apertures_[i].bus().base; });
  if (it == index.begin()) return nullptr;
  const Aperture& ap = apertures_[*std::prev(it)];
  return ap.bus().contains(BusSpan{a, len}) ? &ap : nullptr;
}

const Aperture* Platform::nearest_provider(std::span<const uint32_t> clients) const {
  std::vector<uint32_t> owners;
  for (const Aperture& a : apertures_)
    if (a.published && std::find(owners.begin(), owners.end(), a.function) == owners.end()) owners.push_back(a.function);
  const auto pick = engine_->find_many(clients, owners, [](size_t) { return size_t{0}; });
  return pick ? largest_bar(*pick) : nullptr;
}

// ---------------------------------------------------------------------------------------
// The machine model's platform

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
      if (auto st = m->mem_.add_region({PhysSpan{PhysAddr(bar.start), bar.size()}, PhysRegion::Kind::bar, name}); !st) {
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
  // Linux dma-iommu.c iova_reserve_pci_windows(): a DMA domain's IOVA space leaves out the
  // host bridges' memory windows. The model's windows are its P2P BARs' bus ranges.
  IoDomainOptions o = options;
  for (const Aperture& a : platform_->apertures()) o.iova.reserved.push_back(DmaSpan{DmaAddr(a.bus().base.value()), a.span.size});
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
