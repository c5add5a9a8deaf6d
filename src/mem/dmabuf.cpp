// dma-buf export and import (Linux drivers/dma-buf/dma-buf.c, dma-buf-mapping.c and
// drivers/vfio/pci/vfio_pci_dmabuf.c). One mutex per buffer stands in for its dma_resv: it
// guards the ranges, the attachments and every mapping; the DMA layer is called under it.
#include "physr/mem/dmabuf.hpp"

#include <algorithm>
#include <list>
#include <mutex>

#include "physr/provider.hpp"

namespace physr::mem {

namespace {

// The record of one live mapping: what unmap needs for its path.
struct MapRecord {
  uint64_t id = 0;
  DmaDirection dir = DmaDirection::none;
  DmaBufPath path = DmaBufPath::host;
  DmaMapping list;                    // host: DmaDevice::map()
  DmaIovaState iova;                  // iova: the two-step API
  uint64_t mapped_len = 0;
  std::vector<DmaSegment> phys_segs;  // phys: one dma_map_phys() per range
};

// Linux fill_sg_entry(): a range's DMA addresses as entries of at most MAX_SG_ENT_SZ.
void fill_sg_entry(std::vector<DmaSegment>& out, DmaAddr addr, uint64_t len, DmaSegFlags flags) {
  while (len) {
    const uint64_t n = std::min(len, kDmaBufMaxSegment);
    out.push_back(DmaSegment{addr, n, flags});
    addr = DmaAddr(addr.value() + n);
    len -= n;
  }
}

bool page_aligned(uint64_t v) { return (v & (kPageSize - 1)) == 0; }

}  // namespace

const char* dmabuf_path_name(DmaBufPath p) noexcept {
  switch (p) {
    case DmaBufPath::bus_addr: return "bus_addr";
    case DmaBufPath::iova: return "iova";
    case DmaBufPath::phys: return "phys";
    case DmaBufPath::host: return "host";
  }
  return "?";
}

struct DmaBuf::Impl {
  Platform* platform = nullptr;
  mutable std::mutex mu;  // the dma_resv lock
  RangeList ranges;
  uint64_t size = 0;
  ProviderId provider = kHostMemory;  // one P2P provider, kHostMemory, or kInvalidProvider: mixed
  bool has_p2p = false;
  bool revoked = false;
  uint64_t generation = 1;  // bumped by every move and revoke
  uint64_t next_id = 1;
  std::list<std::weak_ptr<DmaBufAttachment>> attachments;
  DmaBufStats stats;
};

struct DmaBufAttachment::Impl {
  std::shared_ptr<DmaBuf> buf;
  DmaDevice* dev = nullptr;
  DmaBufAttachOptions opt;
  bool attached = true;
  bool peer2peer = false;
  std::list<std::weak_ptr<DmaBufAttachment>>::iterator node;
  std::vector<std::unique_ptr<MapRecord>> maps;
  uint64_t leaked = 0;

  std::string who() const {
    return opt.name ? std::string(opt.name) : "function " + std::to_string(dev->config().function);
  }
};

namespace {

// Undoes one record (its DMA-layer resources). Errors here are bugs of the bookkeeping.
void undo(DmaDevice& dev, MapRecord& r) {
  switch (r.path) {
    case DmaBufPath::bus_addr: break;
    case DmaBufPath::iova: {
      // Linux dma_buf_free_sgt(): dma_iova_destroy() of the whole size.
      const Status s = dev.iova_destroy(r.iova, r.mapped_len, r.dir);
      PHYSR_ASSERT(s.has_value(), "dma-buf: iova_destroy of a live mapping failed");
      (void)s;
      break;
    }
    case DmaBufPath::phys:
      for (const DmaSegment& seg : r.phys_segs) {
        const Status s = dev.unmap_phys(seg, r.dir);
        PHYSR_ASSERT(s.has_value(), "dma-buf: unmap_phys of a live mapping failed");
        (void)s;
      }
      break;
    case DmaBufPath::host: {
      const Status s = dev.unmap(r.list);
      PHYSR_ASSERT(s.has_value(), "dma-buf: unmap of a live mapping failed");
      (void)s;
      break;
    }
  }
}

}  // namespace

DmaBuf::DmaBuf(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DmaBuf::~DmaBuf() = default;  // every attachment holds a reference: none is left here

namespace {

// Checks a list's ranges against the registry and classifies the providers.
Status classify(const Platform& platform, const RangeList& ranges, DmaBuf::Impl& m) {
  if (ranges.empty()) return make_error(EINVAL, "dma-buf export: no ranges");
  const ProviderRegistry& reg = platform.providers();
  ProviderRegistry::ReadGuard guard;
  bool first = true;
  for (const PhysRange r : ranges) {
    if (!page_aligned(r.base.value()) || !page_aligned(r.size))
      return make_error(EINVAL, "dma-buf export: range " + format_hex(r.base.value()) + " +" + format_hex(r.size) +
                                    " is not page-aligned");
    ProviderId id = kHostMemory;
    if (r.provider != kHostMemory) {
      const Provider* p = r.provider == kIndirectProvider ? reg.find(r.base) : reg.get(r.provider);
      if (!p || !p->phys().contains(r.span()))
        return make_error(EINVAL, "dma-buf export: range " + format_hex(r.base.value()) + " +" + format_hex(r.size) +
                                      " lies outside provider " + std::to_string(r.provider));
      if (p->revoked())
        return make_error(ENODEV, "dma-buf export: provider " + std::to_string(p->id()) + " is revoked");
      id = p->id();
      m.has_p2p = true;
    }
    if (first) m.provider = id;
    else if (m.provider != id) m.provider = kInvalidProvider;
    first = false;
  }
  m.ranges = ranges;
  m.size = ranges.total_bytes();
  return {};
}
}  // namespace

Result<std::shared_ptr<DmaBuf>> DmaBuf::export_ranges(Platform& platform, const RangeList& ranges) {
  auto m = std::make_unique<Impl>();
  m->platform = &platform;
  PHYSR_RETURN_IF_ERROR(classify(platform, ranges, *m));
  return std::shared_ptr<DmaBuf>(new DmaBuf(std::move(m)));
}

Result<std::shared_ptr<DmaBuf>> DmaBuf::export_chunk(Platform& platform, const P2PChunk& chunk) {
  if (chunk.provider == kHostMemory) return make_error(EINVAL, "dma-buf export of a P2P chunk: provider 0 is host memory");
  RangeList l;
  PHYSR_RETURN_IF_ERROR_CTX(l.append(PhysRange{chunk.span.base, chunk.span.size, chunk.provider}), "dma-buf export of a P2P chunk");
  return export_ranges(platform, l);
}

Result<std::shared_ptr<DmaBuf>> DmaBuf::export_bar(Platform& platform, uint32_t function, unsigned bar,
                                                   std::span<const DmaBufBarRange> ranges) {
  // Linux vfio_pci_core_feature_dma_buf(): no ranges is EINVAL, then the region index.
  if (ranges.empty()) return make_error(EINVAL, "dma-buf export of a BAR: no ranges");
  constexpr unsigned kRomRegionIndex = 6;  // VFIO_PCI_ROM_REGION_INDEX
  if (bar >= kRomRegionIndex) return make_error(ENODEV, "dma-buf export of a BAR: region " + std::to_string(bar) + " is not a BAR");
  // Linux validate_dmabuf_input(): every length non-zero, offsets and lengths page-aligned,
  // the total neither overflowing nor reaching DMA_IOVA_USE_SWIOTLB (bit 63).
  uint64_t total = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const DmaBufBarRange& r = ranges[i];
    if (!r.length || !page_aligned(r.offset) || !page_aligned(r.length))
      return make_error(EINVAL, "dma-buf export of a BAR: range " + std::to_string(i) + " (offset " + format_hex(r.offset) +
                                    ", length " + format_hex(r.length) + ") is empty or not page-aligned");
    if (__builtin_add_overflow(total, r.length, &total))
      return make_error(EINVAL, "dma-buf export of a BAR: the lengths overflow");
  }
  if (total >> 63) return make_error(EINVAL, "dma-buf export of a BAR: " + format_hex(total) + " bytes is too large");
  const pci::Topology& topo = platform.topology();
  if (function >= topo.functions.size()) return make_error(EINVAL, "dma-buf export of a BAR: no function " + std::to_string(function));
  // Linux pcim_p2pdma_provider(): a provider per memory BAR, or NULL (EINVAL).
  const Aperture* ap = nullptr;
  for (const Aperture& a : platform.apertures())
    if (a.function == function && a.bar == bar) ap = &a;
  if (!ap) {
    const auto& bars = topo.functions[function].bars;
    const auto b = std::find_if(bars.begin(), bars.end(), [&](const pci::Bar& x) { return x.index == bar; });
    if (b == bars.end() || !b->is_mem())
      return make_error(EINVAL, "dma-buf export of a BAR: " + platform.label(function) + " BAR" + std::to_string(bar) +
                                    " has no P2P provider (not a memory BAR)");
    PHYSR_ASSIGN_OR_RETURN_CTX(ap, platform.add_bar(function, bar, /*published=*/false), "dma-buf export of a BAR");
  }
  // Linux vfio_pci_core_fill_phys_vec(): start + offset and + length must not overflow
  // (EOVERFLOW) and must end inside the BAR (EINVAL).
  const uint64_t start = ap->span.base.value(), max_addr = start + ap->span.size;
  RangeList l;
  l.reserve(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) {
    uint64_t paddr = 0, end = 0;
    if (__builtin_add_overflow(start, ranges[i].offset, &paddr) || __builtin_add_overflow(paddr, ranges[i].length, &end))
      return make_error(EOVERFLOW, "dma-buf export of a BAR: range " + std::to_string(i) + " overflows the address space");
    if (end > max_addr)
      return make_error(EINVAL, "dma-buf export of a BAR: range " + std::to_string(i) + " ends at offset " +
                                    format_hex(end - start) + ", past the BAR's " + format_hex(ap->span.size) + " bytes");
    // The phys_vec entries stay as given: no merging of adjacent ranges.
    PHYSR_RETURN_IF_ERROR_CTX(l.append(PhysRange{PhysAddr(paddr), ranges[i].length, ap->id}, SegmentLimits{.merge = false}),
                              "dma-buf export of a BAR");
  }
  return export_ranges(platform, l);
}

Result<std::shared_ptr<DmaBufAttachment>> DmaBuf::attach(DmaDevice& device, DmaBufAttachOptions options) {
  Impl& m = *impl_;
  auto a = std::make_unique<DmaBufAttachment::Impl>();
  a->dev = &device;
  // Linux dma_buf_dynamic_attach(): peer2peer only from a dynamic importer's ops.
  a->peer2peer = options.move_notify && options.allow_peer2peer;
  a->opt = std::move(options);
  std::lock_guard lock(m.mu);
  // Linux vfio_pci_dma_buf_attach(): no peer2peer is EOPNOTSUPP, a revoked buffer ENODEV.
  if (m.has_p2p && !a->peer2peer)
    return make_error(EOPNOTSUPP, "dma-buf attach of " + a->who() + ": the buffer is P2P memory and the importer did not set allow_peer2peer" +
                                      (a->opt.move_notify ? "" : " (a static importer never can)"));
  if (m.revoked) return make_error(ENODEV, "dma-buf attach of " + a->who() + ": the buffer is revoked");
  a->buf = shared_from_this();
  auto* raw = a.get();
  std::shared_ptr<DmaBufAttachment> att(new DmaBufAttachment(std::move(a)));
  m.attachments.push_back(att);
  raw->node = std::prev(m.attachments.end());
  ++m.stats.attachments;
  return att;
}

namespace {
// Unmaps and drops every live mapping of every attachment and bumps the generation. Under
// the lock. `keep` receives a reference to each attachment: the caller drops them after
// unlocking (a last reference dropped here would detach under our own lock) and notifies
// the dynamic ones.
void invalidate_locked(DmaBuf::Impl& m, std::vector<std::shared_ptr<DmaBufAttachment>>& keep,
                       const std::function<DmaBufAttachment::Impl&(DmaBufAttachment&)>& impl_of) {
  ++m.generation;
  for (auto& w : m.attachments) {
    auto a = w.lock();
    if (!a) continue;  // being destroyed: its destructor detaches under the lock after us
    DmaBufAttachment::Impl& ai = impl_of(*a);
    for (auto& r : ai.maps) undo(*ai.dev, *r);
    m.stats.invalidated += ai.maps.size();
    m.stats.mappings -= ai.maps.size();
    ai.maps.clear();
    keep.push_back(std::move(a));
  }
}
}  // namespace

Status DmaBuf::move(const RangeList& to) {
  Impl& m = *impl_;
  std::vector<std::shared_ptr<DmaBufAttachment>> pins, notify;
  {
    std::lock_guard lock(m.mu);
    if (m.revoked) return make_error(ENODEV, "dma-buf move: the buffer is revoked");
    // Linux dma_buf_pin(): a static importer's attachment pins the buffer where it is.
    for (auto& w : m.attachments) {
      auto a = w.lock();
      if (!a) continue;
      const bool pinned = !a->impl_->opt.move_notify;
      const std::string who = a->impl_->who();
      pins.push_back(std::move(a));  // dropped after the unlock
      if (pinned) return make_error(EBUSY, "dma-buf move: pinned by the static importer " + who);
    }
    if (!to.empty()) {
      if (to.total_bytes() != m.size)
        return make_error(EINVAL, "dma-buf move: the new ranges hold " + format_hex(to.total_bytes()) + " bytes, the buffer " + format_hex(m.size));
      Impl probe;
      PHYSR_RETURN_IF_ERROR_CTX(classify(*m.platform, to, probe), "dma-buf move");
      if (probe.has_p2p && !m.has_p2p) return make_error(EINVAL, "dma-buf move: a host-memory buffer cannot move into P2P memory");
      m.ranges = std::move(probe.ranges);
      m.provider = probe.provider;
    }
    ++m.stats.moves;
    invalidate_locked(m, notify, [](DmaBufAttachment& a) -> DmaBufAttachment::Impl& { return *a.impl_; });
  }
  for (auto& a : notify)
    if (a->impl_->opt.move_notify) a->impl_->opt.move_notify(*a);
  return {};
}

Status DmaBuf::revoke() {
  Impl& m = *impl_;
  std::vector<std::shared_ptr<DmaBufAttachment>> notify;
  {
    std::lock_guard lock(m.mu);
    if (m.revoked) return make_error(EINVAL, "dma-buf revoke: already revoked");
    // Linux vfio_pci_dma_buf_move(vdev, true): priv->revoked, then dma_buf_move_notify().
    m.revoked = true;
    ++m.stats.revokes;
    invalidate_locked(m, notify, [](DmaBufAttachment& a) -> DmaBufAttachment::Impl& { return *a.impl_; });
  }
  for (auto& a : notify)
    if (a->impl_->opt.move_notify) a->impl_->opt.move_notify(*a);
  return {};
}

Status DmaBuf::unrevoke() {
  Impl& m = *impl_;
  std::vector<std::shared_ptr<DmaBufAttachment>> notify;
  {
    std::lock_guard lock(m.mu);
    if (!m.revoked) return make_error(EINVAL, "dma-buf unrevoke: not revoked");
    // Linux vfio_pci_dma_buf_move(vdev, false): the importers are told they may map again.
    m.revoked = false;
    invalidate_locked(m, notify, [](DmaBufAttachment& a) -> DmaBufAttachment::Impl& { return *a.impl_; });
  }
  for (auto& a : notify)
    if (a->impl_->opt.move_notify) a->impl_->opt.move_notify(*a);
  return {};
}

bool DmaBuf::revoked() const {
  std::lock_guard lock(impl_->mu);
  return impl_->revoked;
}
RangeList DmaBuf::ranges() const {
  std::lock_guard lock(impl_->mu);
  return impl_->ranges;
}
uint64_t DmaBuf::size() const { return impl_->size; }
ProviderId DmaBuf::provider() const {
  std::lock_guard lock(impl_->mu);
  return impl_->provider == kInvalidProvider ? kHostMemory : impl_->provider;
}
DmaBufStats DmaBuf::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

// ---------------------------------------------------------------------------------------
// Attachments

DmaBufAttachment::DmaBufAttachment(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DmaBufAttachment::~DmaBufAttachment() {
  if (impl_->attached) (void)detach();
}

namespace {

// Linux dma_buf_phys_vec_to_sgt(): one P2P provider, by the verdict for this importer.
Status map_p2p(const Platform& platform, ProviderId id, const RangeList& ranges, uint64_t size, DmaDevice& dev,
               const std::string& who, MapRecord& r, std::vector<DmaSegment>& segs) {
  pci::Verdict v;
  uint64_t bus_offset = 0;
  std::string pname;
  {
    ProviderRegistry::ReadGuard guard;
    const Provider* p = platform.providers().get(id);
    if (!p || p->revoked()) return make_error(ENODEV, "dma-buf map for " + who + ": provider " + std::to_string(id) + " is gone or revoked");
    // Linux pci_p2pdma_map_type(provider, attach->dev).
    v = platform.p2p().verdict(p->function(), dev.config().function);
    bus_offset = p->bus_offset();
    pname = platform.label(p->function());
  }
  switch (v.type) {
    case pci::MapType::bus_addr:
      // pci_p2pdma_bus_addr_map(): no IOVA at all.
      r.path = DmaBufPath::bus_addr;
      for (const PhysRange x : ranges) fill_sg_entry(segs, DmaAddr(x.base.value() + bus_offset), x.size, kDmaSegBusAddr);
      return {};
    case pci::MapType::thru_host_bridge: {
      PHYSR_ASSIGN_OR_RETURN_CTX(const bool use_iova, dev.iova_try_alloc(r.iova, ranges[0].base, size), "dma-buf map for " + who);
      if (use_iova) {
        r.path = DmaBufPath::iova;
        for (const PhysRange x : ranges) {
          // dma_iova_link() with DMA_ATTR_MMIO (physr's DMA layer sets MMIO for P2P
          // through the host bridge). Linux passes offset 0 for every range; physr links
          // each at its offset in the buffer.
          Status s = dev.iova_link(r.iova, x.base, r.mapped_len, x.size, r.dir);
          if (!s) {
            (void)dev.iova_destroy(r.iova, r.mapped_len, r.dir);
            return s.error().with_context("dma-buf map for " + who);
          }
          r.mapped_len += x.size;
        }
        Status s = dev.iova_sync(r.iova, 0, r.mapped_len);
        if (!s) {
          (void)dev.iova_destroy(r.iova, r.mapped_len, r.dir);
          return s.error().with_context("dma-buf map for " + who);
        }
        fill_sg_entry(segs, r.iova.addr, r.mapped_len, kDmaSegIommu | kDmaSegMmio);
        return {};
      }
      r.path = DmaBufPath::phys;
      for (const PhysRange x : ranges) {
        auto seg = dev.map_phys(x.base, x.size, r.dir);
        if (!seg) {
          for (const DmaSegment& done : r.phys_segs) (void)dev.unmap_phys(done, r.dir);
          r.phys_segs.clear();
          return seg.error().with_context("dma-buf map for " + who);
        }
        r.phys_segs.push_back(*seg);
        fill_sg_entry(segs, seg->addr, seg->len, seg->flags);
      }
      return {};
    }
    case pci::MapType::not_supported: break;
  }
  // Linux returns -EINVAL from dma_buf_phys_vec_to_sgt(); physr gives the DMA layer's
  // EREMOTEIO for unreachable P2P memory (see docs/kernel-parity.md).
  return make_error(EREMOTEIO, "dma-buf map for " + who + ": " + pname + "'s memory is not reachable (P2P not supported between them)");
}

}  // namespace

Result<DmaBufMapping> DmaBufAttachment::map(DmaDirection dir) {
  Impl& a = *impl_;
  DmaBuf::Impl& m = *a.buf->impl_;
  std::lock_guard lock(m.mu);
  if (!a.attached) return make_error(EINVAL, "dma-buf map for " + a.who() + ": detached");
  if (dir == DmaDirection::none) return make_error(EINVAL, "dma-buf map for " + a.who() + ": direction none");
  // Linux vfio_pci_dma_buf_map(): a revoked buffer is ENODEV.
  if (m.revoked) return make_error(ENODEV, "dma-buf map for " + a.who() + ": the buffer is revoked");
  auto r = std::make_unique<MapRecord>();
  r->dir = dir;
  DmaBufMapping out;
  out.segs_.reserve(m.ranges.size());
  if (m.provider != kHostMemory && m.provider != kInvalidProvider) {
    PHYSR_RETURN_IF_ERROR(map_p2p(*m.platform, m.provider, m.ranges, m.size, *a.dev, a.who(), *r, out.segs_));
  } else {
    // A host-memory (or mixed) buffer: the exporter's dma_map_sgtable().
    r->path = DmaBufPath::host;
    PHYSR_ASSIGN_OR_RETURN_CTX(r->list, a.dev->map(m.ranges, dir), "dma-buf map for " + a.who());
    for (const DmaSegment& s : r->list.segments()) fill_sg_entry(out.segs_, s.addr, s.len, s.flags);
  }
  r->id = m.next_id++;
  out.id_ = r->id;
  out.generation_ = m.generation;
  out.path_ = r->path;
  out.dir_ = dir;
  a.maps.push_back(std::move(r));
  ++m.stats.mappings;
  return out;
}

Status DmaBufAttachment::unmap(DmaBufMapping& mp) {
  Impl& a = *impl_;
  DmaBuf::Impl& m = *a.buf->impl_;
  std::lock_guard lock(m.mu);
  if (mp.id_ == 0) return make_error(EINVAL, "dma-buf unmap for " + a.who() + ": not a live mapping (unmapped already?)");
  const auto it = std::find_if(a.maps.begin(), a.maps.end(), [&](const auto& r) { return r->id == mp.id_; });
  if (it == a.maps.end()) {
    // Invalidated by a move or revoke (already unmapped by the exporter): release it.
    if (mp.generation_ < m.generation && mp.generation_ != 0 && a.attached) {
      mp = DmaBufMapping{};
      return {};
    }
    return make_error(EINVAL, "dma-buf unmap for " + a.who() + ": mapping " + std::to_string(mp.id_) + " is not this attachment's");
  }
  undo(*a.dev, **it);
  a.maps.erase(it);
  --m.stats.mappings;
  mp = DmaBufMapping{};
  return {};
}

Status DmaBufAttachment::check(const DmaBufMapping& mp) const {
  const Impl& a = *impl_;
  const DmaBuf::Impl& m = *a.buf->impl_;
  std::lock_guard lock(m.mu);
  const auto it = std::find_if(a.maps.begin(), a.maps.end(), [&](const auto& r) { return r->id == mp.id_; });
  if (mp.id_ != 0 && it != a.maps.end()) return {};
  if (mp.id_ != 0 && mp.generation_ < m.generation) {
    if (m.revoked) return make_error(ENODEV, "dma-buf mapping " + std::to_string(mp.id_) + " of " + a.who() + " was revoked");
    return make_error(ESTALE, "dma-buf mapping " + std::to_string(mp.id_) + " of " + a.who() + " was invalidated by a move: remap");
  }
  return make_error(EINVAL, "dma-buf mapping " + std::to_string(mp.id_) + " is not a live mapping of " + a.who());
}

Status DmaBufAttachment::detach() {
  Impl& a = *impl_;
  DmaBuf::Impl& m = *a.buf->impl_;
  std::lock_guard lock(m.mu);
  if (!a.attached) return make_error(EINVAL, "dma-buf detach of " + a.who() + ": already detached");
  for (auto& r : a.maps) undo(*a.dev, *r);
  a.leaked += a.maps.size();
  m.stats.mappings -= a.maps.size();
  a.maps.clear();
  m.attachments.erase(a.node);
  --m.stats.attachments;
  a.attached = false;
  return {};
}

bool DmaBufAttachment::attached() const {
  std::lock_guard lock(impl_->buf->impl_->mu);
  return impl_->attached;
}
bool DmaBufAttachment::dynamic() const noexcept { return static_cast<bool>(impl_->opt.move_notify); }
bool DmaBufAttachment::peer2peer() const noexcept { return impl_->peer2peer; }
DmaDevice& DmaBufAttachment::device() const noexcept { return *impl_->dev; }
DmaBuf& DmaBufAttachment::buffer() const noexcept { return *impl_->buf; }
uint64_t DmaBufAttachment::leaked_mappings() const {
  std::lock_guard lock(impl_->buf->impl_->mu);
  return impl_->leaked;
}

}  // namespace physr::mem
