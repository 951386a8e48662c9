// Flash-decoding over a paged cache (see attention.h). Pass 1: grid (sequence, head, split);
// each block of kWarps warps takes the split's keys, a warp per key at a time: the lanes share
// the head's dimensions (up to 8 each), a warp-reduced dot product gives the score, and each
// warp keeps an online softmax (running max m, sum l, weighted values acc), its next keys' and
// values' rows loaded several keys ahead; the warps then merge into the split's (m, l, acc).
// Pass 2: grid (sequence, head) merges the splits; with one split (lengths up to
// kDecodeSplitKeys), pass 1 writes the output and pass 2 is not launched.
//
// Prefill: grid (query tile, head, sequence), a block of kPrefillWarps warps owning a tile of
// kPrefillRows new query rows of one head (kRowsPerWarp rows per warp). The block walks the
// key tiles (kPrefillKeys = 32 keys, one per lane) that its rows' causal / window ranges touch,
// staging each tile's keys and values from the paged cache in shared memory; per tile a warp
// computes its rows' 32 scores (lane j: key j), masks them, updates each row's online softmax
// (m, l) with warp reductions, and accumulates p.V into registers (lane owns dims lane + 32 i).
// f32 arithmetic on CUDA cores (the cache f32 or bf16): the exact path, for f32 models; bf16
// models prefill on the tensor cores (attention_tc.cu).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/launch.cuh"

namespace rf::cuda {

namespace {

constexpr int kWarps = 8;  // decode: a split's 256 keys are 32 a warp
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

int splits_for(int max_length) { return (max_length + kDecodeSplitKeys - 1) / kDecodeSplitKeys; }

__device__ __forceinline__ float kv_float(float x) { return x; }
__device__ __forceinline__ float kv_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// scratch layout: m [S, H, splits], l [S, H, splits], acc [S, H, splits, head_dim]. T: the cache's type.
// y set (one split): the block writes the output y [S, H, head_dim] itself, as decode_combine
// would from its one split (the same bits: its terms scaled by exp(0) = 1), and the launch of
// decode_combine is saved.
// DPL: dimensions per lane (head_dim <= 32 DPL). A warp's keys are j = lo + warp, + kWarps, ...,
// taken into its online softmax one at a time in that order; their table entries, then their key
// and value rows, are loaded KEYS at a time before any is used, and their scores' warp reductions
// run side by side, so a warp waits for memory about once per KEYS keys instead of twice per key,
// and for one shuffle tree's latency instead of KEYS (a decode step's few blocks have few warps
// to hide either with).
template <class T, int DPL, int KEYS>
__global__ void decode_partial(const float* q, long q_stride, PagedLayer layer, PagedBatch batch, int n_heads, float scale,
                               int window, int n_splits, float* m_out, float* l_out, float* acc_out, float* y,
                               __nv_bfloat16* y_bf16) {
  grid_dependents_launch();
  grid_dependency_wait();
  const int s = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hd = layer.head_dim, B = layer.block_tokens;
  const int kvh = h / (n_heads / layer.n_kv_heads);
  const int length = batch.lengths[s];
  const int first = window > 0 && length > window ? length - window : 0;
  const int lo = max(first, split * kDecodeSplitKeys), hi = min(length, (split + 1) * kDecodeSplitKeys);
  const int32_t* table = batch.tables + batch.table_offsets[s];

  float qv[DPL], acc[DPL];
  const float* qr = q + long(s) * q_stride + long(h) * hd;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < hd ? qr[d] * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;
  for (int j0 = lo + warp; j0 < hi; j0 += KEYS * kWarps) {
    long base[KEYS];
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int j = j0 + u * kWarps;
      base[u] = j < hi ? ((long(table[j / B]) * layer.n_kv_heads + kvh) * B + j % B) * hd : 0;
    }
    float kf[KEYS][DPL], vf[KEYS][DPL];
#pragma unroll
    for (int u = 0; u < KEYS; ++u)
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        const bool in = j0 + u * kWarps < hi && d < hd;
        kf[u][i] = in ? kv_float(static_cast<const T*>(layer.k)[base[u] + d]) : 0.f;
        vf[u][i] = in ? kv_float(static_cast<const T*>(layer.v)[base[u] + d]) : 0.f;
      }
    // The keys' scores, whose warp reductions are independent of one another, before the
    // softmax's chain through them.
    float score[KEYS];
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        if (lane + 32 * i < hd) dot += qv[i] * kf[u][i];
      score[u] = warp_sum(dot);
    }
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      if (j0 + u * kWarps >= hi) break;  // the same for the whole warp
      const float m_new = fmaxf(m, score[u]);
      const float correction = expf(m - m_new);
      const float p = expf(score[u] - m_new);
      l = l * correction + p;
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        if (lane + 32 * i < hd) acc[i] = acc[i] * correction + p * vf[u][i];
      m = m_new;
    }
  }

  // Merge the warps: each writes its (m, l, acc) to shared memory, warp 0 combines.
  __shared__ float sm[kWarps], sl[kWarps], sacc[kWarps][32 * kMaxDimsPerLane];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
  for (int i = 0; i < DPL; ++i) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float M = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm[w]);
  float L = 0.f;
  float out[DPL] = {};
  for (int w = 0; w < kWarps; ++w) {
    if (sl[w] == 0.f) continue;  // a warp that saw no key
    const float c = expf(sm[w] - M);
    L += sl[w] * c;
    for (int i = 0; i < DPL; ++i) out[i] += sacc[w][lane + 32 * i] * c;
  }
  if (y) {
    const long row = long(s) * n_heads + h;
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d >= hd) continue;
      const float v = L > 0.f ? out[i] / L : 0.f;
      y[row * hd + d] = v;
      if (y_bf16) y_bf16[row * hd + d] = bf16_round(v);
    }
    return;
  }
  const long slot = (long(s) * n_heads + h) * n_splits + split;
  if (lane == 0) m_out[slot] = M, l_out[slot] = L;
  for (int i = 0; i < DPL; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) acc_out[slot * hd + d] = out[i];
  }
}

__global__ void decode_combine(float* out, int n_heads, int hd, int n_splits, const float* m_in, const float* l_in,
                               const float* acc_in, __nv_bfloat16* out_bf16) {
  grid_dependents_launch();
  grid_dependency_wait();
  const int s = blockIdx.x, h = blockIdx.y;
  const long first = (long(s) * n_heads + h) * n_splits;
  float M = -FLT_MAX;
  for (int k = 0; k < n_splits; ++k)
    if (l_in[first + k] > 0.f) M = fmaxf(M, m_in[first + k]);
  float L = 0.f;
  for (int k = 0; k < n_splits; ++k)
    if (l_in[first + k] > 0.f) L += l_in[first + k] * expf(m_in[first + k] - M);
  float* o = out + (long(s) * n_heads + h) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.f;
    for (int k = 0; k < n_splits; ++k)
      if (l_in[first + k] > 0.f) sum += acc_in[(first + k) * hd + d] * expf(m_in[first + k] - M);
    const float y = L > 0.f ? sum / L : 0.f;
    o[d] = y;
    if (out_bf16) out_bf16[(long(s) * n_heads + h) * hd + d] = bf16_round(y);
  }
}

constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = 32 * kPrefillWarps;
constexpr int kRowsPerWarp = 8;
constexpr int kPrefillRows = kPrefillWarps * kRowsPerWarp;  // query rows per block
constexpr int kPrefillKeys = 32;                             // keys per tile: one per lane

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Dynamic shared memory of one prefill block: key offsets long [kPrefillKeys], then
// Q f32 [kPrefillRows][hd], K f32 [kPrefillKeys][hd + 1] (the odd stride puts the 32 lanes'
// keys in 32 banks when each lane reads its own key at the same d), V f32 [kPrefillKeys][hd].
// 31,104 bytes at hd 80, 49,536 at hd 128, 98,688 at hd 256.
size_t prefill_smem_bytes(int hd) {
  return sizeof(long) * kPrefillKeys +
         sizeof(float) * (size_t(kPrefillRows) * hd + size_t(kPrefillKeys) * (hd + 1) + size_t(kPrefillKeys) * hd);
}

// kDims: dims per lane, ceil(head_dim / 32) rounded up to 2, 4 or 8, so acc stays in registers.
template <int kDims, class T>
__global__ void __launch_bounds__(kPrefillThreads)
    prefill_kernel(float* out, const float* q, long q_stride, PagedLayer layer, PagedBatch batch, const int32_t* row_offsets,
                   const int32_t* n_new, int n_heads, float scale, int window) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd = layer.head_dim, B = layer.block_tokens, kstride = hd + 1;
  long* kbase = reinterpret_cast<long*>(smem_raw);  // [kPrefillKeys] cache offset of each key, -1: none
  float* qs = reinterpret_cast<float*>(kbase + kPrefillKeys);
  float* ks = qs + kPrefillRows * hd;
  float* vs = ks + kPrefillKeys * kstride;

  const int s = blockIdx.z, h = blockIdx.y;
  const int rows = n_new[s];
  // The last query tiles see the most keys: hand them out first so they do not run alone at the end.
  const int r0 = (gridDim.x - 1 - blockIdx.x) * kPrefillRows;
  if (r0 >= rows) return;  // the whole block: past this sequence's new rows
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int length = batch.lengths[s];
  const int start = length - rows;  // position of new row 0
  const int r_end = min(rows, r0 + kPrefillRows);
  // The union of the block's rows' key ranges: [key_lo, key_hi].
  const int key_hi = start + r_end - 1;
  const int key_lo = window > 0 ? max(0, start + r0 + 1 - window) : 0;
  const int kvh = h / (n_heads / layer.n_kv_heads);
  const int32_t* table = batch.tables + batch.table_offsets[s];
  const long q_row0 = long(row_offsets[s]) + r0;

  // Q tile, pre-scaled (as decode does); rows past n_new are zeros, computed but never written.
  for (int e = tid; e < kPrefillRows * hd; e += kPrefillThreads) {
    const int r = e / hd, d = e - r * hd;
    qs[e] = r0 + r < rows ? q[(q_row0 + r) * q_stride + h * hd + d] * scale : 0.f;
  }

  // This warp's rows: warp * kRowsPerWarp + i of the tile. Row i sees keys [lo[i], hi[i]];
  // a row past n_new gets an empty range.
  int lo[kRowsPerWarp], hi[kRowsPerWarp];
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDims];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i, p = start + r;
    hi[i] = r < rows ? p : -1;
    lo[i] = r < rows && window > 0 ? max(0, p + 1 - window) : 0;
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kDims; ++c) acc[i][c] = 0.f;
  }
  const float* qw = qs + warp * kRowsPerWarp * hd;
  const float* kr = ks + lane * kstride;

  // Tiles aligned to kPrefillKeys from the one holding key_lo; the ones before it are skipped.
  for (int t0 = key_lo - key_lo % kPrefillKeys; t0 <= key_hi; t0 += kPrefillKeys) {
    __syncthreads();  // the previous tile's K / V are consumed (first time: nothing pending)
    if (tid < kPrefillKeys) {
      const int j = t0 + tid;
      // Only keys in [key_lo, key_hi] are read: past key_hi the table may not reach that far.
      kbase[tid] = j >= key_lo && j <= key_hi ? ((long(table[j / B]) * layer.n_kv_heads + kvh) * B + j % B) * hd : -1;
    }
    __syncthreads();
    for (int e = tid; e < kPrefillKeys * hd; e += kPrefillThreads) {
      const int k = e / hd, d = e - k * hd;
      const long base = kbase[k];
      ks[k * kstride + d] = base >= 0 ? kv_float(static_cast<const T*>(layer.k)[base + d]) : 0.f;
      vs[e] = base >= 0 ? kv_float(static_cast<const T*>(layer.v)[base + d]) : 0.f;
    }
    __syncthreads();  // K / V (and, the first time, Q) staged

    // Scores of the warp's rows against key t0 + lane.
    float sc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) sc[i] = 0.f;
    for (int d = 0; d < hd; ++d) {
      const float kd = kr[d];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) sc[i] += qw[i * hd + d] * kd;  // qw: a broadcast read
    }

    // Online softmax per row: m the running max, l the running sum of exp(score - m), acc
    // the running sum of exp(score - m) v; both rescaled when m grows.
    const int j = t0 + lane;
    float p[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const bool visible = j >= lo[i] && j <= hi[i];
      const float score = visible ? sc[i] : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(score));  // the same in every lane
      if (m_new == -INFINITY) {  // warp-uniform: the row has seen no visible key yet
        p[i] = 0.f;
        continue;
      }
      const float correction = expf(m[i] - m_new);  // 0 while m[i] is still -inf
      p[i] = visible ? expf(score - m_new) : 0.f;
      l[i] = l[i] * correction + warp_sum(p[i]);
#pragma unroll
      for (int c = 0; c < kDims; ++c) acc[i][c] *= correction;
      m[i] = m_new;
    }

    // acc += p.V: key k's weight comes from lane k, its values from shared memory.
    for (int k = 0; k < kPrefillKeys; ++k) {
      float vk[kDims];
#pragma unroll
      for (int c = 0; c < kDims; ++c) {
        const int d = lane + 32 * c;
        vk[c] = d < hd ? vs[k * hd + d] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float pk = __shfl_sync(0xffffffffu, p[i], k);
#pragma unroll
        for (int c = 0; c < kDims; ++c) acc[i][c] += pk * vk[c];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i;
    if (r >= rows) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;  // l = 0 only for a row with no key (n_new > length)
    float* o = out + ((long(row_offsets[s]) + r) * n_heads + h) * hd;
#pragma unroll
    for (int c = 0; c < kDims; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) o[d] = acc[i][c] * inv;
    }
  }
}

template <int kDims>
void prefill_launch(dim3 grid, float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
                    const int32_t* row_offsets, const int32_t* n_new, int n_heads, float scale, int window,
                    cudaStream_t stream) {
  const size_t smem = prefill_smem_bytes(layer.head_dim);
  // Past 48 KiB a kernel must opt in to dynamic shared memory (hd > 120 here; the H200 allows 227 KiB).
  if (layer.bf16) {
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(prefill_kernel<kDims, __nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    prefill_kernel<kDims, __nv_bfloat16><<<grid, kPrefillThreads, smem, stream>>>(out, q, q_stride, layer, batch, row_offsets,
                                                                                 n_new, n_heads, scale, window);
  } else {
    if (smem > 48 * 1024) cudaFuncSetAttribute(prefill_kernel<kDims, float>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    prefill_kernel<kDims, float><<<grid, kPrefillThreads, smem, stream>>>(out, q, q_stride, layer, batch, row_offsets, n_new,
                                                                         n_heads, scale, window);
  }
}

// decode_partial's instance for the head size: as many dimensions per lane as it needs (DPL), and
// keys in flight per warp so that a warp's rows stay at 32 floats of registers.
template <class T>
void decode_partial_launch(dim3 grid, cudaStream_t stream, const float* q, long q_stride, const PagedLayer& layer,
                           const PagedBatch& batch, int n_heads, float scale, int window, int n_splits, float* m, float* l, float* acc,
                           float* y, __nv_bfloat16* y_bf16) {
  const auto go = [&](auto dims_per_lane) {
    constexpr int DPL = decltype(dims_per_lane)::value, kKeys = DPL <= 2 ? 8 : 16 / DPL;
    launch_dependent(decode_partial<T, DPL, kKeys>, grid, 32 * kWarps, 0, stream, q, q_stride, layer, batch, n_heads, scale, window,
                     n_splits, m, l, acc, y, y_bf16);
  };
  const int hd = layer.head_dim;
  if (hd <= 32) go(std::integral_constant<int, 1>());
  else if (hd <= 64) go(std::integral_constant<int, 2>());
  else if (hd <= 128) go(std::integral_constant<int, 4>());
  else go(std::integral_constant<int, 8>());
}

}  // namespace

long decode_attention_scratch(int n_seqs, int n_heads, int head_dim, int max_length) {
  const long slots = long(n_seqs) * n_heads * splits_for(max_length);
  return slots * (2 + head_dim);
}

void decode_attention(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch, int n_heads,
                      float scale, int window, float* scratch, cudaStream_t stream, __nv_bfloat16* out_bf16) {
  if (batch.n_seqs <= 0 || batch.max_length <= 0) return;
  const int n_splits = splits_for(batch.max_length);
  const long slots = long(batch.n_seqs) * n_heads * n_splits;
  float* m = scratch;
  float* l = scratch + slots;
  float* acc = scratch + 2 * slots;
  const dim3 grid(batch.n_seqs, n_heads, n_splits);
  // One split (every length up to kDecodeSplitKeys): its block writes the output, no combine.
  float* y = n_splits == 1 ? out : nullptr;
  __nv_bfloat16* y_bf16 = n_splits == 1 ? out_bf16 : nullptr;
  if (layer.bf16)
    decode_partial_launch<__nv_bfloat16>(grid, stream, q, q_stride, layer, batch, n_heads, scale, window, n_splits, m, l, acc, y, y_bf16);
  else
    decode_partial_launch<float>(grid, stream, q, q_stride, layer, batch, n_heads, scale, window, n_splits, m, l, acc, y, y_bf16);
  if (n_splits > 1)
    launch_dependent(decode_combine, dim3(batch.n_seqs, n_heads), 128, 0, stream, out, n_heads, layer.head_dim, n_splits, m, l, acc,
                     out_bf16);
}

void prefill_attention(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
                       const int32_t* row_offsets, const int32_t* n_new, int total_rows, int max_new, int n_heads, float scale,
                       int window, cudaStream_t stream) {
  if (batch.n_seqs <= 0 || total_rows <= 0 || max_new <= 0) return;
  const dim3 grid((max_new + kPrefillRows - 1) / kPrefillRows, n_heads, batch.n_seqs);
  if (layer.head_dim <= 64)
    prefill_launch<2>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, stream);
  else if (layer.head_dim <= 128)
    prefill_launch<4>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, stream);
  else
    prefill_launch<8>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, stream);
}

}  // namespace rf::cuda
