// Warp-level bf16 tensor-core products (PTX mma.sync.m16n8k16, sm_80 and later) for the
// attention kernels, with the fragment layout spelled out, since the kernels place their data in
// it directly (no ldmatrix). Lane = 4 g + t (g = lane / 4 in 0..7, t = lane % 4 in 0..3):
//   A, 16 x 16 (row-major rows m, k):  a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                                      a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B, 16 x 8 (k, column n):           b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   C / D, 16 x 8 f32:                 c[0..1] = C[g][2t, 2t+1] c[2..3] = C[g+8][2t, 2t+1]
// Each 32-bit register holds two bf16, the lower-indexed element in the low half. An f32
// accumulator tile pair C[0..15][0..7], C[0..15][8..15] is thus, rounded and packed, the A
// fragment of the next product (softmax probabilities times values, as flash-attention does).
// Under the CPU emulation (native/tests/emulate) the product is computed from the 32 lanes'
// registers by this same layout, so a kernel that misplaces an element fails there too.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// Two floats rounded to bf16 (nearest even) in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) | (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Two consecutive bf16 (4-byte aligned) as one register.
__device__ __forceinline__ uint32_t load_bf16x2(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// The A fragment of rows [row0, row0 + 16), k-step kk, from row-major bf16 memory (k along the row).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* m, int stride, int row0, int kk, int g, int t) {
  const __nv_bfloat16* p = m + (row0 + g) * stride + kk * 16 + 2 * t;
  a[0] = load_bf16x2(p);
  a[1] = load_bf16x2(p + 8 * stride);
  a[2] = load_bf16x2(p + 8);
  a[3] = load_bf16x2(p + 8 * stride + 8);
}

// The B fragment of columns [n0, n0 + 8), k-step kk, from memory holding B^T row-major (row n,
// k along the row): K for S = Q K^T, a transposed tile for products along keys or queries.
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const __nv_bfloat16* m, int stride, int n0, int kk, int g, int t) {
  const __nv_bfloat16* p = m + (n0 + g) * stride + kk * 16 + 2 * t;
  b[0] = load_bf16x2(p);
  b[1] = load_bf16x2(p + 8);
}

// Row g + 8 half of kN accumulator tiles (16 x 8 each, side by side) into dst[0 .. 8 kN), times scale.
template <int kN>
__device__ __forceinline__ void store_accumulator_row(float* dst, const float (&c)[kN][4], int half, float scale, int t) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    dst[8 * n + 2 * t] = c[n][2 * half] * scale;
    dst[8 * n + 2 * t + 1] = c[n][2 * half + 1] * scale;
  }
}

// The A fragment (16 rows x 16 k) made of two f32 accumulator tiles, c0 holding k 0..7 and c1
// k 8..15, rounded to bf16: probabilities straight into the next product.
__device__ __forceinline__ void a_from_accumulators(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16x2(c0[0], c0[1]);
  a[1] = pack_bf16x2(c0[2], c0[3]);
  a[2] = pack_bf16x2(c1[0], c1[1]);
  a[3] = pack_bf16x2(c1[2], c1[3]);
}

// d += A B for one warp (every lane calls it with its fragments; see the layout above).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef RF_CUDA_EMULATION
  emu_mma_bf16_16816(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace rf::cuda
