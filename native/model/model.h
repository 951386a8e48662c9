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
#include "model/dropout_keep.h"
#include "model/kv_cache.h"

namespace rf {

// Thrown by forward() when its cancel flag was raised; caches are left as they were.
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("the operation was aborted") {}
};

// Thrown when device or host memory runs out mid-call; the sequences' caches and the engine's
// weights are left as they were (a step advances no sequence unless it completes), so the caller
// may retry with less work (the scheduler splits its step).
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown when the GPU failed in a way that leaves its CUDA context unusable (a kernel fault, an
// uncorrectable memory error, ...): every later call on it fails too, and only a new process
// recovers. The caller stops using the device and reports it (the server's /health goes failed).
struct DeviceFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A tensor the model learns or was adapted with: value, and (while training) its gradient
// and AdamW moments, all f32.
struct Param {
  std::string name;
  std::vector<long> shape;
  std::vector<float> value, grad, m, v;
  bool decay = true;  // decoupled weight decay applies
  long numel() const { long n = 1; for (long d : shape) n *= d; return n; }
};

// A LoRA adapter on part of a projection's output: y[:, offset : offset + B.rows] +=
// scale * (x A^T) B^T, with A [rank, in] and B [out, rank] (PEFT's lora_A / lora_B).
struct LoraDelta {
  std::string target;        // PEFT module name, e.g. q_proj
  Param* A = nullptr;
  Param* B = nullptr;
  int out_offset = 0;
  float scale = 1.f;         // alpha / rank (or alpha / sqrt(rank) with rsLoRA)
  int rank() const { return int(A->shape[0]); }
  int out_size() const { return int(B->shape[0]); }
};

struct Linear {
  PackedWeight w;            // [out, in]
  std::vector<float> bias;   // [out] or empty
  std::vector<LoraDelta> lora;
  PackedWeight wt;           // [in, out]: W^T packed, built for training (input gradients)
  bool loaded() const { return w.N > 0; }
};

struct Norm {
  std::vector<float> weight, bias;  // [hidden]; bias only for LayerNorm
};

struct Layer {
  Norm attn_norm, mlp_norm;
  Norm q_norm, k_norm;  // qk_norm (Qwen3): weights [head_dim], applied to every head of q and of k
  // The norm a TensorSlot of this block names (index 0 attn_norm, 1 mlp_norm, 2 q_norm, 3 k_norm).
  Norm& norm(int index) { return index == 0 ? attn_norm : index == 1 ? mlp_norm : index == 2 ? q_norm : k_norm; }
  const Norm& norm(int index) const { return const_cast<Layer*>(this)->norm(index); }
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
  // [n_tokens, hidden] added to the new tokens' input embeddings (after position embeddings),
  // or null: the perturbations of embedding-space attacks and adversarial training.
  const float* embed_delta = nullptr;
};

// What forward() writes: logits for every new token or for the last of each item, or the
// final-norm hidden states of every new token (for the training losses).
enum class LogitsMode { all, last, hidden };

// Activations a forward pass keeps for the backward pass (training). K and V stay in the
// items' caches. Filled by forward() when given one.
struct LayerTrace {
  std::vector<float> x_in;   // [rows, hidden]   input of the block
  std::vector<float> xn1;    // [rows, hidden]   attention norm output
  std::vector<float> qkv;    // [rows, qkv_dim]  after rope
  std::vector<float> qk_pre; // [rows, q_dim + kv_dim] q and k before their per-head norms (qk_norm only)
  std::vector<float> att;    // [rows, q_dim]    attention output
  std::vector<float> x_mid;  // [rows, hidden]   after the attention residual
  std::vector<float> xn2;    // [rows, hidden]   MLP norm output
  std::vector<float> mlp;    // [rows, mlp_in]   MLP pre-activation
  std::vector<float> act;    // [rows, inter]    MLP activation output (SwiGLU only; GELU is in place)
  std::vector<std::vector<float>> lora_u;  // per adapter of the block, in linear order: [rows, rank]
};
struct ForwardTrace {
  std::vector<LayerTrace> layers;
  std::vector<float> x_final;      // [rows, hidden] input of the final norm
  float dropout = 0.f;             // LoRA dropout on the adapters' input (training only)
  uint64_t dropout_seed = 0;
};

// dropout_keep: the keep decision of LoRA dropout for one element (model/dropout_keep.h).

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

  // --- adapters and the red-flag rows -------------------------------------------------------
  // A new parameter owned by the model (zero-filled).
  Param* new_param(const std::string& name, const std::vector<long>& shape, bool decay = true);
  size_t param_count() const { return params_.size(); }
  // Drops the parameters made after the first `count` (made by a call that then failed, before
  // anything used them).
  void drop_params_from(size_t count) {
    if (count < params_.size()) params_.resize(count);
  }
  Param* find_param(const std::string& name);
  std::vector<Param*> params();
  // Adds a LoRA adapter on `target` (PEFT name) of block `layer`; throws if the block has no such projection.
  void add_lora(int layer, const std::string& target, Param* A, Param* B, float scale);
  void clear_adapters();
  void set_adapter_enabled(bool enabled) { adapter_enabled_ = enabled; }
  bool adapter_enabled() const { return adapter_enabled_; }
  bool has_adapters() const { return !params_.empty(); }
  // With the adapter enabled, token tokens[k] embeds as row k of `embed` [K, hidden] and its
  // logit uses row k of `head` [K, hidden] instead of the base rows (either may be null): the
  // trained red-flag token, or several flag tokens.
  void set_token_rows(const std::vector<int>& tokens, Param* embed, Param* head);
  void set_token_rows(int token, Param* embed, Param* head) { set_token_rows(std::vector<int>{token}, embed, head); }
  const std::vector<int>& token_rows_ids() const { return rf_tokens_; }
  // The index of `token` among the replaced rows, or -1.
  int token_rows_index(uint32_t token) const {
    for (size_t k = 0; k < rf_tokens_.size(); ++k)
      if (uint32_t(rf_tokens_[k]) == token) return int(k);
    return -1;
  }
  // The block's projections by index 0 qkv, 1 o, 2 mlp_in, 3 mlp_out.
  Linear& linear(int layer, int index);
  Layer& layer(int i) { return layers_[i]; }
  Norm& final_norm() { return final_norm_; }
  Linear& lm_head() { return lm_head_; }
  ThreadPool& pool() { return pool_; }
  // Writes the forward-time trace into `trace` (training). Uses LogitsMode::hidden or logits.
  void forward_traced(const std::vector<ForwardItem>& items, LogitsMode mode, float* out, ForwardTrace* trace,
                      const std::atomic<int>* cancel = nullptr);
  // LM head over final-norm hidden states xn [rows, hidden] -> logits [rows, vocab], with the
  // adapter's red-flag row when enabled (the same computation forward() ends with).
  void head_logits(const float* xn, long rows, float* out);
  // Embedding rows (engine dtype, converted to f32) and their writers, for full fine-tuning.
  void embed_row(uint32_t token, float* out) const;
  std::vector<float>& pos_embed() { return pos_embed_; }

 private:
  void linear_forward(const Linear& lin, int layer, int index, const float* x, long ldx, int rows, float* y,
                      long ldy, bool accumulate, LayerTrace* trace, float dropout, uint64_t seed);
  void embed_rows(const std::vector<ForwardItem>& items, float* x);
  void run_forward(const std::vector<ForwardItem>& items, LogitsMode mode, float* out, ForwardTrace* trace,
                   const std::atomic<int>* cancel, const std::function<void(int, int)>& progress);
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

  std::vector<std::unique_ptr<Param>> params_;
  bool adapter_enabled_ = true;
  std::vector<int> rf_tokens_;
  Param* rf_embed_ = nullptr;
  Param* rf_head_ = nullptr;

  // Scratch reused across forward calls (forward is not re-entrant).
  std::vector<float> x_, xn_, qkv_, att_, mlp_, act_, rows_, rope_cos_, rope_sin_, scores_, lora_x_, lora_u_;
  std::vector<std::unique_ptr<ThreadPool>> solo_;  // one-thread pools: matrix products inside the pool's tasks
};

}  // namespace rf
