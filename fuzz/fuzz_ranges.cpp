// Fuzzes the range-list builders and the word decoder against their invariants.
// Byte 0 picks the target; the rest is its input.
#include <algorithm>
#include <cstring>
#include <vector>

#include "fuzz_check.hpp"
#include "physr/range.hpp"

namespace {
using namespace physr;


struct Reader {
  const uint8_t* p;
  size_t n;
  uint64_t u64() {
    uint64_t v = 0;
    const size_t k = n < 8 ? n : 8;
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
  uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
};

void check_list(const RangeList& l) {
  size_t i = 0;
  uint64_t total = 0;
  for (const PhysRange r : l) {
    CHECK(r.size != 0);
    CHECK(r.base.value() < kRangeAddrLimit && r.size <= kRangeAddrLimit - r.base.value());
    CHECK(l[i] == r);
    total += r.size;
    ++i;
  }
  CHECK(i == l.size());
  CHECK(total == l.total_bytes());
  auto back = RangeList::decode(l.words());
  CHECK(back.has_value());
  CHECK(*back == l);
}

void check_limits(const RangeList& l, const SegmentLimits& lim) {
  for (const PhysRange r : l) {
    CHECK(r.size <= lim.max_segment);
    if (lim.boundary_mask != ~uint64_t{0})
      CHECK((r.base.value() & ~lim.boundary_mask) == ((r.base.value() + r.size - 1) & ~lim.boundary_mask));
  }
}

SegmentLimits read_limits(Reader& in) {
  SegmentLimits lim;
  const uint8_t a = in.u8(), b = in.u8();
  if (a & 1) lim.max_segment = (uint64_t{in.u8()} + 1) << (a >> 4);
  if (b & 1) lim.boundary_mask = (uint64_t{1} << (b >> 2)) - 1;
  lim.merge = !(a & 2);
  return lim;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Reader in{data + 1, size - 1};
  switch (data[0] % 3) {
    case 0: {  // decoder
      std::vector<uint64_t> words;
      while (in.n >= 8) words.push_back(in.u64());
      auto l = RangeList::decode(words);
      if (l) {
        check_list(*l);
        CHECK(std::vector<uint64_t>(l->words().begin(), l->words().end()) == words);
      }
      break;
    }
    case 1: {  // pfn builder: small deltas so runs form
      const SegmentLimits lim = read_limits(in);
      std::vector<uint64_t> pfns;
      std::vector<ProviderId> prov;
      uint64_t p = in.u64() & ((uint64_t{1} << 43) - 1);
      while (in.n >= 2) {
        const uint8_t d = in.u8(), q = in.u8();
        p += d < 200 ? 1 : d;
        pfns.push_back(p);
        prov.push_back(q < 200 ? 0 : q * 3u);
      }
      RangeList l;
      const size_t half = pfns.size() / 2;
      auto r1 = l.append_pfns(std::span<const uint64_t>(pfns).first(half), std::span<const ProviderId>(prov).first(half), lim);
      if (!r1) {
        CHECK(l.empty());
        break;
      }
      const RangeList before = l;
      auto r2 = l.append_pfns(std::span<const uint64_t>(pfns).subspan(half), std::span<const ProviderId>(prov).subspan(half), lim);
      if (!r2) {
        CHECK(l == before);  // failed appends leave the list unchanged
        break;
      }
      check_list(l);
      SegmentLimits page_lim = lim;
      page_lim.max_segment &= ~uint64_t{4095};
      check_limits(l, page_lim);
      CHECK(l.total_bytes() == pfns.size() * 4096);
      auto whole = RangeList::from_pfns(pfns, prov, lim);
      CHECK(whole.has_value() && *whole == l);
      break;
    }
    default: {  // (addr, len) builder, split and slice
      const SegmentLimits lim = read_limits(in);
      std::vector<PhysRange> pieces;
      while (in.n >= 10) {
        const uint64_t a = in.u64() & ((uint64_t{1} << 55) - 1);
        const uint64_t len = (uint64_t{in.u8()} << (in.u8() & 31)) ;
        pieces.push_back({PhysAddr(a), len, static_cast<ProviderId>(a & 0x3ff)});
      }
      // Splitting is linear in its output: skip inputs that would legitimately produce
      // millions of ranges (a TiB cut into 4 KiB pieces) so each run stays fast.
      const uint64_t unit = std::min(lim.max_segment, lim.boundary_mask == ~uint64_t{0} ? ~uint64_t{0} : lim.boundary_mask + 1);
      uint64_t bytes = 0, estimate = 0;
      for (const PhysRange& r : pieces) {
        bytes += std::min<uint64_t>(r.size, uint64_t{1} << 40);
        estimate += r.size / unit + 2;
      }
      if (estimate > (1u << 16) || bytes > (uint64_t{1} << 26)) break;
      auto l = RangeList::from_ranges(pieces, lim);
      if (!l) break;
      check_list(*l);
      check_limits(*l, lim);
      auto s = l->split(SegmentLimits{.max_segment = 4096});
      CHECK(s.has_value() && s->total_bytes() == l->total_bytes());
      check_list(*s);
      const uint64_t total = l->total_bytes();
      const uint64_t off = total ? pieces.size() * 977 % (total + 1) : 0;
      auto sl = l->slice(off, (total - off) / 2);
      CHECK(sl.has_value());
      uint64_t sum = 0;
      for (const PhysRange r : *sl) sum += r.size;
      CHECK(sum == (total - off) / 2);
      check_list(sl->to_list());
      break;
    }
  }
  return 0;
}
