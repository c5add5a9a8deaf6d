#include "physr/physmem.hpp"

#include <gtest/gtest.h>

#include <numeric>
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

}  // namespace
}  // namespace physr
