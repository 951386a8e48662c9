// The softmax numerators of one query row, shared by attention_row and its backward so that
// the backward recomputes exactly the probabilities the forward used.
#pragma once
#include "kernels/ops.h"

namespace rf {
namespace RF_ISA {

// scores [n_keys] = exp(scale * q.k_j - max_j), k_j = k + j * kv_stride; returns their sum.
static inline float attention_scores(const float* q, const float* k, long kv_stride, int n_keys, int head_dim,
                                     float scale, float* scores) {
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
  return exp_shift(scores, n_keys, max_score);
}

}  // namespace RF_ISA
}  // namespace rf
