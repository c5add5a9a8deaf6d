// P2P verdicts exactly as Linux drivers/pci/p2pdma.c computes them.
#include <algorithm>
#include <climits>

#include "physr/pci.hpp"

namespace physr::pci {

namespace {

// Linux drivers/pci/p2pdma.c pci_p2pdma_whitelist[] (newest), in its order, with the
// mainline release that added each entry (docs/kernel-parity.md says how each was found).
constexpr uint16_t kAnyDevice = 0xffff;  // PCI_ANY_ID (only the Google entry; the wildcard came with it)
struct AllowEntry {
  uint16_t vendor;
  uint16_t device;
  bool req_same_host_bridge;
  KernelVersion since;
};
constexpr KernelVersion k5_4{5, 4}, k5_6{5, 6}, k5_7{5, 7}, k5_18{5, 18}, k7_1{7, 1}, k7_2{7, 2}, k7_3{7, 3}, k7_4{7, 4};
constexpr AllowEntry kAllowlist[] = {
    // Intel Xeon E5/Core i7
    {0x8086, 0x3c00, true, k5_4}, {0x8086, 0x3c01, true, k5_4},
    // Intel Xeon E7 v3/Xeon E5 v3/Core i7
    {0x8086, 0x2f00, true, k5_4}, {0x8086, 0x2f01, true, k5_4},
    // Intel Skylake-E (2030 and 2020 in 5.6, Root Ports B, C, D in 5.7), 3rd gen Xeon Scalable
    {0x8086, 0x2030, false, k5_6}, {0x8086, 0x2031, false, k5_7}, {0x8086, 0x2032, false, k5_7},
    {0x8086, 0x2033, false, k5_7}, {0x8086, 0x2020, false, k5_6}, {0x8086, 0x09a2, false, k5_18},
    // Intel DSA/IAX (SPR0), DSA (GNRD, DMR), IAA (DMR), QAT 4xxx/401xx/402xx/420xx/6xxx
    {0x8086, 0x0b25, false, k7_2}, {0x8086, 0x0cfe, false, k7_2}, {0x8086, 0x11fb, false, k7_2},
    {0x8086, 0x1212, false, k7_2}, {0x8086, 0x1216, false, k7_2}, {0x8086, 0x4940, false, k7_2},
    {0x8086, 0x4942, false, k7_2}, {0x8086, 0x4944, false, k7_2}, {0x8086, 0x4946, false, k7_2},
    {0x8086, 0x4948, false, k7_2},
    // Google SoCs
    {0x1ae0, kAnyDevice, false, k7_1},
    // NVIDIA CPUs (Vera Rubin)
    {0x10de, 0x2f95, false, k7_3}, {0x10de, 0x2f96, false, k7_3}, {0x10de, 0x2f97, false, k7_3},
    {0x10de, 0x2f98, false, k7_3},
    // Zhaoxin KX-6000/KH-40000/KX-6000G/KX-7000/KH-50000
    {0x1d17, 0x1003, true, k7_4}, {0x1d17, 0x1005, true, k7_4}, {0x1d17, 0x1006, true, k7_4},
    {0x1d17, 0x1007, true, k7_4}, {0x1d17, 0x1008, false, k7_4},
};
// pci_host_bridge_dev() accepts a Root Port at any devfn since 5.19 (before: devfn 00.0 only).
constexpr KernelVersion kRootPortIdentifies{5, 19};
// Every release after kOldestKernel that changes a rule above, oldest first.
constexpr KernelVersion kRuleChanges[] = {k5_18, kRootPortIdentifies, k7_1, k7_2, k7_3, k7_4};
static_assert(kNewestKernel == k7_4);

std::string hex4(uint16_t v) {
  static const char digits[] = "0123456789abcdef";
  std::string s(4, '0');
  for (int i = 3; i >= 0; --i, v = static_cast<uint16_t>(v >> 4)) s[static_cast<size_t>(i)] = digits[v & 0xf];
  return s;
}

constexpr std::pair<const char*, const char*> kLegend[] = {
    {"X", "the same function"},
    {"PIX", "by bus address through at most one PCIe switch, or one root port (not the host bridge)"},
    {"PXB", "by bus address through several PCIe switches (not the host bridge)"},
    {"PHB", "through a PCIe host bridge (between root ports, or sent up by ACS redirect)"},
    {"NODE", "between host bridges within one NUMA node"},
    {"SYS", "between NUMA nodes (across the inter-socket link)"},
};

}  // namespace

bool cpu_supports_p2pdma(const CpuInfo& cpu) noexcept {
  // Linux p2pdma.c cpu_supports_p2pdma(): any AMD CPU whose family is Zen (0x17) or newer.
  return cpu.vendor == "AuthenticAMD" && cpu.family >= 0x17;
}

const char* map_type_name(MapType t) noexcept {
  switch (t) {
    case MapType::bus_addr: return "bus_addr";
    case MapType::thru_host_bridge: return "thru_host_bridge";
    case MapType::not_supported: return "not_supported";
  }
  return "?";
}

std::span<const std::pair<const char*, const char*>> link_class_legend() { return kLegend; }

std::string KernelVersion::to_string() const { return std::to_string(major) + "." + std::to_string(minor); }

Result<KernelVersion> parse_kernel_version(std::string_view text) {
  auto bad = [&] {
    return make_error(EINVAL, "kernel version '" + std::string(text.substr(0, 64)) +
                                  "': expected MAJOR.MINOR, as in 6.12, 6.12.117 or 6.18.44-amd64");
  };
  size_t i = 0;
  auto number = [&](unsigned& out) {
    const size_t start = i;
    unsigned v = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9' && i - start < 4) v = v * 10 + static_cast<unsigned>(text[i++] - '0');
    out = v;
    return i > start && (i == text.size() || text[i] < '0' || text[i] > '9');
  };
  KernelVersion k;
  if (!number(k.major) || i >= text.size() || text[i] != '.') return bad();
  ++i;
  if (!number(k.minor) || k.major == 0) return bad();
  // What follows is a release's sublevel or suffix: ".117", "-rc1", "-amd64", "+".
  if (i < text.size() && std::string_view(".-+_~").find(text[i]) == std::string_view::npos) return bad();
  return k;
}

std::span<const KernelVersion> kernel_rule_changes() noexcept { return kRuleChanges; }

Result<P2PEngine> P2PEngine::create(const Topology& topo, VerdictOptions options) {
  PHYSR_RETURN_IF_ERROR(topo.validate());
  if (options.kernel < kOldestKernel)
    return make_error(EINVAL, "Linux " + options.kernel.to_string() + ": physr models the P2P rules of Linux " +
                                  kOldestKernel.to_string() + " and newer");
  P2PEngine e(topo);
  e.kernel_ = options.kernel;
  const auto n = static_cast<uint32_t>(topo.functions.size());
  if (n > 0xffff) return make_error(EINVAL, topo.source + ": more than 65535 functions");
  e.amd_zen_ = options.assume_amd_zen ? *options.assume_amd_zen : cpu_supports_p2pdma(topo.cpu);
  e.redir_.assign(n, 0);
  for (uint32_t i = 0; i < n; ++i) e.redir_[i] = topo.functions[i].acs.redirects() ? 1 : 0;
  for (const Bdf& b : options.acs_redir_off) {
    auto i = topo.find(b);
    if (!i) return make_error(ENODEV, "ACS override names " + b.to_string() + ", which is not in " + topo.source);
    e.redir_[*i] = 0;
  }
  // Depth, ACS prefix counts and Euler intervals by an iterative DFS over the forest.
  std::vector<std::vector<uint32_t>> children(n);
  std::vector<uint32_t> roots;
  for (uint32_t i = 0; i < n; ++i) {
    const int32_t u = topo.functions[i].upstream;
    if (u < 0) roots.push_back(i);
    else children[static_cast<uint32_t>(u)].push_back(i);
  }
  e.depth_.assign(n, 0);
  e.acs_up_.assign(n, 0);
  e.tin_.assign(n, 0);
  e.tout_.assign(n, 0);
  uint32_t clock = 0;
  std::vector<std::pair<uint32_t, size_t>> stack;
  for (uint32_t r : roots) {
    e.depth_[r] = 0;
    e.acs_up_[r] = e.redir_[r];
    e.tin_[r] = clock++;
    stack.push_back({r, 0});
    while (!stack.empty()) {
      auto& [f, next] = stack.back();
      if (next < children[f].size()) {
        const uint32_t ch = children[f][next++];
        // The cache packs a distance into 12 bits; the longest is 2 x (depth + 1) with no
        // common device. Linux recomputes the distance on every call and never caches it,
        // so a tree whose distances would not fit is refused rather than answered wrongly.
        if (e.depth_[f] + 1 > kMaxDepth)
          return make_error(EINVAL, topo.source + ": " + topo.functions[ch].bdf.to_string() + " is more than " +
                                        std::to_string(kMaxDepth + 1) + " levels deep; physr's P2P engine handles " +
                                        std::to_string(kMaxDepth + 1) + " (PCI's bus numbers allow 256 per domain)");
        e.depth_[ch] = static_cast<uint16_t>(e.depth_[f] + 1);
        e.acs_up_[ch] = e.acs_up_[f] + e.redir_[ch];
        e.tin_[ch] = clock++;
        stack.push_back({ch, 0});
      } else {
        e.tout_[f] = clock++;
        stack.pop_back();
      }
    }
  }
  e.tree_.assign(n, 0);
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t r = i;
    while (topo.functions[r].upstream >= 0) r = static_cast<uint32_t>(topo.functions[r].upstream);
    e.tree_[i] = r;
  }
  // The allowlist answer depends only on the host bridge and the "same" flag: decide it once.
  for (uint32_t h = 0; h < topo.host_bridges.size(); ++h) {
    e.bridge_same_.push_back(e.bridge_passes(h, true, e.kernel_, nullptr) ? 1 : 0);
    e.bridge_other_.push_back(e.bridge_passes(h, false, e.kernel_, nullptr) ? 1 : 0);
  }
  e.bdf_keys_.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const Bdf& b = topo.functions[i].bdf;
    e.bdf_keys_[i] = uint64_t{b.domain} << 16 | uint64_t{b.bus} << 8 | b.devfn();
  }
  e.cache_.n = n;
  e.cache_.rows = std::make_unique<std::atomic<std::atomic<uint16_t>*>[]>(n);
  for (uint32_t i = 0; i < n; ++i) e.cache_.rows[i].store(nullptr, std::memory_order_relaxed);
  return e;
}

std::optional<uint32_t> P2PEngine::identifying_device(uint32_t hb) const { return identifying_device(hb, kernel_); }

std::optional<uint32_t> P2PEngine::identifying_device(uint32_t hb, KernelVersion k) const {
  // Linux p2pdma.c pci_host_bridge_dev(): the first device on the root bus, if it is
  // devfn 00.0 or (since 5.19) a PCIe Root Port.
  const auto& roots = topo_->host_bridges[hb].root_functions;
  if (roots.empty()) return std::nullopt;
  const uint32_t first = roots.front();
  const Function& f = topo_->functions[first];
  if (f.bdf.devfn() == 0 || (f.port_type == PortType::root_port && k >= kRootPortIdentifies)) return first;
  return std::nullopt;
}

bool P2PEngine::bridge_passes(uint32_t hb, bool same, KernelVersion k, Explanation::BridgeCheck* out) const {
  // Linux p2pdma.c __host_bridge_whitelist(): the first matching entry of the kernel's table decides.
  const auto id = identifying_device(hb, k);
  bool passes = false, listed = false, req_same = false;
  if (id) {
    const Function& f = topo_->functions[*id];
    for (const AllowEntry& a : kAllowlist) {
      if (a.since > k || f.vendor != a.vendor || (a.device != kAnyDevice && f.device != a.device)) continue;
      listed = true;
      req_same = a.req_same_host_bridge;
      passes = !(a.req_same_host_bridge && !same);
      break;
    }
  }
  if (out) *out = Explanation::BridgeCheck{hb, id, listed, req_same, passes};
  return passes;
}

bool P2PEngine::allowlist_passes(uint32_t ha, uint32_t hb, KernelVersion k) const {
  // Linux p2pdma.c host_bridge_whitelist() under another kernel's rules.
  if (ha == hb) return bridge_passes(ha, true, k, nullptr);
  return bridge_passes(ha, false, k, nullptr) && bridge_passes(hb, false, k, nullptr);
}

bool P2PEngine::host_bridge_allowed(uint32_t a, uint32_t b) const {
  // Linux p2pdma.c host_bridge_whitelist().
  const uint32_t ha = topo_->functions[a].host_bridge, hb = topo_->functions[b].host_bridge;
  if (ha == hb) return bridge_same_[ha] != 0;
  return bridge_other_[ha] != 0 && bridge_other_[hb] != 0;
}

// The first device up from the provider that is also the client or one of its upstream
// bridges: the kernel's "a == bb" hit, found with an O(1) interval test per step.
std::optional<uint32_t> P2PEngine::common_device(uint32_t p, uint32_t c) const noexcept {
  if (tree_[p] != tree_[c]) return std::nullopt;  // different trees share no device
  int32_t a = static_cast<int32_t>(p);
  while (a >= 0 && !is_ancestor_or_self(static_cast<uint32_t>(a), c)) a = topo_->functions[static_cast<uint32_t>(a)].upstream;
  if (a < 0) return std::nullopt;
  return static_cast<uint32_t>(a);
}

// Linux drivers/pci/p2pdma.c calc_map_type_and_dist(). The kernel walks a from the
// provider up and, for each a, bb from the client up until a == bb. The first such a is
// the lowest ancestor-or-self of the provider that is also one of the client, found here
// with an O(1) interval test. ACS-redirecting devices count on the provider's side up to
// and including the common device and on the client's side below it.
Verdict P2PEngine::compute(uint32_t p, uint32_t c) const {
  const auto& fn = topo_->functions;
  Verdict v;
  if (const auto found = common_device(p, c)) {
    const uint32_t common = *found;
    v.distance = depth_[p] - depth_[common] + depth_[c] - depth_[common];
    const int32_t above = fn[common].upstream;
    const uint32_t acs_cnt = acs_up_[p] - (above >= 0 ? acs_up_[static_cast<uint32_t>(above)] : 0) + acs_up_[c] - acs_up_[common];
    if (acs_cnt == 0) {
      v.type = MapType::bus_addr;
      return v;
    }
  } else {
    v.distance = depth_[p] + 1 + depth_[c] + 1;
  }
  v.type = amd_zen_ || host_bridge_allowed(p, c) ? MapType::thru_host_bridge : MapType::not_supported;
  return v;
}

P2PEngine::Cache& P2PEngine::Cache::operator=(Cache&& o) noexcept {
  if (this != &o) {
    release();
    rows = std::move(o.rows);
    n = o.n;
    bytes.store(o.bytes.exchange(0));
  }
  return *this;
}

void P2PEngine::Cache::release() noexcept {
  if (!rows) return;
  for (uint32_t i = 0; i < n; ++i) delete[] rows[i].load(std::memory_order_relaxed);
  rows.reset();
  bytes.store(0);
}

Verdict P2PEngine::verdict_slow(uint32_t p, uint32_t c) const {
  std::atomic<uint16_t>* row = cache_.rows[p].load(std::memory_order_acquire);
  if (!row) {
    // A row is reserved from the budget before it is allocated, so the cache never holds
    // more than kMaxCacheBytes (n^2 x 2 B would be 8 GiB at 65,535 functions); without
    // room the verdict is computed, as Linux's distance_many() always does.
    const size_t row_bytes = size_t{cache_.n} * sizeof(std::atomic<uint16_t>);
    if (cache_.bytes.fetch_add(row_bytes, std::memory_order_relaxed) + row_bytes > kMaxCacheBytes) {
      cache_.bytes.fetch_sub(row_bytes, std::memory_order_relaxed);
      return compute(p, c);
    }
    auto* fresh = new std::atomic<uint16_t>[cache_.n];
    for (uint32_t i = 0; i < cache_.n; ++i) fresh[i].store(0, std::memory_order_relaxed);
    if (cache_.rows[p].compare_exchange_strong(row, fresh, std::memory_order_acq_rel, std::memory_order_acquire)) {
      row = fresh;
    } else {
      delete[] fresh;  // another thread published its row first: `row` now holds it
      cache_.bytes.fetch_sub(row_bytes, std::memory_order_relaxed);
    }
  }
  const Verdict v = compute(p, c);
  row[c].store(static_cast<uint16_t>(kComputed | static_cast<unsigned>(v.type) << 12 | std::min(v.distance, 4095)),
               std::memory_order_relaxed);
  return v;
}

int P2PEngine::distance_many(uint32_t provider, std::span<const uint32_t> clients) const {
  // Linux p2pdma.c pci_p2pdma_distance_many().
  if (clients.empty()) return -1;
  int total = 0;
  for (uint32_t c : clients) {
    const Verdict v = verdict(provider, c);
    if (v.type == MapType::not_supported) return -1;
    total += v.distance;
  }
  return total;
}

std::optional<uint32_t> P2PEngine::find_many(std::span<const uint32_t> clients, std::span<const uint32_t> published,
                                             const std::function<size_t(size_t)>& pick) const {
  // Linux p2pdma.c pci_p2pmem_find_many(): the closest published providers, one at random.
  // The kernel collects them in one page (closest_pdevs, PAGE_SIZE / sizeof(void *) = 512
  // with 4 KiB pages and 8-byte pointers): once it is full, further providers at the same
  // distance are skipped, so the first 512 in the iteration order are kept.
  constexpr size_t kMaxTied = 4096 / sizeof(void*);
  int closest = INT_MAX;
  std::vector<uint32_t> best;
  for (uint32_t p : published) {
    const int d = distance_many(p, clients);
    if (d < 0 || d > closest) continue;
    if (d == closest && best.size() >= kMaxTied) continue;
    if (d < closest) {
      best.clear();
      closest = d;
    }
    best.push_back(p);
  }
  if (best.empty()) return std::nullopt;
  const size_t i = pick(best.size());
  return best[i < best.size() ? i : 0];
}

Explanation P2PEngine::explain(uint32_t p, uint32_t c) const {
  const auto& fn = topo_->functions;
  Explanation x;
  x.verdict = compute(p, c);
  x.cpu_amd_zen = amd_zen_;
  x.same_host_bridge = fn[p].host_bridge == fn[c].host_bridge;
  x.common = common_device(p, c);
  auto hop = [&](uint32_t f) {
    return PathHop{f, redirects(f), fn[f].acs.kind == AcsState::Kind::unknown};
  };
  for (int32_t u = static_cast<int32_t>(p);; u = fn[static_cast<uint32_t>(u)].upstream) {
    if (u < 0) break;
    x.provider_path.push_back(hop(static_cast<uint32_t>(u)));
    if (x.common && static_cast<uint32_t>(u) == *x.common) break;
  }
  for (int32_t u = static_cast<int32_t>(c); u >= 0; u = fn[static_cast<uint32_t>(u)].upstream) {
    if (x.common && static_cast<uint32_t>(u) == *x.common) break;
    x.client_path.push_back(hop(static_cast<uint32_t>(u)));
  }
  if (x.common) {
    for (const auto* path : {&x.provider_path, &x.client_path})
      for (const PathHop& h : *path) {
        if (h.redirects) x.acs_redirecting.push_back(h.function);
        x.acs_unknown_on_path = x.acs_unknown_on_path || h.acs_unknown;
      }
    if (!x.acs_redirecting.empty()) {
      x.kernel_parameter = "pci=disable_acs_redir=";
      for (size_t i = 0; i < x.acs_redirecting.size(); ++i) {
        if (i != 0) x.kernel_parameter += ';';
        x.kernel_parameter += fn[x.acs_redirecting[i]].bdf.to_string();
      }
    }
  }
  x.kernel = kernel_;
  const uint32_t ha = fn[p].host_bridge, hb = fn[c].host_bridge;
  if (x.verdict.type != MapType::bus_addr && !amd_zen_) {
    // Linux p2pdma.c host_bridge_whitelist(): one check for one host bridge; for two, the
    // second only if the first passed (its &&).
    Explanation::BridgeCheck chk;
    const bool first = bridge_passes(ha, ha == hb, kernel_, &chk);
    x.allowlist.push_back(chk);
    if (ha != hb) {
      if (first) {
        bridge_passes(hb, false, kernel_, &chk);
        x.allowlist.push_back(chk);
      } else {
        x.second_host_bridge_skipped = true;
      }
    }
  }
  // What calc_map_type_and_dist() logs with verbose set (pci_p2pdma_map_type() on a
  // pair's first mapping), in its order. __host_bridge_whitelist() warns only when ACS
  // redirect sent the path up (its warn argument is acs_redirects), and only for a host
  // bridge whose identifying device matches no entry.
  const std::string pn = fn[p].bdf.to_string(), cn = fn[c].bdf.to_string();
  const bool acs_redirects = x.common && !x.acs_redirecting.empty();
  if (acs_redirects) {
    x.kernel_log.push_back(cn + ": ACS redirect is set between the client and provider (" + pn + ")");
    x.kernel_log.push_back(cn + ": to disable ACS redirect for this path, add the kernel parameter: " + x.kernel_parameter);
  }
  if (acs_redirects)
    for (const auto& chk : x.allowlist)
      if (chk.identifying && !chk.listed) {
        const Function& id = fn[*chk.identifying];
        x.kernel_log.push_back(id.bdf.to_string() + ": Host bridge not in P2PDMA whitelist: " + hex4(id.vendor) + ":" + hex4(id.device));
      }
  if (x.verdict.type == MapType::not_supported) {
    x.kernel_log.push_back(cn + ": cannot be used for peer-to-peer DMA as the client and provider (" + pn +
                           ") do not share an upstream bridge or whitelisted host bridge");
    for (const KernelVersion k : kRuleChanges)
      if (k > kernel_ && allowlist_passes(ha, hb, k)) {
        x.newer_kernel_allows = k;
        break;
      }
  }
  // nvidia-smi's link class, from the path the verdict takes. bus_addr: the TLPs turn at
  // the common upstream device without entering the host bridge: PIX through at most one
  // switch (its downstream ports and upstream port, or one root port as the common device
  // of two functions of one device), PXB through more. Otherwise (ACS redirect, different
  // root ports, or not supported at all) the path is through the host bridge: PHB within
  // one, NODE or SYS between two. So a root port never makes PHB of a bus_addr pair, and a
  // switch never makes PIX of a pair ACS sends to the root complex.
  if (p == c) {
    x.link_class = "X";
  } else if (x.verdict.type == MapType::bus_addr) {
    size_t bridges = 0;
    for (const auto* path : {&x.provider_path, &x.client_path})
      for (const PathHop& h : *path)
        if (h.function != p && h.function != c && is_pci_bridge(fn[h.function])) ++bridges;
    x.link_class = bridges <= 3 ? "PIX" : "PXB";
  } else if (x.same_host_bridge) {
    x.link_class = "PHB";
  } else {
    const int na = topo_->host_bridges[fn[p].host_bridge].numa_node, nb = topo_->host_bridges[fn[c].host_bridge].numa_node;
    const int fa = fn[p].numa_node >= 0 ? fn[p].numa_node : na, fb = fn[c].numa_node >= 0 ? fn[c].numa_node : nb;
    x.link_class = fa == fb ? "NODE" : "SYS";
  }
  return x;
}

}  // namespace physr::pci
