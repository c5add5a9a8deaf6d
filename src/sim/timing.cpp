// The timing every job shares: items (I/Os, packets) crossing their routes, one stage
// served in order by a device, and the result's common part.
#include <algorithm>
#include <vector>

#include "sim/job_common.hpp"

namespace physr::sim::detail {

void Stages::start(uint64_t i, std::vector<Route> routes, size_t served, std::vector<uint64_t> bytes) {
  items_[i] = Item{sim_.now(), std::move(routes), served, std::move(bytes)};
  queue(i, 0);
}

void Stages::queue(uint64_t i, size_t k) {
  const Item& x = items_[i];
  const Route& r = x.routes[k];
  double at = sim_.now();
  if (k == x.served) {
    const double start = std::max(sim_.now() + r.latency_ns, free_);
    free_ = start + slot_ns_;
    at = start - r.latency_ns;
  }
  flow_of_.emplace_back(i, k);
  sim_.add(r, x.bytes.empty() ? bytes_ : x.bytes[k], at);
}

uint64_t Stages::advance(const std::vector<size_t>& finished, std::vector<double>& lat) {
  uint64_t ended = 0;
  for (size_t f : finished) {
    const auto [i, k] = flow_of_[f];
    Item& x = items_[i];
    if (k + 1 < x.routes.size()) {
      queue(i, k + 1);
      continue;
    }
    lat.push_back(sim_.now() - x.submit);
    x.routes.clear();
    ++ended;
  }
  return ended;
}

void finish_result(JobResult& out, const Machine& m, const Simulator& sim, std::vector<double>& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before) {
  out.ios = ios;
  out.bytes = bytes;
  out.seconds = sim.now() * 1e-9;
  out.gbps = sim.now() > 0 ? static_cast<double>(bytes) / sim.now() : 0;
  std::sort(lat.begin(), lat.end());
  const auto pct = [&](double p) {
    return lat.empty() ? 0.0 : lat[std::min(lat.size() - 1, static_cast<size_t>(p * static_cast<double>(lat.size() - 1) + 0.5))];
  };
  out.lat_p50_us = pct(0.50) / 1000;
  out.lat_p99_us = pct(0.99) / 1000;
  for (const Resource& r : m.fabric().resources()) {
    if (r.bytes == 0) continue;
    out.link_bytes.emplace_back(r.name, r.bytes);
    if (r.kind == Resource::Kind::rc_forward) out.rc_bytes += r.bytes;
    if (r.kind == Resource::Kind::memory) out.host_memory_bytes += r.bytes;
  }
  out.iommu_faults = m.faults().size() - faults_before;
}

}  // namespace physr::sim::detail
