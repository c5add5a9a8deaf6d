// The real sysfs snapshots of tests/data/sysfs/, extracted once per build tree into
// PHYSR_SYSFS_SNAPSHOTS by tests/support/sysfs_snapshots.sh: ctest runs it before the
// tests that read them (the sysfs_snapshots fixture); a test program started by hand
// runs it itself when the folder is not there yet.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace physr::test {

inline const std::filesystem::path& sysfs_snapshots() {
  static const std::filesystem::path dir = [] {
    const std::filesystem::path d = PHYSR_SYSFS_SNAPSHOTS;
    if (!std::filesystem::exists(d / ".stamp")) {
      const std::string cmd = "bash '" PHYSR_SOURCE_DIR "/tests/support/sysfs_snapshots.sh' '" PHYSR_SOURCE_DIR
                              "/tests/data/sysfs' '" + d.string() + "'";
      if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "failed: %s\n", cmd.c_str());
    }
    return d;
  }();
  return dir;
}

}  // namespace physr::test
