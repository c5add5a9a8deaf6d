// Jobs: what every kind shares (its shape, its kind by device class) and the dispatch to
// the kind's runner (nvme.cpp, copy.cpp, net.cpp, odirect.cpp, devmem_rx.cpp, hmm_job.cpp).
#include <functional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "physr/sim.hpp"
#include "sim/block_job.hpp"
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

uint32_t Job::device() const noexcept {
  struct {
    uint32_t operator()(const NvmeJob& j) const noexcept { return j.ssd; }
    uint32_t operator()(const CopyJob& j) const noexcept { return j.device; }
    uint32_t operator()(const NetJob& j) const noexcept { return j.sender; }
    uint32_t operator()(const DirectIoJob& j) const noexcept { return j.ssd; }
    uint32_t operator()(const HmmJob& j) const noexcept { return j.device; }
  } of;
  return std::visit(of, kind);
}

Result<JobKind> job_kind_for(const pci::Topology& topo, uint32_t device, bool write, std::optional<uint32_t> buffer_function) {
  if (device >= topo.functions.size()) return make_error(EINVAL, "no device " + std::to_string(device) + " in the topology");
  const pci::Function& f = topo.functions[device];
  if (pci::is_nvme(f)) return JobKind(NvmeJob{device, write, buffer_function});
  if (pci::is_display_or_accel(f)) return JobKind(CopyJob{device, write, buffer_function});
  return make_error(EINVAL, (f.name.empty() ? f.bdf.to_string() : f.name) + " is neither an NVMe controller nor a GPU or accelerator (class " + format_hex(f.class_code) +
                                ")" + (pci::is_network(f) ? "; a network controller's job needs a receiving NIC (peer)" : ""));
}

namespace {

// One job of a group: its kind's runner, then its shape in its report.
Result<JobResult> run_in_group(Machine& m, const Job& job, detail::Group& g) {
  struct {
    Machine& m;
    const Job& job;
    detail::Group& g;
    Result<JobResult> operator()(const NvmeJob& k) const { return detail::run_nvme_job(m, job, k, g); }
    Result<JobResult> operator()(const CopyJob& k) const { return detail::run_copy_job(m, job, k, g); }
    Result<JobResult> operator()(const NetJob& k) const { return detail::run_net_job(m, job, k, g); }
    Result<JobResult> operator()(const DirectIoJob& k) const { return detail::run_direct_io_job(m, job, k, g); }
    Result<JobResult> operator()(const HmmJob& k) const { return detail::run_hmm_job(m, job, k, g); }
  } run{m, job, g};
  auto r = std::visit(run, job.kind);
  if (!r) return r;
  // The job's shape in its report, as fio prints it.
  struct {
    std::string operator()(const NvmeJob& k) const { return std::string(k.random ? "rand" : "") + (k.write ? "write" : "read"); }
    std::string operator()(const CopyJob& k) const { return k.write ? "write" : "read"; }
    std::string operator()(const NetJob&) const { return "send"; }
    std::string operator()(const DirectIoJob&) const { return "copy"; }
    std::string operator()(const HmmJob&) const { return "readwrite"; }  // each block read, then written (fio's rw = readwrite)
  } rw;
  r->rw = std::visit(rw, job.kind);
  r->block_size = job.block_size;
  r->queue_depth = job.queue_depth;
  return r;
}

}  // namespace

std::vector<Result<JobResult>> run_jobs(Machine& m, std::span<const Job> jobs, const std::function<void(size_t, uint64_t, uint64_t)>& progress) {
  std::vector<Result<JobResult>> out;
  out.reserve(jobs.size());
  for (size_t k = 0; k < jobs.size(); ++k) out.emplace_back(make_error(EINVAL, "job '" + jobs[k].name + "': not run"));
  if (jobs.size() > kMaxGroupJobs) {
    for (size_t k = 0; k < jobs.size(); ++k)
      out[k] = make_error(EINVAL, "job '" + jobs[k].name + "': more than " + std::to_string(kMaxGroupJobs) + " jobs at once");
    return out;
  }
  // One clock and one set of counters for the group.
  m.fabric().reset_counters();
  detail::Group g(m, jobs.size(), progress);
  g.start([&](size_t k) { out[k] = run_in_group(m, jobs[k], g); });
  return out;
}

Result<JobResult> run_job(Machine& m, const Job& job) {
  std::function<void(size_t, uint64_t, uint64_t)> progress;
  if (m.on_progress) progress = [&m](size_t, uint64_t done, uint64_t total) { m.on_progress(done, total); };
  return std::move(run_jobs(m, std::span(&job, 1), progress).front());
}

namespace detail {

Result<const Aperture*> check_block_shape(Machine& m, const Job& job, std::optional<uint32_t> buffer_function, const std::string& where) {
  if (job.block_size == 0 || job.block_size % 512 != 0 || job.block_size > 4 * MiB)
    return make_error(EINVAL, where + ": block size " + std::to_string(job.block_size) + " must be a multiple of 512 up to 4 MiB");
  if (job.queue_depth == 0 || job.queue_depth > 1024) return make_error(EINVAL, where + ": queue depth must be 1 to 1024");
  if (job.size == 0 || job.size % job.block_size != 0)
    return make_error(EINVAL, where + ": size " + std::to_string(job.size) + " must be a non-zero multiple of the block size");
  const uint64_t window = job.block_size * job.queue_depth;
  if (window > kHostWindow) return make_error(EINVAL, where + ": block size x queue depth exceeds the 256 MiB of buffers");
  if (!buffer_function) return nullptr;
  if (*buffer_function >= m.topology().functions.size()) return make_error(EINVAL, where + ": no such buffer device");
  const Aperture* bar = m.largest_bar(*buffer_function);
  if (!bar) return make_error(EINVAL, where + ": " + m.label(*buffer_function) + " has no memory BAR to hold the buffers");
  if (bar->span.size < window)
    return make_error(EINVAL, where + ": " + bar->name + " (" + format_size(bar->span.size) + ") cannot hold " + format_size(window) + " of buffers");
  return bar;
}

}  // namespace detail

}  // namespace physr::sim
