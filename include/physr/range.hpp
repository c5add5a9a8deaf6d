// physr range lists: the datum that crosses every layer (a list of physical address
// ranges, each tagged with the P2P provider it belongs to; no struct page behind them).
//
// Encoding (one 64-bit word per page-aligned range, two for any other range)
//
//   compact word   bit 63 = 0 | provider tag (9) | pages - 1 (14) | pfn (40)
//   extended pair  bit 63 = 1 | provider tag (9) | byte address (54) ,  length (64)
//
//   A range whose address and length are 4 KiB multiples, with at most 16384 pages (64 MiB)
//   below 4 PiB, takes one word (8 B); any other range takes two (16 B). Linux spends 16 B
//   per range in `struct phys_vec`, and 32 B per `struct scatterlist` entry plus 64 B of
//   `struct page` per 4 KiB page.
//   The encoding holds addresses below 2^54 (16 PiB), more than the physical address space
//   the other layers accept (kPhysAddrBits, 52: where x86-64 and Arm64 stop).
//
// Provider tags
//   0 is host memory; 1..510 are P2P provider ids stored directly; ids above 510 are stored
//   as the tag 511 (kIndirectProvider), which means "a P2P provider beyond the direct range:
//   resolve it by physical address through the provider registry" (the interval lookup of
//   the seeds). Builders take full 32-bit ids and never merge pieces of different providers,
//   so an indirect range still lies within one provider.
//
// Random access
//   A list of only compact (or only extended) entries is indexed by arithmetic. A list that
//   mixes both keeps a rank index: per 64 entries a bitmap of extended entries and the word
//   offset of the block (16 B per 64 ranges, 0.25 B per range), so operator[] stays O(1).
//   Forward iteration never needs the index.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "physr/core.hpp"

namespace physr {

/// A provider id: 0 is host memory, 1.. are registered P2P providers.
using ProviderId = uint32_t;
inline constexpr ProviderId kHostMemory = 0;
/// Largest id stored directly in a range list.
inline constexpr ProviderId kMaxDirectProvider = 510;
/// Tag stored for ids above kMaxDirectProvider: resolve the provider by address.
inline constexpr ProviderId kIndirectProvider = 511;
/// Not a valid provider id (reserved to mean "unknown" inside builders).
inline constexpr ProviderId kInvalidProvider = std::numeric_limits<ProviderId>::max();

/// Tag a range list stores for a full provider id.
constexpr ProviderId provider_tag(ProviderId id) noexcept {
  return id > kMaxDirectProvider ? kIndirectProvider : id;
}

/// Physical addresses a range list can encode: [0, 2^54), beyond the physical address
/// space the other layers accept (kPhysAddrLimit, 2^52).
inline constexpr unsigned kRangeAddrBits = 54;
inline constexpr uint64_t kRangeAddrLimit = uint64_t{1} << kRangeAddrBits;

/// One physical range as read from a list: bytes [base, base + size) of `provider`
/// (the stored tag: kIndirectProvider for ids beyond the direct range).
struct PhysRange {
  PhysAddr base;
  uint64_t size = 0;
  ProviderId provider = kHostMemory;

  PhysSpan span() const noexcept { return {base, size}; }
  friend bool operator==(const PhysRange&, const PhysRange&) = default;
};

/// Limits a builder respects. No emitted range is longer than max_segment or crosses an
/// address that is a multiple of boundary_mask + 1 (boundary_mask = ~0: no boundary).
/// With merge, physically contiguous pieces of the same provider join into one range.
struct SegmentLimits {
  uint64_t max_segment = std::numeric_limits<uint64_t>::max();
  uint64_t boundary_mask = std::numeric_limits<uint64_t>::max();
  bool merge = true;
};

/// Checks limits: max_segment >= 1 and boundary_mask of the form 2^k - 1. With
/// page_granular (the pfn builders) also max_segment >= 4 KiB and boundary_mask >= 4 KiB - 1.
Status validate_limits(const SegmentLimits& limits, bool page_granular);

namespace detail::enc {
inline constexpr uint64_t kExtFlag = uint64_t{1} << 63;
inline constexpr unsigned kTagShift = 54;
inline constexpr uint64_t kTagMask = 0x1ff;
inline constexpr unsigned kPagesShift = 40;
inline constexpr uint64_t kPagesMask = 0x3fff;
inline constexpr uint64_t kPfnMask = (uint64_t{1} << 40) - 1;
inline constexpr uint64_t kMaxCompactPages = kPagesMask + 1;
inline constexpr uint64_t kExtAddrMask = kRangeAddrLimit - 1;

constexpr bool fits_compact(uint64_t addr, uint64_t len) noexcept {
  return ((addr | len) & (kPageSize - 1)) == 0 && len != 0 && len <= (kMaxCompactPages << kPageShift) &&
         (addr >> kPageShift) <= kPfnMask;
}
constexpr uint64_t compact_word(uint64_t addr, uint64_t len, ProviderId tag) noexcept {
  return (uint64_t{tag} << kTagShift) | (((len >> kPageShift) - 1) << kPagesShift) | (addr >> kPageShift);
}
inline PhysRange decode(const uint64_t* w) noexcept {
  const uint64_t x = *w;
  const auto tag = static_cast<ProviderId>((x >> kTagShift) & kTagMask);
  if (!(x & kExtFlag)) {
    return PhysRange{PhysAddr((x & kPfnMask) << kPageShift), (((x >> kPagesShift) & kPagesMask) + 1) << kPageShift, tag};
  }
  return PhysRange{PhysAddr(x & kExtAddrMask), w[1], tag};
}
inline const uint64_t* next(const uint64_t* w) noexcept { return w + 1 + (*w >> 63); }
}  // namespace detail::enc

class RangeSlice;
namespace detail {
// Growable array of words. Unlike std::vector it can hand out uninitialised room, which
// lets the pfn builder's hot loop write through a local pointer (a vector's push_back
// reloads its members after every uint64_t store, because the store may alias them;
// measured 3x slower on random pfns, see bench/bench_ranges.cpp).
class WordBuf {
 public:
  WordBuf() = default;
  WordBuf(const WordBuf& o) { assign(o.data_, o.size_); }
  WordBuf(WordBuf&& o) noexcept : data_(o.data_), size_(o.size_), cap_(o.cap_) { o.data_ = nullptr; o.size_ = o.cap_ = 0; }
  WordBuf& operator=(const WordBuf& o) { if (this != &o) assign(o.data_, o.size_); return *this; }
  WordBuf& operator=(WordBuf&& o) noexcept { std::swap(data_, o.data_); std::swap(size_, o.size_); std::swap(cap_, o.cap_); return *this; }
  ~WordBuf() { std::free(data_); }

  uint64_t* data() noexcept { return data_; }
  const uint64_t* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  size_t capacity() const noexcept { return cap_; }
  bool empty() const noexcept { return size_ == 0; }
  uint64_t& operator[](size_t i) noexcept { return data_[i]; }
  uint64_t operator[](size_t i) const noexcept { return data_[i]; }
  void push_back(uint64_t w) { if (size_ == cap_) grow(size_ + 1); data_[size_++] = w; }
  /// Shrinks, or grows with uninitialised words the caller must write.
  void resize_uninit(size_t n) { if (n > cap_) grow(n); size_ = n; }
  void reserve(size_t n) { if (n > cap_) grow(n); }
  void clear() noexcept { size_ = 0; }
  operator std::span<const uint64_t>() const noexcept { return {data_, size_}; }  // NOLINT
  friend bool operator==(const WordBuf& a, const WordBuf& b) noexcept {
    return a.size_ == b.size_ && (a.size_ == 0 || std::memcmp(a.data_, b.data_, a.size_ * 8) == 0);
  }
  void grow(size_t need);

 private:
  void assign(const uint64_t* src, size_t n);
  uint64_t* data_ = nullptr;
  size_t size_ = 0;
  size_t cap_ = 0;
};
}  // namespace detail


/// An ordered list of physical ranges in the compact encoding above.
/// Appending is amortised O(1); size(), total_bytes() and operator[] are O(1).
class RangeList {
 public:
  class const_iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = PhysRange;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = PhysRange;

    const_iterator() = default;
    explicit const_iterator(const uint64_t* w) : w_(w) {}
    PhysRange operator*() const noexcept { return detail::enc::decode(w_); }
    const_iterator& operator++() noexcept { w_ = detail::enc::next(w_); return *this; }
    const_iterator operator++(int) noexcept { auto t = *this; ++*this; return t; }
    friend bool operator==(const_iterator a, const_iterator b) noexcept { return a.w_ == b.w_; }
    const uint64_t* word() const noexcept { return w_; }

   private:
    const uint64_t* w_ = nullptr;
  };

  RangeList() = default;

  /// Builds a list from 4 KiB page frame numbers, like Linux sg_alloc_table_from_pages():
  /// contiguous pfns of the same provider merge up to the limits. `providers` is empty
  /// (all host memory) or has one id per pfn. Fails with ERANGE for a pfn at or above
  /// 2^42, EINVAL for bad limits, a provider count mismatch or kInvalidProvider.
  static Result<RangeList> from_pfns(std::span<const uint64_t> pfns, std::span<const ProviderId> providers = {},
                                     const SegmentLimits& limits = {});
  /// Builds a list from (addr, len, provider) pieces, merging and splitting per limits.
  /// Fails with EINVAL for a zero length, ERANGE for a piece past 2^54.
  static Result<RangeList> from_ranges(std::span<const PhysRange> pieces, const SegmentLimits& limits = {});

  /// Appends pfns, merging the first with the current last range when contiguous and of
  /// the same provider (like sg_alloc_append_table_from_pages()). On failure the list is
  /// unchanged.
  Status append_pfns(std::span<const uint64_t> pfns, std::span<const ProviderId> providers = {},
                     const SegmentLimits& limits = {});
  /// Appends one piece (provider is a full id), merging with the last range and splitting
  /// per limits. On failure the list is unchanged.
  Status append(PhysRange piece, const SegmentLimits& limits = {});
  /// Appends all of `other` (concatenation): its first range may merge with our last one
  /// when both providers are known to be equal; every range is split to the limits.
  Status append(const RangeList& other, const SegmentLimits& limits = {});
  /// a followed by b; see append(const RangeList&).
  static Result<RangeList> concat(const RangeList& a, const RangeList& b, const SegmentLimits& limits = {});

  /// A copy in which every range is split to respect `limits` (never merges).
  Result<RangeList> split(const SegmentLimits& limits) const;
  /// The bytes [offset, offset + len) of the list as a view (no copy of the list). O(k) in
  /// the entries before offset. Valid while this list lives and is not modified. ERANGE
  /// when the window runs past total_bytes().
  Result<RangeSlice> slice(uint64_t offset, uint64_t len) const;

  /// Number of ranges.
  size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  /// Sum of all range lengths, in O(1).
  uint64_t total_bytes() const noexcept { return total_; }
  /// The i-th range in O(1); i must be < size().
  PhysRange operator[](size_t i) const noexcept { return detail::enc::decode(words_.data() + word_pos(i)); }
  /// The i-th range, or ERANGE naming i and size().
  Result<PhysRange> at(size_t i) const;
  const_iterator begin() const noexcept { return const_iterator(words_.data()); }
  const_iterator end() const noexcept { return const_iterator(words_.data() + words_.size()); }

  /// The encoded words (valid until the list changes). decode() accepts them back.
  std::span<const uint64_t> words() const noexcept { return words_; }
  /// Rebuilds a list from encoded words, checking every word: an extended entry without
  /// its length word, a zero length, a range past 2^54, or an extended entry that should
  /// have been compact (non-canonical) is EINVAL naming the word index.
  static Result<RangeList> decode(std::span<const uint64_t> words);

  /// Bytes of encoding in use: words plus rank index (what a copy would need).
  size_t encoded_bytes() const noexcept { return words_.size() * 8 + index_.size() * sizeof(Block); }
  /// Bytes of heap held, including spare capacity.
  size_t memory_bytes() const noexcept { return words_.capacity() * 8 + index_.capacity() * sizeof(Block); }
  /// Reserves room for n more compact ranges.
  void reserve(size_t n) { words_.reserve(words_.size() + n); }
  void clear() noexcept;

  /// Entry-by-entry equality (the encoding is canonical, so equal words mean equal lists).
  friend bool operator==(const RangeList& a, const RangeList& b) noexcept {
    return a.count_ == b.count_ && a.words_ == b.words_;
  }

 private:
  struct Block {
    uint64_t ext_bitmap;   // bit i: entry 64*b + i is extended
    uint64_t words_before; // word offset of entry 64*b
  };
  struct Snapshot;

  size_t word_pos(size_t i) const noexcept {
    if (!index_built_) return ext_count_ == 0 ? i : 2 * i;
    const Block& b = index_[i >> 6];
    const uint64_t below = b.ext_bitmap & ((uint64_t{1} << (i & 63)) - 1);
    return b.words_before + (i & 63) + static_cast<size_t>(__builtin_popcountll(below));
  }
  void push(uint64_t addr, uint64_t len, ProviderId tag);
  void push_extended(uint64_t addr, uint64_t len, ProviderId tag);
  void build_index();
  void pop_back() noexcept;
  Snapshot snapshot() const;
  void restore(const Snapshot& s);
  template <bool kHasProviders>
  Status append_pfns_impl(const uint64_t* pfns, const ProviderId* providers, size_t n, const SegmentLimits& limits);
  void append_split(uint64_t addr, uint64_t len, ProviderId full, const SegmentLimits& limits, bool merge_first);

  detail::WordBuf words_;
  std::vector<Block> index_;  // only for lists that mix compact and extended entries
  size_t count_ = 0;
  size_t ext_count_ = 0;
  uint64_t total_ = 0;
  ProviderId tail_provider_ = kInvalidProvider;  // full id of the last range, if known
  bool index_built_ = false;

  friend class RangeSlice;
};

/// A window of bytes over a RangeList: the ranges it covers, the first and last trimmed.
/// A view: valid while the list lives and is unmodified.
class RangeSlice {
 public:
  class const_iterator {
   public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = PhysRange;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = PhysRange;

    const_iterator() = default;
    const_iterator(const uint64_t* w, uint64_t skip, uint64_t remaining) : w_(w), skip_(skip), remaining_(remaining) {}
    PhysRange operator*() const noexcept {
      PhysRange r = detail::enc::decode(w_);
      r.base += skip_;
      r.size = std::min(r.size - skip_, remaining_);
      return r;
    }
    const_iterator& operator++() noexcept {
      remaining_ -= (**this).size;
      skip_ = 0;
      w_ = detail::enc::next(w_);
      return *this;
    }
    const_iterator operator++(int) noexcept { auto t = *this; ++*this; return t; }
    friend bool operator==(const_iterator a, const_iterator b) noexcept {
      return a.w_ == b.w_ && a.remaining_ == b.remaining_;
    }

   private:
    const uint64_t* w_ = nullptr;
    uint64_t skip_ = 0;
    uint64_t remaining_ = 0;
  };

  const_iterator begin() const noexcept { return {first_, skip_, len_}; }
  const_iterator end() const noexcept { return {last_, 0, 0}; }
  /// Number of (trimmed) ranges in the window.
  size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  uint64_t total_bytes() const noexcept { return len_; }
  /// Copies the window into a list of its own (providers keep their stored tags).
  RangeList to_list() const;

 private:
  friend class RangeList;
  const uint64_t* first_ = nullptr;
  const uint64_t* last_ = nullptr;  // one past the last covered entry
  uint64_t skip_ = 0;
  uint64_t len_ = 0;
  size_t count_ = 0;
};

/// A pfn list read from text: one pfn per line (decimal or 0x hex), optionally followed by
/// a provider id ("0x1a2b 3" or "0x1a2b:3"); '#' starts a comment; blank lines are skipped.
struct PfnList {
  std::vector<uint64_t> pfns;
  std::vector<ProviderId> providers;  // one per pfn
};
/// Parses the text format above. Errors are EINVAL naming `source` and the line number.
Result<PfnList> parse_pfn_text(std::string_view text, std::string_view source);

/// Shapes of generated pfn lists, for demos and benchmarks.
/// contiguous: one run; random: scattered pages; alternating: one run whose pages
/// alternate between host memory and provider 1; mixed: runs of 1..64 pages with gaps, one
/// run in eight on provider 1 (a typical user buffer plus some device memory).
enum class PfnPattern { contiguous, random, alternating, mixed };
/// Parses "contiguous", "random", "alternating" or "mixed"; EINVAL naming the text otherwise.
Result<PfnPattern> parse_pfn_pattern(std::string_view name);
/// n pfns of the pattern, deterministic for a seed.
PfnList make_pfn_pattern(PfnPattern pattern, size_t n, uint64_t seed);

/// What the same I/O costs as a Linux scatterlist: entries (sg_alloc_table chains chunks
/// of 128 entries, each chunk but the last spending one entry on the chain link), their
/// bytes (32 B each), the struct page array behind the pages (64 B per 4 KiB page), and a
/// phys_vec array (16 B per range).
struct ScatterlistCost {
  size_t nents = 0;
  size_t sg_entries = 0;
  uint64_t sg_bytes = 0;
  uint64_t struct_page_bytes = 0;
  uint64_t phys_vec_bytes = 0;
};
/// The scatterlist cost of an I/O of `nents` merged segments over `pages` 4 KiB pages.
ScatterlistCost scatterlist_cost(size_t nents, uint64_t pages) noexcept;

/// Linux scatterlist entries carry a 32-bit length and sg_alloc_table_from_pages()
/// defaults to UINT_MAX aligned down to a page: the limits that reproduce its merging.
inline constexpr SegmentLimits kScatterlistLimits{0xfffff000u, std::numeric_limits<uint64_t>::max(), true};

}  // namespace physr
