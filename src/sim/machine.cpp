// The machine: the model's platform, the fabric, and the device side of DMA, which decodes
// every DMA address as the PCI fabric does (never trusting the DMA layer's segment flags).
#include <cmath>
#include <algorithm>
#include <cstring>

#include "physr/sim.hpp"

namespace physr::sim {

std::string bus_result_name(BusResult r) {
  if (r.empty()) return "ok";
  std::string s;
  for (auto [bit, name] : {std::pair{kBusDecodeError, "decode_error"}, {kBusIommuFault, "iommu_fault"},
                           {kBusUnsupportedRequest, "unsupported_request"}})
    if (r & bit) s += (s.empty() ? "" : "|") + std::string(name);
  return s;
}

void DmaAccess::merge(const DmaAccess& o) {
  if (!o.ok() && ok()) why = o.why;
  result |= o.result;
  host_memory |= o.host_memory;
  peer_switch |= o.peer_switch;
  peer_rc |= o.peer_rc;
  if (o.peer != pci::kNoFunction) peer = o.peer;
}

// A physically contiguous run of an access.
struct Machine::Run {
  PhysAddr phys;
  uint64_t len;
};

Machine::~Machine() = default;

Result<std::unique_ptr<Machine>> Machine::create(const pci::Topology& topo, const MachineOptions& o) {
  for (double v : {o.nvme_read_gbps, o.nvme_write_gbps, o.copy_engine_gbps, o.wire_gbps})
    if (!(v > 0)) return make_error(EINVAL, "machine: device bandwidths must be positive");
  for (double v : {o.nvme_read_iops, o.nvme_write_iops})
    if (!(v > 0) || !std::isfinite(v)) return make_error(EINVAL, "machine: SSD IOPS limits must be positive");
  if (!(o.nvme_latency_sigma >= 0) || !std::isfinite(o.nvme_latency_sigma))
    return make_error(EINVAL, "machine: the SSD latency spread (nvme_latency_sigma) must be 0 or more");
  std::unique_ptr<Machine> m(new Machine());
  m->topo_ = &topo;
  m->opt_ = o;
  PHYSR_ASSIGN_OR_RETURN(m->model_, ModelPlatform::create(topo, ModelOptions{.ram = o.ram, .iommu = o.iommu, .strict_iommu = true,
                                                                            .bounce_pool = o.bounce_pool, .verdicts = {}, .dma_debug = o.dma_debug}));
  m->warnings = m->model_->warnings;
  PHYSR_ASSIGN_OR_RETURN(m->fabric_, Fabric::create(m->platform().p2p(), o.fabric));
  // The jobs' host buffers: the RAM above the 32-bit hole (ModelPlatform puts [4 GiB,
  // 4 GiB + ram - 2 GiB) there), clear of the bounce pool below 4 GiB.
  PHYSR_ASSIGN_OR_RETURN(m->host_alloc_, HostAllocator::create(PhysSpan{PhysAddr(4 * GiB), (o.ram - 2 * GiB) & ~(2 * MiB - 1)}, m->fabric_->numa_nodes()));
  PHYSR_ASSIGN_OR_RETURN(m->p2pmem_, mem::P2PMemory::create(m->platform()));
  return m;
}

Result<mem::P2PMemorySource*> Machine::allocate_file(uint32_t function) {
  if (const auto it = files_.find(function); it != files_.end()) return it->second.get();
  const Aperture* bar = function < topo_->functions.size() ? largest_bar(function) : nullptr;
  if (!bar) return make_error(EINVAL, "p2pmem of " + (function < topo_->functions.size() ? label(function) : std::to_string(function)) + ": no memory BAR");
  PHYSR_RETURN_IF_ERROR(p2pmem_->add_resource(function, bar->bar, 0, 0));
  auto file = std::make_unique<mem::P2PMemorySource>(*p2pmem_, function, label(function), "physr sim");
  mem::P2PMemorySource* raw = file.get();
  files_.emplace(function, std::move(file));
  return raw;
}

void Machine::decode(uint32_t initiator, uint64_t dma, uint64_t len, bool write, std::vector<Run>& runs, DmaAccess& out) {
  const Platform& p = platform();
  const auto add_run = [&](PhysAddr phys, uint64_t n) {
    PHYSR_ASSERT(n != 0, "a decoded run is never empty");
    if (!runs.empty() && runs.back().phys + runs.back().len == phys) runs.back().len += n;  // physically contiguous
    else runs.push_back(Run{phys, n});
  };
  // Only the first failing piece is described: later ones just add their outcome bits.
  const auto fail = [&](BusResult r, const auto& why) {
    if (out.ok()) out.why = why();
    out.result |= r;
  };
  // The initiator's IOMMU domain as the platform attached it (whoever created the device),
  // or, direct, the DMA offset its host bridge applies.
  IommuDomain* dom = p.domain(initiator);
  const DmaDevice* dev = p.device(initiator);
  const uint64_t dma_offset = dev && !dom ? dev->config().dma_offset : 0;
  const uint32_t host_bridge = topo_->functions[initiator].host_bridge;
  const PhysRegion* region = nullptr;    // the region of the previous page, which the next one is usually in
  const Aperture* switched = nullptr;    // the peer BAR the previous page went to under the switch
  PhysSpan owner_span{};                 // the extent the previous BAR page's provider lookup covered
  uint32_t owner_fn = pci::kNoFunction;  // ... and the function it found
  bool faulting = false;                 // the previous page faulted: one fault record per faulting run
  for (uint64_t done = 0; done < len;) {
    const uint64_t at = dma + done;
    uint64_t run = std::min<uint64_t>(len - done, kPageSize - (at & (kPageSize - 1)));
    // Below the root complex, page by page (a segment may run from one window into
    // another): a switch routes a bus address to the BAR that decodes it when the initiator
    // reaches that BAR without going up (the fabric rule Linux's bus_addr verdict
    // describes: a common upstream device, no ACS redirect on the way).
    if (!switched || !switched->bus().contains(BusSpan{BusAddr(at), run})) {
      switched = p.aperture_at_bus(host_bridge, BusAddr(at), run);
      if (switched && p.p2p().verdict(switched->function, initiator).type != pci::MapType::bus_addr) switched = nullptr;
    }
    if (switched) {
      // The switch routes the whole window alike: the rest of the piece inside it is one step.
      run = std::min<uint64_t>(len - done, switched->bus().base.value() + switched->bus().size - at);
      add_run(switched->span.base + (at - switched->bus().base.value()), run);
      out.peer_switch = true;
      out.peer = switched->function;
      faulting = false;
      done += run;
      continue;
    }
    // Up to the root complex: the IOMMU translates (or the host bridge applies the direct
    // DMA offset), then the root complex decodes the physical address: RAM, or a peer's
    // BAR if it forwards peer traffic for this pair.
    PhysAddr phys(at - dma_offset);
    if (dom) {
      const auto t = dom->translate(DmaAddr(at));
      const IommuPerms need = write ? kIommuWrite : kIommuRead;
      if (!t || !(t->perm & need)) {
        const char* why = !t ? "not mapped" : write ? "read-only mapping" : "write-only mapping";
        if (!faulting) faults_.push_back(IommuFault{initiator, DmaAddr(at), write, why});
        faulting = true;
        fail(kBusIommuFault,
             [&] { return "IOMMU fault: " + label(initiator) + " " + (write ? "wrote " : "read ") + format_hex(at) + " (" + why + ")"; });
        done += run;
        continue;
      }
      phys = t->phys;
      // A large leaf maps the rest of its page contiguously: one step for all of it.
      if (t->page_size > kPageSize)
        run = std::min<uint64_t>(len - done, t->page_size - (at & (t->page_size - 1)));
    }
    faulting = false;
    done += run;
    const PhysSpan piece{phys, run};
    if (!region || !region->span.contains(piece)) region = memory().region_of(phys);
    if (!region || !region->span.contains(piece)) {
      fail(kBusDecodeError, [&] {
        return "decode error: nothing decodes " + format_hex(phys.value()) + " (" + label(initiator) + " DMA address " + format_hex(at) + ")";
      });
      region = nullptr;
      continue;
    }
    if (region->kind == PhysRegion::Kind::bar) {
      if (!owner_span.contains(piece)) {
        ProviderRegistry::ReadGuard guard;  // the provider is read only inside it
        uint64_t ext = 0;
        const Provider* owner = p.providers().find_extent(phys, ext);
        owner_fn = owner ? owner->function() : pci::kNoFunction;
        owner_span = PhysSpan{phys, ext};
      }
      if (owner_fn == pci::kNoFunction || !fabric_->rc_forwards(initiator, owner_fn)) {
        fail(kBusUnsupportedRequest, [&] {
          return "unsupported request: the root complex does not forward " + label(initiator) + "'s DMA to " + region->name + " at " +
                 format_hex(phys.value());
        });
        continue;
      }
      out.peer_rc = true;
      out.peer = owner_fn;
    } else {
      out.host_memory = true;
    }
    add_run(phys, run);
  }
}

Result<DmaAccess> Machine::access(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len, const DmaSource* source,
                                  const DmaSink* sink) {
  const bool write = source != nullptr;
  // Decode everything first: a failing piece moves nothing. The runs go into a buffer kept
  // between calls, or a fresh one when a source or sink makes an access of its own.
  std::vector<Run> nested;
  std::vector<Run>& runs = in_access_ ? nested : runs_;
  runs.clear();
  const bool outer = !in_access_;
  in_access_ = true;
  struct Leave {
    bool& flag;
    bool outer;
    ~Leave() {
      if (outer) flag = false;
    }
  } leave{in_access_, outer};
  DmaAccess out;
  uint64_t at = 0;
  for (const DmaSegment& s : segs) {
    if (at == len) break;
    if (offset >= s.len) {  // before this call's bytes
      offset -= s.len;
      continue;
    }
    const uint64_t first = offset, take = std::min<uint64_t>(s.len - first, len - at);
    offset = 0;
    decode(initiator, s.addr.value() + first, take, write, runs, out);
    at += take;
  }
  if (at != len) return make_error(EINVAL, "DMA engine: the DMA list ends before the data (" + std::to_string(len - at) + " bytes left)");
  if (!out.ok()) return out;
  at = 0;
  PhysMemory& mem = memory();
  for (const Run& r : runs) {
    // A run past the access would hand the source or sink bytes beyond its buffer.
    PHYSR_ASSERT(r.len != 0 && r.len <= len - at, "a decoded run lies within the access");
    if (write)
      PHYSR_RETURN_IF_ERROR(mem.fill(r.phys, r.len, [&, base = at](uint64_t o, std::span<uint8_t> piece) { return (*source)(base + o, piece); }));
    else
      PHYSR_RETURN_IF_ERROR(mem.visit(r.phys, r.len, [&, base = at](uint64_t o, std::span<const uint8_t> piece) { return (*sink)(base + o, piece); }));
    at += r.len;
  }
  PHYSR_ASSERT(at == len, "the decoded runs cover the access exactly");
  return out;
}

Result<DmaAccess> Machine::dma_write(uint32_t initiator, std::span<const DmaSegment> segs, std::span<const uint8_t> data, uint64_t offset) {
  const DmaSource from_data = [&](uint64_t off, std::span<uint8_t> dst) {
    std::memcpy(dst.data(), data.data() + off, dst.size());
    return Status{};
  };
  return access(initiator, segs, offset, data.size(), &from_data, nullptr);
}

Result<DmaAccess> Machine::dma_read(uint32_t initiator, std::span<const DmaSegment> segs, std::span<uint8_t> out, uint64_t offset) {
  const DmaSink to_out = [&](uint64_t off, std::span<const uint8_t> src) {
    std::memcpy(out.data() + off, src.data(), src.size());
    return Status{};
  };
  return access(initiator, segs, offset, out.size(), nullptr, &to_out);
}

Result<DmaAccess> Machine::dma_write_from(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len,
                                          const DmaSource& source) {
  return access(initiator, segs, offset, len, &source, nullptr);
}

Result<DmaAccess> Machine::dma_read_to(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len,
                                       const DmaSink& sink) {
  return access(initiator, segs, offset, len, nullptr, &sink);
}

}  // namespace physr::sim
