// DMA-layer benchmarks.
//   MapUnmap/<path>/<n>     DmaDevice::map_into + unmap of a list of n scattered 4 KiB ranges,
//                           items = segments (ranges): direct (host memory, no IOMMU), iommu
//                           (host memory, strict IOMMU domain), iommu_deferred (the same with
//                           a flush queue), bus_addr (a peer's BAR under the shared switch),
//                           thru_host_bridge (a peer behind an ACS-redirecting port: IOMMU +
//                           MMIO), bounce (P2P the device cannot reach, bounced), mixed (host,
//                           bus_addr and thru_host_bridge ranges in turn)
//   TwoStep/<n>             the same n ranges through iova_try_alloc + n iova_link + iova_sync
//                           + iova_destroy (Linux's two-step API), to set against MapUnmap/iommu
//   IovaAllocFree/cached    one-granule alloc + free served by this thread's magazine
//   IovaAllocFree/uncached  64-granule alloc + free (above the cached sizes): Linux's tree
//                           walk, with 10,000 other allocations live so the tree is not trivial
//   IovaAllocFree/uncached_fragmented  the same with 100,000 live single granules scattered
//                           over the space (the case where Linux's rbtree walk degrades)
#include <benchmark/benchmark.h>

#include "bench_memcpy.hpp"

#include <random>
#include <vector>

#include <cstring>

#include "physr/dma.hpp"
#include "physr/physmem.hpp"
#include "physr/iommu.hpp"
#include "support/dma_world.hpp"

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

enum class Path { direct, iommu, iommu_deferred, bus_addr, thru_host_bridge, bounce, mixed };

// n scattered 4 KiB ranges for `path` (never physically adjacent, so nothing merges).
RangeList bench_list(const testing::DmaWorld& w, Path path, uint64_t n) {
  RangeList l;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t page = (i * 7919) % 2048 * 2 * 4096;  // every other page, shuffled
    PhysRange r{PhysAddr(1 * GiB + page), 4096, kHostMemory};
    const unsigned kind = path == Path::mixed ? static_cast<unsigned>(i % 3) : 0;
    if (path == Path::bus_addr || kind == 1) r = PhysRange{PhysAddr(testing::DmaWorld::kGpuBar + page), 4096, w.gpu};
    if (path == Path::thru_host_bridge || kind == 2) r = PhysRange{PhysAddr(testing::DmaWorld::kNicBar + page), 4096, w.nic};
    if (path == Path::bounce) r = PhysRange{PhysAddr(testing::DmaWorld::kFarBar + page), 4096, w.far};
    (void)l.append(r, SegmentLimits{.merge = false});
  }
  return l;
}

void BM_MapUnmap(benchmark::State& state, Path path) {
  testing::DmaWorld w(/*strict=*/path != Path::iommu_deferred);
  w.debug = false;  // measure the mapping, not the shadow tracking
  const auto n = static_cast<uint64_t>(state.range(0));
  DmaDeviceConfig c{.function = w.f_nvme, .domain = w.domain.get()};
  if (path == Path::direct || path == Path::bounce) c.domain = nullptr;
  auto dev = w.device(c);
  const RangeList l = bench_list(w, path, n);
  const DmaAttrs attrs = path == Path::bounce ? kDmaAttrAllowBounce : kDmaAttrNone;
  DmaMapping m;
  for (auto _ : state) {
    if (auto r = dev->map_into(m, l, DmaDirection::to_device, attrs); !r) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(m.segments().data());
    (void)dev->unmap(m);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
}

void BM_TwoStep(benchmark::State& state) {
  testing::DmaWorld w;
  w.debug = false;
  const auto n = static_cast<uint64_t>(state.range(0));
  auto dev = w.device({.function = w.f_nvme, .domain = w.domain.get()});
  const RangeList l = bench_list(w, Path::iommu, n);
  std::vector<PhysAddr> pages;
  for (const PhysRange r : l) pages.push_back(r.base);
  DmaIovaState st;
  for (auto _ : state) {
    if (auto r = dev->iova_try_alloc(st, pages[0], n * 4096); !r || !*r) {
      state.SkipWithError("iova_try_alloc failed");
      break;
    }
    for (uint64_t i = 0; i < n; ++i) (void)dev->iova_link(st, pages[i], i * 4096, 4096, DmaDirection::to_device);
    (void)dev->iova_sync(st, 0, n * 4096);
    (void)dev->iova_destroy(st, n * 4096, DmaDirection::to_device);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
}

BENCHMARK_CAPTURE(BM_MapUnmap, direct, Path::direct)->Name("MapUnmap/direct")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, iommu, Path::iommu)->Name("MapUnmap/iommu")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, iommu_deferred, Path::iommu_deferred)->Name("MapUnmap/iommu_deferred")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, bus_addr, Path::bus_addr)->Name("MapUnmap/bus_addr")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, thru_host_bridge, Path::thru_host_bridge)->Name("MapUnmap/thru_host_bridge")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, bounce, Path::bounce)->Name("MapUnmap/bounce")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_MapUnmap, mixed, Path::mixed)->Name("MapUnmap/mixed")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK(BM_TwoStep)->Name("TwoStep")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK(BM_IovaCached)->Name("IovaAllocFree/cached");
BENCHMARK(BM_Bounce)->Name("Bounce")->Arg(4096)->Arg(65536)->Arg(262144);
BENCHMARK(BM_Memcpy)->Name("Memcpy")->Arg(4096)->Arg(65536)->Arg(262144);
BENCHMARK_CAPTURE(BM_DomainMapUnmap, strict, true)->Name("DomainMapUnmap/strict")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_DomainMapUnmap, deferred, false)->Name("DomainMapUnmap/deferred")->Arg(1)->Arg(16)->Arg(256);
BENCHMARK_CAPTURE(BM_IovaUncached, uncached, 10000, false)->Name("IovaAllocFree/uncached");
BENCHMARK_CAPTURE(BM_IovaUncached, fragmented, 200000, true)->Name("IovaAllocFree/uncached_fragmented");

}  // namespace

BENCHMARK_MAIN();
