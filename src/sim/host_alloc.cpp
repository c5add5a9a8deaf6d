// Host RAM for the jobs' buffers: per NUMA node an arena, first fit at an alignment, free
// runs coalesced (HostAllocator in physr/sim.hpp; Linux mm/cma.c cma_range_alloc() picks the
// first free run of its bitmap at the alignment, bitmap_find_next_zero_area_off(), as alloc() does).
#include <algorithm>
#include <bit>
#include <string>

#include "physr/sim.hpp"

namespace physr::sim {

Result<HostAllocator> HostAllocator::create(PhysSpan ram, std::vector<int> nodes) {
  constexpr uint64_t k2M = 2 * MiB;
  if (ram.size == 0 || ram.base.value() % k2M != 0 || ram.size % k2M != 0)
    return make_error(EINVAL, "host memory " + format_hex(ram.base.value()) + "+" + format_size(ram.size) + ": must be 2 MiB aligned and non-empty");
  if (nodes.empty() || !std::is_sorted(nodes.begin(), nodes.end()) || std::adjacent_find(nodes.begin(), nodes.end()) != nodes.end())
    return make_error(EINVAL, "host memory: the NUMA nodes must be distinct, sorted and at least one");
  const uint64_t per = ram.size / nodes.size() / k2M * k2M;
  if (per == 0) return make_error(EINVAL, "host memory: " + format_size(ram.size) + " cannot be split between " + std::to_string(nodes.size()) + " NUMA nodes");
  HostAllocator a;
  for (size_t k = 0; k < nodes.size(); ++k) {
    // The last node takes what the even split leaves over.
    const uint64_t base = ram.base.value() + k * per, size = k + 1 == nodes.size() ? ram.size - k * per : per;
    Arena ar{nodes[k], PhysSpan{PhysAddr(base), size}, {}};
    ar.free.emplace(base, size);
    a.arenas_.push_back(std::move(ar));
  }
  return a;
}

PhysSpan HostAllocator::arena(int node) const noexcept {
  for (const Arena& ar : arenas_)
    if (ar.node == node) return ar.span;
  return PhysSpan{};
}

Result<PhysSpan> HostAllocator::alloc(uint64_t bytes, int node, const std::string& owner, uint64_t align) {
  if (bytes == 0) return make_error(EINVAL, owner + ": a host buffer of 0 bytes");
  if (align < kPageSize || !std::has_single_bit(align)) return make_error(EINVAL, owner + ": host buffer alignment " + std::to_string(align) + " is not a power of two of at least 4 KiB");
  if (bytes > (uint64_t{1} << 50)) return make_error(ENOMEM, owner + ": no room for " + format_size(bytes) + " of host buffers");
  const uint64_t size = (bytes + kPageSize - 1) & ~(kPageSize - 1);
  const auto home = std::find_if(arenas_.begin(), arenas_.end(), [&](const Arena& ar) { return ar.node == node; });
  if (home == arenas_.end()) return make_error(EINVAL, owner + ": no NUMA node " + std::to_string(node) + " for host buffers");
  // The node's own arena first, then the others in order (the zonelist's fallback).
  const size_t first = static_cast<size_t>(home - arenas_.begin());
  uint64_t free_total = 0, largest = 0;
  for (size_t n = 0; n < arenas_.size(); ++n) {
    Arena& ar = arenas_[(first + n) % arenas_.size()];
    for (auto it = ar.free.begin(); it != ar.free.end(); ++it) {
      const uint64_t base = it->first, len = it->second;
      free_total += n == 0 ? len : 0;
      largest = std::max(largest, len);
      const uint64_t at = (base + align - 1) & ~(align - 1);
      if (at < base || at - base >= len || len - (at - base) < size) continue;
      // Split the run: what is left before and after the buffer stays free.
      ar.free.erase(it);
      if (at > base) ar.free.emplace(base, at - base);
      if (at + size < base + len) ar.free.emplace(at + size, base + len - (at + size));
      used_.emplace(at, std::pair{size, owner});
      allocated_ += size;
      return PhysSpan{PhysAddr(at), size};
    }
  }
  return make_error(ENOMEM, owner + ": no room for " + format_size(size) + " of host buffers (node " + std::to_string(node) + " has " +
                                format_size(free_total) + " free, the largest free run on any node is " + format_size(largest) + ")");
}

Status HostAllocator::free(PhysSpan span) {
  const auto u = used_.find(span.base.value());
  if (u == used_.end() || u->second.first != span.size)
    return make_error(EINVAL, "host memory: " + format_hex(span.base.value()) + "+" + format_size(span.size) + " was not handed out (a double free, or part of a buffer)");
  used_.erase(u);
  allocated_ -= span.size;
  for (Arena& ar : arenas_) {
    if (!ar.span.contains(span.base)) continue;
    uint64_t base = span.base.value(), size = span.size;
    auto next = ar.free.lower_bound(base);
    if (next != ar.free.end() && next->first == base + size) {  // merge with the run after
      size += next->second;
      next = ar.free.erase(next);
    }
    if (next != ar.free.begin()) {  // and with the run before
      const auto prev = std::prev(next);
      if (prev->first + prev->second == base) {
        base = prev->first;
        size += prev->second;
        ar.free.erase(prev);
      }
    }
    ar.free.emplace(base, size);
    return {};
  }
  PHYSR_ASSERT(false, "a span handed out lies in an arena");
  return {};
}

std::vector<std::pair<PhysSpan, std::string>> HostAllocator::live() const {
  std::vector<std::pair<PhysSpan, std::string>> out;
  for (const auto& [base, v] : used_) out.emplace_back(PhysSpan{PhysAddr(base), v.first}, v.second);
  return out;
}

}  // namespace physr::sim
