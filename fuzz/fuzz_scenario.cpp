// Scenario files: any text either parses into a scenario whose jobs satisfy the documented
// limits, or fails with EINVAL naming the source; never a crash or a hang.
#include <string_view>

#include "fuzz_check.hpp"
#include "physr/sim.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace physr;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto r = sim::parse_scenario(text, "fuzz.toml");
  if (!r) {
    CHECK(r.error().code == EINVAL);
    CHECK(r.error().message.rfind("fuzz.toml", 0) == 0);
    return 0;
  }
  CHECK(!r->jobs.empty());
  for (const sim::JobSpec& j : r->jobs) {
    CHECK(j.block_size != 0 && (j.block_size % 512 == 0 || !j.peer.empty()) && j.block_size <= 4 * MiB);
    CHECK(j.queue_depth >= 1 && j.queue_depth <= 1024);
    CHECK(j.size != 0 && j.size % j.block_size == 0);
    CHECK(!j.device.empty());
  }
  CHECK(r->options.ram >= 3 * GiB);
  return 0;
}
