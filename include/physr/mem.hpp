// physr mem: the memory layer between platform and sim. This header gathers its parts:
//   physr/mem/uspace.hpp  process address spaces, host pages, P2P VMAs, pinning
//   physr/mem/block.hpp   the block layer model: bios, requests, O_DIRECT
#pragma once

#include "physr/mem/block.hpp"
#include "physr/mem/uspace.hpp"
