// An IOMMU domain: I/O page table, IOTLB and invalidation, on top of the IOVA allocator.
#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "physr/iommu.hpp"

namespace physr {

namespace {
// The permission bits as the page-table entries store them.
constexpr uint8_t kPermRW = kIommuReadWrite.bits(), kPermMmio = kIommuMmio.bits();

// Entry layout (x86-64 second-level / Arm64 stage-1 in spirit): bit 0 present, bits 1-2
// read/write, bit 3 MMIO, bit 7 leaf, bits 12-51 the output address or the next table.
constexpr uint64_t kPresent = 1, kPermShift = 1, kLeafBit = 0x80;
constexpr uint64_t kAddrMask = 0x000f'ffff'ffff'f000;
constexpr unsigned kLevels = 4;
constexpr uint64_t kIovaLimit = uint64_t{1} << 48;
constexpr uint64_t kPhysLimit = kPhysAddrLimit;
constexpr size_t kIotlbEntries = 4096;

// Page-aligned like a hardware page table, so a table pointer has bits 0-11 clear and fits
// the entry's address field.
struct alignas(4096) Table {
  std::atomic<uint64_t> e[512];
};
static_assert(sizeof(Table) == 4096);

constexpr unsigned shift_of(unsigned level) { return 12 + 9 * level; }  // 0: 4 KiB ... 3: 512 GiB
inline unsigned index_of(uint64_t iova, unsigned level) { return static_cast<unsigned>((iova >> shift_of(level)) & 511); }

}  // namespace

struct IoDomain::Impl {
  Table root{};  // level 3
  mutable std::mutex mu;  // map / unmap
  std::vector<Table*> tables;
  bool strict = true;
  size_t fq_entries = 256;
  uint64_t leaves[3] = {0, 0, 0};

  mutable std::mutex tlb_mu;  // IOTLB and flush queue
  std::unordered_map<uint64_t, IoTranslation> iotlb;  // 4 KiB page -> translation of its base
  std::vector<std::pair<DmaAddr, uint64_t>> fq;
  uint64_t flushes = 0, queued = 0;

  ~Impl() {
    for (Table* t : tables) delete t;
  }

  // The leaf mapping `iova`, with its level, or nullopt.
  bool find_leaf(uint64_t iova, unsigned* level_out, uint64_t* entry_out) const {
    const Table* t = &root;
    for (unsigned level = kLevels - 1;; --level) {
      const uint64_t e = t->e[index_of(iova, level)].load(std::memory_order_acquire);
      if (!(e & kPresent)) return false;
      if ((e & kLeafBit) || level == 0) {
        *level_out = level;
        *entry_out = e;
        return true;
      }
      t = reinterpret_cast<const Table*>(e & kAddrMask);
    }
  }

  // The last level-0 table map_one() reached and the 2 MiB of IOVA it covers: consecutive
  // 4 KiB leaves (the common map_sg case) skip the three upper levels. Under mu.
  Table* last_l0 = nullptr;
  uint64_t last_l0_base = ~uint64_t{0};

  // Places one leaf of `level` at iova. 1: done; 0: a table occupies the slot (try a smaller
  // leaf); -1: something is mapped there already.
  int map_one(uint64_t iova, uint64_t phys, unsigned level, uint8_t perm) {
    PHYSR_ASSERT(level < kLevels - 1, "leaves are 4 KiB, 2 MiB or 1 GiB (levels 0 to 2)");
    PHYSR_ASSERT(((iova | phys) & ((uint64_t{1} << shift_of(level)) - 1)) == 0 && (phys & ~kAddrMask) == 0,
                 "a leaf's IOVA and output address are aligned to its size and fit the entry");
    if (level == 0 && (iova >> 21) == last_l0_base) {
      PHYSR_ASSERT(last_l0 != nullptr, "a cached level-0 base comes with its table");
      std::atomic<uint64_t>& slot = last_l0->e[index_of(iova, 0)];
      if (slot.load(std::memory_order_relaxed) & kPresent) return -1;
      slot.store(phys | (uint64_t{perm} << kPermShift) | kLeafBit | kPresent, std::memory_order_release);
      ++leaves[0];
      return 1;
    }
    Table* t = &root;
    for (unsigned l = kLevels - 1; l > level; --l) {
      std::atomic<uint64_t>& slot = t->e[index_of(iova, l)];
      uint64_t e = slot.load(std::memory_order_relaxed);
      if ((e & kPresent) && (e & kLeafBit)) return -1;
      if (!(e & kPresent)) {
        auto* nt = new Table{};
        PHYSR_ASSERT((reinterpret_cast<uint64_t>(nt) & ~kAddrMask) == 0, "a table's address fits the entry's address field");
        tables.push_back(nt);
        e = reinterpret_cast<uint64_t>(nt) | kPresent;
        slot.store(e, std::memory_order_release);  // publish after zero-filling
      }
      t = reinterpret_cast<Table*>(e & kAddrMask);
    }
    if (level == 0) {
      last_l0 = t;
      last_l0_base = iova >> 21;
    }
    std::atomic<uint64_t>& slot = t->e[index_of(iova, level)];
    const uint64_t e = slot.load(std::memory_order_relaxed);
    if (e & kPresent) return (e & kLeafBit) || level == 0 ? -1 : 0;
    slot.store(phys | (uint64_t{perm} << kPermShift) | kLeafBit | kPresent, std::memory_order_release);
    ++leaves[level];
    return 1;
  }

  void clear_leaf(uint64_t iova, unsigned level) {
    Table* t = &root;
    for (unsigned l = kLevels - 1; l > level; --l) {
      const uint64_t e = t->e[index_of(iova, l)].load(std::memory_order_relaxed);
      PHYSR_ASSERT((e & kPresent) && !(e & kLeafBit), "the levels above a leaf are tables");
      t = reinterpret_cast<Table*>(e & kAddrMask);
    }
    std::atomic<uint64_t>& slot = t->e[index_of(iova, level)];
    PHYSR_ASSERT((slot.load(std::memory_order_relaxed) & (kPresent | kLeafBit)) == (kPresent | kLeafBit), "only a present leaf is cleared");
    PHYSR_ASSERT(leaves[level] > 0, "a level's leaf count never underflows");
    slot.store(0, std::memory_order_release);
    --leaves[level];
  }

  // Visits the leaves over [a, end) in address order, descending once per table and then
  // reading its entries in sequence (a 1 MiB unmap is two walks, not 256).
  // f(slot, level, addr, entry) returns false to stop; a hole calls hole(addr) and stops.
  template <class F, class H>
  bool scan(uint64_t a, uint64_t end, F&& f, H&& hole) const {
    while (a < end) {
      const Table* t = &root;
      unsigned level = kLevels - 1;
      for (;;) {
        const uint64_t e = t->e[index_of(a, level)].load(std::memory_order_acquire);
        if (!(e & kPresent)) {
          hole(a);
          return false;
        }
        if ((e & kLeafBit) || level == 0) break;
        t = reinterpret_cast<const Table*>(e & kAddrMask);
        --level;
      }
      const uint64_t page = uint64_t{1} << shift_of(level);
      for (unsigned i = index_of(a, level); i < 512 && a < end; ++i) {
        const uint64_t e = t->e[i].load(std::memory_order_acquire);
        if (!(e & kPresent)) {
          hole(a);
          return false;
        }
        if (!(e & kLeafBit) && level != 0) break;  // a table below: descend again
        if (!f(const_cast<std::atomic<uint64_t>&>(t->e[i]), level, a, e)) return false;
        a = (a & ~(page - 1)) + page;
      }
    }
    return true;
  }

  // Removes [iova, iova + size), all mapped by whole leaves (checked by the caller).
  void unmap_locked(uint64_t iova, uint64_t size) {
    (void)scan(iova, iova + size, [&](std::atomic<uint64_t>& slot, unsigned level, uint64_t, uint64_t) {
      PHYSR_ASSERT(level < kLevels - 1 && leaves[level] > 0, "an unmapped leaf was counted at its level");
      slot.store(0, std::memory_order_release);
      --leaves[level];
      return true;
    }, [](uint64_t) {});
  }

  // Undoes a partial map: clears whatever leaves exist in [iova, iova + size).
  void clear_mapped_locked(uint64_t iova, uint64_t size) {
    for (uint64_t a = iova; a < iova + size;) {
      unsigned level;
      uint64_t e;
      if (!find_leaf(a, &level, &e)) {
        a += 4096;
        continue;
      }
      clear_leaf(a, level);
      a += uint64_t{1} << shift_of(level);
    }
  }

  Status map_locked(uint64_t a0, uint64_t p0, uint64_t size, uint8_t perm, uint64_t* done_out);

  void invalidate_range_locked(uint64_t iova, uint64_t size) {  // tlb_mu held
    if (iotlb.empty()) return;
    if (size / 4096 > iotlb.size()) {
      std::erase_if(iotlb, [&](const auto& kv) { return (kv.first << 12) - iova < size; });
    } else {
      for (uint64_t a = iova; a < iova + size; a += 4096) iotlb.erase(a >> 12);
    }
  }
};

IoDomain::IoDomain(std::unique_ptr<Impl> impl, std::unique_ptr<IovaAllocator> iova)
    : impl_(std::move(impl)), iova_(std::move(iova)) {}
IoDomain::~IoDomain() = default;

Result<std::unique_ptr<IoDomain>> IoDomain::create(const IoDomainOptions& o) {
  if (o.iova.granule != 4096) return make_error(EINVAL, "IOMMU domain: the IOVA granule must be 4 KiB (the smallest leaf)");
  if (o.iova.end > kIovaLimit) return make_error(EINVAL, "IOMMU domain: IOVA space ends above 2^48");
  if (o.flush_queue_entries == 0) return make_error(EINVAL, "IOMMU domain: the flush queue needs at least one entry");
  PHYSR_ASSIGN_OR_RETURN(auto iova, IovaAllocator::create(o.iova));
  auto impl = std::make_unique<Impl>();
  impl->strict = o.strict;
  impl->fq_entries = o.flush_queue_entries;
  return std::unique_ptr<IoDomain>(new IoDomain(std::move(impl), std::move(iova)));
}

bool IoDomain::strict() const noexcept { return impl_->strict; }

namespace {
// The hot check is a few compares; the message is built only when it fails.
inline bool map_args_ok(uint64_t a0, uint64_t p0, uint64_t size, uint8_t perm) {
  // Branch-free: one test for the batch's hot loop instead of eight.
  const bool bad = (((a0 | p0 | size) & 4095) != 0) | (size == 0) | ((perm & kPermRW) == 0) |
                   ((perm & ~(kPermRW | kPermMmio)) != 0) | (a0 >= kIovaLimit) | (size > kIovaLimit - a0) |
                   (p0 >= kPhysLimit) | (size > kPhysLimit - p0);
  return !bad;
}

[[gnu::noinline, gnu::cold]] Error map_args_error(uint64_t a0, uint64_t p0, uint64_t size, uint8_t perm) {
  if (size == 0 || ((a0 | p0 | size) & 4095) != 0)
    return make_error(EINVAL, "IOMMU map of " + format_hex(a0) + " -> " + format_hex(p0) + " (+" + format_hex(size) + "): size and addresses must be non-zero multiples of 4 KiB");
  if ((perm & kPermRW) == 0 || (perm & ~(kPermRW | kPermMmio)) != 0)
    return make_error(EINVAL, "IOMMU map of " + format_hex(a0) + ": permission must be read, write or both (plus MMIO)");
  return make_error(EINVAL, "IOMMU map of " + format_hex(a0) + " -> " + format_hex(p0) + " (+" + format_hex(size) + "): beyond 48-bit IOVA or 52-bit physical space");
}

[[gnu::noinline, gnu::cold]] Error conflict_error(uint64_t a0, uint64_t size, uint64_t a) {
  return make_error(EEXIST, "IOMMU map of " + format_hex(a0) + " (+" + format_hex(size) + "): " + format_hex(a) + " is already mapped");
}
}  // namespace

Status IoDomain::Impl::map_locked(uint64_t a0, uint64_t p0, uint64_t size, uint8_t perm, uint64_t* done_out) {
  uint64_t& done = *done_out;
  done = 0;
  if (size == 4096) {  // the common map_sg case: one 4 KiB leaf
    if (map_one(a0, p0, 0, perm) < 0) return conflict_error(a0, size, a0);
    done = size;
    return {};
  }
  while (done < size) {
    const uint64_t a = a0 + done, p = p0 + done, rem = size - done;
    int r = 0;
    unsigned level = 3;
    if (((a | p) & (2 * MiB - 1)) != 0 || rem < 2 * MiB) {
      level = 0;  // only a 4 KiB leaf fits
      r = map_one(a, p, 0, perm);
    } else {
      while (level-- > 0) {
        const uint64_t page = uint64_t{1} << shift_of(level);
        if (((a | p) & (page - 1)) != 0 || rem < page) continue;
        r = map_one(a, p, level, perm);
        if (r != 0) break;  // placed, or a conflict
      }
      PHYSR_ASSERT(r != 0, "a 4 KiB leaf is always placed or conflicts (the level search ends at 0)");
    }
    if (r < 0) return conflict_error(a0, size, a);
    done += uint64_t{1} << shift_of(level);
  }
  PHYSR_ASSERT(done == size, "the leaves placed cover the request exactly");
  return {};
}

Status IoDomain::map(DmaAddr iova, PhysAddr phys, uint64_t size, IommuPerms perms) {
  const uint8_t perm = perms.bits();
  if (!map_args_ok(iova.value(), phys.value(), size, perm)) return map_args_error(iova.value(), phys.value(), size, perm);
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  uint64_t done = 0;
  Status st = m.map_locked(iova.value(), phys.value(), size, perm, &done);
  if (!st) m.clear_mapped_locked(iova.value(), done);  // nothing of this call stays mapped
  return st;
}

Status IoDomain::map_many(std::span<const IoMapOp> ops) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  for (size_t i = 0; i < ops.size(); ++i) {
    const IoMapOp& op = ops[i];
    const uint64_t a = op.iova.value(), p = op.phys.value();
    // The map_sg hot path: one 4 KiB leaf in the last-level table used just before (which
    // puts the IOVA in range), so only alignment, permission and the physical end remain.
    if (op.size == 4096 && (a >> 21) == m.last_l0_base &&
        (((a | p) & 4095) | (op.perm.bits() & ~(kPermRW | kPermMmio))) == 0 && (op.perm.bits() & kPermRW) != 0 &&
        p < kPhysLimit - 4096) [[likely]] {
      if (m.map_one(a, p, 0, op.perm.bits()) > 0) [[likely]] continue;  // map_one's cached-table path
    }
    Status st;
    uint64_t done = 0;
    if (!map_args_ok(a, p, op.size, op.perm.bits())) {
      st = map_args_error(a, p, op.size, op.perm.bits());
    } else {
      st = m.map_locked(a, p, op.size, op.perm.bits(), &done);
      if (st) continue;
    }
    m.clear_mapped_locked(a, done);
    for (size_t k = 0; k < i; ++k) m.unmap_locked(ops[k].iova.value(), ops[k].size);
    return std::move(st).error().with_context("batch entry " + std::to_string(i));
  }
  return {};
}

Status IoDomain::unmap(DmaAddr iova, uint64_t size) {
  const DmaSpan one{iova, size};
  return unmap_many(std::span<const DmaSpan>(&one, 1));
}

Status IoDomain::unmap_many(std::span<const DmaSpan> ranges) {
  for (const DmaSpan& r : ranges) {
    const uint64_t a0 = r.base.value(), size = r.size;
    if (size == 0 || ((a0 | size) & 4095) != 0 || a0 >= kIovaLimit || size > kIovaLimit - a0)
      return make_error(EINVAL, "IOMMU unmap of " + format_hex(a0) + " (+" + format_hex(size) + "): not a 4 KiB-aligned range of the IOVA space");
  }
  Impl& m = *impl_;
  {
    std::lock_guard lock(m.mu);
    // Validate everything before changing anything.
    for (const DmaSpan& r : ranges) {
      const uint64_t a0 = r.base.value(), size = r.size;
      Status bad;
      m.scan(a0, a0 + size, [&](std::atomic<uint64_t>&, unsigned level, uint64_t a, uint64_t) {
        const uint64_t page = uint64_t{1} << shift_of(level);
        if ((a & (page - 1)) == 0 && a + page <= a0 + size) return true;
        bad = make_error(EINVAL, "IOMMU unmap of " + format_hex(a0) + " (+" + format_hex(size) + ") would split the " +
                                     format_size(page) + " mapping at " + format_hex(a & ~(page - 1)));
        return false;
      }, [&](uint64_t a) {
        bad = make_error(ENOENT, "IOMMU unmap of " + format_hex(a0) + " (+" + format_hex(size) + "): " + format_hex(a) + " is not mapped");
      });
      if (!bad) return bad;
    }
    for (const DmaSpan& r : ranges) m.unmap_locked(r.base.value(), r.size);
  }
  if (m.strict) {
    std::lock_guard tl(m.tlb_mu);
    for (const DmaSpan& r : ranges) m.invalidate_range_locked(r.base.value(), r.size);
    ++m.flushes;
  }
  return {};
}

Status IoDomain::free_iova(DmaAddr iova, uint64_t size) {
  Impl& m = *impl_;
  if (m.strict) return iova_->free(iova, size);
  std::vector<std::pair<DmaAddr, uint64_t>> release;
  {
    std::lock_guard tl(m.tlb_mu);
    m.fq.emplace_back(iova, size);
    ++m.queued;
    if (m.fq.size() >= m.fq_entries) {  // queue full: flush now (Linux fq_flush_iotlb)
      m.iotlb.clear();
      ++m.flushes;
      release.swap(m.fq);
    }
  }
  Status st;
  for (const auto& [a, s] : release)
    if (auto r = iova_->free(a, s); !r && st) st = r;
  return st;
}

void IoDomain::flush() {
  Impl& m = *impl_;
  std::vector<std::pair<DmaAddr, uint64_t>> release;
  {
    std::lock_guard tl(m.tlb_mu);
    m.iotlb.clear();
    ++m.flushes;
    release.swap(m.fq);
  }
  for (const auto& [a, s] : release) (void)iova_->free(a, s);
}

std::optional<IoTranslation> IoDomain::walk(DmaAddr iova) const {
  const uint64_t a = iova.value();
  if (a >= kIovaLimit) return std::nullopt;
  unsigned level;
  uint64_t e;
  if (!impl_->find_leaf(a, &level, &e)) return std::nullopt;
  const uint64_t page = uint64_t{1} << shift_of(level);
  return IoTranslation{PhysAddr((e & kAddrMask & ~(page - 1)) + (a & (page - 1))), page,
                       IommuPerms::from_bits(static_cast<uint8_t>((e >> kPermShift) & (kPermRW | kPermMmio)))};
}

std::optional<IoTranslation> IoDomain::translate(DmaAddr iova) {
  Impl& m = *impl_;
  const uint64_t a = iova.value(), key = a >> 12;
  {
    std::lock_guard tl(m.tlb_mu);
    if (auto it = m.iotlb.find(key); it != m.iotlb.end()) {
      IoTranslation t = it->second;
      t.phys += a & 4095;
      return t;
    }
  }
  auto t = walk(iova);
  if (!t) return t;
  std::lock_guard tl(m.tlb_mu);
  if (m.iotlb.size() >= kIotlbEntries) m.iotlb.clear();  // a crude but bounded IOTLB
  IoTranslation base = *t;
  base.phys = base.phys - (a & 4095);
  m.iotlb[key] = base;
  return t;
}

IoDomainStats IoDomain::stats() const {
  Impl& m = *impl_;
  IoDomainStats s;
  {
    std::lock_guard lock(m.mu);
    s.mapped_4k = m.leaves[0];
    s.mapped_2m = m.leaves[1];
    s.mapped_1g = m.leaves[2];
    s.table_pages = m.tables.size() + 1;
  }
  std::lock_guard tl(m.tlb_mu);
  s.iotlb_flushes = m.flushes;
  s.queued_frees = m.queued;
  return s;
}

}  // namespace physr
