// What the GPU benchmarks share (native/bench/cuda_bench.cu, cuda_train_bench.cu): timing, the
// in-run ceilings (copy bandwidth, bf16 tensor throughput through cuBLASLt at 8192^3), the Llama
// shapes and their random bf16 weights.
//
// Both benchmarks take --tiny: every part once on shapes small enough for the CPU emulation of
// CUDA (tiny_llama below, a few tokens, a 64^3 product for the ceiling), which
// scripts/cuda-emulate.sh runs in CI so that the benchmarks' own code (setup, the engine calls,
// the JSON that gpu-check.sh keeps) has run before a GPU's minutes are spent on it. Its figures
// mean nothing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/device_model.h"
#include "cuda/gemm.h"

namespace rf::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A number for the JSON: 9 significant digits (std::to_string's fixed 6 decimals would print a
// 3-microsecond launch as 0.000003, and one under half a microsecond as 0).
inline std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "cuda_bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

__global__ void copy_kernel(float4* dst, const float4* src, long n) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) dst[i] = src[i];
}

// Median seconds of `reps` timed runs of fn, timed with CUDA events on the default stream.
template <class Fn>
double median_time(int reps, Fn&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    fn();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Bytes read + written per second by a copy kernel over `bytes` (two buffers of that size).
inline double copy_bandwidth(long bytes = 1L << 30) {
  const long n = bytes / 16;
  float4 *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, bytes), "cudaMalloc");
  check(cudaMalloc(&dst, bytes), "cudaMalloc");
  cudaMemset(src, 0, bytes);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const double s = median_time(10, [&] { copy_kernel<<<sms * 8, 512>>>(dst, src, n); });
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * double(bytes) / s;
}

// n random bf16 values in [-1, 1) into device memory (xorshift on the host, uploaded in chunks).
inline void fill_random_bf16(__nv_bfloat16* to, size_t n, uint64_t seed) {
  uint64_t state = 0x9e3779b97f4a7c15ull ^ (seed * 0xbf58476d1ce4e5b9ull);
  std::vector<uint16_t> chunk(std::min<size_t>(n, size_t(1) << 22));  // bf16 bits
  for (size_t done = 0; done < n; done += chunk.size()) {
    const size_t m = std::min(chunk.size(), n - done);
    for (size_t i = 0; i < m; ++i) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      chunk[i] = rf::f32_to_bf16(float(state >> 40) / float(1 << 23) - 1.f);
    }
    check(cudaMemcpy(to + done, chunk.data(), m * sizeof(uint16_t), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
}

// FLOP/s of cuBLASLt's bf16 product at n^3 (f32 sums and output).
inline double bf16_flops(int n = 8192) {
  __nv_bfloat16 *a = nullptr, *b = nullptr;
  float* c = nullptr;
  check(cudaMalloc(&a, size_t(n) * n * 2), "cudaMalloc");
  check(cudaMalloc(&b, size_t(n) * n * 2), "cudaMalloc");
  check(cudaMalloc(&c, size_t(n) * n * 4), "cudaMalloc");
  // Random values, not zeros: a GPU limited by power runs faster on zeros than on real data.
  fill_random_bf16(a, size_t(n) * n, 1);
  fill_random_bf16(b, size_t(n) * n, 2);
  rf::cuda::GemmContext ctx;
  const double s = median_time(10, [&] {
    rf::cuda::matmul(ctx, c, a, rf::DType::bf16, b, rf::DType::bf16, n, n, n, nullptr, 0.f, nullptr);
  });
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * double(n) * n * n / s;
}

struct Shape {
  const char* name;
  rf::ModelConfig c;
};

inline rf::ModelConfig llama(int vocab, int hidden, int inter, int layers, int heads, int kv, int hd, bool tied, double factor) {
  rf::ModelConfig c;
  c.arch = rf::Arch::llama;
  c.vocab = vocab;
  c.hidden = hidden;
  c.intermediate = inter;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv;
  c.head_dim = hd;
  c.max_positions = 131072;
  c.rope_theta = 500000.0;
  c.rope_scaling = rf::RopeScaling::llama3;
  c.rope_factor = factor;
  c.rope_low_freq_factor = 1.0;
  c.rope_high_freq_factor = 4.0;
  c.rope_original_max_positions = 8192;
  c.tied_embeddings = tied;
  c.norm_eps = 1e-5f;
  return c;
}

// A Llama-family config for --tiny: 2 layers, every dimension small, vocabulary and head_dim
// given (a vocabulary not a multiple of 64 takes the kernels' ragged edges).
inline rf::ModelConfig tiny_llama(int vocab, int hidden, int heads, int kv, int hd, bool tied) {
  rf::ModelConfig c = llama(vocab, hidden, 2 * hidden, 2, heads, kv, hd, tied, 32.0);
  c.max_positions = 4096;
  return c;
}

// Random bf16 weights for any config (a cheap xorshift: the values do not matter for speed, only their bits
// being ordinary numbers), loaded under the engine's names.
inline void load_random(rf::cuda::DeviceModel& m) {
  const rf::ModelConfig& c = m.config();
  uint64_t state = 0x9e3779b97f4a7c15ull;
  std::vector<uint16_t> buf;
  auto add = [&](const std::string& name, std::vector<long> shape, float sd, float mean) {
    long n = 1;
    for (long d : shape) n *= d;
    buf.resize(size_t(n));
    for (long i = 0; i < n; ++i) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      const float u = float(state >> 40) / float(1 << 24) - 0.5f;  // uniform in [-0.5, 0.5)
      buf[size_t(i)] = rf::f32_to_bf16(mean + sd * 3.46f * u);   // sd of the uniform: 1 / sqrt(12)
    }
    m.load_tensor(name, buf.data(), rf::SrcType::bf16, shape, false);
  };
  const long H = c.hidden, I = c.intermediate;
  const bool layer_norm = c.norm == rf::NormType::layer;
  add("embed", {c.vocab, H}, 0.02f, 0.f);
  if (!c.tied_embeddings) add("lm_head", {c.vocab, H}, 0.02f, 0.f);
  if (c.arch == rf::Arch::gpt2) add("pos_embed", {c.max_positions, H}, 0.01f, 0.f);
  add("final_norm.weight", {H}, 0.02f, 1.f);
  if (layer_norm) add("final_norm.bias", {H}, 0.02f, 0.f);
  // A projection and, where the config has one, its bias (GPT-2: c_fc is [inter, hidden]; the
  // Llama family's mlp_in stacks gate and up).
  auto linear = [&](const std::string& name, long out, long in, bool bias) {
    add(name + ".weight", {out, in}, 0.02f, 0.f);
    if (bias) add(name + ".bias", {out}, 0.02f, 0.f);
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* n : {"attn_norm", "mlp_norm"}) {
      add(p + n + ".weight", {H}, 0.02f, 1.f);
      if (layer_norm) add(p + n + ".bias", {H}, 0.02f, 0.f);
    }
    linear(p + "qkv", c.qkv_dim(), H, c.qkv_bias);
    linear(p + "o", H, c.q_dim(), c.o_bias);
    linear(p + "mlp_in", c.act == rf::Activation::silu ? 2 * I : I, H, c.mlp_bias);
    linear(p + "mlp_out", H, I, c.mlp_bias);
  }
  m.check_complete();
}

inline double non_embedding_params(const rf::ModelConfig& c) {
  const double H = c.hidden, I = c.intermediate;
  // SwiGLU's gate, up and down matrices; GPT-2's GELU MLP has two.
  const double mlp = (c.act == rf::Activation::silu ? 3 : 2) * H * I;
  return c.n_layers * (H * c.qkv_dim() + double(c.q_dim()) * H + mlp);
}

}  // namespace rf::bench
