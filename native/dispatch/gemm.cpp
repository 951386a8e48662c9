// rf::pack_weight / packed_row / gemm: forward to the kernels of the active instruction set.
#include "kernels/gemm.h"

#include "core/cpu.h"

namespace rf {

void pack_weight(PackedWeight& dst, const void* src, SrcType src_type, int N, int K, bool src_is_kn,
                 DType dtype) {
  if (active_isa() == Isa::avx512)
    avx512::pack_weight(dst, src, src_type, N, K, src_is_kn, dtype);
  else
    avx2::pack_weight(dst, src, src_type, N, K, src_is_kn, dtype);
}

void packed_row(const PackedWeight& W, int n, float* out) {
  if (active_isa() == Isa::avx512)
    avx512::packed_row(W, n, out);
  else
    avx2::packed_row(W, n, out);
}

void gemm(ThreadPool& pool, int M, const float* A, long lda, const PackedWeight& W, const float* bias,
          float* C, long ldc, bool accumulate) {
  if (active_isa() == Isa::avx512)
    avx512::gemm(pool, M, A, lda, W, bias, C, ldc, accumulate);
  else
    avx2::gemm(pool, M, A, lda, W, bias, C, ldc, accumulate);
}

}  // namespace rf
