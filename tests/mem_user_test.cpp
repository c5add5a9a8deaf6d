// The mem module's address spaces, pinning and block layer: every kernel rule with its
// errno, and a property test of random mmap/munmap/pin/unpin against a reference model.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "physr/mem.hpp"
#include "support/p2p_chunk_source.hpp"

namespace physr::mem {
namespace {

using physr::testing::TestChunkSource;

constexpr PhysSpan kRam{PhysAddr(1 * GiB), 256 * MiB};
constexpr PhysSpan kBar{PhysAddr(0x2000000000), 64 * MiB};
constexpr ProviderId kGpu = 7;

MmapOptions at(uint64_t addr, uint64_t len, bool shared = true) {
  return MmapOptions{.addr = addr, .len = len, .shared = shared};
}

class MemUserTest : public ::testing::Test {
 protected:
  std::unique_ptr<HostMemory> mem = std::move(HostMemory::create(kRam, 42)).value();
  TestChunkSource gpu{kBar, kGpu, "0000:03:00.0"};
  std::unique_ptr<AddressSpace> as = std::make_unique<AddressSpace>(*mem);

  void expect_error(const Status& s, int code, const std::string& needle) {
    ASSERT_FALSE(s.has_value());
    EXPECT_EQ(s.error().code, code) << s.error().to_string();
    EXPECT_NE(s.error().message.find(needle), std::string::npos) << s.error().to_string();
  }
  template <class T>
  void expect_error(const Result<T>& r, int code, const std::string& needle) {
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, code) << r.error().to_string();
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().to_string();
  }
};

// ---------------------------------------------------------------------------------------
// Host memory

TEST_F(MemUserTest, HostMemoryRejectsUnalignedRegion) {
  expect_error(HostMemory::create(PhysSpan{PhysAddr(1 * GiB + 4096), 4 * MiB}), EINVAL, "2 MiB aligned");
}

TEST_F(MemUserTest, FourKPagesAreScatteredAndTwoMegFoliosContiguous) {
  auto a = *as->mmap_anon({.len = 64 * 4096});
  auto p = *as->pin(a, 64 * 4096, {});
  EXPECT_GT(p.ranges().size(), 32u);  // shuffled pages rarely touch
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
  auto b = *as->mmap_anon({.len = 8 * MiB, .order = kOrder2M});
  auto q = *as->pin(b, 8 * MiB, {});
  EXPECT_EQ(q.ranges().size(), 1u);  // four 2 MiB folios handed out in address order
  EXPECT_EQ(q.ranges()[0].size, 8 * MiB);
  EXPECT_TRUE(as->unpin(std::move(q)).has_value());
}

// ---------------------------------------------------------------------------------------
// mmap and munmap (mm/mmap.c do_mmap(), mm/vma.c do_vmi_munmap())

TEST_F(MemUserTest, MmapChecksLengthAddressAndOverlap) {
  expect_error(as->mmap_anon(at(0x10000000, 0)), EINVAL, "length 0");
  expect_error(as->mmap_anon(at(0x10000001, 4096)), EINVAL, "address 0x10000001 is not 4 KiB aligned");
  expect_error(as->mmap_anon(at(AddressSpace::kTaskSize - 4096, 8192)), ENOMEM, "runs past the top of user space");
  ASSERT_TRUE(as->mmap_anon(at(0x10000000, 16384)).has_value());
  // MAP_FIXED_NOREPLACE: an overlap is EEXIST naming the VMA in the way.
  expect_error(as->mmap_anon(at(0x10003000, 4096)), EEXIST, "overlaps the anonymous VMA [0x10000000, 0x10004000)");
  expect_error(as->mmap_p2p(gpu, at(0x0fffe000, 16384)), EEXIST, "[0x10000000, 0x10004000)");
  EXPECT_EQ(gpu.allocs, 0u);  // the generic checks come before the driver's
}

TEST_F(MemUserTest, MmapRoundsLengthUpAndPicksAGap) {
  auto a = *as->mmap_anon({.len = 100});
  EXPECT_EQ(a, AddressSpace::kMmapBase);
  EXPECT_EQ(as->find_vma(a)->end, a + 4096);  // do_mmap(): len = PAGE_ALIGN(len)
  auto b = *as->mmap_anon({.len = 4096});
  EXPECT_EQ(b, a + 4096);
}

TEST_F(MemUserTest, MunmapChecksAndSplits) {
  expect_error(as->munmap(0x10000010, 4096), EINVAL, "address 0x10000010 is not 4 KiB aligned");
  expect_error(as->munmap(0x10000000, 0), EINVAL, "length 0");
  expect_error(as->munmap(AddressSpace::kTaskSize, 8192), EINVAL, "runs past the top of user space");
  EXPECT_TRUE(as->munmap(0x10000000, 4096).has_value());  // nothing there: not an error
  const uint64_t a = *as->mmap_anon(at(0x10000000, 16 * 4096));
  const uint64_t before = mem->stats().free_pages;
  ASSERT_TRUE(as->munmap(a + 4 * 4096, 4 * 4096).has_value());
  EXPECT_EQ(mem->stats().free_pages, before + 4);
  auto v = as->vmas();
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].end, a + 4 * 4096);
  EXPECT_EQ(v[1].start, a + 8 * 4096);
  EXPECT_FALSE(as->find_vma(a + 5 * 4096));
}

TEST_F(MemUserTest, FileMappingsShareThePageCache) {
  auto file = std::move(HostFile::create(*mem, "data.bin", 1 * MiB)).value();
  expect_error(as->mmap_file(*file, {.len = 4096, .offset = 100}), EINVAL, "offset 0x64 is not 4 KiB aligned");
  expect_error(as->mmap_file(*file, {.len = 8192, .offset = 1 * MiB - 4096}), EINVAL, "runs past the file");
  const uint64_t a = *as->mmap_file(*file, {.len = 64 * KiB, .shared = true});
  const uint64_t b = *as->mmap_file(*file, {.len = 64 * KiB, .shared = true, .offset = 32 * KiB});
  EXPECT_EQ(file->cached_pages(), 24u);
  auto pa = *as->pin(a + 32 * KiB, 32 * KiB, {});
  auto pb = *as->pin(b, 32 * KiB, {});
  EXPECT_EQ(pa.ranges(), pb.ranges());  // the same file pages
  EXPECT_EQ(as->pins_at(a + 32 * KiB), 2u);
  ASSERT_TRUE(as->unpin(std::move(pa)).has_value());
  ASSERT_TRUE(as->unpin(std::move(pb)).has_value());
  ASSERT_TRUE(as->munmap(a, 64 * KiB).has_value());
  ASSERT_TRUE(as->munmap(b, 64 * KiB).has_value());
  EXPECT_EQ(file->cached_pages(), 24u);  // the page cache keeps them
  file.reset();
  EXPECT_EQ(mem->stats().free_pages, mem->stats().total_pages);
}

// ---------------------------------------------------------------------------------------
// P2P VMAs (drivers/pci/p2pdma.c p2pmem_alloc_mmap())

TEST_F(MemUserTest, P2pMmapRefusesPrivateMappings) {
  expect_error(as->mmap_p2p(gpu, at(0x10000000, 4096, /*shared=*/false)), EINVAL, "attempted private mapping");
  EXPECT_EQ(gpu.allocs, 0u);
}

TEST_F(MemUserTest, P2pMmapRefusesANonZeroOffset) {
  MmapOptions o = at(0x10000000, 4096);
  o.offset = 4096;
  expect_error(as->mmap_p2p(gpu, o), EINVAL, "non-zero offset 0x1000");
}

TEST_F(MemUserTest, P2pMmapWithoutP2pdmaIsEnodev) {
  gpu.p2pdma = false;
  expect_error(as->mmap_p2p(gpu, at(0x10000000, 4096)), ENODEV, "has no p2pdma");
}

TEST_F(MemUserTest, P2pMmapOfAnEmptyPoolIsEnomem) {
  ASSERT_TRUE(as->mmap_p2p(gpu, at(0x10000000, 64 * MiB)).has_value());
  expect_error(as->mmap_p2p(gpu, at(0x20000000, 4096)), ENOMEM, "p2pmem mmap of 0000:03:00.0");
  EXPECT_EQ(as->stats().vmas, 1u);  // nothing mapped on failure
}

TEST_F(MemUserTest, P2pMmapOfADyingPoolIsEnodev) {
  gpu.dying = true;
  expect_error(as->mmap_p2p(gpu, at(0x10000000, 4096)), ENODEV, "dying");
}

TEST_F(MemUserTest, MunmapReturnsP2pMemoryThroughRelease) {
  const uint64_t a = *as->mmap_p2p(gpu, at(0x10000000, 1 * MiB));
  ASSERT_EQ(gpu.live_chunks(), 1u);
  ASSERT_TRUE(as->munmap(a, 512 * KiB).has_value());
  EXPECT_EQ(gpu.live_chunks(), 1u);  // half of it is still mapped
  ASSERT_TRUE(as->munmap(a + 512 * KiB, 512 * KiB).has_value());
  EXPECT_EQ(gpu.live_chunks(), 0u);
  ASSERT_EQ(gpu.released.size(), 1u);
  EXPECT_EQ(gpu.released[0], (PhysSpan{kBar.base, 1 * MiB}));
}

// Linux: munmap drops the mapping's page references, a pin holds its own, and
// p2pdma_page_free() gives a page back only when its last reference goes.
TEST_F(MemUserTest, MunmapOfAPinnedP2pVmaKeepsTheMemoryUntilUnpin) {
  const uint64_t a = *as->mmap_p2p(gpu, at(0x10000000, 1 * MiB));
  auto p = *as->pin(a + 4096, 8192, Foll::pci_p2pdma);
  ASSERT_TRUE(as->munmap(a, 1 * MiB).has_value());
  EXPECT_EQ(gpu.live_chunks(), 1u);
  EXPECT_EQ(as->stats().p2p_chunks_unmapped, 1u);
  EXPECT_FALSE(as->find_vma(a));
  expect_error(as->pin(a, 4096, Foll::pci_p2pdma), EFAULT, "not mapped");
  ASSERT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_EQ(gpu.live_chunks(), 0u);
  EXPECT_EQ(gpu.released.size(), 1u);
}

// ---------------------------------------------------------------------------------------
// Pinning (mm/gup.c)

TEST_F(MemUserTest, PinOfP2pMemoryNeedsFollPciP2pdma) {
  const uint64_t h = *as->mmap_anon(at(0x10000000, 8192));
  const uint64_t g = *as->mmap_p2p(gpu, at(0x10002000, 8192));
  ASSERT_EQ(g, h + 8192);
  // try_grab_folio(): EREMOTEIO for a P2P page without FOLL_PCI_P2PDMA, naming the address.
  expect_error(as->pin(h, 16384, Foll::write), EREMOTEIO, "address 0x10002000 is P2P memory of provider 7");
  EXPECT_EQ(mem->stats().pinned_pages, 0u);  // all or nothing
  EXPECT_EQ(as->pins_at(h), 0u);
  auto p = *as->pin(h, 16384, Foll::pci_p2pdma);
  ASSERT_EQ(p.ranges().size(), 3u);  // two scattered host pages, one P2P range
  EXPECT_EQ(p.ranges()[2], (PhysRange{kBar.base, 8192, kGpu}));
  EXPECT_EQ(p.pages(), 4u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, PinNeverMergesAcrossProviders) {
  TestChunkSource other{PhysSpan{kBar.base + kBar.size, 64 * MiB}, kGpu + 1, "0000:04:00.0"};
  const uint64_t a = *as->mmap_p2p(gpu, at(0x10000000, 64 * MiB));
  const uint64_t b = *as->mmap_p2p(other, at(a + 64 * MiB, 4096));
  // Physically contiguous across the two BARs, but different pgmaps
  // (zone_device_pages_have_same_pgmap()): two ranges.
  auto p = *as->pin(a + 64 * MiB - 4096, 8192, Foll::pci_p2pdma);
  ASSERT_EQ(p.ranges().size(), 2u);
  EXPECT_EQ(p.ranges()[0].provider, kGpu);
  EXPECT_EQ(p.ranges()[1].provider, kGpu + 1);
  EXPECT_EQ(p.ranges()[0].base + 4096, p.ranges()[1].base);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_TRUE(as->munmap(b, 4096).has_value());
}

TEST_F(MemUserTest, PinOverAHoleIsEfaultNamingTheAddress) {
  const uint64_t a = *as->mmap_anon(at(0x10000000, 8192));
  ASSERT_TRUE(as->mmap_anon(at(0x10004000, 8192)).has_value());
  expect_error(as->pin(a, 0x6000, {}), EFAULT, "address 0x10002000 is not mapped");
  expect_error(as->pin(0x0fff0000, 0x100, {}), EFAULT, "address 0xfff0000 is not mapped");
  expect_error(as->pin(a, 0, {}), EINVAL, "length 0");
  EXPECT_EQ(mem->stats().pinned_pages, 0u);
  EXPECT_EQ(as->stats().live_pins, 0u);
}

TEST_F(MemUserTest, PinForWriteOfAReadOnlyVmaIsEfault) {
  const uint64_t a = *as->mmap_anon({.addr = 0x10000000, .len = 4096, .prot = Prot::read});
  expect_error(as->pin(a, 4096, Foll::write), EFAULT, "is not writable");
  auto p = *as->pin(a, 4096, {});
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, PinHoldsExactlyTheBytes) {
  const uint64_t a = *as->mmap_anon(at(0x10000000, 4 * MiB, true));
  auto whole = *as->pin(a, 4 * MiB, {});
  auto p = *as->pin(a + 100, 3 * 4096, {});  // touches four pages
  EXPECT_EQ(p.ranges().total_bytes(), 3 * 4096u);
  EXPECT_EQ(p.pages(), 4u);
  EXPECT_EQ(p.ranges()[0].base, whole.ranges()[0].base + 100);
  EXPECT_EQ(as->pins_at(a), 2u);
  EXPECT_EQ(as->pins_at(a + 4 * 4096), 1u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_EQ(as->pins_at(a), 1u);
  EXPECT_TRUE(as->unpin(std::move(whole)).has_value());
  EXPECT_EQ(mem->stats().pinned_pages, 0u);
}

TEST_F(MemUserTest, PinsOfLargeFoliosCountAtTheFolio) {
  const uint64_t a = *as->mmap_anon({.addr = 0x40000000, .len = 4 * MiB, .order = kOrder2M});
  auto p = *as->pin(a + 1 * MiB, 2 * MiB, {});  // half of each folio
  EXPECT_EQ(as->pins_at(a), 256u);
  EXPECT_EQ(as->pins_at(a + 3 * MiB), 256u);
  EXPECT_EQ(mem->stats().pinned_pages, 512u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_EQ(as->pins_at(a), 0u);
}

TEST_F(MemUserTest, MunmapOfPinnedHostMemoryFreesItAtUnpin) {
  const uint64_t a = *as->mmap_anon(at(0x10000000, 64 * KiB));
  auto p = *as->pin(a, 64 * KiB, Foll::write);
  const uint64_t free_before = mem->stats().free_pages;
  ASSERT_TRUE(as->munmap(a, 64 * KiB).has_value());
  EXPECT_EQ(mem->stats().free_pages, free_before);
  ASSERT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_EQ(mem->stats().free_pages, free_before + 16);
}

TEST_F(MemUserTest, UnpinRefusesEmptyAndForeignPins) {
  expect_error(as->unpin(Pinned()), EINVAL, "an empty Pinned");
  const uint64_t mine = *as->mmap_anon({.len = 4096});
  Pinned first = *as->pin(mine, 4096, {});
  Pinned second = std::move(first);
  EXPECT_TRUE(first.empty());  // NOLINT: a moved-from Pinned is empty, and unpinning it is refused
  expect_error(as->unpin(std::move(first)), EINVAL, "an empty Pinned");
  ASSERT_TRUE(as->unpin(std::move(second)).has_value());
  AddressSpace other(*mem);
  const uint64_t a = *other.mmap_anon({.len = 4096});
  auto p = *other.pin(a, 4096, {});
  expect_error(as->unpin(std::move(p)), EINVAL, "is not live in this address space");
  ASSERT_TRUE(other.unpin(std::move(p)).has_value());
}

// ---------------------------------------------------------------------------------------
// Block layer (block/)

Queue nvme_queue(bool p2p, QueueLimits l = Queue::nvme_limits()) { return std::move(Queue::nvme("nvme0n1", p2p, l)).value(); }

TEST_F(MemUserTest, QueueLimitsAreValidated) {
  expect_error(Queue::create("q", QueueLimits{.logical_block_size = 1000}), EINVAL, "logical_block_size 1000");
  expect_error(Queue::create("q", QueueLimits{.max_segment_size = 512}), EINVAL, "max_segment_size 512");
  expect_error(Queue::create("q", QueueLimits{.seg_boundary_mask = 0x1000}), EINVAL, "seg_boundary_mask 0x1000");
  expect_error(Queue::create("q", QueueLimits{.max_segments = 0}), EINVAL, "max_segments is 0");
}

// drivers/nvme/host/core.c: BLK_FEAT_PCI_P2PDMA iff the controller supports it.
TEST_F(MemUserTest, NvmeQueuesCarryThePciP2pdmaFeature) {
  EXPECT_TRUE(nvme_queue(true).pci_p2pdma());
  EXPECT_FALSE(nvme_queue(false).pci_p2pdma());
  EXPECT_FALSE(std::move(Queue::create("sda", {})).value().pci_p2pdma());
}

TEST_F(MemUserTest, DirectIoIntoP2pMemoryWithoutTheFeatureIsEremoteio) {
  const uint64_t g = *as->mmap_p2p(gpu, at(0x10000000, 1 * MiB));
  size_t calls = 0;
  auto driver = [&](const Request&, const RangeList&) -> Status { ++calls; return {}; };
  // block/bio.c bio_iov_iter_get_pages(): no ITER_ALLOW_P2PDMA -> no FOLL_PCI_P2PDMA ->
  // try_grab_folio() EREMOTEIO.
  expect_error(direct_io(*as, nvme_queue(false), BlockOp::read, g, 64 * KiB, 0, driver), EREMOTEIO,
               "O_DIRECT read of nvme0n1: pin: address 0x10000000 is P2P memory");
  EXPECT_EQ(calls, 0u);
  auto st = direct_io(*as, nvme_queue(true), BlockOp::read, g, 64 * KiB, 0, driver);
  ASSERT_TRUE(st.has_value()) << st.error().to_string();
  EXPECT_EQ(calls, 1u);
  EXPECT_EQ(as->stats().live_pins, 0u);  // unpinned after the I/O
  EXPECT_EQ(as->pins_at(g), 0u);
}

TEST_F(MemUserTest, DirectIoChecksAlignment) {
  const uint64_t a = *as->mmap_anon(at(0x10000000, 1 * MiB));
  auto driver = [](const Request&, const RangeList&) -> Status { return {}; };
  const Queue q = nvme_queue(true);
  expect_error(direct_io(*as, q, BlockOp::write, a, 1000, 0, driver), EINVAL, "length 0x3e8");
  expect_error(direct_io(*as, q, BlockOp::write, a + 2, 4096, 0, driver), EINVAL, "buffer address 0x10000002");
  EXPECT_TRUE(direct_io(*as, q, BlockOp::write, a + 4, 4096, 1, driver).has_value());  // dword aligned is enough
}

TEST_F(MemUserTest, BiosEndWhereTheProviderChanges) {
  const uint64_t h = *as->mmap_anon(at(0x10000000, 64 * KiB));
  ASSERT_TRUE(as->mmap_p2p(gpu, at(h + 64 * KiB, 64 * KiB)).has_value());
  const Queue q = nvme_queue(true);
  auto p = *as->pin(h, 128 * KiB, Foll::pci_p2pdma);
  auto bios = *build_bios(*as, p.ranges(), BlockOp::write, 100, q);
  ASSERT_EQ(bios.size(), 2u);
  EXPECT_EQ(bios[0].provider, kHostMemory);
  EXPECT_FALSE(bios[0].nomerge);
  EXPECT_EQ(bios[1].provider, kGpu);
  EXPECT_TRUE(bios[1].nomerge);  // a P2P bio is REQ_NOMERGE
  EXPECT_EQ(bios[1].sector, 100 + 128u);
  EXPECT_EQ(bios[1].vecs.size(), 16u);  // one vec per ZONE_DEVICE page
  // And the two never meet in one request.
  Plug plug(q);
  for (Bio& b : bios) ASSERT_TRUE(plug.submit(std::move(b)).has_value());
  EXPECT_EQ(plug.requests().size(), 2u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

// Ids above 510 share the range-list tag kIndirectProvider: the bio still ends where the
// provider changes (zone_device_pages_have_same_pgmap() compares pgmaps, not tags).
TEST_F(MemUserTest, BiosEndBetweenProvidersOfIndirectIds) {
  TestChunkSource x{PhysSpan{PhysAddr(0x3000000000), 1 * MiB}, 600, "0000:06:00.0"};
  TestChunkSource y{PhysSpan{PhysAddr(0x3000100000), 1 * MiB}, 601, "0000:07:00.0"};
  const uint64_t a = *as->mmap_p2p(x, at(0x10000000, 1 * MiB));
  ASSERT_TRUE(as->mmap_p2p(y, at(a + 1 * MiB, 64 * KiB)).has_value());
  auto p = *as->pin(a + 1 * MiB - 64 * KiB, 128 * KiB, Foll::pci_p2pdma);
  ASSERT_EQ(p.ranges().size(), 2u);
  EXPECT_EQ(p.ranges()[0].provider, kIndirectProvider);
  EXPECT_EQ(p.ranges()[1].provider, kIndirectProvider);
  auto bios = *build_bios(*as, p.ranges(), BlockOp::write, 0, nvme_queue(true));
  ASSERT_EQ(bios.size(), 2u);
  EXPECT_EQ(bios[0].provider, 600u);
  EXPECT_EQ(bios[1].provider, 601u);
  EXPECT_EQ(as->provider_at(p.ranges()[1].base), 601u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
  EXPECT_TRUE(as->munmap(a, 1 * MiB + 64 * KiB).has_value());  // before the sources go
}

TEST_F(MemUserTest, BioHoldsAtMostBioMaxVecs) {
  const uint64_t a = *as->mmap_anon(at(0x10000000, 2 * MiB));
  auto p = *as->pin(a, 2 * MiB, {});
  auto bios = *build_bios(*as, p.ranges(), BlockOp::write, 0, nvme_queue(true));
  ASSERT_EQ(bios.size(), 2u);
  EXPECT_EQ(bios[0].vecs.size(), kBioMaxVecs);
  EXPECT_EQ(bios[1].sector, 256u * 8);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, VecSegmentsSplitAtMaxSegmentSizeAndBoundary) {
  const QueueLimits l{.max_segment_size = 64 * KiB, .seg_boundary_mask = 0xffff};
  EXPECT_EQ(vec_segments(PhysRange{PhysAddr(0x100000), 128 * KiB}, l), 2u);
  EXPECT_EQ(vec_segments(PhysRange{PhysAddr(0x10f000), 8 * KiB}, l), 2u);  // crosses a 64 KiB boundary
  EXPECT_EQ(vec_segments(PhysRange{PhysAddr(0x100000), 4 * KiB}, l), 1u);
}

TEST_F(MemUserTest, SplitToLimitsRespectsMaxSegmentsAndMaxSectors) {
  QueueLimits l = Queue::nvme_limits();
  l.max_segments = 4;
  const Queue q = std::move(Queue::create("q", l)).value();
  const uint64_t a = *as->mmap_anon(at(0x10000000, 64 * KiB));
  auto p = *as->pin(a, 40 * KiB, {});
  auto bios = *build_bios(*as, p.ranges(), BlockOp::write, 0, q);
  ASSERT_EQ(bios.size(), 1u);
  auto pieces = *split_to_limits(std::move(bios[0]), q);
  ASSERT_EQ(pieces.size(), 3u);  // 10 scattered pages, 4 segments each
  EXPECT_EQ(pieces[0].bytes(), 16 * KiB);
  EXPECT_EQ(pieces[1].sector, 32u);
  EXPECT_EQ(pieces[2].bytes(), 8 * KiB);
  l.max_segments = 128;
  l.max_sectors = 16;  // 8 KiB
  const Queue q2 = std::move(Queue::create("q2", l)).value();
  auto b2 = *build_bios(*as, p.ranges(), BlockOp::write, 0, q2);
  EXPECT_EQ(split_to_limits(std::move(b2[0]), q2)->size(), 5u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, PlugMergesContiguousHostBiosWithinLimits) {
  QueueLimits l = Queue::nvme_limits();
  l.max_sectors = 64;  // 32 KiB
  const Queue q = std::move(Queue::create("q", l)).value();
  const uint64_t a = *as->mmap_anon({.addr = 0x40000000, .len = 2 * MiB, .order = kOrder2M});
  auto p = *as->pin(a, 64 * KiB, {});
  Plug plug(q);
  const RangeList& r = p.ranges();
  for (uint64_t off = 0; off < 64 * KiB; off += 8 * KiB) {
    Bio b{BlockOp::write, off >> 9, *RangeList::from_ranges(std::vector<PhysRange>{{r[0].base + off, 8 * KiB, 0}}), 0, false};
    ASSERT_TRUE(plug.submit(std::move(b)).has_value());
  }
  ASSERT_EQ(plug.requests().size(), 2u);  // max_sectors stops the back merge at 32 KiB
  EXPECT_EQ(plug.requests()[0].bios.size(), 4u);
  EXPECT_EQ(plug.requests()[0].nr_phys_segments, 4u);
  // The driver sees one segment: contiguous vecs merge (blk_map_iter_next()).
  EXPECT_EQ(request_segments(plug.requests()[0], l).size(), 1u);
  // ll_front_merge_fn(): a bio ending where the last request starts joins it in front.
  {
    Plug front(q);
    auto bio_at = [&](uint64_t sector, uint64_t off) {
      return Bio{BlockOp::write, sector, *RangeList::from_ranges(std::vector<PhysRange>{{r[0].base + off, 8 * KiB, 0}}), 0, false};
    };
    ASSERT_TRUE(front.submit(bio_at(100, 8 * KiB)).has_value());
    ASSERT_TRUE(front.submit(bio_at(84, 0)).has_value());
    ASSERT_EQ(front.requests().size(), 1u);
    EXPECT_EQ(front.requests()[0].sector, 84u);
    EXPECT_EQ(front.requests()[0].bios[0].sector, 84u);
    EXPECT_EQ(request_segments(front.requests()[0], l).size(), 1u);  // [0, 8K) then [8K, 16K): contiguous
  }
  // A bio of another operation or a non-adjacent sector starts a new request.
  Bio w{BlockOp::read, 128, *RangeList::from_ranges(std::vector<PhysRange>{{r[0].base, 4096, 0}}), 0, false};
  ASSERT_TRUE(plug.submit(std::move(w)).has_value());
  EXPECT_EQ(plug.requests().size(), 3u);
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, RequestSegmentsRespectTheBoundary) {
  QueueLimits l = Queue::nvme_limits();
  l.seg_boundary_mask = 0xffff;
  const uint64_t a = *as->mmap_anon({.addr = 0x40000000, .len = 2 * MiB, .order = kOrder2M});
  auto p = *as->pin(a, 128 * KiB, {});
  Request rq;
  rq.bios.push_back(Bio{BlockOp::write, 0, *RangeList::from_ranges(std::vector<PhysRange>{{p.ranges()[0].base, 128 * KiB, 0}}), 0, false});
  EXPECT_EQ(request_segments(rq, l).size(), 2u);  // 2 MiB folios are 64 KiB aligned
  EXPECT_TRUE(as->unpin(std::move(p)).has_value());
}

TEST_F(MemUserTest, DirectIoHandsEachRequestToTheDriverAndUnpins) {
  const uint64_t h = *as->mmap_anon({.addr = 0x40000000, .len = 4 * MiB, .order = kOrder2M});
  const uint64_t g = *as->mmap_p2p(gpu, at(h + 4 * MiB, 1 * MiB));
  (void)g;
  std::vector<RangeList> seen;
  auto driver = [&](const Request& rq, const RangeList& segs) -> Status {
    EXPECT_LE(segs.size(), rq.nr_phys_segments);
    for (const PhysRange s : segs) EXPECT_EQ(s.provider, rq.bios.front().provider);
    seen.push_back(segs);
    return {};
  };
  auto st = direct_io(*as, nvme_queue(true), BlockOp::read, h + 3 * MiB, 2 * MiB, 0, driver);
  ASSERT_TRUE(st.has_value()) << st.error().to_string();
  EXPECT_EQ(st->bytes, 2 * MiB);
  EXPECT_EQ(st->pinned_pages, 512u);
  // 1 MiB of host memory in one request (max_sectors 2048), then the P2P MiB: 256 page vecs
  // per bio, 127 segments per request -> 3 requests.
  EXPECT_EQ(st->requests, 4u);
  EXPECT_EQ(seen.size(), 4u);
  EXPECT_EQ(mem->stats().pinned_pages, 0u);
  // A driver error stops the I/O and still unpins.
  size_t calls = 0;
  auto failing = [&](const Request&, const RangeList&) -> Status {
    return ++calls == 2 ? Status(make_error(EIO, "media error")) : Status();
  };
  expect_error(direct_io(*as, nvme_queue(true), BlockOp::read, h + 3 * MiB, 2 * MiB, 0, failing), EIO, "media error");
  EXPECT_EQ(calls, 2u);
  EXPECT_EQ(as->stats().live_pins, 0u);
  EXPECT_EQ(gpu.live_chunks(), 1u);
}

// ---------------------------------------------------------------------------------------
// Property test: random mmap / munmap / pin / unpin against a reference model.

struct RefPage {
  uint64_t phys = 0;  // physical address of the page
  ProviderId provider = kHostMemory;
};

TEST_F(MemUserTest, RandomOpsMatchAReferenceModel) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    std::mt19937_64 rng(seed);
    auto mem2 = std::move(HostMemory::create(PhysSpan{PhysAddr(1 * GiB), 64 * MiB}, seed)).value();
    TestChunkSource src{PhysSpan{PhysAddr(0x2000000000), 8 * MiB}, 9, "0000:05:00.0"};
    const uint64_t total = mem2->stats().total_pages;
    {
      AddressSpace space(*mem2);
      std::map<uint64_t, RefPage> ref;  // virtual page address -> what is mapped there
      struct LivePin {
        Pinned p;
        std::vector<RefPage> pages;
      };
      std::vector<LivePin> pins;
      constexpr uint64_t kBase = 0x10000000, kSlots = 256;  // 1 MiB of virtual space
      for (int step = 0; step < 400; ++step) {
        const unsigned op = rng() % 6;
        const uint64_t page = rng() % kSlots, npages = 1 + rng() % 32;
        const uint64_t addr = kBase + page * 4096, len = npages * 4096;
        if (op <= 1) {  // mmap, anon (4 KiB or 2 MiB folios) or P2P
          bool free_slot = true;
          for (uint64_t k = 0; k < npages; ++k) free_slot &= !ref.count(addr + k * 4096);
          MmapOptions o{.addr = addr, .len = len, .shared = true, .order = (rng() % 4 == 0) ? kOrder2M : kOrder4K};
          const bool p2p = op == 1;
          if (!p2p && o.order == kOrder2M) {
            o.len = 2 * MiB;
            for (uint64_t k = npages; k < 512; ++k) free_slot &= !ref.count(addr + k * 4096);
          }
          auto r = p2p ? space.mmap_p2p(src, o) : space.mmap_anon(o);
          if (!free_slot) {
            ASSERT_FALSE(r.has_value());
            ASSERT_EQ(r.error().code, EEXIST);
            continue;
          }
          if (!r) {
            ASSERT_EQ(r.error().code, ENOMEM) << r.error().to_string();
            continue;
          }
          auto probe = *space.pin(addr, o.len, Foll::pci_p2pdma);  // read back what got mapped
          uint64_t k = 0;
          for (const PhysRange pr : probe.ranges())
            for (uint64_t off = 0; off < pr.size; off += 4096) ref[addr + 4096 * k++] = {pr.base.value() + off, pr.provider};
          ASSERT_EQ(k, o.len / 4096);
          ASSERT_TRUE(space.unpin(std::move(probe)).has_value());
        } else if (op == 2) {
          ASSERT_TRUE(space.munmap(addr, len).has_value());
          for (uint64_t k = 0; k < npages; ++k) ref.erase(addr + k * 4096);
        } else if (op == 3 || op == 4) {
          const uint64_t off = rng() % 4096, blen = len - rng() % 4096;
          const FollFlags f = rng() % 3 == 0 ? FollFlags() : FollFlags(Foll::pci_p2pdma);
          auto r = space.pin(addr + off, blen, f);
          // The model's verdict, at the first page in address order that fails: EFAULT for a
          // hole, EREMOTEIO for a P2P page without FOLL_PCI_P2PDMA.
          int expect = 0;
          std::vector<RefPage> want;
          const uint64_t first = addr, last = (addr + off + blen - 1) & ~uint64_t{4095};
          for (uint64_t v = first; v <= last && expect == 0; v += 4096) {
            auto it = ref.find(v);
            if (it == ref.end()) expect = EFAULT;
            else if (it->second.provider != kHostMemory && !(f & Foll::pci_p2pdma)) expect = EREMOTEIO;
            else want.push_back(it->second);
          }
          if (expect != 0) {
            ASSERT_FALSE(r.has_value());
            ASSERT_EQ(r.error().code, expect) << r.error().to_string();
            continue;
          }
          ASSERT_TRUE(r.has_value()) << r.error().to_string();
          // The list holds exactly the bytes, page by page as the model says.
          ASSERT_EQ(r->ranges().total_bytes(), blen);
          uint64_t v = addr + off;
          for (const PhysRange pr : r->ranges()) {
            for (uint64_t b = 0; b < pr.size;) {
              const RefPage& rp = ref.at(v & ~uint64_t{4095});
              ASSERT_EQ(pr.base.value() + b, rp.phys + (v & 4095));
              ASSERT_EQ(pr.provider, rp.provider);
              const uint64_t step_bytes = std::min(pr.size - b, 4096 - (v & 4095));
              b += step_bytes;
              v += step_bytes;
            }
          }
          for (size_t i = 1; i < r->ranges().size(); ++i) {  // merged as far as allowed, never across providers
            const PhysRange x = r->ranges()[i - 1], y = r->ranges()[i];
            ASSERT_TRUE(x.base + x.size != y.base || x.provider != y.provider);
          }
          pins.push_back({std::move(r).value(), want});
        } else if (!pins.empty()) {
          const size_t i = rng() % pins.size();
          ASSERT_TRUE(space.unpin(std::move(pins[i].p)).has_value());
          pins.erase(pins.begin() + static_cast<std::ptrdiff_t>(i));
        }
        // Pins balance: what the model holds equals what the memory counts.
        uint64_t host_pins = 0;
        for (const LivePin& lp : pins)
          for (const RefPage& rp : lp.pages) host_pins += rp.provider == kHostMemory;
        ASSERT_EQ(mem2->stats().pinned_pages, host_pins);
        ASSERT_EQ(space.stats().live_pins, pins.size());
      }
      for (LivePin& lp : pins) ASSERT_TRUE(space.unpin(std::move(lp.p)).has_value());
      ASSERT_TRUE(space.munmap(0, AddressSpace::kTaskSize).has_value());
      // Nothing leaked: every host page is free, every P2P chunk went back.
      EXPECT_EQ(mem2->stats().free_pages, total) << "seed " << seed;
      EXPECT_EQ(mem2->stats().folios, 0u);
      EXPECT_EQ(src.live_chunks(), 0u) << "seed " << seed;
      EXPECT_EQ(space.stats().p2p_chunks, 0u);
    }
  }
}

}  // namespace
}  // namespace physr::mem
