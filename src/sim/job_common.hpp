// What every kind of job shares (NVMe and copy-engine jobs in job.cpp, network jobs in
// net.cpp): its data pattern, its check of what landed, its timing, and how it ends.
// Private to the sim module.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "physr/sim.hpp"

namespace physr::sim::detail {

class Group;

/// The runners of each job kind (nvme.cpp, copy.cpp, net.cpp, odirect.cpp), as run_job()
/// describes them. Each checks its job and sets it up, then runs its Driver with the rest
/// of the group (Group::run()), then fills its result.
Result<JobResult> run_nvme_job(Machine& m, const Job& job, const NvmeJob& kind, Group& g);
Result<JobResult> run_copy_job(Machine& m, const Job& job, const CopyJob& kind, Group& g);
Result<JobResult> run_net_job(Machine& m, const Job& job, const NetJob& kind, Group& g);
Result<JobResult> run_direct_io_job(Machine& m, const Job& job, const DirectIoJob& kind, Group& g);
/// A network job whose receiver uses page pools (NetJob::rx devmem or copy): devmem_rx.cpp.
Result<JobResult> run_pool_rx_job(Machine& m, const Job& job, const NetJob& kind, Group& g);
/// A network job whose sender transmits from device memory (NetJob::tx devmem): devmem_tx.cpp.
Result<JobResult> run_devmem_tx_job(Machine& m, const Job& job, const NetJob& kind, Group& g);
/// A device working on a process's buffer through a mirror (HmmJob): hmm_job.cpp.
Result<JobResult> run_hmm_job(Machine& m, const Job& job, const HmmJob& kind, Group& g);

/// Fills `out` with the data at position `pos` of data stream `stream` (an NVMe namespace,
/// a packet sequence; one per job): each 64-bit word is its own position plus a hash of its
/// 4 KiB page and the stream, so bytes that land in the wrong place, at the wrong offset or
/// from another job differ. One add per vector, so
/// it vectorises: generating the data must not cost more than moving it.
void pattern(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept;
/// The index of the first byte of `have` that differs from pattern(stream, pos), or have.size().
/// Generates and compares in registers: one pass over `have`, nothing stored.
size_t pattern_mismatch(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept;
/// A device writing pattern(stream, pos) into `out` in pieces of `piece` bytes, each checked
/// as it lands through `view` (the CPU's view of the bytes the device meant to write, the
/// same size as `out`): pattern() of a piece into `out`, then pattern_mismatch() of it in
/// `view`, piece after piece, so each is compared while it is in the L1 cache. The index
/// into `view` of the first byte that differs, or view.size(). One call for a run of pieces
/// instead of a call chain each.
size_t pattern_landed(uint64_t stream, uint64_t pos, std::span<uint8_t> out, std::span<const uint8_t> view, uint64_t piece) noexcept;

/// Writes pattern(stream, pos) into physical memory [at, at + len), in place.
inline Status fill_pattern(Machine& m, PhysAddr at, uint64_t stream, uint64_t pos, uint64_t len) {
  return m.memory().fill(at, len, [&](uint64_t off, std::span<uint8_t> piece) {
    pattern(stream, pos + off, piece);
    return Status{};
  });
}

/// Checks that physical memory [at, at + len) holds pattern(stream, pos), in place; EIO naming
/// `what()` (only built on failure) and the first differing address otherwise.
template <class What>
Status verify_pattern(const Machine& m, PhysAddr at, uint64_t stream, uint64_t pos, uint64_t len, const What& what) {
  uint64_t bad = len;
  const Status st = m.memory().visit(at, len, [&](uint64_t off, std::span<const uint8_t> have) -> Status {
    const size_t k = pattern_mismatch(stream, pos + off, have);
    if (k == have.size()) return {};
    bad = off + k;
    return make_error(EIO, what() + ": data mismatch at " + format_hex(at.value() + bad) + " (byte " + std::to_string(bad) + ")");
  });
  return st;
}

/// A job's buffers in a device's BAR: `bytes` (rounded up to 4 KiB) taken from the BAR
/// owner's P2P memory pool through its allocate file (Machine::allocate_file, Linux
/// pci_alloc_p2pmem()), given back when the job ends (pci_free_p2pmem(): back in the pool
/// after a grace period, which the job waits for, so the next job finds the pool whole and
/// its buffers at the same addresses). Move-only.
class PoolBuffer {
 public:
  /// ENOMEM naming `where` and the BAR when the pool has no room; allocate_file()'s errors.
  static Result<PoolBuffer> take(Machine& m, const Aperture& bar, uint64_t bytes, const std::string& where) {
    PHYSR_ASSIGN_OR_RETURN_CTX(mem::P2PMemorySource* file, m.allocate_file(bar.function), where);
    PHYSR_ASSIGN_OR_RETURN_CTX(const mem::P2PChunk c, file->alloc(bytes), where + ": buffers in " + bar.name);
    return PoolBuffer(m, *file, c);
  }
  PoolBuffer(PoolBuffer&& o) noexcept : m_(o.m_), file_(std::exchange(o.file_, nullptr)), chunk_(o.chunk_) {}
  PoolBuffer(const PoolBuffer&) = delete;
  PoolBuffer& operator=(const PoolBuffer&) = delete;
  PoolBuffer& operator=(PoolBuffer&&) = delete;
  ~PoolBuffer() {
    if (!file_) return;
    const Status st = file_->release(chunk_.span);
    PHYSR_ASSERT(st.has_value(), "a job's pool buffer goes back to the file it came from");
    m_->p2pmem().barrier();
  }
  PhysAddr base() const noexcept { return chunk_.span.base; }
  PhysSpan span() const noexcept { return chunk_.span; }

 private:
  PoolBuffer(Machine& m, mem::P2PMemorySource& file, const mem::P2PChunk& c) : m_(&m), file_(&file), chunk_(c) {}
  Machine* m_;
  mem::P2PMemorySource* file_;
  mem::P2PChunk chunk_;
};

/// A job's buffers in host memory: `bytes` (rounded up to 4 KiB) from the machine's host
/// allocator (Machine::host_memory()) on `node` (the device's), given back when the job
/// ends, so jobs that run at once never share host buffers. Move-only.
class HostBuffer {
 public:
  /// ENOMEM naming `where` when host memory has no room; HostAllocator::alloc()'s errors.
  static Result<HostBuffer> take(Machine& m, uint64_t bytes, int node, const std::string& where, uint64_t align = kPageSize) {
    PHYSR_ASSIGN_OR_RETURN(const PhysSpan s, m.host_memory().alloc(bytes, node, where, align));
    return HostBuffer(m, s);
  }
  HostBuffer(HostBuffer&& o) noexcept : m_(std::exchange(o.m_, nullptr)), span_(o.span_) {}
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  HostBuffer& operator=(HostBuffer&&) = delete;
  ~HostBuffer() {
    if (!m_) return;
    const Status st = m_->host_memory().free(span_);
    PHYSR_ASSERT(st.has_value(), "a job's host buffer goes back to the allocator it came from");
  }
  PhysAddr base() const noexcept { return span_.base; }
  PhysSpan span() const noexcept { return span_; }

 private:
  HostBuffer(Machine& m, PhysSpan s) : m_(&m), span_(s) {}
  Machine* m_;
  PhysSpan span_;
};

/// Whether the DMA layer bounced any segment of a mapping.
inline bool any_bounced(std::span<const DmaSegment> segs) noexcept {
  for (const DmaSegment& s : segs)
    if (s.flags & kDmaSegBounced) return true;
  return false;
}

/// Folds a DMA access into `acc` (the accesses of one item) and turns a failed bus outcome
/// into the job's error: EFAULT for an IOMMU fault, EREMOTEIO for an unsupported request,
/// EIO for a decode error, with the first failing piece's description.
inline Status take_access(Result<DmaAccess> r, DmaAccess& acc) {
  PHYSR_ASSIGN_OR_RETURN(const DmaAccess& a, std::move(r));
  acc.merge(a);
  if (a.ok()) return {};
  const int code = a.result & kBusIommuFault ? EFAULT : a.result & kBusUnsupportedRequest ? EREMOTEIO : EIO;
  return make_error(code, a.why);
}

/// The fabric route of a device's transfers as their addresses decoded (a peer's BAR under
/// the switch, a peer's BAR through the root complex, or host memory), computed once per
/// destination: timing follows the addresses the DMA layer produced, not a verdict taken
/// before mapping.
class RouteCache {
 public:
  RouteCache(const Fabric& fabric, uint32_t device, bool device_writes) : fab_(&fabric), dev_(device), writes_(device_writes) {}
  /// The route for an access; errors as Fabric::to_peer / to_peer_via_rc / to_memory.
  Result<const Route*> get(const DmaAccess& a) {
    const int kind = a.peer_switch ? 1 : a.peer_rc ? 2 : 0;
    const uint32_t peer = kind ? a.peer : 0;
    for (const auto& [k, p, r] : routes_)
      if (k == kind && p == peer) return &r;
    PHYSR_ASSIGN_OR_RETURN(Route r, kind == 1   ? fab_->to_peer(dev_, peer, writes_)
                                    : kind == 2 ? fab_->to_peer_via_rc(dev_, peer, writes_)
                                                : fab_->to_memory(dev_, -1, writes_));
    routes_.push_back({kind, peer, std::move(r)});
    return &std::get<2>(routes_.back());
  }

 private:
  const Fabric* fab_;
  uint32_t dev_;
  bool writes_;
  std::deque<std::tuple<int, uint32_t, Route>> routes_;  // few, one per destination; a deque keeps them in place
};

/// Job latencies, bounded in memory whatever the number of items: a log-linear histogram
/// (as HdrHistogram's) over whole nanoseconds. Values below 128 ns are counted exactly;
/// above, each power of two is split into 128 buckets, so a percentile (its bucket's
/// midpoint) is within 1/256 (0.4%) of the sample's value. At most 7,424 counters.
class LatencyHistogram {
 public:
  void add(double ns);
  uint64_t count() const noexcept { return n_; }
  /// The nearest-rank percentile (p in [0, 1]: the sample of rank round(p x (n - 1)) in
  /// order), in ns; 0 when empty.
  double percentile(double p) const;

 private:
  std::vector<uint64_t> counts_;  // grows to the highest bucket used
  uint64_t n_ = 0;
};

/// The factor exp(sigma x Z) of a log-normal draw with median 1, Z a standard normal
/// (Box-Muller) from a hash of (seed, stream, i): the same arguments give the same factor.
double lognormal_factor(uint64_t seed, uint64_t stream, uint64_t i, double sigma) noexcept;

/// A seeded permutation of [0, n): a bijection on the next power of two (odd multiplies,
/// xor-shifts and adds, each invertible), walked until it lands below n (fio's random map:
/// every block once, in an order the seed fixes).
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t seed) noexcept;
  uint64_t operator()(uint64_t i) const noexcept;

 private:
  uint64_t n_, mask_, k1_, k2_;
  unsigned half_;
};

/// The timing of a job's items (I/Os, packets): each crosses its routes one after another,
/// and one of its stages is served in order by a device (an SSD's media, a copy engine, a
/// wire), which starts it no earlier than the end of the previous item's slot there. Fair
/// sharing instead would let the items fall into lockstep and leave the device idle for a
/// latency after every wave, which devices do not do. Memory is bounded by the items in
/// flight: an item's record and its flows are given back as it ends.
class Stages {
 public:
  Stages(Simulator& sim, uint64_t items, uint64_t bytes, double slot_ns)
      : sim_(sim), bytes_(bytes), slot_ns_(slot_ns) {
    (void)items;
  }
  Stages(const Stages&) = delete;
  Stages& operator=(const Stages&) = delete;
  /// Starts an item now: `routes` in order, `served` the index of the one served in order.
  /// Each route carries the item's bytes, or bytes[k] over route k when `bytes` is given
  /// (an item whose data goes several ways one after another). `tail_ns`: time the item
  /// spends after its slot on the in-order device and before its data moves (an SSD
  /// command's latency beyond its median), which holds up no other item.
  void start(uint64_t i, std::vector<Route> routes, size_t served, std::vector<uint64_t> bytes = {}, double tail_ns = 0);
  /// Moves the flows in `finished` (from Simulator::step or idle_until) on to their next
  /// stage; adds the latency of each item whose last stage ended to `lat` and returns how
  /// many did.
  uint64_t advance(const std::vector<size_t>& finished, LatencyHistogram& lat);
  /// The same, appending each latency (in ns) to a vector.
  uint64_t advance(const std::vector<size_t>& finished, std::vector<double>& lat);
  /// Tags the items' flows with `owner` (Simulator::add), for a group's loop.
  void set_owner(uint32_t owner) noexcept { owner_ = owner; }
  /// Makes the in-order device the one at `free` (when it is next free), which other jobs
  /// of a group on the same device share; it must outlive the items. Unset: a device of
  /// this job's own.
  void share_device(double* free) noexcept { free_ = free; }
  /// Bytes each fabric resource (by index) carried for this job's finished stages: the
  /// job's own per-resource counters, whatever else ran at the same time.
  const std::vector<uint64_t>& resource_bytes() const noexcept { return res_bytes_; }
  /// The items (their `i` at start) whose last stage ended in the last advance, in order.
  const std::vector<uint64_t>& ended() const noexcept { return ended_; }

 private:
  template <class Add>
  uint64_t advance_with(const std::vector<size_t>& finished, const Add& add);
  void queue(uint32_t slot, size_t k);
  struct Item {
    uint64_t id = 0;
    double submit = 0, tail = 0;
    std::vector<Route> routes;
    size_t served = 0;
    std::vector<uint64_t> bytes;  // per route; empty: bytes_ each
  };
  Simulator& sim_;
  uint64_t bytes_;
  double slot_ns_, own_free_ = 0;  // when the job's own in-order device is next free
  double* free_ = &own_free_;      // the in-order device's next free time (a group's shared one)
  uint32_t owner_ = 0;
  std::vector<Item> items_;    // records of the items in flight, reused
  std::vector<uint32_t> free_items_;
  std::vector<std::pair<uint32_t, uint32_t>> flow_of_;  // by flow index: item record, stage
  std::vector<uint64_t> res_bytes_;                      // by resource index
  std::vector<uint64_t> ended_;
};

/// One job of a group as the group's loop drives it: it keeps `queue_depth` of its
/// `items` in flight through `submit(i)` (which moves and checks item i's bytes and starts
/// its timing on its Stages), and its finished flows go to `advance` (its
/// Stages::advance(), which returns how many items ended). A block job ramps its queue up
/// one item per `ramp_gap_ns` for its first `ramp` items. The loop fills in the rest.
struct Driver {
  std::string where;  // "job 'NAME'", for the loop's errors
  std::function<void(uint32_t owner)> set_owner;  // tags the job's flows with its index in the group
  uint64_t items = 0, queue_depth = 1;
  uint64_t ramp = 0;
  double ramp_gap_ns = 0;
  std::function<Status(uint64_t i)> submit;
  std::function<uint64_t(const std::vector<size_t>& finished)> advance;
  // Filled in by the loop.
  uint64_t next = 0, completed = 0, in_flight = 0, next_report = 0, faults = 0;
  double ready_at = 0, start_ns = 0, end_ns = 0;  // submits no earlier than ready_at; ran [start_ns, end_ns]
  Status status;  // the error that stopped it
  bool done() const noexcept { return !status || completed >= items; }
};

/// Jobs that run at once on one machine (a group of run_jobs(), fio's jobs between two
/// stonewalls): one Simulator, so their flows share every link, switch, root complex and
/// memory controller, and in-order devices (an SSD's media, a copy engine, a wire) that
/// jobs on the same device share. Each job's runner sets its job up, then calls run()
/// with its Driver: run() returns once every job of the group has ended (the group's
/// loop runs inside the last job's call), and the runner fills its result from its own
/// counters. A group of one is how a job runs alone.
class Group {
 public:
  Group(Machine& m, size_t jobs, std::function<void(size_t job, uint64_t done, uint64_t total)> progress)
      : m_(m), sim_(m.fabric()), drivers_(jobs, nullptr), ran_(jobs, 0), progress_(std::move(progress)) {}
  Machine& machine() noexcept { return m_; }
  Simulator& sim() noexcept { return sim_; }
  /// When the in-order device `name` (an SSD's media, a copy engine, a wire) is next free,
  /// shared by the group's jobs that use it (Stages::share_device()).
  double* device(const std::string& name) { return &devices_[name]; }
  /// Runs `d` with the group's other jobs until all have ended; d.status (EIO: the
  /// simulation stalled; submit's error otherwise). Called at most once per job.
  Status run(Driver& d);
  /// Runs the group: `job(k)` runs job k's runner (which calls run()), for each k in order;
  /// a runner that returns without calling run() (its job failed in setup) is skipped.
  void start(const std::function<void(size_t k)>& job);

 private:
  void chain(size_t k);
  void loop();
  Machine& m_;
  Simulator sim_;
  std::vector<Driver*> drivers_;  // by job; null: not (yet) running; valid while the loop runs
  std::vector<char> ran_;         // by job: its runner called run()
  std::function<void(size_t, uint64_t, uint64_t)> progress_;
  std::map<std::string, double> devices_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t current_ = 0;   // the job whose runner is being called
  bool looped_ = false;  // the loop ran
  std::vector<std::vector<size_t>> by_owner_;  // the loop's scratch
};

/// Sets `d` up for a job of `items` items, `queue_depth` in flight, started by `submit(i)`
/// on `stages` with latencies into `lat`, and runs it with its group (Group::run()).
template <class Latencies, class Submit>
Status run_items(Group& g, Driver& d, Stages& stages, Latencies& lat, uint64_t items, uint64_t queue_depth, std::string where,
                 const Submit& submit) {
  d.where = std::move(where);
  d.set_owner = [&stages](uint32_t owner) { stages.set_owner(owner); };
  d.items = items;
  d.queue_depth = queue_depth;
  d.submit = submit;
  d.advance = [&stages, &lat](const std::vector<size_t>& finished) { return stages.advance(finished, lat); };
  return g.run(d);
}

/// Fills the common part of a job's result from its run: bytes and I/O count, simulated
/// time [d.start_ns, d.end_ns] and throughput, latency p50/p99/p99.9 (nearest rank of
/// `lat`, in ns), the bytes over every resource that carried any of this job's (and
/// those through root complexes and host memory), from `stages`' own counters, and the
/// IOMMU faults its I/Os recorded.
void finish_result(JobResult& out, const Machine& m, const Driver& d, const Stages& stages, const LatencyHistogram& lat,
                   uint64_t bytes, uint64_t ios);
/// The same from latencies in a vector (ns).
void finish_result(JobResult& out, const Machine& m, const Driver& d, const Stages& stages, std::vector<double>& lat,
                   uint64_t bytes, uint64_t ios);
/// The same from the job's own bytes per fabric resource (by index), for a timing other than Stages.
void finish_result(JobResult& out, const Machine& m, const Driver& d, const std::vector<uint64_t>& resource_bytes,
                   const LatencyHistogram& lat, uint64_t bytes, uint64_t ios);

}  // namespace physr::sim::detail
