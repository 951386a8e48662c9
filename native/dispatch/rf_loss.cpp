// rf::rf_loss: forwards to the kernels of the active instruction set (see core/cpu.h).
#include "kernels/rf_loss.h"

#include "core/cpu.h"

namespace rf {

RfLossResult rf_loss(ThreadPool& pool, const float* h, int N, const float* h_ref, int Nr, int H,
                     const PackedWeight& W, const float* w_rf, const RfLossRow* rows,
                     const RfLossOptions& options, float* dh, float* dw_rf) {
  if (active_isa() == Isa::avx512)
    return avx512::rf_loss(pool, h, N, h_ref, Nr, H, W, w_rf, rows, options, dh, dw_rf);
  return avx2::rf_loss(pool, h, N, h_ref, Nr, H, W, w_rf, rows, options, dh, dw_rf);
}

}  // namespace rf
