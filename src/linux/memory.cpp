// Mappings of P2P memory (p2pmem/allocate) and host memory, their physical addresses from
// the pagemap, and MappedMemory: the DMA layer's MemoryAccess over them.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "physr/linux.hpp"

namespace physr::lnx {

Mapping::Mapping(Mapping&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), p2pmem_(std::exchange(o.p2pmem_, std::nullopt)) {}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(p2pmem_, o.p2pmem_);
  return *this;
}

Mapping::~Mapping() {
  if (data_) ::munmap(data_, size_);
}

std::string Mapping::describe() const { return p2pmem_ ? "p2pmem of " + p2pmem_->to_string() : "host memory"; }

Result<Mapping> Mapping::p2pmem(const P2pmemInfo& provider, uint64_t size, bool allow_unpublished) {
  const fs::path file = provider.allocate();
  const std::string who = provider.bdf.to_string();
  if (size == 0 || size % kPageSize != 0)
    return make_error(EINVAL, file.string() + ": " + std::to_string(size) + " bytes: a p2pmem mapping is a non-zero multiple of 4 KiB");
  if (!provider.published && !allow_unpublished)
    return make_error(ENODEV, (provider.dir / "published").string() + ": 0: the P2P memory of " + who +
                                  " is not published, so no driver would use it (its driver publishes it: nvme does when the CMB allows reads and writes)");
  if (size > provider.available)
    return make_error(ENOMEM, (provider.dir / "available").string() + ": " + std::to_string(provider.available) + " bytes free in the P2P memory of " +
                                  who + ", " + std::to_string(size) + " requested");
  // Never block: the allocate attribute must be a regular file (sysfs shows it as one).
  struct stat st{};
  if (::lstat(file.c_str(), &st) != 0)
    return make_error(errno == ENOTDIR ? ENOENT : errno, file.string() + ": missing: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return make_error(EINVAL, file.string() + ": not a regular file: not opened");
  const int fd = ::open(file.c_str(), O_RDWR | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return make_error(errno, file.string() + ": cannot be opened for reading and writing: " + errno_text(errno));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(EINVAL, file.string() + ": not a regular file: not mapped");
  }
  // Only the kernel's attribute maps P2P memory: an ordinary file (a copied sysfs tree)
  // would map as a file, and I/O past its end faults.
  constexpr long kSysfsMagic = 0x62656572;  // include/uapi/linux/magic.h SYSFS_MAGIC
  struct statfs sfs{};
  if (::fstatfs(fd, &sfs) != 0 || static_cast<long>(sfs.f_type) != kSysfsMagic) {
    ::close(fd);
    return make_error(ENODEV, file.string() + ": not on sysfs, so not the kernel's p2pmem allocate attribute: not mapped");
  }
  // Linux p2pmem_alloc_mmap(): only a shared mapping (VM_MAYSHARE), only at offset 0; the
  // pages come from the provider's gen_pool (ENOMEM when it has not len bytes free) and
  // are freed when the mapping goes away.
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    std::string why;
    if (e == ENOMEM) why = ": the P2P memory pool of " + who + " has less than " + std::to_string(size) + " bytes free";
    if (e == ENODEV) why = ": " + who + " has no P2P memory any more";
    if (e == ENXIO || e == EIO) why = ": not a p2pmem allocate file (a kernel without CONFIG_PCI_P2PDMA has none)";
    return make_error(e, file.string() + ": mmap of " + std::to_string(size) + " bytes (MAP_SHARED, offset 0) failed: " + errno_text(e) + why);
  }
  Mapping m;
  m.data_ = static_cast<uint8_t*>(p);
  m.size_ = size;
  m.p2pmem_ = provider.bdf;
  return m;
}

Result<Mapping> Mapping::host(uint64_t size) {
  if (size == 0) return make_error(EINVAL, "host buffer of 0 bytes");
  const uint64_t len = (size + kPageSize - 1) & ~(kPageSize - 1);
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return make_error(errno, "host buffer of " + std::to_string(len) + " bytes: mmap failed: " + errno_text(errno));
  // Touch every page so each one is present (and has its own frame) for the pagemap; lock
  // them where RLIMIT_MEMLOCK allows, so the frames stay put. O_DIRECT pins them anyway.
  for (uint64_t off = 0; off < len; off += kPageSize) static_cast<volatile uint8_t*>(p)[off] = 0;
  (void)::mlock(p, len);
  Mapping m;
  m.data_ = static_cast<uint8_t*>(p);
  m.size_ = len;
  return m;
}

Result<std::vector<uint64_t>> pfns_of(uint64_t vaddr, uint64_t len, const PagemapOptions& options) {
  const std::string name = options.pagemap.string();
  if ((vaddr | len) % kPageSize != 0 || len == 0)
    return make_error(EINVAL, name + ": [" + std::to_string(vaddr) + ", +" + std::to_string(len) + "): not whole 4 KiB pages");
  struct stat st{};
  if (::stat(options.pagemap.c_str(), &st) != 0) return make_error(errno, name + ": cannot be read: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return make_error(EINVAL, name + ": not a regular file: not read");
  const int fd = ::open(options.pagemap.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return make_error(errno, name + ": cannot be opened: " + errno_text(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  const uint64_t pages = len / kPageSize;
  std::vector<uint64_t> entries(pages);
  const uint64_t want = pages * 8;
  uint64_t got = 0;
  while (got < want) {
    const ssize_t n = ::pread(fd, reinterpret_cast<uint8_t*>(entries.data()) + got, want - got,
                              static_cast<off_t>((vaddr / kPageSize) * 8 + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(errno, name + ": read error: " + errno_text(errno));
    if (n == 0) return make_error(EIO, name + ": short read: " + std::to_string(got) + " of " + std::to_string(want) + " bytes of entries");
    got += static_cast<uint64_t>(n);
  }
  // Documentation/admin-guide/mm/pagemap.rst: bit 63 present, bit 62 swapped, bits 0-54 the
  // PFN, zeroed by pagemap_read() for a reader without CAP_SYS_ADMIN (Linux 4.2 and later).
  constexpr uint64_t kPresent = uint64_t{1} << 63, kSwapped = uint64_t{1} << 62, kPfnMask = (uint64_t{1} << 55) - 1;
  bool all_zero = true;
  for (uint64_t i = 0; i < pages; ++i) {
    const uint64_t e = entries[i];
    const uint64_t va = vaddr + i * kPageSize;
    if (!(e & kPresent) || (e & kSwapped))
      return make_error(EFAULT, name + ": page at virtual address " + format_hex(va) + " is " + ((e & kSwapped) ? "swapped out" : "not present"));
    entries[i] = e & kPfnMask;
    all_zero = all_zero && entries[i] == 0;
  }
  if (all_zero)
    return make_error(EPERM, name + ": the page frame numbers read as 0: the kernel shows them only to a process with CAP_SYS_ADMIN (run as root)");
  return entries;
}

Result<RangeList> ranges_of(const void* data, uint64_t len, ProviderId provider, const PagemapOptions& options) {
  const auto va = reinterpret_cast<uintptr_t>(data);
  PHYSR_ASSIGN_OR_RETURN(const auto pfns, pfns_of(va, len, options));
  std::vector<ProviderId> tags;
  if (provider != 0) tags.assign(pfns.size(), provider);
  return RangeList::from_pfns(pfns, tags);
}

Result<RangeList> ranges_of(const Mapping& m, ProviderId provider, const PagemapOptions& options) {
  return ranges_of(m.data(), m.size(), provider, options);
}

// --- MappedMemory ------------------------------------------------------------------------

Status MappedMemory::add(const Mapping& m, const RangeList& ranges) { return add(m.data(), ranges, !m.is_p2pmem()); }

Status MappedMemory::add(uint8_t* data, const RangeList& ranges, bool host_ram) {
  if (data == nullptr || ranges.empty()) return make_error(EINVAL, "MappedMemory::add: no memory or no ranges");
  std::vector<Piece> add;
  uint64_t off = 0;
  for (const PhysRange r : ranges) {
    add.push_back(Piece{r.base.value(), r.size, data + off, host_ram});
    off += r.size;
  }
  std::vector<Piece> all = pieces_;
  all.insert(all.end(), add.begin(), add.end());
  std::sort(all.begin(), all.end(), [](const Piece& a, const Piece& b) { return a.phys < b.phys; });
  for (size_t i = 1; i < all.size(); ++i)
    if (all[i].phys < all[i - 1].phys + all[i - 1].len)
      return make_error(EEXIST, "MappedMemory::add: physical range " + format_hex(all[i].phys) + " overlaps one already registered");
  pieces_ = std::move(all);
  return {};
}

Result<std::vector<std::pair<uint8_t*, uint64_t>>> MappedMemory::spans(uint64_t a, uint64_t len) const {
  std::vector<std::pair<uint8_t*, uint64_t>> out;
  auto it = std::upper_bound(pieces_.begin(), pieces_.end(), a, [](uint64_t x, const Piece& p) { return x < p.phys; });
  uint64_t cur = a, left = len;
  if (it == pieces_.begin()) return make_error(EFAULT, "physical address " + format_hex(a) + " is not in mapped memory");
  --it;
  while (left > 0) {
    if (it == pieces_.end() || cur < it->phys || cur >= it->phys + it->len)
      return make_error(EFAULT, "physical address " + format_hex(cur) + " is not in mapped memory");
    const uint64_t n = std::min(left, it->phys + it->len - cur);
    out.emplace_back(it->virt + (cur - it->phys), n);
    cur += n;
    left -= n;
    ++it;
  }
  return out;
}

Status MappedMemory::write(PhysAddr a, std::span<const uint8_t> bytes) {
  PHYSR_ASSIGN_OR_RETURN(const auto parts, spans(a.value(), bytes.size()));
  size_t off = 0;
  for (const auto& [p, n] : parts) {
    std::memcpy(p, bytes.data() + off, n);
    off += n;
  }
  return {};
}

Status MappedMemory::read(PhysAddr a, std::span<uint8_t> out) const {
  PHYSR_ASSIGN_OR_RETURN(const auto parts, spans(a.value(), out.size()));
  size_t off = 0;
  for (const auto& [p, n] : parts) {
    std::memcpy(out.data() + off, p, n);
    off += n;
  }
  return {};
}

Status MappedMemory::copy(PhysAddr dst, PhysAddr src, uint64_t len) {
  PHYSR_ASSIGN_OR_RETURN(const auto d, spans(dst.value(), len));
  PHYSR_ASSIGN_OR_RETURN(const auto s, spans(src.value(), len));
  size_t di = 0, si = 0;
  uint64_t doff = 0, soff = 0;
  while (di < d.size() && si < s.size()) {
    const uint64_t n = std::min(d[di].second - doff, s[si].second - soff);
    std::memmove(d[di].first + doff, s[si].first + soff, n);
    doff += n;
    soff += n;
    if (doff == d[di].second) ++di, doff = 0;
    if (soff == s[si].second) ++si, soff = 0;
  }
  return {};
}

bool MappedMemory::is_host_ram(PhysSpan span) const noexcept {
  auto it = std::upper_bound(pieces_.begin(), pieces_.end(), span.base.value(), [](uint64_t x, const Piece& p) { return x < p.phys; });
  if (it == pieces_.begin() || span.size == 0) return false;
  --it;
  uint64_t cur = span.base.value(), left = span.size;
  while (left > 0) {
    if (it == pieces_.end() || cur < it->phys || cur >= it->phys + it->len || !it->host_ram) return false;
    const uint64_t n = std::min(left, it->phys + it->len - cur);
    cur += n;
    left -= n;
    ++it;
  }
  return true;
}

}  // namespace physr::lnx
