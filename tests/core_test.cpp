#include "physr/core.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

// Counts operator new calls on this thread, so a test can check that a path does not allocate.
// ThreadSanitizer's runtime defines operator new itself, so there the count is off (and the
// test that reads it is skipped).
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PHYSR_NO_NEW_COUNT 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define PHYSR_NO_NEW_COUNT 1
#endif
namespace {
thread_local long g_allocations = 0;
}  // namespace
#ifndef PHYSR_NO_NEW_COUNT
[[gnu::noinline]] void* operator new(std::size_t n) {
  ++g_allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// Not inlined, so the compiler pairs these deletes with operator new rather than with malloc.
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif

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
  EXPECT_STREQ(errno_name(EISDIR), "EISDIR");  // beyond the common ones: glibc's name
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
  EXPECT_DEATH((void)half(3).value(), "physr: Result::value\\(\\) called on an error: EINVAL: odd");
  EXPECT_DEATH((void)*half(3), "Result::value\\(\\) called on an error: EINVAL: odd");
  EXPECT_DEATH(check_even(3).value(), "physr: Result::value\\(\\) called on an error: EINVAL: odd");
}

TEST(ResultDeathTest, ErrorOfValueAbortsWithMessage) {
  EXPECT_DEATH((void)half(4).error(), "physr: Result::error\\(\\) called on a value");
  EXPECT_DEATH((void)check_even(4).error(), "physr: Result::error\\(\\) called on a value");
  const Result<int> r = 1;
  EXPECT_DEATH((void)r.error().code, "physr: Result::error\\(\\) called on a value");
}

struct Topo {
  std::vector<int> functions;
  std::vector<std::string> names;
  std::string source;
};

TEST(ResultTest, SmallOnTheSuccessPath) {
  static_assert(sizeof(Status) == 8);
  static_assert(sizeof(Result<uint64_t>) == 16);
  static_assert(sizeof(Result<DmaAddr>) == 16);
  static_assert(sizeof(Result<bool>) == 16);
  static_assert(sizeof(Result<std::unique_ptr<int>>) == 16);
  static_assert(sizeof(Result<Topo>) == sizeof(Topo) + sizeof(void*));
  std::printf("sizeof: Error %zu, Status %zu, Result<uint64_t> %zu, Result<DmaAddr> %zu, Result<bool> %zu, Result<Topo> %zu (Topo %zu)\n",
              sizeof(Error), sizeof(Status), sizeof(Result<uint64_t>), sizeof(Result<DmaAddr>), sizeof(Result<bool>),
              sizeof(Result<Topo>), sizeof(Topo));
}

Result<DmaAddr> translate(uint64_t a) {
  if (a == 0) return make_error(EFAULT, "address 0");
  return DmaAddr(a + 0x1000);
}
Status check_addr(uint64_t a) {
  PHYSR_RETURN_IF_ERROR(translate(a));
  return {};
}
Result<uint64_t> offset_of(uint64_t a) {
  PHYSR_ASSIGN_OR_RETURN(DmaAddr d, translate(a));
  PHYSR_RETURN_IF_ERROR(check_addr(a));
  return d - DmaAddr(0x1000);
}

TEST(ResultTest, SuccessPathDoesNotAllocate) {
#ifdef PHYSR_NO_NEW_COUNT
  GTEST_SKIP() << "operator new is the sanitizer's here: allocations are not counted";
#endif
  const long before = g_allocations;
  uint64_t sum = 0;
  for (uint64_t a = 1; a < 100; ++a) {
    auto r = offset_of(a);
    Result<uint64_t> moved = std::move(r);
    sum += moved.value();
    Status s = check_addr(a);
    Status copy = s;
    EXPECT_TRUE(copy.has_value());
  }
  EXPECT_EQ(g_allocations, before);
  EXPECT_EQ(sum, 99u * 100 / 2);
  const long at_failure = g_allocations;
  EXPECT_EQ(offset_of(0).error().message, "address 0");
  EXPECT_EQ(g_allocations, at_failure + 1);  // the failure allocates once, where it is made
}

TEST(ResultTest, MoveOnlyValue) {
  auto make = [](int v) -> Result<std::unique_ptr<int>> {
    if (v < 0) return make_error(ERANGE, "negative");
    return std::make_unique<int>(v);
  };
  auto twice = [&](int v) -> Result<std::unique_ptr<int>> {
    PHYSR_ASSIGN_OR_RETURN(auto p, make(v));
    *p *= 2;
    return p;
  };
  static_assert(!std::is_copy_constructible_v<Result<std::unique_ptr<int>>>);
  static_assert(std::is_nothrow_move_constructible_v<Result<std::unique_ptr<int>>>);
  Result<std::unique_ptr<int>> r = twice(21);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r.value(), 42);
  std::unique_ptr<int> taken = std::move(r).value();
  EXPECT_EQ(*taken, 42);
  EXPECT_EQ(twice(-1).error().code, ERANGE);
  EXPECT_EQ(twice(-1).error().message, "negative");
  std::vector<Result<std::unique_ptr<int>>> v;
  for (int i = 0; i < 20; ++i) v.push_back(make(i % 3 ? i : -i - 1));  // reallocates: moves values and errors
  for (int i = 0; i < 20; ++i) EXPECT_EQ(v[static_cast<size_t>(i)].has_value(), i % 3 != 0);
  EXPECT_EQ(*v[1].value(), 1);
  EXPECT_EQ(v[3].error().message, "negative");
}

TEST(ResultTest, LargeValueCopiesAndMoves) {
  Result<Topo> r = Topo{{1, 2, 3}, {"a", "b"}, "machine.toml"};
  Result<Topo> copy = r;
  EXPECT_EQ(copy->functions.size(), 3u);
  EXPECT_EQ(r->names[1], "b");
  Result<Topo> moved = std::move(r);
  EXPECT_EQ(moved->source, "machine.toml");
  moved = make_error(ENOENT, "gone");
  EXPECT_EQ(moved.error().code, ENOENT);
  moved = copy;
  EXPECT_EQ(moved.value().functions, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(Result<Topo>(make_error(EIO, "x")).value_or(Topo{{7}, {}, ""}).functions[0], 7);
}

TEST(ResultTest, BoolValueIsNotTheCheck) {
  Result<bool> no = false;
  Result<bool> bad = make_error(EINVAL, "not a bool");
  EXPECT_TRUE(no.has_value());
  EXPECT_FALSE(no.value());
  EXPECT_FALSE(bad);
  EXPECT_TRUE(bad.value_or(true));
}

TEST(ResultTest, CopiesAndMovesOfErrors) {
  Status s = make_error(EBUSY, "in use");
  Status copy = s;  // a copy holds its own error
  EXPECT_EQ(s.error().message, "in use");
  EXPECT_EQ(copy.error().to_string(), "EBUSY: in use");
  Status first;
  if (first) first = copy;  // first-error-wins, as the unmap loops do
  EXPECT_EQ(first.error().code, EBUSY);
  Status moved = std::move(s);
  EXPECT_EQ(moved.error().message, "in use");
  EXPECT_FALSE(s.has_value());  // NOLINT: a moved-from failure stays a failure
  Error e = std::move(moved).error();
  EXPECT_EQ(e.message, "in use");
  Result<int> r = make_error(ENODEV, "no device");
  Result<int> r2 = std::move(r);
  EXPECT_FALSE(r.has_value());  // NOLINT
  r = std::move(r2);
  EXPECT_EQ(r.error().message, "no device");
  EXPECT_EQ(std::move(r).error().code, ENODEV);
}

TEST(ErrorTest, WithContextPrefixesAndKeepsTheCode) {
  const Error e = make_error(EREMOTEIO, "no P2P path");
  const Error c = e.with_context("0000:01:00.0");
  EXPECT_EQ(c.code, EREMOTEIO);
  EXPECT_EQ(c.message, "0000:01:00.0: no P2P path");
  EXPECT_EQ(e.message, "no P2P path");
  EXPECT_EQ(Error(e).with_context("a").with_context("b").to_string(), "EREMOTEIO: b: a: no P2P path");
}

// -------------------------------------------------------------------------------------
// Propagation macros

Status fail_if(bool fail) {
  if (fail) return make_error(EBUSY, "busy");
  return {};
}
Result<int> value_if(bool fail, int v) {
  if (fail) return make_error(ENOSPC, "full");
  return v;
}

TEST(MacroTest, ReturnIfErrorFromStatusAndResultIntoEither) {
  auto into_status = [](bool a, bool b) -> Status {
    PHYSR_RETURN_IF_ERROR(fail_if(a));
    PHYSR_RETURN_IF_ERROR(value_if(b, 1));
    return {};
  };
  auto into_result = [](bool a, bool b) -> Result<std::string> {
    PHYSR_RETURN_IF_ERROR(fail_if(a));
    PHYSR_RETURN_IF_ERROR(value_if(b, 1));
    return std::string("ok");
  };
  EXPECT_TRUE(into_status(false, false));
  EXPECT_EQ(into_status(true, false).error().to_string(), "EBUSY: busy");
  EXPECT_EQ(into_status(false, true).error().to_string(), "ENOSPC: full");
  EXPECT_EQ(into_result(false, false).value(), "ok");
  EXPECT_EQ(into_result(true, true).error().to_string(), "EBUSY: busy");
  EXPECT_EQ(into_result(false, true).error().to_string(), "ENOSPC: full");
  // PHYSR_TRY is the same macro.
  auto tried = []() -> Status {
    PHYSR_TRY(fail_if(true));
    return {};
  };
  EXPECT_EQ(tried().error().code, EBUSY);
}

TEST(MacroTest, ReturnIfErrorOnAnLvalueLeavesItsError) {
  Status kept = make_error(EIO, "disk");
  auto pass = [&]() -> Status {
    PHYSR_RETURN_IF_ERROR(kept);
    return {};
  };
  EXPECT_EQ(pass().error().message, "disk");
  EXPECT_EQ(kept.error().message, "disk");
}

TEST(MacroTest, AssignOrReturnDeclaresOrAssigns) {
  auto sum = [](bool fail_second) -> Result<int> {
    PHYSR_ASSIGN_OR_RETURN(auto a, value_if(false, 40));
    int b = 0;
    PHYSR_ASSIGN_OR_RETURN(b, value_if(fail_second, 2));
    PHYSR_ASSIGN_OR_RETURN(const int c, value_if(false, 0));  // two on one scope: unique names
    return a + b + c;
  };
  EXPECT_EQ(sum(false).value(), 42);
  EXPECT_EQ(sum(true).error().to_string(), "ENOSPC: full");
  auto into_status = []() -> Status {
    PHYSR_ASSIGN_OR_RETURN([[maybe_unused]] int v, value_if(true, 1));
    return {};
  };
  EXPECT_EQ(into_status().error().code, ENOSPC);
}

TEST(MacroTest, ContextOnlyOnFailureAndKeepsTheCode) {
  int evaluated = 0;
  auto ctx = [&]() {
    ++evaluated;
    return std::string("machine.toml:3");
  };
  auto check = [&](bool fail) -> Status {
    PHYSR_RETURN_IF_ERROR_CTX(fail_if(fail), ctx());
    return {};
  };
  auto get = [&](bool fail) -> Result<int> {
    PHYSR_ASSIGN_OR_RETURN_CTX(auto v, value_if(fail, 5), ctx() + ": function[" + std::to_string(0) + "]");
    return v;
  };
  EXPECT_TRUE(check(false));
  EXPECT_EQ(get(false).value(), 5);
  EXPECT_EQ(evaluated, 0);
  const Status s = check(true);
  EXPECT_EQ(s.error().code, EBUSY);
  EXPECT_EQ(s.error().message, "machine.toml:3: busy");
  EXPECT_EQ(evaluated, 1);
  EXPECT_EQ(get(true).error().to_string(), "ENOSPC: machine.toml:3: function[0]: full");
  EXPECT_EQ(evaluated, 2);
}

TEST(MacroTest, ContextOnAMoveOnlyValue) {
  auto make = [](bool fail) -> Result<std::unique_ptr<std::string>> {
    if (fail) return make_error(ENOMEM, "no memory");
    return std::make_unique<std::string>("pool");
  };
  auto wrap = [&](bool fail) -> Result<size_t> {
    PHYSR_ASSIGN_OR_RETURN_CTX(std::unique_ptr<std::string> p, make(fail), "bounce");
    return p->size();
  };
  EXPECT_EQ(wrap(false).value(), 4u);
  EXPECT_EQ(wrap(true).error().to_string(), "ENOMEM: bounce: no memory");
}

// -------------------------------------------------------------------------------------
// PHYSR_ASSERT

#if PHYSR_ASSERTS_ENABLED
TEST(AssertDeathTest, FailurePrintsWhereWhatAndWhy) {
  int pages = 3;
  EXPECT_DEATH(PHYSR_ASSERT(pages % 2 == 0, "pages come in pairs"),
               "physr: .*core_test\\.cpp:[0-9]+: assertion 'pages % 2 == 0' failed: pages come in pairs");
  PHYSR_ASSERT(pages == 3, std::string("holds"));
}
#else
TEST(AssertTest, OffInReleaseDoesNotEvaluate) {
  int evaluated = 0;
  PHYSR_ASSERT(++evaluated == 0, "never evaluated");
  EXPECT_EQ(evaluated, 0);
}
#endif

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

namespace physr {
namespace {

enum class Color : uint8_t { red = 1, green = 2, blue = 4 };
using Colors = Flags<Color>;

TEST(FlagsTest, SetsTestCombineAndStayTyped) {
  constexpr Colors none{};
  Colors c = Color::red;
  EXPECT_TRUE(none.empty());
  EXPECT_FALSE(static_cast<bool>(none));
  EXPECT_TRUE(static_cast<bool>(c & Color::red));
  EXPECT_FALSE(static_cast<bool>(c & Color::green));
  c |= Color::blue;
  EXPECT_EQ(c.bits(), 5);
  EXPECT_TRUE(c.has(Colors(Color::red) | Color::blue));
  EXPECT_FALSE(c.has(Colors(Color::red) | Color::green));
  c &= ~Colors(Color::red);
  EXPECT_EQ(c, Colors(Color::blue));
  EXPECT_EQ(Colors::from_bits(6), Colors(Color::green) | Color::blue);
  // Integers and other enums do not convert: the set is a type of its own.
  static_assert(!std::is_convertible_v<int, Colors>);
  static_assert(!std::is_convertible_v<Colors, uint8_t>);
  enum class Other : uint8_t { x = 1 };
  static_assert(!std::is_convertible_v<Flags<Other>, Colors>);
  // has(set, bit), the free form, takes a flag or a set.
  EXPECT_TRUE(has(c, Color::blue));
  EXPECT_FALSE(has(c, Colors(Color::blue) | Color::red));
  // Stored and passed as its underlying integer.
  static_assert(sizeof(Colors) == sizeof(uint8_t) && std::is_trivially_copyable_v<Colors>);
}

}  // namespace
}  // namespace physr
