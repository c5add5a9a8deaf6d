// The memcpy peers the DMA and sim benchmarks measure themselves against in the same run:
//   BM_Memcpy           a copy between two warm buffers of state.range(0) bytes (cache-resident
//                       up to the L2's size)
//   BM_MemcpyFootprint  a copy of state.range(0) bytes per iteration, rotating over
//                       kFootprintSlots source/destination pairs: the working set a job of
//                       that transfer size cycles through at queue depth kFootprintSlots
//                       (32 MiB of slots at 1 MiB), which does not stay in the caches
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <vector>

inline void BM_Memcpy(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> a(n, 1), b(n, 2);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}

/// The queue depth whose slots BM_MemcpyFootprint rotates over (SimTransfer's).
inline constexpr size_t kFootprintSlots = 32;

inline void BM_MemcpyFootprint(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  std::vector<uint8_t> a(n * kFootprintSlots, 1), b(n * kFootprintSlots, 2);  // every page touched up front
  size_t slot = 0;
  for (auto _ : state) {
    std::memcpy(b.data() + slot * n, a.data() + slot * n, n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
    slot = slot + 1 == kFootprintSlots ? 0 : slot + 1;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
