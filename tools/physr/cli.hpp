// Shared pieces of the physr command-line tool: exit codes and how commands fail.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "physr/core.hpp"
#include "physr/pci.hpp"
#include "physr/sim.hpp"

namespace physr::cli {

inline constexpr int kExitFailure = 1;  // the command ran and failed (bad file, no such device)
inline constexpr int kExitUsage = 2;    // the command line itself is wrong

/// Thrown by a command for a bad argument value; main() prints it and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
/// Thrown by a command that could not do its job; main() prints it and exits 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// CLI11 check for options naming a file, folder or machine: an empty value is a mistake
/// (an unset shell variable), not a request for the default.
inline const CLI::Validator kNonEmpty(
    [](std::string& v) { return v.empty() ? std::string("empty argument") : std::string(); }, "", "NONEMPTY");

/// CLI11 check for unsigned options: CLI11 converts "-1" to an unsigned type by wrapping
/// (to 2^64 - 1); a minus sign is refused instead.
inline const CLI::Validator kNonNegative(
    [](std::string& v) {
      const size_t i = v.find_first_not_of(" \t");
      return i != std::string::npos && v[i] == '-' ? std::string("must not be negative, got ") + v : std::string();
    },
    "", "NONNEGATIVE");

/// The value of r, or a UsageError carrying its message (for values parsed from arguments).
template <class T>
T usage_value(Result<T> r) {
  if (!r) throw UsageError(r.error().message);
  return std::move(r).value();
}
/// The size `text` given to `option` ("64K"), or a UsageError naming the option and the cause.
inline uint64_t size_arg(std::string_view option, const std::string& text) {
  auto v = parse_size(text);
  if (!v) throw UsageError(std::string(option) + ": " + v.error().message);
  return *v;
}
/// The value of r, or a Failure carrying its message.
template <class T>
T failure_value(Result<T> r) {
  if (!r) throw Failure(r.error().to_string());
  return std::move(r).value();
}

/// Nothing, or a Failure carrying s's message.
inline void failure_check(const Status& s) {
  if (!s) throw Failure(s.error().to_string());
}

/// `j` as JSON text, `indent` spaces per level. Names and file contents need not be UTF-8
/// (a Latin-1 file name, a cpuinfo byte): invalid UTF-8 becomes U+FFFD instead of an error.
inline std::string json_text(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

void add_ranges_command(CLI::App& app);
/// `physr topo` and `physr explain`.
void add_topo_commands(CLI::App& app);
/// The topology --machine names (pci::load_machine: a sysfs snapshot, a TOML file or a
/// built-in machine); a Failure naming the argument otherwise. The loader's warnings go to
/// stderr.
pci::Topology load_machine_arg(const std::string& machine);
/// Prints warnings to stderr, one "physr: warning: ..." line each.
void print_warnings(const std::vector<std::string>& warnings);
/// How an explanation was asked for, for its output: where its rules come from, and the
/// command that repeats it (without --assume-acs-off) with the ports already assumed off,
/// so the what-if hint is a command that runs when pasted.
struct ExplainContext {
  std::string rules_from = "the engine's kernel release";
  std::string command;  // "physr explain A B --machine M", shell-quoted; empty: the hint names only the option
  std::string acs_off;  // --assume-acs-off as given (empty: none)
};
/// What `physr explain` prints for (provider, client): the path hop by hop, ACS, the CPU
/// and allowlist rules, the verdict, the link class and the kernel parameter that would help.
void print_explanation(const pci::Topology& t, const pci::P2PEngine& e, uint32_t provider, uint32_t client,
                       const ExplainContext& how = {});
/// `arg` quoted for a POSIX shell when it holds anything but letters, digits and _ . / : , = + - @ %.
std::string shell_quote(std::string_view arg);
/// `physr p2pmem-test`.
void add_p2pmem_command(CLI::App& app);
/// `physr doctor`.
void add_doctor_command(CLI::App& app);
/// `physr map`.
void add_map_command(CLI::App& app);
/// `physr sim`.
void add_sim_command(CLI::App& app);
/// `physr qemu`.
void add_qemu_command(CLI::App& app);

/// The default job: what physr is and a short demonstration of each module.
void run_tour();

}  // namespace physr::cli
