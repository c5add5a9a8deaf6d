// Built-in machine files (machines/*.toml) and scenarios (scenarios/*.toml), embedded at build time.
#pragma once

#include <string_view>
#include <vector>

namespace physr::cli {
struct BuiltinFile {
  std::string_view name;
  std::string_view text;
};
extern const std::vector<BuiltinFile> kBuiltinMachines;
extern const std::vector<BuiltinFile> kBuiltinScenarios;  // scenarios/*.toml
}  // namespace physr::cli
