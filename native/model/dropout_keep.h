// The keep decision of LoRA dropout for one element, reproducible in the backward pass: splitmix64
// of the element's coordinates (a counter-based generator, so the backward regenerates the same
// mask without storing it), compared in double. One definition for the CPU trainer and, compiled
// by nvcc as host and device code, for the CUDA kernels that apply the mask as they read
// (cuda/train_ops.cu, cuda/ops_backward.cu), so both backends drop the same elements.
#pragma once
#include <cstdint>

#include "core/host_device.h"

namespace rf {

RF_HOST_DEVICE inline bool dropout_keep(uint64_t seed, int layer, int adapter, long row, long col, float p) {
  uint64_t z = seed ^ (uint64_t(layer) << 48) ^ (uint64_t(adapter) << 40) ^ (uint64_t(row) << 20) ^ uint64_t(col);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * (1.0 / 9007199254740992.0) >= double(p);
}

}  // namespace rf
