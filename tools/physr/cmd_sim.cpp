// physr sim: run a scenario on the machine model and report what each job achieved.
#include <fmt/core.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli.hpp"
#include "physr/sim.hpp"

namespace physr::cli {
namespace {

struct SimOptions {
  std::string scenario{kDefaultScenario};
  bool json = false;
  std::string svg;
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure(fmt::format("cannot read scenario file '{}'", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string gb(double bytes_per_ns) { return fmt::format("{:.2f}", bytes_per_ns); }

// A horizontal bar chart of the jobs' throughput, coloured by path.
std::string svg_chart(const sim::Scenario& sc, const std::vector<sim::JobResult>& rs) {
  double top = 0.1;
  for (const auto& r : rs) top = std::max(top, r.gbps);
  const int row = 34, left = 190, width = 460, h = 70 + row * static_cast<int>(rs.size());
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"10\" y=\"22\" font-size=\"15\">physr sim {}: throughput per job (GB/s)</text>\n",
      left + width + 200, h, sc.name);
  for (size_t i = 0; i < rs.size(); ++i) {
    const auto& r = rs[i];
    const int y = 40 + row * static_cast<int>(i);
    const double w = r.gbps / top * width;
    const char* colour = r.path.rfind("p2p", 0) == 0 ? "#2b7bb9" : r.path == "host memory" ? "#888888" : "#e08a1e";
    s += fmt::format("<text x=\"10\" y=\"{}\">{}</text>\n", y + 17, r.name);
    s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"22\" fill=\"{}\"/>\n", left, y + 2, w, colour);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{}\">{} GB/s, {}</text>\n", left + w + 6, y + 17, gb(r.gbps), r.path);
  }
  s += fmt::format("<text x=\"10\" y=\"{}\" fill=\"#555\">blue: P2P, orange: through host memory, grey: host buffers</text>\n", h - 10);
  return s + "</svg>\n";
}

nlohmann::json to_json(const sim::Scenario& sc, const std::vector<sim::JobResult>& rs) {
  nlohmann::json j;
  j["scenario"] = sc.name;
  j["machine"] = sc.machine;
  for (const auto& r : rs) {
    nlohmann::json x = {{"name", r.name},           {"device", r.device},         {"buffer", r.buffer},
                        {"path", r.path},           {"bytes", r.bytes},           {"ios", r.ios},
                        {"seconds", r.seconds},     {"gbps", r.gbps},             {"latency_p50_us", r.lat_p50_us},
                        {"latency_p99_us", r.lat_p99_us}, {"verified_bytes", r.verified_bytes},
                        {"root_complex_bytes", r.rc_bytes}, {"host_memory_bytes", r.host_memory_bytes},
                        {"prp_ios", r.prp_ios},     {"sgl_ios", r.sgl_ios},       {"iommu_faults", r.iommu_faults}};
    for (const auto& [name, bytes] : r.link_bytes) x["resource_bytes"][name] = bytes;
    j["jobs"].push_back(x);
  }
  return j;
}

}  // namespace

sim::Scenario load_scenario_arg(const std::string& arg) {
  std::error_code ec;
  if (std::filesystem::exists(arg, ec)) {
    sim::Scenario sc = failure_value(sim::parse_scenario(read_text(arg), arg));
    // A relative machine path is relative to the scenario file, when something is there.
    const auto beside = std::filesystem::path(arg).parent_path() / sc.machine;
    if (std::filesystem::path(sc.machine).is_relative() && std::filesystem::exists(beside, ec)) sc.machine = beside.string();
    return sc;
  }
  if (const auto text = builtin_scenario_text(arg)) return failure_value(sim::parse_scenario(*text, "builtin:" + arg));
  throw Failure(fmt::format("scenario '{}': no such file and no built-in scenario of that name (built-in: {})", arg, builtin_scenario_names()));
}

std::vector<sim::JobResult> run_scenario(const sim::Scenario& sc, const std::function<void(size_t, const std::string&)>& progress) {
  const pci::Topology topo = load_machine_arg(sc.machine);
  auto m = failure_value(sim::Machine::create(topo, sc.options));
  for (const std::string& w : m->warnings) fmt::print(stderr, "physr: warning: machine {}: {}\n", sc.machine, w);
  std::vector<sim::JobResult> out;
  for (size_t i = 0; i < sc.jobs.size(); ++i) {
    if (progress) progress(i, sc.jobs[i].name);
    const sim::Job job = failure_value(sim::resolve_job(sc.jobs[i], *m));
    out.push_back(failure_value(sim::run_job(*m, job)));
  }
  return out;
}

namespace {

void run_sim(const SimOptions& o) {
  const sim::Scenario sc = load_scenario_arg(o.scenario);
  const bool tty = !o.json && isatty(STDERR_FILENO);
  const auto progress = [&](size_t i, const std::string& name) {
    if (o.json) return;
    if (tty) fmt::print(stderr, "\r[{}/{}] {:<40}", i + 1, sc.jobs.size(), name);
    else fmt::print(stderr, "running job {}/{}: {}\n", i + 1, sc.jobs.size(), name);
  };
  const auto rs = run_scenario(sc, progress);
  if (tty) fmt::print(stderr, "\r{:<60}\r", "");
  if (!o.svg.empty()) {
    std::ofstream f(o.svg);
    if (!f || !(f << svg_chart(sc, rs))) throw Failure(fmt::format("--svg {}: cannot write the file", o.svg));
  }
  if (o.json) {
    fmt::print("{}\n", to_json(sc, rs).dump(2));
    return;
  }
  fmt::print("Scenario {} on {}{}\n\n", sc.name, sc.machine, sc.description.empty() ? "" : ": " + sc.description);
  // Text columns as wide as their widest entry (BDFs on sysfs machines, names otherwise).
  size_t wj = 3, wd = 6, wb = 6;
  for (const auto& r : rs) {
    wj = std::max(wj, r.name.size());
    wd = std::max(wd, r.device.size());
    wb = std::max(wb, r.buffer.size());
  }
  fmt::print("  {:<{}} {:<{}} {:<{}} {:>6} {:>8} {:>8} {:>9} {:>9}  {}\n", "job", wj, "device", wd, "buffer", wb, "GB/s", "p50 us",
             "p99 us", "via RC", "via host", "path");
  for (const auto& r : rs)
    fmt::print("  {:<{}} {:<{}} {:<{}} {:>6} {:>8.1f} {:>8.1f} {:>9} {:>9}  {}\n", r.name, wj, r.device, wd, r.buffer, wb, gb(r.gbps),
               r.lat_p50_us, r.lat_p99_us, format_size(r.rc_bytes), format_size(r.host_memory_bytes), r.path);
  uint64_t verified = 0;
  for (const auto& r : rs) verified += r.verified_bytes;
  fmt::print("\n  Every byte verified against its source: {} in {} jobs. Simulated time; no wall clock.\n", format_size(verified), rs.size());
  if (!o.svg.empty()) fmt::print("  Chart: {}\n", o.svg);
}

}  // namespace

void add_sim_command(CLI::App& app) {
  auto o = std::make_shared<SimOptions>();
  auto* c = app.add_subcommand("sim", "Run a scenario on the machine model: jobs that move and verify real bytes, timed by the PCIe fabric");
  c->add_option("scenario", o->scenario, "Scenario TOML file or built-in name")->capture_default_str();
  c->add_flag("--json", o->json, "Print the report as JSON");
  c->add_option("--svg", o->svg, "Write a chart comparing the jobs to FILE");
  c->callback([o] { run_sim(*o); });
}

}  // namespace physr::cli
