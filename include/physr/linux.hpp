// physr linux: physr on a real Linux host. P2P memory from the kernel (p2pmem providers in
// sysfs, mappings of p2pmem/allocate), physical addresses of a mapping from
// /proc/self/pagemap as range lists, a MemoryAccess over mapped memory, an O_DIRECT engine
// between block devices (or files) and p2pmem or host buffers, and the findings of
// `physr doctor`.
//
// Design rationale
// - Every path is relative to a root ("/" for this host, or a snapshot's root), so the
//   tests run on fake trees. Only the pagemap and the devices named on a command line are
//   read from where they are.
// - Nothing here blocks on bad input: a sysfs attribute is opened only when it is a regular
//   file (lstat, then open with O_NONBLOCK | O_NOFOLLOW and fstat again), as the pci
//   loader does; every error names the file or device and the kernel's errno.
// - The namespace is physr::lnx: `linux` is a predefined macro in GNU C++ modes.
// - The layer sits beside the machine model, on platform: it implements the DMA layer's
//   MemoryAccess seam with real memory (MappedMemory) and never links the model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/pci.hpp"
#include "physr/range.hpp"

namespace physr::lnx {

namespace fs = std::filesystem;

/// "EPERM (Operation not permitted)": the errno's name and the C library's text.
std::string errno_text(int code);

// -------------------------------------------------------------------------------------
// sysfs attributes

/// Reads a sysfs attribute (at most `max` bytes). Opens only a regular file, never blocks:
/// ENOENT when it is missing, EINVAL naming what it is instead (a FIFO, a device node, a
/// directory, a symbolic link), the open or read errno (EACCES, ...) otherwise; every
/// message names the file.
Result<std::string> read_attr(const fs::path& file, size_t max = 64 * 1024);
/// read_attr, then a decimal (or 0x hex) number; EINVAL naming the file and its text.
Result<uint64_t> read_attr_u64(const fs::path& file);

// -------------------------------------------------------------------------------------
// p2pmem providers (Linux drivers/pci/p2pdma.c, the p2pmem attribute group)

/// One PCI function with P2P memory, as ROOT/sys/bus/pci/devices/BDF/p2pmem/ shows it.
struct P2pmemInfo {
  pci::Bdf bdf;
  fs::path dir;             // .../p2pmem
  uint64_t size = 0;        // p2pmem/size: bytes of P2P memory the driver registered
  uint64_t available = 0;   // p2pmem/available: bytes still free in its pool
  bool published = false;   // p2pmem/published: offered to other drivers (pci_p2pmem_publish())
  fs::path allocate() const { return dir / "allocate"; }
};

/// The p2pmem of the function at `bdf` under `root`. ENODEV when the function exists but
/// has no p2pmem folder (its driver registered no P2P memory, or the kernel lacks
/// CONFIG_PCI_P2PDMA), ENOENT when there is no such function; attribute errors as read_attr.
Result<P2pmemInfo> read_p2pmem(const fs::path& root, const pci::Bdf& bdf);
/// Every function with a p2pmem folder under ROOT/sys/bus/pci/devices, by address. An empty
/// list when there is none (or no such folder); an attribute that cannot be read fails the
/// call naming it.
Result<std::vector<P2pmemInfo>> list_p2pmem(const fs::path& root);
/// The address a path names: "0000:03:00.0", "03:00.0", or a path ending in
/// .../BDF, .../BDF/p2pmem or .../BDF/p2pmem/allocate. EINVAL naming the text otherwise.
Result<pci::Bdf> parse_p2pmem_arg(std::string_view text);

// -------------------------------------------------------------------------------------
// Mappings: P2P memory and host buffers in this process

/// A mapping this process owns (munmap on destruction; moves, never copies).
class Mapping {
 public:
  /// Maps `size` bytes of a provider's P2P memory by its p2pmem/allocate file, by the rules
  /// of Linux p2pmem_alloc_mmap(): MAP_SHARED (a private mapping is EINVAL), offset 0 (any
  /// other is EINVAL), ENODEV when the device lost its P2P memory, ENOMEM when the pool has
  /// less than `size` free. `size` must be a non-zero multiple of 4 KiB (EINVAL). A provider
  /// that is not published is refused with ENODEV (the kernel maps it, but no driver would
  /// pick it: say so rather than test memory nobody uses), unless allow_unpublished.
  static Result<Mapping> p2pmem(const P2pmemInfo& provider, uint64_t size, bool allow_unpublished = false);
  /// `size` bytes of anonymous host memory, page-aligned, touched (so every page is present
  /// for the pagemap) and locked when the limit allows. EINVAL for size 0, ENOMEM.
  static Result<Mapping> host(uint64_t size);

  Mapping() = default;
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  uint8_t* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return size_; }
  /// Whether this is P2P memory (a p2pmem mapping), and whose.
  bool is_p2pmem() const noexcept { return p2pmem_.has_value(); }
  const std::optional<pci::Bdf>& provider() const noexcept { return p2pmem_; }
  /// "p2pmem of 0000:03:00.0" or "host memory".
  std::string describe() const;

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::optional<pci::Bdf> p2pmem_;
};

// -------------------------------------------------------------------------------------
// Physical addresses (Documentation/admin-guide/mm/pagemap.rst)

struct PagemapOptions {
  /// The pagemap to read; a test passes a file of its own (with a fake virtual address).
  fs::path pagemap = "/proc/self/pagemap";
};

/// The page frame number of each 4 KiB page of [vaddr, vaddr + len) (vaddr and len page
/// multiples, else EINVAL). EFAULT naming the page when one is not present (or swapped);
/// EPERM when present pages read as PFN 0: the kernel hides PFNs from a process without
/// CAP_SYS_ADMIN (pagemap_read(), since Linux 4.2), so run as root. Open and read errors
/// name the pagemap and the errno.
Result<std::vector<uint64_t>> pfns_of(uint64_t vaddr, uint64_t len, const PagemapOptions& options = {});
/// The physical ranges behind [data, data + len) as a range list, every range tagged with
/// `provider` (0: host memory), merged by RangeList::from_pfns. Errors as pfns_of.
Result<RangeList> ranges_of(const void* data, uint64_t len, ProviderId provider, const PagemapOptions& options = {});
/// The ranges of a whole mapping; `provider` as above.
Result<RangeList> ranges_of(const Mapping& m, ProviderId provider, const PagemapOptions& options = {});

/// The DMA layer's MemoryAccess over memory this process has mapped: physical addresses of
/// the registered mappings (their range lists) reach their bytes through the mapping.
/// Thread-safe for disjoint bytes once set up; add() is not thread-safe.
class MappedMemory final : public MemoryAccess {
 public:
  /// Registers a mapping whose pages have the physical ranges `ranges` (in order; e.g.
  /// ranges_of(m)); the mapping must outlive this object. EINVAL when the ranges do not add
  /// up to the mapping's size; EEXIST when a range overlaps one registered before.
  Status add(const Mapping& m, const RangeList& ranges);
  /// Registers [data, data + sum of ranges) with its physical ranges; `host_ram` says
  /// whether it is host RAM (a bounce pool may live there) or device memory.
  Status add(uint8_t* data, const RangeList& ranges, bool host_ram);

  Status write(PhysAddr a, std::span<const uint8_t> bytes) override;
  Status read(PhysAddr a, std::span<uint8_t> out) const override;
  Status copy(PhysAddr dst, PhysAddr src, uint64_t len) override;
  bool is_host_ram(PhysSpan span) const noexcept override;

 private:
  struct Piece {
    uint64_t phys = 0, len = 0;
    uint8_t* virt = nullptr;
    bool host_ram = true;
  };
  // The pieces covering [a, a + len), in order, or EFAULT naming the first byte outside.
  Result<std::vector<std::pair<uint8_t*, uint64_t>>> spans(uint64_t a, uint64_t len) const;
  std::vector<Piece> pieces_;  // sorted by phys, disjoint
};

// -------------------------------------------------------------------------------------
// Block devices and files: the PCI function behind them

/// What `path` is as an O_DIRECT target.
struct DeviceInfo {
  fs::path path;
  bool block_device = false;       // else a regular file
  uint64_t size = 0;               // bytes (BLKGETSIZE64, or the file's size)
  uint64_t logical_block = 512;    // BLKSSZGET, or the file system's block size
  std::optional<pci::Bdf> function;  // the PCI function behind it (via /sys/dev/block), if any
};
/// Stats `path` without opening it for I/O: ENOENT, EINVAL for a FIFO, socket, character
/// device or directory, naming it. `root` is where /sys is (the PCI function lookup).
Result<DeviceInfo> probe_device(const fs::path& path, const fs::path& root = "/");

// -------------------------------------------------------------------------------------
// The O_DIRECT engine (the loop of the kernel's p2pmem-test)

struct TransferOptions {
  uint64_t chunk_size = 4 * KiB;  // bytes per I/O; a multiple of the logical block sizes
  uint64_t chunks = 1;            // how many chunks are copied
  unsigned threads = 1;           // each thread owns chunk_size bytes of the buffer
  uint64_t read_offset = 0, write_offset = 0;  // bytes into READ_DEV and WRITE_DEV
  /// Fill READ_DEV's range with a pattern of this seed first (through host memory), and
  /// check every chunk in the buffer after its read: a copy that moved nothing fails.
  std::optional<uint64_t> seed{};
  /// After the copy, read both ranges back into host memory and compare every byte.
  bool check = false;
};

struct TransferStats {
  uint64_t bytes = 0;            // bytes copied (each read once and written once)
  uint64_t reads = 0, writes = 0;
  uint64_t checked_bytes = 0;    // bytes compared (buffer checks and the final check)
  double seconds = 0;            // of the copy loop only
  double gbps() const noexcept { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0; }
  double iops() const noexcept { return seconds > 0 ? static_cast<double>(reads + writes) / seconds : 0; }
};

/// Where a transfer failed, for callers that explain it (EREMOTEIO: the P2P verdict).
struct TransferFailure {
  enum class Side : uint8_t { none, read, write, check } side = Side::none;
  int code = 0;
  uint64_t offset = 0;  // in the device
};

/// Copies `options.chunks` chunks from READ_DEV to WRITE_DEV through `buffer` (p2pmem or
/// host memory, at least threads * chunk_size bytes) with O_DIRECT pread/pwrite. Errors
/// name the device and the errno: open without O_DIRECT support (EINVAL: tmpfs and others),
/// an I/O the device rejects for its alignment (EINVAL), a device smaller than the range
/// (ENOSPC before any I/O), a short read or write (EIO), EREMOTEIO when the kernel refuses
/// P2P DMA between the device and the buffer's provider, a mismatch in a check (EIO naming
/// the offset). WRITE_DEV is written; READ_DEV only when options.seed is set. `failure`,
/// when given, says which side failed.
Result<TransferStats> transfer(const DeviceInfo& read_dev, const DeviceInfo& write_dev, const Mapping& buffer,
                               const TransferOptions& options, TransferFailure* failure = nullptr);

// -------------------------------------------------------------------------------------
// physr doctor: findings about a host or a snapshot

enum class Severity : uint8_t { ok, info, warning, error };
const char* severity_name(Severity s) noexcept;

/// One finding: a stable id ("kernel.p2pdma", "acs.0000:00:01.0"), what it is, the detail
/// (numbers, files it came from) and the fix (empty when there is nothing to do).
struct Finding {
  std::string id;
  Severity severity = Severity::info;
  std::string title, detail, fix;
};

/// The verdict for one (provider, client) pair.
struct PairReport {
  uint32_t provider = 0, client = 0;  // function indices
  pci::Verdict verdict;
  std::string link_class;             // X, PIX, PXB, PHB, NODE, SYS
  std::string path;                   // "03:00.0 > 02:00.0 < 04:00.0": up to the common device, down to the client
};

struct DoctorOptions {
  fs::path root = "/";  // "/" for this host, or a snapshot's root
  /// Whether the reader is privileged (reads all of config space and the pagemap PFNs);
  /// nullopt: the effective uid is 0 when root is "/", else read from the snapshot alone.
  std::optional<bool> privileged{};
  /// The kernel release for /boot/config-RELEASE and the version finding; empty: uname(2)
  /// for "/", else ROOT/proc/sys/kernel/osrelease or ROOT/proc/version.
  std::string release{};
  /// At most this many devices get pair verdicts (storage, network, display, accelerators
  /// first); the rest are counted in a finding.
  size_t max_pair_devices = 16;
};

struct DoctorReport {
  std::string root;
  bool live = false;          // root is "/"
  bool privileged = false;
  std::string kernel;         // the release, or empty when unknown
  pci::Topology topology;
  std::vector<P2pmemInfo> p2pmem;
  std::vector<Finding> findings;
  std::vector<PairReport> pairs;
};

/// Examines a host or a snapshot: kernel and CONFIG_PCI_P2PDMA, IOMMU, ACS per port, p2pmem
/// providers, BARs, and the verdict of every pair of the chosen devices. Missing files become
/// findings, not errors; the call fails only when the PCI tree cannot be loaded (errors as
/// pci::load_sysfs).
Result<DoctorReport> run_doctor(const DoctorOptions& options = {});

}  // namespace physr::lnx
