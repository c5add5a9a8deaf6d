// O_DIRECT copy jobs: p2pmem-test's and SPDK cmb_copy's flow in the machine model. A process
// maps its buffers (a provider's p2pmem allocate file, or anonymous host memory), reads each
// block from one SSD into a buffer with O_DIRECT and writes the buffer to another SSD with
// O_DIRECT. The block layer (mem::direct_io) pins, builds bios and requests and checks the
// queue's P2PDMA feature; the driver here maps each request's segments through the SSD's
// DmaDevice and moves the bytes over the machine's device side, as an NVMe controller does
// with a command's data pointer.
//
// Timing: each block is its reads (first SSD -> buffer, its media serving blocks in order),
// then its writes (buffer -> second SSD, through its media's write bandwidth), each request
// over the route its DMA addresses decoded to, after its command's device latency: log-normal
// around the SSD's median as for NVMe jobs (MachineOptions::nvme_latency_sigma, drawn from
// the scenario's seed, the job, the block and the request). A block whose buffer mixes host
// and P2P memory is several requests each way; as block/fops.c __blkdev_direct_IO() submits
// every bio before it waits for any, the requests of one direction run concurrently and the
// block goes on when the last of them ends (CopyTiming).
#include <algorithm>
#include <string>
#include <vector>

#include "physr/mem.hpp"
#include "physr/sim.hpp"
#include "sim/block_job.hpp"
#include "sim/job_common.hpp"
#include "sim/namespace.hpp"

namespace physr::sim::detail {

namespace {

// What one request's DMA did, for the timing.
struct Piece {
  DmaAccess acc;
  uint64_t bytes = 0;
  bool bounced = false;
};
using Moved = std::vector<Piece>;

// Latency draws per block and direction: one per request (more requests share the last).
constexpr uint64_t kDrawsPerBlock = 64;

// The timing of the blocks in flight. A block's read requests all start together; when the
// last has ended its write requests all start together, and the block ends with the last of
// those. A request is legs one after another (a bounced read: the SSD's transfer, then the
// copy out of the bounce buffer; a bounced write: the copy in, then the transfer). The source
// SSD's media serves the blocks' reads in order, as Stages does for block jobs: a block's
// reads move data no earlier than the end of the previous block's slot there, plus the part
// of each command's latency beyond the median (which holds up no other block).
class CopyTiming {
 public:
  struct Leg {
    Route route;
    uint64_t bytes = 0;
  };
  struct Request {
    Leg legs[2];  // the transfer, and a bounced request's copy before or after it
    uint32_t n = 0;
    double tail_ns = 0;  // reads: the command's latency beyond its median
  };
  CopyTiming(Simulator& sim, double slot_ns) : sim_(sim), slot_ns_(slot_ns) {}
  /// Tags the blocks' flows with `owner` (Simulator::add), for a group's loop.
  void set_owner(uint32_t owner) noexcept { owner_ = owner; }
  /// Makes the source's media the one at `free` (when it is next free), shared with other
  /// jobs of a group on the same SSD (Stages::share_device()).
  void share_device(double* free) noexcept { free_ = free; }
  /// Bytes each fabric resource (by index) carried for this job's finished legs.
  const std::vector<uint64_t>& resource_bytes() const noexcept { return res_bytes_; }

  void start(std::vector<Request> reads, std::vector<Request> writes) {
    uint32_t b;
    if (!free_blocks_.empty()) {
      b = free_blocks_.back();
      free_blocks_.pop_back();
    } else {
      b = static_cast<uint32_t>(blocks_.size());
      blocks_.emplace_back();
    }
    Block& x = blocks_[b];
    x.submit = sim_.now();
    x.phase[0] = std::move(reads);
    x.phase[1] = std::move(writes);
    x.at = 0;
    start_phase(b);
  }

  // Moves the finished flows on; adds the latency of each block that ended to `lat` and
  // returns how many did.
  uint64_t advance(const std::vector<size_t>& finished, LatencyHistogram& lat) {
    uint64_t ended = 0;
    for (const size_t f : finished) {
      const Where w = flow_of_[f];
      sim_.release(f);
      Block& x = blocks_[w.block];
      const Request& rq = x.phase[x.at][w.request];
      // The job's own bytes over each resource of the leg that ended.
      for (const uint32_t r : rq.legs[w.leg].route.resources) {
        if (r >= res_bytes_.size()) res_bytes_.resize(r + 1, 0);
        res_bytes_[r] += rq.legs[w.leg].bytes;
      }
      if (w.leg + 1 < rq.n) {
        add(w.block, w.request, w.leg + 1, sim_.now());
        continue;
      }
      if (--x.open) continue;
      if (x.at == 0) {
        x.at = 1;
        start_phase(w.block);
        continue;
      }
      lat.add(sim_.now() - x.submit);
      x.phase[0].clear();
      x.phase[1].clear();
      free_blocks_.push_back(w.block);
      ++ended;
    }
    return ended;
  }

 private:
  struct Block {
    double submit = 0;
    std::vector<Request> phase[2];  // reads, writes
    uint32_t at = 0;                // the phase running
    size_t open = 0;                // its requests not yet ended
  };
  struct Where {
    uint32_t block = 0, request = 0, leg = 0;
  };

  void start_phase(uint32_t b) {
    Block& x = blocks_[b];
    const std::vector<Request>& rqs = x.phase[x.at];
    x.open = rqs.size();
    double at = sim_.now();
    if (x.at == 0) {
      // The media's slot: the data of every read starts at `start` plus its own tail.
      double lead = 0;
      for (const Request& rq : rqs) lead = std::max(lead, rq.legs[0].route.latency_ns);
      const double start = std::max(sim_.now() + lead, *free_);
      *free_ = start + slot_ns_;
      for (uint32_t k = 0; k < rqs.size(); ++k) add(b, k, 0, start - rqs[k].legs[0].route.latency_ns + rqs[k].tail_ns);
      return;
    }
    for (uint32_t k = 0; k < rqs.size(); ++k) add(b, k, 0, at);
  }

  void add(uint32_t b, uint32_t request, uint32_t leg, double at) {
    const Block& x = blocks_[b];
    const Leg& l = x.phase[x.at][request].legs[leg];
    const size_t id = sim_.add(l.route, l.bytes, at, owner_);
    if (id >= flow_of_.size()) flow_of_.resize(id + 1);
    flow_of_[id] = Where{b, request, leg};
  }

  Simulator& sim_;
  double slot_ns_, own_free_ = 0;  // when the source's media is next free (the job's own)
  double* free_ = &own_free_;      // that, or a group's shared one
  uint32_t owner_ = 0;
  std::vector<uint64_t> res_bytes_;  // by resource index
  std::vector<Block> blocks_;  // records of the blocks in flight, reused
  std::vector<uint32_t> free_blocks_;
  std::vector<Where> flow_of_;  // by flow index
};

}  // namespace

Result<JobResult> run_direct_io_job(Machine& m, const Job& job, const DirectIoJob& k, Group& g) {
  const pci::Topology& topo = m.topology();
  const std::string where = "job '" + job.name + "'";
  for (const uint32_t f : {k.ssd, k.target}) {
    if (f >= topo.functions.size()) return make_error(EINVAL, where + ": no such device");
    if (!pci::is_nvme(topo.functions[f]))
      return make_error(EINVAL, where + ": " + m.label(f) + " is not an NVMe controller (class " + format_hex(topo.functions[f].class_code) +
                                    "): an O_DIRECT copy reads one NVMe SSD and writes another");
  }
  if (k.ssd == k.target) return make_error(EINVAL, where + ": copy_to is " + m.label(k.target) + " itself: an O_DIRECT copy goes to another SSD");
  if (k.path == PathPolicy::bounce)
    return make_error(EINVAL, where + ": an O_DIRECT copy's buffers are the ones the process mapped: path is p2p or auto, not bounce");
  PHYSR_ASSIGN_OR_RETURN(const Aperture* bar, check_block_shape(m, job, k.buffer_function, where));
  if (!bar && k.host_bytes != 0) return make_error(EINVAL, where + ": host_bytes needs a P2P buffer (the whole buffer is host memory already)");
  if (k.host_bytes % kPageSize != 0 || (bar && k.host_bytes >= job.block_size))
    return make_error(EINVAL, where + ": host_bytes " + std::to_string(k.host_bytes) + " must be a multiple of 4 KiB below the block size");
  // A controller's own CMB holds command data only as CMBSZ allows (RDS for its reads, WDS
  // for its writes); for the other SSD it is just P2P memory.
  if (bar && topo.functions[bar->function].cmb) {
    const pci::NvmeCmb& cmb = *topo.functions[bar->function].cmb;
    if ((bar->function == k.ssd && !cmb.rds) || (bar->function == k.target && !cmb.wds))
      return make_error(EINVAL, where + ": " + bar->name + " cannot hold " + (bar->function == k.ssd ? "read" : "write") + " command data (CMBSZ." +
                                    (bar->function == k.ssd ? "RDS" : "WDS") + " is clear)");
  }

  // A p2p policy fails up front where the fabric refuses either SSD's access to the BAR,
  // with the fabric's reason (as the block jobs do); otherwise the DMA layer decides.
  if (bar && k.path == PathPolicy::p2p)
    for (const auto& [dev, writes] : {std::pair{k.ssd, true}, std::pair{k.target, false}})
      if (auto r = m.fabric().to_peer(dev, bar->function, writes); !r) return make_error(EREMOTEIO, where + ": " + r.error().message);

  // The process: host memory for its anonymous pages (the window block jobs use for host
  // buffers), an address space, and per queue slot a buffer at a fixed address: host_bytes
  // of anonymous memory, then the rest from the provider's allocate file.
  const uint64_t bs = job.block_size, qd = job.queue_depth, ios = job.size / bs;
  const uint64_t stride = (bs + 2 * MiB - 1) & ~(2 * MiB - 1);
  const uint64_t stream = m.next_job(), target_stream = m.next_job();
  // Its RAM: a 2 MiB aligned piece of the machine's host memory on the device's node.
  PHYSR_ASSIGN_OR_RETURN(HostBuffer ram, HostBuffer::take(m, kHostWindow, m.fabric().numa_of(k.ssd), where + ": process memory", 2 * MiB));
  PHYSR_ASSIGN_OR_RETURN_CTX(auto host, mem::HostMemory::create(ram.span(), stream), where);
  mem::AddressSpace as(*host);
  mem::P2PMemorySource* file = nullptr;
  if (bar) {
    PHYSR_ASSIGN_OR_RETURN_CTX(file, m.allocate_file(bar->function), where);
  }
  const uint64_t host_part = bar ? k.host_bytes : bs;
  const auto slot_addr = [&](uint64_t s) { return mem::AddressSpace::kMmapBase + s * stride; };
  for (uint64_t s = 0; s < std::min(qd, ios); ++s) {
    if (host_part) PHYSR_RETURN_IF_ERROR_CTX(as.mmap_anon({.addr = slot_addr(s), .len = host_part}), where);
    if (bs > host_part)
      PHYSR_RETURN_IF_ERROR_CTX(as.mmap_p2p(*file, {.addr = slot_addr(s) + host_part, .len = bs - host_part, .shared = true}), where);
  }

  // drivers/nvme/host/core.c: BLK_FEAT_PCI_P2PDMA when the controller supports P2PDMA.
  PHYSR_ASSIGN_OR_RETURN_CTX(const mem::Queue qin, mem::Queue::nvme(m.label(k.ssd), k.p2pdma), where);
  PHYSR_ASSIGN_OR_RETURN_CTX(const mem::Queue qout, mem::Queue::nvme(m.label(k.target), k.p2pdma), where);
  PHYSR_ASSIGN_OR_RETURN(Namespace ns_in, Namespace::create(job.size, bs, stream));
  PHYSR_ASSIGN_OR_RETURN(Namespace ns_out, Namespace::create(job.size, bs, target_stream));
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* in_dev, m.device(k.ssd));
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* out_dev, m.device(k.target));
  const DmaAttrs attrs = k.path == PathPolicy::automatic ? kDmaAttrAllowBounce : kDmaAttrNone;

  Fabric& fab = m.fabric();
  JobResult out;
  out.name = job.name;
  out.device = m.label(k.ssd) + " -> " + m.label(k.target);
  out.buffer = !bar ? "host memory" : k.host_bytes ? bar->name + " + host memory" : bar->name;
  const MachineOptions& mo = m.options();
  RouteCache read_routes(fab, k.ssd, true), write_routes(fab, k.target, false);
  const Route copy = bar ? *fab.to_memory(bar->function, -1, true) : Route{};
  // The target's media takes the written blocks at its write bandwidth, shared by the
  // blocks in flight (the read side's media serves blocks in order, in CopyTiming).
  const uint32_t write_media = fab.add_resource(Resource::Kind::device, m.label(k.target) + " media (writes)", mo.nvme_write_gbps);
  Simulator& sim = g.sim();
  // The source's media slot per block as for NVMe jobs: its bytes at the read bandwidth, and
  // no less than one command at the read IOPS limit.
  CopyTiming timing(sim, std::max(static_cast<double>(bs) / mo.nvme_read_gbps, 1e9 / mo.nvme_read_iops));
  timing.share_device(g.device(m.label(k.ssd) + " media"));  // with other jobs on the same SSD at once
  LatencyHistogram lat;
  ViaFlags via;
  const Route* p2p_taken = nullptr;
  std::vector<uint8_t> got(std::min<uint64_t>(64 * KiB, bs));

  // The driver's side of one request: map its segments, let the controller move the bytes
  // between its namespace and memory by DMA address, unmap, and (for a read) check that
  // memory holds what the namespace does.
  const auto driver = [&](bool read, Moved* mv) {
    return [&, read, mv](const mem::Request& rq, const RangeList& segs) -> Status {
      Piece& moved = mv->emplace_back();
      moved.bytes = rq.bytes;
      const uint32_t dev = read ? k.ssd : k.target;
      DmaDevice& dma = read ? *in_dev : *out_dev;
      const uint64_t pos = rq.sector << mem::kSectorShift;
      PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping map, dma.map(segs, read ? DmaDirection::from_device : DmaDirection::to_device, attrs),
                                 where + ": " + m.label(dev));
      const auto ds = map.segments();
      (fits_prps(ds) ? out.prp_ios : out.sgl_ios)++;
      moved.bounced |= any_bounced(ds);
      Status st;
      for (uint64_t b = 0; st && b < rq.bytes; b += kBurst) {
        const uint64_t n = std::min(kBurst, rq.bytes - b);
        st = read ? take_access(m.dma_write_from(dev, ds, b, n, [&](uint64_t o, std::span<uint8_t> dst) { return ns_in.read(pos + b + o, dst); }), moved.acc)
                  : take_access(m.dma_read_to(dev, ds, b, n, [&](uint64_t o, std::span<const uint8_t> src) { return ns_out.write(pos + b + o, src); }),
                                moved.acc);
      }
      Status un = dma.unmap(map);
      PHYSR_RETURN_IF_ERROR_CTX(std::move(st), where);
      PHYSR_RETURN_IF_ERROR_CTX(std::move(un), where);
      if (!read) return {};
      // The buffer's pages, in the request's order, hold the namespace's bytes (checked
      // after unmap: bounced data lands only then).
      uint64_t done = 0;
      for (const PhysRange& r : segs) {
        PHYSR_RETURN_IF_ERROR(m.memory().visit(r.base, r.size, [&](uint64_t o, std::span<const uint8_t> have) -> Status {
          PHYSR_ASSIGN_OR_RETURN(const size_t bad, ns_in.mismatch(pos + done + o, have));
          if (bad == have.size()) return {};
          return make_error(EIO, where + ": block at byte " + std::to_string(pos) + ": the buffer at " + format_hex(r.base.value() + o + bad) +
                                     " does not hold the byte " + std::to_string(pos + done + o + bad) + " of " + m.label(k.ssd));
        }));
        done += r.size;
      }
      return {};
    };
  };

  const auto submit = [&](uint64_t i) -> Status {
    const uint64_t addr = slot_addr(i % qd), sector = (i * bs) >> mem::kSectorShift;
    Moved rd, wr;
    PHYSR_ASSIGN_OR_RETURN_CTX(const mem::DirectIoStats r, mem::direct_io(as, qin, mem::BlockOp::read, addr, bs, sector, driver(true, &rd)), where);
    PHYSR_ASSIGN_OR_RETURN_CTX(const mem::DirectIoStats w, mem::direct_io(as, qout, mem::BlockOp::write, addr, bs, sector, driver(false, &wr)), where);
    out.bios += r.bios + w.bios;
    out.requests += r.requests + w.requests;
    // The target's namespace holds the first SSD's bytes, read back a piece at a time.
    for (uint64_t b = 0; b < bs; b += got.size()) {
      const std::span<uint8_t> piece(got.data(), std::min<uint64_t>(got.size(), bs - b));
      PHYSR_RETURN_IF_ERROR(ns_out.read(i * bs + b, piece));
      if (const size_t bad = pattern_mismatch(stream, i * bs + b, piece); bad != piece.size())
        return make_error(EIO, where + ": " + m.label(k.target) + " does not hold byte " + std::to_string(i * bs + b + bad) + " of " + m.label(k.ssd));
    }
    out.verified_bytes += bs;
    // Timing over the routes the addresses took; a bounced transfer adds the copy between
    // host memory and the BAR (after the read, before the write). Each request's command
    // takes its device latency, log-normal around the median (docs/sim.md, "The SSD
    // model"): a read's up to the median before the block's slot on the source's media,
    // the rest after it; a write's before its data moves.
    std::vector<CopyTiming::Request> reqs[2];
    for (const auto& [pieces, cache, read] : {std::tuple{&rd, &read_routes, true}, std::tuple{&wr, &write_routes, false}}) {
      std::vector<CopyTiming::Request>& mine = reqs[read ? 0 : 1];
      const double median = read ? mo.nvme_read_latency_ns : mo.nvme_write_latency_ns;
      for (size_t n = 0; n < pieces->size(); ++n) {
        const Piece& p = (*pieces)[n];
        PHYSR_ASSIGN_OR_RETURN_CTX(const Route* via_route, cache->get(p.acc), where);
        const uint64_t draw = i * kDrawsPerBlock + std::min<uint64_t>(n, kDrawsPerBlock - 1);
        const double dev_ns = median * lognormal_factor(mo.seed, read ? stream : target_stream, draw, mo.nvme_latency_sigma);
        CopyTiming::Request& rq = mine.emplace_back();
        Route own = *via_route;
        own.latency_ns += read ? std::min(dev_ns, median) : dev_ns;
        if (read) rq.tail_ns = dev_ns - std::min(dev_ns, median);
        if (!read) own.resources.push_back(write_media);
        if (p.acc.peer_switch || p.acc.peer_rc) {
          if (!p2p_taken) p2p_taken = via_route;  // the read's: where the SSD's data went
          via |= via_route->p2p == pci::MapType::bus_addr ? Via::p2p_bus_addr : Via::p2p_host_bridge;
        }
        if (p.acc.host_memory) via |= p.bounced ? Via::bounced : Via::host_memory;
        if (p.bounced && !read) rq.legs[rq.n++] = {copy, p.bytes};
        rq.legs[rq.n++] = {std::move(own), p.bytes};
        if (p.bounced && read) rq.legs[rq.n++] = {copy, p.bytes};
      }
    }
    timing.start(std::move(reqs[0]), std::move(reqs[1]));
    return {};
  };

  // Queue depth as the block jobs keep it: a new block as soon as one completes.
  Driver d;
  d.where = where;
  d.items = ios;
  d.queue_depth = qd;
  d.set_owner = [&timing](uint32_t owner) { timing.set_owner(owner); };
  d.submit = submit;
  d.advance = [&timing, &lat](const std::vector<size_t>& finished) { return timing.advance(finished, lat); };
  Status st = g.run(d);
  // The process exits: its mappings go, and the P2P chunks back to the pool (after a grace period).
  Status un = as.munmap(mem::AddressSpace::kMmapBase, std::min(qd, ios) * stride);
  PHYSR_RETURN_IF_ERROR(st);
  PHYSR_RETURN_IF_ERROR_CTX(std::move(un), where);
  finish_result(out, m, d, timing.resource_bytes(), lat, job.size, ios);
  out.via = via;
  out.path = !bar ? "host memory"
             : out.took(Via::bounced) ? "bounce (DMA layer, swiotlb)"
             : p2p_taken ? std::string("p2p ") + pci::map_type_name(p2p_taken->p2p) +
                               (p2p_taken->resources.empty() ? " (inside the SSD)" : p2p_taken->through_rc ? " (through the root complex)" : " (under the switch)")
                         : "host memory";
  if (bar && k.host_bytes) out.path += " + host memory";
  return out;
}

}  // namespace physr::sim::detail
