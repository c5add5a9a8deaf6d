// Built-in machine files (machines/*.toml), embedded at build time.
#pragma once

#include <string_view>
#include <vector>

namespace physr::cli {
struct BuiltinFile {
  std::string_view name;
  std::string_view text;
};
extern const std::vector<BuiltinFile> kBuiltinMachines;
}  // namespace physr::cli
