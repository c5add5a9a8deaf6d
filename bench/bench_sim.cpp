// Machine-model benchmarks.
//   SimTransfer/<bytes>  one NVMe read job on the default machine (P2P into the GPU BAR,
//                        queue depth 32, 64 MiB) with transfers of that size: every I/O
//                        mapped, moved, verified and timed, after one untimed job that
//                        backs the slots; bytes = simulated bytes moved per second;
//                        events_per_second = simulator events per second
//   Memcpy/1048576       memcpy of 1 MiB between warm buffers, the peer for SimTransfer
//   MemcpyFootprint/1048576  memcpy of 1 MiB per iteration rotating over 32 source/destination
//                        pairs: the peer with SimTransfer/1048576's footprint (its 32 slots of
//                        1 MiB in flight, 32 MiB, do not stay in the caches either)
//   SimPeakMemory        a 10 GiB read job (1 MiB transfers, queue depth 32, into the GPU's
//                        64 GiB BAR and, second job, into host memory): counters
//                        peak_rss_bytes (the process's peak resident set after the job),
//                        backed_bytes (physical memory backed by the model) and
//                        touched_bytes (distinct bytes the jobs wrote); target: peak memory
//                        under 2x the bytes touched
//   SimEvents            the fabric alone: 10,000 flows from two devices sharing the switch
//                        uplink below saturation, events per second
#include <benchmark/benchmark.h>

#include "bench_memcpy.hpp"

#include <sys/resource.h>

#include <cstdlib>


#include "physr/sim.hpp"

namespace {

using namespace physr;

pci::Topology topo() {
  return std::move(pci::load_builtin_machine(kDefaultMachine)).value();
}

// The benchmarks' machine: DMA-API debug off, to measure the model rather than the shadow
// tracking (tests keep it on).
std::unique_ptr<sim::Machine> bench_machine(const pci::Topology& t) {
  sim::MachineOptions o;
  o.dma_debug = false;
  return std::move(sim::Machine::create(t, o)).value();
}

// nvme0 reading into gpu0's BAR by P2P at queue depth 32.
sim::Job nvme_to_gpu(const pci::Topology& t, uint64_t block_size, uint64_t size) {
  sim::Job j;
  j.name = "bench";
  j.kind = sim::NvmeJob{*t.lookup("nvme0"), false, *t.lookup("gpu0"), sim::PathPolicy::p2p};
  j.block_size = block_size;
  j.queue_depth = 32;
  j.size = size;
  return j;
}

void BM_SimTransfer(benchmark::State& state) {
  const auto t = topo();
  auto m = bench_machine(t);
  const sim::Job j = nvme_to_gpu(t, static_cast<uint64_t>(state.range(0)), 64 * MiB);
  // One job before the timed loop, as the memcpy peers touch their buffers before theirs:
  // the machine's first job backs its slots (page faults, then a huge page per 2 MiB slab,
  // MADV_COLLAPSE) and adds gpu0's pool, a one-time cost of tens of milliseconds that a
  // run of a hundred jobs (--benchmark_min_time=0.3) would otherwise count as 5-10% of its
  // time. The loop measures the steady state a long job runs in.
  if (auto r = sim::run_job(*m, j); !r) {
    state.SkipWithError(r.error().to_string().c_str());
    return;
  }
  uint64_t events = 0;
  for (auto _ : state) {
    auto r = sim::run_job(*m, j);
    if (!r) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    events += r->ios * 2;  // a start and a completion per transfer
    benchmark::DoNotOptimize(r->gbps);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * j.size));
  state.counters["events_per_second"] = benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}

void BM_SimEvents(benchmark::State& state) {
  const auto t = topo();
  uint64_t events = 0;
  for (auto _ : state) {
    auto f = std::move(sim::Fabric::create(t)).value();
    sim::Simulator s(f);
    const auto r1 = *f.to_memory(*t.lookup("nvme0")), r2 = *f.to_memory(*t.lookup("gpu0"));
    for (int i = 0; i < 10000; ++i) s.add(i % 2 ? r1 : r2, 64 * KiB, i * 6000.0);  // below saturation, like a job
    s.run();
    events += s.events();
  }
  state.counters["events_per_second"] = benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}

void BM_SimPeakMemory(benchmark::State& state) {
  const auto t = topo();
  for (auto _ : state) {
    auto m = bench_machine(t);
    sim::Job j = nvme_to_gpu(t, 1 * MiB, 10 * GiB);
    auto r = sim::run_job(*m, j);
    if (!r) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    std::get<sim::NvmeJob>(j.kind).buffer_function.reset();  // the same into host memory
    r = sim::run_job(*m, j);
    if (!r) {
      state.SkipWithError(r.error().to_string().c_str());
      break;
    }
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    state.counters["peak_rss_bytes"] = static_cast<double>(u.ru_maxrss) * 1024;
    state.counters["backed_bytes"] = static_cast<double>(m->memory().backed_bytes());
    // Each job writes its 32 buffers of 1 MiB over and over: 32 MiB touched per job.
    state.counters["touched_bytes"] = static_cast<double>(2 * j.queue_depth * j.block_size);
  }
}

// PHYSR_BENCH_ITERATIONS=n runs SimTransfer and SimEvents exactly once, n iterations: under
// callgrind (--dump-before='physr::sim::run_job(*'), a few steady-state jobs in one process.
void sim_iterations(benchmark::internal::Benchmark* b) {
  if (const char* n = std::getenv("PHYSR_BENCH_ITERATIONS")) b->Iterations(std::atoll(n));
}

BENCHMARK(BM_SimTransfer)->Name("SimTransfer")->Arg(4096)->Arg(1048576)->Unit(benchmark::kMillisecond)->Apply(sim_iterations);
BENCHMARK(BM_Memcpy)->Name("Memcpy")->Arg(1048576);
BENCHMARK(BM_MemcpyFootprint)->Name("MemcpyFootprint")->Arg(1048576);
BENCHMARK(BM_SimPeakMemory)->Name("SimPeakMemory")->Unit(benchmark::kSecond)->Iterations(1);
BENCHMARK(BM_SimEvents)->Name("SimEvents")->Unit(benchmark::kMillisecond)->Apply(sim_iterations);

}  // namespace

BENCHMARK_MAIN();
