// A small machine for DMA-layer tests, benchmarks and fuzzing: memory, providers with each
// P2P verdict, a bounce pool and an IOMMU domain, plus a device-side view that translates
// DMA addresses back to physical memory (through the IOMMU, the bus offset or the direct
// offset) so tests can check every byte a DMA list reaches.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/dma.hpp"
#include "physr/iommu.hpp"
#include "physr/physmem.hpp"

namespace physr::testing {

// nvme and gpu share a switch (bus_addr); nic sits behind an ACS-redirecting port
// (thru_host_bridge through the allowlisted Skylake host bridge); far is under a second
// host bridge that is not in the allowlist (not_supported).
inline constexpr const char* kDmaWorldMachine = R"(
name = "dma-world"
[cpu]
vendor = "GenuineIntel"
family = 6
[[host_bridge]]
bus = 0x00
[[host_bridge]]
bus = 0x80
[[function]]
bdf = "0000:00:00.0"
vendor = 0x8086
device = 0x2020
class = 0x060000
type = "rc_integrated_endpoint"
[[function]]
bdf = "0000:00:01.0"
vendor = 0x8086
device = 0x2030
class = 0x060400
type = "root_port"
acs = "SV RR CR UF"
[[function]]
bdf = "0000:01:00.0"
name = "sw"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_upstream"
parent = "0000:00:01.0"
[[function]]
bdf = "0000:02:00.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
acs = "SV"
[[function]]
bdf = "0000:02:01.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
acs = "SV"
[[function]]
bdf = "0000:02:02.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
acs = "SV RR CR UF"
[[function]]
bdf = "0000:03:00.0"
name = "nvme"
vendor = 0x144d
device = 0xa80a
class = 0x010802
type = "endpoint"
parent = "0000:02:00.0"
[[function]]
bdf = "0000:04:00.0"
name = "gpu"
vendor = 0x10de
device = 0x20b5
class = 0x030200
type = "endpoint"
parent = "0000:02:01.0"
[[function]]
bdf = "0000:05:00.0"
name = "nic"
vendor = 0x15b3
device = 0x101d
class = 0x020000
type = "endpoint"
parent = "0000:02:02.0"
[[function]]
bdf = "0000:80:00.0"
vendor = 0x8086
device = 0x1234
class = 0x060000
type = "rc_integrated_endpoint"
[[function]]
bdf = "0000:80:01.0"
vendor = 0x8086
device = 0x2030
class = 0x060400
type = "root_port"
acs = "SV RR CR UF"
[[function]]
bdf = "0000:81:00.0"
name = "far"
vendor = 0x1af4
device = 0x1041
class = 0x120000
type = "endpoint"
parent = "0000:80:01.0"
)";

struct DmaWorld {
  static constexpr uint64_t kRam = 8 * GiB;
  static constexpr uint64_t kPoolBase = 256 * MiB, kPoolSize = 8 * MiB;
  static constexpr uint64_t kGpuBar = 0x40'0000'0000, kGpuSize = 1 * GiB, kGpuBusOffset = uint64_t{1} << 44;
  static constexpr uint64_t kNicBar = 0x41'0000'0000, kNicSize = 16 * MiB;
  static constexpr uint64_t kFarBar = 0x42'0000'0000, kFarSize = 16 * MiB;    // cpu_copy allowed
  static constexpr uint64_t kFar2Bar = 0x43'0000'0000, kFar2Size = 16 * MiB;  // cpu_copy not allowed

  PhysMemory mem;
  ProviderRegistry reg;
  pci::Topology topo;
  std::optional<pci::P2PEngine> engine;
  std::unique_ptr<BouncePool> pool;
  std::unique_ptr<IoDomain> domain;
  ProviderId gpu = 0, nic = 0, far = 0, far2 = 0;
  uint32_t f_nvme = 0, f_gpu = 0, f_nic = 0, f_far = 0;

  explicit DmaWorld(bool strict = true) {
    auto t = pci::parse_machine(kDmaWorldMachine, "dma-world");
    if (!t) abort_with(t.error());
    topo = std::move(t).value();
    engine.emplace(std::move(pci::P2PEngine::create(topo)).value());
    f_nvme = *topo.lookup("nvme");
    f_gpu = *topo.lookup("gpu");
    f_nic = *topo.lookup("nic");
    f_far = *topo.lookup("far");
    check(mem.add_region({PhysSpan{PhysAddr(0), kRam}, PhysRegion::Kind::host_ram, "ram"}));
    check(mem.add_region({PhysSpan{PhysAddr(kGpuBar), kGpuSize}, PhysRegion::Kind::bar, "gpu BAR1"}));
    check(mem.add_region({PhysSpan{PhysAddr(kNicBar), kNicSize}, PhysRegion::Kind::bar, "nic BAR0"}));
    check(mem.add_region({PhysSpan{PhysAddr(kFarBar), kFarSize}, PhysRegion::Kind::bar, "far BAR0"}));
    check(mem.add_region({PhysSpan{PhysAddr(kFar2Bar), kFar2Size}, PhysRegion::Kind::bar, "far BAR2"}));
    pool = std::move(BouncePool::create(mem, BounceOptions{PhysAddr(kPoolBase), kPoolSize, 2})).value();
    domain = std::move(IoDomain::create(IoDomainOptions{.iova = {}, .strict = strict})).value();
    gpu = *reg.add(ProviderDesc{topo.functions[f_gpu].bdf, f_gpu, 1, PhysSpan{PhysAddr(kGpuBar), kGpuSize}, kGpuBusOffset, true, false, {}});
    nic = *reg.add(ProviderDesc{topo.functions[f_nic].bdf, f_nic, 0, PhysSpan{PhysAddr(kNicBar), kNicSize}, 0, true, true, {}});
    far = *reg.add(ProviderDesc{topo.functions[f_far].bdf, f_far, 0, PhysSpan{PhysAddr(kFarBar), kFarSize}, 0, true, true, {}});
    far2 = *reg.add(ProviderDesc{topo.functions[f_far].bdf, f_far, 2, PhysSpan{PhysAddr(kFar2Bar), kFar2Size}, 0, true, false, {}});
  }

  DmaEnv env() { return DmaEnv{&*engine, &reg, pool.get()}; }

  // DMA-API debug is on for every device a test makes (benchmarks turn it off).
  bool debug = true;

  std::unique_ptr<DmaDevice> device(DmaDeviceConfig c) {
    c.debug = c.debug || debug;
    auto d = DmaDevice::create(env(), c);
    if (!d) abort_with(d.error());
    return std::move(d).value();
  }

  // The physical address the device reaches at `dma` for a segment with `flags`, and how
  // many bytes from there stay contiguous (to the next 4 KiB DMA page). nullopt: an IOMMU
  // fault, or a permission the access lacks.
  // With perm false the IOMMU permission is not checked (to look through write-only maps).
  std::optional<PhysAddr> reach(const DmaDeviceConfig& c, DmaSegFlags flags, uint64_t dma, bool write, uint64_t* run,
                                bool perm = true) const {
    *run = 4096 - (dma & 4095);
    if (flags & kDmaSegBusAddr) {
      // The gpu's BAR has a bus offset; the others' bus addresses equal their CPU addresses.
      if (dma - (kGpuBar + kGpuBusOffset) < kGpuSize) return PhysAddr(dma - kGpuBusOffset);
      if (dma - kNicBar < kNicSize || dma - kFarBar < kFarSize || dma - kFar2Bar < kFar2Size) return PhysAddr(dma);
      return std::nullopt;
    }
    if (flags & kDmaSegIommu) {
      auto t = c.domain->translate(DmaAddr(dma));
      if (!t || (perm && !(t->perm & (write ? kIommuWrite : kIommuRead)))) return std::nullopt;
      return t->phys;
    }
    // A direct MMIO segment (map_phys of P2P through the host bridge, Linux DMA_ATTR_MMIO)
    // is the physical address itself; everything else direct carries the DMA offset.
    if ((flags & kDmaSegMmio) && !(flags & kDmaSegBounced)) return PhysAddr(dma);
    return PhysAddr(dma - c.dma_offset);
  }

  // Calls fn(phys, offset, run) for each physically contiguous piece the device reaches
  // through a DMA list, in order (offset: bytes of the list before it). false on a fault
  // or when fn returns false.
  template <class F>
  bool walk(const DmaDeviceConfig& c, std::span<const DmaSegment> segs, bool write, bool perm, F&& fn) const {
    size_t at = 0;
    for (const DmaSegment& s : segs) {
      for (uint64_t done = 0; done < s.len;) {
        uint64_t run;
        auto p = reach(c, s.flags, s.addr.value() + done, write, &run, perm);
        if (!p) return false;
        run = std::min(run, s.len - done);
        if (!fn(*p, at, run)) return false;
        at += run;
        done += run;
      }
    }
    return true;
  }

  // Reads what the device sees through a DMA list, in order. Empty on a fault.
  std::optional<std::vector<uint8_t>> device_read(const DmaDeviceConfig& c, std::span<const DmaSegment> segs,
                                                  bool perm = true) const {
    std::vector<uint8_t> out;
    const bool ok = walk(c, segs, false, perm, [&](PhysAddr p, size_t at, uint64_t run) {
      out.resize(at + run);
      return mem.read(p, std::span<uint8_t>(out.data() + at, run)).has_value();
    });
    if (!ok) return std::nullopt;
    return out;
  }

  // The device writes `data` through a DMA list. false on a fault.
  bool device_write(const DmaDeviceConfig& c, std::span<const DmaSegment> segs, std::span<const uint8_t> data) {
    return walk(c, segs, true, true,
                [&](PhysAddr p, size_t at, uint64_t run) { return mem.write(p, data.subspan(at, run)).has_value(); });
  }

  // The bytes of a range list as the CPU sees them.
  std::vector<uint8_t> cpu_read(const RangeList& l) const {
    std::vector<uint8_t> out;
    for (const PhysRange r : l) {
      const size_t at = out.size();
      out.resize(at + r.size);
      check(mem.read(r.base, std::span<uint8_t>(out.data() + at, r.size)));
    }
    return out;
  }

  static void check(const Status& s) {
    if (!s) abort_with(s.error());
  }
  [[noreturn]] static void abort_with(const Error& e) {
    std::fprintf(stderr, "dma world: %s\n", e.to_string().c_str());
    std::abort();
  }
};

/// n bytes that differ with the seed and along the buffer (the DMA parity tests' data).
inline std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 13 + (i >> 9));
  return v;
}

/// The domain's free IOVA granules once deferred frees and every rcache are flushed: what a
/// test compares before and after to see that nothing stayed allocated.
inline uint64_t free_iova(IoDomain& d) {
  d.flush();
  d.iova().flush_caches();
  return d.iova().stats().free_granules;
}

}  // namespace physr::testing
