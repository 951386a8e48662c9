// KV append into the paged cache (see paged_cache.h): one block per row, its threads over the
// row's n_kv_heads * head_dim values, so the reads of a row's k and v are coalesced and each
// head's write is a contiguous head_dim run in its slot.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/paged_cache.h"

namespace rf::cuda {

namespace {

constexpr int kAppendThreads = 128;

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class T>
__global__ void kv_append_kernel(T* k_cache, T* v_cache, const float* qkv, long row_stride, int k_offset,
                                 int v_offset, const int32_t* row_seq, const int32_t* row_pos, const int32_t* tables,
                                 const int32_t* table_offsets, int n_kv_heads, int head_dim, int block_tokens) {
  const int r = blockIdx.x;
  const int pos = row_pos[r];
  const long block = tables[table_offsets[row_seq[r]] + pos / block_tokens];
  const int slot = pos % block_tokens;
  const float* k = qkv + long(r) * row_stride + k_offset;
  const float* v = qkv + long(r) * row_stride + v_offset;
  const int n = n_kv_heads * head_dim;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int h = e / head_dim, d = e - h * head_dim;
    const long dst = ((block * n_kv_heads + h) * block_tokens + slot) * head_dim + d;
    store(k_cache + dst, k[e]);
    store(v_cache + dst, v[e]);
  }
}

}  // namespace

void kv_append(void* k_cache, void* v_cache, bool bf16, const float* qkv, long row_stride, int k_offset, int v_offset,
               const int32_t* row_seq, const int32_t* row_pos, const int32_t* tables, const int32_t* table_offsets, int rows,
               int n_kv_heads, int head_dim, int block_tokens, cudaStream_t stream) {
  if (rows <= 0) return;
  if (bf16)
    kv_append_kernel<__nv_bfloat16><<<rows, kAppendThreads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(k_cache), static_cast<__nv_bfloat16*>(v_cache), qkv, row_stride, k_offset, v_offset, row_seq,
        row_pos, tables, table_offsets, n_kv_heads, head_dim, block_tokens);
  else
    kv_append_kernel<float><<<rows, kAppendThreads, 0, stream>>>(static_cast<float*>(k_cache), static_cast<float*>(v_cache), qkv,
                                                                 row_stride, k_offset, v_offset, row_seq, row_pos, tables,
                                                                 table_offsets, n_kv_heads, head_dim, block_tokens);
}

}  // namespace rf::cuda
