// TOML machine files (docs/machine-format.md). Strict: unknown keys, wrong types, bad
// addresses and dangling parents are errors that name FILE:LINE and the key, so a typo
// never turns silently into a different machine.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "physr/pci.hpp"
#include "pci/toml_fields.hpp"

namespace physr::pci {

namespace {

// Levels of a PCI tree, the root bus's functions the first: the sysfs loader's bound too.
// No real tree comes close (every bridge level takes a bus number; switches two), and the
// bound keeps the per-function walks up to the root short on machines of 65,535 functions.
constexpr int kMaxLevels = 64;

using namespace physr::toml_fields;


Result<AcsState> parse_acs(const Ctx& c, const toml::node& n, const std::string& what) {
  AcsState s;
  const auto* str = n.as_string();
  if (!str) return make_error(EINVAL, c.where(n) + what + ".acs: expected a string such as \"RR CR EC\", \"none\" or \"unknown\"");
  std::istringstream in(str->get());
  std::string tok;
  s.kind = AcsState::Kind::present;
  static const std::pair<const char*, uint16_t> names[] = {{"SV", acs::SV}, {"TB", acs::TB}, {"RR", acs::RR}, {"CR", acs::CR},
                                                           {"UF", acs::UF}, {"EC", acs::EC}, {"DT", acs::DT}};
  // "none", "absent" and "unknown" each say all there is: none of them combines with bits
  // or with another ("absent RR" would silently drop the RR).
  std::vector<std::string> toks;
  while (in >> tok) toks.push_back(tok);
  if (toks.empty()) return make_error(EINVAL, c.where(n) + what + ".acs: empty (use \"none\", \"absent\", \"unknown\" or bits such as \"RR CR\")");
  for (const std::string& word : toks) {
    const bool whole = word == "unknown" || word == "absent" || word == "none";
    if (whole && toks.size() > 1)
      return make_error(EINVAL, c.where(n) + what + ".acs: '" + word + "' stands alone and cannot be combined with '" + str->get() + "'s other words");
  }
  for (const std::string& word : toks) {
    tok = word;
    if (tok == "unknown" || tok == "absent") {
      s.kind = tok == "unknown" ? AcsState::Kind::unknown : AcsState::Kind::absent;
      continue;
    }
    if (tok == "none") continue;
    bool found = false;
    for (const auto& [name, bit] : names)
      if (tok == name) {
        s.ctrl |= bit;
        found = true;
      }
    if (!found)
      return make_error(EINVAL, c.where(n) + what + ".acs: unknown ACS bit '" + tok + "' (SV TB RR CR UF EC DT, none, absent, unknown)");
  }
  s.cap = s.kind == AcsState::Kind::present ? 0x7f : 0;
  return s;
}

// Why a function name is refused, or "" when it is fine.
std::string check_name(const std::string& name) {
  if (name == "host" || name == "nearest") return "'" + name + "' is reserved (scenarios use it for a buffer placement)";
  for (size_t i = 0; i < name.size(); ++i) {
    const auto ch = static_cast<unsigned char>(name[i]);
    if (ch < 0x20 || ch == 0x7f) return "control character " + format_hex(ch) + " at byte " + std::to_string(i);
    // U+202A..U+202E and U+2066..U+2069 (bidirectional embeddings, overrides, isolates):
    // E2 80 AA..AE and E2 81 A6..A9 in UTF-8.
    if (ch == 0xe2 && i + 2 < name.size()) {
      const auto b1 = static_cast<unsigned char>(name[i + 1]), b2 = static_cast<unsigned char>(name[i + 2]);
      if ((b1 == 0x80 && b2 >= 0xaa && b2 <= 0xae) || (b1 == 0x81 && b2 >= 0xa6 && b2 <= 0xa9)) {
        const unsigned cp = (0x2u << 12) | ((b1 & 0x3fu) << 6) | (b2 & 0x3fu);
        char u[8];
        std::snprintf(u, sizeof u, "U+%04X", cp);
        return std::string("a bidirectional-text control (") + u + ") at byte " + std::to_string(i);
      }
    }
  }
  return {};
}

double gen_speed(uint64_t gen) {
  static const double speeds[] = {0, 2.5, 5.0, 8.0, 16.0, 32.0, 64.0, 128.0};
  return gen < 8 ? speeds[gen] : 0;
}

}  // namespace

Result<Topology> parse_machine(std::string_view text, std::string_view source) {
  Ctx c{std::string(source)};
  PHYSR_ASSIGN_OR_RETURN(const toml::table& root, parse_text(text, c.source));
  PHYSR_RETURN_IF_ERROR(check_keys(c, root, "machine", {"name", "description", "cpu", "host_bridge", "function"}));
  Topology t;
  t.source = c.source;
  PHYSR_ASSIGN_OR_RETURN(const auto machine_name, get_string(c, root, "name", "machine"));
  t.name = machine_name.value_or(std::string(source));

  if (const toml::node* cpu = root.get("cpu")) {
    const toml::table* ct = cpu->as_table();
    if (!ct) return make_error(EINVAL, c.where(*cpu) + "cpu: expected a table");
    PHYSR_RETURN_IF_ERROR(check_keys(c, *ct, "cpu", {"vendor", "family"}));
    PHYSR_ASSIGN_OR_RETURN(const auto vendor, get_string(c, *ct, "vendor", "cpu"));
    PHYSR_ASSIGN_OR_RETURN(const auto family, get_uint(c, *ct, "family", "cpu", 0xffff));
    t.cpu.vendor = vendor.value_or("");
    t.cpu.family = static_cast<uint32_t>(family.value_or(0));
  }

  PHYSR_ASSIGN_OR_RETURN(const toml::array* const hbs, get_table_array(c, root, "host_bridge"));
  if (!hbs || hbs->empty()) return make_error(EINVAL, c.source + ": no [[host_bridge]] tables: a machine needs at least one");
  std::map<std::pair<uint32_t, uint8_t>, uint32_t> hb_index;
  for (size_t i = 0; i < hbs->size(); ++i) {
    const toml::table& ht = *(*hbs)[i].as_table();
    const std::string what = "host_bridge[" + std::to_string(i) + "]";
    PHYSR_RETURN_IF_ERROR(check_keys(c, ht, what, {"domain", "bus", "numa_node", "bus_offset"}));
    PHYSR_ASSIGN_OR_RETURN(const auto dom, get_uint(c, ht, "domain", what, 0xffffffff));
    PHYSR_ASSIGN_OR_RETURN(const auto bus, get_uint(c, ht, "bus", what, 0xff));
    PHYSR_ASSIGN_OR_RETURN(const auto node, get_uint(c, ht, "numa_node", what, 4095));
    // A string for offsets of 2^63 and more (TOML integers are signed 64-bit).
    PHYSR_ASSIGN_OR_RETURN(const auto offset, get_uint(c, ht, "bus_offset", what, ~uint64_t{0}, /*sizes=*/true));
    HostBridge hb;
    hb.domain = static_cast<uint32_t>(dom.value_or(0));
    hb.bus = static_cast<uint8_t>(bus.value_or(0));
    hb.numa_node = node.has_value() ? static_cast<int>(*node) : -1;
    hb.bus_offset = offset.value_or(0);
    if (!hb_index.emplace(std::make_pair(hb.domain, hb.bus), static_cast<uint32_t>(t.host_bridges.size())).second)
      return make_error(EEXIST, c.where(ht) + what + ": host bridge " + hb.name() + " is defined twice");
    t.host_bridges.push_back(hb);
  }

  PHYSR_ASSIGN_OR_RETURN(const toml::array* const fns, get_table_array(c, root, "function"));
  std::vector<std::pair<std::string, const toml::node*>> parents;  // per function
  std::map<std::string, uint32_t> by_name;
  std::map<Bdf, uint32_t> by_bdf;
  struct BarAt {
    PhysSpan span;
    std::string where, name;  // "FILE:LINE: ", "function[i] (BDF).bar[j]"
  };
  std::vector<BarAt> all_bars;  // every function's, for the overlap check
  const size_t nf = fns ? fns->size() : 0;
  for (size_t i = 0; i < nf; ++i) {
    const toml::table& ft = *(*fns)[i].as_table();
    std::string what = "function[" + std::to_string(i) + "]";
    Function f;
    PHYSR_ASSIGN_OR_RETURN(const auto bdf_text, get_string(c, ft, "bdf", what));
    if (!bdf_text.has_value()) return make_error(EINVAL, c.where(ft) + what + ": missing key 'bdf'");
    PHYSR_ASSIGN_OR_RETURN_CTX(f.bdf, parse_bdf(*bdf_text), c.where(*ft.get("bdf")) + what + ".bdf");
    what += " (" + f.bdf.to_string() + ")";
    PHYSR_RETURN_IF_ERROR(check_keys(c, ft, what, {"bdf", "name", "vendor", "device", "class", "type", "parent", "acs", "numa_node",
                                                   "link_gen", "link_width", "bar", "cmb"}));
    if (by_bdf.count(f.bdf)) return make_error(EEXIST, c.where(ft) + what + ": defined twice");
    PHYSR_ASSIGN_OR_RETURN(const auto name, get_string(c, ft, "name", what));
    f.name = name.value_or("");
    if (!f.name.empty() && (by_name.count(f.name) || parse_bdf(f.name)))
      return make_error(EEXIST, c.where(ft) + what + ".name: '" + f.name + "' is used twice or looks like a PCI address");
    // Names are printed in tables, trees, DOT and JSON and typed on command lines: control
    // characters (a newline or ESC could forge output lines), bidirectional overrides, and
    // the words scenarios give a meaning ("host", "nearest") are refused.
    if (auto bad = check_name(f.name); !bad.empty())
      return make_error(EINVAL, c.where(*ft.get("name")) + what + ".name: " + bad);
    for (auto [key, max, dst] : {std::tuple{"vendor", uint64_t{0xffff}, 0}, std::tuple{"device", uint64_t{0xffff}, 1},
                                 std::tuple{"class", uint64_t{0xffffff}, 2}}) {
      PHYSR_ASSIGN_OR_RETURN(const auto v, get_uint(c, ft, key, what, max));
      if (!v.has_value()) return make_error(EINVAL, c.where(ft) + what + ": missing key '" + key + "'");
      if (dst == 0) f.vendor = static_cast<uint16_t>(*v);
      else if (dst == 1) f.device = static_cast<uint16_t>(*v);
      else f.class_code = static_cast<uint32_t>(*v);
    }
    PHYSR_ASSIGN_OR_RETURN(const auto type, get_string(c, ft, "type", what));
    if (type.has_value()) {
      PHYSR_ASSIGN_OR_RETURN_CTX(f.port_type, parse_port_type(*type), c.where(*ft.get("type")) + what + ".type");
    } else {
      f.port_type = is_pci_bridge(f) ? PortType::unknown : PortType::endpoint;
    }
    if (is_pci_bridge(f) && f.port_type == PortType::unknown)
      return make_error(EINVAL, c.where(ft) + what + ": a PCI bridge needs 'type' (root_port, switch_upstream, switch_downstream, ...)");
    f.acs.kind = AcsState::Kind::absent;
    if (const toml::node* a = ft.get("acs")) {
      PHYSR_ASSIGN_OR_RETURN(f.acs, parse_acs(c, *a, what));
    }
    PHYSR_ASSIGN_OR_RETURN(const auto node, get_uint(c, ft, "numa_node", what, 4095));
    f.numa_node = node.has_value() ? static_cast<int>(*node) : -1;
    PHYSR_ASSIGN_OR_RETURN(const auto gen, get_uint(c, ft, "link_gen", what, 7));
    if (gen == uint64_t{0}) return make_error(EINVAL, c.where(*ft.get("link_gen")) + what + ".link_gen: 0 is out of range 1..7 (leave it out when unknown)");
    f.link_speed_gts = gen_speed(gen.value_or(0));
    PHYSR_ASSIGN_OR_RETURN(const auto width, get_uint(c, ft, "link_width", what, 32));
    if (width == uint64_t{0}) return make_error(EINVAL, c.where(*ft.get("link_width")) + what + ".link_width: 0 is out of range 1..32 (leave it out when unknown)");
    f.link_width = static_cast<unsigned>(width.value_or(0));

    PHYSR_ASSIGN_OR_RETURN(const toml::array* const bars, get_table_array(c, ft, "bar"));
    for (size_t b = 0; bars && b < bars->size(); ++b) {
      const toml::table& bt = *(*bars)[b].as_table();
      const std::string bw = what + ".bar[" + std::to_string(b) + "]";
      PHYSR_RETURN_IF_ERROR(check_keys(c, bt, bw, {"index", "start", "size", "prefetchable"}));
      auto idx = get_uint(c, bt, "index", bw, 5);
      auto start = get_uint(c, bt, "start", bw, kPhysAddrLimit - 1, true);
      auto size = get_uint(c, bt, "size", bw, kPhysAddrLimit, true);
      auto pf = get_bool(c, bt, "prefetchable", bw, true);
      for (auto* r : {&idx, &start, &size}) PHYSR_RETURN_IF_ERROR(std::move(*r));
      PHYSR_RETURN_IF_ERROR(std::move(pf));
      if (!start->has_value() || !size->has_value() || **size == 0)
        return make_error(EINVAL, c.where(bt) + bw + ": needs 'start' and a non-zero 'size'");
      if (**start + **size > kPhysAddrLimit)
        return make_error(EINVAL, c.where(bt) + bw + ": runs past the 52-bit physical address space");
      // A memory BAR is a power of two of at least 16 bytes, aligned to its size (PCI Local
      // Bus Specification, Base Address Registers: software sizes it by writing all ones).
      const uint64_t sz = **size;
      if (sz < 16 || (sz & (sz - 1)) != 0)
        return make_error(EINVAL, c.where(*bt.get("size")) + bw + ".size: " + std::to_string(sz) +
                                      " bytes is not a power of two of at least 16 (a memory BAR's size always is)");
      if ((**start & (sz - 1)) != 0)
        return make_error(EINVAL, c.where(*bt.get("start")) + bw + ".start: " + format_hex(**start) + " is not aligned to the BAR's size (" +
                                      format_size(sz) + ")");
      Bar bar;
      bar.index = static_cast<unsigned>(idx->value_or(b));
      for (const Bar& other : f.bars)
        if (other.index == bar.index)
          return make_error(EEXIST, c.where(bt) + bw + ": BAR " + std::to_string(bar.index) + " is defined twice for this function");
      bar.span = PhysSpan{PhysAddr(**start), **size};
      all_bars.push_back({bar.span, c.where(bt), bw});
      bar.flags = IoResourceFlags(IoResource::mem) | IoResource::mem_64 | (*pf ? IoResource::prefetch : IoResourceFlags{});
      f.bars.push_back(bar);
    }

    if (const toml::node* cn = ft.get("cmb")) {
      const toml::table* ct = cn->as_table();
      const std::string cw = what + ".cmb";
      if (!ct) return make_error(EINVAL, c.where(*cn) + cw + ": expected a table (bar, rds, wds)");
      if (!is_nvme(f))
        return make_error(EINVAL, c.where(*cn) + cw + ": only NVMe controllers (class 0x0108xx) have a controller memory buffer");
      PHYSR_RETURN_IF_ERROR(check_keys(c, *ct, cw, {"bar", "rds", "wds"}));
      PHYSR_ASSIGN_OR_RETURN(const auto bar, get_uint(c, *ct, "bar", cw, 5));
      if (!bar.has_value()) return make_error(EINVAL, c.where(*ct) + cw + ": missing key 'bar' (the BAR holding the CMB)");
      if (std::none_of(f.bars.begin(), f.bars.end(), [&](const Bar& b) { return b.index == *bar; }))
        return make_error(EINVAL, c.where(*ct->get("bar")) + cw + ".bar: BAR " + std::to_string(*bar) + " is not among the function's [[function.bar]]");
      NvmeCmb cmb;
      cmb.bar = static_cast<unsigned>(*bar);
      PHYSR_ASSIGN_OR_RETURN(cmb.rds, get_bool(c, *ct, "rds", cw, true));
      PHYSR_ASSIGN_OR_RETURN(cmb.wds, get_bool(c, *ct, "wds", cw, true));
      f.cmb = cmb;
    }

    const toml::node* pn = ft.get("parent");
    std::string parent;
    if (pn) {
      if (!pn->as_string()) return make_error(EINVAL, c.where(*pn) + what + ".parent: expected a PCI address or a function name");
      parent = pn->as_string()->get();
    }
    parents.emplace_back(parent, pn ? pn : &ft);
    by_bdf.emplace(f.bdf, static_cast<uint32_t>(t.functions.size()));
    if (!f.name.empty()) by_name.emplace(f.name, static_cast<uint32_t>(t.functions.size()));
    t.functions.push_back(std::move(f));
  }

  // No two BARs decode the same address (the PCI core refuses a conflicting resource).
  std::sort(all_bars.begin(), all_bars.end(), [](const BarAt& a, const BarAt& b) { return a.span.base < b.span.base; });
  for (size_t k = 1; k < all_bars.size(); ++k)
    if (all_bars[k].span.base < all_bars[k - 1].span.base + all_bars[k - 1].span.size)
      return make_error(EINVAL, all_bars[k].where + all_bars[k].name + ": overlaps " + all_bars[k - 1].name + " (" +
                                    all_bars[k - 1].where.substr(0, all_bars[k - 1].where.size() - 2) + ", " +
                                    format_hex(all_bars[k - 1].span.base.value()) + " + " + format_size(all_bars[k - 1].span.size) + ")");

  // Resolve parents and host bridges now that every function is known.
  for (uint32_t i = 0; i < t.functions.size(); ++i) {
    Function& f = t.functions[i];
    const std::string what = "function[" + std::to_string(i) + "] (" + f.bdf.to_string() + ")";
    const auto& [parent, node] = parents[i];
    if (parent.empty()) {
      auto hb = hb_index.find({f.bdf.domain, f.bdf.bus});
      if (hb == hb_index.end())
        return make_error(EINVAL, c.where(*node) + what + ": has no 'parent' and no [[host_bridge]] has domain " +
                                      std::to_string(f.bdf.domain) + " bus " + std::to_string(f.bdf.bus) + " as its root bus");
      f.upstream = -1;
      f.host_bridge = hb->second;
      t.host_bridges[hb->second].root_functions.push_back(i);
      if (f.numa_node < 0) f.numa_node = t.host_bridges[hb->second].numa_node;
      continue;
    }
    std::optional<uint32_t> p;
    if (auto n = by_name.find(parent); n != by_name.end()) p = n->second;
    else if (auto b = parse_bdf(parent); b && by_bdf.count(*b)) p = by_bdf[*b];
    if (!p) return make_error(EINVAL, c.where(*node) + what + ".parent: no function '" + parent + "' in this machine");
    if (!is_pci_bridge(t.functions[*p]))
      return make_error(EINVAL, c.where(*node) + what + ".parent: " + t.functions[*p].bdf.to_string() +
                                    " is not a PCI bridge (class 0x0604), so nothing can sit below it");
    f.upstream = static_cast<int32_t>(*p);
  }
  // No function more than kMaxLevels deep: each chain is walked up once, down to the first
  // function whose level is known (a cycle stops the walk; validate() names it).
  {
    std::vector<int> level(t.functions.size(), -1);
    std::vector<uint32_t> chain;
    for (uint32_t i = 0; i < t.functions.size(); ++i) {
      chain.clear();
      int32_t u = static_cast<int32_t>(i);
      while (u >= 0 && level[static_cast<uint32_t>(u)] == -1 && chain.size() <= t.functions.size()) {
        chain.push_back(static_cast<uint32_t>(u));
        level[static_cast<uint32_t>(u)] = -2;  // on this walk
        u = t.functions[static_cast<uint32_t>(u)].upstream;
      }
      if (u >= 0 && level[static_cast<uint32_t>(u)] == -2) break;  // a cycle
      int at = u >= 0 ? level[static_cast<uint32_t>(u)] : -1;
      for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
        level[*it] = ++at;
        if (at >= kMaxLevels)
          return make_error(EINVAL, c.where(*parents[*it].second) + "function[" + std::to_string(*it) + "] (" +
                                        t.functions[*it].bdf.to_string() + "): more than " + std::to_string(kMaxLevels) +
                                        " levels below its host bridge (physr reads PCI trees up to " +
                                        std::to_string(kMaxLevels) + " deep)");
      }
    }
  }
  // Host bridge and NUMA node come from the root of each chain (cycles checked first).
  PHYSR_RETURN_IF_ERROR_CTX(t.validate(true), c.source);
  for (Function& f : t.functions) {
    int32_t r = f.upstream;
    const Function* top = &f;
    while (r >= 0) {
      top = &t.functions[static_cast<uint32_t>(r)];
      r = top->upstream;
    }
    if (top->upstream < 0 && top != &f) {
      f.host_bridge = top->host_bridge;
      if (f.numa_node < 0) f.numa_node = t.host_bridges[f.host_bridge].numa_node;
    }
  }
  for (HostBridge& hb : t.host_bridges)
    std::sort(hb.root_functions.begin(), hb.root_functions.end(),
              [&](uint32_t a, uint32_t b) { return t.functions[a].bdf.devfn() < t.functions[b].bdf.devfn(); });
  return t;
}

Result<Topology> load_machine_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return make_error(ENOENT, "machine file '" + file.string() + "': cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_machine(ss.str(), file.string());
}

}  // namespace physr::pci
