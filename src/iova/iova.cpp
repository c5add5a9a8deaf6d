// physr iova: Linux drivers/iommu/iova.c (design rationale in include/physr/iova.hpp).
#include "physr/iova.hpp"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace physr {

namespace {

constexpr unsigned kCachedOrders = 6;         // Linux IOVA_RANGE_CACHE_MAX_SIZE: 1 .. 32 granules
constexpr uint32_t kMagSize = 127;            // Linux IOVA_MAG_SIZE
constexpr uint64_t kAnchor = ~uint64_t{0};    // Linux IOVA_ANCHOR: the node above the space

struct Magazine {
  uint32_t size = 0;
  uint64_t pfns[kMagSize];
};

// Granules actually reserved for a request of g granules (Linux alloc_iova_fast() rounds
// requests below 32 granules up to a power of two).
inline uint64_t reserved_granules(uint64_t g) { return g < 32 ? std::bit_ceil(g) : g; }
// Granules reserved for `size` bytes (rounded up to whole granules without overflowing).
inline uint64_t reserved_for(uint64_t size, unsigned shift) {
  return reserved_granules((size >> shift) + ((size & ((uint64_t{1} << shift) - 1)) != 0));
}
// Linux order_base_2(): the rcache a size belongs to.
inline unsigned order_of(uint64_t g) { return static_cast<unsigned>(std::bit_width(std::bit_ceil(g)) - 1); }
// The same for 1 <= g <= 32 granules (the fast paths): order_base_2(g) = bit_width(g - 1).
inline unsigned fast_order(uint64_t g) { return static_cast<unsigned>(std::bit_width(g - 1)); }

// An allocated or reserved range of the tree, keyed by its first granule (Linux struct iova).
struct Node {
  uint64_t hi;    // last granule, inclusive (pfn_hi)
  bool reserved;  // reserve_iova(): never freed
};
using Tree = std::map<uint64_t, Node>;

// The flusher's half of an asymmetric barrier (Linux's per-CPU spinlock, for threads): after
// it returns, every other thread has executed a full memory barrier, so a fast path that
// stored `busy` before loading `flush_req` (with only a compiler barrier between) either is
// seen busy or sees the request. False when the kernel offers no membarrier().
bool heavy_barrier() {
  static const long cmd = [] {
    if (syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
      return long{MEMBARRIER_CMD_PRIVATE_EXPEDITED};
    if (syscall(__NR_membarrier, MEMBARRIER_CMD_SHARED, 0, 0) == 0) return long{MEMBARRIER_CMD_SHARED};
    return -1L;
  }();
  return cmd >= 0 && syscall(__NR_membarrier, cmd, 0, 0) == 0;
}

std::atomic<uint64_t> g_next_id{1};

}  // namespace

// One thread's magazines for one allocator (Linux struct iova_cpu_rcache). The owner's fast
// paths touch them with no lock: they mark themselves `busy` and step aside to the general
// path, which takes `mu`, while a flusher has set `flush_req`. A flusher (another thread's
// failed allocation, flush_caches()) takes `mu`, sets `flush_req`, runs heavy_barrier() and
// waits for `busy` to clear before it empties the magazines.
struct ThreadCache {
  uint64_t owner = 0;
  std::atomic<uint32_t> busy{0};
  std::atomic<uint32_t> flush_req{0};
  std::mutex mu;
  Magazine* loaded[kCachedOrders] = {};
  Magazine* prev[kCachedOrders] = {};
  ThreadCache() {
    for (unsigned o = 0; o < kCachedOrders; ++o) {
      loaded[o] = new Magazine;
      prev[o] = new Magazine;
    }
  }
  ~ThreadCache() {
    for (unsigned o = 0; o < kCachedOrders; ++o) {
      delete loaded[o];
      delete prev[o];
    }
  }
};

struct IovaAllocator::Impl {
  uint64_t id = g_next_id.fetch_add(1);
  unsigned shift = 12;
  uint64_t start_pfn = 0, end_pfn = 0;
  bool caching = true, check = false;
  // The inline fast paths apply to sizes of 1 to fast_max bytes: 32 granules when caching
  // && !check, else 0 (none). One compare tests both.
  uint64_t fast_max = 0;

  // --- the tree (Linux iova_rbtree_lock) ---
  mutable std::mutex tree_mu;
  Tree tree;
  Tree::iterator anchor, cached_node, cached32_node;
  uint64_t dma_32bit_pfn = 0, max32_alloc_size = 0;
  // Lazy erase: `ghost` is a node freed but still in the map (none: tree.end()); every
  // search but one first erases it (settle()). That one is the walk's first step from the
  // node just above it, which Linux ends on the ghost's own place when the size matches:
  // the node then comes back to life with no map operation. `lent` is the node the tree
  // handed out last (none: tree.end()), so its free needs no lookup, and `lent_next` the
  // node above it, so its free needs no std::next() (a call into libstdc++ and a chain of
  // dependent loads up the tree). An alloc/free cycle of one size thus costs a few
  // compares (the DMA layer maps a 256-page list with one 256-granule IOVA:
  // MapUnmap/iommu/256).
  Tree::iterator ghost, ghost_next, lent, lent_next;  // ghost_next: the node above the ghost
  uint64_t used = 0, reserved = 0;  // granules in allocated nodes (the ghost excluded), in reserved ones
  uint64_t tree_allocs = 0, tree_frees = 0;

  // --- the depot (Linux iova_rcache::lock) ---
  struct Depot {
    std::vector<Magazine*> mags;  // full magazines, a stack (iova_depot_push() / iova_depot_pop())
    bool work_pending = false;    // iova_depot_work_func() scheduled, due at work_at
    std::chrono::steady_clock::time_point work_at{};
  };
  std::mutex depot_mu;
  Depot depot[kCachedOrders];
  std::vector<Magazine*> spares;
  std::chrono::milliseconds depot_delay{100};
  size_t online_cpus = 1;

  // --- every thread's caches, for the flush (Linux for_each_online_cpu) ---
  std::mutex reg_mu;
  std::vector<ThreadCache*> caches;

  std::mutex check_mu;
  std::map<uint64_t, uint64_t> live;  // pfn -> reserved granules (check mode)

  ~Impl();

  // ---------------- the tree (tree_mu held) ----------------

  void settle() {
    if (ghost == tree.end()) return;
    if (lent_next == ghost) lent_next = ghost_next;  // the ghost was the node above `lent`
    tree.erase(std::exchange(ghost, tree.end()));
  }
  // Linux __get_cached_rbnode()
  Tree::iterator get_cached_rbnode(uint64_t limit_pfn) const {
    return limit_pfn <= dma_32bit_pfn ? cached32_node : cached_node;
  }
  // Linux __cached_rbnode_insert_update()
  void cached_rbnode_insert_update(Tree::iterator n) {
    if (n->second.hi < dma_32bit_pfn) cached32_node = n;
    else cached_node = n;
  }
  // Linux __cached_rbnode_delete_update(); `free` is still in the map, the ghost is not.
  void cached_rbnode_delete_update(Tree::iterator free, Tree::iterator next) {
    if (free == cached32_node || (free->second.hi < dma_32bit_pfn && free->first >= cached32_node->first))
      cached32_node = next;
    if (free->first < dma_32bit_pfn) max32_alloc_size = dma_32bit_pfn;
    if (free->first >= cached_node->first) cached_node = next;
  }
  // Linux iova_find_limit(): the lowest node whose last granule reaches limit_pfn (the tree
  // descent may end on its successor when it straddles the limit; the walk from either
  // gives the same address).
  Tree::iterator find_limit(uint64_t limit_pfn) {
    if (limit_pfn > dma_32bit_pfn) return anchor;
    auto node = tree.lower_bound(limit_pfn);
    if (node != tree.begin() && std::prev(node)->second.hi >= limit_pfn) --node;
    return node;
  }

  // Linux __alloc_and_insert_iova_range(size_aligned = true): `size` granules aligned to
  // the next power of two, below limit_pfn (exclusive).
  bool tree_alloc(uint64_t size, uint64_t limit_pfn, uint64_t* out) {
    if (limit_pfn <= dma_32bit_pfn && size >= max32_alloc_size) return false;  // iova32_full
    if (ghost != tree.end()) {
      // The walk's first step from the node above the ghost: where it stops when the
      // result is the ghost's own range (the node below ends before it).
      const Tree::iterator curr = get_cached_rbnode(limit_pfn);
      if (curr == ghost_next) {
        const uint64_t align_mask = ~uint64_t{0} << std::bit_width(size - 1);
        const uint64_t high_pfn = std::min(limit_pfn, curr->first);
        const uint64_t new_pfn = (high_pfn - size) & align_mask;
        if (high_pfn >= size && new_pfn >= start_pfn && new_pfn == ghost->first && ghost->second.hi == new_pfn + size - 1) {
          const Tree::iterator n = std::exchange(ghost, tree.end());
          cached_rbnode_insert_update(n);
          lent = n;
          lent_next = curr;
          used += size;
          ++tree_allocs;
          *out = new_pfn;
          return true;
        }
      }
      settle();
    }
    return tree_walk(size, limit_pfn, out);
  }
  [[gnu::noinline]] bool tree_walk(uint64_t size, uint64_t limit_pfn, uint64_t* out) {
    const uint64_t align_mask = ~uint64_t{0} << std::bit_width(size - 1);
    Tree::iterator curr = get_cached_rbnode(limit_pfn), prev;
    bool have_curr;
    uint64_t new_pfn, high_pfn = limit_pfn, low_pfn = start_pfn;
    const uint64_t retry_pfn = curr->second.hi;
  retry:
    do {
      high_pfn = std::min(high_pfn, curr->first);
      new_pfn = (high_pfn - size) & align_mask;
      prev = curr;
      have_curr = curr != tree.begin();  // curr = rb_prev(curr)
      if (have_curr) --curr;
    } while (have_curr && new_pfn <= curr->second.hi && new_pfn >= low_pfn);
    if (high_pfn < size || new_pfn < low_pfn) {
      if (low_pfn == start_pfn && retry_pfn < limit_pfn) {
        high_pfn = limit_pfn;
        low_pfn = retry_pfn + 1;
        curr = find_limit(limit_pfn);
        goto retry;
      }
      max32_alloc_size = size;
      return false;
    }
    const Tree::iterator n = tree.emplace_hint(prev, new_pfn, Node{new_pfn + size - 1, false});
    PHYSR_ASSERT(n->second.hi == new_pfn + size - 1 && n->second.hi < end_pfn, "a new IOVA range is inserted below the end of the space");
    cached_rbnode_insert_update(n);
    lent = n;
    PHYSR_ASSERT(std::next(n) == prev, "the walk inserts just below the node it stepped down from");
    lent_next = prev;
    used += size;
    ++tree_allocs;
    *out = new_pfn;
    return true;
  }

  [[gnu::noinline, gnu::cold]] Status not_allocated(uint64_t pfn, uint64_t g) const {
    return make_error(EINVAL, "IOVA " + format_hex(pfn << shift) + " (+" + std::to_string(g) +
                                  " granules) is not allocated: a double free or a wrong size");
  }

  // Linux remove_iova() of the node starting at pfn; EINVAL unless it is an allocated node
  // of exactly g granules.
  Status tree_free(uint64_t pfn, uint64_t g) {
    settle();
    Tree::iterator it = lent != tree.end() && lent->first == pfn ? lent : tree.find(pfn);
    if (it == tree.end() || it == anchor || it->second.reserved || it->second.hi - it->first + 1 != g) [[unlikely]]
      return not_allocated(pfn, g);
    if (lent == it) {
      PHYSR_ASSERT(lent_next == std::next(it), "lent_next is the node above the lent node");
      ghost_next = lent_next;
      lent = tree.end();
    } else {
      ghost_next = std::next(it);
    }
    cached_rbnode_delete_update(it, ghost_next);
    ghost = it;
    used -= g;
    ++tree_frees;
    return {};
  }

  // Linux iova_magazine_free_pfns()
  void free_magazine(Magazine* m, unsigned o) {
    for (uint32_t i = 0; i < m->size; ++i) {
      const Status s = tree_free(m->pfns[i], uint64_t{1} << o);
      PHYSR_ASSERT(s.has_value(), "a cached IOVA is an allocated range of its size class (was it freed twice?)");
    }
    m->size = 0;
  }

  // Linux reserve_iova() (before the first allocation: no cached node points at a node it
  // moves).
  void reserve(uint64_t pfn_lo, uint64_t pfn_hi) {
    bool overlap = false;
    for (auto node = tree.begin(); node != tree.end(); ++node) {
      if (pfn_lo <= node->second.hi && pfn_hi >= node->first) {  // __is_range_overlap()
        if (pfn_lo < node->first) {  // __adjust_overlap_range() moves the node's start down
          reserved += node->first - pfn_lo;
          auto nh = tree.extract(node);
          nh.key() = pfn_lo;
          node = tree.insert(std::move(nh)).position;
        }
        if (pfn_hi > node->second.hi) pfn_lo = node->second.hi + 1;
        if (pfn_lo >= node->first && pfn_hi <= node->second.hi) return;
        overlap = true;
      } else if (overlap) {
        break;
      }
    }
    tree.emplace(pfn_lo, Node{pfn_hi, true});
    reserved += pfn_hi - pfn_lo + 1;
  }

  // ---------------- the rcaches ----------------

  // Linux __iova_rcache_get() (tc->mu held): `loaded` if it holds anything, else `prev`
  // swapped in if it does, else a full magazine from the depot; then the topmost entry
  // that fits below the limit (iova_magazine_pop()), or nothing: a `loaded` magazine with
  // entries, none of which fits, sends the request to the tree.
  bool rcache_get(ThreadCache* tc, unsigned k, uint64_t limit_pfn, uint64_t* pfn) {
    Magazine*& ld = tc->loaded[k];
    if (ld->size == 0) {
      if (tc->prev[k]->size != 0) {
        std::swap(ld, tc->prev[k]);
      } else {
        std::lock_guard lock(depot_mu);
        if (depot[k].mags.empty()) return false;
        spares.push_back(ld);
        ld = depot[k].mags.back();
        depot[k].mags.pop_back();
      }
    }
    // iova_magazine_pop(): the topmost entry at or below limit_pfn - size.
    const uint64_t span = uint64_t{1} << k;
    for (uint32_t i = ld->size; i-- > 0;) {
      if (ld->pfns[i] + span <= limit_pfn) {
        *pfn = ld->pfns[i];
        ld->pfns[i] = ld->pfns[--ld->size];
        return true;
      }
    }
    return false;
  }

  // Linux __iova_rcache_insert() (tc->mu held): into `loaded`, else into `prev` swapped in,
  // else `loaded` goes to the depot (no cap) and a fresh magazine takes its place, and the
  // depot's trim is scheduled.
  void rcache_insert(ThreadCache* tc, unsigned k, uint64_t pfn) {
    Magazine*& ld = tc->loaded[k];
    if (ld->size == kMagSize) {
      if (tc->prev[k]->size != kMagSize) {
        std::swap(ld, tc->prev[k]);
      } else {
        {
          std::lock_guard lock(depot_mu);
          Depot& d = depot[k];
          d.mags.push_back(ld);
          if (spares.empty()) {
            ld = new Magazine;
          } else {
            ld = spares.back();
            spares.pop_back();
          }
          if (depot_delay.count() != 0 && !d.work_pending) {  // schedule_delayed_work(IOVA_DEPOT_DELAY)
            d.work_pending = true;
            d.work_at = std::chrono::steady_clock::now() + depot_delay;
          }
        }
        run_due_depot_work(k);
      }
    }
    PHYSR_ASSERT(ld->size < kMagSize, "the loaded magazine has room after the swap or the depot");
    ld->pfns[ld->size++] = pfn;
  }

  // Linux iova_depot_work_func() for size class k: one magazine back to the tree when the
  // depot holds more than one per CPU. Returns whether it freed one.
  bool depot_work(unsigned k) {
    Magazine* mag = nullptr;
    {
      std::lock_guard lock(depot_mu);
      Depot& d = depot[k];
      if (d.mags.size() > online_cpus) {
        mag = d.mags.back();
        d.mags.pop_back();
      }
    }
    if (!mag) return false;
    {
      std::lock_guard lock(tree_mu);
      free_magazine(mag, k);
    }
    std::lock_guard lock(depot_mu);
    spares.push_back(mag);
    return true;
  }
  // The delayed work runs when the depot is next touched after its delay, as many times
  // as it would have run (each run that frees a magazine reschedules it one delay later).
  void run_due_depot_work(unsigned k) {
    for (;;) {
      {
        std::lock_guard lock(depot_mu);
        Depot& d = depot[k];
        if (!d.work_pending || std::chrono::steady_clock::now() < d.work_at) return;
        d.work_at += depot_delay;
      }
      if (!depot_work(k)) {
        std::lock_guard lock(depot_mu);
        depot[k].work_pending = false;
        return;
      }
    }
  }

  // Linux alloc_iova_fast()'s flush: free_cpu_cached_iovas() for every thread's caches,
  // then free_global_cached_iovas(). `self` is the calling thread's cache (or null).
  void flush_all(ThreadCache* self) {
    std::lock_guard reg(reg_mu);
    std::vector<std::unique_lock<std::mutex>> held;
    held.reserve(caches.size());
    for (ThreadCache* c : caches) {
      held.emplace_back(c->mu);
      c->flush_req.store(1, std::memory_order_relaxed);
    }
    // Without membarrier() another thread's magazines cannot be reached safely: they stay.
    const bool all = heavy_barrier();
    for (ThreadCache* c : caches)
      while (c->busy.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    std::vector<Magazine*> from_depot[kCachedOrders];
    {
      std::lock_guard dl(depot_mu);
      for (unsigned o = 0; o < kCachedOrders; ++o) {
        from_depot[o].assign(depot[o].mags.rbegin(), depot[o].mags.rend());  // in iova_depot_pop() order
        depot[o].mags.clear();
      }
    }
    {
      std::lock_guard tl(tree_mu);
      for (ThreadCache* c : caches) {
        if (!all && c != self) continue;
        for (unsigned o = 0; o < kCachedOrders; ++o) {
          free_magazine(c->loaded[o], o);
          free_magazine(c->prev[o], o);
        }
      }
      for (unsigned o = 0; o < kCachedOrders; ++o)
        for (Magazine* mag : from_depot[o]) free_magazine(mag, o);
    }
    {
      std::lock_guard dl(depot_mu);
      for (auto& v : from_depot) spares.insert(spares.end(), v.begin(), v.end());
    }
    for (ThreadCache* c : caches) c->flush_req.store(0, std::memory_order_release);
  }
};

namespace {

std::mutex g_live_mu;
std::unordered_map<uint64_t, IovaAllocator::Impl*> g_live;

// The hot path reads only this plain pointer. In initial-exec TLS it is one load from the
// thread pointer; reaching the TlsCaches object below (it has a destructor) costs a call
// to __tls_get_addr and a guard check in -fPIC code. Initial-exec is valid only in an
// executable, so only the static library (PHYSR_STATIC_TLS, set by the build) asks for it;
// the shared library keeps the default model, which also works from dlopen().
#if defined(PHYSR_STATIC_TLS)
#define PHYSR_HOT_TLS __attribute__((tls_model("initial-exec")))
#else
#define PHYSR_HOT_TLS
#endif
PHYSR_HOT_TLS thread_local ThreadCache* t_last = nullptr;

// A thread's caches, one per allocator it used; returned to their allocator at thread exit
// (Linux iova_cpuhp_dead(): free_cpu_cached_iovas() of a CPU going offline).
struct TlsCaches {
  std::vector<std::unique_ptr<ThreadCache>> entries;
  ~TlsCaches() {
    t_last = nullptr;
    std::lock_guard lock(g_live_mu);
    for (auto& c : entries) {
      auto it = g_live.find(c->owner);
      if (it == g_live.end()) continue;
      IovaAllocator::Impl& m = *it->second;
      std::lock_guard reg(m.reg_mu);
      std::erase(m.caches, c.get());
      std::lock_guard tl(m.tree_mu);
      for (unsigned o = 0; o < kCachedOrders; ++o) {
        m.free_magazine(c->loaded[o], o);
        m.free_magazine(c->prev[o], o);
      }
    }
  }
};
thread_local TlsCaches t_caches;

ThreadCache* cache_for_slow(IovaAllocator::Impl* impl) {
  TlsCaches& t = t_caches;
  for (auto& c : t.entries)
    if (c->owner == impl->id) return t_last = c.get();
  // First use by this thread: drop entries of allocators that no longer exist.
  {
    std::lock_guard lock(g_live_mu);
    std::erase_if(t.entries, [](const auto& c) { return !g_live.count(c->owner); });
    t_last = nullptr;
  }
  auto c = std::make_unique<ThreadCache>();
  c->owner = impl->id;
  {
    std::lock_guard reg(impl->reg_mu);
    impl->caches.push_back(c.get());
  }
  t.entries.push_back(std::move(c));
  return t_last = t.entries.back().get();
}

inline ThreadCache* cache_for(IovaAllocator::Impl* impl) {
  ThreadCache* c = t_last;
  if (c && c->owner == impl->id) [[likely]] return c;
  return cache_for_slow(impl);
}

}  // namespace

IovaAllocator::Impl::~Impl() {
  {
    std::lock_guard lock(g_live_mu);
    g_live.erase(id);
  }
  for (auto& d : depot)
    for (Magazine* m : d.mags) delete m;
  for (Magazine* m : spares) delete m;
}

IovaAllocator::IovaAllocator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
IovaAllocator::~IovaAllocator() = default;

Result<std::unique_ptr<IovaAllocator>> IovaAllocator::create(const IovaOptions& o) {
  if (o.granule == 0 || (o.granule & (o.granule - 1)) != 0 || o.granule < 512)
    return make_error(EINVAL, "IOVA granule " + std::to_string(o.granule) + " is not a power of two of at least 512");
  if (o.start % o.granule || o.end % o.granule || o.start >= o.end)
    return make_error(EINVAL, "IOVA space [" + format_hex(o.start) + ", " + format_hex(o.end) + ") is empty or not granule-aligned");
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.shift = static_cast<unsigned>(std::countr_zero(o.granule));
  m.start_pfn = o.start >> m.shift;
  m.end_pfn = o.end >> m.shift;
  m.caching = o.caching;
  m.check = o.check;
  m.fast_max = o.caching && !o.check ? uint64_t{32} << m.shift : 0;
  m.depot_delay = std::chrono::milliseconds(o.depot_delay_ms);
  m.online_cpus = std::max(1u, std::thread::hardware_concurrency());
  // Linux init_iova_domain()
  m.dma_32bit_pfn = m.shift < 32 ? uint64_t{1} << (32 - m.shift) : 1;
  m.max32_alloc_size = m.dma_32bit_pfn;
  m.anchor = m.tree.emplace(kAnchor, Node{kAnchor, true}).first;
  m.cached_node = m.cached32_node = m.anchor;
  m.ghost = m.ghost_next = m.lent = m.lent_next = m.tree.end();
  for (const DmaSpan& r : o.reserved) {
    if (r.empty()) continue;
    if (r.wraps())
      return make_error(EINVAL, "IOVA reserved range [" + format_hex(r.base.value()) + ", +" + format_hex(r.size) + ") runs past 2^64");
    const uint64_t lo = std::max(r.base.value() >> m.shift, m.start_pfn), hi = std::min((r.last().value() >> m.shift) + 1, m.end_pfn);
    if (lo < hi) m.reserve(lo, hi - 1);
  }
  {
    std::lock_guard lock(g_live_mu);
    g_live[m.id] = impl.get();
  }
  return std::unique_ptr<IovaAllocator>(new IovaAllocator(std::move(impl)));
}

uint64_t IovaAllocator::granule() const noexcept { return uint64_t{1} << impl_->shift; }

namespace {
[[gnu::noinline, gnu::cold]] Error no_room(uint64_t g, uint64_t limit) {
  return make_error(ENOMEM, "no free IOVA range of " + std::to_string(g) + " granules aligned to " +
                                std::to_string(std::bit_ceil(g)) + " below " + format_hex(limit));
}
}  // namespace

// Linux alloc_iova_fast(flush_rcache = true): the rcache, then the tree, then, if that
// fails, every thread's magazines and the depot back to the tree and the tree once more.
[[gnu::noinline]] Result<DmaAddr> IovaAllocator::alloc_general(uint64_t size, uint64_t limit) {
  Impl& m = *impl_;
  if (size == 0) return make_error(EINVAL, "IOVA allocation of 0 bytes");
  const uint64_t g = reserved_for(size, m.shift);
  if (g > m.end_pfn - m.start_pfn) return make_error(EINVAL, "IOVA allocation of " + std::to_string(size) + " bytes exceeds the space");
  const unsigned k = order_of(g);
  const uint64_t limit_pfn = std::min(limit >> m.shift, m.end_pfn);
  uint64_t pfn = 0;
  bool got = false;
  ThreadCache* tc = m.caching ? cache_for(&m) : nullptr;
  if (tc && k < kCachedOrders) {
    std::lock_guard lock(tc->mu);
    got = m.rcache_get(tc, k, limit_pfn, &pfn);
  }
  if (!got) {
    {
      std::lock_guard lock(m.tree_mu);
      got = m.tree_alloc(g, limit_pfn, &pfn);
    }
    if (!got && tc) {
      m.flush_all(tc);
      std::lock_guard lock(m.tree_mu);
      got = m.tree_alloc(g, limit_pfn, &pfn);
    }
    if (!got) [[unlikely]]
      return no_room(g, limit_pfn << m.shift);
  }
  if (m.check) {
    std::lock_guard lock(m.check_mu);
    m.live[pfn] = g;
  }
  return DmaAddr(pfn << m.shift);
}

// Linux free_iova_fast(): into this thread's magazines for sizes up to 32 granules (which
// never refuse: the depot has no cap), else straight to the tree.
[[gnu::noinline]] Status IovaAllocator::free_general(DmaAddr iova, uint64_t size) {
  Impl& m = *impl_;
  const uint64_t pfn = iova.value() >> m.shift;
  if (size == 0 || (iova.value() & ((uint64_t{1} << m.shift) - 1)) != 0 || pfn < m.start_pfn || pfn >= m.end_pfn)
    return make_error(EINVAL, "IOVA free of " + format_hex(iova.value()) + " (+" + std::to_string(size) +
                                  " bytes): not a granule-aligned address of this space");
  const uint64_t g = reserved_for(size, m.shift);
  if (m.check) {
    std::lock_guard lock(m.check_mu);
    auto it = m.live.find(pfn);
    if (it == m.live.end() || it->second != g)
      return make_error(EINVAL, "IOVA free of " + format_hex(iova.value()) + " (+" + std::to_string(size) +
                                    " bytes): " + (it == m.live.end() ? "not allocated (double free?)" : "allocated with another size"));
    m.live.erase(it);
  }
  const unsigned k = order_of(g);
  if (m.caching && k < kCachedOrders) {
    ThreadCache* tc = cache_for(&m);
    std::lock_guard lock(tc->mu);
    m.rcache_insert(tc, k, pfn);
    return {};
  }
  std::lock_guard lock(m.tree_mu);
  return m.tree_free(pfn, g);
}

// Fast paths: a cached size, no check mode, no flush under way, and this thread's magazine
// can serve it at its top (alloc) or has room (free). Everything else, with the same
// rules, is the general path.
Result<DmaAddr> IovaAllocator::alloc(uint64_t size, uint64_t limit) {
  const Impl& m = *impl_;
  const uint64_t gsize = uint64_t{1} << m.shift;
  if (size - 1 < m.fast_max) [[likely]] {
    ThreadCache* c = t_last;
    if (c && c->owner == m.id) [[likely]] {
      // size <= 32 granules here, so reserved_for() reduces to a bit_ceil and cannot
      // overflow; its order straight from the bit width (bit_ceil, then countr_zero, cost
      // two instructions more).
      const unsigned k = fast_order((size + gsize - 1) >> m.shift);
      const uint64_t g = uint64_t{1} << k;
      const unsigned shift = m.shift;
      const uint64_t limit_pfn = std::min(limit >> shift, m.end_pfn);
      c->busy.store(1, std::memory_order_relaxed);
      std::atomic_signal_fence(std::memory_order_seq_cst);  // paired with heavy_barrier()
      if (c->flush_req.load(std::memory_order_acquire) == 0) [[likely]] {
        Magazine* mg = c->loaded[k];
        if (mg->size != 0 && mg->pfns[mg->size - 1] + g <= limit_pfn) [[likely]] {
          // The address before busy is cleared (after the release store, m.shift would be
          // loaded again).
          const DmaAddr a(mg->pfns[--mg->size] << shift);
          c->busy.store(0, std::memory_order_release);
          return a;
        }
      }
      c->busy.store(0, std::memory_order_release);
    }
  }
  return alloc_general(size, limit);
}

Status IovaAllocator::free(DmaAddr iova, uint64_t size) {
  const Impl& m = *impl_;
  const uint64_t gsize = uint64_t{1} << m.shift;
  const uint64_t pfn = iova.value() >> m.shift;
  if (size - 1 < m.fast_max && (iova.value() & (gsize - 1)) == 0 && pfn >= m.start_pfn && pfn < m.end_pfn)
      [[likely]] {
    ThreadCache* c = t_last;
    if (c && c->owner == m.id) [[likely]] {
      const unsigned k = fast_order((size + gsize - 1) >> m.shift);  // as in alloc()
      c->busy.store(1, std::memory_order_relaxed);
      std::atomic_signal_fence(std::memory_order_seq_cst);  // paired with heavy_barrier()
      if (c->flush_req.load(std::memory_order_acquire) == 0) [[likely]] {
        Magazine* mg = c->loaded[k];
        if (mg->size != kMagSize) [[likely]] {
          mg->pfns[mg->size++] = pfn;
          c->busy.store(0, std::memory_order_release);
          return {};
        }
      }
      c->busy.store(0, std::memory_order_release);
    }
  }
  return free_general(iova, size);
}

void IovaAllocator::flush_caches() {
  Impl& m = *impl_;
  m.flush_all(m.caching ? cache_for(&m) : nullptr);
}

void IovaAllocator::run_depot_work() {
  for (unsigned o = 0; o < kCachedOrders; ++o) impl_->depot_work(o);
}

IovaStats IovaAllocator::stats() const {
  Impl& m = *impl_;
  IovaStats s;
  {
    std::lock_guard lock(m.tree_mu);
    s.free_granules = (m.end_pfn - m.start_pfn) - m.reserved - m.used;
    s.tree_allocs = m.tree_allocs;
    s.tree_frees = m.tree_frees;
  }
  if (m.caching) {
    ThreadCache* tc = cache_for(&m);
    std::lock_guard lock(tc->mu);
    for (unsigned o = 0; o < kCachedOrders; ++o)
      s.cached_granules += (uint64_t{tc->loaded[o]->size} + tc->prev[o]->size) << o;
  }
  std::lock_guard lock(m.depot_mu);
  for (unsigned o = 0; o < kCachedOrders; ++o) {
    s.depot_magazines += m.depot[o].mags.size();
    for (Magazine* mag : m.depot[o].mags) s.cached_granules += uint64_t{mag->size} << o;
  }
  return s;
}

}  // namespace physr
