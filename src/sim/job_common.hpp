// What every kind of job shares (NVMe and copy-engine jobs in job.cpp, network jobs in
// net.cpp): its data pattern, its check of what landed, its timing, and how it ends.
// Private to the sim module.
#pragma once

#include <deque>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "physr/sim.hpp"

namespace physr::sim::detail {

/// The runners of each job kind (nvme.cpp, copy.cpp, net.cpp, odirect.cpp), as run_job() describes them.
Result<JobResult> run_nvme_job(Machine& m, const Job& job, const NvmeJob& kind);
Result<JobResult> run_copy_job(Machine& m, const Job& job, const CopyJob& kind);
Result<JobResult> run_net_job(Machine& m, const Job& job, const NetJob& kind);
Result<JobResult> run_direct_io_job(Machine& m, const Job& job, const DirectIoJob& kind);
/// A network job whose receiver uses page pools (NetJob::rx devmem or copy): devmem_rx.cpp.
Result<JobResult> run_pool_rx_job(Machine& m, const Job& job, const NetJob& kind);
/// A network job whose sender transmits from device memory (NetJob::tx devmem): devmem_tx.cpp.
Result<JobResult> run_devmem_tx_job(Machine& m, const Job& job, const NetJob& kind);
/// A device working on a process's buffer through a mirror (HmmJob): hmm_job.cpp.
Result<JobResult> run_hmm_job(Machine& m, const Job& job, const HmmJob& kind);

/// Fills `out` with the data at position `pos` of data stream `stream` (an NVMe namespace,
/// a packet sequence; one per job): each 64-bit word is its own position plus a hash of its
/// 4 KiB page and the stream, so bytes that land in the wrong place, at the wrong offset or
/// from another job differ. One add per vector, so
/// it vectorises: generating the data must not cost more than moving it.
void pattern(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept;
/// The index of the first byte of `have` that differs from pattern(stream, pos), or have.size().
/// Generates and compares in registers: one pass over `have`, nothing stored.
size_t pattern_mismatch(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept;

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

 private:
  PoolBuffer(Machine& m, mem::P2PMemorySource& file, const mem::P2PChunk& c) : m_(&m), file_(&file), chunk_(c) {}
  Machine* m_;
  mem::P2PMemorySource* file_;
  mem::P2PChunk chunk_;
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
  const auto bits = static_cast<uint8_t>(a.result);
  const int code = bits & static_cast<uint8_t>(BusResult::iommu_fault)           ? EFAULT
                   : bits & static_cast<uint8_t>(BusResult::unsupported_request) ? EREMOTEIO
                                                                                 : EIO;
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
  double slot_ns_, free_ = 0;  // when the in-order device is next free
  std::vector<Item> items_;    // records of the items in flight, reused
  std::vector<uint32_t> free_items_;
  std::vector<std::pair<uint32_t, uint32_t>> flow_of_;  // by flow index: item record, stage
  std::vector<uint64_t> ended_;
};

/// Tells the machine's on_progress hook (if set) how far a job is once `done` reaches
/// `next`, then moves `next` on by 1/256 of the job: a compare per completion otherwise.
inline void report_progress(const Machine& m, uint64_t done, uint64_t total, uint64_t& next) {
  if (done < next) return;
  if (m.on_progress) m.on_progress(done, total);
  next = done + (total / 256 > 0 ? total / 256 : 1);
}

/// The loop every packet job runs: keeps `queue_depth` packets in flight through `send(i)`
/// (which starts packet i on `stages`), steps the simulator and moves finished flows on,
/// until `packets` have ended; progress reported as block jobs do.
template <class Latencies, class Send>
Status run_packets(const Machine& m, Simulator& sim, Stages& stages, Latencies& lat, uint64_t packets,
                   uint64_t queue_depth, const std::string& job_name, const Send& send) {
  uint64_t next = 0, done = 0, in_flight = 0, next_report = 0;
  while (done < packets) {
    for (; in_flight < queue_depth && next < packets; ++next, ++in_flight) PHYSR_RETURN_IF_ERROR(send(next));
    const auto finished = sim.step();
    if (finished.empty()) return make_error(EIO, "job '" + job_name + "': the simulation stalled");
    const uint64_t ended = stages.advance(finished, lat);
    done += ended;
    in_flight -= ended;
    report_progress(m, done, packets, next_report);
  }
  return {};
}

/// Fills the common part of a job's result from its run: bytes and I/O count, simulated
/// time and throughput, latency p50/p99/p99.9 (nearest rank of `lat`, in ns), the bytes
/// over every resource that carried any (and those through root complexes and host
/// memory), and the IOMMU faults recorded since `faults_before`.
void finish_result(JobResult& out, const Machine& m, const Simulator& sim, const LatencyHistogram& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before);
/// The same from latencies in a vector (ns).
void finish_result(JobResult& out, const Machine& m, const Simulator& sim, std::vector<double>& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before);

}  // namespace physr::sim::detail
