// P2P memory pools (physr/mem.hpp): the kernel's rules (drivers/pci/p2pdma.c,
// lib/genalloc.c), removal, publish/find_many, alignment, deferred free and leak reports.
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "physr/mem.hpp"
#include "support/mem_world.hpp"

namespace physr::mem {
namespace {

using physr::testing::MemWorld;

std::unique_ptr<P2PMemory> make(MemWorld& w, bool track = true, std::function<void(const std::string&)> report = {}) {
  P2PMemoryOptions o;
  o.track = track;
  o.report = std::move(report);
  o.remove_timeout = std::chrono::milliseconds(50);
  return P2PMemory::create(*w.platform, std::move(o)).value();
}

// Linux pci_p2pdma_add_resource(): EINVAL for a BAR that is not memory, offset >= length,
// size + offset > length; size 0 means the rest of the BAR.
TEST(MemPoolTest, AddResourceFollowsTheKernelsEinvalRules) {
  MemWorld w;
  auto m = make(w);
  auto io = m->add_resource(w.nvme, 4, 0, 0);
  ASSERT_FALSE(io);
  EXPECT_EQ(io.error().code, EINVAL);
  EXPECT_NE(io.error().message.find("not a memory BAR"), std::string::npos) << io.error().message;
  EXPECT_EQ(m->add_resource(w.nvme, 3, 0, 0).error().code, EINVAL);  // no such BAR
  auto off = m->add_resource(w.nvme, 2, 0, MemWorld::kNvmeSize);
  ASSERT_FALSE(off);
  EXPECT_EQ(off.error().code, EINVAL);
  EXPECT_NE(off.error().message.find("offset 0x1000000 is not below"), std::string::npos) << off.error().message;
  auto past = m->add_resource(w.nvme, 2, MemWorld::kNvmeSize, kPageSize);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().code, EINVAL);
  EXPECT_NE(past.error().message.find("runs past"), std::string::npos) << past.error().message;
  EXPECT_EQ(m->add_resource(w.nvme, 2, 6000, 0).error().code, EINVAL);  // not whole granules
  EXPECT_EQ(m->add_resource(999, 0, 0, 0).error().code, EINVAL);
  EXPECT_EQ(m->stats(w.nvme).size, 0u);  // failures changed nothing
  EXPECT_TRUE(w.platform->apertures().empty());

  // size 0: the rest of the BAR from the offset; the BAR becomes a platform aperture.
  auto id = m->add_resource(w.nvme, 2, 0, 4 * MiB);
  ASSERT_TRUE(id) << id.error().to_string();
  ASSERT_EQ(w.platform->apertures().size(), 1u);
  EXPECT_EQ(w.platform->apertures()[0].id, *id);
  EXPECT_FALSE(w.platform->apertures()[0].published);
  EXPECT_EQ(m->stats(w.nvme).size, 12 * MiB);
  // The same BAR again: the same aperture; overlapping spans are EEXIST.
  auto second = m->add_resource(w.nvme, 2, 4 * MiB, 0);
  ASSERT_TRUE(second) << second.error().to_string();
  EXPECT_EQ(*second, *id);
  EXPECT_EQ(m->add_resource(w.nvme, 2, 8 * KiB, 4 * MiB - 4 * KiB).error().code, EEXIST);
  EXPECT_EQ(m->stats(w.nvme).size, 16 * MiB);
}

// A resource starts on a 4 KiB page, which the frees' alignment test relies on. Linux never
// sees another: a memory BAR decodes a naturally aligned power of two, so whole pages of a
// real BAR start on a page, and pci_p2pdma_add_resource() -> devm_memremap_pages() maps page
// frames (PHYS_PFN(range.start); __add_pages()' check_pfn_span() even wants 2 MiB
// subsections). A hand-made or sysfs topology can hold a BAR that is not page aligned: its
// aperture is refused (ProviderRegistry::add(): EINVAL), so add_resource() is EINVAL and
// the offset, a multiple of 4 KiB, cannot make up for it.
TEST(MemPoolTest, AResourceThatDoesNotStartOnAPageIsEinval) {
  pci::Topology topo = pci::parse_machine(physr::testing::kMemWorldMachine, "mem-world").value();
  uint32_t nic = 0;
  for (uint32_t i = 0; i < topo.functions.size(); ++i)
    if (topo.functions[i].name == "nic") nic = i;
  topo.functions[nic].bars[0].span.base = PhysAddr(MemWorld::kNicBar + 0x800);
  physr::testing::NoMemory memory;
  PlatformOptions po;
  po.bounce.size = 0;
  auto platform = Platform::create(topo, memory, po).value();
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "no tracking");
    P2PMemoryOptions o;
    o.track = track;
    auto m = P2PMemory::create(*platform, std::move(o)).value();
    for (const uint64_t offset : {uint64_t{0}, 4 * KiB, 1 * MiB}) {
      auto r = m->add_resource(nic, 0, 64 * KiB, offset);
      ASSERT_FALSE(r) << "offset " << offset;
      EXPECT_EQ(r.error().code, EINVAL);
      EXPECT_NE(r.error().message.find("not 4 KiB aligned"), std::string::npos) << r.error().message;
      EXPECT_NE(r.error().message.find(format_hex(MemWorld::kNicBar + 0x800)), std::string::npos) << r.error().message;
    }
    EXPECT_EQ(m->stats(nic).size, 0u);
    EXPECT_TRUE(platform->apertures().empty());  // nothing registered
  }
}

TEST(MemPoolTest, UsesTheAperturePlatformRegisteredAlready) {
  MemWorld w;
  const Aperture* ap = w.platform->add_bar(w.gpu, 0, true).value();
  auto m = make(w);
  EXPECT_EQ(m->add_resource(w.gpu, 0, 0, 0).value(), ap->id);
  EXPECT_EQ(w.platform->apertures().size(), 1u);
}

// pci_alloc_p2pmem() -> gen_pool_alloc(): sizes round up to the 4 KiB granule; 0 is refused.
TEST(MemPoolTest, AllocRoundsUpToGranulesAndFreeIsDeferred) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  EXPECT_EQ(m->alloc(w.nvme, 0).error().code, EINVAL);
  EXPECT_EQ(m->alloc(w.nvme, 4096, {.align = 6000}).error().code, EINVAL);
  EXPECT_EQ(m->alloc(w.nvme, 4096, {.align = 2048}).error().code, EINVAL);
  EXPECT_EQ(m->alloc(w.gpu, 4096).error().code, ENODEV);  // no P2P memory
  auto c = m->alloc(w.nvme, 1);
  ASSERT_TRUE(c) << c.error().to_string();
  EXPECT_EQ(c->span.size, kPageSize);
  EXPECT_EQ(c->function, w.nvme);
  EXPECT_TRUE((PhysSpan{PhysAddr(MemWorld::kNvmeBar), MemWorld::kNvmeSize}.contains(c->span)));
  auto d = m->alloc(w.nvme, 5000);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->span.size, 2 * kPageSize);
  EXPECT_FALSE(c->span.overlaps(d->span));
  PoolStats s = m->stats(w.nvme);
  EXPECT_EQ(s.chunks, 2u);
  EXPECT_EQ(s.allocated, 3 * kPageSize);
  ASSERT_TRUE(m->free(*c));
  s = m->stats(w.nvme);
  EXPECT_EQ(s.chunks, 1u);
  EXPECT_EQ(s.allocated, 2 * kPageSize);
  EXPECT_EQ(s.deferred, kPageSize);  // waits for its grace period
  m->barrier();
  EXPECT_EQ(m->stats(w.nvme).deferred, 0u);
  ASSERT_TRUE(m->free(*d));
  m->barrier();
  s = m->stats(w.nvme);
  EXPECT_EQ(s.chunks, 0u);
  EXPECT_EQ(s.allocated, 0u);
  EXPECT_EQ(s.deferred, 0u);
}

TEST(MemPoolTest, FillsTheBarExactlyThenEnomem) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 64 * KiB, 0));
  std::vector<P2PChunk> got;
  for (int i = 0; i < 16; ++i) got.push_back(m->alloc(w.nvme, 4096).value());
  auto full = m->alloc(w.nvme, 4096);
  ASSERT_FALSE(full);
  EXPECT_EQ(full.error().code, ENOMEM);
  // Freed memory comes back after its grace period, which alloc waits for before ENOMEM.
  ASSERT_TRUE(m->free(got.back()));
  got.pop_back();
  auto again = m->alloc(w.nvme, 4096);
  ASSERT_TRUE(again) << again.error().to_string();
  got.push_back(*again);
  for (const P2PChunk& c : got) ASSERT_TRUE(m->free(c));
}

// gen_pool_free_owner() BUG()s on an address outside every chunk and on a granule already
// free (BUG_ON(remain)); physr returns EINVAL naming the address and the rule, and changes
// nothing.
TEST(MemPoolTest, BadFreesAreEinvalAndChangeNothing) {
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "no tracking");
    MemWorld w;
    auto m = make(w, track);
    const ProviderId id = m->add_resource(w.nvme, 2, 0, 0).value();
    P2PChunk c = m->alloc(w.nvme, 8192).value();
    const PoolStats before = m->stats(w.nvme);
    auto expect_einval = [&](P2PChunk bad, const char* words) {
      Status s = m->free(bad);
      ASSERT_FALSE(s);
      EXPECT_EQ(s.error().code, EINVAL);
      EXPECT_NE(s.error().message.find(format_hex(bad.span.base.value())), std::string::npos) << s.error().message;
      EXPECT_NE(s.error().message.find(words), std::string::npos) << s.error().message;
      const PoolStats after = m->stats(w.nvme);
      EXPECT_EQ(after.chunks, before.chunks);
      EXPECT_EQ(after.allocated, before.allocated);
      EXPECT_EQ(after.deferred, before.deferred);
    };
    expect_einval(P2PChunk{PhysSpan{c.span.base, 4000}, id, w.nvme}, "whole 4 KiB granules");
    expect_einval(P2PChunk{PhysSpan{PhysAddr(c.span.base.value() + 1), 4096}, id, w.nvme}, "whole 4 KiB granules");
    expect_einval(P2PChunk{PhysSpan{PhysAddr(MemWorld::kNicBar), 4096}, id, w.nvme}, "not inside any P2P resource");
    expect_einval(P2PChunk{c.span, id + 7, w.nvme}, "not inside any P2P resource");
    expect_einval(P2PChunk{c.span, id, 12345}, "no such function");
    expect_einval(P2PChunk{PhysSpan{PhysAddr(MemWorld::kNvmeBar + 8 * MiB), 4096}, id, w.nvme}, "never handed out");
    if (track) expect_einval(P2PChunk{PhysSpan{c.span.base, 4096}, id, w.nvme}, "freed whole");
    ASSERT_TRUE(m->free(c));
    if (!track) m->barrier();  // without tracking, a double free is seen once the first is back
    Status twice = m->free(c);
    ASSERT_FALSE(twice);
    EXPECT_EQ(twice.error().code, EINVAL);
    EXPECT_NE(twice.error().message.find("double free"), std::string::npos) << twice.error().message;
    m->barrier();
    EXPECT_EQ(m->stats(w.nvme).chunks, 0u);
    EXPECT_EQ(m->stats(w.nvme).deferred, 0u);
  }
}

// percpu_ref_kill() on removal: pci_alloc_p2pmem() fails at once (percpu_ref_tryget_live);
// pci_p2pdma_unmap_mappings() revokes holders; memunmap_pages() waits for the last free.
TEST(MemPoolTest, RemoveRevokesHoldersThenAllocIsEnodev) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  ASSERT_TRUE(m->publish(w.gpu, true));
  P2PChunk a = m->alloc(w.gpu, 4096, {.owner = "queue"}).value();
  P2PChunk b = m->alloc(w.gpu, 2 * MiB).value();
  std::vector<P2PChunk> revoked;
  m->on_revoke(w.gpu, [&](const P2PChunk& c) {
    revoked.push_back(c);
    ASSERT_TRUE(m->free(c));  // the holder unmaps and frees
    EXPECT_EQ(m->alloc(w.gpu, 4096).error().code, ENODEV);  // already refused
  });
  ASSERT_TRUE(m->remove(w.gpu));
  ASSERT_EQ(revoked.size(), 2u);
  EXPECT_EQ(revoked[0].span, a.span);
  EXPECT_EQ(revoked[1].span, b.span);
  auto after = m->alloc(w.gpu, 4096);
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, ENODEV);
  EXPECT_EQ(m->stats(w.gpu).size, 0u);
  EXPECT_EQ(m->remove(w.gpu).error().code, ENODEV);
  EXPECT_EQ(m->free(a).error().code, EINVAL);  // its pool is gone
  EXPECT_FALSE(m->find_many(std::vector<uint32_t>{w.nic}));
  EXPECT_FALSE(w.platform->providers().get(a.provider)->published());
  EXPECT_EQ(m->publish(w.gpu, true).error().code, ENODEV);
}

// percpu_ref_kill() comes before pci_p2pdma_unmap_mappings(): once remove() has begun, an
// allocation fails with ENODEV (percpu_ref_tryget_live() fails), even on a thread whose
// cache still holds chunks of the pool; here from an MMU notifier that the removal's
// unmap_mapping_range() calls, before the caches are emptied.
TEST(MemPoolTest, AllocDuringRemovalIsEnodevEvenFromAWarmCache) {
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "no tracking");
    MemWorld w;
    auto m = make(w, track);
    ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
    const P2PChunk warm = m->alloc(w.gpu, kPageSize).value();  // the thread caches more of them
    ASSERT_TRUE(m->free(warm));
    P2PMemorySource file(*m, w.gpu, "gpu");
    auto host = HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 64 * MiB}).value();
    AddressSpace as(*host);
    const uint64_t a = as.mmap_p2p(file, MmapOptions{.len = 64 * KiB, .shared = true}).value();
    int calls = 0, code = 0;
    auto n = MmuIntervalNotifier::insert(as, a, 64 * KiB, [&](MmuIntervalNotifier& sub, const MmuNotifierRange&, uint64_t seq) {
      sub.set_seq(seq);
      ++calls;
      auto c = m->alloc(w.gpu, kPageSize);
      code = c ? 0 : c.error().code;
      if (c) (void)m->free(*c);
      return true;
    });
    ASSERT_TRUE(n) << n.error().to_string();
    ASSERT_TRUE(m->remove(w.gpu));
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(code, ENODEV);
    EXPECT_EQ(m->alloc(w.gpu, kPageSize).error().code, ENODEV);
  }
}

// Without tracking, a late free into a removed pool is EINVAL too, from the thread whose
// fast path still names that resource: the free fast path does not test `removed`, because
// remove() ends with every granule clear, so the bitmap test (gen_pool_free's BUG_ON(remain))
// sends it to the full checks. One granule and whole bitmap words (2 MiB) both.
TEST(MemPoolTest, ALateFreeIntoARemovedPoolIsEinvalWithoutTracking) {
  MemWorld w;
  auto m = make(w, /*track=*/false);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  P2PChunk a = m->alloc(w.gpu, 4096).value();
  P2PChunk b = m->alloc(w.gpu, 2 * MiB).value();
  m->on_revoke(w.gpu, [&](const P2PChunk& c) { ASSERT_TRUE(m->free(c)); });
  ASSERT_TRUE(m->remove(w.gpu));
  for (const P2PChunk& c : {a, b}) {
    Status s = m->free(c);
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, EINVAL);
    EXPECT_NE(s.error().message.find("removed"), std::string::npos) << s.error().message;
  }
  EXPECT_EQ(m->stats(w.gpu).chunks, 0u);
  EXPECT_EQ(m->alloc(w.gpu, 4096).error().code, ENODEV);
}

// Several importers and pools may hang off one provider: every subscriber to its removal is
// called, in order, with every chunk still held, and picks out its own; off_revoke() ends a
// subscription (also from inside its own callback), an ended or empty token is EINVAL.
TEST(MemPoolTest, RevokeCallsEverySubscriberAndOffRevokeEndsOne) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  P2PChunk a = m->alloc(w.gpu, 4096, {.owner = "a"}).value();
  P2PChunk b = m->alloc(w.gpu, 8192, {.owner = "b"}).value();
  std::vector<std::string> calls;
  const auto frees = [&](const char* who, const P2PChunk& mine) {
    return [&, who, mine](const P2PChunk& c) {
      calls.push_back(std::string(who) + ":" + std::to_string(c.span.size));
      if (c.span == mine.span) {
        ASSERT_TRUE(m->free(c));
      }
    };
  };
  const auto ta = m->on_revoke(w.gpu, frees("a", a));
  const auto gone = m->on_revoke(w.gpu, [&](const P2PChunk&) { calls.push_back("gone"); });
  const auto tb = m->on_revoke(w.gpu, frees("b", b));
  P2PMemory::RevokeToken self{};
  self = m->on_revoke(w.gpu, [&](const P2PChunk&) {
    calls.push_back("once");
    ASSERT_TRUE(m->off_revoke(self));  // ends itself: not called for the second chunk
  });
  EXPECT_NE(ta.id, tb.id);
  EXPECT_EQ(m->on_revoke(w.gpu, nullptr).id, 0u);
  EXPECT_EQ(m->on_revoke(12345, [](const P2PChunk&) {}).id, 0u);
  ASSERT_TRUE(m->off_revoke(gone));
  auto again = m->off_revoke(gone);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EINVAL);
  EXPECT_EQ(m->off_revoke({}).error().code, EINVAL);
  ASSERT_TRUE(m->remove(w.gpu));  // both chunks freed by their own subscriber: no EBUSY
  EXPECT_EQ(calls, (std::vector<std::string>{"a:4096", "a:8192", "b:4096", "b:8192", "once"}));
  EXPECT_EQ(m->off_revoke(self).error().code, EINVAL);
  EXPECT_TRUE(m->off_revoke(ta));
  EXPECT_TRUE(m->off_revoke(tb));
}

// A BAR removed and added again: frees find the live resource, not the removed one over
// the same span (gen_pool_free_owner() looks the address up among the pool's live chunks).
TEST(MemPoolTest, AfterRemoveAndReAddFreesFindTheLiveResource) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  ASSERT_TRUE(m->remove(w.nvme));
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  P2PChunk c = m->alloc(w.nvme, 4096).value();
  Status s = m->free(c);
  EXPECT_TRUE(s) << s.error().to_string();
  m->barrier();
  EXPECT_EQ(m->stats(w.nvme).chunks, 0u);
  EXPECT_EQ(m->stats(w.nvme).size, MemWorld::kNvmeSize);
}

// Each function's pool counts only its own chunks (pdev->p2pdma is per device): a chunk
// held on one function neither shows in another's stats nor holds up its removal.
TEST(MemPoolTest, PoolsOfTwoFunctionsCountApart) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  ASSERT_TRUE(m->add_resource(w.nic, 0, 0, 0));
  P2PChunk held = m->alloc(w.nvme, 8192).value();
  P2PChunk freed = m->alloc(w.nvme, 4096).value();
  ASSERT_TRUE(m->free(freed));
  EXPECT_EQ(m->stats(w.nic).chunks, 0u);
  EXPECT_EQ(m->stats(w.nic).allocated, 0u);
  EXPECT_EQ(m->stats(w.nic).deferred, 0u);
  EXPECT_EQ(m->stats(w.nvme).chunks, 1u);
  Status s = m->remove(w.nic);
  EXPECT_TRUE(s) << s.error().to_string();
  ASSERT_TRUE(m->free(held));
}

TEST(MemPoolTest, RemoveWithAChunkStillHeldIsEbusyAndNamesTheOwner) {
  MemWorld w;
  std::vector<std::string> reports;
  auto m = make(w, true, [&](const std::string& r) { reports.push_back(r); });
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  P2PChunk held = m->alloc(w.nvme, 4096, {.owner = "stuck holder"}).value();
  Status s = m->remove(w.nvme);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, EBUSY);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_NE(reports[0].find("stuck holder"), std::string::npos) << reports[0];
  EXPECT_NE(reports[0].find(format_hex(held.span.base.value())), std::string::npos) << reports[0];
  EXPECT_EQ(m->alloc(w.nvme, 4096).error().code, ENODEV);  // still being removed
  ASSERT_TRUE(m->free(held));
  ASSERT_TRUE(m->remove(w.nvme));
  EXPECT_EQ(m->stats(w.nvme).size, 0u);
}

// pci_p2pmem_publish() / pci_p2pmem_find_many(): only published memory is found, nearest first.
TEST(MemPoolTest, PublishDecidesWhatFindManyFinds) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  ASSERT_TRUE(m->add_resource(w.far, 0, 0, 0));
  const std::vector<uint32_t> nic{w.nic}, gpu{w.gpu}, far{w.far};
  EXPECT_FALSE(m->find_many(nic));  // nothing published yet (pci_p2pdma_add_resource leaves it so)
  ASSERT_TRUE(m->publish(w.nvme, true));
  EXPECT_EQ(m->find_many(nic), w.nvme);
  P2PChunk c = m->alloc(w.nvme, 4096).value();
  EXPECT_TRUE(w.platform->providers().get(c.provider)->published());
  ASSERT_TRUE(m->free(c));
  ASSERT_TRUE(m->publish(w.gpu, true));
  EXPECT_EQ(m->find_many(nic), w.gpu);  // same distance: the first
  EXPECT_EQ(m->find_many(gpu), w.gpu);  // distance 0
  ASSERT_TRUE(m->publish(w.far, true));
  EXPECT_EQ(m->find_many(far), w.far);
  const std::vector<uint32_t> both{w.nic, w.far};
  EXPECT_FALSE(m->find_many(both));  // no provider reaches both (no shared host bridge allowlisted)
  ASSERT_TRUE(m->publish(w.gpu, false));
  ASSERT_TRUE(m->publish(w.nvme, false));
  EXPECT_FALSE(m->find_many(nic));
  EXPECT_EQ(m->publish(w.nic, true).error().code, ENODEV);
}

// pci_p2pdma_max_pagemap_align() (proposed): PUD, PMD or PAGE size by start, size and offset.
TEST(MemPoolTest, HugeAlignmentWhereTheBarAllowsIt) {
  EXPECT_EQ(P2PMemory::max_pagemap_align(PhysAddr(0x40'0000'0000), 2 * GiB, 0), GiB);
  EXPECT_EQ(P2PMemory::max_pagemap_align(PhysAddr(0x40'0000'0000), 2 * GiB, 2 * MiB), 2 * MiB);
  EXPECT_EQ(P2PMemory::max_pagemap_align(PhysAddr(0x40'0020'0000), 6 * MiB, 0), 2 * MiB);
  EXPECT_EQ(P2PMemory::max_pagemap_align(PhysAddr(0x40'0000'0000), 2 * GiB, 4096), kPageSize);
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
  P2PChunk small = m->alloc(w.gpu, 4096).value();
  P2PChunk g1 = m->alloc(w.gpu, GiB, {.align = GiB}).value();
  EXPECT_EQ(g1.span.base.value() % GiB, 0u);
  EXPECT_FALSE(g1.span.overlaps(small.span));
  P2PChunk m2 = m->alloc(w.gpu, 2 * MiB).value();  // power-of-two sizes come naturally aligned
  EXPECT_EQ(m2.span.base.value() % (2 * MiB), 0u);
  P2PChunk m2b = m->alloc(w.gpu, 2 * MiB, {.align = 2 * MiB}).value();
  EXPECT_EQ(m2b.span.base.value() % (2 * MiB), 0u);
  EXPECT_FALSE(m2.span.overlaps(m2b.span));
  EXPECT_EQ(m->alloc(w.gpu, GiB, {.align = GiB}).error().code, ENOMEM);  // the other GiB is in use
  // A resource that starts 4 KiB into the BAR: 2 MiB chunks still come aligned, from inside.
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 4096));
  P2PChunk n2 = m->alloc(w.nvme, 2 * MiB, {.align = 2 * MiB}).value();
  EXPECT_EQ(n2.span.base.value() % (2 * MiB), 0u);
  for (const P2PChunk& c : {small, g1, m2, m2b, n2}) ASSERT_TRUE(m->free(c));
}

TEST(MemPoolTest, VirtToBusAddsTheBusOffset) {
  MemWorld w;
  auto m = make(w);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 8 * MiB, 4 * MiB));
  P2PChunk c = m->alloc(w.nvme, 4096).value();
  EXPECT_EQ(m->virt_to_bus(w.nvme, c.span.base).value(), BusAddr(c.span.base.value()));
  EXPECT_EQ(m->virt_to_bus(w.nvme, PhysAddr(MemWorld::kNvmeBar)).error().code, EINVAL);  // before the offset
  EXPECT_EQ(m->virt_to_bus(w.gpu, c.span.base).error().code, EINVAL);
  ASSERT_TRUE(m->free(c));
}

// Random alloc/free against a reference model: nothing is handed out twice, every chunk
// lies in the resource with the size asked, and the accounting returns to zero.
TEST(MemPoolTest, RandomAllocFreeMatchesAReferenceModel) {
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "no tracking");
    MemWorld w;
    auto m = make(w, track);
    ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));
    const PhysSpan bar{PhysAddr(MemWorld::kGpuBar), MemWorld::kGpuSize};
    std::mt19937_64 rng(42);
    std::map<uint64_t, P2PChunk> held;  // by base
    uint64_t held_bytes = 0;
    const uint64_t sizes[] = {4096, 8192, 12288, 65536, 100000, 2 * MiB};
    for (int op = 0; op < 20000; ++op) {
      if (held.empty() || (held.size() < 400 && rng() % 2)) {
        const uint64_t want = sizes[rng() % std::size(sizes)];
        const uint64_t align = rng() % 8 == 0 ? 64 * KiB : kPageSize;
        auto c = m->alloc(w.gpu, want, {.align = align});
        ASSERT_TRUE(c) << c.error().to_string();
        ASSERT_EQ(c->span.size, (want + 4095) / 4096 * 4096);
        ASSERT_EQ(c->span.base.value() % align, 0u);
        ASSERT_TRUE(bar.contains(c->span));
        auto next = held.lower_bound(c->span.base.value());
        ASSERT_TRUE(next == held.end() || !next->second.span.overlaps(c->span)) << "handed out twice";
        if (next != held.begin()) {
          ASSERT_FALSE(std::prev(next)->second.span.overlaps(c->span)) << "handed out twice";
        }
        held.emplace(c->span.base.value(), *c);
        held_bytes += c->span.size;
      } else {
        auto it = held.begin();
        std::advance(it, rng() % held.size());
        ASSERT_TRUE(m->free(it->second));
        held_bytes -= it->second.span.size;
        held.erase(it);
      }
      if (op % 2500 == 0) m->barrier();
      if (op % 500 == 0) {
        const PoolStats s = m->stats(w.gpu);
        ASSERT_EQ(s.chunks, held.size());
        ASSERT_EQ(s.allocated, held_bytes);
      }
    }
    for (const auto& [base, c] : held) ASSERT_TRUE(m->free(c));
    m->barrier();
    const PoolStats s = m->stats(w.gpu);
    EXPECT_EQ(s.chunks, 0u);
    EXPECT_EQ(s.allocated, 0u);
    EXPECT_EQ(s.deferred, 0u);
    // Everything came back: the whole BAR can be allocated again in one piece.
    auto all = m->alloc(w.gpu, MemWorld::kGpuSize);
    ASSERT_TRUE(all) << all.error().to_string();
    ASSERT_TRUE(m->free(*all));
  }
}

// The thread's own frees come back to it (as the kernel's per-cpu page lists keep freed
// pages near the CPU): once enough batches wait, the allocating thread ends a grace period
// itself (synchronize_rcu) and reuses them, so a ring of chunks in flight stays within a
// bounded set of addresses instead of walking the whole BAR while call_rcu batches. Also:
// removal with batches waiting and ready on the thread leaves nothing behind.
TEST(MemPoolTest, AThreadReusesItsOwnFreesAfterItsOwnGracePeriod) {
  MemWorld w;
  auto m = make(w, /*track=*/false);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 0));  // 524288 granules
  std::vector<P2PChunk> ring;
  for (int i = 0; i < 1024; ++i) ring.push_back(m->alloc(w.gpu, 4096).value());
  std::set<uint64_t> seen;
  for (const P2PChunk& c : ring) seen.insert(c.span.base.value());
  for (size_t i = 0; i < 32768; ++i) {
    P2PChunk c = m->alloc(w.gpu, 4096).value();
    seen.insert(c.span.base.value());
    ASSERT_TRUE(m->free(ring[i % ring.size()]));
    ring[i % ring.size()] = c;
  }
  // In flight (1024), waiting for the thread's grace period (16 batches of 128), the
  // pending batch and one refill: never more than 4096 distinct granules.
  EXPECT_LE(seen.size(), 4096u);
  PoolStats s = m->stats(w.gpu);
  EXPECT_EQ(s.chunks, 1024u);
  EXPECT_EQ(s.allocated, 1024u * 4096);
  for (const P2PChunk& c : ring) ASSERT_TRUE(m->free(c));
  ASSERT_TRUE(m->remove(w.gpu));
  s = m->stats(w.gpu);
  EXPECT_EQ(s.chunks + s.allocated + s.deferred, 0u);
}

// 2 MiB chunks are found a word of the bitmap at a time where the resource starts on a
// 256 KiB boundary; they are still aligned to 2 MiB of physical address, not to the word.
TEST(MemPoolTest, HugeChunksOfAQuarterMibOffsetResourceAreNaturallyAligned) {
  MemWorld w;
  auto m = make(w, /*track=*/false);
  ASSERT_TRUE(m->add_resource(w.gpu, 0, 0, 256 * KiB));
  std::vector<P2PChunk> got;
  // [256 KiB, 2 GiB) of a 1 GiB-aligned BAR holds 1023 aligned 2 MiB windows.
  for (int i = 0; i < 1023; ++i) {
    auto c = m->alloc(w.gpu, 2 * MiB);
    ASSERT_TRUE(c) << i << ": " << c.error().to_string();
    ASSERT_EQ(c->span.base.value() % (2 * MiB), 0u) << format_hex(c->span.base.value());
    got.push_back(*c);
  }
  EXPECT_EQ(m->alloc(w.gpu, 2 * MiB).error().code, ENOMEM);
  P2PChunk small = m->alloc(w.gpu, 4096).value();  // the 1792 KiB before the first window
  EXPECT_LT(small.span.base.value(), MemWorld::kGpuBar + 2 * MiB);
  got.push_back(small);
  for (const P2PChunk& c : got) ASSERT_TRUE(m->free(c));
}

// The grace period: a reader inside a read-side section that found chunks keeps them from
// being handed out again, though they were freed; after it leaves they come back.
TEST(MemPoolTest, AReaderHoldingChunksAcrossTheirFreeNeverSeesThemReused) {
  MemWorld w;
  auto m = make(w, /*track=*/false);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));  // 4096 granules
  std::vector<P2PChunk> found;
  for (int i = 0; i < 512; ++i) found.push_back(m->alloc(w.nvme, 4096).value());
  std::set<uint64_t> freed;
  for (const P2PChunk& c : found) freed.insert(c.span.base.value());
  std::atomic<int> stage{0};
  std::thread reader([&] {
    P2PMemory::ReadGuard guard;  // found the chunks in here
    stage.store(1);
    while (stage.load() != 2) std::this_thread::yield();
  });
  while (stage.load() != 1) std::this_thread::yield();
  for (const P2PChunk& c : found) ASSERT_TRUE(m->free(c));  // four batches go to call_rcu
  // Every other granule of the BAR, while the reader is inside its section: none of them is
  // one the reader may still use.
  std::vector<P2PChunk> later;
  for (int i = 0; i < 4096 - 512; ++i) {
    P2PChunk c = m->alloc(w.nvme, 4096).value();
    ASSERT_FALSE(freed.count(c.span.base.value())) << "reused inside the reader's section: " << format_hex(c.span.base.value());
    later.push_back(c);
  }
  stage.store(2);
  reader.join();
  // The grace period is over: the only free granules left are the ones the reader held.
  P2PChunk again = m->alloc(w.nvme, 4096).value();
  EXPECT_TRUE(freed.count(again.span.base.value())) << format_hex(again.span.base.value());
  later.push_back(again);
  for (const P2PChunk& c : later) ASSERT_TRUE(m->free(c));
}

TEST(MemPoolTest, TeardownReportsChunksStillHeldWithOwners) {
  std::vector<std::string> reports;
  {
    MemWorld w;
    auto m = make(w, true, [&](const std::string& r) { reports.push_back(r); });
    ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
    P2PChunk kept = m->alloc(w.nvme, 8192, {.owner = "leaky driver"}).value();
    P2PChunk freed = m->alloc(w.nvme, 4096, {.owner = "good driver"}).value();
    ASSERT_TRUE(m->free(freed));
    m.reset();
    ASSERT_EQ(reports.size(), 1u);
    EXPECT_NE(reports[0].find("leaky driver"), std::string::npos) << reports[0];
    EXPECT_NE(reports[0].find(format_hex(kept.span.base.value())), std::string::npos) << reports[0];
    EXPECT_EQ(reports[0].find("good driver"), std::string::npos) << reports[0];
    EXPECT_NE(reports[0].find("1 chunk(s)"), std::string::npos) << reports[0];
  }
  reports.clear();
  {
    MemWorld w;
    auto m = make(w, true, [&](const std::string& r) { reports.push_back(r); });
    ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
    ASSERT_TRUE(m->free(m->alloc(w.nvme, 4096).value()));
  }
  EXPECT_TRUE(reports.empty());
}

TEST(MemPoolTest, ChunksOfAnExitedThreadComeBack) {
  MemWorld w;
  auto m = make(w, /*track=*/false);
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 64 * KiB, 0));
  std::vector<P2PChunk> got;
  std::thread t([&] {
    for (int i = 0; i < 8; ++i) got.push_back(m->alloc(w.nvme, 4096).value());
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(m->free(got[i]));
  });
  t.join();
  EXPECT_EQ(m->stats(w.nvme).chunks, 4u);
  // The thread's cached chunks and pending frees are not lost: all 12 free granules are
  // still there (16 minus the 4 held).
  std::vector<P2PChunk> rest;
  for (int i = 0; i < 12; ++i) rest.push_back(m->alloc(w.nvme, 4096).value());
  EXPECT_EQ(m->alloc(w.nvme, 4096).error().code, ENOMEM);
  for (int i = 4; i < 8; ++i) ASSERT_TRUE(m->free(got[i]));
  for (const P2PChunk& c : rest) ASSERT_TRUE(m->free(c));
  m->barrier();
  EXPECT_EQ(m->stats(w.nvme).chunks, 0u);
}

// drivers/pci/p2pdma.c p2pmem_alloc_mmap(): an address space maps chunks of the real pool
// through the function's allocate file (P2PMemorySource); pins carry the pool's provider;
// munmap with a pin left keeps the chunk, the last unpin frees it (p2pdma_folio_free ->
// pci_free_p2pmem) and after a grace period the pool's accounting is back to zero.
TEST(MemPoolTest, AddressSpacesMapThePoolThroughItsAllocateFile) {
  MemWorld w;
  auto m = make(w);
  P2PMemorySource file(*m, w.nvme, "nvme");
  auto host = HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 64 * MiB}).value();
  AddressSpace as(*host);
  const MmapOptions opt{.len = 1 * MiB, .shared = true};
  // No resource yet: pdev->p2pdma is NULL, ENODEV.
  auto none = as.mmap_p2p(file, opt);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, ENODEV) << none.error().to_string();
  const ProviderId id = m->add_resource(w.nvme, 2, 0, 0).value();
  EXPECT_EQ(file.provider(), id);
  const uint64_t a = as.mmap_p2p(file, opt).value();
  EXPECT_EQ(as.find_vma(a)->provider, id);
  EXPECT_EQ(m->stats(w.nvme).allocated, 1 * MiB);
  EXPECT_EQ(file.live_chunks(), 1u);
  auto pin = as.pin(a + 64 * KiB, 128 * KiB, FollFlags(Foll::write) | Foll::pci_p2pdma).value();
  for (const PhysRange& r : pin.ranges()) EXPECT_EQ(as.provider_at(r.base), id);
  ASSERT_TRUE(as.munmap(a, 1 * MiB));
  EXPECT_EQ(m->stats(w.nvme).allocated, 1 * MiB);  // the pin holds the chunk
  ASSERT_TRUE(as.unpin(std::move(pin)));
  EXPECT_EQ(file.live_chunks(), 0u);
  m->barrier();
  const PoolStats s = m->stats(w.nvme);
  EXPECT_EQ(s.allocated, 0u);
  EXPECT_EQ(s.deferred, 0u);
  EXPECT_EQ(s.chunks, 0u);
  // gen_pool_alloc_owner() failing: ENOMEM, nothing mapped, nothing taken.
  auto big = as.mmap_p2p(file, MmapOptions{.len = 2 * MemWorld::kNvmeSize, .shared = true});
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, ENOMEM) << big.error().to_string();
  EXPECT_EQ(as.stats().vmas, 0u);
  // Only chunks the file handed out go back through it.
  auto foreign = file.release(PhysSpan{PhysAddr(MemWorld::kNvmeBar), kPageSize});
  ASSERT_FALSE(foreign);
  EXPECT_EQ(foreign.error().code, EINVAL);
  // Provider removal: the pool is gone, mmap is ENODEV.
  ASSERT_TRUE(m->remove(w.nvme));
  auto gone = as.mmap_p2p(file, opt);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().code, ENODEV) << gone.error().to_string();
}

// drivers/pci/p2pdma.c, a provider going away under O_DIRECT into its memory:
// pci_p2pdma_unmap_mappings() runs unmap_mapping_range() on the allocate file, so every
// user mapping goes at once, while an I/O in flight keeps its pinned pages (each holds the
// pgmap reference that memunmap_pages() waits for): the I/O completes, its unpin frees the
// chunk, and only then does the removal finish. Afterwards a pin of the old address is
// EFAULT (the new O_DIRECT fails naming it) and nothing of the pool is left.
TEST(MemPoolTest, RemovalUnmapsUserMappingsAndWaitsForTheIoInFlight) {
  MemWorld w;
  P2PMemoryOptions o;
  o.remove_timeout = std::chrono::seconds(30);  // the removal must wait for the unpin, not give up
  auto m = P2PMemory::create(*w.platform, std::move(o)).value();
  ASSERT_TRUE(m->add_resource(w.nvme, 2, 0, 0));
  P2PMemorySource file(*m, w.nvme, "nvme");
  auto host = HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 64 * MiB}).value();
  AddressSpace as(*host);
  uint64_t a = 0, idle = 0;
  {
    std::lock_guard l(as.mmap_lock());
    a = as.mmap_p2p(file, {.len = 256 * KiB, .shared = true}).value();  // the I/O's buffer
    idle = as.mmap_p2p(file, {.len = 64 * KiB, .shared = true}).value();  // mapped, never pinned
  }
  EXPECT_EQ(m->stats(w.nvme).chunks, 2u);
  const Queue q = Queue::nvme("nvme0n1", /*ctrl_supports_pci_p2pdma=*/true).value();
  std::atomic<bool> removed{false};
  Status removal;
  std::thread remover;
  bool unmapped_in_flight = false;
  Status refused_pin;
  const auto driver = [&](const Request&, const RangeList& segs) -> Status {
    if (remover.joinable()) return {};
    // The device is moving the bytes when its provider starts going away.
    remover = std::thread([&] {
      removal = m->remove(w.nvme);
      removed.store(true);
    });
    for (;;) {  // until the mapping is gone (or, were it never unmapped, the removal gave up)
      {
        std::lock_guard l(as.mmap_lock());
        if (!as.find_vma(a) && !as.find_vma(idle)) {
          unmapped_in_flight = true;
          auto p = as.pin(a, kPageSize, FollFlags(Foll::write) | Foll::pci_p2pdma);
          refused_pin = p ? Status{} : Status(p.error());
          if (p) (void)as.unpin(std::move(*p));
          break;
        }
      }
      if (removed.load()) break;
      std::this_thread::yield();
    }
    EXPECT_FALSE(removed.load()) << "the removal ended while the I/O still held its pages";
    for (const PhysRange& r : segs) EXPECT_NE(as.provider_at(r.base), kInvalidProvider);  // still held by the pins
    return {};  // the I/O completes
  };
  auto io = direct_io(as, q, BlockOp::read, a, 256 * KiB, 0, driver);
  ASSERT_TRUE(remover.joinable());
  remover.join();
  ASSERT_TRUE(io) << io.error().to_string();
  EXPECT_TRUE(unmapped_in_flight) << "the user mappings survived the provider's removal";
  ASSERT_FALSE(refused_pin);
  EXPECT_EQ(refused_pin.error().code, EFAULT);
  EXPECT_TRUE(removal) << removal.error().to_string();
  // A new O_DIRECT at the old address: EFAULT, naming it.
  auto again = direct_io(as, q, BlockOp::read, a, 4096, 0, [](const Request&, const RangeList&) -> Status { return {}; });
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EFAULT);
  EXPECT_NE(again.error().to_string().find(format_hex(a)), std::string::npos) << again.error().to_string();
  // Nothing left: the file, the address space and the pool.
  EXPECT_EQ(file.live_chunks(), 0u);
  EXPECT_EQ(as.stats().p2p_chunks, 0u);
  EXPECT_EQ(as.stats().vmas, 0u);
  const PoolStats s = m->stats(w.nvme);
  EXPECT_EQ(s.chunks + s.allocated + s.deferred + s.size, 0u);
  EXPECT_EQ(as.mmap_p2p(file, {.len = 4096, .shared = true}).error().code, ENODEV);
}

}  // namespace
}  // namespace physr::mem
