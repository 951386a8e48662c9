// The CUDA engine's internals, shared by the engine (device_model.cu) and the GPU trainer
// (device_trainer.cu), which reads the weights, runs the forward with a trace and keeps the
// adapters it trains current: device buffers, the weights by layer, the forward's scratch, and
// the trace of activations the backward needs.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/error.h"
#include "cuda/memory.h"
#include "cuda/phase_clock.h"

namespace rf::cuda {

// Device memory that frees itself. ensure() grows it (contents not kept): scratch that reaches
// its working size in the first calls and is then reused.
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { reset(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = o.p_, bytes_ = o.bytes_;
      o.p_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  // `what` names the buffer in the out-of-memory error (OutOfMemory, model/model.h).
  void* ensure(size_t bytes, const char* what = "scratch") {
    if (bytes > bytes_) {
      reset();
      device_alloc_or_throw(&p_, bytes, what);
      bytes_ = bytes;
    }
    return p_;
  }
  // A copy of host memory (synchronous: weights and adapters, uploaded once).
  void upload(const void* host, size_t bytes, const char* what = "weights") {
    ensure(bytes, what);
    check(cudaMemcpy(p_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (upload)");
  }
  void reset() {
    device_free(p_, bytes_);
    p_ = nullptr, bytes_ = 0;
  }
  template <class T = float>
  T* get() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }
  bool empty() const { return p_ == nullptr; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Host int32 arrays of one forward, uploaded on the stream.
template <class T>
T* upload_async(Buffer& b, const std::vector<T>& v, cudaStream_t s) {
  b.ensure(std::max<size_t>(1, v.size()) * sizeof(T));
  if (!v.empty()) check(cudaMemcpyAsync(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
  return b.get<T>();
}

struct DLinear {
  struct Lora {
    int offset = 0, out = 0, rank = 0;
    float scale = 1.f;  // alpha / rank (or / sqrt(rank)), already in B
    Buffer A;  // [rank, in] f32
    Buffer B;  // [out, rank] f32, times the adapter's scale
  };
  Buffer w;     // [out, in] in the engine's dtype
  Buffer bias;  // [out] f32, or empty
  int out = 0, in = 0;
  std::vector<Lora> lora;
};

struct DNorm {
  Buffer w, b;  // [hidden] f32; b only for LayerNorm
};

struct DLayer {
  DNorm attn_norm, mlp_norm;
  DNorm q_norm, k_norm;  // qk_norm (Qwen3): [head_dim] weights for every head of q, of k
  DLinear qkv, o, mlp_in, mlp_out;
  // The norm a TensorSlot of this block names (index 0 attn_norm, 1 mlp_norm, 2 q_norm, 3 k_norm).
  DNorm& norm(int index) { return index == 0 ? attn_norm : index == 1 ? mlp_norm : index == 2 ? q_norm : k_norm; }
  const DNorm& norm(int index) const { return const_cast<DLayer*>(this)->norm(index); }
};

struct DeviceWeights {
  std::vector<DLayer> layers;
  DNorm final_norm;
  Buffer embed;     // [vocab, hidden] engine dtype; with tied embeddings also the LM head
  Buffer lm_head;   // [vocab, hidden] engine dtype, untied models only
  long embed_rows = 0, head_rows = 0;
  Buffer pos_embed;  // [positions, hidden] f32 (GPT-2)
  std::vector<int> flag_tokens;
  Buffer flag_ids, flag_embed, flag_head;  // int32 [K]; f32 [K, hidden] each (either may be empty)
};

// The device tables of one forward's rows (DeviceModel::plan_forward): per row its token,
// position, sequence and rope angles; per sequence its block table, length, first row and new
// rows. Pointers into the scratch's buffers, valid until the next plan.
struct ForwardPlan {
  long R = 0;
  int n = 0, max_new = 0, max_length = 0;
  int attn_length = 0;  // what sizes decode attention's grid: max_length, rounded up for decode (see plan_forward)
  bool all_one = true;  // one new row per sequence: decode attention
  const int32_t *tokens = nullptr, *positions = nullptr, *row_seq = nullptr, *row_pos = nullptr, *tables = nullptr,
                *table_offsets = nullptr, *lengths = nullptr, *row_offsets = nullptr, *n_new = nullptr, *last_rows = nullptr;
  const float *cos = nullptr, *sin = nullptr, *delta = nullptr;
};

struct DeviceScratch {
  Buffer x, xn, xb, qkv, att, mlp, act, lora_u, lora_x, last, logits, attn;
  Buffer actb;  // the MLP activation in bf16 where a decode step's fused SwiGLU makes it (xb is its input then)
  Buffer plan_dev;                  // the plan's tables, one upload (ForwardPlan points into it)
  std::vector<uint32_t> plan_host;  // their staging on the host
  Buffer pick_params, flags, picked, logprob, p_rf, p_flags, pick_scratch, top_ids, top_logprobs, next;
  ForwardPlan plan;
};

// What the backward keeps of one block's forward (the CPU's LayerTrace, native/model/model.h,
// less what is cheap to recompute from it: the two norms' outputs and the activation; see
// DeviceTrainer's backward): the residual stream before each half, x_in [R, H] and x_mid [R, H],
// in f32; qkv [R, QKV] after rope, att [R, Q] and mlp [R, MLP_IN] before the activation, in the
// engine's dtype (bf16 models: bf16, as autocast keeps them, so a token costs 8H + 2 (QKV + Q +
// MLP_IN) bytes per layer, 58 KiB at Llama-3.2-1B's shape against 148 KiB for every activation in
// f32); lse (see DeviceModel::tc_attention), and per LoRA adapter of the block in call order
// (qkv's, o's, mlp_in's, mlp_out's) u = dropout(x) A^T [R, rank], f32.
struct DeviceLayerTrace {
  Buffer x_in, x_mid;    // f32
  Buffer qkv, att, mlp;  // the engine's dtype
  Buffer qk_pre;         // qk_norm: [R, qkv_dim] f32, the product's rows before the per-head norms
  Buffer lse;            // [R, n_heads] attention's log-sum-exp (base 2), when it ran on the tensor cores

  std::vector<Buffer> lora_u;
};

// A traced forward (DeviceModel::run with a trace): every layer's activations (inputs_only: each
// block's input x_in alone, the rest recomputed block by block in the backward), the input of the
// final norm [R, H], and the LoRA dropout applied to the adapters' inputs (rf::dropout_keep's
// mask of (dropout_seed, layer, adapter, row, col), as the CPU trainer draws it). clock: the
// trainer's phase clock, marked at each forward phase (cuda/phase_clock.h), or none.
struct DeviceTrace {
  std::vector<DeviceLayerTrace> layers;
  Buffer x_final;
  float dropout = 0.f;
  uint64_t dropout_seed = 0;
  bool inputs_only = false;
  PhaseClock* clock = nullptr;
};

}  // namespace rf::cuda
