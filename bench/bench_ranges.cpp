// Range-list benchmarks: building from pfns, iterating and indexing, each against peers
// measured in the same run on the same input: a std::vector of Linux-style phys_vec
// (16 B per range) and a scatterlist built the way sg_alloc_table_from_pages() does it
// (count pass, chained 128-entry chunks of 32 B entries, fill pass).
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <vector>

#include "physr/range.hpp"

namespace {

using namespace physr;

constexpr uint64_t kSeed = 42;

const PfnList& input(PfnPattern p, size_t n) {
  static std::map<std::pair<int, size_t>, std::unique_ptr<PfnList>> cache;
  auto& slot = cache[{static_cast<int>(p), n}];
  if (!slot) slot = std::make_unique<PfnList>(make_pfn_pattern(p, n, kSeed));
  return *slot;
}

std::span<const ProviderId> providers_of(PfnPattern p, const PfnList& in) {
  // Patterns without P2P pages are built the way a host-only caller would: no provider array.
  if (p == PfnPattern::contiguous || p == PfnPattern::random) return {};
  return in.providers;
}

void BM_BuildFromPfns(benchmark::State& state, PfnPattern p) {
  const size_t n = static_cast<size_t>(state.range(0));
  const PfnList& in = input(p, n);
  const auto prov = providers_of(p, in);
  size_t ranges = 0, bytes = 0;
  for (auto _ : state) {
    auto l = RangeList::from_pfns(in.pfns, prov);
    benchmark::DoNotOptimize(l);
    ranges = l->size();
    bytes = l->encoded_bytes();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.counters["ranges"] = static_cast<double>(ranges);
  state.counters["bytes_per_range"] = static_cast<double>(bytes) / static_cast<double>(ranges);
  const ScatterlistCost sg = scatterlist_cost(ranges, n);
  state.counters["sg_page_bytes_per_range"] =
      static_cast<double>(sg.sg_bytes + sg.struct_page_bytes) / static_cast<double>(ranges);
}

// Peer: std::vector<phys_vec>, merging contiguous same-provider pages.
struct PhysVec {
  uint64_t paddr;
  uint64_t len;
};
void BM_BuildPhysVec(benchmark::State& state, PfnPattern p) {
  const size_t n = static_cast<size_t>(state.range(0));
  const PfnList& in = input(p, n);
  const bool has_prov = !providers_of(p, in).empty();
  size_t ranges = 0;
  for (auto _ : state) {
    std::vector<PhysVec> v;
    v.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t a = in.pfns[i] << 12;
      if (!v.empty() && v.back().paddr + v.back().len == a && (!has_prov || in.providers[i] == in.providers[i - 1])) {
        v.back().len += 4096;
      } else {
        v.push_back({a, 4096});
      }
    }
    benchmark::DoNotOptimize(v.data());
    ranges = v.size();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.counters["ranges"] = static_cast<double>(ranges);
  state.counters["bytes_per_range"] = 16;
}

// Peer: a scatterlist as lib/scatterlist.c builds it from a page array.
struct Scatterlist {
  uint64_t page_link;
  uint32_t offset, length;
  uint64_t dma_address;
  uint32_t dma_length, dma_flags;
};
static_assert(sizeof(Scatterlist) == 32);
void BM_BuildScatterlist(benchmark::State& state, PfnPattern p) {
  const size_t n = static_cast<size_t>(state.range(0));
  const PfnList& in = input(p, n);
  const bool has_prov = !providers_of(p, in).empty();
  auto joins = [&](size_t i) {
    return in.pfns[i] == in.pfns[i - 1] + 1 && (!has_prov || in.providers[i] == in.providers[i - 1]);
  };
  size_t ranges = 0;
  for (auto _ : state) {
    size_t chunks = 0;  // pass 1: count merged segments, as sg_alloc_append_table_from_pages()
    for (size_t i = 0; i < n; ++i) chunks += i == 0 || !joins(i);
    std::vector<std::unique_ptr<Scatterlist[]>> tables;
    size_t left = chunks;
    while (left) {  // __sg_alloc_table(): 128-entry chunks, the last entry of each chains
      const size_t take = left > 128 ? 128 : left;
      tables.emplace_back(new Scatterlist[take]);
      left -= take > 127 && left > 128 ? 127 : take;
    }
    size_t t = 0, e = 0;
    Scatterlist* sg = nullptr;
    for (size_t i = 0; i < n; ++i) {  // pass 2: fill
      if (i != 0 && joins(i)) {
        sg->length += 4096;
        continue;
      }
      if (sg && e == 127 && chunks > 128) {
        tables[t][127].page_link = reinterpret_cast<uint64_t>(tables[t + 1].get()) | 1;
        ++t;
        e = 0;
      }
      sg = &tables[t][e++];
      *sg = Scatterlist{(in.pfns[i] << 6) | 0, 0, 4096, 0, 0, 0};
    }
    benchmark::DoNotOptimize(tables.data());
    ranges = chunks;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.counters["ranges"] = static_cast<double>(ranges);
}

void BM_Iterate(benchmark::State& state, PfnPattern p) {
  const size_t n = static_cast<size_t>(state.range(0));
  const PfnList& in = input(p, n);
  const RangeList l = *RangeList::from_pfns(in.pfns, providers_of(p, in));
  for (auto _ : state) {
    uint64_t sum = 0;
    for (const PhysRange r : l) sum += r.size + r.provider;
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * l.size()));
}

void BM_RandomAccess(benchmark::State& state) {
  // A mixed list (compact and extended entries) so operator[] goes through the rank index.
  std::vector<PhysRange> pieces;
  uint64_t a = 1 << 30;
  for (size_t i = 0; i < 65536; ++i) {
    const uint64_t len = i % 3 == 0 ? 100 + i % 1000 : 4096 * (1 + i % 8);
    pieces.push_back({PhysAddr(a), len, 0});
    a += len + 8192;
  }
  const RangeList l = *RangeList::from_ranges(pieces);
  uint64_t x = 12345;
  for (auto _ : state) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    benchmark::DoNotOptimize(l[(x >> 20) & 65535]);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

constexpr int64_t kMillion = 1 << 20;

#define PATTERN_BENCH(fn, label, pattern)                                                          \
  BENCHMARK_CAPTURE(fn, pattern, PfnPattern::pattern)->Name(label "/" #pattern)->Arg(4096)->Arg(kMillion) \
      ->Unit(benchmark::kMicrosecond)

PATTERN_BENCH(BM_BuildFromPfns, "BuildFromPfns", contiguous);
PATTERN_BENCH(BM_BuildFromPfns, "BuildFromPfns", random);
PATTERN_BENCH(BM_BuildFromPfns, "BuildFromPfns", alternating);
PATTERN_BENCH(BM_BuildFromPfns, "BuildFromPfns", mixed);
PATTERN_BENCH(BM_BuildPhysVec, "BuildPhysVec", contiguous);
PATTERN_BENCH(BM_BuildPhysVec, "BuildPhysVec", random);
PATTERN_BENCH(BM_BuildPhysVec, "BuildPhysVec", alternating);
PATTERN_BENCH(BM_BuildPhysVec, "BuildPhysVec", mixed);
PATTERN_BENCH(BM_BuildScatterlist, "BuildScatterlist", contiguous);
PATTERN_BENCH(BM_BuildScatterlist, "BuildScatterlist", random);
PATTERN_BENCH(BM_BuildScatterlist, "BuildScatterlist", alternating);
PATTERN_BENCH(BM_BuildScatterlist, "BuildScatterlist", mixed);
PATTERN_BENCH(BM_Iterate, "Iterate", random);
PATTERN_BENCH(BM_Iterate, "Iterate", mixed);
BENCHMARK(BM_RandomAccess)->Name("RandomAccess/mixed/65536");

}  // namespace

BENCHMARK_MAIN();
