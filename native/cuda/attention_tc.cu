// Prefill attention on the tensor cores (see attention.h, prefill_attention_tc), flash-attention 2
// style. Grid (query tile, head, sequence); a block of 4 warps owns 64 new query rows of one head,
// 16 per warp. The block walks 64-key tiles of its rows' causal / window range, staging each
// tile's keys ([key][d]) and values (transposed, [d][key]) from the f32 paged cache into shared
// memory as bf16. Per tile a warp computes its 16 x 64 scores with mma.sync (Q's fragments stay
// in registers for the whole walk), masks them, updates each row's online softmax in f32 (exp2,
// the scale folded into log2 e), rounds the probabilities to bf16 straight from the accumulator
// registers into the A fragments of P V (cuda/mma.h), and accumulates the output in f32
// registers. Softmax sums use the unrounded probabilities, so the output's only error beyond the
// bf16 inputs is the rounding of P: at most 2^-8 max |v| per element.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/mma.h"

namespace rf::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query rows per block
constexpr int kKeys = 64;           // keys per tile
constexpr int kKeyTiles = kKeys / 8;
constexpr int kPad = 8;             // bf16 of padding per shared row: consecutive rows start 4 banks apart
constexpr float kLog2e = 1.4426950408889634f;

// Dynamic shared memory: key offsets long [kKeys], then bf16 Q [kRows][hd + kPad],
// K [kKeys][hd + kPad], V^T [hd][kKeys + kPad]. 53,760 bytes at hd 128.
size_t smem_bytes(int hd) {
  return sizeof(long) * kKeys + sizeof(__nv_bfloat16) * (size_t(kRows + kKeys) * (hd + kPad) + size_t(hd) * (kKeys + kPad));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Four consecutive cache values as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}

// kK: head_dim / 16, the k-steps of Q K^T; the output has 2 kK tiles of 8 dims. T: the cache's type.
template <int kK, class T>
__global__ void __launch_bounds__(kThreads)
    prefill_tc_kernel(float* out, const float* q, long q_stride, PagedLayer layer, PagedBatch batch, const int32_t* row_offsets,
                      const int32_t* n_new, int n_heads, float scale_log2, int window, float* lse, __nv_bfloat16* out_bf16) {
  constexpr int kHd = 16 * kK, kN = 2 * kK, kQs = kHd + kPad, kVs = kKeys + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long* kbase = reinterpret_cast<long*>(smem_raw);  // [kKeys] cache offset of each key, -1: none
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(kbase + kKeys);
  __nv_bfloat16* ks = qs + kRows * kQs;
  __nv_bfloat16* vt = ks + kKeys * kQs;

  const int s = blockIdx.z, h = blockIdx.y;
  const int rows = n_new[s];
  // The last query tiles see the most keys: hand them out first.
  const int r0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  if (r0 >= rows) return;  // the whole block
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int B = layer.block_tokens;
  const int start = batch.lengths[s] - rows;  // position of new row 0
  const int r_end = min(rows, r0 + kRows);
  const int key_hi = start + r_end - 1;
  const int key_lo = window > 0 ? max(0, start + r0 + 1 - window) : 0;
  const int kvh = h / (n_heads / layer.n_kv_heads);
  const int32_t* table = batch.tables + batch.table_offsets[s];
  const long q_row0 = long(row_offsets[s]) + r0;

  for (int e = tid; e < kRows * kHd; e += kThreads) {
    const int r = e / kHd, d = e - r * kHd;
    qs[r * kQs + d] = __float2bfloat16_rn(r0 + r < rows ? q[(q_row0 + r) * q_stride + h * kHd + d] : 0.f);
  }
  __syncthreads();
  const int wr = warp * 16;  // the warp's first row in the tile
  uint32_t qa[kK][4];
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) load_a(qa[kk], qs, kQs, wr, kk, g, t);
  // This thread's two rows, g and g + 8 of the warp's 16: visible keys [lo, hi] (hi -1: none).
  int lo[2], hi[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + wr + g + 8 * i, p = start + r;
    hi[i] = r < rows ? p : -1;
    lo[i] = r < rows && window > 0 ? max(0, p + 1 - window) : 0;
  }
  // The warp's key range, to skip tiles none of its rows see.
  const int w_hi = start + min(rows, r0 + wr + 16) - 1;
  const int w_lo = window > 0 ? max(0, start + r0 + wr + 1 - window) : 0;
  const bool w_any = r0 + wr < rows;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kN][4];
#pragma unroll
  for (int n = 0; n < kN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t0 = key_lo - key_lo % kKeys; t0 <= key_hi; t0 += kKeys) {
    __syncthreads();  // the previous tile is consumed
    if (tid < kKeys) {
      const int j = t0 + tid;
      kbase[tid] = j >= key_lo && j <= key_hi ? ((long(table[j / B]) * layer.n_kv_heads + kvh) * B + j % B) * kHd : -1;
    }
    __syncthreads();
    for (int e = tid; e < kKeys * (kHd / 4); e += kThreads) {
      const int k = e / (kHd / 4), d = 4 * (e - k * (kHd / 4));
      const long base = kbase[k];
      float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
      if (base >= 0) {
        kv = load4(static_cast<const T*>(layer.k) + base + d);
        vv = load4(static_cast<const T*>(layer.v) + base + d);
      }
      __nv_bfloat16* kr = ks + k * kQs + d;
      kr[0] = __float2bfloat16_rn(kv.x), kr[1] = __float2bfloat16_rn(kv.y);
      kr[2] = __float2bfloat16_rn(kv.z), kr[3] = __float2bfloat16_rn(kv.w);
      vt[(d + 0) * kVs + k] = __float2bfloat16_rn(vv.x);
      vt[(d + 1) * kVs + k] = __float2bfloat16_rn(vv.y);
      vt[(d + 2) * kVs + k] = __float2bfloat16_rn(vv.z);
      vt[(d + 3) * kVs + k] = __float2bfloat16_rn(vv.w);
    }
    __syncthreads();
    if (!w_any || t0 > w_hi || t0 + kKeys - 1 < w_lo) continue;  // warp-uniform: no row of the warp sees the tile

    // Scores S = Q K^T: tile n holds keys t0 + 8 n .. + 7.
    float sc[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t b[2];
        load_b(b, ks, kQs, 8 * n, kk, g, t);
        mma_bf16_16816(sc[n], qa[kk], b);
      }
    }
    // Mask and scale (to log2 units); the rows' running maxima across the quad's 64 keys.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, j = t0 + 8 * n + 2 * t + (e & 1);
        sc[n][e] = j >= lo[i] && j <= hi[i] ? sc[n][e] * scale_log2 : -INFINITY;
        mx[i] = fmaxf(mx[i], sc[n][e]);
      }
    float base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m[i], quad_max(mx[i]));
      base[i] = m_new == -INFINITY ? 0.f : m_new;  // a row with no visible key yet: every p is 0
      const float correction = exp2f(m[i] - base[i]);  // 0 while m[i] is -inf
      m[i] = m_new;
      l[i] *= correction;
#pragma unroll
      for (int n = 0; n < kN; ++n) o[n][2 * i] *= correction, o[n][2 * i + 1] *= correction;
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[n][e] = exp2f(sc[n][e] - base[e >> 1]);
        l[e >> 1] += sc[n][e];  // this thread's share; the quad sums at the end
      }
    // O += P V, 16 keys per step: P's A fragment is score tiles 2 ks and 2 ks + 1.
#pragma unroll
    for (int kst = 0; kst < kKeys / 16; ++kst) {
      uint32_t pa[4];
      a_from_accumulators(pa, sc[2 * kst], sc[2 * kst + 1]);
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        uint32_t b[2];
        load_b(b, vt, kVs, 8 * n, kst, g, t);
        mma_bf16_16816(o[n], pa, b);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float sum = quad_sum(l[i]);
    const int r = r0 + wr + g + 8 * i;
    if (r >= rows) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (lse && t == 0) lse[(long(row_offsets[s]) + r) * n_heads + h] = sum > 0.f ? m[i] + log2f(sum) : INFINITY;
    const long at = ((long(row_offsets[s]) + r) * n_heads + h) * kHd;
    if (out) store_accumulator_row(out + at, o, i, inv, t);
    if (out_bf16)
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        // The bits f32_to_bf16 gives on out (each value's product with inv, as stored above).
        out_bf16[at + 8 * n + 2 * t] = bf16_round(o[n][2 * i] * inv);
        out_bf16[at + 8 * n + 2 * t + 1] = bf16_round(o[n][2 * i + 1] * inv);
      }
  }
}

template <int kK>
void launch(dim3 grid, float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
            const int32_t* row_offsets, const int32_t* n_new, int n_heads, float scale, int window, float* lse, __nv_bfloat16* out_bf16,
            cudaStream_t stream) {
  const size_t smem = smem_bytes(16 * kK);
  if (layer.bf16) {
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(prefill_tc_kernel<kK, __nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    prefill_tc_kernel<kK, __nv_bfloat16><<<grid, kThreads, smem, stream>>>(out, q, q_stride, layer, batch, row_offsets, n_new,
                                                                          n_heads, scale * kLog2e, window, lse, out_bf16);
  } else {
    if (smem > 48 * 1024) cudaFuncSetAttribute(prefill_tc_kernel<kK, float>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    prefill_tc_kernel<kK, float><<<grid, kThreads, smem, stream>>>(out, q, q_stride, layer, batch, row_offsets, n_new, n_heads,
                                                                  scale * kLog2e, window, lse, out_bf16);
  }
}

}  // namespace

bool prefill_attention_tc_supports(int head_dim) { return head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128; }

void prefill_attention_tc(float* out, const float* q, long q_stride, const PagedLayer& layer, const PagedBatch& batch,
                          const int32_t* row_offsets, const int32_t* n_new, int total_rows, int max_new, int n_heads, float scale,
                          int window, cudaStream_t stream, float* lse, __nv_bfloat16* out_bf16) {
  if (batch.n_seqs <= 0 || total_rows <= 0 || max_new <= 0) return;
  if (!out && !out_bf16) throw std::invalid_argument("prefill_attention_tc: no output");
  if (!prefill_attention_tc_supports(layer.head_dim)) {
    if (lse || out_bf16)
      throw std::invalid_argument("prefill_attention_tc: no log-sum-exp or bf16 output at head_dim " + std::to_string(layer.head_dim));
    return prefill_attention(out, q, q_stride, layer, batch, row_offsets, n_new, total_rows, max_new, n_heads, scale, window,
                             stream);
  }
  const dim3 grid((max_new + kRows - 1) / kRows, n_heads, batch.n_seqs);
  switch (layer.head_dim / 16) {
    case 1: return launch<1>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 2: return launch<2>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 3: return launch<3>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 4: return launch<4>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 5: return launch<5>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 6: return launch<6>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    case 7: return launch<7>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
    default: return launch<8>(grid, out, q, q_stride, layer, batch, row_offsets, n_new, n_heads, scale, window, lse, out_bf16, stream);
  }
}

}  // namespace rf::cuda
