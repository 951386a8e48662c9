#include "kernels/ops.h"

namespace rf {
namespace RF_ISA {

// transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, where
// rotate_half(x) = cat(-x[half:], x[:half]) and cos/sin repeat the half-size table twice.
void rope_forward(float* x, int n_heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* a = x + long(h) * head_dim;
    float* b = a + half;
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float x1 = a[i], x2 = b[i];
      a[i] = x1 * cos[i] - x2 * sin[i];
      b[i] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

}  // namespace RF_ISA
}  // namespace rf
