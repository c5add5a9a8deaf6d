// One module's consumer: built once per installed physr-<module>.pc with
// -DPHYSR_MODULE_<module>, it includes only that module's public header and links only what
// `pkg-config physr-<module>` gives, so a .pc whose Requires or Libs miss a library fails to
// link here. Prints the module's line of every_module.cpp, which install_test.sh checks.
#if defined(PHYSR_MODULE_core)
#include <physr/core.hpp>
#elif defined(PHYSR_MODULE_range)
#include <physr/range.hpp>
#elif defined(PHYSR_MODULE_pci)
#include <physr/pci.hpp>
#elif defined(PHYSR_MODULE_provider)
#include <physr/provider.hpp>
#elif defined(PHYSR_MODULE_iova)
#include <physr/iova.hpp>
#elif defined(PHYSR_MODULE_iommu)
#include <physr/iommu.hpp>
#elif defined(PHYSR_MODULE_physmem)
#include <physr/physmem.hpp>
#elif defined(PHYSR_MODULE_dma)
#include <physr/dma.hpp>
#elif defined(PHYSR_MODULE_platform)
#include <physr/platform.hpp>
#elif defined(PHYSR_MODULE_mem)
#include <physr/mem.hpp>
#elif defined(PHYSR_MODULE_model)
#include <physr/model.hpp>
#elif defined(PHYSR_MODULE_builtin)
#include <physr/builtin.hpp>
#elif defined(PHYSR_MODULE_qemu)
#include <physr/qemu.hpp>
#elif defined(PHYSR_MODULE_sim)
#include <physr/sim.hpp>
#elif defined(PHYSR_MODULE_linux)
#include <physr/linux.hpp>
#else
#error "build with -DPHYSR_MODULE_<module>: no consumer section for this module"
#endif

#include <cstdio>
#include <vector>

using namespace physr;

namespace {

[[maybe_unused]] unsigned long long ull(uint64_t v) { return static_cast<unsigned long long>(v); }

#if !defined(PHYSR_MODULE_builtin)  // builtin stands alone: no physr::Error there
[[maybe_unused]] int fail(const char* what, const Error& e) {
  std::fprintf(stderr, "%s: %s\n", what, e.to_string().c_str());
  return 1;
}
#endif

// The one-function machine of every_module.cpp, for the modules above pci.
[[maybe_unused]] constexpr const char* kMachine =
    "[[host_bridge]]\nbus = 0\n[[function]]\nbdf = \"0000:00:00.0\"\nvendor = 0x8086\ndevice = 0x2020\n"
    "class = 0x060000\ntype = \"rc_integrated_endpoint\"\n";

#if defined(PHYSR_MODULE_platform)
// platform needs a MemoryAccess and does not link physmem: a consumer brings its own.
class NoMemory final : public MemoryAccess {
 public:
  Status write(PhysAddr, std::span<const uint8_t>) override { return Error{EIO, "no memory"}; }
  Status read(PhysAddr, std::span<uint8_t>) const override { return Error{EIO, "no memory"}; }
  Status copy(PhysAddr, PhysAddr, uint64_t) override { return Error{EIO, "no memory"}; }
  bool is_host_ram(PhysSpan) const noexcept override { return false; }
};
#endif

}  // namespace

int main() {
#if defined(PHYSR_MODULE_core)
  auto size = parse_size("16M");
  if (!size) return fail("core", size.error());
  std::printf("core size=%llu\n", ull(*size));
#elif defined(PHYSR_MODULE_range)
  std::vector<uint64_t> pfns{0x100, 0x101, 0x300};
  auto list = RangeList::from_pfns(pfns);
  if (!list) return fail("range", list.error());
  std::printf("range ranges=%zu bytes=%llu\n", list->size(), ull(list->total_bytes()));
#elif defined(PHYSR_MODULE_pci)
  auto topo = pci::parse_machine(kMachine, "consumer.toml");
  if (!topo) return fail("pci", topo.error());
  std::printf("pci functions=%zu first=%s\n", topo->functions.size(), topo->functions[0].bdf.to_string().c_str());
#elif defined(PHYSR_MODULE_provider)
  ProviderRegistry registry;
  auto id = registry.add(ProviderDesc{.owner = pci::Bdf{}, .bar = 1, .phys = {PhysAddr(0x40000000), 2 * MiB}});
  if (!id) return fail("provider", id.error());
  ProviderRegistry::ReadGuard guard;
  const Provider* p = registry.find(PhysAddr(0x40001000));
  std::printf("provider found=%d\n", p != nullptr && p->id() == *id);
#elif defined(PHYSR_MODULE_iova)
  auto iova = IovaAllocator::create();
  if (!iova) return fail("iova", iova.error());
  auto a = (*iova)->alloc(4096, uint64_t{1} << 32);
  if (!a) return fail("iova", a.error());
  std::printf("iova addr=0x%llx\n", ull(a->value()));
#elif defined(PHYSR_MODULE_iommu)
  auto domain = IoDomain::create();
  if (!domain) return fail("iommu", domain.error());
  if (auto s = (*domain)->map(DmaAddr(0x200000), PhysAddr(0x5000000), 2 * MiB, kIommuReadWrite); !s) return fail("iommu", s.error());
  auto t = (*domain)->translate(DmaAddr(0x200123));
  std::printf("iommu phys=0x%llx\n", ull(t ? t->phys.value() : 0));
#elif defined(PHYSR_MODULE_physmem)
  PhysMemory memory;
  if (auto s = memory.add_region({{PhysAddr(0), 64 * MiB}, PhysRegion::Kind::host_ram, "ram"}); !s) return fail("physmem", s.error());
  const std::vector<uint8_t> bytes{1, 2, 3, 4};
  std::vector<uint8_t> back(4);
  if (auto s = memory.write(PhysAddr(0x1234), bytes); !s) return fail("physmem", s.error());
  if (auto s = memory.read(PhysAddr(0x1234), back); !s) return fail("physmem", s.error());
  std::printf("physmem same=%d\n", back == bytes);
#elif defined(PHYSR_MODULE_dma)
  auto topo = pci::parse_machine(kMachine, "consumer.toml");
  if (!topo) return fail("dma", topo.error());
  auto engine = pci::P2PEngine::create(*topo);
  if (!engine) return fail("dma", engine.error());
  auto device = DmaDevice::create(DmaEnv{.p2p = &*engine}, DmaDeviceConfig{.dma_offset = 0x80000000});
  if (!device) return fail("dma", device.error());
  auto seg = (*device)->map_phys(PhysAddr(0x10000), 4096, DmaDirection::to_device);
  if (!seg) return fail("dma", seg.error());
  std::printf("dma addr=0x%llx\n", ull(seg->addr.value()));
  if (auto s = (*device)->unmap_phys(*seg, DmaDirection::to_device); !s) return fail("dma", s.error());
#elif defined(PHYSR_MODULE_platform)
  auto topo = pci::parse_machine(kMachine, "consumer.toml");
  if (!topo) return fail("platform", topo.error());
  NoMemory memory;
  PlatformOptions po;
  po.bounce.size = 0;
  auto platform = Platform::create(*topo, memory, po);
  if (!platform) return fail("platform", platform.error());
  std::printf("platform verdict=%s\n", pci::map_type_name((*platform)->p2p().verdict(0, 0).type));
#elif defined(PHYSR_MODULE_mem)
  auto host = mem::HostMemory::create(PhysSpan{PhysAddr(1ull << 30), 4ull << 20});
  if (!host) return fail("mem", host.error());
  mem::AddressSpace as(**host);
  auto va = as.mmap_anon({.len = 8192});
  if (!va) return fail("mem", va.error());
  auto pinned = as.pin(*va, 8192, mem::Foll::write);
  if (!pinned) return fail("mem", pinned.error());
  std::printf("mem pages=%llu\n", ull(pinned->pages()));
  if (auto st = as.unpin(std::move(pinned).value()); !st) return fail("mem", st.error());
#elif defined(PHYSR_MODULE_model)
  auto topo = pci::parse_machine(kMachine, "consumer.toml");
  if (!topo) return fail("model", topo.error());
  auto model = ModelPlatform::create(*topo);
  if (!model) return fail("model", model.error());
  std::printf("model devices=%d\n", (*model)->device(0).has_value());
#elif defined(PHYSR_MODULE_builtin)
  const auto machine = builtin_machine_text(kDefaultMachine);
  std::printf("builtin default=%d\n", machine.has_value() && !machine->empty());
#elif defined(PHYSR_MODULE_qemu)
  auto topo = pci::parse_machine(kMachine, "consumer.toml");
  if (!topo) return fail("qemu", topo.error());
  auto qemu = qemu::build(*topo);
  if (!qemu) return fail("qemu", qemu.error());
  std::printf("qemu argv0=%s functions=%zu\n", qemu->argv.empty() ? "" : qemu->argv[0].c_str(), qemu->functions.size());
#elif defined(PHYSR_MODULE_sim)
  auto scenario = sim::parse_scenario("[[job]]\ndevice = \"nvme0\"\nsize = \"1M\"\n", "consumer-scenario.toml");
  if (!scenario) return fail("sim", scenario.error());
  std::printf("sim jobs=%zu machine=%s\n", scenario->jobs.size(), scenario->machine.c_str());
#elif defined(PHYSR_MODULE_linux)
  auto bdf = lnx::parse_p2pmem_arg("/sys/bus/pci/devices/0000:03:00.0/p2pmem/allocate");
  if (!bdf) return fail("linux", bdf.error());
  std::printf("linux provider=%s\n", bdf->to_string().c_str());
#endif
  return 0;
}
