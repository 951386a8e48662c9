// CUDA row kernels of the transformer and the fused sampling epilogue, each the device twin
// of a CPU kernel (native/kernels/ops.h, native/model/decode.h) and tested against it on the
// same inputs (native/tests/cuda_ops.cpp, on a GPU machine). Pointers are device memory;
// every launch goes on `stream`; rows are independent (one block per row).
#pragma once
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/host_device.h"

namespace rf::cuda {

// out [rows, n] = w * x / sqrt(mean(x^2) + eps) per row (LlamaRMSNorm). out_bf16 (optional,
// [rows, n]): the same values rounded to bf16 as f32_to_bf16 rounds (cuda/bf16.h), for a bf16
// product that follows, without a conversion pass; out may then be null (only bf16 is read).
void rmsnorm_rows(float* out, const float* x, const float* w, int rows, int n, float eps, cudaStream_t stream,
                  __nv_bfloat16* out_bf16 = nullptr);

// out [rows, n] = (x - mean) / sqrt(var + eps) * w + b per row (nn.LayerNorm, biased variance);
// out_bf16 as for rmsnorm_rows.
void layernorm_rows(float* out, const float* x, const float* w, const float* b, int rows, int n, float eps,
                    cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr);

// x [rows, n_heads, head_dim] rotated in place (rotate_half pairs (i, i + head_dim/2)); cos/sin
// [rows, head_dim/2]: each row's table, computed on the host by rope_angles so every rope
// variant of the CPU engine (default, linear, dynamic NTK, llama3) is the same numbers here.
// row_stride: floats between rows' first heads (rows of a fused QKV buffer).
void rope_rows(float* x, long row_stride, int rows, int n_heads, int head_dim, const float* cos, const float* sin,
               cudaStream_t stream);

// Qwen3's per-head norms, in place: x's rows (row_stride floats apart) hold n_q heads then n_k
// heads of head_dim values (a fused QKV row's q and k); each head becomes w * x / sqrt(mean(x^2)
// + eps), w = wq [head_dim] for q's heads and wk for k's (the CPU's rmsnorm_forward per head).
void qk_norm_rows(float* x, long row_stride, int rows, int n_q, int n_k, int head_dim, const float* wq, const float* wk,
                  float eps, cudaStream_t stream);

// out [n] = silu(gate) * up.
void swiglu(float* out, const float* gate, const float* up, long n, cudaStream_t stream);

// x [n] = gelu_new(x) in place; or out [n] = gelu_new(x) of bf16 x (the same bits as in place
// on its f32 widening). out_bf16 (optional): the result rounded to bf16 as well, the bits
// f32_to_bf16 of it gives; in_bf16 (optional, in place only): the input x rounded to bf16 (the
// trainer's trace copy of the MLP's input).
void gelu_new(float* x, long n, cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr, __nv_bfloat16* in_bf16 = nullptr);
void gelu_new(float* out, const __nv_bfloat16* x, long n, cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr);

// The per-row parameters of pick_rows (the CPU's PickParams).
struct DevicePick {
  float temperature;  // 0: greedy
  uint64_t seed;      // with counter, the counter-based uniform draw
  uint64_t counter;   // e.g. the new token's position
  int top_k = 0;      // sampled rows: keep the k most likely (0: all)
  float top_p = 1.f;  // sampled rows: keep the smallest most-likely set reaching this mass (1: all)
};

// Whether a row draws from the whole vocabulary's weights (sampled at a finite 1 / T, no top_k:
// temperature alone, or top-p alone, which measures against their total): the rows whose weights
// pick_rows sums in a launch of its own. Host and device, one definition.
RF_HOST_DEVICE inline bool pick_draws_whole(const DevicePick& p) {
  return p.temperature > 0.f && 1.f / p.temperature < INFINITY && p.top_k == 0;
}

// The most candidates a top-k / top-p row sorts on the device (kPickMaxCandidates): a larger
// top_k, or a top-p nucleus past it, is answered with token kPickFallback (the host then picks
// that row from its logits, drawing the same numbers).
constexpr int kPickMaxCandidates = 2048;
constexpr uint32_t kPickFallback = 0xffffffffu;

// Per row of logits [rows, vocab]: the next token (greedy: the first maximum; sampled: from
// softmax(z / T) by the inverse CDF with the CPU's splitmix64 draw of (seed, counter): over the
// whole vocabulary in id order, or, with top-k / top-p, over the candidates sorted by logit
// (descending, ties by id) as rf::logits_pick does: the top k, then the shortest prefix whose
// probability reaches top_p (of the kept mass with top-k, of the whole vocabulary without;
// top-p alone looks at the best 256, then 2048, as the CPU grows its candidates), its
// log-probability at temperature 1, and the flag tokens' p: flags [n_flags] (device memory;
// <rf>, or <rf> and the category flags; none: 0) give p_flags [rows, n_flags] (may be null) and
// their total p_rf [rows], as the CPU's Flags. Writes token [rows] (kPickFallback for a row
// whose candidates exceed kPickMaxCandidates: its logprob is not written), logprob [rows].
// top_n (0 to kPickMaxTopN; 0: none): top_ids / top_logprobs [rows, top_n] (device) get each
// row's n most likely tokens, as rf::logits_pick's top_n (descending, ties by the lower id,
// log-probabilities at temperature 1; past the vocabulary id 0 and -inf), but for the rows
// answered kPickFallback, which the host redoes whole.
// scratch: pick_scratch_bytes(rows, vocab) bytes of device memory (each row's statistics, taken
// over slices of it by many blocks, and a sampled row's weight sums in double over 512 chunks of
// it, 32 chunks a block: a batch-1 step's one row is not left to one SM). whole_draws: whether
// any row is pick_draws_whole (the caller knows its parameters); false skips the weights' launch
// (a greedy step's), which must then be true of every row.
constexpr int kPickMaxTopN = 64;
size_t pick_scratch_bytes(int rows, int vocab);
void pick_rows(const float* logits, int rows, int vocab, const DevicePick* params, const int* flags, int n_flags,
               uint32_t* token, float* logprob, float* p_rf, float* p_flags, int top_n, uint32_t* top_ids, float* top_logprobs,
               void* scratch, cudaStream_t stream, bool whole_draws = true);

}  // namespace rf::cuda
