// The default job of `physr` with no arguments: what physr is, then a demonstration.
#include <fmt/core.h>

#include "cli.hpp"
#include "physr/range.hpp"

namespace physr::cli {

void run_tour() {
  fmt::print(
      "physr {} - DMA to memory that has no struct page\n\n"
      "physr describes I/O buffers as lists of physical address ranges tagged with the P2P\n"
      "provider (a device BAR) they live in, and maps them for a device the way the Linux DMA\n"
      "layer would: PCI bus addresses under a shared switch, IOMMU mappings through an allowed\n"
      "host bridge, bounce buffers where P2P is impossible.\n\n",
      PHYSR_VERSION);

  fmt::print("== Range lists: a 4 MiB user buffer with some device memory in it ==\n");
  const PfnList in = make_pfn_pattern(PfnPattern::mixed, 1024, 7);
  const RangeList list = failure_value(RangeList::from_pfns(in.pfns, in.providers));
  size_t p2p = 0;
  for (const PhysRange r : list) p2p += r.provider != kHostMemory;
  const ScatterlistCost sg = scatterlist_cost(list.size(), in.pfns.size());
  fmt::print("  {} pages -> {} ranges ({} on a P2P provider, never merged with host memory)\n", in.pfns.size(),
             list.size(), p2p);
  fmt::print("  physr: {} B   phys_vec: {} B   scatterlist + struct page: {} B ({:.0f}x)\n\n",
             list.encoded_bytes(), sg.phys_vec_bytes, sg.sg_bytes + sg.struct_page_bytes,
             static_cast<double>(sg.sg_bytes + sg.struct_page_bytes) / static_cast<double>(list.encoded_bytes()));
  fmt::print("More: physr ranges --help\n");
}

}  // namespace physr::cli
