// Attention over a paged KV cache on the device, read through each sequence's block table
// (native/model/block_pool.h), with no [T x T] score matrix and no per-sequence contiguous cache.
// Decode ("flash-decoding"): one query row per sequence (the token just appended), its keys
// split into chunks that separate blocks of threads reduce with an online softmax, then one pass
// combines the chunks. Prefill (flash-attention style): many new query rows per sequence, tiled
// over queries and keys with an online softmax per row, so a prompt (or a chunk of one that
// continues a cache) is one launch instead of one decode step per token.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// The cache of one layer: [n_blocks][n_kv_heads][block_tokens][head_dim] for K and for V, f32,
// or bf16 when bf16 is set (bf16 models: half the memory and the bytes a decode step reads).
struct PagedLayer {
  const void* k;
  const void* v;
  int block_tokens;
  int n_kv_heads;
  int head_dim;
  bool bf16 = false;
};

// Per sequence s: its block table at tables + table_offsets[s], its cache length lengths[s]
// (the query is position lengths[s] - 1, already in the cache).
struct PagedBatch {
  const int32_t* tables;
  const int32_t* table_offsets;
  const int32_t* lengths;
  int n_seqs;
  int max_length;  // at least the longest lengths[s] (sizes the split grid)
};

// Keys per split of decode attention: a batch's grid has ceil(max_length / kDecodeSplitKeys)
// splits per (sequence, head); a larger max_length is allowed (its extra splits find no key).
constexpr int kDecodeSplitKeys = 256;

// Scratch floats decode_attention needs for a batch (partial maxima, sums and outputs per split).
long decode_attention_scratch(int n_seqs, int n_heads, int head_dim, int max_length);

// out [n_seqs, n_heads, head_dim] = softmax(scale q.k_j) v_j over each sequence's keys (the
// last `window` of them when window > 0; causal by construction: the cache ends at the query).
// q [n_seqs, n_heads, head_dim] with rows q_stride floats apart (n_heads * head_dim, or the width
// of a fused QKV buffer whose q part it reads in place); n_heads a multiple of n_kv_heads (GQA);
// head_dim <= 256. out_bf16 (optional, out's shape): out rounded to bf16 as well (cuda/bf16.h),
// the o projection's operand with bf16 weights.
void decode_attention(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch, int n_heads,
                      float scale, int window, float* scratch, cudaStream_t stream, __nv_bfloat16* out_bf16 = nullptr);

// Prefill: per sequence s, n_new[s] new query rows, its last n_new[s] positions (already
// appended to the cache, whose length is lengths[s]; n_new[s] <= lengths[s], and fewer when a
// chunked prefill continues a cache). New row r is position p = lengths[s] - n_new[s] + r and
// attends causally to keys j in [0, p], or [max(0, p + 1 - window), p] when window > 0 (the
// last `window` keys including its own).
// q [total_rows, n_heads, head_dim], rows q_stride floats apart: the rows of all sequences in
// order, row_offsets[s] (device int32 [n_seqs]) the first row of s; out [total_rows, n_heads,
// head_dim], contiguous. n_new device int32 [n_seqs]; max_new the largest n_new[s] (sizes the
// grid). batch.max_length is not used. n_heads a multiple of n_kv_heads (GQA); head_dim <= 256.
// With n_new = 1 everywhere it computes what decode_attention does.
void prefill_attention(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
                       const int32_t* row_offsets, const int32_t* n_new, int total_rows, int max_new, int n_heads, float scale,
                       int window, cudaStream_t stream);

// prefill_attention on the tensor cores (attention_tc.cu): q, keys and values rounded to bf16,
// products by mma.sync with f32 accumulation, the softmax in f32. For models whose weights are
// bf16 (their activations carry bf16 error already); f32 models keep prefill_attention. The
// output differs from prefill_attention on the bf16-rounded inputs by at most 2^-8 max |v| per
// element (the rounding of the probabilities). head_dim a multiple of 16 up to 128
// (prefill_attention_tc_supports); other head_dims fall back to prefill_attention.
// lse (optional, [total_rows, n_heads]): each row's log-sum-exp of its scaled scores in base 2,
// log2 sum_j 2^(scale log2(e) q.k_j), which the tensor-core attention backward reads
// (attention_backward.h); +inf for a row that sees no key. out_bf16 (optional, [total_rows,
// n_heads * head_dim]): out rounded to bf16 as well (the o projection's operand, the trainer's
// trace copy), the bits f32_to_bf16 gives; out may then be null (a bf16 model whose o projection
// reads that copy alone: no f32 output written). Both only where supported.
bool prefill_attention_tc_supports(int head_dim);
void prefill_attention_tc(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
                          const int32_t* row_offsets, const int32_t* n_new, int total_rows, int max_new, int n_heads, float scale,
                          int window, cudaStream_t stream, float* lse = nullptr, __nv_bfloat16* out_bf16 = nullptr);

}  // namespace rf::cuda
