// physr mem: netmem handles (Linux include/net/netmem.h): an 8-byte tagged handle for a
// buffer of host memory or of provider memory (a net_iov), with its page_pool metadata
// (owning pool, DMA address, pp_ref_count, owner area) kept outside any page structure.
//
// Design rationale
// - Linux's netmem_ref is a struct page pointer, or a struct net_iov pointer with bit 0
//   (NET_IOV) set; the page pool's fields live in struct page (pp, dma_addr, pp_ref_count)
//   or in the net_iov, which sits in the flat array of its net_iov_area (devmem's chunk
//   owner, io_uring zcrx's area). physr keeps every buffer's metadata in such flat
//   arrays, host pages included: a handle is bit 0 NET_IOV, bits 1-16 the area's id and
//   bits 17-63 the buffer's index in it, so its metadata is two dependent loads away (the
//   global table of areas, then the area's array): no xarray, no tree, no hash.
// - From a provider id and a physical address, netmem_find() walks the provider's areas
//   (flat per-provider table, usually one area each) and indexes the array.
// - Areas are created by whoever owns the memory (the host page allocator, a memory
//   provider, a dma-buf binding later) and live until destroyed; a handle of a destroyed
//   area decodes to no area (netmem_area() is null), which the page pool reports as a use
//   after release.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "physr/core.hpp"
#include "physr/range.hpp"

namespace physr::mem {

class PagePool;
class NetIovArea;

/// Linux netmem_ref: 8 bytes, 0 means none. Bit 0 is NET_IOV (include/net/netmem.h):
/// set for a net_iov (memory of a provider: device memory, a user area), clear for a host
/// page of the page allocator. The rest names the area and the buffer's index in it.
class Netmem {
 public:
  static constexpr uint64_t kNetIovBit = 1;
  static constexpr unsigned kAreaShift = 1, kAreaBits = 16, kIndexShift = 17;
  static constexpr uint32_t kMaxAreas = uint32_t{1} << kAreaBits;  // id 0 is never used

  constexpr Netmem() = default;
  static constexpr Netmem make(bool net_iov, uint32_t area, uint64_t index) noexcept {
    Netmem n;
    n.v_ = (index << kIndexShift) | (uint64_t{area} << kAreaShift) | (net_iov ? kNetIovBit : 0);
    return n;
  }
  static constexpr Netmem from_raw(uint64_t v) noexcept {
    Netmem n;
    n.v_ = v;
    return n;
  }
  constexpr uint64_t raw() const noexcept { return v_; }
  constexpr explicit operator bool() const noexcept { return v_ != 0; }
  /// Linux netmem_is_net_iov().
  constexpr bool is_net_iov() const noexcept { return (v_ & kNetIovBit) != 0; }
  constexpr uint32_t area_id() const noexcept { return static_cast<uint32_t>(v_ >> kAreaShift) & (kMaxAreas - 1); }
  constexpr uint64_t index() const noexcept { return v_ >> kIndexShift; }
  friend constexpr bool operator==(Netmem, Netmem) = default;

 private:
  uint64_t v_ = 0;
};
static_assert(sizeof(Netmem) == 8);

/// A buffer's page_pool metadata (Linux struct net_iov; for a host page, the pp fields of
/// struct page), in its area's flat array. Written by the pool that owns the buffer and by
/// the area's owner; the atomics let other threads recycle and report.
struct NetmemMeta {
  enum State : uint8_t { kFree = 0, kInPool = 1, kOut = 2 };
  std::atomic<PagePool*> pp{nullptr};       // netmem_get_pp(): the owning pool, null when none
  uint64_t dma_addr = 0;                    // page_pool_get_dma_addr_netmem()
  std::atomic<int64_t> pp_ref_count{0};     // page_pool_fragment_netmem() / unref
  std::atomic<uint32_t> page_refs{0};       // host pages: page_ref_count() (struct page _refcount)
  uint32_t dma_index = 0;                   // the pool's list of mapped pages (PP_DMA_INDEX), 1-based
  uint32_t dma_flags = 0;                   // DmaSegFlags of the mapping, for unmap and sync
  std::atomic<uint8_t> state{kFree};        // debug: free (provider), in the pool's caches, out
  uint8_t order = 0;                        // host pages: the allocation order (head only)
};

struct NetIovAreaConfig {
  uint64_t count = 0;             // buffers (4 KiB granules) in the area
  PhysAddr base{};                // CPU physical address of buffer 0 (4 KiB aligned)
  ProviderId provider = kHostMemory;  // whose memory it is (kHostMemory: host RAM)
  bool net_iov = true;            // handles carry NET_IOV (false: host pages of the page allocator)
  std::string name{};             // for reports ("gpu 0000:03:00.0 BAR0")
};

/// Linux struct net_iov_area: a flat array of buffer metadata over `count` 4 KiB buffers
/// from `base`, registered in the global table (at most 65535 areas) and under its
/// provider. Thread-safe lookups; create and destroy are serialised internally.
class NetIovArea {
 public:
  static constexpr uint64_t kBufferSize = kPageSize;
  static constexpr uint64_t kMaxCount = uint64_t{1} << (64 - Netmem::kIndexShift);
  /// EINVAL: count 0 or above 2^47, base not 4 KiB aligned, a provider id of 16384 or more;
  /// ENOSPC: every area id is taken.
  static Result<std::unique_ptr<NetIovArea>> create(NetIovAreaConfig config);
  /// Unregisters the area: its handles decode to no area from then on. No thread may be
  /// using its metadata any more.
  ~NetIovArea();
  NetIovArea(const NetIovArea&) = delete;
  NetIovArea& operator=(const NetIovArea&) = delete;

  /// The area's id in the handles (1 .. 65535).
  uint32_t id() const noexcept { return id_; }
  /// Its configuration: buffers, where buffer 0 is, whose memory, handle kind, name.
  uint64_t count() const noexcept { return count_; }
  PhysAddr base() const noexcept { return base_; }
  ProviderId provider() const noexcept { return provider_; }
  bool net_iov() const noexcept { return net_iov_; }
  const std::string& name() const noexcept { return name_; }
  /// The handle of buffer i (i < count()).
  Netmem netmem(uint64_t i) const noexcept { return Netmem::make(net_iov_, id_, i); }
  /// Buffer i's metadata (i < count()).
  NetmemMeta& meta(uint64_t i) noexcept { return metas_[i]; }
  const NetmemMeta& meta(uint64_t i) const noexcept { return metas_[i]; }
  /// The CPU physical address of buffer i.
  PhysAddr phys(uint64_t i) const noexcept { return base_ + i * kBufferSize; }
  /// Set by the owner when its memory is being taken away (provider removal): pools
  /// release such buffers instead of recycling them.
  bool dead() const noexcept { return dead_.load(std::memory_order_acquire); }
  void set_dead() noexcept { dead_.store(true, std::memory_order_release); }

  /// The owner's private pointer (net_iov_area's owner), free for it to use.
  void* priv = nullptr;

 private:
  friend Result<Netmem> netmem_find(ProviderId provider, PhysAddr addr) noexcept;
  NetIovArea() = default;
  std::unique_ptr<NetmemMeta[]> metas_;
  uint64_t count_ = 0;
  PhysAddr base_;
  ProviderId provider_ = kHostMemory;
  uint32_t id_ = 0;
  bool net_iov_ = true;
  std::atomic<bool> dead_{false};
  std::string name_;
  std::atomic<NetIovArea*> next_of_provider_{nullptr};
};

namespace detail {
/// The global table of areas by id (null: no such area). Read without locks.
extern std::atomic<NetIovArea*> g_netmem_areas[Netmem::kMaxAreas];
}  // namespace detail

/// The area of a handle, or null when its area was destroyed (or it never was a handle).
/// O(1): one load from the global table.
inline NetIovArea* netmem_area(Netmem n) noexcept {
  return detail::g_netmem_areas[n.area_id()].load(std::memory_order_acquire);
}
/// The metadata of a live handle (its area exists and the index is in range: not checked).
/// O(1): the table, then the area's flat array.
inline NetmemMeta& netmem_meta(Netmem n) noexcept { return netmem_area(n)->meta(n.index()); }
/// The buffer's CPU physical address (a live handle).
inline PhysAddr netmem_phys(Netmem n) noexcept { return netmem_area(n)->phys(n.index()); }
/// The handle of the buffer holding `addr` among the provider's areas. ENOENT: none holds
/// it. Areas of the provider must not be destroyed meanwhile.
Result<Netmem> netmem_find(ProviderId provider, PhysAddr addr) noexcept;
/// "netmem 0x... (gpu BAR0 #12 at 0x4000000c000)": for messages.
std::string netmem_name(Netmem n);

}  // namespace physr::mem
