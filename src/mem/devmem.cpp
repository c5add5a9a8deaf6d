// A dma-buf bound to an RX queue or for TX (Linux net/core/devmem.c), a socket's tokens
// (net/core/sock.c sock_devmem_dontneed()) and a devmem send (net/ipv4/tcp.c
// tcp_sendmsg_locked(), net/core/datagram.c zerocopy_fill_skb_from_devmem()).
#include "physr/mem/devmem.hpp"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <functional>
#include <map>

namespace physr::mem {

struct DevmemBinding::Impl {
  mutable std::mutex mu;
  DmaDirection dir = DmaDirection::from_device;
  const DmaDevice* dev = nullptr;
  uint32_t id = 0;
  std::vector<NetIov> tx_vec;  // TX: the net_iov of every 4 KiB of the buffer, by offset
  std::shared_ptr<DmaBuf> buf;
  std::shared_ptr<DmaBufAttachment> att;
  DmaBufMapping mapping;
  struct Chunk {
    DevmemChunk c;
    std::vector<uint64_t> bits;  // set: allocated (genalloc's bitmap, one bit per 4 KiB)
    uint32_t avail = 0;
  };
  std::vector<Chunk> chunks;
  bool revoked = false;  // the buffer was revoked, or moved to a layout the binding cannot follow
  std::string why;
  bool unbound = false;
  DevmemStats st;
  std::function<void(const std::string&)> report;
  std::mutex revoke_mu;  // held while on_revoke runs, and to change it
  std::function<void()> on_revoke;

  bool allocated(NetIov n) const {
    return n.chunk < chunks.size() && n.index < chunks[n.chunk].c.num_niovs &&
           (chunks[n.chunk].bits[n.index >> 6] >> (n.index & 63) & 1);
  }
  bool tx() const { return dir == DmaDirection::to_device; }
  // A net_iov the NIC may use: allocated (RX), or any of the buffer's (TX: tx_vec).
  bool usable(NetIov n) const {
    return tx() ? n.chunk < chunks.size() && n.index < chunks[n.chunk].c.num_niovs : allocated(n);
  }
  std::string name(NetIov n) const { return "net_iov " + std::to_string(n.chunk) + ":" + std::to_string(n.index); }

  // Follows a move or revoke of the buffer (the attachment's move_notify), then tells the
  // on_revoke callback if the binding stopped.
  void invalidated() {
    if (!follow()) return;
    std::lock_guard g(revoke_mu);
    if (on_revoke) on_revoke();
  }
  // true: the binding stopped now.
  bool follow() {
    std::lock_guard lock(mu);
    const bool was = revoked;
    const bool now = follow_locked();
    return now && !was;
  }
  bool follow_locked() {
    if (unbound || !att) return revoked;  // unbinding, or still binding (bind() checks its mapping)
    mapping = DmaBufMapping{};  // already unmapped by the exporter
    if (buf->revoked()) {
      revoked = true;
      why = "the dma-buf was revoked";
      return true;
    }
    // Moved (or enabled again): remap and keep the chunks if the layout is the same.
    auto m = att->map(dir);
    if (!m) {
      revoked = true;
      why = "remap after a move failed: " + m.error().to_string();
      return true;
    }
    const auto segs = m->segments();
    bool same = segs.size() == chunks.size();
    for (size_t i = 0; same && i < segs.size(); ++i) same = segs[i].len == uint64_t{chunks[i].c.num_niovs} * kPageSize;
    if (!same) {
      (void)att->unmap(*m);
      revoked = true;
      why = "the dma-buf moved to a different segment layout";
      return true;
    }
    for (size_t i = 0; i < segs.size(); ++i) chunks[i].c.base_dma = segs[i].addr;
    mapping = std::move(m).value();
    if (revoked) revoked = false;  // enabled again after a revoke
    ++st.remaps;
    return false;
  }
};

namespace {
// Linux net_devmem_dmabuf_bindings: every live binding by id (XA_FLAGS_ALLOC1: ids from 1,
// handed out cyclically by xa_alloc_cyclic()).
std::mutex g_bindings_mu;
std::map<uint32_t, std::weak_ptr<DevmemBinding::Impl>> g_bindings;
uint32_t g_next_id = 1;

uint32_t register_binding(const std::shared_ptr<DevmemBinding::Impl>& b) {
  std::lock_guard g(g_bindings_mu);
  uint32_t id = g_next_id;
  while (id == 0 || g_bindings.count(id)) ++id;  // wraps past UINT32_MAX to 1
  g_next_id = id + 1;
  g_bindings.emplace(id, b);
  return id;
}
void unregister_binding(uint32_t id) {
  std::lock_guard g(g_bindings_mu);
  g_bindings.erase(id);
}
// net_devmem_lookup_dmabuf(): the binding with the id, if it is alive.
std::shared_ptr<DevmemBinding::Impl> lookup_binding(uint32_t id) {
  std::lock_guard g(g_bindings_mu);
  auto it = g_bindings.find(id);
  return it == g_bindings.end() ? nullptr : it->second.lock();
}
}  // namespace

DevmemBinding::DevmemBinding(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<DevmemBinding>> DevmemBinding::bind(std::shared_ptr<DmaBuf> buf, DmaDevice& nic) {
  return bind(std::move(buf), nic, DmaDirection::from_device);
}

Result<std::unique_ptr<DevmemBinding>> DevmemBinding::bind(std::shared_ptr<DmaBuf> buf, DmaDevice& nic, DmaDirection direction) {
  if (!buf) return make_error(EINVAL, "devmem bind: no dma-buf");
  // netdev_nl_bind_rx_doit() binds DMA_FROM_DEVICE, netdev_nl_bind_tx_doit() DMA_TO_DEVICE.
  if (direction != DmaDirection::from_device && direction != DmaDirection::to_device)
    return make_error(EINVAL, std::string("devmem bind: direction ") + dma_direction_name(direction) +
                                  " (a binding is for RX, from_device, or for TX, to_device)");
  // The state lives in a shared block so a move_notify racing with the unbind finds it
  // alive (or finds it gone, through the weak pointer).
  auto holder = std::make_shared<Impl>();
  std::weak_ptr<Impl> weak = holder;
  DmaBufAttachOptions o;
  o.allow_peer2peer = true;
  o.name = "devmem binding";
  o.move_notify = [weak](DmaBufAttachment&) {
    if (auto s = weak.lock()) s->invalidated();
  };
  // Linux net_devmem_bind_dmabuf(): dma_buf_attach(), then map in the binding's direction.
  PHYSR_ASSIGN_OR_RETURN_CTX(auto att, buf->attach(nic, std::move(o)), "devmem bind");
  PHYSR_ASSIGN_OR_RETURN_CTX(auto mapping, att->map(direction), "devmem bind");
  uint64_t virt = 0;
  std::vector<Impl::Chunk> chunks;
  std::vector<NetIov> tx_vec;
  for (const DmaSegment& s : mapping.segments()) {
    if (s.len % kPageSize || s.addr.value() % kPageSize) {
      (void)att->unmap(mapping);
      return make_error(EINVAL, "devmem bind: DMA segment " + format_hex(s.addr.value()) + " +" + format_hex(s.len) +
                                    " is not whole pages");
    }
    Impl::Chunk c;
    c.c = DevmemChunk{s.addr, virt, static_cast<uint32_t>(s.len / kPageSize)};
    c.bits.assign((c.c.num_niovs + 63) / 64, 0);
    c.avail = c.c.num_niovs;
    // TX: binding->tx_vec[owner->area.base_virtual / PAGE_SIZE + i] = niov.
    if (direction == DmaDirection::to_device)
      for (uint32_t i = 0; i < c.c.num_niovs; ++i) tx_vec.push_back(NetIov{static_cast<uint32_t>(chunks.size()), i});
    chunks.push_back(std::move(c));
    virt += s.len;
  }
  {
    std::lock_guard lock(holder->mu);
    holder->dir = direction;
    holder->dev = &nic;
    holder->tx_vec = std::move(tx_vec);
    holder->buf = std::move(buf);
    holder->att = std::move(att);
    holder->mapping = std::move(mapping);
    holder->chunks = std::move(chunks);
    holder->st.size = holder->st.avail = virt;
    // A move or revoke between the map and here found no attachment to remap.
    if (!holder->att->check(holder->mapping)) {
      holder->unbound = true;
      return make_error(ESTALE, "devmem bind: the dma-buf moved or was revoked while binding");
    }
  }
  holder->id = register_binding(holder);
  return std::unique_ptr<DevmemBinding>(new DevmemBinding(std::move(holder)));
}

DevmemBinding::~DevmemBinding() {
  Impl& m = *impl_;
  unregister_binding(m.id);
  std::shared_ptr<DmaBufAttachment> att;
  uint64_t held = 0;
  {
    std::lock_guard lock(m.mu);
    m.unbound = true;
    for (const auto& c : m.chunks) held += c.c.num_niovs - c.avail;
    att = std::move(m.att);
  }
  // Linux __net_devmem_dmabuf_binding_free(): WARN "can't destroy genpool" when
  // net_iovs are still out, then unmap and detach.
  if (held) {
    const std::string msg = "devmem binding: can't destroy the pool: " + std::to_string(held) + " net_iov(s) still allocated";
    if (m.report) m.report(msg);
    else std::fprintf(stderr, "physr: %s\n", msg.c_str());
  }
  if (att) {
    if (m.mapping.id()) (void)att->unmap(m.mapping);
    (void)att->detach();
  }
}

void DevmemBinding::on_revoke(std::function<void()> fn) {
  std::lock_guard g(impl_->revoke_mu);
  impl_->on_revoke = std::move(fn);
}

void DevmemBinding::on_report(std::function<void(const std::string&)> fn) {
  std::lock_guard lock(impl_->mu);
  impl_->report = std::move(fn);
}

namespace {
// gen_pool_alloc_owner() with gen_pool_first_fit: chunks newest first (gen_pool_add_owner()
// puts each at the head of the list), the first free bit of the first chunk with room.
bool genpool_alloc(DevmemBinding::Impl& m, NetIov& out) {
  for (size_t k = m.chunks.size(); k-- > 0;) {
    auto& c = m.chunks[k];
    if (!c.avail) continue;
    for (size_t w = 0; w < c.bits.size(); ++w) {
      const uint64_t free_bits = ~c.bits[w];
      if (!free_bits) continue;
      const unsigned b = static_cast<unsigned>(std::countr_zero(free_bits));
      const uint64_t idx = w * 64 + b;
      if (idx >= c.c.num_niovs) break;
      c.bits[w] |= uint64_t{1} << b;
      --c.avail;
      m.st.avail -= kPageSize;
      ++m.st.allocs;
      out = NetIov{static_cast<uint32_t>(k), static_cast<uint32_t>(idx)};
      return true;
    }
  }
  ++m.st.failed_allocs;
  return false;
}
}  // namespace

namespace {
Status not_for_tx(const DevmemBinding::Impl& m) {
  if (m.dir == DmaDirection::to_device) return make_error(EINVAL, "devmem alloc: a TX binding is bound to no RX queue");
  return {};
}
}  // namespace

Result<NetIov> DevmemBinding::alloc_netmem() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  PHYSR_RETURN_IF_ERROR(not_for_tx(m));
  if (m.revoked) return make_error(ENODEV, "devmem alloc: " + m.why);
  NetIov n;
  if (!genpool_alloc(m, n)) return make_error(ENOMEM, "devmem alloc: every net_iov of the binding is in use");
  return n;
}

Result<size_t> DevmemBinding::alloc_netmems(std::span<NetIov> out) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  PHYSR_RETURN_IF_ERROR(not_for_tx(m));
  if (m.revoked) return make_error(ENODEV, "devmem alloc: " + m.why);
  size_t n = 0;
  while (n < out.size() && genpool_alloc(m, out[n])) ++n;
  return n;
}

Status DevmemBinding::release_netmem(NetIov n) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  // Linux net_devmem_free_dmabuf(): WARN_ON(!gen_pool_has_addr()) and return; a granule
  // already free is genalloc's BUG_ON(remain) in gen_pool_free_owner().
  if (!m.allocated(n)) {
    ++m.st.bad_releases;
    const bool ours = n.chunk < m.chunks.size() && n.index < m.chunks[n.chunk].c.num_niovs;
    return make_error(EINVAL, "devmem release: " + m.name(n) + (ours ? " is not allocated (double release?)" : " is not in this binding"));
  }
  auto& c = m.chunks[n.chunk];
  c.bits[n.index >> 6] &= ~(uint64_t{1} << (n.index & 63));
  ++c.avail;
  m.st.avail += kPageSize;
  ++m.st.releases;
  return {};
}

Result<DmaAddr> DevmemBinding::dma_addr(NetIov n) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  if (m.revoked) return make_error(ENODEV, "devmem dma_addr of " + m.name(n) + ": " + m.why);
  if (!m.usable(n)) return make_error(EINVAL, "devmem dma_addr: " + m.name(n) + (m.tx() ? " is not in this binding" : " is not allocated"));
  // Linux net_devmem_get_dma_addr(): owner->base_dma_addr + (index << PAGE_SHIFT).
  return DmaAddr(m.chunks[n.chunk].c.base_dma.value() + (uint64_t{n.index} << kPageShift));
}

Result<uint64_t> DevmemBinding::offset(NetIov n) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  if (n.chunk >= m.chunks.size() || n.index >= m.chunks[n.chunk].c.num_niovs)
    return make_error(EINVAL, "devmem offset: " + m.name(n) + " is not in this binding");
  return m.chunks[n.chunk].c.base_virtual + (uint64_t{n.index} << kPageShift);
}

Result<PhysAddr> DevmemBinding::phys_addr(NetIov n) const {
  const Impl& m = *impl_;
  uint64_t off = 0;
  {
    std::lock_guard lock(m.mu);
    if (m.revoked) return make_error(ENODEV, "devmem phys_addr of " + m.name(n) + ": " + m.why);
    if (!m.usable(n)) return make_error(EINVAL, "devmem phys_addr: " + m.name(n) + (m.tx() ? " is not in this binding" : " is not allocated"));
    off = m.chunks[n.chunk].c.base_virtual + (uint64_t{n.index} << kPageShift);
  }
  const RangeList r = m.buf->ranges();
  for (const PhysRange x : r) {
    if (off < x.size) return PhysAddr(x.base.value() + off);
    off -= x.size;
  }
  return make_error(EINVAL, "devmem phys_addr: " + m.name(n) + " lies past the buffer");
}

// Linux net_devmem_get_niov_at(): NULL at or past dmabuf->size, else
// tx_vec[virt_addr / PAGE_SIZE] with *off = virt_addr % PAGE_SIZE, *size = PAGE_SIZE - *off.
Result<DevmemTxSlice> DevmemBinding::niov_at(uint64_t virt_addr) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  if (!m.tx()) return make_error(EINVAL, "devmem niov_at: an RX binding has no tx_vec");
  if (virt_addr >= m.st.size)
    return make_error(EFAULT, "devmem niov_at: offset " + format_hex(virt_addr) + " is past the dma-buf's " + format_hex(m.st.size) + " bytes");
  DevmemTxSlice s;
  s.niov = m.tx_vec[virt_addr >> kPageShift];
  s.offset = static_cast<uint32_t>(virt_addr % kPageSize);
  s.size = static_cast<uint32_t>(kPageSize - s.offset);
  return s;
}

DmaDirection DevmemBinding::direction() const noexcept { return impl_->dir; }
uint32_t DevmemBinding::id() const noexcept { return impl_->id; }
const DmaDevice& DevmemBinding::device() const noexcept { return *impl_->dev; }

bool DevmemBinding::revoked() const {
  std::lock_guard lock(impl_->mu);
  return impl_->revoked;
}
std::vector<DevmemChunk> DevmemBinding::chunks() const {
  std::lock_guard lock(impl_->mu);
  std::vector<DevmemChunk> out;
  for (const auto& c : impl_->chunks) out.push_back(c.c);
  return out;
}
DevmemStats DevmemBinding::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->st;
}
const DmaBufAttachment& DevmemBinding::attachment() const noexcept { return *impl_->att; }

// ---------------------------------------------------------------------------------------
// Transmit

Result<std::vector<DevmemTxFrag>> DevmemTxSocket::sendmsg(const DevmemMsg& msg) const {
  uint64_t size = 0;
  for (const DevmemIov& v : msg.iov) size += v.len;
  if (!msg.dmabuf_id)
    return make_error(EINVAL, "devmem sendmsg: no SCM_DEVMEM_DMABUF (a send from user memory is not modelled)");
  // tcp_sendmsg_locked(): a dmabuf id without MSG_ZEROCOPY or without SO_ZEROCOPY is EINVAL.
  if (!msg.msg_zerocopy || !zerocopy_)
    return make_error(EINVAL, std::string("devmem sendmsg: SCM_DEVMEM_DMABUF needs ") + (msg.msg_zerocopy ? "SO_ZEROCOPY on the socket" : "MSG_ZEROCOPY"));
  std::vector<DevmemTxFrag> frags;
  if (!size) return frags;  // (flags & MSG_ZEROCOPY) && size: nothing to send, no binding looked up
  // net_devmem_get_binding(): no binding with the id, or one without tx_vec, EINVAL; a
  // binding for another device than the route's (dst_dev != binding->dev) ENODEV.
  const std::shared_ptr<DevmemBinding::Impl> b = lookup_binding(msg.dmabuf_id);
  if (!b) return make_error(EINVAL, "devmem sendmsg: no dma-buf binding " + std::to_string(msg.dmabuf_id));
  std::lock_guard lock(b->mu);
  if (!b->tx()) return make_error(EINVAL, "devmem sendmsg: binding " + std::to_string(msg.dmabuf_id) + " is an RX binding");
  if (b->dev != dev_) return make_error(ENODEV, "devmem sendmsg: binding " + std::to_string(msg.dmabuf_id) + " is for another device than the socket's route");
  if (b->revoked) return make_error(ENODEV, "devmem sendmsg: binding " + std::to_string(msg.dmabuf_id) + ": " + b->why);
  // zerocopy_fill_skb_from_devmem(): net_devmem_get_niov_at() NULL (an address at or past
  // the buffer's size) is EFAULT. physr checks every iovec first and sends nothing then.
  for (const DevmemIov& v : msg.iov)
    if (v.len && (v.offset >= b->st.size || v.len > b->st.size - v.offset))
      return make_error(EFAULT, "devmem sendmsg: iovec " + format_hex(v.offset) + " +" + format_hex(v.len) + " reaches past the dma-buf's " +
                                    format_hex(b->st.size) + " bytes");
  // Each frag: size = min(PAGE_SIZE - off, length, iov_len); skb_add_rx_frag_netmem() at
  // off in the net_iov; the NIC reads it at the net_iov's DMA address + off.
  for (const DevmemIov& v : msg.iov) {
    for (uint64_t at = v.offset, left = v.len; left;) {
      const NetIov n = b->tx_vec[at >> kPageShift];
      const uint32_t off = static_cast<uint32_t>(at % kPageSize);
      const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(kPageSize - off, left));
      const DmaAddr dma(b->chunks[n.chunk].c.base_dma.value() + (uint64_t{n.index} << kPageShift) + off);
      frags.push_back(DevmemTxFrag{n, off, len, dma});
      at += len;
      left -= len;
    }
  }
  return frags;
}

// ---------------------------------------------------------------------------------------
// Tokens

DevmemSocket::DevmemSocket(DevmemBinding& binding) : binding_(&binding) {}
DevmemSocket::DevmemSocket(std::function<Status(NetIov)> release) : release_(std::move(release)) {}

Status DevmemSocket::give_back(NetIov niov) { return release_ ? release_(niov) : binding_->release_netmem(niov); }

DevmemSocket::~DevmemSocket() {
  std::lock_guard lock(mu_);
  for (size_t t = 0; t < frags_.size(); ++t)
    if (used_[t]) (void)give_back(frags_[t]);
}

uint32_t DevmemSocket::deliver(NetIov niov) {
  std::lock_guard lock(mu_);
  uint32_t t;
  // xa_alloc(): the smallest free index.
  if (!free_.empty()) {
    std::pop_heap(free_.begin(), free_.end(), std::greater<>());
    t = free_.back();
    free_.pop_back();
  } else {
    t = static_cast<uint32_t>(frags_.size());
    frags_.emplace_back();
    used_.push_back(0);
  }
  frags_[t] = niov;
  used_[t] = 1;
  ++outstanding_;
  return t;
}

Result<unsigned> DevmemSocket::dontneed(std::span<const DmabufToken> tokens) {
  // Linux sock_devmem_dontneed(): optlen beyond MAX_DONTNEED_TOKENS tokens is EINVAL.
  if (tokens.size() > kMaxDontneedTokens)
    return make_error(EINVAL, "SO_DEVMEM_DONTNEED: " + std::to_string(tokens.size()) + " tokens, at most " +
                                  std::to_string(kMaxDontneedTokens) + " (MAX_DONTNEED_TOKENS)");
  std::vector<NetIov> give;
  {
    std::lock_guard lock(mu_);
    // Linux sock_devmem_dontneed_autorelease(): every frag looked at counts against
    // MAX_DONTNEED_FRAGS (the loop stops there, returning what it freed); a token not in
    // the xarray is skipped.
    size_t looked = 0;
    for (const DmabufToken& tk : tokens) {
      for (uint32_t j = 0; j < tk.token_count; ++j) {
        if (++looked > kMaxDontneedFrags) goto limit;
        const uint64_t t = uint64_t{tk.token_start} + j;
        if (t >= frags_.size() || !used_[t]) continue;
        used_[t] = 0;
        give.push_back(frags_[t]);
        free_.push_back(static_cast<uint32_t>(t));
        std::push_heap(free_.begin(), free_.end(), std::greater<>());
        --outstanding_;
      }
    }
  limit:;
  }
  // napi_pp_put_page() outside the xarray lock, as the kernel batches them.
  unsigned n = 0;
  for (const NetIov& v : give) {
    const Status s = give_back(v);
    PHYSR_ASSERT(s.has_value(), "devmem: a token's net_iov was not allocated");
    (void)s;
    ++n;
  }
  return n;
}

size_t DevmemSocket::outstanding() const {
  std::lock_guard lock(mu_);
  return outstanding_;
}

}  // namespace physr::mem
