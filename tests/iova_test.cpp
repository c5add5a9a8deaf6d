#include "physr/iova.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <map>
#include <random>

namespace physr {
namespace {

std::unique_ptr<IovaAllocator> make(bool caching, bool check = true, uint64_t end = uint64_t{1} << 40) {
  auto a = IovaAllocator::create(IovaOptions{.granule = 4096, .start = 4096, .end = end, .caching = caching, .check = check});
  EXPECT_TRUE(a.has_value());
  return std::move(a).value();
}

uint64_t reserved(uint64_t bytes) {
  const uint64_t g = (bytes + 4095) / 4096;
  return g < 32 ? std::bit_ceil(g) : g;
}

TEST(IovaTest, TopDownSizeAlignedLikeLinux) {
  auto a = make(false);
  const uint64_t limit = uint64_t{1} << 32, p = 4096;  // a 32-bit DMA mask
  EXPECT_EQ(a->alloc(p, limit)->value(), limit - p);
  EXPECT_EQ(a->alloc(3 * p, limit)->value(), limit - 8 * p);  // 3 -> 4 granules, aligned to 4
  EXPECT_EQ(a->alloc(2 * p, limit)->value(), limit - 4 * p);  // the highest free aligned pair
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 32 * p);
  // 40 granules, aligned to 64: physr takes the highest wholly free 64-block (Linux would
  // also accept the partly used window at limit - 64, whose first 40 granules are free)...
  EXPECT_EQ(a->alloc(40 * p, limit)->value(), limit - 128 * p);
  // ...and frees its unused tail [limit - 88, limit - 64) at once: once the free 16-blocks
  // above it are taken, the next 16-granule request lands in that tail.
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 48 * p);
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 64 * p);
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 80 * p);
}

TEST(IovaTest, RandomAllocFreeNeverOverlapsAndReturnsEverything) {
  // Without caching; with caching and check mode; with caching alone (the inline fast paths).
  for (auto [caching, check] : {std::pair{false, true}, std::pair{true, true}, std::pair{true, false}}) {
    std::mt19937_64 rng(caching ? 7 : 8);
    auto a = make(caching, check, uint64_t{1} << 36);
    const uint64_t total = ((uint64_t{1} << 36) - 4096) / 4096;
    std::map<uint64_t, uint64_t> live;  // iova -> bytes
    for (int step = 0; step < 30000; ++step) {
      if (live.empty() || rng() % 3 != 0) {
        const uint64_t bytes = (rng() % 4 == 0) ? (1 + rng() % 300) * 4096 : (1 + rng() % 8192);
        const uint64_t limit = rng() % 4 == 0 ? uint64_t{1} << 32 : uint64_t{1} << 36;
        auto r = a->alloc(bytes, limit);
        ASSERT_TRUE(r.has_value()) << r.error().to_string();
        const uint64_t iova = r->value(), g = reserved(bytes);
        ASSERT_EQ(iova % (std::bit_ceil(g) * 4096), 0u) << "alignment";
        ASSERT_LE(iova + g * 4096, limit);
        ASSERT_GE(iova, 4096u);
        auto next = live.lower_bound(iova);
        if (next != live.end()) {
          ASSERT_LE(iova + g * 4096, next->first) << "overlaps the next allocation";
        }
        if (next != live.begin()) {
          auto prev = std::prev(next);
          ASSERT_LE(prev->first + reserved(prev->second) * 4096, iova) << "overlaps the previous allocation";
        }
        live[iova] = bytes;
      } else {
        auto it = std::next(live.begin(), static_cast<long>(rng() % live.size()));
        ASSERT_TRUE(a->free(DmaAddr(it->first), it->second).has_value());
        live.erase(it);
      }
    }
    for (const auto& [iova, bytes] : live) ASSERT_TRUE(a->free(DmaAddr(iova), bytes).has_value());
    a->flush_caches();
    const IovaStats s = a->stats();
    EXPECT_EQ(s.free_granules, total) << "caching " << caching << " check " << check;
    EXPECT_EQ(s.cached_granules, 0u);
  }
}

TEST(IovaTest, CachedSizesHitMagazinesAndComeBackLifo) {
  auto a = make(true, false);
  const uint64_t limit = uint64_t{1} << 40;
  auto x = a->alloc(8192, limit);
  ASSERT_TRUE(x.has_value());
  const uint64_t tree_allocs = a->stats().tree_allocs;
  ASSERT_TRUE(a->free(*x, 8192).has_value());
  for (int i = 0; i < 1000; ++i) {
    auto y = a->alloc(8192, limit);
    ASSERT_EQ(*y, *x);  // served from this thread's magazine, last in first out
    ASSERT_TRUE(a->free(*y, 8192).has_value());
  }
  EXPECT_EQ(a->stats().tree_allocs, tree_allocs);
  EXPECT_EQ(a->stats().cached_granules, 2u);
  // A cached entry above a lower limit is skipped, not handed out.
  auto low = a->alloc(8192, uint64_t{1} << 32);
  ASSERT_TRUE(low.has_value());
  EXPECT_LT(low->value(), uint64_t{1} << 32);
}

TEST(IovaTest, ManyFreesOverflowMagazinesIntoDepotAndTree) {
  auto a = make(true);
  std::vector<DmaAddr> v;
  for (int i = 0; i < 127 * 40; ++i) v.push_back(*a->alloc(4096, uint64_t{1} << 40));
  for (DmaAddr x : v) ASSERT_TRUE(a->free(x, 4096).has_value());
  // 2 magazines per thread + 32 in the depot hold at most 34 x 127; the rest went back.
  EXPECT_LE(a->stats().cached_granules, 34u * 127);
  a->flush_caches();
  EXPECT_EQ(a->stats().cached_granules, 0u);
  EXPECT_EQ(a->stats().free_granules, (uint64_t{1} << 28) - 1);
}

TEST(IovaTest, ExhaustionIsEnomemAndLeavesStateIntact) {
  auto a = make(false, true, uint64_t{1} << 20);  // 255 granules
  std::vector<DmaAddr> v;
  for (;;) {
    auto r = a->alloc(4096 * 16, uint64_t{1} << 20);
    if (!r) {
      EXPECT_EQ(r.error().code, ENOMEM);
      break;
    }
    v.push_back(*r);
  }
  EXPECT_EQ(v.size(), 15u);  // 16 blocks of 16 minus the one holding granule 0
  EXPECT_TRUE(a->alloc(4096, uint64_t{1} << 20).has_value());
  EXPECT_EQ(a->alloc(4096, 4096).error().code, ENOMEM);  // below the start of the space
}

TEST(IovaTest, BadFreesAreDetected) {
  for (bool check : {true, false}) {
    auto a = make(false, check);
    auto x = a->alloc(8 * 4096, uint64_t{1} << 40);
    ASSERT_TRUE(x.has_value());
    ASSERT_TRUE(a->free(*x, 8 * 4096).has_value());
    auto twice = a->free(*x, 8 * 4096);
    ASSERT_FALSE(twice.has_value()) << "check " << check;
    EXPECT_EQ(twice.error().code, EINVAL);
    EXPECT_EQ(a->free(DmaAddr(0x5000), 4096).error().code, EINVAL);  // never allocated
    EXPECT_EQ(a->free(DmaAddr(0x5001), 4096).error().code, EINVAL);  // unaligned
    EXPECT_EQ(a->free(DmaAddr(uint64_t{1} << 41), 4096).error().code, EINVAL);  // outside
  }
  auto c = make(true, true);
  auto y = c->alloc(4096, uint64_t{1} << 40);
  EXPECT_EQ(c->free(*y, 3 * 4096).error().code, EINVAL);  // wrong size
  ASSERT_TRUE(c->free(*y, 4096).has_value());
  auto again = c->free(*y, 4096);  // would land in a magazine: check mode still catches it
  ASSERT_FALSE(again.has_value());
  EXPECT_NE(again.error().message.find("double free"), std::string::npos);
}

// Sizes above the magazines' 32 granules: a freed block is kept whole and handed back to
// the next request of its size; it still counts as free, double frees and partial frees of
// it are caught, and it is coalesced when a larger request needs it.
TEST(IovaTest, LargeBlocksAreReusedWholeAndCoalescedWhenNeeded) {
  for (bool caching : {false, true}) {
    auto a = make(caching, /*check=*/false, uint64_t{1} << 30);
    const uint64_t total = ((uint64_t{1} << 30) - 4096) / 4096, big = 256 * 4096;
    auto x = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(x.has_value());
    ASSERT_TRUE(a->free(*x, big).has_value());
    EXPECT_EQ(a->stats().free_granules, total);  // the whole block counts as free
    auto y = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(y.has_value());
    EXPECT_EQ(*y, *x);  // the same block, top-down as before
    EXPECT_EQ(a->alloc(big, x->value()).value().value(), x->value() - big);  // a lower limit skips it
    ASSERT_TRUE(a->free(*y, big).has_value());
    EXPECT_EQ(a->free(*y, big).error().code, EINVAL);  // double free of the kept block
    ASSERT_TRUE(a->free(DmaAddr(x->value() - big), big).has_value());
    // A partial free of a block makes its later whole free a detected double free.
    auto z = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(z.has_value());
    ASSERT_TRUE(a->free(*z, big / 2).has_value());
    EXPECT_EQ(a->free(*z, big).error().code, EINVAL);
    ASSERT_TRUE(a->free(DmaAddr(z->value() + big / 2), big / 2).has_value());
    a->flush_caches();
    EXPECT_EQ(a->stats().free_granules, total) << "caching " << caching;
  }
  // Two kept halves of the only large block coalesce when a request needs the whole.
  auto b = IovaAllocator::create(IovaOptions{.granule = 4096, .start = 64 * 4096, .end = 128 * 4096, .caching = false, .check = false});
  ASSERT_TRUE(b.has_value());
  auto& a = *b;
  auto lo = a->alloc(32 * 4096, 128 * 4096), hi = a->alloc(32 * 4096, 128 * 4096);
  ASSERT_TRUE(lo.has_value() && hi.has_value());
  EXPECT_EQ(a->alloc(4096, 128 * 4096).error().code, ENOMEM);  // full
  ASSERT_TRUE(a->free(*lo, 32 * 4096).has_value());
  ASSERT_TRUE(a->free(*hi, 32 * 4096).has_value());
  auto all = a->alloc(64 * 4096, 128 * 4096);
  ASSERT_TRUE(all.has_value()) << all.error().to_string();
  EXPECT_EQ(all->value(), 64u * 4096);
}

TEST(IovaTest, BadOptionsAndSizes) {
  EXPECT_EQ(IovaAllocator::create(IovaOptions{.granule = 3000}).error().code, EINVAL);
  EXPECT_EQ(IovaAllocator::create(IovaOptions{.start = 8192, .end = 8192}).error().code, EINVAL);
  EXPECT_EQ(IovaAllocator::create(IovaOptions{.start = 100}).error().code, EINVAL);
  auto a = make(true);
  EXPECT_EQ(a->alloc(0, uint64_t{1} << 40).error().code, EINVAL);
  EXPECT_EQ(a->alloc(uint64_t{1} << 41, ~uint64_t{0}).error().code, EINVAL);
}

// Linux reserve_iova(): reserved ranges are never handed out, rounded out to whole granules,
// clipped to the space, overlapping ones merged; everything else still is; a range that
// wraps 2^64 is refused.
TEST(IovaTest, ReservedRangesAreNeverHandedOut) {
  const uint64_t space = uint64_t{1} << 30;  // 1 GiB: 262143 granules from 4 KiB
  const std::vector<DmaSpan> holes = {
      {DmaAddr(0x1000'0800), 0x1000},    // unaligned: granules 0x10000 and 0x10001
      {DmaAddr(0x2000'0000), 0x10'0000}, // 1 MiB
      {DmaAddr(0x2008'0000), 0x10'0000}, // overlaps the previous one
      {DmaAddr(space - 0x2000), 0x10'0000},  // partly past the end
      {DmaAddr(0), 0x3000},              // partly below the start
  };
  auto a = std::move(IovaAllocator::create(IovaOptions{.start = 4096, .end = space, .caching = false, .check = true, .reserved = holes})).value();
  const auto hit = [&](uint64_t addr, uint64_t len) {
    for (const DmaSpan& h : holes) {
      const uint64_t lo = h.base.value() & ~uint64_t{4095}, hi = (h.base.value() + h.size + 4095) & ~uint64_t{4095};
      if (addr < hi && lo < addr + len) return true;
    }
    return false;
  };
  uint64_t got = 0;
  std::vector<DmaAddr> all;
  for (;;) {
    auto r = a->alloc(4096, space);
    if (!r) {
      EXPECT_EQ(r.error().code, ENOMEM);
      break;
    }
    EXPECT_FALSE(hit(r->value(), 4096)) << format_hex(r->value());
    all.push_back(*r);
    ++got;
  }
  // Every granule but the reserved ones: 2 + 384 (the merged 1.5 MiB) + 2 at the end + 2 at
  // the start (granule 0 is outside the space anyway).
  const uint64_t total = space / 4096 - 1;
  EXPECT_EQ(got, total - (2 + 384 + 2 + 2));
  for (DmaAddr x : all) ASSERT_TRUE(a->free(x, 4096).has_value());
  // A reservation of the whole space leaves nothing; one that wraps is EINVAL.
  auto none = std::move(IovaAllocator::create(IovaOptions{.end = space, .reserved = {{DmaAddr(0), space}}})).value();
  EXPECT_EQ(none->alloc(4096, space).error().code, ENOMEM);
  auto wrap = IovaAllocator::create(IovaOptions{.reserved = {{DmaAddr(~uint64_t{0} - 4095), 8192}}});
  ASSERT_FALSE(wrap.has_value());
  EXPECT_EQ(wrap.error().code, EINVAL);
  EXPECT_NE(wrap.error().message.find("runs past 2^64"), std::string::npos);
}

}  // namespace
}  // namespace physr
