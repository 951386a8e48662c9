// Attention backward on the device (see attention_backward.h). Every kernel: one block of kWarps
// warps per output row and head; a warp handles one key (or query) at a time, its lanes sharing the
// head's dimensions (lane + 32 t, t < kDims), dot products reduced across the warp; the warps'
// partial results merge in shared memory in warp order (a fixed order: the same bits every run).
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "cuda/attention_backward.h"

namespace rf::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kDims = 8;  // head_dim <= 256

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Layout {
  int q_dim, kv_dim, qkv;
};

__device__ Layout layout_of(const AttentionRows& a) {
  const int q = a.n_heads * a.head_dim, kv = a.n_kv_heads * a.head_dim;
  return {q, kv, q + 2 * kv};
}

// The keys query row `row` sees: [lo, hi) as row indices of the buffer.
__device__ void keys_of(const AttentionRows& a, int row, int& lo, int& hi) {
  const int s = a.row_seq[row], first = a.seq_first[s];
  const int pos = row - first;
  const int from = a.window > 0 && pos + 1 > a.window ? pos + 1 - a.window : 0;
  lo = first + from;
  hi = row + 1;
}

// Pass 1: grid (rows, heads). stats [rows, heads, 2] = (log-sum-exp, D).
__global__ void stats_kernel(const float* dout, const float* qkv, AttentionRows a, float scale, float* stats) {
  const int row = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Layout L = layout_of(a);
  const int hd = a.head_dim, g = h / (a.n_heads / a.n_kv_heads);
  int lo, hi;
  keys_of(a, row, lo, hi);
  float q[kDims], d[kDims];
  for (int t = 0; t < kDims; ++t) {
    const int i = lane + 32 * t;
    q[t] = i < hd ? qkv[long(row) * L.qkv + long(h) * hd + i] * scale : 0.f;
    d[t] = i < hd ? dout[long(row) * L.q_dim + long(h) * hd + i] : 0.f;
  }
  // Online over keys: m (max score), l = sum e^(s - m), acc = sum e^(s - m) (dout . v_j).
  float m = -FLT_MAX, l = 0.f, acc = 0.f;
  for (int j = lo + warp; j < hi; j += kWarps) {
    const float* k = qkv + long(j) * L.qkv + L.q_dim + long(g) * hd;
    const float* v = k + L.kv_dim;
    float s = 0.f, dv = 0.f;
    for (int t = 0; t < kDims; ++t) {
      const int i = lane + 32 * t;
      if (i < hd) s += q[t] * k[i], dv += d[t] * v[i];
    }
    s = warp_sum(s);
    dv = warp_sum(dv);
    const float m_new = fmaxf(m, s), c = expf(m - m_new), p = expf(s - m_new);
    l = l * c + p;
    acc = acc * c + p * dv;
    m = m_new;
  }
  __shared__ float sm[kWarps], sl[kWarps], sa[kWarps];
  if (lane == 0) sm[warp] = m, sl[warp] = l, sa[warp] = acc;
  __syncthreads();
  if (threadIdx.x != 0) return;
  float M = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w)
    if (sl[w] > 0.f) M = fmaxf(M, sm[w]);
  float Lsum = 0.f, A = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    if (sl[w] == 0.f) continue;
    const float c = expf(sm[w] - M);
    Lsum += sl[w] * c;
    A += sa[w] * c;
  }
  float* out = stats + (long(row) * a.n_heads + h) * 2;
  out[0] = M + logf(Lsum);
  out[1] = A / Lsum;
}

// Pass 2: grid (rows, heads). dq = scale sum_j p_j (dout . v_j - D) k_j.
__global__ void dq_kernel(float* dqkv, const float* dout, const float* qkv, AttentionRows a, float scale, const float* stats) {
  const int row = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Layout L = layout_of(a);
  const int hd = a.head_dim, g = h / (a.n_heads / a.n_kv_heads);
  int lo, hi;
  keys_of(a, row, lo, hi);
  const float lse = stats[(long(row) * a.n_heads + h) * 2], D = stats[(long(row) * a.n_heads + h) * 2 + 1];
  float q[kDims], d[kDims], dq[kDims];
  for (int t = 0; t < kDims; ++t) {
    const int i = lane + 32 * t;
    q[t] = i < hd ? qkv[long(row) * L.qkv + long(h) * hd + i] * scale : 0.f;
    d[t] = i < hd ? dout[long(row) * L.q_dim + long(h) * hd + i] : 0.f;
    dq[t] = 0.f;
  }
  for (int j = lo + warp; j < hi; j += kWarps) {
    const float* k = qkv + long(j) * L.qkv + L.q_dim + long(g) * hd;
    const float* v = k + L.kv_dim;
    float s = 0.f, dv = 0.f;
    for (int t = 0; t < kDims; ++t) {
      const int i = lane + 32 * t;
      if (i < hd) s += q[t] * k[i], dv += d[t] * v[i];
    }
    s = warp_sum(s);
    dv = warp_sum(dv);
    const float ds = expf(s - lse) * (dv - D) * scale;
    for (int t = 0; t < kDims; ++t) {
      const int i = lane + 32 * t;
      if (i < hd) dq[t] += ds * k[i];
    }
  }
  __shared__ float part[kWarps][32 * kDims];
  for (int t = 0; t < kDims; ++t) part[warp][lane + 32 * t] = dq[t];
  __syncthreads();
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += part[w][i];
    dqkv[long(row) * L.qkv + long(h) * hd + i] = sum;
  }
}

// Pass 3: grid (rows, kv heads): key row j. Over the query rows i that see j (i >= j in its
// sequence, within the window) and the group's heads h: p = exp(scale q_i . k_j - lse_ih),
// dv_j += p dout_ih, dk_j += scale p (dout_ih . v_j - D_ih) q_ih.
__global__ void dkv_kernel(float* dqkv, const float* dout, const float* qkv, AttentionRows a, float scale, const float* stats) {
  const int j = blockIdx.x, g = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Layout L = layout_of(a);
  const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int s = a.row_seq[j], end = a.seq_first[s] + a.seq_len[s];
  const int last = a.window > 0 ? min(end, j + a.window) : end;  // query rows [j, last)
  const float* k = qkv + long(j) * L.qkv + L.q_dim + long(g) * hd;
  const float* v = k + L.kv_dim;
  float kr[kDims], vr[kDims], dk[kDims], dv[kDims];
  for (int t = 0; t < kDims; ++t) {
    const int i = lane + 32 * t;
    kr[t] = i < hd ? k[i] : 0.f;
    vr[t] = i < hd ? v[i] : 0.f;
    dk[t] = dv[t] = 0.f;
  }
  const int pairs = (last - j) * group;
  for (int pi = warp; pi < pairs; pi += kWarps) {
    const int i = j + pi / group, h = g * group + pi % group;
    const float* q = qkv + long(i) * L.qkv + long(h) * hd;
    const float* d = dout + long(i) * L.q_dim + long(h) * hd;
    float sc = 0.f, dvdot = 0.f;
    for (int t = 0; t < kDims; ++t) {
      const int e = lane + 32 * t;
      if (e < hd) sc += q[e] * kr[t], dvdot += d[e] * vr[t];
    }
    sc = warp_sum(sc) * scale;
    dvdot = warp_sum(dvdot);
    const float lse = stats[(long(i) * a.n_heads + h) * 2], D = stats[(long(i) * a.n_heads + h) * 2 + 1];
    const float p = expf(sc - lse), ds = p * (dvdot - D) * scale;
    for (int t = 0; t < kDims; ++t) {
      const int e = lane + 32 * t;
      if (e < hd) dv[t] += p * d[e], dk[t] += ds * q[e];
    }
  }
  __shared__ float pk[kWarps][32 * kDims], pv[kWarps][32 * kDims];
  for (int t = 0; t < kDims; ++t) pk[warp][lane + 32 * t] = dk[t], pv[warp][lane + 32 * t] = dv[t];
  __syncthreads();
  for (int e = threadIdx.x; e < hd; e += blockDim.x) {
    float sk = 0.f, sv = 0.f;
    for (int w = 0; w < kWarps; ++w) sk += pk[w][e], sv += pv[w][e];
    dqkv[long(j) * L.qkv + L.q_dim + long(g) * hd + e] = sk;
    dqkv[long(j) * L.qkv + L.q_dim + L.kv_dim + long(g) * hd + e] = sv;
  }
}

}  // namespace

long attention_backward_scratch(const AttentionRows& a) { return 2L * a.rows * a.n_heads; }

void attention_backward(float* dqkv, const float* dout, const float* qkv, const AttentionRows& a, float scale, float* scratch,
                        cudaStream_t stream) {
  if (a.rows <= 0) return;
  stats_kernel<<<dim3(a.rows, a.n_heads), 32 * kWarps, 0, stream>>>(dout, qkv, a, scale, scratch);
  dq_kernel<<<dim3(a.rows, a.n_heads), 32 * kWarps, 0, stream>>>(dqkv, dout, qkv, a, scale, scratch);
  dkv_kernel<<<dim3(a.rows, a.n_kv_heads), 32 * kWarps, 0, stream>>>(dqkv, dout, qkv, a, scale, scratch);
}

}  // namespace rf::cuda
