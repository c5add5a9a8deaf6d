// Scenario files: a machine, options and fio-like jobs (docs/sim.md). Strict like machine
// files: unknown keys, wrong types and bad values name FILE:LINE and the key.
#include "physr/sim.hpp"

#include <algorithm>
#include "pci/toml_fields.hpp"

namespace physr::sim {

using namespace physr::toml_fields;

Result<Scenario> parse_scenario(std::string_view text, std::string_view source) {
  Ctx c{std::string(source)};
  PHYSR_ASSIGN_OR_RETURN(const toml::table& root, parse_text(text, c.source));
  PHYSR_RETURN_IF_ERROR(check_keys(c, root, "scenario", {"name", "description", "machine", "options", "job"}));
  Scenario sc;
  sc.source = c.source;
  PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> name, get_string(c, root, "name", "scenario"));
  sc.name = name.value_or(std::string(source));
  PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> description, get_string(c, root, "description", "scenario"));
  sc.description = description.value_or("");
  PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> machine, get_string(c, root, "machine", "scenario"));
  if (machine) {
    sc.machine = *machine;
    sc.machine_where = c.where(*root.get("machine"));
    sc.machine_where.resize(sc.machine_where.size() - 2);  // "FILE:LINE: " -> "FILE:LINE"
  }

  if (const toml::node* on = root.get("options")) {
    const toml::table* o = on->as_table();
    if (!o) return make_error(EINVAL, c.where(*on) + "options: expected a table ([options])");
    PHYSR_RETURN_IF_ERROR(check_keys(c, *o, "options",
                         {"iommu", "ram", "rc_p2p_gbps", "memory_gbps", "inter_socket_gbps", "nvme_read_gbps", "nvme_write_gbps",
                          "nvme_read_latency_us", "nvme_write_latency_us", "copy_engine_gbps", "copy_engine_latency_us",
                          "nvme_read_iops", "nvme_write_iops", "nvme_latency_sigma", "seed", "concurrent"}));
    PHYSR_ASSIGN_OR_RETURN(sc.concurrent, get_bool(c, *o, "concurrent", "options", false));
    MachineOptions& mo = sc.options;
    PHYSR_ASSIGN_OR_RETURN(mo.iommu, get_bool(c, *o, "iommu", "options", true));
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> ram, get_uint(c, *o, "ram", "options", uint64_t{1} << 50, true));
    if (ram) {
      if (*ram < 3 * GiB) return make_error(EINVAL, c.where(*o->get("ram")) + "options.ram: at least 3 GiB");
      mo.ram = *ram;
    }
    const std::pair<const char*, double*> nums[] = {
        {"rc_p2p_gbps", &mo.fabric.rc_p2p_gbps},     {"memory_gbps", &mo.fabric.memory_gbps},
        {"inter_socket_gbps", &mo.fabric.inter_socket_gbps}, {"nvme_read_gbps", &mo.nvme_read_gbps},
        {"nvme_write_gbps", &mo.nvme_write_gbps},    {"copy_engine_gbps", &mo.copy_engine_gbps}};
    for (const auto& [key, dst] : nums) {
      PHYSR_ASSIGN_OR_RETURN(const std::optional<double> v, get_number(c, *o, key, "options", 0.001, 1e6));
      if (v) *dst = *v;
    }
    for (const auto& [key, dst] : {std::pair{"nvme_read_latency_us", &mo.nvme_read_latency_ns}, std::pair{"nvme_write_latency_us", &mo.nvme_write_latency_ns},
                                   std::pair{"copy_engine_latency_us", &mo.copy_engine_latency_ns}}) {
      PHYSR_ASSIGN_OR_RETURN(const std::optional<double> v, get_number(c, *o, key, "options", 0, 1e6));
      if (v) *dst = *v * 1000;
    }
    // The SSD model (docs/sim.md): IOPS limits, the spread of a command's latency, the seed.
    for (const auto& [key, dst] : {std::pair{"nvme_read_iops", &mo.nvme_read_iops}, std::pair{"nvme_write_iops", &mo.nvme_write_iops}}) {
      PHYSR_ASSIGN_OR_RETURN(const std::optional<double> v, get_number(c, *o, key, "options", 1, 1e9));
      if (v) *dst = *v;
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<double> sigma, get_number(c, *o, "nvme_latency_sigma", "options", 0, 2));
    if (sigma) mo.nvme_latency_sigma = *sigma;
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> seed, get_uint(c, *o, "seed", "options", UINT64_MAX));
    if (seed) mo.seed = *seed;
  }

  PHYSR_ASSIGN_OR_RETURN(const toml::array* jobs, get_table_array(c, root, "job"));
  if (!jobs || jobs->empty()) return make_error(EINVAL, c.source + ": a scenario needs at least one [[job]]");
  for (const toml::node& jn : *jobs) {
    const toml::table& t = *jn.as_table();
    const std::string what = "job";
    PHYSR_RETURN_IF_ERROR(check_keys(c, t, what, {"name", "device", "rw", "bs", "qd", "size", "buffer", "path", "peer", "peer_buffer", "copy_to", "host_bytes", "p2pdma", "rx", "tx", "header", "wire_gbps",
                                          "hmm", "fault_pages", "fault_us", "event", "stonewall"}));
    JobSpec j;
    PHYSR_ASSIGN_OR_RETURN(j.stonewall, get_bool(c, t, "stonewall", what, false));
    j.where = c.where(t);
    j.where.pop_back();  // "FILE:LINE:" -> "FILE:LINE"
    j.where.pop_back();
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> job_name, get_string(c, t, "name", what));
    j.name = job_name.value_or("job" + std::to_string(sc.jobs.size() + 1));
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> dev, get_string(c, t, "device", what));
    if (!dev) return make_error(EINVAL, c.where(t) + "job '" + j.name + "': missing key 'device' (the NVMe SSD)");
    if (dev->empty()) return make_error(EINVAL, c.where(*t.get("device")) + "job '" + j.name + "': device is empty");
    j.device = *dev;
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> rw, get_string(c, t, "rw", what));
    if (rw) {
      if (*rw != "read" && *rw != "write" && *rw != "randread" && *rw != "randwrite")
        return make_error(EINVAL, c.where(*t.get("rw")) + "job.rw: '" + *rw + "' must be read, write, randread or randwrite");
      j.write = *rw == "write" || *rw == "randwrite";
      j.random = rw->starts_with("rand");
      if (j.random && t.get("peer")) return make_error(EINVAL, c.where(*t.get("rw")) + "job.rw: " + *rw + " is for NVMe jobs (a network job has no offsets)");
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> bs, get_uint(c, t, "bs", what, 4 * MiB, true));
    if (bs) j.block_size = *bs;
    if (j.block_size == 0 || (j.block_size % 512 != 0 && !t.get("peer")))
      return make_error(EINVAL, c.where(t.get("bs") ? *t.get("bs") : static_cast<const toml::node&>(t)) + "job.bs: " + std::to_string(j.block_size) + " must be a non-zero multiple of 512");
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> qd, get_uint(c, t, "qd", what, 1024));
    if (qd) j.queue_depth = static_cast<unsigned>(*qd);
    if (j.queue_depth == 0) return make_error(EINVAL, c.where(*t.get("qd")) + "job.qd: must be at least 1");
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> size, get_uint(c, t, "size", what, uint64_t{1} << 44, true));
    if (size) j.size = *size;
    if (j.size == 0 || j.size % j.block_size != 0)
      return make_error(EINVAL, c.where(t.get("size") ? *t.get("size") : static_cast<const toml::node&>(t)) + "job.size: " + std::to_string(j.size) + " must be a non-zero multiple of bs");
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> buffer, get_string(c, t, "buffer", what));
    if (buffer) j.buffer = *buffer;
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> peer, get_string(c, t, "peer", what));
    if (peer) j.peer = *peer;
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> peer_buffer, get_string(c, t, "peer_buffer", what));
    if (peer_buffer) {
      if (j.peer.empty()) return make_error(EINVAL, c.where(*t.get("peer_buffer")) + "job.peer_buffer: only network jobs (with a peer) have one");
      j.peer_buffer = *peer_buffer;
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> copy_to, get_string(c, t, "copy_to", what));
    if (copy_to) {
      if (copy_to->empty()) return make_error(EINVAL, c.where(*t.get("copy_to")) + "job.copy_to: is empty");
      if (peer) return make_error(EINVAL, c.where(*t.get("copy_to")) + "job.copy_to: a network job (peer) has none");
      if (rw) return make_error(EINVAL, c.where(*t.get("rw")) + "job.rw: an O_DIRECT copy (copy_to) reads the device and writes copy_to; leave rw out");
      j.copy_to = *copy_to;
    }
    // hmm = true: the device works on a process's buffer through a mirror (HmmJob).
    PHYSR_ASSIGN_OR_RETURN(j.hmm, get_bool(c, t, "hmm", what, false));
    if (j.hmm) {
      const toml::node* hn = t.get("hmm");
      if (peer) return make_error(EINVAL, c.where(*hn) + "job.hmm: a network job (peer) has no mirror");
      if (copy_to) return make_error(EINVAL, c.where(*hn) + "job.hmm: an O_DIRECT copy (copy_to) pins its buffers; it has no mirror");
      if (rw) return make_error(EINVAL, c.where(*t.get("rw")) + "job.rw: an HMM job's device reads each block and writes it back; leave rw out");
      if (t.get("path")) return make_error(EINVAL, c.where(*t.get("path")) + "job.path: an HMM job's path is where the process's pages are; leave path out");
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> fault_pages, get_uint(c, t, "fault_pages", what, 512));
    PHYSR_ASSIGN_OR_RETURN(const std::optional<double> fault_us, get_number(c, t, "fault_us", what, 0, 1e6));
    PHYSR_ASSIGN_OR_RETURN(const toml::array* evs, get_table_array(c, t, "event"));
    for (const char* key : {"fault_pages", "fault_us", "event"})
      if (t.get(key) && !j.hmm) return make_error(EINVAL, c.where(*t.get(key)) + "job." + key + ": only HMM jobs (hmm = true) have one");
    if (fault_pages) {
      if (*fault_pages == 0) return make_error(EINVAL, c.where(*t.get("fault_pages")) + "job.fault_pages: must be at least 1");
      j.fault_pages = static_cast<uint32_t>(*fault_pages);
    }
    if (fault_us) j.fault_us = *fault_us;
    if (evs) {
      for (const toml::node& en : *evs) {
        const toml::table& e = *en.as_table();
        const std::string ew = "job.event";
        PHYSR_RETURN_IF_ERROR(check_keys(c, e, ew, {"at_us", "op", "offset", "len", "race"}));
        HmmEvent ev;
        PHYSR_ASSIGN_OR_RETURN(const std::optional<double> at, get_number(c, e, "at_us", ew, 0, 1e12));
        if (!at) return make_error(EINVAL, c.where(e) + "job.event: missing key 'at_us' (when the process makes the change)");
        ev.at_us = *at;
        PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> op, get_string(c, e, "op", ew));
        if (!op) return make_error(EINVAL, c.where(e) + "job.event: missing key 'op' (anon, p2p or migrate)");
        if (*op == "anon") ev.op = HmmEvent::Op::anon;
        else if (*op == "p2p") ev.op = HmmEvent::Op::p2p;
        else if (*op == "migrate") ev.op = HmmEvent::Op::migrate;
        else return make_error(EINVAL, c.where(*e.get("op")) + "job.event.op: '" + *op + "' must be anon, p2p or migrate");
        PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> off, get_uint(c, e, "offset", ew, uint64_t{1} << 40, true));
        PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> len, get_uint(c, e, "len", ew, uint64_t{1} << 40, true));
        if (!len) return make_error(EINVAL, c.where(e) + "job.event: missing key 'len' (the bytes of the buffer it changes)");
        ev.offset = off.value_or(0);
        ev.len = *len;
        if (ev.len == 0 || ev.offset % kPageSize != 0 || ev.len % kPageSize != 0)
          return make_error(EINVAL, c.where(e) + "job.event: offset and len must be whole 4 KiB pages, len at least one");
        PHYSR_ASSIGN_OR_RETURN(ev.race, get_bool(c, e, "race", ew, false));
        j.events.push_back(ev);
      }
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> host_bytes, get_uint(c, t, "host_bytes", what, 4 * MiB, true));
    PHYSR_ASSIGN_OR_RETURN(j.p2pdma, get_bool(c, t, "p2pdma", what, true));
    const bool p2pdma = t.get("p2pdma") != nullptr;
    if (host_bytes && !copy_to && !j.hmm)
      return make_error(EINVAL, c.where(*t.get("host_bytes")) + "job.host_bytes: only O_DIRECT copies (with copy_to) and HMM jobs (hmm = true) have one");
    if (p2pdma && !copy_to) return make_error(EINVAL, c.where(*t.get("p2pdma")) + "job.p2pdma: only O_DIRECT copies (with copy_to) have one");
    if (host_bytes) j.host_bytes = *host_bytes;
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> rx, get_string(c, t, "rx", what));
    if (rx) {
      if (j.peer.empty()) return make_error(EINVAL, c.where(*t.get("rx")) + "job.rx: only network jobs (with a peer) have one");
      if (*rx == "plain") j.rx = NetJob::Rx::plain;
      else if (*rx == "devmem") j.rx = NetJob::Rx::devmem;
      else if (*rx == "copy") j.rx = NetJob::Rx::copy;
      else return make_error(EINVAL, c.where(*t.get("rx")) + "job.rx: '" + *rx + "' must be plain, devmem or copy");
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> tx, get_string(c, t, "tx", what));
    if (tx) {
      if (j.peer.empty()) return make_error(EINVAL, c.where(*t.get("tx")) + "job.tx: only network jobs (with a peer) have one");
      if (*tx == "plain") j.tx = NetJob::Tx::plain;
      else if (*tx == "devmem") j.tx = NetJob::Tx::devmem;
      else return make_error(EINVAL, c.where(*t.get("tx")) + "job.tx: '" + *tx + "' must be plain or devmem");
      if (j.tx == NetJob::Tx::devmem && j.rx != NetJob::Rx::plain)
        return make_error(EINVAL, c.where(*t.get("tx")) + "job.tx: a devmem sender's receiver takes packets into its RX buffers (rx = \"plain\")");
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<uint64_t> header, get_uint(c, t, "header", what, 4096));
    if (header) {
      if (j.rx != NetJob::Rx::devmem && j.tx != NetJob::Tx::devmem)
        return make_error(EINVAL, c.where(*t.get("header")) + "job.header: only jobs with rx or tx = \"devmem\" split headers");
      j.header_bytes = static_cast<uint32_t>(*header);
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<double> wire, get_number(c, t, "wire_gbps", what, 0.001, 1e6));
    if (wire) {
      if (j.peer.empty()) return make_error(EINVAL, c.where(*t.get("wire_gbps")) + "job.wire_gbps: only network jobs (with a peer) have a wire");
      j.wire_gbps = *wire;
    }
    PHYSR_ASSIGN_OR_RETURN(const std::optional<std::string> path, get_string(c, t, "path", what));
    if (path) {
      if (*path == "p2p") j.path = PathPolicy::p2p;
      else if (*path == "bounce") j.path = PathPolicy::bounce;
      else if (*path == "auto") j.path = PathPolicy::automatic;
      else return make_error(EINVAL, c.where(*t.get("path")) + "job.path: '" + *path + "' must be p2p, bounce or auto");
    }
    sc.jobs.push_back(std::move(j));
  }
  // A concurrent scenario's groups: at most kMaxGroupJobs jobs between stonewalls.
  for (size_t i = 0, run = 0; sc.concurrent && i < sc.jobs.size(); ++i) {
    run = sc.jobs[i].stonewall ? 1 : run + 1;
    if (run > kMaxGroupJobs)
      return make_error(EINVAL, sc.jobs[i].where + ": job '" + sc.jobs[i].name + "': more than " + std::to_string(kMaxGroupJobs) +
                                    " jobs would run at once; start a new group with stonewall = true");
  }
  return sc;
}

namespace {

// buffer = "nearest": Linux pci_p2pmem_find_many() over the published providers that can
// serve the job: a BAR that holds its bs x qd of buffers (Linux would pick by distance
// alone and then fail pci_alloc_p2pmem(); a job cannot fall back, so physr filters first)
// and is not the device's own, except an NVMe CMB (its SSD's own P2P memory, distance 0).
// The owner's largest such BAR; nullptr if no provider qualifies.
const Aperture* nearest_for_job(const Machine& m, uint32_t device, uint64_t window) {
  const pci::Topology& t = m.topology();
  const auto usable = [&](const Aperture& a) {
    const bool own_cmb = t.functions[a.function].cmb && t.functions[a.function].cmb->bar == a.bar;
    return a.published && a.span.size >= window && (a.function != device || own_cmb);
  };
  std::vector<uint32_t> owners;
  for (const Aperture& a : m.apertures())
    if (usable(a) && std::find(owners.begin(), owners.end(), a.function) == owners.end()) owners.push_back(a.function);
  const uint32_t clients[] = {device};
  const auto pick = m.platform().p2p().find_many(clients, owners, [](size_t) { return size_t{0}; });
  if (!pick) return nullptr;
  const Aperture* best = nullptr;
  for (const Aperture& a : m.apertures())
    if (a.function == *pick && usable(a) && (!best || a.span.size > best->span.size)) best = &a;
  return best;
}

}  // namespace

Result<Job> resolve_job(const JobSpec& s, Machine& m) {
  const pci::Topology& t = m.topology();
  const auto at = [&] { return s.where + ": job '" + s.name + "': "; };
  Job j;
  j.name = s.name;
  j.block_size = s.block_size;
  j.queue_depth = s.queue_depth;
  j.size = s.size;
  PHYSR_ASSIGN_OR_RETURN_CTX(const uint32_t device, t.lookup(s.device), at() + "device");
  std::optional<uint32_t> buffer;
  if (s.buffer == "nearest") {
    const uint64_t window = s.block_size * s.queue_depth;
    const Aperture* a = nearest_for_job(m, device, window);
    if (!a)
      return make_error(EINVAL, at() + "buffer = \"nearest\": no published P2P memory of at least " + format_size(window) +
                                    " (bs x qd) is reachable from " + s.device + ", other than its own registers");
    buffer = a->function;
  } else if (s.buffer != "host") {
    auto b = t.lookup(s.buffer);
    // Explicit: the hint follows the lookup's message, which a context prefix cannot place.
    if (!b) return make_error(b.error().code, at() + "buffer: " + b.error().message + " (or use host or nearest)");
    buffer = *b;
  }
  if (!s.peer.empty()) {
    NetJob nj;
    nj.sender = device;
    nj.tx_buffer_function = buffer;
    nj.path = s.path;
    PHYSR_ASSIGN_OR_RETURN_CTX(nj.receiver, t.lookup(s.peer), at() + "peer");
    if (s.peer_buffer != "host") {
      auto b = t.lookup(s.peer_buffer);
      // Explicit, as for buffer: a hint after the lookup's message.
      if (!b) return make_error(b.error().code, at() + "peer_buffer: " + b.error().message + " (or use host)");
      nj.rx_buffer_function = *b;
    }
    nj.rx = s.rx;
    nj.tx = s.tx;
    nj.header_bytes = s.header_bytes;
    nj.wire_gbps = s.wire_gbps;
    j.kind = nj;
    return j;
  }
  if (s.hmm) {
    j.kind = HmmJob{.device = device, .buffer_function = buffer, .host_bytes = s.host_bytes, .fault_pages = s.fault_pages,
                    .fault_latency_us = s.fault_us, .events = s.events, .test_drop_notifier = false};
    return j;
  }
  if (!s.copy_to.empty()) {
    DirectIoJob dj{.ssd = device, .buffer_function = buffer, .host_bytes = s.host_bytes, .p2pdma = s.p2pdma, .path = s.path};
    PHYSR_ASSIGN_OR_RETURN_CTX(dj.target, t.lookup(s.copy_to), at() + "copy_to");
    j.kind = dj;
    return j;
  }
  PHYSR_ASSIGN_OR_RETURN_CTX(j.kind, job_kind_for(t, device, s.write, buffer), s.where + ": job '" + s.name + "'");
  std::visit([&](auto& k) {
    if constexpr (requires { k.path; }) k.path = s.path;
  }, j.kind);
  if (s.random) {
    auto* nv = std::get_if<NvmeJob>(&j.kind);
    if (!nv) return make_error(EINVAL, at() + "rw = \"" + (s.write ? "randwrite" : "randread") + "\" is for NVMe SSDs; " + s.device + " is not one");
    nv->random = true;
  }
  return j;
}

}  // namespace physr::sim
