// physr provider: P2P providers (one per BAR aperture), their registry, and the two
// lookups the DMA layer needs: physical address -> provider, and small id -> provider.
//
// Design rationale
// - find(phys) is a 4-level radix table over the 40-bit page frame number of a 52-bit
//   physical space (10 bits per level, 8 KiB nodes). A provider is stored as leaves at the
//   highest levels its aperture covers whole, like huge pages in a page table, so a 64 GiB
//   BAR takes a few dozen slots and a 4 KiB VFIO aperture one. A lookup is at most four
//   dependent loads, of which the upper ones stay in cache. Apertures are 4 KiB-granular.
//   (A flat top level of 2^20 slots of 4 GiB was tried: one load less for packed and
//   mixed layouts, but its 8 MiB are all in use when 100k apertures are spread over 52
//   bits, and the random layout's lookups doubled.)
// - Runs: a slot that providers cover only in part holds their pieces (and the gaps),
//   sorted, instead of a chain of nodes. Up to 4 pieces (an aperture alone in its slot, a
//   few small ones) fit one 64-byte line run: starts, values and rcu_head, searched with
//   one SSE2 compare. Longer runs are blocks of one line each, 8 starts and the 8 pieces'
//   provider ids, under a top line (a second above 136 pieces), searched with SSE2
//   compares and no branch; an id is its Provider's place in a slab, so the block is the
//   last line a lookup reads. Only past 264 pieces (64 in a 4 MiB slot) does a slot become a node of the next
//   level, except while the nodes take less than 512 KiB: then a uniform cluster past 4
//   pieces (providers of one size within one slot of the next level) does, as a node step
//   costs fewer instructions than a block run's search and a small registry can afford the
//   memory (clusters of mixed sizes keep their runs: through nodes, their lookups would
//   take paths of different depths and mispredict). A reader never reads a Provider to
//   decide: a run's values are whole leaves, ids or 0.
//   Runs are copy-on-write, published with one release store, freed after a grace period.
// - get(id) is one load from a flat table of 2^24 pointers in reserved virtual memory
//   (mmap MAP_NORESERVE, 128 MiB of address space): only the pages that hold registered
//   ids are ever backed, so a thousand providers cost one 4 KiB page, and there is no
//   second level to walk.
// - Readers never lock and never write shared memory: they run inside an RCU read-side
//   section (ReadGuard) and load slots with acquire. Writers serialise on a mutex, publish
//   with release stores, and free a removed provider (and recycle its id) only after a
//   grace period, through call_rcu.
// - RCU flavour: liburcu "memb" (membarrier). Its read lock is two thread-local
//   operations with no fence (the writer pays with a membarrier syscall), and unlike
//   "qsbr" it asks nothing of threads between reads; unlike "bp" it needs no per-read
//   registration check. physr cannot make its users' threads announce quiescent states,
//   so qsbr's last nanosecond is not worth the contract. ReadGuard registers each thread
//   with liburcu on first use and unregisters it at thread exit.
// - Revocation (like dma-buf move_notify): revoke() marks the provider revoked (new lookups
//   see revoked() == true and must not use its memory) and calls the holder's callback.
//   The aperture stays in the table so it is never mistaken for host memory.
//
// Memory per provider: the Provider object (~120 B, in a 128 B slab slot: 2 GiB of address
// space reserved, backed as ids are used) and an id slot (8 B), plus the table:
// ~16 B for tightly packed 4 KiB apertures (a leaf node shared with 1023 neighbours), one
// 64-byte line for an aperture alone in its slot, ~57 B in clustered mixed layouts (see
// docs/providers.md).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "physr/core.hpp"
#include "physr/pci.hpp"
#include "physr/range.hpp"

namespace physr {

class Provider;

/// What a driver registers: one BAR aperture of one PCI function.
struct ProviderDesc {
  pci::Bdf owner;              // the function whose BAR this is
  uint32_t function = pci::kNoFunction;  // its index in the topology the DMA layer uses: verdicts need it
  unsigned bar = 0;            // BAR index
  PhysSpan phys;               // CPU physical aperture: 4 KiB aligned, non-empty, below 2^52
  uint64_t bus_offset = 0;     // PCI bus address = CPU physical address + bus_offset (mod 2^64)
  bool published = false;      // its memory may be handed out to other drivers (p2pmem_publish)
  bool cpu_copy = false;       // the DMA layer may bounce it through host memory
  /// Called by revoke(), under the registry's writer lock: it must not call the registry's
  /// writer functions. Holders unmap and stop using the memory (dma-buf move_notify).
  std::function<void(const Provider&)> on_revoke;
};

namespace detail {
// liburcu memb's read-side calls, declared here rather than through <urcu/urcu-memb.h>
// (whose macros map rcu_read_lock, call_rcu and more for every includer) and under names of
// physr's own bound to liburcu's symbols: with _LGPL_SOURCE, urcu-memb.h makes
// urcu_memb_read_lock a macro for its static inline version, so in an includer that read
// it first, ReadGuard's inline body named that internal function instead and differed from
// every other translation unit's (an ODR violation). An asm label is not macro-expanded.
extern "C" void physr_urcu_read_lock(void) __asm__("urcu_memb_read_lock");
extern "C" void physr_urcu_read_unlock(void) __asm__("urcu_memb_read_unlock");
}  // namespace detail

// ThreadSanitizer builds count guard depth, so that the outermost guard can tell TSan that
// a grace period orders this reader before a reclaim (see registry.cpp).
#if defined(__SANITIZE_THREAD__)
#define PHYSR_READGUARD_DEPTH 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PHYSR_READGUARD_DEPTH 1
#endif
#endif

namespace detail {
/// Per-thread reader state. A plain __thread POD, so that a guard reads it with one
/// %fs-relative load: no TLS wrapper or init check (the unregistration at thread exit lives
/// in a separate thread_local that only the first registration touches).
struct RcuReader {
  bool registered;
  unsigned depth;
};
extern __thread RcuReader rcu_reader;
}  // namespace detail

/// A registered provider. Pointers obtained inside a ReadGuard stay valid until the guard
/// ends; after remove() the object is freed one grace period later.
class Provider {
 public:
  ProviderId id() const noexcept { return id_; }
  const pci::Bdf& owner() const noexcept { return desc_.owner; }
  /// The owner's index in the topology (pci::kNoFunction when not given).
  uint32_t function() const noexcept { return desc_.function; }
  unsigned bar() const noexcept { return desc_.bar; }
  PhysSpan phys() const noexcept { return desc_.phys; }
  uint64_t bus_offset() const noexcept { return desc_.bus_offset; }
  /// The PCI bus address a peer uses for `a` (which must lie in phys()).
  BusAddr to_bus(PhysAddr a) const noexcept { return BusAddr(a.value() + desc_.bus_offset); }
  bool published() const noexcept { return flags_.load(std::memory_order_acquire) & kPublished; }
  bool cpu_copy_allowed() const noexcept { return desc_.cpu_copy; }
  /// True once revoked: the memory must no longer be mapped or used.
  bool revoked() const noexcept { return flags_.load(std::memory_order_acquire) & kRevoked; }

 private:
  friend class ProviderRegistry;
  static constexpr uint32_t kPublished = 1, kRevoked = 2;
  Provider(ProviderId id, ProviderDesc d);
  ProviderId id_;
  ProviderDesc desc_;
  std::atomic<uint32_t> flags_{0};
  class ProviderRegistry* registry_ = nullptr;
  void* rcu_box_ = nullptr;  // {struct rcu_head, Provider*}, allocated at add() so remove() cannot fail
};

/// The registry of providers. Writers (add, remove, revoke, set_published) are serialised
/// and never block readers; readers (find, get) must run inside a ReadGuard.
class ProviderRegistry {
 public:
  /// Ids available: 1 .. kMaxProviders (0 is host memory). Ids up to kMaxDirectProvider
  /// (510) go straight into range lists; larger ones are stored as kIndirectProvider and
  /// resolved with find() (see range.hpp). The smallest free id is handed out first.
  static constexpr uint32_t kMaxProviders = (1u << 24) - 1;

  ProviderRegistry();
  /// Waits for pending frees (rcu_barrier) and frees everything; no reader may still run.
  ~ProviderRegistry();
  ProviderRegistry(const ProviderRegistry&) = delete;
  ProviderRegistry& operator=(const ProviderRegistry&) = delete;

  /// Registers an aperture. EINVAL: empty, not 4 KiB aligned, wrapping or past 2^52.
  /// EEXIST: overlaps a registered provider (named). ENOSPC: no id left. ENOMEM: no memory
  /// for the Provider or its id-table entry.
  Result<ProviderId> add(ProviderDesc desc);
  /// Unregisters: lookups stop finding it at once; it is freed and its id reused after a
  /// grace period. ENOENT for an unknown or already removed id; the registry is unchanged.
  Status remove(ProviderId id);
  /// Marks revoked and calls on_revoke. ENOENT unknown id, EINVAL already revoked.
  Status revoke(ProviderId id);
  /// Publishes or unpublishes the provider's memory. ENOENT unknown id.
  Status set_published(ProviderId id, bool published);

  /// An RCU read-side section. Nestable; cheap (no fence, no shared write).
  class ReadGuard {
   public:
    // Inline: a guard per lookup (LookupGuarded) paid two calls and the TLS-init checks of a
    // thread_local with a destructor on top of liburcu's two calls.
    ReadGuard() {
      if (!detail::rcu_reader.registered) [[unlikely]] register_reader();
#ifdef PHYSR_READGUARD_DEPTH
      ++detail::rcu_reader.depth;
#endif
      detail::physr_urcu_read_lock();
    }
    ~ReadGuard() {
#ifdef PHYSR_READGUARD_DEPTH
      if (--detail::rcu_reader.depth == 0) reader_done();
#endif
      detail::physr_urcu_read_unlock();
    }
    ReadGuard(const ReadGuard&) = delete;
    ReadGuard& operator=(const ReadGuard&) = delete;
  };

  /// The provider whose aperture holds `a`, or nullptr for host memory. Inside a ReadGuard.
  const Provider* find(PhysAddr a) const noexcept {
    const uint64_t pfn = a.value() >> kPageShift;
    if (pfn >> kPfnBits) [[unlikely]] return nullptr;
    // Level 0 covers 2^30 pages per slot, then 2^20, 2^10 and single pages. A slot holds 0
    // (host memory), a child node, a run (tag 2: the sorted pieces of a slot that providers
    // cover in part), or a provider covering the whole slot, tagged with bit 0 (a leaf).
    // The walk is unrolled, so that each level's offset mask is a constant and each level
    // has its own branches (a loop with a variable shift took 8 more instructions), and a
    // single-page slot holds only 0 or a leaf: it needs no test.
    uintptr_t e = root_.slot[pfn >> 30].load(std::memory_order_acquire);
    if ((e & kTagMask) != 0) return slot_provider(e, pfn & ((uint64_t{1} << 30) - 1));
    if (e == 0) return nullptr;
    e = reinterpret_cast<const Node*>(e)->slot[(pfn >> 20) & 1023].load(std::memory_order_acquire);
    if ((e & kTagMask) != 0) return slot_provider(e, pfn & ((uint64_t{1} << 20) - 1));
    if (e == 0) return nullptr;
    e = reinterpret_cast<const Node*>(e)->slot[(pfn >> 10) & 1023].load(std::memory_order_acquire);
    if ((e & kTagMask) != 0) return slot_provider(e, pfn & 1023);
    if (e == 0) return nullptr;
    e = reinterpret_cast<const Node*>(e)->slot[pfn & 1023].load(std::memory_order_acquire);
    return reinterpret_cast<const Provider*>(e & ~kLeafTag);  // 0 or a leaf
  }
  /// The provider with this id, or nullptr. Inside a ReadGuard.
  const Provider* get(ProviderId id) const noexcept {
    if (id > kMaxProviders) [[unlikely]] return nullptr;
    return ids_[id].load(std::memory_order_acquire);
  }
  /// Like find(), plus how many bytes from `a` the answer stays the same (at least 1 page
  /// for host memory, to the aperture's end for a provider). Inside a ReadGuard.
  const Provider* find_extent(PhysAddr a, uint64_t& bytes) const noexcept;

  /// True when [a, a + len) lies outside every aperture ever registered: host memory for
  /// sure, in two loads (RAM usually sits below every BAR). False means "look it up".
  bool surely_host(PhysAddr a, uint64_t len) const noexcept {
    return a.value() + len <= lowest_.load(std::memory_order_acquire) || a.value() >= highest_.load(std::memory_order_acquire);
  }

  /// Registered (not yet removed) providers.
  size_t size() const noexcept { return live_.load(std::memory_order_relaxed); }
  /// Removed providers whose grace period has not yet ended.
  size_t pending_frees() const noexcept { return pending_.load(std::memory_order_acquire); }
  /// Waits until every removal so far has been freed (rcu_barrier).
  void wait_for_frees();
  /// Bytes held by the lookup tables (radix nodes and touched id-table pages).
  size_t table_bytes() const noexcept { return table_bytes_.load(std::memory_order_relaxed); }
  /// Bytes mapped for nodes and runs (2 MiB chunks; freed runs are reused, not unmapped).
  size_t arena_bytes() const noexcept;

 private:
  static constexpr unsigned kPfnBits = 40;
  struct Node {
    std::atomic<uintptr_t> slot[1024];
  };
  // Slot tags: a leaf has bit 0; a run has bit 1 and not bit 0, bit 3 when it is a line
  // run, bit 4 when it is a block run with two top lines (more than 17 blocks); a node has
  // none. Bit 2 is not used (it marked block runs with a top line, which all have now).
  static constexpr uintptr_t kLeafTag = 1, kRunTag = 2, kRunLineTag = 8, kRunTop2Tag = 16, kTagMask = 7;
  // A run: the pieces of one slot, each [start, next start) -> a provider or nothing (a
  // gap), starts as page offsets within the slot. Immutable once published; copy-on-write.
  // A line run (up to 4 pieces: an aperture that covers part of its slot, a few small
  // ones) is one 64-byte line: 4 starts (INT32_MAX after the last), the 4 slot values, and
  // its rcu_head. A longer run, a block run (128-aligned, the slot points at K): a header
  // line at K - 64, a top line at K (the first start of blocks 1..16, INT32_MAX after the
  // last; none for a single block) and the blocks from K + 64, block 0 the top line's
  // 128-byte buddy; with kRunTop2Tag two top lines at K (blocks 1..32) and the blocks from
  // K + 128. A block is one line: 8 starts
  // (INT32_MAX after the last piece) and the 8 pieces' provider ids (0 for a gap). An id
  // becomes its Provider without a load, as providers live in a slab indexed by id, so a
  // lookup that ends in a block run reads one line per level: the top line and a block.
  static constexpr size_t kRunBlock = 64, kBlockIds = 32;
  /// Bytes between consecutive ids' Provider objects in the slab (a shift, not a multiply).
  static constexpr unsigned kProviderStrideShift = 7;
  static constexpr size_t kSlabBytes = (size_t{kMaxProviders} + 1) << kProviderStrideShift;
#if defined(__SSE2__)
  /// Which of the 8 starts at v are > x: 8 16-bit lanes of ones or zeros (two compares).
  static __m128i gt8(const __m128i* v, __m128i x) noexcept {
    return _mm_packs_epi32(_mm_cmpgt_epi32(_mm_load_si128(v), x), _mm_cmpgt_epi32(_mm_load_si128(v + 1), x));
  }
#endif
  /// The number of the N starts at k that are <= off (N = 8 or 16; SSE2, no branch). The
  /// starts are sorted, so the compares' mask is ones from the first start past off: its
  /// position is the count (packed to bytes and scanned: fewer instructions and a shorter
  /// chain than adding up the lanes; for 8 starts the mask has two bits per start).
  template <unsigned N>
  static unsigned count_le(const void* k, int32_t off) noexcept {
    static_assert(N == 8 || N == 16);
#if defined(__SSE2__)
    const __m128i* v = static_cast<const __m128i*>(k);
    const __m128i x = _mm_set1_epi32(off);
    if constexpr (N == 16)
      return static_cast<unsigned>(__builtin_ctz(static_cast<unsigned>(_mm_movemask_epi8(_mm_packs_epi16(gt8(v, x), gt8(v + 2, x)))) | 0x10000u));
    else
      return static_cast<unsigned>(__builtin_ctz(static_cast<unsigned>(_mm_movemask_epi8(gt8(v, x))) | 0x10000u)) >> 1;
#else
    const int32_t* s = static_cast<const int32_t*>(k);
    unsigned n = 0;
    for (unsigned i = 0; i < N; ++i) n += s[i] <= off;
    return n;
#endif
  }
  /// The Provider of a block's id, or 0 for a gap (id 0): a cmov, not a branch.
  static uintptr_t slab_value(const char* slab, uint32_t id) noexcept {
    const uintptr_t p = reinterpret_cast<uintptr_t>(slab) + (uintptr_t{id} << kProviderStrideShift);
    return id ? p : 0;
  }
  /// The Provider of the run piece holding page offset `off`, or 0 for a gap (a line
  /// run's leaf without its tag, or a block's Provider from the slab). A line run takes one
  /// compare; a block run counts its top line, then its block, without a branch.
  static uintptr_t run_find(uintptr_t e, int32_t off, const char* slab) noexcept {
    const char* k = reinterpret_cast<const char*>(e & ~uintptr_t{63});
    if (e & kRunLineTag) {
#if defined(__SSE2__)
      const __m128i gt = _mm_cmpgt_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(k)), _mm_set1_epi32(off));
      const unsigned i = static_cast<unsigned>(__builtin_ctz(static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(gt))) | 16u)) - 1;
#else
      const int32_t* s = reinterpret_cast<const int32_t*>(k);
      unsigned i = 0;
      while (i < 3 && s[i + 1] <= off) ++i;
#endif
      return reinterpret_cast<const uintptr_t*>(k + 16)[i] & ~kLeafTag;  // a whole leaf, or 0
    }
    const char* block = run_block(k, e, off);
    return slab_value(slab, block_id(block, off));
  }
  /// The id of the piece of `block` that holds page offset `off` (the block's first start
  /// is at or before it). These are the last instructions of most lookups, waiting on the
  /// block's miss: the compares' first set bit is twice the count (two mask bits per
  /// start), so the id at count - 1 is at kBlockIds - 4 + 2 * that bit, with no shift and
  /// no subtract.
  static uint32_t block_id(const char* block, int32_t off) noexcept {
#if defined(__SSE2__)
    const __m128i gt = gt8(reinterpret_cast<const __m128i*>(block), _mm_set1_epi32(off));
    const unsigned twice = static_cast<unsigned>(__builtin_ctz(static_cast<unsigned>(_mm_movemask_epi8(gt)) | 0x10000u));
    return *reinterpret_cast<const uint32_t*>(block + kBlockIds - 4 + 2 * twice);
#else
    return reinterpret_cast<const uint32_t*>(block + kBlockIds)[count_le<8>(block, off) - 1];
#endif
  }
  /// The provider of a leaf or run slot value `e` at page offset `off` within the slot.
  const Provider* slot_provider(uintptr_t e, uint64_t off) const noexcept {
    if (e & kLeafTag) return reinterpret_cast<const Provider*>(e & ~kLeafTag);
    return reinterpret_cast<const Provider*>(run_find(e, static_cast<int32_t>(off), slab_));
  }
  /// The block of the run at k (tag bits in e) that holds page offset `off`. Every block
  /// run has a top line, a single block's without a start, so block c is at k + 64 (c + 1)
  /// with no test: testing for a top line mispredicts in mixed layouts, and choosing the
  /// address by the tag without a branch took 8 instructions more per lookup (a multiply by
  /// the tag bit). The second top line takes a branch (only runs past 136 pieces have it).
  static const char* run_block(const char* k, uintptr_t e, int32_t off) noexcept {
    unsigned c = count_le<16>(k, off);
    const char* first = k + 64;
    if (e & kRunTop2Tag) [[unlikely]] {
      c += count_le<16>(first, off);
      first += 64;
    }
    return first + kRunBlock * c;
  }
  /// Registers this thread with liburcu (first guard or writer call of the thread).
  static void register_reader();
  /// register_reader() unless done (writers: call_rcu and rcu_barrier need it too).
  static void ensure_registered();
  /// The outermost guard of a ThreadSanitizer build ends (see registry.cpp).
  static void reader_done() noexcept;
  struct RunInfo;
  struct Piece {
    uint64_t s, e;  // pages
    const Provider* p;
  };
  void collect(uintptr_t x, uint64_t lo, uint64_t hi, std::vector<Piece>& out) const;
  uintptr_t build(unsigned level, uint64_t lo, uint64_t hi, const std::vector<Piece>& provs);
  void retire(uintptr_t x);
  void insert_slot(std::atomic<uintptr_t>& slot, unsigned level, uint64_t lo, uint64_t hi, uint64_t s, uint64_t e, const Provider* p);
  void erase_slot(std::atomic<uintptr_t>& slot, unsigned level, uint64_t lo, uint64_t hi, uint64_t s, uint64_t e, const Provider* p);
  static void reclaim(void* head);
  using Slots = std::atomic<uintptr_t>*;
  bool overlaps(const std::atomic<uintptr_t>* n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider** who) const;
  void insert(Slots n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p);
  void erase(Slots n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p);
  struct Arena;
  void* arena_alloc(size_t bytes, size_t align);
  Provider* writer_get(ProviderId id) const;

  Node root_{};
  Arena* arena_ = nullptr;       // where nodes and runs live (2 MiB chunks)
  std::atomic<const Provider*>* ids_ = nullptr;  // kMaxProviders + 1 entries, mmap'ed
  char* slab_ = nullptr;  // Provider objects: id's at slab_ + (id << kProviderStrideShift), mmap'ed
  std::vector<bool> slab_pages_;  // which 4 KiB pages of slab_ are writable (and seen by LSan)
  std::vector<bool> id_pages_;                  // which 4 KiB pages of ids_ hold an entry
  mutable std::mutex writer_;
  std::vector<uint32_t> free_ids_;  // min-heap, ids whose grace period has ended
  std::mutex free_ids_lock_;
  uint32_t next_id_ = 1;
  size_t node_bytes_ = 0;  // nodes below the root (writer side, under writer_)
  std::atomic<size_t> live_{0};
  std::atomic<size_t> pending_{0};
  std::atomic<size_t> table_bytes_{0};
  std::atomic<uint64_t> lowest_{~uint64_t{0}}, highest_{0};  // span of all apertures ever added
};

/// Builds a range list from physical pieces, tagging each byte with the provider that owns
/// it (host memory elsewhere) and splitting pieces at provider boundaries, so ranges never
/// cross providers. Inside a ReadGuard. EFAULT names a piece that touches a revoked
/// provider; other errors as RangeList::append.
Result<RangeList> tag_ranges(const ProviderRegistry& registry, std::span<const PhysSpan> pieces,
                             const SegmentLimits& limits = {});

}  // namespace physr
