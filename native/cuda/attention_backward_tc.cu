// The attention backward on the tensor cores (see attention_backward.h, attention_backward_tc),
// flash-attention 2 style, bf16 mma.sync m16n8k16 (cuda/mma.h) with f32 accumulation. The
// probabilities are recomputed from q, k and the forward's log-sum-exp (prefill_attention_tc's
// lse): P = 2^(scale log2(e) q.k - lse). With D = rowsum(dout * out) (the forward's output),
// dS = P * (dout.v - D), and:
//   dkdv_kernel, grid (64-key tile, kv head, sequence): each warp owns 16 keys, walks the group's
//     heads and the 32-row query tiles that see them, and accumulates dV += P^T dout and
//     dK += scale dS^T q in registers;
//   dq_kernel, grid (64-row query tile, head, sequence): each warp owns 16 query rows and walks
//     the 64-key tiles they see: dQ += scale dS K.
// Every gradient row is written by one warp, its sums in a fixed order: no atomics, the same bits
// every run (dQ recomputes S and dP rather than sharing them through atomic adds).
// Operands are staged in shared memory as bf16, row-major where a product reads pairs along the
// head dimension and transposed where it reads pairs along keys or queries.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/attention_backward.h"
#include "cuda/bf16.h"
#include "cuda/mma.h"

namespace rf::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeys = 64;     // keys per block in dkdv_kernel, per tile in dq_kernel
constexpr int kQRows = 32;    // query rows per staged tile in dkdv_kernel
constexpr int kRows = 64;     // query rows per block in dq_kernel
constexpr int kPad = 8;       // bf16 of padding per shared row
constexpr float kLog2e = 1.4426950408889634f;

struct Dims {
  int q_dim, kv_dim, qkv;
};

__device__ __forceinline__ Dims dims_of(const AttentionRows& a) {
  const int q = a.n_heads * a.head_dim, kv = a.n_kv_heads * a.head_dim;
  return {q, kv, q + 2 * kv};
}

// Whether query row i sees key row j (both buffer rows of one sequence).
__device__ __forceinline__ bool sees(int i, int j, int window) { return j <= i && (window <= 0 || i - j < window); }

// D [rows, n_heads] = sum_d dout * out: one warp per (row, head).
template <class T>
__global__ void delta_kernel(float* D, const float* dout, const T* out, int rows, int n_heads, int hd) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= rows * n_heads) return;
  const long base = long(warp) * hd;  // [row][head][d] is [rows, n_heads * hd]
  float sum = 0.f;
  for (int d = lane; d < hd; d += 32) sum += dout[base + d] * as_f32(out[base + d]);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) D[warp] = sum;
}

// Four consecutive elements (16-byte aligned f32, 8-byte aligned bf16) as bf16: f32 rounded to
// nearest even, bf16 as it is (the same bits as rounding its widened value).
__device__ __forceinline__ void load4_bf16(__nv_bfloat16 (&b)[4], const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  b[0] = __float2bfloat16_rn(v.x), b[1] = __float2bfloat16_rn(v.y), b[2] = __float2bfloat16_rn(v.z), b[3] = __float2bfloat16_rn(v.w);
}
struct alignas(8) Bf16x4 {
  __nv_bfloat16 v[4];
};
__device__ __forceinline__ void load4_bf16(__nv_bfloat16 (&b)[4], const __nv_bfloat16* p) {
  const Bf16x4 v = *reinterpret_cast<const Bf16x4*>(p);  // one 8-byte load
  b[0] = v.v[0], b[1] = v.v[1], b[2] = v.v[2], b[3] = v.v[3];
}

// Stages rows [r0, r0 + n) (buffer rows; rows at or past end are zeros) of an f32 or bf16
// matrix's columns [col, col + kHd) into bf16 shared memory, row-major [n][kHd + kPad] and/or
// transposed [kHd][n + kPad] (either may be null).
template <int kHd, class T>
__device__ void stage(__nv_bfloat16* rowmajor, __nv_bfloat16* transposed, int n, const T* src, long stride, long col, int r0,
                      int end) {
  for (int e = threadIdx.x; e < n * (kHd / 4); e += kThreads) {
    const int r = e / (kHd / 4), d = 4 * (e - r * (kHd / 4));
    __nv_bfloat16 b[4] = {__float2bfloat16_rn(0.f), __float2bfloat16_rn(0.f), __float2bfloat16_rn(0.f), __float2bfloat16_rn(0.f)};
    if (r0 + r < end) load4_bf16(b, src + long(r0 + r) * stride + col + d);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rowmajor) rowmajor[r * (kHd + kPad) + d + i] = b[i];
      if (transposed) transposed[(d + i) * (n + kPad) + r] = b[i];
    }
  }
}

// dkdv: dynamic shared memory bf16 K [kKeys][hd+kPad], V [kKeys][hd+kPad], Q [kQRows][hd+kPad],
// Q^T [hd][kQRows+kPad], dO [kQRows][hd+kPad], dO^T [hd][kQRows+kPad], then f32 lse, D [kQRows].
size_t dkdv_smem(int hd) {
  return sizeof(__nv_bfloat16) * (size_t(2 * kKeys + 2 * kQRows) * (hd + kPad) + size_t(2 * hd) * (kQRows + kPad)) +
         sizeof(float) * 2 * kQRows;
}

template <int kK, class T>
__global__ void __launch_bounds__(kThreads)
    dkdv_kernel(float* dqkv, const float* dout, const T* qkv, const float* lse, const float* D, AttentionRows a,
                float scale) {
  constexpr int kHd = 16 * kK, kN = 2 * kK, kS = kHd + kPad, kTs = kQRows + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* vs = ks + kKeys * kS;
  __nv_bfloat16* qs = vs + kKeys * kS;
  __nv_bfloat16* qt = qs + kQRows * kS;
  __nv_bfloat16* ds = qt + kHd * kTs;  // dO
  __nv_bfloat16* dt = ds + kQRows * kS;  // dO^T
  float* lse_s = reinterpret_cast<float*>(dt + kHd * kTs);
  float* d_s = lse_s + kQRows;

  const int seq = blockIdx.z, g_kv = blockIdx.y;
  const int first = a.seq_first[seq], end = first + a.seq_len[seq];
  const int j0 = first + blockIdx.x * kKeys;
  if (j0 >= end) return;
  const Dims L = dims_of(a);
  const int group = a.n_heads / a.n_kv_heads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const float scale_log2 = scale * kLog2e;
  const long k_col = L.q_dim + long(g_kv) * kHd, v_col = k_col + L.kv_dim;
  stage<kHd>(ks, nullptr, kKeys, qkv, L.qkv, k_col, j0, end);
  stage<kHd>(vs, nullptr, kKeys, qkv, L.qkv, v_col, j0, end);

  const int wj = j0 + 16 * warp;  // the warp's first key row
  const int j_last = min(end, j0 + kKeys) - 1;
  const int i_end = a.window > 0 ? min(end, j_last + a.window) : end;  // query rows [j0, i_end) see some key
  float dk[kN][4], dv[kN][4];
#pragma unroll
  for (int n = 0; n < kN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  for (int hh = 0; hh < group; ++hh) {
    const int h = g_kv * group + hh;
    for (int i0 = j0; i0 < i_end; i0 += kQRows) {
      __syncthreads();  // the previous tile is consumed
      stage<kHd>(qs, qt, kQRows, qkv, L.qkv, long(h) * kHd, i0, end);
      stage<kHd>(ds, dt, kQRows, dout, L.q_dim, long(h) * kHd, i0, end);
      if (tid < kQRows) {
        const int i = i0 + tid;
        lse_s[tid] = i < end ? lse[long(i) * a.n_heads + h] : INFINITY;
        d_s[tid] = i < end ? D[long(i) * a.n_heads + h] : 0.f;
      }
      __syncthreads();
      // Warp-uniform: no query of the tile sees the warp's keys.
      if (wj >= end || i0 + kQRows - 1 < wj || (a.window > 0 && i0 - (wj + 15) >= a.window)) continue;

      // S^T = K Q^T and dP^T = V dO^T: 16 keys x 32 queries (n-tile n: queries i0 + 8 n ..).
      float st[kQRows / 8][4], dpt[kQRows / 8][4];
#pragma unroll
      for (int n = 0; n < kQRows / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t ka[4], va[4];
        load_a(ka, ks, kS, 16 * warp, kk, g, t);
        load_a(va, vs, kS, 16 * warp, kk, g, t);
#pragma unroll
        for (int n = 0; n < kQRows / 8; ++n) {
          uint32_t qb[2], db[2];
          load_b(qb, qs, kS, 8 * n, kk, g, t);
          load_b(db, ds, kS, 8 * n, kk, g, t);
          mma_bf16_16816(st[n], ka, qb);
          mma_bf16_16816(dpt[n], va, db);
        }
      }
      // P^T and dS^T (element e: key wj + g + 8 (e / 2), query i0 + 8 n + 2 t + e % 2).
#pragma unroll
      for (int n = 0; n < kQRows / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = wj + g + 8 * (e >> 1), qi = 8 * n + 2 * t + (e & 1), i = i0 + qi;
          const float p = j < end && i < end && sees(i, j, a.window) ? exp2f(st[n][e] * scale_log2 - lse_s[qi]) : 0.f;
          st[n][e] = p;
          dpt[n][e] = p * (dpt[n][e] - d_s[qi]);
        }
      // dV += P^T dO and dK += dS^T Q, 16 queries per k-step.
#pragma unroll
      for (int ks2 = 0; ks2 < kQRows / 16; ++ks2) {
        uint32_t pa[4], sa[4];
        a_from_accumulators(pa, st[2 * ks2], st[2 * ks2 + 1]);
        a_from_accumulators(sa, dpt[2 * ks2], dpt[2 * ks2 + 1]);
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          uint32_t db[2], qb[2];
          load_b(db, dt, kTs, 8 * n, ks2, g, t);
          load_b(qb, qt, kTs, 8 * n, ks2, g, t);
          mma_bf16_16816(dv[n], pa, db);
          mma_bf16_16816(dk[n], sa, qb);
        }
      }
    }
  }

#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int j = wj + g + 8 * e2;
    if (j >= end) continue;
    store_accumulator_row(dqkv + long(j) * L.qkv + k_col, dk, e2, scale, t);
    store_accumulator_row(dqkv + long(j) * L.qkv + v_col, dv, e2, 1.f, t);
  }
}

// dq: dynamic shared memory bf16 Q [kRows][hd+kPad] (then dO, the same), K [kKeys][hd+kPad],
// K^T [hd][kKeys+kPad], V [kKeys][hd+kPad].
size_t dq_smem(int hd) {
  return sizeof(__nv_bfloat16) * (size_t(2 * kRows + 2 * kKeys) * (hd + kPad) + size_t(hd) * (kKeys + kPad));
}

template <int kK, class T>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(float* dqkv, const float* dout, const T* qkv, const float* lse, const float* D, AttentionRows a, float scale) {
  constexpr int kHd = 16 * kK, kN = 2 * kK, kS = kHd + kPad, kTs = kKeys + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* ds = qs + kRows * kS;
  __nv_bfloat16* ks = ds + kRows * kS;
  __nv_bfloat16* vs = ks + kKeys * kS;
  __nv_bfloat16* kt = vs + kKeys * kS;

  const int seq = blockIdx.z, h = blockIdx.y;
  const int first = a.seq_first[seq], end = first + a.seq_len[seq];
  // The last query tiles see the most keys: hand them out first.
  const int tiles = (a.seq_len[seq] + kRows - 1) / kRows;
  if (int(blockIdx.x) >= tiles) return;
  const int r0 = first + (tiles - 1 - blockIdx.x) * kRows;
  const Dims L = dims_of(a);
  const int g_kv = h / (a.n_heads / a.n_kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const float scale_log2 = scale * kLog2e;
  const long q_col = long(h) * kHd, k_col = L.q_dim + long(g_kv) * kHd, v_col = k_col + L.kv_dim;
  stage<kHd>(qs, nullptr, kRows, qkv, L.qkv, q_col, r0, end);
  stage<kHd>(ds, nullptr, kRows, dout, L.q_dim, q_col, r0, end);
  __syncthreads();
  const int wr = r0 + 16 * warp;  // the warp's first query row
  uint32_t qa[kK][4], da[kK][4];
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    load_a(qa[kk], qs, kS, 16 * warp, kk, g, t);
    load_a(da[kk], ds, kS, 16 * warp, kk, g, t);
  }
  float lse_r[2], d_r[2];
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int i = wr + g + 8 * e2;
    lse_r[e2] = i < end ? lse[long(i) * a.n_heads + h] : INFINITY;
    d_r[e2] = i < end ? D[long(i) * a.n_heads + h] : 0.f;
  }
  float dq[kN][4];
#pragma unroll
  for (int n = 0; n < kN; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  const int row_hi = min(end, r0 + kRows) - 1;
  const int key_lo = a.window > 0 ? max(first, r0 - a.window + 1) : first;
  const int w_hi = min(end - 1, wr + 15), w_lo = a.window > 0 ? max(first, wr - a.window + 1) : first;
  for (int j0 = first + (key_lo - first) / kKeys * kKeys; j0 <= row_hi; j0 += kKeys) {
    __syncthreads();  // the previous tile is consumed
    stage<kHd>(ks, kt, kKeys, qkv, L.qkv, k_col, j0, end);
    stage<kHd>(vs, nullptr, kKeys, qkv, L.qkv, v_col, j0, end);
    __syncthreads();
    if (wr >= end || j0 > w_hi || j0 + kKeys - 1 < w_lo) continue;  // warp-uniform: no row of the warp sees the tile

    float s[kKeys / 8][4], dp[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t kb[2], vb[2];
        load_b(kb, ks, kS, 8 * n, kk, g, t);
        load_b(vb, vs, kS, 8 * n, kk, g, t);
        mma_bf16_16816(s[n], qa[kk], kb);
        mma_bf16_16816(dp[n], da[kk], vb);
      }
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = wr + g + 8 * (e >> 1), j = j0 + 8 * n + 2 * t + (e & 1);
        const float p = i < end && j < end && sees(i, j, a.window) ? exp2f(s[n][e] * scale_log2 - lse_r[e >> 1]) : 0.f;
        dp[n][e] = p * (dp[n][e] - d_r[e >> 1]);
      }
    // dQ += dS K, 16 keys per k-step.
#pragma unroll
    for (int kst = 0; kst < kKeys / 16; ++kst) {
      uint32_t sa[4];
      a_from_accumulators(sa, dp[2 * kst], dp[2 * kst + 1]);
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        uint32_t kb[2];
        load_b(kb, kt, kTs, 8 * n, kst, g, t);
        mma_bf16_16816(dq[n], sa, kb);
      }
    }
  }

#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int i = wr + g + 8 * e2;
    if (i < end) store_accumulator_row(dqkv + long(i) * L.qkv + q_col, dq, e2, scale, t);
  }
}

template <int kK, class T>
void launch(float* dqkv, const float* dout, const T* qkv, const float* lse, const float* D, const AttentionRows& a, int max_len,
            float scale, cudaStream_t stream) {
  const size_t s1 = dkdv_smem(16 * kK), s2 = dq_smem(16 * kK);
  if (s1 > 48 * 1024) cudaFuncSetAttribute(dkdv_kernel<kK, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(s1));
  if (s2 > 48 * 1024) cudaFuncSetAttribute(dq_kernel<kK, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(s2));
  dkdv_kernel<kK, T><<<dim3((max_len + kKeys - 1) / kKeys, a.n_kv_heads, a.n_seqs), kThreads, s1, stream>>>(dqkv, dout, qkv, lse, D,
                                                                                                            a, scale);
  dq_kernel<kK, T><<<dim3((max_len + kRows - 1) / kRows, a.n_heads, a.n_seqs), kThreads, s2, stream>>>(dqkv, dout, qkv, lse, D, a,
                                                                                                      scale);
}

template <class T>
void backward_tc(float* dqkv, const float* dout, const T* qkv, const T* out, const float* lse, const AttentionRows& a, int max_len,
                 float scale, float* scratch, cudaStream_t stream) {
  if (a.rows <= 0) return;
  if (!attention_backward_tc_supports(a.head_dim))
    throw std::invalid_argument("attention_backward_tc: head_dim " + std::to_string(a.head_dim) + " is not supported");
  float* D = scratch;
  const int warps = a.rows * a.n_heads;
  delta_kernel<<<(warps + 7) / 8, 256, 0, stream>>>(D, dout, out, a.rows, a.n_heads, a.head_dim);
  switch (a.head_dim / 16) {
    case 1: return launch<1>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 2: return launch<2>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 3: return launch<3>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 4: return launch<4>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 5: return launch<5>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 6: return launch<6>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    case 7: return launch<7>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
    default: return launch<8>(dqkv, dout, qkv, lse, D, a, max_len, scale, stream);
  }
}

}  // namespace

bool attention_backward_tc_supports(int head_dim) { return head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128; }

long attention_backward_tc_scratch(const AttentionRows& a) { return long(a.rows) * a.n_heads; }

void attention_backward_tc(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                           const AttentionRows& a, int max_len, float scale, float* scratch, cudaStream_t stream) {
  backward_tc(dqkv, dout, qkv, out, lse, a, max_len, scale, scratch, stream);
}

void attention_backward_tc(float* dqkv, const float* dout, const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                           const AttentionRows& a, int max_len, float scale, float* scratch, cudaStream_t stream) {
  backward_tc(dqkv, dout, qkv, out, lse, a, max_len, scale, scratch, stream);
}

}  // namespace rf::cuda
