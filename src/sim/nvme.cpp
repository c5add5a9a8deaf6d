// NVMe jobs: an SSD streams its namespace into the buffers (read) or the buffers into its
// namespace (write), one command per block, through the shared block loop.
#include <algorithm>

#include "physr/sim.hpp"
#include "sim/block_job.hpp"
#include "sim/namespace.hpp"

namespace physr::sim::detail {

namespace {

// The SSD's side of the data: its namespace.
class NvmeMedia {
 public:
  // I/O i is block perm(i) of the namespace when `random`, else block i.
  NvmeMedia(Namespace ns, uint64_t block_size, uint64_t stream, bool random, uint64_t blocks, uint64_t seed)
      : ns_(std::move(ns)), bs_(block_size), stream_(stream), random_(random), perm_(blocks, seed ^ stream) {}
  Status prepare(uint64_t) { return {}; }
  Status read(uint64_t i, uint64_t o, std::span<uint8_t> dst) const { return ns_.read(at(i) + o, dst); }
  Status write(uint64_t i, uint64_t o, std::span<const uint8_t> src) { return ns_.write(at(i) + o, src); }
  // `pos` is a byte of the job (I/O pos / bs): the namespace holds it at that I/O's block.
  Result<size_t> mismatch(uint64_t pos, std::span<const uint8_t> have) const {
    return ns_.mismatch(random_ ? at(pos / bs_) + pos % bs_ : pos, have);
  }
  // read() of I/O i's bytes [o, o + dst.size()) checked as they land through `view`, in
  // pieces of `piece` (run_blocks' landing checks): the index of the first byte of `view`
  // that differs, or view.size().
  Result<size_t> read_landed(uint64_t i, uint64_t o, std::span<uint8_t> dst, std::span<const uint8_t> view, uint64_t piece) const {
    return ns_.read_landed(at(i) + o, dst, view, piece);
  }
  // A write's namespace must hold the application's data, read back a piece at a time.
  template <class What>
  Status check_written(uint64_t i, const What& what) {
    got_.resize(std::min<uint64_t>(64 * KiB, bs_));
    const uint64_t off = i * bs_;
    const uint64_t where = at(i);
    for (uint64_t b = 0; b < bs_; b += got_.size()) {
      const std::span<uint8_t> piece(got_.data(), std::min<uint64_t>(got_.size(), bs_ - b));
      PHYSR_RETURN_IF_ERROR(ns_.read(where + b, piece));
      if (const size_t k = pattern_mismatch(stream_, off + b, piece); k != piece.size())
        return make_error(EIO, what() + ": data mismatch in the namespace at byte " + std::to_string(b + k));
    }
    return {};
  }

 private:
  uint64_t at(uint64_t i) const noexcept { return (random_ ? perm_(i) : i) * bs_; }
  Namespace ns_;
  uint64_t bs_, stream_;
  bool random_;
  Permutation perm_;
  std::vector<uint8_t> got_;
};

}  // namespace

Result<JobResult> run_nvme_job(Machine& m, const Job& job, const NvmeJob& nv, Group& g) {
  const pci::Topology& topo = m.topology();
  const std::string where = "job '" + job.name + "'";
  if (nv.ssd >= topo.functions.size()) return make_error(EINVAL, where + ": no such device");
  const pci::Function& fn = topo.functions[nv.ssd];
  if (!pci::is_nvme(fn))
    return make_error(EINVAL, where + ": " + m.label(nv.ssd) + " is not an NVMe controller (class " + format_hex(fn.class_code) + ")");
  PHYSR_ASSIGN_OR_RETURN(const Aperture* bar, check_block_shape(m, job, nv.buffer_function, where));
  // An SSD's own CMB holds command data only as CMBSZ allows: read data needs RDS, write
  // data WDS (NVMe base specification, Controller Memory Buffer Size register).
  if (bar && bar->function == nv.ssd && fn.cmb) {
    const pci::NvmeCmb& cmb = *fn.cmb;
    if (nv.write ? !cmb.wds : !cmb.rds)
      return make_error(EINVAL, where + ": " + bar->name + " cannot hold " + (nv.write ? "write" : "read") + " command data (CMBSZ." +
                                    (nv.write ? "WDS" : "RDS") + " is clear)");
  }
  // The SSD's media serves commands first come, first served, one block's media time each;
  // a command's data moves after its latency and its media slot, over the fabric.
  const MachineOptions& mo = m.options();
  BlockPlan plan;
  plan.device = nv.ssd;
  plan.write = nv.write;
  plan.path = nv.path;
  plan.bar = bar;
  plan.latency_ns = nv.write ? mo.nvme_write_latency_ns : mo.nvme_read_latency_ns;
  plan.latency_sigma = mo.nvme_latency_sigma;
  // The media's slot per command: its bytes at the media's bandwidth, and no less than one
  // command at the SSD's IOPS limit (docs/sim.md, "The SSD model").
  plan.slot_ns = std::max(static_cast<double>(job.block_size) / (nv.write ? mo.nvme_write_gbps : mo.nvme_read_gbps),
                          1e9 / (nv.write ? mo.nvme_write_iops : mo.nvme_read_iops));
  plan.inside = " (inside the SSD)";
  plan.served = m.label(nv.ssd) + " media";  // jobs on the same SSD at once share its media
  const uint64_t stream = m.next_job();
  PHYSR_ASSIGN_OR_RETURN(Namespace ns, Namespace::create(job.size, job.block_size, stream, nv.write ? job.size : 0));
  NvmeMedia media(std::move(ns), job.block_size, stream, nv.random, job.size / job.block_size, mo.seed);
  return run_blocks(m, job, plan, media, stream, g);
}

}  // namespace physr::sim::detail
