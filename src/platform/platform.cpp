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
    if (b.index > 5 || !b.is_mem() || b.size() < kPageSize || (b.span.base.value() & (kPageSize - 1)) || (b.size() & (kPageSize - 1))) continue;
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
  const PhysSpan span = b->span;
  const uint64_t offset = topo_->host_bridges[fn.host_bridge].bus_offset;
  if (BusSpan{BusAddr(span.base.value() + offset), span.size}.wraps())
    return make_error(EINVAL, "platform: " + name + "'s bus addresses (CPU address + bus offset " + format_hex(offset) + ") run past 2^64");
  PHYSR_ASSIGN_OR_RETURN_CTX(const ProviderId id, reg_.add(ProviderDesc{fn.bdf, f, bar, span, offset, published, cpu_copy_, {}}),
                             name + " is not a provider");
  const bool cmb = fn.cmb && fn.cmb->bar == bar;
  apertures_.push_back(Aperture{id, f, bar, span, offset, name + (cmb ? " (CMB)" : ""), published});
  // Keep the host bridge's bus-address index sorted (apertures never overlap in CPU space,
  // and one host bridge's single offset keeps them apart in its bus space too).
  PHYSR_ASSERT(fn.host_bridge < by_bus_.size(), "every host bridge has a bus-address index");
  std::vector<BusEntry>& index = by_bus_[fn.host_bridge];
  const BusSpan bus = apertures_.back().bus();
  const BusEntry e{bus.base.value(), bus.base.value() + (bus.size - 1), &apertures_.back()};
  const auto by_base = [](const BusEntry& x, const BusEntry& y) { return x.base < y.base; };
  index.insert(std::upper_bound(index.begin(), index.end(), e, by_base), e);
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
  domains_[c.function] = c.domain;  // the domain the device really maps through, for whoever decodes its DMA
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
  const std::vector<BusEntry>& index = by_bus_[host_bridge];
  // The last aperture starting at or below `a`; most addresses a device sends (host memory,
  // IOVAs) lie past its end.
  const auto it = std::upper_bound(index.begin(), index.end(), a.value(), [](uint64_t x, const BusEntry& e) { return x < e.base; });
  if (it == index.begin() || a.value() > std::prev(it)->last) return nullptr;
  const Aperture& ap = *std::prev(it)->ap;
  return ap.bus().contains(BusSpan{a, len}) ? &ap : nullptr;
}

const Aperture* Platform::nearest_provider(std::span<const uint32_t> clients) const {
  std::vector<uint32_t> owners;
  for (const Aperture& a : apertures_)
    if (a.published && std::find(owners.begin(), owners.end(), a.function) == owners.end()) owners.push_back(a.function);
  const auto pick = engine_->find_many(clients, owners, [](size_t) { return size_t{0}; });
  return pick ? largest_bar(*pick) : nullptr;
}

}  // namespace physr
