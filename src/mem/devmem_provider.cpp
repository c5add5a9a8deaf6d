// A devmem binding as a page pool's memory provider (Linux net/core/devmem.c
// dmabuf_devmem_ops).
#include "physr/mem/devmem_provider.hpp"

#include <algorithm>
#include <cstdio>

namespace physr::mem {

namespace {
void warn(const PagePool& pool, const std::string& msg) {
  if (pool.params().report) pool.params().report(msg);
  else std::fprintf(stderr, "physr: %s\n", msg.c_str());
}
}  // namespace

Result<std::unique_ptr<DevmemMemoryProvider>> DevmemMemoryProvider::create(DevmemBinding& binding) {
  if (binding.revoked()) return make_error(ENODEV, "devmem provider: the binding is revoked");
  // Only netdev_nl_bind_rx_doit()'s bindings are installed as an RX queue's memory provider.
  if (binding.direction() != DmaDirection::from_device) return make_error(EINVAL, "devmem provider: a TX binding is bound to no RX queue");
  std::unique_ptr<DevmemMemoryProvider> p(new DevmemMemoryProvider(binding));
  const DmaBuf& buf = binding.attachment().buffer();
  const RangeList ranges = buf.ranges();
  const std::vector<DevmemChunk> chunks = binding.chunks();
  p->chunks_.resize(chunks.size());
  for (size_t k = 0; k < chunks.size(); ++k) {
    // The chunk's bytes [base_virtual, + num_niovs pages) of the buffer, cut where the
    // buffer's ranges are.
    const uint64_t lo = chunks[k].base_virtual, hi = lo + uint64_t{chunks[k].num_niovs} * kPageSize;
    uint64_t at = 0;
    for (const PhysRange r : ranges) {
      const uint64_t a = std::max(lo, at), b = std::min(hi, at + r.size);
      if (a < b) {
        const PhysAddr base(r.base.value() + (a - at));
        if ((a - lo) % kPageSize || (b - a) % kPageSize || base.value() % kPageSize)
          return make_error(EINVAL, "devmem provider: chunk " + std::to_string(k) + " has a piece at " +
                                        format_hex(base.value()) + " +" + format_hex(b - a) + " that is not whole pages");
        Piece pc;
        pc.chunk = static_cast<uint32_t>(k);
        pc.first = static_cast<uint32_t>((a - lo) / kPageSize);
        pc.count = static_cast<uint32_t>((b - a) / kPageSize);
        PHYSR_ASSIGN_OR_RETURN(pc.area, NetIovArea::create({.count = pc.count, .base = base, .provider = buf.provider(),
                                                            .net_iov = true,
                                                            .name = "devmem chunk " + std::to_string(k) + " +" +
                                                                    std::to_string(pc.first)}));
        p->chunks_[k].push_back(std::move(pc));
      }
      at += r.size;
      if (at >= hi) break;
    }
  }
  for (auto& c : p->chunks_)
    for (Piece& pc : c) {
      pc.area->priv = &pc;  // the vectors do not change from here on
      p->area_ids_.push_back(pc.area->id());
    }
  std::sort(p->area_ids_.begin(), p->area_ids_.end());
  DevmemMemoryProvider* self = p.get();
  binding.on_revoke([self] { self->revoked_now(); });
  if (binding.revoked()) self->revoked_now();  // revoked while we were building
  return p;
}

DevmemMemoryProvider::~DevmemMemoryProvider() { binding_->on_revoke(nullptr); }

// Linux mp_dmabuf_devmem_init(): pool->dma_sync = pool->dma_sync_for_cpu = false, then
// E2BIG unless order 0, then net_devmem_dmabuf_binding_get().
Status DevmemMemoryProvider::init(PagePool& pool) {
  pool.set_dma_sync(false);
  pool.set_dma_sync_for_cpu(false);
  if (pool.params().order != 0)
    return make_error(E2BIG, "devmem provider: order " + std::to_string(pool.params().order) + " (net_iovs are order 0)");
  std::lock_guard g(mu_);
  if (revoked_) return make_error(ENODEV, "devmem provider: the binding is revoked");
  pools_.push_back(&pool);
  return {};
}

// Linux mp_dmabuf_devmem_destroy(): net_devmem_dmabuf_binding_put().
void DevmemMemoryProvider::destroy(PagePool& pool) {
  std::lock_guard g(mu_);
  pools_.erase(std::remove(pools_.begin(), pools_.end(), &pool), pools_.end());
}

// Linux mp_dmabuf_devmem_alloc_netmems(): net_devmem_alloc_dmabuf(), page_pool_set_pp_info()
// and pages_state_hold_cnt++ (net_mp_niov_set_page_pool()).
Netmem DevmemMemoryProvider::alloc_netmems(PagePool& pool) {
  auto v = binding_->alloc_netmem();
  if (!v) return {};  // exhausted (the kernel's NULL) or revoked
  auto dma = binding_->dma_addr(*v);
  auto n = netmem(*v);
  if (!dma || !n) {  // revoked between the two calls
    (void)binding_->release_netmem(*v);
    return {};
  }
  NetmemMeta& m = netmem_meta(*n);
  m.dma_addr = dma->value();  // page_pool_set_dma_addr_netmem(, net_devmem_get_dma_addr())
  m.dma_flags = 0;
  pool.mp_niov_set_page_pool(*n);
  return *n;
}

// Linux mp_dmabuf_devmem_release_page(): WARN_ON_ONCE for a page or pp_ref_count != 1
// (and keep it), else page_pool_clear_pp_info() and net_devmem_free_dmabuf(); false: the
// pool must not put_page() a net_iov.
bool DevmemMemoryProvider::release_netmem(PagePool& pool, Netmem n) {
  auto v = niov(n);
  if (!v) {
    warn(pool, "devmem provider: release of " + netmem_name(n) + ", not a net_iov of the binding");
    return false;
  }
  NetmemMeta& m = netmem_meta(n);
  const int64_t refs = m.pp_ref_count.load(std::memory_order_relaxed);
  if (refs != 1) {
    warn(pool, "devmem provider: release of " + netmem_name(n) + " with pp_ref_count " + std::to_string(refs));
    return false;
  }
  PagePool::mp_niov_clear_page_pool(n);
  if (Status s = binding_->release_netmem(*v); !s)
    warn(pool, "devmem provider: " + s.error().to_string());
  return false;
}

std::vector<NetIovArea*> DevmemMemoryProvider::areas() const {
  std::vector<NetIovArea*> out;
  for (const auto& c : chunks_)
    for (const Piece& pc : c) out.push_back(pc.area.get());
  return out;
}

Result<Netmem> DevmemMemoryProvider::netmem(NetIov v) const {
  if (v.chunk < chunks_.size()) {
    const auto& c = chunks_[v.chunk];
    // The last piece starting at or before the index.
    auto it = std::upper_bound(c.begin(), c.end(), v.index, [](uint32_t i, const Piece& pc) { return i < pc.first; });
    if (it != c.begin() && v.index - (it - 1)->first < (it - 1)->count) return (it - 1)->area->netmem(v.index - (it - 1)->first);
  }
  return make_error(EINVAL, "devmem provider: net_iov " + std::to_string(v.chunk) + ":" + std::to_string(v.index) +
                                " is not in the binding");
}

Result<NetIov> DevmemMemoryProvider::niov(Netmem n) const {
  NetIovArea* a = n ? netmem_area(n) : nullptr;
  // Only an area of ours carries a Piece in priv: its id is looked up first.
  if (a && n.is_net_iov() && n.index() < a->count() && std::binary_search(area_ids_.begin(), area_ids_.end(), a->id())) {
    const auto* pc = static_cast<const Piece*>(a->priv);
    return NetIov{pc->chunk, pc->first + static_cast<uint32_t>(n.index())};
  }
  return make_error(EINVAL, "devmem provider: " + (n ? netmem_name(n) : std::string("netmem 0")) +
                                " is not a net_iov of the binding");
}

uint32_t DevmemMemoryProvider::pools() const {
  std::lock_guard g(mu_);
  return static_cast<uint32_t>(pools_.size());
}

bool DevmemMemoryProvider::revoked() const {
  std::lock_guard g(mu_);
  return revoked_;
}

// The binding stopped: its buffers are released when they come back, cached ones at the
// pools' next allocation.
void DevmemMemoryProvider::revoked_now() {
  for (auto& c : chunks_)
    for (Piece& pc : c) pc.area->set_dead();
  std::lock_guard g(mu_);
  revoked_ = true;
  for (PagePool* p : pools_) p->request_flush();
}

}  // namespace physr::mem
