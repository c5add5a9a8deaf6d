// sysfs attributes that never block, and the p2pmem providers the kernel lists in sysfs
// (Linux drivers/pci/p2pdma.c: the "p2pmem" attribute group of size, available, published
// and the allocate binary attribute).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "physr/linux.hpp"

namespace physr::lnx {

std::string errno_text(int code) {
  const char* name = errno_name(code);
  std::string n;
  if (std::strcmp(name, "E?") != 0) {
    n = name;
  } else {
    switch (code) {
      case EPERM: n = "EPERM"; break;
      case ENXIO: n = "ENXIO"; break;
      case ENOTDIR: n = "ENOTDIR"; break;
      case EISDIR: n = "EISDIR"; break;
      case ELOOP: n = "ELOOP"; break;
      case EAGAIN: n = "EAGAIN"; break;
      case EBADF: n = "EBADF"; break;
      case ENOTTY: n = "ENOTTY"; break;
      case EROFS: n = "EROFS"; break;
      case EFBIG: n = "EFBIG"; break;
      default: n = "errno " + std::to_string(code);
    }
  }
  return n + " (" + std::strerror(code) + ")";
}

namespace {

const char* file_kind(mode_t m) {
  return S_ISFIFO(m)   ? "a FIFO"
         : S_ISLNK(m)  ? "a symbolic link"
         : S_ISCHR(m)  ? "a character device"
         : S_ISBLK(m)  ? "a block device"
         : S_ISDIR(m)  ? "a directory"
         : S_ISSOCK(m) ? "a socket"
                       : "not a regular file";
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::strchr(" \t\r\n", s.front())) s.remove_prefix(1);
  while (!s.empty() && std::strchr(" \t\r\n", s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

// As src/pci/sysfs.cpp read_attr(): lstat, open O_NONBLOCK | O_NOFOLLOW, fstat again, so
// neither a FIFO nor a device node (or a symlink to one) swapped in between can block.
Result<std::string> read_attr(const fs::path& p, size_t max) {
  struct stat st{};
  if (::lstat(p.c_str(), &st) != 0) {
    const int e = errno;
    return make_error(e == ENOTDIR ? ENOENT : e, p.string() + ": " + (e == ENOENT || e == ENOTDIR ? "missing" : "cannot be read") + ": " + errno_text(e));
  }
  const auto not_regular = [&](mode_t m) { return make_error(EINVAL, p.string() + ": " + file_kind(m) + ", not a regular file: not read"); };
  if (!S_ISREG(st.st_mode)) return not_regular(st.st_mode);
  const int fd = ::open(p.c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    const int e = errno;
    if (e == ELOOP) return not_regular(S_IFLNK);
    return make_error(e, p.string() + ": cannot be opened: " + errno_text(e));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (::fstat(fd, &st) != 0) return make_error(errno, p.string() + ": cannot be read: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return not_regular(st.st_mode);
  std::string s(max, '\0');
  size_t got = 0;
  while (got < max) {
    const ssize_t n = ::read(fd, s.data() + got, max - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(errno, p.string() + ": read error: " + errno_text(errno));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  s.resize(got);
  return s;
}

Result<uint64_t> read_attr_u64(const fs::path& p) {
  PHYSR_ASSIGN_OR_RETURN(const std::string text, read_attr(p, 256));
  std::string_view t = trim(text);
  unsigned base = 10;
  if (t.size() > 2 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X')) {
    t.remove_prefix(2);
    base = 16;
  }
  std::string_view rest = t;
  const auto v = consume_uint(rest, base);
  if (!v || !rest.empty() || t.empty())
    return make_error(EINVAL, p.string() + ": expected a number, found '" + std::string(trim(text).substr(0, 40)) + "'");
  return *v;
}

namespace {

Result<P2pmemInfo> read_dir(const fs::path& dir, const pci::Bdf& bdf) {
  P2pmemInfo info;
  info.bdf = bdf;
  info.dir = dir;
  PHYSR_ASSIGN_OR_RETURN(info.size, read_attr_u64(dir / "size"));
  PHYSR_ASSIGN_OR_RETURN(info.available, read_attr_u64(dir / "available"));
  PHYSR_ASSIGN_OR_RETURN(const uint64_t published, read_attr_u64(dir / "published"));
  if (published > 1) return make_error(EINVAL, (dir / "published").string() + ": expected 0 or 1, found " + std::to_string(published));
  info.published = published == 1;
  return info;
}

}  // namespace

Result<P2pmemInfo> read_p2pmem(const fs::path& root, const pci::Bdf& bdf) {
  const fs::path dev = root / "sys/bus/pci/devices" / bdf.to_string();
  std::error_code ec;
  if (!fs::exists(dev, ec)) return make_error(ENOENT, dev.string() + ": no such PCI function");
  const fs::path dir = dev / "p2pmem";
  const auto st = fs::symlink_status(dir, ec);
  if (ec || st.type() == fs::file_type::not_found)
    return make_error(ENODEV, dir.string() + ": missing: " + bdf.to_string() +
                                  " has no P2P memory (its driver registered none, or the kernel lacks CONFIG_PCI_P2PDMA)");
  if (st.type() != fs::file_type::directory) return make_error(EINVAL, dir.string() + ": not a directory");
  return read_dir(dir, bdf);
}

Result<std::vector<P2pmemInfo>> list_p2pmem(const fs::path& root) {
  std::vector<P2pmemInfo> out;
  const fs::path devices = root / "sys/bus/pci/devices";
  std::error_code ec;
  fs::directory_iterator it(devices, ec), end;
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory || ec == std::errc::not_a_directory) return out;
    return make_error(ec.value(), devices.string() + ": cannot be listed: " + errno_text(ec.value()));
  }
  for (; it != end; it.increment(ec)) {
    if (ec) return make_error(ec.value(), devices.string() + ": cannot be listed: " + errno_text(ec.value()));
    auto bdf = pci::parse_bdf(it->path().filename().string());
    if (!bdf) continue;
    const fs::path dir = it->path() / "p2pmem";
    std::error_code e2;
    if (fs::symlink_status(dir, e2).type() != fs::file_type::directory) continue;
    PHYSR_ASSIGN_OR_RETURN(auto info, read_dir(dir, *bdf));
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const P2pmemInfo& a, const P2pmemInfo& b) { return a.bdf < b.bdf; });
  return out;
}

Result<pci::Bdf> parse_p2pmem_arg(std::string_view text) {
  fs::path p{std::string(text)};
  while (!p.empty() && p.has_filename()) {
    const std::string name = p.filename().string();
    if (name == "allocate" || name == "p2pmem") {
      p = p.parent_path();
      continue;
    }
    auto b = pci::parse_bdf(name);
    if (b) return *b;
    break;
  }
  if (auto b = pci::parse_bdf(text)) return *b;
  return make_error(EINVAL, "'" + std::string(text) + "': expected a PCI address (0000:03:00.0) or a path ending in one, its p2pmem or p2pmem/allocate");
}

}  // namespace physr::lnx
