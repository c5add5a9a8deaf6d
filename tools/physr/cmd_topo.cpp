// physr topo / physr explain: the PCI tree of a machine and the P2P verdict for every pair
// of devices, as Linux drivers/pci/p2pdma.c would compute it.
#include <fmt/core.h>

#include <sys/utsname.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "json_writer.hpp"
#include "physr/pci.hpp"

namespace physr::cli {
namespace {

using namespace physr::pci;

struct SourceOptions {
  std::string sysfs_root;
  std::string machine;
  std::string acs_off;
  std::string assume_cpu;
  std::string kernel;
};

void add_source_options(CLI::App* c, const std::shared_ptr<SourceOptions>& o) {
  auto* s = c->add_option("--sysfs-root", o->sysfs_root, "Read a sysfs snapshot rooted at DIR (default: the live /sys)")->check(kNonEmpty);
  auto* m = c->add_option("--machine", o->machine, "Read a TOML machine file, or a built-in machine by name")->check(kNonEmpty);
  s->excludes(m);
  c->add_option("--assume-acs-off", o->acs_off, "BDF or NAME[,...]: as if pci=disable_acs_redir= listed them");
  c->add_option("--assume-cpu", o->assume_cpu, "amd-zen or other: override the CPU for the AMD Zen rule");
  c->add_option("--kernel", o->kernel,
                "VERSION: apply the P2P rules of Linux VERSION (default: the running kernel's for the live /sys, "
                "else the newest physr knows, " + kNewestKernel.to_string() + ")");
}

/// Whether the options name this host's own sysfs: no source, --sysfs-root /, --machine /.
bool live_host(const SourceOptions& o) {
  const std::string& dir = !o.machine.empty() ? o.machine : o.sysfs_root.empty() ? std::string("/") : o.sysfs_root;
  std::error_code ec;
  return std::filesystem::is_directory(dir, ec) && std::filesystem::equivalent(dir, "/", ec);
}

/// The kernel whose rules apply and where that choice came from, for the output.
struct KernelChoice {
  KernelVersion version = kNewestKernel;
  std::string from = "the newest physr knows";
};

KernelChoice kernel_choice(const SourceOptions& o) {
  auto check = [](KernelVersion k, const std::string& what, bool usage) {
    if (k >= kOldestKernel) return;
    const std::string m = what + ": physr models the P2P rules of Linux " + kOldestKernel.to_string() + " and newer";
    if (usage) throw UsageError(m);
    throw Failure(m + "; choose the rules with --kernel VERSION");
  };
  if (!o.kernel.empty()) {
    auto k = parse_kernel_version(o.kernel);
    if (!k) throw UsageError(std::move(k).error().with_context("--kernel").message);
    check(*k, "--kernel " + o.kernel, true);
    return {*k, "--kernel"};
  }
  if (!live_host(o)) return {};
  utsname u{};
  if (uname(&u) != 0) throw Failure("uname failed; choose the rules with --kernel VERSION");
  auto k = parse_kernel_version(u.release);
  if (!k) throw Failure(std::move(k).error().with_context("the running kernel (uname -r)").message + "; choose the rules with --kernel VERSION");
  check(*k, std::string("the running kernel ") + u.release, false);
  return {*k, std::string("the running kernel, ") + u.release};
}

/// The loader's warnings, to stderr.
Topology warned(Topology t) {
  for (const std::string& w : t.warnings) fmt::print(stderr, "physr: warning: {}: {}\n", t.source, w);
  return t;
}

/// Loads the topology the options name (a machine file, a built-in machine or sysfs) and
/// prints the loader's warnings to stderr.
Topology load_topology(const SourceOptions& o) {
  if (!o.machine.empty()) return load_machine_arg(o.machine);
  return warned(failure_value(load_sysfs(o.sysfs_root.empty() ? "/" : o.sysfs_root)));
}

VerdictOptions verdict_options(const SourceOptions& o, const KernelChoice& k, const Topology& t) {
  VerdictOptions v;
  v.kernel = k.version;
  size_t pos = 0;
  while (pos < o.acs_off.size()) {
    size_t end = o.acs_off.find(',', pos);
    if (end == std::string::npos) end = o.acs_off.size();
    const std::string tok = o.acs_off.substr(pos, end - pos);
    if (!tok.empty()) {
      // A BDF, or a device name of the machine (its BDF is what the kernel parameter takes).
      auto b = parse_bdf(tok);
      if (!b) {
        const auto byname = std::find_if(t.functions.begin(), t.functions.end(), [&](const Function& f) { return !f.name.empty() && f.name == tok; });
        if (byname == t.functions.end())
          throw UsageError(std::move(b).error().with_context("--assume-acs-off").message + ", nor a device name of " + t.source);
        b = byname->bdf;
      }
      v.acs_redir_off.push_back(*b);
    }
    pos = end + 1;
  }
  if (o.assume_cpu == "amd-zen") v.assume_amd_zen = true;
  else if (o.assume_cpu == "other") v.assume_amd_zen = false;
  else if (!o.assume_cpu.empty()) throw UsageError("--assume-cpu '" + o.assume_cpu + "': expected amd-zen or other");
  return v;
}

std::string port_label(const Function& f) {
  if (f.port_type == PortType::unknown || f.port_type == PortType::conventional) return "";
  return std::string(port_type_name(f.port_type)) + (f.port_type_inferred ? "*" : "");
}

std::string acs_label(const Function& f) {
  switch (f.acs.kind) {
    case AcsState::Kind::unknown: return "ACS ?";
    case AcsState::Kind::absent: return "";
    case AcsState::Kind::present: return "ACS " + acs_bits_string(f.acs.ctrl);
  }
  return "";
}

std::string describe(const Function& f) {
  std::string s = f.bdf.to_string();
  if (!f.name.empty()) s += " (" + f.name + ")";
  return s;
}

std::string short_verdict(const Verdict& v) {
  switch (v.type) {
    case MapType::bus_addr: return fmt::format("B{}", v.distance);
    case MapType::thru_host_bridge: return fmt::format("H{}", v.distance);
    case MapType::not_supported: return "--";
  }
  return "?";
}

// --devices: comma-separated BDF prefixes, device names or class words.
bool device_matches(const Function& f, const std::string& filter) {
  if (filter.empty()) return true;
  size_t pos = 0;
  const std::string bdf = f.bdf.to_string();
  while (pos <= filter.size()) {
    size_t end = filter.find(',', pos);
    if (end == std::string::npos) end = filter.size();
    const std::string t = filter.substr(pos, end - pos);
    pos = end + 1;
    if (t.empty()) continue;
    if (t == f.name || bdf.rfind(t, 0) == 0 || bdf.substr(5).rfind(t, 0) == 0) return true;
    if (t == "nvme" && is_nvme(f)) return true;
    if (t == "storage" && is_storage(f)) return true;
    if ((t == "net" || t == "nic") && is_network(f)) return true;
    if ((t == "gpu" || t == "display") && is_display(f)) return true;
    if (t == "accel" && (is_accelerator(f) || is_processor(f))) return true;
  }
  return false;
}

// A size as lspci prints it: 16K, 16M, 64G (exact multiples), else bytes.
std::string lspci_size(uint64_t v) {
  for (const auto& [unit, suffix] : {std::pair{GiB, "G"}, std::pair{MiB, "M"}, std::pair{KiB, "K"}})
    if (v >= unit && v % unit == 0) return fmt::format("{}{}", v / unit, suffix);
  return std::to_string(v);
}

// The tree's last column, as lspci -v tells it: each BAR's size (pref: prefetchable), and the
// link's speed and width (LnkSta) when known.
std::string bars_and_link(const Function& f) {
  std::string out;
  for (const Bar& b : f.bars)
    out += fmt::format("{}BAR{} {}{}", out.empty() ? "" : " ", b.index, lspci_size(b.size()), b.prefetchable() ? " pref" : "");
  if (f.link_speed_gts > 0 && f.link_width > 0)
    out += fmt::format("{}LnkSta {:g}GT/s x{}", out.empty() ? "" : "  ", f.link_speed_gts, f.link_width);
  return out;
}

void print_tree(const Topology& t, P2PEngine& e) {
  std::vector<std::vector<uint32_t>> children(t.functions.size());
  for (uint32_t i = 0; i < t.functions.size(); ++i)
    if (t.functions[i].upstream >= 0) children[static_cast<uint32_t>(t.functions[i].upstream)].push_back(i);
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h) {
    const HostBridge& hb = t.host_bridges[h];
    // What the allowlist would say for P2P between two root ports of this host bridge.
    std::string allow = "no identifying device: allowlist fails";
    const auto& roots = hb.root_functions;
    if (const auto id = e.identifying_device(h)) {
      const Function& f = t.functions[*id];
      allow = fmt::format("identifying device {} {:04x}:{:04x}: {}", f.bdf.to_string(), f.vendor, f.device,
                          e.host_bridge_allowed(*id, *id) ? "allowlisted" : "not in the allowlist");
    }
    fmt::print("{}  NUMA {}  {}\n", hb.name(), hb.numa_node, allow);
    // Rows first, so every column lines up whatever the depth and names.
    struct Row {
      std::string head, ids, cls, port, acs, bars;
    };
    std::vector<Row> rows;
    std::vector<std::pair<uint32_t, int>> stack;
    for (auto it = roots.rbegin(); it != roots.rend(); ++it) stack.push_back({*it, 1});
    while (!stack.empty()) {
      auto [i, depth] = stack.back();
      stack.pop_back();
      const Function& f = t.functions[i];
      rows.push_back({std::string(static_cast<size_t>(depth) * 2, ' ') + describe(f), fmt::format("{:04x}:{:04x}", f.vendor, f.device),
                      class_name(f.class_code), port_label(f), acs_label(f),
                      bars_and_link(f)});
      for (auto it = children[i].rbegin(); it != children[i].rend(); ++it) stack.push_back({*it, depth + 1});
    }
    size_t w[4] = {0, 0, 0, 0};
    for (const Row& r : rows) {
      w[0] = std::max(w[0], r.head.size());
      w[1] = std::max(w[1], r.cls.size());
      w[2] = std::max(w[2], r.port.size());
      w[3] = std::max(w[3], r.acs.size());
    }
    for (const Row& r : rows) {
      std::string line = fmt::format("{:<{}}  {}  {:<{}}  {:<{}}  {:<{}}  {}", r.head, w[0], r.ids, r.cls, w[1], r.port, w[2],
                                     r.acs, w[3], r.bars);
      while (!line.empty() && line.back() == ' ') line.pop_back();
      fmt::print("{}\n", line);
    }
  }
}

std::vector<uint32_t> endpoints(const Topology& t, const std::string& filter) {
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < t.functions.size(); ++i)
    if (!is_bridge(t.functions[i]) && device_matches(t.functions[i], filter)) out.push_back(i);
  return out;
}

// nvidia-smi's link class of a pair from its verdict alone, as P2PEngine::explain() derives
// it from the path (a CLI test compares the two on every pair of the built-in machines):
// bus_addr through at most one switch (distance up to 4: three bridges) is PIX, through more
// PXB; any other verdict goes through the host bridge: PHB within one, NODE or SYS between two.
const char* pair_link_class(const Topology& t, uint32_t p, uint32_t c, const Verdict& v) {
  if (p == c) return "X";
  if (v.type == MapType::bus_addr) return v.distance <= 4 ? "PIX" : "PXB";
  const Function& a = t.functions[p];
  const Function& b = t.functions[c];
  if (a.host_bridge == b.host_bridge) return "PHB";
  const int fa = a.numa_node >= 0 ? a.numa_node : t.host_bridges[a.host_bridge].numa_node;
  const int fb = b.numa_node >= 0 ? b.numa_node : t.host_bridges[b.host_bridge].numa_node;
  return fa == fb ? "NODE" : "SYS";
}

void print_legend(const Topology& t) {
  fmt::print("\n  Bn = bus_addr (PCI bus address, below a common switch or bridge), distance n\n"
             "  Hn = thru_host_bridge (via the root complex, IOMMU applies), distance n\n"
             "  -- = not_supported (the DMA layer must bounce or fail with EREMOTEIO)\n");
  for (const auto& [cls, def] : link_class_legend()) fmt::print("  {:<4} = {}\n", cls, def);
  bool any_unknown = false;
  for (const Function& f : t.functions) any_unknown = any_unknown || f.acs.kind == AcsState::Kind::unknown;
  if (any_unknown)
    fmt::print("  ACS ? = ACS unknown (config space read without root): computed as no redirect, as Linux\n"
               "          would if the bits are clear; '*' marks a root port inferred from a bridge on a root bus.\n");
  fmt::print("  physr explain A B shows why.\n");
}

// Columns are 4 wide, wider when a verdict or a device's name needs it (H102), so
// neighbours never touch; a column is headed by its device's name (its index when it has
// none), as nvidia-smi topo -m heads them. Then the same pairs as nvidia-smi's link classes.
// Verdicts are computed, not cached: the engine's cache is for the DMA layer's lookups.
void print_one_matrix(const Topology& t, P2PEngine& e, const std::vector<uint32_t>& devs) {
  std::vector<std::string> cells, classes, heads;
  cells.reserve(devs.size() * devs.size());
  classes.reserve(devs.size() * devs.size());
  size_t w = std::max<size_t>(4, fmt::format_int(devs.size()).size() + 1);
  for (size_t j = 0; j < devs.size(); ++j) {
    const Function& f = t.functions[devs[j]];
    heads.push_back(!f.name.empty() && f.name.size() <= 12 ? f.name : std::to_string(j));
    w = std::max(w, heads.back().size() + 1);
  }
  for (uint32_t p : devs)
    for (uint32_t c : devs) {
      const Verdict v = e.compute(p, c);
      cells.push_back(short_verdict(v));
      classes.push_back(pair_link_class(t, p, c, v));
      w = std::max(w, cells.back().size() + 1);
    }
  const auto grid = [&](const std::vector<std::string>& g) {
    fmt::print("{:>4}  {:<24}", "", "");
    for (size_t j = 0; j < devs.size(); ++j) fmt::print("{:>{}}", heads[j], w);
    fmt::print("\n");
    for (size_t i = 0; i < devs.size(); ++i) {
      fmt::print("{:>4}  {:<24}", i, describe(t.functions[devs[i]]).substr(0, 24));
      for (size_t j = 0; j < devs.size(); ++j) fmt::print("{:>{}}", g[i * devs.size() + j], w);
      fmt::print("\n");
    }
  };
  grid(cells);
  fmt::print("\n  Link classes (nvidia-smi topo -m):\n");
  grid(classes);
}

// Up to 32 devices: one matrix. More: a matrix per host bridge that has at most 32, and
// counts for everything else, so a big machine stays readable (--devices narrows it down).
void print_matrix(const Topology& t, P2PEngine& e, const std::vector<uint32_t>& devs) {
  constexpr size_t kMaxColumns = 32;
  if (devs.empty()) {
    fmt::print("\nNo non-bridge functions match.\n");
    return;
  }
  fmt::print("\nP2P verdicts (row = provider of the memory, column = client doing the DMA)\n\n");
  if (devs.size() <= kMaxColumns) {
    print_one_matrix(t, e, devs);
    print_legend(t);
    return;
  }
  std::map<uint32_t, std::vector<uint32_t>> by_bridge;
  for (uint32_t d : devs) by_bridge[t.functions[d].host_bridge].push_back(d);
  // Counted without visiting every pair (a 65,535-function machine has 4 x 10^9): two
  // devices with no common upstream device (different root ports, or host bridges) get
  // the verdict Linux gives any such pair of their host bridges, so one pair stands for
  // all; only pairs below one root port are computed one by one.
  const auto tree_of = [&](uint32_t f) {
    while (t.functions[f].upstream >= 0) f = static_cast<uint32_t>(t.functions[f].upstream);
    return f;
  };
  std::map<std::string, size_t> other;
  for (const auto& [h, group] : by_bridge) {
    if (group.size() <= kMaxColumns) {
      fmt::print("{} ({} devices)\n", t.host_bridges[h].name(), group.size());
      print_one_matrix(t, e, group);
      fmt::print("\n");
      continue;
    }
    const std::string within = " within " + t.host_bridges[h].name();
    std::map<uint32_t, std::vector<uint32_t>> trees;
    for (uint32_t d : group) trees[tree_of(d)].push_back(d);
    size_t same_tree = 0;
    std::map<MapType, size_t> n;
    for (const auto& [root, members] : trees) {
      same_tree += members.size() * members.size();
      for (uint32_t p : members)
        for (uint32_t c : members) ++n[e.compute(p, c).type];
    }
    for (const auto& [type, count] : n) other[std::string(map_type_name(type)) + within] += count;
    if (trees.size() > 1)
      other[std::string(map_type_name(e.compute(trees.begin()->second[0], std::next(trees.begin())->second[0]).type)) + within] +=
          group.size() * group.size() - same_tree;
  }
  for (auto a = by_bridge.begin(); a != by_bridge.end(); ++a)
    for (auto b = by_bridge.begin(); b != by_bridge.end(); ++b)
      if (a != b)
        other[std::string(map_type_name(e.compute(a->second[0], b->second[0]).type)) + " across host bridges"] +=
            a->second.size() * b->second.size();
  if (!other.empty()) {
    fmt::print("Other pairs ({} devices in all; --devices picks some, --json lists every pair):\n", devs.size());
    for (const auto& [k, n] : other) fmt::print("  {:<40} {}\n", k, n);
  }
  print_legend(t);
}

nlohmann::json function_json(const Topology& t, const Function& f) {
  nlohmann::json o = {{"bdf", f.bdf.to_string()},
                      {"vendor", fmt::format("{:04x}", f.vendor)},
                      {"device", fmt::format("{:04x}", f.device)},
                      {"class", fmt::format("{:06x}", f.class_code)},
                      {"class_name", class_name(f.class_code)},
                      {"port_type", port_type_name(f.port_type)},
                      {"port_type_inferred", f.port_type_inferred},
                      {"acs", f.acs.kind == AcsState::Kind::unknown  ? "unknown"
                              : f.acs.kind == AcsState::Kind::absent ? "absent"
                                                                     : acs_bits_string(f.acs.ctrl)},
                      {"numa_node", f.numa_node},
                      {"host_bridge", t.host_bridges[f.host_bridge].name()}};
  o["upstream"] = f.upstream >= 0 ? nlohmann::json(t.functions[static_cast<uint32_t>(f.upstream)].bdf.to_string()) : nlohmann::json();
  if (!f.name.empty()) o["name"] = f.name;
  // Added fields (none renamed): the BARs as lspci -v lists them, exact bytes; the link as
  // LnkSta gives it (null when unknown).
  o["bars"] = nlohmann::json::array();
  for (const Bar& b : f.bars)
    o["bars"].push_back({{"bar", b.index}, {"base", b.span.base.value()}, {"size", b.size()}, {"size_text", format_size(b.size())},
                         {"memory", b.is_mem()}, {"prefetchable", b.prefetchable()}});
  o["link_speed_gts"] = f.link_speed_gts > 0 ? nlohmann::json(f.link_speed_gts) : nlohmann::json();
  o["link_width"] = f.link_width > 0 ? nlohmann::json(f.link_width) : nlohmann::json();
  return o;
}

// A host bridge in `topo --json`: its name and node, and what Linux's allowlist says for
// P2P between two root ports below it (the text tree's line).
nlohmann::json host_bridge_json(const Topology& t, const P2PEngine& e, uint32_t h) {
  const HostBridge& hb = t.host_bridges[h];
  nlohmann::json o = {{"name", hb.name()}, {"numa_node", hb.numa_node}};
  if (const auto id = e.identifying_device(h)) {
    o["identifying_device"] = t.functions[*id].bdf.to_string();
    o["allowlisted"] = e.host_bridge_allowed(*id, *id);
  } else {
    o["identifying_device"] = nullptr;
    o["allowlisted"] = false;
  }
  return o;
}

// `topo --json`: one object, streamed (keys in the sorted order nlohmann::json prints), so
// memory stays bounded whatever the number of pairs. The pairs are computed as they are
// printed, never cached: n^2 of them would not fit in the engine's bounded cache anyway.
void print_json(const Topology& t, const P2PEngine& e, const std::vector<uint32_t>& devs, const KernelChoice& k) {
  JsonWriter w(stdout, 1);
  w.begin_object();
  w.key("cpu");
  w.value(nlohmann::json{{"vendor", t.cpu.vendor}, {"family", t.cpu.family}, {"amd_zen_rule", e.cpu_amd_zen()}});
  w.key("functions");
  w.begin_array();
  for (const Function& f : t.functions) w.value(function_json(t, f));
  w.end_array();
  w.key("host_bridges");
  w.begin_array();
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h) w.value(host_bridge_json(t, e, h));
  w.end_array();
  w.key("kernel");
  w.value(nlohmann::json{{"version", k.version.to_string()}, {"from", k.from}});
  w.key("machine");
  w.string_value(t.name);
  w.key("pairs");
  w.begin_array();
  std::vector<std::string> bdf(t.functions.size());
  for (uint32_t d : devs) bdf[d] = JsonWriter::quoted(t.functions[d].bdf.to_string());
  for (uint32_t p : devs)
    for (uint32_t c : devs) {
      const Verdict v = e.compute(p, c);
      w.element([&](std::string& b, std::string_view in, std::string_view out) {
        b += "{\n";
        b += in;
        b += "\"client\": ";
        b += bdf[c];
        b += ",\n";
        b += in;
        b += "\"distance\": ";
        b += fmt::format_int(v.distance).c_str();
        b += ",\n";
        b += in;
        b += "\"link_class\": \"";
        b += pair_link_class(t, p, c, v);
        b += "\",\n";
        b += in;
        b += "\"map_type\": \"";
        b += map_type_name(v.type);
        b += "\",\n";
        b += in;
        b += "\"provider\": ";
        b += bdf[p];
        b += '\n';
        b += out;
        b += '}';
      });
    }
  w.end_array();
  w.key("source");
  w.string_value(t.source);
  w.end_object();
  w.newline();
}

// A DOT quoted string's content: '"' and '\\' escaped (names may hold them).
std::string dot_escape(std::string_view text) {
  std::string out;
  for (char ch : text) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out;
}

void print_dot(const Topology& t) {
  fmt::print("digraph physr {{\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
  for (uint32_t h = 0; h < t.host_bridges.size(); ++h) {
    const HostBridge& hb = t.host_bridges[h];
    fmt::print("  subgraph cluster_{} {{\n    label=\"{} (NUMA {})\";\n    \"{}\" [shape=ellipse];\n", h, hb.name(),
               hb.numa_node, hb.name());
    for (uint32_t i = 0; i < t.functions.size(); ++i) {
      const Function& f = t.functions[i];
      if (f.host_bridge != h) continue;
      const std::string port = port_label(f), acs = acs_label(f);
      const char* shape = f.port_type == PortType::switch_upstream ? "box3d" : is_pci_bridge(f) ? "box" : "component";
      fmt::print("    \"{}\" [shape={}, label=\"{}\\n{:04x}:{:04x} {}{}{}\"];\n", f.bdf.to_string(), shape, dot_escape(describe(f)), f.vendor,
                 f.device, class_name(f.class_code), port.empty() ? "" : "\\n" + port, acs.empty() ? "" : "\\n" + acs);
    }
    fmt::print("  }}\n");
  }
  for (const Function& f : t.functions) {
    const std::string from = f.upstream >= 0 ? t.functions[static_cast<uint32_t>(f.upstream)].bdf.to_string()
                                             : t.host_bridges[f.host_bridge].name();
    fmt::print("  \"{}\" -> \"{}\";\n", from, f.bdf.to_string());
  }
  fmt::print("}}\n");
}

struct TopoOptions {
  std::shared_ptr<SourceOptions> src = std::make_shared<SourceOptions>();
  bool json = false;
  bool dot = false;
  std::string devices;
};

void run_topo(const TopoOptions& o) {
  const KernelChoice k = kernel_choice(*o.src);
  const Topology t = load_topology(*o.src);
  P2PEngine e = failure_value(P2PEngine::create(t, verdict_options(*o.src, k, t)));
  const auto devs = endpoints(t, o.devices);
  if (o.json) {
    print_json(t, e, devs, k);
    return;
  }
  if (o.dot) {
    print_dot(t);
    return;
  }
  const bool cpu_overridden = e.cpu_amd_zen() != cpu_supports_p2pdma(t.cpu);
  fmt::print("{}: {}, CPU {}{}\n{} host bridges, {} functions; the P2P rules of Linux {} ({})\n\n", t.source, t.name,
             t.cpu.known() ? fmt::format("{} family {:#x}", t.cpu.vendor, t.cpu.family) : "unknown",
             cpu_overridden ? (e.cpu_amd_zen() ? " (CPU rule overridden: assuming AMD Zen, P2P through the host bridge allowed)"
                                               : " (CPU rule overridden: assuming a CPU other than AMD Zen)")
             : e.cpu_amd_zen() ? " (AMD Zen: P2P through the host bridge is allowed)" : "", t.host_bridges.size(),
             t.functions.size(), k.version.to_string(), k.from);
  print_tree(t, e);
  print_matrix(t, e, devs);
}

struct ExplainOptions {
  std::shared_ptr<SourceOptions> src = std::make_shared<SourceOptions>();
  std::string a, b;
  bool json = false;
};

// `explain --json`: the explanation as data, the text's facts under stable keys.
nlohmann::json explanation_json(const Topology& t, const P2PEngine& e, uint32_t p, uint32_t c, const ExplainContext& how) {
  const Explanation x = e.explain(p, c);
  const auto hop = [&](const PathHop& h) {
    const Function& f = t.functions[h.function];
    return nlohmann::json{{"bdf", f.bdf.to_string()}, {"class_name", class_name(f.class_code)}, {"port_type", port_type_name(f.port_type)},
                          {"acs", acs_label(f)}, {"redirects", h.redirects}, {"acs_unknown", h.acs_unknown}};
  };
  const auto dev = [&](uint32_t f) {
    nlohmann::json o = function_json(t, t.functions[f]);
    return o;
  };
  nlohmann::json j = {{"provider", dev(p)}, {"client", dev(c)}, {"kernel", {{"version", x.kernel.to_string()}, {"from", how.rules_from}}}};
  j["provider_path"] = nlohmann::json::array();
  for (const PathHop& h : x.provider_path) j["provider_path"].push_back(hop(h));
  j["client_path"] = nlohmann::json::array();
  for (auto it = x.client_path.rbegin(); it != x.client_path.rend(); ++it) j["client_path"].push_back(hop(*it));
  j["common_upstream"] = x.common ? nlohmann::json(t.functions[*x.common].bdf.to_string()) : nlohmann::json();
  j["acs_redirecting"] = nlohmann::json::array();
  for (uint32_t f : x.acs_redirecting) j["acs_redirecting"].push_back(t.functions[f].bdf.to_string());
  j["acs_unknown_on_path"] = x.acs_unknown_on_path;
  j["same_host_bridge"] = x.same_host_bridge;
  j["cpu"] = {{"vendor", t.cpu.vendor}, {"family", t.cpu.family}, {"amd_zen_rule", x.cpu_amd_zen},
              {"overridden", x.cpu_amd_zen != cpu_supports_p2pdma(t.cpu)}};
  j["allowlist"] = nlohmann::json::array();
  for (const auto& chk : x.allowlist)
    j["allowlist"].push_back({{"host_bridge", t.host_bridges[chk.host_bridge].name()},
                              {"identifying_device", chk.identifying ? nlohmann::json(t.functions[*chk.identifying].bdf.to_string()) : nlohmann::json()},
                              {"listed", chk.listed},
                              {"requires_same_host_bridge", chk.requires_same_host_bridge},
                              {"passes", chk.passes}});
  j["second_host_bridge_skipped"] = x.second_host_bridge_skipped;
  j["map_type"] = map_type_name(x.verdict.type);
  j["distance"] = x.verdict.distance;
  j["link_class"] = x.link_class;
  j["newer_kernel_allows"] = x.newer_kernel_allows ? nlohmann::json(x.newer_kernel_allows->to_string()) : nlohmann::json();
  j["kernel_log"] = x.kernel_log;
  j["kernel_parameter"] = x.kernel_parameter.empty() ? nlohmann::json() : nlohmann::json(x.kernel_parameter);
  if (!x.kernel_parameter.empty()) {
    std::string ports = how.acs_off;
    for (uint32_t f : x.acs_redirecting) ports += (ports.empty() ? "" : ",") + t.functions[f].bdf.to_string();
    j["what_if"] = how.command + " --assume-acs-off " + shell_quote(ports);
  }
  return j;
}

void print_hop(const Topology& t, const PathHop& h, const char* note) {
  const Function& f = t.functions[h.function];
  fmt::print("  {:<28} {:<22} {:<20} {:<12}{}{}\n", describe(f), class_name(f.class_code), port_label(f),
             acs_label(f).empty() ? "no ACS" : acs_label(f), h.redirects ? "  redirects upstream" : "", note);
}

void run_explain(const ExplainOptions& o) {
  const KernelChoice k = kernel_choice(*o.src);
  const Topology t = load_topology(*o.src);
  P2PEngine e = failure_value(P2PEngine::create(t, verdict_options(*o.src, k, t)));
  // A device the machine does not have is a failure (exit 1), by name or by address alike:
  // the command line is well formed, the machine lacks it (docs/pci.md).
  auto lookup = [&](const std::string& s) { return failure_value(t.lookup(s)); };
  // The command that repeats this explanation, for the what-if hint.
  ExplainContext how{k.from, "physr explain " + shell_quote(o.a) + " " + shell_quote(o.b), o.src->acs_off};
  const std::pair<const char*, const std::string*> opts[] = {
      {"--sysfs-root", &o.src->sysfs_root}, {"--machine", &o.src->machine}, {"--assume-cpu", &o.src->assume_cpu}, {"--kernel", &o.src->kernel}};
  for (const auto& [flag, value] : opts)
    if (!value->empty()) how.command += std::string(" ") + flag + " " + shell_quote(*value);
  if (o.json) {
    fmt::print("{}\n", json_text(explanation_json(t, e, lookup(o.a), lookup(o.b), how), 2));
    return;
  }
  print_explanation(t, e, lookup(o.a), lookup(o.b), how);
}

}  // namespace

std::string shell_quote(std::string_view arg) {
  const bool plain = !arg.empty() && std::all_of(arg.begin(), arg.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || std::string_view("_./:,=+-@%").find(ch) != std::string_view::npos;
  });
  if (plain) return std::string(arg);
  std::string out = "'";
  for (char ch : arg) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

void print_explanation(const Topology& t, const P2PEngine& e, uint32_t p, uint32_t c, const ExplainContext& how) {
  const Explanation x = e.explain(p, c);
  const Function& fp = t.functions[p];
  const Function& fc = t.functions[c];
  fmt::print("provider {} ({} {:04x}:{:04x})\nclient   {} ({} {:04x}:{:04x})\nrules    Linux {} ({})\n\n", describe(fp),
             class_name(fp.class_code), fp.vendor, fp.device, describe(fc), class_name(fc.class_code), fc.vendor, fc.device,
             x.kernel.to_string(), how.rules_from);
  fmt::print("Path, from the provider up{}:\n", x.common ? " to the common upstream device, then down to the client" : " to its host bridge, then from the client's host bridge down");
  for (const PathHop& h : x.provider_path)
    print_hop(t, h, x.common && h.function == *x.common ? "  <- common upstream device" : "");
  if (!x.common) fmt::print("  {} ... {}\n", t.host_bridges[fp.host_bridge].name(), t.host_bridges[fc.host_bridge].name());
  for (auto it = x.client_path.rbegin(); it != x.client_path.rend(); ++it) print_hop(t, *it, "");

  fmt::print("\n");
  if (x.common) {
    fmt::print("Common upstream device: {} ({})\n", t.functions[*x.common].bdf.to_string(),
               port_label(t.functions[*x.common]).empty() ? class_name(t.functions[*x.common].class_code) : port_label(t.functions[*x.common]));
    if (x.acs_redirecting.empty()) {
      fmt::print("ACS: no device on the path redirects peer requests (RR/CR/EC clear), so TLPs stay below it.\n");
    } else {
      std::string list;
      for (uint32_t f : x.acs_redirecting) list += (list.empty() ? "" : ", ") + t.functions[f].bdf.to_string();
      fmt::print("ACS: redirect (RR, CR or EC) set on {}: peer requests go up to the root complex.\n", list);
    }
    if (x.acs_unknown_on_path)
      fmt::print("ACS is unknown on part of the path (config space read without root); it is computed as\n"
                 "no redirect. Run as root, or on a full snapshot, to be sure.\n");
  } else {
    fmt::print("No common upstream device: the path goes through {}.\n",
               x.same_host_bridge ? "their host bridge " + t.host_bridges[fp.host_bridge].name()
                                  : "two host bridges, " + t.host_bridges[fp.host_bridge].name() + " and " +
                                        t.host_bridges[fc.host_bridge].name());
  }
  if (x.verdict.type != MapType::bus_addr) {
    const std::string cpu = t.cpu.known() ? fmt::format("{} family {:#x}", t.cpu.vendor, t.cpu.family) : "unknown";
    if (x.cpu_amd_zen != cpu_supports_p2pdma(t.cpu)) {
      // --assume-cpu contradicts the detected CPU: say so rather than describe the CPU wrongly.
      fmt::print("CPU rule overridden: detected {} ({}), assuming {}.\n", cpu, x.cpu_amd_zen ? "not AMD Zen" : "AMD Zen",
                 x.cpu_amd_zen ? "AMD Zen: Linux allows P2P through the host bridge"
                               : "a CPU other than AMD Zen, so the host bridge allowlist decides");
    } else if (x.cpu_amd_zen) {
      fmt::print("CPU: AMD family {:#x} (Zen or newer): Linux allows P2P through the host bridge.\n", t.cpu.family);
    } else {
      fmt::print("CPU: {}: not AMD Zen, so the host bridge allowlist decides.\n", cpu);
    }
    if (!x.cpu_amd_zen) {
      for (const auto& chk : x.allowlist) {
        const HostBridge& hb = t.host_bridges[chk.host_bridge];
        if (!chk.identifying) {
          fmt::print("  {}: no identifying device (the first function on its root bus is neither 00.0 nor a root port): fails\n", hb.name());
          continue;
        }
        const Function& id = t.functions[*chk.identifying];
        fmt::print("  {}: identifying device {} {:04x}:{:04x}: {}{}\n", hb.name(), id.bdf.to_string(), id.vendor, id.device,
                   chk.listed ? "in the allowlist" : "not in the allowlist",
                   chk.listed && chk.requires_same_host_bridge ? (x.same_host_bridge ? " (needs one host bridge: yes)" : " (only within one host bridge: fails)") : "");
      }
      if (x.second_host_bridge_skipped)
        fmt::print("  {}: not looked at: the first host bridge failed, and Linux checks the second only if it passes\n",
                   t.host_bridges[fc.host_bridge].name());
    }
  }
  fmt::print("\nVerdict: {}, distance {}\n", map_type_name(x.verdict.type), x.verdict.distance);
  if (x.newer_kernel_allows)
    fmt::print("Linux {} and newer allow this pair through the host bridge (their allowlist passes); --kernel {} shows it.\n",
               x.newer_kernel_allows->to_string(), x.newer_kernel_allows->to_string());
  std::string def;
  for (const auto& [cls, d] : link_class_legend())
    if (x.link_class == cls) def = d;
  fmt::print("Link class: {} ({})\n", x.link_class, def);
  if (!x.kernel_log.empty()) {
    fmt::print("\nLinux logs, when the pair is first mapped (pci_warn; the kernel prefixes the driver name):\n");
    for (const std::string& line : x.kernel_log) fmt::print("  {}\n", line);
  }
  if (!x.kernel_parameter.empty()) {
    // The kernel parameter separates ports with ';' (Linux calc_map_type_and_dist() prints
    // it so); --assume-acs-off takes commas, and a shell would split at ';'. The hint adds
    // the redirecting ports to those already assumed off, as one command.
    std::string ports = how.acs_off;
    for (uint32_t f : x.acs_redirecting) ports += (ports.empty() ? "" : ",") + t.functions[f].bdf.to_string();
    const std::string option = "--assume-acs-off " + shell_quote(ports);
    fmt::print("\nTo let this pair use bus addresses, boot with: {}\n(what-if: {})\n", x.kernel_parameter,
               how.command.empty() ? "add " + option : how.command + " " + option);
  }
}

Topology load_machine_arg(const std::string& machine) { return warned(failure_value(load_machine(machine))); }

void print_warnings(const std::vector<std::string>& warnings) {
  for (const std::string& w : warnings) fmt::print(stderr, "physr: warning: {}\n", w);
}

void add_topo_commands(CLI::App& app) {
  auto t = std::make_shared<TopoOptions>();
  CLI::App* c = app.add_subcommand("topo", "Show the PCI tree and the P2P verdict for every pair of devices");
  add_source_options(c, t->src);
  auto* j = c->add_flag("--json", t->json, "Print one JSON object: functions and every (provider, client) pair");
  auto* d = c->add_flag("--dot", t->dot, "Print the tree as Graphviz");
  j->excludes(d);
  c->add_option("--devices", t->devices, "Only these devices: BDF prefixes, names or classes (nvme, storage, net, gpu, accel), comma-separated");
  c->callback([t] { run_topo(*t); });

  auto x = std::make_shared<ExplainOptions>();
  CLI::App* e = app.add_subcommand("explain", "Explain the P2P verdict between two devices, hop by hop");
  e->add_option("provider", x->a, "The device whose memory is used (BDF or name)")->required();
  e->add_option("client", x->b, "The device doing the DMA (BDF or name)")->required();
  e->add_flag("--json", x->json, "Print the explanation as one JSON object (path, ACS, CPU rule, allowlist, verdict, link class)");
  add_source_options(e, x->src);
  e->callback([x] { run_explain(*x); });
}

}  // namespace physr::cli
