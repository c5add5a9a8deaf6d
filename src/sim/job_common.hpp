// What every kind of job shares (NVMe jobs in job.cpp, network jobs in net.cpp): its data
// pattern, its check of what landed, and how it ends. Private to the sim module.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "physr/sim.hpp"

namespace physr::sim::detail {

/// Fills `out` with the data at position `pos` of data stream `stream` (an NVMe namespace,
/// a packet sequence; one per job): each 64-bit word is its own position plus a hash of its
/// 4 KiB page and the stream, so bytes that land in the wrong place, at the wrong offset or
/// from another job differ. One add per vector, so
/// it vectorises: generating the data must not cost more than moving it.
void pattern(uint64_t stream, uint64_t pos, std::span<uint8_t> out) noexcept;
/// The index of the first byte of `have` that differs from pattern(stream, pos), or have.size().
/// Generates and compares in registers: one pass over `have`, nothing stored.
size_t pattern_mismatch(uint64_t stream, uint64_t pos, std::span<const uint8_t> have) noexcept;

/// Checks that physical memory [at, at + len) holds pattern(stream, pos), in place; EIO naming
/// `what()` (only built on failure) and the first differing address otherwise.
template <class What>
Status verify_pattern(const Machine& m, PhysAddr at, uint64_t stream, uint64_t pos, uint64_t len, const What& what) {
  uint64_t bad = len;
  const Status st = m.memory().visit(at, len, [&](uint64_t off, std::span<const uint8_t> have) -> Status {
    const size_t k = pattern_mismatch(stream, pos + off, have);
    if (k == have.size()) return {};
    bad = off + k;
    return make_error(EIO, what() + ": data mismatch at " + format_hex(at.value() + bad) + " (byte " + std::to_string(bad) + ")");
  });
  return st;
}

/// Fills the common part of a job's result from its run: bytes and I/O count, simulated
/// time and throughput, latency p50/p99 (nearest rank of `lat`, in ns; sorted here), the
/// bytes over every resource that carried any (and those through root complexes and
/// host memory), and the IOMMU faults recorded since `faults_before`.
void finish_result(JobResult& out, const Machine& m, const Simulator& sim, std::vector<double>& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before);

}  // namespace physr::sim::detail
