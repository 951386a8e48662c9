// The backward of causal (optionally sliding-window) attention on the device, for the GPU
// trainer: sequences whose rows are consecutive in a fused QKV buffer [rows, QKV] (q at column 0,
// k at Q, v at Q + KV, rope already applied), each attending to its own rows from position 0, as
// training batches do. Probabilities are recomputed from q and k (nothing of the forward is kept
// but its inputs), flash-attention style, in three passes:
//   1. per query row and head: the log-sum-exp of its scores and D = sum_j p_j (dout . v_j);
//   2. per query row and head: dq = scale sum_j p_j (dout . v_j - D) k_j;
//   3. per key row and kv head: dk_j = scale sum_i ds_ij q_i, dv_j = sum_i p_ij dout_i over the
//      query rows that see it and the heads of its group (GQA).
// Each gradient row is owned by one block and summed in a fixed order: no atomics, the same bits
// every run. Not tiled (O(T^2 d) reads per pass, f32): the exact path for f32 models, tested
// against the CPU's attention_row_backward in native/tests/cuda_attention_backward.cpp; bf16
// models take attention_backward_tc below.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

struct AttentionRows {
  const int32_t* seq_first;  // [n_seqs] the first row of each sequence (device)
  const int32_t* seq_len;    // [n_seqs] its length
  const int32_t* row_seq;    // [rows] the sequence of each row
  int n_seqs, rows;
  int n_heads, n_kv_heads, head_dim;
  int window;  // 0: none; else a query at i sees keys j with i - j < window
};

// Scratch floats attention_backward needs: 2 per (row, head).
long attention_backward_scratch(const AttentionRows& a);

// dqkv [rows, QKV] written (its q, k and v columns); dout [rows, n_heads * head_dim] is dL/d(the
// attention output). qkv and dqkv have row stride QKV = (n_heads + 2 n_kv_heads) head_dim.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const AttentionRows& a, float scale, float* scratch,
                        cudaStream_t stream);

// The same gradients on the tensor cores (attention_backward_tc.cu), for the forward that
// prefill_attention_tc ran (attention.h): q, k, v, dout and the products' operands in bf16, sums
// in f32, the probabilities recomputed from its lse [rows, n_heads] and D = rowsum(dout * out)
// from its output out [rows, n_heads * head_dim]. Two kernels, dK/dV per key tile and dQ per
// query tile, each row written once in a fixed order (no atomics). max_len: the longest
// sequence. head_dim a multiple of 16 up to 128 (attention_backward_tc_supports).
// qkv and out in f32 (rounded to bf16 as staged) or as a bf16 model's trace keeps them: the bf16
// overload reads half the bytes and needs no widening pass, and gives the same bits as the f32
// one on the widened values.
bool attention_backward_tc_supports(int head_dim);
long attention_backward_tc_scratch(const AttentionRows& a);  // floats
void attention_backward_tc(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                           const AttentionRows& a, int max_len, float scale, float* scratch, cudaStream_t stream);
void attention_backward_tc(float* dqkv, const float* dout, const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                           const AttentionRows& a, int max_len, float scale, float* scratch, cudaStream_t stream);

}  // namespace rf::cuda
