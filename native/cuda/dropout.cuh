// LoRA dropout's mask on the device: rf::dropout_keep (native/model/model.cpp), splitmix64 of the
// element's coordinates compared in double as there, so the GPU drops the CPU's elements. One
// definition for every kernel that applies the mask as it reads (train_ops.cu, ops_backward.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace rf::cuda {

__device__ __forceinline__ bool keep_element(uint64_t seed, int layer, int adapter, long row, long col, float p) {
  uint64_t z = seed ^ (uint64_t(layer) << 48) ^ (uint64_t(adapter) << 40) ^ (uint64_t(row) << 20) ^ uint64_t(col);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * (1.0 / 9007199254740992.0) >= double(p);
}

}  // namespace rf::cuda
