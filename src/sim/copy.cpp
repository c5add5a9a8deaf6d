// Copy-engine jobs: a GPU's or accelerator's engine copies between its own memory (its
// largest BAR) and the buffers, through the shared block loop.
#include "physr/sim.hpp"
#include "sim/block_job.hpp"

namespace physr::sim::detail {

namespace {

// The device's side of the data: its memory, one slot per copy in flight, which its
// kernels fill with the data a read job copies out and where a write job's copies land.
class DeviceMemoryMedia {
 public:
  DeviceMemoryMedia(Machine& m, PhysAddr vram, const Job& job, bool write, uint64_t stream)
      : m_(m), vram_(vram), job_(job), write_(write), stream_(stream) {}
  Status prepare(uint64_t i) {
    if (write_) return {};
    return fill_pattern(m_, slot(i), stream_, i * job_.block_size, job_.block_size);  // the device's kernel wrote it
  }
  Status read(uint64_t i, uint64_t o, std::span<uint8_t> dst) const { return m_.memory().read(slot(i) + o, dst); }
  Status write(uint64_t i, uint64_t o, std::span<const uint8_t> src) { return m_.memory().write(slot(i) + o, src); }
  Result<size_t> mismatch(uint64_t pos, std::span<const uint8_t> have) const { return pattern_mismatch(stream_, pos, have); }
  template <class What>
  Status check_written(uint64_t i, const What& what) {
    return verify_pattern(m_, slot(i), stream_, i * job_.block_size, job_.block_size, what);
  }

 private:
  PhysAddr slot(uint64_t i) const { return vram_ + (i % job_.queue_depth) * job_.block_size; }
  Machine& m_;
  PhysAddr vram_;
  const Job& job_;
  bool write_;
  uint64_t stream_;
};

}  // namespace

Result<JobResult> run_copy_job(Machine& m, const Job& job, const CopyJob& cj, Group& g) {
  const pci::Topology& topo = m.topology();
  const std::string where = "job '" + job.name + "'";
  if (cj.device >= topo.functions.size()) return make_error(EINVAL, where + ": no such device");
  const pci::Function& fn = topo.functions[cj.device];
  if (!pci::is_display_or_accel(fn))
    return make_error(EINVAL, where + ": " + m.label(cj.device) + " is neither a GPU nor an accelerator (class " + format_hex(fn.class_code) + ")");
  PHYSR_ASSIGN_OR_RETURN(const Aperture* bar, check_block_shape(m, job, cj.buffer_function, where));
  const uint64_t window = job.block_size * job.queue_depth;
  const Aperture* vram = m.largest_bar(cj.device);
  if (!vram) return make_error(EINVAL, where + ": " + m.label(cj.device) + " has no memory BAR for its copy engine to use");
  if (vram->span.size < window) return make_error(EINVAL, where + ": " + vram->name + " cannot hold " + format_size(window) + " of copies");
  if (cj.buffer_function == cj.device) return make_error(EINVAL, where + ": a copy job's buffer must be host memory or another device's BAR");
  if (cj.path == PathPolicy::bounce)
    return make_error(EINVAL, where + ": path bounce (staging through host memory) is for NVMe jobs; a copy job takes p2p or auto");
  // The copy engine runs its copies in order, at its own rate, and every copy crosses it.
  const MachineOptions& mo = m.options();
  BlockPlan plan;
  plan.device = cj.device;
  plan.write = cj.write;
  plan.path = cj.path;
  plan.bar = bar;
  plan.latency_ns = mo.copy_engine_latency_ns;
  plan.slot_ns = static_cast<double>(job.block_size) / mo.copy_engine_gbps;
  plan.served = m.label(cj.device) + " copy engine";  // runs the copies of every job on the device in order
  plan.engine = m.fabric().add_resource(Resource::Kind::device, plan.served, mo.copy_engine_gbps);
  plan.inside = " (inside the device)";
  // The engine's side of the copies: device memory from its own BAR's pool, so a job that
  // runs at the same time with its buffers in that BAR never overlaps them.
  PHYSR_ASSIGN_OR_RETURN(PoolBuffer slots, PoolBuffer::take(m, *vram, window, where + ": device memory"));
  const uint64_t stream = m.next_job();
  DeviceMemoryMedia media(m, slots.base(), job, cj.write, stream);
  return run_blocks(m, job, plan, media, stream, g);
}

}  // namespace physr::sim::detail
