// physr mem: a devmem binding as a page pool's memory provider (Linux net/core/devmem.c
// dmabuf_devmem_ops: mp_dmabuf_devmem_init, _alloc_netmems, _release_page, _destroy).
//
// Design rationale
// - The kernel's net_iovs live in each chunk owner's array (dmabuf_genpool_chunk_owner's
//   net_iov_area); physr gives each chunk NetIovAreas of its own, one per physically
//   contiguous piece (a chunk is a DMA segment, which an IOMMU may have made of several
//   ranges of the buffer), so a Netmem's metadata and its CPU address stay O(1). An area's
//   priv names its chunk and first index, so a Netmem goes back to its NetIov in O(1).
// - Allocation is the binding's genalloc (net_devmem_alloc_dmabuf()); the DMA address of
//   the net_iov is set from the binding when it is handed out (net_devmem_get_dma_addr()),
//   so a buffer the binding remapped after a move gets the new address.
// - Several pools may share one binding (one per RX queue it is bound to); init() and
//   destroy() count them as the binding's references (net_devmem_dmabuf_binding_get/put).
// - A revoke of the dma-buf (physr: the kernel's devmem pins its attachment) marks every
//   area dead and asks each pool to flush: no more buffers are handed out, and buffers
//   coming back are released to the binding instead of recycled.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/mem/devmem.hpp"
#include "physr/mem/netmem.hpp"
#include "physr/mem/page_pool.hpp"

namespace physr::mem {

/// A DevmemBinding behind memory_provider_ops. The binding must outlive the provider, and
/// the provider every pool using it. Thread-safe as MemoryProvider requires.
class DevmemMemoryProvider final : public MemoryProvider {
 public:
  /// One NetIovArea per physically contiguous piece of each chunk of the binding. EINVAL:
  /// a TX binding, or a piece not 4 KiB aligned in the buffer's ranges; ENODEV: the binding is revoked;
  /// errors of NetIovArea::create.
  static Result<std::unique_ptr<DevmemMemoryProvider>> create(DevmemBinding& binding);
  /// Unhooks from the binding's revocation. Every pool using it must be gone.
  ~DevmemMemoryProvider() override;
  DevmemMemoryProvider(const DevmemMemoryProvider&) = delete;
  DevmemMemoryProvider& operator=(const DevmemMemoryProvider&) = delete;

  /// Linux mp_dmabuf_devmem_init(): turns the pool's DMA sync for device and for CPU off
  /// (dma-buf addresses are not synced), then E2BIG for an order other than 0; physr adds
  /// ENODEV once the binding is revoked.
  Status init(PagePool& pool) override;
  /// Linux mp_dmabuf_devmem_destroy(): the pool drops its reference to the binding.
  void destroy(PagePool& pool) override;
  /// Linux mp_dmabuf_devmem_alloc_netmems(): a net_iov from the binding's genpool
  /// (net_devmem_alloc_dmabuf()) with its DMA address, set up for the pool and counted as
  /// held; none when the binding is exhausted or revoked.
  Netmem alloc_netmems(PagePool& pool) override;
  /// Linux mp_dmabuf_devmem_release_page(): a net_iov with one pp reference goes back to
  /// the binding (net_devmem_free_dmabuf()); anything else is reported and kept (the
  /// kernel's WARN_ON_ONCE). Always false: the pool never put_page()s a net_iov.
  bool release_netmem(PagePool& pool, Netmem n) override;
  /// Every area, chunk by chunk.
  std::vector<NetIovArea*> areas() const override;
  std::string name() const override { return "devmem dma-buf binding"; }

  /// The handle of a binding's net_iov. EINVAL: not one of the binding.
  Result<Netmem> netmem(NetIov niov) const;
  /// The binding's net_iov of a handle. EINVAL: not one of this provider's handles.
  Result<NetIov> niov(Netmem n) const;
  /// Pools bound now.
  uint32_t pools() const;
  /// Whether the binding stopped (its dma-buf was revoked) since the provider was made.
  bool revoked() const;
  DevmemBinding& binding() const noexcept { return *binding_; }

 private:
  struct Piece {
    uint32_t chunk = 0, first = 0, count = 0;
    std::unique_ptr<NetIovArea> area;
  };
  explicit DevmemMemoryProvider(DevmemBinding& b) : binding_(&b) {}
  void revoked_now();

  DevmemBinding* binding_;
  std::vector<std::vector<Piece>> chunks_;  // by chunk, pieces by first index
  std::vector<uint32_t> area_ids_;          // sorted
  mutable std::mutex mu_;
  std::vector<PagePool*> pools_;
  bool revoked_ = false;
};

}  // namespace physr::mem
