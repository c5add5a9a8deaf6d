#include "physr/provider.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <random>
#include <thread>

namespace physr {
namespace {

// Readers look up continuously while writers add, revoke and remove. Every provider a
// reader sees must be alive (its magic intact, its aperture holding the address) and
// within its lifetime; run under TSan and ASan by scripts/test.
// `slots` places for apertures of one or two pages, `stride` pages apart. With `large`, the
// registry first spends the node allowance of a small registry (a cluster of three apertures
// in each of 80 root slots far from the churn), so crowded slots take block runs, not nodes.
// With `near`, readers probe the places themselves (the first two pages of each), not the
// whole span.
void churn(uint64_t slots, uint64_t stride, bool large, bool near = false) {
  ProviderRegistry reg;
  constexpr uint64_t kBase = uint64_t{1} << 36;
  for (uint64_t r = 512; large && r < 512 + 80; ++r) {
    for (uint64_t k = 0; k < 3; ++k) {
      ProviderDesc d;
      d.phys = PhysSpan{PhysAddr((r << 42) + k * 8192), 4096};
      ASSERT_TRUE(reg.add(std::move(d)).has_value());
    }
  }
  const size_t prefill = reg.size();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> lookups{0}, hits{0};
  std::atomic<int> errors{0};
  auto reader = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    while (!stop.load(std::memory_order_relaxed)) {
      ProviderRegistry::ReadGuard g;
      for (int k = 0; k < 256; ++k) {
        const uint64_t page = near ? (rng() % slots) * stride + rng() % 2 : rng() % (slots * stride);
        const uint64_t a = kBase + page * 4096 + rng() % 4096;
        const Provider* p = reg.find(PhysAddr(a));
        if (p) {
          hits.fetch_add(1, std::memory_order_relaxed);
          if (!p->phys().contains(PhysAddr(a)) || p->owner().bus != 7) errors.fetch_add(1);
          const Provider* same = reg.get(p->id());
          if (same && same != p) errors.fetch_add(1);  // the id names p, or nothing once removed
          (void)p->revoked();
        }
      }
      lookups.fetch_add(256, std::memory_order_relaxed);
    }
  };
  std::thread r1(reader, 1), r2(reader, 2);
  std::mt19937_64 rng(9);
  std::map<uint64_t, ProviderId> live;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(700);
  size_t ops = 0;
  while (std::chrono::steady_clock::now() < deadline || ops < 2000) {
    const uint64_t slot = rng() % slots;
    auto it = live.find(slot);
    if (it == live.end()) {
      ProviderDesc d;
      d.owner = pci::Bdf{0, 7, static_cast<uint8_t>(slot % 32), 0};
      d.phys = PhysSpan{PhysAddr(kBase + slot * stride * 4096), 4096 * (1 + rng() % 2)};
      auto id = reg.add(std::move(d));
      ASSERT_TRUE(id.has_value()) << id.error().to_string();
      live[slot] = *id;
    } else if (rng() % 4 == 0) {
      (void)reg.revoke(it->second);
    } else {
      ASSERT_TRUE(reg.remove(it->second).has_value());
      live.erase(it);
    }
    ++ops;
    if (ops > 200000) break;
  }
  stop = true;
  r1.join();
  r2.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(lookups.load(), 0u);
  EXPECT_GT(hits.load(), 0u);
  for (const auto& [slot, id] : live) ASSERT_TRUE(reg.remove(id).has_value());
  reg.wait_for_frees();
  EXPECT_EQ(reg.pending_frees(), 0u);
  EXPECT_EQ(reg.size(), prefill);
}

// Dense: the shared slot soon has too many pieces for a run and becomes a node of leaves.
TEST(ProviderConcurrencyTest, ReadersNeverSeeFreedOrForeignProviders) { churn(512, 2, true); }

// Sparse: 48 places in one 4 MiB slot, so every add and remove replaces the slot's run
// (copy-on-write, the old run freed after a grace period) while readers search it.
TEST(ProviderConcurrencyTest, ReadersSearchRunsWhileWritersReplaceThem) { churn(48, 21, true); }

// Sparse over a root slot: 600 places, one per 4 GiB slot. The root slot's run is rebuilt
// by every add and remove until it passes 264 pieces and becomes a node, whose 4 GiB slots
// then take and drop line runs, while readers probe the places themselves.
TEST(ProviderConcurrencyTest, ReadersWhileASparseRootSlotGrowsIntoANode) { churn(600, uint64_t{1} << 20, true, true); }

// The same in a small registry: its crowded slots become nodes (while readers search the
// line runs they replace), then hold leaves.
TEST(ProviderConcurrencyTest, ReadersWhileASmallRegistrySplitsSlotsIntoNodes) { churn(48, 21, false); }

}  // namespace
}  // namespace physr
