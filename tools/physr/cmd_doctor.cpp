// physr doctor: what a host (or a snapshot) says about P2P DMA. The findings come from the
// library (physr/linux.hpp run_doctor()); this file only prints them.
#include <fmt/core.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "physr/linux.hpp"

namespace physr::cli {
namespace {

struct DoctorCliOptions {
  std::string root;
  std::string release;
  bool json = false;
  size_t max_devices = 16;
};

// nvidia-smi topo -m's legend, which physr's link classes follow (pci::link_class_legend()).
constexpr std::pair<const char*, const char*> kNvidiaLegend[] = {
    {"X", "Self"},
    {"SYS", "Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)"},
    {"NODE", "Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node"},
    {"PHB", "Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)"},
    {"PXB", "Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)"},
    {"PIX", "Connection traversing at most a single PCIe bridge"},
};

nlohmann::json to_json(const lnx::DoctorReport& r) {
  nlohmann::json j;
  j["root"] = r.root;
  j["live"] = r.live;
  j["privileged"] = r.privileged;
  j["kernel"] = r.kernel;
  auto& f = j["findings"] = nlohmann::json::array();
  for (const lnx::Finding& x : r.findings)
    f.push_back({{"id", x.id}, {"severity", lnx::severity_name(x.severity)}, {"title", x.title}, {"detail", x.detail}, {"fix", x.fix}});
  auto& p = j["pairs"] = nlohmann::json::array();
  for (const lnx::PairReport& x : r.pairs)
    p.push_back({{"provider", r.topology.functions[x.provider].bdf.to_string()},
                 {"client", r.topology.functions[x.client].bdf.to_string()},
                 {"map_type", pci::map_type_name(x.verdict.type)},
                 {"distance", x.verdict.distance},
                 {"link_class", x.link_class},
                 {"path", x.path}});
  auto& m = j["p2pmem"] = nlohmann::json::array();
  for (const lnx::P2pmemInfo& x : r.p2pmem)
    m.push_back({{"bdf", x.bdf.to_string()}, {"size", x.size}, {"available", x.available}, {"published", x.published}});
  auto& l = j["link_classes"] = nlohmann::json::object();
  for (const auto& [k, d] : pci::link_class_legend()) l[k] = d;
  return j;
}

void run_doctor_cmd(const DoctorCliOptions& o) {
  lnx::DoctorOptions d;
  d.root = o.root.empty() ? "/" : o.root;
  d.release = o.release;
  d.max_pair_devices = o.max_devices;
  const lnx::DoctorReport r = failure_value(lnx::run_doctor(d));
  if (o.json) {
    fmt::print("{}\n", json_text(to_json(r), 1));
    return;
  }
  fmt::print("physr doctor: {} ({}{})\n\n", r.root, r.live ? "this host" : "a snapshot", r.live ? (r.privileged ? ", as root" : ", unprivileged") : "");
  for (const lnx::Finding& x : r.findings) {
    fmt::print("[{:^7}] {}  ({})\n", lnx::severity_name(x.severity), x.title, x.id);
    if (!x.detail.empty()) fmt::print("          {}\n", x.detail);
    if (!x.fix.empty()) fmt::print("     fix: {}\n", x.fix);
  }
  if (!r.pairs.empty()) {
    fmt::print("\nP2P verdicts per pair (provider -> client), link class and path (> up, < down, ~ between host bridges):\n");
    for (const lnx::PairReport& p : r.pairs)
      fmt::print("  {} -> {}  {:<16} {:>3}  {:<4}  {}\n", r.topology.functions[p.provider].bdf.to_string(), r.topology.functions[p.client].bdf.to_string(),
                 pci::map_type_name(p.verdict.type), p.verdict.distance, p.link_class, p.path);
    fmt::print("\nLink classes (nvidia-smi topo -m's legend; physr's definition from the PCI tree):\n");
    for (const auto& [k, def] : kNvidiaLegend) {
      std::string ours;
      for (const auto& [k2, d2] : pci::link_class_legend())
        if (std::string_view(k) == k2) ours = d2;
      fmt::print("  {:<4} = {}\n         physr: {}\n", k, def, ours);
    }
  }
}

}  // namespace

void add_doctor_command(CLI::App& app) {
  auto o = std::make_shared<DoctorCliOptions>();
  CLI::App* c = app.add_subcommand("doctor", "Check this host (or a snapshot) for P2P DMA: kernel, IOMMU, ACS, p2pmem, BARs, every pair's verdict");
  c->add_option("--sysfs-root", o->root, "Examine a snapshot rooted at DIR (default: this host, /)");
  c->add_option("--release", o->release, "Kernel release for /boot/config-RELEASE (default: uname, or the snapshot's proc/sys/kernel/osrelease)");
  c->add_flag("--json", o->json, "Print one JSON object: findings[] {id, severity, title, detail, fix}, pairs[], p2pmem[]");
  c->add_option("--max-devices", o->max_devices, "Devices that get pair verdicts (NVMe, GPUs, NICs first)")->capture_default_str()->check(kNonNegative);
  c->callback([o] { run_doctor_cmd(*o); });
}

}  // namespace physr::cli
