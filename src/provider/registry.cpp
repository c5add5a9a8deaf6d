#include "physr/provider.hpp"

#include <sys/mman.h>
#include <urcu/urcu-memb.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <new>
#include <string>

// ThreadSanitizer does not see the ordering that an RCU grace period provides (liburcu
// orders readers against the reclaimer with membarrier, and hands callbacks over in its
// own uninstrumented queue). Model it: every read-side section releases a token just
// before it unlocks, a writer releases it before call_rcu, and the reclaimer acquires it
// before freeing, which is exactly the guarantee a grace period gives.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PHYSR_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define PHYSR_TSAN 1
#endif
#ifdef PHYSR_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
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

static_assert(alignof(Provider) >= 4, "provider pointers carry two tag bits");

struct RcuBox {
  rcu_head head;
  Provider* provider;
};

// liburcu needs every reading thread registered; do it on first use and undo it at exit.
struct ThreadRegistration {
  bool registered = false;
  int depth = 0;
  ~ThreadRegistration() {
    if (registered) urcu_memb_unregister_thread();
  }
};
thread_local ThreadRegistration t_rcu;

// call_rcu() and rcu_barrier() take liburcu's read lock internally: the caller must be
// registered too.
void ensure_registered() {
  if (!t_rcu.registered) {
    urcu_memb_register_thread();
    t_rcu.registered = true;
  }
}

std::string describe(const PhysSpan& s) { return "[" + format_hex(s.base.value()) + ", +" + format_hex(s.size) + ")"; }

constexpr uint64_t kPfnLimit = uint64_t{1} << 40;
constexpr unsigned shift_of(unsigned level) { return 10 * (3 - level); }

}  // namespace

Provider::Provider(ProviderId id, ProviderDesc d) : id_(id), desc_(std::move(d)) {
  flags_.store(desc_.published ? kPublished : 0, std::memory_order_relaxed);
}

ProviderRegistry::ReadGuard::ReadGuard() {
  ensure_registered();
  ++t_rcu.depth;
  urcu_memb_read_lock();
}

ProviderRegistry::ReadGuard::~ReadGuard() {
  // Release before unlocking: once unlocked, a grace period may end and a reclaimer acquire.
  if (--t_rcu.depth == 0) tsan_reader_done();
  urcu_memb_read_unlock();
}

namespace {
constexpr size_t kIdTableBytes = (size_t{ProviderRegistry::kMaxProviders} + 1) * sizeof(void*);
constexpr size_t kIdsPerPage = 4096 / sizeof(void*);
}  // namespace

ProviderRegistry::ProviderRegistry() {
  // Zero-filled on demand by the kernel; untouched pages read as zero (no provider).
  void* m = mmap(nullptr, kIdTableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  ids_ = static_cast<std::atomic<const Provider*>*>(m);
  id_pages_.assign(kIdTableBytes / 4096, false);
  table_bytes_.store(sizeof(Node), std::memory_order_relaxed);
}

ProviderRegistry::~ProviderRegistry() {
  ensure_registered();
  urcu_memb_barrier();  // run every pending reclaim callback
  PHYSR_ASSERT(pending_.load(std::memory_order_acquire) == 0, "the barrier ran every pending reclaim");
  for (uint32_t id = 1; id < next_id_; ++id) {
    const Provider* p = ids_[id].load(std::memory_order_relaxed);
    if (p) {
      delete static_cast<RcuBox*>(p->rcu_box_);
      delete p;
    }
  }
  munmap(ids_, kIdTableBytes);
  free_nodes(root_, 0);
}

void ProviderRegistry::free_nodes(Node& n, unsigned level) {
  for (auto& s : n.slot) {
    const uintptr_t e = s.load(std::memory_order_relaxed);
    if (e == 0 || (e & 1) || level == 3) continue;
    Node* child = reinterpret_cast<Node*>(e);
    free_nodes(*child, level + 1);
    delete child;
  }
}

constexpr uintptr_t kLeaf = 1, kPartial = 2;
inline const Provider* leaf_ptr(uintptr_t x) { return reinterpret_cast<const Provider*>(x & ~uintptr_t{3}); }
inline bool is_child(uintptr_t x, unsigned level) { return x != 0 && !(x & kLeaf) && level != 3; }
inline uint64_t first_page(const Provider* p) { return p->phys().base.value() >> kPageShift; }
inline uint64_t end_page(const Provider* p) { return (p->phys().base.value() + p->phys().size) >> kPageShift; }

// Pages [s, e) within node n (level `level`, first page `base`): is any already mapped?
bool ProviderRegistry::overlaps(const Node& n, unsigned level, uint64_t base, uint64_t s, uint64_t e,
                                const Provider** who) const {
  const unsigned sh = shift_of(level);
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uintptr_t x = n.slot[i].load(std::memory_order_relaxed);
    if (x == 0) continue;
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    const uint64_t cs = std::max(s, lo), ce = std::min(e, hi);
    if (is_child(x, level)) {
      if (overlaps(*reinterpret_cast<const Node*>(x), level + 1, lo, cs, ce, who)) return true;
      continue;
    }
    const Provider* q = leaf_ptr(x);
    if (!(x & kPartial) || (first_page(q) < ce && cs < end_page(q))) {
      *who = q;
      return true;
    }
  }
  return false;
}

// Maps pages [s, e) of node n to p. A slot p covers whole takes a leaf; an empty slot it
// covers in part takes a partial leaf; a slot already holding another provider's partial
// leaf becomes a node holding both. A new node is filled before it is published, and
// nodes are never replaced or freed while the registry lives, so a reader that loaded a
// node pointer always finds it alive and complete.
void ProviderRegistry::insert(Node& n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p) {
  const unsigned sh = shift_of(level);
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    const uint64_t cs = std::max(s, lo), ce = std::min(e, hi);
    const uintptr_t x = n.slot[i].load(std::memory_order_relaxed);
    if (is_child(x, level)) {
      insert(*reinterpret_cast<Node*>(x), level + 1, lo, cs, ce, p);
      continue;
    }
    const bool whole = cs == lo && ce == hi;
    if (x == 0) {
      n.slot[i].store(reinterpret_cast<uintptr_t>(p) | kLeaf | (whole ? 0 : kPartial), std::memory_order_release);
      continue;
    }
    // Another provider's partial leaf (a whole leaf would have been an overlap): split.
    const Provider* q = leaf_ptr(x);
    PHYSR_ASSERT((x & kLeaf) && (x & kPartial) && q != p, "only another provider's partial leaf shares a slot");
    Node* child = new Node{};
    table_bytes_.fetch_add(sizeof(Node), std::memory_order_relaxed);
    insert(*child, level + 1, lo, std::max(first_page(q), lo), std::min(end_page(q), hi), q);
    insert(*child, level + 1, lo, cs, ce, p);
    n.slot[i].store(reinterpret_cast<uintptr_t>(child), std::memory_order_release);
  }
}

// Unmaps p's pages [s, e): clears its leaves and partial leaves; nodes stay.
void ProviderRegistry::erase(Node& n, unsigned level, uint64_t base, uint64_t s, uint64_t e, const Provider* p) {
  const unsigned sh = shift_of(level);
  for (uint64_t i = (s - base) >> sh, last = (e - 1 - base) >> sh; i <= last; ++i) {
    const uint64_t lo = base + (i << sh), hi = lo + (uint64_t{1} << sh);
    const uintptr_t x = n.slot[i].load(std::memory_order_relaxed);
    if (is_child(x, level)) erase(*reinterpret_cast<Node*>(x), level + 1, lo, std::max(s, lo), std::min(e, hi), p);
    else if (x != 0 && leaf_ptr(x) == p) n.slot[i].store(0, std::memory_order_release);
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

  std::lock_guard lock(writer_);
  const Provider* who = nullptr;
  if (overlaps(root_, 0, 0, s, e, &who))
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
  auto* p = new Provider(id, std::move(desc));
  p->registry_ = this;
  p->rcu_box_ = new RcuBox{{}, p};
  if (!id_pages_[id / kIdsPerPage]) {
    id_pages_[id / kIdsPerPage] = true;
    table_bytes_.fetch_add(4096, std::memory_order_relaxed);
  }
  // Widen the span that holds every aperture ever registered (never narrowed, so a
  // reader's "surely host memory" answer stays right after removals).
  if (p->phys().base.value() < lowest_.load(std::memory_order_relaxed)) lowest_.store(p->phys().base.value(), std::memory_order_release);
  const uint64_t end = p->phys().base.value() + p->phys().size;
  if (end > highest_.load(std::memory_order_relaxed)) highest_.store(end, std::memory_order_release);
  // Publish: the object is complete before either table can point at it.
  insert(root_, 0, 0, s, e, p);
  ids_[id].store(p, std::memory_order_release);
  live_.fetch_add(1, std::memory_order_relaxed);
  return ProviderId{id};
}

void ProviderRegistry::reclaim(void* head) {
  tsan_grace_period_over();
  auto* box = reinterpret_cast<RcuBox*>(static_cast<rcu_head*>(head));
  Provider* p = box->provider;
  ProviderRegistry* reg = p->registry_;
  {
    std::lock_guard fl(reg->free_ids_lock_);
    reg->free_ids_.push_back(p->id());
    std::push_heap(reg->free_ids_.begin(), reg->free_ids_.end(), std::greater<>());
  }
  delete p;
  delete box;
  const size_t before = reg->pending_.fetch_sub(1, std::memory_order_release);
  PHYSR_ASSERT(before > 0, "every reclaim was counted pending by remove()");
}

Status ProviderRegistry::remove(ProviderId id) {
  ensure_registered();
  std::lock_guard lock(writer_);
  Provider* p = writer_get(id);
  if (!p) return make_error(ENOENT, "provider id " + std::to_string(id) + " is not registered");
  const uint64_t s = p->phys().base.value() >> kPageShift, e = s + (p->phys().size >> kPageShift);
  erase(root_, 0, 0, s, e, p);
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
  for (unsigned level = 0;; ++level, sh -= 10) {
    if (e & kLeaf) break;
    if (e == 0) {
      // Host memory at least to the end of this empty slot.
      const uint64_t end = ((pfn >> sh) + 1) << sh;
      bytes = (end << kPageShift) - a.value();
      return nullptr;
    }
    if (level == 3) break;
    e = reinterpret_cast<const Node*>(e)->slot[(pfn >> (sh - 10)) & 1023].load(std::memory_order_acquire);
  }
  const Provider* p = leaf_ptr(e);
  const uint64_t start = p->phys().base.value(), end = start + p->phys().size;
  if ((e & kPartial) && !p->phys().contains(a)) {
    // Host memory up to the provider, or to the end of the slot past it.
    const uint64_t slot_end = (((pfn >> sh) + 1) << sh) << kPageShift;
    bytes = (a.value() < start ? start : slot_end) - a.value();
    return nullptr;
  }
  bytes = end - a.value();
  return p;
}

}  // namespace physr
