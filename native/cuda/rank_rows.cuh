// The pieces the kernels that add an adapter's low-rank product as they stream a matrix share
// (swiglu_rows, swiglu_backward_rows, lora_up_dropout_add): a tile of rows of u or du [rows, rank]
// in shared memory, zero past the rank, a thread's row of B in registers, and one row's k-ordered
// fused sum with a thread's column of B or A. One definition, so the kernels that must give each
// other's bits (the SwiGLU backward's down-adapter term and lora_up_dropout_add; its gate|up
// terms and swiglu_rows') run the same arithmetic.
#pragma once
#include <cuda_runtime.h>

namespace rf::cuda {

// tile [TROWS][KMAX / 4] = rows r0 .. r0 + n_rows of m [*, rank] (rank <= KMAX), zeros past the
// rank and past n_rows; the block's threads share the copy (the caller syncs around it).
template <int KMAX, int TROWS>
__device__ __forceinline__ void load_rank_rows(float4 (*tile)[KMAX / 4], const float* m, int rank, long r0, int n_rows) {
  for (int e = threadIdx.x; e < TROWS * KMAX; e += blockDim.x) {
    const int r = e / KMAX, k = e % KMAX;
    reinterpret_cast<float*>(&tile[r][0])[k] = m && r < n_rows && k < rank ? m[(r0 + r) * rank + k] : 0.f;
  }
}

// w = row c of m [*, rank] (rank <= KMAX), zeros past the rank, all zeros when m is null or the
// thread's column is not live: a thread's row of an adapter's B in registers.
template <int KMAX>
__device__ __forceinline__ void load_rank_row(float (&w)[KMAX], const float* m, int rank, long c, bool live) {
#pragma unroll
  for (int k = 0; k < KMAX; ++k) w[k] = live && m && k < rank ? m[c * rank + k] : 0.f;
}

// sum over k < KMAX of row[k] w[k], in k order with fused multiply-adds (the zero padding past
// the rank adds exact zeros).
template <int KMAX>
__device__ __forceinline__ float rank_dot(const float4* row, const float (&w)[KMAX]) {
  float acc = 0.f;
#pragma unroll
  for (int k4 = 0; k4 < KMAX / 4; ++k4) {
    const float4 q = row[k4];
    acc = fmaf(q.x, w[4 * k4], acc);
    acc = fmaf(q.y, w[4 * k4 + 1], acc);
    acc = fmaf(q.z, w[4 * k4 + 2], acc);
    acc = fmaf(q.w, w[4 * k4 + 3], acc);
  }
  return acc;
}

}  // namespace rf::cuda
