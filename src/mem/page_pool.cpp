// Page pools (Linux net/core/page_pool.c, include/net/page_pool/helpers.h), the host page
// allocator they fall back to, and the memory providers (net/core/devmem.c's shape).
//
// The ptr_ring. Linux's ptr_ring (include/linux/ptr_ring.h) is an array of pointers, NULL
// meaning empty, with a producer spinlock and a consumer spinlock; the consumer zeroes the
// slots it took in batches of 16 (two cache lines of pointers), so a ring may look full to
// producers until a batch is zeroed. PtrRing below is that, exactly, with spinlocks as the
// kernel's (taking one is an atomic exchange, releasing it a store: a std::mutex costs
// twice that, an atomic read-modify-write on each side, which measured ~25% of the ring
// path). Debian's
// libraries offer no drop-in: boost::lockfree::spsc_queue has one producer (any thread
// recycles here), boost::lockfree::queue is a CAS loop per operation with a compile-time
// capacity, and liburcu's wfcqueue and lfstack are unbounded (no "ring full: release the
// page" rule, which is page_pool's). The consumer (the pool's owner) takes the consumer
// lock once per refill of up to 64 entries, not once per entry.
#include "physr/mem/page_pool.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <thread>

#include "physr/mem.hpp"

namespace physr::mem {

namespace {

constexpr int64_t kBiasMax = INT64_MAX >> 1;  // page_pool.c BIAS_MAX (LONG_MAX >> 1)
// dma_get_cache_alignment() on x86 (no ARCH_DMA_MINALIGN): fragments are not rounded.
constexpr uint32_t kDmaCacheAlignment = 1;

std::atomic<uint32_t> g_pool_ids{0};

void emit(const std::function<void(const std::string&)>& report, const std::string& msg) {
  if (report) {
    report(msg);
  } else {
    std::fprintf(stderr, "physr: %s\n", msg.c_str());
  }
}

// A spinlock (the kernel's spin_lock()): test-and-test-and-set, yielding the CPU after a
// while so a preempted holder on a shared machine gets to run.
class SpinLock {
 public:
  void lock() noexcept {
    if (!locked_.exchange(true, std::memory_order_acquire)) [[likely]] return;
    lock_slow();
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  [[gnu::noinline]] void lock_slow() noexcept {
    for (unsigned spins = 0; locked_.exchange(true, std::memory_order_acquire);) {
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins % 64 == 0) {
          std::this_thread::yield();
        } else {
#if defined(__x86_64__) || defined(__i386__)
          __builtin_ia32_pause();
#endif
        }
      }
    }
  }
  std::atomic<bool> locked_{false};
};

// include/linux/ptr_ring.h: __ptr_ring_produce(), __ptr_ring_empty(), __ptr_ring_consume()
// with __ptr_ring_discard_one()'s batched zeroing.
class PtrRing {
 public:
  explicit PtrRing(uint32_t size) : q_(size), size_(size) {
    // ptr_ring_init() -> __ptr_ring_set_size(): batch = SMP_CACHE_BYTES * 2 / sizeof(void *)
    batch_ = 64 * 2 / sizeof(void*);
    if (batch_ > size_ / 2 || batch_ == 0) batch_ = 1;
  }
  uint32_t size() const noexcept { return size_; }
  uint32_t count() const noexcept {
    return static_cast<uint32_t>(produced_.load(std::memory_order_relaxed) - consumed_.load(std::memory_order_relaxed));
  }
  SpinLock& producer_lock() noexcept { return producer_lock_; }
  SpinLock& consumer_lock() noexcept { return consumer_lock_; }

  // __ptr_ring_produce(), under the producer lock: false (-ENOSPC) when the slot at the
  // producer index is not yet zeroed.
  bool produce_locked(uint64_t v) noexcept {
    if (size_ == 0 || q_[producer_].load(std::memory_order_relaxed) != 0) return false;
    q_[producer_].store(v, std::memory_order_release);
    if (++producer_ >= size_) producer_ = 0;
    produced_.store(produced_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return true;
  }
  // __ptr_ring_empty(): a lockless peek at the consumer head (consumer side).
  bool empty() const noexcept { return q_[consumer_head_].load(std::memory_order_acquire) == 0; }
  // __ptr_ring_consume() up to max times into out, under the consumer lock: how many.
  // The indices stay in registers across the batch (the slot stores would otherwise make
  // the compiler reload them for every entry).
  uint32_t consume_batch_locked(uint64_t* out, uint32_t max) noexcept {
    uint32_t consumer_head = consumer_head_, consumer_tail = consumer_tail_, got = 0;
    while (got < max) {
      const uint64_t v = q_[consumer_head].load(std::memory_order_acquire);
      if (v == 0) break;
      out[got++] = v;
      // __ptr_ring_discard_one()
      int64_t head = consumer_head++;
      if (consumer_head - consumer_tail >= batch_ || consumer_head >= size_) {
        while (head >= static_cast<int64_t>(consumer_tail)) q_[static_cast<size_t>(head--)].store(0, std::memory_order_release);
        consumer_tail = consumer_head;
      }
      if (consumer_head >= size_) {
        consumer_head = 0;
        consumer_tail = 0;
      }
    }
    consumer_head_ = consumer_head;
    consumer_tail_ = consumer_tail;
    consumed_.store(consumed_.load(std::memory_order_relaxed) + got, std::memory_order_relaxed);
    return got;
  }
  // __ptr_ring_consume(), under the consumer lock: 0 when empty.
  uint64_t consume_locked() noexcept {
    const uint64_t v = q_[consumer_head_].load(std::memory_order_acquire);
    if (v == 0) return 0;
    // __ptr_ring_discard_one()
    uint32_t consumer_head = consumer_head_;
    int64_t head = consumer_head++;
    if (consumer_head - consumer_tail_ >= batch_ || consumer_head >= size_) {
      while (head >= static_cast<int64_t>(consumer_tail_)) q_[static_cast<size_t>(head--)].store(0, std::memory_order_release);
      consumer_tail_ = consumer_head;
    }
    if (consumer_head >= size_) {
      consumer_head = 0;
      consumer_tail_ = 0;
    }
    consumer_head_ = consumer_head;
    consumed_.store(consumed_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return v;
  }

 private:
  std::vector<std::atomic<uint64_t>> q_;
  uint32_t size_, batch_;
  alignas(64) SpinLock producer_lock_;
  uint32_t producer_ = 0;
  std::atomic<uint64_t> produced_{0};
  alignas(64) SpinLock consumer_lock_;
  uint32_t consumer_head_ = 0, consumer_tail_ = 0;
  std::atomic<uint64_t> consumed_{0};
};

}  // namespace

struct PagePool::Impl {
  explicit Impl(PagePoolParams params, uint32_t ring_size) : p(std::move(params)), ring(ring_size) {}
  PagePoolParams p;
  PtrRing ring;
  PagePool* self = nullptr;
  bool dma_map = false;
  uint64_t page_bytes = kPageSize;
  std::vector<NetIovArea*> areas;  // where the pool's buffers live (reports)
  // page_pool.c pages_state_hold_cnt (owner) and pages_state_release_cnt (any thread).
  std::atomic<uint32_t> hold_cnt{0}, release_cnt{0};
  // The pool's list of DMA-mapped pages (pool->dma_mapped, an xarray in Linux), and the
  // lock that page_pool_scrub() uses to stop syncs (the kernel's synchronize_net()).
  std::mutex dma_mu;
  std::vector<Netmem> mapped;
  // Fragments (pool->frag_page, frag_offset, frag_users): the owning context's.
  Netmem frag_page{};
  uint32_t frag_offset = 0;
  int64_t frag_users = 0;
  // Destruction: page_pool_destroy() and page_pool_release_retry().
  uint32_t destroy_cnt = 0;
  std::mutex destroy_mu;
  std::condition_variable destroy_cv;

  NetmemMeta& meta(Netmem n) const noexcept { return netmem_meta(n); }
  void set_pp_info(Netmem n) noexcept;
  bool dma_map_netmem(Netmem n) noexcept;
  void unmap_netmem_dma(Netmem n) noexcept;
  void return_netmem(Netmem n) noexcept;
  Netmem refill_alloc_cache() noexcept;
  Netmem alloc_netmems_slow() noexcept;
  void flush_dead() noexcept;
  int64_t unref_netmem(NetmemMeta& m, int64_t nr) noexcept;
  Netmem drain_frag(Netmem n) noexcept;
  void free_frag() noexcept;
  void scrub() noexcept;
  int32_t release() noexcept;
  void destroy_now() noexcept;
  void retry_loop() noexcept;
  std::string still_out() const;
};

// page_pool_set_pp_info(): the pool owns the buffer, one pp reference
// (page_pool_fragment_netmem(netmem, 1)).
void PagePool::Impl::set_pp_info(Netmem n) noexcept {
  NetmemMeta& m = meta(n);
  m.pp.store(self, std::memory_order_relaxed);
  m.pp_ref_count.store(1, std::memory_order_relaxed);
}

// page_pool_dma_map(): mapped once for the page's life in the pool (SKIP_CPU_SYNC), the
// DMA address kept in the metadata, the page listed for page_pool_scrub()
// (page_pool_register_dma_index()), then synced for the device up to max_len.
bool PagePool::Impl::dma_map_netmem(Netmem n) noexcept {
  auto seg = p.dev->map_phys(netmem_phys(n), page_bytes, p.dma_dir, kDmaAttrSkipCpuSync);
  if (!seg) return false;
  NetmemMeta& m = meta(n);
  m.dma_addr = seg->addr.value();
  m.dma_flags = seg->flags.bits();
  {
    std::lock_guard g(dma_mu);
    mapped.push_back(n);
    m.dma_index = static_cast<uint32_t>(mapped.size());
  }
  if (self->dma_sync()) self->sync_for_device(n, m, p.max_len);
  return true;
}

// __page_pool_unmap_netmem_dma(): unmapped once, by whichever of the release and the scrub
// takes the page off the list first.
void PagePool::Impl::unmap_netmem_dma(Netmem n) noexcept {
  if (!dma_map) return;
  NetmemMeta& m = meta(n);
  {
    std::lock_guard g(dma_mu);
    const uint32_t idx = m.dma_index;
    if (idx == 0) return;
    const Netmem last = mapped.back();
    mapped[idx - 1] = last;
    meta(last).dma_index = idx;
    mapped.pop_back();
    m.dma_index = 0;
  }
  (void)p.dev->unmap_phys(DmaSegment{DmaAddr(m.dma_addr), page_bytes, DmaSegFlags::from_bits(m.dma_flags)}, p.dma_dir,
                          kDmaAttrSkipCpuSync);
}

// page_pool_return_netmem(): the buffer leaves the pool: the provider takes it
// (release_netmem) or the pool unmaps it (__page_pool_release_netmem_dma) and puts the
// page; pages_state_release_cnt counts it. Past the count the pool may be gone.
void PagePool::Impl::return_netmem(Netmem n) noexcept {
  // Marked free before the provider or the page allocator can hand it out again: a store
  // after the release could land on a buffer another thread has already allocated.
  meta(n).state.store(NetmemMeta::kFree, std::memory_order_relaxed);
  bool put = true;
  if (p.mp) {
    put = p.mp->release_netmem(*self, n);
  } else {
    unmap_netmem_dma(n);
    meta(n).dma_addr = 0;
  }
  NetmemMeta& m = meta(n);
  if (put) m.pp.store(nullptr, std::memory_order_relaxed);  // page_pool_clear_pp_info()
  HostPages* pages = p.pages;
  if (self->detached()) {
    // The retry thread waits on this; it frees the pool only after taking the mutex.
    std::lock_guard g(destroy_mu);
    release_cnt.fetch_add(1, std::memory_order_acq_rel);
    destroy_cv.notify_one();
  } else {
    release_cnt.fetch_add(1, std::memory_order_acq_rel);
  }
  if (put && pages) pages->put_page(n);
}

// page_pool_refill_alloc_cache(): up to 64 from the ring; an empty ring is counted (empty)
// and the caller goes to the slow path. Buffers of a dead area are released on the way
// (physr: where the kernel releases a NUMA mismatch and counts waive; physr has one node).
Netmem PagePool::Impl::refill_alloc_cache() noexcept {
  PagePool& s = *self;
  if (ring.empty()) {
    bump(s.alloc_.empty);
    return {};
  }
  uint64_t got[kAllocCacheRefill];
  uint32_t n_got;
  {
    std::lock_guard g(ring.consumer_lock());
    n_got = ring.consume_batch_locked(got, kAllocCacheRefill - s.count_);
  }
  uint32_t count = s.count_;
  for (uint32_t i = 0; i < n_got; ++i) {
    const Netmem n = Netmem::from_raw(got[i]);
    if (netmem_area(n)->dead()) [[unlikely]] {
      return_netmem(n);
    } else {
      s.cache_[count++] = n;
    }
  }
  s.count_ = count;
  if (s.count_ > 0) {
    bump(s.alloc_.refill);
    return s.cache_[--s.count_];
  }
  return {};
}

// __page_pool_alloc_netmems_slow(): order 0 in bulks of 64 from the page allocator, each
// mapped (a failed mapping puts the page back) and counted as held, the last one returned;
// higher orders one at a time (__page_pool_alloc_page_order(), slow_high_order).
Netmem PagePool::Impl::alloc_netmems_slow() noexcept {
  PagePool& s = *self;
  if (p.order != 0) {
    const Netmem n = p.pages->alloc(p.order);
    if (!n) return {};
    if (dma_map && !dma_map_netmem(n)) {
      p.pages->put_page(n);
      return {};
    }
    bump(s.alloc_.slow_high_order);
    set_pp_info(n);
    hold_cnt.store(hold_cnt.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return n;
  }
  if (s.count_ > 0) return s.cache_[--s.count_];
  Netmem bulk[kAllocCacheRefill];
  const size_t got = p.pages->alloc_bulk(kAllocCacheRefill, bulk);
  if (got == 0) return {};
  for (size_t i = 0; i < got; ++i) {
    const Netmem n = bulk[i];
    if (dma_map && !dma_map_netmem(n)) {
      p.pages->put_page(n);
      continue;
    }
    set_pp_info(n);
    if (s.debug()) meta(n).state.store(NetmemMeta::kInPool, std::memory_order_relaxed);
    s.cache_[s.count_++] = n;
    hold_cnt.store(hold_cnt.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
  if (s.count_ == 0) return {};
  bump(s.alloc_.slow);
  return s.cache_[--s.count_];
}

// A provider's area died (revoke): drop its buffers from the cache and the ring.
void PagePool::Impl::flush_dead() noexcept {
  PagePool& s = *self;
  s.slow_.fetch_and(static_cast<uint8_t>(~kSlowFlush), std::memory_order_acq_rel);
  uint32_t kept = 0;
  for (uint32_t i = 0; i < s.count_; ++i) {
    const Netmem n = s.cache_[i];
    if (netmem_area(n)->dead()) {
      return_netmem(n);
    } else {
      s.cache_[kept++] = n;
    }
  }
  s.count_ = kept;
  std::vector<Netmem> live;
  {
    std::lock_guard g(ring.consumer_lock());
    for (uint64_t v; (v = ring.consume_locked()) != 0;) {
      const Netmem n = Netmem::from_raw(v);
      if (netmem_area(n)->dead()) {
        return_netmem(n);
      } else {
        live.push_back(n);
      }
    }
  }
  // Back into the ring; a slot still waiting for its batch to be zeroed releases the buffer.
  std::vector<Netmem> overflow;
  {
    std::lock_guard g(ring.producer_lock());
    for (const Netmem n : live) {
      if (!ring.produce_locked(n.raw())) overflow.push_back(n);
    }
  }
  for (const Netmem n : overflow) return_netmem(n);
}

// helpers.h page_pool_unref_netmem().
int64_t PagePool::Impl::unref_netmem(NetmemMeta& m, int64_t nr) noexcept {
  if (m.pp_ref_count.load(std::memory_order_relaxed) == nr) {
    m.pp_ref_count.store(1, std::memory_order_relaxed);
    return 0;
  }
  const int64_t ret = m.pp_ref_count.fetch_sub(nr, std::memory_order_acq_rel) - nr;
  if (ret < 0) emit(p.report, "page_pool: negative pp_ref_count (" + std::to_string(ret) + ")");  // WARN_ON(ret < 0)
  if (ret == 0) m.pp_ref_count.store(1, std::memory_order_relaxed);
  return ret;
}

// page_pool_drain_frag().
Netmem PagePool::Impl::drain_frag(Netmem n) noexcept {
  const int64_t drain_count = kBiasMax - frag_users;
  NetmemMeta& m = meta(n);
  if (unref_netmem(m, drain_count) != 0) return {};
  if (n.is_net_iov() || m.page_refs.load(std::memory_order_relaxed) == 1) {
    if (self->dma_sync()) self->sync_for_device(n, m, kFullSync);
    return n;
  }
  return_netmem(n);
  return {};
}

// page_pool_free_frag().
void PagePool::Impl::free_frag() noexcept {
  const int64_t drain_count = kBiasMax - frag_users;
  const Netmem n = frag_page;
  frag_page = {};
  if (!n || unref_netmem(meta(n), drain_count) != 0) return;
  return_netmem(n);
}

// page_pool_scrub(): the alloc cache emptied once (page_pool_empty_alloc_cache_once()),
// on the first call syncs stopped and every page still mapped unmapped (in-flight pages
// included: dma-unmap only), then the ring emptied (page_pool_empty_ring()).
void PagePool::Impl::scrub() noexcept {
  PagePool& s = *self;
  if (destroy_cnt == 0) {
    while (s.count_) return_netmem(s.cache_[--s.count_]);
  }
  if (destroy_cnt++ == 0 && dma_map) {
    std::vector<Netmem> unmap;
    {
      std::lock_guard g(dma_mu);
      s.set_dma_sync(false);
      unmap.swap(mapped);
      for (const Netmem n : unmap) meta(n).dma_index = 0;
    }
    for (const Netmem n : unmap) {
      const NetmemMeta& m = meta(n);
      (void)p.dev->unmap_phys(DmaSegment{DmaAddr(m.dma_addr), page_bytes, DmaSegFlags::from_bits(m.dma_flags)},
                              p.dma_dir, kDmaAttrSkipCpuSync);
    }
  }
  for (;;) {
    uint64_t v;
    {
      std::lock_guard g(ring.consumer_lock());  // ptr_ring_consume_bh()
      v = ring.consume_locked();
    }
    if (v == 0) break;
    return_netmem(Netmem::from_raw(v));
  }
}

// page_pool_release(): scrub, count what is still out, wait out producers in the ring;
// nothing out: the pool goes.
int32_t PagePool::Impl::release() noexcept {
  scrub();
  const int32_t inflight = self->inflight();
  if (inflight < 0) emit(p.report, "page_pool: Negative(" + std::to_string(inflight) + ") inflight packet-pages");
  { std::lock_guard g(ring.producer_lock()); }
  if (inflight == 0) destroy_now();
  return inflight;
}

// __page_pool_destroy() and page_pool_uninit(): disconnect, the provider's destroy, free.
void PagePool::Impl::destroy_now() noexcept {
  { std::lock_guard g(destroy_mu); }  // a last returner has left the mutex
  auto disconnect = std::move(p.disconnect);
  if (p.mp) p.mp->destroy(*self);
  delete self;
  if (disconnect) disconnect();
}

std::string PagePool::Impl::still_out() const {
  std::string s;
  size_t named = 0, total = 0;
  for (NetIovArea* a : areas) {
    for (uint64_t i = 0; i < a->count(); ++i) {
      const NetmemMeta& m = a->meta(i);
      if (m.pp.load(std::memory_order_relaxed) != self || m.state.load(std::memory_order_relaxed) != NetmemMeta::kOut) continue;
      ++total;
      if (named++ < 16) s += (s.empty() ? "" : ", ") + netmem_name(a->netmem(i));
    }
  }
  if (total > 16) s += ", and " + std::to_string(total - 16) + " more";
  return s;
}

// page_pool_release_retry(): every defer_time (or as soon as the last buffer returns),
// release again; every defer_warn, report the stalled shutdown.
void PagePool::Impl::retry_loop() noexcept {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto warn_at = start + p.defer_warn;
  for (;;) {
    {
      std::unique_lock lk(destroy_mu);
      destroy_cv.wait_for(lk, p.defer_time, [&] { return self->inflight() <= 0; });
    }
    const int32_t inflight = release();
    if (inflight <= 0) return;  // 0: destroyed; negative: never recovers (the kernel stops too)
    const auto now = Clock::now();
    if (now >= warn_at) {
      const auto sec = std::chrono::duration_cast<std::chrono::seconds>(now - start).count();
      std::string msg = "page_pool_release_retry() stalled pool shutdown: id " + std::to_string(self->id_) + ", " +
                        std::to_string(inflight) + " inflight " + std::to_string(sec) + " sec";
      if (!p.name.empty()) msg += " (" + p.name + ")";
      if (self->debug()) msg += "; still out: " + still_out();
      emit(p.report, msg);
      warn_at = now + p.defer_warn;
    }
  }
}

// -------------------------------------------------------------------------------------
// PagePool

PagePool::PagePool(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PagePool::~PagePool() = default;

// page_pool_create() -> page_pool_init().
Result<PagePool*> PagePool::create(PagePoolParams params) {
  const PagePoolFlags known = kPPFlagDmaMap | kPPFlagDmaSyncDev;
  if (!(params.flags & ~known).empty())
    return make_error(EINVAL, "page_pool: unknown flags " + format_hex(params.flags.bits()));
  const uint32_t ring_qsize = params.pool_size ? std::min(params.pool_size, kMaxRingSize) : kDefaultRingSize;
  bool dma_map = false, dma_sync = false;
  if (params.flags.has(kPPFlagDmaMap)) {
    if (params.dma_dir != DmaDirection::from_device && params.dma_dir != DmaDirection::bidirectional)
      return make_error(EINVAL, std::string("page_pool: DMA direction ") + dma_direction_name(params.dma_dir) +
                                    " (PP_FLAG_DMA_MAP wants from_device or bidirectional)");
    if (!params.dev) return make_error(EINVAL, "page_pool: PP_FLAG_DMA_MAP without a DMA device");
    dma_map = true;
  }
  if (params.flags.has(kPPFlagDmaSyncDev)) {
    if (!dma_map) return make_error(EINVAL, "page_pool: PP_FLAG_DMA_SYNC_DEV without PP_FLAG_DMA_MAP");
    if (params.max_len == 0) return make_error(EINVAL, "page_pool: PP_FLAG_DMA_SYNC_DEV with max_len 0");
    const uint64_t page = params.order <= kMaxPageOrder ? kPageSize << params.order : ~uint64_t{0};
    if (uint64_t{params.offset} + params.max_len > page)
      return make_error(EINVAL, "page_pool: offset " + std::to_string(params.offset) + " + max_len " +
                                    std::to_string(params.max_len) + " runs past the " + format_size(page) + " page");
    dma_sync = true;
  }
  if (!params.mp) {
    if (params.order > kMaxPageOrder)
      return make_error(EINVAL, "page_pool: order " + std::to_string(params.order) + " is above MAX_PAGE_ORDER 10");
    if (!params.pages) return make_error(EINVAL, "page_pool: no page allocator and no memory provider");
  } else if (!dma_map || !dma_sync) {
    return make_error(EOPNOTSUPP, "page_pool: a memory provider needs PP_FLAG_DMA_MAP and PP_FLAG_DMA_SYNC_DEV");
  }
  auto impl = std::make_unique<Impl>(std::move(params), ring_qsize);
  Impl& m = *impl;
  PagePool* pool = new PagePool(std::move(impl));
  m.self = pool;
  m.dma_map = dma_map;
  m.page_bytes = kPageSize << (m.p.order <= kMaxPageOrder ? m.p.order : 0);
  pool->slow_.store(static_cast<uint8_t>((m.p.debug ? kSlowDebug : 0) | (dma_sync ? kSlowSync : 0)),
                    std::memory_order_relaxed);
  pool->id_ = g_pool_ids.fetch_add(1, std::memory_order_relaxed) + 1;
  if (m.p.napi) pool->owner_.store(pthread_self(), std::memory_order_relaxed);
  if (m.p.mp) {
    if (Status st = m.p.mp->init(*pool); !st) {
      const std::string context = "page_pool: memory provider " + m.p.mp->name();
      delete pool;
      return std::move(st).error().with_context(context);
    }
    m.areas = m.p.mp->areas();
  } else {
    m.areas = {&m.p.pages->area()};
  }
  return pool;
}

void PagePool::destroy() {
  Impl& m = *impl_;
  disable_direct_recycling();
  m.free_frag();
  slow_.fetch_or(kSlowDetached, std::memory_order_acq_rel);
  if (m.release() == 0) return;  // freed
  // page_pool_destroy(): the release is retried from delayed work (here a thread of its own).
  std::thread([&m] { m.retry_loop(); }).detach();
}

Netmem PagePool::alloc_slow() noexcept {
  Impl& m = *impl_;
  if (slow_.load(std::memory_order_acquire) & kSlowFlush) m.flush_dead();
  Netmem n;
  if (count_ != 0) {
    n = cache_[--count_];
    bump(alloc_.fast);
  } else {
    n = m.refill_alloc_cache();
    if (!n) n = m.p.mp ? m.p.mp->alloc_netmems(*this) : m.alloc_netmems_slow();
  }
  if (n && debug()) netmem_meta(n).state.store(NetmemMeta::kOut, std::memory_order_relaxed);
  return n;
}

// page_pool_alloc_frag_netmem().
Netmem PagePool::alloc_frag(uint32_t* offset, uint32_t size) noexcept {
  Impl& m = *impl_;
  const uint32_t max_size = static_cast<uint32_t>(m.page_bytes);
  Netmem n = m.frag_page;
  if (size > max_size) {  // WARN_ON(size > max_size)
    emit(m.p.report, "page_pool_alloc_frag(): " + std::to_string(size) + " bytes is more than the page");
    return {};
  }
  size = (size + kDmaCacheAlignment - 1) / kDmaCacheAlignment * kDmaCacheAlignment;
  *offset = m.frag_offset;
  bool reset = false;
  if (n && *offset + size > max_size) {
    n = m.drain_frag(n);
    if (n) {
      bump(recycle_.cached);
      bump(alloc_.fast);
      reset = true;
    }
  }
  if (!n) {
    n = alloc_netmems();
    if (!n) {
      m.frag_page = {};
      return {};
    }
    m.frag_page = n;
    reset = true;
  }
  if (reset) {
    m.frag_users = 1;
    *offset = 0;
    m.frag_offset = size;
    fragment_netmem(n, kBiasMax);
    return n;
  }
  ++m.frag_users;
  m.frag_offset = *offset + size;
  return n;
}

// helpers.h page_pool_alloc_netmem().
Netmem PagePool::alloc_netmem(uint32_t* offset, uint32_t* size) noexcept {
  Impl& m = *impl_;
  const uint32_t max_size = static_cast<uint32_t>(m.page_bytes);
  if ((uint64_t{*size} << 1) > max_size) {
    *size = max_size;
    *offset = 0;
    return alloc_netmems();
  }
  const Netmem n = alloc_frag(offset, *size);
  if (!n) return {};
  if (m.frag_offset + *size > max_size) {
    *size = max_size - *offset;
    m.frag_offset = max_size;
  }
  return n;
}

Status PagePool::check_put(Netmem n, const NetIovArea* a) const {
  if (!a) return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": use after release: " + netmem_name(n) + ": its memory is gone");
  if (n.index() >= a->count()) return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": not a buffer: " + netmem_name(n));
  const NetmemMeta& m = a->meta(n.index());
  const PagePool* pp = m.pp.load(std::memory_order_acquire);
  if (!pp)
    return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": use after release: " + netmem_name(n) +
                                  " belongs to no page pool (released to its provider or the page allocator)");
  if (pp != this)
    return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": recycle into the wrong pool: " + netmem_name(n) +
                                  " belongs to page_pool " + std::to_string(pp->id_));
  if (m.state.load(std::memory_order_relaxed) != NetmemMeta::kOut)
    return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": double recycle: " + netmem_name(n) +
                                  " is already back in the pool");
  if (m.pp_ref_count.load(std::memory_order_relaxed) < 1)
    return make_error(EINVAL, "page_pool " + std::to_string(id_) + ": pp_ref_count underflow on " + netmem_name(n));
  return {};
}

// __page_pool_put_page()'s other outcomes: a page with more references than the pool's
// (released_refcnt), and, physr's, a buffer of a dead area or of a destroyed pool (released
// at once; the kernel would put the latter in the ring for the next retry to release).
void PagePool::put_slow(Netmem n, NetmemMeta& m, NetIovArea& a) noexcept {
  if (!n.is_net_iov() && m.page_refs.load(std::memory_order_relaxed) != 1) {
    recycle_.released_refcnt.fetch_add(1, std::memory_order_relaxed);
  }
  (void)a;
  impl_->return_netmem(n);
}

// page_pool_recycle_in_ring(), then the ring_full release of page_pool_put_unrefed_netmem().
void PagePool::recycle_in_ring_or_release(Netmem n, NetmemMeta& m) noexcept {
  Impl& im = *impl_;
  if (debug()) m.state.store(NetmemMeta::kInPool, std::memory_order_relaxed);
  {
    std::lock_guard g(im.ring.producer_lock());
    if (im.ring.produce_locked(n.raw())) {
      bump(recycle_.ring);
      return;
    }
  }
  recycle_.ring_full.fetch_add(1, std::memory_order_relaxed);
  im.return_netmem(n);
}

// page_pool_dma_sync_for_device() -> __page_pool_dma_sync_for_device(): min(dma_sync_size,
// max_len) bytes at dma_addr + offset, re-checked under the lock page_pool_scrub() takes.
void PagePool::sync_for_device(Netmem n, NetmemMeta& m, uint32_t dma_sync_size) noexcept {
  Impl& im = *impl_;
  std::lock_guard g(im.dma_mu);
  if (!dma_sync()) return;
  const uint32_t len = std::min(dma_sync_size, im.p.max_len);
  (void)n;
  (void)im.p.dev->sync_phys_for_device(
      DmaSegment{DmaAddr(m.dma_addr + im.p.offset), len, DmaSegFlags::from_bits(m.dma_flags)}, im.p.dma_dir);
}

// page_pool_dma_sync_netmem_for_cpu() -> __page_pool_dma_sync_for_cpu().
void PagePool::dma_sync_for_cpu(Netmem n, uint32_t offset, uint32_t size) noexcept {
  Impl& im = *impl_;
  if (!dma_sync_for_cpu_ || !im.p.dev) return;
  const NetmemMeta& m = netmem_meta(n);
  (void)im.p.dev->sync_phys_for_cpu(
      DmaSegment{DmaAddr(m.dma_addr + offset + im.p.offset), size, DmaSegFlags::from_bits(m.dma_flags)}, im.p.dma_dir);
}

// page_pool_inflight(): u32 serial-number distance of hold and release.
int32_t PagePool::inflight() const noexcept {
  const uint32_t release = impl_->release_cnt.load(std::memory_order_acquire);
  const uint32_t hold = impl_->hold_cnt.load(std::memory_order_relaxed);
  return static_cast<int32_t>(hold - release);
}

PagePoolStats PagePool::stats() const noexcept {
  PagePoolStats s;
  s.alloc = {alloc_.fast.load(std::memory_order_relaxed), alloc_.slow.load(std::memory_order_relaxed),
             alloc_.slow_high_order.load(std::memory_order_relaxed), alloc_.empty.load(std::memory_order_relaxed),
             alloc_.refill.load(std::memory_order_relaxed), alloc_.waive.load(std::memory_order_relaxed)};
  s.recycle = {recycle_.cached.load(std::memory_order_relaxed), recycle_.cache_full.load(std::memory_order_relaxed),
               recycle_.ring.load(std::memory_order_relaxed), recycle_.ring_full.load(std::memory_order_relaxed),
               recycle_.released_refcnt.load(std::memory_order_relaxed)};
  return s;
}

const PagePoolParams& PagePool::params() const noexcept { return impl_->p; }
uint32_t PagePool::ring_count() const noexcept { return impl_->ring.count(); }
uint32_t PagePool::ring_size() const noexcept { return impl_->ring.size(); }

// net_mp_niov_set_page_pool(): page_pool_set_pp_info() and pages_state_hold_cnt++.
void PagePool::mp_niov_set_page_pool(Netmem n) noexcept {
  impl_->set_pp_info(n);
  impl_->hold_cnt.store(impl_->hold_cnt.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

// net_mp_niov_clear_page_pool() -> page_pool_clear_pp_info().
void PagePool::mp_niov_clear_page_pool(Netmem n) noexcept { netmem_meta(n).pp.store(nullptr, std::memory_order_relaxed); }

// -------------------------------------------------------------------------------------
// HostPages

Result<std::unique_ptr<HostPages>> HostPages::create(PhysSpan ram, std::string name) {
  if (ram.size == 0 || ram.base.value() % kPageSize != 0 || ram.size % kPageSize != 0)
    return make_error(EINVAL, "host pages: " + format_hex(ram.base.value()) + " + " + format_size(ram.size) +
                                  " is not whole 4 KiB pages");
  std::unique_ptr<HostPages> h(new HostPages());
  PHYSR_ASSIGN_OR_RETURN(h->area_, NetIovArea::create({.count = ram.size / kPageSize, .base = ram.base,
                                                       .provider = kHostMemory, .net_iov = false, .name = std::move(name)}));
  return h;
}

HostPages::~HostPages() = default;

Netmem HostPages::alloc(unsigned order) {
  if (order > PagePool::kMaxPageOrder) return {};
  const uint64_t pages = uint64_t{1} << order;
  std::lock_guard g(mu_);
  uint64_t idx;
  if (!free_[order].empty()) {
    idx = free_[order].back();
    free_[order].pop_back();
  } else {
    const uint64_t aligned = (bump_ + pages - 1) & ~(pages - 1);
    if (aligned + pages > area_->count()) return {};
    for (uint64_t i = bump_; i < aligned; ++i) free_[0].push_back(i);  // skipped: order-0 pages
    idx = aligned;
    bump_ = aligned + pages;
  }
  NetmemMeta& m = area_->meta(idx);
  m.page_refs.store(1, std::memory_order_relaxed);
  m.order = static_cast<uint8_t>(order);
  allocated_ += pages;
  return area_->netmem(idx);
}

size_t HostPages::alloc_bulk(size_t n, Netmem* out) {
  size_t got = 0;
  while (got < n) {
    const Netmem p = alloc(0);
    if (!p) break;
    out[got++] = p;
  }
  return got;
}

void HostPages::get_page(Netmem n) noexcept { area_->meta(n.index()).page_refs.fetch_add(1, std::memory_order_relaxed); }

void HostPages::put_page(Netmem n) noexcept {
  NetmemMeta& m = area_->meta(n.index());
  if (m.page_refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  std::lock_guard g(mu_);
  free_[m.order].push_back(n.index());
  allocated_ -= uint64_t{1} << m.order;
}

uint64_t HostPages::allocated_pages() const {
  std::lock_guard g(mu_);
  return allocated_;
}

// -------------------------------------------------------------------------------------
// Memory providers

AreaMemoryProvider::AreaMemoryProvider(std::unique_ptr<NetIovArea> area, bool dma_sync)
    : area_(std::move(area)), dma_sync_(dma_sync) {
  free_.reserve(area_->count());
  for (uint64_t i = area_->count(); i-- > 0;) free_.push_back(i);
}

AreaMemoryProvider::~AreaMemoryProvider() = default;

// mp_dmabuf_devmem_init() (order 0 or E2BIG; dma-buf memory is not synced) and the
// binding's one mapping of its memory for the device (net_devmem_bind_dmabuf()).
Status AreaMemoryProvider::init(PagePool& pool) {
  std::lock_guard g(mu_);
  if (bound_) return make_error(EBUSY, area_->name() + ": bound to page_pool " + std::to_string(bound_->id()) + " already");
  if (area_->dead()) return make_error(ENODEV, area_->name() + ": revoked");
  if (pool.params().order != 0)
    return make_error(E2BIG, area_->name() + ": order " + std::to_string(pool.params().order) + " (a provider serves order 0)");
  DmaDevice* dev = pool.params().dev;
  PHYSR_ASSIGN_OR_RETURN(seg_, dev->map_phys(area_->base(), area_->count() * NetIovArea::kBufferSize, pool.params().dma_dir,
                                             kDmaAttrSkipCpuSync));
  for (uint64_t i = 0; i < area_->count(); ++i) {
    NetmemMeta& m = area_->meta(i);
    m.dma_addr = seg_.addr.value() + i * NetIovArea::kBufferSize;
    m.dma_flags = seg_.flags.bits();
  }
  if (!dma_sync_) {
    pool.set_dma_sync(false);
    pool.set_dma_sync_for_cpu(false);
  }
  dev_ = dev;
  dir_ = pool.params().dma_dir;
  bound_ = &pool;
  return {};
}

// mp_dmabuf_devmem_destroy(): unbound; the mapping goes with it.
void AreaMemoryProvider::destroy(PagePool& pool) {
  {
    std::lock_guard g(mu_);
    if (bound_ != &pool) return;
    (void)dev_->unmap_phys(seg_, dir_, kDmaAttrSkipCpuSync);
    bound_ = nullptr;
  }
  maybe_all_back();
}

// mp_dmabuf_devmem_alloc_netmems(): one net_iov (net_devmem_alloc_dmabuf()), set up for
// the pool and counted as held.
Netmem AreaMemoryProvider::alloc_netmems(PagePool& pool) {
  if (area_->dead()) return {};
  uint64_t idx;
  {
    std::lock_guard g(mu_);
    if (free_.empty()) return {};
    idx = free_.back();
    free_.pop_back();
  }
  const Netmem n = area_->netmem(idx);
  pool.mp_niov_set_page_pool(n);
  return n;
}

// mp_dmabuf_devmem_release_page(): only net_iovs with one pp reference come back; the
// pool never puts them.
bool AreaMemoryProvider::release_netmem(PagePool& pool, Netmem n) {
  NetmemMeta& m = netmem_meta(n);
  if (!n.is_net_iov() || m.pp_ref_count.load(std::memory_order_relaxed) != 1) {  // WARN_ON_ONCE
    emit(pool.params().report, area_->name() + ": release of " + netmem_name(n) + " with pp_ref_count " +
                                   std::to_string(m.pp_ref_count.load(std::memory_order_relaxed)));
    return false;
  }
  PagePool::mp_niov_clear_page_pool(n);
  {
    std::lock_guard g(mu_);
    free_.push_back(n.index());
  }
  if (area_->dead()) maybe_all_back();
  return false;
}

void AreaMemoryProvider::revoke() {
  area_->set_dead();
  {
    std::lock_guard g(mu_);
    if (bound_) bound_->request_flush();
  }
  maybe_all_back();
}

uint64_t AreaMemoryProvider::outstanding() const {
  std::lock_guard g(mu_);
  return area_->count() - free_.size();
}

void AreaMemoryProvider::maybe_all_back() {
  {
    std::lock_guard g(mu_);
    if (all_back_done_ || bound_ || free_.size() != area_->count() || !area_->dead()) return;
    all_back_done_ = true;
  }
  all_back();
}

Result<std::unique_ptr<HostMemoryProvider>> HostMemoryProvider::create(PhysSpan ram, std::string name) {
  if (ram.size == 0 || ram.base.value() % kPageSize != 0 || ram.size % kPageSize != 0)
    return make_error(EINVAL, name + ": " + format_hex(ram.base.value()) + " + " + format_size(ram.size) +
                                  " is not whole 4 KiB pages");
  PHYSR_ASSIGN_OR_RETURN(auto area, NetIovArea::create({.count = ram.size / kPageSize, .base = ram.base,
                                                        .provider = kHostMemory, .net_iov = true, .name = std::move(name)}));
  return std::unique_ptr<HostMemoryProvider>(new HostMemoryProvider(std::move(area), true));
}

Result<std::unique_ptr<DeviceMemoryProvider>> DeviceMemoryProvider::create(P2PMemory& mem, uint32_t function, uint64_t size) {
  PHYSR_ASSIGN_OR_RETURN(P2PChunk chunk, mem.alloc(function, size, {.owner = "page_pool device memory provider"}));
  auto area = NetIovArea::create({.count = chunk.span.size / kPageSize, .base = chunk.span.base, .provider = chunk.provider,
                                  .net_iov = true,
                                  .name = "device memory of function " + std::to_string(function)});
  if (!area) {
    (void)mem.free(chunk);
    return std::move(area).error();
  }
  return std::unique_ptr<DeviceMemoryProvider>(new DeviceMemoryProvider(std::move(*area), mem, chunk));
}

DeviceMemoryProvider::DeviceMemoryProvider(std::unique_ptr<NetIovArea> area, P2PMemory& mem, P2PChunk chunk)
    : AreaMemoryProvider(std::move(area), false), mem_(mem), chunk_(chunk) {}

void DeviceMemoryProvider::all_back() {
  (void)mem_.free(chunk_);
  freed_.store(true, std::memory_order_release);
}

DeviceMemoryProvider::~DeviceMemoryProvider() {
  if (freed_.load(std::memory_order_acquire)) return;
  if (const uint64_t out = outstanding(); out != 0) {
    std::fprintf(stderr, "physr: %s: %llu buffers still out at teardown; the P2P chunk stays allocated\n",
                 area_->name().c_str(), static_cast<unsigned long long>(out));
    return;
  }
  all_back();
}

}  // namespace physr::mem
