#include "physr/iommu.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <type_traits>

namespace physr {
namespace {

std::unique_ptr<IoDomain> domain(bool strict, size_t fq = 256) {
  auto d = IoDomain::create(IoDomainOptions{.iova = {}, .strict = strict, .flush_queue_entries = fq});
  EXPECT_TRUE(d.has_value());
  return std::move(d).value();
}

TEST(IoDomainTest, MapsWithLargestLeavesAndTranslatesEveryByte) {
  auto d = domain(true);
  // 1 GiB + 2 MiB + 4 KiB, both sides 1 GiB aligned: one of each leaf size.
  const uint64_t size = GiB + 2 * MiB + 4096;
  ASSERT_TRUE(d->map(DmaAddr(4 * GiB), PhysAddr(64 * GiB), size, kIommuReadWrite).has_value());
  const IoDomainStats s = d->stats();
  EXPECT_EQ(s.mapped_1g, 1u);
  EXPECT_EQ(s.mapped_2m, 1u);
  EXPECT_EQ(s.mapped_4k, 1u);
  for (uint64_t off : {uint64_t{0}, uint64_t{12345}, GiB - 1, GiB, GiB + 2 * MiB, size - 1}) {
    auto t = d->translate(DmaAddr(4 * GiB + off));
    ASSERT_TRUE(t.has_value()) << off;
    EXPECT_EQ(t->phys.value(), 64 * GiB + off);
    EXPECT_EQ(t->perm, kIommuReadWrite);
  }
  EXPECT_FALSE(d->translate(DmaAddr(4 * GiB + size)).has_value());
  EXPECT_FALSE(d->translate(DmaAddr(4 * GiB - 1)).has_value());
  // Misaligned physical side: 4 KiB leaves only.
  ASSERT_TRUE(d->map(DmaAddr(16 * GiB), PhysAddr(3 * MiB + 4096), 4 * MiB, kIommuRead).has_value());
  EXPECT_EQ(d->stats().mapped_4k, 1u + 1024);
  EXPECT_EQ(d->walk(DmaAddr(16 * GiB + 5000))->phys.value(), 3 * MiB + 4096 + 5000);
  EXPECT_EQ(d->walk(DmaAddr(16 * GiB))->perm, kIommuRead);
}

TEST(IoDomainTest, RandomMapUnmapMatchesAModel) {
  std::mt19937_64 rng(4);
  auto d = domain(true);
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> live;  // iova -> (phys, size)
  for (int step = 0; step < 3000; ++step) {
    if (live.empty() || rng() % 3) {
      const uint64_t pages = 1 + rng() % (rng() % 8 == 0 ? 2048 : 16);
      auto iova = d->iova().alloc(pages * 4096, uint64_t{1} << 40);
      ASSERT_TRUE(iova.has_value());
      const uint64_t phys = (rng() % (uint64_t{1} << 28)) << 12;
      ASSERT_TRUE(d->map(*iova, PhysAddr(phys), pages * 4096, kIommuWrite).has_value());
      live[iova->value()] = {phys, pages * 4096};
    } else {
      auto it = std::next(live.begin(), static_cast<long>(rng() % live.size()));
      const uint64_t probe = it->first + rng() % it->second.second;
      ASSERT_EQ(d->translate(DmaAddr(probe))->phys.value(), it->second.first + (probe - it->first));
      ASSERT_TRUE(d->unmap(DmaAddr(it->first), it->second.second).has_value());
      ASSERT_FALSE(d->translate(DmaAddr(probe)).has_value());  // strict: no stale entry
      ASSERT_TRUE(d->free_iova(DmaAddr(it->first), it->second.second).has_value());
      live.erase(it);
    }
  }
  for (const auto& [iova, v] : live) ASSERT_TRUE(d->unmap(DmaAddr(iova), v.second).has_value());
  const IoDomainStats s = d->stats();
  EXPECT_EQ(s.mapped_4k + s.mapped_2m + s.mapped_1g, 0u);
}

TEST(IoDomainTest, ConflictsRollBackAndBadUnmapsChangeNothing) {
  auto d = domain(true);
  ASSERT_TRUE(d->map(DmaAddr(0x10000), PhysAddr(0x80000), 0x4000, kIommuReadWrite).has_value());
  auto r = d->map(DmaAddr(0x8000), PhysAddr(0x100000), 0x10000, kIommuReadWrite);  // runs into it
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EEXIST);
  EXPECT_NE(r.error().message.find("0x10000 is already mapped"), std::string::npos);
  EXPECT_FALSE(d->walk(DmaAddr(0x8000)).has_value());  // the prefix was rolled back
  EXPECT_EQ(d->stats().mapped_4k, 4u);
  auto u = d->unmap(DmaAddr(0x10000), 0x8000);  // more than is mapped
  ASSERT_FALSE(u.has_value());
  EXPECT_EQ(u.error().code, ENOENT);
  EXPECT_TRUE(d->walk(DmaAddr(0x12000)).has_value());  // nothing changed
  ASSERT_TRUE(d->map(DmaAddr(2 * MiB), PhysAddr(4 * MiB), 2 * MiB, kIommuRead).has_value());
  auto split = d->unmap(DmaAddr(2 * MiB), 4096);
  ASSERT_FALSE(split.has_value());
  EXPECT_NE(split.error().message.find("split the 2 MiB mapping"), std::string::npos);
  EXPECT_EQ(d->map(DmaAddr(0x1000), PhysAddr(0x1000), 0x1000, IommuPerms{}).error().code, EINVAL);
  EXPECT_EQ(d->map(DmaAddr(0x1000), PhysAddr(0x1000), 0x1000, IommuPerms::from_bits(8)).error().code, EINVAL);  // no such permission
  EXPECT_EQ(d->map(DmaAddr(0x1000), PhysAddr(0x1000), 0x1000, kIommuMmio).error().code, EINVAL);  // MMIO is no access right
  static_assert(!std::is_convertible_v<int, IommuPerms>, "permissions are a typed set, not an integer");
  EXPECT_EQ(d->map(DmaAddr(0x1001), PhysAddr(0x1000), 0x1000, kIommuRead).error().code, EINVAL);
  EXPECT_EQ(d->map(DmaAddr(uint64_t{1} << 48), PhysAddr(0), 0x1000, kIommuRead).error().code, EINVAL);
  EXPECT_EQ(IoDomain::create(IoDomainOptions{.iova = {.granule = 8192, .start = 8192}}).error().code, EINVAL);
}

TEST(IoDomainTest, DeferredModeKeepsStaleTranslationsAndIovasUntilFlush) {
  auto d = domain(false, 4);
  auto iova = *d->iova().alloc(4096, uint64_t{1} << 40);
  ASSERT_TRUE(d->map(iova, PhysAddr(0x7000), 4096, kIommuReadWrite).has_value());
  ASSERT_TRUE(d->translate(iova).has_value());  // now cached in the IOTLB
  ASSERT_TRUE(d->unmap(iova, 4096).has_value());
  EXPECT_FALSE(d->walk(iova).has_value());      // the page table no longer maps it...
  EXPECT_TRUE(d->translate(iova).has_value());  // ...but the IOTLB still does (lazy mode)
  ASSERT_TRUE(d->free_iova(iova, 4096).has_value());
  // Not reusable before the flush: a new allocation gets another address.
  auto other = *d->iova().alloc(4096, uint64_t{1} << 40);
  EXPECT_NE(other, iova);
  d->flush();
  EXPECT_FALSE(d->translate(iova).has_value());
  EXPECT_GE(d->stats().iotlb_flushes, 1u);
  // A full queue flushes by itself.
  std::vector<DmaAddr> v;
  for (int i = 0; i < 4; ++i) v.push_back(*d->iova().alloc(4096, uint64_t{1} << 40));
  const uint64_t before = d->stats().iotlb_flushes;
  for (DmaAddr x : v) ASSERT_TRUE(d->free_iova(x, 4096).has_value());
  EXPECT_EQ(d->stats().iotlb_flushes, before + 1);
}

}  // namespace
}  // namespace physr
