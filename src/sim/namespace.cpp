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

bool WrittenBlocks::test(uint64_t block) const {
  if (partial_.empty() && full_.empty()) return false;  // a read job's namespace: no lookup
  const uint64_t page = block >> kPageShift;
  if (const auto it = partial_.find(page); it != partial_.end()) {
    const uint64_t i = block & ((uint64_t{1} << kPageShift) - 1);
    return (it->second->bits[i / 64] >> (i % 64)) & 1;
  }
  return page_full(page);
}

bool WrittenBlocks::page_full(uint64_t page) const {
  auto it = full_.upper_bound(page);
  if (it == full_.begin()) return false;
  --it;
  return page < it->second;
}

void WrittenBlocks::set(uint64_t block) {
  const uint64_t page = block >> kPageShift;
  if (page_full(page)) return;
  auto& slot = partial_[page];
  if (!slot) slot = std::make_unique<Page>();
  const uint64_t i = block & ((uint64_t{1} << kPageShift) - 1);
  uint64_t& word = slot->bits[i / 64];
  if ((word >> (i % 64)) & 1) return;
  word |= uint64_t{1} << (i % 64);
  // The last page holds what is left of the namespace.
  const uint64_t capacity = std::min<uint64_t>(uint64_t{1} << kPageShift, blocks_ - (page << kPageShift));
  if (++slot->count < capacity) return;
  partial_.erase(page);
  add_full(page);
}

void WrittenBlocks::add_full(uint64_t page) {
  uint64_t first = page, end = page + 1;
  auto next = full_.find(end);
  if (next != full_.end()) {
    end = next->second;
    full_.erase(next);
  }
  auto it = full_.lower_bound(page);
  if (it != full_.begin() && std::prev(it)->second == page) {
    --it;
    first = it->first;
  }
  full_[first] = end;
}

size_t WrittenBlocks::memory_bytes() const noexcept {
  // Node sizes as libstdc++ allocates them: a map node holds its pair and three pointers and
  // a colour; a hash node its pair and a next pointer, plus a bucket pointer.
  return partial_.size() * (sizeof(Page) + 4 * sizeof(void*)) + partial_.bucket_count() * sizeof(void*) +
         full_.size() * (2 * sizeof(uint64_t) + 4 * sizeof(void*));
}

namespace {
std::string tmp_dir() {
  const char* env = std::getenv("TMPDIR");
  return env && *env ? env : "/tmp";
}
}  // namespace

Result<Namespace> Namespace::create(uint64_t size, uint64_t unit, uint64_t stream, uint64_t will_write) {
  // The file is sparse (blocks never written read as the pattern), so only what the job
  // writes takes disk space: a job that writes more than the file system has free is
  // refused before it starts, not hours later with ENOSPC halfway through.
  if (will_write > 0) {
    const std::string dir = tmp_dir();
    struct statvfs fs {};
    if (statvfs(dir.c_str(), &fs) == 0) {
      const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
      if (will_write > free_bytes)
        return make_error(ENOSPC, "NVMe namespace: the job writes " + format_size(will_write) + " into a file in " + dir +
                                      " (TMPDIR), which has " + std::to_string(free_bytes >> 30) + " GiB" +
                                      " free; set TMPDIR to a file system with room, or make the job smaller");
    }
  }
  Namespace ns;
  ns.size_ = size;
  ns.unit_ = unit;
  ns.stream_ = stream;
  ns.written_ = WrittenBlocks(size / unit);
  // A job that writes gets its file now, so that a folder it cannot create a file in fails
  // the job before it starts; a read job's namespace never needs one (every block reads as
  // the pattern) and makes none: no file system calls per job.
  if (will_write > 0) PHYSR_RETURN_IF_ERROR(ns.open_file());
  return ns;
}

Status Namespace::open_file() {
  std::string path = tmp_dir() + "/physr-nvme-XXXXXX";
  const int fd = mkstemp(path.data());
  if (fd < 0) return make_error(errno, "NVMe namespace: cannot create a file in " + path + ": " + std::strerror(errno));
  unlink(path.c_str());
  if (ftruncate(fd, static_cast<off_t>(size_)) != 0) {
    const int e = errno;
    close(fd);
    return make_error(e, "NVMe namespace: cannot size the file to " + format_size(size_) + ": " + std::strerror(e));
  }
  fd_ = fd;
  return {};
}

Namespace::Namespace(Namespace&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)), size_(o.size_), unit_(o.unit_), stream_(o.stream_), written_(std::move(o.written_)) {}

Namespace::~Namespace() {
  if (fd_ >= 0) close(fd_);
}

Status Namespace::read(uint64_t off, std::span<uint8_t> out) const {
  if (!written_.test(off / unit_)) {
    pattern(stream_, off, out);
    return {};
  }
  if (pread(fd_, out.data(), out.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(out.size()))
    return make_error(EIO, "NVMe namespace: short read at " + format_hex(off));
  return {};
}

Status Namespace::write(uint64_t off, std::span<const uint8_t> in) {
  if (fd_ < 0) PHYSR_RETURN_IF_ERROR(open_file());  // the first write of a namespace created for reading
  if (pwrite(fd_, in.data(), in.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(in.size()))
    return make_error(EIO, "NVMe namespace: short write at " + format_hex(off));
  written_.set(off / unit_);
  return {};
}

Result<size_t> Namespace::mismatch(uint64_t off, std::span<const uint8_t> have) const {
  if (!written_.test(off / unit_)) return pattern_mismatch(stream_, off, have);
  std::vector<uint8_t> mine(have.size());
  PHYSR_RETURN_IF_ERROR(read(off, mine));
  return static_cast<size_t>(std::mismatch(mine.begin(), mine.end(), have.begin()).first - mine.begin());
}

Result<size_t> Namespace::read_landed(uint64_t off, std::span<uint8_t> out, std::span<const uint8_t> view, uint64_t piece) const {
  if (!written_.test(off / unit_)) return pattern_landed(stream_, off, out, view, piece);
  for (uint64_t k = 0; k < out.size(); k += piece) {
    const uint64_t n = std::min<uint64_t>(piece, out.size() - k);
    PHYSR_RETURN_IF_ERROR(read(off + k, out.subspan(k, n)));
    PHYSR_ASSIGN_OR_RETURN(const size_t bad, mismatch(off + k, view.subspan(k, n)));
    if (bad != n) return k + bad;
  }
  return view.size();
}

}  // namespace physr::sim::detail
