// Provider lookup benchmarks: physr's radix table against interval structures measured in
// the same run on the same layout and the same addresses: llvm::IntervalMap, boost ICL
// interval_map, absl::btree_map and std::map (upper_bound, then step back).
//
// Layouts: "packed" = N tightly packed 4 KiB apertures (VFIO style); "mixed" = N
// apertures of 4 KiB .. 64 GiB with gaps, sparse over the 52-bit space.
// Address streams: uniform over all providers (cold at large N) and "hot" (64 providers).
// physr readers hold one ReadGuard across a batch, as the DMA layer does for a whole list;
// LookupGuarded takes a guard per lookup. Every structure's answer is its payload: the id
// for the peers, the Provider pointer for physr (reading the Provider would add a cache miss
// the peers never pay).
#include <absl/container/btree_map.h>
#include <benchmark/benchmark.h>
#include <llvm/ADT/IntervalMap.h>

#include <atomic>
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

const Layout& layout(bool mixed, size_t n) {
  static std::map<std::pair<bool, size_t>, std::unique_ptr<Layout>> cache;
  auto& slot = cache[{mixed, n}];
  if (slot) return *slot;
  slot = std::make_unique<Layout>();
  std::mt19937_64 rng(n * 2 + mixed);
  uint64_t cursor = uint64_t{1} << 32;
  for (size_t i = 0; i < n; ++i) {
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

template <class Find>
void run(benchmark::State& state, const std::vector<uint64_t>& addrs, Find&& find) {
  size_t i = 0;
  uint64_t sum = 0;
  for (auto _ : state) {
    sum += find(addrs[i]);
    i = (i + 1) & (addrs.size() - 1);
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

void BM_Physr(benchmark::State& state, bool mixed, bool hot) {
  const Layout& l = layout(mixed, static_cast<size_t>(state.range(0)));
  Physr p(l);
  ProviderRegistry::ReadGuard g;
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) {
    return reinterpret_cast<uintptr_t>(p.reg.find(PhysAddr(a)));
  });
  state.counters["table_bytes_per_provider"] = static_cast<double>(p.reg.table_bytes()) / static_cast<double>(l.ranges.size());
}

void BM_PhysrGuarded(benchmark::State& state) {
  const Layout& l = layout(false, static_cast<size_t>(state.range(0)));
  Physr p(l);
  run(state, l.cold, [&](uint64_t a) {
    ProviderRegistry::ReadGuard g;
    return reinterpret_cast<uintptr_t>(p.reg.find(PhysAddr(a)));
  });
}

void BM_LlvmIntervalMap(benchmark::State& state, bool mixed, bool hot) {
  const Layout& l = layout(mixed, static_cast<size_t>(state.range(0)));
  using Map = llvm::IntervalMap<uint64_t, uint32_t>;
  Map::Allocator alloc;
  Map m(alloc);
  uint32_t id = 1;
  for (const auto& [b, s] : l.ranges) m.insert(b, b + s - 1, id++);  // closed intervals
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) { return uint64_t{m.lookup(a, 0)}; });
}

void BM_BoostIcl(benchmark::State& state, bool mixed, bool hot) {
  const Layout& l = layout(mixed, static_cast<size_t>(state.range(0)));
  boost::icl::interval_map<uint64_t, uint32_t> m;
  uint32_t id = 1;
  for (const auto& [b, s] : l.ranges) m.add({boost::icl::interval<uint64_t>::right_open(b, b + s), id++});
  run(state, hot ? l.hot : l.cold, [&](uint64_t a) {
    auto it = m.find(a);
    return it == m.end() ? uint64_t{0} : uint64_t{it->second};
  });
}

template <class Map>
void ordered_map_bench(benchmark::State& state, bool mixed, bool hot) {
  const Layout& l = layout(mixed, static_cast<size_t>(state.range(0)));
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

void BM_AbslBtree(benchmark::State& state, bool mixed, bool hot) {
  ordered_map_bench<absl::btree_map<uint64_t, std::pair<uint64_t, uint32_t>>>(state, mixed, hot);
}
void BM_StdMap(benchmark::State& state, bool mixed, bool hot) {
  ordered_map_bench<std::map<uint64_t, std::pair<uint64_t, uint32_t>>>(state, mixed, hot);
}

// Both cores: this thread looks up while another adds and removes providers elsewhere.
void BM_PhysrWithWriter(benchmark::State& state) {
  const Layout& l = layout(false, static_cast<size_t>(state.range(0)));
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
  const Layout& l = layout(false, 100000);
  Physr p(l);
  std::vector<uint64_t> ids;
  std::mt19937_64 rng(1);
  for (int k = 0; k < 1 << 16; ++k) ids.push_back(1 + rng() % 100000);
  ProviderRegistry::ReadGuard g;
  run(state, ids, [&](uint64_t id) {
    return reinterpret_cast<uintptr_t>(p.reg.get(static_cast<ProviderId>(id)));
  });
}

#define PROVIDER_SIZES ->Arg(16)->Arg(1000)->Arg(100000)->Arg(1000000)

BENCHMARK_CAPTURE(BM_Physr, packed, false, false)->Name("Lookup/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, packed, false, false)->Name("Lookup/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, packed, false, false)->Name("Lookup/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, packed, false, false)->Name("Lookup/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, packed, false, false)->Name("Lookup/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, mixed, true, false)->Name("LookupMixed/physr") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, mixed, true, false)->Name("LookupMixed/llvm_interval_map") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_BoostIcl, mixed, true, false)->Name("LookupMixed/boost_icl") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_AbslBtree, mixed, true, false)->Name("LookupMixed/absl_btree") PROVIDER_SIZES;
BENCHMARK_CAPTURE(BM_StdMap, mixed, true, false)->Name("LookupMixed/std_map") PROVIDER_SIZES;

BENCHMARK_CAPTURE(BM_Physr, hot, false, true)->Name("LookupHot/physr")->Arg(100000);
BENCHMARK_CAPTURE(BM_LlvmIntervalMap, hot, false, true)->Name("LookupHot/llvm_interval_map")->Arg(100000);
BENCHMARK_CAPTURE(BM_AbslBtree, hot, false, true)->Name("LookupHot/absl_btree")->Arg(100000);

BENCHMARK(BM_PhysrGuarded)->Name("LookupGuarded/physr")->Arg(100000);
BENCHMARK(BM_PhysrWithWriter)->Name("LookupWithWriter/physr")->Arg(100000)->UseRealTime();
BENCHMARK(BM_GetById)->Name("GetById/physr");

}  // namespace

BENCHMARK_MAIN();
