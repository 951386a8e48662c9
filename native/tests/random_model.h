// Random inputs for the standalone tests and benches: normal draws, and small models with random
// weights loaded through Model::load_tensor under the engine's tensor names (so each test
// exercises the same loading path as real checkpoints).
#pragma once
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"

namespace rf::test {

// n draws of N(mean, sd) from rng. The distribution is made afresh on every call (it caches
// a spare draw), so a caller's sequence of values depends only on its seed and its calls.
inline void fill_normal(std::mt19937& rng, float* v, size_t n, float sd, float mean = 0.f) {
  std::normal_distribution<float> d(mean, sd);
  for (size_t i = 0; i < n; ++i) v[i] = d(rng);
}

inline std::vector<float> randn(std::mt19937& rng, size_t n, float sd, float mean = 0.f) {
  std::vector<float> v(n);
  fill_normal(rng, v.data(), n, sd, mean);
  return v;
}

// A small Llama-family config (GQA, q/k/v biases, head_dim 16) that tests adapt field by field.
inline rf::ModelConfig small_llama() {
  rf::ModelConfig c;
  c.arch = rf::Arch::llama;
  c.vocab = 97;
  c.hidden = 48;
  c.intermediate = 80;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.max_positions = 64;
  c.qkv_bias = true;
  return c;
}

// The small config's variants the CUDA tests run: Mistral's sliding window (no q/k/v biases),
// llama3 rope scaling with tied embeddings, and GPT-2 (learned positions, LayerNorm, gelu_new,
// biases everywhere, tied embeddings, c_attn [3 hidden, hidden]).
inline rf::ModelConfig mistral_of(rf::ModelConfig c) {
  c.sliding_window = 7;
  c.qkv_bias = false;
  return c;
}
inline rf::ModelConfig llama3_tied_of(rf::ModelConfig c) {
  c.tied_embeddings = true;
  c.rope_scaling = rf::RopeScaling::llama3;
  c.rope_factor = 8;
  c.rope_original_max_positions = 16;
  return c;
}
// Qwen3: per-head RMSNorms on q and k before rope, no q/k/v biases.
inline rf::ModelConfig qwen3_of(rf::ModelConfig c) {
  c.qk_norm = true;
  c.qkv_bias = false;
  return c;
}
inline rf::ModelConfig gpt2_of(rf::ModelConfig c) {
  c.arch = rf::Arch::gpt2;
  c.norm = rf::NormType::layer;
  c.act = rf::Activation::gelu_new;
  c.rope = false;
  c.n_kv_heads = c.n_heads;
  c.head_dim = c.hidden / c.n_heads;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.tied_embeddings = true;
  return c;
}

// Standard deviations of the random weights, per kind of tensor. Norm weights are drawn around
// 1 (the rest around 0) so activations keep their scale through the layers.
struct WeightScales {
  float embed = 0.5f;
  float lm_head = 0.3f;  // untied models only
  float pos_embed = 0.3f;  // GPT-2 only
  float norm = 0.2f;
  float bias = 0.1f;
  float linear = 0.f;  // 0: 1 / sqrt(fan-in), which keeps each projection's output of order 1
};

// Loads every tensor m's config calls for (tied/untied head, GPT-2 positions and [in, out]
// linears, LayerNorm biases, the configured linear biases, Qwen3's q/k norms), filling each one with
// fill(float* data, size_t n, float mean, float sd) in a fixed order: the same fill gives
// the same model. M: rf::Model, or any engine with its config() and load_tensor() (the CUDA one).
template <class M, class Fill>
void load_random(M& m, const WeightScales& s, Fill&& fill) {
  const rf::ModelConfig& c = m.config();
  auto add = [&](const std::string& name, std::vector<long> shape, float sd, float mean = 0.f, bool kn = false) {
    long n = 1;
    for (long d : shape) n *= d;
    std::vector<float> v(n);
    fill(v.data(), size_t(n), mean, sd);
    m.load_tensor(name, v.data(), rf::SrcType::f32, shape, kn);
  };
  const long H = c.hidden, I = c.intermediate;
  const bool gpt2 = c.arch == rf::Arch::gpt2;
  const bool layer_norm = c.norm == rf::NormType::layer;
  add("embed", {c.vocab, H}, s.embed);
  if (!c.tied_embeddings) add("lm_head", {c.vocab, H}, s.lm_head);
  if (gpt2) add("pos_embed", {c.max_positions, H}, s.pos_embed);
  add("final_norm.weight", {H}, s.norm, 1.f);
  if (layer_norm) add("final_norm.bias", {H}, s.bias);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* n : {"attn_norm", "mlp_norm"}) {
      add(p + n + ".weight", {H}, s.norm, 1.f);
      if (layer_norm) add(p + n + ".bias", {H}, s.bias);
    }
    if (c.qk_norm)
      for (const char* n : {"q_norm", "k_norm"}) add(p + n + ".weight", {long(c.head_dim)}, s.norm, 1.f);
    // GPT-2 checkpoints store linears as [in, out] (Conv1D); load_tensor takes them with kn.
    auto lin = [&](const char* n, long o, long i, bool bias) {
      const float sd = s.linear > 0 ? s.linear : 1.f / std::sqrt(float(i));
      add(p + n + ".weight", gpt2 ? std::vector<long>{i, o} : std::vector<long>{o, i}, sd, 0.f, gpt2);
      if (bias) add(p + n + ".bias", {o}, s.bias);
    };
    lin("qkv", c.qkv_dim(), H, c.qkv_bias);
    lin("o", H, c.q_dim(), c.o_bias);
    lin("mlp_in", gpt2 ? I : 2 * I, H, c.mlp_bias);  // SwiGLU: gate and up stacked
    lin("mlp_out", H, I, c.mlp_bias);
  }
}

// Normal weights from std::mt19937(seed).
template <class M>
void load_random(M& m, unsigned seed, const WeightScales& s = {}) {
  std::mt19937 rng(seed);
  load_random(m, s, [&](float* v, size_t n, float mean, float sd) { fill_normal(rng, v, n, sd, mean); });
}

// A complete model of config c with normal weights from std::mt19937(seed).
inline std::unique_ptr<rf::Model> random_model(const rf::ModelConfig& c, rf::DType dtype, int threads, unsigned seed,
                                               const WeightScales& s = {}) {
  auto m = std::make_unique<rf::Model>(c, dtype, threads);
  load_random(*m, seed, s);
  m->check_complete();
  return m;
}

}  // namespace rf::test
