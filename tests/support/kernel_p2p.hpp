// A literal transcription of Linux drivers/pci/p2pdma.c calc_map_type_and_dist() (pointer
// walks, O(depth^2)) over a physr Topology: the reference the tests check the engine
// against, and the peer the benchmarks measure it against.
#pragma once

#include <vector>

#include "physr/pci.hpp"

namespace physr::pci::testing {

inline Verdict kernel_calc(const Topology& t, uint32_t provider, uint32_t client, const P2PEngine& e,
                           const std::vector<uint8_t>& redir) {
  auto up = [&](int32_t f) { return t.functions[static_cast<uint32_t>(f)].upstream; };
  int32_t a = static_cast<int32_t>(provider), b = static_cast<int32_t>(client), bb;
  int dist_a = 0, dist_b = 0, acs_cnt = 0;
  while (a >= 0) {
    dist_b = 0;
    if (redir[static_cast<uint32_t>(a)]) acs_cnt++;
    bb = b;
    while (bb >= 0) {
      if (a == bb) goto check_b_path_acs;
      bb = up(bb);
      dist_b++;
    }
    a = up(a);
    dist_a++;
  }
  return {e.cpu_amd_zen() || e.host_bridge_allowed(provider, client) ? MapType::thru_host_bridge : MapType::not_supported,
          dist_a + dist_b};
check_b_path_acs:
  bb = b;
  while (bb >= 0) {
    if (a == bb) break;
    if (redir[static_cast<uint32_t>(bb)]) acs_cnt++;
    bb = up(bb);
  }
  if (!acs_cnt) return {MapType::bus_addr, dist_a + dist_b};
  return {e.cpu_amd_zen() || e.host_bridge_allowed(provider, client) ? MapType::thru_host_bridge : MapType::not_supported,
          dist_a + dist_b};
}

inline std::vector<uint8_t> redirect_flags(const Topology& t) {
  std::vector<uint8_t> r;
  for (const Function& f : t.functions) r.push_back(f.acs.redirects() ? 1 : 0);
  return r;
}

}  // namespace physr::pci::testing
