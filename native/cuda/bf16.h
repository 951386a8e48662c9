// f32 -> bf16 on the device as the CPU rounds (rf::f32_to_bf16, native/core/dtype.h): to nearest
// even on the bit pattern, NaN kept NaN (quieted). One definition for every kernel that writes
// bf16 activations (f32_to_bf16, and the norms and SwiGLU that write their output twice), so a
// fused kernel's bf16 output is the bits the separate conversion would give.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

__device__ __forceinline__ uint32_t bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ __nv_bfloat16 bf16_round(float f) {
  __nv_bfloat16_raw r;
  r.x = (unsigned short)bf16_bits(f);
  return __nv_bfloat16(r);
}

// An activation as f32, whether kept in f32 or bf16 (exact: bf16 widens by a shift), so one
// kernel template reads either and computes the same bits from the same values.
__device__ __forceinline__ float as_f32(float v) { return v; }
__device__ __forceinline__ float as_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace rf::cuda
