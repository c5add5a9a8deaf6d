// The linux layer on fake trees (sysfs, pagemap, kernel config) and real files: attributes
// that never block, p2pmem providers and the kernel's mmap rules, pagemap translation into
// range lists, MappedMemory under the DMA layer's bounce pool, the O_DIRECT engine, and
// doctor's findings on the repository's snapshots and on a fake host.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <fstream>
#include <random>

#include "physr/linux.hpp"
#include "support/sysfs_snapshots.hpp"

namespace physr::lnx {
namespace {

// A scratch folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("physr-linux-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// --- sysfs attributes ----------------------------------------------------------------

TEST(ReadAttrTest, RegularFilesOnlyAndNeverBlocks) {
  TempDir d("attr");
  write_file(d.path / "size", "4096\n");
  EXPECT_EQ(*read_attr_u64(d.path / "size"), 4096u);
  write_file(d.path / "hex", "0x10\n");
  EXPECT_EQ(*read_attr_u64(d.path / "hex"), 16u);
  auto r = read_attr(d.path / "missing");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOENT);
  EXPECT_TRUE(has(r.error().message, (d.path / "missing").string())) << r.error().message;
  // A FIFO would block a read forever: refused without opening it.
  ASSERT_EQ(::mkfifo((d.path / "fifo").c_str(), 0600), 0);
  r = read_attr(d.path / "fifo");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_TRUE(has(r.error().message, "fifo: a FIFO, not a regular file")) << r.error().message;
  fs::create_symlink("/dev/zero", d.path / "zero");
  r = read_attr(d.path / "zero");
  ASSERT_FALSE(r.has_value());
  EXPECT_TRUE(has(r.error().message, "a symbolic link")) << r.error().message;
  fs::create_directory(d.path / "dir");
  EXPECT_TRUE(has(read_attr(d.path / "dir").error().message, "a directory"));
  write_file(d.path / "junk", "banana\n");
  auto n = read_attr_u64(d.path / "junk");
  ASSERT_FALSE(n.has_value());
  EXPECT_EQ(n.error().code, EINVAL);
  EXPECT_TRUE(has(n.error().message, "junk: expected a number, found 'banana'")) << n.error().message;
}

// --- p2pmem ----------------------------------------------------------------------------

// ROOT/sys/bus/pci/devices/BDF/p2pmem with the given attributes.
void fake_p2pmem(const fs::path& root, const std::string& bdf, uint64_t size, uint64_t avail, int published) {
  const fs::path dir = root / "sys/bus/pci/devices" / bdf / "p2pmem";
  write_file(dir / "size", std::to_string(size) + "\n");
  write_file(dir / "available", std::to_string(avail) + "\n");
  write_file(dir / "published", std::to_string(published) + "\n");
  write_file(dir / "allocate", "");
}

TEST(P2pmemTest, ListsProvidersFromSysfs) {
  TempDir d("list");
  EXPECT_TRUE(list_p2pmem(d.path)->empty());  // no sys/bus/pci/devices at all
  fake_p2pmem(d.path, "0000:05:00.0", 16 * MiB, 12 * MiB, 1);
  fake_p2pmem(d.path, "0000:03:00.0", 8 * MiB, 8 * MiB, 0);
  fs::create_directories(d.path / "sys/bus/pci/devices/0000:01:00.0");  // no p2pmem
  auto l = list_p2pmem(d.path);
  ASSERT_TRUE(l.has_value()) << l.error().to_string();
  ASSERT_EQ(l->size(), 2u);
  EXPECT_EQ((*l)[0].bdf.to_string(), "0000:03:00.0");
  EXPECT_FALSE((*l)[0].published);
  EXPECT_EQ((*l)[1].size, 16 * MiB);
  EXPECT_EQ((*l)[1].available, 12 * MiB);
  EXPECT_TRUE((*l)[1].published);

  auto none = read_p2pmem(d.path, *pci::parse_bdf("0000:01:00.0"));
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, ENODEV);
  EXPECT_TRUE(has(none.error().message, "CONFIG_PCI_P2PDMA")) << none.error().message;
  EXPECT_EQ(read_p2pmem(d.path, *pci::parse_bdf("0000:09:00.0")).error().code, ENOENT);

  // A missing attribute, and a FIFO where one should be: errors naming the file.
  const fs::path dir = d.path / "sys/bus/pci/devices/0000:05:00.0/p2pmem";
  fs::remove(dir / "available");
  auto r = read_p2pmem(d.path, *pci::parse_bdf("0000:05:00.0"));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOENT);
  EXPECT_TRUE(has(r.error().message, (dir / "available").string())) << r.error().message;
  ASSERT_EQ(::mkfifo((dir / "available").c_str(), 0600), 0);
  r = read_p2pmem(d.path, *pci::parse_bdf("0000:05:00.0"));
  ASSERT_FALSE(r.has_value());
  EXPECT_TRUE(has(r.error().message, "available: a FIFO")) << r.error().message;
  EXPECT_FALSE(list_p2pmem(d.path).has_value());
  write_file(dir / "../../0000:03:00.0/p2pmem/published", "2\n");
}

TEST(P2pmemTest, ParsesProviderArguments) {
  for (const char* ok : {"0000:03:00.0", "03:00.0", "/sys/bus/pci/devices/0000:03:00.0", "/sys/bus/pci/devices/0000:03:00.0/p2pmem",
                         "/sys/bus/pci/devices/0000:03:00.0/p2pmem/allocate"}) {
    auto b = parse_p2pmem_arg(ok);
    ASSERT_TRUE(b.has_value()) << ok;
    EXPECT_EQ(b->to_string(), "0000:03:00.0");
  }
  EXPECT_EQ(parse_p2pmem_arg("nvme0").error().code, EINVAL);
}

// Linux p2pmem_alloc_mmap(): the rules the mapping checks before (and by) mmap.
TEST(P2pmemTest, MappingFollowsTheKernelRules) {
  TempDir d("map");
  fake_p2pmem(d.path, "0000:05:00.0", 16 * MiB, 1 * MiB, 1);
  P2pmemInfo info = *read_p2pmem(d.path, *pci::parse_bdf("0000:05:00.0"));
  EXPECT_EQ(Mapping::p2pmem(info, 100).error().code, EINVAL);  // not whole pages
  EXPECT_EQ(Mapping::p2pmem(info, 0).error().code, EINVAL);
  auto big = Mapping::p2pmem(info, 2 * MiB);
  ASSERT_FALSE(big.has_value());
  EXPECT_EQ(big.error().code, ENOMEM);
  EXPECT_TRUE(has(big.error().message, "available: 1048576 bytes free")) << big.error().message;
  // A copied tree's allocate is an ordinary file, not the kernel's attribute: never mapped.
  auto fake = Mapping::p2pmem(info, 64 * KiB);
  ASSERT_FALSE(fake.has_value());
  EXPECT_EQ(fake.error().code, ENODEV);
  EXPECT_TRUE(has(fake.error().message, "not on sysfs")) << fake.error().message;
  info.published = false;
  auto unpub = Mapping::p2pmem(info, 64 * KiB);
  ASSERT_FALSE(unpub.has_value());
  EXPECT_EQ(unpub.error().code, ENODEV);
  EXPECT_TRUE(has(unpub.error().message, "published: 0")) << unpub.error().message;
  fs::remove(info.allocate());
  ASSERT_EQ(::mkfifo(info.allocate().c_str(), 0600), 0);
  auto fifo = Mapping::p2pmem(info, 64 * KiB, /*allow_unpublished=*/true);
  ASSERT_FALSE(fifo.has_value());
  EXPECT_TRUE(has(fifo.error().message, "allocate: not a regular file")) << fifo.error().message;
}

// --- pagemap -----------------------------------------------------------------------------

// A pagemap file with `entries` for the pages from virtual page `first`.
fs::path fake_pagemap(const fs::path& dir, uint64_t first, const std::vector<uint64_t>& entries) {
  const fs::path p = dir / "pagemap";
  std::string bytes((first + entries.size()) * 8, '\0');
  std::memcpy(bytes.data() + first * 8, entries.data(), entries.size() * 8);
  write_file(p, bytes);
  return p;
}

constexpr uint64_t kPresent = uint64_t{1} << 63;

TEST(PagemapTest, TranslatesPagesIntoATaggedRangeList) {
  TempDir d("pagemap");
  // Pages 16..19: PFNs 0x100, 0x101 (contiguous), 0x200, 0x201; bit 55 (soft-dirty) is not PFN.
  const PagemapOptions o{fake_pagemap(d.path, 16, {kPresent | 0x100, kPresent | 0x101 | (uint64_t{1} << 55), kPresent | 0x200, kPresent | 0x201})};
  auto pfns = pfns_of(16 * kPageSize, 4 * kPageSize, o);
  ASSERT_TRUE(pfns.has_value()) << pfns.error().to_string();
  EXPECT_EQ(*pfns, (std::vector<uint64_t>{0x100, 0x101, 0x200, 0x201}));
  auto ranges = ranges_of(reinterpret_cast<const void*>(16 * kPageSize), 4 * kPageSize, 7, o);
  ASSERT_TRUE(ranges.has_value()) << ranges.error().to_string();
  ASSERT_EQ(ranges->size(), 2u);
  EXPECT_EQ((*ranges)[0].base.value(), 0x100 * kPageSize);
  EXPECT_EQ((*ranges)[0].size, 2 * kPageSize);
  EXPECT_EQ((*ranges)[1].base.value(), 0x200 * kPageSize);
  EXPECT_EQ((*ranges)[0].provider, 7u);
  EXPECT_EQ(pfns_of(16 * kPageSize + 1, kPageSize, o).error().code, EINVAL);
}

// pagemap_read() zeroes the PFNs for a reader without CAP_SYS_ADMIN: detected, not used.
TEST(PagemapTest, ZeroPfnsMeanNoPrivilege) {
  TempDir d("pagemap0");
  const PagemapOptions o{fake_pagemap(d.path, 4, {kPresent, kPresent})};
  auto r = pfns_of(4 * kPageSize, 2 * kPageSize, o);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EPERM);
  EXPECT_TRUE(has(r.error().message, "CAP_SYS_ADMIN")) << r.error().message;
  const PagemapOptions absent{fake_pagemap(d.path, 4, {kPresent | 5, 0})};
  r = pfns_of(4 * kPageSize, 2 * kPageSize, absent);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EFAULT);
  EXPECT_TRUE(has(r.error().message, "0x5000 is not present")) << r.error().message;
  const PagemapOptions shortfile{fake_pagemap(d.path, 4, {kPresent | 5})};
  EXPECT_EQ(pfns_of(4 * kPageSize, 2 * kPageSize, shortfile).error().code, EIO);
}

TEST(PagemapTest, HostBufferOfThisProcess) {
  auto m = Mapping::host(64 * KiB);
  ASSERT_TRUE(m.has_value()) << m.error().to_string();
  EXPECT_FALSE(m->is_p2pmem());
  auto r = ranges_of(*m, 0);
  if (::geteuid() != 0) {
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, EPERM);
    return;
  }
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->total_bytes(), 64 * KiB);
  for (const PhysRange x : *r) EXPECT_EQ(x.provider, 0u);
}

// --- MappedMemory: the DMA layer's MemoryAccess over mapped memory -----------------------

TEST(MappedMemoryTest, ReadsWritesAndCopiesAcrossPieces) {
  auto m = Mapping::host(3 * kPageSize);
  ASSERT_TRUE(m.has_value());
  // Physical pages 0x50 and 0x52 (not contiguous) and 0x51, in that virtual order.
  auto ranges = RangeList::from_pfns(std::vector<uint64_t>{0x50, 0x52, 0x51});
  ASSERT_TRUE(ranges.has_value());
  MappedMemory mem;
  ASSERT_TRUE(mem.add(*m, *ranges).has_value());
  // Bytes at the end of phys page 0x51 and the start of 0x52: virtual pages 2 and 1.
  const std::vector<uint8_t> data{1, 2, 3, 4};
  ASSERT_TRUE(mem.write(PhysAddr(0x52000 - 2), data).has_value());
  EXPECT_EQ(m->data()[3 * kPageSize - 2], 1);
  EXPECT_EQ(m->data()[kPageSize], 3);
  std::vector<uint8_t> back(4);
  ASSERT_TRUE(mem.read(PhysAddr(0x52000 - 2), back).has_value());
  EXPECT_EQ(back, data);
  ASSERT_TRUE(mem.copy(PhysAddr(0x50000), PhysAddr(0x52000 - 2), 4).has_value());
  EXPECT_EQ(std::vector<uint8_t>(m->data(), m->data() + 4), data);
  auto bad = mem.read(PhysAddr(0x53000 - 1), back);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, EFAULT);
  EXPECT_TRUE(has(bad.error().message, "0x53000")) << bad.error().message;
  EXPECT_TRUE(mem.is_host_ram(PhysSpan{PhysAddr(0x50000), 3 * kPageSize}));
  EXPECT_FALSE(mem.is_host_ram(PhysSpan{PhysAddr(0x50000), 4 * kPageSize}));
  EXPECT_EQ(mem.add(*m, *ranges).error().code, EEXIST);
}

// The seam at work: the DMA layer's swiotlb-style pool bounces through real mapped memory.
TEST(MappedMemoryTest, CarriesTheBouncePool) {
  auto pool_mem = Mapping::host(256 * KiB);
  auto data_mem = Mapping::host(kPageSize);
  ASSERT_TRUE(pool_mem.has_value() && data_mem.has_value());
  MappedMemory mem;
  ASSERT_TRUE(mem.add(*pool_mem, *RangeList::from_ranges(std::vector<PhysRange>{{PhysAddr(0x1000000), 256 * KiB, 0}})).has_value());
  ASSERT_TRUE(mem.add(*data_mem, *RangeList::from_pfns(std::vector<uint64_t>{0x10})).has_value());
  auto pool = BouncePool::create(mem, BounceOptions{PhysAddr(0x1000000), 256 * KiB, 1});
  ASSERT_TRUE(pool.has_value()) << pool.error().to_string();
  std::memcpy(data_mem->data(), "physr", 5);
  auto b = (*pool)->map(PhysAddr(0x10000), 5, DmaDirection::to_device);
  ASSERT_TRUE(b.has_value()) << b.error().to_string();
  EXPECT_EQ(std::memcmp(pool_mem->data() + (b->value() - 0x1000000), "physr", 5), 0);
  EXPECT_TRUE((*pool)->unmap(*b, 5, DmaDirection::to_device).has_value());
}

// --- the O_DIRECT engine -----------------------------------------------------------------

// Files for O_DIRECT in a folder that supports it (the build tree, then the temp folder),
// or nullopt when neither does (tmpfs before Linux 6.6).
std::optional<fs::path> direct_dir(const std::string& name) {
  for (const fs::path& base : {fs::current_path(), fs::temp_directory_path()}) {
    const fs::path d = base / ("physr-odirect-" + name + "-" + std::to_string(::getpid()));
    fs::create_directories(d);
    write_file(d / "probe", std::string(4096, 'x'));
    const int fd = ::open((d / "probe").c_str(), O_RDONLY | O_DIRECT);
    if (fd >= 0) {
      ::close(fd);
      return d;
    }
    fs::remove_all(d);
  }
  return std::nullopt;
}

TEST(DirectIoTest, CopiesAndChecksEveryByte) {
  auto dir = direct_dir("copy");
  if (!dir) GTEST_SKIP() << "no folder here supports O_DIRECT";
  std::string src(1 * MiB, '\0');
  std::mt19937_64 rng(42);
  for (auto& c : src) c = static_cast<char>(rng());
  write_file(*dir / "src", src);
  write_file(*dir / "dst", std::string(1 * MiB, '\0'));
  auto r = probe_device(*dir / "src");
  auto w = probe_device(*dir / "dst");
  ASSERT_TRUE(r.has_value() && w.has_value());
  EXPECT_FALSE(r->block_device);
  EXPECT_EQ(r->size, 1 * MiB);
  auto buf = Mapping::host(3 * 16 * KiB);
  ASSERT_TRUE(buf.has_value());
  TransferOptions o{.chunk_size = 16 * KiB, .chunks = 64, .threads = 3, .check = true};
  auto s = transfer(*r, *w, *buf, o);
  ASSERT_TRUE(s.has_value()) << s.error().to_string();
  EXPECT_EQ(s->bytes, 1 * MiB);
  EXPECT_EQ(s->reads, 64u);
  EXPECT_EQ(s->checked_bytes, 1 * MiB);
  std::ifstream in(*dir / "dst", std::ios::binary);
  std::string got((std::istreambuf_iterator<char>(in)), {});
  EXPECT_TRUE(got == src);
  // With a seed the source is rewritten with the pattern, and every chunk is checked twice.
  o.seed = 7;
  s = transfer(*r, *w, *buf, o);
  ASSERT_TRUE(s.has_value()) << s.error().to_string();
  EXPECT_EQ(s->checked_bytes, 2 * MiB);
  fs::remove_all(*dir);
}

TEST(DirectIoTest, BadInputIsAClearError) {
  auto dir = direct_dir("bad");
  if (!dir) GTEST_SKIP() << "no folder here supports O_DIRECT";
  write_file(*dir / "small", std::string(4096, 'a'));
  write_file(*dir / "dst", "");
  auto r = *probe_device(*dir / "small");
  auto w = *probe_device(*dir / "dst");
  auto buf = *Mapping::host(4096);
  // A short read: the file ends after the first chunk.
  TransferFailure where;
  auto s = transfer(r, w, buf, TransferOptions{.chunk_size = 4096, .chunks = 2}, &where);
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code, EIO);
  EXPECT_TRUE(has(s.error().message, "small: short read: 0 of 4096 bytes at offset 4096 (the file ends at 4096)")) << s.error().message;
  EXPECT_EQ(where.side, TransferFailure::Side::read);
  // The device's O_DIRECT alignment, checked before any I/O.
  auto strict = r;
  strict.logical_block = 4096;
  s = transfer(strict, w, buf, TransferOptions{.chunk_size = 512, .chunks = 1});
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code, EINVAL);
  EXPECT_TRUE(has(s.error().message, "multiples of its logical block size (4096 bytes)")) << s.error().message;
  // A block device smaller than the range: ENOSPC before any I/O.
  auto blk = w;
  blk.block_device = true;
  blk.size = 4096;
  s = transfer(r, blk, buf, TransferOptions{.chunk_size = 4096, .chunks = 2});
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code, ENOSPC);
  // A buffer smaller than threads * chunk.
  EXPECT_EQ(transfer(r, w, buf, TransferOptions{.chunk_size = 4096, .chunks = 4, .threads = 2}).error().code, EINVAL);
  // Neither a block device nor a file: refused by stat, never opened.
  ASSERT_EQ(::mkfifo((*dir / "fifo").c_str(), 0600), 0);
  auto f = probe_device(*dir / "fifo");
  ASSERT_FALSE(f.has_value());
  EXPECT_TRUE(has(f.error().message, "fifo: a FIFO, neither a block device nor a regular file")) << f.error().message;
  EXPECT_EQ(probe_device(*dir / "nothing").error().code, ENOENT);
  fs::remove_all(*dir);
}

// --- doctor ------------------------------------------------------------------------------

const Finding* find(const DoctorReport& r, const std::string& id) {
  for (const Finding& f : r.findings)
    if (f.id == id) return &f;
  return nullptr;
}

TEST(DoctorSnapshotTest, XeonSnapshotWithoutPrivilegeOrConfig) {
  auto r = run_doctor(DoctorOptions{.root = test::sysfs_snapshots() / "40intel64-2g2n4c+pci"});
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_FALSE(r->live);
  const Finding* pci = find(*r, "pci");
  ASSERT_NE(pci, nullptr);
  EXPECT_EQ(pci->severity, Severity::ok);
  EXPECT_TRUE(has(pci->detail, "2 host bridges, 37 functions")) << pci->detail;
  // The snapshot's config space is header-only: ACS unknown, said so with the fix.
  const Finding* acs = find(*r, "acs.unknown");
  ASSERT_NE(acs, nullptr);
  EXPECT_FALSE(acs->fix.empty());
  ASSERT_NE(find(*r, "kernel.p2pdma"), nullptr);
  EXPECT_EQ(find(*r, "kernel.p2pdma")->severity, Severity::warning);  // no config, no p2pmem: unknown
  EXPECT_EQ(find(*r, "privilege"), nullptr);                          // a snapshot, not this host
  // Pairs: the NIC's two ports share root port 00:05.0 (bus_addr, so PIX: the TLPs turn at
  // the root port, not in the host bridge); the RAID card and the NIC do not (PHB).
  bool nic = false, across = false;
  for (const PairReport& p : r->pairs) {
    const std::string a = r->topology.functions[p.provider].bdf.to_string(), b = r->topology.functions[p.client].bdf.to_string();
    if (a == "0000:02:00.0" && b == "0000:02:00.1") {
      nic = true;
      EXPECT_EQ(p.verdict.type, pci::MapType::bus_addr);
      EXPECT_EQ(p.link_class, "PIX");
      EXPECT_EQ(p.path, "02:00.0 > 00:05.0 < 02:00.1");
    }
    if (a == "0000:01:00.0" && b == "0000:02:00.0") {
      across = true;
      EXPECT_EQ(p.verdict.type, pci::MapType::not_supported);
      EXPECT_EQ(p.link_class, "PHB");
    }
  }
  EXPECT_TRUE(nic && across);
}

// Root port config space with a PCIe capability and an ACS capability whose control is `ctrl`.
std::string root_port_config(uint16_t ctrl) {
  std::string c(4096, '\0');
  c[0] = '\x86', c[1] = '\x80', c[2] = '\x34', c[3] = '\x12';
  c[6] = 0x10;         // capability list
  c[9] = 0, c[10] = 4, c[11] = 6;  // class 0x060400
  c[0x0e] = 1;         // header type 1
  c[0x34] = 0x40;
  c[0x40] = 0x10;      // PCIe capability, root port
  c[0x42] = 4 << 4;
  c[0x100] = 0x0d;     // ACS, version 1, last
  c[0x102] = 0x10;
  c[0x104] = 0x5f;
  c[0x106] = static_cast<char>(ctrl & 0xff);
  c[0x107] = static_cast<char>(ctrl >> 8);
  return c;
}

// A fake host: a root port with ACS RR|CR set, an NVMe with p2pmem below it and a GPU with
// a 256 MiB BAR on another root port, an IOMMU translating, CONFIG_PCI_P2PDMA=y in a
// gzipped proc/config.gz.
TEST(DoctorTest, FakeHostWithIommuAcsAndP2pmem) {
  TempDir d("doctor");
  const fs::path& root = d.path;
  const fs::path rp = root / "sys/devices/pci0000:00/0000:00:01.0";
  write_file(rp / "config", root_port_config(0x001d));
  const fs::path nvme = rp / "0000:01:00.0";
  write_file(nvme / "vendor", "0x1b36\n");
  write_file(nvme / "device", "0x0010\n");
  write_file(nvme / "class", "0x010802\n");
  write_file(nvme / "resource", "0xfe000000 0xfe003fff 0x140204\n0xfd000000 0xfdffffff 0x14220c\n");
  const fs::path rp2 = root / "sys/devices/pci0000:00/0000:00:02.0";
  write_file(rp2 / "config", root_port_config(0));
  const fs::path gpu = rp2 / "0000:02:00.0";
  write_file(gpu / "vendor", "0x10de\n");
  write_file(gpu / "device", "0x1db6\n");
  write_file(gpu / "class", "0x030200\n");
  write_file(gpu / "resource", "0xe0000000 0xefffffff 0x14220c\n");
  fake_p2pmem(root, "0000:01:00.0", 16 * MiB, 12 * MiB, 1);
  fs::create_directories(root / "sys/class/iommu/dmar0");
  write_file(root / "sys/kernel/iommu_groups/0/type", "DMA\n");
  write_file(root / "sys/kernel/iommu_groups/1/type", "DMA-FQ\n");
  write_file(root / "proc/cmdline", "BOOT_IMAGE=/vmlinuz intel_iommu=on quiet\n");
  write_file(root / "proc/sys/kernel/osrelease", "6.12.9\n");
  write_file(root / "proc/cpuinfo", "vendor_id\t: GenuineIntel\ncpu family\t: 6\n");
  gzFile gz = gzopen((root / "proc/config.gz").c_str(), "wb");
  ASSERT_NE(gz, nullptr);
  const std::string cfg = "CONFIG_ZONE_DEVICE=y\nCONFIG_PCI_P2PDMA=y\n";
  gzwrite(gz, cfg.data(), static_cast<unsigned>(cfg.size()));
  gzclose(gz);

  auto r = run_doctor(DoctorOptions{.root = root});
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->kernel, "6.12.9");
  ASSERT_NE(find(*r, "kernel.p2pdma"), nullptr);
  EXPECT_EQ(find(*r, "kernel.p2pdma")->severity, Severity::ok);
  EXPECT_TRUE(has(find(*r, "kernel.p2pdma")->detail, "proc/config.gz"));
  const Finding* iommu = find(*r, "iommu");
  ASSERT_NE(iommu, nullptr);
  EXPECT_TRUE(has(iommu->title, "translating")) << iommu->title;
  EXPECT_TRUE(has(iommu->detail, "dmar0") && has(iommu->detail, "DMA x1") && has(iommu->detail, "DMA-FQ x1") && has(iommu->detail, "intel_iommu=on"))
      << iommu->detail;
  const Finding* acs = find(*r, "acs.0000:00:01.0");
  ASSERT_NE(acs, nullptr);
  EXPECT_EQ(acs->severity, Severity::warning);
  EXPECT_TRUE(has(acs->detail, "001d")) << acs->detail;
  // The fix: the kernel parameter, the setpci that clears RR|CR|EC (0x1d -> 0x11) and its revert.
  EXPECT_TRUE(has(acs->fix, "pci=disable_acs_redir=0000:00:01.0")) << acs->fix;
  EXPECT_TRUE(has(acs->fix, "setpci -s 0000:00:01.0 ECAP_ACS+6.w=0011")) << acs->fix;
  EXPECT_TRUE(has(acs->fix, "revert with: setpci -s 0000:00:01.0 ECAP_ACS+6.w=001d")) << acs->fix;
  EXPECT_TRUE(has(acs->fix, "ACS is isolation")) << acs->fix;
  EXPECT_EQ(find(*r, "acs.0000:00:02.0"), nullptr);
  const Finding* mem = find(*r, "p2pmem.0000:01:00.0");
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->severity, Severity::ok);
  EXPECT_TRUE(has(mem->title, "12 MiB free of 16 MiB")) << mem->title;
  const Finding* bar = find(*r, "bar.0000:02:00.0");
  ASSERT_NE(bar, nullptr);
  EXPECT_EQ(bar->severity, Severity::warning);
  EXPECT_TRUE(has(bar->title, "Small BAR")) << bar->title;
  // NVMe and GPU on different root ports of a host bridge that is not allowlisted.
  ASSERT_EQ(r->pairs.size(), 2u);
  EXPECT_EQ(r->pairs[0].verdict.type, pci::MapType::not_supported);
  EXPECT_EQ(r->pairs[0].link_class, "PHB");
  EXPECT_EQ(r->pairs[0].path, "01:00.0 > 00:01.0 > pci0000:00 < 00:02.0 < 02:00.0");

  // Unpublished p2pmem, a kernel config with P2PDMA off.
  fake_p2pmem(root, "0000:01:00.0", 16 * MiB, 12 * MiB, 0);
  fs::remove(root / "proc/config.gz");
  write_file(root / "boot/config-6.12.9", "# CONFIG_PCI_P2PDMA is not set\n");
  r = run_doctor(DoctorOptions{.root = root});
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(find(*r, "p2pmem.0000:01:00.0")->severity, Severity::warning);
  EXPECT_TRUE(has(find(*r, "kernel.p2pdma")->detail, "boot/config-6.12.9")) << find(*r, "kernel.p2pdma")->detail;
  EXPECT_NE(find(*r, "kernel.p2pdma")->severity, Severity::ok);
  // A FIFO where the kernel config and an IOMMU group's type should be: findings, no hang.
  fs::remove(root / "boot/config-6.12.9");
  ASSERT_EQ(::mkfifo((root / "proc/config.gz").c_str(), 0600), 0);
  fs::remove(root / "sys/kernel/iommu_groups/1/type");
  ASSERT_EQ(::mkfifo((root / "sys/kernel/iommu_groups/1/type").c_str(), 0600), 0);
  r = run_doctor(DoctorOptions{.root = root});
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(has(find(*r, "kernel.p2pdma")->detail, "config.gz: not a regular file")) << find(*r, "kernel.p2pdma")->detail;
  EXPECT_TRUE(has(find(*r, "iommu")->detail, "type: a FIFO")) << find(*r, "iommu")->detail;
}

TEST(DoctorTest, NoPciTreeIsAFindingNotAFailure) {
  EXPECT_EQ(run_doctor(DoctorOptions{.root = "/nonexistent-physr-root"}).error().code, ENOENT);
  TempDir d("nopci");
  auto r = run_doctor(DoctorOptions{.root = d.path});
  ASSERT_TRUE(r.has_value());
  ASSERT_NE(find(*r, "pci"), nullptr);
  EXPECT_EQ(find(*r, "pci")->severity, Severity::error);
  EXPECT_EQ(find(*r, "kernel.version")->severity, Severity::info);
}

}  // namespace
}  // namespace physr::lnx
