#include <random>
#include <string>

#include "physr/range.hpp"

namespace physr {

namespace {
void skip_blanks(std::string_view& s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
}
}  // namespace

Result<PfnList> parse_pfn_text(std::string_view text, std::string_view source) {
  PfnList out;
  size_t line_no = 0;
  while (!text.empty()) {
    ++line_no;
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    if (const size_t hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    skip_blanks(line);
    if (line.empty()) continue;
    auto where = [&] { return std::string(source) + ":" + std::to_string(line_no) + ": "; };
    auto pfn = consume_uint(line);
    if (!pfn) return make_error(EINVAL, where() + "expected a pfn (decimal or 0x hex that fits 64 bits)");
    skip_blanks(line);
    ProviderId prov = kHostMemory;
    if (!line.empty()) {
      if (line.front() == ':') {
        line.remove_prefix(1);
        skip_blanks(line);
      }
      auto p = consume_uint(line);
      if (!p || *p >= kInvalidProvider) return make_error(EINVAL, where() + "expected a provider id below 2^32-1 after the pfn");
      prov = static_cast<ProviderId>(*p);
      skip_blanks(line);
      if (!line.empty()) return make_error(EINVAL, where() + "unexpected text '" + std::string(line) + "' after the provider id");
    }
    out.pfns.push_back(*pfn);
    out.providers.push_back(prov);
  }
  return out;
}


Result<PfnPattern> parse_pfn_pattern(std::string_view name) {
  if (name == "contiguous") return PfnPattern::contiguous;
  if (name == "random") return PfnPattern::random;
  if (name == "alternating") return PfnPattern::alternating;
  if (name == "mixed") return PfnPattern::mixed;
  return make_error(EINVAL, "pattern '" + std::string(name) + "': expected contiguous, random, alternating or mixed");
}

PfnList make_pfn_pattern(PfnPattern pattern, size_t n, uint64_t seed) {
  PfnList out;
  out.pfns.resize(n);
  out.providers.assign(n, kHostMemory);
  std::mt19937_64 rng(seed);
  const uint64_t base = 0x100000 + (rng() & 0xffff) * 0x100;  // above 4 GiB
  switch (pattern) {
    case PfnPattern::contiguous:
      for (size_t i = 0; i < n; ++i) out.pfns[i] = base + i;
      break;
    case PfnPattern::random:
      // Scattered over 256 GiB; a page followed by its neighbour is rare (1 in 2^26).
      for (size_t i = 0; i < n; ++i) out.pfns[i] = rng() & ((uint64_t{1} << 26) - 1);
      break;
    case PfnPattern::alternating:
      for (size_t i = 0; i < n; ++i) {
        out.pfns[i] = base + i;
        out.providers[i] = i % 2;
      }
      break;
    case PfnPattern::mixed: {
      uint64_t p = base;
      size_t i = 0;
      while (i < n) {
        const size_t run = 1 + rng() % 64;
        const ProviderId prov = rng() % 8 == 0 ? 1 : kHostMemory;
        for (size_t k = 0; k < run && i < n; ++k, ++i) {
          out.pfns[i] = p++;
          out.providers[i] = prov;
        }
        p += 1 + rng() % 1024;
      }
      break;
    }
  }
  return out;
}

}  // namespace physr
