// What uspace.cpp and pin.cpp share: the state of one P2P chunk.
#pragma once

#include <cstdint>
#include <vector>

#include "physr/mem/uspace.hpp"

namespace physr::mem {

/// A chunk of a P2P pool mapped by one mmap: pins per page (ZONE_DEVICE pages are order
/// 0), pages still mapped, pages pinned. Released to its source when both counts are zero.
struct AddressSpace::Chunk {
  P2PChunkSource* source = nullptr;
  P2PChunk c;
  std::vector<uint32_t> pins;
  uint64_t mapped = 0;
  uint64_t pinned = 0;
};

}  // namespace physr::mem
