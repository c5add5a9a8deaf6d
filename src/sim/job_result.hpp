// What every kind of job ends with (NVMe jobs in job.cpp, network jobs in net.cpp).
// Private to the sim module.
#pragma once

#include <vector>

#include "physr/sim.hpp"

namespace physr::sim::detail {

/// Fills the common part of a job's result from its run: bytes and I/O count, simulated
/// time and throughput, latency p50/p99 (nearest rank of `lat`, in ns; sorted here), the
/// bytes over every resource that carried any (and those through root complexes and
/// host memory), and the IOMMU faults recorded since `faults_before`.
void finish_result(JobResult& out, const Machine& m, const Simulator& sim, std::vector<double>& lat, uint64_t bytes,
                   uint64_t ios, size_t faults_before);

}  // namespace physr::sim::detail
