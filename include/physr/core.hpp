// physr core: strong address types, half-open address ranges, errno-compatible results.
//
// Design rationale
// - One strong type per address space (CPU physical, DMA, PCI bus). They never convert
//   implicitly; the functions that convert name the rule they apply (see provider/dma).
// - Ranges are half-open [base, base + size) and stored as (base, size), so a range that
//   ends at the top of the 64-bit space is representable and no end computation overflows.
// - Errors are errno codes with a message, returned in a must-use Result<T> shaped like
//   std::expected (has_value/value/error), so moving to std::expected later is mechanical.
//   A result is its value plus one pointer (null on success) to an out-of-line error.
//   No exception crosses the public API; the success path never allocates.
#pragma once

#include <cerrno>
#include <compare>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <new>
#include <type_traits>
#include <utility>

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
//
// Representation: a Result<T> holds its T and one pointer, null on success; a failure puts
// its Error on the heap and the pointer points at it. So Status is one pointer and
// Result<T> is T plus one pointer (16 B for an 8-byte T), the success path never allocates
// and the failure path allocates once, where the error is made. Propagating an error with
// the macros below passes the pointer on without copying the Error.

/// Human name of an errno value used by physr ("EREMOTEIO"), or "E?" for others.
const char* errno_name(int code) noexcept;

/// An errno-compatible code with a message that names the input and the problem.
struct Error {
  int code = 0;
  std::string message;

  /// "EINVAL: message".
  std::string to_string() const;

  /// The same code with the message "prefix: message": the one way physr adds context
  /// (the file, the key, the device) to an error that a callee returned.
  Error with_context(std::string_view prefix) const&;
  Error with_context(std::string_view prefix) &&;
};

/// Builds an Error; the message should name the bad input and what is wrong with it.
inline Error make_error(int code, std::string message) { return Error{code, std::move(message)}; }

template <class T>
class Result;

namespace detail {

// Out of line: the failure path is cold and keeps the inline code small.
Error* new_error(Error&& e);              // moves e onto the heap
Error* copy_error(const Error* e);        // a copy of *e for a copied result
void delete_error(Error* e) noexcept;     // frees e (never the moved-from error)
Error take_error(Error* e);               // moves the message out (copies the moved-from error)
Error* add_context(Error* e, std::string_view prefix);  // "prefix: message" in place
/// The shared, immutable error that a failed result holds once its error was moved out of it.
Error* moved_from_error() noexcept;
[[noreturn]] void die_value_on_error(const Error& e);
[[noreturn]] void die_error_on_value();

/// A failed result's error on its way out of a function: owns the heap Error, and converts
/// to any Result<U> or Status without copying it. Made by the PHYSR_RETURN_IF_ERROR family.
class [[nodiscard]] Failure {
 public:
  explicit Failure(Error* e) noexcept : e_(e) {}
  Failure(Failure&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Failure& operator=(Failure&&) = delete;
  ~Failure() {
    if (e_) delete_error(e_);
  }
  Error* release() noexcept { return std::exchange(e_, nullptr); }

 private:
  Error* e_;
};

/// Reaches the error pointer of a failed Result or Status for the macros.
struct ResultAccess {
  template <class R>
  static Error* take(R& r) noexcept { return std::exchange(r.err_, moved_from_error()); }
  template <class R>
  static const Error* peek(const R& r) noexcept { return r.err_; }
};

/// The error of a failed result `r` as a Failure: moved out when r is an rvalue, copied
/// when it is an lvalue (which keeps its error).
template <class R>
Failure propagate(R&& r) {
  if constexpr (std::is_lvalue_reference_v<R>) return Failure(copy_error(ResultAccess::peek(r)));
  else return Failure(ResultAccess::take(r));
}
template <class R>
Failure propagate(R&& r, std::string_view context) {
  return Failure(add_context(propagate(std::forward<R>(r)).release(), context));
}

}  // namespace detail

/// The value of a fallible operation, or the Error that stopped it. Must be checked.
/// Accessing the value of an error, or the error of a value, is a bug: it prints what
/// happened to stderr and aborts, in every build.
template <class T>
class [[nodiscard]] Result {
  static_assert(std::is_object_v<T> && !std::is_array_v<T>, "Result<T> holds an object type (no references or arrays)");

 public:
  Result(T value) noexcept(std::is_nothrow_move_constructible_v<T>) : err_(nullptr) {  // NOLINT: implicit by design
    ::new (static_cast<void*>(&val_)) T(std::move(value));
  }
  Result(Error error) : err_(detail::new_error(std::move(error))) {}  // NOLINT: implicit by design
  Result(detail::Failure failure) noexcept : err_(failure.release()) {}  // NOLINT: implicit by design

  Result(const Result& o) requires std::is_copy_constructible_v<T> : err_(nullptr) {
    if (o.err_) err_ = detail::copy_error(o.err_);
    else ::new (static_cast<void*>(&val_)) T(o.val_);
  }
  Result(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) : err_(o.err_) {
    if (!err_) ::new (static_cast<void*>(&val_)) T(std::move(o.val_));
    else o.err_ = detail::moved_from_error();
  }
  Result& operator=(const Result& o) requires std::is_copy_constructible_v<T> {
    if (this != &o) *this = Result(o);
    return *this;
  }
  Result& operator=(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) {
    if (this != &o) {
      destroy();
      if (!o.err_) {
        ::new (static_cast<void*>(&val_)) T(std::move(o.val_));
        err_ = nullptr;
      } else {
        err_ = std::exchange(o.err_, detail::moved_from_error());
      }
    }
    return *this;
  }
  ~Result() {
    if (err_) detail::delete_error(err_);
    else val_.~T();
  }

  bool has_value() const noexcept { return err_ == nullptr; }
  explicit operator bool() const noexcept { return has_value(); }

  /// The value; calling it on an error is a bug and aborts with the error's message.
  T& value() & { check(); return val_; }
  const T& value() const& { check(); return val_; }
  T&& value() && { check(); return std::move(val_); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  /// The error; calling it on a value is a bug and aborts.
  const Error& error() const& {
    if (!err_) [[unlikely]] detail::die_error_on_value();
    return *err_;
  }
  Error error() && {
    if (!err_) [[unlikely]] detail::die_error_on_value();
    return detail::take_error(err_);
  }

  template <class U>
  T value_or(U&& fallback) const& {
    return has_value() ? val_ : static_cast<T>(std::forward<U>(fallback));
  }
  template <class U>
  T value_or(U&& fallback) && {
    return has_value() ? std::move(val_) : static_cast<T>(std::forward<U>(fallback));
  }

 private:
  friend struct detail::ResultAccess;
  void check() const {
    if (err_) [[unlikely]] detail::die_value_on_error(*err_);
  }
  // Leaves the moved-from error in err_: the object stays destructible if a move throws.
  void destroy() noexcept {
    if (err_) detail::delete_error(err_);
    else val_.~T();
    err_ = detail::moved_from_error();
  }

  union {
    T val_;  // alive when err_ is null
  };
  Error* err_;  // null: a value; else the heap error this result owns (or the moved-from error)
};

/// Success or an Error, for operations with no value. Default-constructed: success.
template <>
class [[nodiscard]] Result<void> {
 public:
  Result() noexcept = default;
  Result(Error error) : err_(detail::new_error(std::move(error))) {}  // NOLINT: implicit by design
  Result(detail::Failure failure) noexcept : err_(failure.release()) {}  // NOLINT: implicit by design
  Result(const Result& o) : err_(o.err_ ? detail::copy_error(o.err_) : nullptr) {}
  Result(Result&& o) noexcept : err_(o.err_ ? std::exchange(o.err_, detail::moved_from_error()) : nullptr) {}
  Result& operator=(const Result& o) {
    if (this != &o) *this = Result(o);
    return *this;
  }
  Result& operator=(Result&& o) noexcept {
    if (this != &o) {
      if (err_) detail::delete_error(err_);
      err_ = o.err_ ? std::exchange(o.err_, detail::moved_from_error()) : nullptr;
    }
    return *this;
  }
  ~Result() {
    if (err_) detail::delete_error(err_);
  }

  bool has_value() const noexcept { return err_ == nullptr; }
  explicit operator bool() const noexcept { return has_value(); }
  /// Checks for success; calling it on an error is a bug and aborts with the error's message.
  void value() const {
    if (err_) [[unlikely]] detail::die_value_on_error(*err_);
  }
  const Error& error() const& {
    if (!err_) [[unlikely]] detail::die_error_on_value();
    return *err_;
  }
  Error error() && {
    if (!err_) [[unlikely]] detail::die_error_on_value();
    return detail::take_error(err_);
  }

 private:
  friend struct detail::ResultAccess;
  Error* err_ = nullptr;  // null: success; else the heap error this status owns
};

using Status = Result<void>;

static_assert(sizeof(Status) == sizeof(void*), "Status is one pointer");
static_assert(sizeof(Result<uint64_t>) <= 16, "Result of an 8-byte value is the value and one pointer");

// Propagation macros, in Abseil's shape. The enclosing function returns Status or any
// Result<U>. `expr` is a Status or a Result; an rvalue's error is passed on without a copy.
// The context forms prefix the message with "context: " (Error::with_context, the code is
// kept) and evaluate `context` only on failure.
//
//   PHYSR_RETURN_IF_ERROR(topo.validate());
//   PHYSR_RETURN_IF_ERROR_CTX(t.validate(), source);             // "source: <message>"
//   PHYSR_ASSIGN_OR_RETURN(auto dev, machine.device(f));
//   PHYSR_ASSIGN_OR_RETURN(pfn, alloc_slow(k));                  // an existing variable
//   PHYSR_ASSIGN_OR_RETURN_CTX(auto info, parse_config(bytes), path.string());
//
// PHYSR_ASSIGN_OR_RETURN expands to more than one statement: give it braces under an if.
#define PHYSR_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                \
    if (auto&& physr_status_ = (expr); !physr_status_.has_value()) [[unlikely]]       \
      return ::physr::detail::propagate(std::forward<decltype(physr_status_)>(physr_status_)); \
  } while (0)

#define PHYSR_RETURN_IF_ERROR_CTX(expr, ...)                                          \
  do {                                                                                \
    if (auto&& physr_status_ = (expr); !physr_status_.has_value()) [[unlikely]]       \
      return ::physr::detail::propagate(std::forward<decltype(physr_status_)>(physr_status_), (__VA_ARGS__)); \
  } while (0)

#define PHYSR_ASSIGN_OR_RETURN(lhs, expr) \
  PHYSR_ASSIGN_OR_RETURN_IMPL_(PHYSR_CONCAT_(physr_result_, __COUNTER__), lhs, expr)

#define PHYSR_ASSIGN_OR_RETURN_CTX(lhs, expr, ...) \
  PHYSR_ASSIGN_OR_RETURN_IMPL_(PHYSR_CONCAT_(physr_result_, __COUNTER__), lhs, expr, __VA_ARGS__)

/// The older name of PHYSR_RETURN_IF_ERROR.
#define PHYSR_TRY(expr) PHYSR_RETURN_IF_ERROR(expr)

#define PHYSR_CONCAT_INNER_(a, b) a##b
#define PHYSR_CONCAT_(a, b) PHYSR_CONCAT_INNER_(a, b)
#define PHYSR_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr, ...)                             \
  auto&& tmp = (expr);                                                                \
  if (!tmp.has_value()) [[unlikely]]                                                  \
    return ::physr::detail::propagate(std::forward<decltype(tmp)>(tmp) __VA_OPT__(, (__VA_ARGS__))); \
  lhs = std::forward<decltype(tmp)>(tmp).value()

// ---------------------------------------------------------------------------------------
// Internal invariants

/// PHYSR_ASSERT(cond, message): checks an internal invariant (not input: bad input is an
/// Error). On in debug builds and wherever PHYSR_ENABLE_ASSERTS is defined (the sanitizer
/// builds); off otherwise, where `cond` is not evaluated. A failure prints
/// "physr: FILE:LINE: assertion 'cond' failed: message" to stderr and aborts.
#if !defined(NDEBUG) || defined(PHYSR_ENABLE_ASSERTS)
#define PHYSR_ASSERTS_ENABLED 1
#define PHYSR_ASSERT(cond, message) \
  (static_cast<bool>(cond) ? static_cast<void>(0) : ::physr::detail::assert_failed(__FILE__, __LINE__, #cond, (message)))
#else
#define PHYSR_ASSERTS_ENABLED 0
#define PHYSR_ASSERT(cond, message) static_cast<void>(sizeof(static_cast<bool>(cond)))
#endif

namespace detail {
[[noreturn]] void assert_failed(const char* file, int line, const char* cond, std::string_view message);
}  // namespace detail

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
// Typed flag sets

/// A set of the flags of enum E (whose enumerators are distinct bits), as a type of its
/// own: sets of different enums do not mix, and integers do not convert. `if (set & flag)`
/// tests a flag; {} is the empty set. The one mechanism for every flag set of the public
/// API (`using DmaAttrs = Flags<DmaAttr>`): a trivially copyable wrapper of E's underlying
/// integer, passed and stored exactly as that integer.
template <class E>
class Flags {
 public:
  using Bits = std::underlying_type_t<E>;
  constexpr Flags() = default;
  constexpr Flags(E e) noexcept : v_(static_cast<Bits>(e)) {}  // NOLINT: a flag is a set of one
  /// The set with exactly these bits (for encodings and printing).
  static constexpr Flags from_bits(Bits b) noexcept { Flags f; f.v_ = b; return f; }
  constexpr Bits bits() const noexcept { return v_; }
  constexpr bool empty() const noexcept { return v_ == 0; }
  constexpr explicit operator bool() const noexcept { return v_ != 0; }
  /// Whether every flag of `o` is in this set.
  constexpr bool has(Flags o) const noexcept { return (v_ & o.v_) == o.v_; }
  friend constexpr Flags operator|(Flags a, Flags b) noexcept { return from_bits(static_cast<Bits>(a.v_ | b.v_)); }
  friend constexpr Flags operator&(Flags a, Flags b) noexcept { return from_bits(static_cast<Bits>(a.v_ & b.v_)); }
  constexpr Flags operator~() const noexcept { return from_bits(static_cast<Bits>(~v_)); }
  constexpr Flags& operator|=(Flags o) noexcept { v_ = static_cast<Bits>(v_ | o.v_); return *this; }
  constexpr Flags& operator&=(Flags o) noexcept { v_ = static_cast<Bits>(v_ & o.v_); return *this; }
  friend constexpr bool operator==(Flags, Flags) = default;

 private:
  Bits v_ = 0;
};

/// Whether `set` holds every flag of `bits`: `has(perms, IommuPerm::write)`.
template <class E>
constexpr bool has(Flags<E> set, std::type_identity_t<Flags<E>> bits) noexcept { return set.has(bits); }

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

static_assert(sizeof(Result<DmaAddr>) <= 16, "Result of an address is the address and one pointer");

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
