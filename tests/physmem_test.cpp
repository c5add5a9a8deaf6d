#include "physr/physmem.hpp"

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace physr {
namespace {

TEST(PhysMemoryTest, ReadsWhatWasWrittenAcrossChunksAndZeroElsewhere) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * TiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  std::vector<uint8_t> data(200000);
  std::iota(data.begin(), data.end(), uint8_t{7});
  const PhysAddr at(512 * GiB - 1000);  // straddles several 64 KiB chunks
  ASSERT_TRUE(m.write(at, data).has_value());
  std::vector<uint8_t> back(data.size() + 2000);
  ASSERT_TRUE(m.read(at - 1000, back).has_value());
  for (size_t i = 0; i < 1000; ++i) ASSERT_EQ(back[i], 0);
  for (size_t i = 0; i < data.size(); ++i) ASSERT_EQ(back[1000 + i], data[i]);
  for (size_t i = 1000 + data.size(); i < back.size(); ++i) ASSERT_EQ(back[i], 0);
  // A 1 TiB machine costs only the chunks touched.
  EXPECT_LE(m.backed_bytes(), 5 * 64 * KiB);
}

// backed() hands out the written chunk in place from the address to the chunk's end, or to
// its region's end where that comes first; nothing for unwritten chunks or outside regions.
TEST(PhysMemoryTest, BackedIsTheWrittenChunkInPlaceUpToItsEndOrItsRegionsEnd) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * MiB + 4 * KiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  EXPECT_TRUE(m.backed(PhysAddr(4096)).empty());  // never written
  EXPECT_TRUE(m.backed(PhysAddr(4 * MiB)).empty());  // in no region
  std::vector<uint8_t> data(100);
  std::iota(data.begin(), data.end(), uint8_t{1});
  ASSERT_TRUE(m.write(PhysAddr(64 * KiB + 1000), data).has_value());
  const auto s = m.backed(PhysAddr(64 * KiB + 1000));
  ASSERT_EQ(s.size(), 64 * KiB - 1000);
  EXPECT_TRUE(std::equal(data.begin(), data.end(), s.begin()));
  EXPECT_EQ(m.backed(PhysAddr(64 * KiB)).data() + 1000, s.data());  // the same bytes, in place
  // The last chunk runs 60 KiB past the region's end: backed() stops at the region's end.
  ASSERT_TRUE(m.write(PhysAddr(1 * MiB), data).has_value());
  EXPECT_EQ(m.backed(PhysAddr(1 * MiB + 10)).size(), 4 * KiB - 10);
}

TEST(PhysMemoryTest, CopyMovesBytesBetweenRegions) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(64 * GiB), 256 * MiB}, PhysRegion::Kind::bar, "gpu0 BAR1"}).has_value());
  std::vector<uint8_t> data(100000, 0xab);
  ASSERT_TRUE(m.write(PhysAddr(4096), data).has_value());
  ASSERT_TRUE(m.copy(PhysAddr(64 * GiB + 123), PhysAddr(4096), data.size()).has_value());
  std::vector<uint8_t> back(data.size());
  ASSERT_TRUE(m.read(PhysAddr(64 * GiB + 123), back).has_value());
  EXPECT_EQ(back, data);
  EXPECT_EQ(m.region_of(PhysAddr(64 * GiB + 5))->name, "gpu0 BAR1");
  EXPECT_EQ(m.region_of(PhysAddr(2 * GiB)), nullptr);
}

TEST(PhysMemoryTest, MismatchFindsTheFirstDifferingByteAcrossChunksAndUnbackedZeros) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  std::vector<uint8_t> data(200000);
  std::iota(data.begin(), data.end(), uint8_t{1});
  const PhysAddr at(3 * 64 * KiB - 777);  // straddles chunks
  ASSERT_TRUE(m.write(at, data).has_value());
  auto r = m.mismatch(at, data);
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->has_value());
  for (size_t bad : {size_t{0}, size_t{776}, size_t{777}, size_t{150000}, data.size() - 1}) {
    auto want = data;
    want[bad] ^= 0x40;
    r = m.mismatch(at, want);
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(r->has_value());
    EXPECT_EQ(**r, bad);
  }
  // Never-written memory compares as zeros: equal to zeros, unequal at the first non-zero.
  std::vector<uint8_t> zeros(70000);
  EXPECT_FALSE(m.mismatch(PhysAddr(512 * MiB), zeros)->has_value());
  zeros[65537] = 9;
  EXPECT_EQ(m.mismatch(PhysAddr(512 * MiB), zeros)->value_or(0), 65537u);
  EXPECT_EQ(m.backed_bytes(), 5 * 64 * KiB);  // the written chunks only: comparing backs nothing
  EXPECT_EQ(m.mismatch(PhysAddr(1 * GiB - 8), zeros).error().code, EFAULT);
}

TEST(PhysMemoryTest, OutsideRegionsIsEfaultAndWritesNothing) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0x100000), 0x10000}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  std::vector<uint8_t> data(0x100, 1);
  auto r = m.write(PhysAddr(0x10ff80), data);  // runs off the end
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EFAULT);
  EXPECT_NE(r.error().message.find("0x110000 is not in any physical region"), std::string::npos);
  std::vector<uint8_t> back(0x80);
  ASSERT_TRUE(m.read(PhysAddr(0x10ff80), back).has_value());
  for (uint8_t b : back) ASSERT_EQ(b, 0);
  EXPECT_EQ(m.copy(PhysAddr(0x100000), PhysAddr(0x200000), 16).error().code, EFAULT);
  EXPECT_EQ(m.add_region({PhysSpan{PhysAddr(0x108000), 0x10000}, PhysRegion::Kind::bar, "x"}).error().code, EEXIST);
  EXPECT_EQ(m.add_region({PhysSpan{PhysAddr(0x1), 0x1000}, PhysRegion::Kind::bar, "x"}).error().code, EINVAL);
  EXPECT_EQ(m.add_region({PhysSpan{PhysAddr(0x0), 0}, PhysRegion::Kind::bar, "x"}).error().code, EINVAL);
  EXPECT_TRUE(m.add_region({PhysSpan{PhysAddr(0x110000), 0x1000}, PhysRegion::Kind::bar, "adjacent"}).has_value());
}

// The chunks of a 2 MiB physical slab sit side by side in the process: backed() runs from
// a chunk across the backed chunks after it, up to the first unbacked one or the slab's end.
TEST(PhysMemoryTest, BackedRunsAcrossTheBackedChunksOfItsSlab) {
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  std::vector<uint8_t> data(4 * MiB, 0x5a);
  ASSERT_TRUE(m.write(PhysAddr(2 * MiB), std::span<const uint8_t>(data).first(1 * MiB)).has_value());  // chunks 0..15 of a slab
  ASSERT_TRUE(m.write(PhysAddr(3 * MiB + 64 * KiB), std::span<const uint8_t>(data).first(64 * KiB)).has_value());  // chunk 17
  const auto s = m.backed(PhysAddr(2 * MiB + 100));
  EXPECT_EQ(s.size(), 1 * MiB - 100);  // stops before the unbacked chunk 16
  EXPECT_EQ(m.backed(PhysAddr(3 * MiB + 64 * KiB)).size(), 64 * KiB);
  EXPECT_EQ(m.backed(PhysAddr(2 * MiB + 512 * KiB)).data(), s.data() + 512 * KiB - 100);
  // A whole slab is one run; the next slab is not contiguous with it.
  ASSERT_TRUE(m.write(PhysAddr(8 * MiB), data).has_value());
  EXPECT_EQ(m.backed(PhysAddr(8 * MiB)).size(), 2 * MiB);
  EXPECT_EQ(m.backed(PhysAddr(10 * MiB - 8)).size(), 8u);
  EXPECT_EQ(m.backed_bytes(), 17 * 64 * KiB + 4 * MiB);
}

// The AnonHugePages of the mapping holding `p`, in KiB, from /proc/self/smaps; -1 if not found.
long huge_kib_at(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(p);
  bool in = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {  // a mapping's first line; its fields follow
      in = lo <= at && at < hi;
      continue;
    }
    long kib = 0;
    if (in && std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kib) == 1) return kib;
  }
  return -1;
}

// Whether this kernel collapses a 2 MiB anonymous range into a huge page on request.
bool kernel_collapses() {
  const size_t n = 4 * MiB;
  void* raw = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return false;
  auto* p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 2 * MiB - 1) & ~uintptr_t{2 * MiB - 1});
  std::memset(p, 1, 2 * MiB);
  const bool ok = madvise(p, 2 * MiB, 25 /* MADV_COLLAPSE */) == 0 && huge_kib_at(p) >= 2048;
  munmap(raw, n);
  return ok;
}

// A slab whose every chunk has backing is one huge page (where the kernel collapses one on
// request), so the model's DMA streams through it with one TLB entry per 2 MiB.
TEST(PhysMemoryTest, AWholeSlabIsAHugePageWhereTheKernelAllows) {
  if (!kernel_collapses()) GTEST_SKIP() << "this kernel does not collapse anonymous memory into huge pages (MADV_COLLAPSE)";
  PhysMemory m;
  ASSERT_TRUE(m.add_region({PhysSpan{PhysAddr(0), 1 * GiB}, PhysRegion::Kind::host_ram, "ram"}).has_value());
  std::vector<uint8_t> data(2 * MiB, 0x77);
  ASSERT_TRUE(m.write(PhysAddr(64 * MiB), data).has_value());
  const auto s = m.backed(PhysAddr(64 * MiB));
  ASSERT_FALSE(s.empty());
  EXPECT_GE(huge_kib_at(s.data()), 2048);
  ASSERT_EQ(s.size(), 2 * MiB);
  EXPECT_TRUE(std::all_of(s.begin(), s.end(), [](uint8_t b) { return b == 0x77; }));  // the bytes survive the collapse
}

}  // namespace
}  // namespace physr
