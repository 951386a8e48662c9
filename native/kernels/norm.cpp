#include <cmath>

#include "kernels/ops.h"

namespace rf {
namespace RF_ISA {

void rmsnorm_forward(float* out, const float* x, const float* w, int n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

void layernorm_forward(float* out, const float* x, const float* w, const float* b, int n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / float(n);
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

}  // namespace RF_ISA
}  // namespace rf
