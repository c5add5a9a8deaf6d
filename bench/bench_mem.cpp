// The mem module's benchmarks: P2P memory pools (physr/mem.hpp) against two peers measured
// in the same run, on the same workload: a 64 GiB BAR whose first 64 MiB hold long-lived
// 4 KiB chunks (allocated first, so where each allocator puts them: a driver's queues and
// buffers made at probe time), then a ring of chunks in flight, as a driver's queue (each
// iteration allocates one chunk and frees the oldest):
//   genalloc  Linux lib/genalloc.c as pci_alloc_p2pmem() uses it: one bitmap bit per 4 KiB,
//             gen_pool_first_fit (bitmap_find_next_zero_area), bitmap_set_ll/clear_ll with
//             a cmpxchg per word, an atomic avail count; frees return at once.
//   std_map   a mutex and a std::map of free extents, first fit, coalescing on free.
// physr's frees are deferred by an RCU grace period and it still does more per free.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/mem_world.hpp"

namespace {

using physr::GiB;
using physr::kPageSize;
using physr::MiB;
using physr::mem::P2PChunk;
using physr::mem::P2PMemory;

// Chunks in flight: a queue's worth of 4 KiB buffers, fewer of the big ones.
size_t in_flight(uint64_t size) { return size <= 64 * 1024 ? 1024 : 64; }
constexpr uint64_t kLongLived = 64 * MiB / kPageSize;  // 4 KiB chunks allocated first

// ---------------------------------------------------------------------------------------
// The genalloc peer: lib/genalloc.c's algorithm for one chunk, order PAGE_SHIFT.
class GenPool {
 public:
  GenPool(uint64_t start, uint64_t size) : start_(start), nbits_(size >> 12), bits_((nbits_ + 63) / 64), avail_(static_cast<long>(size)) {}

  // gen_pool_alloc_algo_owner() with gen_pool_first_fit.
  uint64_t alloc(uint64_t size) {
    const uint64_t nbits = (size + (1u << 12) - 1) >> 12;
    if (static_cast<long>(size) > avail_.load(std::memory_order_relaxed)) return 0;
    uint64_t start_bit = 0;
    for (;;) {
      start_bit = find_next_zero_area(start_bit, nbits);
      if (start_bit >= nbits_) return 0;
      const uint64_t remain = bitmap_set_ll(start_bit, nbits);
      if (!remain) break;
      bitmap_clear_ll(start_bit, nbits - remain);
    }
    avail_.fetch_sub(static_cast<long>(nbits << 12), std::memory_order_relaxed);
    return start_ + (start_bit << 12);
  }
  // gen_pool_free_owner().
  void free(uint64_t addr, uint64_t size) {
    const uint64_t nbits = (size + (1u << 12) - 1) >> 12;
    const uint64_t start_bit = (addr - start_) >> 12;
    if (bitmap_clear_ll(start_bit, nbits)) std::abort();  // BUG_ON(remain)
    avail_.fetch_add(static_cast<long>(nbits << 12), std::memory_order_relaxed);
  }

 private:
  uint64_t find_next(uint64_t from, uint64_t end, bool set) const {
    while (from < end) {
      uint64_t w = bits_[from / 64].load(std::memory_order_relaxed);
      if (!set) w = ~w;
      w &= ~uint64_t{0} << (from % 64);
      if (w) return std::min(end, from / 64 * 64 + static_cast<uint64_t>(__builtin_ctzll(w)));
      from = from / 64 * 64 + 64;
    }
    return end;
  }
  // lib/bitmap.c bitmap_find_next_zero_area_off() with align_mask 0.
  uint64_t find_next_zero_area(uint64_t start, uint64_t nr) const {
    for (;;) {
      const uint64_t index = find_next(start, nbits_, false);
      const uint64_t end = index + nr;
      if (end > nbits_) return end;
      const uint64_t i = find_next(index, end, true);
      if (i < end) {
        start = i + 1;
        continue;
      }
      return index;
    }
  }
  // set_bits_ll()/clear_bits_ll(): a cmpxchg loop per word, -EBUSY when a bit is taken.
  bool set_bits_ll(std::atomic<uint64_t>& w, uint64_t mask) {
    uint64_t v = w.load(std::memory_order_relaxed);
    do {
      if (v & mask) return false;
    } while (!w.compare_exchange_weak(v, v | mask));
    return true;
  }
  bool clear_bits_ll(std::atomic<uint64_t>& w, uint64_t mask) {
    uint64_t v = w.load(std::memory_order_relaxed);
    do {
      if ((v & mask) != mask) return false;
    } while (!w.compare_exchange_weak(v, v & ~mask));
    return true;
  }
  template <bool Set>
  uint64_t ll(uint64_t start, uint64_t nr) {
    uint64_t i = start;
    while (nr) {
      const uint64_t b = i % 64, take = std::min<uint64_t>(nr, 64 - b);
      const uint64_t mask = (take == 64 ? ~uint64_t{0} : ((uint64_t{1} << take) - 1)) << b;
      if (!(Set ? set_bits_ll(bits_[i / 64], mask) : clear_bits_ll(bits_[i / 64], mask))) return nr;
      i += take;
      nr -= take;
    }
    return 0;
  }
  uint64_t bitmap_set_ll(uint64_t start, uint64_t nr) { return ll<true>(start, nr); }
  uint64_t bitmap_clear_ll(uint64_t start, uint64_t nr) { return ll<false>(start, nr); }

  uint64_t start_, nbits_;
  std::vector<std::atomic<uint64_t>> bits_;
  std::atomic<long> avail_;
};

// ---------------------------------------------------------------------------------------
// The std::map peer: free extents by base, first fit, coalescing.
class MapPool {
 public:
  MapPool(uint64_t start, uint64_t size) { free_[start] = size; }
  uint64_t alloc(uint64_t size) {
    std::lock_guard g(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      const uint64_t a = it->first, left = it->second - size;
      free_.erase(it);
      if (left) free_.emplace(a + size, left);
      return a;
    }
    return 0;
  }
  void free(uint64_t a, uint64_t size) {
    std::lock_guard g(mu_);
    auto next = free_.lower_bound(a);
    if (next != free_.end() && next->first == a + size) {
      size += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == a) {
        prev->second += size;
        return;
      }
    }
    free_.emplace_hint(next, a, size);
  }

 private:
  std::mutex mu_;
  std::map<uint64_t, uint64_t> free_;
};

// A world with a 64 GiB BAR (the GPU's, enlarged) so deferred frees never run it dry.
struct BenchWorld {
  physr::testing::MemWorld w{64 * GiB};
  std::unique_ptr<P2PMemory> m;
  BenchWorld() {
    physr::mem::P2PMemoryOptions o;
    o.track = false;  // the allocator alone; tracking is the debug mode
    m = P2PMemory::create(*w.platform, o).value();
    if (!m->add_resource(w.gpu, 0, 0, 0)) std::abort();
  }
};

constexpr uint64_t kPeerBase = 0x40'0000'0000, kPeerSize = 64 * GiB;

void PhysrAllocFree(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0));
  BenchWorld bw;
  std::vector<P2PChunk> long_lived(kLongLived);
  for (auto& c : long_lived) c = bw.m->alloc(bw.w.gpu, kPageSize).value();
  std::vector<P2PChunk> ring(in_flight(size));
  for (auto& c : ring) c = bw.m->alloc(bw.w.gpu, size).value();
  size_t i = 0;
  for (auto _ : state) {
    auto c = bw.m->alloc(bw.w.gpu, size);
    if (!c) [[unlikely]] {
      state.SkipWithError(c.error().to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(c->span);
    if (!bw.m->free(ring[i])) [[unlikely]] std::abort();
    ring[i] = *c;
    i = i + 1 == ring.size() ? 0 : i + 1;
  }
  for (auto& c : ring) (void)bw.m->free(c);
  for (auto& c : long_lived) (void)bw.m->free(c);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

template <class Pool>
void PeerAllocFree(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0));
  Pool pool(kPeerBase, kPeerSize);
  for (uint64_t n = 0; n < kLongLived; ++n) benchmark::DoNotOptimize(pool.alloc(kPageSize));
  std::vector<uint64_t> ring(in_flight(size));
  for (auto& a : ring) a = pool.alloc(size);
  size_t i = 0;
  for (auto _ : state) {
    const uint64_t a = pool.alloc(size);
    if (!a) [[unlikely]] {
      state.SkipWithError("peer pool ran dry");
      break;
    }
    benchmark::DoNotOptimize(a);
    pool.free(ring[i], size);
    ring[i] = a;
    i = i + 1 == ring.size() ? 0 : i + 1;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// Deferred frees while a reader thread keeps entering and leaving read-side sections, so
// every grace period has a reader to wait for. Items: frees (each iteration also allocates).
void PhysrDeferredFree(benchmark::State& state) {
  BenchWorld bw;
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      P2PMemory::ReadGuard g;
      benchmark::ClobberMemory();
    }
  });
  std::vector<P2PChunk> ring(in_flight(kPageSize));
  for (auto& c : ring) c = bw.m->alloc(bw.w.gpu, kPageSize).value();
  size_t i = 0;
  for (auto _ : state) {
    if (!bw.m->free(ring[i])) [[unlikely]] std::abort();
    auto c = bw.m->alloc(bw.w.gpu, kPageSize);
    if (!c) [[unlikely]] {
      state.SkipWithError(c.error().to_string().c_str());
      break;
    }
    ring[i] = *c;
    i = i + 1 == ring.size() ? 0 : i + 1;
  }
  stop.store(true);
  reader.join();
  for (auto& c : ring) (void)bw.m->free(c);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// PHYSR_BENCH_ITERATIONS=n runs each of these exactly once, n iterations: with callgrind
// (--toggle-collect='*PhysrAllocFree*'), two values of n give instructions per pair.
void pool_iterations(benchmark::internal::Benchmark* b) {
  if (const char* n = std::getenv("PHYSR_BENCH_ITERATIONS")) b->Iterations(std::atoll(n));
}

const int kRegistered = [] {
  for (const int64_t size : {int64_t{4096}, int64_t{2 * MiB}}) {
    benchmark::RegisterBenchmark("P2PPoolAllocFree/physr", PhysrAllocFree)->Arg(size)->Apply(pool_iterations);
    benchmark::RegisterBenchmark("P2PPoolAllocFree/genalloc", PeerAllocFree<GenPool>)->Arg(size)->Apply(pool_iterations);
    benchmark::RegisterBenchmark("P2PPoolAllocFree/std_map", PeerAllocFree<MapPool>)->Arg(size)->Apply(pool_iterations);
  }
  benchmark::RegisterBenchmark("P2PPoolDeferredFree/physr", PhysrDeferredFree)->UseRealTime()->Apply(pool_iterations);
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();

// ---------------------------------------------------------------------------------------
// Page pools (physr/mem/page_pool.hpp) and netmem metadata lookups (physr/mem/netmem.hpp).
// Items are operations: one alloc + recycle pair, or one metadata lookup.
//   PagePoolAllocRecycle/fast/physr    alloc from the cache, recycle_direct() into it (the
//                                      kernel's bench_page_pool_simple "fast" loop)
//   PagePoolAllocRecycle/ring/physr    alloc, then put from outside the owning context:
//                                      through the ptr_ring, refilled 64 at a time
//   PagePoolAllocRecycle/mutex_vector  the peer: a mutex and a std::vector of free buffers
//   NetmemLookup/physr                 a handle's metadata (the table, then the flat array)
//   NetmemLookup/absl_btree            the peer: an absl::btree_map from page index to
//                                      metadata (the xarray stand-in)
// Pools run without debug checks (as the P2P pool benchmarks run without tracking).
#include <absl/container/btree_map.h>

#include <cstdlib>
#include <random>

namespace {

using physr::mem::HostPages;
using physr::mem::Netmem;
using physr::mem::NetmemMeta;
using physr::mem::NetIovArea;
using physr::mem::PagePool;
using physr::mem::PagePoolParams;

struct PoolBench {
  std::unique_ptr<HostPages> pages =
      HostPages::create(physr::PhysSpan{physr::PhysAddr(0x1'0000'0000), 64 * MiB}).value();
  PagePool* pool = nullptr;
  PoolBench() {
    PagePoolParams p;
    p.pages = pages.get();
    p.debug = false;
    pool = PagePool::create(std::move(p)).value();
  }
  ~PoolBench() { pool->destroy(); }
};

void PagePoolFast(benchmark::State& state) {
  PoolBench b;
  PagePool& pool = *b.pool;
  for (auto _ : state) {
    const Netmem n = pool.alloc_netmems();
    benchmark::DoNotOptimize(n);
    if (!pool.recycle_direct(n)) [[unlikely]] std::abort();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void PagePoolRing(benchmark::State& state) {
  PoolBench b;
  PagePool& pool = *b.pool;
  for (auto _ : state) {
    const Netmem n = pool.alloc_netmems();
    benchmark::DoNotOptimize(n);
    if (!pool.put_full_netmem(n, false)) [[unlikely]] std::abort();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// The peer: a mutex and a vector, preloaded with the same number of buffers.
class MutexVectorPool {
 public:
  MutexVectorPool() {
    for (uint64_t i = 0; i < 1024; ++i) free_.push_back(0x1'0000'0000 + i * kPageSize);
  }
  uint64_t alloc() {
    std::lock_guard g(mu_);
    if (free_.empty()) return 0;
    const uint64_t v = free_.back();
    free_.pop_back();
    return v;
  }
  void recycle(uint64_t v) {
    std::lock_guard g(mu_);
    free_.push_back(v);
  }

 private:
  std::mutex mu_;
  std::vector<uint64_t> free_;
};

void PagePoolMutexVector(benchmark::State& state) {
  MutexVectorPool pool;
  for (auto _ : state) {
    const uint64_t v = pool.alloc();
    benchmark::DoNotOptimize(v);
    pool.recycle(v);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// 65536 buffers (256 MiB of a BAR); lookups in a fixed random order of 4096.
constexpr uint64_t kLookupBuffers = 65536, kLookupOrder = 4096;

std::vector<uint64_t> lookup_order() {
  std::mt19937_64 rng(42);
  std::vector<uint64_t> v(kLookupOrder);
  for (auto& x : v) x = rng() % kLookupBuffers;
  return v;
}

void NetmemLookupPhysr(benchmark::State& state) {
  auto area = NetIovArea::create({.count = kLookupBuffers, .base = physr::PhysAddr(0x40'0000'0000), .provider = 1,
                                  .net_iov = true, .name = "bench"})
                  .value();
  std::vector<Netmem> handles;
  for (uint64_t i : lookup_order()) handles.push_back(area->netmem(i));
  size_t i = 0;
  for (auto _ : state) {
    NetmemMeta& m = physr::mem::netmem_meta(handles[i]);
    benchmark::DoNotOptimize(m.dma_addr);
    i = (i + 1) & (kLookupOrder - 1);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void NetmemLookupBtree(benchmark::State& state) {
  std::vector<NetmemMeta> metas(kLookupBuffers);
  absl::btree_map<uint64_t, NetmemMeta*> index;
  for (uint64_t i = 0; i < kLookupBuffers; ++i) index.emplace((0x40'0000'0000 >> 12) + i, &metas[i]);
  std::vector<uint64_t> keys;
  for (uint64_t i : lookup_order()) keys.push_back((0x40'0000'0000 >> 12) + i);
  size_t i = 0;
  for (auto _ : state) {
    NetmemMeta* m = index.find(keys[i])->second;
    benchmark::DoNotOptimize(m->dma_addr);
    i = (i + 1) & (kLookupOrder - 1);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

// PHYSR_BENCH_ITERATIONS=n runs each of these exactly once, n iterations: with callgrind
// (--toggle-collect='*PagePoolFast*' etc.), two values of n give instructions per operation.
void page_pool_iterations(benchmark::internal::Benchmark* b) {
  if (const char* n = std::getenv("PHYSR_BENCH_ITERATIONS")) b->Iterations(std::atoll(n));
}

const int kPagePoolRegistered = [] {
  benchmark::RegisterBenchmark("PagePoolAllocRecycle/fast/physr", PagePoolFast)->Apply(page_pool_iterations);
  benchmark::RegisterBenchmark("PagePoolAllocRecycle/ring/physr", PagePoolRing)->Apply(page_pool_iterations);
  benchmark::RegisterBenchmark("PagePoolAllocRecycle/mutex_vector", PagePoolMutexVector)->Apply(page_pool_iterations);
  benchmark::RegisterBenchmark("NetmemLookup/physr", NetmemLookupPhysr)->Apply(page_pool_iterations);
  benchmark::RegisterBenchmark("NetmemLookup/absl_btree", NetmemLookupBtree)->Apply(page_pool_iterations);
  return 0;
}();

}  // namespace

// ---------------------------------------------------------------------------------------
// dma-buf (physr/mem/dmabuf.hpp): an importer's attach + map of a VFIO-style export of 256
// ranges of a GPU BAR, then unmap and detach (items = attach + map operations). The NIC
// shares the GPU's switch, so dma_buf_phys_vec_to_sgt()'s bus-address path. Peer in the
// same run: DmaDevice::map() + unmap() of the same 256 ranges (what an sg exporter's
// dma_map_sgtable() costs the importer).
namespace {

struct DmaBufBench {
  physr::testing::MemWorld w;
  std::unique_ptr<physr::DmaDevice> nic;
  std::shared_ptr<physr::mem::DmaBuf> buf;
  DmaBufBench() {
    nic = std::move(physr::DmaDevice::create(w.platform->dma_env(), physr::DmaDeviceConfig{.function = w.nic})).value();
    std::vector<physr::mem::DmaBufBarRange> r;
    for (uint64_t i = 0; i < 256; ++i) r.push_back({i * 2 * kPageSize, kPageSize});
    buf = std::move(physr::mem::DmaBuf::export_bar(*w.platform, w.gpu, 0, r)).value();
  }
};

void DmaBufAttachMap(benchmark::State& state) {
  DmaBufBench b;
  physr::mem::DmaBufAttachOptions o;
  o.allow_peer2peer = true;
  o.move_notify = [](physr::mem::DmaBufAttachment&) {};
  for (auto _ : state) {
    auto a = b.buf->attach(*b.nic, o);
    if (!a) [[unlikely]] {
      state.SkipWithError(a.error().to_string().c_str());
      break;
    }
    auto m = (*a)->map(physr::DmaDirection::from_device);
    if (!m || m->segments().size() != 256) [[unlikely]] {
      state.SkipWithError("map failed");
      break;
    }
    benchmark::DoNotOptimize(m->segments().data());
    (void)(*a)->unmap(*m);
    (void)(*a)->detach();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

void DmaMapList(benchmark::State& state) {
  DmaBufBench b;
  const physr::RangeList list = b.buf->ranges();
  physr::DmaMapping m;
  for (auto _ : state) {
    if (!b.nic->map_into(m, list, physr::DmaDirection::from_device)) [[unlikely]] {
      state.SkipWithError("map failed");
      break;
    }
    benchmark::DoNotOptimize(m.segments().data());
    (void)b.nic->unmap(m);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

const int kDmaBufRegistered = [] {
  benchmark::RegisterBenchmark("DmaBufAttachMap/256", DmaBufAttachMap);
  benchmark::RegisterBenchmark("DmaBufAttachMap/256/dma_map_list", DmaMapList);
  return 0;
}();

}  // namespace

// ---------------------------------------------------------------------------------------
// The mirror (physr/mem/hmm.hpp). Items = pages for HmmRangeFault, ranges for
// HmmInvalidateRetry.
//   HmmRangeFault/4k/1073741824      hmm_range_fault of a resident 1 GiB VMA of 4 KiB pages
//   HmmRangeFault/2m/1073741824      the same of 2 MiB folios (PMD-mapped: order 9)
//   HmmRangeFault/pin_peer_{4k,2m}/  the peer in the same run: pin + unpin of the same buffer
//   HmmInvalidateRetry/2097152       an invalidation of a mirrored 2 MiB range (the driver's
//                                    callback: its lock and set_seq), then the driver's retry:
//                                    read_begin, hmm_range_fault of the 512 pages, read_retry
#include "physr/mem/hmm.hpp"

namespace {
using namespace physr;
using namespace physr::mem;

struct HmmBenchSpace {
  std::unique_ptr<HostMemory> mem = std::move(HostMemory::create(PhysSpan{PhysAddr(4 * GiB), 2 * GiB})).value();
  AddressSpace as{*mem};
  uint64_t addr = 0;
  std::mutex driver;
  std::unique_ptr<MmuIntervalNotifier> n;
  HmmBenchSpace(uint64_t len, unsigned order) {
    addr = as.mmap_anon({.addr = uint64_t{1} << 32, .len = len, .order = order}).value();
    n = MmuIntervalNotifier::insert(as, addr, len, [this](MmuIntervalNotifier& sub, const MmuNotifierRange&, uint64_t seq) {
          std::lock_guard g(driver);
          sub.set_seq(seq);
          return true;
        }).value();
  }
};

void BM_HmmRangeFault(benchmark::State& state, unsigned order) {
  const uint64_t len = static_cast<uint64_t>(state.range(0));
  HmmBenchSpace s(len, order);
  std::vector<uint64_t> pfns(len >> kPageShift);
  for (auto _ : state) {
    HmmRange r{.notifier = s.n.get(), .notifier_seq = s.n->read_begin(), .start = s.addr, .end = s.addr + len, .hmm_pfns = pfns,
               .default_flags = kHmmPfnReqFault};
    std::lock_guard g(s.as.mmap_lock());
    if (Status st = hmm_range_fault(r); !st) [[unlikely]] {
      state.SkipWithError(st.error().to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(pfns.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * pfns.size()));
}

void BM_HmmPinPeer(benchmark::State& state, unsigned order) {
  const uint64_t len = static_cast<uint64_t>(state.range(0));
  HmmBenchSpace s(len, order);
  for (auto _ : state) {
    auto p = s.as.pin(s.addr, len, Foll::write);
    if (!p) [[unlikely]] {
      state.SkipWithError(p.error().to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(p->ranges().size());
    if (!s.as.unpin(std::move(p).value())) [[unlikely]] std::abort();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * (len >> kPageShift)));
}

void BM_HmmInvalidateRetry(benchmark::State& state) {
  const uint64_t len = static_cast<uint64_t>(state.range(0));
  HmmBenchSpace s(len, kOrder4K);
  std::vector<uint64_t> pfns(len >> kPageShift);
  MmuNotifierSubscriptions& subs = *s.as.notifiers();
  for (auto _ : state) {
    subs.invalidate_start({s.addr, s.addr + len, MmuNotifyEvent::clear});
    subs.invalidate_end();
    HmmRange r{.notifier = s.n.get(), .notifier_seq = s.n->read_begin(), .start = s.addr, .end = s.addr + len, .hmm_pfns = pfns,
               .default_flags = kHmmPfnReqFault};
    {
      std::lock_guard g(s.as.mmap_lock());
      if (Status st = hmm_range_fault(r); !st) [[unlikely]] {
        state.SkipWithError(st.error().to_string().c_str());
        break;
      }
    }
    std::lock_guard g(s.driver);
    if (s.n->read_retry(r.notifier_seq)) [[unlikely]] std::abort();
    benchmark::DoNotOptimize(pfns.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}

const int kHmmRegistered = [] {
  benchmark::RegisterBenchmark("HmmRangeFault/4k", BM_HmmRangeFault, kOrder4K)->Arg(int64_t{1} << 30);
  benchmark::RegisterBenchmark("HmmRangeFault/2m", BM_HmmRangeFault, kOrder2M)->Arg(int64_t{1} << 30);
  benchmark::RegisterBenchmark("HmmRangeFault/pin_peer_4k", BM_HmmPinPeer, kOrder4K)->Arg(int64_t{1} << 30);
  benchmark::RegisterBenchmark("HmmRangeFault/pin_peer_2m", BM_HmmPinPeer, kOrder2M)->Arg(int64_t{1} << 30);
  benchmark::RegisterBenchmark("HmmInvalidateRetry", BM_HmmInvalidateRetry)->Arg(int64_t{2} << 20);
  return 0;
}();

}  // namespace
