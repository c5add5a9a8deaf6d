// Op-stream fuzzer for page pools: allocations, fragments, puts direct and through the
// ring, double puts, puts into the wrong pool, pages with extra references, owner changes,
// syncs and (device memory) provider revocation, against a model of what the caller holds.
// After every op: inflight == buffers held (by the caller or as the current fragment page)
// + the alloc cache + the ring. At the end everything comes back and the pool goes away at
// once, leaving no page, mapping or P2P chunk behind. data[0] picks the set-up: host pages
// or device memory, DMA map and sync, the ring's size.
#include <map>
#include <memory>
#include <set>

#include "fuzz_check.hpp"
#include "physr/mem.hpp"
#include "support/page_pool_world.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  using namespace physr::mem;
  if (size < 1) return 0;
  static testing::PagePoolWorld pw(4 * MiB);
  const bool device = data[0] & 1;
  const bool dma = data[0] & 2;
  const uint32_t ring = 2u << ((data[0] >> 2) & 7);  // 2 .. 256
  std::unique_ptr<DeviceMemoryProvider> dev;
  if (device) dev = DeviceMemoryProvider::create(*pw.p2p, pw.w.gpu, 128 * KiB).value();
  bool disconnected = false;
  PagePoolParams p;
  p.pool_size = ring;
  p.report = [](const std::string&) {};
  p.disconnect = [&] { disconnected = true; };
  if (device) {
    p.mp = dev.get();
    p.dev = pw.nic.get();
    p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
    p.max_len = 2048;
  } else {
    p.pages = pw.pages.get();
    if (dma) {
      p.flags = kPPFlagDmaMap | kPPFlagDmaSyncDev;
      p.dev = pw.nic_nc.get();
      p.max_len = 1500;
      p.offset = 64;
    }
  }
  PagePool* pool = PagePool::create(p).value();
  PagePoolParams p2;
  p2.pages = pw.pages.get();
  p2.report = p.report;
  PagePool* other = PagePool::create(p2).value();

  std::map<uint64_t, int64_t> held;  // caller's pp references per buffer
  std::set<uint64_t> whole;          // held buffers allocated whole (not fragments)
  std::set<uint64_t> returned;       // given back and not handed out since
  std::vector<Netmem> extra;         // pages with a reference of the caller's own
  Netmem frag{};
  size_t i = 1;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  auto pick = [&](auto& m) { return std::next(m.begin(), static_cast<long>(byte() % m.size())); };
  auto check = [&] {
    std::set<uint64_t> out;
    for (auto& [k, r] : held)
      if (r > 0) out.insert(k);
    if (frag) out.insert(frag.raw());
    CHECK(pool->cache_count() <= PagePool::kAllocCacheSize);
    CHECK(pool->ring_count() <= pool->ring_size());
    CHECK(pool->inflight() == static_cast<int32_t>(out.size() + pool->cache_count() + pool->ring_count()));
  };
  auto got = [&](Netmem n) {
    returned.erase(n.raw());
    ++held[n.raw()];
  };
  auto put = [&](uint64_t raw, bool direct) {
    CHECK(pool->put_netmem(Netmem::from_raw(raw), byte() * 16, direct).has_value());
    if (--held[raw] == 0) {
      held.erase(raw);
      whole.erase(raw);
      if (raw != frag.raw()) returned.insert(raw);
    }
  };
  while (i < size) {
    switch (byte() % 9) {
      case 0: {  // page_pool_alloc_netmems()
        const Netmem n = pool->alloc_netmems();
        if (!n) break;
        CHECK(!held.count(n.raw()) && n != frag);
        CHECK(n.is_net_iov() == device);
        got(n);
        whole.insert(n.raw());
        break;
      }
      case 1: {  // page_pool_alloc_frag_netmem()
        const uint32_t want = static_cast<uint32_t>(byte() * 24);
        uint32_t off = 0;
        const Netmem n = pool->alloc_frag(&off, want);
        if (want > kPageSize) {
          CHECK(!n);
          break;
        }
        if (!n) {
          frag = {};
          break;
        }
        CHECK(off + want <= kPageSize);
        CHECK(!whole.count(n.raw()));
        frag = n;
        got(n);
        break;
      }
      case 2:
      case 3:
        if (!held.empty()) put(pick(held)->first, byte() & 1);
        break;
      case 4:  // a double put: refused, nothing changes
        if (!returned.empty()) {
          const int32_t before = pool->inflight();
          auto r = pool->put_full_netmem(Netmem::from_raw(*pick(returned)), byte() & 1);
          CHECK(!r && r.error().code == EINVAL);
          CHECK(pool->inflight() == before);
        }
        break;
      case 5:  // into the wrong pool: refused
        if (!held.empty()) {
          auto r = other->put_full_netmem(Netmem::from_raw(pick(held)->first), true);
          CHECK(!r && r.error().code == EINVAL);
          CHECK(other->inflight() == 0);
        }
        break;
      case 6:  // a whole page with another reference: released, not recycled
        if (!device && !whole.empty()) {
          const uint64_t raw = *pick(whole);
          if (held[raw] != 1) break;
          const uint64_t rel = pool->stats().recycle.released_refcnt;
          pw.pages->get_page(Netmem::from_raw(raw));
          extra.push_back(Netmem::from_raw(raw));
          put(raw, byte() & 1);
          CHECK(pool->stats().recycle.released_refcnt == rel + 1);
        }
        break;
      case 7:
        if (byte() & 1) {
          pool->enable_direct_recycling();
        } else {
          pool->disable_direct_recycling();
        }
        if (!held.empty()) pool->dma_sync_for_cpu(Netmem::from_raw(pick(held)->first), 0, 512);
        break;
      case 8:
        if (device && (byte() & 7) == 0) dev->revoke();
        break;
    }
    check();
  }
  while (!held.empty()) put(held.begin()->first, false);
  for (Netmem n : extra) pw.pages->put_page(n);
  pool->destroy();  // the current fragment page comes back through page_pool_free_frag()
  CHECK(disconnected);
  other->destroy();
  CHECK(pw.pages->allocated_pages() == 0);
  CHECK(pw.nic->stats().live_mappings == 0);
  CHECK(pw.nic_nc->stats().live_mappings == 0);
  if (device) {
    CHECK(dev->outstanding() == 0);
    if (dev->revoked()) CHECK(dev->chunk_freed());
  }
  return 0;
}
