// The data pattern every job moves: a word per position, salted per page and per job, so
// a byte that lands in the wrong place, at the wrong offset or from another job differs.
// Generated and checked in vector registers (job_common.hpp says why it must be fast).
#include <cstring>
#include <span>
#include <utility>

#include "sim/job_common.hpp"

namespace physr::sim {

namespace detail {

namespace {
// The 64-byte blocks of a piece, where the time goes, in vectors of V: GCC and Clang lower
// generic vectors to SSE2/AVX2/NEON (neither vectorises the scalar loops by themselves).
// Each word is its position plus the page's salt, so the next vector is the last plus a
// constant: one add per vector. The AVX2 versions are chosen at run time where the CPU has
// AVX2 (the library is built for baseline x86-64); checking in 32-byte vectors halves the
// instructions of the check, the loop that is bound by them rather than by memory.
using W16 = uint64_t __attribute__((vector_size(16)));
using W32 = uint64_t __attribute__((vector_size(32)));

// v[j] = the words at first_word + j * sizeof(V), + 8, ... (built through memory: GCC 12
// takes element-wise stores into a vector for reads of an uninitialised one).
template <class V, unsigned kN>
[[gnu::always_inline]] inline void start_words(V (&v)[kN], uint64_t first_word) noexcept {
  uint64_t w[kN * sizeof(V) / 8];
  for (unsigned k = 0; k < kN * sizeof(V) / 8; ++k) w[k] = first_word + 8 * k;
  std::memcpy(v, w, sizeof(w));
}

template <class V>
[[gnu::always_inline]] inline void fill_blocks(uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  constexpr unsigned kN = 64 / sizeof(V);
  V v[kN];
  start_words(v, first_word);
  for (uint64_t i = 0; i < len; i += 64)
    for (unsigned j = 0; j < kN; ++j) {
      std::memcpy(at + i + j * sizeof(V), &v[j], sizeof(V));
      v[j] += 64;
    }
}

template <class V>
[[gnu::always_inline]] inline bool blocks_match(const uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  constexpr unsigned kN = 64 / sizeof(V);
  V v[kN], diff = {};
  start_words(v, first_word);
  for (uint64_t i = 0; i < len; i += 64)
    for (unsigned j = 0; j < kN; ++j) {
      V have;
      std::memcpy(&have, at + i + j * sizeof(V), sizeof(V));
      diff |= have ^ v[j];
      v[j] += 64;
    }
  uint64_t any = 0;
  for (unsigned k = 0; k < sizeof(V) / 8; ++k) any |= diff[k];
  return any == 0;
}

[[gnu::always_inline]] inline uint64_t page_salt(uint64_t stream, uint64_t pos) noexcept {
  uint64_t salt = ((pos >> 12) ^ (stream * 0xD6E8FEB86659FD93ull)) * 0x9E3779B97F4A7C15ull;
  return salt ^ (salt >> 29);
}

// Whole 4 KiB pages from the page-aligned position p: the loop over pages inside the vector
// code, each page's first vectors the lanes' offsets plus its first word (position + salt),
// so a page costs its stores (or compares) and a few instructions, not a call and a setup.
template <class V>
[[gnu::always_inline]] inline void fill_page_run(uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  constexpr unsigned kN = 4;  // vectors per step: 128 bytes in AVX2, 64 in SSE2 (no spills)
  constexpr uint64_t kStep = kN * sizeof(V);
  V lane[kN];
  start_words(lane, 0);
  for (uint64_t k = 0; k < pages; ++k, at += kPageSize, p += kPageSize) {
    const uint64_t w = p + page_salt(stream, p);
    V v[kN];
    for (unsigned j = 0; j < kN; ++j) v[j] = lane[j] + w;
    for (uint64_t i = 0; i < kPageSize; i += kStep)
#pragma GCC unroll 4
      for (unsigned j = 0; j < kN; ++j) {
        std::memcpy(at + i + j * sizeof(V), &v[j], sizeof(V));
        v[j] += kStep;
      }
  }
}

template <class V>
[[gnu::always_inline]] inline bool page_run_matches(const uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  constexpr unsigned kN = 4;  // vectors per step: 128 bytes in AVX2, 64 in SSE2 (no spills)
  constexpr uint64_t kStep = kN * sizeof(V);
  V lane[kN], diff = {};
  start_words(lane, 0);
  for (uint64_t k = 0; k < pages; ++k, at += kPageSize, p += kPageSize) {
    const uint64_t w = p + page_salt(stream, p);
    V v[kN];
    for (unsigned j = 0; j < kN; ++j) v[j] = lane[j] + w;
    for (uint64_t i = 0; i < kPageSize; i += kStep)
#pragma GCC unroll 4
      for (unsigned j = 0; j < kN; ++j) {
        V have;
        std::memcpy(&have, at + i + j * sizeof(V), sizeof(V));
        diff |= have ^ v[j];
        v[j] += kStep;
      }
  }
  uint64_t any = 0;
  for (unsigned k = 0; k < sizeof(V) / 8; ++k) any |= diff[k];
  return any == 0;
}

// Whole pages landing: `piece` bytes (whole pages) of the pattern into `out`, then the same
// bytes compared in `view`, piece after piece, in one run of the vector code (the fill and
// the check of pattern_landed() without a call and a setup per piece).
template <class V>
[[gnu::always_inline]] inline bool land_page_run(uint8_t* out, const uint8_t* view, uint64_t stream, uint64_t p, uint64_t pages,
                                                 uint64_t piece_pages) noexcept {
  for (uint64_t k = 0; k < pages; k += piece_pages) {
    const uint64_t n = std::min(piece_pages, pages - k), at = k * kPageSize;
    fill_page_run<V>(out + at, stream, p + at, n);
    if (!page_run_matches<V>(view + at, stream, p + at, n)) return false;
  }
  return true;
}

#if defined(__x86_64__)
[[gnu::target("avx2")]] bool land_pages_avx2(uint8_t* out, const uint8_t* view, uint64_t stream, uint64_t p, uint64_t pages, uint64_t per) noexcept {
  return land_page_run<W32>(out, view, stream, p, pages, per);
}
[[gnu::target("avx2")]] void fill_blocks_avx2(uint8_t* at, uint64_t w, uint64_t len) noexcept { fill_blocks<W32>(at, w, len); }
[[gnu::target("avx2")]] bool blocks_match_avx2(const uint8_t* at, uint64_t w, uint64_t len) noexcept { return blocks_match<W32>(at, w, len); }
[[gnu::target("avx2")]] void fill_pages_avx2(uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  fill_page_run<W32>(at, stream, p, pages);
}
[[gnu::target("avx2")]] bool pages_match_avx2(const uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  return page_run_matches<W32>(at, stream, p, pages);
}
const bool kAvx2 = __builtin_cpu_supports("avx2");
#else
constexpr bool kAvx2 = false;
bool land_pages_avx2(uint8_t*, const uint8_t*, uint64_t, uint64_t, uint64_t, uint64_t) noexcept { return false; }
void fill_blocks_avx2(uint8_t*, uint64_t, uint64_t) noexcept {}
bool blocks_match_avx2(const uint8_t*, uint64_t, uint64_t) noexcept { return false; }
void fill_pages_avx2(uint8_t*, uint64_t, uint64_t, uint64_t) noexcept {}
bool pages_match_avx2(const uint8_t*, uint64_t, uint64_t, uint64_t) noexcept { return false; }
#endif

void fill_body(uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  if (kAvx2) fill_blocks_avx2(at, first_word, len);
  else fill_blocks<W16>(at, first_word, len);
}
bool body_matches(const uint8_t* at, uint64_t first_word, uint64_t len) noexcept {
  return kAvx2 ? blocks_match_avx2(at, first_word, len) : blocks_match<W16>(at, first_word, len);
}
void fill_pages(uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  if (kAvx2) fill_pages_avx2(at, stream, p, pages);
  else fill_page_run<W16>(at, stream, p, pages);
}
bool pages_match(const uint8_t* at, uint64_t stream, uint64_t p, uint64_t pages) noexcept {
  return kAvx2 ? pages_match_avx2(at, stream, p, pages) : page_run_matches<W16>(at, stream, p, pages);
}
bool land_pages(uint8_t* out, const uint8_t* view, uint64_t stream, uint64_t p, uint64_t pages, uint64_t per) noexcept {
  return kAvx2 ? land_pages_avx2(out, view, stream, p, pages, per) : land_page_run<W16>(out, view, stream, p, pages, per);
}

// Calls f(i, n, salt) for each piece [pos + i, pos + i + n) inside one 4 KiB page; f
// returns false to stop.
template <class F>
void by_page(uint64_t stream, uint64_t pos, uint64_t len, F&& f) {
  for (uint64_t i = 0; i < len;) {
    const uint64_t p = pos + i, n = std::min<uint64_t>(len - i, kPageSize - (p & (kPageSize - 1)));
    if (!f(i, n, page_salt(stream, p))) return;
    i += n;
  }
}

// Bytes [p, p + n) of the words at 8-aligned positions, a word at a time: a piece's
// unaligned head and its tail. Words sit at absolute positions, so data generated in any
// pieces equals data generated in one go.
void bytes_at(uint64_t p, uint64_t salt, uint8_t* out, uint64_t n) noexcept {
  while (n != 0) {
    const uint64_t word = (p & ~uint64_t{7}) + salt, skip = p & 7, take = std::min<uint64_t>(n, 8 - skip);
    std::memcpy(out, reinterpret_cast<const uint8_t*>(&word) + skip, take);
    out += take;
    p += take;
    n -= take;
  }
}

// A piece [p, p + n) as an unaligned head, whole 64-byte blocks (body) and a tail.
struct Split {
  uint64_t head, body;
};
Split split(uint64_t p, uint64_t n) noexcept {
  const uint64_t head = std::min<uint64_t>(n, (8 - (p & 7)) & 7);
  return {head, (n - head) & ~uint64_t{63}};
}
// The whole pages of [pos, pos + len): the offset of the first and how many.
std::pair<uint64_t, uint64_t> whole_pages(uint64_t pos, uint64_t len) noexcept {
  const uint64_t first = std::min<uint64_t>(len, (kPageSize - (pos & (kPageSize - 1))) & (kPageSize - 1));
  return {first, (len - first) / kPageSize};
}

// A piece a page at a time: its whole 64-byte blocks in vectors, an unaligned head and tail
// a word at a time (pattern() sends whole pages to the page-run kernels instead).
void pattern_pieces(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept {
  by_page(stream, pos, out.size(), [&](uint64_t base, uint64_t n, uint64_t salt) {
    uint8_t* at = out.data() + base;
    const uint64_t p = pos + base;
    const auto [head, body] = split(p, n);
    bytes_at(p, salt, at, head);
    fill_body(at + head, p + head + salt, body);
    bytes_at(p + head + body, salt, at + head + body, n - head - body);
    return true;
  });
}

size_t pattern_mismatch_pieces(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept {
  size_t bad = have.size();
  by_page(stream, pos, have.size(), [&](uint64_t base, uint64_t n, uint64_t salt) {
    const uint8_t* at = have.data() + base;
    const uint64_t p = pos + base;
    const auto [head, body] = split(p, n);
    uint8_t want[64];
    const auto bytes_match = [&](uint64_t i, uint64_t m) {  // the head or the tail, bytewise
      bytes_at(p + i, salt, want, m);
      return std::equal(want, want + m, at + i);
    };
    if (body_matches(at + head, p + head + salt, body) && bytes_match(0, head) && bytes_match(head + body, n - head - body)) return true;
    for (uint64_t i = 0; i < n; i += 64) {  // find the byte, 64 bytes at a time
      const uint64_t m = std::min<uint64_t>(64, n - i);
      bytes_at(p + i, salt, want, m);
      const auto miss = std::mismatch(want, want + m, at + i);
      if (miss.first != want + m) {
        bad = base + i + static_cast<size_t>(miss.first - want);
        return false;
      }
    }
    return true;
  });
  return bad;
}

}  // namespace

void pattern(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept {
  const auto [first, pages] = whole_pages(pos, out.size());
  if (pages == 0) return pattern_pieces(stream, pos, out);
  if (first != 0) pattern_pieces(stream, pos, out.first(first));
  fill_pages(out.data() + first, stream, pos + first, pages);
  const uint64_t end = first + pages * kPageSize;
  if (end != out.size()) pattern_pieces(stream, pos + end, out.subspan(end));
}

size_t pattern_mismatch(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept {
  const auto [first, pages] = whole_pages(pos, have.size());
  if (pages == 0) return pattern_mismatch_pieces(stream, pos, have);
  // The whole pages are compared in one pass; only a difference there looks for its byte.
  const uint64_t end = first + pages * kPageSize;
  if (first != 0)
    if (const size_t k = pattern_mismatch_pieces(stream, pos, have.first(first)); k != first) return k;
  if (!pages_match(have.data() + first, stream, pos + first, pages))
    return first + pattern_mismatch_pieces(stream, pos + first, have.subspan(first, pages * kPageSize));
  return end == have.size() ? end : end + pattern_mismatch_pieces(stream, pos + end, have.subspan(end));
}

size_t pattern_landed(uint64_t stream, uint64_t pos, std::span<uint8_t> out, std::span<const uint8_t> view, uint64_t piece) noexcept {
  // Whole pages in whole-page pieces (a block job's common case) in one run of the vector
  // code; a difference there is looked for again piece by piece, which finds its byte.
  if (((pos | out.size() | piece) & (kPageSize - 1)) == 0 && piece != 0 &&
      land_pages(out.data(), view.data(), stream, pos, out.size() / kPageSize, piece / kPageSize))
    return view.size();
  for (uint64_t k = 0; k < out.size(); k += piece) {
    const uint64_t n = std::min<uint64_t>(piece, out.size() - k);
    pattern(stream, pos + k, out.subspan(k, n));
    if (const size_t bad = pattern_mismatch(stream, pos + k, view.subspan(k, n)); bad != n) return k + bad;
  }
  return view.size();
}

}  // namespace detail

}  // namespace physr::sim
