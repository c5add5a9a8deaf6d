// The files cmake/Embed.cmake embeds (generated builtin_machines.cpp, builtin_scenarios.cpp).
// Private to the builtin module.
#pragma once

#include <span>

#include "physr/builtin.hpp"

namespace physr::data {
extern const std::span<const BuiltinFile> kMachines;   // machines/*.toml
extern const std::span<const BuiltinFile> kScenarios;  // scenarios/*.toml
}  // namespace physr::data
