#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <span>
#include <mutex>
#include <string>
#include <vector>

#include "physr/dma.hpp"

namespace physr {

const char* dma_direction_name(DmaDirection d) noexcept {
  switch (d) {
    case DmaDirection::bidirectional: return "bidirectional";
    case DmaDirection::to_device: return "to_device";
    case DmaDirection::from_device: return "from_device";
    case DmaDirection::none: return "none";
  }
  return "?";
}

struct BouncePool::Impl {
  MemoryAccess* mem = nullptr;
  uint64_t base = 0, nslots = 0;
  struct Slot {
    uint64_t orig = 0;    // first slot of a mapping: the original address
    uint32_t size = 0;    // first slot: bytes mapped
    uint32_t offset = 0;  // first slot: bounce address - slot address
    uint16_t count = 0;   // first slot: slots reserved (0 on the others)
    bool used = false;
  };
  std::vector<Slot> slots;
  struct Area {
    mutable std::mutex mu;
    uint64_t first = 0, count = 0, hint = 0, used = 0;
  };
  std::vector<Area> areas;

  // What one search looks for (Linux swiotlb_search_pool_area()'s locals).
  struct Want {
    uint64_t nslots;            // slots the mapping reserves
    uint64_t orig;              // the original address
    uint64_t alloc_align_mask;  // the reservation's alignment, at least a slot
    uint64_t iotlb_align_mask;  // original bits the slot must match (above alloc_align_mask)
    uint64_t stride;            // slots to step after an aligned slot did not fit
    uint64_t tbl_dma;           // the pool's DMA address under the boundary mask
    uint64_t max_slots;         // slots per boundary window (a power of two)
  };

  // Linux swiotlb_search_pool_area(): from the hint, the first slot whose DMA address is
  // aligned under alloc_align_mask and matches the original under iotlb_align_mask, that
  // starts a free run of nslots within one segment and that does not cross the boundary
  // (iommu_is_span_boundary()); an aligned slot that does not fit moves the search on by
  // the stride, any other by one slot, wrapping at the area's end.
  bool search(Area& a, const Want& w, uint64_t* out) {
    const uint64_t shift = (w.tbl_dma + kSlotSize - 1) >> kSlotShift;  // nr_slots(tbl_dma_addr)
    uint64_t index = a.hint;
    const auto wrap = [&](uint64_t i) { return i >= a.count ? 0 : i; };  // wrap_area_index()
    for (uint64_t checked = 0; checked < a.count;) {
      const uint64_t slot = a.first + index;
      const uint64_t tlb = w.tbl_dma + slot * kSlotSize;
      if ((tlb & w.alloc_align_mask) != 0 || (tlb & w.iotlb_align_mask) != (w.orig & w.iotlb_align_mask)) {
        index = wrap(index + 1);
        ++checked;
        continue;
      }
      // iommu_is_span_boundary(slot, nslots, shift, max_slots), then the free run, which
      // Linux's per-slot free count keeps within one segment.
      const bool crosses = ((shift + slot) & (w.max_slots - 1)) + w.nslots > w.max_slots;
      if (!crosses && slot % kSegmentSlots + w.nslots <= kSegmentSlots) {
        bool free = true;
        for (uint64_t k = 0; k < w.nslots && free; ++k) free = !slots[slot + k].used;
        if (free) {
          *out = slot;
          a.hint = wrap(index + w.nslots);
          return true;
        }
      }
      index = wrap(index + w.stride);
      checked += w.stride;
    }
    return false;
  }

  Status zero(PhysAddr a, uint64_t len) {
    static const uint8_t zeros[4096] = {};
    for (uint64_t done = 0; done < len;) {
      const uint64_t k = std::min<uint64_t>(len - done, sizeof zeros);
      PHYSR_RETURN_IF_ERROR(mem->write(a + done, std::span<const uint8_t>(zeros, k)));
      done += k;
    }
    return {};
  }

  // The first slot of the mapping at `bounce` of `size` bytes.
  Result<uint64_t> lookup(PhysAddr bounce, uint64_t size) const {
    const uint64_t b = bounce.value();
    if (b < base || b >= base + nslots * kSlotSize)
      return make_error(EINVAL, "bounce address " + format_hex(b) + " is not in the bounce pool");
    uint64_t slot = (b - base) / kSlotSize;
    const Area& a = areas[slot / areas[0].count];
    std::lock_guard lock(a.mu);
    // With an alloc_align_mask the offset can exceed a slot: the mapping's first slot is
    // then the nearest one before that starts a run (runs never cross a segment).
    while (slots[slot].used && slots[slot].count == 0 && slot % kSegmentSlots != 0) --slot;
    const Slot& s = slots[slot];
    if (!s.used || s.count == 0 || base + slot * kSlotSize + s.offset != b || s.size != size)
      return make_error(EINVAL, "bounce address " + format_hex(b) + " (+" + std::to_string(size) +
                                    " bytes) is not a mapping of the bounce pool (already unmapped, or another size)");
    return slot;
  }
};

BouncePool::BouncePool(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BouncePool::~BouncePool() = default;

Result<std::unique_ptr<BouncePool>> BouncePool::create(MemoryAccess& memory, const BounceOptions& o) {
  const uint64_t seg = kSlotSize * kSegmentSlots;
  if (o.size == 0 || o.size % seg != 0 || o.areas == 0 || (o.areas & (o.areas - 1)) != 0 || (o.size / seg) % o.areas != 0)
    return make_error(EINVAL, "bounce pool of " + std::to_string(o.size) + " bytes in " + std::to_string(o.areas) +
                                  " areas: the size must be whole 256 KiB segments, split evenly over a power-of-two number of areas");
  if (o.base.value() % seg != 0)
    return make_error(EINVAL, "bounce pool base " + format_hex(o.base.value()) + " is not 256 KiB aligned");
  if (!memory.is_host_ram(PhysSpan{o.base, o.size}))
    return make_error(EINVAL, "bounce pool [" + format_hex(o.base.value()) + ", +" + format_hex(o.size) + ") is not inside one host RAM region");
  auto impl = std::make_unique<Impl>();
  impl->mem = &memory;
  impl->base = o.base.value();
  impl->nslots = o.size / kSlotSize;
  impl->slots.resize(impl->nslots);
  impl->areas = std::vector<Impl::Area>(o.areas);
  const uint64_t per = impl->nslots / o.areas;
  for (unsigned i = 0; i < o.areas; ++i) {
    impl->areas[i].first = i * per;
    impl->areas[i].count = per;
  }
  return std::unique_ptr<BouncePool>(new BouncePool(std::move(impl)));
}

Result<PhysAddr> BouncePool::map(PhysAddr orig, uint64_t size, DmaDirection dir, const BounceParams& p) {
  Impl& m = *impl_;
  const uint64_t alloc_align_mask = p.alloc_align_mask, min_align_mask = p.min_align_mask;
  if (dir == DmaDirection::none) return make_error(EINVAL, "bounce map of " + format_hex(orig.value()) + ": direction none");
  if (alloc_align_mask != 0 && ((alloc_align_mask & (alloc_align_mask + 1)) != 0 || alloc_align_mask < kSlotSize - 1 ||
                                alloc_align_mask >= kMaxMapping))
    return make_error(EINVAL, "bounce map of " + format_hex(orig.value()) + ": alloc_align_mask " + format_hex(alloc_align_mask) +
                                  " must be 2^k - 1 between 2 KiB - 1 and 128 KiB - 1");
  // Linux swiotlb_align_offset(dev, alloc_align_mask, orig): the original's bits under
  // min_align_mask within a slot, or within the alloc_align_mask unit when one is given
  // (iommu_dma_map_swiotlb() for untrusted devices, so the IOMMU can map the unit as it
  // is). Without a min_align_mask the bounce starts its reservation.
  const uint64_t offset = orig.value() & min_align_mask & (alloc_align_mask | (kSlotSize - 1));
  if (size == 0 || size > kMaxMapping || size + offset > kMaxMapping)
    return make_error(EINVAL, "bounce map of " + format_hex(orig.value()) + " (+" + std::to_string(size) +
                                  " bytes): a mapping holds 1 byte to 256 KiB (less the alignment offset)");
  // swiotlb_tbl_map_single(): ALIGN(size + offset, alloc_align_mask + 1) bytes reserved.
  const uint64_t reserved = (size + offset + alloc_align_mask) & ~alloc_align_mask;
  if (reserved > kMaxMapping)  // swiotlb_find_slots(): no segment holds it
    return make_error(EINVAL, "bounce map of " + format_hex(orig.value()) + " (+" + std::to_string(size) + " bytes): " +
                                  std::to_string(reserved) + " bytes with the alignment exceed a 256 KiB segment");
  Impl::Want w{};
  w.nslots = (reserved + kSlotSize - 1) >> kSlotShift;
  w.orig = orig.value();
  // swiotlb_search_pool_area(): mappings of a page or more start page-aligned only when
  // the device asks for no alignment at all; the reservation is at least slot-aligned;
  // min_align_mask bits kept by the offset are not matched again.
  w.alloc_align_mask = alloc_align_mask;
  if (alloc_align_mask == 0 && min_align_mask == 0 && reserved >= kPageSize) w.alloc_align_mask = kPageSize - 1;
  w.alloc_align_mask |= kSlotSize - 1;
  w.iotlb_align_mask = min_align_mask & ~w.alloc_align_mask;
  w.stride = (std::max(w.alloc_align_mask, w.iotlb_align_mask) >> kSlotShift) + 1;  // get_max_slots()
  w.tbl_dma = (m.base + p.dma_offset) & p.seg_boundary_mask;
  w.max_slots = (p.seg_boundary_mask >> kSlotShift) + 1;
  if (w.nslots > w.max_slots)
    return make_error(EINVAL, "bounce map of " + format_hex(orig.value()) + " (+" + std::to_string(size) +
                                  " bytes): larger than the segment boundary mask " + format_hex(p.seg_boundary_mask) + " allows");
  const uint64_t n = w.nslots;
  uint64_t slot = 0;
  bool found = false;
  const int cpu = sched_getcpu();
  const size_t start = cpu < 0 ? 0 : static_cast<size_t>(cpu) % m.areas.size();
  for (size_t k = 0; k < m.areas.size() && !found; ++k) {
    Impl::Area& a = m.areas[(start + k) % m.areas.size()];
    std::lock_guard lock(a.mu);
    if (a.count - a.used < n) continue;
    if (m.search(a, w, &slot)) {
      found = true;
      for (uint64_t i = 0; i < n; ++i) m.slots[slot + i] = Impl::Slot{0, 0, 0, 0, true};
      m.slots[slot] = Impl::Slot{orig.value(), static_cast<uint32_t>(size), static_cast<uint32_t>(offset),
                                 static_cast<uint16_t>(n), true};
      a.used += n;
    }
  }
  if (!found)
    return make_error(ENOMEM, "bounce pool full: no run of " + std::to_string(n) + " free slots for " + format_hex(orig.value()) +
                                  " (+" + std::to_string(size) + " bytes)");
  const uint64_t first = m.base + slot * kSlotSize;
  const PhysAddr bounce(first + offset);
  // Linux swiotlb_tbl_map_single() copies the original in whatever the direction, so a
  // device that writes less than the whole buffer cannot make unmap copy stale pool bytes
  // over the original (the CVE-2022-0854 fix).
  Status st = m.mem->copy(bounce, orig, size);
  if (st && alloc_align_mask) {
    // iommu_dma_map_swiotlb(): an untrusted device sees the whole granules, so the padding
    // before and after the data is zeroed rather than left with older bounces' bytes.
    st = m.zero(PhysAddr(first), offset);
    if (st) st = m.zero(bounce + size, n * kSlotSize - offset - size);
  }
  if (!st) {
    (void)unmap(bounce, size, DmaDirection::to_device);  // release, copying nothing back
    return std::move(st).error();
  }
  return bounce;
}

Status BouncePool::unmap(PhysAddr bounce, uint64_t size, DmaDirection dir) {
  Impl& m = *impl_;
  PHYSR_ASSIGN_OR_RETURN(const uint64_t first, m.lookup(bounce, size));
  Impl::Area& a = m.areas[first / m.areas[0].count];
  Impl::Slot s;
  {
    std::lock_guard lock(a.mu);
    s = m.slots[first];
  }
  Status copied;
  if (dir == DmaDirection::from_device || dir == DmaDirection::bidirectional)
    copied = m.mem->copy(PhysAddr(s.orig), bounce, size);
  std::lock_guard lock(a.mu);
  for (uint64_t i = 0; i < s.count; ++i) m.slots[first + i] = Impl::Slot{};
  a.used -= s.count;
  // Unlike Linux, which moves its index on round the area, the next search starts at the
  // run just freed: its lines are still in cache (256 KiB bounces went from 63% to ~90% of
  // memcpy bandwidth with this).
  a.hint = first - a.first;
  return copied;
}

Status BouncePool::sync_for_cpu(PhysAddr bounce, uint64_t size, DmaDirection dir) {
  PHYSR_ASSIGN_OR_RETURN(const uint64_t first, impl_->lookup(bounce, size));
  if (dir == DmaDirection::from_device || dir == DmaDirection::bidirectional)
    return impl_->mem->copy(PhysAddr(impl_->slots[first].orig), bounce, size);
  return {};
}

Status BouncePool::sync_for_device(PhysAddr bounce, uint64_t size, DmaDirection dir) {
  PHYSR_ASSIGN_OR_RETURN(const uint64_t first, impl_->lookup(bounce, size));
  if (dir == DmaDirection::to_device || dir == DmaDirection::bidirectional)
    return impl_->mem->copy(bounce, PhysAddr(impl_->slots[first].orig), size);
  return {};
}

bool BouncePool::contains(PhysAddr a) const noexcept {
  return a.value() >= impl_->base && a.value() < impl_->base + impl_->nslots * kSlotSize;
}

uint64_t BouncePool::used_slots() const {
  uint64_t used = 0;
  for (auto& a : impl_->areas) {
    std::lock_guard lock(a.mu);
    used += a.used;
  }
  return used;
}

uint64_t BouncePool::total_slots() const noexcept { return impl_->nslots; }

}  // namespace physr
