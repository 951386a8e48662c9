// The rotary embedding of one pair on the device, shared by every kernel that rotates (rope_rows
// in ops.cu, kv_append's fused rope in paged_cache.cu), so that both give the same bits.
#pragma once
#include <cuda_runtime.h>

namespace rf::cuda {

// (x1, x2) = (x[i], x[i + head_dim / 2]) turned by the angle whose cos and sin are c and s
// (rotate_half): x1 c - x2 s and x2 c + x1 s, each one fused multiply-add written out, so no
// compiler's choice of contraction changes the result between kernels.
__device__ __forceinline__ void rope_rotate(float& x1, float& x2, float c, float s) {
  const float y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
  const float y2 = __fmaf_rn(x2, c, __fmul_rn(x1, s));
  x1 = y1;
  x2 = y2;
}

}  // namespace rf::cuda
