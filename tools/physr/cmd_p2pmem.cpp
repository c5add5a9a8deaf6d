// physr p2pmem-test READ_DEV WRITE_DEV [P2PMEM]: the kernel's p2pmem-test loop (O_DIRECT
// reads from one device into P2P memory, writes from it to the other), with GB/s and IOPS,
// whether each side went P2P, and on EREMOTEIO the verdict explained as `physr explain`
// does. Without P2PMEM it goes through host memory.
#include <fmt/core.h>

#include <memory>
#include <optional>

#include "cli.hpp"
#include "physr/linux.hpp"

namespace physr::cli {
namespace {

struct P2pmemOptions {
  std::string read_dev, write_dev, p2pmem;
  std::string chunk_size = "4K";
  uint64_t chunks = 1024;
  unsigned threads = 1;
  bool check = false;
  std::optional<uint64_t> seed;
  std::string root = "/";
  bool allow_unpublished = false;
};

struct Sides {
  std::optional<pci::Topology> topo;
  std::optional<pci::P2PEngine> engine;
  std::optional<uint32_t> provider, reader, writer;
};

std::string side_text(const Sides& s, const lnx::DeviceInfo& dev, const std::optional<uint32_t>& fn, const lnx::Mapping& buf) {
  const std::string who = dev.function ? dev.function->to_string() : "no PCI function found";
  if (!buf.is_p2pmem()) return fmt::format("{} ({}): host memory, not P2P", dev.path.string(), who);
  if (!fn || !s.provider || !s.engine) return fmt::format("{} ({}): P2P into {} (no physr verdict: the function is not in the PCI tree)", dev.path.string(), who, buf.describe());
  const pci::Explanation x = s.engine->explain(*s.provider, *fn);
  return fmt::format("{} ({}): P2P with {}; physr's verdict {}, distance {}, link {}", dev.path.string(), who, buf.describe(),
                     pci::map_type_name(x.verdict.type), x.verdict.distance, x.link_class);
}

void run_p2pmem(const P2pmemOptions& o) {
  lnx::TransferOptions t;
  t.chunk_size = size_arg("--chunk-size", o.chunk_size);
  t.chunks = o.chunks;
  t.threads = o.threads;
  t.check = o.check;
  t.seed = o.seed;
  if (t.chunk_size == 0 || t.chunk_size % 512 != 0) throw UsageError("--chunk-size " + o.chunk_size + ": must be a non-zero multiple of 512 bytes");
  if (t.chunks == 0) throw UsageError("--chunks: must be at least 1");
  if (t.threads == 0 || t.threads > 256) throw UsageError("--threads: must be 1 to 256");

  std::optional<pci::Bdf> provider;
  if (!o.p2pmem.empty()) provider = usage_value(lnx::parse_p2pmem_arg(o.p2pmem));
  const lnx::DeviceInfo rdev = failure_value(lnx::probe_device(o.read_dev, o.root));
  const lnx::DeviceInfo wdev = failure_value(lnx::probe_device(o.write_dev, o.root));
  const uint64_t threads = std::min<uint64_t>(t.threads, t.chunks);
  const uint64_t buf_size = ((threads * t.chunk_size) + kPageSize - 1) & ~(kPageSize - 1);

  Sides sides;
  lnx::Mapping buffer;
  if (provider) {
    const pci::Bdf bdf = *provider;
    const lnx::P2pmemInfo info = failure_value(lnx::read_p2pmem(o.root, bdf));
    buffer = failure_value(lnx::Mapping::p2pmem(info, buf_size, o.allow_unpublished));
    if (auto topo = pci::load_sysfs(o.root)) {
      sides.topo = std::move(*topo);
      if (auto e = pci::P2PEngine::create(*sides.topo)) {
        sides.engine.emplace(std::move(*e));
        sides.provider = sides.topo->find(bdf);
        if (rdev.function) sides.reader = sides.topo->find(*rdev.function);
        if (wdev.function) sides.writer = sides.topo->find(*wdev.function);
      }
    }
  } else {
    buffer = failure_value(lnx::Mapping::host(buf_size));
  }

  fmt::print("physr p2pmem-test: {} x {} chunks, {} thread{}, buffer: {}, {}\n", format_size(t.chunk_size), t.chunks, threads, threads == 1 ? "" : "s",
             buffer.describe(), format_size(buffer.size()));
  // Where the buffer is physically (the pagemap: root only).
  if (auto ranges = lnx::ranges_of(buffer, buffer.is_p2pmem() ? 1 : 0)) {
    fmt::print("  buffer at physical {} ({} range{})\n", format_hex((*ranges)[0].base.value()), ranges->size(), ranges->size() == 1 ? "" : "s");
  } else {
    fmt::print("  buffer's physical addresses unknown: {}\n", ranges.error().to_string());
  }
  fmt::print("  read:  {}\n  write: {}\n", side_text(sides, rdev, sides.reader, buffer), side_text(sides, wdev, sides.writer, buffer));

  lnx::TransferFailure where;
  auto stats = lnx::transfer(rdev, wdev, buffer, t, &where);
  if (!stats) {
    if (stats.error().code == EREMOTEIO && sides.engine && sides.provider) {
      const auto& fn = where.side == lnx::TransferFailure::Side::write ? sides.writer : sides.reader;
      if (fn) {
        fmt::print("\nThe kernel refused P2P DMA (EREMOTEIO). physr's view of this pair:\n\n");
        const auto& fns = sides.topo->functions;
        ExplainContext how;
        how.command = "physr explain " + fns[*sides.provider].bdf.to_string() + " " + fns[*fn].bdf.to_string() +
                      (o.root == "/" ? "" : " --sysfs-root " + shell_quote(o.root));
        print_explanation(*sides.topo, *sides.engine, *sides.provider, *fn, how);
      }
    }
    throw Failure(stats.error().to_string());
  }
  fmt::print("Copied {} in {:.3f} s: {:.3f} GB/s, {:.0f} IOPS ({} reads, {} writes)\n", format_size(stats->bytes), stats->seconds, stats->gbps(),
             stats->iops(), stats->reads, stats->writes);
  if (stats->checked_bytes) fmt::print("Checked every byte: {} compared, all equal\n", format_size(stats->checked_bytes));
}

}  // namespace

void add_p2pmem_command(CLI::App& app) {
  auto o = std::make_shared<P2pmemOptions>();
  CLI::App* c = app.add_subcommand("p2pmem-test",
                                   "Copy READ_DEV to WRITE_DEV through P2P memory (or host memory) with O_DIRECT, like the kernel's p2pmem-test");
  c->add_option("READ_DEV", o->read_dev, "Block device (or file) read from")->required();
  c->add_option("WRITE_DEV", o->write_dev, "Block device (or file) written to (its contents are overwritten)")->required();
  c->add_option("P2PMEM", o->p2pmem, "PCI address of the p2pmem provider (or its sysfs folder); default: host memory");
  c->add_option("-s,--chunk-size", o->chunk_size, "Bytes per I/O (a multiple of the devices' logical block size)")->capture_default_str();
  c->add_option("-c,--chunks,--count", o->chunks, "Number of chunks to copy")->capture_default_str()->check(kNonNegative);
  c->add_option("-t,--threads", o->threads, "Threads, each with its own chunk of the buffer")->capture_default_str()->check(kNonNegative);
  c->add_flag("--check", o->check, "After the copy, read both ranges back and compare every byte");
  c->add_option("--seed", o->seed, "Write a pattern of this seed to READ_DEV first (overwrites it) and check every chunk read")->check(kNonNegative);
  c->add_option("--sysfs-root", o->root, "Where sys/ is (p2pmem, the PCI tree)")->capture_default_str();
  c->add_flag("--allow-unpublished", o->allow_unpublished, "Map p2pmem even when the provider did not publish it");
  c->callback([o] { run_p2pmem(*o); });
}

}  // namespace physr::cli
