// Network jobs whose sender transmits from device memory as devmem TCP does (Linux
// net/core/devmem.c TX bindings, tcp_sendmsg_locked() with SCM_DEVMEM_DMABUF): each
// packet's header from host memory, its payload straight from net_iovs of a GPU BAR
// exported as a dma-buf and bound to the sending NIC for TX; the receiver takes the packets
// into host memory and every byte is checked there.
#include <algorithm>

#include "physr/mem.hpp"
#include "physr/sim.hpp"
#include "sim/job_common.hpp"

namespace physr::sim {

namespace {
constexpr uint64_t kWindow = 256 * MiB;
}  // namespace

Result<JobResult> detail::run_devmem_tx_job(Machine& m, const Job& job, const NetJob& nj, Group& g) {
  const pci::Topology& topo = m.topology();
  const auto where = [&] { return "job '" + job.name + "'"; };
  const uint32_t tx = nj.sender, rx = nj.receiver;
  if (tx >= topo.functions.size() || rx >= topo.functions.size()) return make_error(EINVAL, where() + ": no such device");
  for (uint32_t f : {tx, rx})
    if (!pci::is_network(topo.functions[f])) return make_error(EINVAL, where() + ": " + m.label(f) + " is not a network controller");
  if (tx == rx) return make_error(EINVAL, where() + ": the sending and receiving NIC are the same device");
  if (nj.rx != NetJob::Rx::plain || nj.rx_buffer_function)
    return make_error(EINVAL, where() + ": a devmem sender's receiver takes packets into host memory");
  if (!nj.tx_buffer_function) return make_error(EINVAL, where() + ": devmem transmit needs the GPU (buffer) the payload is sent from");
  if (job.block_size == 0 || job.block_size > 64 * KiB) return make_error(EINVAL, where() + ": packet size must be 1 byte to 64 KiB");
  if (job.queue_depth == 0 || job.queue_depth > 4096) return make_error(EINVAL, where() + ": TX ring must hold 1 to 4096 packets");
  if (job.size == 0 || job.size % job.block_size != 0) return make_error(EINVAL, where() + ": size must be a non-zero multiple of the packet size");
  const uint64_t hdr = nj.header_bytes;
  if (hdr == 0 || hdr > kPageSize || hdr >= job.block_size)
    return make_error(EINVAL, where() + ": the header must be 1 byte to 4 KiB and less than the packet");
  if (nj.path == PathPolicy::bounce) return make_error(EINVAL, where() + ": devmem transmit cannot bounce (dma-buf memory is not bounced)");
  const uint64_t payload = job.block_size - hdr;
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kWindow) return make_error(EINVAL, where() + ": packet size x ring exceeds the 256 MiB of buffers");
  const uint32_t gpu = *nj.tx_buffer_function;
  const Aperture* bar = m.largest_bar(gpu);
  if (!bar) return make_error(EINVAL, where() + ": " + m.label(gpu) + " has no memory BAR");
  // The payloads of the ring's packets back to back in the dma-buf (iov_base: an offset in it).
  const uint64_t buf_bytes = (payload * job.queue_depth + kPageSize - 1) / kPageSize * kPageSize;
  if (bar->span.size < buf_bytes) return make_error(EINVAL, where() + ": " + bar->name + " cannot hold " + format_size(buf_bytes) + " of payloads");
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* txdev, m.device(tx));
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* rxdev, m.device(rx));
  Fabric& fab = m.fabric();
  if (nj.path == PathPolicy::p2p)
    if (auto r = fab.to_peer(tx, gpu, false); !r) return make_error(EREMOTEIO, where() + ": " + r.error().message);

  // The headers and the receiver's buffers from host memory on each NIC's node, the
  // payloads from the GPU BAR's pool.
  PHYSR_ASSIGN_OR_RETURN(detail::HostBuffer hdrbuf, detail::HostBuffer::take(m, job.queue_depth * kPageSize, fab.numa_of(tx), where() + ": TX headers"));
  PHYSR_ASSIGN_OR_RETURN(detail::HostBuffer rxbuf, detail::HostBuffer::take(m, window, fab.numa_of(rx), where() + ": RX buffers"));
  PHYSR_ASSIGN_OR_RETURN(detail::PoolBuffer gpumem, detail::PoolBuffer::take(m, *bar, buf_bytes, where()));
  // The GPU's memory as a dma-buf bound to the sending NIC for TX (netdev_nl_bind_tx_doit():
  // net_devmem_bind_dmabuf(DMA_TO_DEVICE)); EREMOTEIO when the NIC cannot reach it.
  const mem::DmaBufBarRange r[] = {{gpumem.base().value() - bar->span.base.value(), buf_bytes}};
  PHYSR_ASSIGN_OR_RETURN_CTX(auto buf, mem::DmaBuf::export_bar(m.platform(), gpu, bar->bar, r), where() + ": dma-buf of " + bar->name);
  PHYSR_ASSIGN_OR_RETURN_CTX(auto binding, mem::DevmemBinding::bind(buf, *txdev, DmaDirection::to_device), where());
  mem::DevmemTxSocket sock(*txdev);
  sock.set_zerocopy(true);  // SO_ZEROCOPY: devmem TX is MSG_ZEROCOPY only

  const uint64_t stream = m.next_job();
  detail::RouteCache tx_routes(fab, tx, false), rx_routes(fab, rx, true);
  const double wire_gbps = nj.wire_gbps > 0 ? nj.wire_gbps : m.options().wire_gbps;
  const uint32_t wire = fab.add_resource(Resource::Kind::device, "wire " + m.label(tx) + " -> " + m.label(rx), wire_gbps);
  DmaAccess tx_seen, rx_seen;
  JobResult out;
  out.name = job.name;
  out.device = m.label(tx) + "->" + m.label(rx);
  out.buffer = "headers: host, payload: " + bar->name + " (devmem) -> host";
  std::vector<uint8_t> sent(job.block_size);
  Simulator& sim = g.sim();
  std::vector<double> lat;
  const uint64_t packets = job.size / job.block_size;
  detail::Stages stages(sim, packets, job.block_size, static_cast<double>(job.block_size) / wire_gbps);
  stages.share_device(g.device(fab.resources()[wire].name));  // jobs on the same wire at once send in turn
  uint64_t frags = 0;
  std::vector<DmaSegment> segs;

  const auto send = [&](uint64_t i) -> Status {
    const uint64_t slot = i % job.queue_depth;
    // The application's data: the header in host memory, the payload already in GPU memory
    // (where a GPU kernel wrote it).
    const PhysAddr ha = hdrbuf.base() + slot * kPageSize;
    const uint64_t poff = slot * payload;
    PHYSR_RETURN_IF_ERROR(detail::fill_pattern(m, ha, stream, i * job.block_size, hdr));
    PHYSR_RETURN_IF_ERROR(detail::fill_pattern(m, gpumem.base() + poff, stream, i * job.block_size + hdr, payload));
    // sendmsg(MSG_ZEROCOPY, SCM_DEVMEM_DMABUF = the binding's id, iov = {offset, payload}):
    // the skb's frags, net_iovs of the TX binding.
    const mem::DevmemIov iov[] = {{poff, payload}};
    PHYSR_ASSIGN_OR_RETURN_CTX(const std::vector<mem::DevmemTxFrag> fr,
                               sock.sendmsg({.iov = iov, .msg_zerocopy = true, .dmabuf_id = binding->id()}), where() + ": sendmsg");
    frags += fr.size();
    // The NIC's TX descriptors: the header mapped from host memory (the skb's linear part),
    // then every frag at its net_iov's DMA address.
    RangeList hl;
    PHYSR_RETURN_IF_ERROR(hl.append(PhysRange{ha, hdr, kHostMemory}));
    PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping hm, txdev->map(hl, DmaDirection::to_device), where() + ": TX header");
    segs.assign(hm.segments().begin(), hm.segments().end());
    for (const mem::DevmemTxFrag& f : fr) segs.push_back(DmaSegment{f.dma, f.len, {}});
    RangeList rl;
    PHYSR_RETURN_IF_ERROR(rl.append(PhysRange{rxbuf.base() + slot * job.block_size, job.block_size, kHostMemory}));
    auto rm = rxdev->map(rl, DmaDirection::from_device);
    if (!rm) {
      (void)txdev->unmap(hm);
      return std::move(rm).error().with_context(where() + ": RX");
    }
    DmaAccess ta, ra;
    Status st = detail::take_access(m.dma_read(tx, segs, sent), ta);             // the sender gathers header and payload
    if (st) st = detail::take_access(m.dma_write(rx, rm->segments(), sent), ra);  // the wire delivers it
    const Status u1 = txdev->unmap(hm), u2 = rxdev->unmap(*rm);
    PHYSR_RETURN_IF_ERROR(st);
    PHYSR_RETURN_IF_ERROR(u1);
    PHYSR_RETURN_IF_ERROR(u2);
    // Every byte at the receiver: header and payload, in order.
    PHYSR_RETURN_IF_ERROR(detail::verify_pattern(m, rxbuf.base() + slot * job.block_size, stream, i * job.block_size, job.block_size,
                                                 [&] { return where() + ": packet " + std::to_string(i); }));
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
    stages.start(i, std::move(routes), 0);
    return {};
  };
  detail::Driver d;
  PHYSR_RETURN_IF_ERROR(detail::run_items(g, d, stages, lat, packets, job.queue_depth, where(), send));
  detail::finish_result(out, m, d, stages, lat, job.size, packets);
  const bool p2p = tx_seen.peer_switch || tx_seen.peer_rc;
  out.path = std::string("network: TX devmem (") + std::to_string(hdr) + " B headers from host memory, payload from " + bar->name +
             " net_iovs " + (p2p ? "by p2p" : "through host memory") + (tx_seen.peer_rc ? " through the root complex" : "") + "; " +
             std::to_string(frags) + " frags), RX host";
  if (tx_seen.peer_switch) out.via |= Via::p2p_bus_addr;
  if (tx_seen.peer_rc) out.via |= Via::p2p_host_bridge;
  out.via |= Via::host_memory;
  return out;
}

}  // namespace physr::sim
