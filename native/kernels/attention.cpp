#include "kernels/ops.h"
#include "kernels/vmath.h"

namespace rf {
namespace RF_ISA {

void attention_row(float* out, const float* q, const float* k, const float* v, long kv_stride,
                   int n_keys, int head_dim, float scale, float* scores) {
  // scores [n_keys] = scale * q . k_j
  float max_score = -3.0e38f;
  for (int j = 0; j < n_keys; ++j) {
    const float* kj = k + j * kv_stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < head_dim; ++d) s += q[d] * kj[d];
    s *= scale;
    scores[j] = s;
    max_score = s > max_score ? s : max_score;
  }
  // softmax with max subtraction (transformers upcasts the softmax to f32; we are f32 throughout)
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n_keys; ++j) {
    const float e = exp_f32(scores[j] - max_score);
    scores[j] = e;
    sum += e;
  }
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
