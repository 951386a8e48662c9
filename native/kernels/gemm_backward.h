// The matrix products training needs besides the forward gemm (kernels/gemm.h), all on f32
// row-major activations and built on the packed gemm kernel:
//
//   frozen weight W [N, K] (packed, f32 or bf16):  dX [M, K] = dY [M, N] . W
//       -> pack_weight_transposed(WT, W) once, then gemm(pool, M, dY, N, WT, nullptr, dX, K, acc)
//   trainable weight W [N, K] (plain f32, changes every step; LoRA's A and B are such too):
//       forward       Y  [M, N]  = X [M, K] . W^T     gemm_nt_f32
//       input grad    dX [M, K]  = dY [M, N] . W      gemm_nn_f32
//       weight grad   dW [N, K] += dY^T . X           gemm_tn_f32 (reduction over the M rows)
//
// The *_f32 functions pack their right-hand operand into the gemm panel layout on every call
// (O(N K) against O(M N K) multiply-adds), in scratch memory owned by the calling thread that
// grows to the largest operand seen and is kept for later calls. When one output dimension is
// thin (LoRA rank r = 4..64), they compute the transposed product C^T instead if that wastes
// less of the 32-column panels, and add its transpose into C.
#pragma once
#include "core/threadpool.h"
#include "kernels/gemm.h"

#define RF_DECLARE_GEMM_BACKWARD_KERNELS                                                          \
  /* Packs W^T [K, N] from a packed W [N, K] (dst.N = src.K, dst.K = src.N), keeping its dtype  \
     (bf16 values are copied, not re-rounded), so that gemm(pool, M, dY, ldy, dst, nullptr, dX,  \
     ldx, acc) computes dX [M, K] = dY [M, N] . W. Allocates dst. Single-threaded; bytes are    \
     identical to pack_weight of the transposed matrix. */                                        \
  void pack_weight_transposed(rf::PackedWeight& dst, const rf::PackedWeight& src);               \
  /* C [M, N] (+)= A [M, K] . B^T, B [N, K] row-major (row strides lda, ldb, ldc). */             \
  void gemm_nt_f32(rf::ThreadPool& pool, int M, int N, int K, const float* A, long lda,           \
                   const float* B, long ldb, float* C, long ldc, bool accumulate);                \
  /* C [M, N] (+)= A [M, K] . B, B [K, N] row-major. */                                           \
  void gemm_nn_f32(rf::ThreadPool& pool, int M, int N, int K, const float* A, long lda,           \
                   const float* B, long ldb, float* C, long ldc, bool accumulate);                \
  /* C [M, N] (+)= A^T . B with A [K, M], B [K, N] row-major: the sum runs over the K rows. */  \
  void gemm_tn_f32(rf::ThreadPool& pool, int M, int N, int K, const float* A, long lda,           \
                   const float* B, long ldb, float* C, long ldc, bool accumulate);

namespace rf {
namespace avx2 { RF_DECLARE_GEMM_BACKWARD_KERNELS }
namespace avx512 { RF_DECLARE_GEMM_BACKWARD_KERNELS }
RF_DECLARE_GEMM_BACKWARD_KERNELS  // rf::gemm_nt_f32 etc.: dispatch to the active instruction set
}  // namespace rf
