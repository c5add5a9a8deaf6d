// physr qemu: a QEMU command line that reproduces a machine's PCIe tree, so P2P software
// (and physr's verdicts) can be checked on a real kernel without the hardware.
//
// The guest is a q35 machine (QEMU 7.2 device names). Its first host bridge, pcie.0, is
// the machine's domain 0 bus 0; every other host bridge becomes a pxb-pcie expander on it
// with bus_nr = its root bus. Root ports become pcie-root-port (1b36:000c, which has an ACS
// capability), switches x3130-upstream / xio3130-downstream (104c:8232 / 8233, no ACS),
// NVMe controllers QEMU's nvme (with cmb_size_mb for a CMB), NICs e1000e, and any other
// endpoint a stand-in (edu, 1234:11e8, one 1 MiB BAR) that keeps its place in the tree.
// An AMD Zen CPU becomes -cpu EPYC (family 0x17) or EPYC-Milan (0x19); anything else keeps
// TCG's default (qemu64: AMD family 0xf, not Zen).
//
// What QEMU cannot reproduce is reported, one note per fact, rather than silently changed:
// vendor and device IDs (so the host bridge allowlist decides as for 8086:29c0), ACS on
// switch ports, the ACS control values (the guest kernel sets them), BAR sizes, link speeds,
// NUMA nodes, bus offsets and bus numbers the firmware would assign differently.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "physr/core.hpp"
#include "physr/pci.hpp"

namespace physr::qemu {

/// How to build the command line.
struct Options {
  /// A vIOMMU: -device intel-iommu (and q35's kernel-irqchip=split it needs); the guest
  /// kernel then sets ACS redirect on root ports (Linux pci_enable_acs()).
  bool iommu = false;
  /// Ports whose ACS redirect the guest kernel should clear: kernel parameter
  /// pci=disable_acs_redir=. Machine BDFs (the guest's, when bus numbers match) or names.
  std::vector<std::string> disable_acs_redir = {};
  /// All pcie-root-ports: pci=disable_acs_redir=pci:1b36:000c.
  bool disable_acs_redir_all = false;
  /// Override the machine's CPU for the AMD Zen rule (true: -cpu EPYC; false: default).
  std::optional<bool> amd_zen = {};
  std::string qemu = "qemu-system-x86_64";
  std::string kernel = {};  // -kernel when not empty
  std::string initrd = {};  // -initrd when not empty
  std::string append = {};  // added to the kernel command line
  unsigned memory_mb = 1024;
  unsigned cpus = 1;
  /// NVMe namespaces backed by raw files DIR/<serial>.img (which must exist) instead of
  /// null-co block devices that read zeroes and drop writes.
  std::string disk_dir = {};
};

/// One emulated PCI function: where the machine has it and where the guest will.
struct GuestFunction {
  uint32_t function = 0;  // index in the machine's Topology
  pci::Bdf guest;         // the address the guest's firmware assigns (depth-first bus numbers)
  std::string device;     // the QEMU device ("pcie-root-port", "nvme", ...; "q35" for 00:00.0)
  std::string id;         // its QEMU id (empty for q35's own)
  std::string serial;     // an NVMe controller's serial number
};

/// The result: argv (argv[0] the QEMU binary), the kernel command line physr adds, and
/// what QEMU cannot reproduce.
struct CommandLine {
  std::vector<std::string> argv;
  std::string kernel_cmdline;  // console, IOMMU and ACS parameters, then Options::append
  std::vector<std::string> cannot_emulate;
  std::vector<GuestFunction> functions;
  /// The command as one shell line per device, continued with backslashes, quoted.
  std::string shell() const;
};

/// Builds the command line for `topo`. EINVAL naming the function when the tree has
/// something QEMU cannot build at all: a bridge other than root and switch ports, a
/// function whose device has no function 0, a device other than 0 below a port, an address
/// q35 itself uses (00:00.x other than a host bridge, 00:1f.x), two host bridges that share
/// a bus number, a --disable-acs-redir name that is not in the machine.
Result<CommandLine> build(const pci::Topology& topo, const Options& options = {});

/// `s` quoted for a POSIX shell when it needs it.
std::string shell_quote(const std::string& s);

}  // namespace physr::qemu
