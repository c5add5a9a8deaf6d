// The O_DIRECT engine: the copy loop of the kernel's p2pmem-test (read a chunk from one
// device into a buffer, write it to the other), with pread/pwrite on O_DIRECT descriptors,
// a thread per buffer slice, and byte-for-byte checks.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "physr/linux.hpp"

namespace physr::lnx {

namespace {

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
  Fd& operator=(Fd&& o) noexcept { std::swap(fd, o.fd); return *this; }
  ~Fd() { if (fd >= 0) ::close(fd); }
};

// The PCI function behind block device dev_t `d`: the last PCI address in the canonical
// path of ROOT/sys/dev/block/MAJ:MIN (a partition's path runs through its disk's).
std::optional<pci::Bdf> function_of(const fs::path& root, dev_t d) {
  std::error_code ec;
  const fs::path link = root / "sys/dev/block" / (std::to_string(major(d)) + ":" + std::to_string(minor(d)));
  const fs::path real = fs::canonical(link, ec);
  if (ec) return std::nullopt;
  std::optional<pci::Bdf> last;
  for (const auto& part : real)
    if (auto b = pci::parse_bdf(part.string())) last = *b;
  return last;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The pattern word for the 8 bytes at device offset `off` (a multiple of 8).
inline uint64_t pattern_word(uint64_t seed, uint64_t off) { return splitmix64(seed ^ (off >> 3) * 0x2545f4914f6cdd1dULL); }

void fill_pattern(uint8_t* p, uint64_t len, uint64_t seed, uint64_t off) {
  for (uint64_t i = 0; i < len; i += 8) {
    const uint64_t w = pattern_word(seed, off + i);
    std::memcpy(p + i, &w, 8);
  }
}

// The first offset in [0, len) where p differs from the pattern, or len.
uint64_t check_pattern(const uint8_t* p, uint64_t len, uint64_t seed, uint64_t off) {
  for (uint64_t i = 0; i < len; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != pattern_word(seed, off + i)) {
      const uint64_t want = pattern_word(seed, off + i);
      for (unsigned b = 0; b < 8; ++b)
        if (((w >> (8 * b)) & 0xff) != ((want >> (8 * b)) & 0xff)) return i + b;
    }
  }
  return len;
}

Result<Fd> open_direct(const DeviceInfo& dev, int mode) {
  const int fd = ::open(dev.path.c_str(), mode | O_DIRECT | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    const int e = errno;
    std::string why;
    if (e == EINVAL)
      why = ": its file system does not support O_DIRECT (tmpfs before Linux 6.6, for one): use a block device or a file on ext4 or xfs";
    return make_error(e, dev.path.string() + ": cannot be opened with O_DIRECT: " + errno_text(e) + why);
  }
  // O_NONBLOCK was only for the open; regular files and block devices ignore it, but clear it.
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return Fd(fd);
}

std::string io_error(const DeviceInfo& dev, const char* op, uint64_t len, uint64_t off, const std::string& buf, int e) {
  std::string why;
  if (e == EINVAL)
    why = ": the device rejects this O_DIRECT I/O: length, offset and buffer must be multiples of its logical block size (" +
          std::to_string(dev.logical_block) + " bytes)";
  if (e == EREMOTEIO)
    why = ": the kernel refused peer-to-peer DMA between " + (dev.function ? dev.function->to_string() : std::string("the device")) + " and " + buf;
  return dev.path.string() + ": O_DIRECT " + op + " of " + std::to_string(len) + " bytes at offset " + std::to_string(off) +
         (std::strcmp(op, "read") == 0 ? " into " : " from ") + buf + " failed: " + errno_text(e) + why;
}

// Reads or writes len bytes at off in one O_DIRECT call (retried on EINTR). A short
// transfer is EIO naming what came.
Status full_io(int fd, bool write, const DeviceInfo& dev, uint8_t* p, uint64_t len, uint64_t off, const std::string& buf) {
  for (;;) {
    const ssize_t n = write ? ::pwrite(fd, p, len, static_cast<off_t>(off)) : ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(errno, io_error(dev, write ? "write" : "read", len, off, buf, errno));
    if (static_cast<uint64_t>(n) != len) {
      struct stat st{};
      std::string end;
      if (!dev.block_device && ::fstat(fd, &st) == 0) end = " (the file ends at " + std::to_string(st.st_size) + ")";
      return make_error(EIO, dev.path.string() + ": short " + (write ? "write" : "read") + ": " + std::to_string(n) + " of " +
                                 std::to_string(len) + " bytes at offset " + std::to_string(off) + end);
    }
    return {};
  }
}

}  // namespace

Result<DeviceInfo> probe_device(const fs::path& path, const fs::path& root) {
  DeviceInfo d;
  d.path = path;
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return make_error(errno, path.string() + ": " + errno_text(errno));
  if (S_ISBLK(st.st_mode)) {
    d.block_device = true;
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return make_error(errno, path.string() + ": cannot be opened: " + errno_text(errno));
    Fd closer(fd);
    uint64_t size = 0;
    int lbs = 0;
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) return make_error(errno, path.string() + ": BLKGETSIZE64 failed: " + errno_text(errno));
    if (::ioctl(fd, BLKSSZGET, &lbs) != 0) return make_error(errno, path.string() + ": BLKSSZGET failed: " + errno_text(errno));
    d.size = size;
    d.logical_block = lbs > 0 ? static_cast<uint64_t>(lbs) : 512;
    d.function = function_of(root, st.st_rdev);
    return d;
  }
  if (!S_ISREG(st.st_mode)) {
    const char* what = S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device" : S_ISDIR(st.st_mode) ? "a directory" : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file";
    return make_error(EINVAL, path.string() + ": " + what + ", neither a block device nor a regular file");
  }
  d.size = static_cast<uint64_t>(st.st_size);
  d.logical_block = 512;
#ifdef STATX_DIOALIGN
  struct statx sx{};
  if (::statx(AT_FDCWD, path.c_str(), 0, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) && sx.stx_dio_offset_align != 0)
    d.logical_block = sx.stx_dio_offset_align;
#endif
  d.function = function_of(root, st.st_dev);
  return d;
}

Result<TransferStats> transfer(const DeviceInfo& rdev, const DeviceInfo& wdev, const Mapping& buffer, const TransferOptions& o,
                               TransferFailure* failure) {
  using Side = TransferFailure::Side;
  const auto fail = [&](Side side, int code, uint64_t off) {
    if (failure) *failure = TransferFailure{side, code, off};
  };
  const uint64_t chunk = o.chunk_size;
  if (chunk == 0 || chunk % 512 != 0) return make_error(EINVAL, "chunk size " + std::to_string(chunk) + ": must be a non-zero multiple of 512 bytes");
  if (o.chunks == 0) return make_error(EINVAL, "chunks: must be at least 1");
  if (o.threads == 0 || o.threads > 256) return make_error(EINVAL, "threads " + std::to_string(o.threads) + ": must be 1 to 256");
  if (o.chunks > (~uint64_t{0} / 2) / chunk) return make_error(EINVAL, "chunks * chunk size overflows");
  const uint64_t threads = std::min<uint64_t>(o.threads, o.chunks);
  if (buffer.size() < threads * chunk)
    return make_error(EINVAL, buffer.describe() + ": " + std::to_string(buffer.size()) + " bytes, " + std::to_string(threads * chunk) +
                                  " needed (threads * chunk size)");
  for (const DeviceInfo* d : {&rdev, &wdev}) {
    const uint64_t off = d == &rdev ? o.read_offset : o.write_offset;
    if (chunk % d->logical_block != 0 || off % d->logical_block != 0)
      return make_error(EINVAL, d->path.string() + ": O_DIRECT needs the chunk size (" + std::to_string(chunk) + ") and offset (" +
                                    std::to_string(off) + ") to be multiples of its logical block size (" + std::to_string(d->logical_block) + " bytes)");
  }
  const uint64_t total = o.chunks * chunk;
  if (rdev.block_device && o.read_offset + total > rdev.size)
    return make_error(ENOSPC, rdev.path.string() + ": holds " + std::to_string(rdev.size) + " bytes; the test reads " + std::to_string(total) +
                                  " at offset " + std::to_string(o.read_offset));
  if (wdev.block_device && o.write_offset + total > wdev.size)
    return make_error(ENOSPC, wdev.path.string() + ": holds " + std::to_string(wdev.size) + " bytes; the test writes " + std::to_string(total) +
                                  " at offset " + std::to_string(o.write_offset));

  PHYSR_ASSIGN_OR_RETURN(Fd rfd, open_direct(rdev, o.seed ? O_RDWR : O_RDONLY));
  PHYSR_ASSIGN_OR_RETURN(Fd wfd, open_direct(wdev, O_WRONLY));
  TransferStats stats;
  const std::string buf_name = buffer.describe();

  // The seeded source: written through host memory, chunk by chunk.
  if (o.seed) {
    PHYSR_ASSIGN_OR_RETURN(Mapping staging, Mapping::host(chunk));
    for (uint64_t i = 0; i < o.chunks; ++i) {
      const uint64_t off = o.read_offset + i * chunk;
      fill_pattern(staging.data(), chunk, *o.seed, off);
      if (auto s = full_io(rfd.fd, true, rdev, staging.data(), chunk, off, "host memory"); !s) {
        fail(Side::read, s.error().code, off);
        return std::move(s).error().with_context("filling the source with the seeded pattern");
      }
    }
    if (::fdatasync(rfd.fd) != 0) return make_error(errno, rdev.path.string() + ": fdatasync failed: " + errno_text(errno));
  }

  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> checked{0};
  std::mutex mu;
  std::optional<Error> first;
  const auto worker = [&](uint64_t t) {
    uint8_t* slice = buffer.data() + t * chunk;
    for (;;) {
      if (stop.load(std::memory_order_relaxed)) return;
      const uint64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= o.chunks) return;
      const uint64_t roff = o.read_offset + i * chunk, woff = o.write_offset + i * chunk;
      Status s = full_io(rfd.fd, false, rdev, slice, chunk, roff, buf_name);
      Side side = Side::read;
      uint64_t at = roff;
      if (s && o.seed) {
        const uint64_t bad = check_pattern(slice, chunk, *o.seed, roff);
        checked.fetch_add(chunk, std::memory_order_relaxed);
        if (bad != chunk) {
          s = make_error(EIO, rdev.path.string() + ": byte " + std::to_string(roff + bad) + " read into " + buf_name +
                                  " differs from the seeded pattern written there");
          side = Side::check;
          at = roff + bad;
        }
      }
      if (s) {
        s = full_io(wfd.fd, true, wdev, slice, chunk, woff, buf_name);
        side = Side::write;
        at = woff;
      }
      if (!s) {
        std::lock_guard<std::mutex> g(mu);
        if (!first) {
          first = s.error();
          fail(side, s.error().code, at);
        }
        stop.store(true);
        return;
      }
    }
  };
  const auto t0 = std::chrono::steady_clock::now();
  if (threads == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (uint64_t t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& th : pool) th.join();
  }
  const auto t1 = std::chrono::steady_clock::now();
  if (first) return std::move(*first);
  stats.seconds = std::chrono::duration<double>(t1 - t0).count();
  stats.bytes = total;
  stats.reads = stats.writes = o.chunks;
  stats.checked_bytes = checked.load();

  if (o.check) {
    if (::fdatasync(wfd.fd) != 0) return make_error(errno, wdev.path.string() + ": fdatasync failed: " + errno_text(errno));
    PHYSR_ASSIGN_OR_RETURN(Fd r2, open_direct(rdev, O_RDONLY));
    PHYSR_ASSIGN_OR_RETURN(Fd w2, open_direct(wdev, O_RDONLY));
    PHYSR_ASSIGN_OR_RETURN(Mapping a, Mapping::host(chunk));
    PHYSR_ASSIGN_OR_RETURN(Mapping b, Mapping::host(chunk));
    for (uint64_t i = 0; i < o.chunks; ++i) {
      const uint64_t roff = o.read_offset + i * chunk, woff = o.write_offset + i * chunk;
      if (auto s = full_io(r2.fd, false, rdev, a.data(), chunk, roff, "host memory"); !s) {
        fail(Side::check, s.error().code, roff);
        return std::move(s).error().with_context("check");
      }
      if (auto s = full_io(w2.fd, false, wdev, b.data(), chunk, woff, "host memory"); !s) {
        fail(Side::check, s.error().code, woff);
        return std::move(s).error().with_context("check");
      }
      if (std::memcmp(a.data(), b.data(), chunk) != 0) {
        uint64_t k = 0;
        while (a.data()[k] == b.data()[k]) ++k;
        fail(Side::check, EIO, woff + k);
        return make_error(EIO, "check: " + wdev.path.string() + " byte " + std::to_string(woff + k) + " is " + format_hex(b.data()[k]) +
                                   ", but " + rdev.path.string() + " byte " + std::to_string(roff + k) + " is " + format_hex(a.data()[k]));
      }
      stats.checked_bytes += chunk;
    }
  }
  return stats;
}

}  // namespace physr::lnx
