// P2PMemorySource: the P2PChunkSource of one function's P2P memory pool, what an address
// space's P2P VMAs take their chunks from (the p2pmem allocate file's pool side).
#include <string>
#include <utility>

#include "physr/mem.hpp"

namespace physr::mem {

P2PMemorySource::P2PMemorySource(P2PMemory& memory, uint32_t function, std::string name, std::string owner)
    : mem_(&memory), function_(function), name_(std::move(name)), owner_(std::move(owner)) {}

// drivers/pci/p2pdma.c p2pmem_alloc_mmap(): `if (!p2pdma) return -ENODEV` after the
// pdev->p2pdma lookup; a function whose every resource is gone has no pool left to map.
bool P2PMemorySource::has_p2pdma() const { return mem_->stats(function_).size != 0; }

ProviderId P2PMemorySource::provider() const { return mem_->provider_of(function_).value_or(kInvalidProvider); }

// p2pmem_alloc_mmap(): pci_alloc_p2pmem()'s gen_pool_alloc_owner() and
// percpu_ref_tryget_live_rcu(): ENOMEM with no room, ENODEV when the pool is dying.
Result<P2PChunk> P2PMemorySource::alloc(uint64_t size) {
  PHYSR_ASSIGN_OR_RETURN(P2PChunk c, mem_->alloc(function_, size, AllocOptions{.owner = owner_.c_str()}));
  live_.emplace(c.span.base.value(), c);
  return c;
}

// p2pdma_folio_free() -> pci_free_p2pmem() (deferred by a grace period in P2PMemory::free).
Status P2PMemorySource::release(PhysSpan span) {
  const auto it = live_.find(span.base.value());
  if (it == live_.end() || it->second.span.size != span.size)
    return make_error(EINVAL, "p2pmem release of [" + format_hex(span.base.value()) + ", +" + format_hex(span.size) + ") to " + name_ +
                                  ": not a chunk this allocate file handed out");
  PHYSR_RETURN_IF_ERROR(mem_->free(it->second));
  live_.erase(it);
  return {};
}

}  // namespace physr::mem
