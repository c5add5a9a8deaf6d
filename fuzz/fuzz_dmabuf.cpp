// Op-stream fuzzer for dma-buf and devmem: exports of GPU BAR regions (valid and not),
// attaches by four importers (bus address, IOMMU, direct, unreachable; static or dynamic,
// with or without peer2peer), maps, unmaps, checks, detaches, moves, revokes and enables
// again, and a devmem binding with allocations, releases, deliveries and dontneed calls,
// against a model of which mappings are live. At the end everything is dropped and no
// mapping or IOVA may be left in the DMA layer.
#include <memory>
#include <vector>

#include "fuzz_check.hpp"
#include "physr/mem.hpp"
#include "support/dmabuf_world.hpp"

namespace {

using namespace physr;
using namespace physr::mem;

struct Buf {
  std::shared_ptr<DmaBuf> b;
  uint64_t gen = 1;
  bool revoked = false;
  uint64_t size = 0;
};
struct Att {
  std::shared_ptr<DmaBufAttachment> a;
  size_t buf = 0;
  size_t dev = 0;
  bool attached = true;
  bool dynamic = false;
};
struct Map {
  DmaBufMapping m;
  size_t att = 0;
  uint64_t gen = 0;
  bool released = false;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::DmaBufWorld w;  // DMA-API debug on
  static std::unique_ptr<DmaDevice> devs[4] = {w.device(w.f_nvme, false), w.device(w.f_nic, true),
                                                w.device(w.f_nic, false), w.device(w.f_far, true)};
  const uint64_t iova0 = testing::free_iova(*w.domain);
  size_t i = 0;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  std::vector<Buf> bufs;
  std::vector<Att> atts;
  std::vector<Map> maps;
  std::unique_ptr<DevmemBinding> binding;
  std::unique_ptr<DevmemSocket> sock;
  std::vector<NetIov> held;
  // Which mappings the exporter tore down: everything of the buffer made before now.
  auto invalidate = [&](size_t bi) { ++bufs[bi].gen; };
  while (i < size) {
    const uint64_t op = byte() % 12;
    if (op == 0 || bufs.empty()) {
      std::vector<DmaBufBarRange> r(byte() % 4);
      for (auto& x : r) {
        x.offset = (byte() % 64) * 64 * KiB + (byte() % 16 == 0 ? 512 : 0);
        x.length = (1 + byte() % 16) * kPageSize;
      }
      auto b = DmaBuf::export_bar(*w.platform, w.f_gpu, byte() % 8 ? 1 : 6, r);
      if (b) bufs.push_back(Buf{*b, 1, false, (*b)->size()});
      else CHECK(b.error().code == EINVAL || b.error().code == ENODEV);
      continue;
    }
    Buf& B = bufs[byte() % bufs.size()];
    const size_t bi = static_cast<size_t>(&B - bufs.data());
    if (op == 1) {
      const size_t d = byte() % 4;
      const uint64_t f = byte();
      DmaBufAttachOptions o;
      o.allow_peer2peer = f & 1;
      if (f & 2) o.move_notify = [](DmaBufAttachment&) {};
      auto a = B.b->attach(*devs[d], o);
      const bool p2p = (f & 3) == 3;
      if (!p2p) CHECK(!a && a.error().code == EOPNOTSUPP);
      else if (B.revoked) CHECK(!a && a.error().code == ENODEV);
      else {
        CHECK(a.has_value());
        atts.push_back(Att{*a, bi, d, true, true});
      }
    } else if (op == 2 && !atts.empty()) {
      Att& A = atts[byte() % atts.size()];
      auto m = A.a->map(byte() % 2 ? DmaDirection::from_device : DmaDirection::bidirectional);
      if (!A.attached) CHECK(!m && m.error().code == EINVAL);
      else if (bufs[A.buf].revoked) CHECK(!m && m.error().code == ENODEV);
      else if (A.dev == 3) CHECK(!m && m.error().code == EREMOTEIO);
      else {
        CHECK(m.has_value());
        uint64_t bytes = 0;
        for (const DmaSegment& s : m->segments()) bytes += s.len;
        CHECK(bytes == bufs[A.buf].size);
        maps.push_back(Map{std::move(m).value(), static_cast<size_t>(&A - atts.data()), bufs[A.buf].gen, false});
      }
    } else if ((op == 3 || op == 4) && !maps.empty()) {
      Map& M = maps[byte() % maps.size()];
      const Att& A = atts[M.att];
      const Buf& MB = bufs[A.buf];
      const bool live = !M.released && A.attached && M.gen == MB.gen;
      if (op == 3) {
        const Status c = A.a->check(M.m);
        if (live) CHECK(c.has_value());
        else if (!M.released && M.gen < MB.gen) CHECK(!c && c.error().code == (MB.revoked ? ENODEV : ESTALE));
        else CHECK(!c && c.error().code == EINVAL);
      } else {
        const Status u = A.a->unmap(M.m);
        const bool ok = live || (!M.released && M.gen < MB.gen && A.attached);
        CHECK(u.has_value() == ok);
        if (ok) M.released = true;
      }
    } else if (op == 5 && !atts.empty()) {
      Att& A = atts[byte() % atts.size()];
      const Status s = A.a->detach();
      CHECK(s.has_value() == A.attached);
      A.attached = false;
    } else if (op == 6) {
      const Status s = B.b->move();
      if (B.revoked) CHECK(!s && s.error().code == ENODEV);
      else {
        CHECK(s.has_value());  // every importer here is dynamic
        invalidate(bi);
      }
    } else if (op == 7) {
      const Status s = B.revoked ? B.b->unrevoke() : B.b->revoke();
      CHECK(s.has_value());
      B.revoked = !B.revoked;
      invalidate(bi);
    } else if (op == 8 && !binding) {
      auto r = DevmemBinding::bind(B.b, *devs[byte() % 3]);
      if (B.revoked) CHECK(!r && r.error().code == ENODEV);
      else {
        CHECK(r.has_value());
        binding = std::move(r).value();
        binding->on_report([](const std::string&) {});
        sock = std::make_unique<DevmemSocket>(*binding);
      }
    } else if (op == 9 && binding) {
      auto n = binding->alloc_netmem();
      if (n) {
        CHECK(!binding->revoked());
        if (byte() % 2) (void)sock->deliver(*n);
        else held.push_back(*n);
      } else {
        CHECK(n.error().code == ENOMEM || n.error().code == ENODEV);
      }
    } else if (op == 10 && binding && !held.empty()) {
      const size_t k = byte() % held.size();
      CHECK(binding->release_netmem(held[k]).has_value());
      CHECK(!binding->release_netmem(held[k]).has_value());
      held.erase(held.begin() + static_cast<long>(k));
    } else if (op == 11 && binding) {
      std::vector<DmabufToken> t(byte() % 4 == 0 ? 129 : byte() % 8);
      for (auto& x : t) x = DmabufToken{static_cast<uint32_t>(byte()), static_cast<uint32_t>(byte() * 8)};
      auto r = sock->dontneed(t);
      CHECK(r.has_value() == (t.size() <= kMaxDontneedTokens));
    }
  }
  if (binding) {
    for (const NetIov& n : held) CHECK(binding->release_netmem(n).has_value());
    sock.reset();
    CHECK(binding->stats().avail == binding->stats().size);
    binding.reset();
  }
  maps.clear();
  atts.clear();
  for (const Buf& b : bufs) CHECK(b.b->stats().attachments == 0 && b.b->stats().mappings == 0);
  bufs.clear();
  for (const auto& d : devs) CHECK(d->stats().live_mappings == 0);
  CHECK(testing::free_iova(*w.domain) == iova0);
  return 0;
}
