// Running a scenario as fio runs a job file: its machine found and built once, then its
// groups one after another (each job alone, or the jobs between stonewalls at once), a
// failed job reported in its own entry.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "physr/builtin.hpp"
#include "physr/sim.hpp"

namespace physr::sim {

const char* via_name(Via v) noexcept {
  switch (v) {
    case Via::host_memory: return "host_memory";
    case Via::p2p_bus_addr: return "p2p_bus_addr";
    case Via::p2p_host_bridge: return "p2p_host_bridge";
    case Via::bounced: return "bounced";
    case Via::staged: return "staged";
  }
  return "?";
}

Result<Scenario> load_scenario(std::string_view file_or_name) {
  const std::filesystem::path file(file_or_name);
  std::error_code ec;
  if (!file_or_name.empty() && std::filesystem::exists(file, ec)) {
    if (std::filesystem::is_directory(file, ec))
      return make_error(EISDIR, "scenario '" + file.string() + "': is a directory (a scenario is a TOML file)");
    std::ifstream in(file, std::ios::binary);
    if (!in) return make_error(EIO, "scenario file '" + file.string() + "': cannot be read");
    const std::string text(std::istreambuf_iterator<char>(in), {});
    auto sc = parse_scenario(text, file.string());
    if (sc) sc->folder = file.parent_path();
    return sc;
  }
  if (const auto text = builtin_scenario_text(file_or_name)) return parse_scenario(*text, "builtin:" + std::string(file_or_name));
  return make_error(ENOENT, "scenario '" + std::string(file_or_name) +
                                "': no such file and no built-in scenario of that name (built-in: " + builtin_scenario_names() + ")");
}

std::string scenario_machine(const Scenario& sc) {
  const std::filesystem::path m(sc.machine);
  std::error_code ec;
  if (!sc.folder.empty() && !sc.machine.empty() && m.is_relative() && std::filesystem::exists(sc.folder / m, ec))
    return (sc.folder / m).string();
  return sc.machine;
}

size_t ScenarioReport::failed() const noexcept {
  size_t n = 0;
  for (const JobOutcome& j : jobs) n += !j.result.has_value();
  return n;
}

Result<ScenarioReport> run_scenario(const Scenario& sc, const std::function<void(size_t, const JobSpec&)>& progress,
                                    const std::function<void(size_t, uint64_t, uint64_t)>& inside) {
  ScenarioReport rep;
  rep.machine = scenario_machine(sc);
  const std::string where = sc.machine_where.empty() ? sc.source : sc.machine_where;
  PHYSR_ASSIGN_OR_RETURN_CTX(const pci::Topology& topo, pci::load_machine(rep.machine), where + ": machine");
  for (const std::string& w : topo.warnings) rep.warnings.push_back(topo.source + ": " + w);
  PHYSR_ASSIGN_OR_RETURN_CTX(const std::unique_ptr<Machine> m, Machine::create(topo, sc.options), where + ": machine " + rep.machine);
  for (const std::string& w : m->warnings) rep.warnings.push_back("machine " + rep.machine + ": " + w);
  rep.concurrent = sc.concurrent;
  rep.jobs.reserve(sc.jobs.size());
  // The groups: every job alone, or (concurrent) runs of jobs up to the next stonewall.
  for (size_t i = 0; i < sc.jobs.size();) {
    size_t end = i + 1;
    if (sc.concurrent)
      while (end < sc.jobs.size() && !sc.jobs[end].stonewall && end - i < kMaxGroupJobs) ++end;
    GroupReport gr;
    gr.index = rep.groups.size();
    std::vector<Job> jobs;
    std::vector<size_t> which;  // the entry of each job of `jobs`
    for (size_t k = i; k < end; ++k) {
      if (progress) progress(k, sc.jobs[k]);
      gr.jobs.push_back(k);
      auto job = resolve_job(sc.jobs[k], *m);
      rep.jobs.push_back(JobOutcome{sc.jobs[k].name, job ? Result<JobResult>(make_error(EINVAL, "not run")) : Result<JobResult>(std::move(job).error()), gr.index});
      if (job) jobs.push_back(std::move(*job)), which.push_back(k);
    }
    std::vector<Result<JobResult>> results =
        run_jobs(*m, jobs, [&](size_t j, uint64_t done, uint64_t total) { if (inside) inside(which[j], done, total); });
    for (size_t j = 0; j < results.size(); ++j) rep.jobs[which[j]].result = std::move(results[j]);
    for (size_t k : gr.jobs) {
      const auto& r = rep.jobs[k].result;
      if (!r) {
        ++gr.failed;
        continue;
      }
      gr.bytes += r->bytes;
      gr.seconds = std::max(gr.seconds, r->seconds);  // every job of a group starts at its start
    }
    gr.gbps = gr.seconds > 0 ? static_cast<double>(gr.bytes) / (gr.seconds * 1e9) : 0;
    rep.groups.push_back(std::move(gr));
    i = end;
  }
  return rep;
}

}  // namespace physr::sim
