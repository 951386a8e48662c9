// Matrix multiply against weights stored as PyTorch nn.Linear does: W [N, K]
// (out_features x in_features), y = x W^T. Weights are packed once at load time
// into panels laid out for the SIMD micro-kernels; activations stay row-major f32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/dtype.h"
#include "core/threadpool.h"

namespace rf {

// A weight matrix W [N, K] packed for gemm(). The layout is private to gemm.cpp and
// the same for every instruction set, so a matrix packed once serves both paths.
struct PackedWeight {
  int N = 0, K = 0;
  DType dtype = DType::f32;
  size_t bytes = 0;                              // size of data
  std::unique_ptr<uint8_t[], void (*)(uint8_t*)> data{nullptr, [](uint8_t*) {}};  // 64-byte aligned
};

}  // namespace rf

// The functions each instruction set implements (native/kernels/gemm.cpp) and
// native/dispatch/gemm.cpp forwards to.
#define RF_DECLARE_GEMM_KERNELS                                                                  \
  /* Packs src, W [N, K] row-major (or [K, N] when src_is_kn, as GPT-2's Conv1D stores it),     \
     of element type src_type, into dst (allocated here) with element type dtype. */            \
  void pack_weight(rf::PackedWeight& dst, const void* src, rf::SrcType src_type, int N, int K,   \
                   bool src_is_kn, rf::DType dtype);                                             \
  /* Copies row n of W (length K) out of the packed layout as f32 (embedding lookup). */         \
  void packed_row(const rf::PackedWeight& W, int n, float* out);                                 \
  /* C [M, N] (row stride ldc) = A [M, K] (row stride lda) . W^T  (+ bias [N] when non-null)    \
     (+ C when accumulate). bf16 weights multiply bf16-rounded activations with f32             \
     accumulation (AVX-512 BF16 vdpbf16ps); the AVX2 path widens bf16 to f32. */                 \
  void gemm(rf::ThreadPool& pool, int M, const float* A, long lda, const rf::PackedWeight& W,     \
            const float* bias, float* C, long ldc, bool accumulate);

namespace rf {
namespace avx2 { RF_DECLARE_GEMM_KERNELS }
namespace avx512 { RF_DECLARE_GEMM_KERNELS }
RF_DECLARE_GEMM_KERNELS  // rf::gemm etc.: dispatch to the active instruction set
}  // namespace rf
