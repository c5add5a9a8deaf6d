// physr sim: run a scenario on the machine model and report what each job achieved.
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "physr/sim.hpp"

namespace physr::cli {
namespace {

struct SimOptions {
  std::string scenario{kDefaultScenario};
  bool json = false;
  std::string svg;
};

std::string gb(double bytes_per_ns) { return fmt::format("{:.2f}", bytes_per_ns); }

// The chart's colour for a job: by the way its data went, the most costly first.
struct Shade {
  sim::Via via;
  const char* colour;
  const char* legend;
};
constexpr Shade kShades[] = {
    {sim::Via::staged, "#c0504d", "staged through a host buffer"},
    {sim::Via::bounced, "#e08a1e", "bounced through host memory"},
    {sim::Via::p2p_host_bridge, "#7fb2dc", "P2P through the root complex"},
    {sim::Via::p2p_bus_addr, "#2b7bb9", "P2P by bus address"},
    {sim::Via::host_memory, "#888888", "host memory"},
};
const Shade* shade(const sim::JobResult& r) {
  for (const Shade& s : kShades)
    if (r.took(s.via)) return &s;
  return nullptr;
}

// A horizontal bar chart of the jobs' throughput, coloured by the way their data went.
std::string svg_chart(const sim::Scenario& sc, const sim::ScenarioReport& rep) {
  double top = 0.1;
  for (const auto& j : rep.jobs)
    if (j.result) top = std::max(top, j.result->gbps);
  const int row = 34, left = 190, width = 460, h = 80 + row * static_cast<int>(rep.jobs.size());
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"10\" y=\"22\" font-size=\"15\">physr sim {}: throughput per job (GB/s)</text>\n",
      left + width + 200, h, sc.name);
  bool used[std::size(kShades)] = {};
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& j = rep.jobs[i];
    const int y = 40 + row * static_cast<int>(i);
    s += fmt::format("<text x=\"10\" y=\"{}\">{}</text>\n", y + 17, j.name);
    if (!j.result) {
      s += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#c00\">failed: {}</text>\n", left, y + 17, errno_name(j.result.error().code));
      continue;
    }
    const sim::JobResult& r = *j.result;
    const double w = r.gbps / top * width;
    const Shade* sh = shade(r);
    if (sh) used[sh - kShades] = true;
    s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"22\" fill=\"{}\"/>\n", left, y + 2, w, sh ? sh->colour : "#cccccc");
    s += fmt::format("<text x=\"{:.1f}\" y=\"{}\">{} GB/s, {}</text>\n", left + w + 6, y + 17, gb(r.gbps), r.path);
  }
  // The legend names the colours the chart uses.
  int x = 10;
  for (size_t k = 0; k < std::size(kShades); ++k) {
    if (!used[k]) continue;
    s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>\n", x, h - 22, kShades[k].colour);
    s += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#555\">{}</text>\n", x + 16, h - 12, kShades[k].legend);
    x += 16 + 7 * static_cast<int>(std::string_view(kShades[k].legend).size()) + 14;
  }
  return s + "</svg>\n";
}

nlohmann::json to_json(const sim::Scenario& sc, const sim::ScenarioReport& rep) {
  nlohmann::json j;
  j["scenario"] = sc.name;
  j["machine"] = rep.machine;
  j["failed_jobs"] = rep.failed();
  j["jobs"] = nlohmann::json::array();
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& o = rep.jobs[i];
    if (!o.result) {
      const sim::JobSpec& spec = sc.jobs[i];
      j["jobs"].push_back({{"name", o.name},
                           {"device", spec.device},
                           {"buffer", spec.buffer},
                           {"error", o.result.error().to_string()},
                           {"errno", errno_name(o.result.error().code)}});
      continue;
    }
    const sim::JobResult& r = *o.result;
    nlohmann::json x = {{"name", r.name},           {"device", r.device},         {"buffer", r.buffer},
                        {"path", r.path},           {"bytes", r.bytes},           {"ios", r.ios},
                        {"seconds", r.seconds},     {"gbps", r.gbps},             {"latency_p50_us", r.lat_p50_us},
                        {"latency_p99_us", r.lat_p99_us}, {"verified_bytes", r.verified_bytes},
                        {"root_complex_bytes", r.rc_bytes}, {"host_memory_bytes", r.host_memory_bytes},
                        {"prp_ios", r.prp_ios},     {"sgl_ios", r.sgl_ios},       {"iommu_faults", r.iommu_faults}};
    x["via"] = nlohmann::json::array();
    for (sim::Via v : sim::kAllVia)
      if (r.took(v)) x["via"].push_back(sim::via_name(v));
    for (const auto& [name, bytes] : r.link_bytes) x["resource_bytes"][name] = bytes;
    j["jobs"].push_back(x);
  }
  return j;
}

void print_text(const sim::Scenario& sc, const sim::ScenarioReport& rep, const std::string& svg) {
  fmt::print("Scenario {} on {}{}\n\n", sc.name, rep.machine, sc.description.empty() ? "" : ": " + sc.description);
  // Text columns as wide as their widest entry (BDFs on sysfs machines, names otherwise); a
  // failed job shows the device and buffer its scenario names, and its error.
  size_t wj = 3, wd = 6, wb = 6;
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& o = rep.jobs[i];
    wj = std::max(wj, o.name.size());
    wd = std::max(wd, o.result ? o.result->device.size() : sc.jobs[i].device.size());
    wb = std::max(wb, o.result ? o.result->buffer.size() : sc.jobs[i].buffer.size());
  }
  fmt::print("  {:<{}} {:<{}} {:<{}} {:>6} {:>8} {:>8} {:>9} {:>9}  {}\n", "job", wj, "device", wd, "buffer", wb, "GB/s", "p50 us",
             "p99 us", "via RC", "via host", "path");
  uint64_t verified = 0;
  size_t ok = 0;
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& o = rep.jobs[i];
    if (!o.result) {
      fmt::print("  {:<{}} {:<{}} {:<{}} failed: {}\n", o.name, wj, sc.jobs[i].device, wd, sc.jobs[i].buffer, wb, o.result.error().to_string());
      continue;
    }
    const sim::JobResult& r = *o.result;
    fmt::print("  {:<{}} {:<{}} {:<{}} {:>6} {:>8.1f} {:>8.1f} {:>9} {:>9}  {}\n", r.name, wj, r.device, wd, r.buffer, wb, gb(r.gbps),
               r.lat_p50_us, r.lat_p99_us, format_size(r.rc_bytes), format_size(r.host_memory_bytes), r.path);
    verified += r.verified_bytes;
    ++ok;
  }
  fmt::print("\n  Every byte verified against its source: {} in {} jobs. Simulated time; no wall clock.\n", format_size(verified), ok);
  if (!svg.empty()) fmt::print("  Chart: {}\n", svg);
}

void run_sim(const SimOptions& o) {
  const sim::Scenario sc = failure_value(sim::load_scenario(o.scenario));
  const bool tty = !o.json && isatty(STDERR_FILENO);
  const auto progress = [&](size_t i, const sim::JobSpec& spec) {
    if (o.json) return;
    if (tty) fmt::print(stderr, "\r[{}/{}] {:<40}", i + 1, sc.jobs.size(), spec.name);
    else fmt::print(stderr, "running job {}/{}: {}\n", i + 1, sc.jobs.size(), spec.name);
  };
  const sim::ScenarioReport rep = failure_value(sim::run_scenario(sc, progress));
  if (tty) fmt::print(stderr, "\r{:<60}\r", "");
  print_warnings(rep.warnings);
  if (!o.svg.empty()) {
    std::ofstream f(o.svg);
    if (!f || !(f << svg_chart(sc, rep))) throw Failure(fmt::format("--svg {}: cannot write the file", o.svg));
  }
  if (o.json) fmt::print("{}\n", json_text(to_json(sc, rep), 2));
  else print_text(sc, rep, o.svg);
  // Every job reported (a failed one with its error); then the command fails naming them.
  if (const size_t n = rep.failed()) {
    std::string names;
    for (const auto& j : rep.jobs)
      if (!j.result) names += (names.empty() ? "" : ", ") + j.name;
    throw Failure(fmt::format("scenario {}: {} of {} jobs failed ({})", sc.name, n, rep.jobs.size(), names));
  }
}

}  // namespace

void add_sim_command(CLI::App& app) {
  auto o = std::make_shared<SimOptions>();
  auto* c = app.add_subcommand("sim", "Run a scenario on the machine model: jobs that move and verify real bytes, timed by the PCIe fabric");
  c->add_option("scenario", o->scenario, "Scenario TOML file or built-in name")->capture_default_str()->check(kNonEmpty);
  c->add_flag("--json", o->json, "Print the report as JSON");
  c->add_option("--svg", o->svg, "Write a chart comparing the jobs to FILE");
  c->callback([o] { run_sim(*o); });
}

}  // namespace physr::cli
