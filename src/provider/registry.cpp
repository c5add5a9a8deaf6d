#include "physr/provider.hpp"

#include <sys/mman.h>
#include <urcu/urcu-memb.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <new>
#include <utility>
#include <string>

// ThreadSanitizer does not see the ordering that an RCU grace period provides (liburcu
// orders readers against the reclaimer with membarrier, and hands callbacks over in its
// own uninstrumented queue). Model it: every read-side section releases a token just
// before it unlocks, a writer releases it before call_rcu, and the reclaimer acquires it
// before freeing, which is exactly the guarantee a grace period gives.
#ifdef PHYSR_READGUARD_DEPTH  // provider.hpp's ThreadSanitizer detection
#define PHYSR_TSAN 1
#endif
#ifdef PHYSR_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif
// LeakSanitizer scans the heap, stacks and globals, not mmap'ed memory: the slab's Providers
// hold the pointers to their heap parts (callback, RCU box), so each slab page in use is
// registered as a root region, or a registry that lives to the end of the process (a
// fuzzer's world) shows them as leaked. The arena's nodes and runs point only into the
// arena and the slab. Under ASan, a destroyed Provider's slot is also poisoned.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PHYSR_LSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define PHYSR_LSAN 1
#endif
#ifdef PHYSR_LSAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/lsan_interface.h>
#endif

namespace physr {

namespace {

#ifdef PHYSR_TSAN
char g_grace_token;
inline void tsan_reader_done() { __tsan_release(&g_grace_token); }
inline void tsan_grace_period_over() { __tsan_acquire(&g_grace_token); }
#else
inline void tsan_reader_done() {}
inline void tsan_grace_period_over() {}
#endif

static_assert(alignof(Provider) >= 8, "provider pointers carry three tag bits");

struct RcuBox {
  rcu_head head;
  Provider* provider;
};

// liburcu needs every reading thread registered; do it on first use and undo it at exit.
// The unregistration is a function-local thread_local, constructed by the first
// registration only, so that the guard's state (detail::rcu_reader) stays a plain POD.
struct ThreadUnregistration {
  ~ThreadUnregistration() {
    urcu_memb_unregister_thread();
    detail::rcu_reader.registered = false;  // a guard in a later thread_local destructor registers again
  }
};

std::string describe(const PhysSpan& s) { return "[" + format_hex(s.base.value()) + ", +" + format_hex(s.size) + ")"; }

constexpr uint64_t kPfnLimit = uint64_t{1} << 40;
constexpr unsigned shift_of(unsigned level) { return 10 * (3 - level); }

}  // namespace

Provider::Provider(ProviderId id, ProviderDesc d) : id_(id), desc_(std::move(d)) {
  flags_.store(desc_.published ? kPublished : 0, std::memory_order_relaxed);
}

namespace detail {
__thread RcuReader rcu_reader;
}  // namespace detail

void ProviderRegistry::register_reader() {
  urcu_memb_register_thread();
  detail::rcu_reader.registered = true;
  thread_local ThreadUnregistration unregister_at_exit;
  (void)unregister_at_exit;
}

// call_rcu() and rcu_barrier() take liburcu's read lock internally: the caller must be
// registered too.
void ProviderRegistry::ensure_registered() {
  if (!detail::rcu_reader.registered) register_reader();
}

// Release before unlocking: once unlocked, a grace period may end and a reclaimer acquire.
void ProviderRegistry::reader_done() noexcept { tsan_reader_done(); }

namespace {
constexpr size_t kIdTableBytes = (size_t{ProviderRegistry::kMaxProviders} + 1) * sizeof(void*);
constexpr size_t kIdsPerPage = 4096 / sizeof(void*);
}  // namespace

// Nodes and runs live in 2 MiB chunks, so that a large table spans a few huge pages (one
// TLB entry each) instead of thousands of 4 KiB pages scattered through the heap. A chunk
// starts with a header line naming its arena, so an RCU callback, which gets only the
// rcu_head, can give a run back. Freed blocks are kept per size (in 64-byte lines) and
// reused; chunks are unmapped with the registry.
struct ProviderRegistry::Arena {
  static constexpr size_t kChunk = size_t{2} << 20;
  struct Header {
    Arena* arena;
  };
  std::mutex lock;                         // writers allocate, RCU callbacks free
  std::vector<char*> chunks;
  char* bump = nullptr;
  char* end = nullptr;
  std::vector<std::vector<char*>> free;  // by size in lines

  ~Arena() {
    // The last RCU callback released blocks under the lock (ThreadSanitizer sees that order,
    // not rcu_barrier's).
    std::lock_guard g(lock);
    for (char* c : chunks) {
      munmap(c, kChunk);
    }
  }
  static Arena* of(const void* block) {
    return reinterpret_cast<const Header*>(reinterpret_cast<uintptr_t>(block) & ~(kChunk - 1))->arena;
  }
  // A 2 MiB-aligned chunk. From the second on (the table is past 2 MiB: TLB reach starts to
  // matter), asks for transparent huge pages; the first stays 4 KiB-paged so that a small
  // registry touches a few pages only.
  void grow() {
    void* m = mmap(nullptr, 2 * kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    char* raw = static_cast<char*>(m);
    char* c = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kChunk - 1) & ~(kChunk - 1));
    if (c > raw) munmap(raw, static_cast<size_t>(c - raw));
    if (c + kChunk < raw + 2 * kChunk) munmap(c + kChunk, static_cast<size_t>(raw + 2 * kChunk - (c + kChunk)));
#ifdef MADV_HUGEPAGE
    if (!chunks.empty()) madvise(c, kChunk, MADV_HUGEPAGE);
#endif
    chunks.push_back(c);
    new (c) Header{this};
    bump = c + 64;
    end = c + kChunk;
  }
  char* alloc(size_t bytes, size_t align) {
    const size_t lines = (bytes + 63) / 64;
    std::lock_guard g(lock);
    if (lines < free.size() && !free[lines].empty()) {
      char* b = free[lines].back();
      free[lines].pop_back();
      return b;
    }
    if (!bump || bump + lines * 64 + (align - 64) > end) grow();
    if (reinterpret_cast<uintptr_t>(bump) & (align - 1)) put(std::exchange(bump, bump + 64), 1);  // keep the skipped line
    char* b = bump;
    bump += lines * 64;
    return b;
  }
  void put(char* block, size_t lines) {
    if (free.size() <= lines) free.resize(lines + 1);
    free[lines].push_back(block);
  }
  void release(char* block, size_t bytes) {
    std::lock_guard g(lock);
    put(block, (bytes + 63) / 64);
  }
};

ProviderRegistry::ProviderRegistry() {
  static_assert(sizeof(Provider) <= (size_t{1} << kProviderStrideShift), "a Provider fits its slab stride");
  // Zero-filled on demand by the kernel; untouched pages read as zero (no provider). Read-only
  // until an id of the page is used, so that get() reads any id while a host with strict
  // overcommit (vm.overcommit_memory=2, which ignores MAP_NORESERVE and charges every
  // writable private page) charges only the pages in use, not 128 MiB per registry.
  void* m = mmap(nullptr, kIdTableBytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  ids_ = static_cast<std::atomic<const Provider*>*>(m);
  id_pages_.assign(kIdTableBytes / 4096, false);
  // The providers' slab: address space only (2 GiB), made writable page by page as ids
  // are used, PROT_NONE until then (no reader touches a slot before its id is used).
  m = mmap(nullptr, kSlabBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    munmap(ids_, kIdTableBytes);
    throw std::bad_alloc();
  }
  slab_ = static_cast<char*>(m);
  slab_pages_.assign(kSlabBytes / 4096, false);
  table_bytes_.store(sizeof(Node), std::memory_order_relaxed);
  arena_ = new Arena;
}

ProviderRegistry::~ProviderRegistry() {
  ensure_registered();
  urcu_memb_barrier();  // run every pending reclaim callback
  PHYSR_ASSERT(pending_.load(std::memory_order_acquire) == 0, "the barrier ran every pending reclaim");
  for (uint32_t id = 1; id < next_id_; ++id) {
    const Provider* p = ids_[id].load(std::memory_order_relaxed);
    if (p) {
      delete static_cast<RcuBox*>(p->rcu_box_);
      p->~Provider();
    }
  }
#ifdef PHYSR_LSAN
  for (size_t i = 0; i < slab_pages_.size(); ++i) {
    if (!slab_pages_[i]) continue;
    __lsan_unregister_root_region(slab_ + 4096 * i, 4096);
    __asan_unpoison_memory_region(slab_ + 4096 * i, 4096);  // the next mapping here starts clean
  }
#endif
  munmap(slab_, kSlabBytes);
  munmap(ids_, kIdTableBytes);
  delete arena_;  // every node and run, live or freed
}

namespace {

constexpr uintptr_t kLeaf = 1, kRun = 2, kRunLine = 8, kRunTop2 = 16, kTags = 7;
inline const Provider* leaf_ptr(uintptr_t x) { return reinterpret_cast<const Provider*>(x & ~kLeaf); }
inline bool is_leaf(uintptr_t x) { return x & kLeaf; }
inline bool is_run(uintptr_t x) { return (x & (kLeaf | kRun)) == kRun; }
inline bool is_node(uintptr_t x) { return x != 0 && (x & kTags) == 0; }
inline uint64_t first_page(const Provider* p) { return p->phys().base.value() >> kPageShift; }
inline uint64_t end_page(const Provider* p) { return (p->phys().base.value() + p->phys().size) >> kPageShift; }

// The most pieces a run holds: 33 blocks of 8 under two top lines of 16 starts. A slot with
// more becomes a node of the next level (its slots take leaves and runs again). A 4 MiB
// slot becomes a node of single-page leaves (one line per lookup) already past 64 pieces,
// where the 8 KiB node costs at most 256 B per provider.
constexpr size_t kBlockPieces = 8, kRunMaxPieces = kBlockPieces * 33, kLeafNodeMinPieces = 64, kLinePieces = 4;
// While the registry's nodes take less than this, a uniform cluster past a line run's 4
// pieces (providers of one size that span at most one slot of the next level, or any
// number of slots in a 4 MiB slot, whose node holds single-page leaves) becomes a node
// instead of a block run: a node step is one load and a few instructions, a block run's
// search two SSE2 counts (16 packed 4 KiB apertures: 47 instructions per lookup through
// three nodes, 77 through an 18-piece run, measured with the blocks of 16 starts before
// today's blocks of 8). Other slots keep their run: through a node,
// lookups into providers of different sizes take paths of different depths and mispredict
// the walk (LookupMixed/physr/1000 with a node for every slot past 4 pieces: 70 instead of
// 80 instructions, but 0.66 instead of 0.14 mispredicted branches per lookup, 10.7 instead
// of 6.6-9.0 ns; with a node for every cluster of any sizes: 72, 0.52). A small registry
// spends at most this much on the speed; a large one gets runs from then on (nodes are
// never freed, so the nodes built while it was small stay).
constexpr size_t kSmallTableNodeBytes = size_t{512} << 10;
constexpr int32_t kNoStart = INT32_MAX;

}  // namespace

// The header line in front of a run's first line (see Node and run_find in provider.hpp).
struct ProviderRegistry::RunInfo {
  rcu_head head;     // for call_rcu when the run is replaced
  uint32_t pieces;   // pieces, gaps included
  uint32_t bytes;    // allocation size
};
static_assert(sizeof(rcu_head) + 8 <= 64, "a run's header fits its line");
static_assert(sizeof(rcu_head) <= 16, "a line run's rcu_head fits after its starts and values");

namespace {
inline char* run_lines(uintptr_t x) { return reinterpret_cast<char*>(x & ~uintptr_t{63}); }
// A line run: starts at +0, slot values at +16, rcu_head at +48.
constexpr size_t kLineValues = 16, kLineHead = 48;
}  // namespace

// Writer side (under writer_): a zeroed-or-overwritten block of `bytes`, `align`-aligned
// (64 or 128). A node comes zero-filled; runs are written whole by build().
void* ProviderRegistry::arena_alloc(size_t bytes, size_t align) { return arena_->alloc(bytes, align); }

size_t ProviderRegistry::arena_bytes() const noexcept {
  std::lock_guard g(arena_->lock);
  return arena_->chunks.size() * Arena::kChunk;
}

// The providers of a slot [lo, hi) that holds a leaf or a run, clipped to the slot, in order.
void ProviderRegistry::collect(uintptr_t x, uint64_t lo, uint64_t hi, std::vector<Piece>& out) const {
  if (x == 0) return;
  if (is_leaf(x)) {
    const Provider* q = leaf_ptr(x);
    out.push_back({std::max(first_page(q), lo), std::min(end_page(q), hi), q});
    return;
  }
  const char* k = run_lines(x);
  if (x & kRunLine) {
    const auto* starts = reinterpret_cast<const int32_t*>(k);
    const auto* vals = reinterpret_cast<const uintptr_t*>(k + kLineValues);
    for (size_t i = 0; i < kLinePieces && starts[i] != kNoStart; ++i) {
      if (vals[i] == 0) continue;
      const uint64_t end = i + 1 < kLinePieces && starts[i + 1] != kNoStart ? lo + static_cast<uint64_t>(starts[i + 1]) : hi;
      out.push_back({lo + static_cast<uint64_t>(starts[i]), end, leaf_ptr(vals[i])});
    }
    return;
  }
  const auto* info = reinterpret_cast<const RunInfo*>(k - 64);
  const char* blocks = k + ((x & kRunTop2) ? 128 : 64);
  auto block = [&](size_t i) { return blocks + kRunBlock * (i / kBlockPieces); };
  auto start = [&](size_t i) { return reinterpret_cast<const int32_t*>(block(i))[i % kBlockPieces]; };
  for (size_t i = 0; i < info->pieces; ++i) {
    const uintptr_t v = slab_value(slab_, reinterpret_cast<const uint32_t*>(block(i) + kBlockIds)[i % kBlockPieces]);
    if (v == 0) continue;
    const uint64_t end = i + 1 < info->pieces ? lo + static_cast<uint64_t>(start(i + 1)) : hi;
    out.push_back({lo + static_cast<uint64_t>(start(i)), end, reinterpret_cast<const Provider*>(v)});
  }
}

// The slot value for providers `provs` (sorted, disjoint, clipped to [lo, hi)): 0, a leaf,
// a run, or, for more pieces than a run holds, a new node of level + 1. Everything it
// allocates is complete before the caller publishes the value with a release store.
uintptr_t ProviderRegistry::build(unsigned level, uint64_t lo, uint64_t hi, const std::vector<Piece>& provs) {
  if (provs.empty()) return 0;
  if (provs.size() == 1 && provs[0].s == lo && provs[0].e == hi) return reinterpret_cast<uintptr_t>(provs[0].p) | kLeaf;
  // Pieces: the providers and the gaps between them, covering the slot.
  std::vector<std::pair<uint64_t, uintptr_t>> pieces;  // start page, slot value
  uint64_t cursor = lo;
  for (const Piece& q : provs) {
    if (q.s > cursor) pieces.emplace_back(cursor, 0);
    pieces.emplace_back(q.s, reinterpret_cast<uintptr_t>(q.p) | kLeaf);
    cursor = q.e;
  }
  if (cursor < hi) pieces.emplace_back(cursor, 0);
  bool cluster = level == 2 || provs.back().e - provs.front().s <= (uint64_t{1} << (shift_of(level) - 10));
  for (const Piece& q : provs) cluster = cluster && q.p->phys().size == provs.front().p->phys().size;  // writer side: p is live
  const bool small = cluster && node_bytes_ + sizeof(Node) <= kSmallTableNodeBytes;
  if (pieces.size() > (small ? kLinePieces : level == 2 ? kLeafNodeMinPieces : kRunMaxPieces)) {
    PHYSR_ASSERT(level < 3, "a single-page slot holds one provider");
    Node* child = new (arena_alloc(sizeof(Node), 64)) Node{};
    node_bytes_ += sizeof(Node);
    table_bytes_.fetch_add(sizeof(Node), std::memory_order_relaxed);
    for (const Piece& q : provs) insert(child->slot, level + 1, lo, q.s, q.e, q.p);
    return reinterpret_cast<uintptr_t>(child);
  }
  if (pieces.size() <= kLinePieces) {
    // One line: an aperture covering part of its slot, or a few small ones. Readers find
    // the piece without touching the Provider.
    char* k = static_cast<char*>(arena_alloc(64, 64));
    auto* starts = reinterpret_cast<int32_t*>(k);
    auto* vals = reinterpret_cast<uintptr_t*>(k + kLineValues);
    for (size_t j = 0; j < kLinePieces; ++j) {
      starts[j] = j < pieces.size() ? static_cast<int32_t>(pieces[j].first - lo) : kNoStart;
      vals[j] = j < pieces.size() ? pieces[j].second : 0;
    }
    new (k + kLineHead) rcu_head{};
    table_bytes_.fetch_add(64, std::memory_order_relaxed);
    return reinterpret_cast<uintptr_t>(k) | kRun | kRunLine;
  }
  const size_t n = pieces.size(), blocks = (n + kBlockPieces - 1) / kBlockPieces;
  // Every block run has a top line, a single block's without a start, so that readers find
  // block c at K + 64 (c + 1) without a test (see run_block in provider.hpp).
  const size_t tops = blocks > 17 ? 2 : 1;
  const size_t bytes = 128 + 64 * tops + kRunBlock * blocks;
  char* base = static_cast<char*>(arena_alloc(bytes, 128));
  char* k = base + 128;
  auto* info = new (k - 64) RunInfo{};
  info->pieces = static_cast<uint32_t>(n);
  info->bytes = static_cast<uint32_t>(bytes);
  char* first = k + 64 * tops;
  auto* t = reinterpret_cast<int32_t*>(k);
  for (size_t j = 0; j < 16 * tops; ++j)
    t[j] = j + 1 < blocks ? static_cast<int32_t>(pieces[kBlockPieces * (j + 1)].first - lo) : kNoStart;
  for (size_t b = 0; b < blocks; ++b) {
    auto* starts = reinterpret_cast<int32_t*>(first + kRunBlock * b);
    auto* ids = reinterpret_cast<uint32_t*>(first + kRunBlock * b + kBlockIds);
    for (size_t j = 0; j < kBlockPieces; ++j) {
      const size_t i = kBlockPieces * b + j;
      starts[j] = i < n ? static_cast<int32_t>(pieces[i].first - lo) : kNoStart;
      ids[j] = i < n && pieces[i].second ? leaf_ptr(pieces[i].second)->id() : 0;  // writer side: live
    }
  }
  table_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  return reinterpret_cast<uintptr_t>(k) | kRun | (tops == 2 ? kRunTop2 : 0);
}

// Frees a replaced run after a grace period: a reader that loaded it may still search it.
void ProviderRegistry::retire(uintptr_t x) {
  if (!is_run(x)) return;
  char* k = run_lines(x);
  if (x & kRunLine) {
    table_bytes_.fetch_sub(64, std::memory_order_relaxed);
    tsan_reader_done();
    urcu_memb_call_rcu(reinterpret_cast<rcu_head*>(k + kLineHead), [](rcu_head* h) {
      tsan_grace_period_over();
      char* block = reinterpret_cast<char*>(h) - kLineHead;
      Arena::of(block)->release(block, 64);
    });
    return;
  }
  auto* info = reinterpret_cast<RunInfo*>(k - 64);
  table_bytes_.fetch_sub(info->bytes, std::memory_order_relaxed);
  tsan_reader_done();  // the writer's accesses precede the free (liburcu's queue is not seen)
  urcu_memb_call_rcu(&info->head, [](rcu_head* h) {
    tsan_grace_period_over();
    char* block = reinterpret_cast<char*>(h) - 64;
    Arena::of(block)->release(block, reinterpret_cast<RunInfo*>(h)->bytes);
  });
}

// Pages [s, e) within node n (level `level`, first page `base`): is any already mapped?
bool ProviderRegistry::overlaps(const std::atomic<uintptr_t>* n, unsigned level, uint64_t base, uint64_t s, uint64_t e,
                                const Provider** who) const {
  const unsigned sh = shift_of(level);
  std::vector<Piece> provs;
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uintptr_t x = n[i].load(std::memory_order_relaxed);
    if (x == 0) continue;
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    const uint64_t cs = std::max(s, lo), ce = std::min(e, hi);
    if (is_node(x)) {
      if (overlaps(reinterpret_cast<const Node*>(x)->slot, level + 1, lo, cs, ce, who)) return true;
      continue;
    }
    provs.clear();
    collect(x, lo, hi, provs);
    for (const Piece& q : provs) {
      if (q.s < ce && cs < q.e) {
        *who = q.p;
        return true;
      }
    }
  }
  return false;
}

// Maps pages [s, e) of slot `slot` (level `level`, pages [lo, hi)) to p. An empty slot takes
// a leaf if p covers it whole, else a line run (p's piece and the gaps); a slot that
// already holds other providers' pieces (a run) gets a new run with p's piece added, or a
// new node when the run would be too long. New runs and nodes are complete before they are
// published with one release store; a replaced run goes back to the arena after a grace
// period, nodes never while the registry lives, so a reader always finds what it loaded
// alive and complete.
void ProviderRegistry::insert_slot(std::atomic<uintptr_t>& slot, unsigned level, uint64_t lo, uint64_t hi, uint64_t s, uint64_t e,
                                   const Provider* p) {
  const uintptr_t x = slot.load(std::memory_order_relaxed);
  if (is_node(x)) {
    insert(reinterpret_cast<Node*>(x)->slot, level + 1, lo, s, e, p);
    return;
  }
  std::vector<Piece> provs;
  collect(x, lo, hi, provs);
  provs.push_back({s, e, p});
  std::sort(provs.begin(), provs.end(), [](const Piece& a, const Piece& b) { return a.s < b.s; });
  slot.store(build(level, lo, hi, provs), std::memory_order_release);
  retire(x);
}

void ProviderRegistry::insert(Slots n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p) {
  const unsigned sh = shift_of(level);
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    insert_slot(n[i], level, lo, hi, std::max(s, lo), std::min(e, hi), p);
  }
}

// Unmaps p's pages [s, e) of one slot: clears its leaf, or rebuilds the run without it
// (down to a leaf or nothing); nodes stay.
void ProviderRegistry::erase_slot(std::atomic<uintptr_t>& slot, unsigned level, uint64_t lo, uint64_t hi, uint64_t s, uint64_t e,
                                  const Provider* p) {
  const uintptr_t x = slot.load(std::memory_order_relaxed);
  if (is_node(x)) {
    erase(reinterpret_cast<Node*>(x)->slot, level + 1, lo, s, e, p);
    return;
  }
  if (x == 0) return;
  if (is_leaf(x)) {
    if (leaf_ptr(x) == p) slot.store(0, std::memory_order_release);
    return;
  }
  std::vector<Piece> provs;
  collect(x, lo, hi, provs);
  const auto gone = std::remove_if(provs.begin(), provs.end(), [p](const Piece& q) { return q.p == p; });
  if (gone == provs.end()) return;
  provs.erase(gone, provs.end());
  slot.store(build(level, lo, hi, provs), std::memory_order_release);
  retire(x);
}

void ProviderRegistry::erase(Slots n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p) {
  const unsigned sh = shift_of(level);
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    erase_slot(n[i], level, lo, hi, std::max(s, lo), std::min(e, hi), p);
  }
}

Provider* ProviderRegistry::writer_get(ProviderId id) const {
  if (id == 0 || id > kMaxProviders) return nullptr;
  return const_cast<Provider*>(ids_[id].load(std::memory_order_relaxed));
}

Result<ProviderId> ProviderRegistry::add(ProviderDesc desc) {
  const PhysSpan r = desc.phys;
  if (r.size == 0) return make_error(EINVAL, "provider aperture " + describe(r) + " is empty");
  if (((r.base.value() | r.size) & (kPageSize - 1)) != 0)
    return make_error(EINVAL, "provider aperture " + describe(r) + " is not 4 KiB aligned in address and size");
  if (r.wraps() || r.base.value() >= kPhysAddrLimit || r.size > kPhysAddrLimit - r.base.value())
    return make_error(EINVAL, "provider aperture " + describe(r) + " runs past the 52-bit physical address space");
  const uint64_t s = r.base.value() >> kPageShift, e = s + (r.size >> kPageShift);

  ensure_registered();  // replacing a run hands the old one to call_rcu
  std::lock_guard lock(writer_);
  const Provider* who = nullptr;
  if (overlaps(root_.slot, 0, 0, s, e, &who))
    return make_error(EEXIST, "provider aperture " + describe(r) + " overlaps provider " + std::to_string(who->id()) + " " +
                                  describe(who->phys()) + " of " + who->owner().to_string());
  uint32_t id = 0;
  {
    std::lock_guard fl(free_ids_lock_);
    if (!free_ids_.empty()) {
      std::pop_heap(free_ids_.begin(), free_ids_.end(), std::greater<>());
      id = free_ids_.back();
      free_ids_.pop_back();
    }
  }
  if (id == 0) {
    if (next_id_ > kMaxProviders) return make_error(ENOSPC, "no provider id left (all " + std::to_string(kMaxProviders) + " in use)");
    id = next_id_++;
  }
  // The id's pages of the slab and of the id table become writable on first use.
  char* at = slab_ + (size_t{id} << kProviderStrideShift);
  char* slab_page = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(at) & ~uintptr_t{4095});
  char* id_page = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(&ids_[id]) & ~uintptr_t{4095});
  const size_t slab_index = size_t{id} >> (12 - kProviderStrideShift), id_index = id / kIdsPerPage;
  const bool new_slab_page = !slab_pages_[slab_index], new_id_page = !id_pages_[id_index];
  if ((new_slab_page && mprotect(slab_page, 4096, PROT_READ | PROT_WRITE) != 0) ||
      (new_id_page && mprotect(id_page, 4096, PROT_READ | PROT_WRITE) != 0)) {
    const int err = errno;
    std::lock_guard fl(free_ids_lock_);  // the id stays free, smallest first as before
    free_ids_.push_back(id);
    std::push_heap(free_ids_.begin(), free_ids_.end(), std::greater<>());
    return make_error(err, "no memory for provider " + std::to_string(id) + " " + describe(r) +
                               " (mprotect of its slab or id-table page failed)");
  }
  if (new_slab_page) {
    slab_pages_[slab_index] = true;
#ifdef PHYSR_LSAN
    // A Provider owns heap memory (its callback, its rcu box): LSan must see this page.
    __lsan_register_root_region(slab_page, 4096);
#endif
  }
  if (new_id_page) {
    id_pages_[id_index] = true;
    table_bytes_.fetch_add(4096, std::memory_order_relaxed);
  }
#ifdef PHYSR_LSAN
  __asan_unpoison_memory_region(at, size_t{1} << kProviderStrideShift);
#endif
  auto* p = new (at) Provider(id, std::move(desc));
  p->registry_ = this;
  p->rcu_box_ = new RcuBox{{}, p};
  // Widen the span that holds every aperture ever registered (never narrowed, so a
  // reader's "surely host memory" answer stays right after removals).
  if (p->phys().base.value() < lowest_.load(std::memory_order_relaxed)) lowest_.store(p->phys().base.value(), std::memory_order_release);
  const uint64_t end = p->phys().base.value() + p->phys().size;
  if (end > highest_.load(std::memory_order_relaxed)) highest_.store(end, std::memory_order_release);
  // Publish: the object is complete before either table can point at it.
  insert(root_.slot, 0, 0, s, e, p);
  ids_[id].store(p, std::memory_order_release);
  live_.fetch_add(1, std::memory_order_relaxed);
  return ProviderId{id};
}

void ProviderRegistry::reclaim(void* head) {
  tsan_grace_period_over();
  auto* box = reinterpret_cast<RcuBox*>(static_cast<rcu_head*>(head));
  Provider* p = box->provider;
  ProviderRegistry* reg = p->registry_;
  const uint32_t id = p->id();
  p->~Provider();  // before the id is free: the next add() with it builds in the same slot
  delete box;
  // Zeroed, so that LeakSanitizer (which scans the slab) finds no stale pointer in it, and
  // poisoned under ASan: a reader that kept the Provider past its grace period is reported,
  // as it was when Providers were freed to the heap.
  std::memset(static_cast<void*>(p), 0, size_t{1} << kProviderStrideShift);
#ifdef PHYSR_LSAN
  __asan_poison_memory_region(p, size_t{1} << kProviderStrideShift);
#endif
  {
    std::lock_guard fl(reg->free_ids_lock_);
    reg->free_ids_.push_back(id);
    std::push_heap(reg->free_ids_.begin(), reg->free_ids_.end(), std::greater<>());
  }
  const size_t before = reg->pending_.fetch_sub(1, std::memory_order_release);
  PHYSR_ASSERT(before > 0, "every reclaim was counted pending by remove()");
}

Status ProviderRegistry::remove(ProviderId id) {
  ensure_registered();
  std::lock_guard lock(writer_);
  Provider* p = writer_get(id);
  if (!p) return make_error(ENOENT, "provider id " + std::to_string(id) + " is not registered");
  const uint64_t s = p->phys().base.value() >> kPageShift, e = s + (p->phys().size >> kPageShift);
  erase(root_.slot, 0, 0, s, e, p);
  ids_[id].store(nullptr, std::memory_order_release);
  const size_t live_before = live_.fetch_sub(1, std::memory_order_relaxed);
  PHYSR_ASSERT(live_before > 0, "a registered provider was counted live");
  pending_.fetch_add(1, std::memory_order_relaxed);
  auto* box = static_cast<RcuBox*>(p->rcu_box_);
  tsan_reader_done();  // this thread's accesses to p precede the reclaim (liburcu's queue is not seen)
  urcu_memb_call_rcu(&box->head, [](rcu_head* h) { reclaim(h); });
  return {};
}

Status ProviderRegistry::revoke(ProviderId id) {
  std::lock_guard lock(writer_);
  Provider* p = writer_get(id);
  if (!p) return make_error(ENOENT, "provider id " + std::to_string(id) + " is not registered");
  if (p->flags_.fetch_or(Provider::kRevoked, std::memory_order_acq_rel) & Provider::kRevoked)
    return make_error(EINVAL, "provider " + std::to_string(id) + " is already revoked");
  if (p->desc_.on_revoke) p->desc_.on_revoke(*p);
  return {};
}

Status ProviderRegistry::set_published(ProviderId id, bool published) {
  std::lock_guard lock(writer_);
  Provider* p = writer_get(id);
  if (!p) return make_error(ENOENT, "provider id " + std::to_string(id) + " is not registered");
  if (published) p->flags_.fetch_or(Provider::kPublished, std::memory_order_release);
  else p->flags_.fetch_and(~Provider::kPublished, std::memory_order_release);
  return {};
}

void ProviderRegistry::wait_for_frees() {
  ensure_registered();
  urcu_memb_barrier();
}

const Provider* ProviderRegistry::find_extent(PhysAddr a, uint64_t& bytes) const noexcept {
  const uint64_t pfn = a.value() >> kPageShift;
  if (pfn >= kPfnLimit) {
    bytes = ~uint64_t{0} - a.value() + 1;
    return nullptr;
  }
  uintptr_t e = root_.slot[pfn >> 30].load(std::memory_order_acquire);
  unsigned sh = 30;
  uint64_t slot_end = ((pfn >> sh) + 1) << sh;  // page after the slot e came from
  for (;;) {
    if (e & kLeaf) break;
    if (e == 0) {
      // Host memory at least to the end of this empty slot.
      bytes = (slot_end << kPageShift) - a.value();
      return nullptr;
    }
    if (is_run(e)) {
      // The piece holding the page; a gap ends at the next piece or the slot's end.
      const uint64_t lo = slot_end - (uint64_t{1} << sh);
      const auto off = static_cast<int32_t>(pfn - lo);
      const char* k = run_lines(e);
      int32_t next = kNoStart;
      if (e & kRunLine) {
        const auto* starts = reinterpret_cast<const int32_t*>(k);
        size_t j = 0;
        while (j + 1 < kLinePieces && starts[j + 1] <= off) ++j;
        e = reinterpret_cast<const uintptr_t*>(k + kLineValues)[j];
        if (j + 1 < kLinePieces) next = starts[j + 1];
      } else {
        const ptrdiff_t tops = (e & kRunTop2) ? 2 : 1;
        const char* block = run_block(k, e, off);
        const unsigned j = count_le<8>(block, off) - 1;
        e = slab_value(slab_, reinterpret_cast<const uint32_t*>(block + kBlockIds)[j]);
        next = j + 1 < kBlockPieces ? reinterpret_cast<const int32_t*>(block)[j + 1] : kNoStart;
        // A block's last piece ends where the next block starts: the top lines' entry for it.
        // (The last of a full run's 17 or 33 blocks has no entry: its end is the slot's.)
        const ptrdiff_t b = (block - k - 64 * tops) / static_cast<ptrdiff_t>(kRunBlock);
        if (j + 1 == kBlockPieces && b < 16 * tops) next = reinterpret_cast<const int32_t*>(k)[b];
      }
      if (e != 0) break;
      const uint64_t end = next != kNoStart ? lo + static_cast<uint64_t>(next) : slot_end;
      bytes = (end << kPageShift) - a.value();
      return nullptr;
    }
    sh -= 10;
    slot_end = ((pfn >> sh) + 1) << sh;
    e = reinterpret_cast<const Node*>(e)->slot[(pfn >> sh) & 1023].load(std::memory_order_acquire);
  }
  // A leaf covers its slot or its run piece whole: the answer holds to the aperture's end.
  const Provider* p = leaf_ptr(e);
  bytes = p->phys().base.value() + p->phys().size - a.value();
  return p;
}

}  // namespace physr
