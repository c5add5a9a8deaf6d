// The mirror (physr/mem/hmm.hpp): interval notifiers as mm/mmu_notifier.c, hmm_range_fault
// and its pfn flags as mm/hmm.c, the DMA mapping of HMM pfns, and a device page table that
// never uses a stale translation (a property test against a reference model).
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "physr/mem.hpp"
#include "support/dma_world.hpp"
#include "support/p2p_chunk_source.hpp"

namespace physr::mem {
namespace {

using physr::testing::DmaWorld;
using physr::testing::TestChunkSource;

constexpr PhysSpan kRam{PhysAddr(1 * GiB), 256 * MiB};
constexpr uint64_t kBase = 0x10000000;
constexpr ProtFlags kRW = ProtFlags(Prot::read) | Prot::write;

template <class T>
void expect_error(const Result<T>& r, int code, const std::string& needle) {
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, code) << r.error().to_string();
  EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().to_string();
}
void expect_error(const Status& s, int code, const std::string& needle) {
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code, code) << s.error().to_string();
  EXPECT_NE(s.error().message.find(needle), std::string::npos) << s.error().to_string();
}

MmapOptions at(uint64_t addr, uint64_t len, ProtFlags prot = kRW, bool populate = true) {
  return MmapOptions{.addr = addr, .len = len, .prot = prot, .shared = true, .populate = populate};
}

struct Seen {
  MmuNotifierRange range;
  uint64_t cur_seq = 0, subs_seq = 0;
};

class HmmTest : public ::testing::Test {
 protected:
  std::unique_ptr<HostMemory> mem = std::move(HostMemory::create(kRam, 7)).value();
  TestChunkSource gpu{PhysSpan{PhysAddr(DmaWorld::kGpuBar), 64 * MiB}, 5, "gpu"};
  std::unique_ptr<AddressSpace> as = std::make_unique<AddressSpace>(*mem);
  std::vector<Seen> seen;

  // A notifier that records every call and sets the sequence, as a driver must.
  std::unique_ptr<MmuIntervalNotifier> notifier(uint64_t start, uint64_t len) {
    auto n = MmuIntervalNotifier::insert(*as, start, len, [this](MmuIntervalNotifier& sub, const MmuNotifierRange& r, uint64_t seq) {
      seen.push_back({r, seq, as->notifiers()->invalidate_seq()});
      sub.set_seq(seq);
      return true;
    });
    EXPECT_TRUE(n.has_value());
    return std::move(n).value();
  }

  // hmm_range_fault over [start, start + pages) with the given request.
  Status fault(MmuIntervalNotifier& n, uint64_t start, std::vector<uint64_t>& pfns, uint64_t default_flags = 0,
               uint64_t mask = 0, bool resolve_p2p = true) {
    HmmRange r{.notifier = &n, .notifier_seq = n.read_begin(), .start = start, .end = start + (pfns.size() << kPageShift),
               .hmm_pfns = pfns, .default_flags = default_flags, .pfn_flags_mask = mask, .resolve_p2p = resolve_p2p};
    return hmm_range_fault(r);
  }
};

// ---------------------------------------------------------------------------------------
// Interval notifiers (mm/mmu_notifier.c)

TEST_F(HmmTest, SequenceStartsAtTwoAndIsOddWhileAnInvalidationRuns) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 16 * 4096)).has_value());
  auto n = notifier(kBase, 16 * 4096);
  // mmu_notifier_register(): 2; __mmu_interval_notifier_insert(): the subscription's is one less.
  EXPECT_EQ(as->notifiers()->invalidate_seq(), 2u);
  const uint64_t seq = n->read_begin();
  EXPECT_EQ(seq, 1u);
  EXPECT_FALSE(n->read_retry(seq));
  ASSERT_TRUE(as->munmap(kBase, 4096).has_value());
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].cur_seq, 3u);   // mn_itree_inv_start_range(): seq |= 1
  EXPECT_EQ(seen[0].subs_seq, 3u);  // odd during the callback
  EXPECT_EQ(as->notifiers()->invalidate_seq(), 4u);  // mn_itree_inv_end(): even again
  EXPECT_TRUE(n->read_retry(seq));
  EXPECT_EQ(n->read_begin(), 3u);
}

TEST_F(HmmTest, InvalidationsMissingTheSpanLeaveTheSequenceEven) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 32 * 4096)).has_value());
  auto n = notifier(kBase, 16 * 4096);
  ASSERT_TRUE(as->munmap(kBase + 16 * 4096, 4096).has_value());
  EXPECT_TRUE(seen.empty());
  EXPECT_EQ(as->notifiers()->invalidate_seq(), 2u);
  EXPECT_FALSE(n->read_retry(n->read_begin()));
  // do_vmi_munmap() returns before unmap_vmas() when nothing is mapped: no notification.
  ASSERT_TRUE(as->munmap(kBase + 64 * 4096, 4096).has_value());
  EXPECT_TRUE(seen.empty());
}

TEST_F(HmmTest, EveryMutationNotifiesItsEventAndRange) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 16 * 4096)).has_value());
  ASSERT_TRUE(as->mmap_p2p(gpu, at(kBase + 32 * 4096, 8 * 4096)).has_value());
  auto n = notifier(kBase, 64 * 4096);
  ASSERT_TRUE(as->mprotect(kBase, 4 * 4096, ProtFlags(Prot::read)).has_value());
  ASSERT_EQ(as->migrate(kBase + 4 * 4096, 2 * 4096).value(), 2u);
  ASSERT_TRUE(as->munmap(kBase + 8 * 4096, 100).has_value());
  ASSERT_EQ(as->revoke_p2p(PhysSpan{PhysAddr(DmaWorld::kGpuBar), 4096}).value(), 1u);
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[0].range.event, MmuNotifyEvent::protection_vma);
  EXPECT_EQ(seen[0].range.start, kBase);
  EXPECT_EQ(seen[0].range.end, kBase + 4 * 4096);
  EXPECT_EQ(seen[1].range.event, MmuNotifyEvent::migrate);
  EXPECT_EQ(seen[1].range.start, kBase + 4 * 4096);
  EXPECT_EQ(seen[2].range.event, MmuNotifyEvent::unmap);
  EXPECT_EQ(seen[2].range.end, kBase + 9 * 4096);  // the length rounds up to a page
  EXPECT_EQ(seen[3].range.event, MmuNotifyEvent::p2p_revoke);
  EXPECT_EQ(seen[3].range.start, kBase + 32 * 4096);
  EXPECT_EQ(seen[3].range.end, kBase + 40 * 4096);
  EXPECT_FALSE(as->find_vma(kBase + 32 * 4096).has_value());
  EXPECT_EQ(gpu.live_chunks(), 0u);  // revoked and released
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::p2p_revoke), "p2p_revoke");
  EXPECT_EQ(static_cast<int>(MmuNotifyEvent::migrate), 6);  // enum mmu_notifier_event
}

TEST_F(HmmTest, InsertChecksItsArguments) {
  expect_error(MmuIntervalNotifier::insert(*as, kBase, 0, [](auto&, auto&, uint64_t) { return true; }), EOVERFLOW, "empty or wraps");
  expect_error(MmuIntervalNotifier::insert(*as, ~uint64_t{0} - 4095, 8192, [](auto&, auto&, uint64_t) { return true; }), EOVERFLOW,
               "wraps");
  expect_error(MmuIntervalNotifier::insert(*as, kBase, 4096, nullptr), EINVAL, "no invalidate callback");
}

TEST_F(HmmTest, InsertDuringAnInvalidationIsDeferredToItsEnd) {
  auto a = notifier(kBase, 4096);
  MmuNotifierSubscriptions& subs = *as->notifiers();
  subs.invalidate_start({kBase, kBase + 4096, MmuNotifyEvent::clear});
  EXPECT_EQ(subs.invalidate_seq(), 3u);
  auto b = notifier(kBase, 4096);
  EXPECT_EQ(subs.notifiers(), 1u);  // on the deferred list
  EXPECT_TRUE(b->read_retry(1));
  subs.invalidate_end();
  EXPECT_EQ(subs.notifiers(), 2u);
  EXPECT_EQ(subs.invalidate_seq(), 4u);
  // A second range that hits nothing while another runs: the insert goes straight into the
  // tree but makes the sequence odd (__mmu_interval_notifier_insert()).
  subs.invalidate_start({kBase + 8192, kBase + 12288, MmuNotifyEvent::clear});
  EXPECT_EQ(subs.invalidate_seq(), 4u);
  auto c = notifier(kBase + 8192, 4096);
  EXPECT_EQ(subs.invalidate_seq(), 5u);
  EXPECT_EQ(subs.notifiers(), 3u);
  subs.invalidate_end();
  EXPECT_EQ(subs.invalidate_seq(), 6u);
  c->remove();
  b->remove();
  b->remove();  // a second remove does nothing
  EXPECT_EQ(subs.notifiers(), 1u);
}

TEST_F(HmmTest, RemoveDuringAnInvalidationWaitsForItsEnd) {
  auto a = notifier(kBase, 4096);
  MmuNotifierSubscriptions& subs = *as->notifiers();
  subs.invalidate_start({kBase, kBase + 4096, MmuNotifyEvent::clear});
  std::atomic<bool> ended{false}, saw_end{false};
  std::thread t([&] {
    a->remove();  // mmu_interval_notifier_remove(): waits on mmu_interval_seq_released()
    saw_end = ended.load();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ended = true;
  subs.invalidate_end();
  t.join();
  EXPECT_TRUE(saw_end.load());
  EXPECT_EQ(subs.notifiers(), 0u);
}

TEST_F(HmmTest, ReadBeginWaitsWhileAnInvalidationOfItsSpanRuns) {
  auto a = notifier(kBase, 4096);
  MmuNotifierSubscriptions& subs = *as->notifiers();
  subs.invalidate_start({kBase, kBase + 4096, MmuNotifyEvent::clear});  // a's callback set its seq to 3
  std::atomic<bool> ended{false};
  std::atomic<uint64_t> got{0};
  bool saw_end = false;
  std::thread t([&] {
    got = a->read_begin();
    saw_end = ended.load();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ended = true;
  subs.invalidate_end();
  t.join();
  EXPECT_TRUE(saw_end);
  EXPECT_EQ(got.load(), 3u);
  EXPECT_FALSE(a->read_retry(got));
}

// ---------------------------------------------------------------------------------------
// hmm_range_fault (mm/hmm.c)

TEST_F(HmmTest, PfnFlagsAreBitExact) {
  // include/linux/hmm.h enum hmm_pfn_flags with BITS_PER_LONG = 64.
  EXPECT_EQ(kHmmPfnValid, 0x8000000000000000ull);
  EXPECT_EQ(kHmmPfnWrite, 0x4000000000000000ull);
  EXPECT_EQ(kHmmPfnError, 0x2000000000000000ull);
  EXPECT_EQ(kHmmPfnDmaMapped, 0x1000000000000000ull);
  EXPECT_EQ(kHmmPfnP2pdma, 0x0800000000000000ull);
  EXPECT_EQ(kHmmPfnP2pdmaBus, 0x0400000000000000ull);
  EXPECT_EQ(kHmmPfnOrderShift, 53u);
  EXPECT_EQ(kHmmPfnReqFault, kHmmPfnValid);
  EXPECT_EQ(kHmmPfnReqWrite, kHmmPfnWrite);
  EXPECT_EQ(kHmmPfnFlags, 0xffe0000000000000ull);
  EXPECT_EQ(hmm_pfn_to_map_order(kHmmPfnValid | (uint64_t{9} << 53) | 0x1234), 9u);
  EXPECT_EQ(hmm_pfn_to_phys(kHmmPfnValid | kHmmPfnWrite | (uint64_t{9} << 53) | 0x1234).value(), 0x1234000u);
}

TEST_F(HmmTest, ResidentPagesAreReportedWithTheirPermission) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 8 * 4096)).has_value());
  ASSERT_TRUE(as->mmap_anon(at(kBase + 8 * 4096, 8 * 4096, ProtFlags(Prot::read))).has_value());
  auto n = notifier(kBase, 16 * 4096);
  std::vector<uint64_t> pfns(16, kHmmPfnDmaMapped);  // sticky: carried from input to output
  ASSERT_TRUE(fault(*n, kBase, pfns).has_value());
  for (size_t i = 0; i < 16; ++i) {
    const uint64_t va = kBase + i * 4096;
    EXPECT_EQ(hmm_pfn_to_phys(pfns[i]), *cpu_translate(*as, va)) << i;
    EXPECT_EQ(pfns[i] & kHmmPfnFlags, kHmmPfnValid | kHmmPfnDmaMapped | (i < 8 ? kHmmPfnWrite : 0)) << i;
  }
}

TEST_F(HmmTest, PmdMappedFoliosCarryOrderNine) {
  ASSERT_TRUE(as->mmap_anon({.addr = 0x40000000, .len = 4 * MiB, .order = kOrder2M}).has_value());
  ASSERT_TRUE(as->mmap_anon({.addr = 0x50001000, .len = 2 * MiB, .order = kOrder2M}).has_value());  // not PMD aligned
  auto n = notifier(0x40000000, 0x20000000);
  std::vector<uint64_t> pfns(1024);
  ASSERT_TRUE(fault(*n, 0x40000000, pfns).has_value());
  for (uint64_t p : pfns) EXPECT_EQ(hmm_pfn_to_map_order(p), 9u);  // pmd_to_hmm_pfn_flags()
  EXPECT_EQ(pfns[1] & ~kHmmPfnFlags, (pfns[0] & ~kHmmPfnFlags) + 1);
  std::vector<uint64_t> q(512);
  ASSERT_TRUE(fault(*n, 0x50001000, q).has_value());
  for (uint64_t p : q) EXPECT_EQ(hmm_pfn_to_map_order(p), 0u);  // mapped by PTEs
}

TEST_F(HmmTest, MissingPagesAreFaultedOnlyOnRequest) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 16 * 4096, kRW, false)).has_value());
  auto n = notifier(kBase, 16 * 4096);
  std::vector<uint64_t> pfns(16, kHmmPfnP2pdmaBus);
  ASSERT_TRUE(fault(*n, kBase, pfns).has_value());
  for (uint64_t p : pfns) EXPECT_EQ(p, kHmmPfnP2pdmaBus);  // pte_none: 0, sticky flags kept
  EXPECT_FALSE(cpu_translate(*as, kBase).has_value());
  // A per-page request (pfn_flags_mask) on page 3: hmm_vma_fault() faults from there to the
  // end of the PMD range, and the walk restarts there.
  std::vector<uint64_t> req(16, 0);
  req[3] = kHmmPfnReqFault;
  ASSERT_TRUE(fault(*n, kBase, req, 0, kHmmPfnReqFault).has_value());
  for (size_t i = 0; i < 16; ++i) EXPECT_EQ((req[i] & kHmmPfnValid) != 0, i >= 3) << i;
  EXPECT_FALSE(cpu_translate(*as, kBase + 2 * 4096).has_value());
  // default_flags faults everything, ignoring the entries when the mask is 0.
  std::vector<uint64_t> all(16, 0);
  ASSERT_TRUE(fault(*n, kBase, all, kHmmPfnReqFault | kHmmPfnReqWrite, 0).has_value());
  for (size_t i = 0; i < 16; ++i) EXPECT_EQ(all[i] & (kHmmPfnValid | kHmmPfnWrite), kHmmPfnValid | kHmmPfnWrite);
  EXPECT_EQ(hmm_pfn_to_phys(all[0]), *cpu_translate(*as, kBase));
  ASSERT_TRUE(as->munmap(kBase, 16 * 4096).has_value());
  EXPECT_EQ(mem->stats().folios, 0u);  // the faulted pages went with the VMA
}

TEST_F(HmmTest, WriteRequestsNeedAWritableVma) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 4 * 4096, ProtFlags(Prot::read))).has_value());
  auto n = notifier(kBase, 4 * 4096);
  std::vector<uint64_t> pfns(4, 0);
  // REQ_WRITE without REQ_FAULT asks nothing (hmm_pte_need_fault()).
  ASSERT_TRUE(fault(*n, kBase, pfns, kHmmPfnReqWrite).has_value());
  expect_error(fault(*n, kBase, pfns, kHmmPfnReqFault | kHmmPfnReqWrite), EPERM, "read-only");  // hmm_vma_fault()
}

TEST_F(HmmTest, HolesAndUnreadableVmasAreErrorsOrEfault) {
  ASSERT_TRUE(as->mmap_anon(at(kBase + 4 * 4096, 4 * 4096, ProtFlags{})).has_value());  // PROT_NONE
  auto n = notifier(kBase, 16 * 4096);
  std::vector<uint64_t> pfns(12, 0);
  ASSERT_TRUE(fault(*n, kBase, pfns).has_value());
  for (uint64_t p : pfns) EXPECT_EQ(p, kHmmPfnError);  // hmm_vma_walk_hole() with no vma; hmm_vma_walk_test()
  std::vector<uint64_t> one(4, 0);
  expect_error(fault(*n, kBase, one, kHmmPfnReqFault), EFAULT, "0x10000000 has no VMA");
  expect_error(fault(*n, kBase + 4 * 4096, one, kHmmPfnReqFault), EFAULT, "no read permission");
}

TEST_F(HmmTest, P2PVmasResolveThroughTheirChunkUnlessAskedForLinux) {
  ASSERT_TRUE(as->mmap_p2p(gpu, at(kBase, 4 * 4096)).has_value());
  auto n = notifier(kBase, 4 * 4096);
  std::vector<uint64_t> pfns(4, 0);
  ASSERT_TRUE(fault(*n, kBase, pfns, kHmmPfnReqFault).has_value());
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(hmm_pfn_to_phys(pfns[i]).value(), DmaWorld::kGpuBar + i * 4096);
    EXPECT_EQ(pfns[i] & kHmmPfnFlags, kHmmPfnValid | kHmmPfnWrite);
  }
  // Linux: the p2pmem VMA is VM_MIXEDMAP, which hmm_vma_walk_test() refuses.
  ASSERT_TRUE(fault(*n, kBase, pfns, 0, 0, false).has_value());
  for (uint64_t p : pfns) EXPECT_EQ(p, kHmmPfnError);
  expect_error(fault(*n, kBase, pfns, kHmmPfnReqFault, 0, false), EFAULT, "VM_MIXEDMAP");
}

TEST_F(HmmTest, AMovedSequenceIsEbusy) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 8 * 4096)).has_value());
  auto n = notifier(kBase, 8 * 4096);
  std::vector<uint64_t> pfns(8, 0);
  HmmRange r{.notifier = n.get(), .notifier_seq = n->read_begin(), .start = kBase, .end = kBase + 8 * 4096, .hmm_pfns = pfns};
  ASSERT_TRUE(as->migrate(kBase, 4096).has_value());
  expect_error(hmm_range_fault(r), EBUSY, "invalidated since read_begin()");
  r.notifier_seq = n->read_begin();
  EXPECT_TRUE(hmm_range_fault(r).has_value());
}

TEST_F(HmmTest, BadInputIsRefusedWithClearErrors) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 8 * 4096)).has_value());
  auto n = notifier(kBase, 8 * 4096);
  std::vector<uint64_t> pfns(8, 0);
  HmmRange r{.notifier = n.get(), .notifier_seq = n->read_begin(), .start = kBase + 1, .end = kBase + 8 * 4096, .hmm_pfns = pfns};
  expect_error(hmm_range_fault(r), EINVAL, "whole 4 KiB pages");
  r.start = kBase;
  r.end = kBase + 9 * 4096;
  expect_error(hmm_range_fault(r), EINVAL, "outside the notifier's");
  r.end = kBase + 4 * 4096;
  expect_error(hmm_range_fault(r), EINVAL, "8 pfn entries for 4 pages");
  r.notifier = nullptr;
  expect_error(hmm_range_fault(r), EINVAL, "no notifier");
  r.notifier = n.get();
  r.end = kBase + 8 * 4096;
  n->remove();
  expect_error(hmm_range_fault(r), EINVAL, "removed");
}

TEST_F(HmmTest, RangeListFormMergesPerProviderOnly) {
  // Two providers whose BARs touch: a 16 KiB chunk at the end of one, one at the start of
  // the next; the pfns run on across the boundary, the list must not.
  TestChunkSource a{PhysSpan{PhysAddr(0x2000000000), 16 * 1024}, 3, "a"};
  TestChunkSource b{PhysSpan{PhysAddr(0x2000004000), 16 * 1024}, 4, "b"};
  ASSERT_TRUE(as->mmap_anon({.addr = kBase, .len = 2 * MiB, .order = kOrder2M}).has_value());
  ASSERT_TRUE(as->mmap_p2p(a, at(kBase + 2 * MiB, 16 * 1024)).has_value());
  ASSERT_TRUE(as->mmap_p2p(b, at(kBase + 2 * MiB + 16 * 1024, 16 * 1024)).has_value());
  auto n = notifier(kBase, 4 * MiB);
  std::vector<uint64_t> pfns(512 + 8, 0);
  ASSERT_TRUE(fault(*n, kBase, pfns).has_value());
  auto list = hmm_pfns_to_ranges(*as, pfns, kBase);
  ASSERT_TRUE(list.has_value()) << list.error().to_string();
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].size, 2 * MiB);
  EXPECT_EQ((*list)[0].provider, kHostMemory);
  EXPECT_EQ((*list)[1].base.value(), 0x2000000000u);
  EXPECT_EQ((*list)[1].provider, 3u);
  EXPECT_EQ((*list)[2].base.value(), 0x2000004000u);
  EXPECT_EQ((*list)[2].provider, 4u);
  pfns[5] = 0;
  expect_error(hmm_pfns_to_ranges(*as, pfns, kBase), EFAULT, "0x10005000 has no HMM_PFN_VALID");
  ASSERT_TRUE(as->munmap(kBase, 4 * MiB).has_value());  // before the sources go
}

TEST_F(HmmTest, MprotectSplitsAndRefusesHoles) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 8 * 4096)).has_value());
  expect_error(as->mprotect(kBase + 1, 4096, ProtFlags(Prot::read)), EINVAL, "not 4 KiB aligned");
  expect_error(as->mprotect(kBase + 4 * 4096, 8 * 4096, ProtFlags(Prot::read)), ENOMEM, "0x10008000 is not mapped");
  EXPECT_EQ(as->find_vma(kBase + 4 * 4096)->prot, kRW);  // nothing changed
  EXPECT_TRUE(as->mprotect(kBase, 0, ProtFlags{}).has_value());
  ASSERT_TRUE(as->mprotect(kBase + 2 * 4096, 4096, ProtFlags(Prot::read)).has_value());
  EXPECT_EQ(as->vmas().size(), 3u);
  EXPECT_EQ(as->find_vma(kBase + 2 * 4096)->prot, ProtFlags(Prot::read));
  EXPECT_EQ(as->find_vma(kBase + 3 * 4096)->prot, kRW);
}

TEST_F(HmmTest, MigrationMovesUnpinnedPagesOnly) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 4 * 4096)).has_value());
  const PhysAddr before0 = *cpu_translate(*as, kBase), before1 = *cpu_translate(*as, kBase + 4096);
  auto pin = as->pin(kBase + 4096, 4096, {});
  ASSERT_TRUE(pin.has_value());
  EXPECT_EQ(as->migrate(kBase, 2 * 4096).value(), 1u);
  EXPECT_NE(*cpu_translate(*as, kBase), before0);
  EXPECT_EQ(*cpu_translate(*as, kBase + 4096), before1);  // pinned: folio_maybe_dma_pinned()
  ASSERT_TRUE(as->unpin(std::move(*pin)).has_value());
  expect_error(as->migrate(kBase, 0), EINVAL, "length 0");
}

TEST_F(HmmTest, PinFaultsMissingPagesIn) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 4 * 4096, kRW, false)).has_value());
  EXPECT_EQ(as->pins_at(kBase), 0u);
  auto p = as->pin(kBase, 4 * 4096, {});
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->pages(), 4u);
  EXPECT_TRUE(cpu_translate(*as, kBase).has_value());
  ASSERT_TRUE(as->unpin(std::move(*p)).has_value());
  expect_error(as->mmap_anon({.addr = kBase + MiB, .len = 2 * MiB, .order = kOrder2M, .populate = false}), EINVAL,
               "only 4 KiB");
}

// ---------------------------------------------------------------------------------------
// DMA mapping of HMM pfns and the device page table

class HmmMirrorTest : public HmmTest {
 protected:
  DmaWorld world;
  TestChunkSource gpu_src{PhysSpan{PhysAddr(DmaWorld::kGpuBar), 64 * MiB}, world.gpu, "gpu"};  // bus address for nvme
  TestChunkSource nic_src{PhysSpan{PhysAddr(DmaWorld::kNicBar), 8 * MiB}, world.nic, "nic"};   // through the host bridge
  TestChunkSource far_src{PhysSpan{PhysAddr(DmaWorld::kFarBar), 8 * MiB}, world.far, "far"};   // not supported
  DmaDeviceConfig cfg{.function = world.f_nvme};
  std::unique_ptr<DmaDevice> dev = world.device(cfg);

  std::unique_ptr<HmmMirror> mirror(uint64_t start, uint64_t len, HmmMirrorOptions o = {}) {
    o.start = start;
    o.len = len;
    auto m = HmmMirror::create(*as, *dev, o);
    EXPECT_TRUE(m.has_value()) << m.error().to_string();
    return std::move(m).value();
  }
  // Where the device's access really lands.
  PhysAddr reach(const DeviceTranslation& t, bool write) {
    uint64_t run = 0;
    auto p = world.reach(cfg, t.seg, t.dma.value(), write, &run);
    EXPECT_TRUE(p.has_value());
    return p.value_or(PhysAddr(0));
  }
};

TEST_F(HmmMirrorTest, AnAccessFaultsOnceThenHits) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 64 * 4096, kRW, false)).has_value());
  auto m = mirror(kBase, 64 * 4096);
  EXPECT_FALSE(m->lookup(kBase + 5 * 4096 + 12, false).has_value());
  auto t = m->access(kBase + 5 * 4096 + 12, true);
  ASSERT_TRUE(t.has_value()) << t.error().to_string();
  EXPECT_EQ(reach(*t, true), *cpu_translate(*as, kBase + 5 * 4096 + 12));
  EXPECT_EQ(m->stats().faults, 1u);
  ASSERT_TRUE(m->access(kBase + 5 * 4096, false).has_value());
  ASSERT_TRUE(m->access(kBase + 15 * 4096, false).has_value());  // the fault window (16 pages) holds it
  EXPECT_EQ(m->stats().faults, 1u);
  // hmm_vma_fault() faults from the faulting page to the end of the walk: pages 5-15.
  EXPECT_EQ(m->stats().mapped_pages, 11u);
  EXPECT_EQ(dev->stats().live_mappings, 11u);
  m.reset();
  EXPECT_EQ(dev->stats().live_mappings, 0u);  // nothing leaked
}

TEST_F(HmmMirrorTest, P2PPagesMapAsHmmDmaMapPfnDoes) {
  ASSERT_TRUE(as->mmap_p2p(gpu_src, at(kBase, 4 * 4096)).has_value());
  ASSERT_TRUE(as->mmap_p2p(nic_src, at(kBase + 4 * 4096, 4 * 4096)).has_value());
  ASSERT_TRUE(as->mmap_p2p(far_src, at(kBase + 8 * 4096, 4 * 4096)).has_value());
  auto m = mirror(kBase, 12 * 4096, {.fault_pages = 1});
  auto bus = m->access(kBase + 100, true);
  ASSERT_TRUE(bus.has_value()) << bus.error().to_string();
  EXPECT_EQ(bus->hmm_pfn & (kHmmPfnP2pdmaBus | kHmmPfnDmaMapped | kHmmPfnP2pdma), kHmmPfnP2pdmaBus | kHmmPfnDmaMapped);
  EXPECT_EQ(bus->dma.value(), DmaWorld::kGpuBar + DmaWorld::kGpuBusOffset + 100);  // pci_p2pdma_bus_addr_map()
  EXPECT_EQ(dev->stats().live_mappings, 0u);  // a bus address holds no mapping
  auto mmio = m->access(kBase + 4 * 4096, false);
  ASSERT_TRUE(mmio.has_value()) << mmio.error().to_string();
  EXPECT_EQ(mmio->hmm_pfn & (kHmmPfnP2pdmaBus | kHmmPfnP2pdma), kHmmPfnP2pdma);
  EXPECT_TRUE(mmio->seg & kDmaSegMmio);  // DMA_ATTR_MMIO
  EXPECT_EQ(reach(*mmio, false).value(), DmaWorld::kNicBar);
  expect_error(m->access(kBase + 8 * 4096, false), EREMOTEIO, "hmm_dma_map_pfn");
  EXPECT_FALSE(m->lookup(kBase + 8 * 4096, false).has_value());
  ASSERT_TRUE(as->munmap(kBase, 12 * 4096).has_value());  // bus entries are skipped at unmap
  EXPECT_FALSE(m->lookup(kBase + 100, false).has_value());
  EXPECT_EQ(dev->stats().live_mappings, 0u);
  EXPECT_EQ(m->stats().mapped_pages, 0u);
}

TEST_F(HmmMirrorTest, InvalidationsDropEntriesAndLaterAccessesSeeTheNewMemory) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 16 * 4096)).has_value());
  auto m = mirror(kBase, 16 * 4096);
  const PhysAddr p0 = reach(*m->access(kBase, true), true);
  ASSERT_TRUE(as->migrate(kBase, 4096).has_value());
  EXPECT_FALSE(m->lookup(kBase, false).has_value());
  const PhysAddr p1 = reach(*m->access(kBase, true), true);
  EXPECT_NE(p0, p1);
  EXPECT_EQ(p1, *cpu_translate(*as, kBase));
  ASSERT_TRUE(as->mprotect(kBase, 16 * 4096, ProtFlags(Prot::read)).has_value());
  EXPECT_FALSE(m->lookup(kBase, false).has_value());
  expect_error(m->access(kBase, true), EPERM, "read-only");
  EXPECT_TRUE(m->access(kBase, false).has_value());
  ASSERT_TRUE(as->munmap(kBase, 16 * 4096).has_value());
  expect_error(m->access(kBase, false), EFAULT, "has no VMA");
  ASSERT_TRUE(as->mmap_anon(at(kBase, 16 * 4096)).has_value());
  auto t = m->access(kBase + 4096, false);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(reach(*t, false), *cpu_translate(*as, kBase + 4096));
  expect_error(m->access(kBase + 16 * 4096, false), EFAULT, "outside the mirror");
}

TEST_F(HmmMirrorTest, RevokedP2PMemoryIsNeverReachedAgain) {
  ASSERT_TRUE(as->mmap_p2p(nic_src, at(kBase, 4 * 4096)).has_value());
  auto m = mirror(kBase, 4 * 4096);
  ASSERT_TRUE(m->access(kBase, true).has_value());
  EXPECT_EQ(dev->stats().live_mappings, 4u);
  ASSERT_EQ(as->revoke_p2p(PhysSpan{PhysAddr(DmaWorld::kNicBar), 4096}).value(), 1u);
  EXPECT_EQ(dev->stats().live_mappings, 0u);
  EXPECT_EQ(nic_src.live_chunks(), 0u);
  expect_error(m->access(kBase, false), EFAULT, "has no VMA");
}

// A sequence that never settles (ROCm issue 6523: a stale notifier_seq made the driver spin
// 1000 ms per retry): the fault gives up with EBUSY after a bounded number of retries.
TEST_F(HmmMirrorTest, ASequenceThatNeverSettlesIsEbusyAfterBoundedRetries) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 4 * 4096)).has_value());
  bool ro = false;
  HmmMirrorOptions o{.max_retries = 20, .retry_timeout = std::chrono::milliseconds(600000)};
  o.after_walk = [&](uint64_t) {  // every attempt is invalidated before it can commit
    ro = !ro;
    ASSERT_TRUE(as->mprotect(kBase, 4 * 4096, ro ? ProtFlags(Prot::read) : kRW).has_value());
  };
  auto m = mirror(kBase, 4 * 4096, o);
  expect_error(m->access(kBase, false), EBUSY, "did not settle after 21 retries (limits: 20 retries, 600000 ms)");
  EXPECT_EQ(m->stats().retries, 21u);
  EXPECT_EQ(m->stats().mapped_pages, 0u);
  EXPECT_FALSE(m->lookup(kBase, false).has_value());
  EXPECT_EQ(dev->stats().live_mappings, 0u);
}

TEST_F(HmmMirrorTest, ANotifierRemovedDuringAFaultLeavesNothingMapped) {
  ASSERT_TRUE(as->mmap_anon(at(kBase, 4 * 4096)).has_value());
  HmmMirror* self = nullptr;
  HmmMirrorOptions o;
  o.after_walk = [&](uint64_t) { self->detach(); };
  auto m = mirror(kBase, 4 * 4096, o);
  self = m.get();
  expect_error(m->access(kBase, false), ENODEV, "detached during the fault");
  EXPECT_FALSE(m->notifier().inserted());
  EXPECT_EQ(as->notifiers()->notifiers(), 0u);
  EXPECT_EQ(dev->stats().live_mappings, 0u);
  expect_error(m->access(kBase, false), ENODEV, "detached");
}

TEST_F(HmmMirrorTest, CreateChecksItsSpan) {
  expect_error(HmmMirror::create(*as, *dev, {.start = kBase + 1, .len = 4096}), EINVAL, "whole pages");
  expect_error(HmmMirror::create(*as, *dev, {.start = kBase, .len = 0}), EINVAL, "whole pages");
  expect_error(HmmMirror::create(*as, *dev, {.start = kBase, .len = 4096, .fault_pages = 0}), EINVAL, "fault_pages 0");
  EXPECT_EQ(as->notifiers(), nullptr);
}

TEST_F(HmmMirrorTest, HmmDmaMapPfnRefusesInvalidEntries) {
  HmmDmaMap map;
  expect_error(hmm_dma_map_alloc(map, 0), EINVAL, "no entries");
  ASSERT_TRUE(hmm_dma_map_alloc(map, 2).has_value());
  expect_error(hmm_dma_map_pfn(*dev, map, 0), EINVAL, "not HMM_PFN_VALID");
  expect_error(hmm_dma_map_pfn(*dev, map, 2), EINVAL, "entry 2 of 2");
  EXPECT_FALSE(hmm_dma_unmap_pfn(*dev, map, 0).value());
  map.pfn_list[1] = kHmmPfnValid | (kRam.base.value() >> kPageShift);
  auto a = hmm_dma_map_pfn(*dev, map, 1);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(hmm_dma_map_pfn(*dev, map, 1).value(), *a);  // mapped already: the same address
  EXPECT_EQ(dev->stats().live_mappings, 1u);
  EXPECT_TRUE(hmm_dma_unmap_pfn(*dev, map, 1).value());
  EXPECT_EQ(map.pfn_list[1] & kHmmPfnDmaMapped, 0u);
  EXPECT_EQ(dev->stats().live_mappings, 0u);
}

// The property: random munmap / mmap / mprotect / migrate / revocation interleaved with
// device accesses. Every access's outcome matches a model of the VMAs, every translation
// reaches the page the CPU maps now, and after every step no entry the device still holds
// points anywhere but there.
TEST_F(HmmMirrorTest, NoStaleAccessUnderRandomChanges) {
  constexpr uint64_t kPages = 64;
  for (uint64_t seed = 1; seed <= 12; ++seed) {
    std::mt19937_64 rng(seed);
    struct Page {
      bool mapped = false;
      bool p2p = false;
      ProtFlags prot;
      int chunk = 0;  // which mmap made it (a P2P VMA's chunk)
    };
    int mmaps = 0;
    std::vector<Page> model(kPages);
    DmaDeviceConfig c = cfg;
    if (seed % 2 == 0) c.domain = world.domain.get();  // behind the IOMMU too
    auto d = world.device(c);
    cfg = c;
    auto m = HmmMirror::create(*as, *d, {.start = kBase, .len = kPages * 4096, .fault_pages = 1u << (seed % 4)});
    ASSERT_TRUE(m.has_value());
    for (int step = 0; step < 300; ++step) {
      const uint64_t p = rng() % kPages, n = 1 + rng() % std::min<uint64_t>(8, kPages - p);
      const uint64_t va = kBase + p * 4096, len = n * 4096;
      switch (rng() % 7) {
        case 0: {  // munmap
          ASSERT_TRUE(as->munmap(va, len).has_value());
          for (uint64_t k = p; k < p + n; ++k) model[k] = {};
          break;
        }
        case 1: {  // mmap where free
          bool free = true;
          for (uint64_t k = p; k < p + n; ++k) free &= !model[k].mapped;
          if (!free) break;
          const bool p2p = rng() % 4 == 0;
          const ProtFlags prot = rng() % 3 == 0 ? ProtFlags(Prot::read) : kRW;
          auto r = p2p ? as->mmap_p2p(nic_src, at(va, len, prot)) : as->mmap_anon(at(va, len, prot, rng() % 2 == 0));
          ASSERT_TRUE(r.has_value()) << r.error().to_string();
          ++mmaps;
          for (uint64_t k = p; k < p + n; ++k) model[k] = {true, p2p, prot, mmaps};
          break;
        }
        case 2: {  // mprotect where mapped
          bool all = true;
          for (uint64_t k = p; k < p + n; ++k) all &= model[k].mapped;
          const ProtFlags prot = rng() % 2 ? ProtFlags(Prot::read) : kRW;
          Status st = as->mprotect(va, len, prot);
          ASSERT_EQ(st.has_value(), all);
          if (all)
            for (uint64_t k = p; k < p + n; ++k) model[k].prot = prot;
          break;
        }
        case 3:
          ASSERT_TRUE(as->migrate(va, len).has_value() || true);
          break;
        case 4: {  // revoke the chunk behind a P2P page
          if (!model[p].mapped || !model[p].p2p) break;
          // Every VMA still mapping the chunk goes (splits share it).
          const PhysAddr a = *cpu_translate(*as, va);
          ASSERT_TRUE(as->revoke_p2p(PhysSpan{a, 1}).has_value());
          const int chunk = model[p].chunk;
          for (auto& mp : model)
            if (mp.chunk == chunk) mp = {};
          break;
        }
        default: {  // device accesses
          for (int k = 0; k < 4; ++k) {
            const uint64_t q = rng() % kPages;
            const bool write = rng() % 2;
            const uint64_t a = kBase + q * 4096 + rng() % 4096;
            auto t = m.value()->access(a, write);
            const Page& mp = model[q];
            if (!mp.mapped) {
              ASSERT_FALSE(t.has_value());
              ASSERT_EQ(t.error().code, EFAULT) << t.error().to_string();
            } else if (write && !(mp.prot & Prot::write)) {
              ASSERT_FALSE(t.has_value());
              ASSERT_EQ(t.error().code, EPERM) << t.error().to_string();
            } else {
              ASSERT_TRUE(t.has_value()) << t.error().to_string();
              ASSERT_EQ(reach(*t, write), *cpu_translate(*as, a)) << "seed " << seed << " step " << step;
            }
          }
        }
      }
      // No stale entry anywhere.
      for (uint64_t q = 0; q < kPages; ++q) {
        const uint64_t a = kBase + q * 4096;
        if (auto t = m.value()->lookup(a, false)) {
          auto cpu = cpu_translate(*as, a);
          ASSERT_TRUE(cpu.has_value()) << "seed " << seed << " step " << step << ": an entry for an unmapped page";
          ASSERT_EQ(reach(*t, false), *cpu) << "seed " << seed << " step " << step << ": a stale entry";
          ASSERT_TRUE(!(t->hmm_pfn & kHmmPfnWrite) || (model[q].prot & Prot::write));
        }
      }
    }
    m.value().reset();
    EXPECT_EQ(d->stats().live_mappings, 0u);
    ASSERT_TRUE(as->munmap(kBase, kPages * 4096).has_value());
    EXPECT_EQ(nic_src.live_chunks(), 0u);
    EXPECT_EQ(mem->stats().folios, 0u);
  }
}

}  // namespace
}  // namespace physr::mem
