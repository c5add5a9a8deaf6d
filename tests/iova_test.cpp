#include "physr/iova.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <map>
#include <random>
#include <thread>

#include "support/kernel_iova.hpp"

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

// Linux __alloc_and_insert_iova_range(): the walk goes down from the last allocation
// (cached32_node below 4 GiB), so a gap above it waits until a free there moves the cached
// node up (__cached_rbnode_delete_update()).
TEST(IovaTest, TopDownSizeAlignedLikeLinux) {
  auto a = make(false);
  const uint64_t limit = uint64_t{1} << 32, p = 4096;  // a 32-bit DMA mask
  EXPECT_EQ(a->alloc(p, limit)->value(), limit - p);
  EXPECT_EQ(a->alloc(3 * p, limit)->value(), limit - 8 * p);  // 3 -> 4 granules, aligned to 4
  // Not the free pair at limit - 4: down from the last allocation.
  EXPECT_EQ(a->alloc(2 * p, limit)->value(), limit - 10 * p);
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 32 * p);
  // 40 granules, aligned to 64: exactly 40 stay allocated.
  EXPECT_EQ(a->alloc(40 * p, limit)->value(), limit - 128 * p);
  EXPECT_EQ(a->alloc(16 * p, limit)->value(), limit - 144 * p);
  // A free above the cached node moves it to the next node up: the pair comes back.
  ASSERT_TRUE(a->free(DmaAddr(limit - 10 * p), 2 * p).has_value());
  EXPECT_EQ(a->alloc(2 * p, limit)->value(), limit - 10 * p);
  EXPECT_EQ(a->alloc(p, limit)->value(), limit - 11 * p);
  // A 64-bit limit starts from its own cached node: the top of the space.
  EXPECT_EQ(a->alloc(p, uint64_t{1} << 40)->value(), (uint64_t{1} << 40) - p);
}

// Linux drivers/iommu/iova.c __alloc_and_insert_iova_range() (the walk down from
// cached_node / cached32_node, the retry above it from iova_find_limit(), the
// max32_alloc_size fast fail), __cached_rbnode_insert_update(), __cached_rbnode_delete_update(),
// reserve_iova(), and with caching alloc_iova_fast() / free_iova_fast() over the rcaches
// (iova_magazine_pop(), the depot, the flush and retry): every address physr hands out is
// the one the transcription in support/kernel_iova.hpp hands out, over random
// reserve/alloc/free sequences, in a space that crosses 4 GiB and in one small enough to
// run out (ENOMEM exactly when Linux fails).
TEST(IovaTest, PlacementMatchesLinuxIovaC) {
  for (uint64_t seed = 1; seed <= 24; ++seed) {
    for (bool caching : {false, true}) {
      std::mt19937_64 rng(seed);
      const uint64_t end = seed % 3 == 0 ? uint64_t{1} << 24 : uint64_t{1} << 36;  // 4096 or 16M granules
      const uint64_t end_pfn = end >> 12;
      std::vector<DmaSpan> holes;
      for (uint64_t i = rng() % 4; i > 0; --i) {
        const uint64_t at = rng() % end, len = 1 + rng() % (end / 64);
        holes.push_back({DmaAddr(at), len});
      }
      auto a = std::move(IovaAllocator::create(IovaOptions{.start = 4096, .end = end, .caching = caching, .check = true,
                                                          .reserved = holes})).value();
      testing::KernelIovaDomain k(12, 1);
      for (const DmaSpan& h : holes) {  // as IovaAllocator::create() rounds and clips them
        const uint64_t lo = std::max<uint64_t>(h.base.value() >> 12, 1), hi = std::min((h.last().value() >> 12) + 1, end_pfn);
        if (lo < hi) k.reserve_iova(lo, hi - 1);
      }
      std::vector<std::pair<uint64_t, uint64_t>> live;  // (iova, bytes)
      for (int step = 0; step < 3000; ++step) {
        const uint64_t r = rng() % 10;
        if (live.empty() || r < 5) {
          const uint64_t g = rng() % 4 == 0 ? 33 + rng() % 300 : 1 + rng() % 40;
          const uint64_t bytes = g * 4096 - rng() % 4096;
          const uint64_t limit = rng() % 3 == 0 ? uint64_t{1} << 32 : rng() % 5 == 0 ? (64 + rng() % end_pfn) << 12 : end;
          const uint64_t limit_pfn = std::min(limit >> 12, end_pfn);
          const uint64_t reserved_g = g < 32 ? std::bit_ceil(g) : g;
          const uint64_t want = caching ? k.alloc_iova_fast(g, limit_pfn - 1) : [&] {
            uint64_t pfn = 0;
            return k.alloc_iova(reserved_g, limit_pfn - 1, &pfn) ? pfn : 0;
          }();
          auto got = a->alloc(bytes, limit);
          if (want == 0) {
            ASSERT_FALSE(got.has_value()) << "seed " << seed << " step " << step << ": Linux fails, physr gave "
                                          << format_hex(got->value());
            ASSERT_EQ(got.error().code, ENOMEM);
            continue;
          }
          ASSERT_TRUE(got.has_value()) << "seed " << seed << " step " << step << ": " << got.error().to_string();
          ASSERT_EQ(got->value(), want << 12) << "seed " << seed << " caching " << caching << " step " << step << " granules "
                                              << g << " limit " << format_hex(limit);
          live.emplace_back(got->value(), bytes);
        } else {
          // Often the newest allocation (the alloc/free/alloc cycle of a DMA map), else any.
          const size_t i = r < 8 ? live.size() - 1 : rng() % live.size();
          const auto [iova, bytes] = live[i];
          live[i] = live.back();
          live.pop_back();
          ASSERT_TRUE(a->free(DmaAddr(iova), bytes).has_value());
          const uint64_t g = (bytes + 4095) / 4096;
          if (caching)
            k.free_iova_fast(iova >> 12, g);
          else
            k.free_iova(iova >> 12);
        }
      }
    }
  }
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

// Linux __iova_rcache_insert() / iova_depot_work_func(): the depot takes every full
// magazine (no MAX_GLOBAL_MAGS cap since Linux 6.7), and its trim returns one magazine per
// run to the tree while it holds more than one per CPU.
TEST(IovaTest, DepotHasNoCapAndIsTrimmedToOneMagazinePerCpu) {
  auto a = std::move(IovaAllocator::create(IovaOptions{.end = uint64_t{1} << 40, .check = true, .depot_delay_ms = 0})).value();
  std::vector<DmaAddr> v;
  for (int i = 0; i < 127 * 40; ++i) v.push_back(*a->alloc(4096, uint64_t{1} << 40));
  const uint64_t total = (uint64_t{1} << 28) - 1;
  for (DmaAddr x : v) ASSERT_TRUE(a->free(x, 4096).has_value());
  // loaded and prev full, the other 38 magazines in the depot: all still cached.
  EXPECT_EQ(a->stats().cached_granules, 127u * 40);
  EXPECT_EQ(a->stats().depot_magazines, 38u);
  EXPECT_EQ(a->stats().free_granules, total - 127 * 40);
  const uint64_t cpus = std::max(1u, std::thread::hardware_concurrency());
  a->run_depot_work();
  EXPECT_EQ(a->stats().depot_magazines, cpus < 38 ? 37u : 38u);
  for (int i = 0; i < 40; ++i) a->run_depot_work();
  EXPECT_EQ(a->stats().depot_magazines, std::min<uint64_t>(38, cpus));
  EXPECT_EQ(a->stats().free_granules, total - 127 * (2 + std::min<uint64_t>(38, cpus)));
  a->flush_caches();
  EXPECT_EQ(a->stats().cached_granules, 0u);
  EXPECT_EQ(a->stats().free_granules, total);
}

// Linux __iova_rcache_get(): `prev` is swapped in only when `loaded` is empty. A loaded
// magazine with entries, none below the limit, sends the request to the tree, though
// `prev` holds one that fits (iova_magazine_pop() searches the loaded magazine only).
TEST(IovaTest, RcacheGetSwapsPrevOnlyWhenLoadedIsEmpty) {
  auto a = make(true, false);
  const uint64_t low_limit = uint64_t{1} << 32, high_limit = uint64_t{1} << 40;
  std::vector<DmaAddr> high;
  for (int i = 0; i < 127; ++i) high.push_back(*a->alloc(4096, high_limit));
  const DmaAddr low = *a->alloc(4096, low_limit);
  ASSERT_LT(low.value(), low_limit);
  ASSERT_TRUE(a->free(low, 4096).has_value());  // loaded: low
  for (DmaAddr x : high) ASSERT_TRUE(a->free(x, 4096).has_value());
  // loaded filled up (low + 126 high), swapped with the empty prev, which took the last:
  // loaded = [high], prev = [low, 126 high].
  const uint64_t tree_allocs = a->stats().tree_allocs;
  auto r = a->alloc(4096, low_limit);
  ASSERT_TRUE(r.has_value());
  EXPECT_LT(r->value(), low_limit);
  EXPECT_NE(*r, low);  // a fresh range from the tree, not the cached one in prev
  EXPECT_EQ(a->stats().tree_allocs, tree_allocs + 1);
  EXPECT_EQ(a->stats().cached_granules, 128u);
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

// Sizes above the magazines' 32 granules go straight to the tree: a freed range comes back
// to the next request of its size (the walk starts at the node above it), a lower limit
// skips it, a double free or a free of another size is refused, and neighbouring freed
// ranges serve a larger request.
TEST(IovaTest, LargeRangesAreReusedAndBadFreesRefused) {
  for (bool caching : {false, true}) {
    auto a = make(caching, /*check=*/false, uint64_t{1} << 30);
    const uint64_t total = ((uint64_t{1} << 30) - 4096) / 4096, big = 256 * 4096;
    auto x = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(x.has_value());
    const uint64_t tree_allocs = a->stats().tree_allocs;
    ASSERT_TRUE(a->free(*x, big).has_value());
    EXPECT_EQ(a->stats().free_granules, total);
    auto y = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(y.has_value());
    EXPECT_EQ(*y, *x);
    EXPECT_EQ(a->stats().tree_allocs, tree_allocs + 1);
    EXPECT_EQ(a->alloc(big, x->value()).value().value(), x->value() - big);  // a lower limit skips it
    ASSERT_TRUE(a->free(*y, big).has_value());
    EXPECT_EQ(a->free(*y, big).error().code, EINVAL);  // double free
    auto z = a->alloc(big, uint64_t{1} << 30);
    ASSERT_TRUE(z.has_value());
    EXPECT_EQ(a->free(*z, big / 2).error().code, EINVAL);  // another size
    ASSERT_TRUE(a->free(*z, big).has_value());
    ASSERT_TRUE(a->free(DmaAddr(x->value() - big), big).has_value());
    a->flush_caches();
    EXPECT_EQ(a->stats().free_granules, total) << "caching " << caching;
  }
  // Two freed halves of a small space serve a request for the whole.
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
