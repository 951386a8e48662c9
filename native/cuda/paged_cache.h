// Writing into the paged KV cache on the device: the new tokens' keys and values, straight out
// of the fused QKV rows the projection produced, go to their slots in the block pool (layout
// [n_blocks][n_kv_heads][block_tokens][head_dim] f32 or bf16, as rf::cuda::PagedLayer reads it; block
// tables from native/model/block_pool.h). One launch for a whole batch, prefill chunks and
// decode steps alike, so the attention kernels that follow find every key already in place.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// Row r of the batch (sequence row_seq[r], position row_pos[r]) goes to block
// tables[table_offsets[s] + pos / block_tokens], slot pos % block_tokens, for every kv head.
// qkv [rows, row_stride] holds that row's k at column k_offset and v at v_offset
// ([n_kv_heads, head_dim] each). row_seq, row_pos [rows], tables and table_offsets are device
// int32; each table must already reach the position (BlockPool::grow before the append).
// Rows must name distinct (sequence, position) pairs: they are written in no set order.
// The caches hold f32, or bf16 (rounded to nearest even) when bf16 is set.
// rope (optional, cos set): the rotary embedding on the way, rope_rows' rotation (ops.h, the same
// bits): the row's n_q_heads query heads at column 0 and its key heads are turned in place in
// qkv, and the turned keys go to the cache; one launch where rope_rows and the append took two.
// qkv_bf16 (optional): the rows after, q, k and v, rounded to bf16 as f32_to_bf16 rounds them
// ([rows, row_stride], the padding past v not written): the trainer's trace copy, no pass of its own.
struct AppendRope {
  int n_q_heads = 0;
  const float* cos = nullptr;  // [rows, head_dim / 2], as rope_rows'
  const float* sin = nullptr;
  __nv_bfloat16* qkv_bf16 = nullptr;
};
void kv_append(void* k_cache, void* v_cache, bool bf16, float* qkv, long row_stride, int k_offset, int v_offset,
               const int32_t* row_seq, const int32_t* row_pos, const int32_t* tables, const int32_t* table_offsets, int rows,
               int n_kv_heads, int head_dim, int block_tokens, cudaStream_t stream, const AppendRope& rope = {});

}  // namespace rf::cuda
