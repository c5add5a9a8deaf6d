// The machine's host memory for job buffers (HostAllocator), and jobs that run at once on
// one machine: scenario syntax (concurrent, stonewall), contention on the shared fabric,
// disjoint buffers, per-job counters that add up to the fabric's.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "physr/sim.hpp"

namespace physr::sim {
namespace {

// ---------------------------------------------------------------------------------------
// HostAllocator

TEST(SimHostAllocatorTest, HandsOutDisjointPageMultiplesPerNodeAndFallsBack) {
  auto a = HostAllocator::create(PhysSpan{PhysAddr(4 * GiB), 64 * MiB}, {0, 1});
  ASSERT_TRUE(a.has_value()) << a.error().to_string();
  EXPECT_EQ(a->arena(0), (PhysSpan{PhysAddr(4 * GiB), 32 * MiB}));
  EXPECT_EQ(a->arena(1), (PhysSpan{PhysAddr(4 * GiB + 32 * MiB), 32 * MiB}));
  auto x = a->alloc(5000, 0, "x");  // rounded up to two pages
  ASSERT_TRUE(x.has_value());
  EXPECT_EQ(x->size, 8 * KiB);
  auto y = a->alloc(1 * MiB, 1, "y", 1 * MiB);
  ASSERT_TRUE(y.has_value());
  EXPECT_TRUE(a->arena(1).contains(*y));
  EXPECT_EQ(y->base.value() % MiB, 0u);
  auto z = a->alloc(4 * KiB, 0, "z", 2 * MiB);  // aligned: skips the rest of x's 2 MiB
  ASSERT_TRUE(z.has_value());
  EXPECT_EQ(z->base.value() % (2 * MiB), 0u);
  EXPECT_FALSE(z->overlaps(*x));
  // Node 0 full: the next request falls back to node 1's arena.
  auto big = a->alloc(30 * MiB, 0, "big");
  ASSERT_TRUE(big.has_value()) << big.error().to_string();
  EXPECT_TRUE(a->arena(1).contains(*big) || a->arena(0).contains(*big));
  auto none = a->alloc(40 * MiB, 0, "too big");
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, ENOMEM);
  EXPECT_NE(none.error().message.find("too big: no room for 40 MiB"), std::string::npos) << none.error().message;
  EXPECT_EQ(a->live().size(), 4u);
  EXPECT_EQ(a->live()[0].second, "x");
}

TEST(SimHostAllocatorTest, FreeCoalescesAndRefusesWhatWasNotHandedOut) {
  auto a = HostAllocator::create(PhysSpan{PhysAddr(4 * GiB), 8 * MiB}, {0});
  ASSERT_TRUE(a.has_value());
  std::vector<PhysSpan> got;
  for (int i = 0; i < 8; ++i) {
    auto s = a->alloc(1 * MiB, 0, "piece");
    ASSERT_TRUE(s.has_value());
    got.push_back(*s);
  }
  EXPECT_EQ(a->allocated(), 8 * MiB);
  EXPECT_FALSE(a->alloc(4 * KiB, 0, "full").has_value());
  // Every other piece, then the rest: the runs merge back into one 8 MiB run.
  for (size_t i = 0; i < got.size(); i += 2) ASSERT_TRUE(a->free(got[i]).has_value());
  for (size_t i = 1; i < got.size(); i += 2) ASSERT_TRUE(a->free(got[i]).has_value());
  EXPECT_EQ(a->allocated(), 0u);
  auto whole = a->alloc(8 * MiB, 0, "whole");
  ASSERT_TRUE(whole.has_value()) << whole.error().to_string();
  // A double free, a part of a buffer, and a span never handed out are EINVAL.
  ASSERT_TRUE(a->free(*whole).has_value());
  const auto twice = a->free(*whole);
  ASSERT_FALSE(twice.has_value());
  EXPECT_EQ(twice.error().code, EINVAL);
  EXPECT_NE(twice.error().message.find("was not handed out"), std::string::npos);
  auto s = a->alloc(2 * MiB, 0, "s");
  ASSERT_TRUE(s.has_value());
  EXPECT_FALSE(a->free(PhysSpan{s->base, 1 * MiB}).has_value());
  EXPECT_FALSE(a->alloc(0, 0, "zero").has_value());
  EXPECT_FALSE(a->alloc(4096, 0, "odd alignment", 3 * KiB).has_value());
  EXPECT_FALSE(a->alloc(4096, 7, "no such node").has_value());
  EXPECT_FALSE(HostAllocator::create(PhysSpan{PhysAddr(4 * GiB + 4 * KiB), 8 * MiB}, {0}).has_value());
  EXPECT_FALSE(HostAllocator::create(PhysSpan{PhysAddr(4 * GiB), 8 * MiB}, {}).has_value());
}

pci::Topology machine(const char* name) {
  auto t = pci::load_builtin_machine(name);
  EXPECT_TRUE(t.has_value()) << t.error().to_string();
  return std::move(t).value();
}

// Every kind of job takes its host buffers from the machine's allocator and gives them
// back: after each job nothing is left handed out, and a job cannot start when the
// allocator has no room for its buffers.
TEST(SimHostAllocatorTest, JobsTakeHostBuffersFromTheMachineAndGiveThemBack) {
  const pci::Topology t = machine(std::string(kDefaultMachine).c_str());
  auto mr = Machine::create(t, MachineOptions{});
  ASSERT_TRUE(mr.has_value()) << mr.error().to_string();
  Machine& m = **mr;
  const auto fn = [&](const char* name) { return *t.lookup(name); };
  NvmeJob host_read;
  host_read.ssd = fn("nvme0");
  NvmeJob bounce = host_read;
  bounce.buffer_function = fn("gpu0");
  bounce.path = PathPolicy::bounce;
  CopyJob copy;
  copy.device = fn("gpu0");
  copy.write = true;
  NetJob net;
  net.sender = fn("nic0");
  net.receiver = fn("nic1");
  DirectIoJob odirect;
  odirect.ssd = fn("nvme0");
  odirect.target = fn("nvme1");
  HmmJob hmm;
  hmm.device = fn("gpu0");
  const std::vector<Job> jobs = {
      Job{"nvme-host", host_read, 128 * KiB, 8, 4 * MiB},   Job{"nvme-bounce", bounce, 128 * KiB, 8, 4 * MiB},
      Job{"copy-host", copy, 128 * KiB, 8, 4 * MiB},        Job{"net-host", net, 4 * KiB, 16, 1 * MiB},
      Job{"odirect", odirect, 128 * KiB, 4, 2 * MiB},       Job{"hmm", hmm, 64 * KiB, 4, 1 * MiB},
  };

  for (const Job& j : jobs) {
    auto r = run_job(m, j);
    ASSERT_TRUE(r.has_value()) << j.name << ": " << r.error().to_string();
    EXPECT_EQ(r->verified_bytes, j.name == "hmm" ? 2 * j.size : j.size) << j.name;
    EXPECT_EQ(m.host_memory().allocated(), 0u) << j.name;
  }
  // Host memory taken by someone else: the job fails with ENOMEM naming itself.
  const int node = m.fabric().numa_of(fn("nvme0"));
  std::vector<PhysSpan> hog;
  for (int n : m.fabric().numa_nodes()) {
    auto s = m.host_memory().alloc(m.host_memory().arena(n).size, n, "hog");
    ASSERT_TRUE(s.has_value()) << s.error().to_string();
    hog.push_back(*s);
  }
  auto r = run_job(m, jobs[0]);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOMEM);
  EXPECT_NE(r.error().message.find("job 'nvme-host': buffers: no room"), std::string::npos) << r.error().message;
  (void)node;
  for (const PhysSpan& s : hog) ASSERT_TRUE(m.host_memory().free(s).has_value());
}

}  // namespace
}  // namespace physr::sim
