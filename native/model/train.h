// Training on top of a loaded Model: a forward pass that keeps the activations the backward
// needs, the backward through every layer, LoRA adapters (PEFT semantics) or full fine-tuning,
// the trainable red-flag rows, and AdamW. Frozen weights stay packed (f32 or bf16); every
// trainable tensor and its optimiser state is f32.
#pragma once
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/rf_loss.h"
#include "model/model.h"

namespace rf {

enum class TrainMode { lora, full };

// Which projection of a block a LoRA adapter wraps, by PEFT module name.
// Llama family: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
// GPT-2: c_attn, c_proj (attention and MLP output both), c_fc.
struct LoraOptions {
  int rank = 8;
  float alpha = 16.f;
  float dropout = 0.f;
  bool rslora = false;                  // scale alpha / sqrt(rank) instead of alpha / rank
  std::vector<std::string> targets;     // PEFT target_modules
};

struct TrainOptions {
  TrainMode mode = TrainMode::lora;
  LoraOptions lora;
  int rf_token = -1;                    // the red-flag token; its embedding and head rows train (-1: none)
  std::vector<int> flag_tokens;         // or several flag tokens (<rf> and one per risk category): then
                                        // rf_token is unused and each one's rows train
  // The flag tokens in use: flag_tokens, or {rf_token}, or none.
  std::vector<int> flags() const {
    if (!flag_tokens.empty()) return flag_tokens;
    return rf_token >= 0 ? std::vector<int>{rf_token} : std::vector<int>{};
  }
  uint64_t seed = 0;                    // LoRA init and dropout masks
  // Activation recomputation (the GPU trainer): keep only each block's input in the forward and
  // recompute the block's activations in the backward (about one more forward of work, and
  // activation memory of one block instead of all). The CPU trainer keeps every activation.
  bool recompute = false;
};

struct AdamWOptions {
  float lr = 1e-4f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  float clip_norm = 0.f;                // 0: no clipping
};

// One loss row: a position of the trained batch whose next-token distribution is scored.
// kind ce: cross-entropy to `target` (language modelling, refusal baseline); kind red_flag:
// `target` is the flag token the row trains (-1: the first flag, <rf>).
struct LossRow {
  enum Kind : int32_t { benign_kl = 0, red_flag = 1, after_kl = 2, ce = 3 } kind;
  int32_t row;       // row in the trained batch (items concatenated)
  int32_t ref_row;   // row in the reference batch (KL kinds), else -1
  int32_t group;     // red-flag aggregation group, else -1
  int32_t target;    // ce target token; red_flag: its flag token or -1; else -1
};

// How a harmful conversation's red-flag positions combine: emitted at least once (noisy-OR),
// mean cross-entropy, or the sampled position only.
enum class Aggregation { any, mean, single };

struct LossOptions {
  Aggregation aggregation = Aggregation::any;
  float alpha_benign = 1.f, alpha_rf = 1.f, alpha_after = 1.f, alpha_ce = 1.f;
  float grad_scale = 1.f;               // e.g. 1 / accumulation steps
  uint64_t dropout_seed = 0;            // LoRA dropout masks of this micro-batch (resumable runs pass step-derived seeds)
  // false: the step leaves the parameters' gradients as they were, for steps that only want
  // input-embedding gradients (an adversarial-training inner attack between two real steps).
  bool param_grads = true;
};

struct LossTerms {
  double benign = 0, red_flag = 0, after = 0, ce = 0, total = 0;
  int n_benign = 0, n_groups = 0, n_after = 0, n_ce = 0;
  long tokens = 0;                      // trained-batch tokens
};

struct Sequence {
  const uint32_t* tokens;
  int n_tokens;
  // Trained-batch sequences only, both optional: a perturbation [n_tokens, hidden] added to the
  // input embeddings, and where step() writes dL/d(input embeddings) [n_tokens, hidden] (the
  // gradient embedding-space attacks and adversarial training follow; GCG's token gradients
  // are it times the embedding matrix).
  const float* embed_delta = nullptr;
  float* embed_grad = nullptr;
};

// One LoRA adapter a trainer creates: PEFT's module path of the site (e.g. self_attn.q_proj), the
// engine's target name, the projection (layer, index 0 qkv / 1 o / 2 mlp_in / 3 mlp_out), its input
// size and the site's output rows, and the scale alpha / rank (rsLoRA: alpha / sqrt(rank)).
struct LoraSitePlan {
  int layer = 0, index = 0;
  std::string site, target;
  long out = 0, in = 0;
  float scale = 1.f;
};
// Every site the options' targets match, layer by layer in the architecture's order (the order
// of the trainable parameters: A then B per site). Throws naming a target that matches nothing.
std::vector<LoraSitePlan> plan_lora_sites(const ModelConfig& config, const LoraOptions& options);
// PEFT's initialisation of lora_A [rank, in] from the trainer's generator (B starts at 0).
void init_lora_a(std::mt19937_64& rng, std::vector<float>& A, long in);

// A step's loss rows as the losses take them: the red-flag loss's rows (rf; their trained rows
// rf_src; the reference rows their KL rows read, ref_src, which each row's ref_row indexes) and
// the cross-entropy rows (trained rows ce_src, targets ce_targets). flags: the trained flag
// tokens (a red-flag row's target picks its flag).
struct SplitRows {
  std::vector<RfLossRow> rf;
  std::vector<int32_t> rf_src, ref_src, ce_src, ce_targets;
};
SplitRows split_loss_rows(const std::vector<LossRow>& rows, const std::vector<int>& flags);

// The red-flag loss's options for a step: its weights (times grad_scale) and aggregation, and the
// flag tokens (none trained, e.g. the refusal baseline: token 0 with its base row, which gives
// exactly the plain KL).
RfLossOptions rf_loss_options(const LossOptions& options, const std::vector<int>& flags);

// The checks every trainer makes of a step's rows (R rows in the trained batch, Rref in the
// reference): std::out_of_range / std::invalid_argument with the message that names the fault.
void check_loss_rows(const std::vector<LossRow>& rows, long R, long Rref, const std::vector<int>& flags, int vocab, bool full);

class Trainer {
 public:
  // Attaches to model (which must outlive the trainer); builds the adapters or the f32
  // master weights, and the transposed packs the backward pass multiplies by.
  Trainer(Model& model, const TrainOptions& options);
  ~Trainer();

  // One micro-batch: forward with activations, reference forward (adapter off), the loss,
  // and the backward, adding into the gradients (zeroed by optimizer_step).
  LossTerms step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                 const std::vector<LossRow>& rows, const LossOptions& options,
                 const std::atomic<int>* cancel = nullptr);

  // Clips by global norm, applies AdamW (decoupled weight decay), zeroes gradients;
  // returns the gradient norm before clipping. In full mode the packed weights are rebuilt.
  double optimizer_step(const AdamWOptions& options);

  // Call after writing parameter values directly (restoring a checkpoint): in full mode the
  // engine's packed weights are rebuilt from the f32 masters; LoRA values are used as they are.
  void params_changed() {
    if (options_.mode == TrainMode::full) sync_full_weights();
  }

  // Trainable parameters (adapters and red-flag rows, or every weight in full mode).
  std::vector<Param*> params();
  const TrainOptions& options() const { return options_; }
  long step_count() const { return adam_step_; }
  void set_step_count(long n) { adam_step_ = n; }
  long trainable_count() const;

 private:
  void sync_full_weights();
  void sync_untied_embed();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Model& model_;
  TrainOptions options_;
  long adam_step_ = 0;
};

}  // namespace rf
