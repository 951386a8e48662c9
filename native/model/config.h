// The model description the engine runs: a normalised form of Hugging Face's config.json,
// produced and validated by lib/model/config.ts.
#pragma once
#include <string>

namespace rf {

enum class Arch { llama, gpt2 };        // llama also covers Mistral, Qwen2 and Qwen3 (same block)
enum class NormType { rms, layer };
enum class Activation { silu, gelu_new };
enum class RopeScaling { none, linear, dynamic, llama3 };

struct ModelConfig {
  Arch arch = Arch::llama;
  int vocab = 0, hidden = 0, intermediate = 0, n_layers = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int max_positions = 0;               // learned positions: hard limit; rope: dynamic scaling's reference
  NormType norm = NormType::rms;
  float norm_eps = 1e-5f;
  Activation act = Activation::silu;
  bool rope = true;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::none;
  double rope_factor = 1.0, rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  int rope_original_max_positions = 0;
  bool qkv_bias = false, o_bias = false, mlp_bias = false;
  bool tied_embeddings = false;
  bool qk_norm = false;                // Qwen3: RMSNorm over each head of q and of k (weights [head_dim]) before rope
  int sliding_window = 0;              // 0: none; else a query at i sees keys j with i - j < window

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  // Throws std::invalid_argument naming the first inconsistent field.
  void validate() const;
};

}  // namespace rf
