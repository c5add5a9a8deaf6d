// physr mem devmem: a dma-buf bound to a NIC (Linux net/core/devmem.c, devmem TCP). Bound
// to an RX queue, the buffer's DMA mapping for the NIC is cut into 4 KiB net_iovs, handed to
// the page pool through alloc/release functions shaped like memory_provider_ops, and given
// back by the socket's user with tokens (SO_DEVMEM_DONTNEED, net/core/sock.c
// sock_devmem_dontneed()). Bound for TX, the same net_iovs are found by their offset in the
// buffer (tx_vec) and a socket sends from them (sendmsg with SCM_DEVMEM_DMABUF).
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
// - A TX binding (direction to_device: netdev_nl_bind_tx_doit()) maps the buffer TO_DEVICE
//   and keeps tx_vec, the net_iov of every 4 KiB of the buffer by offset
//   (net_devmem_get_niov_at()); nothing is allocated from it. DevmemTxSocket::sendmsg() is
//   tcp_sendmsg_locked()'s devmem path: the binding found by its id (the dma-buf id of the
//   SCM_DEVMEM_DMABUF cmsg), each iovec's base an offset in the buffer, cut into frags at
//   4 KiB boundaries (zerocopy_fill_skb_from_devmem()).
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

/// Where a net_iov of a TX binding is (Linux net_devmem_get_niov_at()): the net_iov holding
/// the byte, the byte's offset in it and the bytes left in it from there.
struct DevmemTxSlice {
  NetIov niov;
  uint32_t offset = 0;  // *off: virt_addr % PAGE_SIZE
  uint32_t size = 0;    // *size: PAGE_SIZE - *off
};

/// A dma-buf bound to a NIC: to an RX queue (direction from_device) or for TX (to_device).
/// Thread-safe.
class DevmemBinding {
 public:
  /// Linux net_devmem_bind_dmabuf() for RX (netdev_nl_bind_rx_doit()): bind(buf, nic,
  /// DmaDirection::from_device).
  static Result<std::unique_ptr<DevmemBinding>> bind(std::shared_ptr<DmaBuf> buf, DmaDevice& nic);
  /// Linux net_devmem_bind_dmabuf(dev, dma_dev, direction, ...): attaches `nic` (which must
  /// outlive the binding) to the buffer as a dynamic importer with peer2peer, maps it in
  /// `direction` and makes one chunk per DMA segment; to_device (netdev_nl_bind_tx_doit())
  /// also fills tx_vec. EINVAL: a direction other than from_device (RX) or to_device (TX),
  /// or a segment that is not a whole number of pages; errors of attach and map
  /// (EOPNOTSUPP, ENODEV, EREMOTEIO, ...).
  static Result<std::unique_ptr<DevmemBinding>> bind(std::shared_ptr<DmaBuf> buf, DmaDevice& nic, DmaDirection direction);
  /// Linux __net_devmem_dmabuf_binding_free(): unmaps and detaches. net_iovs still
  /// allocated are reported ("can't destroy genpool", to `report` or stderr).
  ~DevmemBinding();
  DevmemBinding(const DevmemBinding&) = delete;
  DevmemBinding& operator=(const DevmemBinding&) = delete;

  /// Linux net_devmem_alloc_dmabuf() (mp_dmabuf_devmem_alloc_netmems()): one free net_iov.
  /// ENOMEM: none free (the kernel returns NULL); ENODEV: the buffer was revoked; EINVAL: a
  /// TX binding (no RX queue allocates from it).
  Result<NetIov> alloc_netmem();
  /// Up to out.size() net_iovs (the page pool's bulk refill); returns how many. ENODEV:
  /// revoked; EINVAL: a TX binding.
  Result<size_t> alloc_netmems(std::span<NetIov> out);
  /// Linux net_devmem_free_dmabuf() (mp_dmabuf_devmem_release_page()): back in the pool,
  /// also after a revoke. EINVAL: not a net_iov of this binding, or not allocated (the
  /// kernel's WARN on !gen_pool_has_addr, and genalloc's BUG_ON of a double free); nothing
  /// changes then.
  Status release_netmem(NetIov niov);
  /// Linux net_devmem_get_dma_addr(): chunk base + index * 4 KiB, as the NIC uses it.
  /// ENODEV: revoked; EINVAL: not allocated (of a TX binding: not in it).
  Result<DmaAddr> dma_addr(NetIov niov) const;
  /// Linux net_devmem_get_niov_at(): the net_iov of a TX binding holding byte `virt_addr`
  /// of the buffer (tx_vec[virt_addr / PAGE_SIZE]). EFAULT: `virt_addr` is at or past the
  /// buffer's size (the kernel's NULL, which sendmsg turns into EFAULT); EINVAL: an RX
  /// binding (it has no tx_vec).
  Result<DevmemTxSlice> niov_at(uint64_t virt_addr) const;
  /// The direction the buffer is mapped in: from_device (RX) or to_device (TX).
  DmaDirection direction() const noexcept;
  /// The binding's id (Linux binding->id, xa_alloc_cyclic() from 1 in
  /// net_devmem_dmabuf_bindings): what SCM_DEVMEM_DMABUF names. Unique among live bindings.
  uint32_t id() const noexcept;
  /// The NIC the binding maps the buffer for.
  const DmaDevice& device() const noexcept;
  /// Offset of the net_iov in the buffer (base_virtual + index * 4 KiB, what devmem's cmsg
  /// reports as frag_offset). EINVAL: not a net_iov of this binding.
  Result<uint64_t> offset(NetIov niov) const;
  /// The CPU physical address of the net_iov's bytes (the buffer's range at its offset).
  /// ENODEV: revoked; EINVAL: not allocated (of a TX binding: not in it).
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

/// One iovec of a devmem send: with SCM_DEVMEM_DMABUF, iov_base is an offset in the dma-buf.
struct DevmemIov {
  uint64_t offset = 0;
  uint64_t len = 0;
};
/// One frag of the skb a devmem send builds (skb_add_rx_frag_netmem()): `len` bytes at
/// `offset` in the net_iov, which the NIC reads at `dma` (the net_iov's DMA address +
/// offset).
struct DevmemTxFrag {
  NetIov niov;
  uint32_t offset = 0, len = 0;
  DmaAddr dma;
};
/// A devmem sendmsg(): the iovecs, MSG_ZEROCOPY, and the dmabuf id of an SCM_DEVMEM_DMABUF
/// cmsg (0: no such cmsg, as sockcm_cookie's dmabuf_id).
struct DevmemMsg {
  std::span<const DevmemIov> iov;
  bool msg_zerocopy = false;
  uint32_t dmabuf_id = 0;
};

/// The sending side of a TCP socket with devmem TX (net/ipv4/tcp.c tcp_sendmsg_locked()).
/// Thread-safe; the bindings it sends from must live while their frags are in flight.
class DevmemTxSocket {
 public:
  /// A socket whose route goes out through `dev` (the dst's net_device), which must
  /// outlive it; SO_ZEROCOPY off.
  explicit DevmemTxSocket(const DmaDevice& dev) : dev_(&dev) {}
  /// setsockopt(SO_ZEROCOPY).
  void set_zerocopy(bool on) noexcept { zerocopy_ = on; }
  /// tcp_sendmsg_locked() with an SCM_DEVMEM_DMABUF cmsg: EINVAL when the message names a
  /// dma-buf without MSG_ZEROCOPY or without SO_ZEROCOPY, and (net_devmem_get_binding())
  /// when no live binding has the id or it is not a TX binding; ENODEV when the binding is
  /// for another device than the socket's route, or (physr) revoked; EFAULT
  /// (zerocopy_fill_skb_from_devmem()) when an iovec reaches past the buffer. The frags, cut
  /// at every 4 KiB boundary of the buffer, in order. Deliberate differences: without a
  /// dmabuf id it is EINVAL (a plain send copies from user memory, which is not modelled),
  /// and an EFAULT sends nothing (Linux keeps the skbs it filled before the bad iovec and
  /// returns their bytes); the MAX_SKB_FRAGS cut of skbs is not modelled.
  Result<std::vector<DevmemTxFrag>> sendmsg(const DevmemMsg& msg) const;

 private:
  const DmaDevice* dev_;
  bool zerocopy_ = false;
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
