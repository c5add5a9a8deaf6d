// physr: DMA to memory without struct page. Parses arguments and dispatches to commands.
#include <fmt/core.h>

#include <new>

#include "cli.hpp"

int main(int argc, char** argv) {
  using namespace physr::cli;
  CLI::App app{"physr: DMA to memory that has no struct page (range lists, P2P verdicts, DMA mapping)", "physr"};
  app.set_version_flag("--version", std::string("physr ") + PHYSR_VERSION);
  app.require_subcommand(0, 1);
  // CLI11's own errors (unknown option, missing argument, a failed check) in physr's form.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return std::string("physr: error: ") + e.what() + "\nRun with --help for usage.\n";
  });
  add_ranges_command(app);
  add_topo_commands(app);
  add_map_command(app);
  add_sim_command(app);
  add_p2pmem_command(app);
  add_doctor_command(app);
  add_qemu_command(app);
  try {
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      const int rc = app.exit(e);  // prints help, version or the parse error
      return rc == 0 ? 0 : kExitUsage;
    }
    if (app.get_subcommands().empty()) run_tour();
  } catch (const UsageError& e) {
    fmt::print(stderr, "physr: error: {}\nRun with --help for usage.\n", e.what());
    return kExitUsage;
  } catch (const Failure& e) {
    fmt::print(stderr, "physr: error: {}\n", e.what());
    return kExitFailure;
  } catch (const std::bad_alloc&) {
    const std::string what = app.get_subcommands().empty() ? "the tour" : "physr " + app.get_subcommands().front()->get_name();
    fmt::print(stderr, "physr: error: ENOMEM: out of memory while running {} (a smaller input, or a higher memory limit)\n", what);
    return kExitFailure;
  } catch (const std::exception& e) {
    fmt::print(stderr, "physr: error: {}\n", e.what());
    return kExitFailure;
  }
  return 0;
}
