// physr doctor's findings: what a host (or a snapshot of one) says about P2P DMA, each with
// a severity, where it came from and the fix. Every fact comes from a file under the root
// (docs/linux.md lists them), or from uname(2) and the effective uid on the live host.
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
#include <sstream>

#include "physr/linux.hpp"

namespace physr::lnx {

const char* severity_name(Severity s) noexcept {
  switch (s) {
    case Severity::ok: return "ok";
    case Severity::info: return "info";
    case Severity::warning: return "warning";
    case Severity::error: return "error";
  }
  return "?";
}

namespace {

using pci::Function;
using pci::Topology;

std::string trim(std::string_view s) {
  while (!s.empty() && std::strchr(" \t\r\n", s.front())) s.remove_prefix(1);
  while (!s.empty() && std::strchr(" \t\r\n", s.back())) s.remove_suffix(1);
  return std::string(s);
}

std::string short_bdf(const pci::Bdf& b) {
  const std::string s = b.to_string();
  return b.domain == 0 ? s.substr(5) : s;
}

// gzip text through zlib, at most `max` bytes; a regular file only (lstat first: gzopen
// would block on a FIFO).
Result<std::string> read_gzip(const fs::path& p, size_t max) {
  struct stat st{};
  if (::lstat(p.c_str(), &st) != 0) return make_error(errno, p.string() + ": " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return make_error(EINVAL, p.string() + ": not a regular file: not read");
  gzFile gz = gzopen(p.c_str(), "rb");
  if (!gz) return make_error(errno ? errno : ENOMEM, p.string() + ": cannot be opened: " + errno_text(errno ? errno : ENOMEM));
  std::string out;
  char buf[65536];
  for (;;) {
    const int n = gzread(gz, buf, sizeof buf);
    if (n < 0) {
      int zerr = 0;
      const std::string msg = gzerror(gz, &zerr);
      gzclose(gz);
      return make_error(EIO, p.string() + ": not valid gzip data: " + msg);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max) break;
  }
  gzclose(gz);
  return out;
}

// The value of CONFIG_NAME in kernel config text: "y", "m", "n" (is not set), or "".
std::string config_value(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + "=", 0) == 0) return trim(line.substr(name.size() + 1));
    if (line == "# " + name + " is not set") return "n";
  }
  return "";
}

// Every PCI function's sysfs folder under ROOT/sys/devices/pci*/ (symlinks not followed,
// depth bounded), by address: where config and resourceN_resize live.
std::map<pci::Bdf, fs::path> function_dirs(const fs::path& root) {
  std::map<pci::Bdf, fs::path> out;
  std::error_code ec;
  const fs::path devices = root / "sys/devices";
  for (fs::directory_iterator it(devices, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().filename().string().rfind("pci", 0) != 0 || !it->is_directory(ec) || it->is_symlink(ec)) continue;
    std::vector<std::pair<fs::path, int>> stack{{it->path(), 0}};
    while (!stack.empty()) {
      auto [dir, depth] = stack.back();
      stack.pop_back();
      std::error_code e2;
      for (fs::directory_iterator d(dir, e2), dend; !e2 && d != dend; d.increment(e2)) {
        std::error_code e3;
        if (d->is_symlink(e3) || !d->is_directory(e3)) continue;
        if (auto b = pci::parse_bdf(d->path().filename().string())) {
          out.emplace(*b, d->path());
          if (depth < 64) stack.push_back({d->path(), depth + 1});
        }
      }
    }
  }
  return out;
}

struct Rebar {
  unsigned bar = 0;
  uint64_t current = 0, largest = 0;  // bytes
};

// The Resizable BAR extended capability (ID 0x0015, PCIe 7.8.6; Linux pci_rebar_*()): per
// BAR its current size and the largest it supports.
std::vector<Rebar> read_rebar(const std::vector<uint8_t>& c) {
  std::vector<Rebar> out;
  const auto rd32 = [&](size_t o) -> uint32_t {
    return o + 4 <= c.size() ? uint32_t{c[o]} | uint32_t{c[o + 1]} << 8 | uint32_t{c[o + 2]} << 16 | uint32_t{c[o + 3]} << 24 : 0;
  };
  size_t pos = 0x100;
  for (int ttl = 0; ttl < 480 && pos >= 0x100 && pos + 4 <= c.size(); ++ttl) {
    const uint32_t h = rd32(pos);
    if (h == 0 || h == 0xffffffff) break;
    if ((h & 0xffff) == 0x0015) {
      const unsigned n = (rd32(pos + 8) >> 5) & 7;  // PCI_REBAR_CTRL_NBAR
      for (unsigned i = 0; i < n && i < 6; ++i) {
        const uint32_t cap = rd32(pos + 4 + 8 * i), ctrl = rd32(pos + 8 + 8 * i);
        Rebar r;
        r.bar = ctrl & 7;
        r.current = MiB << ((ctrl >> 8) & 0x3f);
        for (unsigned b = 31; b >= 4; --b)
          if (cap & (1u << b)) {
            r.largest = MiB << (b - 4);
            break;
          }
        out.push_back(r);
      }
      break;
    }
    pos = h >> 20;
  }
  return out;
}

std::string size_text(uint64_t b) { return format_size(b); }

void add(DoctorReport& r, std::string id, Severity s, std::string title, std::string detail, std::string fix = "") {
  r.findings.push_back(Finding{std::move(id), s, std::move(title), std::move(detail), std::move(fix)});
}

// --- the findings, one function per topic ----------------------------------------------

void kernel_findings(DoctorReport& r, const DoctorOptions& o, const fs::path& root) {
  std::string release = o.release, version_from;
  if (release.empty() && r.live) {
    struct utsname u{};
    if (::uname(&u) == 0) release = u.release, version_from = "uname(2)";
  }
  if (release.empty()) {
    if (auto t = read_attr(root / "proc/sys/kernel/osrelease", 4096)) release = trim(*t), version_from = (root / "proc/sys/kernel/osrelease").string();
  }
  if (release.empty()) {
    if (auto t = read_attr(root / "proc/version", 4096)) {
      std::istringstream in(*t);
      std::string a, b, c;
      in >> a >> b >> c;
      if (a == "Linux" && b == "version") release = c, version_from = (root / "proc/version").string();
    }
  } else if (version_from.empty()) {
    version_from = "--release";
  }
  r.kernel = release;
  unsigned major = 0, minor = 0;
  if (!release.empty()) std::sscanf(release.c_str(), "%u.%u", &major, &minor);
  if (release.empty()) {
    add(r, "kernel.version", Severity::info, "Kernel version unknown",
        "Neither " + (root / "proc/sys/kernel/osrelease").string() + " nor " + (root / "proc/version").string() + " could be read.");
  } else if (major < 6 || (major == 6 && minor < 2)) {
    add(r, "kernel.version", Severity::warning, "Kernel " + release + ": p2pmem cannot be mapped from user space",
        "From " + version_from + ". Linux 6.2 added p2pmem/allocate (mmap of P2P memory, and O_DIRECT I/O to it).",
        "Boot Linux 6.2 or newer built with CONFIG_PCI_P2PDMA=y.");
  } else {
    add(r, "kernel.version", Severity::ok, "Kernel " + release, "From " + version_from + ".");
  }

  // CONFIG_PCI_P2PDMA: the kernel's own config first, then /boot, then the presence of p2pmem.
  std::string value, from, unread;
  if (auto t = read_gzip(root / "proc/config.gz", 16 << 20)) {
    value = config_value(*t, "CONFIG_PCI_P2PDMA"), from = (root / "proc/config.gz").string();
    if (value.empty()) value = "n";  // a config without the symbol: PCI or ZONE_DEVICE is off
  } else if (t.error().code != ENOENT) {
    unread = t.error().message;
  }
  if (from.empty() && !release.empty()) {
    const fs::path boot = root / "boot" / ("config-" + release);
    if (auto t = read_attr(boot, 16 << 20)) {
      value = config_value(*t, "CONFIG_PCI_P2PDMA"), from = boot.string();
      if (value.empty()) value = "n";
    } else if (t.error().code != ENOENT) {
      unread += (unread.empty() ? "" : "; ") + t.error().message;
    }
  }
  const std::string fix_build =
      "Boot a kernel with CONFIG_PCI_P2PDMA=y (it needs CONFIG_ZONE_DEVICE and 64-bit): Debian's stock kernels have it off; "
      "build one from linux-source with scripts/config --enable PCI_P2PDMA.";
  if (value == "y") {
    add(r, "kernel.p2pdma", Severity::ok, "CONFIG_PCI_P2PDMA=y", "From " + from + ".");
  } else if (!from.empty()) {
    add(r, "kernel.p2pdma", r.p2pmem.empty() ? Severity::error : Severity::warning, "CONFIG_PCI_P2PDMA is off",
        "From " + from + (r.p2pmem.empty() ? ": no device can offer P2P memory and the kernel refuses P2P DMA." : ", yet p2pmem folders exist (an edited snapshot?)."),
        fix_build);
  } else if (!r.p2pmem.empty()) {
    add(r, "kernel.p2pdma", Severity::ok, "CONFIG_PCI_P2PDMA is on (p2pmem exists)",
        "No kernel config could be read" + (unread.empty() ? std::string() : " (" + unread + ")") + ", but " + std::to_string(r.p2pmem.size()) +
            " device(s) have p2pmem folders, which only a P2PDMA kernel makes.");
  } else {
    add(r, "kernel.p2pdma", Severity::warning, "CONFIG_PCI_P2PDMA unknown",
        "Neither " + (root / "proc/config.gz").string() + " (CONFIG_IKCONFIG_PROC) nor " + (root / "boot/config-RELEASE").string() +
            " could be read" + (unread.empty() ? std::string() : " (" + unread + ")") + ", and no device has a p2pmem folder.",
        "Check the kernel's config (zcat /proc/config.gz | grep P2PDMA, or /boot/config-$(uname -r)); if it is off: " + fix_build);
  }
}

void iommu_findings(DoctorReport& r, const fs::path& root) {
  std::vector<std::string> units;
  std::error_code ec;
  for (fs::directory_iterator it(root / "sys/class/iommu", ec), end; !ec && it != end; it.increment(ec))
    units.push_back(it->path().filename().string());
  std::sort(units.begin(), units.end());
  std::map<std::string, size_t> types;
  size_t groups = 0;
  std::vector<std::string> unreadable;
  for (fs::directory_iterator it(root / "sys/kernel/iommu_groups", ec), end; !ec && it != end; it.increment(ec)) {
    ++groups;
    auto t = read_attr(it->path() / "type", 256);
    if (t) ++types[trim(*t)];
    else if (t.error().code != ENOENT) unreadable.push_back(t.error().message);
  }
  std::vector<std::string> params;
  if (auto c = read_attr(root / "proc/cmdline", 65536)) {
    std::istringstream in(*c);
    std::string tok;
    while (in >> tok)
      for (const char* k : {"intel_iommu=", "amd_iommu=", "iommu=", "iommu.passthrough=", "iommu.strict=", "pci=", "amd_iommu_intr="})
        if (tok.rfind(k, 0) == 0) params.push_back(tok);
  }
  std::string detail = (units.empty() ? "No IOMMU units in " + (root / "sys/class/iommu").string()
                                      : "IOMMU units (" + (root / "sys/class/iommu").string() + "): " + [&] {
                                          std::string s;
                                          for (const auto& u : units) s += (s.empty() ? "" : ", ") + u;
                                          return s;
                                        }()) +
                       ". " + std::to_string(groups) + " IOMMU groups";
  if (!types.empty()) {
    detail += ", default domain types (" + (root / "sys/kernel/iommu_groups/*/type").string() + "):";
    for (const auto& [t, n] : types) detail += " " + t + " x" + std::to_string(n);
  }
  detail += ". Kernel command line (" + (root / "proc/cmdline").string() + "): ";
  if (params.empty()) detail += "no IOMMU parameters";
  for (size_t i = 0; i < params.size(); ++i) detail += (i ? " " : "") + params[i];
  detail += ".";
  for (const auto& u : unreadable) detail += " " + u + ".";
  const bool translating = types.count("DMA") || types.count("DMA-FQ");
  if (units.empty() && groups == 0) {
    add(r, "iommu", Severity::info, "No IOMMU", detail + " Devices DMA to physical (bus) addresses; P2P through the host bridge is not translated.");
  } else if (translating) {
    add(r, "iommu", Severity::info, "IOMMU translating (DMA domains)",
        detail + " P2P through the host bridge is mapped in the IOMMU (with the MMIO attribute); the kernel turned ACS redirect on "
                 "at the ports that have it (pci_request_acs()), which sends peer requests below a switch up to the root complex: see the ACS findings.",
        "For bus-address P2P below a switch, clear ACS redirect on its ports (see acs.*). iommu=pt (identity domains) removes "
        "translation for host DMA but does not change ACS.");
  } else {
    add(r, "iommu", Severity::info, "IOMMU present, identity (passthrough) domains", detail +
        " DMA addresses are physical; the kernel still enables ACS redirect when an IOMMU driver is active.");
  }
}

void acs_findings(DoctorReport& r, const Topology& t) {
  std::vector<uint32_t> redirecting;
  size_t unknown = 0, known = 0;
  for (uint32_t i = 0; i < t.functions.size(); ++i) {
    const Function& f = t.functions[i];
    if (f.acs.kind == pci::AcsState::Kind::unknown) ++unknown;
    else ++known;
    if (f.acs.redirects()) redirecting.push_back(i);
  }
  const std::string isolation =
      "ACS is isolation: with redirect off, devices below this port reach each other without the IOMMU seeing the traffic, "
      "so they can no longer be kept apart (one IOMMU group, no safe assignment to different VMs). Clear it only between trusted devices.";
  std::string all;
  for (uint32_t i : redirecting) {
    const Function& f = t.functions[i];
    const std::string bdf = f.bdf.to_string();
    const uint16_t cleared = static_cast<uint16_t>(f.acs.ctrl & ~pci::acs::kRedirect);
    all += (all.empty() ? "" : ";") + bdf;
    char now[8], want[8];
    std::snprintf(now, sizeof now, "%04x", f.acs.ctrl);
    std::snprintf(want, sizeof want, "%04x", cleared);
    add(r, "acs." + bdf, Severity::warning, "ACS redirect on at " + bdf + " (" + pci::port_type_name(f.port_type) + ")",
        "ACS Control " + std::string(now) + " (" + pci::acs_bits_string(f.acs.ctrl) +
            "): peer requests through this port go up to the root complex, so P2P below it is not bus_addr (Linux pci_bridge_has_acs_redir()).",
        "At boot: pci=disable_acs_redir=" + bdf + " on the kernel command line (clears RR, CR and EC; Linux pci_disable_acs_redir()). "
        "Now, until reboot (as root): setpci -s " + bdf + " ECAP_ACS+6.w=" + want + "; revert with: setpci -s " + bdf + " ECAP_ACS+6.w=" + now +
            ". The kernel decides P2P when a device is bound, so rebind the drivers after setpci. " + isolation);
  }
  if (!redirecting.empty()) {
    add(r, "acs", Severity::warning, std::to_string(redirecting.size()) + " port(s) redirect peer requests (ACS RR/CR/EC)",
        "Every port whose ACS Control has RR, CR or EC set sends P2P traffic below it up to the root complex.",
        "Boot with pci=disable_acs_redir=" + all + " (all of them; ';' separates addresses). " + isolation);
  } else if (known > 0) {
    add(r, "acs", Severity::ok, "No port redirects peer requests", std::to_string(known) + " functions with a readable ACS state: none has RR, CR or EC set.");
  }
  if (unknown > 0)
    add(r, "acs.unknown", Severity::info, "ACS unknown on " + std::to_string(unknown) + " function(s)",
        "Their config space was read without the extended capabilities (64 bytes: unprivileged, or a snapshot made so); verdicts count them as not redirecting.",
        r.live ? "Run physr doctor as root." : "Snapshot the machine as root (hwloc-gather-topology) to include config space.");
}

void p2pmem_findings(DoctorReport& r, const Status& listed) {
  if (!listed) {
    add(r, "p2pmem", Severity::error, "p2pmem providers could not be listed", listed.error().to_string(), "Check the file named; run as root if it is EACCES.");
    return;
  }
  if (r.p2pmem.empty()) {
    add(r, "p2pmem", Severity::info, "No p2pmem providers",
        "No folder " + (fs::path(r.root) / "sys/bus/pci/devices/*/p2pmem").string() + ": no driver registered P2P memory.",
        "An NVMe with a CMB that allows read and write data (CMBSZ RDS and WDS) publishes one under a P2PDMA kernel; some drivers "
        "(p2pmem-pci) offer device memory; GPUs need their vendor's P2P support instead.");
    return;
  }
  for (const P2pmemInfo& p : r.p2pmem) {
    const std::string bdf = p.bdf.to_string();
    const std::string detail = (p.dir).string() + ": size " + size_text(p.size) + ", available " + size_text(p.available) + ", published " +
                               (p.published ? "1" : "0") + ".";
    if (!p.published)
      add(r, "p2pmem." + bdf, Severity::warning, "p2pmem of " + bdf + " is not published", detail + " Drivers looking for P2P memory (nvmet, pci_p2pmem_find()) skip it.",
          "Its driver publishes it (pci_p2pmem_publish()); nvme does only when the CMB allows both read and write data (CMBSZ RDS and WDS).");
    else if (p.available == 0)
      add(r, "p2pmem." + bdf, Severity::warning, "p2pmem of " + bdf + " is all in use", detail, "Free mappings of " + p.allocate().string() + " (processes holding them).");
    else
      add(r, "p2pmem." + bdf, Severity::ok, "p2pmem of " + bdf + ": " + size_text(p.available) + " free of " + size_text(p.size), detail);
  }
}

void bar_findings(DoctorReport& r, const Topology& t, const std::map<pci::Bdf, fs::path>& dirs) {
  for (const Function& f : t.functions) {
    if (!pci::is_display_or_accel(f) && !pci::is_processor(f)) continue;
    const std::string bdf = f.bdf.to_string();
    uint64_t largest = 0;
    unsigned li = 0;
    std::string list;
    for (const pci::Bar& b : f.bars) {
      if (!b.is_mem()) continue;
      list += (list.empty() ? "" : ", ") + ("BAR" + std::to_string(b.index) + " " + size_text(b.size()) + (b.prefetchable() ? " prefetchable" : ""));
      if (b.size() > largest) largest = b.size(), li = b.index;
    }
    std::vector<Rebar> rebar;
    bool config_full = false;
    if (auto it = dirs.find(f.bdf); it != dirs.end()) {
      if (auto c = read_attr(it->second / "config", 4096); c && c->size() > 256) {
        config_full = true;
        rebar = read_rebar(std::vector<uint8_t>(c->begin(), c->end()));
      }
    }
    std::string detail = bdf + " (" + pci::class_name(f.class_code) + "): " + (list.empty() ? "no memory BARs" : list) + ".";
    for (const Rebar& rb : rebar)
      detail += " Resizable BAR" + std::to_string(rb.bar) + ": " + size_text(rb.current) + ", up to " + size_text(rb.largest) + ".";
    if (rebar.empty()) detail += config_full ? " No Resizable BAR capability." : " Resizable BAR unknown (config space past 256 bytes not readable).";
    const Rebar* grow = nullptr;
    for (const Rebar& rb : rebar)
      if (rb.largest > rb.current) grow = &rb;
    if (grow) {
      add(r, "bar." + bdf, Severity::warning, "BAR" + std::to_string(grow->bar) + " of " + bdf + " can grow from " + size_text(grow->current) + " to " + size_text(grow->largest),
          detail + " Peers reach only what the BAR maps.",
          "Enable Above 4G Decoding and Resizable BAR in the firmware, or with the driver unbound write the size's bit to " +
              (fs::path("/sys/bus/pci/devices") / bdf / ("resource" + std::to_string(grow->bar) + "_resize")).string() + " (Linux 6.1+).");
    } else if (largest != 0 && largest <= 256 * MiB) {
      add(r, "bar." + bdf, Severity::warning, "Small BAR on " + bdf + ": BAR" + std::to_string(li) + " is " + size_text(largest),
          detail + " A 256 MiB window exposes only part of the device memory to peers.",
          "Enable Above 4G Decoding and Resizable BAR in the firmware (a large BAR needs 64-bit prefetchable space).");
    } else {
      add(r, "bar." + bdf, Severity::ok, "BARs of " + bdf, detail);
    }
  }
}

// Ranks devices for the pair list: storage, network, display, accelerators first.
int rank(const Function& f) {
  if (pci::is_nvme(f)) return 0;
  if (pci::is_display_or_accel(f) || pci::is_processor(f)) return 1;
  if (pci::is_network(f)) return 2;
  if (pci::is_storage(f)) return 3;
  return 4;
}

std::string pair_path(const Topology& t, const pci::Explanation& x) {
  std::string s;
  for (const pci::PathHop& h : x.provider_path) s += (s.empty() ? "" : " > ") + short_bdf(t.functions[h.function].bdf);
  if (!x.common) {
    const Function& a = t.functions[x.provider_path.empty() ? 0 : x.provider_path.front().function];
    const Function& b = t.functions[x.client_path.empty() ? 0 : x.client_path.front().function];
    s += " > " + t.host_bridges[a.host_bridge].name();
    if (a.host_bridge != b.host_bridge) s += " ~ " + t.host_bridges[b.host_bridge].name();
  }
  for (auto it = x.client_path.rbegin(); it != x.client_path.rend(); ++it) s += " < " + short_bdf(t.functions[it->function].bdf);
  return s;
}

void pair_findings(DoctorReport& r, const pci::P2PEngine& e, size_t max_devices, bool p2pdma_on) {
  const Topology& t = r.topology;
  std::vector<uint32_t> devs;
  for (uint32_t i = 0; i < t.functions.size(); ++i)
    if (!pci::is_bridge(t.functions[i])) devs.push_back(i);
  std::stable_sort(devs.begin(), devs.end(), [&](uint32_t a, uint32_t b) { return rank(t.functions[a]) < rank(t.functions[b]); });
  const size_t left_out = devs.size() > max_devices ? devs.size() - max_devices : 0;
  if (left_out) devs.resize(max_devices);
  std::sort(devs.begin(), devs.end());
  size_t counts[3] = {0, 0, 0};
  std::set<std::string> acs_fix;
  for (uint32_t p : devs)
    for (uint32_t c : devs) {
      if (p == c) continue;
      const pci::Explanation x = e.explain(p, c);
      r.pairs.push_back(PairReport{p, c, x.verdict, x.link_class, pair_path(t, x)});
      ++counts[static_cast<int>(x.verdict.type)];
      if (!x.kernel_parameter.empty()) acs_fix.insert(x.kernel_parameter);
    }
  if (devs.size() < 2) {
    add(r, "pairs", Severity::info, "Fewer than two devices: no pairs", std::to_string(devs.size()) + " non-bridge function(s).");
    return;
  }
  const size_t bus = counts[static_cast<int>(pci::MapType::bus_addr)], hb = counts[static_cast<int>(pci::MapType::thru_host_bridge)],
               none = counts[static_cast<int>(pci::MapType::not_supported)];
  std::string detail = std::to_string(r.pairs.size()) + " ordered pairs of " + std::to_string(devs.size()) + " devices: " + std::to_string(bus) +
                       " bus_addr, " + std::to_string(hb) + " thru_host_bridge, " + std::to_string(none) + " not_supported" +
                       (left_out ? " (" + std::to_string(left_out) + " more devices left out)" : "") + ".";
  std::string fix;
  if (!acs_fix.empty()) {
    fix = "ACS redirect decides some pairs: ";
    for (const auto& k : acs_fix) fix += k + " ";
    fix += "(see acs.*)";
  }
  if (none > 0 && !e.cpu_amd_zen())
    fix += std::string(fix.empty() ? "" : " ") + "Pairs across root ports or host bridges need an allowlisted host bridge or an AMD Zen CPU (Linux "
           "pci_p2pdma_whitelist, cpu_supports_p2pdma()): put both devices below one PCIe switch.";
  if (!p2pdma_on && bus + hb > 0) {
    add(r, "pairs", Severity::warning, std::to_string(bus + hb) + " pairs could do P2P DMA under a P2PDMA kernel, not this one",
        detail + " These are the verdicts Linux would compute (pci_p2pdma_distance()); this kernel has CONFIG_PCI_P2PDMA off (kernel.p2pdma).",
        trim("Boot a kernel with CONFIG_PCI_P2PDMA=y (kernel.p2pdma). " + fix));
    return;
  }
  add(r, "pairs", bus + hb == 0 ? Severity::warning : Severity::ok,
      bus + hb == 0 ? "No pair of devices can do P2P DMA" : std::to_string(bus + hb) + " pairs can do P2P DMA", detail, fix);
}

}  // namespace

Result<DoctorReport> run_doctor(const DoctorOptions& o) {
  DoctorReport r;
  r.root = o.root.string();
  std::error_code ec;
  if (!fs::is_directory(o.root, ec)) return make_error(ENOENT, "root '" + r.root + "': not a directory");
  r.live = fs::equivalent(o.root, "/", ec);
  r.privileged = o.privileged ? *o.privileged : (r.live && ::geteuid() == 0);

  auto listed = list_p2pmem(o.root);
  Status listed_status;
  if (listed) r.p2pmem = std::move(*listed);
  else listed_status = std::move(listed).error();

  kernel_findings(r, o, o.root);
  iommu_findings(r, o.root);

  auto topo = pci::load_sysfs(o.root);
  if (!topo) {
    add(r, "pci", Severity::error, "The PCI tree could not be loaded", topo.error().to_string(),
        "Check the file named (a snapshot made by hwloc-gather-topology has sys/devices/pci*).");
  } else {
    r.topology = std::move(*topo);
    std::string detail = r.topology.source + ": " + std::to_string(r.topology.host_bridges.size()) + " host bridges, " +
                         std::to_string(r.topology.functions.size()) + " functions; CPU " +
                         (r.topology.cpu.known() ? r.topology.cpu.vendor + " family " + std::to_string(r.topology.cpu.family) : "unknown") + ".";
    for (const auto& w : r.topology.warnings) detail += " Warning: " + w + ".";
    add(r, "pci", r.topology.warnings.empty() ? Severity::ok : Severity::warning, "PCI tree", detail);
  }
  bool p2pdma_on = true;
  for (const Finding& f : r.findings)
    if (f.id == "kernel.p2pdma" && f.severity == Severity::error) p2pdma_on = false;
  acs_findings(r, r.topology);
  p2pmem_findings(r, listed_status);
  if (topo) {
    bar_findings(r, r.topology, function_dirs(o.root));
    auto engine = pci::P2PEngine::create(r.topology);
    if (!engine) add(r, "pairs", Severity::error, "Verdicts could not be computed", engine.error().to_string());
    else pair_findings(r, *engine, o.max_pair_devices, p2pdma_on);
  }
  if (r.live && !r.privileged)
    add(r, "privilege", Severity::info, "Unprivileged: some facts are missing",
        "Without root the kernel shows only the first 64 bytes of config space and hides page frame numbers.",
        "Run as root to add: ACS control and PCIe port types of every port (the acs.* findings), Resizable BAR sizes, "
        "and physical addresses of p2pmem and host buffers (physr p2pmem-test's P2P check through /proc/self/pagemap).");
  return r;
}

}  // namespace physr::lnx
