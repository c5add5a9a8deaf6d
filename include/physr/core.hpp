// physr core: strong address types, half-open address ranges, errno-compatible results.
//
// Design rationale
// - One strong type per address space (CPU physical, DMA, PCI bus). They never convert
//   implicitly; the functions that convert name the rule they apply (see provider/dma).
// - Ranges are half-open [base, base + size) and stored as (base, size), so a range that
//   ends at the top of the 64-bit space is representable and no end computation overflows.
// - Errors are errno codes with a message, returned in a must-use Result<T> shaped like
//   std::expected (has_value/value/error), so moving to std::expected later is mechanical.
//   No exception crosses the public API; the success path never allocates.
#pragma once

#include <cerrno>
#include <compare>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace physr {

// ---------------------------------------------------------------------------------------
// Units
inline constexpr unsigned kPageShift = 12;
inline constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;
inline constexpr uint64_t KiB = uint64_t{1} << 10;
inline constexpr uint64_t MiB = uint64_t{1} << 20;
inline constexpr uint64_t GiB = uint64_t{1} << 30;
inline constexpr uint64_t TiB = uint64_t{1} << 40;
/// The physical address space every layer accepts (x86-64 and Arm64 stop at 52 bits):
/// memory regions, provider apertures, IOMMU page-table outputs and machine-file BARs all
/// lie below kPhysAddrLimit. (Range lists can encode more: see range.hpp.)
inline constexpr unsigned kPhysAddrBits = 52;
inline constexpr uint64_t kPhysAddrLimit = uint64_t{1} << kPhysAddrBits;


// ---------------------------------------------------------------------------------------
// Errors

/// Human name of an errno value used by physr ("EREMOTEIO"), or "E?" for others.
const char* errno_name(int code) noexcept;

/// An errno-compatible code with a message that names the input and the problem.
struct Error {
  int code = 0;
  std::string message;

  /// "EINVAL: message".
  std::string to_string() const;
};

/// Builds an Error; the message should name the bad input and what is wrong with it.
inline Error make_error(int code, std::string message) { return Error{code, std::move(message)}; }

/// The value of a fallible operation, or the Error that stopped it. Must be checked.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  /// The value; calling it on an error is a bug and aborts with the error's message.
  T& value() & { check(); return std::get<0>(v_); }
  const T& value() const& { check(); return std::get<0>(v_); }
  T&& value() && { check(); return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  /// The error; calling it on a value is a bug and aborts.
  const Error& error() const& {
    if (has_value()) std::abort();
    return std::get<1>(v_);
  }
  Error&& error() && {
    if (has_value()) std::abort();
    return std::get<1>(std::move(v_));
  }

  template <class U>
  T value_or(U&& fallback) const& {
    return has_value() ? std::get<0>(v_) : static_cast<T>(std::forward<U>(fallback));
  }

 private:
  void check() const;
  std::variant<T, Error> v_;
};

/// Success or an Error, for operations with no value.
template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : e_(std::move(error)) {}  // NOLINT: implicit by design

  bool has_value() const noexcept { return !e_.has_value(); }
  explicit operator bool() const noexcept { return has_value(); }
  void value() const;
  const Error& error() const& {
    if (!e_) std::abort();
    return *e_;
  }

 private:
  std::optional<Error> e_;
};

using Status = Result<void>;

namespace detail {
[[noreturn]] void die_on_error_access(const Error& e);
}  // namespace detail

template <class T>
void Result<T>::check() const {
  if (!has_value()) detail::die_on_error_access(std::get<1>(v_));
}
inline void Result<void>::value() const {
  if (e_) detail::die_on_error_access(*e_);
}

/// Propagates an error from a Result-returning expression out of the calling function.
#define PHYSR_TRY(expr)                                   \
  do {                                                    \
    auto physr_try_r_ = (expr);                           \
    if (!physr_try_r_.has_value())                        \
      return std::move(physr_try_r_).error();             \
  } while (0)

/// Consumes an unsigned integer from the front of `text`: base 10, or hex after a "0x"
/// prefix when base is 0; base 16 reads bare hex digits. nullopt (text untouched) when
/// there is no digit or the value overflows 64 bits. The one number reader physr's parsers share.
std::optional<uint64_t> consume_uint(std::string_view& text, unsigned base = 0);

/// Parses a byte count such as "4096", "4K", "64KiB", "2M", "1G", "0x1000" (binary units).
/// Fails with EINVAL naming the text when it is empty, malformed or overflows 64 bits.
Result<uint64_t> parse_size(std::string_view text);

/// Formats a byte count with the largest binary unit that divides it ("4 KiB", "1536 B").
std::string format_size(uint64_t bytes);

/// "0x1f000": how addresses appear in physr's messages.
std::string format_hex(uint64_t value);

// ---------------------------------------------------------------------------------------
// Strong addresses

/// A 64-bit address in the address space named by Tag. Arithmetic is by byte offsets only;
/// the difference of two addresses is a byte count. No implicit conversion to or from
/// integers or other address spaces.
template <class Tag>
class Addr {
 public:
  constexpr Addr() = default;
  constexpr explicit Addr(uint64_t v) : v_(v) {}
  constexpr uint64_t value() const noexcept { return v_; }
  friend constexpr auto operator<=>(Addr, Addr) = default;
  constexpr Addr operator+(uint64_t off) const noexcept { return Addr(v_ + off); }
  constexpr Addr operator-(uint64_t off) const noexcept { return Addr(v_ - off); }
  constexpr uint64_t operator-(Addr other) const noexcept { return v_ - other.v_; }
  constexpr Addr& operator+=(uint64_t off) noexcept { v_ += off; return *this; }

 private:
  uint64_t v_ = 0;
};

struct PhysTag {};
struct DmaTag {};
struct BusTag {};
/// A CPU physical address (what the CPU puts on its memory bus).
using PhysAddr = Addr<PhysTag>;
/// An address a device uses for DMA: an IOVA, a direct-mapped address or a bus address.
using DmaAddr = Addr<DmaTag>;
/// A PCI bus address (what a peer device decodes on the PCI fabric).
using BusAddr = Addr<BusTag>;

// ---------------------------------------------------------------------------------------
// Half-open address ranges

/// [base, base + size) in one address space. size 0 is an empty range that contains
/// nothing. A range may end exactly at 2^64 (base + size wraps to 0): last() is the
/// inclusive last byte and never overflows.
template <class A>
struct AddrRange {
  A base{};
  uint64_t size = 0;

  constexpr bool empty() const noexcept { return size == 0; }
  /// Inclusive last byte; only meaningful when !empty().
  constexpr A last() const noexcept { return base + (size - 1); }
  /// True when the range would run past 2^64 (base + size overflows beyond the top).
  constexpr bool wraps() const noexcept { return size != 0 && base.value() + (size - 1) < base.value(); }
  constexpr bool contains(A a) const noexcept { return a.value() - base.value() < size; }
  constexpr bool contains(const AddrRange& o) const noexcept {
    return o.size == 0 ? false : contains(o.base) && o.size <= size - (o.base - base);
  }
  constexpr bool overlaps(const AddrRange& o) const noexcept {
    if (empty() || o.empty()) return false;
    return base <= o.base ? o.base - base < size : base - o.base < o.size;
  }
  /// True when one range ends exactly where the other begins (they could merge).
  constexpr bool adjacent(const AddrRange& o) const noexcept {
    if (empty() || o.empty()) return false;
    return (base + size == o.base && last() < o.base) || (o.base + o.size == base && o.last() < base);
  }
  friend constexpr bool operator==(const AddrRange&, const AddrRange&) = default;
};

using PhysSpan = AddrRange<PhysAddr>;
using DmaSpan = AddrRange<DmaAddr>;
using BusSpan = AddrRange<BusAddr>;

}  // namespace physr
