// physr sim: run a scenario on the machine model and report what each job achieved.
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
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
// I/Os per second for people: 812, 45.3K, 1.00M.
std::string iops_text(double v) {
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e4) return fmt::format("{:.1f}K", v / 1e3);
  return fmt::format("{:.0f}", v);
}
// A block size as fio writes it: 512, 4K, 128K, 1M (exact multiples), else bytes.
std::string short_size(uint64_t v) {
  if (v >= MiB && v % MiB == 0) return fmt::format("{}M", v / MiB);
  if (v >= KiB && v % KiB == 0) return fmt::format("{}K", v / KiB);
  return std::to_string(v);
}

// SVG text content or attribute value: the five XML specials escaped (job names, paths and
// the scenario's name are free text).
std::string xml_escape(std::string_view text) {
  std::string out;
  for (char ch : text) {
    switch (ch) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // XML 1.0 has no place for other control characters; names cannot hold them.
        if (static_cast<unsigned char>(ch) < 0x20 && ch != '\t' && ch != '\n') out += ' ';
        else out += ch;
    }
  }
  return out;
}

// The chart's colours, from each job's result data: a job that took a P2P path has its
// bar split between host memory (host_memory_bytes, in the colour of how: staged, bounced
// or plain host buffers) and its P2P path (the job's bytes), in proportion; a job without
// one is all host memory.
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
// The first of `order` the job took, else nullptr.
const Shade* shade_of(const sim::JobResult& r, std::initializer_list<sim::Via> order) {
  for (sim::Via v : order)
    if (r.took(v))
      for (const Shade& s : kShades)
        if (s.via == v) return &s;
  return nullptr;
}

// A job's bar as fractions of its length: the host-memory part and the P2P part, each
// with its shade (nullptr: that part is not drawn).
struct BarParts {
  const Shade* host = nullptr;
  const Shade* p2p = nullptr;
  double host_share = 0;  // of the bar; the P2P part is the rest
};
BarParts bar_parts(const sim::JobResult& r) {
  BarParts b;
  b.p2p = shade_of(r, {sim::Via::p2p_host_bridge, sim::Via::p2p_bus_addr});
  // Host memory's bytes against the job's bytes moved peer to peer: a network job that
  // sends from host memory and receives into a BAR is half and half.
  const double host = static_cast<double>(r.host_memory_bytes), all = host + static_cast<double>(r.bytes);
  const double share = all > 0 ? host / all : 0.0;
  b.host_share = b.p2p ? share : 1.0;  // no P2P path: all of it went by host memory
  if (b.host_share > 0) b.host = shade_of(r, {sim::Via::staged, sim::Via::bounced, sim::Via::host_memory});
  if (b.host_share >= 1) b.p2p = nullptr;
  return b;
}

// Text width in the chart's 12 px sans-serif, generously (so labels are never cut).
int text_px(std::string_view text) { return 7 * static_cast<int>(text.size()) + 8; }

// A horizontal bar chart of the jobs' throughput with an axis in GB/s, each bar split into
// the bytes that went through host memory and the bytes that went peer to peer.
std::string svg_chart(const sim::Scenario& sc, const sim::ScenarioReport& rep) {
  double top = 0.1;
  for (const auto& j : rep.jobs)
    if (j.result) top = std::max(top, j.result->gbps);
  // A round axis end: 1, 2 or 5 times a power of ten, in four ticks or more.
  double step = std::pow(10.0, std::floor(std::log10(top / 4)));
  for (double f : {1.0, 2.0, 5.0, 10.0})
    if (top / (step * f) <= 5) {
      step *= f;
      break;
    }
  const double axis = std::ceil(top / step) * step;
  const std::string title = "physr sim " + sc.name + ": throughput per job";
  int left = 120, right = 0;
  std::vector<std::string> labels(rep.jobs.size());
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& j = rep.jobs[i];
    left = std::max(left, text_px(j.name) + 20);
    if (!j.result) {
      labels[i] = "failed: " + j.result.error().to_string();
    } else {
      const sim::JobResult& r = *j.result;
      labels[i] = fmt::format("{} GB/s, {} through host memory, {}", gb(r.gbps), format_size(r.host_memory_bytes), r.path);
    }
    right = std::max(right, text_px(labels[i]));
  }
  const int row = 34, width = 460, top_y = 40;
  const int chart_bottom = top_y + row * static_cast<int>(rep.jobs.size());
  const int h = chart_bottom + 70;
  bool used[std::size(kShades)] = {};
  for (const auto& j : rep.jobs) {
    if (!j.result || j.result->gbps <= 0) continue;
    const BarParts b = bar_parts(*j.result);
    for (const Shade* k : {b.host, b.p2p})
      if (k) used[k - kShades] = true;
  }
  int legend_w = 10;
  for (size_t k = 0; k < std::size(kShades); ++k)
    if (used[k]) legend_w += 16 + text_px(kShades[k].legend) + 6;
  const int total_w = std::max({left + width + 10 + right, text_px(title) * 15 / 12 + 20, legend_w});
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<title>{}</title>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"10\" y=\"22\" font-size=\"15\">{}</text>\n",
      total_w, h, xml_escape(title), xml_escape(title));
  // The axis: a line, ticks and their values, and the unit (GB/s: 10^9 bytes per second).
  s += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#444\"/>\n", left, top_y, chart_bottom);
  s += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#444\"/>\n", left, chart_bottom, left + width);
  for (double v = 0; v <= axis + step / 2; v += step) {
    const double x = left + v / axis * width;
    s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#444\"/>\n", x, chart_bottom, chart_bottom + 4);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\" fill=\"#444\">{:g}</text>\n", x, chart_bottom + 17, v);
  }
  s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#444\">throughput (GB/s, 10^9 bytes per second)</text>\n",
                   left + width / 2, chart_bottom + 33);
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& j = rep.jobs[i];
    const int y = top_y + row * static_cast<int>(i);
    s += fmt::format("<text x=\"10\" y=\"{}\">{}</text>\n", y + 17, xml_escape(j.name));
    if (!j.result) {
      s += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#c00\">{}</text>\n", left + 6, y + 17, xml_escape(labels[i]));
      continue;
    }
    const sim::JobResult& r = *j.result;
    const double w = std::max(r.gbps, 0.0) / axis * width;
    const BarParts b = bar_parts(r);
    const double hw = w * b.host_share;
    if (b.host && hw > 0)
      s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"22\" fill=\"{}\"/>\n", left, y + 2, hw, b.host->colour);
    if (b.p2p && w - hw > 0)
      s += fmt::format("<rect x=\"{:.1f}\" y=\"{}\" width=\"{:.1f}\" height=\"22\" fill=\"{}\"/>\n", left + hw, y + 2, w - hw, b.p2p->colour);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{}\">{}</text>\n", left + w + 6, y + 17, xml_escape(labels[i]));
  }
  // The legend names the colours the chart uses.
  int x = 10;
  for (size_t k = 0; k < std::size(kShades); ++k) {
    if (!used[k]) continue;
    s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>\n", x, h - 22, kShades[k].colour);
    s += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#555\">{}</text>\n", x + 16, h - 12, kShades[k].legend);
    x += 16 + text_px(kShades[k].legend) + 6;
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
                           {"errno", errno_name(o.result.error().code)},
                           {"group", o.group}});
      continue;
    }
    const sim::JobResult& r = *o.result;
    nlohmann::json x = {{"name", r.name},           {"device", r.device},         {"buffer", r.buffer},
                        {"path", r.path},           {"bytes", r.bytes},           {"ios", r.ios},
                        {"seconds", r.seconds},     {"gbps", r.gbps},             {"bytes_per_second", r.gbps * 1e9},             {"latency_p50_us", r.lat_p50_us},
                        {"latency_p99_us", r.lat_p99_us}, {"latency_p999_us", r.lat_p999_us},
                        {"rw", r.rw},               {"bs", r.block_size},         {"qd", r.queue_depth},
                        {"size", r.bytes},          {"iops", r.seconds > 0 ? static_cast<double>(r.ios) / r.seconds : 0.0},
                        {"verified_bytes", r.verified_bytes},
                        {"root_complex_bytes", r.rc_bytes}, {"host_memory_bytes", r.host_memory_bytes},
                        {"prp_ios", r.prp_ios},     {"sgl_ios", r.sgl_ios},       {"iommu_faults", r.iommu_faults}};
    x["via"] = nlohmann::json::array();
    for (sim::Via v : sim::kAllVia)
      if (r.took(v)) x["via"].push_back(sim::via_name(v));
    if (r.requests) x["bios"] = r.bios, x["requests"] = r.requests;  // O_DIRECT jobs: the block layer's
    if (r.hmm_faults)  // HMM jobs: the mirror's counts (every HMM job faults its buffer in)
      x["hmm_faults"] = r.hmm_faults, x["hmm_invalidations"] = r.hmm_invalidations, x["hmm_retries"] = r.hmm_retries,
      x["hmm_events"] = r.hmm_events;
    for (const auto& [name, bytes] : r.link_bytes) x["resource_bytes"][name] = bytes;
    x["group"] = o.group;
    j["jobs"].push_back(x);
  }
  // fio's group reporting: the jobs that ran at once, their bytes over the group's time.
  j["concurrent"] = rep.concurrent;
  j["groups"] = nlohmann::json::array();
  for (const sim::GroupReport& g : rep.groups) {
    nlohmann::json names = nlohmann::json::array();
    for (size_t k : g.jobs) names.push_back(rep.jobs[k].name);
    j["groups"].push_back({{"group", g.index}, {"jobs", names}, {"bytes", g.bytes}, {"seconds", g.seconds}, {"gbps", g.gbps},
                           {"bytes_per_second", g.gbps * 1e9}, {"failed_jobs", g.failed}});
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
  fmt::print("  {:<{}} {:<{}} {:<{}} {:<9} {:>5} {:>4} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  {}\n", "job", wj, "device", wd,
             "buffer", wb, "rw", "bs", "qd", "size", "GB/s", "IOPS", "p50 us", "p99 us", "p99.9 us", "via RC", "via host", "path");
  uint64_t verified = 0;
  size_t ok = 0;
  for (size_t i = 0; i < rep.jobs.size(); ++i) {
    const auto& o = rep.jobs[i];
    if (!o.result) {
      fmt::print("  {:<{}} {:<{}} {:<{}} failed: {}\n", o.name, wj, sc.jobs[i].device, wd, sc.jobs[i].buffer, wb, o.result.error().to_string());
      continue;
    }
    const sim::JobResult& r = *o.result;
    fmt::print("  {:<{}} {:<{}} {:<{}} {:<9} {:>5} {:>4} {:>9} {:>6} {:>8} {:>8.1f} {:>8.1f} {:>8.1f} {:>9} {:>9}  {}\n", r.name, wj, r.device,
               wd, r.buffer, wb, r.rw, short_size(r.block_size), r.queue_depth, format_size(r.bytes), gb(r.gbps),
               iops_text(r.seconds > 0 ? static_cast<double>(r.ios) / r.seconds : 0), r.lat_p50_us, r.lat_p99_us, r.lat_p999_us,
               format_size(r.rc_bytes), format_size(r.host_memory_bytes), r.path);
    verified += r.verified_bytes;
    ++ok;
  }
  // The groups of jobs that ran at once (a concurrent scenario), as fio's group reporting.
  bool shown = false;
  for (const sim::GroupReport& g : rep.groups) {
    if (!rep.concurrent) break;
    if (!shown) fmt::print("\n");
    shown = true;
    std::string names;
    for (size_t k : g.jobs) names += (names.empty() ? "" : ", ") + rep.jobs[k].name;
    fmt::print("  group {} ({} {}): {} in {:.6f} s, {} GB/s aggregate{}\n", g.index, g.jobs.size() == 1 ? "alone:" : "at once:", names,
               format_size(g.bytes), g.seconds, gb(g.gbps), g.failed ? fmt::format(", {} failed", g.failed) : "");
  }
  fmt::print("\n  Every byte verified against its source: {} in {} jobs. Simulated time; no wall clock.\n", format_size(verified), ok);
  if (!svg.empty()) fmt::print("  Chart: {}\n", svg);
}

void run_sim(const SimOptions& o) {
  const sim::Scenario sc = failure_value(sim::load_scenario(o.scenario));
  const bool tty = !o.json && isatty(STDERR_FILENO);
  using Clock = std::chrono::steady_clock;
  Clock::time_point started, shown;
  const auto progress = [&](size_t i, const sim::JobSpec& spec) {
    started = shown = Clock::now();
    if (o.json) return;
    if (tty) fmt::print(stderr, "\r[{}/{}] {:<40}", i + 1, sc.jobs.size(), spec.name);
    else fmt::print(stderr, "running job {}/{}: {}\n", i + 1, sc.jobs.size(), spec.name);
  };
  // The chart's file is opened before the run, so a path that cannot be written fails now.
  std::ofstream svg_file;
  if (!o.svg.empty()) {
    svg_file.open(o.svg);
    if (!svg_file) throw Failure(fmt::format("--svg {}: cannot write the file: {}", o.svg, std::strerror(errno)));
  }
  // Inside a job, on a terminal only (never in a pipe or a log): a bar, the share of its
  // I/Os done and, from the wall clock so far, the time left; redrawn at most 10 times a second.
  const auto inside = [&](size_t i, uint64_t done, uint64_t total) {
    const Clock::time_point now = Clock::now();
    if (now - shown < std::chrono::milliseconds(100) || done == 0 || total == 0) return;
    shown = now;
    const double elapsed = std::chrono::duration<double>(now - started).count();
    const double left = elapsed * static_cast<double>(total - done) / static_cast<double>(done);
    const auto filled = static_cast<size_t>(20 * done / total);
    fmt::print(stderr, "\r[{}/{}] {:<40} [{}{}] {:3}%  ETA {:.0f} s  ", i + 1, sc.jobs.size(), sc.jobs[i].name, std::string(filled, '#'),
               std::string(20 - filled, '-'), 100 * done / total, left);
  };
  const sim::ScenarioReport rep = failure_value(sim::run_scenario(sc, progress, tty ? std::function(inside) : nullptr));
  if (tty) fmt::print(stderr, "\r{:<100}\r", "");
  print_warnings(rep.warnings);
  if (!o.svg.empty() && !(svg_file << svg_chart(sc, rep) << std::flush)) throw Failure(fmt::format("--svg {}: cannot write the file", o.svg));
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
