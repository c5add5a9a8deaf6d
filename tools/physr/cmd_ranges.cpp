// physr ranges: build a range list from a generated or given pfn list and compare its cost
// with a scatterlist plus struct page.
#include <fmt/core.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "cli.hpp"
#include "json_writer.hpp"
#include "physr/range.hpp"

namespace physr::cli {
namespace {

struct RangesOptions {
  std::string pattern = "mixed";
  size_t count = 4096;
  std::string pfns_file;
  std::string max_segment;
  std::string boundary;
  uint64_t seed = 1;
  size_t show = 12;
  bool json = false;
};

std::string read_file(const std::string& path) {
  std::ostringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
    return ss.str();
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw Failure(fmt::format("pfn file '{}': is a directory", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure(fmt::format("cannot read pfn file '{}'", path));
  ss << in.rdbuf();
  return ss.str();
}

std::string provider_name(ProviderId p) {
  if (p == kHostMemory) return "host";
  if (p == kIndirectProvider) return "p2p:indirect";
  return fmt::format("p2p:{}", p);
}

void run_ranges(const RangesOptions& o) {
  SegmentLimits limits;
  if (!o.max_segment.empty()) limits.max_segment = size_arg("--max-segment", o.max_segment);
  if (!o.boundary.empty()) {
    const uint64_t b = size_arg("--boundary", o.boundary);
    if (b < kPageSize || (b & (b - 1)) != 0)
      throw UsageError(fmt::format("--boundary {}: must be a power of two of at least 4 KiB", o.boundary));
    limits.boundary_mask = b - 1;
  }
  PfnList input;
  std::string source;
  if (!o.pfns_file.empty()) {
    input = failure_value(parse_pfn_text(read_file(o.pfns_file), o.pfns_file));
    source = o.pfns_file;
  } else {
    input = make_pfn_pattern(usage_value(parse_pfn_pattern(o.pattern)), o.count, o.seed);
    source = fmt::format("{} pattern, seed {}", o.pattern, o.seed);
  }
  auto built = RangeList::from_pfns(input.pfns, input.providers, limits);
  if (!built) {
    if (built.error().code == EINVAL)
      throw UsageError((o.max_segment.empty() ? "" : "--max-segment " + o.max_segment + ": ") + built.error().message);
    throw Failure(fmt::format("{}: {}", source, built.error().to_string()));
  }
  const RangeList& list = *built;
  // The scatterlist Linux would build: same merging, capped at its 32-bit segment length.
  SegmentLimits sg_limits = limits;
  sg_limits.max_segment = std::min(limits.max_segment, kScatterlistLimits.max_segment);
  const size_t sg_nents = RangeList::from_pfns(input.pfns, input.providers, sg_limits)->size();
  const ScatterlistCost sg = scatterlist_cost(sg_nents, input.pfns.size());
  const size_t bytes = list.encoded_bytes();
  // The longest range built from pfns: whole pages (Linux sg_alloc_append_table_from_pages()
  // aligns max_segment down to PAGE_SIZE), so --max-segment 4097 means 4 KiB.
  const uint64_t used_max_segment = limits.max_segment & ~(kPageSize - 1);

  if (o.json) {
    // Streamed, in the sorted key order nlohmann::json prints: the entries are written as
    // the list is walked, so memory does not grow with them.
    JsonWriter w(stdout, 2);
    w.begin_object();
    w.key("entries");
    w.begin_array();
    for (const PhysRange r : list)
      w.element([&](std::string& b, std::string_view in, std::string_view out) {
        b += "{\n";
        b += in;
        b += "\"addr\": ";
        b += fmt::format_int(r.base.value()).c_str();
        b += ",\n";
        b += in;
        b += "\"len\": ";
        b += fmt::format_int(r.size).c_str();
        b += ",\n";
        b += in;
        b += "\"provider\": ";
        b += fmt::format_int(r.provider).c_str();
        b += '\n';
        b += out;
        b += '}';
      });
    w.end_array();
    if (!o.max_segment.empty()) {
      w.key("max_segment_bytes");
      w.unsigned_value(used_max_segment);
    }
    const std::pair<const char*, uint64_t> counts[] = {
        {"pfns", input.pfns.size()},   {"phys_vec_bytes", sg.phys_vec_bytes},   {"physr_bytes", bytes},
        {"ranges", list.size()},       {"scatterlist_bytes", sg.sg_bytes},     {"scatterlist_entries", sg.sg_entries}};
    for (const auto& [k, v] : counts) {
      w.key(k);
      w.unsigned_value(v);
    }
    w.key("source");
    w.string_value(source);
    w.key("struct_page_bytes");
    w.unsigned_value(sg.struct_page_bytes);
    w.key("total_bytes");
    w.unsigned_value(list.total_bytes());
    w.end_object();
    w.newline();
    return;
  }

  fmt::print("{} pfns ({}) -> {} ranges, {}\n", input.pfns.size(), source, list.size(), format_size(list.total_bytes()));
  fmt::print("limits: max segment {}{}, boundary {}\n\n",
             limits.max_segment == ~uint64_t{0} ? "none" : format_size(used_max_segment),
             used_max_segment == limits.max_segment || o.max_segment.empty()
                 ? ""
                 : fmt::format(" (--max-segment {} rounded down to whole 4 KiB pages, as Linux does)", o.max_segment),
             limits.boundary_mask == ~uint64_t{0} ? "none" : format_size(limits.boundary_mask + 1));
  fmt::print("  {:>6}  {:<20} {:>10}  {:<13} {}\n", "#", "phys addr", "length", "provider", "encoding");
  size_t i = 0;
  for (auto it = list.begin(); it != list.end() && i < o.show; ++it, ++i) {
    const PhysRange r = *it;
    fmt::print("  {:>6}  {:#018x}   {:>10}  {:<13} {} B\n", i, r.base.value(), format_size(r.size),
               provider_name(r.provider), (*it.word() >> 63) ? 16 : 8);
  }
  if (list.size() > i) fmt::print("  ({} more)\n", list.size() - i);
  const double per = list.empty() ? 0.0 : static_cast<double>(bytes) / static_cast<double>(list.size());
  fmt::print("\nmemory to describe this I/O\n");
  fmt::print("  physr range list        {:>12} B  ({:.2f} B per range)\n", bytes, per);
  fmt::print("  phys_vec array          {:>12} B  (16 B per range)\n", sg.phys_vec_bytes);
  fmt::print("  scatterlist             {:>12} B  ({} entries of 32 B, chained in chunks of 128)\n", sg.sg_bytes,
             sg.sg_entries);
  fmt::print("  + struct page           {:>12} B  ({} pages of 64 B)\n", sg.struct_page_bytes, input.pfns.size());
  if (bytes != 0)
    fmt::print("  scatterlist + struct page costs {:.1f}x the physr list\n",
               static_cast<double>(sg.sg_bytes + sg.struct_page_bytes) / static_cast<double>(bytes));
}

}  // namespace

void add_ranges_command(CLI::App& app) {
  auto o = std::make_shared<RangesOptions>();
  CLI::App* c = app.add_subcommand("ranges", "Build a range list from pfns and compare it with a scatterlist");
  c->add_option("--pattern", o->pattern, "Generated input: contiguous, random, alternating or mixed")
      ->capture_default_str();
  c->add_option("--count", o->count, "Number of generated pfns")->capture_default_str()->check(CLI::Range(1, 1 << 28));
  c->add_option("--pfns", o->pfns_file, "Read pfns from FILE (one per line, optional provider id; - for stdin)")->check(kNonEmpty);
  c->add_option("--max-segment", o->max_segment, "Longest range, e.g. 64K (default: none)");
  c->add_option("--boundary", o->boundary, "Segment boundary, a power of two, e.g. 4G (default: none)");
  c->add_option("--seed", o->seed, "Seed for generated input")->capture_default_str()->check(kNonNegative);
  c->add_option("--show", o->show, "Ranges to print")->capture_default_str()->check(kNonNegative);
  c->add_flag("--json", o->json, "Print JSON instead of a table");
  c->callback([o] { run_ranges(*o); });
}

}  // namespace physr::cli
