// physr qemu: prints a QEMU command line that reproduces a machine's PCIe tree
// (physr::qemu::build), preceded by what QEMU cannot reproduce as "# cannot emulate:" comments.
#include <fmt/core.h>

#include <memory>

#include "cli.hpp"
#include "physr/qemu.hpp"

namespace physr::cli {
namespace {

struct QemuOptions {
  std::string machine;
  std::string acs_off;
  std::string assume_cpu;
  qemu::Options q;
};

void run_qemu(QemuOptions& o) {
  if (o.assume_cpu == "amd-zen") o.q.amd_zen = true;
  else if (o.assume_cpu == "other") o.q.amd_zen = false;
  else if (!o.assume_cpu.empty()) throw UsageError("--assume-cpu '" + o.assume_cpu + "': expected amd-zen or other");
  size_t pos = 0;
  while (pos < o.acs_off.size()) {
    size_t end = o.acs_off.find(',', pos);
    if (end == std::string::npos) end = o.acs_off.size();
    const std::string tok = o.acs_off.substr(pos, end - pos);
    if (tok == "all") o.q.disable_acs_redir_all = true;
    else if (!tok.empty()) o.q.disable_acs_redir.push_back(tok);
    pos = end + 1;
  }
  if (!o.q.disable_acs_redir.empty() || o.q.disable_acs_redir_all) {
    if (!o.q.iommu) fmt::print(stderr, "physr: warning: --disable-acs-redir without --iommu: no ACS redirect is set to clear\n");
  }
  const pci::Topology t = load_machine_arg(o.machine);
  const qemu::CommandLine cmd = failure_value(qemu::build(t, o.q));
  fmt::print("# {}: {} ({} host bridges, {} functions)\n", t.source, t.name, t.host_bridges.size(), t.functions.size());
  if (!cmd.cannot_emulate.empty()) {
    fmt::print("# cannot emulate:\n");
    for (const std::string& n : cmd.cannot_emulate) fmt::print("#   - {}\n", n);
  }
  if (o.q.kernel.empty()) fmt::print("# kernel command line (with -kernel): {}\n", cmd.kernel_cmdline);
  fmt::print("{}", cmd.shell());
}

}  // namespace

void add_qemu_command(CLI::App& app) {
  auto o = std::make_shared<QemuOptions>();
  CLI::App* c = app.add_subcommand("qemu", "Print a QEMU command line that reproduces a machine's PCIe tree");
  c->add_option("--machine", o->machine, "A TOML machine file, or a built-in machine by name")->required();
  c->add_flag("--iommu", o->q.iommu, "Add QEMU's intel-iommu (and intel_iommu=on): the guest kernel sets ACS redirect on root ports");
  c->add_option("--disable-acs-redir", o->acs_off,
                "BDF[,BDF...] or all: ports for the kernel's pci=disable_acs_redir= (all: every pcie-root-port)");
  c->add_option("--assume-cpu", o->assume_cpu, "amd-zen (-cpu EPYC) or other (TCG's default): override the machine's CPU");
  c->add_option("--kernel", o->q.kernel, "Boot this kernel (-kernel), with physr's kernel command line");
  c->add_option("--initrd", o->q.initrd, "With --kernel: this initramfs (-initrd)");
  c->add_option("--append", o->q.append, "With --kernel: more kernel command line");
  c->add_option("--memory", o->q.memory_mb, "Guest memory in MiB (default 1024)")->check(CLI::Range(128u, 65536u));
  c->add_option("--cpus", o->q.cpus, "Guest CPUs (default 1)")->check(CLI::Range(1u, 64u));
  c->add_option("--disk-dir", o->q.disk_dir, "NVMe namespaces from raw files DIR/SERIAL.img (default: null-co, reads zeroes)");
  c->add_option("--qemu", o->q.qemu, "The QEMU binary (default qemu-system-x86_64)");
  c->callback([o] {
    if ((!o->q.initrd.empty() || !o->q.append.empty()) && o->q.kernel.empty())
      throw UsageError("--initrd and --append need --kernel");
    run_qemu(*o);
  });
}

}  // namespace physr::cli
