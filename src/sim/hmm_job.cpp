// HMM jobs: a device (a GPU with shared virtual memory, an RDMA NIC with on-demand paging)
// works on a process's buffer through a mirror of the process's address space instead of
// pinning it (mem::HmmMirror: interval notifier, hmm_range_fault, hmm_dma_map_pfn). The
// buffer mixes anonymous memory and another device's P2P memory (mmap of its p2pmem
// allocate file); while the job runs the process remaps parts of it at chosen times, so
// the device faults, the mirror resolves and maps through the device's DmaDevice, and the
// notifier invalidates. Every byte the device reads is compared with what the process's
// page tables map at that moment, and every byte it writes is read back through them: a
// stale translation (an old page, an old chunk) fails the job with EIO.
//
// Timing: each block is its pages' transfers one after another (the reads, then the
// writes), over the routes their DMA addresses decoded to, the device starting its blocks
// in order; each device fault adds fault_latency_us to its block's latency. The data moves
// when a block is submitted; an event applies at the first submission at or after its time
// (a race event inside the first device fault from then on).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "physr/mem.hpp"
#include "physr/sim.hpp"
#include "sim/block_job.hpp"
#include "sim/job_common.hpp"

namespace physr::sim {

const char* hmm_event_op_name(HmmEvent::Op op) noexcept {
  switch (op) {
    case HmmEvent::Op::anon: return "anon";
    case HmmEvent::Op::p2p: return "p2p";
    case HmmEvent::Op::migrate: return "migrate";
  }
  return "?";
}

namespace detail {

namespace {
// Where the process's refilled data comes from: generation g of the process's stream starts
// at g << 40, so data written after an event never equals what was there before.
constexpr unsigned kGenerationShift = 40;
}  // namespace

Result<JobResult> run_hmm_job(Machine& m, const Job& job, const HmmJob& k, Group& group) {
  const pci::Topology& topo = m.topology();
  const std::string where = "job '" + job.name + "'";
  if (k.device >= topo.functions.size()) return make_error(EINVAL, where + ": no such device");
  const pci::Function& fn = topo.functions[k.device];
  if (!pci::is_display_or_accel(fn) && !pci::is_network(fn))
    return make_error(EINVAL, where + ": " + m.label(k.device) + " is neither a GPU or accelerator nor a NIC (class " + format_hex(fn.class_code) +
                                  "): an HMM job's device mirrors a process (shared virtual memory, on-demand paging)");
  if (k.buffer_function && *k.buffer_function == k.device)
    return make_error(EINVAL, where + ": the buffer's P2P memory must be another device's (or host)");
  if (job.block_size % kPageSize != 0) return make_error(EINVAL, where + ": block size must be a multiple of 4 KiB (the mirror maps pages)");
  PHYSR_ASSIGN_OR_RETURN(const Aperture* bar, check_block_shape(m, job, k.buffer_function, where));
  if (!bar && k.host_bytes != 0) return make_error(EINVAL, where + ": host_bytes needs a P2P buffer (the whole buffer is anonymous memory already)");
  if (k.host_bytes % kPageSize != 0 || (bar && k.host_bytes >= job.block_size))
    return make_error(EINVAL, where + ": host_bytes " + std::to_string(k.host_bytes) + " must be a multiple of 4 KiB below the block size");
  if (k.fault_pages == 0 || k.fault_pages > 512) return make_error(EINVAL, where + ": fault_pages must be 1 to 512");
  if (!(k.fault_latency_us >= 0) || !std::isfinite(k.fault_latency_us)) return make_error(EINVAL, where + ": fault latency must be a finite number of microseconds, at least 0");
  const uint64_t bs = job.block_size, qd = job.queue_depth, window = bs * qd, blocks = job.size / bs;
  std::vector<HmmEvent> events = k.events;
  for (size_t e = 0; e < events.size(); ++e) {
    const HmmEvent& ev = events[e];
    const std::string which = where + ": event " + std::to_string(e + 1);
    if (!(ev.at_us >= 0) || !std::isfinite(ev.at_us)) return make_error(EINVAL, which + ": at_us must be a finite time, at least 0");
    if (ev.len == 0 || ev.offset % kPageSize != 0 || ev.len % kPageSize != 0 || ev.offset > window || ev.len > window - ev.offset)
      return make_error(EINVAL, which + ": [" + std::to_string(ev.offset) + ", +" + std::to_string(ev.len) + ") must be whole pages of the " +
                                    format_size(window) + " buffer (bs x qd)");
    if (ev.op == HmmEvent::Op::p2p && !bar) return make_error(EINVAL, which + ": a remap as P2P memory needs a P2P buffer device (buffer)");
  }
  std::stable_sort(events.begin(), events.end(), [](const HmmEvent& a, const HmmEvent& b) { return a.at_us < b.at_us; });

  // The process: anonymous memory from the host window, an address space, and the buffer at
  // kMmapBase: per block host_part bytes of anonymous memory, then P2P memory.
  const uint64_t stream = m.next_job(), proc_stream = m.next_job();
  // Its RAM: a 2 MiB aligned piece of the machine's host memory on the device's node.
  PHYSR_ASSIGN_OR_RETURN(HostBuffer ram, HostBuffer::take(m, kHostWindow, m.fabric().numa_of(k.device), where + ": process memory", 2 * MiB));
  PHYSR_ASSIGN_OR_RETURN_CTX(auto host, mem::HostMemory::create(ram.span(), stream), where);
  mem::AddressSpace as(*host);
  mem::P2PMemorySource* file = nullptr;
  if (bar) {
    PHYSR_ASSIGN_OR_RETURN_CTX(file, m.allocate_file(bar->function), where);
  }
  const uint64_t base = mem::AddressSpace::kMmapBase;
  const uint64_t host_part = bar ? k.host_bytes : bs;
  uint64_t generation = 0;

  // The CPU's view: the bytes at va as the process's page tables map them now (follow_page()).
  const auto cpu_page = [&](uint64_t va) -> Result<PhysAddr> {
    std::lock_guard g(as.mmap_lock());
    const auto p = mem::cpu_translate(as, va);
    if (!p) return make_error(EFAULT, where + ": the process has no page at " + format_hex(va));
    return *p;
  };
  // The process writes generation g's data into [va, va + len) through its page tables.
  const auto fill = [&](uint64_t va, uint64_t len) -> Status {
    for (uint64_t o = 0; o < len; o += kPageSize) {
      PHYSR_ASSIGN_OR_RETURN(const PhysAddr p, cpu_page(va + o));
      PHYSR_RETURN_IF_ERROR(fill_pattern(m, p, proc_stream, (generation << kGenerationShift) + (va + o - base), kPageSize));
    }
    return {};
  };
  // mmap of [va, va + len) as anonymous memory or P2P memory: the mapping's pieces follow
  // the buffer's layout when asked to (p2p = layout), else all one kind.
  const auto map_span = [&](uint64_t va, uint64_t len, bool p2p) -> Status {
    Status st;
    if (p2p) {
      auto r = as.mmap_p2p(*file, {.addr = va, .len = len, .shared = true});
      if (!r && r.error().code == ENOMEM) {  // chunks unmapped just now come back after a grace period
        m.p2pmem().barrier();
        r = as.mmap_p2p(*file, {.addr = va, .len = len, .shared = true});
      }
      if (!r) st = std::move(r).error();
    } else if (auto r = as.mmap_anon({.addr = va, .len = len}); !r) {
      st = std::move(r).error();
    }
    return st;
  };
  {
    std::lock_guard g(as.mmap_lock());
    for (uint64_t s = 0; s < qd; ++s) {
      const uint64_t va = base + s * bs;
      if (host_part) PHYSR_RETURN_IF_ERROR_CTX(map_span(va, host_part, false), where);
      if (bs > host_part) PHYSR_RETURN_IF_ERROR_CTX(map_span(va + host_part, bs - host_part, true), where);
    }
  }
  PHYSR_RETURN_IF_ERROR(fill(base, window));

  // An event: munmap and mmap again at the same address (MAP_FIXED), then fresh data; or
  // migration, whose copy keeps the data (migrate_folio() copies the folio).
  const auto apply = [&](const HmmEvent& ev) -> Status {
    const uint64_t va = base + ev.offset;
    const std::string which = where + ": event at " + std::to_string(ev.at_us) + " us (" + hmm_event_op_name(ev.op) + ")";
    if (ev.op == HmmEvent::Op::migrate) {
      std::vector<PhysAddr> before;
      for (uint64_t o = 0; o < ev.len; o += kPageSize) {
        PHYSR_ASSIGN_OR_RETURN(const PhysAddr p, cpu_page(va + o));
        before.push_back(p);
      }
      {
        std::lock_guard g(as.mmap_lock());
        PHYSR_RETURN_IF_ERROR_CTX(as.migrate(va, ev.len), which);
      }
      std::vector<uint8_t> page(kPageSize);
      for (uint64_t o = 0, n = 0; o < ev.len; o += kPageSize, ++n) {
        PHYSR_ASSIGN_OR_RETURN(const PhysAddr now, cpu_page(va + o));
        if (now == before[n]) continue;
        PHYSR_RETURN_IF_ERROR(m.memory().read(before[n], page));
        PHYSR_RETURN_IF_ERROR(m.memory().write(now, page));
      }
      return {};
    }
    {
      std::lock_guard g(as.mmap_lock());
      PHYSR_RETURN_IF_ERROR_CTX(as.munmap(va, ev.len), which);
      PHYSR_RETURN_IF_ERROR_CTX(map_span(va, ev.len, ev.op == HmmEvent::Op::p2p), which);
    }
    ++generation;
    return fill(va, ev.len);
  };

  // The device's mirror of the buffer; race events land between a fault's walk and its commit.
  PHYSR_ASSIGN_OR_RETURN(DmaDevice* dev, m.device(k.device));
  std::vector<HmmEvent> armed;
  Status hook_status;
  uint64_t applied = 0;
  const auto apply_armed = [&] {
    for (const HmmEvent& ev : armed) {
      if (!hook_status) break;
      hook_status = apply(ev);
      ++applied;
    }
    armed.clear();
  };
  mem::HmmMirrorOptions mo{.start = base, .len = window, .fault_pages = k.fault_pages};
  mo.after_walk = [&](uint64_t) {
    if (!armed.empty()) apply_armed();
  };
  PHYSR_ASSIGN_OR_RETURN_CTX(std::unique_ptr<mem::HmmMirror> mirror, mem::HmmMirror::create(as, *dev, mo), where);

  Fabric& fab = m.fabric();
  JobResult out;
  out.name = job.name;
  out.device = m.label(k.device);
  out.buffer = !bar ? "host memory" : k.host_bytes ? bar->name + " + host memory" : bar->name;
  RouteCache read_routes(fab, k.device, false), write_routes(fab, k.device, true);
  Simulator& sim = group.sim();
  Stages stages(sim, blocks, bs, 0.0);  // served in order, no slot of its own
  std::vector<double> lat;
  ViaFlags via;
  const Route* p2p_taken = nullptr;
  std::vector<uint8_t> got(kPageSize), cpu(kPageSize), data(kPageSize);
  size_t next_event = 0;

  // One page of a block through the mirror: the device's access runs under the mirror's
  // lock while the translation is valid; then the CPU's view of the same address.
  const auto page = [&](uint64_t i, uint64_t va, bool write, std::vector<const Route*>& routes, std::vector<uint64_t>& bytes) -> Status {
    Result<DmaAccess> acc = DmaAccess{};
    const uint64_t pos = i * bs + (va - base) % bs;
    if (write) pattern(stream, pos, data);
    auto t = mirror->access(va, write, [&](const mem::DeviceTranslation& tr) {
      const DmaSegment seg{tr.dma, kPageSize, tr.seg};
      acc = write ? m.dma_write(k.device, std::span(&seg, 1), data) : m.dma_read(k.device, std::span(&seg, 1), got);
    });
    PHYSR_RETURN_IF_ERROR(hook_status);
    if (!t) return std::move(t).error().with_context(where + ": " + m.label(k.device) + (write ? " writing " : " reading ") + format_hex(va));
    DmaAccess a;
    PHYSR_RETURN_IF_ERROR_CTX(take_access(std::move(acc), a), where);
    PHYSR_ASSIGN_OR_RETURN(const PhysAddr p, cpu_page(va));
    const std::string what = where + ": block " + std::to_string(i) + ": " + m.label(k.device) + (write ? " wrote " : " read ") + format_hex(va);
    if (write) {
      PHYSR_RETURN_IF_ERROR(verify_pattern(m, p, stream, pos, kPageSize, [&] { return what + ", but the process's page there"; }));
    } else {
      PHYSR_RETURN_IF_ERROR(m.memory().read(p, cpu));
      const auto d = std::mismatch(got.begin(), got.end(), cpu.begin());
      if (d.first != got.end())
        return make_error(EIO, what + " and got other bytes than the process's page there holds (byte " + std::to_string(d.first - got.begin()) +
                                   " of " + format_hex(p.value()) + "): a stale translation");
    }
    PHYSR_ASSIGN_OR_RETURN_CTX(const Route* r, (write ? write_routes : read_routes).get(a), where);
    if (a.peer_switch || a.peer_rc) {
      if (!p2p_taken) p2p_taken = r;
      via |= r->p2p == pci::MapType::bus_addr ? Via::p2p_bus_addr : Via::p2p_host_bridge;
    }
    if (a.host_memory) via |= Via::host_memory;
    if (!routes.empty() && routes.back() == r) bytes.back() += kPageSize;
    else routes.push_back(r), bytes.push_back(kPageSize);
    return {};
  };

  const auto submit = [&](uint64_t i) -> Status {
    for (; next_event < events.size() && events[next_event].at_us * 1000 <= sim.now(); ++next_event) {
      if (events[next_event].race) {
        armed.push_back(events[next_event]);
        continue;
      }
      if (k.test_drop_notifier) mirror->notifier().remove();
      PHYSR_RETURN_IF_ERROR(apply(events[next_event]));
      ++applied;
    }
    const uint64_t va0 = base + (i % qd) * bs, faults = mirror->stats().faults;
    std::vector<const Route*> routes;
    std::vector<uint64_t> bytes;
    for (const bool write : {false, true})
      for (uint64_t o = 0; o < bs; o += kPageSize) PHYSR_RETURN_IF_ERROR(page(i, va0 + o, write, routes, bytes));
    PHYSR_RETURN_IF_ERROR(hook_status);
    out.verified_bytes += 2 * bs;
    std::vector<Route> rs;
    rs.reserve(routes.size());
    for (const Route* r : routes) rs.push_back(*r);
    rs.front().latency_ns += static_cast<double>(mirror->stats().faults - faults) * k.fault_latency_us * 1000;
    stages.start(i, std::move(rs), 0, std::move(bytes));
    return {};
  };

  Driver d;
  Status st = run_items(group, d, stages, lat, blocks, qd, where, submit);
  const mem::HmmMirrorStats ms = mirror->stats();
  mirror.reset();  // the device lets go: the notifier removed, every entry unmapped
  // The process exits: its mappings go, and the P2P chunks back to the pool (after a grace period).
  Status un;
  {
    std::lock_guard g(as.mmap_lock());
    un = as.munmap(base, window);
  }
  PHYSR_RETURN_IF_ERROR(st);
  PHYSR_RETURN_IF_ERROR_CTX(std::move(un), where);
  finish_result(out, m, d, stages, lat, 2 * job.size, blocks);
  out.via = via;
  out.hmm_faults = ms.faults;
  out.hmm_invalidations = ms.invalidations;
  out.hmm_retries = ms.retries;
  out.hmm_events = applied;
  std::string how;
  if (p2p_taken)
    how = std::string("p2p ") + pci::map_type_name(p2p_taken->p2p) +
          (p2p_taken->through_rc ? " (through the root complex)" : " (under the switch)");
  if (out.took(Via::host_memory)) how += how.empty() ? "host memory" : " + host memory";
  const auto count = [](uint64_t n, const char* one, const char* many) { return std::to_string(n) + " " + (n == 1 ? one : many); };
  out.path = "hmm mirror: " + how + "; " + count(ms.faults, "fault", "faults") + ", " + count(ms.invalidations, "invalidation", "invalidations") +
             ", " + count(ms.retries, "retry", "retries") + ", " + std::to_string(applied) + " of " + std::to_string(events.size()) + " events";
  return out;
}

}  // namespace detail
}  // namespace physr::sim
