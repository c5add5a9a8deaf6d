// P2P verdict benchmarks on a generated 4,096-function machine: all 16.7 M ordered pairs
// computed by physr's engine, by a literal transcription of the kernel's double loop (the
// peer, same run, same machine), and read back from the verdict cache.
#include <benchmark/benchmark.h>

#include <random>

#include "physr/pci.hpp"
#include "support/kernel_p2p.hpp"

namespace {

using namespace physr::pci;

// 32 host bridges x 128 functions: a host device at 00.0, 7 root ports, each with a switch
// (1 upstream + 8 downstream ports, one endpoint each) plus one endpoint on the first root
// port. Half the host bridges are allowlisted; one downstream port in four redirects (ACS).
const Topology& machine() {
  static const Topology t = [] {
    Topology m;
    m.source = "generated";
    std::mt19937_64 rng(3);
    auto add = [&](Bdf b, uint32_t hb, int32_t up, uint32_t cls, PortType pt, uint16_t dev = 0x1234) {
      Function f;
      f.bdf = b;
      f.vendor = 0x8086;
      f.device = dev;
      f.class_code = cls;
      f.port_type = pt;
      f.acs.kind = AcsState::Kind::absent;
      f.upstream = up;
      f.host_bridge = hb;
      m.functions.push_back(f);
      const auto idx = static_cast<uint32_t>(m.functions.size() - 1);
      if (up < 0) m.host_bridges[hb].root_functions.push_back(idx);
      return static_cast<int32_t>(idx);
    };
    for (uint32_t h = 0; h < 32; ++h) {
      const auto bus0 = static_cast<uint8_t>(h * 8);
      m.host_bridges.push_back(HostBridge{h / 8, bus0, static_cast<int>(h / 16), {}});
      add({h / 8, bus0, 0, 0}, h, -1, kClassHostBridge, PortType::rc_endpoint, h % 2 ? 0x2020 : 0x3407);
      for (uint8_t r = 1; r <= 7; ++r) {
        const int32_t rp = add({h / 8, bus0, r, 0}, h, -1, kClassPciBridge, PortType::root_port);
        const int32_t usp = add({h / 8, static_cast<uint8_t>(bus0 + 1), r, 0}, h, rp, kClassPciBridge, PortType::switch_upstream);
        for (uint8_t d = 0; d < 8; ++d) {
          const int32_t dsp = add({h / 8, static_cast<uint8_t>(bus0 + 2), static_cast<uint8_t>(r * 4 + d / 2), static_cast<uint8_t>(d % 2)},
                                  h, usp, kClassPciBridge, PortType::switch_downstream);
          if (rng() % 4 == 0) m.functions[static_cast<uint32_t>(dsp)].acs = AcsState{AcsState::Kind::present, 0x7f, acs::RR};
          add({h / 8, static_cast<uint8_t>(bus0 + 3), static_cast<uint8_t>(r * 4 + d / 2), static_cast<uint8_t>(d % 2)}, h, dsp,
              kClassNvme, PortType::endpoint);
        }
        if (r == 1) add({h / 8, static_cast<uint8_t>(bus0 + 4), 0, 0}, h, rp, 0x020000, PortType::endpoint);
      }
    }
    return m;
  }();
  return t;
}

void BM_AllPairs(benchmark::State& state) {
  const Topology& t = machine();
  auto e = P2PEngine::create(t);
  const auto n = static_cast<uint32_t>(t.functions.size());
  for (auto _ : state) {
    uint64_t sum = 0;
    for (uint32_t p = 0; p < n; ++p)
      for (uint32_t c = 0; c < n; ++c) {
        const Verdict v = e->compute(p, c);
        sum += static_cast<uint64_t>(v.distance) + static_cast<uint64_t>(v.type);
      }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * n * n);
  state.counters["functions"] = n;
}

void BM_AllPairsKernelLoop(benchmark::State& state) {
  const Topology& t = machine();
  auto e = P2PEngine::create(t);
  const auto redir = testing::redirect_flags(t);
  const auto n = static_cast<uint32_t>(t.functions.size());
  for (auto _ : state) {
    uint64_t sum = 0;
    for (uint32_t p = 0; p < n; ++p)
      for (uint32_t c = 0; c < n; ++c) {
        const Verdict v = testing::kernel_calc(t, p, c, *e, redir);
        sum += static_cast<uint64_t>(v.distance) + static_cast<uint64_t>(v.type);
      }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * n * n);
}

void BM_CachedVerdict(benchmark::State& state) {
  const Topology& t = machine();
  auto e = P2PEngine::create(t);
  const auto n = static_cast<uint32_t>(t.functions.size());
  for (uint32_t p = 0; p < 256; ++p)
    for (uint32_t c = 0; c < n; ++c) (void)e->verdict(p, c);
  uint64_t x = 1;
  for (auto _ : state) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    benchmark::DoNotOptimize(e->verdict(static_cast<uint32_t>(x >> 56), static_cast<uint32_t>((x >> 20) % n)));
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

BENCHMARK(BM_AllPairs)->Name("AllPairs/4096")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AllPairsKernelLoop)->Name("AllPairsKernelLoop/4096")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_CachedVerdict)->Name("CachedVerdict/4096");

}  // namespace

BENCHMARK_MAIN();
