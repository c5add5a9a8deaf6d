// Op-stream fuzzer for address spaces, pinning and O_DIRECT: mmap (anonymous 4 KiB or
// 2 MiB, P2P from two providers, with pools that may lack p2pdma or be dying), munmap,
// pin, unpin and direct_io through queues with and without BLK_FEAT_PCI_P2PDMA. Every
// pinned list must hold exactly its bytes, never join providers, and pins must balance;
// at the end every host page and every P2P chunk must be free again.
#include <vector>

#include "fuzz_check.hpp"
#include "physr/mem.hpp"
#include "support/p2p_chunk_source.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  using namespace physr::mem;
  auto mem = std::move(HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 16 * MiB}, size)).value();
  size_t i = 0;
  auto byte = [&]() -> uint64_t { return i < size ? data[i++] : 0; };
  // Two adjacent BARs: direct ids, or ids beyond 510 that share the range-list tag 511.
  const bool indirect = byte() & 1;
  physr::testing::TestChunkSource a(PhysSpan{PhysAddr(0x2000000000), 4 * MiB}, indirect ? 600 : 3, "a");
  physr::testing::TestChunkSource b(PhysSpan{PhysAddr(0x2000400000), 4 * MiB}, indirect ? 601 : 4, "b");
  QueueLimits lim = Queue::nvme_limits();
  lim.max_segments = 1 + static_cast<uint32_t>(byte() % 128);
  lim.max_sectors = 8 + static_cast<uint32_t>(byte() % 64) * 64;
  lim.seg_boundary_mask = (uint64_t{1} << (12 + byte() % 21)) - 1;
  lim.max_segment_size = uint64_t{4096} << (byte() % 8);
  const Queue q_p2p = std::move(Queue::nvme("nvme0n1", true, lim)).value();
  const Queue q_host = std::move(Queue::nvme("nvme1n1", false, lim)).value();
  {
    AddressSpace as(*mem);
    std::vector<Pinned> pins;
    constexpr uint64_t kBase = 0x10000000;
    while (i < size) {
      const uint64_t op = byte() % 7;
      const uint64_t addr = kBase + (byte() % 64) * 4096 * 4, len = (1 + byte() % 64) * 4096;
      if (op == 0) {
        (void)as.mmap_anon({.addr = addr, .len = len, .order = byte() % 4 == 0 ? kOrder2M : kOrder4K});
      } else if (op == 1) {
        const uint64_t f = byte();
        auto& src = f & 1 ? b : a;
        src.p2pdma = (f & 6) != 6;
        src.dying = (f & 24) == 24;
        auto r = as.mmap_p2p(src, {.addr = addr, .len = len, .shared = (f & 32) == 0});
        if (!r) CHECK(r.error().code == EINVAL || r.error().code == ENODEV || r.error().code == ENOMEM || r.error().code == EEXIST);
        src.p2pdma = true;
        src.dying = false;
      } else if (op == 2) {
        CHECK(as.munmap(addr, len).has_value());
      } else if (op == 3) {
        const uint64_t off = byte() * 16, blen = len - off % len;
        const FollFlags f = byte() & 1 ? FollFlags(Foll::pci_p2pdma) : FollFlags();
        auto r = as.pin(addr + off, blen, f);
        if (!r) {
          CHECK(r.error().code == EFAULT || r.error().code == EREMOTEIO);
          continue;
        }
        CHECK(r->ranges().total_bytes() == blen);
        PhysRange prev{};
        bool first = true;
        for (const PhysRange x : r->ranges()) {
          CHECK(first || prev.base + prev.size != x.base || prev.provider != x.provider);
          if (!(f & Foll::pci_p2pdma)) CHECK(x.provider == kHostMemory);
          prev = x;
          first = false;
        }
        pins.push_back(std::move(r).value());
      } else if (op == 4 && !pins.empty()) {
        const size_t k = byte() % pins.size();
        CHECK(as.unpin(std::move(pins[k])).has_value());
        pins.erase(pins.begin() + static_cast<std::ptrdiff_t>(k));
      } else if (op == 5) {
        const Queue& q = byte() & 1 ? q_p2p : q_host;
        uint64_t seen = 0;
        auto driver = [&](const Request& rq, const RangeList& segs) -> Status {
          CHECK(rq.nr_phys_segments <= lim.max_segments);
          CHECK(rq.sectors() <= lim.max_sectors);
          CHECK(segs.size() <= rq.nr_phys_segments);
          CHECK(segs.total_bytes() == rq.bytes);
          for (const PhysRange s : segs) {
            CHECK(provider_tag(as.provider_at(s.base)) == s.provider);
            CHECK(as.provider_at(s.base) == rq.bios.front().provider);
            CHECK(as.provider_at(s.base + (s.size - 1)) == rq.bios.front().provider);
            CHECK(s.size <= lim.max_segment_size);
            CHECK((s.base.value() | lim.seg_boundary_mask) == ((s.base.value() + s.size - 1) | lim.seg_boundary_mask));
          }
          seen += rq.bytes;
          return {};
        };
        const uint64_t pinned_before = as.stats().pinned_pages;
        auto r = direct_io(as, q, byte() & 1 ? BlockOp::read : BlockOp::write, addr, len, byte(), driver);
        if (r) CHECK(seen == len && r->bytes == len);
        else CHECK(r.error().code == EFAULT || r.error().code == EREMOTEIO || r.error().code == EINVAL);
        if (!r && r.error().code == EREMOTEIO) CHECK(!q.pci_p2pdma());
        CHECK(as.stats().pinned_pages == pinned_before);
      } else {
        uint64_t pages = 0;
        for (const Pinned& p : pins) pages += p.pages();
        CHECK(as.stats().pinned_pages == pages);
        CHECK(as.stats().live_pins == pins.size());
      }
    }
    for (Pinned& p : pins) CHECK(as.unpin(std::move(p)).has_value());
    CHECK(as.munmap(0, AddressSpace::kTaskSize).has_value());
    CHECK(mem->stats().pinned_pages == 0);
  }
  CHECK(mem->stats().free_pages == mem->stats().total_pages);
  CHECK(a.live_chunks() == 0 && b.live_chunks() == 0);
  return 0;
}
