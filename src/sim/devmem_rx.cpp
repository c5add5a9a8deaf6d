// Network jobs whose receiver takes packets into page pools: devmem RX with header split
// (headers into host page-pool pages, payloads into net_iovs of a GPU BAR exported as a
// dma-buf and bound to the NIC, Linux devmem TCP), and the path without it (RX into host
// page-pool pages, then the GPU's copy engine moves each packet into its BAR). Every
// payload byte is checked where it lands in GPU memory.
#include <algorithm>
#include <cstring>

#include "physr/mem.hpp"
#include "physr/sim.hpp"
#include "sim/job_common.hpp"

namespace physr::sim {

namespace {
constexpr uint64_t kWindow = 256 * MiB;

// Pools are destroyed before their provider and page allocator go (page_pool_destroy()).
struct PoolGuard {
  std::vector<mem::PagePool*> pools;
  ~PoolGuard() {
    for (mem::PagePool* p : pools) p->destroy();
  }
};
}  // namespace

Result<JobResult> detail::run_pool_rx_job(Machine& m, const Job& job, const NetJob& nj, Group& g) {
  const pci::Topology& topo = m.topology();
  const auto where = [&] { return "job '" + job.name + "'"; };
  const bool devmem = nj.rx == NetJob::Rx::devmem;
  const uint32_t tx = nj.sender, rx = nj.receiver;
  if (tx >= topo.functions.size() || rx >= topo.functions.size()) return make_error(EINVAL, where() + ": no such device");
  for (uint32_t f : {tx, rx})
    if (!pci::is_network(topo.functions[f])) return make_error(EINVAL, where() + ": " + m.label(f) + " is not a network controller");
  if (tx == rx) return make_error(EINVAL, where() + ": the sending and receiving NIC are the same device");
  if (nj.tx_buffer_function) return make_error(EINVAL, where() + ": receive into page pools sends from host memory");
  if (!nj.rx_buffer_function) return make_error(EINVAL, where() + ": receive into page pools needs the GPU (peer_buffer) the payload goes to");
  if (job.block_size == 0 || job.block_size > 64 * KiB) return make_error(EINVAL, where() + ": packet size must be 1 byte to 64 KiB");
  if (job.queue_depth == 0 || job.queue_depth > 4096) return make_error(EINVAL, where() + ": TX ring must hold 1 to 4096 packets");
  if (job.size == 0 || job.size % job.block_size != 0) return make_error(EINVAL, where() + ": size must be a non-zero multiple of the packet size");
  const uint64_t hdr = devmem ? nj.header_bytes : 0;
  if (devmem && (hdr == 0 || hdr > kPageSize || hdr >= job.block_size))
    return make_error(EINVAL, where() + ": the header split must be 1 byte to 4 KiB and less than the packet");
  if (devmem && nj.path == PathPolicy::bounce) return make_error(EINVAL, where() + ": devmem receive cannot bounce (dma-buf memory is not bounced)");
  const uint64_t payload = job.block_size - hdr;
  const uint64_t pages = (payload + kPageSize - 1) / kPageSize;  // payload net_iovs (devmem) or host pages (copy) per packet
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kWindow) return make_error(EINVAL, where() + ": packet size x ring exceeds the 256 MiB of buffers");
  const uint32_t gpu = *nj.rx_buffer_function;
  const Aperture* bar = m.largest_bar(gpu);
  if (!bar) return make_error(EINVAL, where() + ": " + m.label(gpu) + " has no memory BAR");
  const uint64_t bar_window = pages * kPageSize * job.queue_depth;
  if (bar->span.size < bar_window) return make_error(EINVAL, where() + ": " + bar->name + " cannot hold " + format_size(bar_window) + " of buffers");
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* txdev, m.device(tx));
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* rxdev, m.device(rx));
  Fabric& fab = m.fabric();
  if (devmem && nj.path == PathPolicy::p2p)
    if (auto r = fab.to_peer(rx, gpu, true); !r) return make_error(EREMOTEIO, where() + ": " + r.error().message);

  // The receiver's pools: host pages for headers (devmem) or whole packets (copy), and for
  // devmem the GPU's memory as a dma-buf bound to the NIC's RX queue, behind the page pool
  // through its memory provider (net_devmem_bind_dmabuf(), mp_dmabuf_devmem_init()).
  // The sender's TX buffers and the receiver's host pages from host memory on each NIC's
  // node, the GPU memory from its BAR's pool.
  const uint64_t host_pages = devmem ? job.queue_depth : pages * job.queue_depth;
  PHYSR_ASSIGN_OR_RETURN(detail::HostBuffer txbuf, detail::HostBuffer::take(m, window, fab.numa_of(tx), where() + ": TX buffers"));
  PHYSR_ASSIGN_OR_RETURN(detail::HostBuffer rxpages, detail::HostBuffer::take(m, host_pages * kPageSize, fab.numa_of(rx), where() + ": RX host pages"));
  PHYSR_ASSIGN_OR_RETURN(detail::PoolBuffer gpumem, detail::PoolBuffer::take(m, *bar, bar_window, where()));
  const PhysAddr gpu_base = gpumem.base();
  PHYSR_ASSIGN_OR_RETURN_CTX(auto hpages, mem::HostPages::create(rxpages.span(), "rx host pages"), where());
  std::shared_ptr<mem::DmaBuf> buf;
  std::unique_ptr<mem::DevmemBinding> binding;
  std::unique_ptr<mem::DevmemMemoryProvider> provider;
  if (devmem) {
    const mem::DmaBufBarRange r[] = {{gpu_base.value() - bar->span.base.value(), bar_window}};
    PHYSR_ASSIGN_OR_RETURN_CTX(buf, mem::DmaBuf::export_bar(m.platform(), gpu, bar->bar, r), where() + ": dma-buf of " + bar->name);
    PHYSR_ASSIGN_OR_RETURN_CTX(binding, mem::DevmemBinding::bind(buf, *rxdev), where());  // EREMOTEIO: the NIC cannot reach it
    PHYSR_ASSIGN_OR_RETURN_CTX(provider, mem::DevmemMemoryProvider::create(*binding), where());
  }
  PoolGuard guard;
  PHYSR_ASSIGN_OR_RETURN_CTX(mem::PagePool* hpool, mem::PagePool::create({.flags = mem::kPPFlagDmaMap, .dev = rxdev, .napi = true,
                                                                          .pages = hpages.get(), .name = "rx headers"}), where());
  guard.pools.push_back(hpool);
  mem::PagePool* dpool = nullptr;
  if (devmem) {
    PHYSR_ASSIGN_OR_RETURN_CTX(dpool, mem::PagePool::create({.flags = mem::kPPFlagDmaMap | mem::kPPFlagDmaSyncDev, .dev = rxdev,
                                                             .max_len = static_cast<uint32_t>(kPageSize), .napi = true,
                                                             .mp = provider.get(), .name = "rx devmem payload"}), where());
    guard.pools.push_back(dpool);
  }
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* gpudev, m.device(gpu));

  const uint64_t stream = m.next_job();
  detail::RouteCache tx_routes(fab, tx, false), rx_routes(fab, rx, true);
  const double wire_gbps = nj.wire_gbps > 0 ? nj.wire_gbps : m.options().wire_gbps;
  const uint32_t wire = fab.add_resource(Resource::Kind::device, "wire " + m.label(tx) + " -> " + m.label(rx), wire_gbps);
  PHYSR_ASSIGN_OR_RETURN_CTX(const Route gpu_copy, fab.to_memory(gpu, -1, false), where());  // the copy engine reads host memory
  DmaAccess tx_seen, rx_seen;
  JobResult out;
  out.name = job.name;
  out.device = m.label(tx) + "->" + m.label(rx);
  out.buffer = devmem ? "host -> headers: host page pool, payload: " + bar->name + " (devmem)"
                      : "host -> host page pool, copied to " + bar->name;
  std::vector<uint8_t> sent(job.block_size), staged(job.block_size);
  Simulator& sim = g.sim();
  detail::LatencyHistogram lat;
  const uint64_t packets = job.size / job.block_size;
  detail::Stages stages(sim, packets, job.block_size, static_cast<double>(job.block_size) / wire_gbps);
  stages.share_device(g.device(fab.resources()[wire].name));  // jobs on the same wire at once send in turn
  std::vector<mem::Netmem> bufs;
  std::vector<DmaSegment> segs;

  const auto send = [&](uint64_t i) -> Status {
    const uint64_t slot = (i % job.queue_depth) * job.block_size;
    const PhysAddr txa = txbuf.base() + slot;
    PHYSR_RETURN_IF_ERROR(detail::fill_pattern(m, txa, stream, i * job.block_size, job.block_size));
    RangeList tl;
    PHYSR_RETURN_IF_ERROR(tl.append(PhysRange{txa, job.block_size, kHostMemory}));
    PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping tm, txdev->map(tl, DmaDirection::to_device), where() + ": TX");
    DmaAccess ta, ra;
    Status st = detail::take_access(m.dma_read(tx, tm.segments(), sent), ta);
    PHYSR_RETURN_IF_ERROR(txdev->unmap(tm));
    PHYSR_RETURN_IF_ERROR(st);
    // The NIC's RX descriptors: buffers from the pools (page_pool_alloc_netmems()), the
    // header split at `hdr` bytes, the rest 4 KiB per buffer.
    bufs.clear();
    segs.clear();
    // A buffer the NIC does not get goes back to its pool (the first is the header's with devmem).
    const auto give_back = [&] {
      for (size_t k = 0; k < bufs.size(); ++k) (void)(devmem && k > 0 ? dpool : hpool)->put_full_netmem(bufs[k], false);
    };
    uint64_t left = job.block_size;
    if (devmem) {
      const mem::Netmem h = hpool->alloc_netmems();
      if (!h) return make_error(ENOMEM, where() + ": the header page pool is empty");
      bufs.push_back(h);
      segs.push_back(DmaSegment{mem::PagePool::dma_addr(h), hdr, DmaSegFlags::from_bits(mem::netmem_meta(h).dma_flags)});
      left -= hdr;
    }
    mem::PagePool* ppool = devmem ? dpool : hpool;
    while (left) {
      const mem::Netmem n = ppool->alloc_netmems();
      if (!n) {
        give_back();
        return make_error(ENOMEM, where() + ": the RX page pool is empty" + (devmem && binding->revoked() ? " (the dma-buf was revoked)" : ""));
      }
      bufs.push_back(n);
      const uint64_t len = std::min<uint64_t>(left, kPageSize);
      segs.push_back(DmaSegment{mem::PagePool::dma_addr(n), len, DmaSegFlags::from_bits(mem::netmem_meta(n).dma_flags)});
      left -= len;
    }
    st = detail::take_access(m.dma_write(rx, segs, sent), ra);  // the wire delivers it
    if (st && !devmem) {
      // The GPU's copy engine reads the packet from the host pages and writes its BAR.
      RangeList hl;
      for (mem::Netmem n : bufs) st = st ? hl.append(PhysRange{mem::netmem_phys(n), kPageSize, kHostMemory}) : st;
      if (st) {
        auto gm = gpudev->map(hl, DmaDirection::to_device);
        if (!gm) st = std::move(gm).error().with_context(where() + ": the copy to " + bar->name);
        else {
          DmaAccess ga;
          st = detail::take_access(m.dma_read(gpu, gm->segments(), staged), ga);
          const Status u = gpudev->unmap(*gm);
          if (st) st = u;
          if (st) st = m.memory().write(gpu_base + (i % job.queue_depth) * pages * kPageSize, staged);
        }
      }
    }
    // Every byte where it landed: headers in host memory, payloads in GPU memory.
    uint64_t pos = i * job.block_size;
    const auto what = [&] { return where() + ": packet " + std::to_string(i); };
    if (st && devmem) {
      for (size_t k = 0; st && k < bufs.size(); ++k) {
        const uint64_t len = segs[k].len;
        st = detail::verify_pattern(m, mem::netmem_phys(bufs[k]), stream, pos, len, what);
        pos += len;
      }
    } else if (st) {
      st = detail::verify_pattern(m, gpu_base + (i % job.queue_depth) * pages * kPageSize, stream, pos, job.block_size, what);
    }
    // The consumer is done with them (SO_DEVMEM_DONTNEED for devmem frags): back to the pools.
    for (size_t k = 0; k < bufs.size(); ++k) {
      mem::PagePool* p = devmem && k > 0 ? dpool : hpool;
      if (Status s = p->put_full_netmem(bufs[k], false); !s && st) st = s;
    }
    PHYSR_RETURN_IF_ERROR(st);
    out.verified_bytes += job.block_size;
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* txr, tx_routes.get(ta), where() + ": TX");
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* rxr, rx_routes.get(ra), where() + ": RX");
    Route route = *txr;
    route.resources.push_back(wire);
    route.resources.insert(route.resources.end(), rxr->resources.begin(), rxr->resources.end());
    route.latency_ns += m.options().wire_latency_ns + rxr->latency_ns;
    tx_seen.merge(ta);
    rx_seen.merge(ra);
    std::vector<Route> routes{std::move(route)};
    if (!devmem) routes.push_back(gpu_copy);
    stages.start(i, std::move(routes), 0);
    return {};
  };
  detail::Driver d;
  PHYSR_RETURN_IF_ERROR(detail::run_items(g, d, stages, lat, packets, job.queue_depth, where(), send));
  detail::finish_result(out, m, d, stages, lat, job.size, packets);
  const mem::PagePoolStats ps = (devmem ? dpool : hpool)->stats();
  const uint64_t recycled = ps.recycle.cached + ps.recycle.ring;
  if (devmem) {
    const bool p2p = rx_seen.peer_switch || rx_seen.peer_rc;
    out.path = std::string("network: TX host, RX devmem with header split (") + std::to_string(hdr) + " B headers into host page-pool pages, payload into " +
               bar->name + " net_iovs " + (p2p ? "by p2p" : "through host memory") + (rx_seen.peer_rc ? " through the root complex" : "") +
               "; " + std::to_string(recycled) + " buffers recycled)";
    if (rx_seen.peer_switch) out.via |= Via::p2p_bus_addr;
    if (rx_seen.peer_rc) out.via |= Via::p2p_host_bridge;
  } else {
    out.path = "network: TX host, RX host page-pool pages, then " + bar->name + "'s copy engine (" + std::to_string(recycled) +
               " pages recycled)";
    out.via |= Via::staged;
  }
  out.via |= Via::host_memory;
  return out;
}

}  // namespace physr::sim
