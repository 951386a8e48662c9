// The device AdamW and gradient norm (native/cuda/optim.h) against the CPU trainer's arithmetic,
// on a GPU machine (elsewhere "no CUDA device visible; skipped", exit 0).
//  - AdamW (adamw_tensors, every tensor of a flat array in one launch), 3 steps each, w, m, v
//    bit for bit the reference per tensor (the device avoids fused multiply-adds, as the CPU build
//    does), g zeroed; the clip factor made on the device from sum_squares_async's result, the
//    reference's by the host from the same norm:
//    - one tensor of 100003 elements: decay on the second step, clipping on the third;
//    - 5 tensors (one empty) with decay on three: no clipping; a norm under the clip; one over it.
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

// One tensor's step as the reference takes it: decay = lr * weight_decay or 0, clip the factor.
struct Step {
  float lr, beta1, beta2, eps, decay, clip;
  double bc1, bc2;
};

void adamw_reference(float* w, float* g, float* m1, float* m2, long n, const Step& a) {
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

// 3 AdamW steps of adamw_tensors over tensors of `sizes` (decay flags `decay`) against the
// reference per tensor. Step t: gradients of scale grad_scale * t, lr * weight_decay
// decay_lr[t - 1], and clip_norm clip_ratio[t - 1] times the step's norm (0: no clipping).
void check_adamw(const std::string& tag, std::mt19937& rng, const std::vector<long>& sizes, const std::vector<int32_t>& decay,
                 float grad_scale, const float (&decay_lr)[3], const double (&clip_ratio)[3]) {
  std::vector<long> end;
  long total = 0;
  for (long sz : sizes) end.push_back(total += sz);
  std::vector<float> w = rf::test::randn(rng, size_t(total), 1.f), m1(size_t(total), 0.f), m2(size_t(total), 0.f);
  float *dw = up(w), *dm1 = up(m1), *dm2 = up(m2), *dg = nullptr;
  cudaMalloc(&dg, size_t(total) * sizeof(float));
  long* dend = up(end);
  int32_t* ddecay = up(decay);
  double* sq = nullptr;
  cudaMalloc(&sq, size_t(rf::cuda::sum_squares_scratch()) * sizeof(double));
  bool same = true, cleared = true;
  int clipped = 0, clips_wanted = 0;
  for (int t = 1; t <= 3; ++t) {
    std::vector<float> g = rf::test::randn(rng, size_t(total), grad_scale * float(t));
    cudaMemcpy(dg, g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice);
    const double norm = std::sqrt(rf::cuda::sum_squares(dg, total, sq, nullptr));
    const float clip_norm = float(clip_ratio[t - 1] * norm);
    const float clip = clip_norm > 0.f && norm > clip_norm ? float(clip_norm / (norm + 1e-6)) : 1.f;
    clipped += clip != 1.f;
    clips_wanted += clip_ratio[t - 1] > 0 && clip_ratio[t - 1] < 1;
    const rf::cuda::AdamWTensorsParams p{1e-3f, 0.9f, 0.999f, 1e-8f, decay_lr[t - 1], clip_norm, 1.0 - std::pow(0.9, t),
                                         1.0 - std::pow(0.999, t)};
    for (size_t k = 0; k < sizes.size(); ++k) {
      const long off = end[k] - sizes[k];
      const Step a{p.lr, p.beta1, p.beta2, p.eps, decay[k] ? p.decay : 0.f, clip, p.bc1, p.bc2};
      adamw_reference(w.data() + off, g.data() + off, m1.data() + off, m2.data() + off, sizes[k], a);
    }
    rf::cuda::sum_squares_async(dg, total, sq, nullptr);
    rf::cuda::adamw_tensors(dw, dg, dm1, dm2, {dend, ddecay, int(sizes.size()), total}, p, rf::cuda::sum_squares_result(sq), nullptr);
    same &= same_bits(down(dw, size_t(total)), w) && same_bits(down(dm1, size_t(total)), m1) && same_bits(down(dm2, size_t(total)), m2);
    for (float v : down(dg, size_t(total))) cleared &= v == 0.f;
  }
  check(clipped == clips_wanted && clipped > 0, tag + ": the steps with a clip under the norm clip, and only those");
  check(same, tag + ": 3 steps (decay, clipping on the device, bias correction) equal the CPU's arithmetic bit for bit");
  check(cleared, tag + ": the gradient is zeroed");
  for (void* q : {static_cast<void*>(dw), static_cast<void*>(dm1), static_cast<void*>(dm2), static_cast<void*>(dg),
                  static_cast<void*>(dend), static_cast<void*>(ddecay), static_cast<void*>(sq)})
    cudaFree(q);
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_optim: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  std::mt19937 rng(3);
  const float wd = 1e-3f * 0.1f;
  check_adamw("adamw, one tensor of 100003", rng, {100003}, {1}, 0.01f, {0.f, wd, 0.f}, {0, 0, 0.37});
  check_adamw("adamw, 5 tensors", rng, {1000, 0, 257, 50000, 3}, {1, 0, 1, 0, 1}, 0.02f, {wd, wd, wd}, {0, 2, 1.0 / 3});

  const long n = 100003;
  const std::vector<float> g = rf::test::randn(rng, size_t(n), 2.f);
  double want = 0;
  for (float v : g) want += double(v) * v;
  float* d = up(g);
  double* scratch = nullptr;
  cudaMalloc(&scratch, size_t(rf::cuda::sum_squares_scratch()) * sizeof(double));
  const double a = rf::cuda::sum_squares(d, n, scratch, nullptr), b = rf::cuda::sum_squares(d, n, scratch, nullptr);
  check(std::fabs(a - want) <= 1e-12 * want, "sum_squares equals a double sum (" + std::to_string(a) + " / " + std::to_string(want) + ")");
  check(std::memcmp(&a, &b, sizeof(double)) == 0, "sum_squares gives the same bits twice");
  for (void* p : {static_cast<void*>(d), static_cast<void*>(scratch)}) cudaFree(p);
  return rf::test::finish("cuda_optim");
}
