// P2PMemorySource: the P2PChunkSource of one function's P2P memory pool, what an address
// space's P2P VMAs take their chunks from (the p2pmem allocate file's pool side).
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "physr/mem.hpp"

namespace physr::mem {

P2PMemorySource::P2PMemorySource(P2PMemory& memory, uint32_t function, std::string name, std::string owner)
    : mem_(&memory), function_(function), name_(std::move(name)), owner_(std::move(owner)) {
  mem_->attach_file(function_, this);
}

P2PMemorySource::~P2PMemorySource() { mem_->detach_file(function_, this); }

// drivers/pci/p2pdma.c p2pmem_alloc_mmap(): `if (!p2pdma) return -ENODEV` after the
// pdev->p2pdma lookup; a function whose every resource is gone has no pool left to map.
bool P2PMemorySource::has_p2pdma() const { return mem_->stats(function_).size != 0; }

ProviderId P2PMemorySource::provider() const { return mem_->provider_of(function_).value_or(kInvalidProvider); }

size_t P2PMemorySource::live_chunks() const {
  std::lock_guard g(mu_);
  return live_.size();
}

// p2pmem_alloc_mmap(): pci_alloc_p2pmem()'s gen_pool_alloc_owner() and
// percpu_ref_tryget_live_rcu(): ENOMEM with no room, ENODEV when the pool is dying.
Result<P2PChunk> P2PMemorySource::alloc(uint64_t size) {
  PHYSR_ASSIGN_OR_RETURN(P2PChunk c, mem_->alloc(function_, size, AllocOptions{.owner = owner_.c_str()}));
  std::lock_guard g(mu_);
  live_.emplace(c.span.base.value(), c);
  return c;
}

// p2pdma_folio_free() -> pci_free_p2pmem() (deferred by a grace period in P2PMemory::free).
Status P2PMemorySource::release(PhysSpan span) {
  P2PChunk c;
  {
    std::lock_guard g(mu_);
    const auto it = live_.find(span.base.value());
    if (it == live_.end() || it->second.span.size != span.size)
      return make_error(EINVAL, "p2pmem release of [" + format_hex(span.base.value()) + ", +" + format_hex(span.size) + ") to " + name_ +
                                    ": not a chunk this allocate file handed out");
    c = it->second;
    live_.erase(it);
  }
  Status st = mem_->free(c);
  if (!st) {
    std::lock_guard g(mu_);
    live_.emplace(c.span.base.value(), c);  // still the caller's
  }
  return st;
}

void P2PMemorySource::mapped_by(AddressSpace& space) {
  std::lock_guard g(mu_);
  if (std::find(spaces_.begin(), spaces_.end(), &space) == spaces_.end()) spaces_.push_back(&space);
}

void P2PMemorySource::unmapped_by(AddressSpace& space) {
  std::lock_guard u(unmap_mu_);  // an unmap in progress may be using the space
  std::lock_guard g(mu_);
  std::erase(spaces_, &space);
}

// mm/memory.c unmap_mapping_range() over the file's i_mapping: every VMA of the chunks this
// file handed out, in every address space that maps them (drivers/pci/p2pdma.c
// pci_p2pdma_unmap_mappings(), when the provider goes). Locks: unmap_mu_, then each space's
// mmap_lock; mu_ only to copy (release() takes it under mmap_lock).
size_t P2PMemorySource::unmap_mapping_range() {
  std::lock_guard u(unmap_mu_);
  std::vector<AddressSpace*> spaces;
  std::vector<PhysSpan> spans;
  {
    std::lock_guard g(mu_);
    spaces = spaces_;
    for (const auto& [base, c] : live_) spans.push_back(c.span);
  }
  size_t unmapped = 0;
  for (AddressSpace* as : spaces) {
    std::lock_guard l(as->mmap_lock());
    for (const PhysSpan& s : spans)
      if (auto n = as->revoke_p2p(s)) unmapped += *n;
  }
  return unmapped;
}

}  // namespace physr::mem
