// physr mem: page pools (Linux net/core/page_pool.c, include/net/page_pool/types.h and
// helpers.h) over host pages or a memory provider (include/net/page_pool/memory_provider.h):
// host memory, or device memory from a P2P memory pool (a GPU BAR).
//
// Design rationale
// - The pool is page_pool.c's: an alloc cache of 128 netmems (PP_ALLOC_CACHE_SIZE) that
//   only the owning thread touches (the kernel's softirq/NAPI context), refilled 64 at a
//   time (PP_ALLOC_CACHE_REFILL) from a ptr_ring that any thread recycles into, then from
//   the page allocator (HostPages here) or the memory provider. Recycling goes straight
//   into the cache only with allow_direct or from the owning thread, and only while it
//   holds fewer than 128; otherwise into the ring; a full ring releases the buffer.
// - The fast paths (alloc from the cache, recycle into it) are inline here: a handle is 8
//   bytes (physr/mem/netmem.hpp) and its metadata two loads away. Everything else (ring,
//   refills, DMA, destroy) is out of line in src/mem/page_pool.cpp.
// - Counters are the kernel's (struct page_pool_alloc_stats, page_pool_recycle_stats) by
//   their names; inflight is hold - release in u32 serial arithmetic, as
//   page_pool_inflight().
// - destroy() is page_pool_destroy(): the pool goes away once every buffer is back; while
//   some are out, a retry thread (page_pool_release_retry's delayed work) tries again and
//   reports a stalled shutdown naming the buffers still out.
// - Debug mode (PagePoolParams::debug, on by default): every put is checked (use after
//   release, the wrong pool, double recycle, pp_ref_count underflow) and refused with
//   EINVAL naming the buffer, changing nothing; the kernel does not check (a WARN at most).
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/mem/netmem.hpp"
#include "physr/mem/uspace.hpp"

namespace physr::mem {

class P2PMemory;
class PagePool;

// -------------------------------------------------------------------------------------
// The page allocator

/// Host pages for page pools without a provider (Linux alloc_pages_bulk_node(),
/// alloc_pages_node(), put_page()): a span of host RAM in 4 KiB pages, handed out at
/// orders 0..10 with a page reference each. Freed blocks go to a free list of their
/// order (no buddy merging). The metadata is one NetIovArea of host pages (no NET_IOV
/// bit). Thread-safe.
class HostPages {
 public:
  /// EINVAL: ram empty or not 4 KiB aligned; errors of NetIovArea::create.
  static Result<std::unique_ptr<HostPages>> create(PhysSpan ram, std::string name = "host RAM");
  ~HostPages();
  /// A block of 2^order pages with one page reference, or an empty Netmem: no room.
  Netmem alloc(unsigned order);
  /// Up to n order-0 pages into out (alloc_pages_bulk_node()); returns how many.
  size_t alloc_bulk(size_t n, Netmem* out);
  /// get_page(): one more page reference.
  void get_page(Netmem n) noexcept;
  /// put_page(): drops a reference; the block is free at zero.
  void put_page(Netmem n) noexcept;
  /// 4 KiB pages currently allocated.
  uint64_t allocated_pages() const;
  /// The area holding every page's metadata.
  NetIovArea& area() noexcept { return *area_; }

 private:
  HostPages() = default;
  std::unique_ptr<NetIovArea> area_;
  mutable std::mutex mu_;
  std::vector<uint64_t> free_[11];  // block head indices per order
  uint64_t bump_ = 0, allocated_ = 0;
};

// -------------------------------------------------------------------------------------
// Memory providers

/// Linux struct memory_provider_ops: where a pool with a provider gets its buffers. The
/// pool calls init() at creation (page_pool_init(), after its own checks), destroy() when
/// it goes away (page_pool_uninit()), alloc_netmems() when its caches are empty and
/// release_netmem() for every buffer that leaves it. A provider hands out net_iovs from
/// NetIovAreas it owns; it sets them up with PagePool::mp_niov_set_page_pool() and takes
/// them back after PagePool::mp_niov_clear_page_pool() (net_mp_niov_set_page_pool(),
/// net_mp_niov_clear_page_pool()). Any binding that owns areas of 4 KiB buffers with DMA
/// addresses (a dma-buf's, for instance) fits behind this interface.
class MemoryProvider {
 public:
  virtual ~MemoryProvider() = default;
  /// Binds the provider to the pool, or refuses it (the pool's creation then fails with
  /// this error). May clear the pool's DMA sync (PagePool::set_dma_sync()).
  virtual Status init(PagePool& pool) = 0;
  /// Unbinds it; every buffer is back by then.
  virtual void destroy(PagePool& pool) = 0;
  /// One buffer for the pool (pp info set, counted as held), or an empty Netmem: none left.
  /// Called on the pool's owning thread.
  virtual Netmem alloc_netmems(PagePool& pool) = 0;
  /// Takes a buffer back from the pool (any thread). true: the pool should put_page() it
  /// itself (host pages only); false: the provider took it.
  virtual bool release_netmem(PagePool& pool, Netmem n) = 0;
  /// The areas whose buffers it hands out (for reports).
  virtual std::vector<NetIovArea*> areas() const = 0;
  virtual std::string name() const = 0;
};

/// What the two providers below share: one NetIovArea of 4 KiB net_iovs, a free list, the
/// area mapped for the pool's device at init (one map_phys of the whole area, as devmem
/// and io_uring zcrx map their memory once when it is bound) and unmapped at destroy, and
/// revocation: revoke() marks the area dead so pools release its buffers instead of
/// recycling them, and no new ones are handed out.
class AreaMemoryProvider : public MemoryProvider {
 public:
  ~AreaMemoryProvider() override;
  /// EBUSY: bound to another pool; E2BIG: the pool's order is not 0 (mp_dmabuf_devmem_init());
  /// errors of DmaDevice::map_phys (EREMOTEIO: the pool's device cannot reach the memory).
  Status init(PagePool& pool) override;
  /// Unmaps the area; once revoked and every buffer is back, all_back() runs.
  void destroy(PagePool& pool) override;
  /// A buffer from the free list, or none when revoked or all are out.
  Netmem alloc_netmems(PagePool& pool) override;
  /// Back on the free list (false); a buffer with pp references left is reported, not taken.
  bool release_netmem(PagePool& pool, Netmem n) override;
  /// The one area; its name.
  std::vector<NetIovArea*> areas() const override { return {area_.get()}; }
  std::string name() const override { return area_->name(); }
  /// The memory is going away: no more buffers are handed out, buffers in flight are
  /// released when they come back. Any thread.
  void revoke();
  /// Buffers not in the provider's free list (held by a pool or its users).
  uint64_t outstanding() const;
  /// Whether revoke() was called.
  bool revoked() const noexcept { return area_->dead(); }

 protected:
  AreaMemoryProvider(std::unique_ptr<NetIovArea> area, bool dma_sync);
  /// Called once the area is unbound and every buffer is back (after revoke() or at
  /// destruction), without locks held.
  virtual void all_back() {}
  std::unique_ptr<NetIovArea> area_;

 private:
  void maybe_all_back();
  mutable std::mutex mu_;
  std::vector<uint64_t> free_;
  PagePool* bound_ = nullptr;
  DmaDevice* dev_ = nullptr;
  DmaSegment seg_{};
  DmaDirection dir_ = DmaDirection::from_device;
  bool dma_sync_ = true, all_back_done_ = false;
};

/// Host memory as a provider (io_uring zcrx's area of user memory): net_iovs over a span of
/// host RAM; the pool keeps DMA sync for it.
class HostMemoryProvider final : public AreaMemoryProvider {
 public:
  /// EINVAL: ram empty or not 4 KiB aligned.
  static Result<std::unique_ptr<HostMemoryProvider>> create(PhysSpan ram, std::string name = "host memory provider");

 private:
  using AreaMemoryProvider::AreaMemoryProvider;
};

/// Device memory as a provider: one chunk of a provider's P2P memory pool (a GPU BAR
/// registered with pci_p2pdma_add_resource()), cut into 4 KiB net_iovs. Like devmem's
/// dma-buf provider it turns the pool's DMA sync off (mp_dmabuf_devmem_init(): device
/// memory is not synced). The P2PMemory must outlive the provider; wire
/// P2PMemory::on_revoke() of the function to revoke() so removal takes the buffers back:
/// the chunk is freed once every buffer is back and the pool is gone.
class DeviceMemoryProvider final : public AreaMemoryProvider {
 public:
  /// `size` bytes (rounded up to 4 KiB) of the function's P2P memory. Errors of
  /// P2PMemory::alloc (ENODEV: no P2P memory, ENOMEM: no room).
  static Result<std::unique_ptr<DeviceMemoryProvider>> create(P2PMemory& mem, uint32_t function, uint64_t size);
  /// Frees the chunk (the pool must be gone; buffers still out are reported and the chunk
  /// then stays allocated).
  ~DeviceMemoryProvider() override;
  const P2PChunk& chunk() const noexcept { return chunk_; }
  /// Whether the chunk went back to the P2P memory pool.
  bool chunk_freed() const noexcept { return freed_.load(std::memory_order_acquire); }

 private:
  DeviceMemoryProvider(std::unique_ptr<NetIovArea> area, P2PMemory& mem, P2PChunk chunk);
  void all_back() override;
  P2PMemory& mem_;
  P2PChunk chunk_;
  std::atomic<bool> freed_{false};
};

// -------------------------------------------------------------------------------------
// The page pool

/// Linux PP_FLAG_*: a set of them is PagePoolFlags.
enum class PagePoolFlag : uint32_t {
  dma_map = 1,       // PP_FLAG_DMA_MAP: the pool maps pages at allocation
  dma_sync_dev = 2,  // PP_FLAG_DMA_SYNC_DEV: sync for device on recycle, up to max_len
};
using PagePoolFlags = Flags<PagePoolFlag>;
inline constexpr PagePoolFlags kPPFlagDmaMap = PagePoolFlag::dma_map;
inline constexpr PagePoolFlags kPPFlagDmaSyncDev = PagePoolFlag::dma_sync_dev;

/// Linux struct page_pool_params, the fields physr models.
struct PagePoolParams {
  PagePoolFlags flags{};
  unsigned order = 0;         // pages of 4 KiB << order; at most 10 (MAX_PAGE_ORDER)
  uint32_t pool_size = 0;     // ptr_ring entries; 0: 1024; capped at 16384
  DmaDevice* dev = nullptr;   // required with kPPFlagDmaMap
  DmaDirection dma_dir = DmaDirection::from_device;  // with DMA_MAP: from_device or bidirectional
  uint32_t max_len = 0;       // with DMA_SYNC_DEV: bytes synced for the device (nonzero)
  uint32_t offset = 0;        // where the device starts writing in each page
  /// The pool's owning thread is the creating one (Linux pool->cpuid / p.napi): recycles
  /// from it go straight into the cache (page_pool_napi_local()).
  bool napi = false;
  HostPages* pages = nullptr;        // the page allocator (required without a provider)
  MemoryProvider* mp = nullptr;      // the memory provider, or none
  bool debug = true;                 // check every put (see the header's rationale)
  std::string name{};                // for reports
  /// Receives stalled-shutdown reports and provider warnings; null: stderr.
  std::function<void(const std::string&)> report{};
  /// Called when the pool is finally freed (Linux pool->disconnect).
  std::function<void()> disconnect{};
  std::chrono::milliseconds defer_time{1000};    // DEFER_TIME: between release retries
  std::chrono::milliseconds defer_warn{60000};   // DEFER_WARN_INTERVAL: between reports
};

/// Linux struct page_pool_alloc_stats and page_pool_recycle_stats.
struct PagePoolStats {
  struct Alloc {
    uint64_t fast = 0, slow = 0, slow_high_order = 0, empty = 0, refill = 0, waive = 0;
  } alloc;
  struct Recycle {
    uint64_t cached = 0, cache_full = 0, ring = 0, ring_full = 0, released_refcnt = 0;
  } recycle;
};

/// A page pool (Linux struct page_pool). Allocation, direct recycling and fragments belong
/// to the owning context (one thread at a time, as the kernel's NAPI); put_netmem() without
/// allow_direct may run on any thread, concurrently.
class PagePool {
 public:
  static constexpr uint32_t kAllocCacheSize = 128;    // PP_ALLOC_CACHE_SIZE
  static constexpr uint32_t kAllocCacheRefill = 64;   // PP_ALLOC_CACHE_REFILL
  static constexpr uint32_t kDefaultRingSize = 1024;  // page_pool_init()'s ring_qsize
  static constexpr uint32_t kMaxRingSize = 16384;     // min(pool_size, 16384)
  static constexpr unsigned kMaxPageOrder = 10;       // MAX_PAGE_ORDER
  static constexpr uint32_t kFullSync = ~uint32_t{0}; // dma_sync_size -1: up to max_len

  /// Linux page_pool_create() with page_pool_init()'s rules: EINVAL for a DMA direction
  /// other than from_device/bidirectional with DMA_MAP, DMA_SYNC_DEV without DMA_MAP or with
  /// max_len 0, (physr) offset + max_len beyond the page, no device with DMA_MAP, no page
  /// allocator without a provider, order above 10 without a provider; with a provider,
  /// EOPNOTSUPP unless DMA_MAP and DMA_SYNC_DEV are both set, then the provider's init()
  /// error (E2BIG for order > 0). The pool lives until destroy() and its last buffer.
  static Result<PagePool*> create(PagePoolParams params);

  /// Linux page_pool_destroy(): direct recycling stops, the caches are emptied, pages still
  /// mapped are unmapped (page_pool_scrub()); the pool is freed now if no buffer is out,
  /// else when the last comes back, with a stalled-shutdown report every defer_warn. No
  /// allocation after this call.
  void destroy();

  /// Linux page_pool_alloc_netmems(): the cache, else a refill from the ring, else the page
  /// allocator or the provider. Empty Netmem: no memory (the kernel's NULL).
  Netmem alloc_netmems() noexcept {
    const uint8_t slow = slow_.load(std::memory_order_relaxed);
    if (count_ != 0 && !(slow & kSlowFlush)) [[likely]] {
      const Netmem n = cache_[--count_];  // __page_pool_get_cached()
      bump(alloc_.fast);
      if (slow & kSlowDebug) netmem_meta(n).state.store(NetmemMeta::kOut, std::memory_order_relaxed);
      return n;
    }
    return alloc_slow();
  }
  /// Linux page_pool_alloc_frag_netmem(): `size` bytes (at most the page) at *offset of a
  /// page shared by fragments (pp_ref_count counts them). Empty Netmem: no memory or
  /// size too big.
  Netmem alloc_frag(uint32_t* offset, uint32_t size) noexcept;
  /// Linux page_pool_alloc_netmem(): a whole page when *size is more than half of it
  /// (then *size is the page and *offset 0), else a fragment (the last one of a page gets
  /// the rest of it in *size).
  Netmem alloc_netmem(uint32_t* offset, uint32_t* size) noexcept;

  /// Linux page_pool_put_netmem(): drops one pp reference; the last one recycles the buffer
  /// (page_pool_put_unrefed_netmem()): sync for device of min(dma_sync_size, max_len) with
  /// DMA_SYNC_DEV, then the cache (allow_direct or the owning thread, fewer than 128), the
  /// ring, or release. Debug mode: EINVAL, changing nothing, for a use after release, a
  /// buffer of another pool, a double recycle or a pp_ref_count underflow.
  Status put_netmem(Netmem n, uint32_t dma_sync_size, bool allow_direct) noexcept {
    NetIovArea* a = netmem_area(n);
    const uint8_t slow = slow_.load(std::memory_order_relaxed);
    if (slow & kSlowDebug) [[unlikely]] {
      PHYSR_RETURN_IF_ERROR(check_put(n, a));
    }
    NetmemMeta& m = a->meta(n.index());
    if (!unref_and_test(m)) return {};
    put_unrefed(n, m, *a, dma_sync_size, allow_direct, slow);
    return {};
  }
  /// Linux page_pool_put_full_netmem(): put_netmem() syncing up to max_len.
  Status put_full_netmem(Netmem n, bool allow_direct) noexcept { return put_netmem(n, kFullSync, allow_direct); }
  /// Linux page_pool_recycle_direct_netmem(): from the owning context, into the cache.
  Status recycle_direct(Netmem n) noexcept { return put_netmem(n, kFullSync, true); }

  /// Linux page_pool_fragment_netmem(): sets a fresh buffer's pp_ref_count to nr.
  static void fragment_netmem(Netmem n, int64_t nr) noexcept {
    netmem_meta(n).pp_ref_count.store(nr, std::memory_order_relaxed);
  }
  /// Linux page_pool_ref_netmem(): one more pp reference.
  static void ref_netmem(Netmem n) noexcept { netmem_meta(n).pp_ref_count.fetch_add(1, std::memory_order_relaxed); }
  /// Linux page_pool_get_dma_addr_netmem().
  static DmaAddr dma_addr(Netmem n) noexcept { return DmaAddr(netmem_meta(n).dma_addr); }
  /// Linux page_pool_dma_sync_netmem_for_cpu(): sync of [offset + p.offset, + size) for the
  /// CPU, unless the provider turned it off.
  void dma_sync_for_cpu(Netmem n, uint32_t offset, uint32_t size) noexcept;

  /// Linux page_pool_inflight(): buffers handed out and not yet released (hold - release).
  int32_t inflight() const noexcept;
  /// page_pool_get_stats().
  PagePoolStats stats() const noexcept;
  /// The pool's id (pool->user.id), for reports.
  uint32_t id() const noexcept { return id_; }
  /// The parameters it was created with.
  const PagePoolParams& params() const noexcept;
  /// Buffers in the alloc cache now (owning thread).
  uint32_t cache_count() const noexcept { return count_; }
  /// Entries in the ptr_ring now.
  uint32_t ring_count() const noexcept;
  /// The ptr_ring's size.
  uint32_t ring_size() const noexcept;
  /// Whether the pool syncs buffers for the device on recycle (DMA_SYNC_DEV, unless the
  /// provider turned it off).
  bool dma_sync() const noexcept { return (slow_.load(std::memory_order_relaxed) & kSlowSync) != 0; }

  /// Linux page_pool_enable_direct_recycling(): the calling thread becomes the owner.
  void enable_direct_recycling() noexcept { owner_.store(pthread_self(), std::memory_order_relaxed); }
  /// Linux page_pool_disable_direct_recycling().
  void disable_direct_recycling() noexcept { owner_.store(0, std::memory_order_relaxed); }

  // For memory providers
  /// net_mp_niov_set_page_pool(): the buffer is the pool's (pp info set, pp_ref_count 1)
  /// and counted as held.
  void mp_niov_set_page_pool(Netmem n) noexcept;
  /// net_mp_niov_clear_page_pool(): clears the pp info (in release_netmem()).
  static void mp_niov_clear_page_pool(Netmem n) noexcept;
  /// The provider's init() may turn DMA sync for device and for CPU off (as devmem does).
  void set_dma_sync(bool on) noexcept {
    if (on) {
      slow_.fetch_or(kSlowSync, std::memory_order_relaxed);
    } else {
      slow_.fetch_and(static_cast<uint8_t>(~kSlowSync), std::memory_order_relaxed);
    }
  }
  void set_dma_sync_for_cpu(bool on) noexcept { dma_sync_for_cpu_ = on; }
  /// A provider's memory is being taken away: the next allocation drops the pool's cached
  /// buffers of dead areas first. Any thread.
  void request_flush() noexcept { slow_.fetch_or(kSlowFlush, std::memory_order_release); }

  struct Impl;

 private:
  explicit PagePool(std::unique_ptr<Impl> impl);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;
  friend struct Impl;

  // Counters only one thread writes (or writers serialised by a lock): a plain
  // increment another thread may read.
  static void bump(std::atomic<uint64_t>& c) noexcept { c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }
  // page_pool_unref_and_test() (helpers.h page_pool_unref_netmem(netmem, 1)).
  static bool unref_and_test(NetmemMeta& m) noexcept {
    if (m.pp_ref_count.load(std::memory_order_relaxed) == 1) return true;
    const int64_t ret = m.pp_ref_count.fetch_sub(1, std::memory_order_acq_rel) - 1;
    if (ret == 0) [[unlikely]] m.pp_ref_count.store(1, std::memory_order_relaxed);
    return ret == 0;
  }
  // page_pool_napi_local(): the owning thread.
  bool napi_local() const noexcept {
    const pthread_t o = owner_.load(std::memory_order_relaxed);
    return o != 0 && pthread_equal(o, pthread_self());
  }
  // page_pool_put_unrefed_netmem() with __page_pool_put_page() inlined.
  void put_unrefed(Netmem n, NetmemMeta& m, NetIovArea& a, uint32_t dma_sync_size, bool allow_direct,
                   uint8_t slow) noexcept {
    if (!allow_direct) allow_direct = napi_local();
    // __page_pool_page_can_be_recycled(): a net_iov (whose area is alive: physr), or a page
    // with one reference (physr models no pfmemalloc pages); not after destroy (physr).
    if (!(slow & kSlowDetached) &&
        (n.is_net_iov() ? !a.dead() : m.page_refs.load(std::memory_order_relaxed) == 1)) [[likely]] {
      if (slow & kSlowSync) sync_for_device(n, m, dma_sync_size);
      // page_pool_recycle_in_cache()
      if (allow_direct) {
        if (count_ != kAllocCacheSize) [[likely]] {
          if (slow & kSlowDebug) m.state.store(NetmemMeta::kInPool, std::memory_order_relaxed);
          cache_[count_++] = n;
          bump(recycle_.cached);
          return;
        }
        bump(recycle_.cache_full);
      }
      recycle_in_ring_or_release(n, m);
      return;
    }
    put_slow(n, m, a);
  }

  Netmem alloc_slow() noexcept;
  Status check_put(Netmem n, const NetIovArea* a) const;
  void put_slow(Netmem n, NetmemMeta& m, NetIovArea& a) noexcept;
  void recycle_in_ring_or_release(Netmem n, NetmemMeta& m) noexcept;
  void sync_for_device(Netmem n, NetmemMeta& m, uint32_t dma_sync_size) noexcept;

  // The owning context's (the kernel's pool->alloc and frag fields).
  uint32_t count_ = 0;
  bool dma_sync_for_cpu_ = true;
  // What sends a put or an allocation off the fast path, in one byte read once per call:
  // debug checks, DMA sync for device, a destroyed pool, a provider's dead area to flush.
  enum : uint8_t { kSlowDebug = 1, kSlowSync = 2, kSlowDetached = 4, kSlowFlush = 8 };
  std::atomic<uint8_t> slow_{0};
  bool debug() const noexcept { return (slow_.load(std::memory_order_relaxed) & kSlowDebug) != 0; }
  bool detached() const noexcept { return (slow_.load(std::memory_order_acquire) & kSlowDetached) != 0; }
  std::atomic<pthread_t> owner_{0};
  uint32_t id_ = 0;
  struct AllocCounters {
    std::atomic<uint64_t> fast{0}, slow{0}, slow_high_order{0}, empty{0}, refill{0}, waive{0};
  } alloc_;
  struct RecycleCounters {
    std::atomic<uint64_t> cached{0}, cache_full{0}, ring{0}, ring_full{0}, released_refcnt{0};
  } recycle_;
  Netmem cache_[kAllocCacheSize];
  std::unique_ptr<Impl> impl_;
};

}  // namespace physr::mem
