// Dense matrix products on the device through cuBLASLt (no GEMM of our own): the model's
// projections y [M, N] = x [M, K] . W^T (+ bias [N]) (+ beta * y), with x row-major and W
// row-major [N, K] as PyTorch's nn.Linear stores it (out_features x in_features), the same
// convention as the CPU's rf::gemm (native/kernels/gemm.h). The output is f32 (matmul_bf16:
// bf16).
//
// Built into rf_cuda only where cuBLASLt is found (RF_HAVE_CUBLASLT); elsewhere CMake compiles
// gemm.cu against the declarations in native/cuda/check/ so that it still has to compile, but
// links nothing from it. This header needs no cuBLAS header: the handle lives behind GemmContext.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/dtype.h"

namespace rf::cuda {

// Counters of one GemmContext, for tests and logs.
struct GemmStats {
  long calls = 0;        // matmul calls that ran a product (M, N > 0)
  long plans = 0;        // heuristic queries: one per distinct (shape, types, alignments, bias) seen
  long bias_kernel = 0;  // calls whose bias was added by our kernel instead of the cuBLASLt epilogue
};

// Row strides, in elements, of a product's row-major operands, for views into wider buffers (a
// slice of columns of a fused projection's rows): x's, w's and y's as each function below names
// them. 0: dense (the row length the shapes give).
struct Strides {
  long x = 0, w = 0, y = 0;
};

// A cuBLASLt handle, a device workspace (cuBLASLt wants one on Hopper: its fastest kernels for
// large shapes split K or run stream-K and keep partial sums there) and the plans already chosen:
// per (M, N, K, dtypes, pointer alignments, bias mode) the descriptors and the heuristic's
// algorithm, so a repeated shape (every layer of every decode step) pays the heuristic once.
// Bound to the device current at construction. Not thread-safe, and calls must be ordered on the
// device (one stream, or streams that are synchronized with each other): they share the
// workspace.
class GemmContext {
 public:
  static constexpr size_t kDefaultWorkspace = size_t(32) << 20;  // 32 MiB

  // Throws std::runtime_error when the handle or the workspace cannot be made.
  explicit GemmContext(size_t workspace_bytes = kDefaultWorkspace);
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  const GemmStats& stats() const;

  struct Impl;  // gemm.cu

 private:
  std::unique_ptr<Impl> impl_;
  friend void matmul(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N,
                     int K, const float* bias, float beta, cudaStream_t stream, Strides strides, const float* c);
  friend void matmul_bf16(GemmContext& ctx, __nv_bfloat16* y, const void* x, DType x_type, const void* w, DType w_type, int M,
                          int N, int K, cudaStream_t stream, Strides strides);
  friend void matmul_nn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N,
                        int K, float beta, cudaStream_t stream, Strides strides);
  friend void matmul_tn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N,
                        int K, float alpha, float beta, cudaStream_t stream, Strides strides);
};

// y [M, N] = x [M, K] . w^T + bias [N] (when non-null) + beta * y, all row-major, on `stream`.
// Supported: x f32 with w f32 (f32 products and f32 sums: CUBLAS_COMPUTE_32F, never TF32), and x
// bf16 with w bf16 (bf16 products summed in f32, f32 output): convert f32 activations with
// f32_to_bf16 below first. Any other pair throws. beta == 0: y is write-only (its old contents,
// NaN included, are not read). K == 0: y = bias + beta * y. M or N == 0: nothing.
// Pointers are device memory and may be views into larger buffers: each plan is chosen for the
// alignment its pointers have (tested down to 4 bytes for f32 and 16 bytes for bf16; a bias
// under 16 bytes aligned is added by a separate kernel). Every CUDA and cuBLASLt status is
// checked: failures throw std::runtime_error naming the call and the status. strides: rows of x,
// W and y further apart than K, K and N (each at least that; a smaller one throws). c (optional):
// beta's operand when it is not y, y = x . w^T + bias + beta * c (cuBLASLt's C apart from its D),
// with y's strides; it must be y itself or not overlap it. A residual stream's sum into a buffer
// of its own, y = c + x w^T, then needs no copy of c first.
void matmul(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
            const float* bias, float beta, cudaStream_t stream, Strides strides = {}, const float* c = nullptr);

// y [M, N] = x [M, K] . w^T with y in bf16: x and w bf16, the products summed in f32 and the sum
// rounded once to bf16 (to nearest even), for a product whose only reader takes bf16 (the
// SwiGLU's gate|up rows): half the bytes of an f32 y to write and to read back. No bias and no
// beta (y is written). Same checks, strides and plan cache as matmul; other types throw.
void matmul_bf16(GemmContext& ctx, __nv_bfloat16* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N,
                 int K, cudaStream_t stream, Strides strides = {});

// y [M, N] = x [M, K] . w [K, N] + beta * y, w row-major [K, N] (not transposed): products back
// through a weight stored [out, in], e.g. the gradient dh = dz . W of logits z = h . W^T. Same
// types, checks, strides and plan cache as matmul; no bias.
void matmul_nn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
               float beta, cudaStream_t stream, Strides strides = {});

// y [M, N] = alpha x^T . w + beta * y with x row-major [K, M] and w row-major [K, N]: weight
// gradients, dW [out, in] = dy^T x summed over the K rows of a batch (dy [K, out], x [K, in]).
// Same types, checks, strides and plan cache as matmul; no bias.
void matmul_tn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
               float alpha, float beta, cudaStream_t stream, Strides strides = {});

// out [n] = in [n] rounded to bf16, to nearest even, NaN kept NaN (quieted): bit for bit the
// CPU's rf::f32_to_bf16 (native/core/dtype.h), so the device's bf16 activations are the CPU's.
void f32_to_bf16(__nv_bfloat16* out, const float* in, long n, cudaStream_t stream);

}  // namespace rf::cuda
