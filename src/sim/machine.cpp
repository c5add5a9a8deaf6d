// The machine: memory, providers, per-device IOMMU domains, and the device side of DMA.
#include <algorithm>
#include <cstring>

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
    const std::optional<pci::NvmeCmb>& cmb = topo.functions[f].cmb;
    for (const pci::Bar& b : topo.functions[f].bars) {
      // An NVMe controller with a declared CMB offers that BAR only (the others hold its
      // registers), published only when CMBSZ has both RDS and WDS, as Linux nvme_map_cmb()
      // calls pci_p2pmem_publish(); unpublished, it is still P2P memory a job may name.
      if (cmb && b.index != cmb->bar) continue;
      const bool published = !cmb || (cmb->rds && cmb->wds);
      // BARs 0-5 only: sysfs also lists the expansion ROM (6) and a bridge's forwarding
      // windows (13-15), which contain the BARs below the bridge rather than being memory.
      if (b.index > 5 || !b.is_mem() || b.size() < kPageSize || (b.start & (kPageSize - 1)) || (b.size() & (kPageSize - 1))) continue;
      const std::string name = m->label(f) + " BAR" + std::to_string(b.index);
      const PhysSpan span{PhysAddr(b.start), b.size()};
      if (auto st = m->mem_.add_region({span, PhysRegion::Kind::bar, name}); !st) {
        m->warnings.push_back(name + " left out: " + st.error().message);
        continue;
      }
      auto id = m->reg_.add(ProviderDesc{topo.functions[f].bdf, b.index, span, 0, published, true, {}});
      if (!id) {
        m->warnings.push_back(name + " is not a provider: " + id.error().message);
        continue;
      }
      m->apertures_.push_back(Aperture{*id, f, b.index, span, name + (cmb ? " (CMB)" : ""), published});
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
    if (a.published && std::find(owners.begin(), owners.end(), a.function) == owners.end()) owners.push_back(a.function);
  const auto pick = engine_->find_many(clients, owners, [](size_t) { return size_t{0}; });
  return pick ? largest_bar(*pick) : nullptr;
}

Status Machine::access(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len, const DmaSource* source,
                       const DmaSink* sink) {
  IoDomain* dom = domain(initiator);
  const bool write = source != nullptr;
  // Translate everything first: on a fault nothing moves.
  std::vector<std::pair<PhysAddr, uint64_t>> runs;
  uint64_t at = 0;
  for (const DmaSegment& s : segs) {
    if (at == len) break;
    if (offset >= s.len) {  // before this call's bytes
      offset -= s.len;
      continue;
    }
    const uint64_t first = offset, take = std::min<uint64_t>(s.len - first, len - at);
    offset = 0;
    if (s.flags & kDmaSegBusAddr) {
      // The switch routes a bus address to the BAR that decodes it (bus = CPU address here);
      // a segment never spans two BARs.
      const Aperture* hit = nullptr;
      for (const Aperture& a : apertures_)
        if (a.span.contains(PhysSpan{PhysAddr(s.addr.value()), s.len})) hit = &a;
      if (!hit) return make_error(EREMOTEIO, "unsupported request: no BAR decodes bus addresses " + format_hex(s.addr.value()) + " (+" + format_hex(s.len) + ")");
      runs.emplace_back(PhysAddr(s.addr.value() + first), take);
      at += take;
      continue;
    }
    for (uint64_t done = first; done < first + take;) {
      const uint64_t dma = s.addr.value() + done;
      const uint64_t run = std::min<uint64_t>(first + take - done, kPageSize - (dma & (kPageSize - 1)));
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
  if (at != len) return make_error(EINVAL, "DMA engine: the DMA list ends before the data (" + std::to_string(len - at) + " bytes left)");
  at = 0;
  for (const auto& [phys, run] : runs) {
    if (write)
      PHYSR_TRY(mem_.fill(phys, run, [&, base = at](uint64_t o, std::span<uint8_t> piece) { return (*source)(base + o, piece); }));
    else
      PHYSR_TRY(mem_.visit(phys, run, [&, base = at](uint64_t o, std::span<const uint8_t> piece) { return (*sink)(base + o, piece); }));
    at += run;
  }
  return {};
}

Status Machine::dma_write(uint32_t initiator, std::span<const DmaSegment> segs, std::span<const uint8_t> data, uint64_t offset) {
  const DmaSource from_data = [&](uint64_t off, std::span<uint8_t> dst) {
    std::memcpy(dst.data(), data.data() + off, dst.size());
    return Status{};
  };
  return access(initiator, segs, offset, data.size(), &from_data, nullptr);
}

Status Machine::dma_read(uint32_t initiator, std::span<const DmaSegment> segs, std::span<uint8_t> out, uint64_t offset) {
  const DmaSink to_out = [&](uint64_t off, std::span<const uint8_t> src) {
    std::memcpy(out.data() + off, src.data(), src.size());
    return Status{};
  };
  return access(initiator, segs, offset, out.size(), nullptr, &to_out);
}

Status Machine::dma_write_from(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len, const DmaSource& source) {
  return access(initiator, segs, offset, len, &source, nullptr);
}

Status Machine::dma_read_to(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len, const DmaSink& sink) {
  return access(initiator, segs, offset, len, nullptr, &sink);
}

}  // namespace physr::sim
