// An NVMe namespace for the model's SSDs. Private to the sim module.
#pragma once

#include <span>
#include <vector>

#include "physr/core.hpp"

namespace physr::sim::detail {

/// A namespace backed by a sparse temporary file (deleted at once; it lives while open).
/// Blocks never written read as the factory pattern (pattern() of the job's stream), so a
/// read job over 10 GiB needs no 10 GiB of disk; written blocks are in the file, tracked per
/// block of `unit` bytes.
class Namespace {
 public:
  /// A namespace of `size` bytes in $TMPDIR (or /tmp); errors name the file and errno.
  /// ENOSPC up front, naming the folder, when `will_write` (the bytes the job writes) is
  /// more than its file system has free.
  static Result<Namespace> create(uint64_t size, uint64_t unit, uint64_t stream, uint64_t will_write = 0);
  Namespace(Namespace&& o) noexcept;
  Namespace(const Namespace&) = delete;
  Namespace& operator=(const Namespace&) = delete;
  Namespace& operator=(Namespace&&) = delete;
  ~Namespace();

  /// Reads or writes [off, off + size) within one block of `unit` bytes; EIO on a short transfer.
  Status read(uint64_t off, std::span<uint8_t> out) const;
  Status write(uint64_t off, std::span<const uint8_t> in);
  /// The index of the first byte of `have` that differs from the namespace at `off`, or
  /// have.size(): unwritten blocks compare against the pattern without generating it.
  Result<size_t> mismatch(uint64_t off, std::span<const uint8_t> have) const;

 private:
  explicit Namespace(int fd) : fd_(fd) {}
  int fd_ = -1;
  uint64_t unit_ = 1;
  uint64_t stream_ = 0;
  std::vector<bool> written_;
};

}  // namespace physr::sim::detail
