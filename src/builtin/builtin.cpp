// Built-in machines and scenarios: lookups over the files cmake/Embed.cmake embeds.
#include "physr/builtin.hpp"

#include "builtin/embedded.hpp"

namespace physr {
namespace {

std::optional<std::string_view> find(std::span<const BuiltinFile> files, std::string_view name) noexcept {
  for (const BuiltinFile& f : files)
    if (f.name == name) return f.text;
  return std::nullopt;
}

std::string names(std::span<const BuiltinFile> files) {
  std::string s;
  for (const BuiltinFile& f : files) {
    if (!s.empty()) s += ", ";
    s += f.name;
  }
  return s;
}

}  // namespace

std::span<const BuiltinFile> builtin_machines() noexcept { return data::kMachines; }
std::span<const BuiltinFile> builtin_scenarios() noexcept { return data::kScenarios; }
std::optional<std::string_view> builtin_machine_text(std::string_view name) noexcept { return find(data::kMachines, name); }
std::optional<std::string_view> builtin_scenario_text(std::string_view name) noexcept { return find(data::kScenarios, name); }
std::string builtin_machine_names() { return names(data::kMachines); }
std::string builtin_scenario_names() { return names(data::kScenarios); }

}  // namespace physr
