// rf::pack_weight_transposed / gemm_{nt,nn,tn}_f32: forward to the kernels of the active instruction set.
#include "kernels/gemm_backward.h"

#include "core/cpu.h"

namespace rf {

static bool use_avx512() {
  static const bool yes = active_isa() == Isa::avx512;
  return yes;
}

void pack_weight_transposed(PackedWeight& dst, const PackedWeight& src) {
  return use_avx512() ? avx512::pack_weight_transposed(dst, src) : avx2::pack_weight_transposed(dst, src);
}

#define RF_FORWARD_GEMM(name)                                                                          \
  void name(ThreadPool& pool, int M, int N, int K, const float* A, long lda, const float* B, long ldb, \
            float* C, long ldc, bool accumulate) {                                                     \
    return use_avx512() ? avx512::name(pool, M, N, K, A, lda, B, ldb, C, ldc, accumulate)              \
                        : avx2::name(pool, M, N, K, A, lda, B, ldb, C, ldc, accumulate);               \
  }

RF_FORWARD_GEMM(gemm_nt_f32)
RF_FORWARD_GEMM(gemm_nn_f32)
RF_FORWARD_GEMM(gemm_tn_f32)

#undef RF_FORWARD_GEMM

}  // namespace rf
