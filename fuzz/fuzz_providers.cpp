// Op-stream fuzzer for the provider registry: add / remove / revoke / publish / find / get
// / tag_ranges against a reference model (a map of live apertures). Every answer must match.
#include <map>
#include <vector>

#include "fuzz_check.hpp"
#include "physr/provider.hpp"

namespace {
using namespace physr;


struct Model {
  std::map<uint64_t, std::pair<uint64_t, ProviderId>> live;  // base -> (end, id)
  const std::pair<uint64_t, ProviderId>* find(uint64_t a, uint64_t* base) const {
    auto it = live.upper_bound(a);
    if (it == live.begin()) return nullptr;
    --it;
    if (a >= it->second.first) return nullptr;
    *base = it->first;
    return &it->second;
  }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // One registry for all runs (a destructor per run would wait out a grace period); each
  // run removes everything it added, and the model never assumes particular id values.
  static ProviderRegistry reg;
  Model model;
  std::map<ProviderId, uint64_t> ids;  // id -> base
  // Addresses: a window of 2^20 pages around a base that the first byte picks, so both the
  // top of the 52-bit space and dense packing get exercised.
  const uint64_t window = size && data[0] & 1 ? (uint64_t{1} << 52) - (uint64_t{1} << 32) : uint64_t{1} << 30;
  size_t i = 1;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  auto addr = [&]() -> uint64_t { return window + ((byte() << 12 | byte() << 4 | byte()) << 12) + byte() * 16; };
  while (i < size) {
    switch (byte() % 6) {
      case 0: {  // add
        const uint64_t base = addr() & ~uint64_t{4095};
        const uint64_t pages = 1 + (byte() % 64) * (byte() % 3 == 0 ? 1024 : 1);
        ProviderDesc d;
        d.phys = PhysSpan{PhysAddr(base), pages << 12};
        auto id = reg.add(d);
        bool overlap = false;
        for (const auto& [mb, me] : model.live) overlap = overlap || (mb < base + (pages << 12) && base < me.first);
        const bool in_space = base + (pages << 12) <= (uint64_t{1} << 52);
        CHECK(id.has_value() == (!overlap && in_space));
        if (id) {
          CHECK(!ids.count(*id));
          model.live[base] = {base + (pages << 12), *id};
          ids[*id] = base;
        }
        break;
      }
      case 1: {  // remove (a live id or a random one)
        ProviderId id = static_cast<ProviderId>(byte());
        if (!ids.empty() && byte() % 2) id = std::next(ids.begin(), static_cast<long>(byte() % ids.size()))->first;
        const bool known = ids.count(id);
        CHECK(reg.remove(id).has_value() == known);
        if (known) {
          model.live.erase(ids[id]);
          ids.erase(id);
        }
        break;
      }
      case 2: {  // revoke
        const ProviderId id = static_cast<ProviderId>(byte() % 32);
        auto r = reg.revoke(id);
        if (!ids.count(id)) CHECK(!r.has_value() && r.error().code == ENOENT);
        break;
      }
      case 3: {  // find
        ProviderRegistry::ReadGuard g;
        const uint64_t a = addr();
        uint64_t b = 0;
        const auto* m = model.find(a, &b);
        const Provider* p = reg.find(PhysAddr(a));
        CHECK((p != nullptr) == (m != nullptr));
        if (p) CHECK(p->id() == m->second && p->phys().contains(PhysAddr(a)));
        break;
      }
      case 4: {  // get
        ProviderRegistry::ReadGuard g;
        const ProviderId id = static_cast<ProviderId>(byte() % 40);
        const Provider* p = reg.get(id);
        CHECK((p != nullptr) == (ids.count(id) != 0));
        if (p) CHECK(p->phys().base.value() == ids[id]);
        break;
      }
      default: {  // tag a piece and check every range against the model
        ProviderRegistry::ReadGuard g;
        const uint64_t a = addr();
        const uint64_t len = 1 + (byte() << 14 | byte() << 6);
        const PhysSpan piece{PhysAddr(a), len};
        auto l = tag_ranges(reg, std::span<const PhysSpan>(&piece, 1));
        if (!l) {
          CHECK(l.error().code == EFAULT);
          break;
        }
        CHECK(l->total_bytes() == len);
        for (const PhysRange r : *l) {
          uint64_t b = 0;
          const auto* m = model.find(r.base.value(), &b);
          CHECK(r.provider == (m ? provider_tag(m->second) : kHostMemory));
          const auto* last = model.find(r.base.value() + r.size - 1, &b);
          CHECK(last == m);  // a range never crosses a provider boundary
        }
      }
    }
  }
  for (const auto& [id, base] : ids) CHECK(reg.remove(id).has_value());
  return 0;
}
