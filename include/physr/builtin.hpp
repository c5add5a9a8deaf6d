// physr builtin: the machine files (machines/*.toml) and scenarios (scenarios/*.toml) built
// into the library, so they work from an installed library or binary without the source
// tree. Only their text lives here; pci::load_builtin_machine() and sim::load_scenario()
// parse them.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace physr {

/// One embedded file: its name (the file name without `.toml`) and its text.
struct BuiltinFile {
  std::string_view name;
  std::string_view text;
};

/// The machine a scenario runs on when it names none, and the one the tool shows first.
inline constexpr std::string_view kDefaultMachine = "two-socket-switch";
/// The scenario `physr sim` runs when given none.
inline constexpr std::string_view kDefaultScenario = "flagship";

/// The built-in machines (machines/*.toml), sorted by name.
std::span<const BuiltinFile> builtin_machines() noexcept;
/// The built-in scenarios (scenarios/*.toml), sorted by name.
std::span<const BuiltinFile> builtin_scenarios() noexcept;
/// The text of the built-in machine or scenario `name`, or nullopt when there is none.
std::optional<std::string_view> builtin_machine_text(std::string_view name) noexcept;
std::optional<std::string_view> builtin_scenario_text(std::string_view name) noexcept;
/// "amd-zen, two-socket-switch, ...": the names, for messages.
std::string builtin_machine_names();
std::string builtin_scenario_names();

}  // namespace physr
