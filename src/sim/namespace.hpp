// An NVMe namespace for the model's SSDs. Private to the sim module.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <unordered_map>

#include "physr/core.hpp"

namespace physr::sim::detail {

/// Which blocks of a namespace were written, in memory that follows what was written rather
/// than the namespace's size: nothing for a namespace never written (a read job over 16 TiB
/// of 512 B blocks would need 4 GiB as one bit per block), a bitmap page per 32 Ki blocks
/// being written, and a run of whole pages once they are full (a sequential write job
/// ends with one run). Worst case (every page partly written) one bit per block.
class WrittenBlocks {
 public:
  explicit WrittenBlocks(uint64_t blocks = 0) : blocks_(blocks) {}
  /// Whether `block` was written.
  bool test(uint64_t block) const;
  /// Records `block` as written.
  void set(uint64_t block);
  /// Bytes of memory the record holds (for the memory bound's test).
  size_t memory_bytes() const noexcept;

 private:
  static constexpr unsigned kPageShift = 15;  // 32 Ki blocks: a 4 KiB bitmap
  struct Page {
    std::array<uint64_t, (uint64_t{1} << kPageShift) / 64> bits{};
    uint64_t count = 0;
  };
  bool page_full(uint64_t page) const;
  void add_full(uint64_t page);
  uint64_t blocks_;
  std::unordered_map<uint64_t, std::unique_ptr<Page>> partial_;
  std::map<uint64_t, uint64_t> full_;  // runs of full pages: first -> end
};

/// A namespace backed by a sparse temporary file (deleted at once; it lives while open),
/// made when the namespace is first written (at create() when `will_write`). Blocks never
/// written read as the factory pattern (pattern() of the job's stream), so a read job over
/// 10 GiB needs no 10 GiB of disk, and no file at all; written blocks are in the file,
/// tracked per block of `unit` bytes (WrittenBlocks: memory bounded by what was written).
class Namespace {
 public:
  /// A namespace of `size` bytes, its file in $TMPDIR (or /tmp); errors name the file and
  /// errno. With `will_write` (the bytes the job writes) the file is made now, and ENOSPC
  /// comes up front, naming the folder, when that is more than its file system has free;
  /// without it, at the first write().
  static Result<Namespace> create(uint64_t size, uint64_t unit, uint64_t stream, uint64_t will_write = 0);
  Namespace(Namespace&& o) noexcept;
  Namespace(const Namespace&) = delete;
  Namespace& operator=(const Namespace&) = delete;
  Namespace& operator=(Namespace&&) = delete;
  ~Namespace();

  /// Reads or writes [off, off + size) within one block of `unit` bytes; EIO on a short
  /// transfer; the first write of a namespace without a file makes it (create()'s errors).
  Status read(uint64_t off, std::span<uint8_t> out) const;
  Status write(uint64_t off, std::span<const uint8_t> in);
  /// The index of the first byte of `have` that differs from the namespace at `off`, or
  /// have.size(): unwritten blocks compare against the pattern without generating it.
  Result<size_t> mismatch(uint64_t off, std::span<const uint8_t> have) const;
  /// read() into `out` in pieces of `piece` bytes, each compared as it lands with `view`
  /// (the CPU's view of where the bytes should be; out.size() bytes): the index of the first
  /// byte of `view` that differs from the namespace, or view.size(). Unwritten blocks take
  /// one call for all the pieces (pattern_landed()).
  Result<size_t> read_landed(uint64_t off, std::span<uint8_t> out, std::span<const uint8_t> view, uint64_t piece) const;
  /// Bytes of memory the record of written blocks holds.
  size_t tracking_bytes() const noexcept { return written_.memory_bytes(); }

 private:
  Namespace() = default;
  Status open_file();  // the sparse file of size_ bytes, into fd_
  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t unit_ = 1;
  uint64_t stream_ = 0;
  WrittenBlocks written_;
};

}  // namespace physr::sim::detail
