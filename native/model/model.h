// A decoder-only transformer (Llama / Mistral / Qwen2 block, or GPT-2 block) on the CPU:
// weights packed once for the GEMM kernels, prefill over a batch of variable-length
// sequences and incremental decode with a per-sequence KV cache, in one forward().
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "model/config.h"
#include "model/kv_cache.h"

namespace rf {

// Thrown by forward() when its cancel flag was raised; caches are left as they were.
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("the operation was aborted") {}
};

struct Linear {
  PackedWeight w;            // [out, in]
  std::vector<float> bias;   // [out] or empty
  bool loaded() const { return w.N > 0; }
};

struct Norm {
  std::vector<float> weight, bias;  // [hidden]; bias only for LayerNorm
};

struct Layer {
  Norm attn_norm, mlp_norm;
  Linear qkv;       // [q_dim + 2 kv_dim, hidden]: q, k, v stacked (GPT-2 c_attn; Llama q/k/v_proj)
  Linear o;         // [hidden, q_dim]
  Linear mlp_in;    // SwiGLU: [2 intermediate, hidden] = gate then up; GELU: [intermediate, hidden]
  Linear mlp_out;   // [hidden, intermediate]
};

// One sequence to advance: its cache and the new tokens to append.
struct ForwardItem {
  KvCache* cache;
  const uint32_t* tokens;
  int n_tokens;
};

enum class LogitsMode { all, last };  // logits for every new token, or the last of each item

class Model {
 public:
  Model(const ModelConfig& config, DType dtype, int n_threads);

  const ModelConfig& config() const { return config_; }
  DType dtype() const { return dtype_; }
  int threads() const { return pool_.size(); }
  size_t weight_bytes() const;

  // Loads one tensor by its engine name (see kNames in model.cpp), converting to the
  // engine's dtype; `src_is_kn` marks a GPT-2 Conv1D matrix stored [in, out].
  // Replacing an already loaded tensor is allowed (e.g. a grown vocabulary).
  void load_tensor(const std::string& name, const void* data, SrcType type,
                   const std::vector<long>& shape, bool src_is_kn);
  // Throws std::invalid_argument listing the tensors still missing.
  void check_complete() const;

  // Current vocabulary (rows of the LM head).
  int vocab() const { return config_.vocab; }

  // Runs the new tokens of every item through the model, appending to their caches.
  // Writes logits [rows, vocab] to out: rows = all new tokens (items in order) or one per item.
  // cancel (optional) is polled between layers; progress(done, total) is called per layer.
  void forward(const std::vector<ForwardItem>& items, LogitsMode mode, float* out,
               const std::atomic<int>* cancel = nullptr,
               const std::function<void(int, int)>& progress = nullptr);
  // Number of logits rows forward() writes for these items.
  static long logits_rows(const std::vector<ForwardItem>& items, LogitsMode mode);

  KvCache new_cache() const { return KvCache(config_.n_layers, config_.n_kv_heads, config_.head_dim); }

 private:
  void embed_rows(const std::vector<ForwardItem>& items, float* x);
  void attention(const std::vector<ForwardItem>& items, int layer, const float* qkv, float* out);

  ModelConfig config_;
  DType dtype_;
  ThreadPool pool_;
  std::vector<Layer> layers_;
  Norm final_norm_;
  Linear lm_head_;                       // [vocab, hidden]; packed from embed when tied
  std::vector<float> embed_f32_;         // [vocab, hidden] when untied and dtype f32
  std::vector<uint16_t> embed_bf16_;     // [vocab, hidden] when untied and dtype bf16
  bool embed_loaded_ = false;
  std::vector<float> pos_embed_;         // [max_positions, hidden] (GPT-2)

  // Scratch reused across forward calls (forward is not re-entrant).
  std::vector<float> x_, xn_, qkv_, att_, mlp_, act_, rows_, rope_cos_, rope_sin_, scores_;
};

}  // namespace rf
