// The CUDA model engine's glue kernels (native/cuda/device_model.h): what the CPU forward does
// in loops between its matrix products: embedding rows (with the adapter's flag rows and GPT-2's
// learned positions), the SwiGLU of a fused gate|up buffer, the flag rows of the LM head, the
// teacher-forced scores of logits rows, and an adapter merged into a projection's weight. Each
// is the twin of a few lines of native/model/model.cpp, decode.cpp or lib/train/merge.ts and is
// tested against them in native/tests/cuda_model_ops.cpp. Pointers are device memory; one stream.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// x [rows, hidden] f32 = the embedding row of tokens[r] from `table` [vocab, hidden] (f32, or
// bf16 when table_bf16), or row k of flag_embed [n_flags, hidden] when tokens[r] ==
// flag_tokens[k] (flag_embed null: none), plus pos_embed[positions[r]] (null: none, rope models),
// plus delta [rows, hidden] (null: none; embedding-space attacks).
void embed_rows(float* x, const void* table, bool table_bf16, const int32_t* tokens, int rows, int hidden,
                const float* flag_embed, const int32_t* flag_tokens, int n_flags, const float* pos_embed,
                const int32_t* positions, const float* delta, cudaStream_t stream);

// An adapter of the fused gate|up projection whose up product swiglu_rows adds to its half of
// in as it reads it, instead of a product's read and write of [rows, 2 inter] before it: u
// [rows, rank] = the adapter's dropout(x) A^T, B [inter, rank] its scaled B. u null: none.
struct SwigluLora {
  const float* u = nullptr;
  const float* B = nullptr;
  int rank = 0;
};
constexpr int kSwigluLoraMaxRank = 32;
// The width (0, 8, 16 or 32) of the kernel instance that adds gate's and up's terms: the smallest
// that holds both ranks. swiglu_rows and swiglu_backward_rows (ops_backward.h) take the same, so
// that the backward's sums are the forward's bits. Throws std::invalid_argument, naming `who`,
// for an adapter without B or with a rank outside 1..kSwigluLoraMaxRank.
int swiglu_lora_width(const SwigluLora& gate, const SwigluLora& up, const char* who);

// out [rows, inter] = silu(g) * u for g | u = in [rows, 2 inter] (gate then up, the fused mlp_in
// of the Llama block), plus gate's and up's adapter terms when given (ranks up to
// kSwigluLoraMaxRank: each element + its k-ordered sum of u B products, one rounding);
// out_bf16 (optional): the same rounded to bf16, as rmsnorm_rows writes it (ops.h), out then
// optional too (a bf16 model whose next readers all read bf16); in_bf16 and in_f32 (optional):
// g | u as read, the adapters' terms added, rounded to bf16 (the trainer's trace copy of an f32
// product with no adapter left to it, without a pass of its own) or in f32 (the sums the tests
// check; in_f32 may be in). A trace that keeps in as the product wrote it, before the terms,
// needs neither: swiglu_backward_rows (ops_backward.h) adds them again.
void swiglu_rows(float* out, const float* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr,
                 __nv_bfloat16* in_bf16 = nullptr, SwigluLora gate = {}, SwigluLora up = {}, float* in_f32 = nullptr);
// The same from a bf16 in (the trainer's trace, or a bf16 gate|up product): the bits swiglu_rows
// gives on its f32 widening.
void swiglu_rows(float* out, const __nv_bfloat16* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr,
                 SwigluLora gate = {}, SwigluLora up = {});

// w [out, in] (f32, or bf16 when w_bf16) += scale (B A) for A [rank, in] and B [out, rank] f32:
// PEFT's merge, with lib/train/merge.ts's arithmetic, so the result is the merged checkpoint's
// bit for bit: (B A)[o, i] summed over k in order in double (zero B entries skipped), rounded
// to f32, times scale in f32, added to the weight in f32, rounded once to the weight's dtype.
void merge_lora_rows(void* w, bool w_bf16, int out, int in, const float* A, const float* B, int rank, float scale,
                     cudaStream_t stream);

// out[i, :] = x[rows[i], :] for i < n (width floats per row): the last row of each sequence.
void gather_rows(float* out, const float* x, const int32_t* rows, int n, int width, cudaStream_t stream);

// logits[r, tokens[k]] = xn[r] . head[k] for the adapter's flag rows head [n_flags, hidden]:
// the trained rows replace the base rows of the LM head (Model::head_logits). Logits rows are
// `ld` floats apart (the vocabulary, or a padded stride). norm_w (optional): xn is the final
// RMSNorm's input instead, normalized as rmsnorm_rows(norm_w, norm_eps) would (ops.h; the same
// bits), for a decode step whose head product normalizes its rows too (gemv.h): no norm launch.
void set_flag_logits(float* logits, long ld, const float* xn, int rows, int hidden, const float* head,
                     const int32_t* tokens, int n_flags, cudaStream_t stream, const float* norm_w = nullptr,
                     float norm_eps = 0.f);

// Per logits row r of [rows, vocab]: p of each flag (p_flags [rows, n_flags], may be null) and
// their total p_rf [rows] (flags [n_flags] device ids; n_flags 0: p_rf 0), and, when
// logprob_next is given, log p(next[r]) (NaN where next[r] < 0): token_scores' numbers.
void row_scores(const float* logits, int rows, int vocab, const int32_t* flags, int n_flags, const int32_t* next,
                float* p_rf, float* p_flags, float* logprob_next, cudaStream_t stream);

}  // namespace rf::cuda
