// A machine for the dma-buf and devmem tests, benchmark and fuzzer: the DMA world's
// topology (tests/support/dma_world.hpp) with BARs, under a Platform over memory with real
// bytes. Importers of the GPU's memory: nvme shares the GPU's switch (bus_addr); nic sits
// behind an ACS-redirecting port (thru_host_bridge, with an IOMMU domain or direct); far is
// under a second host bridge that is not allowlisted (not_supported).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "physr/iommu.hpp"
#include "physr/mem.hpp"
#include "physr/physmem.hpp"
#include "physr/platform.hpp"
#include "support/dma_world.hpp"

namespace physr::testing {

struct DmaBufWorld {
  static constexpr uint64_t kRam = 1 * GiB;
  static constexpr uint64_t kGpuBar = 0x40'0000'0000, kGpuSize = 256 * MiB;
  static constexpr uint64_t kNicBar = 0x41'0000'0000, kNicSize = 16 * MiB;
  static constexpr uint64_t kFarBar = 0x42'0000'0000, kFarSize = 16 * MiB;

  pci::Topology topo;
  PhysMemory mem;
  std::unique_ptr<Platform> platform;
  std::unique_ptr<IoDomain> domain;
  uint32_t f_nvme = 0, f_gpu = 0, f_nic = 0, f_far = 0;
  bool debug = true;  // DMA-API debug on the devices tests make

  DmaBufWorld() {
    auto t = pci::parse_machine(kDmaWorldMachine, "dma-world");
    if (!t) die(t.error());
    topo = std::move(t).value();
    f_nvme = *topo.lookup("nvme");
    f_gpu = *topo.lookup("gpu");
    f_nic = *topo.lookup("nic");
    f_far = *topo.lookup("far");
    const pci::IoResourceFlags kMem64Pref = pci::IoResourceFlags(pci::IoResource::mem) | pci::IoResource::prefetch;
    topo.functions[f_gpu].bars.push_back(pci::Bar{1, PhysSpan{PhysAddr(kGpuBar), kGpuSize}, kMem64Pref});
    topo.functions[f_nic].bars.push_back(pci::Bar{0, PhysSpan{PhysAddr(kNicBar), kNicSize}, kMem64Pref});
    topo.functions[f_far].bars.push_back(pci::Bar{0, PhysSpan{PhysAddr(kFarBar), kFarSize}, kMem64Pref});
    topo.functions[f_far].bars.push_back(pci::Bar{4, PhysSpan{PhysAddr(0x1000), 0x100}, pci::IoResource::io});  // an I/O BAR
    check(mem.add_region({PhysSpan{PhysAddr(0), kRam}, PhysRegion::Kind::host_ram, "ram"}));
    check(mem.add_region({PhysSpan{PhysAddr(kGpuBar), kGpuSize}, PhysRegion::Kind::bar, "gpu BAR1"}));
    check(mem.add_region({PhysSpan{PhysAddr(kNicBar), kNicSize}, PhysRegion::Kind::bar, "nic BAR0"}));
    check(mem.add_region({PhysSpan{PhysAddr(kFarBar), kFarSize}, PhysRegion::Kind::bar, "far BAR0"}));
    PlatformOptions po;
    po.bounce = BounceOptions{PhysAddr(256 * MiB), 8 * MiB, 2};
    auto p = Platform::create(topo, mem, po);
    if (!p) die(p.error());
    platform = std::move(p).value();
    domain = std::move(IoDomain::create(IoDomainOptions{.iova = {}, .strict = true})).value();
  }

  /// A DMA device for `function`, behind the world's IOMMU domain or direct.
  std::unique_ptr<DmaDevice> device(uint32_t function, bool iommu) {
    DmaDeviceConfig c;
    c.function = function;
    c.domain = iommu ? domain.get() : nullptr;
    c.debug = debug;
    c.max_segment = 4 * GiB;
    auto d = DmaDevice::create(platform->dma_env(), c);
    if (!d) die(d.error());
    return std::move(d).value();
  }

  /// The physical address a device reaches at `dma` through a segment (nullopt: an IOMMU
  /// fault, or an address that decodes to no BAR).
  std::optional<PhysAddr> reach(const DmaSegment& s, uint64_t off) const {
    const uint64_t dma = s.addr.value() + off;
    if (s.flags & kDmaSegBusAddr) {
      for (const Aperture& a : platform->apertures())
        if (a.bus().contains(BusAddr(dma))) return PhysAddr(dma - a.bus_offset);
      return std::nullopt;
    }
    if (s.flags & kDmaSegIommu) {
      auto t = domain->translate(DmaAddr(dma));
      if (!t) return std::nullopt;
      return t->phys;
    }
    return PhysAddr(dma);
  }

  static void check(const Status& s) {
    if (!s) die(s.error());
  }
  [[noreturn]] static void die(const Error& e) {
    std::fprintf(stderr, "dma-buf world: %s\n", e.to_string().c_str());
    std::abort();
  }
};

}  // namespace physr::testing
