// KV append into the paged cache (see paged_cache.h): one block per row, its threads over the
// row's n_kv_heads * head_dim values (with rope: over its rotated pairs), so the reads of a row's
// k and v are coalesced and each head's write is a contiguous head_dim run in its slot.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/bf16.h"
#include "cuda/launch.cuh"
#include "cuda/paged_cache.cuh"
#include "cuda/paged_cache.h"
#include "cuda/rope.cuh"

namespace rf::cuda {

namespace {

constexpr int kAppendThreads = 128;

template <class T>
__global__ void kv_append_kernel(T* k_cache, T* v_cache, float* qkv, long row_stride, int k_offset, int v_offset,
                                 const int32_t* row_seq, const int32_t* row_pos, const int32_t* tables,
                                 const int32_t* table_offsets, int n_kv_heads, int head_dim, int block_tokens, AppendRope rope) {
  grid_dependents_launch();
  grid_dependency_wait();
  const int r = blockIdx.x;
  const long slot = cache_row(tables, table_offsets, row_seq[r], row_pos[r], n_kv_heads, block_tokens);
  float* row = qkv + long(r) * row_stride;
  float* k = row + k_offset;
  const float* v = row + v_offset;
  const int n = n_kv_heads * head_dim;
  const auto dst = [&](int h, int d) { return cache_at(slot, h, d, block_tokens, head_dim); };
  if (rope.cos) {
    // One thread per rotated pair (i, i + half): its reads come before its writes, and no other
    // thread touches the pair.
    const int half = head_dim / 2;
    const float* c = rope.cos + long(r) * half;
    const float* s = rope.sin + long(r) * half;
    __nv_bfloat16* b = rope.qkv_bf16 ? rope.qkv_bf16 + long(r) * row_stride : nullptr;
    for (int e = threadIdx.x; e < rope.n_q_heads * half; e += blockDim.x) {
      const int at = (e / half) * head_dim + e % half;
      rope_rotate(row[at], row[at + half], c[e % half], s[e % half]);
      if (b) b[at] = bf16_round(row[at]), b[at + half] = bf16_round(row[at + half]);
    }
    for (int e = threadIdx.x; e < n_kv_heads * half; e += blockDim.x) {
      const int h = e / half, i = e % half;
      float* kh = k + h * head_dim + i;
      rope_rotate(kh[0], kh[half], c[i], s[i]);
      cache_store(k_cache + dst(h, i), kh[0]);
      cache_store(k_cache + dst(h, i + half), kh[half]);
      if (b) b[k_offset + h * head_dim + i] = bf16_round(kh[0]), b[k_offset + h * head_dim + i + half] = bf16_round(kh[half]);
    }
    if (b)
      for (int e = threadIdx.x; e < n; e += blockDim.x) b[v_offset + e] = bf16_round(v[e]);
  } else {
    for (int e = threadIdx.x; e < n; e += blockDim.x) cache_store(k_cache + dst(e / head_dim, e % head_dim), k[e]);
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) cache_store(v_cache + dst(e / head_dim, e % head_dim), v[e]);
}

}  // namespace

void kv_append(void* k_cache, void* v_cache, bool bf16, float* qkv, long row_stride, int k_offset, int v_offset,
               const int32_t* row_seq, const int32_t* row_pos, const int32_t* tables, const int32_t* table_offsets, int rows,
               int n_kv_heads, int head_dim, int block_tokens, cudaStream_t stream, const AppendRope& rope) {
  if (rows <= 0) return;
  if (bf16)
    launch_dependent(kv_append_kernel<__nv_bfloat16>, rows, kAppendThreads, 0, stream, static_cast<__nv_bfloat16*>(k_cache),
                     static_cast<__nv_bfloat16*>(v_cache), qkv, row_stride, k_offset, v_offset, row_seq, row_pos, tables,
                     table_offsets, n_kv_heads, head_dim, block_tokens, rope);
  else
    launch_dependent(kv_append_kernel<float>, rows, kAppendThreads, 0, stream, static_cast<float*>(k_cache),
                     static_cast<float*>(v_cache), qkv, row_stride, k_offset, v_offset, row_seq, row_pos, tables, table_offsets,
                     n_kv_heads, head_dim, block_tokens, rope);
}

}  // namespace rf::cuda
