// Which machine a name means: a sysfs snapshot, a TOML machine file or a built-in machine.
#include <filesystem>

#include "physr/builtin.hpp"
#include "physr/pci.hpp"

namespace physr::pci {

Result<Topology> load_builtin_machine(std::string_view name) {
  const auto text = builtin_machine_text(name);
  if (!text)
    return make_error(ENOENT, "machine '" + std::string(name) + "': no built-in machine of that name (built-in: " +
                                  builtin_machine_names() + ")");
  return parse_machine(*text, "builtin:" + std::string(name));
}

Result<Topology> load_machine(std::string_view spec) {
  const std::filesystem::path path(spec);
  std::error_code ec;
  if (!spec.empty() && std::filesystem::is_directory(path, ec)) return load_sysfs(path);
  if (!spec.empty() && std::filesystem::exists(path, ec)) return load_machine_file(path);
  if (builtin_machine_text(spec)) return load_builtin_machine(spec);
  return make_error(ENOENT, "machine '" + std::string(spec) + "': no such file and no built-in machine of that name (built-in: " +
                                builtin_machine_names() + ")");
}

}  // namespace physr::pci
