#include "physr/core.hpp"

#include <cctype>
#include <cstdio>
#include <cstring>
#include <limits>

namespace physr {

const char* errno_name(int code) noexcept {
  switch (code) {
    case 0: return "OK";
    case EINVAL: return "EINVAL";
    case ENOMEM: return "ENOMEM";
    case EREMOTEIO: return "EREMOTEIO";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EEXIST: return "EEXIST";
    case ERANGE: return "ERANGE";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case EACCES: return "EACCES";
    case ENOSPC: return "ENOSPC";
    case EOVERFLOW: return "EOVERFLOW";
    case ENOTSUP: return "ENOTSUP";
    default: {
      // Every other errno by glibc's name (EISDIR, EPERM, E2BIG, ...).
      const char* n = code > 0 ? strerrorname_np(code) : nullptr;
      return n ? n : "E?";
    }
  }
}

std::string Error::to_string() const { return std::string(errno_name(code)) + ": " + message; }

Error Error::with_context(std::string_view prefix) const& { return Error(*this).with_context(prefix); }

Error Error::with_context(std::string_view prefix) && {
  std::string head;
  head.reserve(prefix.size() + 2 + message.size());
  head.append(prefix).append(": ").append(message);
  message = std::move(head);
  return std::move(*this);
}

namespace detail {

namespace {
// Never freed, never written: what a failed result holds after its error was moved out.
Error g_moved_from{EINVAL, "(error moved out of this result)"};
}  // namespace

Error* moved_from_error() noexcept { return &g_moved_from; }

Error* new_error(Error&& e) { return new Error(std::move(e)); }

Error* copy_error(const Error* e) {
  if (e == &g_moved_from) return &g_moved_from;
  return new Error(*e);
}

void delete_error(Error* e) noexcept {
  if (e != &g_moved_from) delete e;
}

Error take_error(Error* e) {
  if (e == &g_moved_from) return *e;
  return std::move(*e);
}

Error* add_context(Error* e, std::string_view prefix) {
  if (e == &g_moved_from) e = new Error(*e);
  *e = std::move(*e).with_context(prefix);
  return e;
}

void die_value_on_error(const Error& e) {
  std::fprintf(stderr, "physr: Result::value() called on an error: %s\n", e.to_string().c_str());
  std::abort();
}

void die_error_on_value() {
  std::fputs("physr: Result::error() called on a value\n", stderr);
  std::abort();
}

void assert_failed(const char* file, int line, const char* cond, std::string_view message) {
  std::fprintf(stderr, "physr: %s:%d: assertion '%s' failed: %.*s\n", file, line, cond,
               static_cast<int>(message.size()), message.data());
  std::abort();
}

}  // namespace detail

std::optional<uint64_t> consume_uint(std::string_view& text, unsigned base) {
  std::string_view s = text;
  if (base == 0) {
    base = 10;
    if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
      base = 16;
      s.remove_prefix(2);
    }
  }
  uint64_t value = 0;
  size_t digits = 0;
  while (!s.empty()) {
    const char c = s.front();
    unsigned d;
    if (c >= '0' && c <= '9') d = static_cast<unsigned>(c - '0');
    else if (base == 16 && c >= 'a' && c <= 'f') d = static_cast<unsigned>(c - 'a' + 10);
    else if (base == 16 && c >= 'A' && c <= 'F') d = static_cast<unsigned>(c - 'A' + 10);
    else break;
    if (value > (std::numeric_limits<uint64_t>::max() - d) / base) return std::nullopt;
    value = value * base + d;
    ++digits;
    s.remove_prefix(1);
  }
  if (digits == 0) return std::nullopt;
  text = s;
  return value;
}

Result<uint64_t> parse_size(std::string_view text) {
  auto bad = [&](const char* why) {
    return make_error(EINVAL, "size '" + std::string(text) + "': " + why);
  };
  std::string_view s = text;
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  if (s.empty()) return bad("empty");

  const auto number = consume_uint(s);
  if (!number) {
    const bool hex = s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
    const std::string_view digits = s.substr(hex ? 2 : 0);
    // A leading digit means consume_uint failed only because the value overflowed.
    const bool overflow = !digits.empty() && (hex ? std::isxdigit(static_cast<unsigned char>(digits.front())) != 0
                                                  : digits.front() >= '0' && digits.front() <= '9');
    return bad(overflow ? "does not fit in 64 bits" : "expected a number");
  }
  const uint64_t value = *number;
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);

  unsigned shift = 0;
  if (!s.empty()) {
    switch (s.front()) {
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      case 't': case 'T': shift = 40; break;
      case 'p': case 'P': shift = 50; break;
      case 'e': case 'E': shift = 60; break;
      case 'b': case 'B': shift = 0; break;
      default: return bad("unknown unit (use B, K, M, G, T, P or E)");
    }
    bool had_unit_letter = s.front() != 'b' && s.front() != 'B';
    s.remove_prefix(1);
    if (had_unit_letter) {
      if (s == "iB" || s == "ib" || s == "B" || s == "b") s = {};
    }
    if (!s.empty()) return bad("trailing characters after the unit");
  }
  if (shift != 0 && value > (std::numeric_limits<uint64_t>::max() >> shift)) return bad("does not fit in 64 bits");
  return value << shift;
}

std::string format_hex(uint64_t value) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(value));
  return buf;
}

std::string format_size(uint64_t bytes) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  unsigned u = 0;
  while (u < 6 && bytes != 0 && (bytes & 1023) == 0) {
    bytes >>= 10;
    ++u;
  }
  return std::to_string(bytes) + " " + units[u];
}

}  // namespace physr
