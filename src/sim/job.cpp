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
#include "sim/job_common.hpp"

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
// The SSD moves an I/O in bursts this size (real engines move max-payload-size TLPs): small
// enough that a burst checked as it lands is still in the CPU's L1 cache.
constexpr uint64_t kBurst = 32 * KiB;

// A namespace backed by a sparse temporary file (deleted at once; it lives while open).
// Blocks never written read as the factory pattern, so a read job over 10 GiB needs no
// 10 GiB of disk; written blocks are in the file (tracked per block of `unit` bytes).
class Namespace {
 public:
  static Result<Namespace> create(uint64_t size, uint64_t unit, uint64_t stream) {
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
    ns.stream_ = stream;
    ns.written_.assign(size / unit, false);
    return ns;
  }
  Namespace(Namespace&& o) noexcept : fd_(std::exchange(o.fd_, -1)), unit_(o.unit_), stream_(o.stream_), written_(std::move(o.written_)) {}
  ~Namespace() {
    if (fd_ >= 0) close(fd_);
  }
  // Reads and writes stay inside one block of `unit` bytes.
  Status read(uint64_t off, std::span<uint8_t> out) const {
    if (!written_[off / unit_]) {
      detail::pattern(stream_, off, out);
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
  // The index of the first byte of `have` that differs from the namespace at `off`, or
  // have.size(): unwritten blocks compare against the pattern without generating it.
  Result<size_t> mismatch(uint64_t off, std::span<const uint8_t> have) const {
    if (!written_[off / unit_]) return detail::pattern_mismatch(stream_, off, have);
    std::vector<uint8_t> mine(have.size());
    PHYSR_RETURN_IF_ERROR(read(off, mine));
    return static_cast<size_t>(std::mismatch(mine.begin(), mine.end(), have.begin()).first - mine.begin());
  }

 private:
  explicit Namespace(int fd) : fd_(fd) {}
  int fd_ = -1;
  uint64_t unit_ = 1;
  uint64_t stream_ = 0;
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
  const uint32_t cls = topo.functions[job.device].class_code;
  // A GPU or accelerator job is its copy engine moving data between the device's memory
  // (its largest BAR) and the buffer.
  const bool gpu = pci::is_display_or_accel(topo.functions[job.device]);
  if (!pci::is_nvme(topo.functions[job.device]) && !gpu)
    return make_error(EINVAL, where() + ": " + m.label(job.device) + " is neither an NVMe controller nor a GPU or accelerator (class " +
                                  format_hex(cls) + ")");
  if (job.block_size == 0 || job.block_size % 512 != 0 || job.block_size > 4 * MiB)
    return make_error(EINVAL, where() + ": block size " + std::to_string(job.block_size) + " must be a multiple of 512 up to 4 MiB");
  if (job.queue_depth == 0 || job.queue_depth > 1024) return make_error(EINVAL, where() + ": queue depth must be 1 to 1024");
  if (job.size == 0 || job.size % job.block_size != 0)
    return make_error(EINVAL, where() + ": size " + std::to_string(job.size) + " must be a non-zero multiple of the block size");
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kHostWindow) return make_error(EINVAL, where() + ": block size x queue depth exceeds the 256 MiB of buffers");

  // A GPU's own memory, where its copy engine reads or writes each I/O's slot.
  const Aperture* vram = gpu ? m.largest_bar(job.device) : nullptr;
  if (gpu) {
    if (!vram) return make_error(EINVAL, where() + ": " + m.label(job.device) + " has no memory BAR for its copy engine to use");
    if (vram->span.size < window) return make_error(EINVAL, where() + ": " + vram->name + " cannot hold " + format_size(window) + " of copies");
    if (job.buffer_function == job.device) return make_error(EINVAL, where() + ": a copy job's buffer must be host memory or another device's BAR");
    if (job.path == PathPolicy::bounce) return make_error(EINVAL, where() + ": path bounce (staging through host memory) is for NVMe jobs; a copy job takes p2p or auto");
  }

  // Where the buffers are.
  const Aperture* bar = nullptr;
  if (job.buffer_function) {
    bar = m.largest_bar(*job.buffer_function);
    if (!bar) return make_error(EINVAL, where() + ": " + m.label(*job.buffer_function) + " has no memory BAR to hold the buffers");
    if (bar->span.size < window) return make_error(EINVAL, where() + ": " + bar->name + " (" + format_size(bar->span.size) + ") cannot hold " + format_size(window) + " of buffers");
  }
  // An SSD's own CMB holds command data only as CMBSZ allows: read data needs RDS, write
  // data WDS (NVMe base specification, Controller Memory Buffer Size register).
  if (bar && bar->function == job.device && topo.functions[job.device].cmb) {
    const pci::NvmeCmb& cmb = *topo.functions[job.device].cmb;
    if (job.write ? !cmb.wds : !cmb.rds)
      return make_error(EINVAL, where() + ": " + bar->name + " cannot hold " + (job.write ? "write" : "read") + " command data (CMBSZ." +
                                    (job.write ? "WDS" : "RDS") + " is clear)");
  }
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* dev, m.device(job.device));
  DmaDevice& dma = *dev;
  Fabric& fab = m.fabric();
  fab.reset_counters();
  const size_t faults_before = m.faults().size();

  // The SSD's media serves commands first come, first served, one block's media time each
  // (a shared, fairly divided resource would let the commands fall into lockstep and leave
  // the media idle for a latency after every wave, which SSDs do not do). A command's data
  // moves after its latency and its media slot, over the fabric. A GPU's copy engine runs
  // its copies in order the same way, at its own rate.
  const MachineOptions& mo = m.options();
  const double dev_latency = gpu ? mo.copy_engine_latency_ns : job.write ? mo.nvme_write_latency_ns : mo.nvme_read_latency_ns;
  const double slot_ns = static_cast<double>(job.block_size) / (gpu ? mo.copy_engine_gbps : job.write ? mo.nvme_write_gbps : mo.nvme_read_gbps);

  JobResult out;
  out.name = job.name;
  out.device = m.label(job.device);
  out.buffer = bar ? bar->name : "host memory";
  const bool staged = bar && job.path == PathPolicy::bounce;
  const DmaAttrs attrs = job.path == PathPolicy::automatic ? kDmaAttrAllowBounce : kDmaAttrNone;

  // A p2p policy fails up front where the fabric refuses the pair, with the fabric's reason;
  // otherwise the DMA layer's answer decides (the mapping fails with EREMOTEIO).
  // Either way the job fails with EREMOTEIO: the code is set here, not taken from to_peer.
  if (bar && !staged && job.path == PathPolicy::p2p)
    if (auto r = fab.to_peer(job.device, bar->function, !job.write); !r) return make_error(EREMOTEIO, where() + ": " + r.error().message);
  // Timing routes follow the addresses each I/O's mapping produced, as the fabric decoded
  // them (SSD <-> buffer), plus for a BAR buffer reached through host memory the copy
  // between host memory and the BAR.
  detail::RouteCache routes_of(fab, job.device, !job.write);
  // A GPU's copies also cross its copy engine, so each moves at no more than its rate.
  std::optional<uint32_t> engine;
  if (gpu) engine = fab.add_resource(Resource::Kind::device, m.label(job.device) + " copy engine", mo.copy_engine_gbps);
  Route copy;
  if (bar) {
    copy = *fab.to_memory(bar->function, -1, job.write);  // the BAR side reads (read job) or writes host memory
    if (staged) copy.resources.push_back(fab.add_resource(Resource::Kind::device, m.label(bar->function) + " copy engine", mo.copy_engine_gbps));
  }

  // The device's side of the data. An SSD's namespace (reads stream out of it, writes into
  // it); or a GPU's memory, one slot per I/O in flight, which its kernels fill with the
  // data a read job copies out and where a write job's copies land.
  const uint64_t stream = m.next_job();
  std::optional<Namespace> ns;
  if (!gpu) {
    PHYSR_ASSIGN_OR_RETURN(Namespace n, Namespace::create(job.size, job.block_size, stream));
    ns.emplace(std::move(n));
  }
  const auto vram_at = [&](uint64_t i) { return vram->span.base + (i % job.queue_depth) * job.block_size; };
  const auto media_read = [&](uint64_t i, uint64_t o, std::span<uint8_t> dst) -> Status {
    return gpu ? m.memory().read(vram_at(i) + o, dst) : ns->read(i * job.block_size + o, dst);
  };
  const auto media_write = [&](uint64_t i, uint64_t o, std::span<const uint8_t> src) -> Status {
    return gpu ? m.memory().write(vram_at(i) + o, src) : ns->write(i * job.block_size + o, src);
  };
  const auto media_mismatch = [&](uint64_t pos, std::span<const uint8_t> have) -> Result<size_t> {
    if (gpu) return detail::pattern_mismatch(stream, pos, have);
    return ns->mismatch(pos, have);
  };
  std::vector<uint8_t> got(std::min<uint64_t>(64 * KiB, job.block_size));  // a write job's check, a piece at a time

  Simulator sim(fab);
  const uint64_t ios = job.size / job.block_size;
  detail::Stages stages(sim, ios, job.block_size, slot_ns);
  std::vector<double> lat;
  uint64_t next = 0, completed = 0;
  bool bounced_any = false;
  const Route* taken = nullptr;  // the P2P route the SSD's addresses took, if any

  // Submits I/O `i`: maps its buffer, moves and checks its bytes, unmaps, then queues its
  // timing on the fabric (in two stages when the data goes through host memory).
  const auto submit = [&](uint64_t i) -> Status {
    const uint64_t off = i * job.block_size, slot = (i % job.queue_depth) * job.block_size;
    const PhysAddr target = bar ? bar->span.base + slot : PhysAddr(kHostBuffers + slot);
    const PhysAddr staging(kHostStaging + slot);
    RangeList list;
    PHYSR_RETURN_IF_ERROR(list.append(PhysRange{staged ? staging : target, job.block_size, bar && !staged ? bar->id : kHostMemory}));
    // The bytes move in place, with no buffer of the SSD's own: a read job's SSD streams its
    // namespace into memory, a write job's streams memory into its namespace. A write job's
    // application first fills its buffer (and the staging copy).
    if (job.write || gpu) {  // a write job's application, or a read job's GPU kernel, wrote the data
      PHYSR_RETURN_IF_ERROR(detail::fill_pattern(m, job.write ? target : vram_at(i), stream, off, job.block_size));
      if (job.write && staged) PHYSR_RETURN_IF_ERROR(m.memory().copy(staging, target, job.block_size));
    }
    PHYSR_ASSIGN_OR_RETURN_CTX(DmaMapping map, dma.map(list, job.write ? DmaDirection::to_device : DmaDirection::from_device, attrs), where());
    const auto segs = map.segments();
    (fits_prps(segs) ? out.prp_ios : out.sgl_ios)++;
    const bool bounced = detail::any_bounced(segs);
    bounced_any |= bounced;
    // A read's buffer must end up holding what the namespace holds, compared in place; a
    // write's namespace must hold the application's data.
    const auto what = [&] { return where() + ": I/O " + std::to_string(i) + " (offset " + format_hex(off) + ")"; };
    const auto check_buffer = [&](uint64_t from, uint64_t len) {
      return m.memory().visit(target + from, len, [&](uint64_t o, std::span<const uint8_t> have) -> Status {
        PHYSR_ASSIGN_OR_RETURN(const size_t k, media_mismatch(off + from + o, have));
        if (k == have.size()) return {};
        return make_error(EIO, what() + ": data mismatch at " + format_hex(target.value() + from + o + k) + " (byte " +
                                   std::to_string(from + o + k) + ")");
      });
    };
    // When the SSD writes the buffer itself (no bounce, no staging), each burst is checked
    // as it lands, while it is in the CPU's caches: each byte of the I/O goes to exactly one
    // place and its data is unique to its position and this job, so a byte that went astray
    // fails its own check even if a later burst lands on top of it. Bounced or staged data
    // reaches the buffer only at unmap or at the copy, and is checked after them.
    const bool lands_in_place = !job.write && !bounced && !staged;
    Status st;
    DmaAccess acc;
    for (uint64_t b = 0; st && b < job.block_size; b += kBurst) {
      const uint64_t n = std::min(kBurst, job.block_size - b);
      if (job.write) {
        st = detail::take_access(
            m.dma_read_to(job.device, segs, b, n, [&](uint64_t o, std::span<const uint8_t> src) { return media_write(i, b + o, src); }), acc);
      } else {
        st = detail::take_access(
            m.dma_write_from(job.device, segs, b, n, [&](uint64_t o, std::span<uint8_t> dst) { return media_read(i, b + o, dst); }), acc);
        if (st && lands_in_place) st = check_buffer(b, n);
      }
    }
    Status un = dma.unmap(map);
    PHYSR_RETURN_IF_ERROR(st);
    PHYSR_RETURN_IF_ERROR(un);
    if (!job.write && staged) PHYSR_RETURN_IF_ERROR(m.memory().copy(target, staging, job.block_size));
    if (job.write && gpu) {
      PHYSR_RETURN_IF_ERROR(detail::verify_pattern(m, vram_at(i), stream, off, job.block_size, what));
    } else if (job.write) {
      for (uint64_t b = 0; b < job.block_size; b += got.size()) {
        const std::span<uint8_t> piece(got.data(), std::min<uint64_t>(got.size(), job.block_size - b));
        PHYSR_RETURN_IF_ERROR(ns->read(off + b, piece));
        if (const size_t k = detail::pattern_mismatch(stream, off + b, piece); k != piece.size())
          return make_error(EIO, what() + ": data mismatch in the namespace at byte " + std::to_string(b + k));
      }
    } else if (!lands_in_place) {
      PHYSR_RETURN_IF_ERROR(check_buffer(0, job.block_size));
    }
    out.verified_bytes += job.block_size;
    // Timing: the SSD's transfer where its addresses went, and the copy between host memory
    // and the BAR when they went to host memory instead of the BAR (the DMA layer bounced,
    // or the job staged): before the SSD for writes, after it for reads.
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* via, routes_of.get(acc), where());
    Route ssd = *via;
    ssd.latency_ns += dev_latency;
    if (engine) ssd.resources.push_back(*engine);
    if (acc.peer_switch || acc.peer_rc) taken = via;
    std::vector<Route> routes;
    const bool two = bar && acc.host_memory;
    if (two && job.write) routes.push_back(copy);
    const size_t served = routes.size();  // the SSD's media (or copy engine) serves this one
    routes.push_back(ssd);
    if (two && !job.write) routes.push_back(copy);
    stages.start(i, std::move(routes), served);
    return {};
  };

  uint64_t in_flight = 0;
  const auto on_done = [&](const std::vector<size_t>& finished) {
    const uint64_t ended = stages.advance(finished, lat);
    completed += ended;
    in_flight -= ended;
  };
  // The driver ramps the queue up one command per block's media time, so the commands do
  // not move in lockstep (which would leave the media idle for a whole latency after every
  // wave); from then on each completion is replaced by a new command at once.
  const double gap = slot_ns;
  const uint64_t ramp = std::min<uint64_t>(job.queue_depth, ios);
  while (completed < ios) {
    if (in_flight < job.queue_depth && next < ios) {
      PHYSR_RETURN_IF_ERROR(submit(next++));
      ++in_flight;
      if (next <= ramp) on_done(sim.idle_until(sim.now() + gap));
      continue;
    }
    const auto finished = sim.step();
    if (finished.empty()) return make_error(EIO, where() + ": the simulation stalled");  // cannot happen: every flow ends
    on_done(finished);
  }

  if (bar && !staged && !bounced_any && !taken) return make_error(EIO, where() + ": the DMA lists for " + bar->name + " reached no BAR");
  detail::finish_result(out, m, sim, lat, job.size, ios, faults_before);
  out.path = !bar ? "host memory"
             : staged ? "bounce via a host buffer + copy engine"
             : bounced_any ? "bounce (DMA layer, swiotlb)"
             : std::string("p2p ") + pci::map_type_name(taken->p2p) +
                   (taken->resources.empty() ? " (inside the SSD)" : taken->through_rc ? " (through the root complex)" : " (under the switch)");
  out.via = static_cast<uint8_t>(!bar ? Via::host_memory
                                 : staged ? Via::staged
                                 : bounced_any ? Via::bounced
                                 : taken->p2p == pci::MapType::bus_addr ? Via::p2p_bus_addr
                                                                        : Via::p2p_host_bridge);
  return out;
}

namespace detail {

namespace {
// The 64-byte blocks of a piece, where the time goes, in vectors of V: GCC and Clang lower
// generic vectors to SSE2/AVX2/NEON (neither vectorises the scalar loops by themselves).
// Each word is its position plus the page's salt, so the next vector is the last plus a
// constant: one add per vector. The AVX2 versions are chosen at run time where the CPU has
// AVX2 (the library is built for baseline x86-64); checking in 32-byte vectors halves the
// instructions of the check, the loop that is bound by them rather than by memory.
using W16 = uint64_t __attribute__((vector_size(16)));
using W32 = uint64_t __attribute__((vector_size(32)));

// v[j] = the words at first_word + j * sizeof(V), + 8, ... (built through memory: GCC 12
// takes element-wise stores into a vector for reads of an uninitialised one).
template <class V, unsigned kN>
[[gnu::always_inline]] inline void start_words(V (&v)[kN], uint64_t first_word) noexcept {
  uint64_t w[kN * sizeof(V) / 8];
  for (unsigned k = 0; k < kN * sizeof(V) / 8; ++k) w[k] = first_word + 8 * k;
  std::memcpy(v, w, sizeof(w));
}

template <class V>
[[gnu::always_inline]] inline void fill_blocks(uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  constexpr unsigned kN = 64 / sizeof(V);
  V v[kN];
  start_words(v, first_word);
  for (uint64_t i = 0; i < len; i += 64)
    for (unsigned j = 0; j < kN; ++j) {
      std::memcpy(at + i + j * sizeof(V), &v[j], sizeof(V));
      v[j] += 64;
    }
}

template <class V>
[[gnu::always_inline]] inline bool blocks_match(const uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  constexpr unsigned kN = 64 / sizeof(V);
  V v[kN], diff = {};
  start_words(v, first_word);
  for (uint64_t i = 0; i < len; i += 64)
    for (unsigned j = 0; j < kN; ++j) {
      V have;
      std::memcpy(&have, at + i + j * sizeof(V), sizeof(V));
      diff |= have ^ v[j];
      v[j] += 64;
    }
  uint64_t any = 0;
  for (unsigned k = 0; k < sizeof(V) / 8; ++k) any |= diff[k];
  return any == 0;
}

#if defined(__x86_64__)
[[gnu::target("avx2")]] void fill_blocks_avx2(uint8_t* at, uint64_t w, uint64_t len) noexcept { fill_blocks<W32>(at, w, len); }
[[gnu::target("avx2")]] bool blocks_match_avx2(const uint8_t* at, uint64_t w, uint64_t len) noexcept { return blocks_match<W32>(at, w, len); }
const bool kAvx2 = __builtin_cpu_supports("avx2");
#else
constexpr bool kAvx2 = false;
void fill_blocks_avx2(uint8_t*, uint64_t, uint64_t) noexcept {}
bool blocks_match_avx2(const uint8_t*, uint64_t, uint64_t) noexcept { return false; }
#endif

void fill_body(uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  if (kAvx2) fill_blocks_avx2(at, first_word, len);
  else fill_blocks<W16>(at, first_word, len);
}
bool body_matches(const uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  return kAvx2 ? blocks_match_avx2(at, first_word, len) : blocks_match<W16>(at, first_word, len);
}

uint64_t page_salt(uint64_t stream, uint64_t pos) noexcept {
  uint64_t salt = ((pos >> 12) ^ (stream * 0xD6E8FEB86659FD93ull)) * 0x9E3779B97F4A7C15ull;
  return salt ^ (salt >> 29);
}

// Calls f(i, n, salt) for each piece [pos + i, pos + i + n) inside one 4 KiB page; f
// returns false to stop.
template <class F>
void by_page(uint64_t stream, uint64_t pos, uint64_t len, F&& f) {
  for (uint64_t i = 0; i < len;) {
    const uint64_t p = pos + i, n = std::min<uint64_t>(len - i, kPageSize - (p & (kPageSize - 1)));
    if (!f(i, n, page_salt(stream, p))) return;
    i += n;
  }
}

// Bytes [p, p + n) of the words at 8-aligned positions, a word at a time: a piece's
// unaligned head and its tail. Words sit at absolute positions, so data generated in any
// pieces equals data generated in one go.
void bytes_at(uint64_t p, uint64_t salt, uint8_t* out, uint64_t n) noexcept {
  while (n != 0) {
    const uint64_t word = (p & ~uint64_t{7}) + salt, skip = p & 7, take = std::min<uint64_t>(n, 8 - skip);
    std::memcpy(out, reinterpret_cast<const uint8_t*>(&word) + skip, take);
    out += take;
    p += take;
    n -= take;
  }
}

// A piece [p, p + n) as an unaligned head, whole 64-byte blocks (body) and a tail.
struct Split {
  uint64_t head, body;
};
Split split(uint64_t p, uint64_t n) noexcept {
  const uint64_t head = std::min<uint64_t>(n, (8 - (p & 7)) & 7);
  return {head, (n - head) & ~uint64_t{63}};
}
}  // namespace

void pattern(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept {
  by_page(stream, pos, out.size(), [&](uint64_t base, uint64_t n, uint64_t salt) {
    uint8_t* at = out.data() + base;
    const uint64_t p = pos + base;
    const auto [head, body] = split(p, n);
    bytes_at(p, salt, at, head);
    fill_body(at + head, p + head + salt, body);
    bytes_at(p + head + body, salt, at + head + body, n - head - body);
    return true;
  });
}

size_t pattern_mismatch(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept {
  size_t bad = have.size();
  by_page(stream, pos, have.size(), [&](uint64_t base, uint64_t n, uint64_t salt) {
    const uint8_t* at = have.data() + base;
    const uint64_t p = pos + base;
    const auto [head, body] = split(p, n);
    uint8_t want[64];
    const auto bytes_match = [&](uint64_t i, uint64_t m) {  // the head or the tail, bytewise
      bytes_at(p + i, salt, want, m);
      return std::equal(want, want + m, at + i);
    };
    if (body_matches(at + head, p + head + salt, body) && bytes_match(0, head) && bytes_match(head + body, n - head - body)) return true;
    for (uint64_t i = 0; i < n; i += 64) {  // find the byte, 64 bytes at a time
      const uint64_t m = std::min<uint64_t>(64, n - i);
      bytes_at(p + i, salt, want, m);
      const auto miss = std::mismatch(want, want + m, at + i);
      if (miss.first != want + m) {
        bad = base + i + static_cast<size_t>(miss.first - want);
        return false;
      }
    }
    return true;
  });
  return bad;
}

void Stages::start(uint64_t i, std::vector<Route> routes, size_t served) {
  items_[i] = Item{sim_.now(), std::move(routes), served};
  queue(i, 0);
}

void Stages::queue(uint64_t i, size_t k) {
  const Item& x = items_[i];
  const Route& r = x.routes[k];
  double at = sim_.now();
  if (k == x.served) {
    const double start = std::max(sim_.now() + r.latency_ns, free_);
    free_ = start + slot_ns_;
    at = start - r.latency_ns;
  }
  flow_of_.emplace_back(i, k);
  sim_.add(r, bytes_, at);
}

uint64_t Stages::advance(const std::vector<size_t>& finished, std::vector<double>& lat) {
  uint64_t ended = 0;
  for (size_t f : finished) {
    const auto [i, k] = flow_of_[f];
    Item& x = items_[i];
    if (k + 1 < x.routes.size()) {
      queue(i, k + 1);
      continue;
    }
    lat.push_back(sim_.now() - x.submit);
    x.routes.clear();
    ++ended;
  }
  return ended;
}

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
