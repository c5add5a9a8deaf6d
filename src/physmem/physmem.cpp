#include "physr/physmem.hpp"

#include <absl/container/flat_hash_map.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <utility>

// MADV_COLLAPSE (Linux 6.1) is in the kernel's headers before glibc's.
#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25
#endif

namespace physr {

namespace {
// Backing is counted and looked up in 64 KiB chunks, carved from 2 MiB slabs of address
// space (a huge page each where the kernel gives one), themselves carved from arenas
// mapped a few at a time. Memory the kernel maps on first touch, so an untouched chunk
// costs no memory.
constexpr unsigned kChunkShift = 16;  // 64 KiB of backing per chunk
constexpr uint64_t kChunk = uint64_t{1} << kChunkShift;
constexpr unsigned kSlabShift = 21;  // 2 MiB: an x86-64 and arm64 (4 KiB granule) huge page
constexpr uint64_t kSlab = uint64_t{1} << kSlabShift;
constexpr uint32_t kChunksPerSlab = 1u << (kSlabShift - kChunkShift);  // 32
constexpr uint32_t kFullSlab = ~uint32_t{0};
static_assert(kChunksPerSlab == 32, "a slab's chunks are one 32-bit mask");
constexpr uint64_t kSlabsPerArena = 32;  // 64 MiB of address space per mapping
constexpr uint64_t kLimit = kPhysAddrLimit;

// A 2 MiB slab's backing and which of its chunks exist.
struct Slab {
  uint8_t* bytes = nullptr;
  uint32_t chunks = 0;  // bit k: chunk k has backing
};

}  // namespace

struct PhysMemory::Impl {
  mutable std::shared_mutex regions_mu;
  std::map<uint64_t, PhysRegion> regions;  // base -> region

  mutable std::mutex chunks_mu;
  absl::flat_hash_map<uint64_t, Slab> slabs;  // slab index (physical address >> 21) -> slab
  std::vector<std::pair<void*, size_t>> arenas;  // mappings, unmapped with the PhysMemory
  uint8_t* next_slab = nullptr;  // the current arena's next free slab, 2 MiB aligned
  uint64_t slabs_left = 0;
  std::atomic<uint64_t> backed{0};

  ~Impl() {
    for (const auto& [p, n] : arenas) munmap(p, n);
  }

  const PhysRegion* find(uint64_t a) const {
    auto it = regions.upper_bound(a);
    if (it == regions.begin()) return nullptr;
    --it;
    return it->second.span.contains(PhysAddr(a)) ? &it->second : nullptr;
  }
  // The first address of [a, a + len) outside every region, if any.
  bool covered(uint64_t a, uint64_t len, uint64_t* hole) const {
    std::shared_lock lock(regions_mu);
    if (len == 0) return true;
    if (a >= kLimit || len > kLimit - a) {
      *hole = a >= kLimit ? a : kLimit;
      return false;
    }
    uint64_t p = a;
    while (p < a + len) {
      const PhysRegion* r = find(p);
      if (!r) {
        *hole = p;
        return false;
      }
      p = r->span.base.value() + r->span.size;
    }
    return true;
  }
  // A fresh 2 MiB-aligned slab of zeroed address space (an arena of kSlabsPerArena mapped
  // when the last is used up, one extra slab's worth to align it). Aborts if the address
  // space is exhausted, as the allocation it replaces (operator new) did.
  uint8_t* new_slab() {
    if (slabs_left == 0) {
      const size_t n = (kSlabsPerArena + 1) * kSlab;
      void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        std::fprintf(stderr, "physr: physical memory backing: mmap of %zu bytes failed\n", n);
        std::abort();
      }
      arenas.emplace_back(p, n);
      next_slab = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kSlab - 1) & ~uintptr_t{kSlab - 1});
      slabs_left = kSlabsPerArena;
    }
    --slabs_left;
    return std::exchange(next_slab, next_slab + kSlab);
  }
  uint8_t* chunk(uint64_t index, bool create) {
    std::lock_guard lock(chunks_mu);
    const uint64_t s = index >> (kSlabShift - kChunkShift);
    const uint32_t bit = uint32_t{1} << (index & (kChunksPerSlab - 1));
    auto it = slabs.find(s);
    if (it == slabs.end()) {
      if (!create) return nullptr;
      it = slabs.emplace(s, Slab{new_slab(), 0}).first;
    }
    Slab& slab = it->second;
    uint8_t* p = slab.bytes + ((index & (kChunksPerSlab - 1)) << kChunkShift);
    if (slab.chunks & bit) return p;
    if (!create) return nullptr;
    slab.chunks |= bit;
    backed.fetch_add(kChunk, std::memory_order_relaxed);
    // A slab whose every chunk has backing costs 2 MiB whatever its pages: it becomes one
    // huge page (one TLB entry instead of 512; the model's DMA streams through whole
    // slabs), where the kernel can collapse it (MADV_COLLAPSE, Linux 6.1; otherwise it
    // stays in 4 KiB pages, which is only slower).
    if (slab.chunks == kFullSlab) collapse(slab.bytes);
    return p;
  }
  static void collapse([[maybe_unused]] uint8_t* slab) noexcept {
#ifdef MADV_COLLAPSE
    (void)madvise(slab, kSlab, MADV_COLLAPSE);  // EINVAL before 6.1, EAGAIN/ENOMEM without a free huge page: kept as is
#endif
  }
  // Chunk `index`'s backing and, in *run, the bytes from its start to the end of the
  // backed chunks that follow it in its slab (contiguous in the process too); null if it
  // has none.
  const uint8_t* backed_run(uint64_t index, uint64_t* run) const {
    std::lock_guard lock(chunks_mu);
    const auto it = slabs.find(index >> (kSlabShift - kChunkShift));
    if (it == slabs.end()) return nullptr;
    const uint32_t k = index & (kChunksPerSlab - 1);
    *run = static_cast<uint64_t>(std::countr_one(it->second.chunks >> k)) << kChunkShift;
    return *run != 0 ? it->second.bytes + (uint64_t{k} << kChunkShift) : nullptr;
  }
  // Walks [a, a + len) chunk by chunk, handing `f` each piece: writable (backing created),
  // or read-only with never-written chunks as zeros. The first error `f` returns stops it.
  template <class F>
  Status produce(uint64_t a, uint64_t len, F&& f) {
    for (uint64_t done = 0; done < len;) {
      const uint64_t off = a & (kChunk - 1), n = std::min<uint64_t>(kChunk - off, len - done);
      PHYSR_RETURN_IF_ERROR(f(done, std::span<uint8_t>(chunk(a >> kChunkShift, true) + off, n)));
      a += n;
      done += n;
    }
    return {};
  }
  template <class F>
  Status consume(uint64_t a, uint64_t len, F&& f) {
    static const uint8_t kZeros[kChunk] = {};
    for (uint64_t done = 0; done < len;) {
      const uint64_t off = a & (kChunk - 1), n = std::min<uint64_t>(kChunk - off, len - done);
      const uint8_t* c = chunk(a >> kChunkShift, false);
      PHYSR_RETURN_IF_ERROR(f(done, std::span<const uint8_t>(c ? c + off : kZeros, n)));
      a += n;
      done += n;
    }
    return {};
  }
};

PhysMemory::PhysMemory() : impl_(std::make_unique<Impl>()) {}
PhysMemory::~PhysMemory() = default;

Status PhysMemory::add_region(PhysRegion r) {
  const uint64_t b = r.span.base.value(), s = r.span.size;
  if (s == 0 || ((b | s) & (kPageSize - 1)) != 0 || b >= kLimit || s > kLimit - b)
    return make_error(EINVAL, "physical region '" + r.name + "' [" + format_hex(b) + ", +" + format_hex(s) +
                                  "): must be non-empty, 4 KiB aligned and below 2^52");
  std::unique_lock lock(impl_->regions_mu);
  auto it = impl_->regions.lower_bound(b);
  const PhysRegion* clash = nullptr;
  if (it != impl_->regions.end() && it->first < b + s) clash = &it->second;
  if (!clash && it != impl_->regions.begin() && std::prev(it)->second.span.overlaps(r.span)) clash = &std::prev(it)->second;
  if (clash)
    return make_error(EEXIST, "physical region '" + r.name + "' [" + format_hex(b) + ", +" + format_hex(s) + ") overlaps '" +
                                  clash->name + "'");
  impl_->regions.emplace(b, std::move(r));
  return {};
}

const PhysRegion* PhysMemory::region_of(PhysAddr a) const noexcept {
  std::shared_lock lock(impl_->regions_mu);
  return impl_->find(a.value());
}

bool PhysMemory::is_host_ram(PhysSpan span) const noexcept {
  const PhysRegion* r = region_of(span.base);
  return r && r->kind == PhysRegion::Kind::host_ram && r->span.contains(span);
}

std::vector<PhysRegion> PhysMemory::regions() const {
  std::shared_lock lock(impl_->regions_mu);
  std::vector<PhysRegion> out;
  for (const auto& [b, r] : impl_->regions) out.push_back(r);
  return out;
}

namespace {
// EFAULT naming the operation and the first address of [a, a + len) outside every region.
Status check_covered(const PhysMemory::Impl& m, const char* op, uint64_t a, uint64_t len) {
  uint64_t hole;
  if (m.covered(a, len, &hole)) return {};
  return make_error(EFAULT, std::string(op) + " of " + std::to_string(len) + " bytes at " + format_hex(a) + ": " + format_hex(hole) +
                                " is not in any physical region");
}
}  // namespace

Status PhysMemory::fill(PhysAddr a, uint64_t len, const std::function<Status(uint64_t, std::span<uint8_t>)>& produce) {
  PHYSR_RETURN_IF_ERROR(check_covered(*impl_, "fill", a.value(), len));
  return impl_->produce(a.value(), len, produce);
}

Status PhysMemory::visit(PhysAddr a, uint64_t len, const std::function<Status(uint64_t, std::span<const uint8_t>)>& consume) const {
  PHYSR_RETURN_IF_ERROR(check_covered(*impl_, "visit", a.value(), len));
  return impl_->consume(a.value(), len, consume);
}

std::span<const uint8_t> PhysMemory::backed(PhysAddr a) const noexcept {
  uint64_t end = 0;
  {
    std::shared_lock lock(impl_->regions_mu);
    const PhysRegion* r = impl_->find(a.value());
    if (!r) return {};
    end = r->span.base.value() + r->span.size;
  }
  uint64_t run = 0;
  const uint8_t* c = impl_->backed_run(a.value() >> kChunkShift, &run);
  if (!c) return {};
  const uint64_t off = a.value() & (kChunk - 1);
  return {c + off, std::min<uint64_t>(run - off, end - a.value())};
}

Status PhysMemory::write(PhysAddr a, std::span<const uint8_t> bytes) {
  PHYSR_RETURN_IF_ERROR(check_covered(*impl_, "write", a.value(), bytes.size()));
  return impl_->produce(a.value(), bytes.size(), [&](uint64_t off, std::span<uint8_t> piece) {
    std::memcpy(piece.data(), bytes.data() + off, piece.size());
    return Status{};
  });
}

Status PhysMemory::read(PhysAddr a, std::span<uint8_t> out) const {
  PHYSR_RETURN_IF_ERROR(check_covered(*impl_, "read", a.value(), out.size()));
  return impl_->consume(a.value(), out.size(), [&](uint64_t off, std::span<const uint8_t> piece) {
    std::memcpy(out.data() + off, piece.data(), piece.size());
    return Status{};
  });
}

Result<std::optional<uint64_t>> PhysMemory::mismatch(PhysAddr a, std::span<const uint8_t> expected) const {
  PHYSR_RETURN_IF_ERROR(check_covered(*impl_, "compare", a.value(), expected.size()));
  std::optional<uint64_t> at;
  const Status st = impl_->consume(a.value(), expected.size(), [&](uint64_t off, std::span<const uint8_t> piece) -> Status {
    const uint8_t* want = expected.data() + off;
    if (std::memcmp(piece.data(), want, piece.size()) == 0) return {};  // vectorised; the byte is sought only on a difference
    at = off + static_cast<uint64_t>(std::mismatch(piece.begin(), piece.end(), want).first - piece.begin());
    return make_error(ECANCELED, "found");  // stops the walk
  });
  if (!at) PHYSR_RETURN_IF_ERROR(st);  // with `at` set, st is only the sentinel that stopped the walk
  return at;
}

Status PhysMemory::copy(PhysAddr dst, PhysAddr src, uint64_t len) {
  uint64_t hole;
  if (!impl_->covered(src.value(), len, &hole) || !impl_->covered(dst.value(), len, &hole))
    return make_error(EFAULT, "copy of " + std::to_string(len) + " bytes " + format_hex(src.value()) + " -> " + format_hex(dst.value()) +
                                  ": " + format_hex(hole) + " is not in any physical region");
  // Chunk by chunk on both sides; a never-written source chunk copies zeros.
  uint64_t s = src.value(), d = dst.value(), left = len;
  while (left != 0) {
    const uint64_t n = std::min({left, kChunk - (s & (kChunk - 1)), kChunk - (d & (kChunk - 1))});
    const uint8_t* from = impl_->chunk(s >> kChunkShift, false);
    uint8_t* to = impl_->chunk(d >> kChunkShift, true) + (d & (kChunk - 1));
    if (from) std::memmove(to, from + (s & (kChunk - 1)), n);
    else std::memset(to, 0, n);
    s += n;
    d += n;
    left -= n;
  }
  return {};
}

uint64_t PhysMemory::backed_bytes() const noexcept { return impl_->backed.load(std::memory_order_relaxed); }

}  // namespace physr
