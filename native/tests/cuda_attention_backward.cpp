// The device attention backward (native/cuda/attention_backward.h) against the CPU's
// attention_row_backward (checked against finite differences in test_backward) on the same
// inputs, on a GPU machine (elsewhere "no CUDA device visible; skipped", exit 0).
//
// Cases: sequences of 1, 17, 64 and 100 rows in one batch; head_dim 64, 80 and 128; GQA ratios 1,
// 3 and 4; no window and a 7-token window. Tolerance: both sides are f32 with max-subtracted
// softmaxes summed in different orders, dk and dv summing up to 100 query rows times the group:
// 1e-4 * (1 + |ref|) per element, and a relative L2 of 1e-5 over each gradient.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention_backward.h"
#include "cuda/cuda.h"
#include "kernels/ops_backward.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;

namespace {

std::mt19937 rng(11);

template <class T>
T* up(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

void run_case(int head_dim, int n_kv, int group, int window) {
  const int n_heads = n_kv * group, Q = n_heads * head_dim, KV = n_kv * head_dim, QKV = Q + 2 * KV;
  const std::vector<int> lens{1, 17, 64, 100};
  std::vector<int32_t> first, len, row_seq;
  int rows = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    first.push_back(rows);
    len.push_back(lens[s]);
    for (int t = 0; t < lens[s]; ++t) row_seq.push_back(int32_t(s));
    rows += lens[s];
  }
  const std::vector<float> qkv = rf::test::randn(rng, size_t(rows) * QKV, 1.f), dout = rf::test::randn(rng, size_t(rows) * Q, 1.f);
  const float scale = 1.f / std::sqrt(float(head_dim));

  // CPU reference: per sequence and kv head, contiguous K and V, every query row of the group.
  std::vector<float> want(size_t(rows) * QKV, 0.f), scratch(2 * 128);
  for (size_t s = 0; s < lens.size(); ++s) {
    const int T = lens[s], f = first[s];
    for (int g = 0; g < n_kv; ++g) {
      std::vector<float> K(size_t(T) * head_dim), V(size_t(T) * head_dim), dK(K.size(), 0.f), dV(V.size(), 0.f);
      for (int t = 0; t < T; ++t)
        for (int e = 0; e < head_dim; ++e) {
          K[size_t(t) * head_dim + e] = qkv[size_t(f + t) * QKV + Q + size_t(g) * head_dim + e];
          V[size_t(t) * head_dim + e] = qkv[size_t(f + t) * QKV + Q + KV + size_t(g) * head_dim + e];
        }
      for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int t = 0; t < T; ++t) {
          const int lo = window > 0 && t + 1 > window ? t + 1 - window : 0;
          rf::attention_row_backward(want.data() + size_t(f + t) * QKV + size_t(h) * head_dim, dK.data() + size_t(lo) * head_dim,
                                     dV.data() + size_t(lo) * head_dim, dout.data() + size_t(f + t) * Q + size_t(h) * head_dim,
                                     qkv.data() + size_t(f + t) * QKV + size_t(h) * head_dim, K.data() + size_t(lo) * head_dim,
                                     V.data() + size_t(lo) * head_dim, head_dim, t + 1 - lo, head_dim, scale, scratch.data());
        }
      }
      for (int t = 0; t < T; ++t)
        for (int e = 0; e < head_dim; ++e) {
          want[size_t(f + t) * QKV + Q + size_t(g) * head_dim + e] = dK[size_t(t) * head_dim + e];
          want[size_t(f + t) * QKV + Q + KV + size_t(g) * head_dim + e] = dV[size_t(t) * head_dim + e];
        }
    }
  }

  int32_t *d_first = up(first), *d_len = up(len), *d_row_seq = up(row_seq);
  float *d_qkv = up(qkv), *d_dout = up(dout), *d_dqkv = up(std::vector<float>(qkv.size(), NAN)), *d_scratch = nullptr;
  const rf::cuda::AttentionRows a{d_first, d_len, d_row_seq, int(lens.size()), rows, n_heads, n_kv, head_dim, window};
  cudaMalloc(&d_scratch, size_t(rf::cuda::attention_backward_scratch(a)) * sizeof(float));
  rf::cuda::attention_backward(d_dqkv, d_dout, d_qkv, a, scale, d_scratch, nullptr);
  const bool ran = cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess;
  std::vector<float> got(qkv.size());
  cudaMemcpy(got.data(), d_dqkv, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (void* p : {static_cast<void*>(d_first), static_cast<void*>(d_len), static_cast<void*>(d_row_seq), static_cast<void*>(d_qkv),
                  static_cast<void*>(d_dout), static_cast<void*>(d_dqkv), static_cast<void*>(d_scratch)})
    cudaFree(p);
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(double(got[i]) - want[i]) / (1 + std::fabs(double(want[i]))));
  const double l2 = rf::test::rel_l2(got, want);
  const std::string tag = "head_dim " + std::to_string(head_dim) + " GQA " + std::to_string(group) + " window " + std::to_string(window);
  check(ran, tag + ": kernels ran");
  check(worst <= 1e-4 && l2 <= 1e-5, tag + ": dq, dk, dv equal the CPU's (worst " + std::to_string(worst) + ", rel L2 " + std::to_string(l2) + ")");
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_attention_backward: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  for (int hd : {64, 80, 128})
    for (int group : {1, 3, 4})
      for (int window : {0, 7}) run_case(hd, 2, group, window);
  return rf::test::finish("cuda_attention_backward");
}
