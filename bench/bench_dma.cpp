// DMA-layer benchmarks. So far: the IOVA allocator and the IOMMU domain's page table.
//   IovaAllocFree/cached    one-granule alloc + free served by this thread's magazine
//   IovaAllocFree/uncached  64-granule alloc + free (above the cached sizes): the buddy free
//                           sets, with 10,000 other allocations live so the sets are not trivial
//   IovaAllocFree/uncached_fragmented  the same with 100,000 live single granules scattered
//                           over the space (the case where Linux's rbtree walk degrades)
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include <cstring>

#include "physr/dma.hpp"
#include "physr/iommu.hpp"

namespace {

using namespace physr;

constexpr uint64_t kLimit = uint64_t{1} << 48;

void BM_IovaCached(benchmark::State& state) {
  auto a = std::move(IovaAllocator::create()).value();
  for (auto _ : state) {
    auto r = a->alloc(4096, kLimit);
    benchmark::DoNotOptimize(r);
    (void)a->free(*r, 4096);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void BM_IovaUncached(benchmark::State& state, size_t live, bool scatter) {
  auto a = std::move(IovaAllocator::create(IovaOptions{.caching = false})).value();
  std::mt19937_64 rng(1);
  std::vector<DmaAddr> keep;
  for (size_t i = 0; i < live; ++i) keep.push_back(*a->alloc(scatter ? 4096 : (1 + rng() % 64) * 4096, kLimit));
  if (scatter)  // free every other one: a comb of single-granule holes
    for (size_t i = 0; i < keep.size(); i += 2) (void)a->free(keep[i], 4096);
  for (auto _ : state) {
    auto r = a->alloc(64 * 4096, kLimit);
    benchmark::DoNotOptimize(r);
    (void)a->free(*r, 64 * 4096);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// One IOVA range for N scattered 4 KiB segments, each mapped, then the range unmapped and
// its IOVA freed: the page-table part of an IOMMU map_sg + unmap_sg. Items = segments.
void BM_DomainMapUnmap(benchmark::State& state, bool strict) {
  auto d = std::move(IoDomain::create(IoDomainOptions{.iova = {}, .strict = strict})).value();
  const auto n = static_cast<uint64_t>(state.range(0));
  std::vector<uint64_t> phys(n);
  std::mt19937_64 rng(2);
  for (auto& p : phys) p = (rng() % (uint64_t{1} << 30)) << 12;
  for (auto _ : state) {
    const DmaAddr iova = *d->iova().alloc(n * 4096, kLimit);
    for (uint64_t i = 0; i < n; ++i) (void)d->map(iova + i * 4096, PhysAddr(phys[i]), 4096, kIommuReadWrite);
    (void)d->unmap(iova, n * 4096);
    (void)d->free_iova(iova, n * 4096);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
}

// Bounce to the device: map (copying the buffer into the pool) and unmap, against a plain
// memcpy of the same size between two warm host buffers, in the same run.
void BM_Bounce(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  PhysMemory mem;
  (void)mem.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"});
  auto pool = std::move(BouncePool::create(mem, BounceOptions{PhysAddr(256 * MiB), 4 * MiB, 1})).value();
  std::vector<uint8_t> data(n, 0x5a);
  (void)mem.write(PhysAddr(1 * MiB), data);
  for (auto _ : state) {
    auto b = pool->map(PhysAddr(1 * MiB), n, DmaDirection::to_device);
    benchmark::DoNotOptimize(b);
    (void)pool->unmap(*b, n, DmaDirection::to_device);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_Memcpy(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> a(n, 1), b(n, 2);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

BENCHMARK(BM_IovaCached)->Name("IovaAllocFree/cached");
BENCHMARK(BM_Bounce)->Name("Bounce")->Arg(4096)->Arg(65536)->Arg(262144);
BENCHMARK(BM_Memcpy)->Name("Memcpy")->Arg(4096)->Arg(65536)->Arg(262144);
BENCHMARK_CAPTURE(BM_DomainMapUnmap, strict, true)->Name("DomainMapUnmap/strict")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_DomainMapUnmap, deferred, false)->Name("DomainMapUnmap/deferred")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_IovaUncached, uncached, 10000, false)->Name("IovaAllocFree/uncached");
BENCHMARK_CAPTURE(BM_IovaUncached, fragmented, 200000, true)->Name("IovaAllocFree/uncached_fragmented");

}  // namespace

BENCHMARK_MAIN();
