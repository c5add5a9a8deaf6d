// The PCIe fabric: resources and routes from a topology, and the flow-level simulator.
#include <algorithm>
#include <cmath>
#include <limits>

#include "physr/sim.hpp"

namespace physr::sim {

using pci::PortType;

double pcie_link_gbps(double gts, unsigned width) {
  // Encoding: 8b/10b (PCIe 1.x, 2.x), 128b/130b (3.0 to 5.0), 1b/1b FLIT with 242/256
  // payload (6.0 and later).
  const double eff = gts <= 5.0 ? 0.8 : gts <= 32.0 ? 128.0 / 130.0 : 242.0 / 256.0;
  return gts * width * eff / 8.0;
}

namespace {
// Ports inside a root complex or a switch's downstream side have no link of their own: the
// link belongs to the upstream port or endpoint below them.
bool has_upstream_link(PortType t) {
  return t != PortType::root_port && t != PortType::switch_downstream && t != PortType::rc_endpoint &&
         t != PortType::rc_event_collector;
}
}  // namespace

uint32_t Fabric::add(Resource::Kind k, std::string name, double gbps) {
  res_.push_back(Resource{k, std::move(name), gbps, 0, 0});
  return static_cast<uint32_t>(res_.size() - 1);
}

int Fabric::numa_of(uint32_t f) const {
  const auto& fn = topo_->functions[f];
  if (fn.numa_node >= 0) return fn.numa_node;
  const int h = topo_->host_bridges[fn.host_bridge].numa_node;
  return h >= 0 ? h : 0;
}

uint32_t Fabric::add_resource(Resource::Kind kind, std::string name, double gbps) {
  for (uint32_t i = 0; i < res_.size(); ++i)
    if (res_[i].kind == kind && res_[i].name == name) {
      res_[i].gbps = gbps;
      return i;
    }
  return add(kind, std::move(name), gbps);
}

Result<Fabric> Fabric::create(const pci::Topology& topo, const FabricOptions& o) {
  PHYSR_ASSIGN_OR_RETURN(auto e, pci::P2PEngine::create(topo));
  auto own = std::make_unique<pci::P2PEngine>(std::move(e));
  auto f = create(*own, o);
  if (f) f->own_engine_ = std::move(own);
  return f;
}

Result<Fabric> Fabric::create(const pci::P2PEngine& engine, const FabricOptions& o) {
  const pci::Topology& topo = engine.topology();
  for (double v : {o.default_link_gts, o.rc_p2p_gbps, o.memory_gbps, o.inter_socket_gbps})
    if (!(v > 0) || !std::isfinite(v)) return make_error(EINVAL, "fabric: bandwidths and link speeds must be positive");
  if (o.default_link_width == 0) return make_error(EINVAL, "fabric: the default link width must be at least 1");
  Fabric f;
  f.topo_ = &topo;
  f.opt_ = o;
  f.engine_ = &engine;
  const size_t n = topo.functions.size();
  f.link_up_.assign(n, -1);
  f.link_down_.assign(n, -1);
  for (uint32_t i = 0; i < n; ++i) {
    const auto& fn = topo.functions[i];
    if (!has_upstream_link(fn.port_type)) continue;
    // Speed and width: the function's own, else the port above it, else the defaults.
    double gts = fn.link_speed_gts;
    unsigned width = fn.link_width;
    if (fn.upstream >= 0) {
      const auto& up = topo.functions[static_cast<uint32_t>(fn.upstream)];
      if (gts == 0) gts = up.link_speed_gts;
      if (width == 0) width = up.link_width;
    }
    if (gts == 0) gts = o.default_link_gts;
    if (width == 0) width = o.default_link_width;
    const double bw = pcie_link_gbps(gts, width);
    const std::string name = fn.name.empty() ? fn.bdf.to_string() : fn.name;
    f.link_up_[i] = static_cast<int32_t>(f.add(Resource::Kind::link_up, name + " link up", bw));
    f.link_down_[i] = static_cast<int32_t>(f.add(Resource::Kind::link_down, name + " link down", bw));
  }
  for (const auto& hb : topo.host_bridges) f.rc_fwd_.push_back(f.add(Resource::Kind::rc_forward, "root complex " + hb.name(), o.rc_p2p_gbps));
  for (uint32_t i = 0; i < n; ++i) f.numa_nodes_.push_back(f.numa_of(i));
  for (const auto& hb : topo.host_bridges) f.numa_nodes_.push_back(hb.numa_node >= 0 ? hb.numa_node : 0);
  if (f.numa_nodes_.empty()) f.numa_nodes_.push_back(0);
  std::sort(f.numa_nodes_.begin(), f.numa_nodes_.end());
  f.numa_nodes_.erase(std::unique(f.numa_nodes_.begin(), f.numa_nodes_.end()), f.numa_nodes_.end());
  for (int node : f.numa_nodes_) f.memory_.push_back(f.add(Resource::Kind::memory, "memory node " + std::to_string(node), o.memory_gbps));
  const size_t s = f.numa_nodes_.size();
  f.socket_link_.assign(s, std::vector<uint32_t>(s, 0));
  for (size_t a = 0; a < s; ++a)
    for (size_t b = 0; b < s; ++b)
      if (a != b)
        f.socket_link_[a][b] = f.add(Resource::Kind::inter_socket,
                                     "socket " + std::to_string(f.numa_nodes_[a]) + "->" + std::to_string(f.numa_nodes_[b]),
                                     o.inter_socket_gbps);
  return f;
}

uint32_t Fabric::inter_socket(int from, int to) const {
  const auto ia = std::lower_bound(numa_nodes_.begin(), numa_nodes_.end(), from) - numa_nodes_.begin();
  const auto ib = std::lower_bound(numa_nodes_.begin(), numa_nodes_.end(), to) - numa_nodes_.begin();
  return socket_link_[static_cast<size_t>(ia)][static_cast<size_t>(ib)];
}

void Fabric::climb(uint32_t f, std::optional<uint32_t> stop, bool up, Route& r) const {
  for (int32_t x = static_cast<int32_t>(f); x >= 0 && (!stop || static_cast<uint32_t>(x) != *stop);
       x = topo_->functions[static_cast<uint32_t>(x)].upstream) {
    const auto i = static_cast<uint32_t>(x);
    const int32_t link = up ? link_up_[i] : link_down_[i];
    if (link >= 0) r.resources.push_back(static_cast<uint32_t>(link));
    if (topo_->functions[i].port_type == PortType::switch_upstream) r.latency_ns += opt_.switch_latency_ns;
  }
}

Result<Route> Fabric::to_memory(uint32_t f, int node, bool device_writes) const {
  if (f >= topo_->functions.size()) return make_error(EINVAL, "fabric: no function " + std::to_string(f));
  const int home = topo_->host_bridges[topo_->functions[f].host_bridge].numa_node >= 0
                       ? topo_->host_bridges[topo_->functions[f].host_bridge].numa_node
                       : 0;
  if (node < 0) node = numa_of(f);
  if (!std::binary_search(numa_nodes_.begin(), numa_nodes_.end(), node))
    return make_error(EINVAL, "fabric: no NUMA node " + std::to_string(node) + " in " + topo_->source);
  Route r;
  r.host_memory = true;
  climb(f, std::nullopt, device_writes, r);
  r.latency_ns += opt_.rc_latency_ns + opt_.memory_latency_ns;
  if (node != home) {
    r.resources.push_back(device_writes ? inter_socket(home, node) : inter_socket(node, home));
    r.latency_ns += opt_.inter_socket_latency_ns;
  }
  const auto mi = std::lower_bound(numa_nodes_.begin(), numa_nodes_.end(), node) - numa_nodes_.begin();
  r.resources.push_back(memory_[static_cast<size_t>(mi)]);
  return r;
}

Result<Route> Fabric::to_peer(uint32_t a, uint32_t b, bool initiator_writes) const {
  const size_t n = topo_->functions.size();
  if (a >= n || b >= n) return make_error(EINVAL, "fabric: no function " + std::to_string(a >= n ? a : b));
  // The target's memory is the provider, the initiator the client (Linux's order).
  const pci::Explanation ex = engine_->explain(b, a);
  Route r;
  r.p2p = ex.verdict.type;
  if (ex.verdict.type == pci::MapType::not_supported) return unsupported(a, b);
  if (ex.verdict.type == pci::MapType::bus_addr && ex.common) {
    // Up to the common device and down again: the switch turns the traffic around.
    climb(a, *ex.common, initiator_writes, r);
    climb(b, *ex.common, !initiator_writes, r);
    if (a != b && topo_->functions[*ex.common].port_type == PortType::switch_upstream) r.latency_ns += opt_.switch_latency_ns;
    return r;
  }
  through_rc(a, b, initiator_writes, r);
  return r;
}

Error Fabric::unsupported(uint32_t a, uint32_t b) const {
  return make_error(EREMOTEIO, "unsupported request: the root complex does not forward peer traffic from " + topo_->functions[a].bdf.to_string() +
                                   " to " + topo_->functions[b].bdf.to_string());
}

bool Fabric::rc_forwards(uint32_t a, uint32_t b) const {
  // The root complex forwards peer traffic where Linux lets P2P through the host bridge
  // (p2pdma.c calc_map_type_and_dist(): an AMD Zen CPU, or the host bridge allowlist).
  return engine_->cpu_amd_zen() || engine_->host_bridge_allowed(b, a);
}

Result<Route> Fabric::to_peer_via_rc(uint32_t a, uint32_t b, bool initiator_writes) const {
  const size_t n = topo_->functions.size();
  if (a >= n || b >= n) return make_error(EINVAL, "fabric: no function " + std::to_string(a >= n ? a : b));
  if (!rc_forwards(a, b)) return unsupported(a, b);
  Route r;
  r.p2p = pci::MapType::thru_host_bridge;
  through_rc(a, b, initiator_writes, r);
  return r;
}

void Fabric::through_rc(uint32_t a, uint32_t b, bool initiator_writes, Route& r) const {
  const auto& fa = topo_->functions[a];
  const auto& fb = topo_->functions[b];
  // Through the root complex(es): up, across the forwarding engine, down.
  r.through_rc = true;
  climb(a, std::nullopt, initiator_writes, r);
  r.resources.push_back(rc_fwd_[fa.host_bridge]);
  r.latency_ns += opt_.rc_latency_ns;
  if (fb.host_bridge != fa.host_bridge) {
    const int na = numa_of(a), nb = numa_of(b);
    if (na != nb) {
      r.resources.push_back(initiator_writes ? inter_socket(na, nb) : inter_socket(nb, na));
      r.latency_ns += opt_.inter_socket_latency_ns;
    }
    r.resources.push_back(rc_fwd_[fb.host_bridge]);
    r.latency_ns += opt_.rc_latency_ns;
  }
  climb(b, std::nullopt, !initiator_writes, r);
}

// ---------------------------------------------------------------------------------------

size_t Simulator::add(const Route& route, uint64_t bytes, double at_ns, uint32_t owner) {
  size_t id = flows_.size();
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
  } else {
    flows_.emplace_back();
  }
  Flow& f = flows_[id];
  f.res.assign(route.resources.begin(), route.resources.end());  // a reused record keeps its capacity
  f.submit = std::max(at_ns, now_);
  f.start = f.submit + route.latency_ns;
  f.finish = -1;
  f.remaining = static_cast<double>(bytes);
  f.rate = 0;
  f.bytes = bytes;
  f.owner = owner;
  // Keep the pending flows ordered by start (stable for equal starts).
  const auto pos = std::upper_bound(order_.begin() + static_cast<long>(next_), order_.end(), id,
                                    [&](size_t x, size_t y) { return flows_[x].start < flows_[y].start; });
  order_.insert(pos, id);
  return id;
}

// Max-min fair rates by progressive filling: repeatedly find the resource whose remaining
// capacity split among its unfrozen flows is smallest, freeze those flows at that share.
// Only the resources the active flows cross take part (a few of the fabric's), in scratch
// kept between calls; the same shares, to the bit, as over every resource in index order
// (a minimum does not depend on the order it is taken in).
void Simulator::allocate_rates(const std::vector<size_t>& active) {
  auto& res = fabric_->resources();
  if (users_.size() < res.size()) {
    users_.resize(res.size(), 0);
    cap_.resize(res.size(), 0);
  }
  touched_.clear();
  for (size_t i : active) {
    flows_[i].rate = -1;
    for (uint32_t r : flows_[i].res)
      if (users_[r]++ == 0) {
        touched_.push_back(r);
        cap_[r] = res[r].gbps;
      }
  }
  // users_ is zero again on every way out (each frozen flow gives its counts back).
  struct Reset {
    std::vector<uint32_t>& users;
    const std::vector<uint32_t>& touched;
    ~Reset() {
      for (uint32_t r : touched) users[r] = 0;
    }
  } reset{users_, touched_};
  size_t left = active.size();
  while (left) {
    double best = std::numeric_limits<double>::infinity();
    for (uint32_t r : touched_)
      if (users_[r]) best = std::min(best, cap_[r] / users_[r]);
    // A negative share would leave the flows it bottlenecks unfrozen and this loop spinning.
    PHYSR_ASSERT(best >= 0, "a resource's remaining capacity never goes negative");
    const size_t unfrozen = left;
    if (!std::isfinite(best)) {  // flows that cross no resource move instantly
      for (size_t i : active)
        if (flows_[i].rate < 0) flows_[i].rate = std::numeric_limits<double>::infinity();
      return;
    }
    for (size_t i : active) {
      Flow& f = flows_[i];
      if (f.rate >= 0) continue;
      bool bottlenecked = false;
      for (uint32_t r : f.res) bottlenecked |= users_[r] && cap_[r] / users_[r] <= best * (1 + 1e-12);
      if (!bottlenecked) continue;
      f.rate = best;
      --left;
      for (uint32_t r : f.res) {
        PHYSR_ASSERT(users_[r] > 0, "a resource's count of unfrozen flows never underflows");
        cap_[r] -= best;
        --users_[r];
      }
    }
    PHYSR_ASSERT(left < unfrozen, "each round of progressive filling freezes at least one flow");
  }
}

namespace {
// std::llround() for the non-negative byte counts (half away from zero), inline: x minus
// its integer part is exact in binary floating point, so the result is llround's.
uint64_t round_bytes(double x) noexcept {
  const auto whole = static_cast<uint64_t>(x);
  return whole + (x - static_cast<double>(whole) >= 0.5 ? 1 : 0);
}
}  // namespace

// One event: starts what is due, moves data to the next completion, start or `horizon`
// (whichever comes first), and appends the transfers that completed to `done`.
bool Simulator::advance(double horizon, std::vector<size_t>& done) {
  if (next_ >= order_.size() && active_.empty()) {
    if (now_ < horizon && std::isfinite(horizon)) now_ = horizon;
    return false;
  }
  auto& res = fabric_->resources();
  if (active_.empty() && now_ < flows_[order_[next_]].start) {
    if (flows_[order_[next_]].start > horizon) {
      now_ = horizon;
      return false;
    }
    now_ = flows_[order_[next_]].start;
  }
  while (next_ < order_.size() && flows_[order_[next_]].start <= now_) {
    active_.push_back(order_[next_++]);
    ++events_;
  }
  allocate_rates(active_);
  double dt = horizon - now_;
  for (size_t i : active_) {
    PHYSR_ASSERT(flows_[i].rate >= 0 && flows_[i].remaining >= 0, "an active flow has a rate and bytes left, neither negative");
    dt = std::min(dt, flows_[i].remaining / flows_[i].rate);
  }
  if (next_ < order_.size()) dt = std::min(dt, flows_[order_[next_]].start - now_);
  PHYSR_ASSERT(dt >= 0, "simulated time never runs backwards");
  for (size_t i : active_) {
    Flow& f = flows_[i];
    const double moved = std::isfinite(f.rate) ? std::min(f.remaining, f.rate * dt) : f.remaining;
    f.remaining -= moved;
    PHYSR_ASSERT(f.remaining >= 0, "a flow never moves more than it has left");
    for (uint32_t r : f.res) {
      res[r].moved += moved;
      res[r].bytes = round_bytes(res[r].moved);
    }
  }
  now_ += dt;
  std::erase_if(active_, [&](size_t i) {
    Flow& f = flows_[i];
    if (f.remaining > 1e-6 * static_cast<double>(f.bytes) + 1e-9) return false;
    for (uint32_t r : f.res) {  // account the rounding remainder, so totals are exact
      res[r].moved += f.remaining;
      res[r].bytes = round_bytes(res[r].moved);
    }
    PHYSR_ASSERT(f.remaining >= 0 && now_ >= f.start, "a flow finishes after it starts, with nothing overdrawn");
    f.remaining = 0;
    f.finish = now_;
    ++events_;
    done.push_back(i);
    return true;
  });
  if (next_ == order_.size()) {  // everything started: drop the consumed prefix
    order_.clear();
    next_ = 0;
  } else if (next_ >= 1024 && 2 * next_ >= order_.size()) {
    // Flows still pending (a job keeps some in their latency at all times): drop the started
    // prefix once it is half the list, so the list stays bounded by the flows pending.
    order_.erase(order_.begin(), order_.begin() + static_cast<long>(next_));
    next_ = 0;
  }
  return true;
}

std::vector<size_t> Simulator::step() {
  std::vector<size_t> done;
  step(done);
  return done;
}

void Simulator::step(std::vector<size_t>& done) {
  done.clear();
  while (done.empty() && advance(std::numeric_limits<double>::infinity(), done)) {
  }
}

std::vector<size_t> Simulator::idle_until(double t) {
  std::vector<size_t> done;
  idle_until(t, done);
  return done;
}

void Simulator::idle_until(double t, std::vector<size_t>& done) {
  done.clear();
  while (now_ < t && advance(t, done)) {
  }
  if (now_ < t) now_ = t;
}

double Simulator::run() {
  std::vector<size_t> done;
  do step(done);
  while (!done.empty());
  return now_;
}

}  // namespace physr::sim
