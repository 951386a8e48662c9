// The counter-based uniform draw of the decode step's sampling, shared by the CPU engine
// (native/model/decode.cpp) and the CUDA pick epilogue (native/cuda/ops.cu), so a seed gives the
// same draw on both backends bit for bit.
#pragma once
#include <cstdint>

#include "core/host_device.h"

namespace rf {

// A uniform draw in [0, 1) from (seed, counter): splitmix64, counter-based so a sequence's
// draws do not depend on the batch it runs in or on how many draws came before.
RF_HOST_DEVICE inline double uniform_draw(uint64_t seed, uint64_t counter) {
  uint64_t z = seed ^ (counter * 0xd1342543de82ef95ull);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace rf
