// The timing every job shares: items (I/Os, packets) crossing their routes, one stage
// served in order by a device, their latencies, and the result's common part.
#include <algorithm>
#include <bit>
#include <cmath>
#include <numbers>
#include <vector>

#include "sim/job_common.hpp"

namespace physr::sim::detail {

namespace {

constexpr unsigned kSubBits = 7;  // 128 buckets per power of two
constexpr uint64_t kSub = uint64_t{1} << kSubBits;

size_t bucket_of(uint64_t v) noexcept {
  if (v < kSub) return static_cast<size_t>(v);
  const unsigned e = static_cast<unsigned>(std::bit_width(v)) - 1;  // >= kSubBits
  const unsigned shift = e - kSubBits;
  return static_cast<size_t>(kSub + (e - kSubBits) * kSub + ((v >> shift) - kSub));
}

// The midpoint of a bucket's values (the value itself below kSub).
double bucket_value(size_t b) noexcept {
  if (b < kSub) return static_cast<double>(b);
  const uint64_t shift = (b - kSub) / kSub, sub = (b - kSub) % kSub;
  const uint64_t low = (kSub + sub) << shift, width = uint64_t{1} << shift;
  return static_cast<double>(low) + static_cast<double>(width - 1) / 2;
}

uint64_t splitmix64(uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

void LatencyHistogram::add(double ns) {
  const uint64_t v = ns <= 0 ? 0 : ns >= 9.2e18 ? UINT64_MAX : static_cast<uint64_t>(std::llround(ns));
  const size_t b = bucket_of(v);
  if (b >= counts_.size()) counts_.resize(b + 1, 0);
  ++counts_[b];
  ++n_;
}

double LatencyHistogram::percentile(double p) const {
  if (n_ == 0) return 0;
  const auto rank = std::min<uint64_t>(n_ - 1, static_cast<uint64_t>(p * static_cast<double>(n_ - 1) + 0.5));
  uint64_t seen = 0;
  for (size_t b = 0; b < counts_.size(); ++b) {
    seen += counts_[b];
    if (seen > rank) return bucket_value(b);
  }
  return bucket_value(counts_.size() - 1);
}

double lognormal_factor(uint64_t seed, uint64_t stream, uint64_t i, double sigma) noexcept {
  if (sigma == 0) return 1;
  const uint64_t h1 = splitmix64(splitmix64(seed ^ splitmix64(stream)) ^ (2 * i));
  const uint64_t h2 = splitmix64(h1 ^ (2 * i + 1));
  // Uniforms in (0, 1): 53 bits, centred in their step so neither end is reached.
  const double u1 = (static_cast<double>(h1 >> 11) + 0.5) * 0x1p-53, u2 = (static_cast<double>(h2 >> 11) + 0.5) * 0x1p-53;
  const double z = std::sqrt(-2 * std::log(u1)) * std::cos(2 * std::numbers::pi * u2);
  return std::exp(sigma * z);
}

Permutation::Permutation(uint64_t n, uint64_t seed) noexcept : n_(n) {
  const unsigned bits = n <= 1 ? 1 : static_cast<unsigned>(std::bit_width(n - 1));
  mask_ = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
  half_ = std::max(1u, bits / 2);
  k1_ = splitmix64(seed) | 1;  // odd: invertible modulo a power of two
  k2_ = splitmix64(seed + 1);
}

uint64_t Permutation::operator()(uint64_t i) const noexcept {
  uint64_t x = i;
  do {  // a bijection on [0, mask_]; walking its cycle from i reaches a value below n_
    for (int round = 0; round < 3; ++round) {
      x = (x * k1_) & mask_;
      x ^= x >> half_;
      x = (x + k2_) & mask_;
    }
  } while (x >= n_);
  return x;
}

void Stages::start(uint64_t i, std::vector<Route> routes, size_t served, std::vector<uint64_t> bytes, double tail_ns) {
  uint32_t slot;
  if (!free_items_.empty()) {
    slot = free_items_.back();
    free_items_.pop_back();
  } else {
    slot = static_cast<uint32_t>(items_.size());
    items_.emplace_back();
  }
  items_[slot] = Item{i, sim_.now(), tail_ns, std::move(routes), served, std::move(bytes)};
  queue(slot, 0);
}

void Stages::queue(uint32_t slot, size_t k) {
  const Item& x = items_[slot];
  const Route& r = x.routes[k];
  double at = sim_.now();
  if (k == x.served) {
    const double start = std::max(sim_.now() + r.latency_ns, *free_);
    *free_ = start + slot_ns_;
    at = start - r.latency_ns + x.tail;
  }
  const size_t id = sim_.add(r, x.bytes.empty() ? bytes_ : x.bytes[k], at, owner_);
  if (id >= flow_of_.size()) flow_of_.resize(id + 1);
  flow_of_[id] = {slot, static_cast<uint32_t>(k)};
}

template <class Add>
uint64_t Stages::advance_with(const std::vector<size_t>& finished, const Add& add) {
  uint64_t ended = 0;
  ended_.clear();
  for (size_t f : finished) {
    const auto [slot, k] = flow_of_[f];
    sim_.release(f);
    Item& x = items_[slot];
    // The job's own bytes over each resource of the stage that ended (a flow moves all its
    // bytes over every resource of its route).
    const uint64_t moved = x.bytes.empty() ? bytes_ : x.bytes[k];
    for (const uint32_t r : x.routes[k].resources) {
      if (r >= res_bytes_.size()) res_bytes_.resize(r + 1, 0);
      res_bytes_[r] += moved;
    }
    if (k + 1 < x.routes.size()) {
      queue(slot, k + 1);
      continue;
    }
    add(sim_.now() - x.submit);
    x.routes.clear();
    x.bytes.clear();
    free_items_.push_back(slot);
    ended_.push_back(x.id);
    ++ended;
  }
  return ended;
}

uint64_t Stages::advance(const std::vector<size_t>& finished, LatencyHistogram& lat) {
  return advance_with(finished, [&](double ns) { lat.add(ns); });
}

uint64_t Stages::advance(const std::vector<size_t>& finished, std::vector<double>& lat) {
  return advance_with(finished, [&](double ns) { lat.push_back(ns); });
}

void finish_result(JobResult& out, const Machine& m, const Driver& d, const Stages& stages, const LatencyHistogram& lat,
                   uint64_t bytes, uint64_t ios) {
  finish_result(out, m, d, stages.resource_bytes(), lat, bytes, ios);
}

void finish_result(JobResult& out, const Machine& m, const Driver& d, const std::vector<uint64_t>& own,
                   const LatencyHistogram& lat, uint64_t bytes, uint64_t ios) {
  const double ns = d.end_ns - d.start_ns;
  out.ios = ios;
  out.bytes = bytes;
  out.seconds = ns * 1e-9;
  out.gbps = ns > 0 ? static_cast<double>(bytes) / ns : 0;
  out.lat_p50_us = lat.percentile(0.50) / 1000;
  out.lat_p99_us = lat.percentile(0.99) / 1000;
  out.lat_p999_us = lat.percentile(0.999) / 1000;
  const std::vector<Resource>& res = m.fabric().resources();
  for (size_t r = 0; r < own.size() && r < res.size(); ++r) {
    if (own[r] == 0) continue;
    out.link_bytes.emplace_back(res[r].name, own[r]);
    if (res[r].kind == Resource::Kind::rc_forward) out.rc_bytes += own[r];
    if (res[r].kind == Resource::Kind::memory) out.host_memory_bytes += own[r];
  }
  out.iommu_faults = d.faults;
}

void finish_result(JobResult& out, const Machine& m, const Driver& d, const Stages& stages, std::vector<double>& lat,
                   uint64_t bytes, uint64_t ios) {
  LatencyHistogram h;
  for (double ns : lat) h.add(ns);
  finish_result(out, m, d, stages, h, bytes, ios);
}

}  // namespace physr::sim::detail
