// Loads the PCI tree from sysfs: ROOT/sys/devices/pciDDDD:BB/<BDF>/<BDF>/... where a
// function's parent directory is its upstream bridge (sys/bus/pci/devices is often
// incomplete in snapshots, so it is not used). Symlinks are never followed, depth and
// size are bounded, and every error names the file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <sstream>
#include <system_error>

#include "physr/pci.hpp"

namespace physr::pci {

namespace fs = std::filesystem;

namespace {

constexpr size_t kMaxTextFile = 64 * 1024;
constexpr int kMaxDepth = 64;
constexpr size_t kMaxFunctions = 1 << 16;

// What a sysfs attribute holds: its first `max` bytes, or nothing when it is absent or not
// a regular file. A FIFO would block the read forever and a device node (a symlink to
// /dev/zero) never ends or has side effects on open, so only regular files are opened:
// lstat first (symlinks are not followed, as for directories), then open with O_NONBLOCK
// and O_NOFOLLOW and check the opened file again, so a file swapped in between cannot block
// either. Every skipped file is named in `warnings`.
Result<std::optional<std::string>> read_attr(const fs::path& p, size_t max, std::vector<std::string>* warnings) {
  struct stat st{};
  if (::lstat(p.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return std::optional<std::string>();
    return make_error(errno, p.string() + ": cannot be read: " + std::strerror(errno));
  }
  const auto skip = [&](const struct stat& s) -> Result<std::optional<std::string>> {
    const char* what = S_ISFIFO(s.st_mode)  ? "a FIFO"
                       : S_ISLNK(s.st_mode) ? "a symbolic link"
                       : S_ISCHR(s.st_mode) ? "a character device"
                       : S_ISBLK(s.st_mode) ? "a block device"
                       : S_ISDIR(s.st_mode) ? "a directory"
                       : S_ISSOCK(s.st_mode) ? "a socket"
                                             : "not a regular file";
    if (warnings) warnings->push_back(p.string() + ": " + what + ", not a regular file; ignored");
    return std::optional<std::string>();
  };
  if (!S_ISREG(st.st_mode)) return skip(st);
  const int fd = ::open(p.c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    if (errno == ELOOP) return skip(st);
    return make_error(errno, p.string() + ": cannot be read: " + std::strerror(errno));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (::fstat(fd, &st) != 0) return make_error(errno, p.string() + ": cannot be read: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return skip(st);
  std::string s(max, '\0');
  size_t got = 0;
  while (got < max) {
    const ssize_t n = ::read(fd, s.data() + got, max - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(errno, p.string() + ": read error: " + std::strerror(errno));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  s.resize(got);
  return std::optional<std::string>(std::move(s));
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\n' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\n' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// The whole of s as one number (hex with or without 0x when base is 16).
bool parse_u64(std::string_view s, uint64_t& out, unsigned base) {
  if (base == 16 && s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) s.remove_prefix(2);
  auto v = consume_uint(s, base);
  if (!v || !s.empty()) return false;
  out = *v;
  return true;
}

// A hex attribute such as `vendor` ("0x8086\n") no larger than max.
Result<uint64_t> read_hex_attr(const fs::path& p, uint64_t max, const std::string& text) {
  uint64_t v;
  if (!parse_u64(trim(text), v, 16) || v > max)
    return make_error(EINVAL, p.string() + ": expected a hex number up to " + std::to_string(max) + ", found '" +
                                  std::string(trim(text).substr(0, 40)) + "'");
  return v;
}

Status read_resource(const fs::path& p, const std::string& text, Function& f) {
  std::istringstream in(text);
  std::string line;
  unsigned index = 0;
  while (std::getline(in, line)) {
    const std::string_view l = trim(line);
    if (l.empty()) continue;
    uint64_t v[3];
    size_t pos = 0;
    for (int k = 0; k < 3; ++k) {
      while (pos < l.size() && l[pos] == ' ') ++pos;
      const size_t end = l.find(' ', pos);
      const std::string_view tok = l.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
      if (!parse_u64(tok, v[k], 16))
        return make_error(EINVAL, p.string() + ":" + std::to_string(index + 1) + ": expected three hex numbers (start end flags)");
      pos = end == std::string_view::npos ? l.size() : end;
    }
    if (v[0] != 0 || v[1] != 0) {
      if (v[1] < v[0])
        return make_error(EINVAL, p.string() + ":" + std::to_string(index + 1) + ": end below start");
      if (v[1] - v[0] == ~uint64_t{0})
        return make_error(EINVAL, p.string() + ":" + std::to_string(index + 1) + ": a resource of 2^64 bytes");
      f.bars.push_back(Bar{index, PhysSpan{PhysAddr(v[0]), v[1] - v[0] + 1}, IoResourceFlags::from_bits(v[2])});
    }
    if (++index > 64) return make_error(EINVAL, p.string() + ": more than 64 resource lines");
  }
  return {};
}

// Optional small attributes: absent or "unknown" leaves the default.
Status read_link(const fs::path& dir, Function& f, std::vector<std::string>& warnings) {
  PHYSR_ASSIGN_OR_RETURN(const auto speed, read_attr(dir / "current_link_speed", 256, &warnings));
  PHYSR_ASSIGN_OR_RETURN(const auto width, read_attr(dir / "current_link_width", 256, &warnings));
  if (const auto& s = speed) {
    std::string_view t = trim(*s);
    double v = 0;
    if (std::sscanf(std::string(t).c_str(), "%lf", &v) == 1 && v > 0 && v < 1000) f.link_speed_gts = v;
  }
  if (const auto& s = width) {
    uint64_t w;
    if (parse_u64(trim(*s), w, 10) && w <= 32) f.link_width = static_cast<unsigned>(w);
  }
  return {};
}

struct Loader {
  Topology& t;

  Status load_function(const fs::path& dir, const Bdf& bdf, uint32_t hb, int32_t upstream) {
    Function f;
    f.bdf = bdf;
    f.host_bridge = hb;
    f.upstream = upstream;
    const fs::path cfg = dir / "config";
    bool have_config = false;
    PHYSR_ASSIGN_OR_RETURN(const auto config, read_attr(cfg, 4096, &t.warnings));
    if (config) {
      const std::string& bytes = *config;
      PHYSR_ASSIGN_OR_RETURN_CTX(const ConfigInfo info,
                                 parse_config(std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())),
                                 cfg.string());
      f.vendor = info.vendor;
      f.device = info.device;
      f.class_code = info.class_code;
      f.header_type = info.header_type;
      f.port_type = info.port_type;
      f.acs = info.acs;
      have_config = true;
    }
    // The text attributes are what the kernel reports; they win over raw config bytes.
    for (const char* attr : {"vendor", "device", "class"}) {
      const fs::path p = dir / attr;
      PHYSR_ASSIGN_OR_RETURN(const auto text, read_attr(p, kMaxTextFile, &t.warnings));
      if (!text) {
        if (!have_config) return make_error(ENOENT, p.string() + ": missing or not a regular file (and no config file to read it from)");
        continue;
      }
      const bool is_class = std::string_view(attr) == "class";
      PHYSR_ASSIGN_OR_RETURN(const uint64_t v, read_hex_attr(p, is_class ? 0xffffff : 0xffff, *text));
      if (is_class) f.class_code = static_cast<uint32_t>(v);
      else if (std::string_view(attr) == "vendor") f.vendor = static_cast<uint16_t>(v);
      else f.device = static_cast<uint16_t>(v);
    }
    PHYSR_ASSIGN_OR_RETURN(const auto resource, read_attr(dir / "resource", kMaxTextFile, &t.warnings));
    if (resource) PHYSR_RETURN_IF_ERROR(read_resource(dir / "resource", *resource, f));
    PHYSR_ASSIGN_OR_RETURN(const auto numa, read_attr(dir / "numa_node", 256, &t.warnings));
    if (const auto& s = numa) {
      const std::string_view n = trim(*s);
      uint64_t v;
      if (n == "-1") f.numa_node = -1;
      else if (parse_u64(n, v, 10) && v < 4096) f.numa_node = static_cast<int>(v);
      else return make_error(EINVAL, (dir / "numa_node").string() + ": expected -1 or a node number, found '" + std::string(n.substr(0, 40)) + "'");
    }
    PHYSR_RETURN_IF_ERROR(read_link(dir, f, t.warnings));
    // Linux reads ACS and the port type from config space; a 64-byte snapshot has neither.
    // A PCI bridge directly on a root bus is then taken to be a Root Port (DESIGN.md).
    if (f.port_type == PortType::unknown && upstream < 0 && is_pci_bridge(f)) {
      f.port_type = PortType::root_port;
      f.port_type_inferred = true;
    }
    t.functions.push_back(std::move(f));
    return {};
  }

  Status walk(const fs::path& dir, uint32_t hb, int32_t upstream, int depth) {
    if (depth > kMaxDepth) return make_error(EINVAL, dir.string() + ": PCI tree deeper than 64 levels");
    std::vector<std::pair<Bdf, fs::path>> children;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const auto st = it->symlink_status(ec);
      if (ec || !fs::is_directory(st)) continue;
      const std::string name = it->path().filename().string();
      if (name.size() < 12 || name[name.size() - 2] != '.') continue;
      auto bdf = parse_bdf(name);
      if (!bdf) continue;
      children.emplace_back(*bdf, it->path());
    }
    if (ec) return make_error(EIO, dir.string() + ": cannot list: " + ec.message());
    std::sort(children.begin(), children.end());
    for (const auto& [bdf, path] : children) {
      if (t.functions.size() >= kMaxFunctions) return make_error(EINVAL, dir.string() + ": more than 65536 PCI functions");
      PHYSR_RETURN_IF_ERROR(load_function(path, bdf, hb, upstream));
      const auto idx = static_cast<int32_t>(t.functions.size() - 1);
      if (upstream < 0) t.host_bridges[hb].root_functions.push_back(static_cast<uint32_t>(idx));
      PHYSR_RETURN_IF_ERROR(walk(path, hb, idx, depth + 1));
    }
    return {};
  }
};

CpuInfo read_cpuinfo(const fs::path& p, std::vector<std::string>& warnings) {
  CpuInfo cpu;
  auto text = read_attr(p, 1 << 20, &warnings);
  if (!text) {
    warnings.push_back(text.error().message + "; the CPU is taken as unknown");
    return cpu;
  }
  if (!*text) return cpu;
  std::istringstream in(**text);
  std::string line;
  bool have_family = false;
  while (std::getline(in, line) && !(cpu.known() && have_family)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string_view key = trim(std::string_view(line).substr(0, colon));
    const std::string_view val = trim(std::string_view(line).substr(colon + 1));
    if (key == "vendor_id" && cpu.vendor.empty()) cpu.vendor = std::string(val.substr(0, 64));
    if (key == "cpu family" && !have_family) {
      uint64_t v;
      if (parse_u64(val, v, 10) && v < 0x10000) {
        cpu.family = static_cast<uint32_t>(v);
        have_family = true;
      }
    }
  }
  return cpu;
}

}  // namespace

Result<Topology> load_sysfs(const fs::path& root) {
  const fs::path devices = root / "sys" / "devices";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return make_error(ENOENT, "sysfs root '" + root.string() + "': not a directory");
  if (!fs::is_directory(devices, ec))
    return make_error(ENOENT, "sysfs root '" + root.string() + "': no sys/devices directory (is it a snapshot root?)");
  Topology t;
  t.source = root == "/" ? std::string("the live sysfs (/sys)") : "sysfs snapshot " + root.string();
  // "snap/" names the folder "snap", not "" (a path's filename after a trailing slash is empty).
  const fs::path named = root.has_filename() ? root : root.parent_path();
  t.name = root == "/" ? "this machine" : named.filename().string();
  t.cpu = read_cpuinfo(root / "proc" / "cpuinfo", t.warnings);

  std::vector<std::pair<std::pair<uint32_t, uint8_t>, fs::path>> bridges;
  for (fs::directory_iterator it(devices, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto st = it->symlink_status(ec);
    if (ec || !fs::is_directory(st) || name.rfind("pci", 0) != 0) continue;
    // pciDDDD:BB with a domain of 4 or more hex digits.
    auto bdf = parse_bdf(name.substr(3) + ":00.0");
    if (!bdf || name.size() < 10) continue;
    bridges.push_back({{bdf->domain, bdf->bus}, it->path()});
  }
  if (ec) return make_error(EIO, devices.string() + ": cannot list: " + ec.message());
  if (bridges.empty()) return make_error(ENOENT, devices.string() + ": no pciDDDD:BB host bridge directories");
  std::sort(bridges.begin(), bridges.end());
  Loader loader{t};
  for (const auto& [key, path] : bridges) {
    HostBridge hb;
    hb.domain = key.first;
    hb.bus = key.second;
    t.host_bridges.push_back(hb);
    PHYSR_RETURN_IF_ERROR(loader.walk(path, static_cast<uint32_t>(t.host_bridges.size() - 1), -1, 0));
  }
  for (HostBridge& hb : t.host_bridges)
    for (uint32_t i : hb.root_functions)
      if (t.functions[i].numa_node >= 0) {
        hb.numa_node = t.functions[i].numa_node;
        break;
      }
  PHYSR_RETURN_IF_ERROR_CTX(t.validate(), devices.string());
  for (const Bdf& b : t.duplicate_bdfs())
    t.warnings.push_back(b.to_string() + " appears under more than one bridge (an edited snapshot?); the tree is kept, and lookups by address use the first");
  return t;
}

}  // namespace physr::pci
