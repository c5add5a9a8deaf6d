// A consumer that reads liburcu's LGPL header (its static inline read side, with
// urcu_memb_read_lock a macro) before physr's, linked into the same program as
// provider_test.cpp: the header compiles, and a ReadGuard takes liburcu's read lock, the
// one this file's inline API sees and nests with.
#define _LGPL_SOURCE
#include <urcu/urcu-memb.h>

#include "physr/provider.hpp"

#include <gtest/gtest.h>

namespace physr {
namespace {

TEST(ProviderUrcuLgplTest, GuardTakesLiburcusReadLockWhenTheLgplHeaderCameFirst) {
  ProviderRegistry reg;
  ProviderDesc d;
  d.phys = PhysSpan{PhysAddr(uint64_t{1} << 40), 4096};
  const auto id = reg.add(std::move(d));
  ASSERT_TRUE(id.has_value()) << id.error().to_string();
  {
    ProviderRegistry::ReadGuard g;  // registers this thread with liburcu on first use
    EXPECT_TRUE(urcu_memb_read_ongoing());
    {
      ProviderRegistry::ReadGuard nested;
      EXPECT_TRUE(urcu_memb_read_ongoing());
    }
    EXPECT_TRUE(urcu_memb_read_ongoing());
    const Provider* p = reg.find(PhysAddr((uint64_t{1} << 40) + 100));
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p->id(), *id);
  }
  EXPECT_FALSE(urcu_memb_read_ongoing());
  // The LGPL inline read side and the guard's are the same lock: mixing them nests.
  urcu_memb_read_lock();  // the macro: _urcu_memb_read_lock
  {
    ProviderRegistry::ReadGuard g;
    EXPECT_TRUE(urcu_memb_read_ongoing());
  }
  EXPECT_TRUE(urcu_memb_read_ongoing());
  urcu_memb_read_unlock();
  EXPECT_FALSE(urcu_memb_read_ongoing());
}

}  // namespace
}  // namespace physr
