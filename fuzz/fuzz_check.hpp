// CHECK for fuzz targets: an invariant that fails prints itself and traps, so libFuzzer
// records the input as a crash.
#pragma once

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      __builtin_printf("invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);   \
      __builtin_trap();                                                               \
    }                                                                                 \
  } while (0)
