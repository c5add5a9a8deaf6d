// A machine for the page pool's tests, benchmarks and fuzzer: the mem world (a NIC and a
// GPU under one switch, a device under a second host bridge), 16 MiB of host pages, the
// GPU's BAR0 as P2P memory, and DMA devices (DMA-API debug on) for the NIC, a non-coherent
// NIC-like client, and the far device.
#pragma once

#include <memory>

#include "physr/mem.hpp"
#include "support/mem_world.hpp"

namespace physr::testing {

struct PagePoolWorld {
  static constexpr uint64_t kRamBase = 0x1'0000'0000, kRamSize = 16 * MiB;
  MemWorld w;
  std::unique_ptr<mem::HostPages> pages;
  std::unique_ptr<mem::P2PMemory> p2p;
  std::unique_ptr<DmaDevice> nic;       // coherent, direct
  std::unique_ptr<DmaDevice> nic_nc;    // the NVMe function as a non-coherent client
  std::unique_ptr<DmaDevice> far;       // under the second host bridge: no P2P with the GPU

  explicit PagePoolWorld(uint64_t ram_size = kRamSize) {
    pages = mem::HostPages::create(PhysSpan{PhysAddr(kRamBase), ram_size}).value();
    mem::P2PMemoryOptions o;
    o.remove_timeout = std::chrono::milliseconds(50);
    o.report = [](const std::string&) {};
    p2p = mem::P2PMemory::create(*w.platform, o).value();
    p2p->add_resource(w.gpu, 0, 0, 0).value();
    nic = DmaDevice::create(w.platform->dma_env(), {.function = w.nic, .debug = true}).value();
    nic_nc = DmaDevice::create(w.platform->dma_env(), {.function = w.nvme, .coherent = false, .debug = true}).value();
    far = DmaDevice::create(w.platform->dma_env(), {.function = w.far, .debug = true}).value();
  }
};

}  // namespace physr::testing
