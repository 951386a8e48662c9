// Flash-decoding over a paged cache (see attention.h). Pass 1: grid (sequence, head, split);
// each block of kWarps warps takes the split's keys, a warp per key at a time: the lanes share
// the head's dimensions (up to 8 each), a warp-reduced dot product gives the score, and each
// warp keeps an online softmax (running max m, sum l, weighted values acc); the warps then
// merge into the split's (m, l, acc). Pass 2: grid (sequence, head) merges the splits.
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "cuda/attention.h"

namespace rf::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kKeysPerSplit = 256;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

int splits_for(int max_length) { return (max_length + kKeysPerSplit - 1) / kKeysPerSplit; }

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// scratch layout: m [S, H, splits], l [S, H, splits], acc [S, H, splits, head_dim].
__global__ void decode_partial(const float* q, PagedLayer layer, PagedBatch batch, int n_heads, float scale, int window,
                               int n_splits, float* m_out, float* l_out, float* acc_out) {
  const int s = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hd = layer.head_dim, B = layer.block_tokens;
  const int kvh = h / (n_heads / layer.n_kv_heads);
  const int length = batch.lengths[s];
  const int first = window > 0 && length > window ? length - window : 0;
  const int lo = max(first, split * kKeysPerSplit), hi = min(length, (split + 1) * kKeysPerSplit);
  const int32_t* table = batch.tables + batch.table_offsets[s];

  float qv[kMaxDimsPerLane], acc[kMaxDimsPerLane];
  const float* qr = q + (long(s) * n_heads + h) * hd;
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < hd ? qr[d] * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;
  for (int j = lo + warp; j < hi; j += kWarps) {
    const long base = ((long(table[j / B]) * layer.n_kv_heads + kvh) * B + j % B) * hd;
    const float* kj = layer.k + base;
    const float* vj = layer.v + base;
    float dot = 0.f;
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) dot += qv[i] * kj[d];
    }
    const float score = warp_sum(dot);
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);
    const float p = expf(score - m_new);
    l = l * correction + p;
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] = acc[i] * correction + p * vj[d];
    }
    m = m_new;
  }

  // Merge the warps: each writes its (m, l, acc) to shared memory, warp 0 combines.
  __shared__ float sm[kWarps], sl[kWarps], sacc[kWarps][32 * kMaxDimsPerLane];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
  for (int i = 0; i < kMaxDimsPerLane; ++i) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float M = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm[w]);
  float L = 0.f;
  float out[kMaxDimsPerLane] = {};
  for (int w = 0; w < kWarps; ++w) {
    if (sl[w] == 0.f) continue;  // a warp that saw no key
    const float c = expf(sm[w] - M);
    L += sl[w] * c;
    for (int i = 0; i < kMaxDimsPerLane; ++i) out[i] += sacc[w][lane + 32 * i] * c;
  }
  const long slot = (long(s) * n_heads + h) * n_splits + split;
  if (lane == 0) m_out[slot] = M, l_out[slot] = L;
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) acc_out[slot * hd + d] = out[i];
  }
}

__global__ void decode_combine(float* out, int n_heads, int hd, int n_splits, const float* m_in, const float* l_in,
                               const float* acc_in) {
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
    o[d] = L > 0.f ? sum / L : 0.f;
  }
}

}  // namespace

long decode_attention_scratch(int n_seqs, int n_heads, int head_dim, int max_length) {
  const long slots = long(n_seqs) * n_heads * splits_for(max_length);
  return slots * (2 + head_dim);
}

void decode_attention(float* out, const float* q, const PagedLayer& layer, const PagedBatch& batch, int n_heads, float scale,
                      int window, float* scratch, cudaStream_t stream) {
  if (batch.n_seqs <= 0 || batch.max_length <= 0) return;
  const int n_splits = splits_for(batch.max_length);
  const long slots = long(batch.n_seqs) * n_heads * n_splits;
  float* m = scratch;
  float* l = scratch + slots;
  float* acc = scratch + 2 * slots;
  decode_partial<<<dim3(batch.n_seqs, n_heads, n_splits), 32 * kWarps, 0, stream>>>(q, layer, batch, n_heads, scale, window, n_splits,
                                                                                   m, l, acc);
  decode_combine<<<dim3(batch.n_seqs, n_heads), 128, 0, stream>>>(out, n_heads, layer.head_dim, n_splits, m, l, acc);
}

}  // namespace rf::cuda
