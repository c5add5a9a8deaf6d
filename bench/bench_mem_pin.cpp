// Pinning user memory (physr::mem::AddressSpace::pin / unpin), items = pages pinned.
//   PinUserRange/contiguous_2m  a 1 GiB anonymous VMA of 2 MiB folios, contiguous in RAM
//   PinUserRange/scattered_4k   a 64 MiB anonymous VMA of 4 KiB pages in shuffled order
//   PinUserRange/p2p            a 64 MiB P2P VMA (FOLL_PCI_P2PDMA)
// Each iteration pins the whole VMA and unpins it (pin_user_pages + unpin_user_pages).
#include <benchmark/benchmark.h>

#include "physr/mem/uspace.hpp"
#include "support/p2p_chunk_source.hpp"

namespace {
using namespace physr;
using namespace physr::mem;

void pin_loop(benchmark::State& state, AddressSpace& as, uint64_t addr, uint64_t len, FollFlags flags) {
  uint64_t pages = 0;
  for (auto _ : state) {
    auto p = as.pin(addr, len, flags);
    if (!p) {
      state.SkipWithError(p.error().message.c_str());
      return;
    }
    benchmark::DoNotOptimize(p->ranges().size());
    pages += p->pages();
    if (!as.unpin(std::move(p).value())) state.SkipWithError("unpin failed");
  }
  state.SetItemsProcessed(static_cast<int64_t>(pages));
}

void BM_PinUserRange_contiguous_2m(benchmark::State& state) {
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(4 * GiB), 2 * GiB})).value();
  AddressSpace as(*mem);
  const uint64_t a = *as.mmap_anon({.len = 1 * GiB, .order = kOrder2M});
  pin_loop(state, as, a, 1 * GiB, Foll::write);
}
BENCHMARK(BM_PinUserRange_contiguous_2m)->Name("PinUserRange/contiguous_2m");

void BM_PinUserRange_scattered_4k(benchmark::State& state) {
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(4 * GiB), 2 * GiB})).value();
  AddressSpace as(*mem);
  // Fault in some memory first, so the VMA's pages come from several 2 MiB blocks.
  const uint64_t a = *as.mmap_anon({.len = 64 * MiB});
  pin_loop(state, as, a, 64 * MiB, Foll::write);
}
BENCHMARK(BM_PinUserRange_scattered_4k)->Name("PinUserRange/scattered_4k");

void BM_PinUserRange_p2p(benchmark::State& state) {
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(4 * GiB), 64 * MiB})).value();
  physr::testing::TestChunkSource gpu(PhysSpan{PhysAddr(0x2000000000), 256 * MiB}, 7);
  AddressSpace as(*mem);
  const uint64_t a = *as.mmap_p2p(gpu, {.len = 64 * MiB, .shared = true});
  pin_loop(state, as, a, 64 * MiB, Foll::pci_p2pdma);
}
BENCHMARK(BM_PinUserRange_p2p)->Name("PinUserRange/p2p");

}  // namespace

BENCHMARK_MAIN();
