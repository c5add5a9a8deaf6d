// P2P memory pools with RCU-deferred free (Linux drivers/pci/p2pdma.c over lib/genalloc.c).
//
// Metadata, and why. A resource's state is one bit per 4 KiB granule (set: not free in the
// pool: held by a caller, cached by a thread, or freed and waiting for its grace period),
// as genalloc keeps one bit per min_alloc_order granule, plus constants: a bounded depot of
// free chunks per size class, a next-fit cursor per class, and per thread a magazine per
// class (at most 128 chunks up to 32 KiB, 64 above) and one batch of pending frees (a word
// each: the address, with the resource and size class in its low 12 bits). A buddy
// allocator would need its free lists stored in the free memory itself (which is a device's
// BAR here, not ours to write) or a bit per buddy per order; the bitmap with caches gets the
// hot path to a thread-local pop/push and keeps the search (first-fit, aligned) for the rare
// sizes.
//
// Hot path. alloc() of a power-of-two size from 4 KiB to 2 MiB (aligned to at most its
// size) pops a naturally aligned chunk from the calling thread's magazine; free() pushes
// the chunk onto the thread's pending batch, which goes to call_rcu() when full. Neither
// takes a lock, a read-modify-write atomic or a fence: on this class of machine a liburcu
// read-side section costs ~40 ns and an uncontended xchg ~10 ns, more than the whole
// budget. Two asymmetric (Dekker-style) handshakes let other threads reach a thread's cache
// anyway, with the full barrier on the rare side (membarrier(PRIVATE_EXPEDITED), as
// liburcu's memb flavour does; a fence on every operation where the kernel lacks it):
//   - removal: the thread counts the chunk (its per-thread live count, the percpu_ref of
//     Linux pgmap->ref) and then reads the resource's dying flag (the fast path reads its
//     own steal flag instead, which remove() sets with dying); remove() sets the flags,
//     runs membarrier, and then the counts it sums include every allocation that did not
//     see them, which is percpu_ref_tryget_live() against percpu_ref_kill().
//   - stealing (barrier(), remove(), teardown): the thread sets busy and then reads steal;
//     the stealer sets steal, runs membarrier, waits for busy to clear and takes the
//     thread's mutex, so either the thread sees steal (and takes its slow path, under that
//     mutex) or the stealer sees busy (and waits for the operation to end).
// Grace periods. A full pending batch waits on its thread (the kernel's per-cpu page lists
// keep freed pages near the CPU that freed them). When the thread's magazine runs dry and
// 16 batches wait, or the pool is dry and any wait, the thread runs
// urcu_memb_synchronize_rcu() itself (never inside a read-side section: then it takes the
// pool instead) and its waiting batches are ready: the next refills take their chunks
// straight into the magazines, no lock, no bitmap. Batches of a thread that frees more than
// it allocates (over 64 waiting), of exited threads and every batch a stealer takes go the
// shared way: retired to the P2PMemory's list, where one call_rcu (urcu_memb_call_rcu) at a
// time covers every batch retired before it and its callback puts their chunks back into
// the depots or the bitmaps. Either way a chunk is handed out again only after every
// read-side section that began before its free has ended. liburcu's call_rcu thread batches
// for ~10 ms; a thread that needs memory sooner (alloc before ENOMEM, barrier(), remove())
// takes the lists, runs urcu_memb_synchronize_rcu() itself and gives the batches back.
// Batches only travel under mutexes, so ThreadSanitizer sees every hand-over but the
// call_rcu itself (annotated).
// The 2 MiB path. Chunks of 256 KiB and more are found a bitmap word at a time (a clear
// word is 64 free granules) where the resource starts on a 256 KiB boundary, and checked on
// free a word at a time: 8 words for 2 MiB, not 512 bits.
#include "physr/mem.hpp"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <urcu/urcu-memb.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

// ThreadSanitizer does not see liburcu's hand-over of a callback to its call_rcu thread: the
// sweeper's head is released before call_rcu and acquired in the callback.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PHYSR_MEM_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define PHYSR_MEM_TSAN 1
#endif
#ifdef PHYSR_MEM_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

// The hot thread-local pointer uses initial-exec TLS in the static library (as iova does).
#if defined(PHYSR_STATIC_TLS)
#define PHYSR_MEM_TLS __attribute__((tls_model("initial-exec")))
#else
#define PHYSR_MEM_TLS
#endif

namespace physr::mem {

namespace {

constexpr unsigned kClasses = 10;         // cached chunk sizes: 4 KiB << 0 .. 9 (2 MiB)
constexpr uint32_t kMagSize = 128;        // chunks per magazine, at most
// Chunks a magazine holds and a refill brings: 128 up to 32 KiB (a whole batch of frees),
// 64 above (what a thread's caches keep from the pool stays bounded).
constexpr uint32_t mag_cap(unsigned k) { return k < 4 ? 128 : 64; }
constexpr uint32_t kBatchSize = 128;      // frees per batch
constexpr size_t kSyncBatches = 16;       // a thread's own grace period when this many wait
constexpr size_t kMaxWaiting = 64;        // more go to call_rcu (a thread that frees, not allocates)
constexpr size_t kDepotCap = 1024;        // free chunks a resource keeps per class
constexpr uint32_t kMaxResources = 16;    // pci_p2pdma_add_resource() calls per function
constexpr uint64_t kMaxChunk = kPhysAddrLimit;
constexpr uint64_t kMaxClassSize = kPageSize << (kClasses - 1);  // the largest cached size

inline void tsan_release([[maybe_unused]] void* p) {
#ifdef PHYSR_MEM_TSAN
  __tsan_release(p);
#endif
}
inline void tsan_acquire([[maybe_unused]] void* p) {
#ifdef PHYSR_MEM_TSAN
  __tsan_acquire(p);
#endif
}

// The rare side's barrier: membarrier when the kernel has it (then the common side needs only
// a compiler barrier), else a fence on both sides.
std::atomic<bool> g_membarrier{false};
std::once_flag g_membarrier_once;
void init_membarrier() {
  std::call_once(g_membarrier_once, [] {
    const long cmds = syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0);
    if (cmds > 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
        syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0) == 0)
      g_membarrier.store(true, std::memory_order_relaxed);
  });
}
inline void light_fence() {
  if (g_membarrier.load(std::memory_order_relaxed)) [[likely]] std::atomic_signal_fence(std::memory_order_seq_cst);
  else std::atomic_thread_fence(std::memory_order_seq_cst);
}
void heavy_fence() {
  if (g_membarrier.load(std::memory_order_relaxed)) syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// A counter only its thread writes (others sum it with relaxed loads): a plain add, no lock
// prefix. On x86-64 one add to memory (the load, add and store that the relaxed load and
// store compile to, in one instruction): the owner is the only writer and an aligned 8-byte
// store is single-copy atomic there, so a reader sees the old or the new value, as before.
// ThreadSanitizer builds keep the atomics, which it sees.
template <class T>
[[gnu::always_inline]] inline void bump(std::atomic<T>& c, T d) {
  static_assert(sizeof(std::atomic<T>) == 8 && std::atomic<T>::is_always_lock_free);
#if defined(__x86_64__) && !defined(PHYSR_MEM_TSAN)
  asm volatile("addq %1, %0" : "+m"(*reinterpret_cast<T*>(&c)) : "er"(d));
#else
  c.store(c.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
#endif
}
// A monotonic byte counter of one thread (it wraps; readers take differences modulo 2^64).
[[gnu::always_inline]] inline void bump(std::atomic<uint64_t>& c, uint64_t d) { bump<uint64_t>(c, d); }
[[gnu::always_inline]] inline void bump(std::atomic<int64_t>& c, int64_t d) { bump<int64_t>(c, d); }

std::string hex(uint64_t v) { return format_hex(v); }
std::string describe(PhysSpan s) { return "[" + hex(s.base.value()) + ", +" + hex(s.size) + ")"; }

// The size class of a chunk: k when size == 4 KiB << k (k < kClasses) and align <= size.
inline unsigned class_of(uint64_t size, uint64_t align) {
  if ((size & (size - 1)) || size > (kPageSize << (kClasses - 1)) || align > size) return kClasses;
  return static_cast<unsigned>(std::countr_zero(size) - kPageShift);
}

void registered_thread() { ProviderRegistry::ReadGuard g; }  // registers with liburcu once per thread

}  // namespace

// A magazine of free chunks of one class (ResCache::mag()): addresses, some with their batch
// entry's tag still in the low 12 bits (a refill copies entries whole), so a pop masks it off.
struct Mag {
  uint32_t& n;
  uint64_t* addr;
};

// One pci_p2pdma_add_resource(): a span of one BAR, as gen_pool_add_owner() adds a chunk.
struct Resource {
  ProviderId provider = 0;
  uint32_t function = 0;
  uint32_t ordinal = 0;  // index among the function's resources
  uint64_t tag = 0;      // ordinal << 4, in its chunks' batch entries
  uint64_t key = 0;      // owner_key(provider, function)
  unsigned bar = 0;
  PhysSpan span;
  uint64_t bus_offset = 0;
  uint64_t pagemap_align = kPageSize;
  std::string name;
  uint64_t granules = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> bits;  // set: not free in the pool; written under mu
  std::atomic<bool> dying{false};                 // remove() began: no new allocations
  std::atomic<bool> removed{false};               // remove() finished: the pool is gone
  std::atomic<uint64_t> deferred_done{0};         // bytes whose grace period has ended
  std::mutex mu;                                  // bits (writes), depot, cursors
  std::vector<uint64_t> depot[kClasses];
  uint64_t cursor[kClasses] = {};
  uint64_t free_granules = 0;  // clear bits (under mu): no scan when too few are left

  uint64_t first_pfn() const { return span.base.value() >> kPageShift; }
  bool test(uint64_t i) const { return bits[i >> 6].load(std::memory_order_relaxed) >> (i & 63) & 1; }
  // Sets (or clears) granules [i, i + n), which are all clear (or all set); under mu.
  void assign(uint64_t i, uint64_t n, bool set) {
    free_granules = set ? free_granules - n : free_granules + n;
    while (n) {
      const unsigned b = i & 63;
      const uint64_t take = std::min<uint64_t>(n, 64 - b);
      const uint64_t mask = (take == 64 ? ~uint64_t{0} : ((uint64_t{1} << take) - 1)) << b;
      std::atomic<uint64_t>& w = bits[i >> 6];
      const uint64_t v = w.load(std::memory_order_relaxed);
      w.store(set ? v | mask : v & ~mask, std::memory_order_relaxed);
      i += take;
      n -= take;
    }
  }
  // all_set() for one granule or whole words; false (the caller takes the full path) else.
  [[gnu::always_inline]] bool all_set_quick(uint64_t i, uint64_t n) const {
    if (n == 1) return test(i);
    if ((i | n) & 63) return false;
    for (uint64_t w = i >> 6, e = (i + n) >> 6; w < e; ++w)
      if (bits[w].load(std::memory_order_relaxed) != ~uint64_t{0}) return false;
    return true;
  }
  // Whether all of [i, i + n) is set (held or in flight).
  bool all_set(uint64_t i, uint64_t n) const {
    if (n == 1) return test(i);
    if (!((i | n) & 63)) {  // whole words (a chunk of 256 KiB or more)
      for (uint64_t w = i >> 6, e = (i + n) >> 6; w < e; ++w)
        if (bits[w].load(std::memory_order_relaxed) != ~uint64_t{0}) return false;
      return true;
    }
    while (n) {
      const unsigned b = i & 63;
      const uint64_t take = std::min<uint64_t>(n, 64 - b);
      const uint64_t mask = (take == 64 ? ~uint64_t{0} : ((uint64_t{1} << take) - 1)) << b;
      if ((bits[i >> 6].load(std::memory_order_relaxed) & mask) != mask) return false;
      i += take;
      n -= take;
    }
    return true;
  }
  // The first granule in [i, end) whose bit equals `set`, or end.
  uint64_t next(uint64_t i, uint64_t end, bool set) const {
    while (i < end) {
      uint64_t w = bits[i >> 6].load(std::memory_order_relaxed);
      if (!set) w = ~w;
      w &= ~uint64_t{0} << (i & 63);
      if (w) return std::min(end, (i & ~uint64_t{63}) + std::countr_zero(w));
      i = (i & ~uint64_t{63}) + 64;
    }
    return end;
  }
  // lib/genalloc.c gen_pool_first_fit_align(): the first run of n free granules in
  // [from, granules) whose physical address is aligned to `align` granules; granules if none.
  uint64_t find_run(uint64_t from, uint64_t n, uint64_t align) const {
    const uint64_t pfn0 = first_pfn();
    auto up = [&](uint64_t i) { return ((pfn0 + i + align - 1) & ~(align - 1)) - pfn0; };
    for (uint64_t i = up(from); i + n <= granules && i + n > i;) {
      const uint64_t s = next(i, i + n, true);
      if (s == i + n) return i;
      const uint64_t z = next(s, granules, false);
      if (z == granules) break;
      i = up(z);
    }
    return granules;
  }
  // The first naturally aligned run of n = 64 << j free granules at or after `from`, a word
  // at a time (a clear word is 64 free granules), or granules if none. Only when the
  // resource starts on a 256 KiB boundary (pfn0 % 64 == 0), so that word and chunk
  // alignment agree; find_run() otherwise.
  uint64_t find_words(uint64_t from, uint64_t n) const {
    const uint64_t pfn0 = first_pfn(), wn = n >> 6;
    auto up = [&](uint64_t i) { return ((pfn0 + i + n - 1) & ~(n - 1)) - pfn0; };
    for (uint64_t i = up(from); i + n <= granules && i + n > i;) {
      const uint64_t w = i >> 6;
      uint64_t j = 0;
      while (j < wn && !bits[w + j].load(std::memory_order_relaxed)) ++j;
      if (j == wn) return i;
      i = up((w + j + 1) << 6);  // the next aligned run past the busy word
    }
    return granules;
  }
  // Gives a chunk back (its grace period is over); under mu.
  void give_back(uint64_t addr, uint64_t size) {
    const unsigned k = class_of(size, size);
    const uint64_t i = (addr - span.base.value()) >> kPageShift;
    if (k < kClasses && !dying.load(std::memory_order_relaxed) && depot[k].size() < kDepotCap) depot[k].push_back(addr);
    else assign(i, size >> kPageShift, false);
  }
};

// A batch entry's tag, in the low 12 bits of the chunk's address (a resource starts on a
// page, so every chunk's address does): the resource's ordinal (bits 4..7, Resource::tag)
// and the size class (bits 0..3), or kOddSize for a size of no class (Batch::size has it).
constexpr uint64_t kTagMask = kPageSize - 1;
constexpr uint64_t kOddSize = 15;
static_assert(kMaxResources <= 16 && kClasses < kOddSize);
inline uint64_t size_tag(uint64_t size) {
  const unsigned k = class_of(size, size);
  return k < kClasses ? k : kOddSize;
}

// Pending frees, and a batch of them handed to call_rcu. A batch holds frees of one
// function (its thread cache's), whose resources `res` lists, so that an entry is one
// word: the chunk's address with its tag. Entries are in an array so that a refill
// compares a run of them a block at a time and copies their addresses at once.
struct Batch {
  rcu_head head;
  uint32_t n = 0;
  const std::atomic<Resource*>* res = nullptr;  // the function's resources (FunctionState::res)
  uint64_t e[kBatchSize];
  uint64_t size[kBatchSize];  // only for entries tagged kOddSize
  void push(uint64_t entry, uint64_t s) {
    if ((entry & 15) == kOddSize) size[n] = s;
    e[n++] = entry;
  }
  Resource* resource(uint32_t i) const { return res[(e[i] >> 4) & 15].load(std::memory_order_relaxed); }
  uint64_t address(uint32_t i) const { return e[i] & ~kTagMask; }
  uint64_t bytes(uint32_t i) const {
    const uint64_t k = e[i] & 15;
    return k == kOddSize ? size[i] : kPageSize << k;
  }
};

// Batches are recycled (they travel between threads; malloc would hand each one back to
// the thread that freed it last).
std::mutex g_batches_mu;
struct SpareBatches : std::vector<Batch*> {
  ~SpareBatches() {
    for (Batch* b : *this) delete b;
  }
};
SpareBatches g_batches;  // at most kSpareBatches
constexpr size_t kSpareBatches = 256;
// A batch for the frees of the function whose resources are `res`.
Batch* new_batch(const std::atomic<Resource*>* res) {
  Batch* b = nullptr;
  {
    std::lock_guard g(g_batches_mu);
    if (!g_batches.empty()) {
      b = g_batches.back();
      g_batches.pop_back();
      b->n = 0;
    }
  }
  if (!b) b = new Batch;  // the entries need no zeroing
  b->res = res;
  return b;
}
void recycle(Batch* b) {
  {
    std::lock_guard g(g_batches_mu);
    if (g_batches.size() < kSpareBatches) {
      g_batches.push_back(b);
      return;
    }
  }
  delete b;
}

// One thread's cache for one resource.
struct ResCache {
  Resource* r = nullptr;
  // Written by the owner only. chunks: held (allocated minus freed by this thread; the live
  // reference). The byte counters only grow (modulo 2^64): handed out, freed (which is also
  // the bytes put into deferral), and deferred_out: freed bytes whose grace period ended and
  // that the thread took back itself (the rest is the resource's deferred_done). Bytes held
  // are handed_out - freed, bytes deferred freed - deferred_out - deferred_done, summed over
  // the threads: one counter fewer to write on every free.
  std::atomic<int64_t> chunks{0};
  std::atomic<uint64_t> handed_out{0}, freed{0}, deferred_out{0};
  uint64_t key = 0;  // r->key, so that the fast alloc path need not read r
  // The magazines: counts together, and arrays of a power-of-two stride.
  uint32_t mag_n[kClasses] = {};
  uint64_t mag_addr[kClasses][kMagSize];
  Mag mag(unsigned k) { return Mag{mag_n[k], mag_addr[k]}; }
};

// One thread's state for one function of one P2PMemory.
struct ThreadCache {
  alignas(64) std::atomic<uint32_t> busy{0};
  std::atomic<uint32_t> steal{0};
  ResCache* hot = nullptr;   // the resource alloc tries first
  Batch* pending = nullptr;  // never full outside an operation
  std::unique_ptr<ResCache> rc[kMaxResources];
  std::mutex mu;             // the slow path; whoever steals
  // Full batches of this thread's frees (under mu): waiting for a grace period, and ready
  // (the grace period that began after they filled has ended; back() is taken first).
  std::vector<Batch*> waiting, ready;
  uint64_t taken = 0;  // bumped (under mu) when a stealer takes waiting
  uint32_t function = 0;
  bool orphan = false;       // its thread exited (under Impl::mu)
};

// One revoke subscriber: `call_mu` is held while remove() calls it, and by off_revoke() to
// end it, so the subscriber's state outlives every call (recursive: a callback may end its
// own subscription).
struct RevokeSub {
  uint64_t id = 0;
  P2PMemory::RevokeFn fn;
  std::recursive_mutex call_mu;
  bool ended = false;  // under call_mu
};

struct FunctionState {
  std::atomic<Resource*> res[kMaxResources] = {};
  std::atomic<uint32_t> nres{0};
  std::atomic<bool> published{false};
  std::vector<std::shared_ptr<RevokeSub>> revoke;  // under Impl::mu, in subscription order
  std::vector<P2PMemorySource*> files;  // its allocate files (under Impl::mu)
};

struct Tracked {
  uint64_t size;
  const char* owner;
  Resource* r;
};

namespace {

// Thread-local lookup of a thread's cache: the last one used, then a list; the list's
// destructor hands the caches back when the thread exits.
struct TlsEntry {
  uint64_t mem = 0;
  uint32_t function = 0;
  ThreadCache* tc = nullptr;
  uint64_t key = 0;  // mem << 32 | function: alloc() compares both at once
};
inline uint64_t tls_key(uint64_t mem, uint32_t function) { return mem << 32 | function; }
thread_local TlsEntry t_last PHYSR_MEM_TLS;
struct TlsList {
  std::vector<TlsEntry> all;
  ~TlsList();
};
thread_local TlsList t_list;

std::mutex g_live_mu;
std::unordered_map<uint64_t, P2PMemory::Impl*> g_live;  // P2PMemory objects alive, by uid
std::atomic<uint64_t> g_next_uid{1};

}  // namespace

struct P2PMemory::Impl {
  Platform* platform = nullptr;
  P2PMemoryOptions opt;
  bool track = true;
  uint64_t uid = 0;
  uint64_t plain_uid = ~uint64_t{0};  // uid when untracked with membarrier, else no uid
  uint64_t plain_key = ~uint64_t{0};  // tls_key(plain_uid, 0), or a key no entry has
  uint32_t nfns = 0;
  std::unique_ptr<FunctionState[]> fns;

  std::mutex mu;         // set-up, the cache list, revoke subscribers, unsubmitted batches
  uint64_t next_revoke_id = 0;  // under mu
  std::mutex remove_mu;  // one remove() at a time
  std::vector<std::unique_ptr<Resource>> resources;  // every resource ever added
  std::vector<std::unique_ptr<ThreadCache>> caches;  // every thread cache
  std::vector<Batch*> unsubmitted;                   // pending batches of exited threads

  // Retired batches (header comment: grace periods). A batch retired before the sweeper's
  // call_rcu is safe when the sweeper runs; any thread may instead take the lists, wait a
  // grace period itself (synchronize_rcu) and give the batches back.
  std::mutex retire_mu;
  std::vector<Batch*> retired;   // not yet covered by a grace period in flight
  std::vector<Batch*> sweeping;  // covered by the sweeper's call_rcu
  bool sweep_armed = false;
  struct SweepHead {
    rcu_head head;  // first: a SweepHead* and its rcu_head* convert
    Impl* impl;
  } sweep_head{{}, this};
  std::mutex process_mu;         // held while batches are given back

  mutable std::mutex track_mu;
  std::unordered_map<uint64_t, Tracked> tracked;

  ~Impl();

  void report(const std::string& text) const {
    if (opt.report) opt.report(text);
    else std::fprintf(stderr, "%s\n", text.c_str());
  }

  ThreadCache* cache_for(uint32_t f) {
    if (t_last.mem == uid && t_last.function == f) [[likely]] return t_last.tc;
    return find_cache(f);
  }
  ThreadCache* find_cache(uint32_t f);
  void orphan(ThreadCache* tc);

  // The allocation paths write the chunk to *out and return null, or return the error as a
  // raw owning pointer (as the free path does): every path returns in a register and the
  // slow ones are tail calls; P2PMemory::alloc() (inline, physr/mem.hpp) wraps it.
  Error* alloc(P2PChunk* out, uint32_t f, uint64_t size, const AllocOptions& o);
  Result<P2PChunk> alloc_slow(uint32_t f, uint64_t size, const AllocOptions& o);
  [[gnu::noinline]] Error* alloc_slow_to(P2PChunk* out, uint32_t f, uint64_t size, const AllocOptions& o);
  [[gnu::noinline]] Error* alloc_general(P2PChunk* out, uint32_t f, uint64_t s, const AllocOptions& o);
  template <bool kPlain>
  Error* alloc_cached(P2PChunk* out, ThreadCache* tc, uint32_t f, uint64_t s, const AllocOptions& o);
  [[gnu::noinline]] Error* alloc_refill(P2PChunk* out, ThreadCache* tc, uint32_t f, uint64_t size, const AllocOptions& o);
  bool alloc_locked(ThreadCache* tc, std::unique_lock<std::mutex>& lk, uint32_t f, uint64_t size, uint64_t align, P2PChunk& out, Resource*& from);
  // The free path returns its error as a raw owning pointer (null: done): it comes back in a
  // register, where a Status is returned through memory; P2PMemory::free() wraps it.
  Error* free(const P2PChunk& c);
  [[gnu::noinline]] Error* free_full(const P2PChunk& c);
  [[gnu::noinline]] Error* free_general(const P2PChunk& c);
  template <bool kPlain>
  Error* free_cached(const P2PChunk& c);
  template <bool kPlain>
  [[gnu::noinline]] Error* free_sized(const P2PChunk& c);
  template <bool kPlain>
  Error* free_sized_body(const P2PChunk& c);
  Error* free_error(const P2PChunk& c, const std::string& why) const;
  void free_slow(ThreadCache* tc, Resource* r, uint64_t addr, uint64_t size);
  Batch* retire_locked(ThreadCache* tc, Batch* b);
  [[gnu::noinline]] Error* retire(ThreadCache* tc, Batch* b);
  bool grace_local(ThreadCache* tc, std::unique_lock<std::mutex>& lk);
  uint32_t take_ready(ThreadCache* tc, ResCache* c, unsigned k);
  void record(const P2PChunk& c, const char* owner, Resource* r);
  [[gnu::noinline]] Error* tracked_chunk(P2PChunk* out, const P2PChunk& c, const char* owner, Resource* r);

  void submit(Batch* b);
  void arm_locked(bool registered);
  static void sweep(rcu_head* head);
  static void give_back(Batch* b);
  void grace_now();
  void flush_locked(ThreadCache* tc, bool only_dying);
  void steal_all(bool only_dying);
  void barrier();
  void sum(const Resource* r, int64_t& chunks, int64_t& bytes, int64_t& deferred_in);
  std::string holders(const Resource* r);
};

namespace {

// A thread's cache of a resource, made on first use (by the owner, under tc->mu). A slot
// always belongs to one resource: ordinals are never reused.
ResCache* slot_for(ThreadCache* tc, Resource* r) {
  std::unique_ptr<ResCache>& slot = tc->rc[r->ordinal];
  if (!slot) {
    auto c = std::make_unique<ResCache>();
    c->r = r;
    c->key = r->key;
    slot = std::move(c);
  }
  return slot.get();
}

TlsList::~TlsList() {
  std::lock_guard live(g_live_mu);
  for (const TlsEntry& e : all) {
    const auto it = g_live.find(e.mem);
    if (it != g_live.end()) it->second->orphan(e.tc);
  }
}

}  // namespace

ThreadCache* P2PMemory::Impl::find_cache(uint32_t f) {
  for (const TlsEntry& e : t_list.all)
    if (e.mem == uid && e.function == f) {
      t_last = e;
      return e.tc;
    }
  ThreadCache* tc = nullptr;
  {
    std::lock_guard g(mu);
    for (auto& c : caches)
      if (c->orphan && c->function == f) {
        tc = c.get();
        tc->orphan = false;
        break;
      }
    if (!tc) {
      caches.push_back(std::make_unique<ThreadCache>());
      tc = caches.back().get();
      tc->function = f;
    }
  }
  // Forget entries of P2PMemory objects that are gone (their uids are never reused).
  if (t_list.all.size() >= 16) {
    std::lock_guard live(g_live_mu);
    std::erase_if(t_list.all, [](const TlsEntry& e) { return !g_live.count(e.mem); });
  }
  t_list.all.push_back(TlsEntry{uid, f, tc, tls_key(uid, f)});
  t_last = t_list.all.back();
  return tc;
}

// Takes a thread's waiting and ready batches (they get a grace period of their own again);
// under tc->mu.
static void take_batches(ThreadCache* tc, std::vector<Batch*>& out) {
  for (std::vector<Batch*>* v : {&tc->waiting, &tc->ready}) {
    for (Batch* b : *v) {
      if (b->n) out.push_back(b);
      else recycle(b);
    }
    v->clear();
  }
  ++tc->taken;
}

// A thread exited: its cached chunks go back, its pending frees wait for the next barrier
// (its liburcu registration may already be gone), and its counts stay with the cache.
void P2PMemory::Impl::orphan(ThreadCache* tc) {
  std::lock_guard g(mu);
  std::lock_guard t(tc->mu);
  flush_locked(tc, /*only_dying=*/false);
  if (tc->pending) {
    unsubmitted.push_back(tc->pending);
    tc->pending = nullptr;
  }
  take_batches(tc, unsubmitted);
  tc->hot = nullptr;
  tc->orphan = true;
}

// Hands back a thread's cached chunks (all, or those of dying resources); under tc->mu, with
// the owner not inside an operation.
void P2PMemory::Impl::flush_locked(ThreadCache* tc, bool only_dying) {
  for (auto& c : tc->rc) {
    if (!c) continue;
    Resource* r = c->r;
    if (only_dying && !r->dying.load(std::memory_order_relaxed)) continue;
    std::lock_guard g(r->mu);
    for (unsigned k = 0; k < kClasses; ++k) {
      Mag m = c->mag(k);
      if (!r->removed.load(std::memory_order_relaxed))
        for (uint32_t i = 0; i < m.n; ++i) r->give_back(m.addr[i] & ~kTagMask, kPageSize << k);
      m.n = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Deferred free

void P2PMemory::Impl::submit(Batch* b) {
  std::lock_guard g(retire_mu);
  retired.push_back(b);
  if (!sweep_armed) arm_locked(/*registered=*/false);
}

// Under retire_mu: the retired batches wait for the grace period of one call_rcu.
void P2PMemory::Impl::arm_locked(bool registered) {
  sweeping.insert(sweeping.end(), retired.begin(), retired.end());
  retired.clear();
  sweep_armed = true;
  if (!registered) registered_thread();  // liburcu's own call_rcu thread is registered already
  tsan_release(&sweep_head);
  urcu_memb_call_rcu(&sweep_head.head, &Impl::sweep);
}

// The sweeper's grace period is over: the batches it covers go back; more retired since
// get a grace period of their own.
void P2PMemory::Impl::sweep(rcu_head* head) {
  tsan_acquire(head);
  Impl* m = reinterpret_cast<SweepHead*>(head)->impl;
  std::lock_guard p(m->process_mu);
  std::vector<Batch*> done;
  {
    std::lock_guard g(m->retire_mu);
    done.swap(m->sweeping);
    m->sweep_armed = false;
    if (!m->retired.empty()) m->arm_locked(/*registered=*/true);
  }
  for (Batch* b : done) give_back(b);
}

// Any thread: every batch retired so far goes back after one synchronize_rcu(), without
// waiting for the call_rcu thread (which batches its work for ~10 ms). Not in a ReadGuard.
void P2PMemory::Impl::grace_now() {
  std::vector<Batch*> mine;
  {
    std::lock_guard g(retire_mu);
    mine.swap(retired);
    mine.insert(mine.end(), sweeping.begin(), sweeping.end());
    sweeping.clear();
  }
  registered_thread();
  urcu_memb_synchronize_rcu();  // every read-side section that began before has ended
  std::lock_guard p(process_mu);
  for (Batch* b : mine) give_back(b);
}

// The grace period of a batch is over: its chunks go back to their resources.
void P2PMemory::Impl::give_back(Batch* b) {
  Resource* locked = nullptr;
  for (uint32_t i = 0; i < b->n; ++i) {
    Resource* const r = b->resource(i);
    if (r != locked) {
      if (locked) locked->mu.unlock();
      locked = r;
      locked->mu.lock();
    }
    const uint64_t size = b->bytes(i);
    if (!r->removed.load(std::memory_order_relaxed)) r->give_back(b->address(i), size);
    r->deferred_done.fetch_add(size, std::memory_order_relaxed);
  }
  if (locked) locked->mu.unlock();
  recycle(b);
}

// Takes every thread's pending batch and its cached chunks (all, or those of dying
// resources) with the handshake in the header comment, and submits the batches. A thread's
// steal flag is cleared only here, after its caches are emptied (alloc_cached() relies on it).
void P2PMemory::Impl::steal_all(bool only_dying) {
  std::vector<Batch*> batches;
  {
    std::lock_guard g(mu);
    for (auto& tc : caches) tc->steal.store(1, std::memory_order_relaxed);
    heavy_fence();
    for (auto& tc : caches) {
      while (tc->busy.load(std::memory_order_acquire)) std::this_thread::yield();
      std::lock_guard t(tc->mu);
      flush_locked(tc.get(), only_dying);
      if (tc->pending && tc->pending->n) {
        batches.push_back(tc->pending);
        tc->pending = nullptr;
      }
      take_batches(tc.get(), batches);
      tc->steal.store(0, std::memory_order_release);
    }
    batches.insert(batches.end(), unsubmitted.begin(), unsubmitted.end());
    unsubmitted.clear();
  }
  for (Batch* b : batches) submit(b);
}

// Every free so far is back in its pool, and so is every cached chunk: afterwards the
// bitmaps hold exactly what callers hold, so a free without tracking is checked exactly
// until the caches fill again.
void P2PMemory::Impl::barrier() {
  steal_all(/*only_dying=*/false);
  grace_now();  // rcu_barrier(), for the frees so far
  std::vector<Resource*> rs;
  {
    std::lock_guard g(mu);
    for (auto& r : resources) rs.push_back(r.get());
  }
  for (Resource* r : rs) {
    std::lock_guard g(r->mu);
    if (r->removed.load(std::memory_order_relaxed)) continue;
    for (unsigned k = 0; k < kClasses; ++k) {
      for (uint64_t a : r->depot[k]) r->assign((a - r->span.base.value()) >> kPageShift, uint64_t{1} << k, false);
      r->depot[k].clear();
    }
  }
}

void P2PMemory::Impl::sum(const Resource* r, int64_t& chunks, int64_t& bytes, int64_t& deferred_in) {
  chunks = bytes = deferred_in = 0;
  std::lock_guard g(mu);
  for (auto& tc : caches) {
    std::lock_guard t(tc->mu);
    if (tc->function != r->function) continue;  // ordinals count per function
    const ResCache* c = tc->rc[r->ordinal].get();
    if (!c) continue;
    const uint64_t freed = c->freed.load(std::memory_order_relaxed);
    chunks += c->chunks.load(std::memory_order_relaxed);
    bytes += static_cast<int64_t>(c->handed_out.load(std::memory_order_relaxed) - freed);
    deferred_in += static_cast<int64_t>(freed - c->deferred_out.load(std::memory_order_relaxed));
  }
}

// ---------------------------------------------------------------------------------------
// Allocation

// A chunk of r; (provider, function) is one 8-byte copy of r->key.
[[gnu::always_inline]] inline P2PChunk chunk_of(const uint64_t& key, uint64_t a, uint64_t size) {
  P2PChunk out;
  out.span = PhysSpan{PhysAddr(a), size};
  std::memcpy(&out.provider, &key, sizeof key);
  return out;
}

// The fast path: a chunk of a cached class popped from the calling thread's magazine of the
// resource it last allocated from, under the busy/steal and live-reference handshakes of the
// header comment. The class test is one rounding and three compares: the rounded size a power
// of two up to 2 MiB, the alignment a power of two from 4 KiB to that size (align - 4 KiB <
// size is align <= size for powers of two, and wraps for align < 4 KiB). plain_uid is uid
// only for a pool without tracking on a kernel with membarrier, so that one compare picks the
// thread's cache and the variant that needs neither a fence nor a record; others take
// alloc_general().
inline Error* P2PMemory::Impl::alloc(P2PChunk* out, uint32_t f, uint64_t size, const AllocOptions& o) {
  // gen_pool_alloc rounds the size up to the pool's granule (PAGE_SHIFT for p2pdma).
  const uint64_t s = (size + kPageSize - 1) & ~(kPageSize - 1);
  const uint64_t align = o.align;
  if (size - 1 < kMaxClassSize && !(s & (s - 1)) && (align == kPageSize || (!(align & (align - 1)) && align - kPageSize < s))) [[likely]] {
    // t_last names only functions that exist (find_cache runs after the function is checked).
    if (t_last.key == (plain_key | f)) [[likely]] return alloc_cached<true>(out, t_last.tc, f, s, o);
    return alloc_general(out, f, s, o);
  }
  return alloc_slow_to(out, f, size, o);
}

// alloc_slow() into *out.
Error* P2PMemory::Impl::alloc_slow_to(P2PChunk* out, uint32_t f, uint64_t size, const AllocOptions& o) {
  Result<P2PChunk> r = alloc_slow(f, size, o);
  if (!r) return physr::detail::ResultAccess::take(r);
  *out = *r;
  return nullptr;
}

// A cached class (s rounded), not the plain pool's common case: another function or
// P2PMemory than the thread's last (which this one becomes), tracking, or no membarrier.
Error* P2PMemory::Impl::alloc_general(P2PChunk* out, uint32_t f, uint64_t s, const AllocOptions& o) {
  if (t_last.mem != uid || t_last.function != f) {
    if (f >= nfns) return alloc_slow_to(out, f, s, o);
    find_cache(f);
  }
  if (plain_uid == uid) return alloc_cached<true>(out, t_last.tc, f, s, o);
  return alloc_cached<false>(out, t_last.tc, f, s, o);
}

// kPlain: untracked, and the membarrier makes the light side of the handshakes a compiler
// barrier.
template <bool kPlain>
[[gnu::always_inline]] inline Error* P2PMemory::Impl::alloc_cached(P2PChunk* out, ThreadCache* tc, uint32_t f, uint64_t s, const AllocOptions& o) {
  ResCache* const c = tc->hot;
  if (!c) [[unlikely]] return alloc_slow_to(out, f, s, o);
  const unsigned k = static_cast<unsigned>(std::countr_zero(s)) - kPageShift;
  Resource* const r = c->r;
  tc->busy.store(1, std::memory_order_relaxed);
  bump(c->chunks, 1);  // counted before the steal check (percpu_ref_tryget_live)
  if constexpr (kPlain) std::atomic_signal_fence(std::memory_order_seq_cst);
  else light_fence();
  // steal stands for the resource's dying flag too: remove() sets every thread's steal with
  // dying, before its heavy fence, and a stealer clears it only after emptying the thread's
  // magazines of dying resources, which nothing refills afterwards (alloc_locked() and
  // take_ready() test dying). So a chunk popped here is of a live resource, or counted
  // before remove()'s fence, which is percpu_ref_tryget_live() against percpu_ref_kill().
  const bool stop = tc->steal.load(std::memory_order_acquire);
  if (!stop) [[likely]] {
    Mag m = c->mag(k);
    if (const uint32_t n = m.n) [[likely]] {
      m.n = n - 1;
      const uint64_t a = m.addr[n - 1] & ~kTagMask;
      bump(c->handed_out, s);
      tc->busy.store(0, std::memory_order_release);
      if (kPlain || !track) {
        *out = chunk_of(c->key, a, s);
        return nullptr;
      }
      return tracked_chunk(out, chunk_of(c->key, a, s), o.owner, r);
    }
  }
  bump(c->chunks, -1);
  tc->busy.store(0, std::memory_order_release);
  if (!stop) return alloc_refill(out, tc, f, s, o);  // the magazine is empty
  return alloc_slow_to(out, f, s, o);
}

// The fast path's arguments are valid and the thread's magazine is empty: refill it (under
// the thread's lock) without alloc_slow()'s checks, which the failures still go through.
Error* P2PMemory::Impl::alloc_refill(P2PChunk* out, ThreadCache* tc, uint32_t f, uint64_t size, const AllocOptions& o) {
  Resource* from = nullptr;
  bool got;
  {
    std::unique_lock t(tc->mu);
    got = alloc_locked(tc, t, f, size, o.align, *out, from);
  }
  if (!got) return alloc_slow_to(out, f, size, o);
  if (track) record(*out, o.owner, from);
  return nullptr;
}

Error* P2PMemory::Impl::tracked_chunk(P2PChunk* out, const P2PChunk& c, const char* owner, Resource* r) {
  record(c, owner, r);
  *out = c;
  return nullptr;
}

void P2PMemory::Impl::record(const P2PChunk& c, const char* owner, Resource* r) {
  std::lock_guard g(track_mu);
  tracked.emplace(c.span.base.value(), Tracked{c.span.size, owner, r});
}

// Under tc->mu: an allocation from the function's resources in order (gen_pool_alloc walks
// its chunks in order), taking the live reference first.
bool P2PMemory::Impl::alloc_locked(ThreadCache* tc, std::unique_lock<std::mutex>& lk, uint32_t f, uint64_t size, uint64_t align, P2PChunk& out,
                                   Resource*& from) {
  FunctionState& fs = fns[f];
  const uint32_t n = fs.nres.load(std::memory_order_acquire);
  const unsigned k = class_of(size, align);
  for (uint32_t i = 0; i < n; ++i) {
    Resource* r = fs.res[i].load(std::memory_order_acquire);
    if (r->dying.load(std::memory_order_relaxed) || size > r->span.size) continue;
    ResCache* c = slot_for(tc, r);
    bump(c->chunks, 1);
    light_fence();
    if (r->dying.load(std::memory_order_relaxed)) {  // percpu_ref_tryget_live() failed
      bump(c->chunks, -1);
      continue;
    }
    uint64_t a = 0;
    bool got = false;
    if (k < kClasses && !c->mag_n[k]) {
      // The thread's own frees whose grace period is over come back first, without a lock
      // (per-thread lists, as the kernel's per-cpu page lists in front of the buddy), then a
      // grace period of the thread's own once many batches wait for one.
      if (!take_ready(tc, c, k) && tc->waiting.size() >= kSyncBatches && grace_local(tc, lk)) take_ready(tc, c, k);
    }
    if (k < kClasses && c->mag_n[k]) {
      a = c->mag_addr[k][--c->mag_n[k]] & ~kTagMask;
      got = true;
    } else {
      std::lock_guard g(r->mu);
      if (k < kClasses) {
        Mag m = c->mag(k);
        if (!m.n) {
          std::vector<uint64_t>& d = r->depot[k];
          const uint32_t cap = mag_cap(k);
          while (m.n < cap && !d.empty()) {
            m.addr[m.n++] = d.back();
            d.pop_back();
          }
          const uint64_t g1 = uint64_t{1} << k;
          uint64_t found[kMagSize];
          uint32_t nf = 0;
          for (int pass = 0; pass < 2 && m.n + nf < cap && r->free_granules >= g1; ++pass) {
            uint64_t at = pass ? 0 : r->cursor[k];
            if (k == 0) {
              // 4 KiB: every free bit of a word at once.
              for (uint64_t wi = at >> 6; m.n + nf < cap && wi < (r->granules + 63) / 64; ++wi) {
                std::atomic<uint64_t>& word = r->bits[wi];
                uint64_t v = word.load(std::memory_order_relaxed);
                uint64_t freeb = ~v & (~uint64_t{0} << (wi == at >> 6 ? at & 63 : 0));
                while (freeb && m.n + nf < cap) {
                  const unsigned bit = static_cast<unsigned>(std::countr_zero(freeb));
                  freeb &= freeb - 1;
                  v |= uint64_t{1} << bit;
                  --r->free_granules;
                  found[nf++] = r->span.base.value() + (((wi << 6) + bit) << kPageShift);
                  at = (wi << 6) + bit + 1;
                }
                word.store(v, std::memory_order_relaxed);
                if (!freeb) at = std::max(at, (wi + 1) << 6);
                if (!r->free_granules) break;
              }
              r->cursor[k] = at;
              continue;
            }
            // 256 KiB and up: a word at a time when words and chunks align.
            const bool words = g1 >= 64 && !(r->first_pfn() & 63);
            while (m.n + nf < cap && r->free_granules >= g1) {
              const uint64_t s = words ? r->find_words(at, g1) : r->find_run(at, g1, g1);
              if (s >= r->granules) break;
              r->assign(s, g1, true);
              found[nf++] = r->span.base.value() + (s << kPageShift);
              at = s + g1;
            }
            r->cursor[k] = at;
          }
          while (nf) m.addr[m.n++] = found[--nf];  // the lowest address pops first
        }
        if (m.n) {
          a = m.addr[--m.n] & ~kTagMask;
          got = true;
        }
      }
      if (!got) {
        // First fit, aligned (gen_pool_first_fit_align); also the fallback when no naturally
        // aligned chunk of a cached size is left.
        const uint64_t align_g = std::max<uint64_t>(align, kPageSize) >> kPageShift;
        const uint64_t s = r->free_granules >= (size >> kPageShift) ? r->find_run(0, size >> kPageShift, align_g) : r->granules;
        if (s < r->granules) {
          r->assign(s, size >> kPageShift, true);
          a = r->span.base.value() + (s << kPageShift);
          got = true;
        }
      }
    }
    // The pool is dry but this thread's frees wait for a grace period: end one and take them.
    if (!got && k < kClasses && !tc->waiting.empty() && grace_local(tc, lk) && take_ready(tc, c, k)) {
      a = c->mag_addr[k][--c->mag_n[k]] & ~kTagMask;
      got = true;
    }
    if (!got) {
      bump(c->chunks, -1);
      continue;
    }
    bump(c->handed_out, size);
    if (k < kClasses) tc->hot = c;
    out = P2PChunk{PhysSpan{PhysAddr(a), size}, r->provider, f};
    from = r;
    return true;
  }
  return false;
}

Result<P2PChunk> P2PMemory::Impl::alloc_slow(uint32_t f, uint64_t size, const AllocOptions& o) {
  if (f >= nfns) return make_error(EINVAL, "p2pmem alloc: no function " + std::to_string(f));
  const auto who = [&] { return platform->label(f); };
  if (size == 0) return make_error(EINVAL, "p2pmem alloc from " + who() + ": size 0 (gen_pool_alloc returns nothing for 0 bytes)");
  if (o.align < kPageSize || (o.align & (o.align - 1)))
    return make_error(EINVAL, "p2pmem alloc from " + who() + ": alignment " + hex(o.align) + " is not a power of two >= 4 KiB");
  if (size - 1 >= kMaxChunk) return make_error(ENOMEM, "p2pmem alloc from " + who() + ": " + hex(size) + " bytes is more than any BAR holds");
  size = (size + kPageSize - 1) & ~(kPageSize - 1);
  FunctionState& fs = fns[f];
  const uint32_t n = fs.nres.load(std::memory_order_acquire);
  bool live = false;
  for (uint32_t i = 0; i < n; ++i) live |= !fs.res[i].load(std::memory_order_acquire)->dying.load(std::memory_order_acquire);
  // Linux pci_alloc_p2pmem(): NULL without pdev->p2pdma, or once percpu_ref_tryget_live fails.
  if (!live) return make_error(ENODEV, "p2pmem alloc from " + who() + ": " + (n ? "its P2P memory is being removed" : "it has no P2P memory"));
  ThreadCache* tc = cache_for(f);
  for (int attempt = 0; attempt < 2; ++attempt) {
    P2PChunk out;
    Resource* from = nullptr;
    bool got;
    {
      std::unique_lock t(tc->mu);
      got = alloc_locked(tc, t, f, size, o.align, out, from);
    }
    if (got) {
      if (track) record(out, o.owner, from);
      return out;
    }
    // Freed memory may be waiting for its grace period: wait for it once, then retry.
    if (attempt == 0) barrier();
  }
  bool dying = true;
  for (uint32_t i = 0; i < n; ++i) dying &= fs.res[i].load(std::memory_order_acquire)->dying.load(std::memory_order_acquire);
  if (dying) return make_error(ENODEV, "p2pmem alloc from " + who() + ": its P2P memory is being removed");
  return make_error(ENOMEM, "p2pmem alloc from " + who() + ": no free run of " + hex(size) + " bytes aligned to " + hex(o.align));
}

// ---------------------------------------------------------------------------------------
// Free

Error* P2PMemory::Impl::free_error(const P2PChunk& c, const std::string& why) const {
  return physr::detail::new_error(make_error(EINVAL, "p2pmem free of " + describe(c.span) + " (provider " + std::to_string(c.provider) + ", function " +
                                std::to_string(c.function) + "): " + why));
}

// Pushes a free onto the thread's pending batch, counted out of the thread's live reference
// and into deferral. Only after steal reads clear is the batch this thread's to touch (the
// handshake in the header comment): stolen, when it is not, and nothing is done. full: the
// batch is full and taken off the thread (the caller retires it).
enum class Push { done, full, stolen };
template <bool kPlain = false, bool kMaybeOdd = true>
[[gnu::always_inline]] inline Push push_free(ThreadCache* tc, ResCache* rc, uint64_t entry, uint64_t size, bool odd, Batch*& b) {
  tc->busy.store(1, std::memory_order_relaxed);
  if constexpr (kPlain) std::atomic_signal_fence(std::memory_order_seq_cst);
  else light_fence();
  b = tc->steal.load(std::memory_order_acquire) ? nullptr : tc->pending;
  if (!b) [[unlikely]] {
    tc->busy.store(0, std::memory_order_release);
    return Push::stolen;
  }
  const uint32_t n = b->n;
  b->e[n] = entry;
  if (kMaybeOdd && odd) b->size[n] = size;
  b->n = n + 1;
  bump(rc->chunks, -1);
  bump(rc->freed, size);
  const bool full = n + 1 == kBatchSize;
  if (full) tc->pending = nullptr;
  tc->busy.store(0, std::memory_order_release);
  return full ? Push::full : Push::done;
}

// (provider, function) as one 8-byte value: the hot resource is of the thread's last
// function, so one compare with its key checks both.
namespace {
inline uint64_t owner_key(ProviderId provider, uint32_t function) { return uint64_t{provider} | uint64_t{function} << 32; }
inline uint64_t owner_key(const P2PChunk& c) {
  static_assert(offsetof(P2PChunk, function) == offsetof(P2PChunk, provider) + 4 && sizeof(ProviderId) == 4 && std::endian::native == std::endian::little);
  uint64_t k;
  std::memcpy(&k, &c.provider, sizeof k);
  return k;
}
}  // namespace

// The common free, without tracking, of a chunk of the resource the thread last allocated
// from: the same checks as free_full() (the live resource of the provider holding the whole
// span is unique, as resources never overlap; whole granules; every granule held:
// gen_pool_free_owner()'s BUG_ON(remain)), pushed onto the thread's batch; anything else is
// free_full(). kPlain as for alloc_cached().
template <bool kPlain>
[[gnu::always_inline]] inline Error* P2PMemory::Impl::free_cached(const P2PChunk& c) {
  // One granule inline; other sizes out of line (fewer registers to save on the common path).
  if (c.span.size != kPageSize) [[unlikely]] return free_sized<kPlain>(c);
  return free_sized_body<kPlain>(c);
}

template <bool kPlain>
Error* P2PMemory::Impl::free_sized(const P2PChunk& c) {
  return free_sized_body<kPlain>(c);
}

template <bool kPlain>
[[gnu::always_inline]] inline Error* P2PMemory::Impl::free_sized_body(const P2PChunk& c) {
  ThreadCache* tc = t_last.tc;
  if (ResCache* rc = tc->hot) [[likely]] {
    Resource* r = rc->r;
    const uint64_t a = c.span.base.value(), size = c.span.size, off = a - r->span.base.value();
    // No test of removed: remove() ends only once every chunk came back, with every granule
    // of the resource clear, so the bitmap test fails for a removed resource too. A resource
    // starts on a page (add_resource()), so the offset's alignment is the address's; one
    // granule (the common size) needs no length test: off < size is off + 4 KiB <= size.
    if (owner_key(c) == r->key && off < r->span.size) [[likely]] {
      Batch* b;
      if (size == kPageSize) {
        if (!(off & (kPageSize - 1)) && r->test(off >> kPageShift)) [[likely]] {
          const Push p = push_free<kPlain, false>(tc, rc, a | r->tag, size, false, b);  // class 0
          if (p == Push::done) [[likely]] return nullptr;
          if (p == Push::full) return retire(tc, b);
        }
      } else if (size - 1 < r->span.size - off && !((off | size) & (kPageSize - 1)) && r->all_set_quick(off >> kPageShift, size >> kPageShift)) {
        const uint64_t k = size_tag(size);
        const Push p = push_free<kPlain>(tc, rc, a | r->tag | k, size, k == kOddSize, b);
        if (p == Push::done) [[likely]] return nullptr;
        if (p == Push::full) return retire(tc, b);
      }
    }
  }
  return free_full(c);
}

// plain_uid as in alloc(): one compare picks the thread's cache and the variant without the
// fence; tracking or no membarrier takes free_general().
inline Error* P2PMemory::Impl::free(const P2PChunk& c) {
  if (t_last.mem == plain_uid) [[likely]] return free_cached<true>(c);
  return free_general(c);
}

Error* P2PMemory::Impl::free_general(const P2PChunk& c) {
  if (!track && t_last.mem == uid) return free_cached<false>(c);
  return free_full(c);
}

Error* P2PMemory::Impl::free_full(const P2PChunk& c) {
  const uint32_t f = c.function;
  if (f >= nfns) [[unlikely]] return free_error(c, "no such function");
  const uint64_t a = c.span.base.value(), size = c.span.size;
  FunctionState& fs = fns[f];
  const uint32_t n = fs.nres.load(std::memory_order_acquire);
  Resource* r = nullptr;
  for (uint32_t i = 0; i < n; ++i) {
    Resource* x = fs.res[i].load(std::memory_order_relaxed);
    if (x->provider == c.provider && x->span.contains(c.span)) {
      r = x;  // a removed resource only if no live one holds the span (the BAR re-added)
      if (!x->removed.load(std::memory_order_acquire)) break;
    }
  }
  // The address, not its offset in the resource: the same test, as every resource starts on
  // a 4 KiB page (add_resource()).
  if ((a | size) & (kPageSize - 1) || size == 0) [[unlikely]]
    return free_error(c, "chunks are whole 4 KiB granules (address and size multiples of 4 KiB)");
  // gen_pool_free_owner(): BUG() for an address in no chunk of the pool.
  if (!r) [[unlikely]] return free_error(c, "not inside any P2P resource of this function and provider");
  if (r->removed.load(std::memory_order_acquire)) [[unlikely]] return free_error(c, "its resource was removed (every chunk came back before)");
  if (track) {
    std::lock_guard g(track_mu);
    const auto it = tracked.find(a);
    if (it == tracked.end()) return free_error(c, "not allocated (double free, or never handed out)");
    if (it->second.size != size)
      return free_error(c, "allocated with size " + hex(it->second.size) + ": a chunk is freed whole, with the size it was handed out with");
    tracked.erase(it);
  } else if (!r->all_set((a - r->span.base.value()) >> kPageShift, size >> kPageShift)) [[unlikely]] {
    // gen_pool_free_owner(): BUG_ON(remain) when a granule is already free.
    return free_error(c, "part of it is free in the pool (double free, or never handed out)");
  }
  ThreadCache* tc = cache_for(f);
  if (ResCache* rc = tc->rc[r->ordinal].get()) {
    Batch* b;
    const uint64_t k = size_tag(size);
    const Push p = push_free(tc, rc, a | r->tag | k, size, k == kOddSize, b);
    if (p == Push::done) [[likely]] return nullptr;
    if (p == Push::full) return retire(tc, b);
  }
  free_slow(tc, r, a, size);
  return nullptr;
}

void P2PMemory::Impl::free_slow(ThreadCache* tc, Resource* r, uint64_t addr, uint64_t size) {
  Batch* full = nullptr;
  {
    std::lock_guard t(tc->mu);
    ResCache* slot = slot_for(tc, r);
    if (!tc->pending) tc->pending = new_batch(fns[tc->function].res);
    Batch* b = tc->pending;
    b->push(addr | r->tag | size_tag(size), size);
    bump(slot->chunks, -1);
    bump(slot->freed, size);
    if (b->n == kBatchSize) {
      full = retire_locked(tc, b);
      tc->pending = new_batch(fns[tc->function].res);
    }
  }
  if (full) submit(full);
}

// Under tc->mu: a full batch waits on the thread for a grace period; the oldest goes to
// call_rcu when too many wait (a thread that frees more than it allocates). Returns it.
Batch* P2PMemory::Impl::retire_locked(ThreadCache* tc, Batch* b) {
  tc->waiting.push_back(b);
  if (tc->waiting.size() <= kMaxWaiting) return nullptr;
  Batch* old = tc->waiting.front();
  tc->waiting.erase(tc->waiting.begin());
  return old;
}

Error* P2PMemory::Impl::retire(ThreadCache* tc, Batch* b) {
  Batch* over;
  {
    std::lock_guard t(tc->mu);
    over = retire_locked(tc, b);
    if (!tc->pending) tc->pending = new_batch(fns[tc->function].res);
  }
  if (over) submit(over);
  return nullptr;
}

// Under lk (tc->mu), which it drops meanwhile: the thread's own grace period
// (synchronize_rcu(), not inside a read-side section), after which every batch that was
// waiting is ready, unless a stealer took them meanwhile. Whether any became ready.
bool P2PMemory::Impl::grace_local(ThreadCache* tc, std::unique_lock<std::mutex>& lk) {
  if (tc->waiting.empty() || urcu_memb_read_ongoing()) return false;
  const size_t n = tc->waiting.size();
  const uint64_t taken = tc->taken;
  lk.unlock();
  registered_thread();
  urcu_memb_synchronize_rcu();  // every read-side section that began before has ended
  lk.lock();
  if (tc->taken != taken) return false;
  tc->ready.insert(tc->ready.end(), tc->waiting.begin(), tc->waiting.begin() + static_cast<std::ptrdiff_t>(n));
  tc->waiting.erase(tc->waiting.begin(), tc->waiting.begin() + static_cast<std::ptrdiff_t>(n));
  return true;
}

// Under tc->mu: refills c's magazine of class k from the thread's ready batches; entries of
// other resources or classes go to their own magazines, or back to their pools when those
// are full or dying. The magazine's count afterwards.
uint32_t P2PMemory::Impl::take_ready(ThreadCache* tc, ResCache* c, unsigned k) {
  Mag m = c->mag(k);
  Resource* const r = c->r;
  const bool live = !r->dying.load(std::memory_order_relaxed) && !r->removed.load(std::memory_order_relaxed);
  const uint64_t csize = kPageSize << k, tag = r->tag | k;
  const uint32_t cap = mag_cap(k);
  while (m.n < cap && !tc->ready.empty()) {
    Batch* b = tc->ready.back();
    if (live) {
      // The common case: the magazine's own resource and size (its tag: the batch is of the
      // thread's function), straight in. The matching tail [from, n): blocks of 8 entries
      // compared at once, then one by one; their addresses copied without the tag.
      const uint32_t n = b->n, mn = m.n, lo = n - std::min(n, cap - mn);
      uint32_t from = n;
      using V2 = uint64_t __attribute__((vector_size(16)));  // two entries per compare (SSE2, NEON)
      const V2 mv = {kTagMask, kTagMask}, tv = {tag, tag};
      while (from - lo >= 8) {
        V2 diff = {0, 0};
        for (uint32_t q = from - 8; q < from; q += 2) {
          V2 x;
          std::memcpy(&x, &b->e[q], sizeof x);
          diff |= (x & mv) ^ tv;
        }
        if (diff[0] | diff[1]) break;
        from -= 8;
      }
      while (from > lo && (b->e[from - 1] & kTagMask) == tag) --from;
      const uint32_t j = n - from;
      std::memcpy(m.addr + mn, b->e + from, j * sizeof(uint64_t));  // tags and all (Mag)
      bump(c->deferred_out, j * csize);
      b->n = from;
      m.n = mn + j;
    }
    while (b->n && m.n < cap) {
      const uint32_t i = --b->n;
      Resource* const er = b->resource(i);
      const uint64_t ea = b->address(i), es = b->bytes(i);
      ResCache* slot = er == c->r ? c : slot_for(tc, er);
      bump(slot->deferred_out, es);
      if (er->removed.load(std::memory_order_relaxed)) continue;  // its pool is gone
      const unsigned ek = class_of(es, es);
      if (ek < kClasses && slot->mag_n[ek] < mag_cap(ek) && !er->dying.load(std::memory_order_relaxed)) {
        slot->mag_addr[ek][slot->mag_n[ek]++] = ea;
      } else {
        std::lock_guard g(er->mu);
        er->give_back(ea, es);
      }
    }
    if (b->n) break;
    tc->ready.pop_back();
    recycle(b);
  }
  return m.n;
}

// ---------------------------------------------------------------------------------------
// Set-up, removal, teardown

std::string P2PMemory::Impl::holders(const Resource* r) {
  std::string out;
  size_t shown = 0;
  if (track) {
    std::lock_guard g(track_mu);
    std::vector<std::pair<uint64_t, Tracked>> v;
    for (const auto& [a, t] : tracked)
      if (t.r == r) v.emplace_back(a, t);
    std::sort(v.begin(), v.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (const auto& [a, t] : v) {
      if (shown++ == 16) {
        out += "\n  ... and " + std::to_string(v.size() - 16) + " more";
        break;
      }
      out += "\n  " + describe(PhysSpan{PhysAddr(a), t.size}) + " owner " + (t.owner ? std::string("'") + t.owner + "'" : std::string("unnamed"));
    }
  } else {
    out += "\n  (tracking off: owners unknown)";
  }
  return out;
}

P2PMemory::Impl::~Impl() {
  {
    std::lock_guard live(g_live_mu);
    g_live.erase(uid);
  }
  steal_all(/*only_dying=*/false);
  grace_now();
  // The sweeper may still be queued (it finds nothing left): wait for it, as rcu_barrier.
  for (;;) {
    {
      std::lock_guard g(retire_mu);
      if (!sweep_armed) break;
    }
    registered_thread();
    urcu_memb_barrier();
  }
  { std::lock_guard p(process_mu); }  // and for the sweeper to finish giving back
  for (auto& r : resources) {
    if (r->removed.load()) continue;
    int64_t chunks, bytes, deferred;
    sum(r.get(), chunks, bytes, deferred);
    if (chunks > 0)
      report("physr mem: P2P memory of " + r->name + " " + describe(r->span) + " torn down with " + std::to_string(chunks) +
             " chunk(s) (" + hex(static_cast<uint64_t>(bytes)) + " bytes) still held:" + holders(r.get()));
  }
  for (auto& tc : caches) {
    delete tc->pending;
    for (Batch* b : tc->waiting) delete b;
    for (Batch* b : tc->ready) delete b;
  }
  for (Batch* b : unsubmitted) delete b;
}

P2PMemory::P2PMemory(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
P2PMemory::~P2PMemory() = default;

Result<std::unique_ptr<P2PMemory>> P2PMemory::create(Platform& platform) { return create(platform, P2PMemoryOptions{}); }

Result<std::unique_ptr<P2PMemory>> P2PMemory::create(Platform& platform, P2PMemoryOptions options) {
  init_membarrier();
  auto impl = std::make_unique<Impl>();
  impl->platform = &platform;
  impl->track = options.track;
  impl->opt = std::move(options);
  impl->uid = g_next_uid.fetch_add(1);
  // (A uid of 2^32 or more would not fit the key: such a pool takes the general path.)
  if (!impl->track && g_membarrier.load(std::memory_order_relaxed) && impl->uid >> 32 == 0) {
    impl->plain_uid = impl->uid;
    impl->plain_key = tls_key(impl->uid, 0);
  }
  impl->nfns = static_cast<uint32_t>(platform.topology().functions.size());
  impl->fns = std::make_unique<FunctionState[]>(impl->nfns);
  {
    std::lock_guard live(g_live_mu);
    g_live.emplace(impl->uid, impl.get());
  }
  return std::unique_ptr<P2PMemory>(new P2PMemory(std::move(impl)));
}

uint64_t P2PMemory::max_pagemap_align(PhysAddr bar_start, uint64_t size, uint64_t offset) noexcept {
  // Linux pci_p2pdma_max_pagemap_align() (proposed): PUD_SIZE, PMD_SIZE or PAGE_SIZE, the
  // largest that the BAR's start, the size and the offset are all aligned to.
  const uint64_t all = bar_start.value() | size | offset;
  if (!(all & (GiB - 1))) return GiB;
  if (!(all & (2 * MiB - 1))) return 2 * MiB;
  return kPageSize;
}

Result<ProviderId> P2PMemory::add_resource(uint32_t function, unsigned bar, uint64_t size, uint64_t offset) {
  Impl& m = *impl_;
  std::lock_guard g(m.mu);
  const pci::Topology& topo = m.platform->topology();
  if (function >= topo.functions.size()) return make_error(EINVAL, "p2pdma add_resource: no function " + std::to_string(function));
  const pci::Function& fn = topo.functions[function];
  const std::string name = m.platform->label(function) + " BAR" + std::to_string(bar);
  const auto b = std::find_if(fn.bars.begin(), fn.bars.end(), [&](const pci::Bar& x) { return x.index == bar; });
  // Linux pci_p2pdma_add_resource(): the three EINVAL rules, in its order.
  if (b == fn.bars.end() || !b->is_mem()) return make_error(EINVAL, "p2pdma add_resource: " + name + " is not a memory BAR (IORESOURCE_MEM)");
  const uint64_t len = b->size();
  if (offset >= len) return make_error(EINVAL, "p2pdma add_resource: offset " + hex(offset) + " is not below " + name + "'s length " + hex(len));
  if (!size) size = len - offset;
  if (size > len - offset)
    return make_error(EINVAL, "p2pdma add_resource: size " + hex(size) + " + offset " + hex(offset) + " runs past " + name + "'s length " + hex(len));
  if ((size | offset) & (kPageSize - 1))
    return make_error(EINVAL, "p2pdma add_resource: size " + hex(size) + " and offset " + hex(offset) + " must be multiples of 4 KiB (the pool's granule)");
  FunctionState& fs = m.fns[function];
  const PhysSpan span{PhysAddr(b->span.base.value() + offset), size};
  const uint32_t n = fs.nres.load(std::memory_order_relaxed);
  for (uint32_t i = 0; i < n; ++i) {
    const Resource* r = fs.res[i].load(std::memory_order_relaxed);
    if (!r->removed.load() && r->span.overlaps(span))
      return make_error(EEXIST, "p2pdma add_resource: " + describe(span) + " of " + name + " overlaps " + describe(r->span) + ", added before");
  }
  if (n == kMaxResources) return make_error(ENOSPC, "p2pdma add_resource: " + m.platform->label(function) + " has " + std::to_string(n) + " resources, the most physr keeps");
  const Aperture* ap = nullptr;
  for (const Aperture& a : m.platform->apertures())
    if (a.function == function && a.bar == bar) ap = &a;
  // The BAR's aperture is 4 KiB aligned (ProviderRegistry::add() refuses any other: EINVAL)
  // and the offset is whole granules, so the resource starts on a page and the absolute
  // alignment tests of free() are its offsets' (MemPoolTest.AResourceThatDoesNotStartOnAPageIsEinval).
  // Linux never sees another: a memory BAR is aligned to its size, and devm_memremap_pages()
  // maps page frames (on x86-64 __add_pages()' check_pfn_span() even wants 2 MiB subsections,
  // which physr's 4 KiB granule does not model).
  if (!ap) {
    PHYSR_ASSIGN_OR_RETURN_CTX(ap, m.platform->add_bar(function, bar, /*published=*/false), "p2pdma add_resource");
  }
  auto r = std::make_unique<Resource>();
  r->provider = ap->id;
  r->function = function;
  r->ordinal = n;
  r->tag = uint64_t{n} << 4;
  r->key = owner_key(r->provider, function);
  r->bar = bar;
  r->span = span;
  r->bus_offset = ap->bus_offset;
  r->pagemap_align = max_pagemap_align(b->span.base, size, offset);
  r->name = name;
  r->granules = size >> kPageShift;
  r->free_granules = r->granules;
  const uint64_t words = (r->granules + 63) / 64;
  r->bits = std::make_unique<std::atomic<uint64_t>[]>(words);
  for (uint64_t i = 0; i < words; ++i) r->bits[i].store(0, std::memory_order_relaxed);
  if (r->granules & 63) r->bits[words - 1].store(~uint64_t{0} << (r->granules & 63), std::memory_order_relaxed);  // past the end: never free
  Resource* raw = r.get();
  m.resources.push_back(std::move(r));
  fs.res[n].store(raw, std::memory_order_release);
  fs.nres.store(n + 1, std::memory_order_release);
  return raw->provider;
}

Status P2PMemory::publish(uint32_t function, bool publish) {
  Impl& m = *impl_;
  std::lock_guard g(m.mu);
  if (function >= m.nfns) return make_error(EINVAL, "p2pmem publish: no function " + std::to_string(function));
  FunctionState& fs = m.fns[function];
  bool live = false;
  for (uint32_t i = 0; i < fs.nres.load(); ++i) {
    Resource* r = fs.res[i].load();
    if (r->dying.load()) continue;
    live = true;
    PHYSR_RETURN_IF_ERROR(m.platform->providers().set_published(r->provider, publish));
  }
  // Linux pci_p2pmem_publish() does nothing without pdev->p2pdma; physr says so.
  if (!live) return make_error(ENODEV, "p2pmem publish: " + m.platform->label(function) + " has no P2P memory");
  fs.published.store(publish, std::memory_order_release);
  return {};
}

Error* P2PMemory::alloc_raw(P2PChunk* out, uint32_t function, uint64_t size, const AllocOptions& o) { return impl_->alloc(out, function, size, o); }
Error* P2PMemory::free_raw(const P2PChunk& chunk) { return impl_->free(chunk); }

std::optional<uint32_t> P2PMemory::find_many(std::span<const uint32_t> clients) const {
  const Impl& m = *impl_;
  std::vector<uint32_t> owners;
  for (uint32_t f = 0; f < m.nfns; ++f) {
    // Linux pci_has_p2pmem(): p2pdma state and p2pmem_published.
    const FunctionState& fs = m.fns[f];
    if (!fs.published.load(std::memory_order_acquire)) continue;
    bool live = false;
    for (uint32_t i = 0; i < fs.nres.load(std::memory_order_acquire); ++i) live |= !fs.res[i].load()->dying.load(std::memory_order_acquire);
    if (live) owners.push_back(f);
  }
  if (owners.empty() || clients.empty()) return std::nullopt;
  return m.platform->p2p().find_many(clients, owners, [](size_t) { return size_t{0}; });
}

Result<BusAddr> P2PMemory::virt_to_bus(uint32_t function, PhysAddr a) const {
  const Impl& m = *impl_;
  if (function >= m.nfns) return make_error(EINVAL, "p2pmem virt_to_bus: no function " + std::to_string(function));
  const FunctionState& fs = m.fns[function];
  for (uint32_t i = 0; i < fs.nres.load(std::memory_order_acquire); ++i) {
    const Resource* r = fs.res[i].load(std::memory_order_acquire);
    // gen_pool_virt_to_phys(): the chunk holding the address; its bus base was recorded
    // (pci_bus_address + offset) when the resource was added.
    if (!r->removed.load(std::memory_order_acquire) && r->span.contains(a)) return BusAddr(a.value() + r->bus_offset);
  }
  return make_error(EINVAL, "p2pmem virt_to_bus: " + hex(a.value()) + " is in no P2P resource of " + m.platform->label(function));
}

P2PMemory::RevokeToken P2PMemory::on_revoke(uint32_t function, RevokeFn fn) {
  std::lock_guard g(impl_->mu);
  if (function >= impl_->nfns || !fn) return {};
  auto sub = std::make_shared<RevokeSub>();
  sub->id = ++impl_->next_revoke_id;
  sub->fn = std::move(fn);
  impl_->fns[function].revoke.push_back(sub);
  return RevokeToken{function, sub->id};
}

Status P2PMemory::off_revoke(RevokeToken token) {
  std::shared_ptr<RevokeSub> sub;
  {
    std::lock_guard g(impl_->mu);
    if (token.function < impl_->nfns) {
      auto& v = impl_->fns[token.function].revoke;
      auto it = std::find_if(v.begin(), v.end(), [&](const auto& s) { return s->id == token.id; });
      if (token.id && it != v.end()) {
        sub = *it;
        v.erase(it);
      }
    }
  }
  if (!sub)
    return make_error(EINVAL, "p2pmem off_revoke: no subscription " + std::to_string(token.id) + " to " +
                                  (token.function < impl_->nfns ? impl_->platform->label(token.function) : "function " + std::to_string(token.function)));
  // A remove() calling it holds call_mu: wait for that call to end.
  std::lock_guard c(sub->call_mu);
  sub->ended = true;
  return {};
}

void P2PMemory::barrier() { impl_->barrier(); }

void P2PMemory::attach_file(uint32_t function, P2PMemorySource* file) {
  std::lock_guard g(impl_->mu);
  if (function < impl_->nfns) impl_->fns[function].files.push_back(file);
}

void P2PMemory::detach_file(uint32_t function, P2PMemorySource* file) {
  std::lock_guard g(impl_->mu);
  if (function < impl_->nfns) std::erase(impl_->fns[function].files, file);
}

PoolStats P2PMemory::stats(uint32_t function) const {
  Impl& m = *impl_;
  PoolStats s;
  if (function >= m.nfns) return s;
  const FunctionState& fs = m.fns[function];
  for (uint32_t i = 0; i < fs.nres.load(std::memory_order_acquire); ++i) {
    const Resource* r = fs.res[i].load(std::memory_order_acquire);
    if (r->removed.load(std::memory_order_acquire)) continue;
    int64_t chunks, bytes, deferred_in;
    m.sum(r, chunks, bytes, deferred_in);
    s.size += r->span.size;
    s.chunks += static_cast<uint64_t>(std::max<int64_t>(chunks, 0));
    s.allocated += static_cast<uint64_t>(std::max<int64_t>(bytes, 0));
    const int64_t done = static_cast<int64_t>(r->deferred_done.load(std::memory_order_acquire));
    s.deferred += static_cast<uint64_t>(std::max<int64_t>(deferred_in - done, 0));
  }
  return s;
}

std::optional<ProviderId> P2PMemory::provider_of(uint32_t function) const {
  const Impl& m = *impl_;
  if (function >= m.nfns) return std::nullopt;
  const FunctionState& fs = m.fns[function];
  for (uint32_t i = 0; i < fs.nres.load(std::memory_order_acquire); ++i) {
    const Resource* r = fs.res[i].load(std::memory_order_acquire);
    if (!r->removed.load(std::memory_order_acquire) && !r->dying.load(std::memory_order_acquire)) return r->provider;
  }
  return std::nullopt;
}

Status P2PMemory::remove(uint32_t function) {
  Impl& m = *impl_;
  std::lock_guard serial(m.remove_mu);
  if (function >= m.nfns) return make_error(EINVAL, "p2pmem remove: no function " + std::to_string(function));
  FunctionState& fs = m.fns[function];
  const std::string who = m.platform->label(function);
  std::vector<Resource*> rs;
  std::vector<std::shared_ptr<RevokeSub>> revoke;
  {
    std::lock_guard g(m.mu);
    for (uint32_t i = 0; i < fs.nres.load(); ++i)
      if (Resource* r = fs.res[i].load(); !r->removed.load()) rs.push_back(r);
    revoke = fs.revoke;
  }
  if (rs.empty()) return make_error(ENODEV, "p2pmem remove: " + who + " has no P2P memory");
  // percpu_ref_kill(pgmap->ref): from here percpu_ref_tryget_live() fails, so every
  // allocation that did not see the flag is in the counts summed below (header comment).
  for (Resource* r : rs) r->dying.store(true, std::memory_order_release);
  fs.published.store(false, std::memory_order_release);
  {
    // The fast alloc path reads steal, not dying (alloc_cached()): every thread takes its
    // slow path until steal_all() below has emptied its caches of these resources.
    std::lock_guard g(m.mu);
    for (auto& tc : m.caches) tc->steal.store(1, std::memory_order_relaxed);
  }
  heavy_fence();
  // pci_p2pdma_unmap_mappings(): unmap_mapping_range() on the allocate file, so that no
  // user mapping of the memory is left (a later pin of those addresses is EFAULT). Chunks
  // only mapped are freed now; pinned ones (an I/O in flight) hold on until their unpin,
  // which the wait below sees, as memunmap_pages() waits for pgmap->ref.
  std::vector<P2PMemorySource*> files;
  {
    std::lock_guard g(m.mu);
    files = fs.files;
  }
  for (P2PMemorySource* file : files) file->unmap_mapping_range();
  // Cached chunks and pending frees of these resources go back, so that what is left set in
  // their bitmaps is exactly what callers hold.
  m.steal_all(/*only_dying=*/true);
  m.grace_now();
  std::vector<P2PChunk> held;
  for (Resource* r : rs) {
    std::lock_guard g(r->mu);
    for (unsigned k = 0; k < kClasses; ++k) {
      for (uint64_t a : r->depot[k]) r->assign((a - r->span.base.value()) >> kPageShift, uint64_t{1} << k, false);
      r->depot[k].clear();
    }
    if (!m.track) {
      for (uint64_t i = r->next(0, r->granules, true); i < r->granules;) {
        const uint64_t e = r->next(i, r->granules, false);
        held.push_back(P2PChunk{PhysSpan{PhysAddr(r->span.base.value() + (i << kPageShift)), (e - i) << kPageShift}, r->provider, function});
        i = r->next(e, r->granules, true);
      }
    }
  }
  if (m.track) {
    std::lock_guard g(m.track_mu);
    for (const auto& [a, t] : m.tracked)
      if (std::find(rs.begin(), rs.end(), t.r) != rs.end()) held.push_back(P2PChunk{PhysSpan{PhysAddr(a), t.size}, t.r->provider, function});
    std::sort(held.begin(), held.end(), [](const P2PChunk& x, const P2PChunk& y) { return x.span.base < y.span.base; });
  }
  // pci_p2pdma_unmap_mappings(): holders stop using the memory (and free it); every
  // subscriber in turn, each with every chunk, unless its subscription ended meanwhile.
  for (const auto& sub : revoke)
    for (const P2PChunk& ch : held) {
      std::lock_guard c(sub->call_mu);  // per call: an off_revoke() waits for one call only
      if (!sub->ended) sub->fn(ch);
    }
  // memunmap_pages() waits for pgmap->ref to drop to zero; physr waits up to the timeout.
  const auto deadline = std::chrono::steady_clock::now() + m.opt.remove_timeout;
  for (;;) {
    int64_t total = 0;
    for (Resource* r : rs) {
      int64_t chunks, bytes, deferred;
      m.sum(r, chunks, bytes, deferred);
      total += chunks;
    }
    if (total <= 0) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string text = "p2pmem remove: " + who + " still has " + std::to_string(total) + " chunk(s) held after " +
                         std::to_string(m.opt.remove_timeout.count()) + " ms";
      for (Resource* r : rs) text += m.holders(r);
      m.report(text);
      return make_error(EBUSY, "p2pmem remove: " + who + " still has " + std::to_string(total) + " chunk(s) held; they must be freed first");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // pci_p2pdma_release(): synchronize_rcu() before gen_pool_destroy(); the frees since the
  // first barrier finish their grace periods too.
  m.steal_all(/*only_dying=*/true);
  m.grace_now();
  for (Resource* r : rs) {
    PHYSR_RETURN_IF_ERROR(m.platform->providers().set_published(r->provider, false));
    std::lock_guard g(r->mu);
    r->removed.store(true, std::memory_order_release);
    for (auto& d : r->depot) std::vector<uint64_t>().swap(d);
  }
  return {};
}

}  // namespace physr::mem
