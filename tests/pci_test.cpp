#include <sys/stat.h>
#include "physr/pci.hpp"
#include "physr/builtin.hpp"
#include "support/kernel_p2p.hpp"
#include "support/sysfs_snapshots.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <filesystem>
#include <random>
#include <type_traits>
#include <vector>

namespace physr::pci {
namespace {

namespace fs = std::filesystem;

// --- helpers ----------------------------------------------------------------------------

// A machine in TOML, built line by line so each test shows just its tree.
struct M {
  std::string text;
  explicit M(const char* cpu_vendor = "GenuineIntel", int family = 6) {
    text = "[cpu]\nvendor = \"" + std::string(cpu_vendor) + "\"\nfamily = " + std::to_string(family) + "\n";
  }
  M& hb(int bus, int domain = 0, int node = 0) {
    text += "[[host_bridge]]\ndomain = " + std::to_string(domain) + "\nbus = " + std::to_string(bus) +
            "\nnuma_node = " + std::to_string(node) + "\n";
    return *this;
  }
  M& fn(const std::string& bdf, const std::string& type, const std::string& parent = "", const std::string& acs = "",
        int vendor = 0x1234, int device = 0x0001) {
    const bool bridge = type == "root_port" || type == "switch_upstream" || type == "switch_downstream";
    text += "[[function]]\nbdf = \"" + bdf + "\"\nvendor = " + std::to_string(vendor) + "\ndevice = " +
            std::to_string(device) + "\nclass = " + std::to_string(bridge ? kClassPciBridge : type == "host" ? kClassHostBridge : kClassNvme) +
            "\ntype = \"" + (type == "host" ? std::string("rc_integrated_endpoint") : type) + "\"\n";
    if (!parent.empty()) text += "parent = \"" + parent + "\"\n";
    if (!acs.empty()) text += "acs = \"" + acs + "\"\n";
    return *this;
  }
  Topology load() const {
    auto t = parse_machine(text, "test");
    EXPECT_TRUE(t.has_value()) << t.error().to_string() << "\n" << text;
    return t.has_value() ? *t : Topology{};
  }
};

Verdict v(const Topology& t, const char* a, const char* b, VerdictOptions o = {}) {
  auto e = P2PEngine::create(t, o);
  EXPECT_TRUE(e.has_value());
  return e->verdict(*t.lookup(a), *t.lookup(b));
}

void expect(const Verdict& got, MapType type, int distance) {
  EXPECT_EQ(map_type_name(got.type), std::string(map_type_name(type)));
  EXPECT_EQ(got.distance, distance);
}

// An allowlisted host (Skylake-E 8086:2020 at 00.0) with one switch below a root port.
M switch_machine(const char* dsp0_acs = "", const char* usp_acs = "", const char* rp_acs = "SV RR CR UF") {
  M m;
  m.hb(0)
      .fn("00:00.0", "host", "", "", 0x8086, 0x2020)
      .fn("00:01.0", "root_port", "", rp_acs)
      .fn("01:00.0", "switch_upstream", "00:01.0", usp_acs)
      .fn("02:00.0", "switch_downstream", "01:00.0", dsp0_acs)
      .fn("02:01.0", "switch_downstream", "01:00.0")
      .fn("03:00.0", "endpoint", "02:00.0")
      .fn("04:00.0", "endpoint", "02:01.0");
  return m;
}

// --- addresses and config space ----------------------------------------------------------

TEST(BdfTest, ParsesAndFormats) {
  EXPECT_EQ(parse_bdf("0000:03:00.0")->to_string(), "0000:03:00.0");
  EXPECT_EQ(parse_bdf("03:1f.7")->to_string(), "0000:03:1f.7");
  EXPECT_EQ(parse_bdf("10000:00:04.0")->domain, 0x10000u);
  EXPECT_EQ(parse_bdf("10000:00:04.0")->to_string(), "10000:00:04.0");
  for (const char* bad : {"", "03:00", "03:20.0", "03:00.8", "0000:100:00.0", "zz:00.0", "0000:03:00.0x", "123456789:00:00.0"}) {
    auto r = parse_bdf(bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_NE(r.error().message.find(std::string("'") + bad + "'"), std::string::npos);
  }
}

std::vector<uint8_t> config(size_t size, uint16_t vendor, uint32_t cls) {
  std::vector<uint8_t> c(size, 0);
  c[0] = vendor & 0xff;
  c[1] = static_cast<uint8_t>(vendor >> 8);
  c[9] = cls & 0xff;
  c[10] = (cls >> 8) & 0xff;
  c[11] = (cls >> 16) & 0xff;
  return c;
}
void add_pcie_cap(std::vector<uint8_t>& c, uint8_t at, unsigned type, uint8_t next = 0) {
  c[6] |= 0x10;  // capabilities list
  if (c[0x34] == 0) c[0x34] = at;
  c[at] = 0x10;
  c[at + 1] = next;
  c[at + 2] = static_cast<uint8_t>(type << 4);
}

TEST(ConfigTest, HeaderOnlyLeavesPortTypeAndAcsUnknown) {
  auto c = config(64, 0x8086, 0x060400);
  auto i = parse_config(c);
  ASSERT_TRUE(i.has_value());
  EXPECT_EQ(i->vendor, 0x8086);
  EXPECT_EQ(i->class_code, 0x060400u);
  EXPECT_EQ(i->port_type, PortType::unknown);
  EXPECT_EQ(i->acs.kind, AcsState::Kind::unknown);
  EXPECT_EQ(parse_config(std::vector<uint8_t>(63)).error().code, EINVAL);
}

TEST(ConfigTest, FindsPcieAndAcsCapabilities) {
  auto c = config(4096, 0x10b5, 0x060400);
  c[0x40] = 0x01;  // PM capability first
  c[0x41] = 0x60;
  c[6] |= 0x10;
  c[0x34] = 0x40;
  add_pcie_cap(c, 0x60, 6);
  c[0x34] = 0x40;
  // Extended: AER at 0x100 -> ACS at 0x148.
  c[0x100] = 0x01;
  c[0x102] = 0x01 << 4;  // version 1, next 0x148 = bits 31:20
  c[0x103] = 0x14;
  c[0x102] |= 0x01;
  const uint32_t aer = 0x0001 | (1u << 16) | (0x148u << 20);
  for (int k = 0; k < 4; ++k) c[0x100 + static_cast<size_t>(k)] = static_cast<uint8_t>(aer >> (8 * k));
  c[0x148] = 0x0d;
  c[0x14a] = 0x01 << 4;
  c[0x14c] = 0x5f;
  c[0x14e] = acs::RR | acs::CR;
  auto i = parse_config(c);
  ASSERT_TRUE(i.has_value());
  EXPECT_TRUE(i->has_pcie);
  EXPECT_EQ(i->port_type, PortType::switch_downstream);
  EXPECT_EQ(i->acs.kind, AcsState::Kind::present);
  EXPECT_EQ(i->acs.ctrl, acs::RR | acs::CR);
  EXPECT_TRUE(i->acs.redirects());
  // 256 bytes: PCIe capability known, extended space (so ACS) not read.
  std::vector<uint8_t> short_c(c.begin(), c.begin() + 256);
  i = parse_config(short_c);
  EXPECT_EQ(i->port_type, PortType::switch_downstream);
  EXPECT_EQ(i->acs.kind, AcsState::Kind::unknown);
}

TEST(ConfigTest, LoopingOrWildChainsTerminate) {
  auto c = config(4096, 0x1, 0x010802);
  add_pcie_cap(c, 0x40, 0, 0x40);  // points at itself
  auto i = parse_config(c);
  ASSERT_TRUE(i.has_value());
  EXPECT_EQ(i->port_type, PortType::endpoint);
  // Extended capability that points at itself: bounded, no ACS found.
  const uint32_t self = 0x0001 | (0x100u << 20);
  for (int k = 0; k < 4; ++k) c[0x100 + static_cast<size_t>(k)] = static_cast<uint8_t>(self >> (8 * k));
  i = parse_config(c);
  EXPECT_EQ(i->acs.kind, AcsState::Kind::absent);
  // Pointers into the header or past the end stop the walk.
  auto d = config(256, 0x1, 0x010802);
  d[6] |= 0x10;
  d[0x34] = 0x10;
  EXPECT_EQ(parse_config(d)->port_type, PortType::conventional);
  d[0x34] = 0xfe;
  EXPECT_TRUE(parse_config(d).has_value());
}

// --- verdict rules, one branch each ----------------------------------------------------

TEST(VerdictTest, SameFunctionIsBusAddrDistanceZero) {
  Topology t = switch_machine().load();
  expect(v(t, "03:00.0", "03:00.0"), MapType::bus_addr, 0);
}

TEST(VerdictTest, TwoFunctionsOfOneDeviceAreDistanceTwo) {
  M m;
  m.hb(0).fn("00:00.0", "host").fn("00:01.0", "root_port", "", "SV RR CR UF").fn("01:00.0", "endpoint", "00:01.0").fn("01:00.1", "endpoint", "00:01.0");
  Topology t = m.load();
  // The common device is the root port; its own ACS counts (it is on the provider's side).
  expect(v(t, "01:00.0", "01:00.1"), MapType::not_supported, 2);
  M n;
  n.hb(0).fn("00:00.0", "host").fn("00:01.0", "root_port").fn("01:00.0", "endpoint", "00:01.0").fn("01:00.1", "endpoint", "00:01.0");
  expect(v(n.load(), "01:00.0", "01:00.1"), MapType::bus_addr, 2);
}

TEST(VerdictTest, SwitchWithoutAcsRedirectIsBusAddrFour) {
  Topology t = switch_machine("SV").load();
  expect(v(t, "03:00.0", "04:00.0"), MapType::bus_addr, 4);
  expect(v(t, "04:00.0", "03:00.0"), MapType::bus_addr, 4);
}

TEST(VerdictTest, AcsRedirectOnEitherDownstreamPortGoesThroughHostBridge) {
  for (const char* bits : {"RR", "CR", "EC", "SV RR CR UF"}) {
    Topology t = switch_machine(bits).load();
    expect(v(t, "03:00.0", "04:00.0"), MapType::thru_host_bridge, 4);  // provider side
    expect(v(t, "04:00.0", "03:00.0"), MapType::thru_host_bridge, 4);  // client side
  }
  for (const char* bits : {"SV", "TB", "UF", "DT", "none"}) {
    Topology t = switch_machine(bits).load();
    expect(v(t, "03:00.0", "04:00.0"), MapType::bus_addr, 4);
  }
}

TEST(VerdictTest, AcsOnCommonDeviceCountsAndAboveItDoesNot) {
  expect(v(switch_machine("", "RR").load(), "03:00.0", "04:00.0"), MapType::thru_host_bridge, 4);
  expect(v(switch_machine("", "", "RR CR").load(), "03:00.0", "04:00.0"), MapType::bus_addr, 4);
}

TEST(VerdictTest, AcsOnEndpointCountsEvenForItself) {
  M m = switch_machine();
  m.text += "";
  Topology t = m.load();
  // Give the endpoint 03:00.0 ACS redirect (a multi-function device carries ACS).
  t.functions[*t.lookup("03:00.0")].acs = AcsState{AcsState::Kind::present, 0x7f, acs::RR};
  expect(v(t, "03:00.0", "03:00.0"), MapType::thru_host_bridge, 0);
  expect(v(t, "03:00.0", "04:00.0"), MapType::thru_host_bridge, 4);
  expect(v(t, "04:00.0", "03:00.0"), MapType::thru_host_bridge, 4);
}

TEST(VerdictTest, AssumeAcsOffRestoresBusAddr) {
  Topology t = switch_machine("RR").load();
  expect(v(t, "03:00.0", "04:00.0", VerdictOptions{{*parse_bdf("02:00.0")}, {}}), MapType::bus_addr, 4);
  auto bad = P2PEngine::create(t, VerdictOptions{{*parse_bdf("09:00.0")}, {}});
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("0000:09:00.0"), std::string::npos);
}

M two_root_ports(int vendor, int device, const char* first = "00:00.0", const char* first_type = "host") {
  M m;
  m.hb(0).fn(first, first_type, "", "", vendor, device).fn("00:02.0", "root_port").fn("00:03.0", "root_port");
  m.fn("01:00.0", "endpoint", "00:02.0").fn("02:00.0", "endpoint", "00:03.0");
  return m;
}

TEST(VerdictTest, TwoRootPortsOfOneHostBridgeUseTheAllowlist) {
  expect(v(two_root_ports(0x8086, 0x2020).load(), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);
  expect(v(two_root_ports(0x8086, 0x3c00).load(), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);  // same bridge
  expect(v(two_root_ports(0x8086, 0x3407).load(), "01:00.0", "02:00.0"), MapType::not_supported, 4);
  expect(v(two_root_ports(0x1ae0, 0x4242).load(), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);  // Google any
  expect(v(two_root_ports(0x10de, 0x2f97).load(), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);
  expect(v(two_root_ports(0x10de, 0x2f99).load(), "01:00.0", "02:00.0"), MapType::not_supported, 4);
}

TEST(VerdictTest, IdentifyingDeviceIsFirstOnRootBusIfDevfnZeroOrRootPort) {
  // Skylake without a 00.0 device: the first root port (8086:2030) identifies the bridge.
  expect(v(two_root_ports(0x8086, 0x2030, "00:01.0", "root_port").load(), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);
  // First device at 00:01.0 and not a root port: no identifying device, allowlist fails.
  expect(v(two_root_ports(0x8086, 0x2020, "00:01.0", "rc_integrated_endpoint").load(), "01:00.0", "02:00.0"),
         MapType::not_supported, 4);
}

M two_host_bridges(int dev0, int dev1, int domain1 = 0) {
  M m;
  m.hb(0).hb(0x80, domain1, 1);
  const std::string d = domain1 ? "0001:" : "";
  m.fn("00:00.0", "host", "", "", 0x8086, dev0).fn("00:01.0", "root_port").fn("01:00.0", "endpoint", "00:01.0");
  m.fn(d + "80:00.0", "host", "", "", 0x8086, dev1).fn(d + "80:01.0", "root_port").fn(d + "81:00.0", "endpoint", d + "80:01.0");
  return m;
}

TEST(VerdictTest, DifferentHostBridgesMustBothPassWithoutSameFlag) {
  expect(v(two_host_bridges(0x2020, 0x2020).load(), "01:00.0", "81:00.0"), MapType::thru_host_bridge, 4);
  expect(v(two_host_bridges(0x2020, 0x3407).load(), "01:00.0", "81:00.0"), MapType::not_supported, 4);
  expect(v(two_host_bridges(0x3c00, 0x3c00).load(), "01:00.0", "81:00.0"), MapType::not_supported, 4);  // REQ_SAME
  expect(v(two_host_bridges(0x2f01, 0x2f01).load(), "01:00.0", "81:00.0"), MapType::not_supported, 4);
  // A second PCI domain behaves the same.
  expect(v(two_host_bridges(0x2020, 0x2020, 1).load(), "01:00.0", "0001:81:00.0"), MapType::thru_host_bridge, 4);
}

// Linux p2pdma.c pci_p2pdma_whitelist[]: the Zhaoxin host bridges (KX-6000, KH-40000,
// KX-6000G, KX-7000, KH-50000); 1003, 1005, 1006 and 1007 only within one host bridge.
TEST(VerdictTest, ZhaoxinHostBridgesAreAllowlisted) {
  auto zx = [](int dev0, int dev1) {
    M m;
    m.hb(0).hb(0x80, 0, 1);
    m.fn("00:00.0", "host", "", "", 0x1d17, dev0).fn("00:01.0", "root_port").fn("00:02.0", "root_port");
    m.fn("01:00.0", "endpoint", "00:01.0").fn("02:00.0", "endpoint", "00:02.0");
    m.fn("80:00.0", "host", "", "", 0x1d17, dev1).fn("80:01.0", "root_port").fn("81:00.0", "endpoint", "80:01.0");
    return m.load();
  };
  for (int dev : {0x1003, 0x1005, 0x1006, 0x1007}) {
    expect(v(zx(dev, dev), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);  // one host bridge
    expect(v(zx(dev, dev), "01:00.0", "81:00.0"), MapType::not_supported, 4);     // REQ_SAME_HOST_BRIDGE
  }
  expect(v(zx(0x1008, 0x1008), "01:00.0", "02:00.0"), MapType::thru_host_bridge, 4);
  expect(v(zx(0x1008, 0x1008), "01:00.0", "81:00.0"), MapType::thru_host_bridge, 4);
  expect(v(zx(0x1008, 0x1003), "01:00.0", "81:00.0"), MapType::not_supported, 4);
  expect(v(zx(0x1004, 0x1004), "01:00.0", "02:00.0"), MapType::not_supported, 4);  // not listed
}

TEST(KernelVersionTest, ParsesReleasesAndUnameAndRejectsTheRest) {
  auto k = [](const char* t) { return parse_kernel_version(t); };
  EXPECT_EQ(*k("6.12"), (KernelVersion{6, 12}));
  EXPECT_EQ(*k("6.12.117"), (KernelVersion{6, 12}));
  EXPECT_EQ(*k("6.18.44-fc-v857"), (KernelVersion{6, 18}));
  EXPECT_EQ(*k("7.3-rc1"), (KernelVersion{7, 3}));
  EXPECT_EQ(*k("5.15.0-91-generic"), (KernelVersion{5, 15}));
  EXPECT_EQ(k("6.12").value().to_string(), "6.12");
  for (const char* bad : {"", "6", "6.", ".12", "six.twelve", "6.12x", "0.9", "6..12", "12345.1", "-6.12"}) {
    auto r = k(bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find("MAJOR.MINOR"), std::string::npos);
  }
  EXPECT_LT((KernelVersion{6, 12}), (KernelVersion{7, 1}));
  EXPECT_LT((KernelVersion{5, 19}), (KernelVersion{5, 20}));
}

// Each allowlist entry applies from the mainline release that added it to
// pci_p2pdma_whitelist[]; pci_host_bridge_dev() takes a Root Port at any devfn from 5.19.
TEST(VerdictTest, KernelVersionPicksThatReleasesAllowlist) {
  auto at = [](int vendor, int device, KernelVersion k) {
    return v(two_root_ports(vendor, device).load(), "01:00.0", "02:00.0", VerdictOptions{{}, {}, k}).type;
  };
  struct Case { int vendor, device; KernelVersion before, from; };
  const Case cases[] = {
      {0x8086, 0x09a2, {5, 17}, {5, 18}},  // 3rd gen Xeon Scalable
      {0x1ae0, 0x4242, {7, 0}, {7, 1}},    // Google, any device
      {0x8086, 0x0b25, {7, 1}, {7, 2}},    // DSA (SPR)
      {0x8086, 0x4948, {7, 1}, {7, 2}},    // QAT 6xxx
      {0x10de, 0x2f95, {7, 2}, {7, 3}},    // NVIDIA
      {0x1d17, 0x1008, {7, 3}, {7, 4}},    // Zhaoxin
  };
  for (const Case& c : cases) {
    EXPECT_EQ(at(c.vendor, c.device, c.before), MapType::not_supported) << c.device << " at " << c.before.to_string();
    EXPECT_EQ(at(c.vendor, c.device, c.from), MapType::thru_host_bridge) << c.device << " at " << c.from.to_string();
  }
  // Linux 6.12 (Debian's linux-source-6.12): Xeon E5/E7, Skylake-E and 09a2 only.
  for (int dev : {0x2020, 0x2030, 0x2031, 0x2032, 0x2033, 0x09a2, 0x3c00, 0x3c01, 0x2f00, 0x2f01})
    EXPECT_EQ(at(0x8086, dev, {6, 12}), MapType::thru_host_bridge) << dev;
  for (auto [vendor, dev] : {std::pair{0x8086, 0x0b25}, {0x1ae0, 0x0000}, {0x10de, 0x2f98}, {0x1d17, 0x1003}})
    EXPECT_EQ(at(vendor, dev, {6, 12}), MapType::not_supported) << dev;
  // A release newer than physr knows gets the newest rules.
  EXPECT_EQ(at(0x1d17, 0x1008, {9, 0}), MapType::thru_host_bridge);
  // Skylake without a 00.0 device: the first Root Port identifies the host bridge from 5.19.
  auto rp = [](KernelVersion k) {
    return v(two_root_ports(0x8086, 0x2030, "00:01.0", "root_port").load(), "01:00.0", "02:00.0", VerdictOptions{{}, {}, k}).type;
  };
  EXPECT_EQ(rp({5, 18}), MapType::not_supported);
  EXPECT_EQ(rp({5, 19}), MapType::thru_host_bridge);
  // Older than physr models: EINVAL naming both releases.
  Topology t = two_root_ports(0x8086, 0x2020).load();
  auto old = P2PEngine::create(t, VerdictOptions{{}, {}, {5, 8}});
  ASSERT_FALSE(old.has_value());
  EXPECT_EQ(old.error().code, EINVAL);
  EXPECT_NE(old.error().message.find("5.8"), std::string::npos);
  EXPECT_NE(old.error().message.find("5.9"), std::string::npos);
  EXPECT_EQ(P2PEngine::create(t, VerdictOptions{{}, {}, {5, 9}})->kernel(), (KernelVersion{5, 9}));
}

TEST(VerdictTest, AmdZenAllowsThroughHostBridgePreZenDoesNot) {
  auto zen = two_host_bridges(0x3407, 0x3407);
  zen.text.replace(zen.text.find("GenuineIntel"), 12, "AuthenticAMD");
  zen.text.replace(zen.text.find("family = 6"), 10, "family = 23");
  expect(v(zen.load(), "01:00.0", "81:00.0"), MapType::thru_host_bridge, 4);
  auto old = two_host_bridges(0x3407, 0x3407);
  old.text.replace(old.text.find("GenuineIntel"), 12, "AuthenticAMD");
  old.text.replace(old.text.find("family = 6"), 10, "family = 22");
  expect(v(old.load(), "01:00.0", "81:00.0"), MapType::not_supported, 4);
  // What-if CPU overrides.
  expect(v(old.load(), "01:00.0", "81:00.0", VerdictOptions{{}, true}), MapType::thru_host_bridge, 4);
  expect(v(zen.load(), "01:00.0", "81:00.0", VerdictOptions{{}, false}), MapType::not_supported, 4);
}

TEST(VerdictTest, NoCommonDeviceDistanceIsSumOfChains) {
  Topology t = switch_machine().load();
  M m = switch_machine();
  m.fn("00:02.0", "root_port").fn("05:00.0", "endpoint", "00:02.0");
  t = m.load();
  // 03:00.0 chain: 03:00.0 02:00.0 01:00.0 00:01.0 (4); 05:00.0 chain: 05:00.0 00:02.0 (2).
  expect(v(t, "03:00.0", "05:00.0"), MapType::thru_host_bridge, 6);
}

TEST(VerdictTest, MatchesKernelLoopOnRandomForests) {
  std::mt19937_64 rng(11);
  static const int ids[] = {0x2020, 0x3c00, 0x3407, 0x2030};
  for (int iter = 0; iter < 60; ++iter) {
    Topology t;
    t.source = "random";
    const int hbs = 1 + static_cast<int>(rng() % 3);
    for (int h = 0; h < hbs; ++h) t.host_bridges.push_back(HostBridge{0, static_cast<uint8_t>(h * 0x40), h % 2, {}});
    const int n = 2 + static_cast<int>(rng() % 60);
    for (int i = 0; i < n; ++i) {
      Function f;
      f.bdf = Bdf{0, static_cast<uint8_t>(i), static_cast<uint8_t>(rng() % 32), static_cast<uint8_t>(rng() % 8)};
      f.vendor = 0x8086;
      f.device = static_cast<uint16_t>(ids[rng() % 4]);
      f.class_code = kClassPciBridge;
      f.port_type = rng() % 2 ? PortType::root_port : PortType::switch_downstream;
      if (rng() % 3 == 0) f.acs = AcsState{AcsState::Kind::present, 0x7f, static_cast<uint16_t>(rng() % 0x80)};
      // Parent: a random earlier function, or a root bus.
      if (i > 0 && rng() % 4 != 0) {
        f.upstream = static_cast<int32_t>(rng() % static_cast<uint64_t>(i));
        f.host_bridge = t.functions[static_cast<uint32_t>(f.upstream)].host_bridge;
      } else {
        f.host_bridge = static_cast<uint32_t>(rng() % static_cast<uint64_t>(hbs));
        t.host_bridges[f.host_bridge].root_functions.push_back(static_cast<uint32_t>(i));
      }
      t.functions.push_back(f);
    }
    t.cpu = CpuInfo{rng() % 4 == 0 ? "AuthenticAMD" : "GenuineIntel", 0x19};
    auto e = P2PEngine::create(t);
    ASSERT_TRUE(e.has_value());
    const std::vector<uint8_t> redir = testing::redirect_flags(t);
    for (uint32_t p = 0; p < t.functions.size(); ++p)
      for (uint32_t c = 0; c < t.functions.size(); ++c) {
        const Verdict want = testing::kernel_calc(t, p, c, *e, redir);
        const Verdict got = e->verdict(p, c);
        ASSERT_EQ(got.type, want.type) << "iter " << iter << " pair " << p << "," << c;
        ASSERT_EQ(got.distance, want.distance) << "iter " << iter << " pair " << p << "," << c;
        ASSERT_EQ(e->verdict(p, c).type, want.type);  // cached
      }
  }
}

TEST(VerdictTest, DistanceManyAndFindMany) {
  M m = switch_machine();
  m.fn("02:02.0", "switch_downstream", "01:00.0").fn("05:00.0", "endpoint", "02:02.0");
  m.fn("00:02.0", "root_port").fn("06:00.0", "endpoint", "00:02.0");
  Topology t = m.load();
  auto e = P2PEngine::create(t);
  const uint32_t a = *t.lookup("03:00.0"), b = *t.lookup("04:00.0"), c = *t.lookup("05:00.0"), far = *t.lookup("06:00.0");
  EXPECT_EQ(e->distance_many(a, std::vector<uint32_t>{}), -1);
  EXPECT_EQ(e->distance_many(a, std::vector<uint32_t>{a, b}), 0 + 4);
  EXPECT_EQ(e->distance_many(far, std::vector<uint32_t>{a, b}), 6 + 6);
  // Clients a and b: provider a is closest (0 + 4) ahead of c (4 + 4).
  std::vector<uint32_t> pub{c, a, far};
  auto first = [](size_t) { return size_t{0}; };
  EXPECT_EQ(e->find_many(std::vector<uint32_t>{a, b}, pub, first), a);
  // A tie (b and c are both 4 + 4 from clients a, far? no: use clients {b}) broken by pick.
  std::vector<uint32_t> tie{a, c};
  size_t asked = 0;
  auto last = [&](size_t n) { asked = n; return n - 1; };
  EXPECT_EQ(e->find_many(std::vector<uint32_t>{b}, tie, last), c);
  EXPECT_EQ(asked, 2u);
  EXPECT_EQ(e->find_many(std::vector<uint32_t>{b}, tie, first), a);
  // Nothing reachable.
  Topology u = two_root_ports(0x8086, 0x3407).load();
  auto eu = P2PEngine::create(u);
  EXPECT_FALSE(eu->find_many(std::vector<uint32_t>{*u.lookup("01:00.0")}, std::vector<uint32_t>{*u.lookup("02:00.0")}, first));
}

// A machine built in code: one host bridge, functions added with their upstream bridge.
struct Built {
  Topology t;
  Built() {
    t.source = "built";
    t.host_bridges.push_back(HostBridge{0, 0, 0, {}});
  }
  uint32_t add(Bdf b, int32_t up, bool bridge) {
    Function f;
    f.bdf = b;
    f.class_code = bridge ? kClassPciBridge : kClassNvme;
    f.port_type = bridge ? (up < 0 ? PortType::root_port : PortType::switch_downstream) : PortType::endpoint;
    f.upstream = up;
    const auto i = static_cast<uint32_t>(t.functions.size());
    if (up < 0) t.host_bridges[0].root_functions.push_back(i);
    t.functions.push_back(f);
    return i;
  }
};

// Linux p2pdma.c pci_p2pmem_find_many(): closest_pdevs holds PAGE_SIZE / sizeof(void *) =
// 512 devices; a provider at the same distance once it is full is skipped, a closer one
// starts the list over.
TEST(VerdictTest, FindManyKeepsTheFirst512TiedProvidersLikeTheKernel) {
  Built m;
  const uint32_t rp = m.add(Bdf{0, 0, 1, 0}, -1, true);
  const uint32_t client = m.add(Bdf{0, 1, 0, 0}, static_cast<int32_t>(rp), false);
  std::vector<uint32_t> pub;
  for (int i = 0; i < 600; ++i)
    pub.push_back(m.add(Bdf{0, static_cast<uint8_t>(2 + i / 256), static_cast<uint8_t>(i / 8 % 32), static_cast<uint8_t>(i % 8)},
                        static_cast<int32_t>(rp), false));
  auto e = P2PEngine::create(m.t);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->distance_many(pub[599], std::vector<uint32_t>{client}), 2);
  size_t asked = 0;
  auto last = [&](size_t n) { asked = n; return n - 1; };
  EXPECT_EQ(e->find_many(std::vector<uint32_t>{client}, pub, last), pub[511]);
  EXPECT_EQ(asked, 512u);
  pub.push_back(client);  // distance 0, after the list is full
  EXPECT_EQ(e->find_many(std::vector<uint32_t>{client}, pub, last), client);
  EXPECT_EQ(asked, 1u);
}

// Linux recomputes the distance in every calc_map_type_and_dist() call and caches only the
// map type (p2pdma->map_types); physr caches the distance too, in 12 bits. A cached verdict
// must equal the computed one, so the engine refuses trees too deep for the cache to hold
// every distance (2 x 2047 levels; PCI's 256 bus numbers per domain never come close).
TEST(VerdictTest, CachedVerdictEqualsComputedOrTheEngineRefusesTheTree) {
  auto chains = [](int levels) {
    Built m;
    for (int tree = 0; tree < 2; ++tree) {
      int32_t up = -1;
      for (int d = 0; d < levels; ++d)
        up = static_cast<int32_t>(m.add(Bdf{static_cast<uint32_t>(tree * 4096 + d), 0, 0, 0}, up, d + 1 < levels));
    }
    return m.t;
  };
  const Topology ok = chains(2047);
  auto e = P2PEngine::create(ok, VerdictOptions{{}, true});  // AMD Zen: through the host bridge
  ASSERT_TRUE(e.has_value()) << e.error().to_string();
  const uint32_t a = 2046, b = static_cast<uint32_t>(ok.functions.size() - 1);
  EXPECT_EQ(e->compute(a, b).distance, 4094);
  EXPECT_EQ(e->verdict(a, b).distance, 4094);
  EXPECT_EQ(e->verdict(a, b).distance, 4094);  // cached
  EXPECT_EQ(e->distance_many(a, std::vector<uint32_t>{b, b}), 2 * 4094);
  const Topology deep = chains(2048);
  auto d = P2PEngine::create(deep);
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, EINVAL);
  EXPECT_NE(d.error().message.find("2047"), std::string::npos) << d.error().message;
}

// Linux keeps one map_types xarray per provider, filled as clients map; the engine's
// rows are 2 B per function, so on a machine at the 65,535-function limit a row is 128 KiB
// and rows for every provider would be 8 GiB. The cache stops at kMaxCacheBytes and later
// providers' verdicts are computed, equal to what a cache would have returned.
TEST(VerdictTest, CacheStaysBoundedAtTheFunctionLimit) {
  Built m;
  for (uint32_t i = 0; i < 0xffff; ++i)
    m.add(Bdf{i >> 16, static_cast<uint8_t>(i >> 8), static_cast<uint8_t>(i >> 3 & 31), static_cast<uint8_t>(i & 7)}, -1, false);
  auto e = P2PEngine::create(m.t);
  ASSERT_TRUE(e.has_value()) << e.error().to_string();
  const uint32_t n = 0xffff;
  for (uint32_t p = 0; p < n; p += 16) {
    const uint32_t c = (p * 7 + 3) % n;
    const Verdict v = e->verdict(p, c), w = e->compute(p, c);
    ASSERT_EQ(v.type, w.type) << p;
    ASSERT_EQ(v.distance, w.distance) << p;
    ASSERT_EQ(e->verdict(p, c).distance, w.distance) << p;  // cached, or computed again
  }
  EXPECT_GT(e->cache_bytes(), 0u);
  EXPECT_LE(e->cache_bytes(), P2PEngine::kMaxCacheBytes);
}

// The link class follows the path the verdict takes (nvidia-smi's legend: PIX at most one
// bridge, PXB several without the host bridge, PHB through a host bridge): two functions of
// one device below a root port meet there (Linux calc_map_type_and_dist(): bus_addr,
// distance 2), so PIX; a switch whose port redirects (ACS RR) sends its pair through the
// host bridge, so PHB; two cascaded switches are PXB.
TEST(ExplainTest, LinkClassFollowsTheVerdict) {
  M m;
  m.hb(0)
      .fn("00:00.0", "host", "", "", 0x8086, 0x2020)
      .fn("00:01.0", "root_port")
      .fn("01:00.0", "endpoint", "00:01.0")
      .fn("01:00.1", "endpoint", "00:01.0")
      .fn("00:02.0", "root_port")
      .fn("02:00.0", "endpoint", "00:02.0");
  const Topology t = m.load();
  auto e = P2PEngine::create(t);
  ASSERT_TRUE(e.has_value());
  const Explanation mf = e->explain(*t.lookup("01:00.0"), *t.lookup("01:00.1"));
  EXPECT_EQ(mf.verdict.type, MapType::bus_addr);
  EXPECT_EQ(mf.verdict.distance, 2);
  EXPECT_EQ(mf.link_class, "PIX");
  const Explanation rp = e->explain(*t.lookup("01:00.0"), *t.lookup("02:00.0"));
  EXPECT_EQ(rp.verdict.type, MapType::thru_host_bridge);
  EXPECT_EQ(rp.link_class, "PHB");

  for (const char* acs : {"", "RR"}) {
    const Topology s = switch_machine(acs).load();
    auto es = P2PEngine::create(s);
    const Explanation x = es->explain(*s.lookup("03:00.0"), *s.lookup("04:00.0"));
    EXPECT_EQ(x.link_class, x.verdict.type == MapType::bus_addr ? "PIX" : "PHB") << acs;
    EXPECT_EQ(x.verdict.type, *acs ? MapType::thru_host_bridge : MapType::bus_addr) << acs;
    // What-if: with the port assumed off, the same pair is bus_addr again, and PIX.
    VerdictOptions off;
    off.acs_redir_off.push_back(*parse_bdf("02:00.0"));
    auto eo = P2PEngine::create(s, off);
    EXPECT_EQ(eo->explain(*s.lookup("03:00.0"), *s.lookup("04:00.0")).link_class, "PIX") << acs;
  }

  M deep = switch_machine();
  deep.fn("02:02.0", "switch_downstream", "01:00.0")
      .fn("05:00.0", "switch_upstream", "02:02.0")
      .fn("06:00.0", "switch_downstream", "05:00.0")
      .fn("07:00.0", "endpoint", "06:00.0");
  const Topology d = deep.load();
  auto ed = P2PEngine::create(d);
  const Explanation two = ed->explain(*d.lookup("03:00.0"), *d.lookup("07:00.0"));
  EXPECT_EQ(two.verdict.type, MapType::bus_addr);
  EXPECT_EQ(two.link_class, "PXB");
}

TEST(ExplainTest, NamesRedirectingPortsAndKernelParameter) {
  Topology t = switch_machine("RR").load();
  auto e = P2PEngine::create(t);
  const Explanation x = e->explain(*t.lookup("03:00.0"), *t.lookup("04:00.0"));
  ASSERT_TRUE(x.common.has_value());
  EXPECT_EQ(t.functions[*x.common].bdf.to_string(), "0000:01:00.0");
  ASSERT_EQ(x.acs_redirecting.size(), 1u);
  EXPECT_EQ(x.kernel_parameter, "pci=disable_acs_redir=0000:02:00.0");
  EXPECT_EQ(x.link_class, "PHB");  // ACS sends the pair through the host bridge, under a switch
  ASSERT_EQ(x.allowlist.size(), 1u);
  EXPECT_TRUE(x.allowlist[0].passes);
  EXPECT_EQ(x.provider_path.size(), 3u);  // 03:00.0 02:00.0 01:00.0
  EXPECT_EQ(x.client_path.size(), 2u);    // 04:00.0 02:01.0
  const Explanation far = e->explain(*t.lookup("03:00.0"), *t.lookup("03:00.0"));
  EXPECT_EQ(far.link_class, "X");
  Topology h = two_host_bridges(0x2020, 0x2020).load();
  auto eh = P2PEngine::create(h);
  const Explanation sys = eh->explain(*h.lookup("01:00.0"), *h.lookup("81:00.0"));
  EXPECT_EQ(sys.link_class, "SYS");
  EXPECT_EQ(sys.allowlist.size(), 2u);
}

// --- machine files -----------------------------------------------------------------------

// Linux p2pdma.c host_bridge_whitelist(): with two host bridges the second is looked at
// only if the first passes (its &&); calc_map_type_and_dist() logs the refusal.
TEST(ExplainTest, SecondHostBridgeIsSkippedWhenTheFirstFailsAndTheKernelLogIsQuoted) {
  Topology t = two_host_bridges(0x3407, 0x2020).load();
  auto e = P2PEngine::create(t);
  const Explanation x = e->explain(*t.lookup("01:00.0"), *t.lookup("81:00.0"));
  EXPECT_EQ(x.verdict.type, MapType::not_supported);
  ASSERT_EQ(x.allowlist.size(), 1u);
  EXPECT_FALSE(x.allowlist[0].passes);
  EXPECT_TRUE(x.second_host_bridge_skipped);
  ASSERT_EQ(x.kernel_log.size(), 1u);  // no ACS redirect: no "not in P2PDMA whitelist" line
  EXPECT_EQ(x.kernel_log[0], "0000:81:00.0: cannot be used for peer-to-peer DMA as the client and provider (0000:01:00.0) "
                             "do not share an upstream bridge or whitelisted host bridge");
  EXPECT_FALSE(x.newer_kernel_allows);
  // The first passes: both are checked.
  Topology both = two_host_bridges(0x2020, 0x3407).load();
  auto eb = P2PEngine::create(both);
  const Explanation y = eb->explain(*both.lookup("01:00.0"), *both.lookup("81:00.0"));
  ASSERT_EQ(y.allowlist.size(), 2u);
  EXPECT_TRUE(y.allowlist[0].passes);
  EXPECT_FALSE(y.allowlist[1].passes);
  EXPECT_FALSE(y.second_host_bridge_skipped);
  // ACS redirect below a host bridge that is not listed: the kernel's three warnings and the refusal.
  M m;
  m.hb(0).fn("00:00.0", "host", "", "", 0x8086, 0x3407).fn("00:01.0", "root_port", "", "RR");
  m.fn("01:00.0", "endpoint", "00:01.0").fn("01:00.1", "endpoint", "00:01.0");
  Topology r = m.load();
  auto er = P2PEngine::create(r);
  const Explanation z = er->explain(*r.lookup("01:00.0"), *r.lookup("01:00.1"));
  ASSERT_EQ(z.kernel_log.size(), 4u);
  EXPECT_EQ(z.kernel_log[0], "0000:01:00.1: ACS redirect is set between the client and provider (0000:01:00.0)");
  EXPECT_EQ(z.kernel_log[1], "0000:01:00.1: to disable ACS redirect for this path, add the kernel parameter: "
                             "pci=disable_acs_redir=0000:00:01.0");
  EXPECT_EQ(z.kernel_log[2], "0000:00:00.0: Host bridge not in P2PDMA whitelist: 8086:3407");
  EXPECT_NE(z.kernel_log[3].find("cannot be used for peer-to-peer DMA"), std::string::npos);
}

TEST(ExplainTest, SaysWhichNewerKernelAllowsAPairTheChosenOneRefuses) {
  Topology t = two_root_ports(0x1ae0, 0x0042).load();  // Google: allowlisted from 7.1
  auto e = P2PEngine::create(t, VerdictOptions{{}, {}, {6, 12}});
  const Explanation x = e->explain(*t.lookup("01:00.0"), *t.lookup("02:00.0"));
  EXPECT_EQ(x.verdict.type, MapType::not_supported);
  EXPECT_EQ(x.kernel, (KernelVersion{6, 12}));
  ASSERT_TRUE(x.newer_kernel_allows);
  EXPECT_EQ(*x.newer_kernel_allows, (KernelVersion{7, 1}));
  auto newest = P2PEngine::create(t);
  EXPECT_EQ(newest->explain(*t.lookup("01:00.0"), *t.lookup("02:00.0")).verdict.type, MapType::thru_host_bridge);
  // Skylake identified by its first Root Port: allowed from 5.19.
  Topology s = two_root_ports(0x8086, 0x2031, "00:01.0", "root_port").load();
  auto es = P2PEngine::create(s, VerdictOptions{{}, {}, {5, 10}});
  EXPECT_EQ(es->explain(*s.lookup("01:00.0"), *s.lookup("02:00.0")).newer_kernel_allows, (KernelVersion{5, 19}));
}

TEST(MachineFileTest, ErrorsNameLineKeyAndProblem) {
  struct Case {
    std::string text, want;
  };
  const std::string hb = "[[host_bridge]]\nbus = 0\n";
  const std::string f0 = "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x010802\n";
  const std::vector<Case> cases = {
      {"name = [", "test:1: TOML syntax"},
      {"", "no [[host_bridge]]"},
      {hb + f0 + "colour = 3\n", "test:8: function[0] (0000:00:00.0): unknown key 'colour'"},
      {hb + "[[function]]\nbdf = \"00:00\"\nvendor = 1\ndevice = 2\nclass = 3\n", "function[0].bdf: PCI address '00:00'"},
      {hb + f0 + "parent = \"00:09.0\"\n", "parent: no function '00:09.0'"},
      {hb + f0 + f0, "defined twice"},
      {hb + "[[function]]\nbdf = \"01:00.0\"\nvendor = 1\ndevice = 2\nclass = 3\n", "no [[host_bridge]] has domain 0 bus 1"},
      {hb + f0 + "[[function]]\nbdf = \"01:00.0\"\nvendor = 1\ndevice = 2\nclass = 3\nparent = \"00:00.0\"\n", "is not a PCI bridge"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 70000\ndevice = 2\nclass = 3\n", "vendor: 70000 is out of range"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x060400\n", "a PCI bridge needs 'type'"},
      {hb + f0 + "type = \"router\"\n", "port type 'router'"},
      {hb + f0 + "acs = \"RR XX\"\n", "unknown ACS bit 'XX'"},
      {hb + f0 + "[[function.bar]]\nstart = 0\n", "needs 'start' and a non-zero 'size'"},
      {hb + f0 + "[[function.bar]]\nstart = 0\nsize = \"12Q\"\n", "size '12Q'"},
      {hb + hb, "defined twice"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x030200\n[function.cmb]\nbar = 2\n",
       "only NVMe controllers (class 0x0108xx) have a controller memory buffer"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x010802\n[function.cmb]\nbar = 2\n",
       "cmb.bar: BAR 2 is not among the function's [[function.bar]]"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x010802\n[[function.bar]]\nindex = 2\nstart = 0\nsize = \"1M\"\n[function.cmb]\nbar = 2\nsqs = true\n",
       "unknown key 'sqs'"},
      {hb + "[[function]]\nbdf = \"00:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x010802\n[[function.bar]]\nindex = 2\nstart = 0\nsize = \"1M\"\n[function.cmb]\nrds = false\n",
       "missing key 'bar'"},
      {hb + "[[function]]\nbdf = \"01:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x060400\ntype = \"root_port\"\nparent = \"02:00.0\"\n" +
           "[[function]]\nbdf = \"02:00.0\"\nvendor = 1\ndevice = 2\nclass = 0x060400\ntype = \"root_port\"\nparent = \"01:00.0\"\n",
       "test: 0000:01:00.0: upstream bridges form a cycle"},
      // BARs as PCI defines them: a power of two of at least 16 bytes, aligned to its size,
      // one per index, none overlapping another (any function's).
      {hb + f0 + "[[function.bar]]\nstart = 0x100000\nsize = \"3M\"\n", "test:10: function[0] (0000:00:00.0).bar[0].size: 3145728 bytes is not a power of two"},
      {hb + f0 + "[[function.bar]]\nstart = 0x100000\nsize = 8\n", "is not a power of two of at least 16"},
      {hb + f0 + "[[function.bar]]\nstart = 0x101000\nsize = \"1M\"\n", "bar[0].start: 0x101000 is not aligned to the BAR's size (1 MiB)"},
      {hb + f0 + "[[function.bar]]\nindex = 1\nstart = 0x100000\nsize = \"1M\"\n[[function.bar]]\nindex = 1\nstart = 0x200000\nsize = \"4K\"\n",
       "bar[1]: BAR 1 is defined twice for this function"},
      {hb + f0 + "[[function.bar]]\nindex = 0\nstart = 0x100000\nsize = \"1M\"\n" +
           "[[function]]\nbdf = \"00:01.0\"\nvendor = 1\ndevice = 2\nclass = 0x010802\n[[function.bar]]\nstart = 0x180000\nsize = \"4K\"\n",
       "test:17: function[1] (0000:00:01.0).bar[0]: overlaps function[0] (0000:00:00.0).bar[0] (test:8, 0x100000 + 1 MiB)"},
      // Fields a user could get wrong silently: link fields of 0, ACS words that drop bits,
      // names that forge output or clash with scenario words.
      {hb + f0 + "link_width = 0\n", "test:8: function[0] (0000:00:00.0).link_width: 0 is out of range 1..32"},
      {hb + f0 + "link_gen = 0\n", "link_gen: 0 is out of range 1..7"},
      {hb + f0 + "acs = \"absent RR\"\n", "acs: 'absent' stands alone"},
      {hb + f0 + "acs = \"none RR\"\n", "acs: 'none' stands alone"},
      {hb + f0 + "acs = \"\"\n", "acs: empty"},
      {hb + f0 + "name = \"gpu\\nfake line\"\n", "name: control character 0xa at byte 3"},
      {hb + f0 + "name = \"gpu\\u202e0\"\n", "name: a bidirectional-text control (U+202E) at byte 3"},
      {hb + f0 + "name = \"host\"\n", "name: 'host' is reserved"},
      {hb + f0 + "name = \"nearest\"\n", "name: 'nearest' is reserved"},
  };
  for (const Case& c : cases) {
    auto t = parse_machine(c.text, "test");
    ASSERT_FALSE(t.has_value()) << c.text;
    EXPECT_NE(t.error().message.find(c.want), std::string::npos) << "got: " << t.error().message << "\nwant: " << c.want;
  }
  EXPECT_EQ(load_machine_file("/nonexistent/x.toml").error().code, ENOENT);
}

TEST(MachineFileTest, BarsCarryTypedIoResourceFlags) {
  // A machine file's BAR is what Linux's pci_read_bases() records for a 64-bit memory BAR:
  // IORESOURCE_MEM | IORESOURCE_MEM_64, plus IORESOURCE_PREFETCH when prefetchable.
  auto t = parse_machine("[[host_bridge]]\nbus = 0\n[[function]]\nbdf = \"00:02.0\"\nvendor = 1\ndevice = 2\nclass = 0x030000\n"
                         "[[function.bar]]\nindex = 0\nstart = 0x80000000\nsize = 0x1000000\nprefetchable = false\n"
                         "[[function.bar]]\nindex = 2\nstart = 0x4000000000\nsize = 0x10000000\n",
                         "test");
  ASSERT_TRUE(t.has_value()) << t.error().to_string();
  const auto& bars = t->functions[0].bars;
  ASSERT_EQ(bars.size(), 2u);
  EXPECT_EQ(bars[0].flags, IoResourceFlags(IoResource::mem) | IoResource::mem_64);
  EXPECT_TRUE(bars[0].is_mem());
  EXPECT_FALSE(bars[0].prefetchable());
  EXPECT_TRUE(has(bars[1].flags, IoResource::prefetch));
  EXPECT_EQ(bars[1].flags.bits(), uint64_t{0x102200});  // the word sysfs `resource` would list
  static_assert(!std::is_convertible_v<uint64_t, IoResourceFlags>, "BAR flags are a typed set");
}

TEST(MachineFileTest, ReferenceMachinesLoadWithExpectedVerdicts) {
  auto t = load_builtin_machine("two-socket-switch");
  ASSERT_TRUE(t.has_value()) << t.error().to_string();
  EXPECT_EQ(t->source, "builtin:two-socket-switch");
  expect(v(*t, "nvme0", "gpu0"), MapType::bus_addr, 4);
  expect(v(*t, "nvme0", "nic0"), MapType::thru_host_bridge, 4);
  expect(v(*t, "gpu0", "nvme2"), MapType::thru_host_bridge, 6);
  EXPECT_EQ(t->functions[*t->lookup("gpu0")].bars.size(), 2u);
  EXPECT_EQ(t->functions[*t->lookup("gpu0")].bars[1].size(), 64 * GiB);
  auto z = load_builtin_machine("amd-zen");
  ASSERT_TRUE(z.has_value()) << z.error().to_string();
  expect(v(*z, "gpu0", "nvme1"), MapType::thru_host_bridge, 4);
  auto x = load_builtin_machine("xeon-e5-two-sockets");
  ASSERT_TRUE(x.has_value()) << x.error().to_string();
  expect(v(*x, "nvme0", "gpu0"), MapType::thru_host_bridge, 4);
  expect(v(*x, "nvme1", "gpu0"), MapType::not_supported, 4);
}

// The library embeds machines/*.toml and scenarios/*.toml as they are in the source tree.
TEST(MachineFileTest, BuiltinFilesEqualTheSourceTree) {
  for (const auto& [folder, files] : {std::pair{"machines", physr::builtin_machines()}, std::pair{"scenarios", physr::builtin_scenarios()}}) {
    std::vector<std::string> on_disk, embedded;
    for (const auto& e : fs::directory_iterator(fs::path(PHYSR_SOURCE_DIR) / folder))
      if (e.path().extension() == ".toml") on_disk.push_back(e.path().stem().string());
    std::sort(on_disk.begin(), on_disk.end());
    for (const physr::BuiltinFile& f : files) {
      embedded.emplace_back(f.name);
      std::ifstream in(fs::path(PHYSR_SOURCE_DIR) / folder / (std::string(f.name) + ".toml"), std::ios::binary);
      const std::string text(std::istreambuf_iterator<char>(in), {});
      EXPECT_EQ(text, f.text) << folder << "/" << f.name;
    }
    EXPECT_EQ(embedded, on_disk) << folder;
  }
  EXPECT_TRUE(physr::builtin_machine_text(physr::kDefaultMachine).has_value());
  for (const physr::BuiltinFile& f : physr::builtin_machines()) {
    auto t = load_builtin_machine(f.name);
    EXPECT_TRUE(t.has_value()) << f.name << ": " << t.error().to_string();
  }
}

// --machine and a scenario's machine: a folder is a sysfs snapshot, a file a machine file,
// else a built-in name; nothing of the kind is ENOENT naming it and the built-in machines.
TEST(MachineFileTest, LoadMachineTakesFilesFoldersAndBuiltinNames) {
  auto b = load_machine(physr::kDefaultMachine);
  ASSERT_TRUE(b.has_value()) << b.error().to_string();
  EXPECT_EQ(b->source, "builtin:" + std::string(physr::kDefaultMachine));
  const fs::path dir = fs::temp_directory_path() / ("physr-load-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "m.toml") << *physr::builtin_machine_text("amd-zen");
  auto f = load_machine((dir / "m.toml").string());
  auto d = load_machine(dir.string());
  fs::remove_all(dir);
  ASSERT_TRUE(f.has_value()) << f.error().to_string();
  EXPECT_EQ(f->source, (dir / "m.toml").string());
  ASSERT_FALSE(d.has_value());
  EXPECT_NE(d.error().message.find("no sys/devices"), std::string::npos) << d.error().message;
  for (const char* spec : {"nosuch", ""}) {
    auto n = load_machine(spec);
    ASSERT_FALSE(n.has_value());
    EXPECT_EQ(n.error().code, ENOENT);
    EXPECT_NE(n.error().message.find("machine '" + std::string(spec) + "': no such file and no built-in machine"), std::string::npos);
    EXPECT_NE(n.error().message.find("two-socket-switch"), std::string::npos) << n.error().message;
  }
  EXPECT_EQ(load_builtin_machine("nosuch").error().code, ENOENT);
}

TEST(ClassTest, PredicatesFollowTheClassCodes) {
  const auto fn = [](uint32_t cc) {
    Function f;
    f.class_code = cc;
    return f;
  };
  EXPECT_TRUE(is_nvme(fn(kClassNvme)));
  EXPECT_TRUE(is_nvme(fn(0x010801)));  // NVMHCI: the same subclass
  EXPECT_FALSE(is_nvme(fn(0x010601)));
  EXPECT_TRUE(is_storage(fn(0x010601)));
  EXPECT_TRUE(is_network(fn(0x020000)));
  EXPECT_TRUE(is_display(fn(0x030200)));
  EXPECT_TRUE(is_display_or_accel(fn(0x030000)));
  EXPECT_TRUE(is_display_or_accel(fn(0x120000)));
  EXPECT_FALSE(is_display_or_accel(fn(0x0b4000)));
  EXPECT_TRUE(is_processor(fn(0x0b4000)));
  EXPECT_TRUE(is_bridge(fn(kClassHostBridge)));
  EXPECT_FALSE(is_pci_bridge(fn(kClassHostBridge)));
  EXPECT_TRUE(is_pci_bridge(fn(kClassPciBridge)));
  EXPECT_TRUE(is_pci_bridge(fn(0x060901)));
  EXPECT_EQ(class_name(kClassNvme), "NVMe controller");
  EXPECT_EQ(class_name(0x010801), "NVM controller");
}

// --- real sysfs snapshots ------------------------------------------------------------------

class SnapshotTest : public ::testing::Test {
 protected:
  static Topology load(const char* root) {
    auto t = load_sysfs(test::sysfs_snapshots() / root);
    EXPECT_TRUE(t.has_value()) << t.error().to_string();
    return t.has_value() ? *t : Topology{};
  }
};

TEST_F(SnapshotTest, XeonE7ServerLoadsWithHandDerivedVerdicts) {
  Topology t = load("40intel64-2g2n4c+pci");
  ASSERT_EQ(t.host_bridges.size(), 2u);
  EXPECT_EQ(t.functions.size(), 37u);
  EXPECT_EQ(t.cpu.vendor, "GenuineIntel");
  EXPECT_EQ(t.cpu.family, 6u);
  const Function& rp = t.functions[*t.lookup("0000:00:05.0")];
  EXPECT_EQ(rp.port_type, PortType::root_port);
  EXPECT_TRUE(rp.port_type_inferred);
  EXPECT_EQ(rp.acs.kind, AcsState::Kind::unknown);
  EXPECT_EQ(t.functions[*t.lookup("0000:02:00.0")].upstream, static_cast<int32_t>(*t.lookup("0000:00:05.0")));
  EXPECT_FALSE(t.functions[*t.lookup("0000:01:00.0")].bars.empty());
  // Two ports of the Broadcom NIC below root port 00:05.0: common device, ACS unknown = none.
  expect(v(t, "0000:02:00.0", "0000:02:00.1"), MapType::bus_addr, 2);
  // The RAID card and the NIC sit on different root ports of host bridge 8086:3407 (not listed).
  expect(v(t, "0000:01:00.0", "0000:02:00.0"), MapType::not_supported, 4);
  // Two USB functions on the root bus: no upstream bridge at all, chains of one each.
  expect(v(t, "0000:00:1a.0", "0000:00:1a.1"), MapType::not_supported, 2);
  // Across host bridges (pci0000:40's first device 40:01.0 is a root port 8086:3408: not listed).
  expect(v(t, "0000:43:00.0", "0000:01:00.0"), MapType::not_supported, 4);
  expect(v(t, "0000:43:00.0", "0000:43:00.0"), MapType::bus_addr, 0);
  // If the CPU were AMD Zen, every pair would go through the host bridge.
  expect(v(t, "0000:43:00.0", "0000:01:00.0", VerdictOptions{{}, true}), MapType::thru_host_bridge, 4);
}

TEST_F(SnapshotTest, ThirtyTwoBitDomainLoads) {
  Topology t = load("2pa-pcidomain32bits");
  ASSERT_EQ(t.host_bridges.size(), 2u);
  EXPECT_EQ(t.host_bridges[1].domain, 0x10000u);
  auto scsi = t.lookup("10000:00:04.0");
  ASSERT_TRUE(scsi.has_value());
  EXPECT_EQ(t.functions[*scsi].vendor, 0x1af4);
  // Virtio devices on two host bridges with 8086:1237 (i440FX): not supported, 1 + 1 apart.
  expect(v(t, "10000:00:04.0", "0000:00:03.0"), MapType::not_supported, 2);
}

TEST_F(SnapshotTest, EditedSnapshotWithRepeatedAddressesLoadsWithWarning) {
  Topology t = load("fakepcilocalities");
  ASSERT_EQ(t.host_bridges.size(), 4u);
  ASSERT_FALSE(t.warnings.empty());
  EXPECT_NE(t.warnings[0].find("0000:43:00.0"), std::string::npos);
  auto e = P2PEngine::create(t);
  ASSERT_TRUE(e.has_value());
  size_t unsupported = 0;
  for (uint32_t p = 0; p < t.functions.size(); ++p)
    for (uint32_t c = 0; c < t.functions.size(); ++c) unsupported += e->verdict(p, c).type == MapType::not_supported;
  EXPECT_GT(unsupported, 0u);
}

TEST(SysfsTest, BadRootsAndFilesAreNamed) {
  EXPECT_EQ(load_sysfs("/nonexistent-root").error().code, ENOENT);
  const fs::path root = fs::temp_directory_path() / ("physr-bad-" + std::to_string(::getpid()));
  fs::create_directories(root / "sys/devices/pci0000:00/0000:00:01.0");
  auto write = [&](const std::string& rel, const std::string& text) {
    std::ofstream(root / "sys/devices/pci0000:00/0000:00:01.0" / rel) << text;
  };
  auto r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());  // neither config nor vendor
  EXPECT_NE(r.error().message.find("vendor"), std::string::npos);
  write("vendor", "0x8086\n");
  write("device", "0x1234\n");
  write("class", "0xbanana\n");
  r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("class"), std::string::npos);
  write("class", "0x010802\n");
  write("resource", "0x1000 0x0fff 0x200\n");
  r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("resource:1: end below start"), std::string::npos);
  write("resource", "0x0 0xffffffffffffffff 0x200\n");  // a half-open BAR cannot hold 2^64 bytes
  r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("resource:1: a resource of 2^64 bytes"), std::string::npos);
  write("resource", "0x1000 0x1fff 0x200\n0x0 0x0 0x0\n");
  write("config", std::string(10, 'x'));
  r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("config"), std::string::npos);
  fs::remove(root / "sys/devices/pci0000:00/0000:00:01.0/config");
  r = load_sysfs(root);
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->functions[0].bars.size(), 1u);
  EXPECT_EQ(r->functions[0].bars[0].size(), 0x1000u);
  fs::remove_all(root);
}

// A FIFO or a device node where an attribute should be never blocks the loader and is never
// read: it is skipped with a warning naming it (a FIFO `config`, `vendor`, `numa_node` or
// proc/cpuinfo used to hang forever; a `config` symlink to /dev/zero was read).
TEST(SysfsTest, FifosAndDeviceNodesAreSkippedWithAWarning) {
  const fs::path root = fs::temp_directory_path() / ("physr-fifo-" + std::to_string(::getpid()));
  const fs::path dev = root / "sys/devices/pci0000:00/0000:00:01.0";
  fs::create_directories(dev);
  fs::create_directories(root / "proc");
  auto write = [&](const std::string& rel, const std::string& text) { std::ofstream(dev / rel) << text; };
  write("vendor", "0x8086\n");
  write("device", "0x1234\n");
  write("class", "0x010802\n");
  ASSERT_EQ(::mkfifo((dev / "numa_node").c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo((root / "proc/cpuinfo").c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo((dev / "current_link_speed").c_str(), 0600), 0);
  fs::create_symlink("/dev/zero", dev / "config");
  auto r = load_sysfs(root);  // returns: nothing was opened for reading
  ASSERT_TRUE(r.has_value()) << r.error().to_string();
  EXPECT_EQ(r->functions.size(), 1u);
  EXPECT_EQ(r->functions[0].vendor, 0x8086);
  EXPECT_EQ(r->functions[0].numa_node, -1);
  const auto warned = [&](const std::string& what) {
    return std::any_of(r->warnings.begin(), r->warnings.end(), [&](const std::string& w) { return w.find(what) != std::string::npos; });
  };
  EXPECT_TRUE(warned("numa_node: a FIFO, not a regular file; ignored"));
  EXPECT_TRUE(warned("cpuinfo: a FIFO, not a regular file; ignored"));
  EXPECT_TRUE(warned("current_link_speed: a FIFO"));
  EXPECT_TRUE(warned("config: a symbolic link, not a regular file; ignored"));
  // A required attribute that is a FIFO, with no config to fall back on: an error naming it.
  fs::remove(dev / "vendor");
  ASSERT_EQ(::mkfifo((dev / "vendor").c_str(), 0600), 0);
  r = load_sysfs(root);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ENOENT);
  EXPECT_NE(r.error().message.find("vendor: missing or not a regular file"), std::string::npos) << r.error().message;
  fs::remove_all(root);
}

}  // namespace
}  // namespace physr::pci
