// Row reductions in a fixed order (a warp's xor tree, then the block's warps in order), shared by
// the kernels whose results must agree bit for bit: rmsnorm_rows (ops.cu) and the RMSNorm that
// gemv_rows and lora_down_rows apply as they read a row (gemv.cu), each with 256-thread blocks.
#pragma once
#include <cuda_runtime.h>

namespace rf::cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) of one row x [n], by the whole block (thread t squares
// elements t, t + blockDim.x, ...); every thread gets it. The normalized element is then
// w[i] * (x[i] * inv).
__device__ __forceinline__ float rms_inv(const float* x, int n, float eps, float* scratch) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
  return 1.0f / sqrtf(block_sum(ss, scratch) / float(n) + eps);
}

}  // namespace rf::cuda
