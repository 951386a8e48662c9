// The device attention backward (native/cuda/attention_backward.h) against the CPU's
// attention_row_backward (checked against finite differences in test_backward) on the same
// inputs, on a GPU machine (elsewhere "no CUDA device visible; skipped", exit 0).
//
// Cases: sequences of 1, 17, 64 and 100 rows in one batch; head_dim 64, 80 and 128; GQA ratios 1,
// 3 and 4; no window and a 7-token window. Tolerance: both sides are f32 with max-subtracted
// softmaxes summed in different orders, dk and dv summing up to 100 query rows times the group:
// 1e-4 * (1 + |ref|) per element, and a relative L2 of 1e-5 over each gradient.
// The tensor-core backward (attention_backward_tc): head_dim 16 to 128 by 16, the same GQA
// ratios and windows, against the reference on bf16-rounded inputs (see run_case).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
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

// The forward's log-sum-exp (base 2, of the scaled scores) and output per (row, head), in double,
// as prefill_attention_tc hands them to attention_backward_tc.
void forward_stats(const std::vector<float>& qkv, const std::vector<int32_t>& first, const std::vector<int32_t>& len, int n_heads,
                   int n_kv, int hd, int window, float scale, std::vector<float>& lse, std::vector<float>& out) {
  const int Q = n_heads * hd, KV = n_kv * hd, QKV = Q + 2 * KV, group = n_heads / n_kv;
  int rows = 0;
  for (int l : len) rows += l;
  lse.assign(size_t(rows) * n_heads, 0.f);
  out.assign(size_t(rows) * Q, 0.f);
  std::vector<double> sc;
  for (size_t s = 0; s < len.size(); ++s)
    for (int t = 0; t < len[s]; ++t) {
      const int i = first[s] + t, lo = window > 0 && t + 1 > window ? t + 1 - window : 0;
      for (int h = 0; h < n_heads; ++h) {
        const float* q = qkv.data() + size_t(i) * QKV + size_t(h) * hd;
        const size_t kc = Q + size_t(h / group) * hd, vc = kc + KV;
        sc.assign(size_t(t + 1 - lo), 0.0);
        double mx = -INFINITY, sum = 0;
        for (int j = lo; j <= t; ++j) {
          double d = 0;
          for (int e = 0; e < hd; ++e) d += double(q[e]) * qkv[size_t(first[s] + j) * QKV + kc + e];
          sc[size_t(j - lo)] = d * scale;
          mx = std::max(mx, d * scale);
        }
        for (double& x : sc) sum += (x = std::exp(x - mx));
        lse[size_t(i) * n_heads + h] = float((mx + std::log(sum)) / std::log(2.0));
        for (int e = 0; e < hd; ++e) {
          double o = 0;
          for (int j = lo; j <= t; ++j) o += sc[size_t(j - lo)] * qkv[size_t(first[s] + j) * QKV + vc + e];
          out[size_t(i) * Q + size_t(h) * hd + e] = float(o / sum);
        }
      }
    }
}

// tc: attention_backward_tc on bf16-rounded q, k, v and dout against the reference on the same
// rounded inputs; it also rounds the probabilities and dS to bf16 for its products, so each of
// dq, dk and dv is held to a relative L2 of 5e-3 (each term rounded by up to 2^-8; about
// 1.7e-3 seen). The forward's output is rounded to bf16 too, as a bf16 model's trace keeps it,
// and the bf16 overload (qkv and out as bf16) must give the f32 overload's bits.
void run_case(int head_dim, int n_kv, int group, int window, bool tc = false) {
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
  std::vector<float> qkv = rf::test::randn(rng, size_t(rows) * QKV, 1.f), dout = rf::test::randn(rng, size_t(rows) * Q, 1.f);
  const float scale = 1.f / std::sqrt(float(head_dim));
  if (tc)
    for (std::vector<float>* v : {&qkv, &dout})
      for (float& x : *v) x = rf::bf16_to_f32(rf::f32_to_bf16(x));

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
  float *d_lse = nullptr, *d_out = nullptr;
  std::vector<float> got_bf16;  // the bf16 overload's dqkv
  if (tc) {
    std::vector<float> lse, out;
    forward_stats(qkv, first, len, n_heads, n_kv, head_dim, window, scale, lse, out);
    for (float& x : out) x = rf::bf16_to_f32(rf::f32_to_bf16(x));
    d_lse = up(lse), d_out = up(out);
    cudaMalloc(&d_scratch, size_t(rf::cuda::attention_backward_tc_scratch(a)) * sizeof(float));
    const int max_len = *std::max_element(lens.begin(), lens.end());
    auto bits = [](const std::vector<float>& v) {
      std::vector<uint16_t> b(v.size());
      for (size_t i = 0; i < v.size(); ++i) b[i] = rf::f32_to_bf16(v[i]);
      return b;
    };
    uint16_t *b_qkv = up(bits(qkv)), *b_out = up(bits(out));
    rf::cuda::attention_backward_tc(d_dqkv, d_dout, reinterpret_cast<const __nv_bfloat16*>(b_qkv),
                                    reinterpret_cast<const __nv_bfloat16*>(b_out), d_lse, a, max_len, scale, d_scratch, nullptr);
    got_bf16.resize(qkv.size());
    cudaMemcpy(got_bf16.data(), d_dqkv, got_bf16.size() * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(b_qkv), cudaFree(b_out);
    rf::cuda::attention_backward_tc(d_dqkv, d_dout, d_qkv, d_out, d_lse, a, max_len, scale, d_scratch, nullptr);
  } else {
    cudaMalloc(&d_scratch, size_t(rf::cuda::attention_backward_scratch(a)) * sizeof(float));
    rf::cuda::attention_backward(d_dqkv, d_dout, d_qkv, a, scale, d_scratch, nullptr);
  }
  const bool ran = cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess;
  std::vector<float> got(qkv.size());
  cudaMemcpy(got.data(), d_dqkv, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (void* p : {static_cast<void*>(d_first), static_cast<void*>(d_len), static_cast<void*>(d_row_seq), static_cast<void*>(d_qkv),
                  static_cast<void*>(d_dout), static_cast<void*>(d_dqkv), static_cast<void*>(d_scratch), static_cast<void*>(d_lse),
                  static_cast<void*>(d_out)})
    cudaFree(p);
  const std::string tag = std::string(tc ? "tensor cores, " : "") + "head_dim " + std::to_string(head_dim) + " GQA " +
                          std::to_string(group) + " window " + std::to_string(window);
  check(ran, tag + ": kernels ran");
  if (tc) {
    check(std::memcmp(got.data(), got_bf16.data(), got.size() * sizeof(float)) == 0,
          tag + ": bf16 qkv and out give the bits of their widened f32 values");
    // Per part (q, k, v columns) over all rows.
    double worst_l2 = 0;
    const char* worst_part = "";
    for (int part = 0; part < 3; ++part) {
      const size_t c0 = part == 0 ? 0 : part == 1 ? size_t(Q) : size_t(Q + KV), width = part == 0 ? size_t(Q) : size_t(KV);
      std::vector<float> g, w;
      for (int r = 0; r < rows; ++r)
        for (size_t e = 0; e < width; ++e) g.push_back(got[size_t(r) * QKV + c0 + e]), w.push_back(want[size_t(r) * QKV + c0 + e]);
      const double l2 = rf::test::rel_l2(g, w);
      if (!(l2 <= worst_l2)) worst_l2 = l2, worst_part = part == 0 ? "dq" : part == 1 ? "dk" : "dv";
    }
    check(worst_l2 <= 5e-3, tag + ": dq, dk, dv within bf16 rounding of the reference (worst rel L2 " + std::to_string(worst_l2) + ", " +
                                worst_part + ")");
    return;
  }
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(double(got[i]) - want[i]) / (1 + std::fabs(double(want[i]))));
  const double l2 = rf::test::rel_l2(got, want);
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
  for (int hd : {16, 32, 48, 64, 80, 96, 112, 128})
    for (int group : {1, 3, 4})
      for (int window : {0, 7}) run_case(hd, 2, group, window, true);
  return rf::test::finish("cuda_attention_backward");
}
