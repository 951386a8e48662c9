// The device AdamW and gradient norm (native/cuda/optim.h) against the CPU trainer's arithmetic,
// on a GPU machine (elsewhere "no CUDA device visible; skipped", exit 0).
//  - AdamW: 3 steps on 100003 elements with clipping, decay and bias correction: w, m, v equal the
//    reference bit for bit (the device avoids fused multiply-adds, as the CPU build does), g zeroed.
//    The reference is adamw_body of native/model/train.cpp, restated here: a change there must
//    change it here too (the CPU trainer's own tests pin that arithmetic).
//  - AdamW over a flat array of tensors in one launch (adamw_tensors): 5 tensors (one empty) with
//    decay on some, 3 steps (no clipping; a norm under the clip; a norm over it, the factor made on
//    the device from sum_squares_async's result): bit for bit the reference per tensor, with the
//    factor the host makes from the same norm.
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

  // adamw_tensors over 5 tensors in one flat array.
  {
    const std::vector<long> sizes = {1000, 0, 257, 50000, 3};
    const std::vector<int32_t> decay = {1, 0, 1, 0, 1};
    std::vector<long> end;
    long total = 0;
    for (long sz : sizes) end.push_back(total += sz);
    std::vector<float> tw = rf::test::randn(rng, size_t(total), 1.f), tm1(size_t(total), 0.f), tm2(size_t(total), 0.f);
    float *dtw = up(tw), *dtm1 = up(tm1), *dtm2 = up(tm2), *dtg = nullptr;
    cudaMalloc(&dtg, size_t(total) * sizeof(float));
    long* dend = up(end);
    int32_t* ddecay = up(decay);
    double* sq = nullptr;
    cudaMalloc(&sq, size_t(rf::cuda::sum_squares_scratch()) * sizeof(double));
    bool same = true, cleared = true;
    int clipped = 0;
    for (int t = 1; t <= 3; ++t) {
      std::vector<float> g = rf::test::randn(rng, size_t(total), 0.02f * float(t));
      cudaMemcpy(dtg, g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice);
      const double norm = std::sqrt(rf::cuda::sum_squares(dtg, total, sq, nullptr));
      const float clip_norm = t == 1 ? 0.f : t == 2 ? float(2 * norm) : float(norm / 3);
      const float clip = clip_norm > 0.f && norm > clip_norm ? float(clip_norm / (norm + 1e-6)) : 1.f;
      clipped += clip != 1.f;
      const rf::cuda::AdamWTensorsParams p{1e-3f, 0.9f, 0.999f, 1e-8f, 1e-3f * 0.1f, clip_norm, 1.0 - std::pow(0.9, t),
                                           1.0 - std::pow(0.999, t)};
      for (size_t k = 0; k < sizes.size(); ++k) {
        const long off = end[k] - sizes[k];
        const rf::cuda::AdamWStepParams a{p.lr, p.beta1, p.beta2, p.eps, decay[k] ? p.decay : 0.f, clip, p.bc1, p.bc2};
        adamw_reference(tw.data() + off, g.data() + off, tm1.data() + off, tm2.data() + off, sizes[k], a);
      }
      rf::cuda::sum_squares_async(dtg, total, sq, nullptr);
      rf::cuda::adamw_tensors(dtw, dtg, dtm1, dtm2, {dend, ddecay, int(sizes.size()), total}, p, rf::cuda::sum_squares_result(sq),
                              nullptr);
      same &= same_bits(down(dtw, size_t(total)), tw) && same_bits(down(dtm1, size_t(total)), tm1) &&
              same_bits(down(dtm2, size_t(total)), tm2);
      for (float v : down(dtg, size_t(total))) cleared &= v == 0.f;
    }
    check(clipped == 1, "adamw_tensors: the third step clips and the others do not");
    check(same, "adamw_tensors: 3 steps over 5 tensors (decay per tensor, clipping on the device) equal the reference bit for bit");
    check(cleared, "adamw_tensors zeroes the gradient");
    for (void* q : {static_cast<void*>(dtw), static_cast<void*>(dtm1), static_cast<void*>(dtm2), static_cast<void*>(dtg),
                    static_cast<void*>(dend), static_cast<void*>(ddecay), static_cast<void*>(sq)})
      cudaFree(q);
  }

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
