// physr mem devmem: a dma-buf bound to an RX queue (Linux net/core/devmem.c, devmem TCP):
// the buffer's DMA mapping for the NIC cut into 4 KiB net_iovs, handed to the page pool
// through alloc/release functions shaped like memory_provider_ops, and given back by the
// socket's user with tokens (SO_DEVMEM_DONTNEED, net/core/sock.c sock_devmem_dontneed()).
//
// Design rationale
// - bind() is net_devmem_bind_dmabuf(): attach (a dynamic importer that allows peer2peer),
//   map FROM_DEVICE, and one chunk per DMA segment (dmabuf_genpool_chunk_owner: its base
//   DMA address, its offset in the buffer and its net_iovs). Allocation is genalloc's:
//   chunks newest first (gen_pool_add_owner() adds at the head), first fit inside a chunk,
//   one bit per 4 KiB net_iov; a mutex stands in for genalloc's cmpxchg on the bitmap.
// - A NetIov names (chunk, index); its DMA address is computed when asked, from the
//   chunk's base (net_devmem_get_dma_addr()), so a remap after a move gives the new
//   address. After a revoke every lookup is ENODEV: nothing can use a stale address.
// - DevmemSocket is the socket's sk_user_frags: frags delivered to the user get tokens;
//   dontneed() gives them back with Linux's limits and its quiet skipping of tokens the
//   socket does not hold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/mem/dmabuf.hpp"

namespace physr::mem {

/// One 4 KiB buffer of a binding (Linux struct net_iov): chunk and index in the chunk.
struct NetIov {
  uint32_t chunk = 0;
  uint32_t index = 0;
  friend bool operator==(const NetIov&, const NetIov&) = default;
};

/// One chunk (Linux struct dmabuf_genpool_chunk_owner): a DMA segment of the mapping.
struct DevmemChunk {
  DmaAddr base_dma;           // owner->base_dma_addr
  uint64_t base_virtual = 0;  // owner->area.base_virtual: offset of the chunk in the buffer
  uint32_t num_niovs = 0;     // owner->area.num_niovs
};

struct DevmemStats {
  uint64_t size = 0, avail = 0;     // bytes in the pool / free (gen_pool_size, gen_pool_avail)
  uint64_t allocs = 0, failed_allocs = 0, releases = 0, bad_releases = 0;
  uint64_t remaps = 0;              // moves of the buffer the binding followed
};

/// A dma-buf bound to a NIC's RX queue. Thread-safe.
class DevmemBinding {
 public:
  /// Linux net_devmem_bind_dmabuf(): attaches `nic` (which must outlive the binding) to the
  /// buffer as a dynamic importer with peer2peer, maps it FROM_DEVICE and makes one chunk
  /// per DMA segment. Errors of attach and map (EOPNOTSUPP, ENODEV, EREMOTEIO, ...); EINVAL
  /// for a segment that is not a whole number of pages.
  static Result<std::unique_ptr<DevmemBinding>> bind(std::shared_ptr<DmaBuf> buf, DmaDevice& nic);
  /// Linux __net_devmem_dmabuf_binding_free(): unmaps and detaches. net_iovs still
  /// allocated are reported ("can't destroy genpool", to `report` or stderr).
  ~DevmemBinding();
  DevmemBinding(const DevmemBinding&) = delete;
  DevmemBinding& operator=(const DevmemBinding&) = delete;

  /// Linux net_devmem_alloc_dmabuf() (mp_dmabuf_devmem_alloc_netmems()): one free net_iov.
  /// ENOMEM: none free (the kernel returns NULL); ENODEV: the buffer was revoked.
  Result<NetIov> alloc_netmem();
  /// Up to out.size() net_iovs (the page pool's bulk refill); returns how many. ENODEV: revoked.
  Result<size_t> alloc_netmems(std::span<NetIov> out);
  /// Linux net_devmem_free_dmabuf() (mp_dmabuf_devmem_release_page()): back in the pool,
  /// also after a revoke. EINVAL: not a net_iov of this binding, or not allocated (the
  /// kernel's WARN on !gen_pool_has_addr, and genalloc's BUG_ON of a double free); nothing
  /// changes then.
  Status release_netmem(NetIov niov);
  /// Linux net_devmem_get_dma_addr(): chunk base + index * 4 KiB, as the NIC uses it.
  /// ENODEV: revoked; EINVAL: not allocated.
  Result<DmaAddr> dma_addr(NetIov niov) const;
  /// Offset of the net_iov in the buffer (base_virtual + index * 4 KiB, what devmem's cmsg
  /// reports as frag_offset). EINVAL: not a net_iov of this binding.
  Result<uint64_t> offset(NetIov niov) const;
  /// The CPU physical address of the net_iov's bytes (the buffer's range at its offset).
  /// ENODEV: revoked; EINVAL: not allocated.
  Result<PhysAddr> phys_addr(NetIov niov) const;

  /// The binding stopped: the buffer was revoked or moved to a layout it cannot follow.
  bool revoked() const;
  /// The chunks, in mapping order (a copy: a move updates their DMA addresses).
  std::vector<DevmemChunk> chunks() const;
  /// Pool size and free bytes, allocations, releases and remaps so far.
  DevmemStats stats() const;
  /// The binding's attachment to the buffer (valid while the binding lives).
  const DmaBufAttachment& attachment() const noexcept;
  /// Where the destructor's report of net_iovs still allocated goes; null: stderr.
  void on_report(std::function<void(const std::string&)> fn);
  /// Called (on the revoking thread, without the binding's lock) when the binding stops:
  /// the buffer was revoked or moved to a layout it cannot follow. One callback; null
  /// clears it, and returns once a call in progress is over.
  void on_revoke(std::function<void()> fn);

  struct Impl;

 private:
  explicit DevmemBinding(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;  // shared with the attachment's move_notify (a weak reference)
};

/// Linux struct dmabuf_token: tokens [token_start, token_start + token_count).
struct DmabufToken {
  uint32_t token_start = 0;
  uint32_t token_count = 0;
};
/// Linux MAX_DONTNEED_TOKENS and MAX_DONTNEED_FRAGS (net/core/sock.c).
inline constexpr size_t kMaxDontneedTokens = 128;
inline constexpr size_t kMaxDontneedFrags = 1024;

/// A socket's frags held by its user (Linux sk->sk_user_frags, an xarray of tokens).
/// Thread-safe. The binding must outlive it.
class DevmemSocket {
 public:
  /// A socket receiving into `binding`, with no frags held.
  explicit DevmemSocket(DevmemBinding& binding);
  /// A socket whose frags go back through `release` (to the page pool that handed them
  /// out, as napi_pp_put_page() in sock_devmem_dontneed()) rather than to the binding.
  explicit DevmemSocket(std::function<Status(NetIov)> release);
  /// Gives what the user still holds back to the binding (the socket's destruction).
  ~DevmemSocket();
  DevmemSocket(const DevmemSocket&) = delete;
  DevmemSocket& operator=(const DevmemSocket&) = delete;

  /// tcp_recvmsg_dmabuf(): a received frag handed to the user, under a new token (the
  /// smallest free one: xa_alloc). The socket now holds the net_iov's reference.
  uint32_t deliver(NetIov niov);
  /// Linux sock_devmem_dontneed(): more than 128 tokens is EINVAL (and nothing is freed).
  /// Otherwise every token of every range is looked at in order until 1024 frags have been
  /// looked at (then it stops; no error); a token the socket does not hold is skipped. Each
  /// token held goes back to the binding. Returns how many were given back.
  Result<unsigned> dontneed(std::span<const DmabufToken> tokens);
  /// Tokens the user holds.
  size_t outstanding() const;

 private:
  Status give_back(NetIov niov);
  DevmemBinding* binding_ = nullptr;
  std::function<Status(NetIov)> release_;
  mutable std::mutex mu_;           // xa_lock_bh(&sk->sk_user_frags)
  std::vector<NetIov> frags_;       // by token
  std::vector<uint8_t> used_;       // by token
  std::vector<uint32_t> free_;      // free tokens below frags_.size(), a min-heap
  size_t outstanding_ = 0;
};

}  // namespace physr::mem
