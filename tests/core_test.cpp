#include "physr/core.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <type_traits>

namespace physr {
namespace {

TEST(ParseSizeTest, AcceptsPlainHexAndBinaryUnits) {
  EXPECT_EQ(parse_size("4096").value(), 4096u);
  EXPECT_EQ(parse_size("0x1000").value(), 4096u);
  EXPECT_EQ(parse_size("4K").value(), 4096u);
  EXPECT_EQ(parse_size("4KiB").value(), 4096u);
  EXPECT_EQ(parse_size("64k").value(), 65536u);
  EXPECT_EQ(parse_size("2M").value(), 2 * MiB);
  EXPECT_EQ(parse_size(" 1G ").value(), GiB);
  EXPECT_EQ(parse_size("3TB").value(), 3 * TiB);
  EXPECT_EQ(parse_size("12B").value(), 12u);
  EXPECT_EQ(parse_size("18446744073709551615").value(), std::numeric_limits<uint64_t>::max());
}

TEST(ParseSizeTest, RejectsMalformedTextNamingIt) {
  for (const char* bad : {"", "  ", "K", "4X", "4KK", "4 K B", "0x", "-1", "18446744073709551616", "16384P", "4Kib2"}) {
    auto r = parse_size(bad);
    ASSERT_FALSE(r.has_value()) << "'" << bad << "' parsed as " << r.value();
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find(std::string("'") + bad + "'"), std::string::npos) << r.error().message;
  }
}

TEST(ParseSizeTest, SaysWhyANumberIsRejected) {
  EXPECT_NE(parse_size("0x1ffffffffffffffff").error().message.find("does not fit"), std::string::npos);
  EXPECT_NE(parse_size("99999999999999999999").error().message.find("does not fit"), std::string::npos);
  EXPECT_NE(parse_size("0xZZ").error().message.find("expected a number"), std::string::npos);
  EXPECT_NE(parse_size("16384P").error().message.find("does not fit"), std::string::npos);
  std::string_view t = "0x1fK";
  EXPECT_EQ(consume_uint(t).value(), 0x1fu);
  EXPECT_EQ(t, "K");
  t = "ff";
  EXPECT_FALSE(consume_uint(t).has_value());
  EXPECT_EQ(t, "ff");  // untouched on failure
  EXPECT_EQ(consume_uint(t, 16).value(), 0xffu);
}

TEST(FormatSizeTest, UsesLargestDividingUnit) {
  EXPECT_EQ(format_size(0), "0 B");
  EXPECT_EQ(format_size(1536), "1536 B");
  EXPECT_EQ(format_size(4096), "4 KiB");
  EXPECT_EQ(format_size(3 * GiB), "3 GiB");
  EXPECT_EQ(format_size(uint64_t{1} << 63), "8 EiB");
}

TEST(ErrorTest, NamesCodes) {
  EXPECT_STREQ(errno_name(EREMOTEIO), "EREMOTEIO");
  EXPECT_STREQ(errno_name(EEXIST), "EEXIST");
  EXPECT_STREQ(errno_name(123456), "E?");
  EXPECT_EQ(make_error(ENOMEM, "pool empty").to_string(), "ENOMEM: pool empty");
}

Result<int> half(int x) {
  if (x % 2) return make_error(EINVAL, "odd");
  return x / 2;
}
Result<int> quarter(int x) {
  auto h = half(x);
  if (!h) return std::move(h).error();
  return half(*h);
}
Status check_even(int x) {
  PHYSR_TRY(half(x));
  return {};
}

TEST(ResultTest, CarriesValueOrError) {
  EXPECT_EQ(quarter(8).value(), 2);
  EXPECT_EQ(quarter(6).error().code, EINVAL);
  EXPECT_EQ(quarter(6).value_or(-1), -1);
  EXPECT_TRUE(check_even(4).has_value());
  EXPECT_EQ(check_even(3).error().message, "odd");
}

TEST(ResultDeathTest, ValueOfErrorAbortsWithMessage) {
  EXPECT_DEATH((void)half(3).value(), "EINVAL: odd");
}

TEST(AddrTest, StrongTypesDoNotMix) {
  static_assert(!std::is_convertible_v<PhysAddr, DmaAddr>);
  static_assert(!std::is_convertible_v<uint64_t, PhysAddr>);
  static_assert(!std::is_convertible_v<BusAddr, PhysAddr>);
  PhysAddr a(0x1000);
  EXPECT_EQ((a + 0x10).value(), 0x1010u);
  EXPECT_EQ(PhysAddr(0x3000) - a, 0x2000u);
  EXPECT_LT(a, PhysAddr(0x1001));
}

TEST(AddrRangeTest, HalfOpenBoundaries) {
  PhysSpan r{PhysAddr(0x1000), 0x1000};
  EXPECT_TRUE(r.contains(PhysAddr(0x1000)));
  EXPECT_TRUE(r.contains(PhysAddr(0x1fff)));
  EXPECT_FALSE(r.contains(PhysAddr(0x2000)));
  EXPECT_FALSE(r.contains(PhysAddr(0xfff)));
  EXPECT_EQ(r.last().value(), 0x1fffu);
  PhysSpan next{PhysAddr(0x2000), 0x10};
  EXPECT_FALSE(r.overlaps(next));
  EXPECT_TRUE(r.adjacent(next));
  EXPECT_TRUE(next.adjacent(r));
  EXPECT_TRUE(r.overlaps(PhysSpan{PhysAddr(0x1fff), 1}));
  EXPECT_FALSE(r.overlaps(PhysSpan{PhysAddr(0x1500), 0}));
  EXPECT_TRUE(r.contains(PhysSpan{PhysAddr(0x1800), 0x800}));
  EXPECT_FALSE(r.contains(PhysSpan{PhysAddr(0x1800), 0x801}));
}

TEST(AddrRangeTest, RangeEndingAtTopOfSpace) {
  const uint64_t top = std::numeric_limits<uint64_t>::max();
  PhysSpan r{PhysAddr(top - 0xfff), 0x1000};  // ends exactly at 2^64
  EXPECT_FALSE(r.wraps());
  EXPECT_TRUE(r.contains(PhysAddr(top)));
  EXPECT_EQ(r.last().value(), top);
  EXPECT_FALSE(r.adjacent(PhysSpan{PhysAddr(0), 0x10}));  // no wrap-around adjacency
  EXPECT_TRUE(r.overlaps(PhysSpan{PhysAddr(top), 1}));
  PhysSpan w{PhysAddr(top - 0xfff), 0x1001};
  EXPECT_TRUE(w.wraps());
}

}  // namespace
}  // namespace physr
