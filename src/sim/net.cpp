// Network jobs: packets from one NIC's TX buffers over a wire into another NIC's RX buffers,
// each side mapping its buffers through the DMA layer (host memory, or a GPU's BAR for
// GPUDirect-RDMA-style receives), every packet compared with what was sent.
#include <algorithm>
#include <cstring>

#include "physr/sim.hpp"
#include "sim/job_common.hpp"

namespace physr::sim {

namespace {
constexpr uint64_t kWindow = 256 * MiB;

bool is_nic(const pci::Topology& t, uint32_t f) { return pci::is_network(t.functions[f]); }
}  // namespace

Result<JobResult> detail::run_net_job(Machine& m, const Job& job, const NetJob& nj, Group& g) {
  const pci::Topology& topo = m.topology();
  const auto where = [&] { return "job '" + job.name + "'"; };
  if (nj.tx == NetJob::Tx::devmem) return run_devmem_tx_job(m, job, nj, g);
  if (nj.rx != NetJob::Rx::plain) return run_pool_rx_job(m, job, nj, g);
  const uint32_t tx = nj.sender, rx = nj.receiver;
  if (tx >= topo.functions.size() || rx >= topo.functions.size()) return make_error(EINVAL, where() + ": no such device");
  for (uint32_t f : {tx, rx})
    if (!is_nic(topo, f)) return make_error(EINVAL, where() + ": " + m.label(f) + " is not a network controller");
  if (tx == rx) return make_error(EINVAL, where() + ": the sending and receiving NIC are the same device");
  if (job.block_size == 0 || job.block_size > 64 * KiB) return make_error(EINVAL, where() + ": packet size must be 1 byte to 64 KiB");
  if (job.queue_depth == 0 || job.queue_depth > 4096) return make_error(EINVAL, where() + ": TX ring must hold 1 to 4096 packets");
  if (job.size == 0 || job.size % job.block_size != 0) return make_error(EINVAL, where() + ": size must be a non-zero multiple of the packet size");
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kWindow) return make_error(EINVAL, where() + ": packet size x ring exceeds the 256 MiB of buffers");
  const Aperture* txbar = nj.tx_buffer_function ? m.largest_bar(*nj.tx_buffer_function) : nullptr;
  const Aperture* rxbar = nj.rx_buffer_function ? m.largest_bar(*nj.rx_buffer_function) : nullptr;
  for (const auto& [fn, bar, side] : {std::tuple{nj.tx_buffer_function, txbar, "TX"}, std::tuple{nj.rx_buffer_function, rxbar, "RX"}})
    if (fn && !bar) return make_error(EINVAL, where() + ": the " + side + " buffer device " + m.label(*fn) + " has no memory BAR");
  for (const Aperture* a : {txbar, rxbar})
    if (a && a->span.size < window) return make_error(EINVAL, where() + ": " + a->name + " cannot hold " + format_size(window) + " of buffers");
  // BAR buffers come from the BARs' P2P memory pools (each side its own chunk), host
  // buffers from host memory on the NIC's node.
  std::optional<detail::PoolBuffer> txpool, rxpool;
  std::optional<detail::HostBuffer> txhost, rxhost;
  for (const auto& [a, pool, hostbuf, nic, side] : {std::tuple{txbar, &txpool, &txhost, tx, "TX"}, std::tuple{rxbar, &rxpool, &rxhost, rx, "RX"}})
    if (a) {
      PHYSR_ASSIGN_OR_RETURN(detail::PoolBuffer b, detail::PoolBuffer::take(m, *a, window, where()));
      pool->emplace(std::move(b));
    } else {
      PHYSR_ASSIGN_OR_RETURN(detail::HostBuffer b, detail::HostBuffer::take(m, window, m.fabric().numa_of(nic), where() + ": " + side + " buffers"));
      hostbuf->emplace(std::move(b));
    }
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* txdev, m.device(tx));
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* rxdev, m.device(rx));
  Fabric& fab = m.fabric();
  const uint64_t stream = m.next_job();

  // A p2p policy fails up front where the fabric refuses a side, with the fabric's reason;
  // otherwise the DMA layer's answer decides (a mapping fails with EREMOTEIO).
  // Either way the job fails with EREMOTEIO: the code is set here, not taken from to_peer.
  if (nj.path == PathPolicy::p2p)
    for (const auto& [nic, bar, nic_writes] : {std::tuple{tx, txbar, false}, std::tuple{rx, rxbar, true}})
      if (bar)
        if (auto r = fab.to_peer(nic, bar->function, nic_writes); !r) return make_error(EREMOTEIO, where() + ": " + r.error().message);
  // One route per packet, cut-through: the sender reads its buffer, the wire carries it,
  // the receiver writes its buffer; each side's route is where its addresses decoded.
  detail::RouteCache tx_routes(fab, tx, false), rx_routes(fab, rx, true);
  const double wire_gbps = nj.wire_gbps > 0 ? nj.wire_gbps : m.options().wire_gbps;
  const uint32_t wire = fab.add_resource(Resource::Kind::device, "wire " + m.label(tx) + " -> " + m.label(rx), wire_gbps);
  const Route* last_tx = nullptr;
  const Route* last_rx = nullptr;
  Route route;  // the last packet's, rebuilt only when a side's route changes
  DmaAccess tx_seen, rx_seen;  // where any packet's bytes went, per side

  JobResult out;
  out.name = job.name;
  out.device = m.label(tx) + "->" + m.label(rx);
  out.buffer = (txbar ? txbar->name : "host") + std::string(" -> ") + (rxbar ? rxbar->name : "host");
  const DmaAttrs attrs = nj.path == PathPolicy::automatic ? kDmaAttrAllowBounce : kDmaAttrNone;
  std::vector<uint8_t> sent(job.block_size);  // the packet in the NICs' FIFOs
  Simulator& sim = g.sim();
  detail::LatencyHistogram lat;
  const uint64_t packets = job.size / job.block_size;
  // A side the DMA layer bounced adds the CPU's copy between the BAR and the bounce buffer
  // in host memory: before the wire for TX, after it for RX. The wire carries one packet
  // at a time, in order.
  const Route tx_copy = txbar ? *fab.to_memory(txbar->function, -1, true) : Route{};
  const Route rx_copy = rxbar ? *fab.to_memory(rxbar->function, -1, false) : Route{};
  detail::Stages stages(sim, packets, job.block_size, static_cast<double>(job.block_size) / wire_gbps);
  stages.share_device(g.device(fab.resources()[wire].name));  // jobs on the same wire at once send in turn
  bool bounced_any = false;

  const auto send = [&](uint64_t i) -> Status {
    const uint64_t slot = (i % job.queue_depth) * job.block_size;
    const PhysAddr txa = (txbar ? txpool->base() : txhost->base()) + slot;
    const PhysAddr rxa = (rxbar ? rxpool->base() : rxhost->base()) + slot;
    PHYSR_RETURN_IF_ERROR(detail::fill_pattern(m, txa, stream, i * job.block_size, job.block_size));
    RangeList tl, rl;
    PHYSR_RETURN_IF_ERROR(tl.append(PhysRange{txa, job.block_size, txbar ? txbar->id : kHostMemory}));
    PHYSR_RETURN_IF_ERROR(rl.append(PhysRange{rxa, job.block_size, rxbar ? rxbar->id : kHostMemory}));
    PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping tm, txdev->map(tl, DmaDirection::to_device, attrs), where() + ": TX");
    auto rm = rxdev->map(rl, DmaDirection::from_device, attrs);
    if (!rm) {
      (void)txdev->unmap(tm);
      return std::move(rm).error().with_context(where() + ": RX");
    }
    const bool tx_bounced = detail::any_bounced(tm.segments()), rx_bounced = detail::any_bounced(rm->segments());
    bounced_any |= tx_bounced || rx_bounced;
    DmaAccess ta, ra;
    Status st = detail::take_access(m.dma_read(tx, tm.segments(), sent), ta);     // the sender fetches the packet
    if (st) st = detail::take_access(m.dma_write(rx, rm->segments(), sent), ra);  // the wire delivers it
    Status u1 = txdev->unmap(tm), u2 = rxdev->unmap(*rm);
    PHYSR_RETURN_IF_ERROR(st);
    PHYSR_RETURN_IF_ERROR(u1);
    PHYSR_RETURN_IF_ERROR(u2);
    PHYSR_RETURN_IF_ERROR(detail::verify_pattern(m, rxa, stream, i * job.block_size, job.block_size, [&] { return where() + ": packet " + std::to_string(i); }));
    out.verified_bytes += job.block_size;
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* txr, tx_routes.get(ta), where() + ": TX");
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* rxr, rx_routes.get(ra), where() + ": RX");
    if (txr != last_tx || rxr != last_rx) {
      last_tx = txr;
      last_rx = rxr;
      route = *last_tx;
      route.resources.push_back(wire);
      route.resources.insert(route.resources.end(), last_rx->resources.begin(), last_rx->resources.end());
      route.latency_ns += m.options().wire_latency_ns + last_rx->latency_ns;
    }
    tx_seen.merge(ta);
    rx_seen.merge(ra);
    std::vector<Route> routes;
    if (ta.host_memory && txbar) routes.push_back(tx_copy);  // its addresses went to host memory, not the BAR
    const size_t on_wire = routes.size();
    routes.push_back(route);
    if (ra.host_memory && rxbar) routes.push_back(rx_copy);
    stages.start(i, std::move(routes), on_wire);
    return {};
  };
  detail::Driver d;
  PHYSR_RETURN_IF_ERROR(detail::run_items(g, d, stages, lat, packets, job.queue_depth, where(), send));
  detail::finish_result(out, m, d, stages, lat, job.size, packets);
  const auto p2p = [](const DmaAccess& a) { return a.peer_switch || a.peer_rc; };
  out.path = std::string("network: TX ") + (p2p(tx_seen) ? "p2p" : "host") + ", RX " + (p2p(rx_seen) ? "p2p" : "host") +
             (bounced_any ? " (bounced by the DMA layer)" : "") + (tx_seen.peer_rc || rx_seen.peer_rc ? ", through the root complex" : "");
  // Every way any packet went, per side (not only the last packet's).
  for (const auto& [bar, seen] : {std::pair{txbar, &tx_seen}, std::pair{rxbar, &rx_seen}}) {
    if (seen->peer_switch) out.via |= Via::p2p_bus_addr;
    if (seen->peer_rc) out.via |= Via::p2p_host_bridge;
    if (!bar) out.via |= Via::host_memory;
  }
  if (bounced_any) out.via |= Via::bounced;
  return out;
}

}  // namespace physr::sim
