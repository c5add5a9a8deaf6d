// physr map: map a mixed host + P2P range list for one device of a machine and show, per
// range, the P2P verdict and, per DMA segment, its path and DMA address; then unmap and
// check that everything came back.
#include <fmt/core.h>

#include <memory>
#include <optional>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "json_writer.hpp"
#include "physr/dma.hpp"
#include "physr/model.hpp"
#include "physr/platform.hpp"

namespace physr::cli {
namespace {

using pci::Topology;

struct MapOptions {
  std::string machine{kDefaultMachine};
  std::string device = "nvme0";
  std::vector<std::string> ranges;
  std::string dir = "to_device";
  bool direct = false, untrusted = false, allow_bounce = false, json = false;
  unsigned mask_bits = 64;
  size_t show = ~size_t{0};  // ranges and segments printed (text output)
  std::string max_segment = "64K", boundary = "4G", dma_offset = "0";
};

// The machine as the DMA layer sees it is the model's platform (RAM around the 32-bit MMIO
// hole, every P2P BAR a provider allowing CPU copies, a bounce pool); the device gets its
// own IOMMU domain, configured from the command line.
struct MapMachine {
  Topology topo;
  std::unique_ptr<ModelPlatform> model;  // refers to topo: MapMachine is never moved
  IoDomain* domain = nullptr;            // owned by the model
};

// "host:ADDR:LEN" or "NAME.barN:OFFSET:LEN" (NAME a device name or BDF). The two numbers
// are the text after the last two colons, so a BDF's own colons stay in the place.
PhysRange parse_range(MapMachine& m, const std::string& spec) {
  const auto bad = [&](const std::string& why) { return UsageError(fmt::format("--range '{}': {}", spec, why)); };
  const size_t c2 = spec.rfind(':');
  const size_t c1 = c2 == std::string::npos || c2 == 0 ? std::string::npos : spec.rfind(':', c2 - 1);
  if (c1 == std::string::npos) throw bad("expected host:ADDR:LEN or DEVICE.barN:OFFSET:LEN");
  const std::string where = spec.substr(0, c1);
  const auto number = [&](const std::string& text, const char* what) {
    auto v = parse_size(text);
    if (!v) throw bad(std::string(what) + ": " + v.error().message);
    return *v;
  };
  const uint64_t at = number(spec.substr(c1 + 1, c2 - c1 - 1), where == "host" ? "address" : "offset");
  const uint64_t len = number(spec.substr(c2 + 1), "length");
  if (len == 0) throw bad("length 0");
  if (where == "host") {
    if (!m.model->memory().is_host_ram(PhysSpan{PhysAddr(at), len})) {
      std::string ram;
      for (const PhysRegion& g : m.model->memory().regions())
        if (g.kind == PhysRegion::Kind::host_ram)
          ram += fmt::format("{}[{}, {})", ram.empty() ? "" : " and ", format_hex(g.span.base.value()), format_hex(g.span.base.value() + g.span.size));
      throw bad("host memory is " + ram);
    }
    return PhysRange{PhysAddr(at), len, kHostMemory};
  }
  const size_t dot = where.rfind(".bar");
  if (dot == std::string::npos) throw bad("the place must be 'host' or DEVICE.barN");
  auto found = m.topo.lookup(where.substr(0, dot));
  if (!found) throw bad(found.error().message);
  const uint32_t f = *found;
  std::string_view idx = std::string_view(where).substr(dot + 4);
  const auto n = consume_uint(idx, 10);
  if (!n || !idx.empty()) throw bad("BAR index must be a number");
  for (const Aperture& a : m.model->platform().apertures()) {
    if (a.function != f || a.bar != *n) continue;
    if (at >= a.span.size || len > a.span.size - at) throw bad(fmt::format("{} holds {}", a.name, format_size(a.span.size)));
    return PhysRange{a.span.base + at, len, a.id};
  }
  throw bad(fmt::format("{} has no memory BAR {}", m.model->platform().label(f), *n));
}

// Without --range: some host memory, then 8 KiB of each other device's largest BAR, so
// every verdict the machine has shows up.
std::vector<PhysRange> default_ranges(const MapMachine& m, uint32_t client) {
  std::vector<PhysRange> out{{PhysAddr(0x10'0200), 0x3e00, kHostMemory}, {PhysAddr(0x20'0000), 0x2000, kHostMemory}};
  for (uint32_t f = 0; f < m.topo.functions.size(); ++f)
    if (const Aperture* a = f != client ? m.model->platform().largest_bar(f) : nullptr) out.push_back(PhysRange{a->span.base + 0x1000, 0x2000, a->id});
  out.push_back(PhysRange{PhysAddr(0x30'0000), 0x1000, kHostMemory});
  return out;
}

DmaDirection parse_dir(const std::string& s) {
  for (DmaDirection d : {DmaDirection::to_device, DmaDirection::from_device, DmaDirection::bidirectional})
    if (s == dma_direction_name(d)) return d;
  throw UsageError(fmt::format("--dir '{}': expected to_device, from_device or bidirectional", s));
}

void run_map(const MapOptions& o) {
  MapMachine m;
  m.topo = load_machine_arg(o.machine);
  m.model = failure_value(ModelPlatform::create(m.topo));
  print_warnings(m.model->warnings);
  m.domain = failure_value(m.model->new_domain());
  const uint32_t client = failure_value(m.topo.lookup(o.device));  // as explain: exit 1
  const DmaDirection dir = parse_dir(o.dir);
  if (o.mask_bits < 24 || o.mask_bits > 64) throw UsageError(fmt::format("--dma-mask {}: bits must be 24 to 64", o.mask_bits));
  const uint64_t boundary = size_arg("--boundary", o.boundary);
  if (boundary < kPageSize || (boundary & (boundary - 1)) != 0)
    throw UsageError(fmt::format("--boundary {}: must be a power of two of at least 4 KiB", o.boundary));
  DmaDeviceConfig c;
  c.function = client;
  c.dma_mask = o.mask_bits == 64 ? ~uint64_t{0} : (uint64_t{1} << o.mask_bits) - 1;
  c.max_segment = size_arg("--max-segment", o.max_segment);
  c.seg_boundary_mask = boundary - 1;
  c.untrusted = o.untrusted;
  c.dma_offset = size_arg("--dma-offset", o.dma_offset);
  c.domain = o.direct ? nullptr : m.domain;
  if (!o.direct && c.dma_offset) throw UsageError("--dma-offset applies to --direct devices only");
  Platform& pf = m.model->platform();
  auto dev = usage_value(DmaDevice::create(pf.dma_env(), c));

  std::vector<PhysRange> pieces;
  for (const std::string& r : o.ranges) pieces.push_back(parse_range(m, r));
  if (pieces.empty()) pieces = default_ranges(m, client);
  RangeList list;
  for (const PhysRange& p : pieces) failure_check(list.append(p, SegmentLimits{.merge = false}));

  const auto place = [&](const PhysRange& r) -> std::pair<std::string, std::string> {
    if (r.provider == kHostMemory) return {"host", ""};
    const Aperture* a = pf.aperture(r.provider);
    if (!a) return {"?", ""};  // cannot happen: every tagged range comes from an aperture
    const pci::Verdict v = pf.p2p().verdict(a->function, client);
    return {a->name, fmt::format("{} (distance {})", pci::map_type_name(v.type), v.distance)};
  };
  const DmaAttrs attrs = o.allow_bounce ? kDmaAttrAllowBounce : kDmaAttrNone;
  auto mapped = dev->map(list, dir, attrs);
  const uint64_t slots = pf.bounce()->used_slots();
  const auto ds = m.domain->stats();

  const std::string who = fmt::format("{} ({})", m.topo.functions[client].bdf.to_string(), pf.label(client));
  const std::string how = o.direct ? fmt::format("direct mapping, DMA offset {}", format_hex(c.dma_offset)) : "IOMMU domain (strict)";
  // JSON is streamed in the sorted key order nlohmann::json prints, so a list of millions
  // of segments never becomes one document in memory.
  std::optional<JsonWriter> w;
  const auto json_head = [&] {
    w->key("device");
    w->string_value(m.topo.functions[client].bdf.to_string());
    w->key("direction");
    w->string_value(dma_direction_name(dir));
  };
  const auto json_machine = [&] {
    w->key("machine");
    w->string_value(m.topo.name);
    w->key("mapping");
    w->string_value(o.direct ? "direct" : "iommu");
  };
  const auto json_range_list = [&] {
    w->key("ranges");
    w->begin_array();
    for (const PhysRange& r : list) {
      const auto [name, verdict] = place(r);
      w->value(nlohmann::json{{"phys", format_hex(r.base.value())}, {"len", r.size}, {"memory", name}, {"verdict", verdict}});
    }
    w->end_array();
  };
  if (o.json) {
    w.emplace(stdout, 2);
    w->begin_object();
  } else {
    fmt::print("Mapping {} ranges ({}) for {} on {}: {}, DMA mask {} bits, {}\n\n", list.size(), format_size(list.total_bytes()), who,
               m.topo.name, how, o.mask_bits, dma_direction_name(dir));
    fmt::print("  #  memory              physical           length     P2P verdict\n");
    size_t i = 0;
    for (const PhysRange& r : list) {
      if (i == o.show) break;
      const auto [name, verdict] = place(r);
      fmt::print("  {:<2} {:<19} {:<18} {:<10} {}\n", i++, name, format_hex(r.base.value()), format_size(r.size), verdict);
    }
    if (list.size() > i) fmt::print("  ({} more)\n", list.size() - i);
  }
  if (!mapped) {
    // The hint follows the cause: P2P memory the device cannot reach may be bounced when
    // allowed; a bounce buffer above the DMA mask (Linux swiotlb_map() fails the same way:
    // "swiotlb addr ... overflow") is past what bouncing can fix.
    std::string hint;
    if (mapped.error().code == EREMOTEIO && !o.allow_bounce) {
      hint = "--allow-bounce lets the DMA layer bounce it when the provider allows CPU copies";
    } else if (mapped.error().code == EIO && o.direct && o.mask_bits < 64) {
      hint = fmt::format("the bounce pool lies above the {}-bit DMA mask, so bouncing cannot help: map memory below {}, "
                         "widen --dma-mask, or map through the IOMMU (without --direct)",
                         o.mask_bits, format_size(c.dma_mask + 1));
    }
    if (o.json) {
      json_head();
      w->key("error");
      w->string_value(mapped.error().to_string());
      if (!hint.empty()) {
        w->key("hint");
        w->string_value(hint);
      }
      json_machine();
      json_range_list();
      w->end_object();
      w->newline();
      w.reset();
    }
    throw Failure(mapped.error().to_string() + (hint.empty() ? "" : " (" + hint + ")"));
  }
  if (o.json) {
    w->key("bounce_slots");
    w->unsigned_value(slots);
    json_head();
    w->key("iova");
    w->value(nlohmann::json{{"base", format_hex(mapped->iova().base.value())}, {"len", mapped->iova().size}});
    json_machine();
    w->key("page_table_leaves");
    w->unsigned_value(ds.mapped_4k + ds.mapped_2m + ds.mapped_1g);
    json_range_list();
    if (!mapped->segments().empty()) {
      w->key("segments");
      w->begin_array();
      for (const DmaSegment& s : mapped->segments())
        w->element([&](std::string& b, std::string_view in, std::string_view out) {
          // format_hex() and the path names are plain ASCII: nothing to escape.
          b += "{\n";
          b += in;
          b += "\"dma\": \"";
          b += format_hex(s.addr.value());
          b += "\",\n";
          b += in;
          b += "\"len\": ";
          b += fmt::format_int(s.len).c_str();
          b += ",\n";
          b += in;
          b += "\"path\": \"";
          b += dma_seg_path(s.flags);
          b += "\"\n";
          b += out;
          b += '}';
        });
      w->end_array();
    }
  } else {
    fmt::print("\nDMA list: {} segments\n", mapped->segments().size());
    fmt::print("  #  DMA address        length     path\n");
    size_t i = 0;
    for (const DmaSegment& s : mapped->segments()) {
      if (i == o.show) break;
      fmt::print("  {:<2} {:<18} {:<10} {}\n", i++, format_hex(s.addr.value()), format_size(s.len), dma_seg_path(s.flags));
    }
    if (mapped->segments().size() > i) fmt::print("  ({} more)\n", mapped->segments().size() - i);
    if (mapped->iova().size)
      fmt::print("\nIOVA [{}, +{}), {} page-table leaves", format_hex(mapped->iova().base.value()), format_size(mapped->iova().size),
                 ds.mapped_4k + ds.mapped_2m + ds.mapped_1g);
    else
      fmt::print("\nNo IOVA");
    fmt::print(", {} bounce slots of 2 KiB in use\n", slots);
  }
  failure_check(dev->unmap(*mapped));
  m.domain->flush();
  const auto after = m.domain->stats();
  const bool clean = after.mapped_4k + after.mapped_2m + after.mapped_1g == 0 && pf.bounce()->used_slots() == 0 && dev->stats().live_mappings == 0;
  if (o.json) {
    w->key("unmapped_clean");
    w->value(nlohmann::json(clean));
    w->end_object();
    w->newline();
    w.reset();
  } else {
    fmt::print("Unmapped: {}\n", clean ? "every IOVA, page-table entry and bounce slot returned" : "SOMETHING WAS LEFT BEHIND");
  }
  if (!clean) throw Failure("unmap left state behind");
}

}  // namespace

void add_map_command(CLI::App& app) {
  auto o = std::make_shared<MapOptions>();
  auto* c = app.add_subcommand("map", "Map a mixed host + P2P range list for one device of a machine and show each segment's path");
  c->add_option("--machine", o->machine, "TOML machine file or built-in machine name")->capture_default_str()->check(kNonEmpty);
  c->add_option("--device", o->device, "The DMA device (name or BDF)")->capture_default_str();
  c->add_option("--range", o->ranges, "host:ADDR:LEN or DEVICE.barN:OFFSET:LEN, DEVICE a name or BDF (repeatable; default: host memory and every peer's BAR)");
  c->add_option("--dir", o->dir, "to_device, from_device or bidirectional")->capture_default_str();
  c->add_flag("--direct", o->direct, "Map directly (no IOMMU)");
  c->add_flag("--untrusted", o->untrusted, "An untrusted (external) device: behind an IOMMU, each range at its own IOVA and unaligned ones bounced, as Linux does");
  c->add_flag("--allow-bounce", o->allow_bounce, "Bounce P2P memory the device cannot reach");
  c->add_option("--dma-mask", o->mask_bits, "DMA mask in bits (24-64)")->capture_default_str()->check(kNonNegative);
  c->add_option("--max-segment", o->max_segment, "Device max segment size")->capture_default_str();
  c->add_option("--boundary", o->boundary, "Device segment boundary (power of two)")->capture_default_str();
  c->add_option("--dma-offset", o->dma_offset, "Direct mapping: DMA address = phys + offset")->capture_default_str();
  c->add_option("--show", o->show, "Ranges and segments to print (default: all; --json lists all)")->check(kNonNegative);
  c->add_flag("--json", o->json, "Print JSON");
  c->callback([o] { run_map(*o); });
}

}  // namespace physr::cli
