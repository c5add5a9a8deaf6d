#include "sim/namespace.hpp"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "sim/job_common.hpp"

namespace physr::sim::detail {

Result<Namespace> Namespace::create(uint64_t size, uint64_t unit, uint64_t stream, uint64_t will_write) {
  const char* env = std::getenv("TMPDIR");
  const std::string dir = env && *env ? env : "/tmp";
  // The file is sparse (blocks never written read as the pattern), so only what the job
  // writes takes disk space: a job that writes more than the file system has free is
  // refused before it starts, not hours later with ENOSPC halfway through.
  struct statvfs fs {};
  if (will_write > 0 && statvfs(dir.c_str(), &fs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
    if (will_write > free_bytes)
      return make_error(ENOSPC, "NVMe namespace: the job writes " + format_size(will_write) + " into a file in " + dir +
                                    " (TMPDIR), which has " + std::to_string(free_bytes >> 30) + " GiB" +
                                    " free; set TMPDIR to a file system with room, or make the job smaller");
  }
  std::string path = dir + "/physr-nvme-XXXXXX";
  const int fd = mkstemp(path.data());
  if (fd < 0) return make_error(errno, "NVMe namespace: cannot create a file in " + path + ": " + std::strerror(errno));
  unlink(path.c_str());
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int e = errno;
    close(fd);
    return make_error(e, "NVMe namespace: cannot size the file to " + format_size(size) + ": " + std::strerror(e));
  }
  Namespace ns(fd);
  ns.unit_ = unit;
  ns.stream_ = stream;
  ns.written_.assign(size / unit, false);
  return ns;
}

Namespace::Namespace(Namespace&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)), unit_(o.unit_), stream_(o.stream_), written_(std::move(o.written_)) {}

Namespace::~Namespace() {
  if (fd_ >= 0) close(fd_);
}

Status Namespace::read(uint64_t off, std::span<uint8_t> out) const {
  if (!written_[off / unit_]) {
    pattern(stream_, off, out);
    return {};
  }
  if (pread(fd_, out.data(), out.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(out.size()))
    return make_error(EIO, "NVMe namespace: short read at " + format_hex(off));
  return {};
}

Status Namespace::write(uint64_t off, std::span<const uint8_t> in) {
  if (pwrite(fd_, in.data(), in.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(in.size()))
    return make_error(EIO, "NVMe namespace: short write at " + format_hex(off));
  written_[off / unit_] = true;
  return {};
}

Result<size_t> Namespace::mismatch(uint64_t off, std::span<const uint8_t> have) const {
  if (!written_[off / unit_]) return pattern_mismatch(stream_, off, have);
  std::vector<uint8_t> mine(have.size());
  PHYSR_RETURN_IF_ERROR(read(off, mine));
  return static_cast<size_t>(std::mismatch(mine.begin(), mine.end(), have.begin()).first - mine.begin());
}

}  // namespace physr::sim::detail
