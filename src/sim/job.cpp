// fio-like NVMe jobs on the machine model: every I/O mapped through the DMA layer, its bytes
// moved and verified, and its time taken from the fabric.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "physr/sim.hpp"
#include "sim/job_result.hpp"

namespace physr::sim {

const char* path_policy_name(PathPolicy p) noexcept {
  switch (p) {
    case PathPolicy::p2p: return "p2p";
    case PathPolicy::bounce: return "bounce";
    case PathPolicy::automatic: return "auto";
  }
  return "?";
}

namespace {

constexpr uint64_t kHostBuffers = 1 * GiB, kHostStaging = 1536 * MiB, kHostWindow = 256 * MiB;

// The namespace's content: a pattern that depends on the byte's position, so a block that
// lands in the wrong place or at the wrong offset is caught. Generated a 64-bit word at a
// time (offsets and sizes are multiples of 512).
void pattern(uint64_t offset, std::span<uint8_t> out) {
  for (size_t i = 0; i + 8 <= out.size(); i += 8) {
    uint64_t z = (offset + i) * 0x9E3779B97F4A7C15ull;
    z ^= z >> 29;
    std::memcpy(out.data() + i, &z, 8);
  }
}

// A namespace backed by a sparse temporary file (deleted at once; it lives while open).
// Blocks never written read as the factory pattern, so a read job over 10 GiB needs no
// 10 GiB of disk; written blocks are in the file (tracked per block of `unit` bytes).
class Namespace {
 public:
  static Result<Namespace> create(uint64_t size, uint64_t unit) {
    const char* dir = std::getenv("TMPDIR");
    std::string path = std::string(dir && *dir ? dir : "/tmp") + "/physr-nvme-XXXXXX";
    const int fd = mkstemp(path.data());
    if (fd < 0) return make_error(errno, "NVMe namespace: cannot create a file in " + path + ": " + std::strerror(errno));
    unlink(path.c_str());
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
      const int e = errno;
      close(fd);
      return make_error(e, "NVMe namespace: cannot size the file to " + format_size(size) + ": " + std::strerror(e));
    }
    Namespace ns(fd);
    ns.unit_ = unit;
    ns.written_.assign(size / unit, false);
    return ns;
  }
  Namespace(Namespace&& o) noexcept : fd_(std::exchange(o.fd_, -1)), unit_(o.unit_), written_(std::move(o.written_)) {}
  ~Namespace() {
    if (fd_ >= 0) close(fd_);
  }
  // Reads and writes are whole blocks of `unit` bytes at multiples of it.
  Status read(uint64_t off, std::span<uint8_t> out) const {
    if (!written_[off / unit_]) {
      pattern(off, out);
      return {};
    }
    if (pread(fd_, out.data(), out.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(out.size()))
      return make_error(EIO, "NVMe namespace: short read at " + format_hex(off));
    return {};
  }
  Status write(uint64_t off, std::span<const uint8_t> in) {
    if (pwrite(fd_, in.data(), in.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(in.size()))
      return make_error(EIO, "NVMe namespace: short write at " + format_hex(off));
    written_[off / unit_] = true;
    return {};
  }

 private:
  explicit Namespace(int fd) : fd_(fd) {}
  int fd_ = -1;
  uint64_t unit_ = 1;
  std::vector<bool> written_;
};

// NVMe PRP rules: only the first entry may start inside a page, and every segment but the
// last must end on a page boundary. Otherwise the command needs an SGL.
bool fits_prps(std::span<const DmaSegment> segs) {
  for (size_t k = 0; k < segs.size(); ++k) {
    if (k > 0 && (segs[k].addr.value() & (kPageSize - 1)) != 0) return false;
    if (k + 1 < segs.size() && ((segs[k].addr.value() + segs[k].len) & (kPageSize - 1)) != 0) return false;
  }
  return true;
}

}  // namespace

Result<JobResult> run_job(Machine& m, const Job& job) {
  if (job.peer) return run_net_job(m, job);
  const pci::Topology& topo = m.topology();
  const auto where = [&] { return "job '" + job.name + "'"; };
  if (job.device >= topo.functions.size()) return make_error(EINVAL, where() + ": no such device");
  if ((topo.functions[job.device].class_code >> 8) != 0x0108)
    return make_error(EINVAL, where() + ": " + m.label(job.device) + " is not an NVMe controller (class " + format_hex(topo.functions[job.device].class_code) + ")");
  if (job.block_size == 0 || job.block_size % 512 != 0 || job.block_size > 4 * MiB)
    return make_error(EINVAL, where() + ": block size " + std::to_string(job.block_size) + " must be a multiple of 512 up to 4 MiB");
  if (job.queue_depth == 0 || job.queue_depth > 1024) return make_error(EINVAL, where() + ": queue depth must be 1 to 1024");
  if (job.size == 0 || job.size % job.block_size != 0)
    return make_error(EINVAL, where() + ": size " + std::to_string(job.size) + " must be a non-zero multiple of the block size");
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kHostWindow) return make_error(EINVAL, where() + ": block size x queue depth exceeds the 256 MiB of buffers");

  // Where the buffers are.
  const Aperture* bar = nullptr;
  if (job.buffer_function) {
    bar = m.largest_bar(*job.buffer_function);
    if (!bar) return make_error(EINVAL, where() + ": " + m.label(*job.buffer_function) + " has no memory BAR to hold the buffers");
    if (bar->span.size < window) return make_error(EINVAL, where() + ": " + bar->name + " (" + format_size(bar->span.size) + ") cannot hold " + format_size(window) + " of buffers");
  }
  auto dev = m.device(job.device);
  if (!dev) return std::move(dev).error();
  DmaDevice& nvme = **dev;
  Fabric& fab = m.fabric();
  fab.reset_counters();
  const size_t faults_before = m.faults().size();

  // The SSD's media serves commands first come, first served, one block's media time each
  // (a shared, fairly divided resource would let the commands fall into lockstep and leave
  // the media idle for a latency after every wave, which SSDs do not do). A command's data
  // moves after its latency and its media slot, over the fabric.
  const double dev_latency = job.write ? m.options().nvme_write_latency_ns : m.options().nvme_read_latency_ns;
  const double slot_ns = static_cast<double>(job.block_size) / (job.write ? m.options().nvme_write_gbps : m.options().nvme_read_gbps);
  double media_free = 0;

  JobResult out;
  out.name = job.name;
  out.device = m.label(job.device);
  out.buffer = bar ? bar->name : "host memory";
  const bool staged = bar && job.path == PathPolicy::bounce;
  const uint32_t attrs = job.path == PathPolicy::automatic ? kDmaAttrAllowBounce : 0;

  // Routes: SSD <-> buffer, and for explicit staging the copy between host and the BAR.
  Route main;
  bool peer_ok = false;
  if (bar && !staged) {
    auto r = fab.to_peer(job.device, bar->function, !job.write);
    if (r) {
      main = *r;
      peer_ok = true;
    } else if (job.path == PathPolicy::p2p) {
      return make_error(EREMOTEIO, where() + ": " + r.error().message);
    }
  }
  const bool inside = peer_ok && main.resources.empty();  // the SSD's own CMB
  const bool via_memory = !peer_ok;
  if (via_memory) main = *fab.to_memory(job.device, -1, !job.write);
  main.latency_ns += dev_latency;
  Route copy;
  if (bar) {
    copy = *fab.to_memory(bar->function, -1, job.write);  // the BAR side reads (read job) or writes host memory
    if (staged) copy.resources.push_back(fab.add_resource(Resource::Kind::device, m.label(bar->function) + " copy engine", m.options().copy_engine_gbps));
  }

  auto ns = Namespace::create(job.size, job.block_size);
  if (!ns) return std::move(ns).error();
  std::vector<uint8_t> buf(job.block_size), got(job.block_size);

  Simulator sim(fab);
  struct Io {
    double submit = 0;
    std::vector<Route> stages;  // run one after another
    size_t ssd_stage = 0;       // the one the SSD's media serves
  };
  struct FlowRef {
    uint64_t io;
    size_t stage;
  };
  std::vector<Io> io(job.size / job.block_size);
  std::vector<FlowRef> flow_of;  // by flow index
  std::vector<double> lat;
  const uint64_t ios = io.size();
  uint64_t next = 0, completed = 0;
  bool bounced_any = false;

  // Queues stage `k` of I/O `i` on the fabric; the SSD's stage waits for its media slot.
  const auto start_stage = [&](uint64_t i, size_t k) {
    const Route& r = io[i].stages[k];
    double at = sim.now();
    if (k == io[i].ssd_stage) {
      const double start = std::max(sim.now() + r.latency_ns, media_free);
      media_free = start + slot_ns;
      at = start - r.latency_ns;
    }
    flow_of.push_back(FlowRef{i, k});
    sim.add(r, job.block_size, at);
  };

  // Submits I/O `i`: maps its buffer, moves and checks its bytes, unmaps, then queues its
  // timing on the fabric (in two stages when the data goes through host memory).
  const auto submit = [&](uint64_t i) -> Status {
    const uint64_t off = i * job.block_size, slot = (i % job.queue_depth) * job.block_size;
    const PhysAddr target = bar ? bar->span.base + slot : PhysAddr(kHostBuffers + slot);
    const PhysAddr staging(kHostStaging + slot);
    RangeList list;
    PHYSR_TRY(list.append(PhysRange{staged ? staging : target, job.block_size, bar && !staged ? bar->id : kHostMemory}));
    if (job.write) {  // the application's data, in the buffer (and copied to staging)
      pattern(off, buf);
      PHYSR_TRY(m.memory().write(target, buf));
      if (staged) PHYSR_TRY(m.memory().copy(staging, target, job.block_size));
    }
    auto map = nvme.map(list, job.write ? DmaDirection::to_device : DmaDirection::from_device, attrs);
    if (!map) return make_error(map.error().code, where() + ": " + map.error().message);
    const auto segs = map->segments();
    (fits_prps(segs) ? out.prp_ios : out.sgl_ios)++;
    bool bounced = false;
    for (const DmaSegment& s : segs) bounced |= (s.flags & kDmaSegBounced) != 0;
    bounced_any |= bounced;
    Status st;
    if (job.write) {  // the SSD reads the buffer and writes its media
      st = m.dma_read(job.device, segs, got);
      if (st) st = ns->write(off, got);
    } else {  // the SSD reads its media and writes the buffer
      st = ns->read(off, got);
      if (st) st = m.dma_write(job.device, segs, got);
    }
    Status un = nvme.unmap(*map);
    PHYSR_TRY(st);
    PHYSR_TRY(un);
    if (!job.write && staged) PHYSR_TRY(m.memory().copy(target, staging, job.block_size));
    // Verify against the source: a read's buffer must hold what the SSD read from its
    // namespace; a write's namespace block must hold the application's data.
    if (job.write) {
      PHYSR_TRY(ns->read(off, got));
    } else {
      std::swap(buf, got);  // buf: the SSD's data; got: what landed in the buffer
      PHYSR_TRY(m.memory().read(target, got));
    }
    if (got != buf) return make_error(EIO, where() + ": I/O " + std::to_string(i) + " (offset " + format_hex(off) + "): data mismatch");
    out.verified_bytes += job.block_size;
    // Timing: the SSD's transfer, and the copy between host memory and the BAR when the
    // DMA layer bounced or the job staged (before the SSD for writes, after it for reads).
    Route ssd = main;
    if (bounced && !via_memory) {
      ssd = *fab.to_memory(job.device, -1, !job.write);
      ssd.latency_ns += dev_latency;
    }
    io[i].submit = sim.now();
    io[i].stages.clear();
    const bool two = bar && (bounced || staged);
    if (two && job.write) io[i].stages.push_back(copy);
    io[i].ssd_stage = io[i].stages.size();
    io[i].stages.push_back(ssd);
    if (two && !job.write) io[i].stages.push_back(copy);
    start_stage(i, 0);
    return {};
  };

  uint64_t in_flight = 0;
  const auto on_done = [&](const std::vector<size_t>& finished) {
    for (size_t f : finished) {
      const FlowRef ref = flow_of[f];
      Io& x = io[ref.io];
      if (ref.stage + 1 < x.stages.size()) {  // the next stage of a bounced I/O
        start_stage(ref.io, ref.stage + 1);
        continue;
      }
      lat.push_back(sim.now() - x.submit);
      x.stages.clear();
      ++completed;
      --in_flight;
    }
  };
  // The driver ramps the queue up one command per block's media time, so the commands do
  // not move in lockstep (which would leave the media idle for a whole latency after every
  // wave); from then on each completion is replaced by a new command at once.
  const double gap = slot_ns;
  const uint64_t ramp = std::min<uint64_t>(job.queue_depth, ios);
  while (completed < ios) {
    if (in_flight < job.queue_depth && next < ios) {
      PHYSR_TRY(submit(next++));
      ++in_flight;
      if (next <= ramp) on_done(sim.idle_until(sim.now() + gap));
      continue;
    }
    const auto finished = sim.step();
    if (finished.empty()) return make_error(EIO, where() + ": the simulation stalled");  // cannot happen: every flow ends
    on_done(finished);
  }

  detail::finish_result(out, m, sim, lat, job.size, ios, faults_before);
  out.path = !bar ? "host memory"
             : staged ? "bounce via a host buffer + copy engine"
             : bounced_any ? "bounce (DMA layer, swiotlb)"
             : std::string("p2p ") + pci::map_type_name(main.p2p) +
                   (inside ? " (inside the SSD)" : main.through_rc ? " (through the root complex)" : " (under the switch)");
  return out;
}

namespace detail {

void finish_result(JobResult& out, const Machine& m, const Simulator& sim, std::vector<double>& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before) {
  out.ios = ios;
  out.bytes = bytes;
  out.seconds = sim.now() * 1e-9;
  out.gbps = sim.now() > 0 ? static_cast<double>(bytes) / sim.now() : 0;
  std::sort(lat.begin(), lat.end());
  const auto pct = [&](double p) {
    return lat.empty() ? 0.0 : lat[std::min(lat.size() - 1, static_cast<size_t>(p * static_cast<double>(lat.size() - 1) + 0.5))];
  };
  out.lat_p50_us = pct(0.50) / 1000;
  out.lat_p99_us = pct(0.99) / 1000;
  for (const Resource& r : m.fabric().resources()) {
    if (r.bytes == 0) continue;
    out.link_bytes.emplace_back(r.name, r.bytes);
    if (r.kind == Resource::Kind::rc_forward) out.rc_bytes += r.bytes;
    if (r.kind == Resource::Kind::memory) out.host_memory_bytes += r.bytes;
  }
  out.iommu_faults = m.faults().size() - faults_before;
}

}  // namespace detail

}  // namespace physr::sim
