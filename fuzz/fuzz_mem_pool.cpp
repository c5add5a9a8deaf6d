// Op-stream fuzzer for the P2P memory pools: allocations of random sizes and alignments on
// two functions, frees of live chunks, bogus and double frees, barriers, publish and
// find_many, and removal with re-adding, against a model of live chunks. data[0] picks
// tracking (exact double-free detection) or not.
#include <map>
#include <memory>

#include "fuzz_check.hpp"
#include "physr/mem.hpp"
#include "support/mem_world.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  using namespace physr::mem;
  if (size < 1) return 0;
  static testing::MemWorld w;
  P2PMemoryOptions o;
  o.track = data[0] & 1;
  o.remove_timeout = std::chrono::milliseconds(0);
  o.report = [](const std::string&) {};
  auto m = std::move(P2PMemory::create(*w.platform, o)).value();
  const uint32_t fns[2] = {w.nvme, w.nic};
  bool added[2] = {false, false};
  std::map<uint64_t, P2PChunk> live;
  std::map<uint64_t, P2PChunk> freed;  // freed since the last barrier (tracking: a second free is EINVAL)
  size_t i = 1;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  auto add = [&](int k) {
    const uint64_t off = (byte() % 4) * 64 * KiB;
    auto r = m->add_resource(fns[k], k ? 0 : 2, byte() % 2 ? 0 : 4 * MiB, off);
    CHECK(r.has_value() || r.error().code == ENOSPC);  // 16 resources per function at most
    added[k] = r.has_value();
  };
  add(0);
  while (i < size) {
    const uint64_t op = byte() % 8;
    const int k = static_cast<int>(byte() & 1);
    if (op <= 2) {
      const uint64_t bytes = 1 + (byte() << 8 | byte()) * (op == 2 ? 512 : 64);
      const uint64_t align = kPageSize << (byte() % 10);
      auto c = m->alloc(fns[k], bytes, {.align = align});
      if (!c) {
        const int e = c.error().code;
        CHECK(e == ENOMEM || (e == ENODEV && !added[k]));
        continue;
      }
      CHECK(added[k]);
      CHECK(c->span.size == (bytes + 4095) / 4096 * 4096);
      CHECK(c->span.base.value() % align == 0);
      CHECK(m->virt_to_bus(fns[k], c->span.base).has_value());
      auto next = live.lower_bound(c->span.base.value());
      CHECK(next == live.end() || !next->second.span.overlaps(c->span));
      CHECK(next == live.begin() || !std::prev(next)->second.span.overlaps(c->span));
      live[c->span.base.value()] = *c;
      freed.erase(c->span.base.value());
    } else if (op == 3 && !live.empty()) {
      auto it = std::next(live.begin(), static_cast<long>(byte() % live.size()));
      CHECK(m->free(it->second).has_value());
      freed[it->first] = it->second;
      live.erase(it);
    } else if (op == 4) {
      // Bogus frees are refused and change nothing.
      const PoolStats before = m->stats(fns[k]);
      P2PChunk bad{PhysSpan{PhysAddr(0x41'0000'0000 + (byte() << 12)), 4096 * (1 + byte() % 3)}, 1, fns[k]};
      if (byte() % 2) bad.span.size += 1;
      bool overlaps_live = false;
      for (const auto& [a, c] : live) overlaps_live |= c.span.overlaps(bad.span);
      // Without tracking only a malformed free is surely refused (a cached chunk's bits are set).
      if (!overlaps_live && (o.track || bad.span.size % 4096)) CHECK(!m->free(bad).has_value());
      if (o.track && !freed.empty()) {
        const P2PChunk& again = freed.begin()->second;
        if (!live.count(again.span.base.value())) CHECK(!m->free(again).has_value());  // double free
      }
      const PoolStats after = m->stats(fns[k]);
      CHECK(after.chunks == before.chunks && after.allocated == before.allocated);
    } else if (op == 5) {
      m->barrier();
      freed.clear();
      uint64_t chunks = 0, bytes = 0;
      for (const auto& [a, c] : live)
        if (c.function == fns[k]) ++chunks, bytes += c.span.size;
      const PoolStats s = m->stats(fns[k]);
      CHECK(s.chunks == chunks && s.allocated == bytes && s.deferred == 0);
    } else if (op == 6) {
      if (added[k]) {
        CHECK(m->publish(fns[k], byte() & 1).has_value());
        const uint32_t client = w.gpu;
        auto f = m->find_many(std::span<const uint32_t>(&client, 1));
        CHECK(!f || *f == fns[0] || *f == fns[1]);
      } else {
        CHECK(!m->publish(fns[k], true).has_value());
      }
    } else if (op == 7) {
      if (!added[k]) {
        add(k);
        continue;
      }
      // Removal: the revoke callback frees what the model holds of that function.
      const P2PMemory::RevokeToken tok = m->on_revoke(fns[k], [&](const P2PChunk&) {});
      CHECK(tok.id != 0);
      for (auto it = live.begin(); it != live.end();) {
        if (it->second.function == fns[k]) {
          CHECK(m->free(it->second).has_value());
          it = live.erase(it);
        } else {
          ++it;
        }
      }
      CHECK(m->remove(fns[k]).has_value());
      CHECK(m->off_revoke(tok).has_value());
      CHECK(!m->off_revoke(tok).has_value());  // ended: EINVAL
      std::erase_if(freed, [&](const auto& e) { return e.second.function == fns[k]; });
      added[k] = false;
      CHECK(m->alloc(fns[k], 4096).error().code == ENODEV);
    }
  }
  for (const auto& [a, c] : live) CHECK(m->free(c).has_value());
  m->barrier();
  for (int k = 0; k < 2; ++k) CHECK(m->stats(fns[k]).chunks == 0 && m->stats(fns[k]).deferred == 0);
  return 0;
}
