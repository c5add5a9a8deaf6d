// Field readers for physr's strict TOML files (machine files, scenarios): every error
// names FILE:LINE, the key and the problem. Private to the library: pci's machine files and
// sim's scenarios (sim depends on pci) include it as "pci/toml_fields.hpp".
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <toml++/toml.h>

#include "physr/core.hpp"

namespace physr::toml_fields {

struct Ctx {
  std::string source;
  std::string where(const toml::node& n) const {
    const auto& b = n.source().begin;
    return source + ":" + std::to_string(b.line) + ": ";
  }
  std::string where(const toml::table& t) const { return where(static_cast<const toml::node&>(t)); }
};

inline Status check_keys(const Ctx& c, const toml::table& t, const std::string& what, std::initializer_list<std::string_view> allowed) {
  for (const auto& [k, v] : t) {
    bool ok = false;
    for (auto a : allowed) ok = ok || k.str() == a;
    if (!ok) {
      std::string list;
      for (auto a : allowed) {
        if (!list.empty()) list += ", ";
        list += a;
      }
      return make_error(EINVAL, c.where(v) + what + ": unknown key '" + std::string(k.str()) + "' (known: " + list + ")");
    }
  }
  return {};
}

// Integer key in [lo, hi]; also accepts size strings ("16M") when `sizes` is set.
inline Result<std::optional<uint64_t>> get_uint(const Ctx& c, const toml::table& t, std::string_view key, const std::string& what,
                                         uint64_t hi, bool sizes = false) {
  const toml::node* n = t.get(key);
  if (!n) return std::optional<uint64_t>();
  if (auto i = n->as_integer()) {
    const int64_t v = i->get();
    if (v < 0 || static_cast<uint64_t>(v) > hi)
      return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": " + std::to_string(v) +
                                    " is out of range 0.." + std::to_string(hi));
    return std::optional<uint64_t>(static_cast<uint64_t>(v));
  }
  if (sizes) {
    if (auto s = n->as_string()) {
      PHYSR_ASSIGN_OR_RETURN_CTX(const uint64_t v, parse_size(s->get()), c.where(*n) + what + "." + std::string(key));
      if (v > hi) return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": too large");
      return std::optional<uint64_t>(v);
    }
  }
  return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": expected an integer" + (sizes ? " or a size such as \"16M\"" : ""));
}

inline Result<std::optional<std::string>> get_string(const Ctx& c, const toml::table& t, std::string_view key, const std::string& what) {
  const toml::node* n = t.get(key);
  if (!n) return std::optional<std::string>();
  if (auto s = n->as_string()) return std::optional<std::string>(s->get());
  return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": expected a string");
}

inline Result<bool> get_bool(const Ctx& c, const toml::table& t, std::string_view key, const std::string& what, bool dflt) {
  const toml::node* n = t.get(key);
  if (!n) return dflt;
  if (auto b = n->as_boolean()) return b->get();
  return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": expected true or false");
}

inline Result<const toml::array*> get_table_array(const Ctx& c, const toml::table& t, std::string_view key) {
  const toml::node* n = t.get(key);
  if (!n) return static_cast<const toml::array*>(nullptr);
  const toml::array* a = n->as_array();
  if (!a || !a->is_array_of_tables())
    return make_error(EINVAL, c.where(*n) + std::string(key) + ": expected an array of tables ([[" + std::string(key) + "]])");
  return a;
}

/// Parses TOML text; a syntax error is EINVAL naming SOURCE:LINE.
inline Result<toml::table> parse_text(std::string_view text, const std::string& source) {
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    return make_error(EINVAL, source + ":" + std::to_string(e.source().begin.line) + ": TOML syntax: " + std::string(e.description()));
  }
}

/// A number (integer or float) key in [lo, hi], or nullopt when absent.
inline Result<std::optional<double>> get_number(const Ctx& c, const toml::table& t, std::string_view key, const std::string& what,
                                                double lo, double hi) {
  const toml::node* n = t.get(key);
  if (!n) return std::optional<double>();
  double v;
  if (auto i = n->as_integer()) v = static_cast<double>(i->get());
  else if (auto f = n->as_floating_point()) v = f->get();
  else return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": expected a number");
  if (!(v >= lo && v <= hi))
    return make_error(EINVAL, c.where(*n) + what + "." + std::string(key) + ": " + std::to_string(v) + " is out of range " +
                                  std::to_string(lo) + ".." + std::to_string(hi));
  return std::optional<double>(v);
}

}  // namespace physr::toml_fields
