// physr mem: a mirror of a process address space without pinning (mm/mmu_notifier.c,
// mm/hmm.c, include/linux/hmm.h, Documentation/mm/hmm.rst).
//
// Design rationale
// - MmuIntervalNotifier is mmu_interval_notifier: a driver subscribes to a span of an
//   AddressSpace and is told, through its invalidate() callback, before anything in that
//   span changes (munmap: unmap, mprotect: protection_vma, migrate: migrate, revocation
//   of P2P memory: p2p_revoke). The sequence protocol is Linux's exactly: the address
//   space's invalidate_seq starts at 2 and is odd while an invalidation that hit a notifier
//   runs; read_begin() waits while one runs; the driver checks read_retry() under its own
//   lock, which its invalidate() takes too before calling set_seq(). Inserts and removes
//   during an invalidation are deferred to its end; remove() waits for it.
// - hmm_range_fault() walks the VMAs of [start, end) under the address space's mmap lock
//   and fills one HMM pfn per 4 KiB page (the pfn and the bit-exact flags of
//   include/linux/hmm.h), faulting missing pages in where the request asks for it, and
//   returns EBUSY when the notifier's sequence moved. P2P VMAs, which Linux refuses
//   (vm_insert_page() makes a p2pmem VMA VM_MIXEDMAP, and hmm_vma_walk_test() fills
//   HMM_PFN_ERROR or fails with EFAULT), are resolved through their chunk: a deliberate
//   extension, off with HmmRange::resolve_p2p = false.
// - HmmDmaMap is struct hmm_dma_map with hmm_dma_map_pfn() / hmm_dma_unmap_pfn(): each
//   valid pfn mapped through a DmaDevice, P2P through the host bridge with the MMIO
//   attribute (HMM_PFN_P2PDMA), a bus address flagged HMM_PFN_P2PDMA_BUS and skipped at
//   unmap.
// - HmmMirror is a device page table (a GPU's, an RDMA NIC's with on-demand paging) on
//   top of the three: an access to an address the device has no entry for faults, the
//   mirror resolves it with hmm_range_fault() under the retry protocol and maps it; its
//   notifier clears and unmaps the entries of every invalidated span under the mirror's
//   lock, so no access after an invalidation uses the old translation.
//
// Threads: the AddressSpace is still used by one thread at a time, now through its mmap
// lock (AddressSpace::mmap_lock()): with a mirror working on another thread every call on
// the space is made holding it, as the syscall would. Notifiers and mirrors are
// thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/mem/uspace.hpp"
#include "physr/range.hpp"

namespace physr::mem {

// ---------------------------------------------------------------------------------------
// Interval notifiers (mm/mmu_notifier.c)

/// Why an invalidation happens: include/linux/mmu_notifier.h enum mmu_notifier_event with
/// its values, plus physr's p2p_revoke (Linux reports the revocation of a p2pmem mapping,
/// unmap_mapping_range() from p2pdma's removal, as MMU_NOTIFY_CLEAR).
enum class MmuNotifyEvent : uint8_t {
  unmap = 0,        // MMU_NOTIFY_UNMAP: munmap
  clear,            // MMU_NOTIFY_CLEAR
  protection_vma,   // MMU_NOTIFY_PROTECTION_VMA: mprotect
  protection_page,  // MMU_NOTIFY_PROTECTION_PAGE
  soft_dirty,       // MMU_NOTIFY_SOFT_DIRTY
  release,          // MMU_NOTIFY_RELEASE
  migrate,          // MMU_NOTIFY_MIGRATE: page migration
  exclusive,        // MMU_NOTIFY_EXCLUSIVE
  p2p_revoke,       // physr: the P2P memory behind a VMA is being removed
};
const char* mmu_notify_event_name(MmuNotifyEvent e) noexcept;

/// struct mmu_notifier_range: the user addresses [start, end) about to change, and why.
struct MmuNotifierRange {
  uint64_t start = 0, end = 0;
  MmuNotifyEvent event = MmuNotifyEvent::unmap;
};

class MmuNotifierSubscriptions;

/// mmu_interval_notifier: a subscription to [start, start + length) of one AddressSpace.
/// The AddressSpace must outlive it. Thread-safe.
class MmuIntervalNotifier {
 public:
  /// mmu_interval_notifier_ops.invalidate: called before the span changes, with the
  /// sequence the driver must store with set_seq() under the lock its fault path checks
  /// read_retry() under. Returns true (the blockable case; physr has no other).
  using InvalidateFn = std::function<bool(MmuIntervalNotifier& sub, const MmuNotifierRange& range, uint64_t cur_seq)>;

  /// mmu_interval_notifier_insert(): takes the space's mmap lock, so not with it held.
  /// EOVERFLOW (as Linux) for length 0 or a span that wraps; EINVAL for a null callback.
  /// During an invalidation the insert is deferred to its end (mn_itree_inv_end()).
  static Result<std::unique_ptr<MmuIntervalNotifier>> insert(AddressSpace& space, uint64_t start, uint64_t length,
                                                              InvalidateFn invalidate);
  /// Removes the subscription if still inserted (remove()).
  ~MmuIntervalNotifier();
  MmuIntervalNotifier(const MmuIntervalNotifier&) = delete;
  MmuIntervalNotifier& operator=(const MmuIntervalNotifier&) = delete;

  /// mmu_interval_notifier_remove(): after it returns the callback runs no more. During an
  /// invalidation it waits for that invalidation to end, so it must not be called with a
  /// lock the callback takes held. A second remove() does nothing.
  void remove();
  /// mmu_interval_read_begin(): the sequence to check later; waits while an invalidation
  /// of this span runs.
  uint64_t read_begin();
  /// mmu_interval_read_retry(): the span was invalidated since read_begin() returned seq.
  /// Call it under the lock invalidate() takes, before using what was read.
  bool read_retry(uint64_t seq) const noexcept { return seq_.load(std::memory_order_relaxed) != seq; }
  /// mmu_interval_check_retry(): the same as a hint, without the lock (hmm_range_fault
  /// uses it to give up early).
  bool check_retry(uint64_t seq) const noexcept { return seq_.load(std::memory_order_acquire) != seq; }
  /// mmu_interval_set_seq(): from invalidate(), under the driver's lock.
  void set_seq(uint64_t cur_seq) noexcept { seq_.store(cur_seq, std::memory_order_release); }

  uint64_t start() const noexcept { return start_; }
  uint64_t end() const noexcept { return last_ + 1; }
  AddressSpace& space() const noexcept { return *space_; }
  /// Still subscribed (remove() not yet called).
  bool inserted() const noexcept { return !removed_.load(std::memory_order_acquire); }

 private:
  friend class MmuNotifierSubscriptions;
  MmuIntervalNotifier() = default;
  AddressSpace* space_ = nullptr;
  std::shared_ptr<MmuNotifierSubscriptions> subs_;
  uint64_t start_ = 0, last_ = 0;  // inclusive last, as the interval tree keeps it
  InvalidateFn invalidate_;
  std::atomic<uint64_t> seq_{0};
  std::atomic<bool> removed_{false};
  bool in_tree_ = false;  // under subs_'s lock
};

/// mmu_notifier_subscriptions of one AddressSpace: the notifiers (mm->notifier_subscriptions
/// ->itree) and the sequence. Made by the first insert; the AddressSpace calls it.
class MmuNotifierSubscriptions {
 public:
  /// The sequence (2 at creation, odd while an invalidation that hit a notifier runs).
  uint64_t invalidate_seq() const;
  /// mmu_notifier_invalidate_range_start() / _end(): calls invalidate() of every
  /// notifier overlapping the range between the two. end() must follow every start().
  void invalidate_start(const MmuNotifierRange& range);
  void invalidate_end();
  size_t notifiers() const;

 private:
  friend class MmuIntervalNotifier;
  bool is_invalidating() const noexcept { return (seq_ & 1) != 0; }
  mutable std::mutex lock_;
  std::condition_variable wq_;
  uint64_t seq_ = 2;  // mmu_notifier_register(): subscriptions->invalidate_seq = 2
  uint64_t active_ = 0;  // active_invalidate_ranges
  std::vector<MmuIntervalNotifier*> tree_;  // the itree (few notifiers: a vector)
  std::vector<MmuIntervalNotifier*> deferred_;  // inserts and removes waiting for inv_end
};

/// An invalidation scope: start at construction, end at destruction, nothing when the
/// space has no notifiers or `active` is false. What AddressSpace's mutations open.
class MmuNotifierScope {
 public:
  MmuNotifierScope(MmuNotifierSubscriptions* subs, const MmuNotifierRange& range, bool active = true)
      : subs_(active ? subs : nullptr) {
    if (subs_) subs_->invalidate_start(range);
  }
  ~MmuNotifierScope() {
    if (subs_) subs_->invalidate_end();
  }
  MmuNotifierScope(const MmuNotifierScope&) = delete;
  MmuNotifierScope& operator=(const MmuNotifierScope&) = delete;

 private:
  MmuNotifierSubscriptions* subs_;
};

// ---------------------------------------------------------------------------------------
// hmm_range_fault (mm/hmm.c, include/linux/hmm.h)

/// enum hmm_pfn_flags, bit for bit (BITS_PER_LONG = 64). Plain words, not Flags: an HMM
/// pfn is the pfn in the low bits, the map order in bits 53-57 and these flags on top.
inline constexpr uint64_t kHmmPfnValid = uint64_t{1} << 63;      // HMM_PFN_VALID
inline constexpr uint64_t kHmmPfnWrite = uint64_t{1} << 62;      // HMM_PFN_WRITE
inline constexpr uint64_t kHmmPfnError = uint64_t{1} << 61;      // HMM_PFN_ERROR
inline constexpr uint64_t kHmmPfnDmaMapped = uint64_t{1} << 60;  // HMM_PFN_DMA_MAPPED (sticky)
inline constexpr uint64_t kHmmPfnP2pdma = uint64_t{1} << 59;     // HMM_PFN_P2PDMA (sticky)
inline constexpr uint64_t kHmmPfnP2pdmaBus = uint64_t{1} << 58;  // HMM_PFN_P2PDMA_BUS (sticky)
inline constexpr unsigned kHmmPfnOrderShift = 53;                // HMM_PFN_ORDER_SHIFT = BITS_PER_LONG - 11
inline constexpr uint64_t kHmmPfnReqFault = kHmmPfnValid;        // HMM_PFN_REQ_FAULT (input)
inline constexpr uint64_t kHmmPfnReqWrite = kHmmPfnWrite;        // HMM_PFN_REQ_WRITE (input)
inline constexpr uint64_t kHmmPfnFlags = ~((uint64_t{1} << kHmmPfnOrderShift) - 1);  // HMM_PFN_FLAGS
/// mm/hmm.c HMM_PFN_INOUT_FLAGS: carried from input to output.
inline constexpr uint64_t kHmmPfnInoutFlags = kHmmPfnDmaMapped | kHmmPfnP2pdma | kHmmPfnP2pdmaBus;

/// hmm_pfn_to_phys(): the physical address of a valid HMM pfn's page.
inline PhysAddr hmm_pfn_to_phys(uint64_t hmm_pfn) noexcept { return PhysAddr((hmm_pfn & ~kHmmPfnFlags) << kPageShift); }
/// hmm_pfn_to_map_order(): the order of the CPU mapping (9 for a PMD-mapped 2 MiB folio).
inline unsigned hmm_pfn_to_map_order(uint64_t hmm_pfn) noexcept { return (hmm_pfn >> kHmmPfnOrderShift) & 0x1f; }

/// struct hmm_range. hmm_pfns has one entry per page of [start, end): on input the
/// request (REQ_FAULT, REQ_WRITE, masked by pfn_flags_mask, or-ed with default_flags, as
/// hmm_pte_need_fault()), on output the HMM pfn (sticky flags kept).
struct HmmRange {
  MmuIntervalNotifier* notifier = nullptr;
  uint64_t notifier_seq = 0;  // from notifier->read_begin()
  uint64_t start = 0, end = 0;
  std::span<uint64_t> hmm_pfns{};
  uint64_t default_flags = 0;
  uint64_t pfn_flags_mask = 0;
  /// physr's extension: P2P VMAs give their chunk's pfns (true) instead of HMM_PFN_ERROR /
  /// EFAULT (false: Linux, whose p2pmem VMAs are VM_MIXEDMAP).
  bool resolve_p2p = true;
};

/// hmm_range_fault(): fills range.hmm_pfns. Call with range.notifier->space().mmap_lock()
/// held. EBUSY: the notifier's sequence moved (read_begin again and retry). EFAULT: a
/// fault was requested for an address with no VMA, a VMA without read permission or a
/// P2P VMA with resolve_p2p off, or a missing page could not be faulted in (no host
/// memory). EPERM: a write fault on a VMA without write permission. EINVAL: no or a
/// removed notifier, start or end not 4 KiB aligned, start >= end, the range outside the
/// notifier's span, hmm_pfns not one entry per page. Without a fault request: HMM_PFN_ERROR
/// where there is no VMA or an unreadable one, 0 for a missing page.
Status hmm_range_fault(HmmRange& range);

/// The range-list form: the pages of a filled range as physical ranges in address order,
/// merged where contiguous and tagged with their providers (host memory, or the P2P chunk's
/// provider); runs of different providers never merge. EFAULT names the first page without
/// HMM_PFN_VALID. One list per call.
Result<RangeList> hmm_pfns_to_ranges(const AddressSpace& space, std::span<const uint64_t> hmm_pfns, uint64_t start);

/// follow_page(): the physical address the CPU's page table maps va to (nullopt: no VMA, or
/// a missing page). What tests compare a device's translation with. Under the mmap lock.
std::optional<PhysAddr> cpu_translate(const AddressSpace& space, uint64_t va);

// ---------------------------------------------------------------------------------------
// DMA mapping of HMM pfns (mm/hmm.c hmm_dma_map_alloc(), hmm_dma_map_pfn())

/// struct hmm_dma_map: a pfn list and the DMA address of each entry (4 KiB entries).
/// physr maps each entry with DmaDevice::map_phys (Linux's dma_map_phys branch; the
/// dma_iova_link branch is not modelled).
struct HmmDmaMap {
  std::vector<uint64_t> pfn_list;
  std::vector<DmaSegment> dma_list;
};

/// hmm_dma_map_alloc(): n entries, all 0. EINVAL for n = 0.
Status hmm_dma_map_alloc(HmmDmaMap& map, size_t n);
/// hmm_dma_map_pfn(): maps entry idx (HMM_PFN_VALID required, EINVAL otherwise) and sets
/// HMM_PFN_DMA_MAPPED; an entry already mapped returns its address. P2P memory through the
/// host bridge is mapped with the MMIO attribute and flagged HMM_PFN_P2PDMA; a bus address
/// holds no mapping and is flagged HMM_PFN_P2PDMA_BUS. The device's errors pass through
/// (EREMOTEIO: P2P memory it cannot reach).
Result<DmaAddr> hmm_dma_map_pfn(DmaDevice& dev, HmmDmaMap& map, size_t idx);
/// hmm_dma_unmap_pfn(): unmaps entry idx if it is valid and mapped (false otherwise),
/// skipping bus addresses, and clears DMA_MAPPED, P2PDMA and P2PDMA_BUS.
Result<bool> hmm_dma_unmap_pfn(DmaDevice& dev, HmmDmaMap& map, size_t idx);

// ---------------------------------------------------------------------------------------
// A device page table mirroring an AddressSpace

struct HmmMirrorOptions {
  uint64_t start = 0, len = 0;  // the mirrored span, 4 KiB aligned
  /// Pages faulted per device fault (the fault-around window, aligned down; 1: exact).
  uint32_t fault_pages = 16;
  /// A fault gives up with EBUSY after this many retries or this long, whichever first:
  /// a sequence that never settles must not make the device spin (ROCm issue 6523).
  uint32_t max_retries = 1000;
  std::chrono::milliseconds retry_timeout{2000};
  /// Tests: called after each hmm_range_fault() of a device fault, before the mirror's lock
  /// is taken (an invalidation there makes the attempt stale; a detach() there removes the
  /// notifier during the fault).
  std::function<void(uint64_t va)> after_walk{};
};

/// What a device access resolved to: the DMA address of the byte and the entry's flags.
struct DeviceTranslation {
  DmaAddr dma;
  uint64_t hmm_pfn = 0;  // VALID, WRITE, DMA_MAPPED, P2PDMA, P2PDMA_BUS
  DmaSegFlags seg{};
};

struct HmmMirrorStats {
  uint64_t faults = 0, retries = 0, invalidations = 0, mapped_pages = 0;
};

/// A simulated device's page table over [start, start + len) of a process's address
/// space. Thread-safe: accesses and faults from any thread, invalidations from the thread
/// changing the space.
class HmmMirror {
 public:
  /// Inserts the notifier (so not with the mmap lock held). EINVAL: an unaligned or empty
  /// span, fault_pages 0; EOVERFLOW: a span that wraps. `space` and `dev` must outlive it.
  static Result<std::unique_ptr<HmmMirror>> create(AddressSpace& space, DmaDevice& dev, const HmmMirrorOptions& o);
  /// Removes the notifier and unmaps every entry.
  ~HmmMirror();
  HmmMirror(const HmmMirror&) = delete;
  HmmMirror& operator=(const HmmMirror&) = delete;

  /// A device access to the byte at va: the entry if it has one (with write permission
  /// for a write), else a device fault resolved as Documentation/mm/hmm.rst's driver loop
  /// (read_begin, hmm_range_fault under the mmap lock, read_retry under the mirror's lock,
  /// then hmm_dma_map_pfn). Errors: EFAULT outside the span or where hmm_range_fault
  /// fails (the fault's errors), EPERM a write to a read-only page, EBUSY after
  /// max_retries / retry_timeout (naming both), ENODEV once the mirror is detached.
  /// `dma`, if given, is the access itself: it runs under the mirror's lock while the
  /// translation is valid (an invalidation waits for it to finish).
  using DmaFn = std::function<void(const DeviceTranslation&)>;
  Result<DeviceTranslation> access(uint64_t va, bool write, const DmaFn& dma = {});
  /// The device's current entry for va (no fault), or nullopt.
  std::optional<DeviceTranslation> lookup(uint64_t va, bool write) const;
  /// Removes the notifier and unmaps everything: every later access is ENODEV. Also what
  /// a test does to remove the notifier while another thread faults.
  void detach();
  HmmMirrorStats stats() const;
  MmuIntervalNotifier& notifier() noexcept { return *notifier_; }

 private:
  HmmMirror(AddressSpace& s, DmaDevice& d, const HmmMirrorOptions& o) : space_(&s), dev_(&d), opt_(o) {}
  bool invalidate(MmuIntervalNotifier& sub, const MmuNotifierRange& r, uint64_t cur_seq);
  void unmap_locked(size_t first, size_t last);
  std::optional<DeviceTranslation> entry_locked(uint64_t va, bool write) const;
  Result<DeviceTranslation> fault(uint64_t va, bool write, const DmaFn& dma);

  AddressSpace* space_;
  DmaDevice* dev_;
  HmmMirrorOptions opt_;
  std::unique_ptr<MmuIntervalNotifier> notifier_;
  mutable std::mutex lock_;  // the driver's lock: invalidate() and the fault's commit
  HmmDmaMap map_;            // the device page table
  bool detached_ = false;
  HmmMirrorStats stats_;
};

}  // namespace physr::mem
