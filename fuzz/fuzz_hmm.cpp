// Op-stream fuzzer for the mirror: mmap (anonymous, populated or not, read-only or
// read-write; P2P through the host bridge or at a bus address), munmap, mprotect, migrate,
// revocation, hmm_range_fault with random requests (default_flags, pfn_flags_mask,
// per-page flags, resolve_p2p) and device accesses through an HmmMirror. Every pfn the
// walk reports valid must be what the CPU maps, a successful fault request must leave every
// requested page valid, no device entry may outlive an invalidation, and at the end every
// host page, P2P chunk and DMA mapping must be free again.
#include <vector>

#include "fuzz_check.hpp"
#include "physr/mem.hpp"
#include "support/dma_world.hpp"
#include "support/p2p_chunk_source.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  using namespace physr::mem;
  static physr::testing::DmaWorld* world = [] {
    auto* w = new physr::testing::DmaWorld();
    w->debug = true;
    return w;
  }();
  size_t i = 0;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  constexpr uint64_t kBase = 0x10000000, kPages = 64;
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 16 * MiB}, size)).value();
  physr::testing::TestChunkSource nic(PhysSpan{PhysAddr(physr::testing::DmaWorld::kNicBar), 4 * MiB}, world->nic, "nic");
  physr::testing::TestChunkSource gpu(PhysSpan{PhysAddr(physr::testing::DmaWorld::kGpuBar), 4 * MiB}, world->gpu, "gpu");
  DmaDeviceConfig cfg{.function = world->f_nvme};
  if (byte() & 1) cfg.domain = world->domain.get();
  auto dev = world->device(cfg);
  {
    AddressSpace as(*mem);
    auto mirror = std::move(HmmMirror::create(as, *dev, {.start = kBase, .len = kPages * 4096,
                                                          .fault_pages = 1u << (byte() % 5)})).value();
    auto n = std::move(MmuIntervalNotifier::insert(as, kBase, kPages * 4096, [](MmuIntervalNotifier& s, const MmuNotifierRange&,
                                                                                 uint64_t seq) {
                         s.set_seq(seq);
                         return true;
                       })).value();
    while (i < size) {
      const uint64_t op = byte() % 8;
      const uint64_t p = byte() % kPages, np = 1 + byte() % 16;
      const uint64_t va = kBase + p * 4096, len = np * 4096;
      if (op == 0) {
        const uint64_t f = byte();
        const ProtFlags prot = f & 2 ? ProtFlags(Prot::read) : ProtFlags(Prot::read) | Prot::write;
        if (f & 4) (void)as.mmap_p2p(f & 8 ? gpu : nic, {.addr = va, .len = len, .prot = prot, .shared = true});
        else (void)as.mmap_anon({.addr = va, .len = len, .prot = prot, .populate = (f & 1) != 0});
      } else if (op == 1) {
        (void)as.munmap(va, len);
      } else if (op == 2) {
        (void)as.mprotect(va, len, byte() & 1 ? ProtFlags(Prot::read) : ProtFlags(Prot::read) | Prot::write);
      } else if (op == 3) {
        (void)as.migrate(va, len);
      } else if (op == 4) {
        if (auto a = cpu_translate(as, va); a && !mem->contains(*a)) (void)as.revoke_p2p(PhysSpan{*a, 1});
      } else if (op == 5) {
        const uint64_t end = std::min(kBase + kPages * 4096, va + len);
        std::vector<uint64_t> pfns((end - va) >> kPageShift);
        const uint64_t f = byte();
        for (auto& e : pfns) e = byte() & 3 ? 0 : kHmmPfnReqFault | (byte() & 1 ? kHmmPfnReqWrite : 0);
        HmmRange r{.notifier = n.get(), .notifier_seq = n->read_begin(), .start = va, .end = end, .hmm_pfns = pfns,
                   .default_flags = f & 1 ? kHmmPfnReqFault | (f & 2 ? kHmmPfnReqWrite : 0) : 0,
                   .pfn_flags_mask = f & 4 ? kHmmPfnReqFault | kHmmPfnReqWrite : 0, .resolve_p2p = (f & 8) == 0};
        const std::vector<uint64_t> req = pfns;
        Status st = hmm_range_fault(r);
        CHECK(st || st.error().code == EFAULT || st.error().code == EPERM);
        if (st) {
          for (size_t k = 0; k < pfns.size(); ++k) {
            const uint64_t a = va + (k << kPageShift);
            const uint64_t want = (req[k] & r.pfn_flags_mask) | r.default_flags;
            if (want & kHmmPfnReqFault) CHECK(pfns[k] & kHmmPfnValid);
            if ((want & kHmmPfnReqFault) && (want & kHmmPfnReqWrite)) CHECK(pfns[k] & kHmmPfnWrite);
            if (pfns[k] & kHmmPfnValid) {
              auto cpu = cpu_translate(as, a);
              CHECK(cpu && *cpu == hmm_pfn_to_phys(pfns[k]));
              auto v = as.find_vma(a);
              CHECK(v && ((pfns[k] & kHmmPfnWrite) != 0) == static_cast<bool>(v->prot & Prot::write));
            } else {
              CHECK(!(pfns[k] & ~kHmmPfnFlags));
            }
          }
          if (auto list = hmm_pfns_to_ranges(as, pfns, va)) {
            uint64_t bytes = 0;
            for (size_t k = 0; k < list->size(); ++k) {
              bytes += (*list)[k].size;
              if (k > 0) CHECK((*list)[k - 1].base + (*list)[k - 1].size != (*list)[k].base || (*list)[k - 1].provider != (*list)[k].provider);
            }
            CHECK(bytes == pfns.size() * kPageSize);
          }
        }
      } else {
        const uint64_t a = va + byte() * 16;
        const bool write = op == 7;
        auto t = mirror->access(a, write);
        if (t) {
          uint64_t run = 0;
          auto reached = world->reach(cfg, t->seg, t->dma.value(), write, &run);
          CHECK(reached && *reached == *cpu_translate(as, a));
        } else {
          const int c = t.error().code;
          CHECK(c == EFAULT || c == EPERM || c == EREMOTEIO);
        }
      }
      // No stale device entry after any step.
      for (uint64_t q = 0; q < kPages; ++q) {
        const uint64_t a = kBase + q * 4096;
        if (auto t = mirror->lookup(a, false)) {
          uint64_t run = 0;
          auto reached = world->reach(cfg, t->seg, t->dma.value(), false, &run);
          auto cpu = cpu_translate(as, a);
          CHECK(cpu && reached && *reached == *cpu);
        }
      }
    }
    mirror.reset();
    CHECK(dev->stats().live_mappings == 0);
  }
  CHECK(mem->stats().folios == 0);
  CHECK(nic.live_chunks() == 0 && gpu.live_chunks() == 0);
  return 0;
}
