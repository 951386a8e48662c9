// The device AdamW and gradient norm (native/cuda/optim.h) against the CPU trainer's arithmetic,
// on a GPU machine (elsewhere "no CUDA device visible; skipped", exit 0).
//  - AdamW: 3 steps on 100003 elements with clipping, decay and bias correction: w, m, v equal the
//    reference bit for bit (the device avoids fused multiply-adds, as the CPU build does), g zeroed.
//    The reference is adamw_body of native/model/train.cpp, restated here: a change there must
//    change it here too (the CPU trainer's own tests pin that arithmetic).
//  - sum of squares: within 1e-12 relative of a double sum, and the same bits on a second call.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "cuda/optim.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;

namespace {

void adamw_reference(float* w, float* g, float* m1, float* m2, long n, const rf::cuda::AdamWStepParams& a) {
  for (long i = 0; i < n; ++i) {
    const float gi = g[i] * a.clip;
    m1[i] = a.beta1 * m1[i] + (1.f - a.beta1) * gi;
    m2[i] = a.beta2 * m2[i] + (1.f - a.beta2) * gi * gi;
    const double mhat = m1[i] / a.bc1, vhat = m2[i] / a.bc2;
    w[i] -= a.decay * w[i];
    w[i] -= float(a.lr * mhat / (std::sqrt(vhat) + a.eps));
    g[i] = 0.f;
  }
}

template <class T>
T* up(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, v.size() * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <class T>
std::vector<T> down(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_optim: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  std::mt19937 rng(3);
  const long n = 100003;
  std::vector<float> w = rf::test::randn(rng, size_t(n), 1.f), m1(static_cast<size_t>(n), 0.f), m2(static_cast<size_t>(n), 0.f);
  float *dw = up(w), *dm1 = up(m1), *dm2 = up(m2), *dg = nullptr;
  cudaMalloc(&dg, size_t(n) * sizeof(float));
  bool equal = true, zeroed = true;
  for (int t = 1; t <= 3; ++t) {
    std::vector<float> g = rf::test::randn(rng, size_t(n), 0.01f * float(t));
    cudaMemcpy(dg, g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice);
    const rf::cuda::AdamWStepParams p{1e-3f, 0.9f, 0.999f, 1e-8f, t == 2 ? 1e-3f * 0.1f : 0.f, t == 3 ? 0.37f : 1.f,
                                      1.0 - std::pow(0.9, t), 1.0 - std::pow(0.999, t)};
    adamw_reference(w.data(), g.data(), m1.data(), m2.data(), n, p);
    rf::cuda::adamw(dw, dg, dm1, dm2, n, p, nullptr);
    equal &= same_bits(down(dw, size_t(n)), w) && same_bits(down(dm1, size_t(n)), m1) && same_bits(down(dm2, size_t(n)), m2);
    for (float v : down(dg, size_t(n))) zeroed &= v == 0.f;
  }
  check(equal, "adamw: 3 steps (decay, clipping, bias correction) equal the CPU's arithmetic bit for bit");
  check(zeroed, "adamw zeroes the gradient");

  const std::vector<float> g = rf::test::randn(rng, size_t(n), 2.f);
  double want = 0;
  for (float v : g) want += double(v) * v;
  float* d = up(g);
  double* scratch = nullptr;
  cudaMalloc(&scratch, size_t(rf::cuda::sum_squares_scratch()) * sizeof(double));
  const double a = rf::cuda::sum_squares(d, n, scratch, nullptr), b = rf::cuda::sum_squares(d, n, scratch, nullptr);
  check(std::fabs(a - want) <= 1e-12 * want, "sum_squares equals a double sum (" + std::to_string(a) + " / " + std::to_string(want) + ")");
  check(std::memcmp(&a, &b, sizeof(double)) == 0, "sum_squares gives the same bits twice");
  for (void* p : {static_cast<void*>(dw), static_cast<void*>(dm1), static_cast<void*>(dm2), static_cast<void*>(dg),
                  static_cast<void*>(d), static_cast<void*>(scratch)})
    cudaFree(p);
  return rf::test::finish("cuda_optim");
}
