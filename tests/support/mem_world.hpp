// A small machine for the mem module's tests, benchmarks and fuzzer: a switch with a GPU
// (2 GiB BAR0, 1 GiB aligned), an NVMe drive (16 MiB BAR2, plus an I/O BAR4) and a NIC
// (16 MiB BAR0), and a device under a second host bridge; a platform over memory with no
// bytes (pools never touch the memory they hand out).
#pragma once

#include <memory>
#include <span>

#include "physr/mem.hpp"
#include "physr/pci.hpp"
#include "physr/platform.hpp"

namespace physr::testing {

inline constexpr const char* kMemWorldMachine = R"(
name = "mem-world"
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
[[function]]
bdf = "0000:02:01.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
[[function]]
bdf = "0000:02:02.0"
vendor = 0x10b5
device = 0x8747
class = 0x060400
type = "switch_downstream"
parent = "sw"
[[function]]
bdf = "0000:03:00.0"
name = "gpu"
vendor = 0x10de
device = 0x20b5
class = 0x030200
type = "endpoint"
parent = "0000:02:00.0"
  [[function.bar]]
  index = 0
  start = 0x40_0000_0000
  size = "2G"
[[function]]
bdf = "0000:04:00.0"
name = "nvme"
vendor = 0x144d
device = 0xa80a
class = 0x010802
type = "endpoint"
parent = "0000:02:01.0"
  [[function.bar]]
  index = 2
  start = 0x41_0000_0000
  size = "16M"
[[function]]
bdf = "0000:05:00.0"
name = "nic"
vendor = 0x15b3
device = 0x101d
class = 0x020000
type = "endpoint"
parent = "0000:02:02.0"
  [[function.bar]]
  index = 0
  start = 0x42_0000_0000
  size = "16M"
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
[[function]]
bdf = "0000:81:00.0"
name = "far"
vendor = 0x1af4
device = 0x1041
class = 0x120000
type = "endpoint"
parent = "0000:80:01.0"
  [[function.bar]]
  index = 0
  start = 0x43_0000_0000
  size = "16M"
)";

// Memory with no bytes: the pools only hand out addresses.
class NoMemory final : public MemoryAccess {
 public:
  Status write(PhysAddr, std::span<const uint8_t>) override { return make_error(EIO, "no memory"); }
  Status read(PhysAddr, std::span<uint8_t>) const override { return make_error(EIO, "no memory"); }
  Status copy(PhysAddr, PhysAddr, uint64_t) override { return make_error(EIO, "no memory"); }
  bool is_host_ram(PhysSpan) const noexcept override { return false; }
};

struct MemWorld {
  static constexpr uint64_t kGpuBar = 0x40'0000'0000, kGpuSize = 2 * GiB;
  static constexpr uint64_t kNvmeBar = 0x41'0000'0000, kNvmeSize = 16 * MiB;
  static constexpr uint64_t kNicBar = 0x42'0000'0000;
  pci::Topology topo;
  NoMemory memory;
  std::unique_ptr<Platform> platform;
  uint32_t gpu = 0, nvme = 0, nic = 0, far = 0;

  /// gpu_bar_size: BAR0 of the GPU resized (benchmarks use 64 GiB; it then overlaps the
  /// other BARs, so only the GPU's may be registered).
  explicit MemWorld(uint64_t gpu_bar_size = kGpuSize) {
    topo = pci::parse_machine(kMemWorldMachine, "mem-world").value();
    for (uint32_t i = 0; i < topo.functions.size(); ++i) {
      const std::string& n = topo.functions[i].name;
      if (n == "gpu") gpu = i;
      if (n == "nvme") nvme = i;
      if (n == "nic") nic = i;
      if (n == "far") far = i;
    }
    topo.functions[gpu].bars[0].span.size = gpu_bar_size;
    // An I/O BAR (IORESOURCE_IO), which machine files cannot declare.
    topo.functions[nvme].bars.push_back(pci::Bar{4, PhysSpan{PhysAddr(0x1000), 0x100}, pci::IoResource::io});
    PlatformOptions po;
    po.bounce.size = 0;  // no bounce pool: the memory has no host RAM
    platform = Platform::create(topo, memory, po).value();
  }
};

}  // namespace physr::testing
