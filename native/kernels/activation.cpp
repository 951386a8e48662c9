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

float row_max(const float* z, int n) {
  float mx = z[0];
  // A vector max reduction: the scalar loop is one dependent compare per element.
#pragma omp simd reduction(max : mx)
  for (int i = 1; i < n; ++i) mx = z[i] > mx ? z[i] : mx;
  return mx;
}

float sum_exp(const float* z, int n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) sum += exp_f32(z[i] - shift);
  return sum;
}

float exp_shift(float* z, int n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) {
    const float e = exp_f32(z[i] - shift);
    z[i] = e;
    sum += e;
  }
  return sum;
}

float logsumexp(const float* z, int n) {
  const float mx = row_max(z, n);
  return mx + __builtin_logf(sum_exp(z, n, mx));
}

void softmax_scale(float* z, int n, float lse, float scale) {
#pragma omp simd
  for (int i = 0; i < n; ++i) z[i] = scale * exp_f32(z[i] - lse);
}

void add_forward(float* y, const float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace RF_ISA
}  // namespace rf
