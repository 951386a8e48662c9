#include "kernels/ops.h"
#include "kernels/vmath.h"

namespace rf {
namespace RF_ISA {

void swiglu_forward(float* out, const float* gate, const float* up, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + exp_f32(-g)) * up[i];
  }
}

void gelu_new_forward(float* x, int n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + tanh_f32(k * (v + 0.044715f * v * v * v)));
  }
}

void add_forward(float* y, const float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace RF_ISA
}  // namespace rf
