// The I/O loop NVMe and copy-engine jobs share (nvme.cpp, copy.cpp): each block's buffer
// mapped through the DMA layer, its bytes moved between the device side (`Media`) and the
// buffer by address, checked, unmapped, and timed over the fabric. Private to the sim module.
//
// A template over the device side rather than a virtual interface: the media calls are
// per 32 KiB burst, inlined into the loop the simulator's speed depends on.
#pragma once

#include <algorithm>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/sim.hpp"
#include "sim/job_common.hpp"

namespace physr::sim::detail {

/// The most buffer memory a job's queue may take (block size x queue depth), in host
/// memory (from Machine::host_memory()) or a BAR's pool.
inline constexpr uint64_t kHostWindow = 256 * MiB;
/// The device moves an I/O in bursts this size, each one DMA access of the machine (decoded,
/// then moved): real engines move max-payload-size TLPs, but a burst's bytes land as pieces
/// of kLanding whatever its size, so only the per-access cost (decode, region look-ups)
/// depends on it (128 KiB: 0.92x the instructions of 32 KiB per SimTransfer/1048576 job).
inline constexpr uint64_t kBurst = 128 * KiB;
/// A burst the device writes into the buffer itself is checked in pieces this size as each
/// lands: a quarter of the L1 data cache of current x86 and Arm cores, so the check reads
/// what was just written from L1 rather than from L2 (a whole 32 KiB piece fills L1, and
/// its first lines are gone by the time the check reaches them).
inline constexpr uint64_t kLanding = 8 * KiB;

/// What the loop needs to know about a block job, checked by its kind.
struct BlockPlan {
  uint32_t device = 0;
  bool write = false;
  PathPolicy path = PathPolicy::automatic;
  const Aperture* bar = nullptr;      // the buffers' BAR; null: host memory
  double latency_ns = 0, slot_ns = 0;  // per block: the device's (median) latency and its in-order slot
  double latency_sigma = 0;            // a block's latency is latency_ns x lognormal_factor(.., sigma)
  std::optional<uint32_t> engine;     // a resource every transfer also crosses (a copy engine)
  const char* inside = "";            // how a P2P route with no link is described
  std::string served;                 // the in-order device's name (jobs of a group on it share it)
};

/// Checks the shape every block job shares and finds the buffers' BAR; EINVAL naming `where`.
Result<const Aperture*> check_block_shape(Machine& m, const Job& job, std::optional<uint32_t> buffer_function,
                                          const std::string& where);

// NVMe PRP rules: only the first entry may start inside a page, and every segment but the
// last must end on a page boundary. Otherwise the command needs an SGL.
inline bool fits_prps(std::span<const DmaSegment> segs) {
  for (size_t k = 0; k < segs.size(); ++k) {
    if (k > 0 && (segs[k].addr.value() & (kPageSize - 1)) != 0) return false;
    if (k + 1 < segs.size() && ((segs[k].addr.value() + segs[k].len) & (kPageSize - 1)) != 0) return false;
  }
  return true;
}

/// Runs the I/Os of a block job. `Media` is the device side:
///   Status prepare(uint64_t i)                   before I/O i maps (a read job's GPU kernel writes its slot)
///   Status read(uint64_t i, uint64_t o, span<uint8_t>)          device -> bus, at byte o of I/O i
///   Status write(uint64_t i, uint64_t o, span<const uint8_t>)   bus -> device
///   Result<size_t> mismatch(uint64_t pos, span<const uint8_t>)  the device's data at job byte pos vs a buffer
///   Status check_written(uint64_t i, what)       after a write: the device holds the job's data
template <class Media>
Result<JobResult> run_blocks(Machine& m, const Job& job, const BlockPlan& plan, Media& media, uint64_t stream, Group& g) {
  const auto where = [&] { return "job '" + job.name + "'"; };
  const Aperture* bar = plan.bar;
  const bool write = plan.write;
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* dev, m.device(plan.device));
  DmaDevice& dma = *dev;
  Fabric& fab = m.fabric();

  JobResult out;
  out.name = job.name;
  out.device = m.label(plan.device);
  out.buffer = bar ? bar->name : "host memory";
  const bool staged = bar && plan.path == PathPolicy::bounce;
  // BAR buffers come from the BAR's P2P memory pool for the job's length, host buffers (and
  // the staging buffers of path bounce) from the machine's host memory on the device's node.
  const uint64_t window = job.block_size * job.queue_depth;
  std::optional<PoolBuffer> pooled;
  std::optional<HostBuffer> host, staging_buf;
  if (bar) {
    PHYSR_ASSIGN_OR_RETURN(PoolBuffer b, PoolBuffer::take(m, *bar, window, where()));
    pooled.emplace(std::move(b));
  } else {
    PHYSR_ASSIGN_OR_RETURN(HostBuffer b, HostBuffer::take(m, window, fab.numa_of(plan.device), where() + ": buffers"));
    host.emplace(std::move(b));
  }
  if (staged) {
    PHYSR_ASSIGN_OR_RETURN(HostBuffer b, HostBuffer::take(m, window, fab.numa_of(plan.device), where() + ": staging buffers"));
    staging_buf.emplace(std::move(b));
  }
  const PhysAddr buf_base = pooled ? pooled->base() : host->base();
  const DmaAttrs attrs = plan.path == PathPolicy::automatic ? kDmaAttrAllowBounce : kDmaAttrNone;

  // A p2p policy fails up front where the fabric refuses the pair, with the fabric's reason;
  // otherwise the DMA layer's answer decides (the mapping fails with EREMOTEIO).
  // Either way the job fails with EREMOTEIO: the code is set here, not taken from to_peer.
  if (bar && !staged && plan.path == PathPolicy::p2p)
    if (auto r = fab.to_peer(plan.device, bar->function, !write); !r) return make_error(EREMOTEIO, where() + ": " + r.error().message);
  // Timing routes follow the addresses each I/O's mapping produced, as the fabric decoded
  // them (device <-> buffer), plus for a BAR buffer reached through host memory the copy
  // between host memory and the BAR.
  RouteCache routes_of(fab, plan.device, !write);
  Route copy;
  if (bar) {
    copy = *fab.to_memory(bar->function, -1, write);  // the BAR side reads (read job) or writes host memory
    if (staged) copy.resources.push_back(fab.add_resource(Resource::Kind::device, m.label(bar->function) + " copy engine", m.options().copy_engine_gbps));
  }

  Simulator& sim = g.sim();
  const uint64_t ios = job.size / job.block_size;
  Stages stages(sim, ios, job.block_size, plan.slot_ns);
  if (!plan.served.empty()) stages.share_device(g.device(plan.served));
  LatencyHistogram lat;
  bool bounced_any = false;
  const Route* taken = nullptr;  // the P2P route the device's addresses took, if any
  const uint8_t* view = nullptr;  // the CPU's view of buffer bytes [view_lo, view_hi), for the landing checks
  uint64_t view_lo = 0, view_hi = 0;
  // The CPU's view of physical bytes [p, p + len), held from one look-up to the next
  // (PhysMemory::backed: one per backed run of up to 2 MiB); null where never backed.
  const auto view_at = [&](uint64_t p, uint64_t len) -> const uint8_t* {
    if (p < view_lo || p + len > view_hi) {
      const std::span<const uint8_t> s = m.memory().backed(PhysAddr(p));
      if (s.size() < len) return nullptr;
      view = s.data();
      view_lo = p;
      view_hi = p + s.size();
    }
    return view + (p - view_lo);
  };
  // The buffer's slots of one block each: an I/O takes a free one and gives it back when it
  // completes (the SSD's latency varies, so I/Os complete out of order, and slot i % qd
  // could still be in flight). Linux block/blk-mq.c __blk_mq_free_request(): a request's
  // tag goes back (blk_mq_put_tag()) only when the request is freed after its completion.
  std::vector<uint64_t> free_slots;
  for (uint64_t k = job.queue_depth; k-- > 0;) free_slots.push_back(k * job.block_size);
  std::vector<std::pair<uint64_t, uint64_t>> flying;  // (I/O, its slot) of each I/O in flight

  // One word per 4 KiB page of a read I/O's buffer is taken once its bytes were checked (as
  // they landed, or whole), and compared again through the CPU's view of the buffer when the
  // I/O completes: that finds a buffer something wrote over while the I/O was in flight
  // (another device or job, a slot given out twice). A word per page, not every byte: the
  // buffer left the caches long ago, and a page is the least a DMA or a CPU copy writes
  // over. The word moves from I/O to I/O, so a job samples every word position of its pages.
  // A read that lands in place takes its words as each run is checked (in submit, below),
  // the others after the I/O's bytes were checked whole (read_samples()).
  const uint64_t pages = (job.block_size + kPageSize - 1) / kPageSize;
  std::vector<uint64_t> sampled(write ? 0 : job.queue_depth * pages), now(write ? 0 : pages);  // per slot; at completion
  const auto sample_at = [&](uint64_t i, uint64_t p) {  // the sampled word of I/O i's page at byte p
    const uint64_t n = std::min(kPageSize, job.block_size - p), k = i * 61 + (p >> 12) * 17;
    return p + (n == kPageSize ? k & (kPageSize / 8 - 1) : k % (n / 8)) * 8;
  };
  const auto buffer_at = [&](uint64_t slot) { return buf_base + slot; };
  const auto read_samples = [&](uint64_t i, uint64_t slot, uint64_t* words) -> Status {
    const PhysAddr buf = buffer_at(slot);
    if (const uint8_t* all = job.block_size % kPageSize == 0 ? view_at(buf.value(), job.block_size) : nullptr) {  // the common case
      constexpr uint64_t kAhead = 8;  // pages: the words are cache misses, asked for ahead
      for (uint64_t k = 0, w = i * 61 % (kPageSize / 8); k < pages; ++k, w = (w + 17) % (kPageSize / 8)) {
        if (k + kAhead < pages) __builtin_prefetch(all + (k + kAhead) * kPageSize + (w + kAhead * 17) % (kPageSize / 8) * 8);
        std::memcpy(&words[k], all + k * kPageSize + w * 8, 8);
      }
      return {};
    }
    std::span<const uint8_t> run;  // the CPU's view of buffer bytes [run_at, run_at + run.size())
    uint64_t run_at = 0;
    for (uint64_t k = 0; k < pages; ++k) {
      const uint64_t at = sample_at(i, k * kPageSize);
      if (at >= run_at && at + 8 <= run_at + run.size()) {
        std::memcpy(&words[k], run.data() + (at - run_at), 8);
      } else if (run = m.memory().backed(buf + at), run_at = at; run.size() >= 8) {
        std::memcpy(&words[k], run.data(), 8);
      } else {  // never backed, or the word straddles two slabs: read it
        PHYSR_RETURN_IF_ERROR(m.memory().read(buf + at, std::span(reinterpret_cast<uint8_t*>(&words[k]), 8)));
      }
    }
    return {};
  };
  const auto check_completed = [&](uint64_t i, uint64_t slot) -> Status {
    PHYSR_RETURN_IF_ERROR(read_samples(i, slot, now.data()));
    const uint64_t* then = &sampled[slot / job.block_size * pages];
    for (uint64_t k = 0; k < pages; ++k) {
      if (now[k] == then[k]) continue;
      const uint64_t at = sample_at(i, k * kPageSize);
      uint8_t have[8], want[8];
      std::memcpy(have, &now[k], 8);
      std::memcpy(want, &then[k], 8);
      const uint64_t b = static_cast<uint64_t>(std::mismatch(have, have + 8, want).first - have);
      return make_error(EIO, where() + ": I/O " + std::to_string(i) + " (offset " + format_hex(i * job.block_size) + "): data mismatch at " +
                                 format_hex(buffer_at(slot).value() + at + b) + " (byte " + std::to_string(at + b) +
                                 ") at completion: the buffer was written over while the I/O was in flight");
    }
    return {};
  };

  // Submits I/O `i`: maps its buffer, moves and checks its bytes, unmaps, then queues its
  // timing on the fabric (in two stages when the data goes through host memory).
  const auto submit = [&](uint64_t i) -> Status {
    PHYSR_ASSERT(!free_slots.empty(), "an I/O is submitted only with fewer than queue_depth in flight");
    const uint64_t off = i * job.block_size, slot = free_slots.back();
    free_slots.pop_back();
    flying.emplace_back(i, slot);
    const PhysAddr target = buf_base + slot;
    const PhysAddr staging = staged ? staging_buf->base() + slot : PhysAddr(0);
    RangeList list;
    PHYSR_RETURN_IF_ERROR(list.append(PhysRange{staged ? staging : target, job.block_size, bar && !staged ? bar->id : kHostMemory}));
    // The bytes move in place, with no buffer of the device's own: a read job's SSD streams
    // its namespace into memory, a write job's streams memory into its namespace. A write
    // job's application first fills its buffer (and the staging copy).
    if (write) {
      PHYSR_RETURN_IF_ERROR(fill_pattern(m, target, stream, off, job.block_size));
      if (staged) PHYSR_RETURN_IF_ERROR(m.memory().copy(staging, target, job.block_size));
    }
    PHYSR_RETURN_IF_ERROR(media.prepare(i));
    PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping map, dma.map(list, write ? DmaDirection::to_device : DmaDirection::from_device, attrs), where());
    const auto segs = map.segments();
    (fits_prps(segs) ? out.prp_ios : out.sgl_ios)++;
    const bool bounced = any_bounced(segs);
    bounced_any |= bounced;
    // A read's buffer must end up holding what the device holds, compared in place; a
    // write's device must hold the application's data.
    const auto what = [&] { return where() + ": I/O " + std::to_string(i) + " (offset " + format_hex(off) + ")"; };
    // The verdict of a compare of `len` bytes from byte `from` of the I/O whose first
    // difference is at index k (k == len: none).
    const auto compared = [&](uint64_t from, size_t k, size_t len) -> Status {
      if (k == len) return {};
      return make_error(EIO, what() + ": data mismatch at " + format_hex(target.value() + from + k) + " (byte " + std::to_string(from + k) + ")");
    };
    const auto check_buffer = [&](uint64_t from, uint64_t len) {
      return m.memory().visit(target + from, len, [&](uint64_t o, std::span<const uint8_t> have) -> Status {
        PHYSR_ASSIGN_OR_RETURN(const size_t k, media.mismatch(off + from + o, have));
        return compared(from + o, k, have.size());
      });
    };
    // The same check through the CPU's view of the buffer held from one piece to the next
    // (view_at), falling back to check_buffer where the buffer was never backed: nothing
    // landed there.
    const auto check_landed = [&](uint64_t from, uint64_t len) -> Status {
      const uint8_t* at = view_at(target.value() + from, len);
      if (!at) return check_buffer(from, len);
      const std::span<const uint8_t> have(at, len);
      PHYSR_ASSIGN_OR_RETURN(const size_t k, media.mismatch(off + from, have));
      return compared(from, k, have.size());
    };
    // When the device writes the buffer itself (no bounce, no staging), each piece of kLanding
    // bytes is checked as it lands, while it is in the CPU's L1 cache, through the CPU's own
    // view of the buffer (not the device's addresses): each byte of the I/O goes to exactly
    // one place and its data is unique to its position and this job, so a byte that went
    // astray fails its own check even if a later piece lands on top of it. Bounced or staged
    // data reaches the buffer only at unmap or at the copy, and is checked after them.
    const bool lands_in_place = !write && !bounced && !staged;
    // A run checked as it landed is in the caches: the words of its pages that the
    // completion check compares again (read_samples()) are taken from it there and then,
    // not read back from memory after the I/O. Whole pages only, as read_samples() takes them.
    uint64_t* const samples = write ? nullptr : &sampled[slot / job.block_size * pages];
    const bool sample_landed = !write && job.block_size % kPageSize == 0;
    uint64_t sampled_pages = 0;
    Status st;
    DmaAccess acc;
    uint64_t b = 0;  // the burst's first byte in the I/O
    // The device's side of a burst, one callable each way for all the bursts (they read b),
    // handed to the machine by reference: no std::function of its own per burst.
    const auto take = [&](uint64_t o, std::span<const uint8_t> src) { return media.write(i, b + o, src); };
    const auto give = [&](uint64_t o, std::span<uint8_t> dst) { return media.read(i, b + o, dst); };
    const auto land = [&](uint64_t o, std::span<uint8_t> dst) -> Status {
      // A device side that can check its pieces itself as they land does the whole run in
      // one call (NvmeMedia::read_landed).
      if constexpr (requires { media.read_landed(i, o, dst, std::span<const uint8_t>(), kLanding); }) {
        if (const uint8_t* at = view_at(target.value() + b + o, dst.size())) {
          const std::span<const uint8_t> have(at, dst.size());
          PHYSR_ASSIGN_OR_RETURN(const size_t k, media.read_landed(i, b + o, dst, have, kLanding));
          PHYSR_RETURN_IF_ERROR(compared(b + o, k, have.size()));
          if (sample_landed && ((b + o) | dst.size()) % kPageSize == 0) {
            for (uint64_t p = 0; p < dst.size(); p += kPageSize)
              std::memcpy(&samples[(b + o + p) / kPageSize], at + (sample_at(i, b + o + p) - (b + o)), 8);
            sampled_pages += dst.size() / kPageSize;
          }
          return {};
        }
      }
      for (uint64_t k = 0; k < dst.size(); k += kLanding) {
        const auto piece = dst.subspan(k, std::min<uint64_t>(kLanding, dst.size() - k));
        PHYSR_RETURN_IF_ERROR(media.read(i, b + o + k, piece));
        PHYSR_RETURN_IF_ERROR(check_landed(b + o + k, piece.size()));
      }
      return {};
    };
    const Machine::DmaSink sink = std::cref(take);
    const Machine::DmaSource source = lands_in_place ? Machine::DmaSource(std::cref(land)) : Machine::DmaSource(std::cref(give));
    for (; st && b < job.block_size; b += kBurst) {
      const uint64_t n = std::min(kBurst, job.block_size - b);
      st = take_access(write ? m.dma_read_to(plan.device, segs, b, n, sink) : m.dma_write_from(plan.device, segs, b, n, source), acc);
    }
    Status un = dma.unmap(map);
    PHYSR_RETURN_IF_ERROR(st);
    PHYSR_RETURN_IF_ERROR(un);
    if (!write && staged) PHYSR_RETURN_IF_ERROR(m.memory().copy(target, staging, job.block_size));
    if (write) {
      PHYSR_RETURN_IF_ERROR(media.check_written(i, what));
    } else if (!lands_in_place) {
      PHYSR_RETURN_IF_ERROR(check_buffer(0, job.block_size));
    }
    out.verified_bytes += job.block_size;
    if (!write && sampled_pages != pages) PHYSR_RETURN_IF_ERROR(read_samples(i, slot, samples));
    // Timing: the device's transfer where its addresses went, and the copy between host
    // memory and the BAR when they went to host memory instead of the BAR (the DMA layer
    // bounced, or the job staged): before the device for writes, after it for reads.
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* via, routes_of.get(acc), where());
    // The device's latency for this block, log-normal around the median (docs/sim.md, "The
    // SSD model"): up to the median it passes before the block takes its in-order slot, the
    // rest after it, so a slow command holds up no other.
    const double dev_ns = plan.latency_ns * lognormal_factor(m.options().seed, stream, i, plan.latency_sigma);
    const double head = std::min(dev_ns, plan.latency_ns);
    Route own = *via;
    own.latency_ns += head;
    if (plan.engine) own.resources.push_back(*plan.engine);
    if (acc.peer_switch || acc.peer_rc) taken = via;
    std::vector<Route> routes;
    routes.reserve(2);
    const bool two = bar && acc.host_memory;
    if (two && write) routes.push_back(copy);
    const size_t served = routes.size();  // the device's media (or copy engine) serves this one
    routes.push_back(std::move(own));
    if (two && !write) routes.push_back(copy);
    stages.start(i, std::move(routes), served, {}, dev_ns - head);
    return {};
  };

  // The driver ramps the queue up one command per block's media time, so the commands do
  // not move in lockstep (which would leave the media idle for a whole latency after every
  // wave); from then on each completion is replaced by a new command at once.
  Driver d;
  d.where = where();
  d.set_owner = [&stages](uint32_t owner) { stages.set_owner(owner); };
  d.items = ios;
  d.queue_depth = job.queue_depth;
  d.ramp = std::min<uint64_t>(job.queue_depth, ios);
  d.ramp_gap_ns = plan.slot_ns;
  d.submit = submit;
  // A completed I/O's slot goes back to the free list, after a read's buffer was checked
  // again (a failed check stops the job: its status, which the group's loop reads).
  d.advance = [&](const std::vector<size_t>& finished) -> uint64_t {
    const uint64_t ended = stages.advance(finished, lat);
    for (const uint64_t i : stages.ended()) {
      // In submission order: the I/O that completes is nearly always among the first.
      const auto it = std::find_if(flying.begin(), flying.end(), [&](const auto& f) { return f.first == i; });
      PHYSR_ASSERT(it != flying.end(), "a completed I/O was in flight");
      const uint64_t slot = it->second;
      flying.erase(it);
      if (!write && d.status) {
        if (Status st = check_completed(i, slot); !st) d.status = std::move(st);
      }
      free_slots.push_back(slot);
    }
    return ended;
  };
  PHYSR_RETURN_IF_ERROR(g.run(d));

  if (bar && !staged && !bounced_any && !taken) return make_error(EIO, where() + ": the DMA lists for " + bar->name + " reached no BAR");
  finish_result(out, m, d, stages, lat, job.size, ios);
  out.path = !bar ? "host memory"
             : staged ? "bounce via a host buffer + copy engine"
             : bounced_any ? "bounce (DMA layer, swiotlb)"
             : std::string("p2p ") + pci::map_type_name(taken->p2p) +
                   (taken->resources.empty() ? plan.inside : taken->through_rc ? " (through the root complex)" : " (under the switch)");
  out.via = !bar ? Via::host_memory
            : staged ? Via::staged
            : bounced_any ? Via::bounced
            : taken->p2p == pci::MapType::bus_addr ? Via::p2p_bus_addr
                                                   : Via::p2p_host_bridge;
  return out;
}

}  // namespace physr::sim::detail
