// physr mem: the memory layer between the platform and the machine model. Its first part is
// P2P memory: the p2pdma state of every provider on a Platform, as Linux keeps it in
// pdev->p2pdma (drivers/pci/p2pdma.c): a pool per device, fed by pci_p2pdma_add_resource(),
// handed out by pci_alloc_p2pmem(), published with pci_p2pmem_publish() and found by
// pci_p2pmem_find_many().
//
// Design rationale
// - One pool per function; each pci_p2pdma_add_resource() adds a resource (a span of one
//   BAR, the platform's aperture of that BAR) to it, as gen_pool_add_owner() adds a chunk.
//   An allocation comes from the function's first resource with room, like gen_pool_alloc.
// - Frees are deferred: a freed chunk goes back to the pool only after an RCU grace period
//   (liburcu memb, the flavour the provider registry uses), so a reader that found the
//   memory inside a read-side section (P2PMemory::ReadGuard) never sees it handed out again
//   before the section ends. (Linux pci_free_p2pmem() returns memory at once; the
//   userspace-P2PDMA series requires a grace period before pages go back to the genalloc,
//   and the pages of the allocate file reach p2pdma_folio_free() only after their last
//   reference; physr applies the rule to every free.)
// - Allocator: 4 KiB granules, one bit each (set: not free in the pool), plus per-thread
//   magazines of naturally aligned power-of-two chunks (4 KiB .. 2 MiB) and a bounded depot
//   per resource; other sizes and larger alignments take a first-fit aligned search under
//   the resource's lock. The hot path is a thread-local pop or push: no lock, no atomic
//   read-modify-write, no fence (see src/mem/pool.cpp for why, and for the asymmetric
//   protocol that lets removal and barrier() reach other threads' caches).
// - A live reference per resource (Linux pgmap->ref, a percpu_ref): per-thread counters
//   of chunks held; remove() makes new allocations fail with ENODEV at once (as
//   percpu_ref_kill makes percpu_ref_tryget_live fail), calls the revoke callbacks, and
//   waits for the counters to sum to zero before the memory goes away.
// - Tracking (on by default, like DMA-API debug in tests): an exact shadow of every chunk
//   handed out, so any double or partial free is EINVAL and teardown names each chunk's
//   owner. Without it, the metadata is the bitmap and the caches only; a free is still
//   checked against the bitmap (gen_pool_free's BUG_ON(remain)), but a second free of a
//   chunk whose first free is still waiting for its grace period is not seen.
#pragma once

// The layer's other parts: process address spaces, host pages, P2P VMAs and pinning; the
// block layer model (bios, requests, O_DIRECT); dma-buf export/import and the devmem
// binding of a dma-buf to an RX queue; netmem handles and page pools with memory providers;
// the mirror (interval notifiers, hmm_range_fault, device page tables).
#include "physr/mem/block.hpp"
#include "physr/mem/devmem.hpp"
#include "physr/mem/devmem_provider.hpp"
#include "physr/mem/dmabuf.hpp"
#include "physr/mem/hmm.hpp"
#include "physr/mem/netmem.hpp"
#include "physr/mem/page_pool.hpp"
#include "physr/mem/uspace.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include "physr/core.hpp"
#include "physr/platform.hpp"
#include "physr/provider.hpp"

namespace physr::mem {

// P2PChunk (a piece of P2P memory a pool hands out) is in physr/mem/uspace.hpp, where the
// address spaces' P2PChunkSource takes it too; P2PMemorySource (below) is that seam over a
// P2PMemory pool.

struct AllocOptions {
  uint64_t align = kPageSize;  // power of two >= 4 KiB, of the CPU physical address
  const char* owner = nullptr; // reported at teardown (a string that outlives the chunk)
};
/// The options of an alloc() that names none (a constant: the call builds no temporary).
inline constexpr AllocOptions kDefaultAllocOptions{};

/// Bytes of a function's pool: size (every live resource), allocated (held by callers),
/// deferred (freed, waiting for a grace period); chunks held by callers.
struct PoolStats {
  uint64_t size = 0, allocated = 0, deferred = 0, chunks = 0;
};

struct P2PMemoryOptions {
  /// Shadow-track every chunk: exact double-free detection and owners in leak reports.
  bool track = true;
  /// How long remove() waits for held chunks to come back before it fails with EBUSY.
  std::chrono::milliseconds remove_timeout{10000};
  /// Receives leak reports (chunks still held at remove() timeout or teardown); null: stderr.
  std::function<void(const std::string& report)> report{};
};

class P2PMemorySource;

/// The p2pdma state of every provider on a Platform (Linux: pdev->p2pdma for each device).
/// Set-up (add_resource, publish, on_revoke, off_revoke) and remove() are serialised against
/// each other (off_revoke also against a callback of its subscription running in remove());
/// alloc, free, find_many, virt_to_bus and stats may run concurrently from any thread.
class P2PMemory {
 public:
  /// The platform must outlive the P2PMemory.
  static Result<std::unique_ptr<P2PMemory>> create(Platform& platform);
  static Result<std::unique_ptr<P2PMemory>> create(Platform& platform, P2PMemoryOptions options);
  /// Waits for every deferred free (rcu_barrier), then reports chunks still held (owner,
  /// address; like page_pool's stalled shutdown) to the report callback or stderr and frees
  /// everything. No thread may use the object any more.
  ~P2PMemory();
  P2PMemory(const P2PMemory&) = delete;
  P2PMemory& operator=(const P2PMemory&) = delete;

  /// Linux pci_p2pdma_add_resource(pdev, bar, size, offset): EINVAL as the kernel (BAR not
  /// memory, offset >= BAR length, size + offset > length; size 0 = rest of the BAR), and
  /// when offset or size is not a multiple of 4 KiB; EEXIST when it overlaps a resource
  /// already added. Uses the platform's aperture of that BAR (add_bar, unpublished, if it
  /// is not registered yet) and returns its provider id. The resource starts unpublished.
  Result<ProviderId> add_resource(uint32_t function, unsigned bar, uint64_t size, uint64_t offset);
  /// Linux pci_p2pmem_publish(): whether find_many() may pick the function. ENODEV: it has
  /// no P2P memory.
  Status publish(uint32_t function, bool publish);
  /// Linux pci_alloc_p2pmem(): `size` rounded up to 4 KiB (as gen_pool_alloc rounds to its
  /// granule), aligned to o.align. EINVAL: size 0 or a bad alignment; ENODEV: no P2P memory,
  /// or every resource is being removed; ENOMEM: no room (after waiting for deferred frees).
  Result<P2PChunk> alloc(uint32_t function, uint64_t size, const AllocOptions& o = kDefaultAllocOptions) {
    union Out {
      Out() {}  // left for alloc_raw() to write
      P2PChunk chunk;
    } out;
    if (Error* e = alloc_raw(&out.chunk, function, size, o)) [[unlikely]] return physr::detail::Failure(e);
    return out.chunk;
  }
  /// Linux pci_free_p2pmem(), deferred: the chunk is back in the pool after a grace period.
  /// EINVAL (naming the address and the rule): not a chunk this pool handed out (unknown
  /// function or provider, outside the resource, not 4 KiB aligned, a size that is not a
  /// multiple of 4 KiB, a double free, with tracking a size other than allocated). A failed
  /// free changes nothing.
  Status free(const P2PChunk& chunk) {
    if (Error* e = free_raw(chunk)) [[unlikely]] return physr::detail::Failure(e);
    return {};
  }
  /// Linux pci_p2pmem_find_many(): among published functions with live P2P memory, the one
  /// nearest to all clients (the platform's engine; ties go to the first, not at random).
  std::optional<uint32_t> find_many(std::span<const uint32_t> clients) const;
  /// Linux pci_p2pmem_virt_to_bus() (gen_pool_virt_to_phys over the bus addresses): the PCI
  /// bus address of `a`. EINVAL: `a` lies in none of the function's resources.
  Result<BusAddr> virt_to_bus(uint32_t function, PhysAddr a) const;
  /// Linux pci_p2pdma_max_pagemap_align() (proposed): the largest page (1 GiB, 2 MiB or
  /// 4 KiB) that the BAR's start, `size` and `offset` are all aligned to.
  static uint64_t max_pagemap_align(PhysAddr bar_start, uint64_t size, uint64_t offset) noexcept;
  /// Provider removal (the device's P2P memory going away): new allocations fail with
  /// ENODEV at once; every user mapping of the function's allocate files goes
  /// (P2PMemorySource::unmap_mapping_range(), pins keep their chunks); the revoke callbacks
  /// run for every chunk still held; then it waits (up to remove_timeout) for them to be
  /// freed (the last unpin of an I/O in flight), waits a grace period and frees the pool.
  /// Not with an address space's mmap_lock held (the unmap takes it).
  /// ENODEV: no P2P memory; EBUSY: chunks still held after the timeout (reported; the
  /// function stays removed for allocations and a later remove() finishes the job).
  Status remove(uint32_t function);
  /// Called on remove() before the memory goes away (the kernel's unmap_mapping_range on
  /// the p2pmem allocate file), once per chunk still held (with tracking off: once per run
  /// of held granules), without locks held: it may call free().
  using RevokeFn = std::function<void(const P2PChunk&)>;
  /// A subscription to a function's removal (on_revoke()), to end it with off_revoke().
  struct RevokeToken {
    uint32_t function = 0;
    uint64_t id = 0;  // 0: no subscription
  };
  /// Subscribes `fn` to the function's removal; several importers and pools may hang off
  /// one provider, so every subscriber is called, in subscription order, with every chunk
  /// still held (each picks out its own). A null `fn` or an unknown function subscribes
  /// nothing (an empty token).
  RevokeToken on_revoke(uint32_t function, RevokeFn fn);
  /// Ends a subscription: returns once a call of it in progress on another thread is over,
  /// and it is not called again (it may be called from inside its own callback). EINVAL: not
  /// a live subscription (an empty token, or ended already).
  Status off_revoke(RevokeToken token);
  /// Every free that returned before the call, on any thread, is back in its pool
  /// (rcu_barrier). Not from inside a ReadGuard.
  void barrier();
  /// The function's pool, summed over its live resources (zeros if it has none).
  PoolStats stats(uint32_t function) const;
  /// The provider of the function's first live resource (the pgmap its pages belong to);
  /// nullopt when it has none.
  std::optional<ProviderId> provider_of(uint32_t function) const;

  /// An RCU read-side section (the provider registry's): a chunk found inside it is not
  /// handed out again before it ends, even if freed meanwhile.
  using ReadGuard = ProviderRegistry::ReadGuard;

  struct Impl;

 private:
  friend class P2PMemorySource;  // registers itself as the function's allocate file
  explicit P2PMemory(std::unique_ptr<Impl> impl);
  // alloc() and free() without the result wrapping, which the inline wrappers above add in
  // the caller (a Status or Result returned from a call goes through memory; a pointer comes
  // back in a register): alloc_raw() writes the chunk to *out and returns null, or returns
  // the error (owned by the caller) and leaves *out alone; free_raw() returns null or the
  // error.
  Error* alloc_raw(P2PChunk* out, uint32_t function, uint64_t size, const AllocOptions& o);
  Error* free_raw(const P2PChunk& chunk);
  void attach_file(uint32_t function, P2PMemorySource* file);
  void detach_file(uint32_t function, P2PMemorySource* file);
  std::unique_ptr<Impl> impl_;
};

/// The p2pmem allocate file of one function (drivers/pci/p2pdma.c p2pmem_alloc_mmap()'s
/// pool side): a P2PChunkSource over a P2PMemory, so that AddressSpace::mmap_p2p() maps
/// chunks of the function's real pool. alloc() is pci_alloc_p2pmem() (ENOMEM: no room,
/// ENODEV: no resource left or every one being removed), release() is pci_free_p2pmem()
/// (back in the pool after a grace period). It keeps the chunks it handed out, so release()
/// of anything else is EINVAL and nothing goes back twice. It knows the address spaces that
/// map it (the file's i_mapping), so that the provider's removal unmaps them. Thread-safe
/// (an address space's thread and a removal's may use it at once); the P2PMemory must
/// outlive it, and it must outlive every address space that mapped it.
class P2PMemorySource final : public P2PChunkSource {
 public:
  /// `name` is the device in messages ("nvme1"); `owner` names the chunks in leak reports.
  P2PMemorySource(P2PMemory& memory, uint32_t function, std::string name, std::string owner = "p2pmem mmap");
  /// Chunks still held are left to the pool, which reports them at its teardown.
  ~P2PMemorySource() override;
  P2PMemorySource(const P2PMemorySource&) = delete;
  P2PMemorySource& operator=(const P2PMemorySource&) = delete;

  /// The function has a live P2P resource (pdev->p2pdma with memory in its pool).
  bool has_p2pdma() const override;
  /// The provider of the function's first live resource (kInvalidProvider when none).
  ProviderId provider() const override;
  /// pci_alloc_p2pmem(function, size) with this file's owner: ENOMEM when no resource has
  /// room, ENODEV when every resource is being removed (or none is left).
  Result<P2PChunk> alloc(uint64_t size) override;
  /// pci_free_p2pmem() of a chunk alloc() handed out, whole (back in the pool after a grace
  /// period). EINVAL for any other span; the pool's free() errors otherwise.
  Status release(PhysSpan span) override;
  /// The device's name given at construction, for messages.
  std::string name() const override { return name_; }
  /// The function whose pool this is.
  uint32_t function() const noexcept { return function_; }
  /// Chunks handed out and not yet released.
  size_t live_chunks() const;
  /// Linux unmap_mapping_range(file->f_mapping, 0, 0, 1), as pci_p2pdma_unmap_mappings()
  /// does when the provider goes: every P2P VMA of every address space that maps one of
  /// this file's chunks is unmapped (under its mmap_lock; MMU_NOTIFY_CLEAR for p2p_revoke).
  /// Chunks that are also pinned stay held until the last unpin. P2PMemory::remove() calls
  /// it; the number of VMAs unmapped.
  size_t unmap_mapping_range();
  /// Registers `space` in the file's i_mapping (its first mmap_p2p of this file).
  void mapped_by(AddressSpace& space) override;
  /// Forgets `space` (its destructor), after any unmap_mapping_range() in progress.
  void unmapped_by(AddressSpace& space) override;

 private:
  P2PMemory* mem_;
  uint32_t function_;
  std::string name_, owner_;
  mutable std::mutex mu_;                // live_ and spaces_
  std::mutex unmap_mu_;                  // held while unmap_mapping_range() walks spaces_
  std::map<uint64_t, P2PChunk> live_;    // by physical start
  std::vector<AddressSpace*> spaces_;    // that mapped this file (its i_mapping)
};

}  // namespace physr::mem
