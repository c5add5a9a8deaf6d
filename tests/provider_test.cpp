#include "physr/provider.hpp"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <tuple>
#include <thread>
#include <vector>

namespace physr {
namespace {

ProviderDesc aperture(uint64_t base, uint64_t size, uint8_t dev = 1) {
  ProviderDesc d;
  d.owner = pci::Bdf{0, 3, dev, 0};
  d.phys = PhysSpan{PhysAddr(base), size};
  d.bus_offset = 0x1000'0000'0000;
  return d;
}

// Reference: a sorted vector of (base, size, id), searched linearly.
struct Reference {
  std::vector<std::tuple<uint64_t, uint64_t, ProviderId>> v;
  ProviderId find(uint64_t a) const {
    for (const auto& [b, s, id] : v)
      if (a - b < s) return id;
    return 0;
  }
};

// While its nodes take less than 512 KiB, a registry turns a cluster of more than 4 pieces
// into nodes. Spends that allowance: three 4 KiB apertures a page apart at the start of each
// empty root slot from `first` on (6 pieces: a node at each level), until a root slot takes
// a run instead. Returns the root slots used.
unsigned spend_node_allowance(ProviderRegistry& reg, unsigned first) {
  for (unsigned r = first; r < 1024; ++r) {
    const size_t before = reg.table_bytes();
    for (uint64_t k = 0; k < 3; ++k) EXPECT_TRUE(reg.add(aperture((uint64_t{r} << 42) + k * 8192, 4096, 9)).has_value());
    if (reg.table_bytes() - before < 8192) return r + 1 - first;
  }
  ADD_FAILURE() << "the root slots ran out before the nodes took their allowance";
  return 0;
}

TEST(ProviderRegistryTest, FindMatchesReferenceOnRandomLayouts) {
  std::mt19937_64 rng(5);
  for (int iter = 0; iter < 20; ++iter) {
    ProviderRegistry reg;
    Reference ref;
    // Mixed sizes: tightly packed 4 KiB runs, odd page counts and multi-GiB BARs, sparse
    // over 52 bits.
    uint64_t cursor = (rng() % 1024) << 12;
    for (int k = 0; k < 300; ++k) {
      uint64_t size;
      switch (rng() % 4) {
        case 0: size = 4096; break;
        case 1: size = (1 + rng() % 700) << 12; break;
        case 2: size = (1 + rng() % 64) << 30; break;
        default: size = (1 + rng() % 3) << 21;
      }
      if (rng() % 3 == 0) cursor += (rng() % (uint64_t{1} << 28)) << 12;
      if (cursor + size > (uint64_t{1} << 52)) break;
      auto id = reg.add(aperture(cursor, size));
      ASSERT_TRUE(id.has_value()) << id.error().to_string();
      ref.v.emplace_back(cursor, size, *id);
      cursor += size;
    }
    // Remove a third of them.
    for (size_t k = 0; k < ref.v.size(); k += 3) {
      ASSERT_TRUE(reg.remove(std::get<2>(ref.v[k])).has_value());
      std::get<1>(ref.v[k]) = 0;
    }
    ProviderRegistry::ReadGuard g;
    auto check = [&](uint64_t a) {
      const Provider* p = reg.find(PhysAddr(a));
      ASSERT_EQ(p ? p->id() : 0u, ref.find(a)) << "address " << a;
    };
    for (const auto& [b, s, id] : ref.v) {
      const uint64_t size = s ? s : 4096;
      for (uint64_t a : {b, b + 1, b + size - 1, b + size, b - 1}) check(a);
    }
    for (int q = 0; q < 20000; ++q) check(rng() & ((uint64_t{1} << 52) - 1));
    check(0);
    check((uint64_t{1} << 52) - 1);
    check(uint64_t{1} << 52);
    check(~uint64_t{0});
  }
}

// Clusters of small apertures next to large ones, with gaps, as in the benchmark's mixed
// layout: the slots they share hold runs (sorted pieces, one or two lines per search), so
// the table stays far below the 8 KiB per split that a node per shared slot costs. Every
// boundary is checked with find and find_extent against the reference, also across the
// 8-piece blocks of long runs, and removing everything gives the memory back.
TEST(ProviderRegistryTest, ClusteredAperturesShareRunsAndMatchReference) {
  std::mt19937_64 rng(11);
  ProviderRegistry reg;
  ASSERT_TRUE(reg.add(aperture(0x1000, 0x1000)).has_value());  // touches the first id-table page
  ASSERT_TRUE(reg.remove(1).has_value());
  const size_t empty = reg.table_bytes();
  Reference ref;
  uint64_t cursor = uint64_t{1} << 40;
  for (int k = 0; k < 3000; ++k) {
    const unsigned kind = static_cast<unsigned>(rng() % 8);
    uint64_t size = kind < 4 ? 4096 << kind : kind < 7 ? uint64_t{1} << (20 + rng() % 10) : uint64_t{1} << (30 + rng() % 4);
    cursor = (cursor + size - 1) / size * size + (rng() % 4) * size;
    auto id = reg.add(aperture(cursor, size));
    ASSERT_TRUE(id.has_value()) << id.error().to_string();
    ref.v.emplace_back(cursor, size, *id);
    cursor += size;
  }
  // One slot of 4 GiB holding 120 pieces (the first provider at its start), each in its own
  // 4 MiB: a run with a top line and 15 blocks.
  const uint64_t slot = ((cursor >> 32) + 1) << 32;
  for (uint64_t k = 0; k < 60; ++k) {
    const uint64_t b = slot + k * (uint64_t{40} << 20);
    auto id = reg.add(aperture(b, 4096 * (1 + k % 4)));
    ASSERT_TRUE(id.has_value()) << id.error().to_string();
    ref.v.emplace_back(b, 4096 * (1 + k % 4), *id);
  }
  const size_t ids_bytes = 4096 * (1 + ref.v.size() / 512);
  EXPECT_LE(reg.table_bytes() - ids_bytes, 256 * ref.v.size());
  auto check_all = [&] {
    ProviderRegistry::ReadGuard g;
    std::vector<uint64_t> edges;
    for (const auto& [b, s, id] : ref.v) edges.insert(edges.end(), {b, b + s});
    std::sort(edges.begin(), edges.end());
    for (const auto& [b, s, id] : ref.v) {
      for (uint64_t a : {b - 4096, b - 1, b, b + 1, b + s / 2, b + s - 1, b + s, b + s + 4095}) {
        const Provider* p = reg.find(PhysAddr(a));
        const ProviderId want = ref.find(a);
        ASSERT_EQ(p ? p->id() : 0u, want) << "address " << a;
        uint64_t bytes = 0;
        const Provider* q = reg.find_extent(PhysAddr(a), bytes);
        ASSERT_EQ(q, p) << "address " << a;
        const auto up = std::upper_bound(edges.begin(), edges.end(), a);
        const uint64_t next = up == edges.end() ? ~uint64_t{0} : *up;
        if (q) ASSERT_EQ(a + bytes, q->phys().base.value() + q->phys().size) << "address " << a;
        else ASSERT_TRUE(bytes > 0 && a + bytes > a && a + bytes <= next) << "address " << a << " extent " << bytes << " next " << next;
      }
    }
  };
  check_all();
  // Remove every other one (runs are rebuilt without them), then the rest.
  for (size_t k = 0; k < ref.v.size(); k += 2) {
    ASSERT_TRUE(reg.remove(std::get<2>(ref.v[k])).has_value());
    std::get<1>(ref.v[k]) = 0;
  }
  ref.v.erase(std::remove_if(ref.v.begin(), ref.v.end(), [](const auto& t) { return std::get<1>(t) == 0; }), ref.v.end());
  check_all();
  for (const auto& [b, s, id] : ref.v) ASSERT_TRUE(reg.remove(id).has_value());
  reg.wait_for_frees();
  ProviderRegistry::ReadGuard g;
  for (uint64_t a = uint64_t{1} << 40; a < slot + (uint64_t{4} << 30); a += uint64_t{1} << 20) ASSERT_EQ(reg.find(PhysAddr(a)), nullptr);
  // Only nodes stay (they are never freed while the registry lives) and the id pages the
  // ids touched (the first one counted in `empty`); every run is gone.
  EXPECT_EQ((reg.table_bytes() - empty - (ids_bytes - 4096)) % 8192, 0u);
}

TEST(ProviderRegistryTest, TwoHundredThousandPackedApertures) {
  ProviderRegistry reg;
  constexpr uint64_t kN = 200000, kBase = uint64_t{1} << 40;
  for (uint64_t k = 0; k < kN; ++k) ASSERT_TRUE(reg.add(aperture(kBase + k * 4096, 4096)).has_value());
  for (uint64_t k = 0; k < kN; k += 2) ASSERT_TRUE(reg.remove(static_cast<ProviderId>(k + 1)).has_value());
  EXPECT_EQ(reg.size(), kN / 2);
  // Packed 4 KiB apertures cost about one 8-byte slot each in the radix table.
  EXPECT_LT(reg.table_bytes() / kN, 24u);
  ProviderRegistry::ReadGuard g;
  for (uint64_t k = 0; k < kN; ++k) {
    const Provider* p = reg.find(PhysAddr(kBase + k * 4096 + (k * 7) % 4096));
    if (k % 2 == 0) {
      ASSERT_EQ(p, nullptr) << k;
    } else {
      ASSERT_NE(p, nullptr) << k;
      ASSERT_EQ(p->id(), k + 1);
      ASSERT_EQ(reg.get(static_cast<ProviderId>(k + 1)), p);
    }
  }
  EXPECT_EQ(reg.find(PhysAddr(kBase - 1)), nullptr);
  EXPECT_EQ(reg.find(PhysAddr(kBase + kN * 4096)), nullptr);
}

TEST(ProviderRegistryTest, BoundariesOfAPageAtTheTopAndAtZero) {
  ProviderRegistry reg;
  const uint64_t top = (uint64_t{1} << 52) - 4096;
  auto a = reg.add(aperture(top, 4096));
  auto z = reg.add(aperture(0, 4096, 2));
  ASSERT_TRUE(a.has_value() && z.has_value());
  ProviderRegistry::ReadGuard g;
  EXPECT_EQ(reg.find(PhysAddr(top))->id(), *a);
  EXPECT_EQ(reg.find(PhysAddr(top + 4095))->id(), *a);
  EXPECT_EQ(reg.find(PhysAddr(top - 1)), nullptr);
  EXPECT_EQ(reg.find(PhysAddr(top + 4096)), nullptr);  // 2^52: outside the space
  EXPECT_EQ(reg.find(PhysAddr(0))->id(), *z);
  EXPECT_EQ(reg.find(PhysAddr(4096)), nullptr);
  EXPECT_EQ(reg.get(*a)->phys().base.value(), top);
  EXPECT_EQ(reg.get(*a)->to_bus(PhysAddr(top)).value(), top + 0x1000'0000'0000);
  EXPECT_EQ(reg.get(0), nullptr);
  EXPECT_EQ(reg.get(ProviderRegistry::kMaxProviders + 5), nullptr);
}

TEST(ProviderRegistryTest, BadInputIsRejectedAndLeavesRegistryUnchanged) {
  ProviderRegistry reg;
  auto a = reg.add(aperture(0x100000, 0x10000));
  ASSERT_TRUE(a.has_value());
  struct Case {
    uint64_t base, size;
    int code;
    const char* text;
  };
  for (const Case& c : {Case{0x200000, 0, EINVAL, "empty"}, Case{0x200800, 0x1000, EINVAL, "aligned"},
                        Case{0x200000, 0x800, EINVAL, "aligned"}, Case{~uint64_t{0} - 0xfff, 0x2000, EINVAL, "52-bit"},
                        Case{uint64_t{1} << 52, 0x1000, EINVAL, "52-bit"}, Case{0x10f000, 0x2000, EEXIST, "overlaps provider"},
                        Case{0x0, 0x200000, EEXIST, "overlaps provider"}, Case{0x104000, 0x1000, EEXIST, "0000:03:01.0"}}) {
    auto r = reg.add(aperture(c.base, c.size, 7));
    ASSERT_FALSE(r.has_value()) << c.base << " " << c.size;
    EXPECT_EQ(r.error().code, c.code);
    EXPECT_NE(r.error().message.find(c.text), std::string::npos) << r.error().message;
  }
  EXPECT_EQ(reg.size(), 1u);
  EXPECT_EQ(reg.remove(999).error().code, ENOENT);
  EXPECT_EQ(reg.revoke(999).error().code, ENOENT);
  EXPECT_EQ(reg.set_published(0, true).error().code, ENOENT);
  ASSERT_TRUE(reg.remove(*a).has_value());
  EXPECT_EQ(reg.remove(*a).error().code, ENOENT);  // double unregister
  EXPECT_EQ(reg.size(), 0u);
  // Adjacent apertures are fine.
  EXPECT_TRUE(reg.add(aperture(0x100000, 0x10000)).has_value());
  EXPECT_TRUE(reg.add(aperture(0x110000, 0x1000)).has_value());
  EXPECT_TRUE(reg.add(aperture(0xff000, 0x1000)).has_value());
}

TEST(ProviderRegistryTest, RevokeKeepsApertureAndCallsHolder) {
  ProviderRegistry reg;
  int calls = 0;
  ProviderId seen = 0;
  ProviderDesc d = aperture(0x40000000, 1 << 20);
  d.on_revoke = [&](const Provider& p) {
    ++calls;
    seen = p.id();
  };
  auto id = reg.add(std::move(d));
  ASSERT_TRUE(id.has_value());
  {
    ProviderRegistry::ReadGuard g;
    EXPECT_FALSE(reg.find(PhysAddr(0x40000000))->revoked());
  }
  ASSERT_TRUE(reg.revoke(*id).has_value());
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen, *id);
  EXPECT_EQ(reg.revoke(*id).error().code, EINVAL);
  EXPECT_EQ(calls, 1);
  ProviderRegistry::ReadGuard g;
  const Provider* p = reg.find(PhysAddr(0x40000000 + 12345));
  ASSERT_NE(p, nullptr);  // never mistaken for host memory
  EXPECT_TRUE(p->revoked());
  EXPECT_TRUE(reg.get(*id)->revoked());
}

TEST(ProviderRegistryTest, PublishFlag) {
  ProviderRegistry reg;
  auto id = reg.add(aperture(0x1000, 0x1000));
  ProviderRegistry::ReadGuard g;
  EXPECT_FALSE(reg.get(*id)->published());
  ASSERT_TRUE(reg.set_published(*id, true).has_value());
  EXPECT_TRUE(reg.get(*id)->published());
  ASSERT_TRUE(reg.set_published(*id, false).has_value());
  EXPECT_FALSE(reg.get(*id)->published());
}

TEST(ProviderRegistryTest, IdsAreReusedOnlyAfterGracePeriodSmallestFirst) {
  ProviderRegistry reg;
  std::vector<ProviderId> ids;
  for (uint64_t k = 0; k < 10; ++k) ids.push_back(*reg.add(aperture(k << 20, 4096)));
  EXPECT_EQ(ids.front(), 1u);
  EXPECT_EQ(ids.back(), 10u);
  {
    // A reader holds the grace period open: ids 3 and 5 cannot come back yet.
    ProviderRegistry::ReadGuard g;
    const Provider* p3 = reg.get(3);
    ASSERT_TRUE(reg.remove(3).has_value());
    ASSERT_TRUE(reg.remove(5).has_value());
    EXPECT_EQ(reg.get(3), nullptr);
    EXPECT_EQ(p3->id(), 3u);  // still readable inside the guard
  }
  // Not reused before the grace period ends: a new add gets a fresh id or, once the frees
  // have run, the smallest freed one.
  reg.wait_for_frees();
  EXPECT_EQ(reg.pending_frees(), 0u);
  EXPECT_EQ(*reg.add(aperture(100 << 20, 4096)), 3u);
  EXPECT_EQ(*reg.add(aperture(101 << 20, 4096)), 5u);
  EXPECT_EQ(*reg.add(aperture(102 << 20, 4096)), 11u);
}

// A root slot covers 4 TiB. A slot that an aperture covers whole holds a leaf (no memory);
// one it covers in part holds a line run (64 bytes: up to 4 pieces, gaps included) that
// readers search without reading the Provider; a fifth piece turns it into a block run.
TEST(ProviderRegistryTest, PartlyCoveredSlotsTakeOneLineUntilAFifthPiece) {
  ProviderRegistry reg;
  ASSERT_TRUE(reg.add(aperture(0x1000, 0x1000)).has_value());  // the first id-table page, one line run
  const size_t before = reg.table_bytes();
  const uint64_t big = uint64_t{1} << 44, big_size = uint64_t{64} << 30;
  ASSERT_TRUE(reg.add(aperture(big, big_size)).has_value());  // aligned 64 GiB at a root slot's start: BAR, gap
  EXPECT_EQ(reg.table_bytes() - before, 64u);
  const uint64_t ragged = (uint64_t{1} << 45) + 4096;
  ASSERT_TRUE(reg.add(aperture(ragged, big_size - 8192, 2)).has_value());  // gap, BAR, gap
  EXPECT_EQ(reg.table_bytes() - before, 2 * 64u);
  for (uint64_t k = 0; k < 100; ++k)  // sparse 4 KiB apertures, each in its own root slot
    ASSERT_TRUE(reg.add(aperture((uint64_t{1} << 46) + (k << 42), 4096, 3)).has_value());
  const size_t sparse = reg.table_bytes();
  EXPECT_EQ(sparse - before, 102 * 64u);
  // A neighbour in the gap after the ragged aperture: the line run is rebuilt, same size.
  const uint64_t next = ragged + big_size - 8192;
  ASSERT_TRUE(reg.add(aperture(next, 4096, 4)).has_value());
  EXPECT_EQ(reg.table_bytes(), sparse);
  {
    ProviderRegistry::ReadGuard g;
    EXPECT_EQ(reg.find(PhysAddr(big - 1)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(big))->owner().dev, 1);
    EXPECT_EQ(reg.find(PhysAddr(big + big_size - 1))->owner().dev, 1);
    EXPECT_EQ(reg.find(PhysAddr(big + big_size)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(ragged - 1)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(ragged))->owner().dev, 2);
    EXPECT_EQ(reg.find(PhysAddr(next - 1))->owner().dev, 2);
    EXPECT_EQ(reg.find(PhysAddr(next))->owner().dev, 4);
    EXPECT_EQ(reg.find(PhysAddr(next + 4095))->owner().dev, 4);
    EXPECT_EQ(reg.find(PhysAddr(next + 4096)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr((uint64_t{1} << 46) + (uint64_t{7} << 42) + 4095))->owner().dev, 3);
    EXPECT_EQ(reg.find(PhysAddr((uint64_t{1} << 46) + (uint64_t{7} << 42) + 4096)), nullptr);
    uint64_t extent = 0;
    EXPECT_EQ(reg.find_extent(PhysAddr(uint64_t{1} << 45), extent), nullptr);
    EXPECT_EQ(extent, 4096u);  // host up to the ragged aperture
    EXPECT_EQ(reg.find_extent(PhysAddr(ragged + 4096), extent)->owner().dev, 2);
    EXPECT_EQ(extent, big_size - 8192 - 4096);
    EXPECT_EQ(reg.find_extent(PhysAddr(next + 4096), extent), nullptr);
    EXPECT_EQ(extent, (uint64_t{4} << 40) - big_size);  // the gap to the root slot's end
    EXPECT_EQ(reg.find_extent(PhysAddr((uint64_t{1} << 46) + 4096), extent), nullptr);
    EXPECT_EQ(extent, (uint64_t{4} << 40) - 4096);
  }
  // Four pieces fill the line (5, gap, 6, gap); once the registry's nodes take their
  // allowance, a fifth makes a block run: a header line, a top line without a start and
  // one block (8 starts, 8 ids).
  EXPECT_GT(spend_node_allowance(reg, 512), 15u);
  const uint64_t slot = uint64_t{3} << 42;  // an empty root slot
  const auto five = reg.add(aperture(slot, 4096, 5));
  ASSERT_TRUE(five.has_value() && reg.add(aperture(slot + 0x20000, 4096, 6)).has_value());
  const size_t four = reg.table_bytes();
  const auto seven = reg.add(aperture(slot + 0x21000, 4096, 7));
  ASSERT_TRUE(seven.has_value());
  EXPECT_EQ(reg.table_bytes() - four, 128u + 64u + 64u - 64u);
  auto check = [&](std::vector<std::pair<uint64_t, int>> want) {
    ProviderRegistry::ReadGuard g;
    for (const auto& [a, dev] : want) {
      const Provider* p = reg.find(PhysAddr(a));
      EXPECT_EQ(p ? p->owner().dev : 0, dev) << a;
      uint64_t bytes = 0;
      EXPECT_EQ(reg.find_extent(PhysAddr(a), bytes), p) << a;
    }
  };
  check({{slot - 1, 0}, {slot, 5}, {slot + 0xfff, 5}, {slot + 0x1000, 0}, {slot + 0x20000, 6}, {slot + 0x20fff, 6},
         {slot + 0x21000, 7}, {slot + 0x22000, 0}, {slot + (uint64_t{4} << 30) - 1, 0}});
  // Removing two of the three gives the line back: gap, 6, gap.
  ASSERT_TRUE(reg.remove(*five).has_value());
  EXPECT_EQ(reg.table_bytes(), four);
  ASSERT_TRUE(reg.remove(*seven).has_value());
  EXPECT_EQ(reg.table_bytes(), four);
  check({{slot, 0}, {slot + 0x20000, 6}, {slot + 0x21000, 0}});
  reg.wait_for_frees();
}

// A small registry splits a cluster of more than 4 pieces into nodes, not a block run: 16
// packed 4 KiB apertures take nodes down to single-page leaves (root slot -> 4 GiB slot ->
// 4 MiB slot), so a lookup walks nodes and searches no run (47 instructions per lookup in
// Lookup/physr/16 instead of 77 through an 18-piece run at the root). Pieces are right at
// every node and slot boundary; providers spread wider than a slot of the next level, or
// of different sizes, keep their run; nodes built while small stay when the registry grows.
TEST(ProviderRegistryTest, SmallRegistrySplitsSlotsPastFourPiecesIntoNodes) {
  ProviderRegistry reg;
  const size_t empty = reg.table_bytes();  // the root node
  const uint64_t base = (uint64_t{1} << 32) - 8 * 4096;  // straddles a 4 GiB (and 4 MiB) boundary
  for (uint64_t k = 0; k < 16; ++k) ASSERT_TRUE(reg.add(aperture(base + k * 4096, 4096, static_cast<uint8_t>(k))).has_value());
  // Two 4 GiB slots and two 4 MiB slots with 8 pages each: an L1 node, two L2 nodes, two
  // leaf nodes, the id page; no run.
  EXPECT_EQ(reg.table_bytes() - empty, 5 * 8192u + 4096u);
  auto check = [&] {
    ProviderRegistry::ReadGuard g;
    EXPECT_EQ(reg.find(PhysAddr(base - 1)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(base + 16 * 4096)), nullptr);
    for (uint64_t k = 0; k < 16; ++k) {
      for (uint64_t a : {base + k * 4096, base + k * 4096 + 4095}) {
        const Provider* p = reg.find(PhysAddr(a));
        ASSERT_NE(p, nullptr) << a;
        EXPECT_EQ(p->owner().dev, k) << a;
        uint64_t bytes = 0;
        EXPECT_EQ(reg.find_extent(PhysAddr(a), bytes), p);
        EXPECT_EQ(a + bytes, base + (k + 1) * 4096);
      }
    }
    uint64_t bytes = 0;
    EXPECT_EQ(reg.find_extent(PhysAddr(base + 16 * 4096), bytes), nullptr);
    EXPECT_EQ(bytes, 4096u);  // an empty single-page slot of the leaf node
  };
  check();
  // Five pieces spread over two 4 GiB slots are no cluster: a block run at the root.
  const uint64_t spread = uint64_t{2} << 42;
  ASSERT_TRUE(reg.add(aperture(spread, 4096, 21)).has_value());
  ASSERT_TRUE(reg.add(aperture(spread + (uint64_t{5} << 32), 4096, 22)).has_value());
  const size_t line = reg.table_bytes();
  ASSERT_TRUE(reg.add(aperture(spread + (uint64_t{9} << 32), 4096, 23)).has_value());
  EXPECT_EQ(reg.table_bytes() - line, 128u + 64u + 64u - 64u);
  // Nor are providers of different sizes, however close (a node would give them paths of
  // different depths): a block run.
  const uint64_t mixed = uint64_t{9} << 42;
  ASSERT_TRUE(reg.add(aperture(mixed, 4096, 24)).has_value());
  ASSERT_TRUE(reg.add(aperture(mixed + 8192, 8192, 25)).has_value());
  const size_t line2 = reg.table_bytes();
  ASSERT_TRUE(reg.add(aperture(mixed + 6 * 4096, 4096, 26)).has_value());
  EXPECT_EQ(reg.table_bytes() - line2, 128u + 64u + 64u - 64u);
  {
    ProviderRegistry::ReadGuard g;
    EXPECT_EQ(reg.find(PhysAddr(mixed + 4096)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(mixed + 4 * 4096 - 1))->owner().dev, 25);
    EXPECT_EQ(reg.find(PhysAddr(mixed + 6 * 4096))->owner().dev, 26);
    EXPECT_EQ(reg.find(PhysAddr(spread + (uint64_t{5} << 32) + 4095))->owner().dev, 22);
    EXPECT_EQ(reg.find(PhysAddr(spread + (uint64_t{5} << 32) + 4096)), nullptr);
    EXPECT_EQ(reg.find(PhysAddr(spread + (uint64_t{9} << 32)))->owner().dev, 23);
  }
  // Past the allowance, slots get runs again; the nodes built before stay and still answer.
  EXPECT_GT(spend_node_allowance(reg, 512), 15u);
  const uint64_t slot = uint64_t{3} << 42;
  for (uint64_t k = 0; k < 3; ++k) ASSERT_TRUE(reg.add(aperture(slot + k * 8192, 4096, 20)).has_value());
  const size_t runs = reg.table_bytes();
  ASSERT_TRUE(reg.add(aperture(slot + 3 * 8192, 4096, 20)).has_value());
  EXPECT_EQ(reg.table_bytes() - runs, 0u);  // a block run of 6 pieces, then of 8: the same one block
  ASSERT_TRUE(reg.add(aperture(slot + 4 * 8192, 4096, 20)).has_value());
  EXPECT_EQ(reg.table_bytes() - runs, 64u);  // 10 pieces: a second block (the top line gets its start)
  {
    ProviderRegistry::ReadGuard g;
    for (uint64_t k = 0; k < 5; ++k) {
      EXPECT_EQ(reg.find(PhysAddr(slot + k * 8192 + 4095))->owner().dev, 20);
      EXPECT_EQ(reg.find(PhysAddr(slot + k * 8192 + 4096)), nullptr);
    }
  }
  check();
  // Removing the 16 leaves the nodes (never freed while the registry lives) empty.
  for (ProviderId id = 1; id <= 16; ++id) ASSERT_TRUE(reg.remove(id).has_value());
  ProviderRegistry::ReadGuard g;
  for (uint64_t k = 0; k < 16; ++k) EXPECT_EQ(reg.find(PhysAddr(base + k * 4096)), nullptr);
}

// Nodes and runs live in 2 MiB chunks. A large table spans several (lookups stay right
// across them), and a run replaced by a writer goes back to its chunk after the grace
// period and is reused: churn that replaces runs forever does not grow the arena.
TEST(ProviderRegistryTest, ArenaSpansChunksAndReusesFreedRuns) {
  ProviderRegistry reg;
  EXPECT_EQ(reg.arena_bytes(), 0u);  // a registry without runs or nodes maps nothing
  constexpr uint64_t kN = 300000, kBase = uint64_t{1} << 40;
  for (uint64_t k = 0; k < kN; ++k) ASSERT_TRUE(reg.add(aperture(kBase + k * 4096, 4096)).has_value());
  EXPECT_GE(reg.arena_bytes(), size_t{4} << 20);  // 293 leaf nodes of 8 KiB: two chunks at least
  {
    ProviderRegistry::ReadGuard g;
    for (uint64_t k = 0; k < kN; k += 7) ASSERT_EQ(reg.find(PhysAddr(kBase + k * 4096 + 5))->id(), k + 1) << k;
  }
  // A slot with six pieces (a block run: a header line and one block), rebuilt by every add and remove.
  const uint64_t slot = uint64_t{5} << 32;
  for (uint64_t k = 0; k < 2; ++k) ASSERT_TRUE(reg.add(aperture(slot + (k + 1) * 0x10000, 4096, 2)).has_value());
  auto churn = [&](int rounds) {
    for (int round = 0; round < rounds; ++round) {
      auto id = reg.add(aperture(slot + 0x40000, 4096, 3));
      ASSERT_TRUE(id.has_value());
      ASSERT_TRUE(reg.remove(*id).has_value());
      if (round % 256 == 255) reg.wait_for_frees();
    }
    reg.wait_for_frees();
  };
  churn(256);  // the ids it cycles through touch their id-table page
  const size_t arena = reg.arena_bytes(), table = reg.table_bytes();
  churn(20000);
  EXPECT_EQ(reg.table_bytes(), table);
  // 40000 runs of 192 bytes (7.3 MiB) were built; reused, they fit the chunks already mapped
  // plus at most one more.
  EXPECT_LE(reg.arena_bytes(), arena + (size_t{2} << 20));
  ProviderRegistry::ReadGuard g;
  EXPECT_EQ(reg.find(PhysAddr(slot + 0x10000))->owner().dev, 2);
  EXPECT_EQ(reg.find(PhysAddr(slot + 0x20fff))->owner().dev, 2);
  EXPECT_EQ(reg.find(PhysAddr(slot + 0x40000)), nullptr);
}

// Checks every piece boundary of `model` (base -> (size, id)) in [lo, hi) with find and
// find_extent: the page before and at each start, the last page and the one after each end.
void expect_matches(const ProviderRegistry& reg, const std::map<uint64_t, std::pair<uint64_t, ProviderId>>& model, uint64_t lo,
                    uint64_t hi) {
  ProviderRegistry::ReadGuard g;
  auto want = [&](uint64_t a) -> ProviderId {
    auto it = model.upper_bound(a);
    if (it == model.begin()) return 0;
    --it;
    return a - it->first < it->second.first ? it->second.second : 0;
  };
  std::vector<uint64_t> probes{lo, hi - 1};
  for (const auto& [b, v] : model) probes.insert(probes.end(), {b - 1, b, b + v.first - 1, b + v.first, b + v.first / 2});
  for (uint64_t a : probes) {
    if (a < lo || a >= hi) continue;
    const Provider* p = reg.find(PhysAddr(a));
    ASSERT_EQ(p ? p->id() : 0u, want(a)) << "address " << a;
    uint64_t bytes = 0;
    ASSERT_EQ(reg.find_extent(PhysAddr(a), bytes), p) << "address " << a;
    auto next = model.upper_bound(a);
    if (p) ASSERT_EQ(a + bytes, p->phys().base.value() + p->phys().size) << "address " << a;
    else ASSERT_TRUE(bytes > 0 && a + bytes > a && (next == model.end() || a + bytes <= next->first)) << "address " << a << " extent " << bytes;
  }
}

#if defined(__SANITIZE_ADDRESS__)
#define PHYSR_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PHYSR_TEST_ASAN 1
#endif
#endif

// Providers live in a slab, not on the heap, so ASan would not see a Provider used after
// its grace period unless the registry poisons the slot: it does, and that use is reported.
TEST(ProviderRegistryTest, ProviderUsedAfterItsGracePeriodIsReportedUnderAsan) {
#ifndef PHYSR_TEST_ASAN
  GTEST_SKIP() << "needs AddressSanitizer";
#else
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        ProviderRegistry reg;
        const ProviderId id = reg.add(aperture(0x100000, 4096)).value();
        const Provider* p = nullptr;
        {
          ProviderRegistry::ReadGuard g;
          p = reg.find(PhysAddr(0x100000));
        }
        (void)reg.remove(id);
        reg.wait_for_frees();
        std::printf("%llu\n", static_cast<unsigned long long>(p->phys().size));  // the bug
      },
      "use-after-poison");
#endif
}

// A registry reserves 128 MiB of id table and 2 GiB of slab, but makes a page writable only
// once an id of it is used. So it works under a data limit far below that: RLIMIT_DATA
// counts writable private mappings, as a host with strict overcommit does. Exits with 0
// when it did; 4 when an add failed, 5 or 6 for a wrong lookup.
[[noreturn]] void use_a_registry_under_a_data_limit() {
  FILE* f = std::fopen("/proc/self/status", "r");
  char line[256];
  unsigned long long data_kb = 0;
  while (f && std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "VmData: %llu kB", &data_kb) == 1) break;
  if (f) std::fclose(f);
  if (data_kb == 0) std::exit(2);
  const rlimit limit{static_cast<rlim_t>((data_kb << 10) + (uint64_t{48} << 20)), RLIM_INFINITY};
  if (setrlimit(RLIMIT_DATA, &limit) != 0) std::exit(3);
  {
    ProviderRegistry reg;
    for (uint64_t k = 0; k < 2000; ++k)
      if (!reg.add(aperture((uint64_t{1} << 32) + k * 8192, 4096)).has_value()) std::exit(4);
    ProviderRegistry::ReadGuard g;
    for (uint64_t k = 0; k < 2000; k += 97) {
      const Provider* p = reg.find(PhysAddr((uint64_t{1} << 32) + k * 8192));
      if (!p || reg.get(p->id()) != p) std::exit(5);
    }
    if (reg.get(ProviderRegistry::kMaxProviders) != nullptr) std::exit(6);  // an untouched page reads
  }
  std::exit(0);
}

TEST(ProviderRegistryTest, WorksUnderADataLimitFarBelowItsReservations) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process: the limit stays there
  EXPECT_EXIT(use_a_registry_under_a_data_limit(), ::testing::ExitedWithCode(0), "");
}

// Runs at their limits: 8 pieces (one block), 9 (a top line), 136 (17 blocks under one top
// line), 137 (a second top line) and 264 (33 blocks under two). Each is one run, not a node:
// header, top lines and blocks. Every gap's extent ends exactly at the next provider or at
// the slot's end, which a block's last gap reads from the top lines (or, for the last block
// of a full run, which no top line entry names).
TEST(ProviderRegistryTest, RunsAtTheirLimitsAnswerEveryGapExactly) {
  ProviderRegistry reg;
  EXPECT_GT(spend_node_allowance(reg, 512), 15u);
  uint64_t root = uint64_t{7} << 42;
  for (const auto& [k, lead] : {std::pair<uint64_t, uint64_t>{4, 0}, {4, 1}, {68, 0}, {68, 1}, {132, 0}}) {
    root += uint64_t{1} << 42;  // an empty root slot each
    const uint64_t pieces = 2 * k + lead, blocks = (pieces + 7) / 8, tops = blocks > 17 ? 2 : 1;
    const size_t before = reg.table_bytes();
    const size_t prefill = reg.size();
    std::map<uint64_t, std::pair<uint64_t, ProviderId>> model;
    for (uint64_t i = 0; i < k; ++i) {  // (gap,) provider, gap, provider, gap, ...
      const uint64_t b = root + lead * (uint64_t{1} << 29) + (i << 30), size = 4096 * (1 + i % 2);
      auto id = reg.add(aperture(b, size, static_cast<uint8_t>(i)));
      ASSERT_TRUE(id.has_value()) << id.error().to_string();
      model[b] = {size, *id};
    }
    const size_t id_pages = 4096 * ((prefill + k) / 512 - prefill / 512);
    EXPECT_EQ(reg.table_bytes() - before - id_pages, 128 + 64 * tops + 64 * blocks) << pieces << " pieces";
    expect_matches(reg, model, root, root + (uint64_t{4} << 40));
    ProviderRegistry::ReadGuard g;
    std::vector<std::pair<uint64_t, uint64_t>> gaps;  // [from, to)
    uint64_t cursor = root;
    for (const auto& [b, v] : model) {
      if (b > cursor) gaps.emplace_back(cursor, b);
      cursor = b + v.first;
    }
    gaps.emplace_back(cursor, root + (uint64_t{4} << 40));
    ASSERT_EQ(gaps.size() + k, pieces);
    for (const auto& [from, to] : gaps) {
      for (uint64_t a : {from, from + 3 * 4096 + 7, to - 1}) {
        uint64_t bytes = 0;
        EXPECT_EQ(reg.find_extent(PhysAddr(a), bytes), nullptr);
        EXPECT_EQ(a + bytes, to) << pieces << " pieces, address " << a;
      }
    }
  }
}

// 7,168 providers of 4-16 KiB in one root slot, 7 in each of its 4 GiB slots, added and then
// removed in random order: the root slot's run grows past its blocks and top lines into a
// node of 4 GiB slots, each with its own run, and empties again. Every piece boundary is
// right against a std::map at checkpoints on the way up (around the 8-, 136- and 264-piece
// limits) and on the way down, an overlapping add names the provider it hits, and removing
// everything leaves host memory with no run left (only nodes stay).
TEST(ProviderRegistryTest, ThousandsOfPiecesInOneRootSlotMatchAMapAsTheyComeAndGo) {
  ProviderRegistry reg;
  EXPECT_GT(spend_node_allowance(reg, 512), 15u);  // a large registry: no uniform-cluster nodes
  const size_t before = reg.table_bytes();
  const ProviderId prefill = static_cast<ProviderId>(reg.size());
  const uint64_t root = uint64_t{5} << 42;
  std::mt19937_64 rng(23);
  std::vector<std::pair<uint64_t, uint64_t>> places;
  for (uint64_t slot = 0; slot < 1024; ++slot)
    for (uint64_t k = 0; k < 7; ++k) places.emplace_back((root + (slot << 32) + (k << 29)) | ((rng() % 8) << 12), 4096 << (k % 3));
  std::shuffle(places.begin(), places.end(), rng);
  std::map<uint64_t, std::pair<uint64_t, ProviderId>> model;
  // k providers make about 2k + 1 pieces: a top line from 4 on, two from 68, a node from 132.
  const size_t checks[] = {3, 4, 8, 9, 67, 68, 100, 131, 132, 2000, 2048, 2049, places.size()};
  size_t next_check = 0;
  for (size_t k = 0; k < places.size(); ++k) {
    auto id = reg.add(aperture(places[k].first, places[k].second, static_cast<uint8_t>(k)));
    ASSERT_TRUE(id.has_value()) << id.error().to_string();
    model[places[k].first] = {places[k].second, *id};
    if (k + 1 == checks[next_check]) {
      expect_matches(reg, model, root, root + (uint64_t{4} << 40));
      ++next_check;
    }
  }
  // The id pages the new ids touched (ids are handed out in order: 1 .. prefill first).
  const size_t id_pages = 4096 * ((prefill + places.size()) / 512 - prefill / 512);
  EXPECT_LT(reg.table_bytes() - before - id_pages, 256 * places.size());
  // An overlapping add fails and names the provider it hits; the tree is unchanged.
  const auto& [b0, v0] = *model.begin();
  auto clash = reg.add(aperture(b0 - 4096, 8192));
  ASSERT_FALSE(clash.has_value());
  EXPECT_EQ(clash.error().code, EEXIST);
  EXPECT_NE(clash.error().message.find("provider " + std::to_string(v0.second) + " "), std::string::npos);
  std::shuffle(places.begin(), places.end(), rng);
  for (size_t k = 0; k < places.size(); ++k) {
    const auto it = model.find(places[k].first);
    ASSERT_TRUE(reg.remove(it->second.second).has_value());
    model.erase(it);
    if (k % 997 == 0 || places.size() - k < 20) expect_matches(reg, model, root, root + (uint64_t{4} << 40));
  }
  reg.wait_for_frees();
  // Runs are gone; the nodes made on the way (never freed while the registry lives) stay.
  EXPECT_EQ((reg.table_bytes() - before - id_pages) % 8192, 0u);
  ProviderRegistry::ReadGuard g;
  for (uint64_t a = root; a < root + (uint64_t{4} << 40); a += uint64_t{1} << 29) ASSERT_EQ(reg.find(PhysAddr(a)), nullptr);
}

// Two neighbouring providers removed and the room they leave refilled by one provider
// that spans it exactly (from the end of the one before to the start of the one after, or
// just their own pages and the gap between them), 300 times over 600 1 GiB providers in
// one root slot: the freed room is one gap (an add a page longer is refused), and every
// piece boundary stays right against a std::map.
TEST(ProviderRegistryTest, RefillingTheRoomOfRemovedNeighboursMatchesAMap) {
  ProviderRegistry reg;
  EXPECT_GT(spend_node_allowance(reg, 512), 15u);
  const uint64_t root = uint64_t{6} << 42;
  std::map<uint64_t, std::pair<uint64_t, ProviderId>> model;
  // 600 providers, one per 4 GiB slot at 1 GiB past its start, 1 GiB each, in order.
  for (uint64_t k = 0; k < 600; ++k) {
    const uint64_t b = root + (k << 32) + (uint64_t{1} << 30);
    auto id = reg.add(aperture(b, uint64_t{1} << 30));
    ASSERT_TRUE(id.has_value());
    model[b] = {uint64_t{1} << 30, *id};
  }
  std::mt19937_64 rng(3);
  for (int round = 0; round < 300; ++round) {
    // Remove two neighbours, then fill the gap they leave (their two pieces, the gap
    // between them) with one provider that spans it exactly.
    auto it = std::next(model.begin(), static_cast<long>(rng() % (model.size() - 2)));  // not the last two
    const auto nx = std::next(it);
    const uint64_t from = it->first, to = nx->first + nx->second.first;
    const uint64_t prev_end = it == model.begin() ? root : std::prev(it)->first + std::prev(it)->second.first;
    const uint64_t next_start = std::next(nx) == model.end() ? root + (uint64_t{4} << 40) : std::next(nx)->first;
    ASSERT_TRUE(reg.remove(it->second.second).has_value());
    ASSERT_TRUE(reg.remove(nx->second.second).has_value());
    model.erase(it);
    model.erase(nx);
    EXPECT_FALSE(reg.add(aperture(prev_end, next_start - prev_end + 4096)).has_value());
    const uint64_t b = round % 2 ? prev_end : from, e = round % 2 ? next_start : to;
    auto id = reg.add(aperture(b, e - b));
    ASSERT_TRUE(id.has_value()) << id.error().to_string();
    model[b] = {e - b, *id};
    if (round % 25 == 0) expect_matches(reg, model, root, root + (uint64_t{4} << 40));
  }
  expect_matches(reg, model, root, root + (uint64_t{4} << 40));
}

TEST(ProviderTaggingTest, TagsSplitsAtBoundariesAndNeverMergesAcross) {
  ProviderRegistry reg;
  const ProviderId a = *reg.add(aperture(0x10000, 0x4000));
  const ProviderId b = *reg.add(aperture(0x14000, 0x4000, 2));  // adjacent to a
  ProviderRegistry::ReadGuard g;
  // One piece spanning host, a, b, host.
  std::vector<PhysSpan> pieces{{PhysAddr(0xe000), 0xc000}};
  auto l = tag_ranges(reg, pieces);
  ASSERT_TRUE(l.has_value()) << l.error().to_string();
  std::vector<PhysRange> got(l->begin(), l->end());
  std::vector<PhysRange> want{{PhysAddr(0xe000), 0x2000, 0}, {PhysAddr(0x10000), 0x4000, a}, {PhysAddr(0x14000), 0x4000, b},
                              {PhysAddr(0x18000), 0x2000, 0}};
  EXPECT_EQ(got, want);
  // Host pieces far apart in the table still merge when contiguous.
  std::vector<PhysSpan> host{{PhysAddr(uint64_t{1} << 40), uint64_t{3} << 30}};
  auto h = tag_ranges(reg, host);
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->size(), 1u);
  EXPECT_EQ((*h)[0].size, uint64_t{3} << 30);
}

TEST(ProviderTaggingTest, RevokedProviderFailsWithEfault) {
  ProviderRegistry reg;
  const ProviderId a = *reg.add(aperture(0x10000, 0x4000));
  ASSERT_TRUE(reg.revoke(a).has_value());
  ProviderRegistry::ReadGuard g;
  std::vector<PhysSpan> pieces{{PhysAddr(0x8000), 0x10000}};
  auto l = tag_ranges(reg, pieces);
  ASSERT_FALSE(l.has_value());
  EXPECT_EQ(l.error().code, EFAULT);
  EXPECT_NE(l.error().message.find("revoked provider"), std::string::npos);
}

}  // namespace
}  // namespace physr
