#include "kernels/ops.h"
#include "kernels/attention_scores.h"

namespace rf {
namespace RF_ISA {

void attention_row(float* out, const float* q, const float* k, const float* v, long kv_stride,
                   int n_keys, int head_dim, float scale, float* scores) {
  // softmax in f32 with max subtraction (transformers upcasts the softmax to f32; we are f32 throughout)
  const float sum = attention_scores(q, k, kv_stride, n_keys, head_dim, scale, scores);
  const float inv = 1.0f / sum;
  // out [head_dim] = sum_j p_j v_j
#pragma omp simd
  for (int d = 0; d < head_dim; ++d) out[d] = 0.f;
  for (int j = 0; j < n_keys; ++j) {
    const float p = scores[j] * inv;
    const float* vj = v + j * kv_stride;
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) out[d] += p * vj[d];
  }
}

}  // namespace RF_ISA
}  // namespace rf
