// The fabric model: link bandwidths, routes that follow the P2P verdicts, and the
// flow-level simulator's timing checked against analytic answers.
#include "physr/sim.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "sim/block_job.hpp"
#include "sim/job_common.hpp"
#include "support/sysfs_snapshots.hpp"

namespace physr::sim {
namespace {

pci::Topology machine(const char* name) {
  auto t = pci::load_builtin_machine(name);
  EXPECT_TRUE(t.has_value()) << t.error().to_string();
  return std::move(t).value();
}

bool uses(const Fabric& f, const Route& r, Resource::Kind k) {
  for (uint32_t i : r.resources)
    if (f.resources()[i].kind == k) return true;
  return false;
}

TEST(SimFabricTest, LinkBandwidthFollowsGenerationAndWidth) {
  EXPECT_NEAR(pcie_link_gbps(2.5, 1), 0.25, 1e-9);            // 8b/10b
  EXPECT_NEAR(pcie_link_gbps(8, 16), 8 * 16 * 128.0 / 130 / 8, 1e-9);  // 128b/130b: 15.75 GB/s
  EXPECT_NEAR(pcie_link_gbps(16, 4), 7.877, 1e-3);
  EXPECT_NEAR(pcie_link_gbps(64, 16), 64 * 16 * 242.0 / 256 / 8, 1e-9);  // FLIT
}

TEST(SimFabricTest, OneTransferTakesSizeOverTheBottleneck) {
  const auto t = machine("two-socket-switch");
  auto f = std::move(Fabric::create(t)).value();
  const uint32_t nvme = *t.lookup("nvme0");
  auto r = f.to_memory(nvme);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->host_memory);
  EXPECT_FALSE(r->through_rc);
  Simulator sim(f);
  const uint64_t bytes = 1 * GiB;
  const size_t id = sim.add(*r, bytes, 0);
  sim.run();
  const double expect = r->latency_ns + static_cast<double>(bytes) / pcie_link_gbps(16, 4);  // the x4 Gen4 link
  EXPECT_NEAR(sim.finish_ns(id), expect, expect * 0.05);
  EXPECT_NEAR(sim.finish_ns(id), expect, 1.0);  // and in fact exactly
  for (uint32_t i : r->resources) EXPECT_EQ(f.resources()[i].bytes, bytes) << f.resources()[i].name;
}

TEST(SimFabricTest, FlowsShareLinksMaxMinFairly) {
  const auto t = machine("two-socket-switch");
  auto f = std::move(Fabric::create(t)).value();
  const uint32_t nvme = *t.lookup("nvme0"), gpu = *t.lookup("gpu0");
  // Two flows on the same x4 link get half each: both finish at twice the single time.
  Simulator sim(f);
  const auto r = *f.to_memory(nvme);
  const size_t a = sim.add(r, 256 * MiB, 0), b = sim.add(r, 256 * MiB, 0);
  sim.run();
  const double single = static_cast<double>(256 * MiB) / pcie_link_gbps(16, 4);
  EXPECT_NEAR(sim.finish_ns(a) - r.latency_ns, 2 * single, 2 * single * 0.01);
  EXPECT_NEAR(sim.finish_ns(b), sim.finish_ns(a), 1.0);
  // The NVMe (x4 Gen4, 7.9 GB/s) and the GPU (x16 Gen4) share the switch's x16 Gen3 uplink
  // (15.75 GB/s): max-min gives the NVMe its 7.9 GB/s and the GPU the rest, 7.9 GB/s.
  Simulator sim2(f);
  const auto rg = *f.to_memory(gpu);
  const size_t n = sim2.add(r, 512 * MiB, 0), g = sim2.add(rg, 512 * MiB, 0);
  sim2.run();
  const double up = pcie_link_gbps(8, 16), nv = pcie_link_gbps(16, 4);
  EXPECT_NEAR(sim2.finish_ns(n) - r.latency_ns, static_cast<double>(512 * MiB) / nv, 1e3);
  EXPECT_NEAR(sim2.finish_ns(g) - rg.latency_ns, static_cast<double>(512 * MiB) / (up - nv), 1e3);
}

TEST(SimFabricTest, P2PUnderASwitchNeverTouchesTheRootComplex) {
  const auto t = machine("two-socket-switch");
  auto f = std::move(Fabric::create(t)).value();
  const uint32_t nvme = *t.lookup("nvme0"), gpu = *t.lookup("gpu0"), nic = *t.lookup("nic0");
  auto r = f.to_peer(nvme, gpu);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->p2p, pci::MapType::bus_addr);
  EXPECT_FALSE(r->through_rc);
  EXPECT_FALSE(uses(f, *r, Resource::Kind::rc_forward));
  EXPECT_EQ(r->resources.size(), 2u);  // nvme0's link up, gpu0's link down
  Simulator sim(f);
  sim.add(*r, 64 * MiB, 0);
  sim.run();
  for (const Resource& res : f.resources())
    if (res.kind == Resource::Kind::rc_forward || res.kind == Resource::Kind::memory) {
      EXPECT_EQ(res.bytes, 0u) << res.name;
    }
  // The NIC's switch port redirects (ACS): the same transfer goes through the root complex,
  // here slower (4 GB/s) than the NVMe's link, so it sets the pace.
  auto slow = std::move(Fabric::create(t, FabricOptions{.rc_p2p_gbps = 4.0})).value();
  auto rr = slow.to_peer(nvme, nic);
  ASSERT_TRUE(rr.has_value());
  EXPECT_EQ(rr->p2p, pci::MapType::thru_host_bridge);
  EXPECT_TRUE(rr->through_rc);
  Simulator sim2(slow);
  const size_t id = sim2.add(*rr, 64 * MiB, 0);
  sim2.run();
  uint64_t rc = 0;
  for (const Resource& res : slow.resources())
    if (res.kind == Resource::Kind::rc_forward) rc += res.bytes;
  EXPECT_EQ(rc, 64 * MiB);
  const double expect = rr->latency_ns + static_cast<double>(64 * MiB) / 4.0;
  EXPECT_NEAR(sim2.finish_ns(id), expect, expect * 0.05);
}

TEST(SimFabricTest, RefusedHostBridgeFailsAndCrossSocketUsesTheInterSocketLink) {
  const auto x = machine("xeon-e5-two-sockets");
  auto f = std::move(Fabric::create(x)).value();
  auto r = f.to_peer(*x.lookup("nvme1"), *x.lookup("gpu0"));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EREMOTEIO);
  EXPECT_NE(r.error().message.find("unsupported request"), std::string::npos);
  const auto t = machine("two-socket-switch");
  auto g = std::move(Fabric::create(t)).value();
  const uint32_t nvme2 = *t.lookup("nvme2");
  auto local = g.to_memory(nvme2);
  auto remote = g.to_memory(nvme2, 0);
  ASSERT_TRUE(local && remote);
  EXPECT_FALSE(uses(g, *local, Resource::Kind::inter_socket));
  EXPECT_TRUE(uses(g, *remote, Resource::Kind::inter_socket));
  EXPECT_GT(remote->latency_ns, local->latency_ns);
  auto peer = g.to_peer(nvme2, *t.lookup("gpu0"));  // different host bridges, allowlisted
  ASSERT_TRUE(peer.has_value());
  EXPECT_TRUE(uses(g, *peer, Resource::Kind::inter_socket));
  EXPECT_EQ(g.to_memory(nvme2, 7).error().code, EINVAL);
  EXPECT_EQ(Fabric::create(t, FabricOptions{.rc_p2p_gbps = 0}).error().code, EINVAL);
}

TEST(SimFabricTest, DeterministicAndLaterArrivalsShare) {
  const auto t = machine("two-socket-switch");
  auto run = [&] {
    auto f = std::move(Fabric::create(t)).value();
    Simulator sim(f);
    const auto r = *f.to_memory(*t.lookup("nvme0"));
    std::vector<double> out;
    for (int i = 0; i < 20; ++i) sim.add(r, (1 + i % 5) * MiB, i * 10000.0);
    sim.run();
    for (size_t i = 0; i < 20; ++i) out.push_back(sim.finish_ns(i));
    return out;
  };
  const auto a = run(), b = run();
  EXPECT_EQ(a, b);
  // A flow that starts while another runs: the first gets the link alone, then half.
  auto f = std::move(Fabric::create(t)).value();
  Simulator sim(f);
  const auto r = *f.to_memory(*t.lookup("nvme0"));
  const double bw = pcie_link_gbps(16, 4), size = static_cast<double>(64 * MiB);
  const size_t first = sim.add(r, 64 * MiB, 0);
  const size_t second = sim.add(r, 64 * MiB, size / bw / 2);  // arrives when the first is half done
  sim.run();
  // First: half alone, half shared at bw/2 -> 1.5 x single; second: finishes at 2 x single.
  EXPECT_NEAR(sim.finish_ns(first) - r.latency_ns, 1.5 * size / bw, 1.0);
  EXPECT_NEAR(sim.finish_ns(second) - r.latency_ns, 2.0 * size / bw, 1.0);
  EXPECT_GE(sim.events(), 4u);
}

std::unique_ptr<Machine> build(const pci::Topology& t, MachineOptions o = {}) {
  auto m = Machine::create(t, o);
  EXPECT_TRUE(m.has_value()) << m.error().to_string();
  return std::move(m).value();
}

TEST(SimMachineTest, IommuFaultsAreRecordedAndMoveNothing) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const uint32_t nvme = *t.lookup("nvme0");
  DmaDevice* dev = *m->device(nvme);
  std::vector<uint8_t> data(4096, 0xab), back(4096);
  // Unmapped IOVA.
  const DmaSegment stray{DmaAddr(0x12345000), 4096, kDmaSegIommu};
  auto r = m->dma_write(nvme, std::span(&stray, 1), data);
  ASSERT_TRUE(r.has_value());  // a bus outcome, not an error
  EXPECT_EQ(r->result, kBusIommuFault);
  EXPECT_NE(r->why.find("IOMMU fault"), std::string::npos);
  ASSERT_EQ(m->faults().size(), 1u);
  EXPECT_EQ(m->faults()[0].why, "not mapped");
  // A to_device mapping is read-only for the device: its write faults, the memory keeps its bytes.
  RangeList l;
  ASSERT_TRUE(l.append(PhysRange{PhysAddr(0x100000), 8192, kHostMemory}).has_value());
  auto mp = dev->map(l, DmaDirection::to_device);
  ASSERT_TRUE(mp.has_value());
  std::vector<uint8_t> two(8192, 0x5a);
  r = m->dma_write(nvme, mp->segments(), two);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->result, kBusIommuFault);
  EXPECT_EQ(m->faults().back().why, "read-only mapping");
  ASSERT_TRUE(m->memory().read(PhysAddr(0x100000), back).has_value());
  EXPECT_EQ(back, std::vector<uint8_t>(4096, 0));  // nothing written, not even the first page
  std::vector<uint8_t> in(8192);
  auto rd = m->dma_read(nvme, mp->segments(), in);
  ASSERT_TRUE(rd.has_value() && rd->ok() && rd->host_memory);
  ASSERT_TRUE(dev->unmap(*mp).has_value());
  // After unmap (strict domain) the same IOVA faults.
  const DmaSegment old{DmaAddr(0xffffe000), 4096, kDmaSegIommu};
  EXPECT_EQ(m->dma_read(nvme, std::span(&old, 1), std::span(in.data(), 4096))->result, kBusIommuFault);
}

// The device side decodes DMA addresses as the fabric does and never trusts the segments'
// flags: on a host bridge with a bus offset, the DMA layer's bus address reaches the peer's
// BAR, the CPU address (a map() that forgot the offset) does not, and flags that lie steer
// nothing.
TEST(SimMachineTest, DecodesByAddressSoAWrongBusOffsetFails) {
  const auto t = machine("arm64-offset");
  for (bool iommu : {true, false}) {
    MachineOptions o;
    o.iommu = iommu;
    auto m = build(t, o);
    const uint32_t nvme = *t.lookup("nvme0"), gpu = *t.lookup("gpu0");
    DmaDevice* dev = *m->device(nvme);
    const Aperture* vram = m->largest_bar(gpu);
    ASSERT_NE(vram, nullptr);
    ASSERT_NE(vram->bus_offset, 0u);
    const PhysAddr at = vram->span.base + 0x10000;
    RangeList l;
    ASSERT_TRUE(l.append(PhysRange{at, 8192, vram->id}).has_value());
    auto mp = dev->map(l, DmaDirection::from_device);
    ASSERT_TRUE(mp.has_value()) << mp.error().to_string();
    ASSERT_EQ(mp->segments().size(), 1u);
    const DmaSegment good = mp->segments()[0];
    EXPECT_EQ(good.flags, kDmaSegBusAddr);
    EXPECT_EQ(good.addr.value(), at.value() + vram->bus_offset);  // bus address, not CPU address
    std::vector<uint8_t> data(8192);
    detail::pattern(3, 0, data);
    auto r = m->dma_write(nvme, mp->segments(), data);
    ASSERT_TRUE(r.has_value() && r->ok()) << (r ? r->why : r.error().to_string());
    EXPECT_TRUE(r->peer_switch && !r->peer_rc && !r->host_memory);
    EXPECT_EQ(r->peer, gpu);
    std::vector<uint8_t> back(8192);
    ASSERT_TRUE(m->memory().read(at, back).has_value());
    EXPECT_EQ(back, data);
    // The CPU address with the bus-address flag: it goes up to the root complex, where the
    // IOMMU has no such IOVA (a fault) or, direct, the root complex does not forward peer
    // traffic on this host (an unsupported request). Nothing moves.
    std::vector<uint8_t> other(8192, 0xee);
    const DmaSegment no_offset{DmaAddr(at.value()), 8192, kDmaSegBusAddr};
    r = m->dma_write(nvme, std::span(&no_offset, 1), other);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->result, iommu ? kBusIommuFault : kBusUnsupportedRequest) << bus_result_name(r->result);
    ASSERT_TRUE(m->memory().read(at, back).has_value());
    EXPECT_EQ(back, data);
    // A lying flag does not steer: the bus address flagged as an IOVA still decodes at the switch.
    const DmaSegment flagged_iommu{good.addr, good.len, kDmaSegIommu};
    r = m->dma_write(nvme, std::span(&flagged_iommu, 1), other);
    ASSERT_TRUE(r.has_value() && r->ok() && r->peer_switch);
    ASSERT_TRUE(m->memory().read(at, back).has_value());
    EXPECT_EQ(back, other);
    ASSERT_TRUE(dev->unmap(*mp).has_value());
    // Host memory flagged as a bus address still goes through the IOMMU (or direct) to RAM.
    RangeList h;
    ASSERT_TRUE(h.append(PhysRange{PhysAddr(0x400000), 4096, kHostMemory}).has_value());
    auto hm = dev->map(h, DmaDirection::from_device);
    ASSERT_TRUE(hm.has_value());
    DmaSegment lie = hm->segments()[0];
    lie.flags = kDmaSegBusAddr;
    r = m->dma_write(nvme, std::span(&lie, 1), std::span(data.data(), 4096));
    ASSERT_TRUE(r.has_value() && r->ok() && r->host_memory && !r->peer_switch);
    ASSERT_TRUE(m->memory().read(PhysAddr(0x400000), std::span(back.data(), 4096)).has_value());
    EXPECT_TRUE(std::equal(back.begin(), back.begin() + 4096, data.begin()));
    ASSERT_TRUE(dev->unmap(*hm).has_value());
    // P2P to the GPU from the NIC (another root port, a host bridge off the allowlist) is
    // refused by the DMA layer; the same BAR's CPU address sent anyway is refused by the fabric.
    const uint32_t nic = *t.lookup("nic0");
    EXPECT_EQ((*m->device(nic))->map(l, DmaDirection::from_device).error().code, EREMOTEIO);
    if (!iommu) {
      const DmaSegment peer{DmaAddr(at.value()), 4096, {}};
      r = m->dma_write(nic, std::span(&peer, 1), std::span(data.data(), 4096));
      ASSERT_TRUE(r.has_value());
      EXPECT_EQ(r->result, kBusUnsupportedRequest);
      // The 32-bit MMIO hole holds neither RAM nor a BAR: a decode error.
      const DmaSegment hole{DmaAddr(0x9000'0000), 4096, {}};
      r = m->dma_write(nic, std::span(&hole, 1), std::span(data.data(), 4096));
      ASSERT_TRUE(r.has_value());
      EXPECT_EQ(r->result, kBusDecodeError);
      // Outcomes of the pieces of one access are OR'ed; nothing of it moves.
      const DmaSegment both[] = {peer, hole};
      r = m->dma_write(nic, both, std::span(data.data(), 8192));
      ASSERT_TRUE(r.has_value());
      EXPECT_EQ(r->result, kBusUnsupportedRequest | kBusDecodeError);
      EXPECT_EQ(bus_result_name(r->result), "decode_error|unsupported_request");
    }
  }
}

// Decoding is per page: a segment that runs into a peer's bus window reaches the peer for
// the pages inside it and the IOMMU for the others; a fault is recorded once per faulting
// run; and a device the caller configured through the platform, with a domain of its own,
// is decoded through that domain.
TEST(SimMachineTest, DecodesEveryPageAndThroughTheDomainTheDeviceUses) {
  const auto t = machine("arm64-offset");
  auto m = build(t);
  const uint32_t nvme = *t.lookup("nvme0"), gpu = *t.lookup("gpu0"), nvme1 = *t.lookup("nvme1");
  ASSERT_TRUE(m->device(nvme).has_value());
  IoDomain* dom = m->domain(nvme);
  const Aperture* vram = m->largest_bar(gpu);
  const uint64_t edge = vram->bus().base.value();
  // The page below the GPU's bus window is an IOVA onto RAM; the next is the GPU's first page.
  ASSERT_TRUE(dom->map(DmaAddr(edge - 4096), PhysAddr(0x500000), 4096, kIommuReadWrite).has_value());
  std::vector<uint8_t> data(8192);
  detail::pattern(9, 0, data);
  const DmaSegment straddle{DmaAddr(edge - 4096), 8192, kDmaSegIommu};
  auto r = m->dma_write(nvme, std::span(&straddle, 1), data);
  ASSERT_TRUE(r.has_value() && r->ok()) << (r ? r->why : r.error().to_string());
  EXPECT_TRUE(r->host_memory && r->peer_switch);
  std::vector<uint8_t> back(4096);
  ASSERT_TRUE(m->memory().read(PhysAddr(0x500000), back).has_value());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin()));
  ASSERT_TRUE(m->memory().read(vram->span.base, back).has_value());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin() + 4096));
  ASSERT_TRUE(dom->unmap(DmaAddr(edge - 4096), 4096).has_value());
  // 16 unmapped pages: one fault record, one outcome.
  const size_t before = m->faults().size();
  std::vector<uint8_t> big(16 * 4096);
  const DmaSegment stray{DmaAddr(0x7000'0000), big.size(), kDmaSegIommu};
  r = m->dma_write(nvme, std::span(&stray, 1), big);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->result, kBusIommuFault);
  EXPECT_EQ(m->faults().size(), before + 1);
  // nvme1's device, made by the caller with a domain of its own: its IOVAs decode there.
  IoDomain* own = *m->model().new_domain();
  DmaDevice* dev = *m->platform().add_device({.function = nvme1, .max_segment = 1 * MiB, .domain = own, .debug = true});
  EXPECT_EQ(m->platform().domain(nvme1), own);
  RangeList l;
  ASSERT_TRUE(l.append(PhysRange{PhysAddr(0x600000), 8192, kHostMemory}).has_value());
  auto mp = dev->map(l, DmaDirection::from_device);
  ASSERT_TRUE(mp.has_value());
  r = m->dma_write(nvme1, mp->segments(), std::span(data.data(), 8192));
  ASSERT_TRUE(r.has_value() && r->ok() && r->host_memory) << (r ? r->why : "");
  std::vector<uint8_t> got(8192);
  ASSERT_TRUE(m->memory().read(PhysAddr(0x600000), got).has_value());
  EXPECT_EQ(got, data);
  ASSERT_TRUE(dev->unmap(*mp).has_value());
}

// Platform::aperture_at_bus() finds each peer window from its first to its last bus byte,
// whole pieces only, and nothing just outside it or behind another host bridge.
TEST(SimMachineTest, ApertureAtBusFindsEachWindowToItsEdges) {
  const auto t = machine("arm64-offset");
  auto m = build(t);
  const Platform& p = m->platform();
  ASSERT_FALSE(p.apertures().empty());
  for (const Aperture& ap : p.apertures()) {
    const uint32_t hb = t.functions[ap.function].host_bridge;
    const uint64_t base = ap.bus().base.value(), size = ap.bus().size;
    ASSERT_NE(ap.bus_offset, 0u) << ap.name << ": the test needs bus addresses unlike CPU addresses";
    EXPECT_EQ(p.aperture_at_bus(hb, BusAddr(base), size), &ap) << ap.name;
    EXPECT_EQ(p.aperture_at_bus(hb, BusAddr(base + size - 1), 1), &ap) << ap.name;
    EXPECT_EQ(p.aperture_at_bus(hb, BusAddr(base), size + 1), nullptr) << ap.name;
    EXPECT_NE(p.aperture_at_bus(hb, BusAddr(base + size), 1), &ap) << ap.name;
    EXPECT_NE(p.aperture_at_bus(hb, BusAddr(base - 1), 1), &ap) << ap.name;
    EXPECT_NE(p.aperture_at_bus(hb, BusAddr(ap.span.base.value()), 1), &ap) << ap.name << ": found by its CPU address";
    EXPECT_EQ(p.aperture_at_bus(static_cast<uint32_t>(t.host_bridges.size()), BusAddr(base), 1), nullptr);
  }
}

// The switch routes a peer window as one piece, but no further: a segment that runs out of
// the GPU's bus window reaches the GPU up to the window's end and the IOMMU after it.
TEST(SimMachineTest, ASegmentLeavingAPeerWindowIsDecodedAgainPastItsEnd) {
  const auto t = machine("arm64-offset");
  auto m = build(t);
  const uint32_t nvme = *t.lookup("nvme0"), gpu = *t.lookup("gpu0");
  ASSERT_TRUE(m->device(nvme).has_value());
  IoDomain* dom = m->domain(nvme);
  const Aperture* vram = m->largest_bar(gpu);
  const uint64_t end = vram->bus().base.value() + vram->bus().size;
  ASSERT_EQ(m->platform().aperture_at_bus(t.functions[nvme].host_bridge, BusAddr(end), 4096), nullptr)
      << "the test needs no peer window right after the GPU's";
  ASSERT_TRUE(dom->map(DmaAddr(end), PhysAddr(0x500000), 8192, kIommuReadWrite).has_value());
  std::vector<uint8_t> data(3 * 4096);
  detail::pattern(9, 0, data);
  const DmaSegment leaving{DmaAddr(end - 4096), data.size(), kDmaSegIommu};
  auto r = m->dma_write(nvme, std::span(&leaving, 1), data);
  ASSERT_TRUE(r.has_value() && r->ok()) << (r ? r->why : r.error().to_string());
  EXPECT_TRUE(r->peer_switch && r->host_memory);
  std::vector<uint8_t> back(4096), ram(8192);
  ASSERT_TRUE(m->memory().read(vram->span.base + vram->span.size - 4096, back).has_value());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin()));
  ASSERT_TRUE(m->memory().read(PhysAddr(0x500000), ram).has_value());
  EXPECT_TRUE(std::equal(ram.begin(), ram.end(), data.begin() + 4096));
  ASSERT_TRUE(dom->unmap(DmaAddr(end), 8192).has_value());
}

// The machine's IOMMU domains leave the P2P BARs' bus ranges out of their IOVA space (Linux
// iova_reserve_pci_windows()), so no IOVA can be captured by a switch on its way up.
TEST(SimMachineTest, IovaSpaceAvoidsPeerBusRanges) {
  const auto t = machine("amd-zen");  // BARs below 4 GiB, where IOVAs are tried first
  auto m = build(t);
  size_t below = 0;
  for (const Aperture& ap : m->apertures()) below += ap.bus().base.value() < (uint64_t{1} << 32);
  ASSERT_GT(below, 0u) << "the test needs a P2P BAR below 4 GiB";
  for (uint32_t f = 0; f < t.functions.size(); ++f) {
    if (!m->largest_bar(f)) continue;
    ASSERT_TRUE(m->device(f).has_value());
    IoDomain* d = m->domain(f);
    ASSERT_NE(d, nullptr);
    // Allocate the whole space below 4 GiB in 2 MiB pieces: none may touch a BAR.
    std::vector<DmaAddr> got;
    for (;;) {
      auto a = d->iova().alloc(2 * MiB, uint64_t{1} << 32);
      if (!a) break;
      got.push_back(*a);
      for (const Aperture& ap : m->apertures())
        EXPECT_FALSE(ap.bus().overlaps(BusSpan{BusAddr(a->value()), 2 * MiB})) << ap.name << " at " << format_hex(a->value());
    }
    EXPECT_GT(got.size(), 1000u);
    for (DmaAddr a : got) ASSERT_TRUE(d->iova().free(a, 2 * MiB).has_value());
    break;  // one domain is enough: every domain gets the same reservations
  }
}

TEST(SimMachineTest, BurstsAndStreamingMoveTheSameBytesAsOneCall) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const uint32_t nvme = *t.lookup("nvme0");
  DmaDevice* dev = *m->device(nvme);
  RangeList l;  // 3 pages from mid-page, through the IOMMU
  ASSERT_TRUE(l.append(PhysRange{PhysAddr(0x200000), 12288, kHostMemory}).has_value());
  auto mp = dev->map(l, DmaDirection::bidirectional);
  ASSERT_TRUE(mp.has_value());
  std::vector<uint8_t> data(12288);
  detail::pattern(7, 0, data);
  // Bursts of 5000 bytes (crossing pages and segment pieces), streamed from a source.
  for (uint64_t b = 0; b < data.size(); b += 5000) {
    const uint64_t n = std::min<uint64_t>(5000, data.size() - b);
    ASSERT_TRUE(m->dma_write_from(nvme, mp->segments(), b, n, [&](uint64_t o, std::span<uint8_t> dst) {
                   EXPECT_LE(o + dst.size(), n);
                   std::memcpy(dst.data(), data.data() + b + o, dst.size());
                   return Status{};
                 })->ok());
  }
  std::vector<uint8_t> back(data.size());
  ASSERT_TRUE(m->memory().read(PhysAddr(0x200000), back).has_value());
  EXPECT_EQ(back, data);
  // Read back by a sink from list offset 4000: the bytes from there on.
  std::vector<uint8_t> seen;
  ASSERT_TRUE(m->dma_read_to(nvme, mp->segments(), 4000, 8288, [&](uint64_t o, std::span<const uint8_t> src) {
                 EXPECT_EQ(o, seen.size());
                 seen.insert(seen.end(), src.begin(), src.end());
                 return Status{};
               })->ok());
  EXPECT_TRUE(std::equal(seen.begin(), seen.end(), data.begin() + 4000) && seen.size() == 8288);
  // A source's error stops the transfer and is returned; a list too short is EINVAL.
  EXPECT_EQ(m->dma_write_from(nvme, mp->segments(), 0, 100, [](uint64_t, std::span<uint8_t>) { return Status(make_error(ENOSPC, "full")); })
                .error().code, ENOSPC);
  auto r = m->dma_write(nvme, mp->segments(), std::span(data.data(), 100), 12200);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_NE(r.error().message.find("ends before the data"), std::string::npos);
  ASSERT_TRUE(dev->unmap(*mp).has_value());
}

TEST(SimPatternTest, EveryByteIsCheckedAndDataIsUniqueToPositionAndStream) {
  for (uint64_t pos : {uint64_t{0}, uint64_t{512}, uint64_t{4096 - 24}, uint64_t{3}, uint64_t{1} << 40}) {
    for (size_t len : {size_t{1}, size_t{7}, size_t{63}, size_t{64}, size_t{4196}, size_t{20000}}) {
      std::vector<uint8_t> v(len);
      detail::pattern(5, pos, v);
      ASSERT_EQ(detail::pattern_mismatch(5, pos, v), len);
      for (size_t k : {size_t{0}, len / 3, len / 2 + 1, len - 1}) {
        if (k >= len) continue;
        auto bad = v;
        bad[k] ^= 0x01;
        ASSERT_EQ(detail::pattern_mismatch(5, pos, bad), k) << "pos " << pos << " len " << len;
      }
      // Another job's stream, or the same data one word off, differs from the first word.
      if (len >= 8) {
        EXPECT_EQ(detail::pattern_mismatch(6, pos, v), 0u);
        EXPECT_LT(detail::pattern_mismatch(5, pos + 8, v), 8u);
      }
    }
  }
  // Generation in pieces split anywhere equals generation in one go (memory is filled and
  // checked chunk by chunk, with chunk edges at different places for sender and receiver).
  std::vector<uint8_t> whole(10000), parts(10000);
  detail::pattern(9, 1021, whole);
  for (size_t at = 0, n = 1; at < parts.size(); at += n, n = n * 3 + 1)
    detail::pattern(9, 1021 + at, std::span(parts.data() + at, std::min(n, parts.size() - at)));
  EXPECT_EQ(whole, parts);
  EXPECT_EQ(detail::pattern_mismatch(9, 1021 + 4001, std::span(whole.data() + 4001, 5000)), 5000u);
}

// Whole pages are generated and checked in one run of the vector code (the per-page salt
// computed inside it): the same bytes as page by page, and a flipped byte in any page of the
// run, first, middle or last, at a page edge or inside, is found at its index.
TEST(SimPatternTest, WholePagesInOneRunEqualPageByPageAndEveryByteIsChecked) {
  for (uint64_t pos : {uint64_t{0}, uint64_t{8 * 4096}, uint64_t{4096 - 8}, uint64_t{100}}) {
    const size_t len = 5 * 4096 + 24;
    std::vector<uint8_t> run(len), pages(len);
    detail::pattern(3, pos, run);
    for (size_t at = 0; at < len;) {  // piece by piece, none longer than to the next page edge
      const size_t n = std::min<size_t>(len - at, 4096 - ((pos + at) & 4095));
      detail::pattern(3, pos + at, std::span(pages.data() + at, n));
      at += n;
    }
    ASSERT_EQ(run, pages) << "pos " << pos;
    ASSERT_EQ(detail::pattern_mismatch(3, pos, run), len);
    for (size_t k = 0; k < len; k += 4096 / 2 - 1) {
      auto bad = run;
      bad[k] ^= 0x80;
      ASSERT_EQ(detail::pattern_mismatch(3, pos, bad), k) << "pos " << pos;
    }
    auto last = run;
    last[len - 1] ^= 0x80;
    ASSERT_EQ(detail::pattern_mismatch(3, pos, last), len - 1);
    EXPECT_EQ(detail::pattern_mismatch(4, pos, run), 0u);  // another stream differs at once
  }
}

// A block job's device writes its pieces and checks each as it lands through the CPU's view
// of the buffer (pattern_landed(), one call per run of pieces): with the view the bytes
// the device wrote (a right translation) it passes; a device that wrote elsewhere (a wrong
// bus offset or translation: the view holds another I/O's data), a page off (the view
// overlaps the bytes, shifted), or one byte off in any piece fails at the first byte of
// the view that differs. Unaligned runs and pieces take the page-by-page path and agree.
TEST(SimPatternTest, LandingChecksCatchBytesWrittenElsewhere) {
  constexpr uint64_t kPiece = 8192;
  for (const uint64_t pos : {uint64_t{0}, uint64_t{1} << 20, uint64_t{4096 + 40}}) {
    for (const size_t len : {size_t{64 * 1024}, size_t{5 * 4096 + 24}}) {
      std::vector<uint8_t> buf(len + 4096);
      const std::span<uint8_t> at(buf.data(), len);
      ASSERT_EQ(detail::pattern_landed(7, pos, at, at, kPiece), len) << "pos " << pos << " len " << len;
      EXPECT_EQ(detail::pattern_mismatch(7, pos, at), len);
      // The view holds another I/O's data: the device's bytes went to another buffer.
      std::vector<uint8_t> elsewhere(len), stale(len);
      detail::pattern(7, pos + (8 << 20), stale);
      EXPECT_EQ(detail::pattern_landed(7, pos, elsewhere, stale, kPiece), 0u);
      // The device wrote a page further on: the view's first page is stale, the rest shifted.
      std::fill(buf.begin(), buf.end(), uint8_t{0});
      EXPECT_EQ(detail::pattern_landed(7, pos, std::span(buf.data() + 4096, len), std::span<const uint8_t>(buf.data(), len), kPiece), 0u);
      // One byte wrong in the view, in the first, a middle or the last piece.
      for (const size_t k : {size_t{5}, len / 2 + 3, len - 1}) {
        std::vector<uint8_t> out(len), view(len);
        detail::pattern(7, pos, view);
        view[k] ^= 0x10;
        EXPECT_EQ(detail::pattern_landed(7, pos, out, view, kPiece), k) << "pos " << pos << " len " << len;
      }
    }
  }
}

JobResult run(Machine& m, const pci::Topology& t, const char* dev, const char* buffer, PathPolicy p, bool write = false,
              unsigned qd = 8, uint64_t size = 8 * MiB) {
  Job j;
  j.name = std::string(dev) + "->" + (buffer ? buffer : "host");
  const auto kind = job_kind_for(t, *t.lookup(dev), write, buffer ? std::optional(*t.lookup(buffer)) : std::nullopt);
  EXPECT_TRUE(kind.has_value()) << kind.error().to_string();
  if (!kind) return {};
  j.kind = *kind;
  std::visit([&](auto& k) {
    if constexpr (requires { k.path; }) k.path = p;
  }, j.kind);
  j.size = size;
  j.block_size = 128 * KiB;
  j.queue_depth = qd;
  auto r = run_job(m, j);
  EXPECT_TRUE(r.has_value()) << r.error().to_string();
  return r.value_or(JobResult{});
}

TEST(SimJobTest, NvmeToGpuP2PStaysUnderTheSwitch) {
  const auto t = machine("two-socket-switch");
  MachineOptions fixed;
  fixed.nvme_latency_sigma = 0;  // every command takes the 80 us: the fabric's timing alone
  auto m = build(t, fixed);
  const JobResult r = run(*m, t, "nvme0", "gpu0", PathPolicy::p2p, false, 64, 32 * MiB);
  EXPECT_EQ(r.path, "p2p bus_addr (under the switch)");
  EXPECT_EQ(r.via, ViaFlags(Via::p2p_bus_addr));
  EXPECT_EQ(r.verified_bytes, 32 * MiB);
  EXPECT_EQ(r.rc_bytes, 0u);
  EXPECT_EQ(r.host_memory_bytes, 0u);
  EXPECT_EQ(r.prp_ios, 256u);
  // Queue depth 64 hides the 80 us latency: media-bound at 6.8 GB/s after the first latency.
  const double ideal = static_cast<double>(32 * MiB) / 6.8 + 80'000;
  EXPECT_NEAR(r.seconds * 1e9, ideal, ideal * 0.05);
  EXPECT_GT(r.lat_p99_us, 80.0);
  EXPECT_TRUE(m->faults().empty());
  // At queue depth 1 the latency dominates: each I/O takes 80 us, then its 128 KiB cross
  // the x4 Gen4 link (the media slot, 19 us, ends before the next command arrives).
  const JobResult q1 = run(*m, t, "nvme0", "gpu0", PathPolicy::p2p, false, 1, 4 * MiB);
  const double per = 80'000 + 128.0 * KiB / pcie_link_gbps(16, 4);
  EXPECT_NEAR(q1.lat_p50_us * 1000, per, per * 0.01);
  EXPECT_NEAR(q1.seconds * 1e9, 32 * per, 32 * per * 0.01);
}

// Every byte of a read is checked as it lands, through the CPU's view of the buffer (a
// wrong bus offset or translation fails there: SimMachineTest.DecodesByAddressSoAWrongBusOffsetFails,
// SimHmmTest.AMirrorWithoutInvalidationFailsTheByteCheck); at completion a word per 4 KiB
// page of the buffer is checked again, so a buffer written over while its I/O is in flight
// fails the job with EIO although every byte landed right: zeros, or another I/O's data (a
// misdirected copy), over one page of each slot. With the SSD's latency spread the I/Os
// complete out of order, and the clean job passes: a slot is reused only after its I/O.
TEST(SimJobTest, ABufferWrittenOverWhileInFlightFailsAtCompletion) {
  const auto t = machine(std::string(kDefaultMachine).c_str());
  auto m = build(t);
  ASSERT_GT(m->options().nvme_latency_sigma, 0.0);
  Job j;
  j.name = "overwritten";
  j.block_size = 64 * KiB;
  j.queue_depth = 8;
  j.size = 4 * MiB;
  j.kind = NvmeJob{*t.lookup("nvme0"), false, std::nullopt, PathPolicy::automatic};
  auto clean = run_job(*m, j);
  ASSERT_TRUE(clean.has_value()) << clean.error().to_string();
  EXPECT_EQ(clean->verified_bytes, j.size);
  for (const bool zeros : {true, false}) {
    bool done_once = false;
    m->on_progress = [&](uint64_t done, uint64_t) {
      if (done < 16 || done_once) return;
      done_once = true;
      const std::vector<uint8_t> zero(kPageSize);
      // The job's buffers: its span of the machine's host memory.
      PhysAddr bufs(0);
      for (const auto& [span, owner] : m->host_memory().live())
        if (owner.find("'overwritten'") != std::string::npos) bufs = span.base;
      ASSERT_NE(bufs.value(), 0u) << "the job holds host memory while it runs";
      for (uint64_t slot = 0; slot < j.queue_depth; ++slot) {
        const PhysAddr page = bufs + (slot * j.block_size + 3 * kPageSize);
        const PhysAddr other = bufs + ((slot + 1) % j.queue_depth * j.block_size + 3 * kPageSize);
        ASSERT_TRUE((zeros ? m->memory().write(page, zero) : m->memory().copy(page, other, kPageSize)).has_value());
      }
    };
    auto r = run_job(*m, j);
    ASSERT_FALSE(r.has_value()) << (zeros ? "zeros" : "another I/O's data");
    EXPECT_EQ(r.error().code, EIO);
    EXPECT_NE(r.error().message.find("at completion: the buffer was written over while the I/O was in flight"), std::string::npos)
        << r.error().message;
    EXPECT_TRUE(done_once);
  }
  m->on_progress = nullptr;
  EXPECT_TRUE(run_job(*m, j).has_value());
}

// An IOMMU domain whose translations, as the device gets them, are one page past its page
// table's (a wrong IOTLB entry): the DMA layer maps through it as always, the device's bytes
// land a page further on.
class PageOffDomain final : public IommuDomain {
 public:
  explicit PageOffDomain(IommuDomain& real) : real_(real) {}
  IovaAllocator& iova() noexcept override { return real_.iova(); }
  Status map(DmaAddr iova, PhysAddr phys, uint64_t size, IommuPerms perm) override { return real_.map(iova, phys, size, perm); }
  Status map_many(std::span<const IoMapOp> ops) override { return real_.map_many(ops); }
  Status unmap(DmaAddr iova, uint64_t size) override { return real_.unmap(iova, size); }
  Status unmap_many(std::span<const DmaSpan> ranges) override { return real_.unmap_many(ranges); }
  Status free_iova(DmaAddr iova, uint64_t size) override { return real_.free_iova(iova, size); }
  std::optional<IoTranslation> translate(DmaAddr iova) override {
    auto t = real_.translate(iova);
    if (t && off) {
      t->phys = t->phys + kPageSize;
      t->page_size = kPageSize;
    }
    return t;
  }
  std::optional<IoTranslation> walk(DmaAddr iova) const override { return real_.walk(iova); }
  void flush() override { real_.flush(); }
  bool off = true;

 private:
  IommuDomain& real_;
};

// A block job's device whose DMA goes elsewhere than the buffer (a wrong translation) fails
// where its bytes land: each run is checked through the CPU's view of the buffer, not through
// where the device's addresses went, so the check sees what is in the buffer, not what the
// device wrote. The same job with the right translation passes.
TEST(SimJobTest, AWrongTranslationFailsTheLandingCheck) {
  const auto t = machine(std::string(kDefaultMachine).c_str());
  auto m = build(t);
  const uint32_t nvme = *t.lookup("nvme1");
  IoDomain* real = *m->model().new_domain();
  PageOffDomain dom(*real);
  ASSERT_TRUE(m->platform().add_device({.function = nvme, .max_segment = 4 * MiB, .min_align_mask = 0xfff, .domain = &dom, .debug = true}).has_value());
  Job j;
  j.name = "page-off";
  j.block_size = 64 * KiB;
  j.queue_depth = 4;
  j.size = 1 * MiB;
  j.kind = NvmeJob{nvme, false, std::nullopt, PathPolicy::automatic};
  auto r = run_job(*m, j);
  ASSERT_FALSE(r.has_value()) << "the device wrote a page past the buffer";
  EXPECT_EQ(r.error().code, EIO);
  EXPECT_NE(r.error().message.find("data mismatch at"), std::string::npos) << r.error().message;
  EXPECT_EQ(r.error().message.find("at completion"), std::string::npos) << "found as the bytes land: " << r.error().message;
  dom.off = false;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
}

TEST(SimJobTest, BounceAndRedirectPathsGoThroughTheHost) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const JobResult staged = run(*m, t, "nvme0", "gpu0", PathPolicy::bounce);
  EXPECT_EQ(staged.path, "bounce via a host buffer + copy engine");
  EXPECT_EQ(staged.via, ViaFlags(Via::staged));
  EXPECT_EQ(staged.host_memory_bytes, 2 * 8 * MiB);  // written by the SSD, read by the copy engine
  EXPECT_EQ(staged.verified_bytes, 8 * MiB);
  const JobResult nic = run(*m, t, "nvme0", "nic0", PathPolicy::p2p);
  EXPECT_EQ(nic.path, "p2p thru_host_bridge (through the root complex)");
  EXPECT_EQ(nic.via, ViaFlags(Via::p2p_host_bridge));
  EXPECT_EQ(nic.rc_bytes, 8 * MiB);
  const JobResult host = run(*m, t, "nvme1", nullptr, PathPolicy::automatic);
  EXPECT_EQ(host.path, "host memory");
  EXPECT_TRUE(host.took(Via::host_memory) && !host.took(Via::p2p_bus_addr));
  EXPECT_EQ(host.host_memory_bytes, 8 * MiB);
  const JobResult w = run(*m, t, "nvme1", "gpu0", PathPolicy::p2p, /*write=*/true);
  EXPECT_EQ(w.verified_bytes, 8 * MiB);
  EXPECT_EQ(w.rc_bytes, 0u);
}

TEST(SimJobTest, RefusedP2PFailsOrBouncesByPolicy) {
  const auto t = machine("xeon-e5-two-sockets");
  auto m = build(t);
  Job j;
  j.name = "refused";
  NvmeJob nv{*t.lookup("nvme1"), false, *t.lookup("gpu0"), PathPolicy::p2p};
  j.kind = nv;
  j.size = 4 * MiB;
  EXPECT_EQ(j.device(), nv.ssd);
  auto r = run_job(*m, j);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EREMOTEIO);
  EXPECT_NE(r.error().message.find("job 'refused'"), std::string::npos);
  nv.path = PathPolicy::automatic;
  j.kind = nv;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->path, "bounce (DMA layer, swiotlb)");
  EXPECT_EQ(r->via, ViaFlags(Via::bounced));
  EXPECT_EQ(r->verified_bytes, 4 * MiB);
  EXPECT_EQ(m->bounce().used_slots(), 0u);
  ASSERT_EQ(t.functions[0].class_code >> 8, 0x0600u);  // the host bridge: neither an SSD nor a GPU
  EXPECT_EQ(job_kind_for(t, 0, false, std::nullopt).error().code, EINVAL);
  nv.ssd = 0;
  j.kind = nv;
  auto not_nvme = run_job(*m, j);
  ASSERT_FALSE(not_nvme.has_value());
  EXPECT_EQ(not_nvme.error().code, EINVAL);
  EXPECT_NE(not_nvme.error().message.find("is not an NVMe controller"), std::string::npos) << not_nvme.error().message;
  j.kind = CopyJob{0, false, std::nullopt, PathPolicy::automatic};
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);  // nor a copy engine
  nv.ssd = *t.lookup("nvme1");
  j.kind = nv;
  j.block_size = 1000;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
}

TEST(SimJobTest, DeterministicTimes) {
  const auto t = machine("two-socket-switch");
  auto a = build(t), b = build(t);
  const JobResult x = run(*a, t, "nvme0", "gpu0", PathPolicy::automatic), y = run(*b, t, "nvme0", "gpu0", PathPolicy::automatic);
  EXPECT_EQ(x.seconds, y.seconds);
  EXPECT_EQ(x.lat_p99_us, y.lat_p99_us);
}

// A GPU's copy engine: host to GPU memory and back, GPU memory into an SSD's CMB by P2P;
// its rate, in-order service and every byte checked.
TEST(SimJobTest, GpuCopyEngineJobsMoveAndCheckEveryByte) {
  const auto t = machine("two-socket-switch");
  MachineOptions o;
  o.copy_engine_gbps = 5.0;  // below every link on the way: the engine is the bottleneck
  auto m = build(t, o);
  Job j;
  j.name = "h2d";
  CopyJob cj;
  cj.device = *t.lookup("gpu0");
  cj.write = true;  // the buffer's data into the GPU's memory
  j.kind = cj;
  j.block_size = 1 * MiB;
  j.queue_depth = 8;
  j.size = 64 * MiB;
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_NEAR(r->gbps, 5.0, 0.05);
  // In order, one at a time: with 8 queued, a copy waits for the 7 before it.
  EXPECT_NEAR(r->lat_p50_us, 8 * (1 * MiB / 5.0) / 1000, 5.0);
  EXPECT_EQ(r->host_memory_bytes, j.size);
  const size_t resources = m->fabric().resources().size();
  j.name = "d2h";
  cj.write = false;
  j.kind = cj;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_EQ(r->path, "host memory");
  EXPECT_EQ(m->fabric().resources().size(), resources);  // the second job reuses the engine
  // Into nvme1's CMB under the same switch: P2P, never through the root complex or memory.
  j.name = "gpu-to-cmb";
  cj.buffer_function = *t.lookup("nvme1");
  cj.path = PathPolicy::p2p;
  j.kind = cj;
  j.block_size = 128 * KiB;
  j.size = 16 * MiB;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_EQ(r->path, "p2p bus_addr (under the switch)");
  EXPECT_EQ(r->rc_bytes + r->host_memory_bytes, 0u);
  EXPECT_EQ(r->iommu_faults, 0u);
  // Its own memory as the buffer, or staging, is refused with the reason.
  cj.buffer_function = cj.device;
  j.kind = cj;
  auto bad = run_job(*m, j);
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("host memory or another device's BAR"), std::string::npos);
  cj.buffer_function = *t.lookup("nvme1");
  cj.path = PathPolicy::bounce;
  j.kind = cj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
}

// Random NVMe and network jobs on every reference machine, with and without IOMMUs: each
// either verifies every byte or fails exactly when the fabric refuses a P2P-only job; the
// same seed gives the same reports.
std::vector<std::string> random_jobs(const char* name, uint32_t seed, bool iommu) {
  const auto t = machine(name);
  MachineOptions o;
  o.iommu = iommu;
  auto m = build(t, o);
  std::mt19937 rng(seed);
  const auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  std::vector<uint32_t> ssds, nics, gpus, holders;
  for (uint32_t f = 0; f < t.functions.size(); ++f) {
    if (pci::is_nvme(t.functions[f])) ssds.push_back(f);
    if (pci::is_network(t.functions[f])) nics.push_back(f);
    if (pci::is_display(t.functions[f]) && m->largest_bar(f)) gpus.push_back(f);
    if (m->largest_bar(f)) holders.push_back(f);
  }
  EXPECT_FALSE(ssds.empty());
  std::vector<std::string> log;
  for (int k = 0; k < 24; ++k) {
    Job j;
    j.name = "r" + std::to_string(k);
    const bool net = nics.size() >= 2 && k % 4 == 3, copy = !net && !gpus.empty() && k % 4 == 2;
    const uint32_t device = net ? nics[0] : copy ? gpus[pick(gpus.size())] : ssds[pick(ssds.size())];
    const uint32_t peer = net ? nics[1] : pci::kNoFunction;  // the receiving NIC of a network job
    const bool write = !net && pick(2) == 1;
    j.block_size = net ? 1 + pick(64 * KiB) : 512 * (1 + pick(512));  // packets of any size
    j.queue_depth = static_cast<unsigned>(1 + pick(32));
    j.size = j.block_size * (1 + pick(24));
    PathPolicy path = static_cast<PathPolicy>(pick(3));
    if (copy && path == PathPolicy::bounce) path = PathPolicy::automatic;  // staging is for SSDs
    std::optional<uint32_t> holder;
    if (!holders.empty() && pick(4) != 0) holder = holders[pick(holders.size())];
    if (copy && holder == device) holder.reset();
    if (copy) {  // the copies must fit the GPU's memory too
      const uint64_t vram = m->largest_bar(device)->span.size;
      j.queue_depth = static_cast<unsigned>(std::min<uint64_t>(j.queue_depth, std::max<uint64_t>(1, vram / j.block_size)));
    }
    if (holder) {  // the buffers must fit the BAR (CMBs are small)
      const uint64_t bar = m->largest_bar(*holder)->span.size;
      if (j.block_size > bar) j.block_size = std::max<uint64_t>(512, bar / 2 / 512 * 512);
      j.queue_depth = static_cast<unsigned>(std::min<uint64_t>(j.queue_depth, bar / j.block_size));
      j.size = j.block_size * (1 + pick(24));
    }
    std::optional<uint32_t> buffer_function, peer_buffer_function;
    (net && pick(2) ? peer_buffer_function : buffer_function) = holder;
    if (net)
      j.kind = NetJob{device, peer, buffer_function, peer_buffer_function, path};
    else if (copy)
      j.kind = CopyJob{device, write, buffer_function, path};
    else
      j.kind = NvmeJob{device, write, buffer_function, path};
    // The fabric's verdict, independent of the job: a P2P-only job fails where it refuses.
    bool refused = false;
    if (holder && path == PathPolicy::p2p) {
      const uint32_t dev = net && peer_buffer_function ? peer : device;
      const bool dev_writes = net ? peer_buffer_function.has_value() : !write;
      refused = !m->fabric().to_peer(dev, *holder, dev_writes).has_value();
    }
    // An SSD's own CMB without RDS (reads) or WDS (writes) cannot hold the command's data.
    const auto& cmb = t.functions[device].cmb;
    const bool cmb_refuses = !net && !copy && holder == device && cmb && (write ? !cmb->wds : !cmb->rds);
    auto r = run_job(*m, j);
    const std::string what = std::string(name) + " " + j.name + (net ? " net" : copy ? " copy" : "") + (write ? " write" : " read") + " bs " +
                             std::to_string(j.block_size) + " qd " + std::to_string(j.queue_depth) + " path " + path_policy_name(path);
    if (cmb_refuses || refused) {  // the CMB check comes first
      EXPECT_FALSE(r.has_value()) << what;
      if (!r) {
        EXPECT_EQ(r.error().code, cmb_refuses ? EINVAL : EREMOTEIO) << what;
      }
      log.push_back(what + (cmb_refuses ? ": CMB cannot hold the data" : ": refused"));
      continue;
    }
    EXPECT_TRUE(r.has_value()) << what << ": " << (r ? "" : r.error().to_string());
    if (!r) continue;
    EXPECT_EQ(r->verified_bytes, j.size) << what;
    EXPECT_EQ(r->iommu_faults, 0u) << what;
    // The structured path agrees with the text.
    EXPECT_FALSE(r->via.empty()) << what;
    EXPECT_EQ(r->took(Via::bounced), r->path.find("bounce") != std::string::npos && !r->took(Via::staged)) << what << ": " << r->path;
    if (!net) {
      EXPECT_EQ(std::popcount(r->via.bits()), 1) << what;
      EXPECT_EQ(r->took(Via::p2p_bus_addr), r->path.rfind("p2p bus_addr", 0) == 0) << what << ": " << r->path;
      EXPECT_EQ(r->took(Via::p2p_host_bridge), r->path.rfind("p2p thru_host_bridge", 0) == 0) << what << ": " << r->path;
      EXPECT_EQ(r->took(Via::host_memory), r->path == "host memory") << what << ": " << r->path;
    }
    std::string line = what + ": " + r->path + " " + std::to_string(r->seconds) + " " + std::to_string(r->lat_p99_us);
    for (const auto& [link, bytes] : r->link_bytes) line += " " + link + "=" + std::to_string(bytes);
    log.push_back(line);
  }
  EXPECT_EQ(m->bounce().used_slots(), 0u);  // every bounce slot returned
  m->p2pmem().barrier();
  for (uint32_t f = 0; f < t.functions.size(); ++f) {
    EXPECT_EQ(m->p2pmem().stats(f).allocated, 0u) << t.functions[f].name;  // every buffer returned
  }
  return log;
}

TEST(SimJobTest, RandomWorkloadsVerifyOnEveryReferenceMachineAndRepeatBySeed) {
  for (const char* name : {"two-socket-switch", "amd-zen", "xeon-e5-two-sockets", "arm64-offset"}) {
    for (bool iommu : {true, false}) {
      const auto a = random_jobs(name, 42, iommu), b = random_jobs(name, 42, iommu);
      EXPECT_EQ(a, b) << name;
      EXPECT_NE(a, random_jobs(name, 43, iommu)) << name;
    }
  }
}

// NVMe CMBs follow CMBSZ: a CMB with read and write data is published P2P memory; one for
// submission queues only is not (nearest never picks it, as Linux nvme_map_cmb() does not
// publish it) and its own SSD cannot put command data in it, though a peer may use it.
TEST(SimMachineTest, NvmeCmbIsPublishedOnlyWithReadAndWriteData) {
  const auto sw = machine("two-socket-switch");
  auto ms = build(sw);
  const Aperture* full = ms->largest_bar(*sw.lookup("nvme1"));
  ASSERT_NE(full, nullptr);
  EXPECT_EQ(full->name, "nvme1 BAR2 (CMB)");
  EXPECT_TRUE(full->published);
  for (const Aperture& a : ms->apertures()) EXPECT_FALSE(a.function == *sw.lookup("nvme1") && a.bar == 0) << "registers are not memory";

  const auto t = machine("amd-zen");
  auto m = build(t);
  const uint32_t nvme0 = *t.lookup("nvme0"), nvme1 = *t.lookup("nvme1");
  const Aperture* sqs = m->largest_bar(nvme1);
  ASSERT_NE(sqs, nullptr);
  EXPECT_FALSE(sqs->published);
  const uint32_t clients[] = {nvme0};
  const Aperture* pick = m->nearest_provider(clients);
  EXPECT_TRUE(pick == nullptr || pick->function != nvme1);
  Job j;
  j.name = "own";
  j.block_size = 64 * KiB;
  j.queue_depth = 4;
  j.size = 1 * MiB;
  for (bool write : {false, true}) {
    j.kind = NvmeJob{nvme1, write, nvme1};
    auto r = run_job(*m, j);
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find(write ? "CMBSZ.WDS is clear" : "CMBSZ.RDS is clear"), std::string::npos) << r.error().message;
  }
  j.kind = NvmeJob{nvme0, false, nvme1};  // a peer writing into it: P2P memory all the same
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
}

// A real server's sysfs snapshot as the machine: its device BARs become memory and
// providers (not the bridges' forwarding windows or ROMs, which sysfs lists beside them),
// and its NICs move real bytes between them.
TEST(SimMachineTest, SysfsSnapshotMachineUsesDeviceBarsOnly) {
  auto t = pci::load_sysfs(test::sysfs_snapshots() / "40intel64-2g2n4c+pci");
  ASSERT_TRUE(t.has_value()) << t.error().to_string();
  auto m = build(*t);
  EXPECT_TRUE(m->warnings.empty()) << m->warnings.front();
  ASSERT_FALSE(m->apertures().empty());
  for (const Aperture& a : m->apertures()) {
    EXPECT_LE(a.bar, 5u) << a.name;
    EXPECT_FALSE(pci::is_pci_bridge(t->functions[a.function])) << a.name << " is a bridge window";
  }
  const uint32_t vga = *t->lookup("0000:09:03.0");
  const Aperture* fb = m->largest_bar(vga);
  ASSERT_NE(fb, nullptr);
  EXPECT_EQ(fb->span, (PhysSpan{PhysAddr(0xc5000000), 8 * MiB}));
  Job j;
  j.name = "nic-rx-vga";
  NetJob nj;
  nj.sender = *t->lookup("0000:02:00.0");
  nj.receiver = *t->lookup("0000:03:00.0");
  nj.rx_buffer_function = vga;
  j.kind = nj;
  j.block_size = 1500;
  j.queue_depth = 64;
  j.size = 1500 * 700;
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_NE(r->path.find("bounced by the DMA layer"), std::string::npos) << r->path;  // across root ports, not allowlisted
  EXPECT_EQ(r->via, ViaFlags(Via::host_memory) | Via::bounced);  // TX from host memory, RX bounced
  // Host memory: TX reads the packet, RX writes the bounce buffer, the CPU's copy into the
  // framebuffer reads it back; the copy crosses the VGA's own link.
  EXPECT_EQ(r->host_memory_bytes, 3 * j.size);
  bool vga_link = false;
  for (const auto& [link, bytes] : r->link_bytes) vga_link |= link.find("0000:09:03.0") != std::string::npos && bytes == j.size;
  EXPECT_TRUE(vga_link);
}

// Devmem receive (net/core/devmem.c through the page pool's memory provider): headers into
// host page-pool pages, payloads into net_iovs of the GPU's BAR, every byte checked where it
// landed; against RX into host page-pool pages plus the GPU's copy engine.
TEST(SimJobTest, DevmemReceiveSplitsHeadersIntoHostAndPayloadsIntoGpuMemory) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j;
  j.name = "devmem";
  NetJob nj;
  nj.sender = *t.lookup("nic1");
  nj.receiver = *t.lookup("nic0");
  nj.rx_buffer_function = *t.lookup("gpu0");
  nj.rx = NetJob::Rx::devmem;
  nj.header_bytes = 200;
  j.kind = nj;
  j.block_size = 9000;  // a jumbo frame: the payload over three net_iovs
  j.queue_depth = 32;
  j.size = 9000 * 300;
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_NE(r->path.find("RX devmem with header split (200 B headers into host page-pool pages, payload into gpu0 BAR1 net_iovs by p2p "
                         "through the root complex; 900 buffers recycled)"),
            std::string::npos)
      << r->path;  // nic0 is behind an ACS-redirecting port
  EXPECT_TRUE(r->took(Via::p2p_host_bridge));
  EXPECT_EQ(r->host_memory_bytes, j.size);  // only the sender's reads
  EXPECT_EQ(r->rc_bytes, j.size);
  // The path without devmem: the packet crosses host memory three times.
  nj.rx = NetJob::Rx::copy;
  j.kind = nj;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_TRUE(r->took(Via::staged));
  EXPECT_EQ(r->host_memory_bytes, 3 * j.size);
  EXPECT_NE(r->path.find("RX host page-pool pages, then gpu0 BAR1's copy engine (900 pages recycled)"), std::string::npos) << r->path;
  // The split must leave a payload; a devmem job has a GPU to receive into.
  nj.rx = NetJob::Rx::devmem;
  nj.header_bytes = 9000;
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
  nj.header_bytes = 128;
  nj.rx_buffer_function.reset();
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
}

// Devmem transmit (net/core/devmem.c TX binding, tcp_sendmsg_locked() with
// SCM_DEVMEM_DMABUF): headers from host memory, payloads straight from net_iovs of the GPU's
// BAR, every byte checked at the receiver in host memory.
TEST(SimJobTest, DevmemTransmitSendsPayloadsFromGpuMemoryHeadersFromHost) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j;
  j.name = "devmem-tx";
  NetJob nj;
  nj.sender = *t.lookup("nic0");
  nj.receiver = *t.lookup("nic1");
  nj.tx_buffer_function = *t.lookup("gpu0");
  nj.tx = NetJob::Tx::devmem;
  nj.header_bytes = 200;
  j.kind = nj;
  j.block_size = 9000;  // 8800 B of payload: three frags, or four across a 4 KiB boundary
  j.queue_depth = 32;
  j.size = 9000 * 300;
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_NE(r->path.find("TX devmem (200 B headers from host memory, payload from gpu0 BAR1 net_iovs by p2p through the root complex; "),
            std::string::npos)
      << r->path;
  EXPECT_NE(r->path.find("), RX host"), std::string::npos) << r->path;
  EXPECT_TRUE(r->took(Via::p2p_host_bridge));
  // Host memory: the packets written at the receiver (each packet's timing takes the
  // payload's route, as devmem RX's does: the headers' few bytes are not timed apart).
  EXPECT_EQ(r->host_memory_bytes, j.size);
  EXPECT_EQ(r->rc_bytes, j.size);
  // A devmem sender needs its GPU, a header shorter than the packet, and a plain receiver.
  nj.header_bytes = 9000;
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
  nj.header_bytes = 128;
  nj.rx = NetJob::Rx::copy;
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
  nj.rx = NetJob::Rx::plain;
  nj.tx_buffer_function.reset();
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);
}

TEST(SimJobTest, NetworkPacketsReachTheReceiverBuffers) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j;
  j.name = "net";
  NetJob nj;
  nj.sender = *t.lookup("nic0");
  nj.receiver = *t.lookup("nic1");
  j.kind = nj;
  EXPECT_EQ(j.device(), nj.sender);
  j.block_size = 4096;
  j.queue_depth = 64;
  j.size = 4 * MiB;
  auto r = run_job(*m, j);  // host -> host
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, 4 * MiB);
  EXPECT_EQ(r->path, "network: TX host, RX host");
  EXPECT_EQ(r->via, ViaFlags(Via::host_memory));
  EXPECT_EQ(r->host_memory_bytes, 2 * 4 * MiB);  // read on one socket, written on the other
  // Wire-bound: 100 Gb/s.
  EXPECT_NEAR(r->gbps, 12.5, 12.5 * 0.05);
  // Into the GPU's BAR on the other socket: no host memory on the receive side, through
  // both root complexes. The switch's x16 Gen3 uplink now carries, downward, both nic0's
  // reads of its TX buffers and the packets for the GPU: half of 15.75 GB/s each.
  nj.rx_buffer_function = *t.lookup("gpu0");
  nj.path = PathPolicy::p2p;
  j.kind = nj;
  r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->path, "network: TX host, RX p2p, through the root complex");
  EXPECT_EQ(r->via, ViaFlags(Via::host_memory) | Via::p2p_host_bridge);
  EXPECT_EQ(r->host_memory_bytes, 4 * MiB);
  EXPECT_EQ(r->rc_bytes, 2 * 4 * MiB);  // both sockets' root complexes
  EXPECT_NEAR(r->gbps, pcie_link_gbps(8, 16) / 2, 0.05 * pcie_link_gbps(8, 16) / 2);
  EXPECT_EQ(r->verified_bytes, 4 * MiB);
  nj.receiver = *t.lookup("nvme0");
  j.kind = nj;
  EXPECT_EQ(run_job(*m, j).error().code, EINVAL);  // not a NIC
  MachineOptions no_wire;
  no_wire.wire_gbps = 0;
  EXPECT_EQ(Machine::create(t, no_wire).error().code, EINVAL);  // a wire needs bandwidth
}

TEST(SimScenarioTest, ParsesAndResolves) {
  auto sc = parse_scenario(R"(
name = "t"
machine = "two-socket-switch"
[options]
iommu = false
rc_p2p_gbps = 6.5
nvme_read_latency_us = 10
[[job]]
name = "a"
device = "nvme0"
rw = "write"
bs = "64K"
qd = 4
size = "1M"
buffer = "nearest"
path = "bounce"
[[job]]
device = "nvme1"
)", "t.toml");
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  EXPECT_FALSE(sc->options.iommu);
  EXPECT_EQ(sc->options.fabric.rc_p2p_gbps, 6.5);
  EXPECT_EQ(sc->options.nvme_read_latency_ns, 10'000);
  ASSERT_EQ(sc->jobs.size(), 2u);
  EXPECT_TRUE(sc->jobs[0].write);
  EXPECT_EQ(sc->jobs[0].block_size, 64 * KiB);
  EXPECT_EQ(sc->jobs[0].path, PathPolicy::bounce);
  EXPECT_EQ(sc->jobs[1].name, "job2");
  EXPECT_EQ(sc->jobs[1].buffer, "host");
  EXPECT_EQ(sc->jobs[0].where, "t.toml:8");
  const auto t = machine("two-socket-switch");
  auto m = build(t, sc->options);
  auto j = resolve_job(sc->jobs[0], *m);
  ASSERT_TRUE(j.has_value()) << j.error().to_string();
  ASSERT_TRUE(std::holds_alternative<NvmeJob>(j->kind));
  EXPECT_EQ(std::get<NvmeJob>(j->kind).buffer_function, *t.lookup("nvme0"));  // its own CMB is the nearest (distance 0)
  EXPECT_EQ(std::get<NvmeJob>(j->kind).path, PathPolicy::bounce);
  JobSpec bad = sc->jobs[1];
  bad.device = "nosuch";
  EXPECT_NE(resolve_job(bad, *m).error().message.find("t.toml:17: job 'job2': device"), std::string::npos);
  bad = sc->jobs[1];
  bad.buffer = "nosuch";
  EXPECT_NE(resolve_job(bad, *m).error().message.find("or use host or nearest"), std::string::npos);
}

// buffer = "nearest" picks a provider that can serve the job (Linux
// pci_p2pmem_find_many() over the providers that qualify): published, large enough for
// bs x qd, and not the device's own BAR unless it is an NVMe CMB; EINVAL naming the job
// when none does.
TEST(SimScenarioTest, NearestPicksAProviderThatCanServeTheJob) {
  const auto resolve = [](const char* machine_name, const char* device, const char* size, const char* qd) {
    const std::string text = std::string("[[job]]\nname = \"n\"\ndevice = \"") + device + "\"\nsize = \"" + size +
                             "\"\nbs = \"128K\"\nqd = " + qd + "\nbuffer = \"nearest\"\n";
    auto sc = parse_scenario(text, "n.toml");
    EXPECT_TRUE(sc.has_value());
    static std::vector<std::pair<pci::Topology, std::unique_ptr<Machine>>> keep;  // outlive the aperture
    keep.emplace_back(machine(machine_name), nullptr);
    keep.back().second = build(keep.back().first);
    auto j = resolve_job(sc->jobs[0], *keep.back().second);
    std::optional<std::string> buffer;
    if (j) {
      std::visit([&](const auto& k) {
        if constexpr (requires { k.buffer_function; })
          if (k.buffer_function) buffer = keep.back().first.functions[*k.buffer_function].name;
      }, j->kind);
    }
    return std::pair{j.has_value() ? std::string() : j.error().to_string(), buffer.value_or("")};
  };
  // An SSD without a CMB: its 16 KiB register BAR is neither memory for 4 MiB nor its own to use.
  auto [err, buf] = resolve("two-socket-switch", "nvme2", "4M", "32");
  EXPECT_EQ(err, "");
  EXPECT_NE(buf, "nvme2");
  EXPECT_NE(buf, "");
  // A GPU's copy engine cannot use its own BAR as the other end.
  std::tie(err, buf) = resolve("two-socket-switch", "gpu0", "4M", "32");
  EXPECT_EQ(err, "");
  EXPECT_NE(buf, "gpu0");
  // An SSD's own CMB is its nearest memory (distance 0), when it holds the buffers.
  std::tie(err, buf) = resolve("two-socket-switch", "nvme0", "4M", "4");
  EXPECT_EQ(err, "");
  EXPECT_EQ(buf, "nvme0");
  // Nothing qualifies: EINVAL naming the job and the size.
  std::tie(err, buf) = resolve("xeon-e5-two-sockets", "nvme1", "128M", "1024");
  EXPECT_NE(err.find("EINVAL: n.toml:1: job 'n': buffer = \"nearest\": no published P2P memory of at least 128 MiB"), std::string::npos) << err;
}

TEST(SimScenarioTest, BadFilesNameTheFileLineKeyAndProblem) {
  const std::pair<const char*, const char*> cases[] = {
      {"[[job]]\ndevice = \"nvme0\"\nbs = \"12Q\"\n", "f.toml:3: job.bs"},
      {"[[job]]\ndevice = \"nvme0\"\nbs = 1000\n", "multiple of 512"},
      {"[[job]]\ndevice = \"nvme0\"\nsize = \"1M\"\nbs = \"3M\"\n", "job.size"},
      {"[[job]]\ndevice = \"nvme0\"\nrw = \"sideways\"\n", "f.toml:3: job.rw: 'sideways' must be read, write, randread or randwrite"},
      {"[[job]]\ndevice = \"nvme0\"\npath = \"teleport\"\n", "job.path"},
      {"[[job]]\ndevice = \"nvme0\"\nqd = 0\n", "job.qd"},
      {"[[job]]\ndevice = \"nvme0\"\nqd = 5000\n", "out of range"},
      {"[[job]]\nname = \"x\"\n", "missing key 'device'"},
      {"[[job]]\ndevice = \"\"\n", "f.toml:2: job 'job1': device is empty"},
      {"[[job]]\ndevice = \"nvme0\"\ncolour = 1\n", "unknown key 'colour'"},
      {"name = \"x\"\n", "at least one [[job]]"},
      {"job = 3\n", "expected an array of tables"},
      {"[options]\nrc_p2p_gbps = -1\n[[job]]\ndevice = \"a\"\n", "options.rc_p2p_gbps"},
      {"[options]\nram = \"1G\"\n[[job]]\ndevice = \"a\"\n", "at least 3 GiB"},
      {"[options]\niommu = \"yes\"\n[[job]]\ndevice = \"a\"\n", "options.iommu: expected true or false"},
      {"options = 3\n[[job]]\ndevice = \"a\"\n", "options: expected a table"},
      {"[[job]\n", "f.toml:1: TOML syntax"},
  };
  for (const auto& [text, want] : cases) {
    auto r = parse_scenario(text, "f.toml");
    ASSERT_FALSE(r.has_value()) << text;
    EXPECT_EQ(r.error().code, EINVAL) << text;
    EXPECT_NE(r.error().message.find(want), std::string::npos) << text << " -> " << r.error().message;
  }
}

TEST(SimScenarioTest, BuiltinScenariosLoadByName) {
  EXPECT_EQ(Scenario{}.machine, kDefaultMachine);
  ASSERT_FALSE(builtin_scenarios().empty());
  EXPECT_TRUE(builtin_scenario_text(kDefaultScenario).has_value());
  for (const BuiltinFile& f : builtin_scenarios()) {
    auto sc = load_scenario(f.name);
    ASSERT_TRUE(sc.has_value()) << f.name << ": " << sc.error().to_string();
    EXPECT_EQ(sc->source, "builtin:" + std::string(f.name));
    EXPECT_TRUE(sc->folder.empty());
    EXPECT_TRUE(pci::load_machine(scenario_machine(*sc)).has_value()) << f.name << " names machine " << sc->machine;
  }
  auto none = load_scenario("nosuch");
  ASSERT_FALSE(none.has_value());
  EXPECT_EQ(none.error().code, ENOENT);
  EXPECT_NE(none.error().message.find("scenario 'nosuch': no such file and no built-in scenario"), std::string::npos);
  EXPECT_NE(none.error().message.find(std::string(kDefaultScenario)), std::string::npos) << none.error().message;
}

// As fio: every job gets its entry, a failed one its error, and the jobs after it still run.
TEST(SimScenarioTest, RunReportsEveryJobAndKeepsGoingPastAFailure) {
  auto sc = parse_scenario(R"(
name = "mixed"
[[job]]
name = "ok1"
device = "nvme0"
size = "1M"
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
size = "1M"
)", "mixed.toml");
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  std::vector<std::string> seen;
  auto rep = run_scenario(*sc, [&](size_t i, const JobSpec& spec) { seen.push_back(std::to_string(i) + spec.name); });
  ASSERT_TRUE(rep.has_value()) << rep.error().to_string();
  EXPECT_EQ(seen, (std::vector<std::string>{"0ok1", "1nic-as-ssd", "2missing", "3ok2"}));
  EXPECT_EQ(rep->machine, kDefaultMachine);
  ASSERT_EQ(rep->jobs.size(), 4u);
  EXPECT_EQ(rep->failed(), 2u);
  ASSERT_TRUE(rep->jobs[0].result.has_value());
  EXPECT_EQ(rep->jobs[0].result->verified_bytes, 1 * MiB);
  EXPECT_TRUE(rep->jobs[0].result->took(Via::p2p_bus_addr));
  ASSERT_FALSE(rep->jobs[1].result.has_value());
  EXPECT_EQ(rep->jobs[1].name, "nic-as-ssd");
  EXPECT_EQ(rep->jobs[1].result.error().code, EINVAL);
  EXPECT_NE(rep->jobs[1].result.error().message.find("nic0 is neither an NVMe controller"), std::string::npos);
  ASSERT_FALSE(rep->jobs[2].result.has_value());
  EXPECT_NE(rep->jobs[2].result.error().message.find("mixed.toml:12: job 'missing': device"), std::string::npos)
      << rep->jobs[2].result.error().message;
  ASSERT_TRUE(rep->jobs[3].result.has_value()) << rep->jobs[3].result.error().to_string();
  EXPECT_EQ(rep->jobs[3].result->verified_bytes, 1 * MiB);
}

// A scenario file's relative machine path is taken from its folder first; a machine that
// is nowhere fails the run, naming the scenario's machine key (FILE:LINE) and the machine.
TEST(SimScenarioTest, MachinePathsAreRelativeToTheScenarioFolder) {
  const auto dir = std::filesystem::temp_directory_path() / ("physr-scen-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "machines");
  const auto write = [](const std::filesystem::path& p, std::string_view text) { std::ofstream(p, std::ios::binary) << text; };
  write(dir / "machines" / "zen.toml", *builtin_machine_text("amd-zen"));
  write(dir / "s.toml", "machine = \"machines/zen.toml\"\n[[job]]\ndevice = \"nvme0\"\nsize = \"1M\"\n");
  write(dir / "lost.toml", "machine = \"machines/gone.toml\"\n[[job]]\ndevice = \"nvme0\"\n");
  auto sc = load_scenario((dir / "s.toml").string());
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  EXPECT_EQ(sc->folder, dir);
  EXPECT_EQ(scenario_machine(*sc), (dir / "machines" / "zen.toml").string());
  auto rep = run_scenario(*sc);
  ASSERT_TRUE(rep.has_value()) << rep.error().to_string();
  EXPECT_EQ(rep->machine, (dir / "machines" / "zen.toml").string());
  ASSERT_EQ(rep->jobs.size(), 1u);
  EXPECT_TRUE(rep->jobs[0].result.has_value());
  auto lost = load_scenario((dir / "lost.toml").string());
  ASSERT_TRUE(lost.has_value()) << lost.error().to_string();
  EXPECT_EQ(scenario_machine(*lost), "machines/gone.toml");  // nothing beside it: as written
  auto failed = run_scenario(*lost);
  std::filesystem::remove_all(dir);
  ASSERT_FALSE(failed.has_value());
  EXPECT_EQ(failed.error().code, ENOENT);
  EXPECT_NE(failed.error().message.find("lost.toml:1: machine: machine 'machines/gone.toml': no such file"), std::string::npos)
      << failed.error().message;
}

// ---------------------------------------------------------------------------------------
// O_DIRECT copies (p2pmem-test, SPDK cmb_copy): mmap of a provider's allocate file, pinning,
// bios, the queue's P2PDMA feature, the DMA layer and the fabric.

Job odirect_job(const pci::Topology& t, const char* buffer, uint64_t host_bytes = 0, bool p2pdma = true,
                PathPolicy path = PathPolicy::p2p, uint64_t size = 4 * MiB) {
  Job j;
  j.name = "odirect";
  j.block_size = 128 * KiB;
  j.queue_depth = 8;
  j.size = size;
  DirectIoJob d{.ssd = *t.lookup("nvme0"), .target = *t.lookup("nvme1"), .buffer_function = {}, .host_bytes = host_bytes, .p2pdma = p2pdma, .path = path};
  if (buffer) d.buffer_function = *t.lookup(buffer);
  j.kind = d;
  return j;
}

// block/fops.c __blkdev_direct_IO() into P2P memory: nvme0 reads into a chunk of nvme1's CMB
// (mmap of its p2pmem allocate file), nvme1 writes it out from there; every byte is checked
// in the buffer and in nvme1's namespace, the traffic stays under the switch, and the chunks go
// back to the pool (its accounting is zero once the grace period passed).
TEST(SimDirectIoTest, CopiesThroughACmbChunkAndReturnsItToThePool) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const uint32_t nvme1 = *t.lookup("nvme1");
  const Job j = odirect_job(t, "nvme1");
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_EQ(r->device, "nvme0 -> nvme1");
  EXPECT_EQ(r->path, "p2p bus_addr (under the switch)");
  EXPECT_EQ(r->via, ViaFlags(Via::p2p_bus_addr));
  EXPECT_EQ(r->host_memory_bytes, 0u);
  EXPECT_EQ(r->rc_bytes, 0u);
  EXPECT_EQ(r->requests, 2 * j.size / j.block_size);  // one request per block each way
  EXPECT_GT(r->seconds, 0);
  m->p2pmem().barrier();
  const mem::PoolStats s = m->p2pmem().stats(nvme1);
  EXPECT_EQ(s.size, 64 * MiB);
  EXPECT_EQ(s.allocated, 0u);
  EXPECT_EQ(s.chunks, 0u);
  EXPECT_EQ(s.deferred, 0u);
  // Again on the same machine: the same pool, the same answer (the chunks were reusable).
  auto again = run_job(*m, j);
  ASSERT_TRUE(again.has_value()) << again.error().to_string();
  EXPECT_EQ(again->verified_bytes, j.size);
}

// One I/O whose buffer is host memory then P2P memory: two bios (they never share a
// provider) and two requests each way (a P2P bio is REQ_NOMERGE), every byte checked.
TEST(SimDirectIoTest, BuffersMixingHostAndP2PMemoryInOneIo) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const Job j = odirect_job(t, "gpu0", 32 * KiB);
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, j.size);
  EXPECT_EQ(r->buffer, "gpu0 BAR1 + host memory");
  EXPECT_TRUE(r->took(Via::p2p_bus_addr));
  EXPECT_TRUE(r->took(Via::host_memory));
  EXPECT_GT(r->host_memory_bytes, 0u);
  EXPECT_EQ(r->requests, 4 * j.size / j.block_size);
  m->p2pmem().barrier();
  EXPECT_EQ(m->p2pmem().stats(*t.lookup("gpu0")).allocated, 0u);
  // Host memory only works as well, through the IOMMU both ways.
  auto h = run_job(*m, odirect_job(t, nullptr));
  ASSERT_TRUE(h.has_value()) << h.error().to_string();
  EXPECT_EQ(h->path, "host memory");
  EXPECT_EQ(h->via, ViaFlags(Via::host_memory));
}

// block/fops.c __blkdev_direct_IO(): every bio of an I/O is submitted before any is waited
// for, and the iocb completes when the last one ends (dio->ref), so a block whose buffer is
// host memory then P2P memory is two requests each way timed together, as an SSD serves the
// commands of its queue: the block takes as long as its slower request, not the sum. Host
// memory is made slow (1 GB/s) so the host request is the slower by far; device latencies
// are fixed (sigma 0), so each job's time is its two command latencies plus its transfers.
TEST(SimDirectIoTest, AMixedBlocksRequestsRunConcurrently) {
  const auto t = machine("two-socket-switch");
  MachineOptions o;
  o.nvme_latency_sigma = 0;
  o.fabric.memory_gbps = 1.0;
  auto m = build(t, o);
  const auto one_block = [&](const char* buffer, uint64_t bs, uint64_t host_bytes) {
    Job j = odirect_job(t, buffer, host_bytes, true, PathPolicy::p2p, bs);
    j.block_size = bs;
    j.queue_depth = 1;
    auto r = run_job(*m, j);
    EXPECT_TRUE(r.has_value()) << r.error().to_string();
    return r.has_value() ? r->seconds * 1e9 : 0.0;
  };
  const double commands = o.nvme_read_latency_ns + o.nvme_write_latency_ns;
  const double host = one_block(nullptr, 128 * KiB, 0) - commands;   // the host half alone
  const double p2p = one_block("gpu0", 128 * KiB, 0) - commands;     // the P2P half alone
  const double mixed = one_block("gpu0", 256 * KiB, 128 * KiB) - commands;
  ASSERT_GT(host, 4 * p2p);  // the host request is the slower
  // The slower request's time (its bandwidth is its own: the P2P half shares only the
  // SSD's link, which has room for both), not the sum of the two.
  EXPECT_GE(mixed, std::max(host, p2p) * 0.99);
  EXPECT_LE(mixed, std::max(host, p2p) * 1.02);
  EXPECT_LT(mixed, host + 0.5 * p2p);
}

// The SSDs' command latencies in an O_DIRECT copy follow the model the NVMe jobs use
// (docs/sim.md, "The SSD model"): log-normal around the medians, drawn from the scenario's
// seed, the job and the block, so p50 < p99 < p99.9 and the same seed gives the same report.
TEST(SimDirectIoTest, CopyLatencyIsLogNormalAndSeeded) {
  const auto t = machine("two-socket-switch");
  const auto run = [&](const MachineOptions& o) {
    auto m = build(t, o);
    Job j = odirect_job(t, "gpu0", 0, true, PathPolicy::p2p, 4 * KiB * 4000);
    j.block_size = 4 * KiB;
    j.queue_depth = 1;
    auto r = run_job(*m, j);
    EXPECT_TRUE(r.has_value()) << r.error().to_string();
    return r.has_value() ? *r : JobResult{};
  };
  const JobResult a = run(MachineOptions{});
  EXPECT_LT(a.lat_p50_us, a.lat_p99_us);
  EXPECT_LT(a.lat_p99_us, a.lat_p999_us);
  // Queue depth 1: a block is a read then a write, medians 80 + 20 us, each with its spread.
  EXPECT_NEAR(a.lat_p50_us, 100, 10);
  EXPECT_GT(a.lat_p99_us, 150);
  const JobResult b = run(MachineOptions{});
  EXPECT_EQ(a.lat_p50_us, b.lat_p50_us);
  EXPECT_EQ(a.lat_p999_us, b.lat_p999_us);
  EXPECT_EQ(a.seconds, b.seconds);
  MachineOptions other;
  other.seed = 7;
  EXPECT_NE(run(other).seconds, a.seconds);
  MachineOptions fixed;
  fixed.nvme_latency_sigma = 0;
  const JobResult d = run(fixed);
  EXPECT_EQ(d.lat_p50_us, d.lat_p99_us);
}

// mm/gup.c try_grab_folio(): without BLK_FEAT_PCI_P2PDMA the block layer pins without
// FOLL_PCI_P2PDMA, so a P2P buffer is EREMOTEIO and nothing is left pinned or held; host
// buffers still work on such a queue.
TEST(SimDirectIoTest, AQueueWithoutP2PDmaIsEremoteio) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  auto r = run_job(*m, odirect_job(t, "nvme1", 0, /*p2pdma=*/false));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, EREMOTEIO) << r.error().to_string();
  EXPECT_NE(r.error().message.find("O_DIRECT read of nvme0"), std::string::npos) << r.error().message;
  m->p2pmem().barrier();
  EXPECT_EQ(m->p2pmem().stats(*t.lookup("nvme1")).allocated, 0u);
  auto mixed = run_job(*m, odirect_job(t, "nvme1", 64 * KiB, false));
  ASSERT_FALSE(mixed.has_value());
  EXPECT_EQ(mixed.error().code, EREMOTEIO);
  auto h = run_job(*m, odirect_job(t, nullptr, 0, false));
  ASSERT_TRUE(h.has_value()) << h.error().to_string();
}

// Shapes the job refuses, each EINVAL naming the rule; a BAR too small for the buffers'
// chunks is the pool's ENOMEM.
TEST(SimDirectIoTest, RefusesBadShapes) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const auto refuses = [&](Job j, int code, const std::string& needle) {
    auto r = run_job(*m, j);
    ASSERT_FALSE(r.has_value()) << needle;
    EXPECT_EQ(r.error().code, code) << r.error().to_string();
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().to_string();
  };
  refuses(odirect_job(t, "gpu0", 1000), EINVAL, "multiple of 4 KiB below the block size");
  refuses(odirect_job(t, "gpu0", 128 * KiB), EINVAL, "below the block size");
  refuses(odirect_job(t, nullptr, 4 * KiB), EINVAL, "host_bytes needs a P2P buffer");
  refuses(odirect_job(t, "gpu0", 0, true, PathPolicy::bounce), EINVAL, "not bounce");
  Job same = odirect_job(t, "gpu0");
  std::get<DirectIoJob>(same.kind).target = *t.lookup("nvme0");
  refuses(same, EINVAL, "another SSD");
  Job gpu = odirect_job(t, "nvme1");
  std::get<DirectIoJob>(gpu.kind).target = *t.lookup("gpu0");
  refuses(gpu, EINVAL, "gpu0 is not an NVMe controller");
  // The pool holds less than the 64 MiB CMB once a caller keeps most of it.
  const uint32_t nvme1 = *t.lookup("nvme1");
  ASSERT_TRUE(m->allocate_file(nvme1));
  auto hog = m->p2pmem().alloc(nvme1, 63 * MiB + 512 * KiB);
  ASSERT_TRUE(hog.has_value()) << hog.error().to_string();
  refuses(odirect_job(t, "nvme1"), ENOMEM, "p2pmem mmap of nvme1");
  ASSERT_TRUE(m->p2pmem().free(*hog));
}

// The scenario syntax: copy_to makes the job an O_DIRECT copy; host_bytes and p2pdma are
// its alone.
TEST(SimDirectIoTest, ScenarioSyntax) {
  auto sc = parse_scenario(R"(
[[job]]
name = "cmb-copy"
device = "nvme0"
copy_to = "nvme1"
buffer = "nvme1"
host_bytes = "4K"
p2pdma = false
bs = "128K"
size = "1M"
)", "odirect.toml");
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  const auto t = pci::load_builtin_machine(sc->machine).value();
  auto m = build(t);
  auto j = resolve_job(sc->jobs[0], *m);
  ASSERT_TRUE(j.has_value()) << j.error().to_string();
  ASSERT_TRUE(std::holds_alternative<DirectIoJob>(j->kind));
  const DirectIoJob& d = std::get<DirectIoJob>(j->kind);
  EXPECT_EQ(d.ssd, *t.lookup("nvme0"));
  EXPECT_EQ(d.target, *t.lookup("nvme1"));
  EXPECT_EQ(d.buffer_function, *t.lookup("nvme1"));
  EXPECT_EQ(d.host_bytes, 4 * KiB);
  EXPECT_FALSE(d.p2pdma);
  for (const char* bad : {"[[job]]\ndevice = \"nvme0\"\nhost_bytes = \"4K\"\n", "[[job]]\ndevice = \"nvme0\"\np2pdma = true\n",
                          "[[job]]\ndevice = \"nvme0\"\ncopy_to = \"nvme1\"\nrw = \"read\"\n"}) {
    auto b = parse_scenario(bad, "bad.toml");
    ASSERT_FALSE(b.has_value()) << bad;
    EXPECT_EQ(b.error().code, EINVAL);
    EXPECT_NE(b.error().message.find("bad.toml:"), std::string::npos) << b.error().message;
  }
}

// Jobs take BAR buffers from the BAR's P2P memory pool (pci_alloc_p2pmem) and give them
// back at the end: memory another user holds is never a job's buffer (the job fails with
// the pool's ENOMEM instead of writing over it), and after each job the pool's accounting
// is back to zero.
TEST(SimJobTest, BarBuffersComeFromThePoolAndGoBack) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const uint32_t nvme0 = *t.lookup("nvme0"), nvme1 = *t.lookup("nvme1"), gpu0 = *t.lookup("gpu0");
  Job j;
  j.name = "into-cmb";
  j.block_size = 128 * KiB;
  j.queue_depth = 32;
  j.size = 8 * MiB;
  j.kind = NvmeJob{nvme0, false, nvme1, PathPolicy::p2p};
  ASSERT_TRUE(run_job(*m, j).has_value());
  const mem::PoolStats after = m->p2pmem().stats(nvme1);
  EXPECT_EQ(after.size, 64 * MiB);  // the CMB became the pool's resource
  EXPECT_EQ(after.allocated, 0u);
  EXPECT_EQ(after.chunks, 0u);
  EXPECT_EQ(after.deferred, 0u);
  // Someone holds all but 2 MiB of the CMB: the job's 4 MiB of buffers do not fit.
  auto held = m->p2pmem().alloc(nvme1, 62 * MiB);
  ASSERT_TRUE(held.has_value()) << held.error().to_string();
  auto r = run_job(*m, j);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOMEM) << r.error().to_string();
  EXPECT_NE(r.error().message.find("job 'into-cmb': buffers in nvme1 BAR2 (CMB)"), std::string::npos) << r.error().message;
  ASSERT_TRUE(m->p2pmem().free(*held));
  // Network jobs too: RX buffers in the GPU's BAR, from its pool.
  Job n;
  n.name = "rx-gpu";
  n.block_size = 4 * KiB;
  n.queue_depth = 64;
  n.size = 1 * MiB;
  NetJob nj;
  nj.sender = *t.lookup("nic0");
  nj.receiver = *t.lookup("nic1");
  nj.rx_buffer_function = gpu0;
  n.kind = nj;
  auto nr = run_job(*m, n);
  ASSERT_TRUE(nr.has_value()) << nr.error().to_string();
  EXPECT_EQ(nr->verified_bytes, n.size);
  EXPECT_EQ(m->p2pmem().stats(gpu0).allocated, 0u);
  EXPECT_EQ(m->p2pmem().stats(gpu0).size, 64 * GiB);
}

// Random O_DIRECT copies on every reference machine: any two SSDs, buffers in host memory
// or any BAR (all P2P or mixed with host memory), queues with and without P2PDMA, either
// path. Each copies and checks every byte, or fails exactly where the rules say: EINVAL
// for a CMB without RDS (the reader's own) or WDS (the writer's own), EREMOTEIO for a p2p
// path the fabric refuses or P2P memory on a queue without BLK_FEAT_PCI_P2PDMA; and after
// each job the pools are back to zero.
TEST(SimDirectIoTest, RandomCopiesVerifyOrFailByTheRules) {
  size_t ran = 0, failed = 0;
  for (const char* name : {"two-socket-switch", "amd-zen", "xeon-e5-two-sockets", "arm64-offset"}) {
    const auto t = machine(name);
    auto m = build(t);
    std::vector<uint32_t> ssds, holders;
    for (uint32_t f = 0; f < t.functions.size(); ++f) {
      if (pci::is_nvme(t.functions[f])) ssds.push_back(f);
      if (m->largest_bar(f) && m->largest_bar(f)->span.size >= 64 * KiB) holders.push_back(f);
    }
    if (ssds.size() < 2) continue;
    std::mt19937_64 rng(7);
    const auto pick = [&](uint64_t n) { return static_cast<uint64_t>(rng() % n); };
    for (int round = 0; round < 16; ++round) {
      Job j;
      j.name = "r" + std::to_string(round);
      j.block_size = 4 * KiB * (1 + pick(32));
      j.queue_depth = static_cast<unsigned>(1 + pick(8));
      DirectIoJob d;
      d.ssd = ssds[pick(ssds.size())];
      do d.target = ssds[pick(ssds.size())];
      while (d.target == d.ssd);
      if (pick(3) != 0) d.buffer_function = holders[pick(holders.size())];
      if (d.buffer_function) {
        const uint64_t bar = m->largest_bar(*d.buffer_function)->span.size;
        j.block_size = std::min<uint64_t>(j.block_size, bar / 4096 * 4096 / 2);
        j.queue_depth = static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(j.queue_depth, bar / j.block_size)));
        if (pick(2)) d.host_bytes = 4 * KiB * pick(j.block_size / (4 * KiB));
      }
      j.size = j.block_size * (1 + pick(12));
      d.p2pdma = pick(4) != 0;
      d.path = pick(2) ? PathPolicy::p2p : PathPolicy::automatic;
      j.kind = d;
      const std::string what = std::string(name) + " " + j.name + " " + t.functions[d.ssd].name + " -> " + t.functions[d.target].name +
                               " via " + (d.buffer_function ? t.functions[*d.buffer_function].name : "host") + " bs " +
                               std::to_string(j.block_size) + " qd " + std::to_string(j.queue_depth) + " host_bytes " +
                               std::to_string(d.host_bytes) + (d.p2pdma ? "" : " no-p2pdma") + " " + path_policy_name(d.path);
      int expect = 0;
      if (d.buffer_function) {
        const uint32_t h = *d.buffer_function;
        const auto& cmb = t.functions[h].cmb;
        if (cmb && ((h == d.ssd && !cmb->rds) || (h == d.target && !cmb->wds))) expect = EINVAL;
        else if (d.path == PathPolicy::p2p &&
                 (!m->fabric().to_peer(d.ssd, h, true).has_value() || !m->fabric().to_peer(d.target, h, false).has_value()))
          expect = EREMOTEIO;
        else if (!d.p2pdma) expect = EREMOTEIO;
      }
      auto r = run_job(*m, j);
      if (expect) {
        ASSERT_FALSE(r.has_value()) << what;
        EXPECT_EQ(r.error().code, expect) << what << ": " << r.error().to_string();
        ++failed;
      } else {
        ASSERT_TRUE(r.has_value()) << what << ": " << r.error().to_string();
        EXPECT_EQ(r->verified_bytes, j.size) << what;
        EXPECT_EQ(r->iommu_faults, 0u) << what;
        ++ran;
      }
      m->p2pmem().barrier();
      if (d.buffer_function) {
        EXPECT_EQ(m->p2pmem().stats(*d.buffer_function).allocated, 0u) << what;
      }
    }
    EXPECT_EQ(m->bounce().used_slots(), 0u) << name;
  }
  EXPECT_GT(ran, 10u);
  EXPECT_GT(failed, 3u);
}


// ---------------------------------------------------------------------------------------
// The SSD model: an IOPS limit per device and a seeded latency distribution per command.

JobResult nvme_job(Machine& m, const pci::Topology& t, uint64_t bs, unsigned qd, uint64_t size, bool write = false, bool random = false) {
  Job j;
  j.name = "ssd";
  NvmeJob nv{*t.lookup("nvme0"), write, std::nullopt};
  nv.random = random;
  j.kind = nv;
  j.block_size = bs;
  j.queue_depth = qd;
  j.size = size;
  auto r = run_job(m, j);
  EXPECT_TRUE(r.has_value()) << r.error().to_string();
  return r.value_or(JobResult{});
}

double iops(const JobResult& r) { return static_cast<double>(r.ios) / r.seconds; }

TEST(SimSsdModelTest, SmallReadsAreBoundByTheIopsLimit) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  // 512 B reads at queue depth 128: 6.8 GB/s of media would be 13 M IOPS; the SSD does 1 M.
  const JobResult r = nvme_job(*m, t, 512, 128, 512 * 20'000);
  EXPECT_EQ(r.verified_bytes, 512u * 20'000);
  EXPECT_LE(iops(r), 1e6);
  EXPECT_GT(iops(r), 0.95e6);
  // Writes: 300 K IOPS.
  const JobResult w = nvme_job(*m, t, 4 * KiB, 64, 4 * KiB * 6000, true);
  EXPECT_LE(iops(w), 300e3);
  EXPECT_GT(iops(w), 0.95 * 300e3);
  // Large blocks stay bound by the bandwidth: 128 KiB at 6.8 GB/s is 52 K IOPS.
  const JobResult big = nvme_job(*m, t, 128 * KiB, 64, 64 * MiB);
  EXPECT_NEAR(big.gbps, 6.8, 0.4);
  // A limit the scenario sets: 100 K IOPS.
  MachineOptions slow;
  slow.nvme_read_iops = 100e3;
  auto m2 = build(t, slow);
  const JobResult s = nvme_job(*m2, t, 4 * KiB, 32, 4 * KiB * 3000);
  EXPECT_LE(iops(s), 100e3);
  EXPECT_GT(iops(s), 95e3);
}

TEST(SimSsdModelTest, CommandLatencyIsLogNormalAndSeeded) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  // Queue depth 1: each command's latency is its device latency plus the transfer.
  const JobResult a = nvme_job(*m, t, 4 * KiB, 1, 4 * KiB * 4000);
  EXPECT_LT(a.lat_p50_us, a.lat_p99_us);
  EXPECT_LT(a.lat_p99_us, a.lat_p999_us);
  // Median 80 us; sigma 0.3 puts p99 at 80 x exp(0.3 x 2.326) = 161 us, p99.9 at 203 us.
  EXPECT_NEAR(a.lat_p50_us, 80.6, 3);
  EXPECT_NEAR(a.lat_p99_us, 161, 161 * 0.08);
  EXPECT_NEAR(a.lat_p999_us, 203, 203 * 0.15);
  // Exactly, for seed 1 (the default) and this machine's first job.
  EXPECT_DOUBLE_EQ(a.lat_p50_us, 81.6635);
  EXPECT_DOUBLE_EQ(a.lat_p99_us, 159.2315);
  EXPECT_DOUBLE_EQ(a.lat_p999_us, 194.0475);
  // The same seed gives the same report, to the last digit.
  auto again = build(t);
  const JobResult b = nvme_job(*again, t, 4 * KiB, 1, 4 * KiB * 4000);
  EXPECT_EQ(a.lat_p50_us, b.lat_p50_us);
  EXPECT_EQ(a.lat_p99_us, b.lat_p99_us);
  EXPECT_EQ(a.lat_p999_us, b.lat_p999_us);
  EXPECT_EQ(a.seconds, b.seconds);
  // Another seed, other draws.
  MachineOptions other;
  other.seed = 7;
  auto m7 = build(t, other);
  const JobResult c = nvme_job(*m7, t, 4 * KiB, 1, 4 * KiB * 4000);
  EXPECT_NE(a.seconds, c.seconds);
  // sigma 0: every command takes the median (the model before the distribution).
  MachineOptions fixed;
  fixed.nvme_latency_sigma = 0;
  auto m0 = build(t, fixed);
  const JobResult d = nvme_job(*m0, t, 4 * KiB, 1, 4 * KiB * 1000);
  EXPECT_EQ(d.lat_p50_us, d.lat_p99_us);
}

TEST(SimSsdModelTest, ADeepQueueNeverExceedsTheLimitAndP99StaysAboveP50) {
  const auto t = machine("two-socket-switch");
  for (uint64_t seed : {1u, 2u, 3u}) {
    MachineOptions o;
    o.seed = seed;
    auto m = build(t, o);
    for (unsigned qd : {1u, 4u, 32u, 256u}) {
      const JobResult r = nvme_job(*m, t, 4 * KiB, qd, 4 * KiB * 2048, false, true);
      EXPECT_LE(iops(r), 1e6) << "qd " << qd;
      EXPECT_GE(r.lat_p99_us, r.lat_p50_us) << "qd " << qd;
      EXPECT_GE(r.lat_p999_us, r.lat_p99_us) << "qd " << qd;
    }
  }
}

TEST(SimSsdModelTest, RandomReadsAndWritesVisitEveryBlockOnceAndVerify) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const JobResult r = nvme_job(*m, t, 4 * KiB, 16, 4 * KiB * 1000, false, true);
  EXPECT_EQ(r.verified_bytes, 4 * KiB * 1000);
  EXPECT_EQ(r.rw, "randread");
  EXPECT_EQ(r.block_size, 4 * KiB);
  EXPECT_EQ(r.queue_depth, 16u);
  const JobResult w = nvme_job(*m, t, 4 * KiB, 16, 4 * KiB * 1000, true, true);
  EXPECT_EQ(w.verified_bytes, 4 * KiB * 1000);
  EXPECT_EQ(w.rw, "randwrite");
  for (uint64_t n : {1u, 2u, 3u, 1000u, 4096u, 4097u}) {
    const detail::Permutation p(n, 42);
    std::vector<bool> seen(n);
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t x = p(i);
      ASSERT_LT(x, n);
      EXPECT_FALSE(seen[x]) << "block " << x << " twice";
      seen[x] = true;
      moved += x != i;
    }
    if (n >= 1000) {
      EXPECT_GT(moved, n / 2);  // an order, not the identity
    }
  }
}

TEST(SimSsdModelTest, LatencyHistogramIsWithinItsPrecision) {
  detail::LatencyHistogram h;
  EXPECT_EQ(h.percentile(0.5), 0);
  std::vector<double> v;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 100'000; ++i) v.push_back(static_cast<double>(rng() % 10'000'000));
  for (double x : v) h.add(x);
  std::sort(v.begin(), v.end());
  for (double p : {0.0, 0.5, 0.9, 0.99, 0.999, 1.0}) {
    const double want = v[static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5)];
    EXPECT_NEAR(h.percentile(p), want, want / 256 + 0.5) << p;
  }
  detail::LatencyHistogram exact;
  for (double x : {3.0, 100.0, 127.0}) exact.add(x);
  EXPECT_EQ(exact.percentile(0), 3);
  EXPECT_EQ(exact.percentile(1), 127);
}

TEST(SimSsdModelTest, ScenarioKeysForTheSsdModel) {
  auto sc = parse_scenario(R"(
[options]
nvme_read_iops = 800000
nvme_write_iops = 250000
nvme_latency_sigma = 0.5
seed = 99
[[job]]
device = "nvme0"
rw = "randwrite"
bs = "4K"
size = "4M"
)", "t.toml");
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  EXPECT_EQ(sc->options.nvme_read_iops, 800e3);
  EXPECT_EQ(sc->options.nvme_write_iops, 250e3);
  EXPECT_EQ(sc->options.nvme_latency_sigma, 0.5);
  EXPECT_EQ(sc->options.seed, 99u);
  EXPECT_TRUE(sc->jobs[0].write);
  EXPECT_TRUE(sc->jobs[0].random);
  const auto bad = parse_scenario("[options]\nnvme_read_iops = 0\n[[job]]\ndevice = \"nvme0\"\n", "b.toml");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("nvme_read_iops"), std::string::npos);
  // randread on a GPU's copy engine: refused naming the job.
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  auto g = parse_scenario("[[job]]\nname = \"g\"\ndevice = \"gpu0\"\nrw = \"randread\"\n", "g.toml");
  ASSERT_TRUE(g.has_value()) << g.error().to_string();
  auto j = resolve_job(g->jobs[0], *m);
  ASSERT_FALSE(j.has_value());
  EXPECT_NE(j.error().message.find("NVMe"), std::string::npos);
}

TEST(SimSsdModelTest, MemoryPerJobIsBoundedByTheIosInFlight) {
  // The simulator's flow records and the stages' item records are reused as I/Os end: a
  // job's records do not grow with its I/O count.
  const auto t = machine("two-socket-switch");
  auto f = std::move(Fabric::create(t)).value();
  Simulator sim(f);
  const Route r = *f.to_memory(*t.lookup("nvme0"));
  detail::Stages st(sim, 100'000, 4096, 100);
  detail::LatencyHistogram lat;
  uint64_t done = 0, next = 0, in = 0;
  size_t most = 0;
  while (done < 100'000) {
    if (in < 8 && next < 100'000) {
      st.start(next++, {r}, 0);
      ++in;
      continue;
    }
    const auto fin = sim.step();
    for (size_t id : fin) most = std::max(most, id + 1);
    const uint64_t e = st.advance(fin, lat);
    done += e;
    in -= e;
  }
  EXPECT_EQ(lat.count(), 100'000u);
  EXPECT_LE(most, 8u);  // flow indices stay within the queue depth
}

// ---------------------------------------------------------------------------------------
// HMM jobs: a device works on a process buffer through a mirror (mm/hmm.c, mm/mmu_notifier.c)
// while the process remaps parts of it.

// gpu0 on 4 blocks of 64 KiB: the first 16 KiB of each anonymous, the rest nvme1's CMB.
Job hmm_job(const pci::Topology& t, const char* device = "gpu0", const char* buffer = "nvme1", uint64_t host_bytes = 16 * KiB) {
  Job j;
  j.name = "hmm";
  j.block_size = 64 * KiB;
  j.queue_depth = 4;
  j.size = 4 * MiB;
  HmmJob h;
  h.device = *t.lookup(device);
  h.host_bytes = host_bytes;
  if (buffer) h.buffer_function = *t.lookup(buffer);
  j.kind = h;
  return j;
}

// The simulated time of a job's midpoint, from a run without events: an event then lands
// after the device has touched every page of the buffer (the first of 64 passes). Faults
// cost no time in such a job, so events do not shift the timeline: events at different
// times land at different blocks.
double midpoint_us(Machine& m, Job& j) {
  std::get<HmmJob>(j.kind).fault_latency_us = 0;
  auto r = run_job(m, j);
  EXPECT_TRUE(r.has_value()) << r.error().to_string();
  return r.has_value() ? r->seconds * 1e6 / 2 : 0;
}

// Documentation/mm/hmm.rst: the device works through its mirror, faulting pages in on
// first touch (hmm_range_fault(), hmm_dma_map_pfn()); every byte it reads equals what the
// process maps there and every byte it writes reaches the process's page. Its P2P part goes
// by PCI bus address (nvme1's CMB under gpu0's switch: HMM_PFN_P2PDMA_BUS), its anonymous
// part through host memory; at the end nothing is left mapped, and the pool is whole again.
TEST(SimHmmTest, TheDeviceWorksThroughItsMirrorAndEveryByteIsChecked) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const Job j = hmm_job(t);
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, 2 * j.size);  // each block read and written
  EXPECT_EQ(r->bytes, 2 * j.size);
  EXPECT_EQ(r->device, "gpu0");
  EXPECT_EQ(r->buffer, "nvme1 BAR2 (CMB) + host memory");
  EXPECT_EQ(r->via, ViaFlags(Via::p2p_bus_addr) | Via::host_memory);
  // 256 KiB of buffer in 16-page fault windows: 4 faults, one per block, all in the first pass.
  EXPECT_EQ(r->hmm_faults, 4u);
  EXPECT_EQ(r->hmm_invalidations, 0u);
  EXPECT_EQ(r->hmm_events, 0u);
  EXPECT_EQ(r->path, "hmm mirror: p2p bus_addr (under the switch) + host memory; 4 faults, 0 invalidations, 0 retries, 0 of 0 events");
  EXPECT_EQ(r->host_memory_bytes, 2 * j.size / 4);  // the anonymous quarter, both ways
  EXPECT_EQ(r->rc_bytes, 0u);
  EXPECT_EQ(r->iommu_faults, 0u);
  m->p2pmem().barrier();
  EXPECT_EQ(m->p2pmem().stats(*t.lookup("nvme1")).allocated, 0u);
}

// mm/hmm.c hmm_range_fault() with the notifier's invalidations (mmu_interval_notifier's
// invalidate callback): the process remaps the P2P part of a block as anonymous memory
// and later back as P2P memory, and migrates anonymous pages; the notifier invalidates the
// device's entries each time, the device faults again and sees the new memory (every byte
// checked against the process's pages at that moment).
TEST(SimHmmTest, RemapsOfP2PToAnonymousAndBackAreSeenByTheDevice) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j = hmm_job(t);
  const double mid = midpoint_us(*m, j);
  auto& h = std::get<HmmJob>(j.kind);
  h.events = {{.at_us = mid, .op = HmmEvent::Op::anon, .offset = 16 * KiB, .len = 48 * KiB},
              {.at_us = mid * 1.5, .op = HmmEvent::Op::p2p, .offset = 16 * KiB, .len = 48 * KiB},
              {.at_us = mid / 2, .op = HmmEvent::Op::migrate, .offset = 64 * KiB, .len = 16 * KiB}};
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->verified_bytes, 2 * j.size);
  EXPECT_EQ(r->hmm_events, 3u);
  EXPECT_EQ(r->hmm_invalidations, 3u);  // munmap, migrate, munmap (an mmap into a hole invalidates nothing)
  EXPECT_EQ(r->hmm_faults, 4u + 3u) << r->path;  // the first pass, then one per changed span
  EXPECT_EQ(r->via, ViaFlags(Via::p2p_bus_addr) | Via::host_memory);
  // While block 0's P2P part was anonymous memory, its bytes went through host memory: more
  // than the quarter of the run without events.
  EXPECT_GT(r->host_memory_bytes, 2 * j.size / 4);
  m->p2pmem().barrier();
  EXPECT_EQ(m->p2pmem().stats(*t.lookup("nvme1")).allocated, 0u);
}

// The rule the byte checks pin (Documentation/mm/hmm.rst, mmu_interval_notifier_ops
// invalidate): a driver whose notifier no longer reaches its device page table keeps using
// the old translation after a remap, and the job's check of every byte the device reads
// and writes against the process's pages fails with EIO. The same job with the notifier
// in place passes.
TEST(SimHmmTest, AMirrorWithoutInvalidationFailsTheByteCheck) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j = hmm_job(t);
  const double mid = midpoint_us(*m, j);
  auto& h = std::get<HmmJob>(j.kind);
  h.events = {{.at_us = mid, .op = HmmEvent::Op::anon, .offset = 16 * KiB, .len = 48 * KiB}};
  auto good = run_job(*m, j);
  ASSERT_TRUE(good.has_value()) << good.error().to_string();
  EXPECT_EQ(good->hmm_events, 1u);
  h.test_drop_notifier = true;
  auto bad = run_job(*m, j);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, EIO) << bad.error().to_string();
  EXPECT_NE(bad.error().message.find("a stale translation"), std::string::npos) << bad.error().message;
  // Migration too: it keeps the data, but the device's entries still point at the old pages
  // (freed, and here reused for the next page migrated).
  h.events = {{.at_us = mid, .op = HmmEvent::Op::migrate, .offset = 0, .len = 16 * KiB}};
  bad = run_job(*m, j);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code, EIO) << bad.error().to_string();
  EXPECT_NE(bad.error().message.find("gpu0 read 0x100000000"), std::string::npos) << bad.error().message;
  h.test_drop_notifier = false;
  auto again = run_job(*m, j);
  ASSERT_TRUE(again.has_value()) << again.error().to_string();
}

// mmu_interval_read_retry() under the driver lock: a remap that lands while a device fault
// is between its hmm_range_fault() and its commit makes that attempt stale; the mirror
// retries and maps the new memory.
TEST(SimHmmTest, ARemapDuringAFaultIsRetried) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j = hmm_job(t);
  std::get<HmmJob>(j.kind).events = {{.at_us = 0, .op = HmmEvent::Op::anon, .offset = 0, .len = 64 * KiB, .race = true}};
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->hmm_retries, 1u);
  EXPECT_EQ(r->hmm_events, 1u);
  EXPECT_EQ(r->hmm_invalidations, 1u);
  EXPECT_EQ(r->verified_bytes, 2 * j.size);
}

// mm/hmm.c hmm_dma_map_pfn(): an RDMA NIC with on-demand paging reaches the GPU's BAR only
// through the host bridge (nic0 is behind an ACS-redirecting port): P2P pages are mapped
// through its IOMMU domain with the MMIO attribute (HMM_PFN_P2PDMA) and cross the root
// complex; all-anonymous buffers go through host memory only.
TEST(SimHmmTest, AnOdpNicReachesP2PMemoryThroughTheHostBridge) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  Job j = hmm_job(t, "nic0", "gpu0");
  auto r = run_job(*m, j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->via, ViaFlags(Via::p2p_host_bridge) | Via::host_memory);
  EXPECT_EQ(r->rc_bytes, 2 * j.size * 3 / 4);
  EXPECT_NE(r->path.find("p2p thru_host_bridge (through the root complex) + host memory"), std::string::npos) << r->path;
  auto host = run_job(*m, hmm_job(t, "nic0", nullptr, 0));
  ASSERT_TRUE(host.has_value()) << host.error().to_string();
  EXPECT_EQ(host->via, ViaFlags(Via::host_memory));
  EXPECT_EQ(host->buffer, "host memory");
}

TEST(SimHmmTest, RefusesBadShapes) {
  const auto t = machine("two-socket-switch");
  auto m = build(t);
  const auto refuses = [&](Job j, const std::string& needle) {
    auto r = run_job(*m, j);
    ASSERT_FALSE(r.has_value()) << needle;
    EXPECT_EQ(r.error().code, EINVAL) << r.error().to_string();
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().to_string();
  };
  refuses(hmm_job(t, "nvme0"), "nvme0 is neither a GPU or accelerator nor a NIC");
  refuses(hmm_job(t, "gpu0", "gpu0"), "another device's");
  refuses(hmm_job(t, "gpu0", "nvme1", 1000), "multiple of 4 KiB below the block size");
  refuses(hmm_job(t, "gpu0", nullptr, 4 * KiB), "host_bytes needs a P2P buffer");
  Job odd = hmm_job(t);
  odd.block_size = 6 * KiB + 512;
  odd.size = odd.block_size * 8;
  refuses(odd, "multiple of 4 KiB");
  Job ev = hmm_job(t);
  std::get<HmmJob>(ev.kind).events = {{.at_us = 1, .op = HmmEvent::Op::anon, .offset = 192 * KiB, .len = 128 * KiB}};
  refuses(ev, "event 1: [196608, +131072) must be whole pages of the 256 KiB buffer");
  Job p2p = hmm_job(t, "gpu0", nullptr, 0);
  std::get<HmmJob>(p2p.kind).events = {{.at_us = 1, .op = HmmEvent::Op::p2p, .offset = 0, .len = 4 * KiB}};
  refuses(p2p, "needs a P2P buffer device");
}

// The scenario syntax: hmm = true makes the job an HMM job; fault_pages, fault_us and
// [[job.event]] are its alone, host_bytes it shares with O_DIRECT copies.
TEST(SimHmmTest, ScenarioSyntax) {
  auto sc = parse_scenario(R"(
[[job]]
name = "svm"
device = "gpu0"
hmm = true
buffer = "nvme1"
host_bytes = "16K"
fault_pages = 4
fault_us = 5
bs = "64K"
qd = 4
size = "1M"
[[job.event]]
at_us = 10
op = "anon"
offset = "16K"
len = "48K"
[[job.event]]
at_us = 20.5
op = "p2p"
len = "4K"
race = true
)", "hmm.toml");
  ASSERT_TRUE(sc.has_value()) << sc.error().to_string();
  const auto t = pci::load_builtin_machine(sc->machine).value();
  auto m = build(t);
  auto j = resolve_job(sc->jobs[0], *m);
  ASSERT_TRUE(j.has_value()) << j.error().to_string();
  ASSERT_TRUE(std::holds_alternative<HmmJob>(j->kind));
  const HmmJob& h = std::get<HmmJob>(j->kind);
  EXPECT_EQ(h.device, *t.lookup("gpu0"));
  EXPECT_EQ(h.buffer_function, *t.lookup("nvme1"));
  EXPECT_EQ(h.host_bytes, 16 * KiB);
  EXPECT_EQ(h.fault_pages, 4u);
  EXPECT_EQ(h.fault_latency_us, 5);
  ASSERT_EQ(h.events.size(), 2u);
  EXPECT_EQ(h.events[0].op, HmmEvent::Op::anon);
  EXPECT_EQ(h.events[0].offset, 16 * KiB);
  EXPECT_EQ(h.events[0].len, 48 * KiB);
  EXPECT_FALSE(h.events[0].race);
  EXPECT_EQ(h.events[1].at_us, 20.5);
  EXPECT_EQ(h.events[1].op, HmmEvent::Op::p2p);
  EXPECT_EQ(h.events[1].offset, 0u);
  EXPECT_TRUE(h.events[1].race);
  auto r = run_job(*m, *j);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->hmm_events, 2u);
  for (const char* bad : {"[[job]]\ndevice = \"gpu0\"\nfault_pages = 4\n", "[[job]]\ndevice = \"gpu0\"\nhmm = true\nrw = \"read\"\n",
                          "[[job]]\ndevice = \"gpu0\"\nhmm = true\npath = \"p2p\"\n", "[[job]]\ndevice = \"nic0\"\npeer = \"nic1\"\nhmm = true\n",
                          "[[job]]\ndevice = \"gpu0\"\n[[job.event]]\nat_us = 1\nop = \"anon\"\nlen = \"4K\"\n",
                          "[[job]]\ndevice = \"gpu0\"\nhmm = true\n[[job.event]]\nat_us = 1\nop = \"mremap\"\nlen = \"4K\"\n",
                          "[[job]]\ndevice = \"gpu0\"\nhmm = true\n[[job.event]]\nat_us = 1\nop = \"anon\"\nlen = 100\n",
                          "[[job]]\ndevice = \"gpu0\"\nhmm = true\n[[job.event]]\nop = \"anon\"\nlen = \"4K\"\n",
                          "[[job]]\ndevice = \"gpu0\"\nhmm = true\n[[job.event]]\nat_us = 1\nop = \"anon\"\nlen = \"4K\"\nwhen = 3\n"}) {
    auto b = parse_scenario(bad, "bad.toml");
    ASSERT_FALSE(b.has_value()) << bad;
    EXPECT_EQ(b.error().code, EINVAL);
    EXPECT_NE(b.error().message.find("bad.toml:"), std::string::npos) << b.error().message;
  }
}

}  // namespace
}  // namespace physr::sim
