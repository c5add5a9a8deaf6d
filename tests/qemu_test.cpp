// physr::qemu::build(): the q35 devices for a machine's tree, guest addresses and errors.
#include "physr/qemu.hpp"

#include <gtest/gtest.h>

#include <algorithm>

namespace physr::qemu {
namespace {

pci::Topology parse(const std::string& functions, const std::string& extra_host_bridges = "") {
  const std::string text = "[[host_bridge]]\nbus = 0\n" + extra_host_bridges + functions;
  auto t = pci::parse_machine(text, "test.toml");
  EXPECT_TRUE(t) << t.error().to_string();
  return std::move(t).value();
}

std::string rp(const std::string& bdf, const std::string& parent = "") {
  return "[[function]]\nbdf = \"" + bdf + "\"\nvendor = 0x1b36\ndevice = 0xc\nclass = 0x060400\ntype = \"root_port\"\n" +
         (parent.empty() ? "" : "parent = \"" + parent + "\"\n");
}
std::string port(const std::string& bdf, const std::string& type, const std::string& parent) {
  return "[[function]]\nbdf = \"" + bdf + "\"\nvendor = 0x104c\ndevice = 0x8232\nclass = 0x060400\ntype = \"" + type +
         "\"\nparent = \"" + parent + "\"\n";
}
std::string nvme(const std::string& bdf, const std::string& parent) {
  return "[[function]]\nbdf = \"" + bdf + "\"\nvendor = 0x1b36\ndevice = 0x10\nclass = 0x010802\n" +
         (parent.empty() ? "" : "parent = \"" + parent + "\"\n");
}

bool has_arg(const CommandLine& c, const std::string& s) { return std::find(c.argv.begin(), c.argv.end(), s) != c.argv.end(); }
bool has_note(const CommandLine& c, const std::string& part) {
  return std::any_of(c.cannot_emulate.begin(), c.cannot_emulate.end(), [&](const std::string& n) { return n.find(part) != n.npos; });
}
const GuestFunction* guest_of(const CommandLine& c, const pci::Topology& t, const std::string& bdf) {
  for (const GuestFunction& g : c.functions)
    if (t.functions[g.function].bdf.to_string() == bdf) return &g;
  return nullptr;
}

// SeaBIOS pci_bios_init_bus_rec(): secondary buses depth first, bridges in devfn order.
TEST(QemuTest, GuestBusesAreNumberedDepthFirstAndNotedWhenTheyDiffer) {
  const pci::Topology t = parse(rp("00:02.0") + rp("00:03.0") + port("07:00.0", "switch_upstream", "00:02.0") +
                                port("08:00.0", "switch_downstream", "07:00.0") + nvme("09:00.0", "08:00.0") + nvme("02:00.0", "00:03.0"));
  auto c = build(t);
  ASSERT_TRUE(c) << c.error().to_string();
  EXPECT_EQ(guest_of(*c, t, "0000:07:00.0")->guest.to_string(), "0000:01:00.0");
  EXPECT_EQ(guest_of(*c, t, "0000:09:00.0")->guest.to_string(), "0000:03:00.0");
  EXPECT_EQ(guest_of(*c, t, "0000:02:00.0")->guest.to_string(), "0000:04:00.0");
  EXPECT_TRUE(has_note(*c, "bus 07 of the machine is bus 01 in the guest"));
  EXPECT_TRUE(has_arg(*c, "x3130-upstream,id=f07-00-0,bus=f00-02-0,addr=00.0"));
  EXPECT_TRUE(has_arg(*c, "xio3130-downstream,id=f08-00-0,bus=f07-00-0,addr=00.0,chassis=2,slot=2"));
}

TEST(QemuTest, MultifunctionOnFunctionZeroAndPxbForASecondHostBridge) {
  const pci::Topology t = parse(rp("00:02.0") + nvme("01:00.0", "00:02.0") + nvme("01:00.1", "00:02.0") + rp("40:00.0") +
                                    nvme("41:00.0", "40:00.0"),
                                "[[host_bridge]]\nbus = 0x40\n");
  auto c = build(t, {.iommu = true, .disable_acs_redir = {"00:02.0"}});
  ASSERT_TRUE(c) << c.error().to_string();
  EXPECT_TRUE(has_arg(*c, "nvme,id=f01-00-0,bus=f00-02-0,addr=00.0,multifunction=on,serial=physr-01000,drive=f01-00-0-ns"));
  EXPECT_TRUE(has_arg(*c, "pxb-pcie,id=hb40,bus_nr=64,bus=pcie.0,addr=1e.0"));
  EXPECT_TRUE(has_arg(*c, "pcie-root-port,id=f40-00-0,bus=hb40,addr=00.0,chassis=2,slot=2"));
  EXPECT_TRUE(has_arg(*c, "q35,kernel-irqchip=split"));
  EXPECT_EQ(c->kernel_cmdline, "console=ttyS0 panic=-1 intel_iommu=on pci=disable_acs_redir=0000:00:02.0");
  // Linux __pci_config_acs(): a listed port keeps the firmware's bits (none on QEMU) outside
  // RR CR EC, not the SV UF pci_std_enable_acs() set; the others keep SV RR CR UF.
  EXPECT_TRUE(has_note(*c, "root port 0000:00:02.0: ACS absent in the machine; the guest kernel sets none"));
  EXPECT_TRUE(has_note(*c, "root port 0000:40:00.0: ACS absent in the machine; the guest kernel sets SV RR CR UF"));
  // intel-iommu comes before every PCI device.
  const auto iommu = std::find(c->argv.begin(), c->argv.end(), "intel-iommu,intremap=on");
  const auto pxb = std::find(c->argv.begin(), c->argv.end(), "pxb-pcie,id=hb40,bus_nr=64,bus=pcie.0,addr=1e.0");
  EXPECT_LT(iommu, pxb);
}

TEST(QemuTest, ZenCpuBecomesEpycAndOtherCpusKeepTheDefault) {
  const std::string fns = rp("00:02.0") + nvme("01:00.0", "00:02.0");
  auto zen = build(parse("[cpu]\nvendor = \"AuthenticAMD\"\nfamily = 0x17\n" + fns));
  ASSERT_TRUE(zen);
  EXPECT_TRUE(has_arg(*zen, "EPYC"));
  auto intel = build(parse("[cpu]\nvendor = \"GenuineIntel\"\nfamily = 6\n" + fns));
  ASSERT_TRUE(intel);
  EXPECT_FALSE(has_arg(*intel, "-cpu"));
  EXPECT_TRUE(has_note(*intel, "qemu64"));
  auto forced = build(parse(fns), {.amd_zen = true});
  ASSERT_TRUE(forced);
  EXPECT_TRUE(has_arg(*forced, "EPYC"));
}

TEST(QemuTest, TreesQemuCannotBuildAreErrorsNamingTheFunction) {
  auto no_fn0 = build(parse(rp("00:02.1")));
  ASSERT_FALSE(no_fn0);
  EXPECT_EQ(no_fn0.error().code, EINVAL);
  EXPECT_NE(no_fn0.error().message.find("0000:00:02.1: device 02 on bus 00 has no function 0"), std::string::npos);
  auto dev1 = build(parse(rp("00:02.0") + nvme("01:03.0", "00:02.0")));
  ASSERT_FALSE(dev1);
  EXPECT_NE(dev1.error().message.find("Linux scans only device 00"), std::string::npos);
  auto ich9 = build(parse(rp("00:1f.0")));
  ASSERT_FALSE(ich9);
  EXPECT_NE(ich9.error().message.find("0000:00:1f.0: a root port at device 1f of bus 00, where q35 has its ICH9 functions"),
            std::string::npos);
  // A chipset endpoint there is left out, with a note.
  auto lpc = build(parse(nvme("00:1f.0", "")));
  ASSERT_TRUE(lpc);
  EXPECT_TRUE(has_note(*lpc, "0000:00:1f.0 1b36:0010: left out; q35's own functions occupy devices 00 and 1f of bus 00"));
  auto acs = build(parse(rp("00:02.0")), {.disable_acs_redir = {"00:09.0"}});
  ASSERT_FALSE(acs);
  EXPECT_NE(acs.error().message.find("--disable-acs-redir 00:09.0"), std::string::npos);
}

TEST(QemuTest, ShellQuotesWhatTheShellWouldSplit) {
  EXPECT_EQ(shell_quote("q35,kernel-irqchip=split"), "q35,kernel-irqchip=split");
  EXPECT_EQ(shell_quote("a b;c"), "'a b;c'");
  EXPECT_EQ(shell_quote("it's"), "'it'\\''s'");
  EXPECT_EQ(shell_quote(""), "''");
}

}  // namespace
}  // namespace physr::qemu
