// A position's place in a layer's paged cache ([blocks, n_kv_heads, block_tokens, head_dim], see
// paged_cache.h) and how an element is stored there, shared by kv_append (paged_cache.cu) and
// gemv_rows' append epilogue (gemv.cu), so both write the same slots with the same bits.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// Head 0's row for position pos of sequence seq, in head_dim units: its block from the sequence's
// table, then the slot within the block.
__device__ __forceinline__ long cache_row(const int32_t* tables, const int32_t* table_offsets, int seq, int pos, int n_kv_heads,
                                          int block_tokens) {
  const long block = tables[table_offsets[seq] + pos / block_tokens];
  return block * n_kv_heads * block_tokens + pos % block_tokens;
}

// Element d of kv head h in that row.
__device__ __forceinline__ long cache_at(long row, int h, int d, int block_tokens, int head_dim) {
  return (row + long(h) * block_tokens) * head_dim + d;
}

__device__ __forceinline__ void cache_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void cache_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace rf::cuda
