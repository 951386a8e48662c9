#include <stdexcept>
#include <string>

#include "model/config.h"

namespace rf {

void ModelConfig::validate() const {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string("invalid model config: ") + what);
  };
  require(vocab > 0, "vocab_size must be positive");
  require(hidden > 0, "hidden_size must be positive");
  require(intermediate > 0, "intermediate_size must be positive");
  require(n_layers > 0, "num_hidden_layers must be positive");
  require(n_heads > 0 && n_kv_heads > 0, "attention head counts must be positive");
  require(n_heads % n_kv_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads");
  require(head_dim > 0 && head_dim % 2 == 0, "head_dim must be positive and even");
  require(norm_eps >= 0.f, "norm epsilon must be non-negative");
  require(sliding_window >= 0, "sliding_window must be non-negative");
  if (qk_norm) require(arch == Arch::llama && norm == NormType::rms, "per-head q/k norms need a Llama-family block with RMSNorm");
  if (arch == Arch::gpt2) {
    require(max_positions > 0, "n_positions must be positive");
    require(q_dim() == hidden, "GPT-2 needs n_head * head_dim == n_embd");
  }
  if (rope) {
    require(rope_theta > 0.0, "rope_theta must be positive");
    if (rope_scaling != RopeScaling::none) require(rope_factor > 0.0, "rope_scaling.factor must be positive");
    if (rope_scaling == RopeScaling::dynamic || rope_scaling == RopeScaling::llama3)
      require(rope_original_max_positions > 0, "rope scaling needs original_max_position_embeddings");
    if (rope_scaling == RopeScaling::llama3)
      require(rope_high_freq_factor > rope_low_freq_factor, "llama3 rope needs high_freq_factor > low_freq_factor");
  }
}

}  // namespace rf
