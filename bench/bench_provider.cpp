// Provider lookup benchmarks: physr's radix table against interval structures measured in
// the same run on the same layout and the same addresses: llvm::IntervalMap, boost ICL
// interval_map, absl::btree_map and std::map (upper_bound, then step back).
//
// Layouts: "packed" = N tightly packed 4 KiB apertures; "mixed" = N apertures of 4 KiB ..
// 64 GiB, naturally aligned, clustered with gaps, sparse over the 52-bit space; "random" =
// N apertures of 4 KiB .. 2 MiB at uniformly random places in the 52-bit space; "vfio" =
// runs of 4 KiB apertures packed right after a few 16 .. 64 GiB BARs (one per ~2000), as
// VFIO assigns per-queue doorbell pages next to a GPU's memory BAR.
// Address streams: uniform over all providers (cold at large N) and "hot" (64 providers).
// physr readers hold one ReadGuard across a batch, as the DMA layer does for a whole list;
// LookupGuarded takes a guard per lookup. Every structure's answer is its payload: the id
// for the peers, the Provider pointer for physr (reading the Provider would add a cache miss
// the peers never pay).
#include <absl/container/btree_map.h>
#include <benchmark/benchmark.h>
#include <llvm/ADT/IntervalMap.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <boost/icl/interval_map.hpp>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "physr/provider.hpp"

namespace {

using namespace physr;

struct Layout {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [base, base + size)
  std::vector<uint64_t> cold, hot;                    // addresses to look up
};

enum class Shape { packed, mixed, random, vfio };

const Layout& layout(Shape shape, size_t n) {
  static std::map<std::pair<Shape, size_t>, std::unique_ptr<Layout>> cache;
  auto& slot = cache[{shape, n}];
  if (slot) return *slot;
  slot = std::make_unique<Layout>();
  const bool mixed = shape == Shape::mixed;
  std::mt19937_64 rng(n * 2 + mixed + (shape == Shape::random ? 7 : shape == Shape::vfio ? 11 : 0));
  uint64_t cursor = uint64_t{1} << 32;
  if (shape == Shape::random) {
    std::map<uint64_t, uint64_t> taken;  // base -> end
    while (slot->ranges.size() < n) {
      const uint64_t size = uint64_t{4096} << (rng() % 10);
      const uint64_t base = (rng() % ((uint64_t{1} << 52) - size)) & ~uint64_t{4095};
      auto it = taken.lower_bound(base);
      if (it != taken.end() && it->first < base + size) continue;
      if (it != taken.begin() && std::prev(it)->second > base) continue;
      taken.emplace(base, base + size);
      slot->ranges.emplace_back(base, size);
    }
  }
  if (shape == Shape::vfio) {
    while (slot->ranges.size() < n) {
      const uint64_t big = uint64_t{16} << (30 + rng() % 3);  // 16, 32 or 64 GiB
      cursor = (cursor + big - 1) / big * big + big * (rng() % 4);
      slot->ranges.emplace_back(cursor, big);
      cursor += big;
      for (uint64_t k = 0, run = 1000 + rng() % 3000; k < run && slot->ranges.size() < n; ++k) {
        slot->ranges.emplace_back(cursor, 4096);
        cursor += 4096;
      }
      cursor += (1 + rng() % 64) << 30;
    }
  }
  for (size_t i = 0; i < n && (shape == Shape::packed || mixed); ++i) {
    uint64_t size = 4096;
    if (mixed) {
      const unsigned k = static_cast<unsigned>(rng() % 8);
      size = k < 4 ? 4096 << k : k < 7 ? uint64_t{1} << (20 + rng() % 10) : uint64_t{1} << (30 + rng() % 6);
      size = std::min<uint64_t>(size, (uint64_t{1} << 52) / (n + 1) / 2);
      size = std::max<uint64_t>(size & ~uint64_t{4095}, 4096);
      cursor = (cursor + size - 1) / size * size;  // natural alignment, as BARs have
      cursor += (rng() % 4) * size;
    }
    slot->ranges.emplace_back(cursor, size);
    cursor += size;
  }
  auto addr_in = [&](size_t i) { return slot->ranges[i].first + rng() % slot->ranges[i].second; };
  for (int k = 0; k < 1 << 16; ++k) slot->cold.push_back(addr_in(rng() % n));
  for (int k = 0; k < 1 << 16; ++k) slot->hot.push_back(addr_in(rng() % std::min<size_t>(n, 64)));
  return *slot;
}

// Not inlined, so that `valgrind --tool=callgrind --toggle-collect='*run*'` counts the
// timed loop alone (instructions and simulated cache misses per lookup). The loop reads
// locals only: through the references, the acquire load of every lookup made the compiler
// reload the vector's bounds and the functor's captures each time (GetById/physr 11 -> 17
// instructions per lookup when run() went out of line).
template <class Find>
[[gnu::noinline]] void run(benchmark::State& state, const std::vector<uint64_t>& addrs, Find find) {
  const uint64_t* const a = addrs.data();
  const size_t mask = addrs.size() - 1;
  size_t i = 0;
  uint64_t sum = 0;
  for (auto _ : state) {
    sum += find(a[i]);
    i = (i + 1) & mask;
  }
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

struct Physr {
  ProviderRegistry reg;
  explicit Physr(const Layout& l) {
    for (const auto& [b, s] : l.ranges) {
      ProviderDesc d;
      d.phys = PhysSpan{PhysAddr(b), s};
      (void)reg.add(std::move(d)).value();
    }
  }
};

void BM_Physr(benchmark::State& state, Shape shape, bool hot) {
  const Layout& l = layout(shape, static_cast<size_t>(state.range(0)));
  Physr p(l);
  ProviderRegistry::ReadGuard g;
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) {
    return reinterpret_cast<uintptr_t>(p.reg.find(PhysAddr(a)));
  });
  state.counters["table_bytes_per_provider"] = static_cast<double>(p.reg.table_bytes()) / static_cast<double>(l.ranges.size());
}

void BM_PhysrGuarded(benchmark::State& state) {
  const Layout& l = layout(Shape::packed, static_cast<size_t>(state.range(0)));
  Physr p(l);
  run(state, l.cold, [&](uint64_t a) {
    ProviderRegistry::ReadGuard g;
    return reinterpret_cast<uintptr_t>(p.reg.find(PhysAddr(a)));
  });
}

void BM_LlvmIntervalMap(benchmark::State& state, Shape shape, bool hot) {
  const Layout& l = layout(shape, static_cast<size_t>(state.range(0)));
  using Map = llvm::IntervalMap<uint64_t, uint32_t>;
  Map::Allocator alloc;
  Map m(alloc);
  uint32_t id = 1;
  for (const auto& [b, s] : l.ranges) m.insert(b, b + s - 1, id++);  // closed intervals
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) { return uint64_t{m.lookup(a, 0)}; });
}

void BM_BoostIcl(benchmark::State& state, Shape shape, bool hot) {
  const Layout& l = layout(shape, static_cast<size_t>(state.range(0)));
  boost::icl::interval_map<uint64_t, uint32_t> m;
  uint32_t id = 1;
  for (const auto& [b, s] : l.ranges) m.add({boost::icl::interval<uint64_t>::right_open(b, b + s), id++});
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) {
    auto it = m.find(a);
    return it == m.end() ? uint64_t{0} : uint64_t{it->second};
  });
}

template <class Map>
void ordered_map_bench(benchmark::State& state, Shape shape, bool hot) {
  const Layout& l = layout(shape, static_cast<size_t>(state.range(0)));
  Map m;  // base -> (end, id)
  uint32_t id = 1;
  for (const auto& [b, s] : l.ranges) m.emplace(b, std::pair<uint64_t, uint32_t>{b + s, id++});
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) {
    auto it = m.upper_bound(a);
    if (it == m.begin()) return uint64_t{0};
    --it;
    return a < it->second.first ? uint64_t{it->second.second} : 0;
  });
}

void BM_AbslBtree(benchmark::State& state, Shape shape, bool hot) {
  ordered_map_bench<absl::btree_map<uint64_t, std::pair<uint64_t, uint32_t>>>(state, shape, hot);
}
void BM_StdMap(benchmark::State& state, Shape shape, bool hot) {
  ordered_map_bench<std::map<uint64_t, std::pair<uint64_t, uint32_t>>>(state, shape, hot);
}

// Both cores: this thread looks up while another adds and removes providers elsewhere.
void BM_PhysrWithWriter(benchmark::State& state) {
  const Layout& l = layout(Shape::packed, static_cast<size_t>(state.range(0)));
  Physr p(l);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0};
  std::thread writer([&] {
    uint64_t k = 0;
    const uint64_t base = uint64_t{1} << 48;
    while (!stop.load(std::memory_order_relaxed)) {
      ProviderDesc d;
      d.phys = PhysSpan{PhysAddr(base + (k % 4096) * 8192), 4096};
      auto id = p.reg.add(std::move(d));
      if (id) (void)p.reg.remove(*id);
      ++k;
      writes.fetch_add(2, std::memory_order_relaxed);
    }
  });
  {
    ProviderRegistry::ReadGuard g;
    run(state, l.cold, [&](uint64_t a) {
      return reinterpret_cast<uintptr_t>(p.reg.find(PhysAddr(a)));
    });
  }
  stop = true;
  writer.join();
  state.counters["writer_ops"] = static_cast<double>(writes.load());
}

void BM_GetById(benchmark::State& state) {
  const Layout& l = layout(Shape::packed, 100000);
  Physr p(l);
  std::vector<uint64_t> ids;
  std::mt19937_64 rng(1);
  for (int k = 0; k < 1 << 16; ++k) ids.push_back(1 + rng() % 100000);
  ProviderRegistry::ReadGuard g;
  run(state, ids, [&](uint64_t id) {
    return reinterpret_cast<uintptr_t>(p.reg.get(static_cast<ProviderId>(id)));
  });
}

// A table of `bytes` for the RandomLines benchmarks: 2 MiB-aligned, huge pages asked for.
struct LineTable {
  uint64_t* t;
  explicit LineTable(size_t bytes) {
    const size_t whole = (bytes + (size_t{2} << 20) - 1) & ~((size_t{2} << 20) - 1);  // aligned_alloc wants a multiple
    void* mem = std::aligned_alloc(size_t{2} << 20, whole);
#ifdef MADV_HUGEPAGE
    madvise(mem, whole, MADV_HUGEPAGE);
#endif
    t = static_cast<uint64_t*>(mem);
  }
  ~LineTable() { std::free(t); }
  LineTable(const LineTable&) = delete;
  LineTable& operator=(const LineTable&) = delete;
};

// The machine's floor for a lookup: `depth` dependent loads of random 64-byte lines in a
// table of `mib` MiB (2 MiB-aligned, huge pages asked for, as the registry's arena), through
// the same loop as the lookups. A structure whose lookups touch k lines outside the cache
// cannot beat RandomLines/depth:k at its table's size; 6 and 56 MiB are about the sizes of
// the mixed layout's tables at 100k and 1M providers (6.2 and 57 MB).
// RandomLinesPadded adds `Nops` nops to each lookup: they take reorder-buffer entries and
// no execution port, so they show what a lookup of about 7 + Nops instructions that waits
// on the same lines can reach (the core overlaps fewer lookups the longer each one is).
template <unsigned Nops>
void BM_RandomLines(benchmark::State& state) {
  const auto depth = static_cast<unsigned>(state.range(0));
  const size_t bytes = static_cast<size_t>(state.range(1)) << 20, lines = bytes / 64;
  LineTable table(bytes);
  uint64_t* const t = table.t;
  std::mt19937_64 rng(depth * 1000 + lines);
  for (size_t k = 0; k < lines; ++k) t[k * 8] = rng() % lines;  // the next line of a chain
  std::vector<uint64_t> starts;
  for (int k = 0; k < 1 << 16; ++k) starts.push_back(rng() % lines);
  run(state, starts, [&](uint64_t x) {
    for (unsigned d = 0; d < depth; ++d) x = t[x * 8];
    if constexpr (Nops > 0) asm volatile(".rept %c0\n\tnop\n\t.endr" : : "i"(Nops));
    return x;
  });
}

// The latency beside RandomLines' throughput: one random line of a `mib` MiB table per
// iteration, each load's address the previous load's value (one cycle through every line,
// so no short loop stays cached). A lookup's dependent misses cost this much each when
// nothing overlaps them; RandomLines at the same size shows how much the core overlaps.
void BM_RandomLinesChained(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0)) << 20, lines = bytes / 64;
  LineTable table(bytes);
  uint64_t* const t = table.t;
  std::vector<uint64_t> order(lines);
  for (size_t k = 0; k < lines; ++k) order[k] = k;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(lines));
  for (size_t k = 0; k < lines; ++k) t[order[k] * 8] = order[(k + 1) % lines];
  uint64_t x = order[0];
  for (auto _ : state) x = t[x * 8];
  benchmark::DoNotOptimize(x);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// PHYSR_BENCH_ITERATIONS=n runs each lookup benchmark exactly once, n iterations: with
// callgrind (--toggle-collect='*run*'), instructions and cache misses per lookup are the
// counts over n.
void fixed_iterations(benchmark::internal::Benchmark* b) {
  if (const char* n = std::getenv("PHYSR_BENCH_ITERATIONS")) b->Iterations(std::atoll(n));
}

#define PROVIDER_SIZES ->Arg(16)->Arg(1000)->Arg(100000)->Arg(1000000)->Apply(fixed_iterations)

BENCHMARK_CAPTURE(BM_Physr, packed, Shape::packed, false)->Name("Lookup/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, packed, Shape::packed, false)->Name("Lookup/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, packed, Shape::packed, false)->Name("Lookup/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, packed, Shape::packed, false)->Name("Lookup/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, packed, Shape::packed, false)->Name("Lookup/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, mixed, Shape::mixed, false)->Name("LookupMixed/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, mixed, Shape::mixed, false)->Name("LookupMixed/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, mixed, Shape::mixed, false)->Name("LookupMixed/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, mixed, Shape::mixed, false)->Name("LookupMixed/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, mixed, Shape::mixed, false)->Name("LookupMixed/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, random, Shape::random, false)->Name("LookupRandom/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, random, Shape::random, false)->Name("LookupRandom/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, random, Shape::random, false)->Name("LookupRandom/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, random, Shape::random, false)->Name("LookupRandom/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, random, Shape::random, false)->Name("LookupRandom/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, vfio, Shape::vfio, false)->Name("LookupVfio/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, vfio, Shape::vfio, false)->Name("LookupVfio/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, vfio, Shape::vfio, false)->Name("LookupVfio/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, vfio, Shape::vfio, false)->Name("LookupVfio/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, vfio, Shape::vfio, false)->Name("LookupVfio/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, hot, Shape::packed, true)->Name("LookupHot/physr")->Arg(100000);
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, hot, Shape::packed, true)->Name("LookupHot/llvm_interval_map")->Arg(100000);
BENCHMARK_CAPTURE(BM_AbslBtree, hot, Shape::packed, true)->Name("LookupHot/absl_btree")->Arg(100000);

BENCHMARK(BM_PhysrGuarded)->Name("LookupGuarded/physr")->Arg(100000);
BENCHMARK(BM_PhysrWithWriter)->Name("LookupWithWriter/physr")->Arg(100000)->UseRealTime();
BENCHMARK(BM_GetById)->Name("GetById/physr")->Apply(fixed_iterations);
BENCHMARK_TEMPLATE(BM_RandomLines, 0)->Name("RandomLines")->ArgNames({"depth", "mib"})->ArgsProduct({{1, 2, 3}, {1, 6, 56}});
BENCHMARK_TEMPLATE(BM_RandomLines, 30)->Name("RandomLinesPadded/nops:30")->ArgNames({"depth", "mib"})->ArgsProduct({{1, 2, 3}, {6, 16, 56}});
BENCHMARK_TEMPLATE(BM_RandomLines, 60)->Name("RandomLinesPadded/nops:60")->ArgNames({"depth", "mib"})->ArgsProduct({{1, 2, 3}, {6, 16, 56}});
BENCHMARK(BM_RandomLinesChained)->Name("RandomLinesChained")->ArgName("mib")->Arg(1)->Arg(6)->Arg(16)->Arg(56);

}  // namespace

BENCHMARK_MAIN();
