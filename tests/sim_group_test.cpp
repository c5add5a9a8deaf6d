// The machine's host memory for job buffers (HostAllocator), and jobs that run at once on
// one machine: scenario syntax (concurrent, stonewall), contention on the shared fabric,
// disjoint buffers, per-job counters that add up to the fabric's.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "physr/builtin.hpp"
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

// ---------------------------------------------------------------------------------------
// Jobs at once

// The default machine with gpu0's link cut to PCIe 4.0 x2 (3.94 GB/s): slower than either
// SSD, so two SSDs reading into its BAR contend for its link and nothing else.
pci::Topology narrow_gpu_machine() {
  std::string text(*builtin_machine_text(kDefaultMachine));
  const size_t gpu = text.find("name = \"gpu0\"");
  const size_t width = text.find("link_width = 16", gpu);
  EXPECT_NE(width, std::string::npos);
  text.replace(width, 15, "link_width = 2");
  auto t = pci::parse_machine(text, "narrow-gpu.toml");
  EXPECT_TRUE(t.has_value()) << t.error().to_string();
  return std::move(t).value();
}

Job p2p_read(const pci::Topology& t, const char* name, const char* ssd, uint64_t size = 64 * MiB) {
  NvmeJob k;
  k.ssd = *t.lookup(ssd);
  k.buffer_function = *t.lookup("gpu0");
  k.path = PathPolicy::p2p;
  return Job{name, k, 128 * KiB, 32, size};
}

uint64_t bytes_over(const JobResult& r, const std::string& resource) {
  for (const auto& [name, b] : r.link_bytes)
    if (name == resource) return b;
  return 0;
}

// Two SSDs reading into one GPU's BAR under the switch: alone each gets the GPU link's
// bandwidth, at once each about half of it; every byte of both is checked.
TEST(SimGroupTest, TwoReadsIntoOneGpuShareItsLinkWhenConcurrent) {
  const pci::Topology t = narrow_gpu_machine();
  auto mr = Machine::create(t, MachineOptions{});
  ASSERT_TRUE(mr.has_value()) << mr.error().to_string();
  Machine& m = **mr;
  const double link = pcie_link_gbps(16.0, 2);
  const std::vector<Job> jobs = {p2p_read(t, "a", "nvme0"), p2p_read(t, "b", "nvme1")};
  for (const Job& j : jobs) {
    auto alone = run_job(m, j);
    ASSERT_TRUE(alone.has_value()) << alone.error().to_string();
    EXPECT_NEAR(alone->gbps, link, 0.05 * link) << j.name;
  }
  auto both = run_jobs(m, jobs);
  ASSERT_EQ(both.size(), 2u);
  for (size_t k = 0; k < 2; ++k) {
    ASSERT_TRUE(both[k].has_value()) << both[k].error().to_string();
    EXPECT_NEAR(both[k]->gbps, link / 2, 0.07 * link) << jobs[k].name;
    EXPECT_EQ(both[k]->verified_bytes, jobs[k].size);
    EXPECT_TRUE(both[k]->took(Via::p2p_bus_addr));
    EXPECT_EQ(bytes_over(*both[k], "gpu0 link down"), jobs[k].size);  // its own bytes, not the link's total
  }
  EXPECT_NEAR(both[0]->gbps + both[1]->gbps, link, 0.05 * link);
}

// Per-job bytes over each resource add up to the fabric's counters for the group, whatever
// mix of jobs ran (reads into the GPU, a host read and a network job at once).
TEST(SimGroupTest, PerJobResourceBytesAddUpToTheFabricTotals) {
  const pci::Topology t = narrow_gpu_machine();
  auto mr = Machine::create(t, MachineOptions{});
  ASSERT_TRUE(mr.has_value());
  Machine& m = **mr;
  NvmeJob host_read;
  host_read.ssd = *t.lookup("nvme2");
  NetJob net;
  net.sender = *t.lookup("nic0");
  net.receiver = *t.lookup("nic1");
  const std::vector<Job> jobs = {p2p_read(t, "a", "nvme0", 16 * MiB), p2p_read(t, "b", "nvme1", 32 * MiB),
                                 Job{"host", host_read, 64 * KiB, 16, 16 * MiB}, Job{"net", net, 8 * KiB, 64, 8 * MiB}};
  auto rs = run_jobs(m, jobs);
  std::map<std::string, uint64_t> sum;
  for (size_t k = 0; k < rs.size(); ++k) {
    ASSERT_TRUE(rs[k].has_value()) << jobs[k].name << ": " << rs[k].error().to_string();
    EXPECT_EQ(rs[k]->verified_bytes, jobs[k].size);
    for (const auto& [name, b] : rs[k]->link_bytes) sum[name] += b;
  }
  size_t carried = 0;
  for (const Resource& r : m.fabric().resources()) {
    EXPECT_EQ(sum[r.name], r.bytes) << r.name;
    carried += r.bytes != 0;
  }
  EXPECT_GT(carried, 8u);
}

// Buffers of jobs that run at once never overlap: host buffers from the host allocator, BAR
// buffers from the pools, all live at the same time while the jobs run.
TEST(SimGroupTest, BuffersOfConcurrentJobsAreDisjoint) {
  const pci::Topology t = machine(std::string(kDefaultMachine).c_str());
  auto mr = Machine::create(t, MachineOptions{});
  ASSERT_TRUE(mr.has_value());
  Machine& m = **mr;
  NvmeJob h0, h1;
  h0.ssd = *t.lookup("nvme0");
  h1.ssd = *t.lookup("nvme1");
  NvmeJob staged = h0;
  staged.buffer_function = *t.lookup("gpu0");
  staged.path = PathPolicy::bounce;
  NetJob net;
  net.sender = *t.lookup("nic0");
  net.receiver = *t.lookup("nic1");
  DirectIoJob od;
  od.ssd = *t.lookup("nvme1");
  od.target = *t.lookup("nvme0");
  HmmJob hmm;
  hmm.device = *t.lookup("gpu0");
  CopyJob copy;
  copy.device = *t.lookup("gpu0");
  const std::vector<Job> jobs = {Job{"h0", h0, 128 * KiB, 8, 8 * MiB},   Job{"h1", h1, 128 * KiB, 8, 8 * MiB},
                                 Job{"staged", staged, 128 * KiB, 8, 8 * MiB}, Job{"net", net, 4 * KiB, 64, 4 * MiB},
                                 Job{"odirect", od, 128 * KiB, 4, 4 * MiB}, Job{"hmm", hmm, 64 * KiB, 4, 2 * MiB},
                                 Job{"copy", copy, 128 * KiB, 8, 8 * MiB},  p2p_read(t, "p2p", "nvme2", 8 * MiB)};
  size_t most = 0;
  bool overlap = false;
  auto rs = run_jobs(m, jobs, [&](size_t, uint64_t, uint64_t) {
    const auto live = m.host_memory().live();
    most = std::max(most, live.size());
    for (size_t a = 0; a < live.size(); ++a)
      for (size_t b = a + 1; b < live.size(); ++b) overlap |= live[a].first.overlaps(live[b].first);
  });
  for (size_t k = 0; k < rs.size(); ++k) {
    ASSERT_TRUE(rs[k].has_value()) << jobs[k].name << ": " << rs[k].error().to_string();
    EXPECT_EQ(rs[k]->verified_bytes, jobs[k].name == "hmm" ? 2 * jobs[k].size : jobs[k].size) << jobs[k].name;
  }
  EXPECT_FALSE(overlap);
  // h0, h1, staged (its staging buffers), net (TX and RX), odirect, hmm and copy's host
  // buffers were all handed out at once.
  EXPECT_GE(most, 8u);
  EXPECT_EQ(m.host_memory().allocated(), 0u);
}

Result<ScenarioReport> run_text(const std::string& text) {
  PHYSR_ASSIGN_OR_RETURN(const Scenario sc, parse_scenario(text, "group.toml"));
  return run_scenario(sc);
}

const char* kNarrowJobs = R"(
[[job]]
name = "a"
device = "nvme0"
size = "64M"
buffer = "gpu0"
path = "p2p"
[[job]]
name = "b"
device = "nvme1"
size = "64M"
buffer = "gpu0"
path = "p2p"
)";

// A scenario runs its jobs one after another unless [options] concurrent says otherwise;
// then a stonewall starts a new group: the job waits for the earlier ones, and gets the
// link to itself. The group report sums the group's jobs.
TEST(SimGroupTest, ConcurrentScenariosRunJobsAtOnceUntilAStonewall) {
  // The machine from a file next to nothing: use the narrow machine through a temp file.
  const auto dir = std::filesystem::temp_directory_path() / ("physr-group-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string text(*builtin_machine_text(kDefaultMachine));
  const size_t width = text.find("link_width = 16", text.find("name = \"gpu0\""));
  text.replace(width, 15, "link_width = 2");
  { std::ofstream(dir / "narrow.toml") << text; }
  const std::string machine = "machine = \"" + (dir / "narrow.toml").string() + "\"\n";
  const double link = pcie_link_gbps(16.0, 2);

  auto serial = run_text(machine + kNarrowJobs);
  ASSERT_TRUE(serial.has_value()) << serial.error().to_string();
  EXPECT_FALSE(serial->concurrent);
  ASSERT_EQ(serial->groups.size(), 2u);
  for (const JobOutcome& j : serial->jobs) {
    ASSERT_TRUE(j.result.has_value()) << j.result.error().to_string();
    EXPECT_NEAR(j.result->gbps, link, 0.05 * link) << j.name;
  }
  EXPECT_EQ(serial->jobs[1].group, 1u);

  auto at_once = run_text(machine + "[options]\nconcurrent = true\n" + kNarrowJobs);
  ASSERT_TRUE(at_once.has_value()) << at_once.error().to_string();
  EXPECT_TRUE(at_once->concurrent);
  ASSERT_EQ(at_once->groups.size(), 1u);
  const GroupReport& g = at_once->groups[0];
  EXPECT_EQ(g.jobs, (std::vector<size_t>{0, 1}));
  EXPECT_EQ(g.bytes, 128 * MiB);
  EXPECT_EQ(g.failed, 0u);
  EXPECT_NEAR(g.gbps, link, 0.05 * link);  // the aggregate: the link, shared
  for (const JobOutcome& j : at_once->jobs) {
    ASSERT_TRUE(j.result.has_value());
    EXPECT_NEAR(j.result->gbps, link / 2, 0.07 * link) << j.name;
    EXPECT_EQ(j.group, 0u);
  }

  std::string walled = kNarrowJobs;
  walled.insert(walled.rfind("name = \"b\""), "stonewall = true\n");
  auto stonewalled = run_text(machine + "[options]\nconcurrent = true\n" + walled);
  ASSERT_TRUE(stonewalled.has_value()) << stonewalled.error().to_string();
  ASSERT_EQ(stonewalled->groups.size(), 2u);
  EXPECT_EQ(stonewalled->jobs[1].group, 1u);
  for (const JobOutcome& j : stonewalled->jobs) EXPECT_NEAR(j.result->gbps, link, 0.05 * link) << j.name;
  std::filesystem::remove_all(dir);
}

// A job of a group that fails (in setup, or resolving its device) has its error; the others
// run on, and the group report counts it.
TEST(SimGroupTest, AFailedJobOfAGroupLeavesTheOthersRunning) {
  auto rep = run_text(R"(
[options]
concurrent = true
[[job]]
name = "ok1"
device = "nvme0"
size = "8M"
buffer = "gpu0"
[[job]]
name = "nic-as-ssd"
device = "nic0"
size = "1M"
[[job]]
name = "missing"
device = "nosuch"
[[job]]
name = "ok2"
device = "nvme1"
size = "8M"
)");
  ASSERT_TRUE(rep.has_value()) << rep.error().to_string();
  ASSERT_EQ(rep->groups.size(), 1u);
  EXPECT_EQ(rep->groups[0].failed, 2u);
  EXPECT_EQ(rep->groups[0].bytes, 16 * MiB);
  EXPECT_EQ(rep->failed(), 2u);
  ASSERT_TRUE(rep->jobs[0].result.has_value()) << rep->jobs[0].result.error().to_string();
  ASSERT_TRUE(rep->jobs[3].result.has_value()) << rep->jobs[3].result.error().to_string();
  EXPECT_EQ(rep->jobs[3].result->verified_bytes, 8 * MiB);
  EXPECT_NE(rep->jobs[1].result.error().message.find("nic0 is neither an NVMe controller"), std::string::npos);
  EXPECT_NE(rep->jobs[2].result.error().message.find("group.toml:13: job 'missing'"), std::string::npos) << rep->jobs[2].result.error().message;
}

// Jobs of a group that fail in their setup, the last one included, leave the others to run
// once each, and jobs that fail while the group runs leave the rest running.
TEST(SimGroupTest, JobsFailingInSetupOrLaterLeaveTheOthersRunningOnce) {
  const pci::Topology t = narrow_gpu_machine();
  auto mr = Machine::create(t, MachineOptions{});
  ASSERT_TRUE(mr.has_value());
  Machine& m = **mr;
  CopyJob bad_copy;  // path bounce is for NVMe jobs: EINVAL in setup
  bad_copy.device = *t.lookup("gpu0");
  bad_copy.path = PathPolicy::bounce;
  const std::vector<Job> jobs = {Job{"bad-first", bad_copy, 128 * KiB, 4, 4 * MiB}, p2p_read(t, "a", "nvme0", 8 * MiB),
                                 Job{"bad-middle", bad_copy, 128 * KiB, 4, 4 * MiB}, p2p_read(t, "b", "nvme1", 8 * MiB),
                                 Job{"bad-last", bad_copy, 128 * KiB, 4, 4 * MiB}};
  std::vector<uint64_t> progress(jobs.size(), 0);
  auto rs = run_jobs(m, jobs, [&](size_t k, uint64_t done, uint64_t) { progress[k] = std::max(progress[k], done); });
  ASSERT_EQ(rs.size(), jobs.size());
  for (size_t k : {0u, 2u, 4u}) {
    ASSERT_FALSE(rs[k].has_value()) << jobs[k].name;
    EXPECT_EQ(rs[k].error().code, EINVAL);
    EXPECT_NE(rs[k].error().message.find("job '" + jobs[k].name + "': path bounce"), std::string::npos) << rs[k].error().message;
  }
  for (size_t k : {1u, 3u}) {
    ASSERT_TRUE(rs[k].has_value()) << rs[k].error().to_string();
    EXPECT_EQ(rs[k]->verified_bytes, 8 * MiB);
    EXPECT_EQ(rs[k]->ios, 64u);
    EXPECT_EQ(progress[k], 64u);  // each ran once, to its end
  }
  EXPECT_EQ(m.host_memory().allocated(), 0u);
}

// The keys' types and places are checked with FILE:LINE; a stonewall on the first job, or
// in a scenario that is not concurrent, is allowed (it changes nothing).
TEST(SimGroupTest, BadGroupSyntaxNamesTheFileLineAndKey) {
  const auto error = [](const std::string& text) {
    auto sc = parse_scenario(text, "bad.toml");
    return sc ? std::string("parsed") : sc.error().message;
  };
  EXPECT_EQ(error("[options]\nconcurrent = \"yes\"\n[[job]]\ndevice = \"nvme0\"\n"), "bad.toml:2: options.concurrent: expected true or false");
  EXPECT_EQ(error("[[job]]\ndevice = \"nvme0\"\nstonewall = 1\n"), "bad.toml:3: job.stonewall: expected true or false");
  EXPECT_NE(error("[[job]]\ndevice = \"nvme0\"\ngroup = \"a\"\n").find("bad.toml:3: job: unknown key 'group'"), std::string::npos);
  EXPECT_EQ(error("[options]\nconcurrent = true\n[[job]]\ndevice = \"nvme0\"\nstonewall = true\n"), "parsed");
  EXPECT_EQ(error("[[job]]\ndevice = \"nvme0\"\n[[job]]\ndevice = \"nvme1\"\nstonewall = false\n"), "parsed");
  std::string many = "[options]\nconcurrent = true\n";
  for (size_t k = 0; k <= kMaxGroupJobs; ++k) many += "[[job]]\ndevice = \"nvme0\"\n";
  EXPECT_NE(error(many).find("jobs would run at once; start a new group with stonewall = true"), std::string::npos) << error(many);
  EXPECT_NE(error(many).find("bad.toml:515: job 'job257'"), std::string::npos) << error(many);
}

}  // namespace
}  // namespace physr::sim
