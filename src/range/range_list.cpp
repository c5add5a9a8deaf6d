#include "physr/range.hpp"

#include <cstring>
#include <new>
#include <string>

namespace physr {

using namespace detail::enc;

void detail::WordBuf::grow(size_t need) {
  size_t cap = cap_ < 16 ? 16 : cap_ * 2;
  if (cap < need) cap = need;
  void* p = std::realloc(data_, cap * sizeof(uint64_t));
  if (p == nullptr) throw std::bad_alloc();
  data_ = static_cast<uint64_t*>(p);
  cap_ = cap;
}

void detail::WordBuf::assign(const uint64_t* src, size_t n) {
  size_ = 0;
  reserve(n);
  if (n != 0) std::memcpy(data_, src, n * sizeof(uint64_t));
  size_ = n;
}

namespace {

constexpr uint64_t kNoBoundary = std::numeric_limits<uint64_t>::max();
constexpr uint64_t kPfnLimit = kRangeAddrLimit >> kPageShift;

// Bytes a range starting at addr may span before hitting max_segment or the next boundary.
inline uint64_t cap_at(uint64_t addr, const SegmentLimits& l) noexcept {
  if (l.boundary_mask == kNoBoundary) return l.max_segment;
  return std::min(l.max_segment, (l.boundary_mask + 1) - (addr & l.boundary_mask));
}

// Index one past the last pfn that continues the run started at i (pfn[k] == pfn[i] + k - i,
// same provider). Random input fails on the first compare; contiguous input is checked
// eight at a time with an OR-reduction the compiler vectorises (no early exit inside).
template <bool kHasProviders>
inline size_t run_end(const uint64_t* pfn, const ProviderId* prov, size_t i, size_t n) noexcept {
  const uint64_t base = pfn[i] - i;  // pfn[k] == base + k within the run (mod 2^64)
  const ProviderId p = kHasProviders ? prov[i] : 0;
  size_t j = i + 1;
  if (j >= n || pfn[j] != base + j || (kHasProviders && prov[j] != p)) return j;
  ++j;
  while (j + 8 <= n) {
    uint64_t diff = 0;
    for (size_t k = 0; k < 8; ++k) diff |= pfn[j + k] ^ (base + j + k);
    if constexpr (kHasProviders) {
      for (size_t k = 0; k < 8; ++k) diff |= prov[j + k] ^ p;
    }
    if (diff != 0) break;
    j += 8;
  }
  while (j < n && pfn[j] == base + j && (!kHasProviders || prov[j] == p)) ++j;
  return j;
}

}  // namespace

Status validate_limits(const SegmentLimits& l, bool page_granular) {
  if (l.max_segment == 0) return make_error(EINVAL, "segment limits: max_segment is 0");
  if ((l.boundary_mask & (l.boundary_mask + 1)) != 0)
    return make_error(EINVAL, "segment limits: boundary_mask " + format_hex(l.boundary_mask) + " is not of the form 2^k - 1");
  if (page_granular) {
    // Linux lib/scatterlist.c sg_alloc_append_table_from_pages(): max_segment is aligned
    // down to PAGE_SIZE and must stay at least one page.
    if ((l.max_segment & ~(kPageSize - 1)) < kPageSize)
      return make_error(EINVAL, "segment limits: max_segment " + std::to_string(l.max_segment) +
                                    " is below one 4 KiB page (pfn builders need whole pages)");
    if (l.boundary_mask < kPageSize - 1)
      return make_error(EINVAL, "segment limits: boundary_mask " + format_hex(l.boundary_mask) +
                                    " is below a 4 KiB page (pfn builders need whole pages)");
  }
  return {};
}

// ---------------------------------------------------------------------------------------
// Primitive pushes and pops, with the rank index kept in step.

void RangeList::build_index() {
  index_.clear();
  size_t k = 0;
  for (const uint64_t* w = words_.data(); w != words_.data() + words_.size(); w = next(w), ++k) {
    if ((k & 63) == 0) index_.push_back({0, static_cast<uint64_t>(w - words_.data())});
    if (*w & kExtFlag) index_.back().ext_bitmap |= uint64_t{1} << (k & 63);
  }
  index_built_ = true;
}

inline void RangeList::push(uint64_t addr, uint64_t len, ProviderId tag) {
  if (!fits_compact(addr, len)) [[unlikely]] {
    push_extended(addr, len, tag);
    return;
  }
  if (index_built_ || ext_count_ != 0) [[unlikely]] {
    if (!index_built_) build_index();  // an all-extended list becomes mixed
    if ((count_ & 63) == 0) index_.push_back({0, words_.size()});
  }
  words_.push_back(compact_word(addr, len, tag));
  ++count_;
  total_ += len;
}

void RangeList::push_extended(uint64_t addr, uint64_t len, ProviderId tag) {
  if (!index_built_ && ext_count_ != count_) build_index();  // a compact list becomes mixed
  if (index_built_) {
    if ((count_ & 63) == 0) index_.push_back({0, words_.size()});
    index_.back().ext_bitmap |= uint64_t{1} << (count_ & 63);
  }
  words_.push_back(kExtFlag | (uint64_t{tag} << kTagShift) | addr);
  words_.push_back(len);
  ++count_;
  ++ext_count_;
  total_ += len;
}

void RangeList::pop_back() noexcept {
  const size_t pos = word_pos(count_ - 1);
  const PhysRange r = detail::enc::decode(words_.data() + pos);
  const bool ext = words_[pos] & kExtFlag;
  words_.resize_uninit(pos);
  --count_;
  total_ -= r.size;
  if (ext) --ext_count_;
  if (index_built_) {
    index_[count_ >> 6].ext_bitmap &= ~(uint64_t{1} << (count_ & 63));
    if ((count_ & 63) == 0) index_.pop_back();
  }
  tail_provider_ = kInvalidProvider;
}

void RangeList::clear() noexcept {
  words_.clear();
  index_.clear();
  count_ = ext_count_ = 0;
  total_ = 0;
  tail_provider_ = kInvalidProvider;
  index_built_ = false;
}

// A failed append restores the list exactly: sizes, the last index block, and the words of
// the last entry (which a merge may have rewritten).
struct RangeList::Snapshot {
  size_t words = 0, count = 0, ext_count = 0, index_size = 0, tail_words = 0;
  uint64_t total = 0;
  uint64_t tail[2] = {0, 0};
  Block last_block{0, 0};
  ProviderId tail_provider = kInvalidProvider;
  bool index_built = false;
};

RangeList::Snapshot RangeList::snapshot() const {
  Snapshot s;
  s.words = words_.size();
  s.count = count_;
  s.ext_count = ext_count_;
  s.index_size = index_.size();
  s.total = total_;
  s.tail_provider = tail_provider_;
  s.index_built = index_built_;
  if (!index_.empty()) s.last_block = index_.back();
  if (count_ != 0) {
    const size_t pos = word_pos(count_ - 1);
    s.tail_words = words_.size() - pos;
    std::memcpy(s.tail, words_.data() + pos, s.tail_words * 8);
  }
  return s;
}

void RangeList::restore(const Snapshot& s) {
  words_.resize_uninit(s.words);
  if (s.tail_words != 0) std::memcpy(words_.data() + s.words - s.tail_words, s.tail, s.tail_words * 8);
  count_ = s.count;
  ext_count_ = s.ext_count;
  total_ = s.total;
  tail_provider_ = s.tail_provider;
  index_built_ = s.index_built;
  if (!index_built_) {
    index_.clear();
  } else {
    index_.resize(s.index_size);
    if (!index_.empty()) index_.back() = s.last_block;
  }
}

// ---------------------------------------------------------------------------------------
// Builders

void RangeList::append_split(uint64_t addr, uint64_t len, ProviderId full, const SegmentLimits& l, bool merge_first) {
  const ProviderId tag = provider_tag(full);
  if (merge_first && l.merge && count_ != 0 && full != kInvalidProvider && tail_provider_ == full) {
    const PhysRange tail = (*this)[count_ - 1];
    const uint64_t tail_addr = tail.base.value();
    if (tail_addr + tail.size == addr) {
      const uint64_t cap = cap_at(tail_addr, l);
      if (tail.size < cap) {
        const uint64_t take = std::min(len, cap - tail.size);
        pop_back();
        push(tail_addr, tail.size + take, tag);
        addr += take;
        len -= take;
      }
    }
  }
  while (len != 0) {
    const uint64_t piece = std::min(len, cap_at(addr, l));
    push(addr, piece, tag);
    addr += piece;
    len -= piece;
  }
  tail_provider_ = full;
}

template <bool kHasProviders>
Status RangeList::append_pfns_impl(const uint64_t* pfn, const ProviderId* prov, size_t n, const SegmentLimits& in) {
  SegmentLimits l = in;
  l.max_segment &= ~(kPageSize - 1);
  const bool unlimited = l.max_segment >= kRangeAddrLimit && l.boundary_mask == kNoBoundary;
  const Snapshot snap = snapshot();
  auto fail = [&](int code, std::string msg) -> Status {
    restore(snap);
    return make_error(code, std::move(msg));
  };

  // Hot-loop state lives in locals and is committed to the members around slow paths.
  uint64_t* out = nullptr;
  uint64_t* out_end = nullptr;
  size_t count = 0;
  uint64_t total = 0;
  bool fast = false;
  auto commit = [&] {
    if (!fast) return;
    words_.resize_uninit(static_cast<size_t>(out - words_.data()));
    count_ += count;
    total_ += total;
    count = 0;
    total = 0;
  };
  auto reload = [&] {
    fast = !index_built_ && ext_count_ == 0;  // a pure compact list: no index to maintain
    const size_t used = words_.size();
    words_.reserve(used + 64);
    out = words_.data() + used;
    out_end = words_.data() + words_.capacity();
  };

  size_t i = 0;
  bool first = true;
  ProviderId last_full = tail_provider_;
  reload();
  while (i < n) {
    if (fast && !first) {
      // Single-page lane: a page that does not continue into the next one is one compact
      // word under any valid limits (max_segment and boundary are at least a page). Kept
      // free of calls so its state stays in registers; anything else leaves to the
      // general path below.
      uint64_t* o = out;
      const size_t stop = std::min(n - 1, i + static_cast<size_t>(out_end - out));
      while (i < stop) {
        const uint64_t p = pfn[i];
        if (p > kPfnMask || (l.merge && pfn[i + 1] == p + 1 && (!kHasProviders || prov[i + 1] == prov[i]))) break;
        ProviderId tag = kHostMemory;
        if constexpr (kHasProviders) {
          if (prov[i] == kInvalidProvider) break;
          tag = provider_tag(prov[i]);
        }
        *o++ = (uint64_t{tag} << kTagShift) | p;
        ++i;
      }
      const auto emitted = static_cast<size_t>(o - out);
      count += emitted;
      total += uint64_t{emitted} << kPageShift;
      out = o;
      if (emitted != 0) last_full = kHasProviders ? prov[i - 1] : kHostMemory;
      if (i >= n) break;
    }
    const uint64_t p = pfn[i];
    const ProviderId full = kHasProviders ? prov[i] : kHostMemory;
    if (p >= kPfnLimit) [[unlikely]]
      return fail(ERANGE, "pfn[" + std::to_string(i) + "] = " + format_hex(p) + " is at or above 2^42 (physical 2^54)");
    if (kHasProviders && full == kInvalidProvider) [[unlikely]]
      return fail(EINVAL, "providers[" + std::to_string(i) + "] is the reserved invalid id");
    const size_t j = l.merge ? run_end<kHasProviders>(pfn, prov, i, n) : i + 1;
    const uint64_t pages = j - i;
    if (pages > kPfnLimit - p) [[unlikely]]
      return fail(ERANGE, "pfn[" + std::to_string(i + (kPfnLimit - p)) + "] crosses 2^42 (physical 2^54)");
    const uint64_t addr = p << kPageShift;
    const uint64_t len = pages << kPageShift;
    if (fast && !first && pages <= kMaxCompactPages && p <= kPfnMask && (unlimited || len <= cap_at(addr, l)))
        [[likely]] {
      if (out == out_end) [[unlikely]] {
        commit();
        words_.reserve(words_.size() * 2);
        reload();
      }
      *out++ = compact_word(addr, len, provider_tag(full));
      ++count;
      total += len;
    } else {
      commit();
      tail_provider_ = last_full;
      append_split(addr, len, full, l, first);
      reload();
    }
    last_full = full;
    first = false;
    i = j;
  }
  commit();
  tail_provider_ = last_full;
  return {};
}

Status RangeList::append_pfns(std::span<const uint64_t> pfns, std::span<const ProviderId> providers,
                              const SegmentLimits& limits) {
  PHYSR_RETURN_IF_ERROR(validate_limits(limits, true));
  if (!providers.empty() && providers.size() != pfns.size())
    return make_error(EINVAL, "providers has " + std::to_string(providers.size()) + " ids for " +
                                  std::to_string(pfns.size()) + " pfns (need one per pfn, or none)");
  if (providers.empty()) return append_pfns_impl<false>(pfns.data(), nullptr, pfns.size(), limits);
  return append_pfns_impl<true>(pfns.data(), providers.data(), pfns.size(), limits);
}

Result<RangeList> RangeList::from_pfns(std::span<const uint64_t> pfns, std::span<const ProviderId> providers,
                                       const SegmentLimits& limits) {
  RangeList out;
  PHYSR_RETURN_IF_ERROR(out.append_pfns(pfns, providers, limits));
  return out;
}

static Status check_piece(const PhysRange& r, size_t index) {
  const uint64_t a = r.base.value();
  if (r.size == 0) return make_error(EINVAL, "range " + std::to_string(index) + " at " + format_hex(a) + " has length 0");
  if (a >= kRangeAddrLimit || r.size > kRangeAddrLimit - a)
    return make_error(ERANGE, "range " + std::to_string(index) + " [" + format_hex(a) + ", +" + format_hex(r.size) +
                                  ") runs past the physical limit 2^54");
  if (r.provider == kInvalidProvider)
    return make_error(EINVAL, "range " + std::to_string(index) + " has the reserved invalid provider id");
  return {};
}

Status RangeList::append(PhysRange piece, const SegmentLimits& limits) {
  PHYSR_RETURN_IF_ERROR(validate_limits(limits, false));
  PHYSR_RETURN_IF_ERROR(check_piece(piece, count_));
  append_split(piece.base.value(), piece.size, piece.provider, limits, true);
  return {};
}

Result<RangeList> RangeList::from_ranges(std::span<const PhysRange> pieces, const SegmentLimits& limits) {
  PHYSR_RETURN_IF_ERROR(validate_limits(limits, false));
  for (size_t i = 0; i < pieces.size(); ++i) PHYSR_RETURN_IF_ERROR(check_piece(pieces[i], i));
  RangeList out;
  out.words_.reserve(pieces.size());
  for (const PhysRange& r : pieces) out.append_split(r.base.value(), r.size, r.provider, limits, true);
  return out;
}

Status RangeList::append(const RangeList& other_in, const SegmentLimits& limits) {
  PHYSR_RETURN_IF_ERROR(validate_limits(limits, false));
  const RangeList copy = &other_in == this ? other_in : RangeList();
  const RangeList& other = &other_in == this ? copy : other_in;
  words_.reserve(words_.size() + other.words_.size());
  bool first = true;
  for (const PhysRange r : other) {
    const ProviderId full = r.provider == kIndirectProvider ? kInvalidProvider : r.provider;
    append_split(r.base.value(), r.size, full, limits, first);
    first = false;
  }
  return {};
}

Result<RangeList> RangeList::concat(const RangeList& a, const RangeList& b, const SegmentLimits& limits) {
  RangeList out = a;
  PHYSR_RETURN_IF_ERROR(out.append(b, limits));
  return out;
}

Result<RangeList> RangeList::split(const SegmentLimits& limits) const {
  PHYSR_RETURN_IF_ERROR(validate_limits(limits, false));
  RangeList out;
  out.words_.reserve(words_.size());
  for (const PhysRange r : *this) {
    const ProviderId full = r.provider == kIndirectProvider ? kInvalidProvider : r.provider;
    out.append_split(r.base.value(), r.size, full, limits, false);
  }
  return out;
}

Result<PhysRange> RangeList::at(size_t i) const {
  if (i >= count_)
    return make_error(ERANGE, "range index " + std::to_string(i) + " is past the end (list has " +
                                  std::to_string(count_) + " ranges)");
  return (*this)[i];
}

Result<RangeList> RangeList::decode(std::span<const uint64_t> words) {
  RangeList out;
  out.words_.reserve(words.size());
  for (size_t i = 0; i < words.size();) {
    const uint64_t w = words[i];
    const auto tag = static_cast<ProviderId>((w >> kTagShift) & kTagMask);
    if (!(w & kExtFlag)) {
      const PhysRange r = detail::enc::decode(&w);
      out.push(r.base.value(), r.size, tag);
      ++i;
      continue;
    }
    if (i + 1 >= words.size())
      return make_error(EINVAL, "word " + std::to_string(i) + ": extended entry without its length word");
    const uint64_t addr = w & kExtAddrMask;
    const uint64_t len = words[i + 1];
    if (len == 0) return make_error(EINVAL, "word " + std::to_string(i) + ": extended entry with length 0");
    if (len > kRangeAddrLimit - addr)
      return make_error(EINVAL, "word " + std::to_string(i) + ": range [" + format_hex(addr) + ", +" + format_hex(len) +
                                    ") runs past the physical limit 2^54");
    if (fits_compact(addr, len))
      return make_error(EINVAL, "word " + std::to_string(i) + ": extended entry [" + format_hex(addr) + ", +" + format_hex(len) +
                                    ") must be encoded compact (non-canonical)");
    out.push_extended(addr, len, tag);
    i += 2;
  }
  if (out.count_ != 0) {
    const ProviderId tag = out[out.count_ - 1].provider;
    out.tail_provider_ = tag == kIndirectProvider ? kInvalidProvider : tag;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Slices

Result<RangeSlice> RangeList::slice(uint64_t offset, uint64_t len) const {
  if (offset > total_ || len > total_ - offset)
    return make_error(ERANGE, "slice [" + std::to_string(offset) + ", +" + std::to_string(len) +
                                  ") runs past the list's " + std::to_string(total_) + " bytes");
  RangeSlice s;
  const uint64_t* w = words_.data();
  const uint64_t* const end = w + words_.size();
  uint64_t acc = 0;
  // Entries wholly before offset. With len == 0 the slice is empty wherever it sits.
  while (w != end) {
    const uint64_t l = detail::enc::decode(w).size;
    if (acc + l > offset) break;
    acc += l;
    w = next(w);
  }
  s.first_ = s.last_ = w;
  s.skip_ = offset - acc;
  s.len_ = len;
  if (len == 0) {
    s.skip_ = 0;
    return s;
  }
  uint64_t remaining = len, skip = s.skip_;
  while (remaining != 0) {
    const uint64_t l = detail::enc::decode(w).size - skip;
    remaining -= std::min(l, remaining);
    skip = 0;
    ++s.count_;
    w = next(w);
  }
  s.last_ = w;
  return s;
}

RangeList RangeSlice::to_list() const {
  RangeList out;
  for (const PhysRange r : *this) out.push(r.base.value(), r.size, r.provider);
  if (!out.empty()) {
    const ProviderId tag = out[out.size() - 1].provider;
    out.tail_provider_ = tag == kIndirectProvider ? kInvalidProvider : tag;
  }
  return out;
}

ScatterlistCost scatterlist_cost(size_t nents, uint64_t pages) noexcept {
  ScatterlistCost c;
  c.nents = nents;
  // Linux lib/scatterlist.c __sg_alloc_table(): chunks of SG_MAX_SINGLE_ALLOC (128) entries;
  // every chunk but the last gives its final entry to the chain link.
  const size_t chunks = nents <= 128 ? (nents == 0 ? 0 : 1) : (nents - 1 + 126) / 127;
  c.sg_entries = nents + (chunks == 0 ? 0 : chunks - 1);
  c.sg_bytes = uint64_t{c.sg_entries} * 32;
  c.struct_page_bytes = pages * 64;
  c.phys_vec_bytes = uint64_t{nents} * 16;
  return c;
}

}  // namespace physr
