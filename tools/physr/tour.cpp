// The default job of `physr` with no arguments: what physr is, the P2P verdicts of the
// built-in default machine, a summary of this machine's PCI tree, and range lists.
#include <fmt/core.h>

#include <map>

#include "cli.hpp"
#include "physr/pci.hpp"
#include "physr/model.hpp"
#include "physr/platform.hpp"
#include "physr/provider.hpp"
#include "physr/range.hpp"

namespace physr::cli {

namespace {

void default_machine_section(const pci::Topology& t, const pci::P2PEngine& e) {
  using namespace physr::pci;
  fmt::print("== P2P on the default machine ({}: {} host bridges, {} functions) ==\n", t.name, t.host_bridges.size(),
             t.functions.size());
  // {provider (owns the memory), client (does the DMA)}
  const char* pairs[][2] = {{"gpu0", "nvme0"}, {"nvme1", "nvme0"}, {"gpu0", "nic0"}, {"gpu0", "nvme2"}};
  for (const auto& pr : pairs) {
    const uint32_t p = failure_value(t.lookup(pr[0])), c = failure_value(t.lookup(pr[1]));
    const Explanation x = e.explain(p, c);
    std::string why;
    if (x.verdict.type == MapType::bus_addr) {
      why = "common upstream device, no ACS redirect";
    } else {
      if (!x.acs_redirecting.empty()) why = "ACS redirect on " + t.functions[x.acs_redirecting.front()].bdf.to_string() + "; ";
      else if (!x.common) why = x.same_host_bridge ? "no common bridge; " : "across host bridges; ";
      why += x.cpu_amd_zen ? "AMD Zen" : x.verdict.type == MapType::thru_host_bridge ? "host bridge allowlisted" : "host bridge not allowlisted";
    }
    fmt::print("  {:<5} memory, {:<5} doing DMA: {:<16} distance {}  ({})\n", pr[0], pr[1], map_type_name(x.verdict.type),
               x.verdict.distance, why);
  }
  fmt::print("  More: physr topo --machine {0}; physr explain nvme0 nic0 --machine {0}\n\n", kDefaultMachine);
}

// The default machine's platform registers its P2P BARs as providers (one rule for the
// model, `physr map` and this tour); a buffer that mixes host pages with GPU memory and an
// NVMe CMB is tagged range by range, and each range gets the path nvme0's DMA would take to
// it: what the DMA layer will do per segment.
void providers_section(const pci::Topology& t, const Platform& pf) {
  using namespace physr::pci;
  const ProviderRegistry& reg = pf.providers();
  const P2PEngine& e = pf.p2p();
  const Function& gpu = t.functions[failure_value(t.lookup("gpu0"))];
  const Function& nvme1 = t.functions[failure_value(t.lookup("nvme1"))];
  const uint32_t client = failure_value(t.lookup("nvme0"));
  const std::vector<PhysSpan> buffer = {
      {PhysAddr(0x1'2340'0000), 256 * KiB},              // host pages
      {gpu.bars[1].span.base + 64 * MiB, 1 * MiB},    // GPU BAR1 memory
      {nvme1.bars[1].span.base, 128 * KiB},              // nvme1's controller memory buffer
      {PhysAddr(0x1'2350'0000), 64 * KiB},              // more host pages
  };
  ProviderRegistry::ReadGuard guard;
  const RangeList list = failure_value(tag_ranges(reg, buffer));
  fmt::print("== Providers: {} BARs registered; a buffer for nvme0 to read into ==\n", reg.size());
  for (const PhysRange r : list) {
    std::string where = "host memory: DMA address from the IOMMU or direct";
    if (r.provider != kHostMemory) {
      const uint32_t f = pf.aperture(r.provider)->function;
      const Verdict v = e.verdict(f, client);
      const char* path = v.type == MapType::bus_addr ? "PCI bus address, skips the IOMMU"
                         : v.type == MapType::thru_host_bridge ? "through the host bridge, mapped like host memory"
                                                               : "unreachable: bounce or EREMOTEIO";
      where = fmt::format("provider {} ({} BAR{}): {}, {}", r.provider, t.functions[f].name, reg.get(r.provider)->bar(),
                          map_type_name(v.type), path);
    }
    fmt::print("  {:#014x} +{:<8} {}\n", r.base.value(), format_size(r.size), where);
  }
  fmt::print("\n");
}

void this_machine_section() {
  using namespace physr::pci;
  fmt::print("== P2P on this machine ==\n");
  auto t = load_sysfs("/");
  if (!t) {
    fmt::print("  No PCI tree readable here ({}).\n\n", t.error().message);
    return;
  }
  auto e = P2PEngine::create(*t);
  if (!e) {
    fmt::print("  {}\n\n", e.error().message);
    return;
  }
  std::vector<uint32_t> devs;
  for (uint32_t i = 0; i < t->functions.size(); ++i)
    if (!is_bridge(t->functions[i])) devs.push_back(i);
  std::map<MapType, size_t> counts;
  for (uint32_t p : devs)
    for (uint32_t c : devs)
      if (p != c) ++counts[e->verdict(p, c).type];
  fmt::print("  {} host bridges, {} functions, {} devices; CPU {}\n", t->host_bridges.size(), t->functions.size(), devs.size(),
             t->cpu.known() ? fmt::format("{} family {:#x}", t->cpu.vendor, t->cpu.family) : "unknown");
  fmt::print("  device pairs: {} bus_addr, {} thru_host_bridge, {} not_supported\n", counts[MapType::bus_addr],
             counts[MapType::thru_host_bridge], counts[MapType::not_supported]);
  fmt::print("  More: physr topo; physr explain A B\n\n");
}

}  // namespace

void run_tour() {
  fmt::print(
      "physr {} - DMA to memory that has no struct page\n\n"
      "physr describes I/O buffers as lists of physical address ranges tagged with the P2P\n"
      "provider (a device BAR) they live in, and decides per device pair how DMA can reach\n"
      "them, exactly as Linux drivers/pci/p2pdma.c does: PCI bus addresses below a shared\n"
      "switch, through an allowed host bridge, or not at all.\n\n",
      PHYSR_VERSION);
  {
    fmt::print("== The flagship scenario on the model machine (physr sim flagship) ==\n");
    const sim::Scenario sc = failure_value(sim::load_scenario(kDefaultScenario));
    const sim::ScenarioReport rep = failure_value(sim::run_scenario(sc));
    print_warnings(rep.warnings);
    std::vector<sim::JobResult> rs;
    for (const auto& j : rep.jobs) rs.push_back(failure_value(j.result));
    for (const auto& r : rs)
      fmt::print("  {:<20} {:>6.2f} GB/s  p99 {:>7.1f} us  {}\n", r.name, r.gbps, r.lat_p99_us, r.path);
    if (rs.size() >= 2 && rs[1].gbps > 0)
      fmt::print("  P2P into the GPU BAR: {:.2f}x the bounce buffer's throughput, no host memory traffic;\n"
                 "  every byte of every job was checked against its source.\n",
                 rs[0].gbps / rs[1].gbps);
    // The O_DIRECT copy: a process's mmap of nvme1's p2pmem allocate file, pinned into bios.
    for (const auto& r : rs)
      if (r.requests)
        fmt::print("  {}: a process mapped nvme1's p2pmem allocate file, and {} O_DIRECT requests\n"
                   "  moved {} from nvme0 through it into nvme1 (pinned with FOLL_PCI_P2PDMA: the queues\n"
                   "  have BLK_FEAT_PCI_P2PDMA; without it, EREMOTEIO). More: physr sim odirect\n",
                   r.name, r.requests, format_size(r.bytes));
    fmt::print("  More: physr sim flagship --svg chart.svg; docs/sim.md\n\n");
  }
  {
    // Devmem TCP (page pools over device memory): the payload lands in GPU memory through a
    // dma-buf bound to the RX queue; without it, host pages and a copy.
    fmt::print("== NIC receive into and transmit from GPU memory: devmem (physr sim devmem) ==\n");
    const sim::Scenario sc = failure_value(sim::load_scenario("devmem"));
    const sim::ScenarioReport rep = failure_value(sim::run_scenario(sc));
    print_warnings(rep.warnings);
    bool devmem_via_rc = false;
    for (const auto& j : rep.jobs) {
      const sim::JobResult r = failure_value(j.result);
      const bool staged = r.took(sim::Via::staged);
      const bool tx = r.path.starts_with("network: TX devmem");
      devmem_via_rc |= !staged && r.took(sim::Via::p2p_host_bridge);
      fmt::print("  {:<16} {:>6.2f} GB/s  {:>8} through host memory  {}\n", r.name, r.gbps, format_size(r.host_memory_bytes),
                 staged ? "host page-pool pages, then the GPU's copy engine"
                 : tx   ? "headers from host memory, payload sent from GPU net_iovs"
                        : "headers to host pages, payload to GPU net_iovs");
    }
    if (devmem_via_rc)
      fmt::print("  Devmem crosses host memory once (RX: the sender's reads; TX: the receiver's writes), the\n"
                 "  copy path three times; here the NIC reaches the GPU only through the host bridge, so its\n"
                 "  DMA to and from GPU memory crosses the root complex.\n");
    fmt::print("  Every payload byte was checked where it landed (GPU memory for RX, the receiver's host\n"
               "  memory for TX); page-pool buffers were recycled.\n"
               "  More: physr sim devmem; docs/page-pool.md, docs/dmabuf.md\n\n");
  }
  {
    // HMM: devices on a process's memory through a mirror (no pinning), while the process
    // remaps it; every byte checked against the process's pages at that moment.
    fmt::print("== A GPU and an RDMA NIC on a process's memory through a mirror (physr sim hmm) ==\n");
    const sim::Scenario sc = failure_value(sim::load_scenario("hmm"));
    const sim::ScenarioReport rep = failure_value(sim::run_scenario(sc));
    print_warnings(rep.warnings);
    for (const auto& j : rep.jobs) {
      const sim::JobResult r = failure_value(j.result);
      fmt::print("  {:<9} {:>6.2f} GB/s  faults {}, invalidations {}, retries {}, changes by the process {}  {}\n", r.name, r.gbps, r.hmm_faults,
                 r.hmm_invalidations, r.hmm_retries, r.hmm_events,
                 r.took(sim::Via::p2p_bus_addr) ? "P2P by bus address" : "P2P through the host bridge");
    }
    fmt::print("  The buffer mixes anonymous memory and another device's P2P memory; the process remaps\n"
               "  parts of it as the job runs, the notifier invalidates, the device faults again: no byte\n"
               "  it read or wrote came from a stale translation. More: physr sim hmm; docs/hmm.md\n\n");
  }
  const pci::Topology machine = failure_value(pci::load_builtin_machine(kDefaultMachine));
  const auto model = failure_value(ModelPlatform::create(machine));
  default_machine_section(machine, model->platform().p2p());
  providers_section(machine, model->platform());
  this_machine_section();

  fmt::print("== Range lists: a 4 MiB user buffer with some device memory in it ==\n");
  const PfnList in = make_pfn_pattern(PfnPattern::mixed, 1024, 7);
  const RangeList list = failure_value(RangeList::from_pfns(in.pfns, in.providers));
  size_t p2p = 0;
  for (const PhysRange r : list) p2p += r.provider != kHostMemory;
  const ScatterlistCost sg = scatterlist_cost(list.size(), in.pfns.size());
  fmt::print("  {} pages -> {} ranges ({} on a P2P provider, never merged with host memory)\n", in.pfns.size(),
             list.size(), p2p);
  fmt::print("  physr: {} B   phys_vec: {} B   scatterlist + struct page: {} B ({:.0f}x)\n", list.encoded_bytes(),
             sg.phys_vec_bytes, sg.sg_bytes + sg.struct_page_bytes,
             static_cast<double>(sg.sg_bytes + sg.struct_page_bytes) / static_cast<double>(list.encoded_bytes()));
  fmt::print("  More: physr ranges --help\n");
}

}  // namespace physr::cli
