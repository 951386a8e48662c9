// Paged decode attention on the device (native/cuda/attention.h) against the CPU's
// attention_row over the same keys gathered into a contiguous copy, on a GPU machine; elsewhere
// it says no device was found and exits 0.
//
// Cases: head_dim 64 / 80 / 128; GQA ratios 1, 3 and 8; sequences of 1, 15, 16, 17, 300 and
// 1000 tokens in blocks of 16 (crossing block and 256-key split boundaries) whose block tables
// come shuffled out of a BlockPool; no window and a 37-token sliding window. Both sides are f32
// with max-subtracted softmaxes summed in different orders: outputs agree to
// 2e-5 * (1 + |ref|) per element.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/cuda.h"
#include "kernels/ops.h"
#include "model/block_pool.h"
#include "tests/check.h"

using rf::test::check;

namespace {

std::mt19937 rng(77);

template <class T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

void run_case(int head_dim, int n_kv_heads, int group, int window) {
  const int n_heads = n_kv_heads * group, B = 16;
  const std::vector<int> lengths{1, 15, 16, 17, 300, 1000};
  int total_blocks = 0;
  for (int L : lengths) total_blocks += rf::BlockPool::blocks_for(L, B);
  rf::BlockPool pool(total_blocks + 9, B);
  // Interleaved growth so each table's blocks are scattered through the pool.
  std::vector<rf::BlockTable> tables(lengths.size());
  for (int step = 1; step <= 1000; step += 13)
    for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], std::min(step, lengths[s]));
  for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], lengths[s]);

  std::normal_distribution<float> d(0.f, 1.f);
  const size_t pool_floats = size_t(pool.capacity()) * n_kv_heads * B * head_dim;
  std::vector<float> k(pool_floats), v(pool_floats), q(lengths.size() * n_heads * head_dim);
  for (float& x : k) x = d(rng);
  for (float& x : v) x = d(rng);
  for (float& x : q) x = d(rng);
  std::vector<int32_t> flat, offsets, lens;
  for (size_t s = 0; s < lengths.size(); ++s) {
    offsets.push_back(int32_t(flat.size()));
    flat.insert(flat.end(), tables[s].begin(), tables[s].end());
    lens.push_back(lengths[s]);
  }
  const float scale = 1.f / std::sqrt(float(head_dim));
  const int max_length = *std::max_element(lengths.begin(), lengths.end());

  float *dk = to_device(k), *dv = to_device(v), *dq = to_device(q), *dout = nullptr, *dscratch = nullptr;
  int32_t *dtables = to_device(flat), *doffsets = to_device(offsets), *dlens = to_device(lens);
  const size_t out_n = lengths.size() * n_heads * head_dim;
  cudaMalloc(&dout, out_n * sizeof(float));
  cudaMalloc(&dscratch, rf::cuda::decode_attention_scratch(int(lengths.size()), n_heads, head_dim, max_length) * sizeof(float));
  rf::cuda::PagedLayer layer{dk, dv, B, n_kv_heads, head_dim};
  rf::cuda::PagedBatch batch{dtables, doffsets, dlens, int(lengths.size()), max_length};
  rf::cuda::decode_attention(dout, dq, layer, batch, n_heads, scale, window, dscratch, nullptr);
  std::vector<float> out(out_n);
  cudaMemcpy(out.data(), dout, out_n * sizeof(float), cudaMemcpyDeviceToHost);
  for (void* p : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dq), static_cast<void*>(dout),
                  static_cast<void*>(dscratch), static_cast<void*>(dtables), static_cast<void*>(doffsets), static_cast<void*>(dlens)})
    cudaFree(p);

  double worst = 0;
  bool ok = true;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const int L = lengths[s], first = window > 0 && L > window ? L - window : 0, n = L - first;
    for (int h = 0; h < n_heads; ++h) {
      const int kvh = h / group;
      std::vector<float> kc(size_t(n) * head_dim), vc(size_t(n) * head_dim), scores(n), ref(head_dim);
      for (int j = first; j < L; ++j) {
        const size_t base = ((size_t(tables[s][size_t(j / B)]) * n_kv_heads + kvh) * B + j % B) * head_dim;
        std::copy_n(k.data() + base, head_dim, kc.data() + size_t(j - first) * head_dim);
        std::copy_n(v.data() + base, head_dim, vc.data() + size_t(j - first) * head_dim);
      }
      rf::attention_row(ref.data(), q.data() + (s * n_heads + h) * head_dim, kc.data(), vc.data(), head_dim, n, head_dim, scale, scores.data());
      const float* got = out.data() + (s * n_heads + h) * head_dim;
      for (int i = 0; i < head_dim; ++i) {
        const double e = std::fabs(double(got[i]) - ref[i]);
        worst = std::max(worst, e);
        ok &= e <= 2e-5 * (1 + std::fabs(ref[i]));
      }
    }
  }
  check(ok, "paged decode attention head_dim=" + std::to_string(head_dim) + " GQA " + std::to_string(group) + " window " +
                std::to_string(window) + ": equals attention_row (max abs err " + std::to_string(worst) + ")");
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_attention: no CUDA device visible; skipped\n");
    return 0;
  }
  for (int hd : {64, 80, 128})
    for (int group : {1, 3, 8})
      for (int window : {0, 37}) run_case(hd, 2, group, window);
  return rf::test::finish("cuda_attention");
}
