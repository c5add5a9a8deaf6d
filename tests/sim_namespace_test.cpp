// The model SSDs' namespaces: written blocks read back, unwritten blocks read as the
// pattern, and the record of written blocks takes memory for what was written, not for the
// namespace's size.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "sim/job_common.hpp"
#include "sim/namespace.hpp"

namespace physr::sim::detail {
namespace {

constexpr uint64_t kBlock = 512;

TEST(SimNamespaceTest, WrittenBlocksMatchAReferenceSet) {
  // 3 pages and a partial one, written in a random order with repeats.
  const uint64_t blocks = 3 * 32768 + 1000;
  WrittenBlocks w(blocks);
  std::vector<bool> ref(blocks);
  std::mt19937_64 rng(7);
  for (int k = 0; k < 400000; ++k) {
    const uint64_t b = rng() % blocks;
    w.set(b);
    ref[b] = true;
  }
  for (uint64_t b = 0; b < blocks; ++b) ASSERT_EQ(w.test(b), ref[b]) << "block " << b;
  // Every block: the pages become runs and merge into one.
  for (uint64_t b = 0; b < blocks; ++b) w.set(b);
  for (uint64_t b = 0; b < blocks; ++b) ASSERT_TRUE(w.test(b)) << "block " << b;
  EXPECT_LT(w.memory_bytes(), 1024u);
}

TEST(SimNamespaceTest, PagesFilledOutOfOrderMergeIntoOneRun) {
  const uint64_t blocks = 8 * 32768;
  WrittenBlocks w(blocks);
  for (uint64_t page : {5, 1, 3, 2, 7, 6, 0, 4})
    for (uint64_t b = 0; b < 32768; ++b) w.set(page * 32768 + b);
  for (uint64_t b = 0; b < blocks; b += 977) ASSERT_TRUE(w.test(b));
  EXPECT_LT(w.memory_bytes(), 1024u);  // one run, no bitmap page left
}

TEST(SimNamespaceTest, TrackingMemoryFollowsWhatWasWrittenNotTheSize) {
  // 8 TiB of 512 B blocks: one bit per block would be 2 GiB.
  auto ns = Namespace::create(uint64_t{8} << 40, kBlock, 42);
  ASSERT_TRUE(ns.has_value()) << ns.error().to_string();
  EXPECT_LT(ns->tracking_bytes(), 4096u) << "a namespace never written";
  std::vector<uint8_t> buf(kBlock), back(kBlock);
  // A sequential write of 64 MiB ends as one run of full pages.
  for (uint64_t off = 0; off < 64 * MiB; off += kBlock) {
    pattern(99, off, buf);
    ASSERT_TRUE(ns->write(off, buf).has_value());
  }
  EXPECT_LT(ns->tracking_bytes(), 16 * 1024u);
  // Scattered writes cost a bitmap page each.
  const uint64_t far = uint64_t{4} << 40;
  for (uint64_t k = 0; k < 16; ++k) ASSERT_TRUE(ns->write(far + k * GiB, buf).has_value());
  EXPECT_LT(ns->tracking_bytes(), 17 * 4200u + 16 * 1024u);
  // What was written reads back; what was not reads as the namespace's pattern.
  ASSERT_TRUE(ns->read(far + 3 * GiB, back).has_value());
  EXPECT_EQ(back, buf);
  ASSERT_TRUE(ns->read(far + 3 * GiB + kBlock, back).has_value());
  std::vector<uint8_t> factory(kBlock);
  pattern(42, far + 3 * GiB + kBlock, factory);
  EXPECT_EQ(back, factory);
  auto mm = ns->mismatch(12345 * kBlock, back);
  ASSERT_TRUE(mm.has_value());
  EXPECT_LT(*mm, kBlock) << "block 12345 holds stream 99's data, not this";
}

// A namespace makes its file when it is first written: a read job's never does (every block
// reads as the pattern), so it costs no file system calls and runs with a TMPDIR it could not
// create a file in; a namespace created for writing makes it at once and fails up front there.
TEST(SimNamespaceTest, AFileOnlyForANamespaceThatIsWritten) {
  const char* old = std::getenv("TMPDIR");
  const std::optional<std::string> saved = old ? std::optional<std::string>(old) : std::nullopt;
  const std::string nowhere = "/nonexistent-physr-folder/tmp";
  ASSERT_EQ(setenv("TMPDIR", nowhere.c_str(), 1), 0);
  auto ns = Namespace::create(64 * MiB, kBlock, 5);
  auto for_writing = Namespace::create(64 * MiB, kBlock, 5, 64 * MiB);
  std::vector<uint8_t> back(2 * kBlock), factory(2 * kBlock);
  std::optional<Status> read_status, first_write;
  if (ns) {
    read_status = ns->read(7 * kBlock, back);
    first_write = ns->write(3 * kBlock, std::span(back.data(), kBlock));
  }
  if (saved) setenv("TMPDIR", saved->c_str(), 1);
  else unsetenv("TMPDIR");
  ASSERT_TRUE(ns.has_value()) << "a namespace only read needs no file: " << ns.error().to_string();
  ASSERT_TRUE(read_status->has_value()) << read_status->error().to_string();
  pattern(5, 7 * kBlock, factory);
  EXPECT_EQ(back, factory);
  ASSERT_FALSE(first_write->has_value()) << "its first write makes the file, in the folder that is not there";
  EXPECT_EQ(first_write->error().code, ENOENT);
  EXPECT_NE(first_write->error().message.find(nowhere), std::string::npos) << first_write->error().message;
  ASSERT_FALSE(for_writing.has_value()) << "a namespace created for writing makes its file at once";
  EXPECT_EQ(for_writing.error().code, ENOENT);
  // With a folder it can use, the first write makes the file, and the block reads back.
  auto ok = Namespace::create(64 * MiB, kBlock, 5);
  ASSERT_TRUE(ok.has_value());
  std::vector<uint8_t> data(kBlock, 0x5a), got(kBlock);
  ASSERT_TRUE(ok->write(3 * kBlock, data).has_value());
  ASSERT_TRUE(ok->read(3 * kBlock, got).has_value());
  EXPECT_EQ(got, data);
}

// A read's pieces checked as they land (run_blocks' landing checks through
// Namespace::read_landed): unwritten blocks as the factory pattern, written ones as the
// file holds them; a view that does not hold what the device wrote (its bytes went
// elsewhere) fails at its first differing byte.
TEST(SimNamespaceTest, ReadLandedChecksWrittenAndUnwrittenBlocks) {
  constexpr uint64_t kUnit = 64 * KiB, kPiece = 8 * KiB;
  auto ns = Namespace::create(4 * kUnit, kUnit, 11, kUnit);
  ASSERT_TRUE(ns.has_value()) << ns.error().to_string();
  std::vector<uint8_t> data(kUnit);
  for (size_t k = 0; k < data.size(); ++k) data[k] = static_cast<uint8_t>(k * 7 + 1);
  ASSERT_TRUE(ns->write(kUnit, data).has_value());
  for (const uint64_t off : {uint64_t{0}, kUnit}) {  // unwritten, written
    std::vector<uint8_t> out(kUnit);
    auto r = ns->read_landed(off, out, out, kPiece);
    ASSERT_TRUE(r.has_value()) << r.error().to_string();
    EXPECT_EQ(*r, kUnit) << "off " << off;
    if (off == kUnit) {
      EXPECT_EQ(out, data);
    }
    std::vector<uint8_t> elsewhere(kUnit), view(out);
    view[kUnit - kPiece + 9] ^= 0x04;  // the last piece's view differs at one byte
    r = ns->read_landed(off, elsewhere, view, kPiece);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(*r, kUnit - kPiece + 9) << "off " << off;
    const std::vector<uint8_t> stale(kUnit);  // nothing landed where the CPU looks
    r = ns->read_landed(off, elsewhere, stale, kPiece);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(*r, 0u) << "off " << off;
  }
}

}  // namespace
}  // namespace physr::sim::detail
