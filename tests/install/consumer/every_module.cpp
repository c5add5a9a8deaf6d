// Includes every public header of physr and calls one function of each module; prints one
// line per module, which install_test.sh checks.
#include <physr/builtin.hpp>
#include <physr/core.hpp>
#include <physr/dma.hpp>
#include <physr/iommu.hpp>
#include <physr/iova.hpp>
#include <physr/linux.hpp>
#include <physr/mem.hpp>
#include <physr/model.hpp>
#include <physr/pci.hpp>
#include <physr/physmem.hpp>
#include <physr/platform.hpp>
#include <physr/provider.hpp>
#include <physr/qemu.hpp>
#include <physr/range.hpp>
#include <physr/sim.hpp>

#include <cstdio>
#include <vector>

using namespace physr;

namespace {

unsigned long long ull(uint64_t v) { return static_cast<unsigned long long>(v); }

int fail(const char* what, const Error& e) {
  std::fprintf(stderr, "%s: %s\n", what, e.to_string().c_str());
  return 1;
}

}  // namespace

int main() {
  auto size = parse_size("16M");  // core
  if (!size) return fail("core", size.error());
  std::printf("core size=%llu\n", ull(*size));

  std::vector<uint64_t> pfns{0x100, 0x101, 0x300};  // range
  auto list = RangeList::from_pfns(pfns);
  if (!list) return fail("range", list.error());
  std::printf("range ranges=%zu bytes=%llu\n", list->size(), ull(list->total_bytes()));

  auto topo = pci::parse_machine(  // pci (toml++)
      "[[host_bridge]]\nbus = 0\n[[function]]\nbdf = \"0000:00:00.0\"\nvendor = 0x8086\ndevice = 0x2020\n"
      "class = 0x060000\ntype = \"rc_integrated_endpoint\"\n",
      "consumer.toml");
  if (!topo) return fail("pci", topo.error());
  std::printf("pci functions=%zu first=%s\n", topo->functions.size(), topo->functions[0].bdf.to_string().c_str());

  ProviderRegistry registry;  // provider (liburcu)
  auto id = registry.add(ProviderDesc{.owner = topo->functions[0].bdf, .bar = 1, .phys = {PhysAddr(0x40000000), 2 * MiB}});
  if (!id) return fail("provider", id.error());
  {
    ProviderRegistry::ReadGuard guard;
    const Provider* p = registry.find(PhysAddr(0x40001000));
    std::printf("provider found=%d\n", p != nullptr && p->id() == *id);
  }

  auto iova = IovaAllocator::create();  // iova
  if (!iova) return fail("iova", iova.error());
  auto a = (*iova)->alloc(4096, uint64_t{1} << 32);
  if (!a) return fail("iova", a.error());
  std::printf("iova addr=0x%llx\n", ull(a->value()));

  auto domain = IoDomain::create();  // iommu
  if (!domain) return fail("iommu", domain.error());
  if (auto s = (*domain)->map(DmaAddr(0x200000), PhysAddr(0x5000000), 2 * MiB, kIommuReadWrite); !s) return fail("iommu", s.error());
  auto t = (*domain)->translate(DmaAddr(0x200123));
  std::printf("iommu phys=0x%llx\n", ull(t ? t->phys.value() : 0));

  PhysMemory memory;  // physmem (absl flat_hash_map)
  if (auto s = memory.add_region({{PhysAddr(0), 64 * MiB}, PhysRegion::Kind::host_ram, "ram"}); !s) return fail("physmem", s.error());
  const std::vector<uint8_t> bytes{1, 2, 3, 4};
  std::vector<uint8_t> back(4);
  if (auto s = memory.write(PhysAddr(0x1234), bytes); !s) return fail("physmem", s.error());
  if (auto s = memory.read(PhysAddr(0x1234), back); !s) return fail("physmem", s.error());
  std::printf("physmem same=%d\n", back == bytes);

  auto engine = pci::P2PEngine::create(*topo);  // dma: a device is a function of a topology
  if (!engine) return fail("dma", engine.error());
  auto device = DmaDevice::create(DmaEnv{.p2p = &*engine}, DmaDeviceConfig{.dma_offset = 0x80000000});
  if (!device) return fail("dma", device.error());
  auto seg = (*device)->map_phys(PhysAddr(0x10000), 4096, DmaDirection::to_device);
  if (!seg) return fail("dma", seg.error());
  std::printf("dma addr=0x%llx\n", ull(seg->addr.value()));
  if (auto s = (*device)->unmap_phys(*seg, DmaDirection::to_device); !s) return fail("dma", s.error());

  PlatformOptions po;  // platform
  po.bounce.size = 0;
  auto platform = Platform::create(*topo, memory, po);
  if (!platform) return fail("platform", platform.error());
  std::printf("platform verdict=%s\n", pci::map_type_name((*platform)->p2p().verdict(0, 0).type));

  auto host = mem::HostMemory::create(PhysSpan{PhysAddr(1ull << 30), 4ull << 20});  // mem
  if (!host) return fail("mem", host.error());
  {
    mem::AddressSpace as(**host);
    auto va = as.mmap_anon({.len = 8192});
    if (!va) return fail("mem", va.error());
    auto pinned = as.pin(*va, 8192, mem::Foll::write);
    if (!pinned) return fail("mem", pinned.error());
    std::printf("mem pages=%llu\n", ull(pinned->pages()));
    if (auto st = as.unpin(std::move(pinned).value()); !st) return fail("mem", st.error());
  }
  {
    auto p2pmem = mem::P2PMemory::create(**platform);  // mem (liburcu)
    if (!p2pmem) return fail("mem", p2pmem.error());
    auto none = (*p2pmem)->alloc(0, 4096);  // the host bridge has no P2P memory
    std::printf("mem align=%llu nodev=%d\n", ull(mem::P2PMemory::max_pagemap_align(PhysAddr(0x40000000), GiB, 0)),
                !none && none.error().code == ENODEV);
  }

  auto model = ModelPlatform::create(*topo);  // model
  if (!model) return fail("model", model.error());
  std::printf("model devices=%d\n", (*model)->device(0).has_value());

  const auto machine = builtin_machine_text(kDefaultMachine);  // builtin
  std::printf("builtin default=%d\n", machine.has_value() && !machine->empty());

  auto qemu = qemu::build(*topo);  // qemu
  if (!qemu) return fail("qemu", qemu.error());
  std::printf("qemu argv0=%s functions=%zu\n", qemu->argv.empty() ? "" : qemu->argv[0].c_str(), qemu->functions.size());

  auto scenario = sim::parse_scenario("[[job]]\ndevice = \"nvme0\"\nsize = \"1M\"\n", "consumer-scenario.toml");  // sim
  if (!scenario) return fail("sim", scenario.error());
  std::printf("sim jobs=%zu machine=%s\n", scenario->jobs.size(), scenario->machine.c_str());

  auto bdf = lnx::parse_p2pmem_arg("/sys/bus/pci/devices/0000:03:00.0/p2pmem/allocate");  // linux
  if (!bdf) return fail("linux", bdf.error());
  std::printf("linux provider=%s\n", bdf->to_string().c_str());
  return 0;
}
