#include "physr/range.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace physr {
namespace {

constexpr uint64_t kNone = ~uint64_t{0};

// --- naive references ------------------------------------------------------------------

uint64_t cap_at(uint64_t addr, const SegmentLimits& l) {
  uint64_t cap = l.max_segment;
  if (l.boundary_mask != kNone) cap = std::min(cap, (l.boundary_mask + 1) - (addr & l.boundary_mask));
  return cap;
}

// Page by page, the way a reader of sg_alloc_append_table_from_pages() would write it.
std::vector<PhysRange> naive_from_pfns(const std::vector<uint64_t>& pfns, const std::vector<ProviderId>& prov,
                                       SegmentLimits l) {
  l.max_segment &= ~(kPageSize - 1);
  std::vector<PhysRange> out;
  std::vector<ProviderId> full;
  for (size_t i = 0; i < pfns.size(); ++i) {
    const uint64_t a = pfns[i] << 12;
    const ProviderId p = prov.empty() ? 0 : prov[i];
    if (!out.empty() && l.merge) {
      PhysRange& t = out.back();
      if (full.back() == p && t.base.value() + t.size == a && t.size + kPageSize <= cap_at(t.base.value(), l)) {
        t.size += kPageSize;
        continue;
      }
    }
    out.push_back({PhysAddr(a), kPageSize, provider_tag(p)});
    full.push_back(p);
  }
  return out;
}

std::vector<PhysRange> to_vec(const RangeList& l) { return {l.begin(), l.end()}; }
std::vector<PhysRange> to_vec(const RangeSlice& s) { return {s.begin(), s.end()}; }

std::vector<PhysRange> naive_slice(const std::vector<PhysRange>& v, uint64_t off, uint64_t len) {
  std::vector<PhysRange> out;
  uint64_t acc = 0;
  for (const PhysRange& r : v) {
    const uint64_t lo = std::max(acc, off), hi = std::min(acc + r.size, off + len);
    if (lo < hi) out.push_back({r.base + (lo - acc), hi - lo, r.provider});
    acc += r.size;
  }
  return out;
}

// (byte address, provider) of every 4 KiB page of a page-granular list, in order.
std::vector<std::pair<uint64_t, ProviderId>> pages_of(const RangeList& l) {
  std::vector<std::pair<uint64_t, ProviderId>> out;
  for (const PhysRange r : l)
    for (uint64_t o = 0; o < r.size; o += kPageSize) out.emplace_back(r.base.value() + o, r.provider);
  return out;
}

void expect_limits(const RangeList& l, const SegmentLimits& lim) {
  for (const PhysRange r : l) {
    ASSERT_GT(r.size, 0u);
    ASSERT_LE(r.size, lim.max_segment);
    if (lim.boundary_mask != kNone) {
      ASSERT_EQ(r.base.value() & ~lim.boundary_mask, (r.base.value() + r.size - 1) & ~lim.boundary_mask)
          << "range crosses a boundary";
    }
  }
}

void expect_index_consistent(const RangeList& l) {
  size_t i = 0;
  uint64_t total = 0;
  for (const PhysRange r : l) {
    ASSERT_LT(i, l.size());
    ASSERT_EQ(l[i], r) << "operator[] disagrees with iteration at " << i;
    total += r.size;
    ++i;
  }
  ASSERT_EQ(i, l.size());
  ASSERT_EQ(total, l.total_bytes());
}

struct Gen {
  std::mt19937_64 rng;
  explicit Gen(uint64_t seed) : rng(seed) {}
  uint64_t below(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); }

  // Runs of contiguous pfns with jumps, providers from a small set including ids beyond the
  // direct range, so runs of different providers sit physically next to each other.
  void pfns(size_t n, std::vector<uint64_t>& pfns, std::vector<ProviderId>& prov, bool with_prov) {
    static const ProviderId ids[] = {0, 1, 2, 509, 510, 511, 700, 100000};
    pfns.clear();
    prov.clear();
    uint64_t p = below(1 << 20);
    ProviderId cur = 0;
    while (pfns.size() < n) {
      size_t run = 1 + below(below(4) == 0 ? 40000 : 12);
      const int jump = static_cast<int>(below(4));
      if (jump == 0) p = below(uint64_t{1} << 41);
      else if (jump == 1) p += below(5);
      if (with_prov && below(3) == 0) cur = ids[below(8)];
      for (size_t k = 0; k < run && pfns.size() < n; ++k) {
        pfns.push_back(p++);
        if (with_prov) prov.push_back(cur);
      }
    }
  }

  SegmentLimits limits(bool page_granular) {
    SegmentLimits l;
    switch (below(4)) {
      case 0: break;
      case 1: l.max_segment = (1 + below(64)) * (page_granular ? kPageSize : 1 + below(8192)); break;
      case 2: l.max_segment = (1 + below(70000)) * kPageSize; break;
      default: l.max_segment = 1 + below(uint64_t{1} << 32); if (page_granular) l.max_segment += kPageSize;
    }
    if (below(2)) l.boundary_mask = (uint64_t{1} << (12 + below(20))) - 1;
    l.merge = below(8) != 0;
    return l;
  }

  std::vector<PhysRange> pieces(size_t n) {
    std::vector<PhysRange> v;
    uint64_t a = below(uint64_t{1} << 40);
    for (size_t i = 0; i < n; ++i) {
      if (below(3) == 0) a = below(uint64_t{1} << 52);
      if (below(2)) a &= ~(kPageSize - 1);
      uint64_t len = below(2) ? (1 + below(40)) * kPageSize : 1 + below(3 * kPageSize);
      if (below(50) == 0) len = (1 + below(300)) * MiB;
      v.push_back({PhysAddr(a), len, below(4) == 0 ? static_cast<ProviderId>(below(1000)) : 0});
      a += len;
    }
    return v;
  }
};

// --- builders ---------------------------------------------------------------------------

TEST(RangeListTest, FromPfnsMatchesNaiveReference) {
  Gen g(1);
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> prov;
  for (int iter = 0; iter < 400; ++iter) {
    const bool with_prov = iter % 2;
    g.pfns(1 + g.below(iter < 300 ? 300 : 100000), pfns, prov, with_prov);
    const SegmentLimits lim = g.limits(true);
    auto l = RangeList::from_pfns(pfns, prov, lim);
    ASSERT_TRUE(l.has_value()) << l.error().to_string();
    ASSERT_EQ(to_vec(*l), naive_from_pfns(pfns, prov, lim)) << "iteration " << iter;
    expect_limits(*l, SegmentLimits{lim.max_segment & ~(kPageSize - 1), lim.boundary_mask, lim.merge});
    expect_index_consistent(*l);
  }
}

TEST(RangeListTest, OutputCoversExactlyTheInputPagesInOrder) {
  Gen g(2);
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> prov;
  for (int iter = 0; iter < 200; ++iter) {
    g.pfns(1 + g.below(2000), pfns, prov, true);
    auto l = RangeList::from_pfns(pfns, prov, g.limits(true));
    ASSERT_TRUE(l.has_value());
    auto pages = pages_of(*l);
    ASSERT_EQ(pages.size(), pfns.size());
    for (size_t i = 0; i < pfns.size(); ++i) {
      ASSERT_EQ(pages[i].first, pfns[i] << 12);
      ASSERT_EQ(pages[i].second, provider_tag(prov[i]));
    }
    EXPECT_EQ(l->total_bytes(), pfns.size() * kPageSize);
  }
}

TEST(RangeListTest, NeverMergesAcrossProviders) {
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> prov;
  for (uint64_t i = 0; i < 64; ++i) {
    pfns.push_back(0x1000 + i);
    prov.push_back(i % 2 ? 3 : 0);
  }
  auto l = RangeList::from_pfns(pfns, prov);
  ASSERT_TRUE(l.has_value());
  EXPECT_EQ(l->size(), 64u);
  // Two distinct providers beyond the direct range share the tag 511 yet never merge.
  prov.assign(64, 0);
  for (uint64_t i = 0; i < 64; ++i) prov[i] = i < 32 ? 600 : 601;
  l = RangeList::from_pfns(pfns, prov);
  ASSERT_TRUE(l.has_value());
  ASSERT_EQ(l->size(), 2u);
  EXPECT_EQ((*l)[0].provider, kIndirectProvider);
  EXPECT_EQ((*l)[1].provider, kIndirectProvider);
  EXPECT_EQ((*l)[0].size, 32 * kPageSize);
}

TEST(RangeListTest, ContiguousInputMergesToOneCompactWord) {
  std::vector<uint64_t> pfns(1000);
  for (size_t i = 0; i < pfns.size(); ++i) pfns[i] = 0x12345 + i;
  auto l = RangeList::from_pfns(pfns);
  ASSERT_TRUE(l.has_value());
  ASSERT_EQ(l->size(), 1u);
  EXPECT_EQ((*l)[0], (PhysRange{PhysAddr(0x12345000), 1000 * kPageSize, kHostMemory}));
  EXPECT_EQ(l->encoded_bytes(), 8u);
}

TEST(RangeListTest, EncodingSizes) {
  RangeList l;
  ASSERT_TRUE(l.append({PhysAddr(0x1000), 64 * MiB}).has_value());  // largest compact range
  ASSERT_TRUE(l.append({PhysAddr(0x100000000), 4096, 7}).has_value());
  EXPECT_EQ(l.encoded_bytes(), 16u);
  RangeList u;
  ASSERT_TRUE(u.append({PhysAddr(0x1234), 100}).has_value());
  ASSERT_TRUE(u.append({PhysAddr(0x9000), 64 * MiB + 4096}).has_value());  // too long for compact
  EXPECT_EQ(u.encoded_bytes(), 32u);  // all extended: no index
  ASSERT_TRUE(u.append({PhysAddr(0x40000000), 4096}).has_value());  // now mixed: index appears
  EXPECT_EQ(u.encoded_bytes(), 40u + 16u);
  expect_index_consistent(u);
  // A page above 4 PiB cannot be compact (40-bit pfn field) but is representable.
  RangeList high;
  ASSERT_TRUE(high.append({PhysAddr(uint64_t{1} << 53), 4096}).has_value());
  EXPECT_EQ(high.encoded_bytes(), 16u);
  EXPECT_EQ(high[0].base.value(), uint64_t{1} << 53);
}

TEST(RangeListTest, RangeEndingAtPhysicalLimitIsAcceptedAndOneByteMoreIsNot) {
  RangeList l;
  ASSERT_TRUE(l.append({PhysAddr(kRangeAddrLimit - 4096), 4096}).has_value());
  EXPECT_EQ(l[0].base.value() + l[0].size, kRangeAddrLimit);
  auto bad = l.append({PhysAddr(kRangeAddrLimit - 4096), 4097});
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, ERANGE);
  EXPECT_EQ(l.size(), 1u);
  const uint64_t last_pfn = (kRangeAddrLimit >> 12) - 1;
  std::vector<uint64_t> ok{last_pfn}, over{last_pfn, last_pfn + 1};
  EXPECT_TRUE(RangeList::from_pfns(ok).has_value());
  auto e = RangeList::from_pfns(over);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, ERANGE);
  EXPECT_NE(e.error().message.find("pfn[1]"), std::string::npos) << e.error().message;
}

TEST(RangeListTest, AppendPfnsEqualsBuildingAtOnce) {
  Gen g(3);
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> prov;
  for (int iter = 0; iter < 300; ++iter) {
    const bool with_prov = iter % 2;
    g.pfns(2 + g.below(3000), pfns, prov, with_prov);
    const SegmentLimits lim = g.limits(true);
    auto whole = RangeList::from_pfns(pfns, prov, lim);
    ASSERT_TRUE(whole.has_value());
    RangeList parts;
    size_t at = 0;
    while (at < pfns.size()) {
      const size_t k = std::min(pfns.size() - at, 1 + g.below(200));
      std::span<const ProviderId> ps = with_prov ? std::span<const ProviderId>(prov).subspan(at, k)
                                                  : std::span<const ProviderId>();
      ASSERT_TRUE(parts.append_pfns(std::span<const uint64_t>(pfns).subspan(at, k), ps, lim).has_value());
      at += k;
    }
    ASSERT_EQ(parts, *whole) << "iteration " << iter;
    expect_index_consistent(parts);
  }
}

TEST(RangeListTest, FromRangesMergesSplitsAndCoversInput) {
  Gen g(4);
  for (int iter = 0; iter < 300; ++iter) {
    auto pieces = g.pieces(1 + g.below(300));
    const SegmentLimits lim = g.limits(false);
    auto l = RangeList::from_ranges(pieces, lim);
    ASSERT_TRUE(l.has_value()) << l.error().to_string();
    expect_limits(*l, lim);
    expect_index_consistent(*l);
    // Byte coverage in order: walk both sequences as streams of (addr, provider tag).
    size_t pi = 0;
    uint64_t po = 0;
    for (const PhysRange r : *l) {
      uint64_t done = 0;
      while (done < r.size) {
        ASSERT_LT(pi, pieces.size());
        const PhysRange& p = pieces[pi];
        ASSERT_EQ(r.base.value() + done, p.base.value() + po);
        ASSERT_EQ(r.provider, provider_tag(p.provider));
        const uint64_t step = std::min(r.size - done, p.size - po);
        done += step;
        po += step;
        if (po == p.size) { ++pi; po = 0; }
      }
    }
    ASSERT_EQ(pi, pieces.size());
    auto rt = RangeList::decode(l->words());
    ASSERT_TRUE(rt.has_value()) << rt.error().to_string();
    ASSERT_EQ(*rt, *l);
  }
}

TEST(RangeListTest, FailedAppendLeavesListUnchanged) {
  Gen g(5);
  for (int iter = 0; iter < 100; ++iter) {
    auto l = RangeList::from_ranges(g.pieces(1 + g.below(200)));
    ASSERT_TRUE(l.has_value());
    const RangeList before = *l;
    // Contiguous with the tail (so a merge starts) and then a pfn past the limit.
    const PhysRange t = (*l)[l->size() - 1];
    std::vector<uint64_t> pfns;
    const uint64_t start = (t.base.value() + t.size + kPageSize - 1) >> 12;
    for (int k = 0; k < 50; ++k) pfns.push_back(start + static_cast<uint64_t>(k));
    pfns.push_back(uint64_t{1} << 50);
    auto r = l->append_pfns(pfns);
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, ERANGE);
    ASSERT_EQ(*l, before);
    expect_index_consistent(*l);
    // Still appendable after the failure.
    ASSERT_TRUE(l->append_pfns(std::span<const uint64_t>(pfns).first(50)).has_value());
    expect_index_consistent(*l);
  }
}

TEST(RangeListTest, BadInputIsRejectedWithClearErrors) {
  std::vector<uint64_t> pfns{1, 2, 3};
  std::vector<ProviderId> two{0, 0};
  auto e = RangeList::from_pfns(pfns, two);
  ASSERT_FALSE(e.has_value());
  EXPECT_EQ(e.error().code, EINVAL);
  EXPECT_NE(e.error().message.find("2 ids for 3 pfns"), std::string::npos);
  e = RangeList::from_pfns(pfns, {}, SegmentLimits{.max_segment = 4095});
  ASSERT_FALSE(e.has_value());
  EXPECT_NE(e.error().message.find("max_segment"), std::string::npos);
  e = RangeList::from_pfns(pfns, {}, SegmentLimits{.boundary_mask = 0x1800});
  ASSERT_FALSE(e.has_value());
  EXPECT_NE(e.error().message.find("boundary_mask"), std::string::npos);
  e = RangeList::from_pfns(pfns, {}, SegmentLimits{.boundary_mask = 0x7ff});
  ASSERT_FALSE(e.has_value());
  std::vector<PhysRange> zero{{PhysAddr(0x1000), 10}, {PhysAddr(0x2000), 0}};
  e = RangeList::from_ranges(zero);
  ASSERT_FALSE(e.has_value());
  EXPECT_NE(e.error().message.find("range 1"), std::string::npos);
  std::vector<PhysRange> inval{{PhysAddr(0x1000), 10, kInvalidProvider}};
  EXPECT_FALSE(RangeList::from_ranges(inval).has_value());
  RangeList l;
  EXPECT_EQ(l.at(0).error().code, ERANGE);
  EXPECT_EQ(l.slice(0, 1).error().code, ERANGE);
  EXPECT_TRUE(RangeList::from_pfns({}).has_value());
}

TEST(RangeListTest, BoundaryAndMaxSegmentSplitExactly) {
  // 8 pages from 0x3000 with a 16 KiB boundary: [0x3000,0x4000) [0x4000,0x8000) [0x8000,0xb000)
  std::vector<uint64_t> pfns{3, 4, 5, 6, 7, 8, 9, 10};
  auto l = RangeList::from_pfns(pfns, {}, SegmentLimits{.boundary_mask = 0x3fff});
  ASSERT_TRUE(l.has_value());
  std::vector<PhysRange> want{{PhysAddr(0x3000), 0x1000, 0}, {PhysAddr(0x4000), 0x4000, 0}, {PhysAddr(0x8000), 0x3000, 0}};
  EXPECT_EQ(to_vec(*l), want);
  l = RangeList::from_pfns(pfns, {}, SegmentLimits{.max_segment = 0x3000});
  ASSERT_TRUE(l.has_value());
  want = {{PhysAddr(0x3000), 0x3000, 0}, {PhysAddr(0x6000), 0x3000, 0}, {PhysAddr(0x9000), 0x2000, 0}};
  EXPECT_EQ(to_vec(*l), want);
  // Not page multiple: aligned down to 8 KiB as Linux does.
  l = RangeList::from_pfns(pfns, {}, SegmentLimits{.max_segment = 0x2fff});
  ASSERT_TRUE(l.has_value());
  EXPECT_EQ(l->size(), 4u);
}

// --- operations -------------------------------------------------------------------------

TEST(RangeListTest, SlicesEqualNaiveResult) {
  Gen g(6);
  for (int iter = 0; iter < 200; ++iter) {
    auto l = RangeList::from_ranges(g.pieces(1 + g.below(100)), g.limits(false));
    ASSERT_TRUE(l.has_value());
    const auto v = to_vec(*l);
    for (int q = 0; q < 20; ++q) {
      const uint64_t off = g.below(l->total_bytes() + 1);
      const uint64_t len = g.below(l->total_bytes() - off + 1);
      auto s = l->slice(off, len);
      ASSERT_TRUE(s.has_value());
      const auto want = naive_slice(v, off, len);
      ASSERT_EQ(to_vec(*s), want);
      EXPECT_EQ(s->size(), want.size());
      EXPECT_EQ(s->total_bytes(), len);
      EXPECT_EQ(to_vec(s->to_list()), want);
    }
    // Whole list and the boundaries.
    EXPECT_EQ(to_vec(*l->slice(0, l->total_bytes())), v);
    EXPECT_TRUE(l->slice(l->total_bytes(), 0)->empty());
    EXPECT_EQ(l->slice(l->total_bytes(), 1).error().code, ERANGE);
    EXPECT_EQ(l->slice(1, l->total_bytes()).error().code, ERANGE);
  }
}

TEST(RangeListTest, SplitRespectsLimitsAndKeepsBytes) {
  Gen g(7);
  for (int iter = 0; iter < 200; ++iter) {
    auto l = RangeList::from_ranges(g.pieces(1 + g.below(100)));
    ASSERT_TRUE(l.has_value());
    SegmentLimits lim = g.limits(false);
    auto s = l->split(lim);
    ASSERT_TRUE(s.has_value());
    expect_limits(*s, lim);
    expect_index_consistent(*s);
    EXPECT_EQ(s->total_bytes(), l->total_bytes());
    EXPECT_EQ(to_vec(*s->slice(0, s->total_bytes())), naive_slice(to_vec(*s), 0, s->total_bytes()));
    // Splitting an already split list changes nothing.
    EXPECT_EQ(*s->split(lim), *s);
  }
}

TEST(RangeListTest, ConcatWithoutLimitsEqualsBuildingAtOnce) {
  Gen g(8);
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> prov;
  for (int iter = 0; iter < 200; ++iter) {
    g.pfns(2 + g.below(1000), pfns, prov, true);
    // Only direct ids here: an indirect id's full value is unknown to a list read back.
    for (auto& p : prov) p = p > kMaxDirectProvider ? 9 : p;
    const size_t cut = 1 + g.below(pfns.size() - 1);
    std::span<const uint64_t> ps(pfns);
    std::span<const ProviderId> pv(prov);
    auto a = RangeList::from_pfns(ps.first(cut), pv.first(cut));
    auto b = RangeList::from_pfns(ps.subspan(cut), pv.subspan(cut));
    auto all = RangeList::from_pfns(pfns, prov);
    auto c = RangeList::concat(*a, *b);
    ASSERT_TRUE(c.has_value());
    ASSERT_EQ(*c, *all);
    // Self-append doubles the bytes.
    RangeList d = *a;
    ASSERT_TRUE(d.append(d).has_value());
    EXPECT_EQ(d.total_bytes(), 2 * a->total_bytes());
  }
}

TEST(RangeListTest, DecodeRejectsMalformedWords) {
  using namespace detail::enc;
  const uint64_t ext = kExtFlag | 0x1234;
  std::vector<uint64_t> w{ext};
  auto r = RangeList::decode(w);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("word 0"), std::string::npos);
  w = {ext, 0};
  EXPECT_FALSE(RangeList::decode(w).has_value());
  w = {kExtFlag | (kRangeAddrLimit - 16), 17};
  EXPECT_FALSE(RangeList::decode(w).has_value());
  w = {kExtFlag | 0x1000, 0x1000};  // should have been compact
  r = RangeList::decode(w);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("non-canonical"), std::string::npos);
  w = {compact_word(0x5000, 0x2000, 3), kExtFlag | 0x1001, 10, compact_word(0x9000, 0x1000, 0)};
  r = RangeList::decode(w);
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[1], (PhysRange{PhysAddr(0x1001), 10, 0}));
  EXPECT_EQ((*r)[2], (PhysRange{PhysAddr(0x9000), 0x1000, 0}));
}

TEST(RangeListTest, MergeThatTurnsCompactTailExtendedKeepsIndexRight) {
  RangeList l;
  for (int i = 0; i < 130; ++i) ASSERT_TRUE(l.append({PhysAddr(uint64_t(i) * 0x100000), 4096}).has_value());
  ASSERT_TRUE(l.append({PhysAddr(0x9000000), 100}).has_value());  // mixed from here
  ASSERT_TRUE(l.append({PhysAddr(0x9000000 + 100), 3996}).has_value());  // merge: tail back to compact
  ASSERT_TRUE(l.append({PhysAddr(0x9001000), 64 * MiB}).has_value());  // merge: tail grows past compact
  expect_index_consistent(l);
  EXPECT_EQ(l.size(), 131u);
  EXPECT_EQ(l[130], (PhysRange{PhysAddr(0x9000000), 64 * MiB + 4096, 0}));
}

TEST(ScatterlistCostTest, CountsChainEntries) {
  EXPECT_EQ(scatterlist_cost(0, 0).sg_entries, 0u);
  EXPECT_EQ(scatterlist_cost(128, 128).sg_entries, 128u);
  EXPECT_EQ(scatterlist_cost(129, 129).sg_entries, 130u);
  EXPECT_EQ(scatterlist_cost(255, 255).sg_entries, 256u);
  EXPECT_EQ(scatterlist_cost(256, 256).sg_entries, 258u);
  auto c = scatterlist_cost(10, 1000);
  EXPECT_EQ(c.sg_bytes, 320u);
  EXPECT_EQ(c.struct_page_bytes, 64000u);
  EXPECT_EQ(c.phys_vec_bytes, 160u);
}

}  // namespace
}  // namespace physr
