// physr physmem: a machine's physical memory as real bytes. Host RAM and BAR apertures are
// regions of one physical address map; each is backed by 64 KiB chunks allocated on first
// write, so a machine with 1 TiB of RAM and 64 GiB BARs costs memory in proportion to the
// bytes actually touched. The chunks of one 2 MiB-aligned physical slab are contiguous in
// the process, and a slab whose every chunk is backed becomes one huge page where the
// kernel allows (MADV_COLLAPSE), so streaming DMA through it costs no TLB misses. The DMA layer (bounce copies, through its MemoryAccess seam) and
// the machine model (device DMA engines) read and write through it, so every transfer can
// be checked byte for byte.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/dma.hpp"

namespace physr {

/// One region of the physical map.
struct PhysRegion {
  enum class Kind : uint8_t { host_ram, bar };
  PhysSpan span;
  Kind kind = Kind::host_ram;
  std::string name;  // "ram", "0000:05:00.0 BAR1", ...
};

/// Physical memory, the machine model's MemoryAccess for the DMA layer. Thread-safe; reads
/// and writes of disjoint bytes may run concurrently. `final`, so the model's own calls
/// bind statically.
class PhysMemory final : public MemoryAccess {
 public:
  PhysMemory();
  ~PhysMemory() override;
  PhysMemory(const PhysMemory&) = delete;
  PhysMemory& operator=(const PhysMemory&) = delete;

  /// Adds a region. EINVAL: empty, not 4 KiB aligned, wrapping or past kPhysAddrLimit (2^52). EEXIST: it
  /// overlaps a region (named).
  Status add_region(PhysRegion region);
  /// The region holding `a`, or nullptr. Valid while this PhysMemory lives.
  const PhysRegion* region_of(PhysAddr a) const noexcept;
  /// All regions, by address.
  std::vector<PhysRegion> regions() const;

  /// Writes bytes at `a`. EFAULT (naming the first address outside any region) if any byte
  /// lies outside the regions; nothing is written then.
  Status write(PhysAddr a, std::span<const uint8_t> bytes) override;
  /// Reads bytes at `a`; bytes never written read as zero. EFAULT as for write.
  Status read(PhysAddr a, std::span<uint8_t> out) const override;
  /// Lets `produce` write the bytes [a, a + len) straight into the backing, a piece at a
  /// time (`off` counts from `a`), so a producer (a device's media, a generator) needs no
  /// bounce through a buffer of its own. EFAULT as for write (nothing produced); the first
  /// error `produce` returns stops the walk and is returned.
  Status fill(PhysAddr a, uint64_t len, const std::function<Status(uint64_t off, std::span<uint8_t> piece)>& produce);
  /// Hands the bytes [a, a + len) to `consume` a piece at a time, in place (never-written
  /// bytes as zeros). EFAULT as for read; the first error `consume` returns stops the walk.
  Status visit(PhysAddr a, uint64_t len, const std::function<Status(uint64_t off, std::span<const uint8_t> piece)>& consume) const;
  /// The backing bytes from `a` to the end of the backed chunks that follow its 64 KiB chunk
  /// in its 2 MiB slab (or to its region's end, if that comes first), in place, for a reader
  /// that checks memory a piece at a time without a walk per piece; empty if `a` is in no
  /// region or its chunk was never written. The bytes stay
  /// valid while this PhysMemory lives (backing is never freed).
  std::span<const uint8_t> backed(PhysAddr a) const noexcept;
  /// Compares the bytes at `a` with `expected` in place (no copy): the offset of the first
  /// byte that differs, or nullopt if all match. EFAULT as for read.
  Result<std::optional<uint64_t>> mismatch(PhysAddr a, std::span<const uint8_t> expected) const;
  /// Copies len bytes from src to dst (non-overlapping), e.g. a bounce copy. EFAULT as above.
  Status copy(PhysAddr dst, PhysAddr src, uint64_t len) override;
  /// Whether `span` lies inside one host RAM region.
  bool is_host_ram(PhysSpan span) const noexcept override;

  /// Bytes of backing allocated so far (64 KiB chunks touched by writes).
  uint64_t backed_bytes() const noexcept;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace physr
