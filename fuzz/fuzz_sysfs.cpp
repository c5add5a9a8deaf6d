// Fuzzes the sysfs loader over a small tree the input describes: records of
// [op][name byte][len][bytes] make function directories (nested or not) and write their
// attribute files (vendor, device, class, config, resource, numa_node, link files).
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "physr/pci.hpp"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const fs::path root = fs::temp_directory_path() / ("physr-fuzz-sysfs-" + std::to_string(::getpid()));
  static const char* const files[] = {"vendor", "device", "class", "config", "resource", "numa_node",
                                      "current_link_speed", "current_link_width"};
  fs::remove_all(root);
  const fs::path top = root / "sys/devices/pci0000:00";
  fs::create_directories(top);
  std::vector<fs::path> stack{top};
  size_t i = 0;
  int dirs = 0;
  while (i + 3 <= size && dirs < 32) {
    const uint8_t op = data[i], name = data[i + 1];
    const size_t len = data[i + 2];
    i += 3;
    const size_t take = len < size - i ? len : size - i;
    const std::string bytes(reinterpret_cast<const char*>(data + i), take);
    i += take;
    switch (op % 4) {
      case 0: {  // a function directory below the current one
        char buf[32];
        std::snprintf(buf, sizeof buf, "0000:%02x:%02x.%x", name, name & 0x1f, name & 7);
        fs::create_directories(stack.back() / buf);
        stack.push_back(stack.back() / buf);
        ++dirs;
        break;
      }
      case 1:
        if (stack.size() > 1) stack.pop_back();
        break;
      default:
        if (stack.size() > 1) std::ofstream(stack.back() / files[name % 8], std::ios::binary) << bytes;
    }
  }
  auto t = physr::pci::load_sysfs(root);
  if (t) {
    auto e = physr::pci::P2PEngine::create(*t);
    if (!e) __builtin_trap();
    for (uint32_t p = 0; p < t->functions.size(); ++p)
      for (uint32_t c = 0; c < t->functions.size(); ++c) (void)e->verdict(p, c);
  } else if (t.error().message.find(root.string()) == std::string::npos &&
             t.error().message.find("config space") == std::string::npos) {
    __builtin_trap();  // errors name the file (or say what was wrong with config bytes)
  }
  return 0;
}
