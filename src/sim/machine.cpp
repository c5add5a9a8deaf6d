// The machine: memory, providers, per-device IOMMU domains, and the device side of DMA.
#include <algorithm>

#include "physr/sim.hpp"

namespace physr::sim {

namespace {
constexpr uint64_t kLowRam = 2 * GiB, kHighRamBase = 4 * GiB;
constexpr uint64_t kPoolBase = 256 * MiB;
}  // namespace

Machine::~Machine() = default;

std::string Machine::label(uint32_t f) const {
  const auto& fn = topo_->functions[f];
  return fn.name.empty() ? fn.bdf.to_string() : fn.name;
}

Result<std::unique_ptr<Machine>> Machine::create(const pci::Topology& topo, const MachineOptions& o) {
  if (o.ram < 3 * GiB) return make_error(EINVAL, "machine: at least 3 GiB of RAM (2 GiB below the MMIO hole, the rest above 4 GiB)");
  if (o.bounce_pool == 0 || o.bounce_pool % (256 * KiB) != 0 || o.bounce_pool > 1 * GiB)
    return make_error(EINVAL, "machine: the bounce pool must be whole 256 KiB segments, at most 1 GiB");
  for (double v : {o.nvme_read_gbps, o.nvme_write_gbps, o.copy_engine_gbps})
    if (!(v > 0)) return make_error(EINVAL, "machine: device bandwidths must be positive");
  std::unique_ptr<Machine> m(new Machine());
  m->topo_ = &topo;
  m->opt_ = o;
  auto fab = Fabric::create(topo, o.fabric);
  if (!fab) return std::move(fab).error();
  m->fabric_.emplace(std::move(fab).value());
  auto eng = pci::P2PEngine::create(topo);
  if (!eng) return std::move(eng).error();
  m->engine_.emplace(std::move(eng).value());
  PHYSR_TRY(m->mem_.add_region({PhysSpan{PhysAddr(0), kLowRam}, PhysRegion::Kind::host_ram, "ram (below 4 GiB)"}));
  PHYSR_TRY(m->mem_.add_region({PhysSpan{PhysAddr(kHighRamBase), o.ram - kLowRam}, PhysRegion::Kind::host_ram, "ram (above 4 GiB)"}));
  for (uint32_t f = 0; f < topo.functions.size(); ++f) {
    for (const pci::Bar& b : topo.functions[f].bars) {
      if (!b.is_mem() || b.size() < kPageSize || (b.start & (kPageSize - 1)) || (b.size() & (kPageSize - 1))) continue;
      const std::string name = m->label(f) + " BAR" + std::to_string(b.index);
      const PhysSpan span{PhysAddr(b.start), b.size()};
      if (auto st = m->mem_.add_region({span, PhysRegion::Kind::bar, name}); !st) {
        m->warnings.push_back(name + " left out: " + st.error().message);
        continue;
      }
      auto id = m->reg_.add(ProviderDesc{topo.functions[f].bdf, b.index, span, 0, true, true, {}});
      if (!id) {
        m->warnings.push_back(name + " is not a provider: " + id.error().message);
        continue;
      }
      m->apertures_.push_back(Aperture{*id, f, b.index, span, name});
    }
  }
  auto pool = BouncePool::create(m->mem_, BounceOptions{PhysAddr(kPoolBase), o.bounce_pool, 2});
  if (!pool) return std::move(pool).error();
  m->pool_ = std::move(pool).value();
  m->domains_.resize(topo.functions.size());
  m->devices_.resize(topo.functions.size());
  return m;
}

IoDomain* Machine::domain(uint32_t f) { return f < domains_.size() ? domains_[f].get() : nullptr; }

Result<DmaDevice*> Machine::device(uint32_t f) {
  if (f >= devices_.size()) return make_error(EINVAL, "machine: no function " + std::to_string(f));
  if (!devices_[f]) {
    DmaDeviceConfig c;
    c.function = f;
    c.max_segment = 4 * MiB;
    c.min_align_mask = 0xfff;  // as NVMe drivers set it, and harmless for the others
    if (opt_.iommu) {
      auto d = IoDomain::create();
      if (!d) return std::move(d).error();
      domains_[f] = std::move(d).value();
      c.domain = domains_[f].get();
    }
    auto dev = DmaDevice::create(dma_env(), c);
    if (!dev) return std::move(dev).error();
    devices_[f] = std::move(dev).value();
  }
  return devices_[f].get();
}

const Aperture* Machine::largest_bar(uint32_t f) const {
  const Aperture* best = nullptr;
  for (const Aperture& a : apertures_)
    if (a.function == f && (!best || a.span.size > best->span.size)) best = &a;
  return best;
}

const Aperture* Machine::nearest_provider(std::span<const uint32_t> clients) {
  std::vector<uint32_t> owners;
  for (const Aperture& a : apertures_)
    if (std::find(owners.begin(), owners.end(), a.function) == owners.end()) owners.push_back(a.function);
  const auto pick = engine_->find_many(clients, owners, [](size_t) { return size_t{0}; });
  return pick ? largest_bar(*pick) : nullptr;
}

Status Machine::access(uint32_t initiator, std::span<const DmaSegment> segs, uint8_t* bytes, size_t len, bool write) {
  IoDomain* dom = domain(initiator);
  // Translate everything first: on a fault nothing moves.
  std::vector<std::pair<PhysAddr, uint64_t>> runs;
  size_t at = 0;
  for (const DmaSegment& s : segs) {
    if (s.flags & kDmaSegBusAddr) {
      // The switch routes a bus address to the BAR that decodes it (bus = CPU address here);
      // a segment never spans two BARs.
      const Aperture* hit = nullptr;
      for (const Aperture& a : apertures_)
        if (a.span.contains(PhysSpan{PhysAddr(s.addr.value()), s.len})) hit = &a;
      if (!hit) return make_error(EREMOTEIO, "unsupported request: no BAR decodes bus addresses " + format_hex(s.addr.value()) + " (+" + format_hex(s.len) + ")");
      if (at + s.len > len) return make_error(EINVAL, "DMA engine: the DMA list is longer than the data");
      runs.emplace_back(PhysAddr(s.addr.value()), s.len);
      at += s.len;
      continue;
    }
    for (uint64_t done = 0; done < s.len;) {
      const uint64_t dma = s.addr.value() + done;
      uint64_t run = std::min<uint64_t>(s.len - done, kPageSize - (dma & (kPageSize - 1)));
      if (at + run > len) return make_error(EINVAL, "DMA engine: the DMA list is longer than the data");
      PhysAddr phys;
      if (dom) {
        const auto t = dom->translate(DmaAddr(dma));
        const uint8_t need = write ? kIommuWrite : kIommuRead;
        if (!t || !(t->perm & need)) {
          faults_.push_back(IommuFault{initiator, DmaAddr(dma), write, !t ? "not mapped" : write ? "read-only mapping" : "write-only mapping"});
          return make_error(EFAULT, "IOMMU fault: " + label(initiator) + " " + (write ? "wrote " : "read ") + format_hex(dma) + " (" +
                                        faults_.back().why + ")");
        }
        phys = t->phys;
      } else {
        phys = PhysAddr(dma);
      }
      if (!runs.empty() && runs.back().first + runs.back().second == phys) runs.back().second += run;  // physically contiguous
      else runs.emplace_back(phys, run);
      at += run;
      done += run;
    }
  }
  if (at != len) return make_error(EINVAL, "DMA engine: the DMA list is shorter than the data");
  at = 0;
  for (const auto& [phys, run] : runs) {
    if (write) PHYSR_TRY(mem_.write(phys, std::span<const uint8_t>(bytes + at, run)));
    else PHYSR_TRY(mem_.read(phys, std::span<uint8_t>(bytes + at, run)));
    at += run;
  }
  return {};
}

Status Machine::dma_write(uint32_t initiator, std::span<const DmaSegment> segs, std::span<const uint8_t> data) {
  return access(initiator, segs, const_cast<uint8_t*>(data.data()), data.size(), true);
}

Status Machine::dma_read(uint32_t initiator, std::span<const DmaSegment> segs, std::span<uint8_t> out) {
  return access(initiator, segs, out.data(), out.size(), false);
}

}  // namespace physr::sim
