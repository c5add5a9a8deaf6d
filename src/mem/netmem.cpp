// netmem handles and their areas (Linux include/net/netmem.h, struct net_iov_area): the
// global table of areas by id and the per-provider lists behind netmem_find().
//
// The table is a fixed array of atomic pointers (512 KiB of zero pages until used), written
// under one mutex and read without locks: a handle's metadata is table[area]->metas[index].
// Provider lists are intrusive and prepend-only under the mutex; a reader walks them with
// acquire loads, so areas must not be destroyed while readers look up their provider.
#include "physr/mem/netmem.hpp"

#include <cinttypes>
#include <cstdio>
#include <mutex>

namespace physr::mem {

namespace detail {
std::atomic<NetIovArea*> g_netmem_areas[Netmem::kMaxAreas];
}  // namespace detail

namespace {

constexpr ProviderId kMaxProviders = 16384;

std::mutex& table_mutex() {
  static std::mutex mu;
  return mu;
}
// Heads of the per-provider lists, by provider id.
std::atomic<NetIovArea*> g_provider_areas[kMaxProviders];
uint32_t g_next_id = 1;  // next id to try (under the mutex)

}  // namespace

Result<std::unique_ptr<NetIovArea>> NetIovArea::create(NetIovAreaConfig c) {
  if (c.count == 0 || c.count >= kMaxCount)
    return make_error(EINVAL, "net_iov area '" + c.name + "': " + std::to_string(c.count) + " buffers (1 to 2^47 - 1)");
  if (c.base.value() % kBufferSize != 0)
    return make_error(EINVAL, "net_iov area '" + c.name + "': base " + format_hex(c.base.value()) + " is not 4 KiB aligned");
  if (c.provider >= kMaxProviders)
    return make_error(EINVAL, "net_iov area '" + c.name + "': provider id " + std::to_string(c.provider) +
                                  " is beyond the table of " + std::to_string(kMaxProviders));
  std::unique_ptr<NetIovArea> a(new NetIovArea());
  a->metas_ = std::make_unique<NetmemMeta[]>(c.count);
  a->count_ = c.count;
  a->base_ = c.base;
  a->provider_ = c.provider;
  a->net_iov_ = c.net_iov;
  a->name_ = std::move(c.name);
  std::lock_guard g(table_mutex());
  for (uint32_t tries = 0; tries < Netmem::kMaxAreas - 1; ++tries) {
    const uint32_t id = g_next_id;
    g_next_id = g_next_id + 1 == Netmem::kMaxAreas ? 1 : g_next_id + 1;
    if (detail::g_netmem_areas[id].load(std::memory_order_relaxed) != nullptr) continue;
    a->id_ = id;
    a->next_of_provider_.store(g_provider_areas[a->provider_].load(std::memory_order_relaxed), std::memory_order_relaxed);
    g_provider_areas[a->provider_].store(a.get(), std::memory_order_release);
    detail::g_netmem_areas[id].store(a.get(), std::memory_order_release);
    return a;
  }
  return make_error(ENOSPC, "net_iov area '" + a->name_ + "': all " + std::to_string(Netmem::kMaxAreas - 1) +
                                " area ids are taken");
}

NetIovArea::~NetIovArea() {
  std::lock_guard g(table_mutex());
  detail::g_netmem_areas[id_].store(nullptr, std::memory_order_release);
  // Unlink from the provider's list.
  std::atomic<NetIovArea*>* link = &g_provider_areas[provider_];
  for (NetIovArea* p = link->load(std::memory_order_relaxed); p; p = link->load(std::memory_order_relaxed)) {
    if (p == this) {
      link->store(next_of_provider_.load(std::memory_order_relaxed), std::memory_order_release);
      break;
    }
    link = &p->next_of_provider_;
  }
}

Result<Netmem> netmem_find(ProviderId provider, PhysAddr addr) noexcept {
  if (provider < kMaxProviders) {
    for (NetIovArea* a = g_provider_areas[provider].load(std::memory_order_acquire); a;
         a = a->next_of_provider_.load(std::memory_order_acquire)) {
      const uint64_t off = addr.value() - a->base_.value();
      if (addr.value() >= a->base_.value() && off / NetIovArea::kBufferSize < a->count_)
        return a->netmem(off / NetIovArea::kBufferSize);
    }
  }
  return make_error(ENOENT, "no net_iov area of provider " + std::to_string(provider) + " holds " + format_hex(addr.value()));
}

std::string netmem_name(Netmem n) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "netmem %#" PRIx64, n.raw());
  std::string s = buf;
  const NetIovArea* a = netmem_area(n);
  if (!a) return s + " (no such area)";
  if (n.index() >= a->count()) return s + " (index beyond " + a->name() + ")";
  return s + " (" + a->name() + " #" + std::to_string(n.index()) + " at " + format_hex(a->phys(n.index()).value()) + ")";
}

}  // namespace physr::mem
