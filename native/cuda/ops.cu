// Device twins of the CPU row kernels (see ops.h). One block per row for the reductions (the
// pick's statistics: many blocks per row); grid-stride loops for the elementwise ones.
// Reductions sum in the block's own order, so results equal the CPU's up to float rounding (the
// tests state the tolerances).
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/bf16.h"
#include "cuda/block_sum.cuh"
#include "cuda/launch.cuh"
#include "cuda/ops.h"
#include "cuda/rope.cuh"
#include "model/draw.h"

namespace rf::cuda {

namespace {

constexpr int kRowThreads = 256;
constexpr int kPickThreads = 512;
constexpr int kStatThreads = 256;

// A slice of a logits row: its maximum, the maximum's first position, sum exp(z - max).
struct PickStat {
  float max;
  int at;
  float sum;
};

// Slices per row: about 4096 logits each (32 at V = 128256), at most 64 (a warp's two per lane in
// pick_kernel). A function of the vocabulary alone, so the sums' order is the same on every GPU.
int pick_slices(int vocab) { return std::max(1, std::min(64, (vocab + 4095) / 4096)); }

__global__ void rmsnorm_kernel(float* out, const float* x, const float* w, int n, float eps, __nv_bfloat16* out_bf16) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[32];
  const float* xr = x + long(blockIdx.x) * n;
  float* yr = out ? out + long(blockIdx.x) * n : nullptr;
  __nv_bfloat16* br = out_bf16 ? out_bf16 + long(blockIdx.x) * n : nullptr;
  const float inv = rms_inv(xr, n, eps, scratch);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float y = w[i] * (xr[i] * inv);
    if (yr) yr[i] = y;
    if (br) br[i] = bf16_round(y);
  }
}

__global__ void layernorm_kernel(float* out, const float* x, const float* w, const float* b, int n, float eps,
                                 __nv_bfloat16* out_bf16) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[32];
  const float* xr = x + long(blockIdx.x) * n;
  float* yr = out ? out + long(blockIdx.x) * n : nullptr;
  __nv_bfloat16* br = out_bf16 ? out_bf16 + long(blockIdx.x) * n : nullptr;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
  const float mean = block_sum(s, scratch) / float(n);
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (xr[i] - mean) * (xr[i] - mean);
  const float inv = 1.0f / sqrtf(block_sum(ss, scratch) / float(n) + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float y = (xr[i] - mean) * inv * w[i] + b[i];
    if (yr) yr[i] = y;
    if (br) br[i] = bf16_round(y);
  }
}

// grid (rows, n_q + n_k heads): one head per block, in place (every value is read for the sum
// before any is written: block_sum synchronizes).
__global__ void qk_norm_kernel(float* x, long row_stride, int n_q, int head_dim, const float* wq, const float* wk, float eps) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[32];
  float* xr = x + long(blockIdx.x) * row_stride + long(blockIdx.y) * head_dim;
  const float* w = int(blockIdx.y) < n_q ? wq : wk;
  const float inv = rms_inv(xr, head_dim, eps, scratch);
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) xr[i] = w[i] * (xr[i] * inv);
}

// grid (rows, heads); threads over the half head.
__global__ void rope_kernel(float* x, long row_stride, int head_dim, const float* cos, const float* sin) {
  grid_dependents_launch();
  grid_dependency_wait();
  const int half = head_dim / 2;
  float* a = x + long(blockIdx.x) * row_stride + long(blockIdx.y) * head_dim;
  float* b = a + half;
  const float* c = cos + long(blockIdx.x) * half;
  const float* s = sin + long(blockIdx.x) * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float x1 = a[i], x2 = b[i];
    rope_rotate(x1, x2, c[i], s[i]);
    a[i] = x1;
    b[i] = x2;
  }
}

__global__ void swiglu_kernel(float* out, const float* gate, const float* up, long n) {
  grid_dependents_launch();
  grid_dependency_wait();
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// out [n] = gelu_new(x) (out may be x); x f32 or bf16; out_bf16 (optional) the same rounded,
// in_bf16 (optional) x rounded (read before out is written: in place too).
template <class T>
__global__ void gelu_new_kernel(float* out, const T* x, long n, __nv_bfloat16* out_bf16, __nv_bfloat16* in_bf16) {
  grid_dependents_launch();
  grid_dependency_wait();
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const float v = as_f32(x[i]);
    if (in_bf16) in_bf16[i] = bf16_round(v);
    const float y = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    out[i] = y;
    if (out_bf16) out_bf16[i] = bf16_round(y);
  }
}

// Top-k / top-p candidates (rf::logits_pick's order: logit descending, ties by ascending id).
// A key that orders floats descending as unsigned integers ascend (NaN aside).
__device__ __forceinline__ uint32_t descending_key(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// Whether candidate (va, ia) comes before (vb, ib).
__device__ __forceinline__ bool cand_before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

struct NucleusShared {
  float v[kPickMaxCandidates];
  int id[kPickMaxCandidates];
  double prob[kPickMaxCandidates];
  int hist[256];
  int count_a[kPickThreads], count_b[kPickThreads];
  uint32_t prefix;
  int krem;
};

// Loads of the row a thread has in flight in best_candidates' passes: one block reads the whole
// row five times, so each pass is bound by the latency of its loads unless several are issued
// before any is used (the histogram's shared-memory atomics would otherwise keep the compiler
// from hoisting the next load above them).
constexpr int kSelectLoads = 8;

// The best k (<= kPickMaxCandidates) of row z, sorted, into sh.v / sh.id. Radix select of the k-th
// key (four 8-bit passes), then the keys below it and the first ties at it in id order, each
// thread over a contiguous chunk so the positions come from prefix sums (no races), then a
// bitonic sort. Every thread must call it.
__device__ void best_candidates(const float* z, int vocab, int k, NucleusShared& sh) {
  const int t = threadIdx.x, nt = blockDim.x;
  uint32_t prefix = 0, mask = 0;
  int krem = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = t; i < 256; i += nt) sh.hist[i] = 0;
    __syncthreads();
    for (int i0 = t; i0 < vocab; i0 += kSelectLoads * nt) {
      uint32_t key[kSelectLoads];
#pragma unroll
      for (int u = 0; u < kSelectLoads; ++u) {
        const int i = i0 + u * nt;
        key[u] = i < vocab ? descending_key(z[i]) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kSelectLoads; ++u)  // integer counts: order-free
        if (i0 + u * nt < vocab && (key[u] & mask) == prefix) atomicAdd(&sh.hist[(key[u] >> shift) & 255u], 1);
    }
    __syncthreads();
    if (t == 0) {
      int b = 0, below = 0;
      while (b < 255 && below + sh.hist[b] < krem) below += sh.hist[b++];
      sh.krem = krem - below;
      sh.prefix = prefix | (uint32_t(b) << shift);
    }
    __syncthreads();
    krem = sh.krem;
    prefix = sh.prefix;
    mask |= 255u << shift;
    __syncthreads();
  }
  // prefix: the k-th key; k - krem keys lie below it; krem ties at it join, lowest ids first.
  const int chunk = (vocab + nt - 1) / nt;
  const int lo = min(vocab, t * chunk), hi = min(vocab, lo + chunk);
  int below = 0, ties = 0;
  for (int i0 = lo; i0 < hi; i0 += kSelectLoads) {
    uint32_t key[kSelectLoads];
#pragma unroll
    for (int u = 0; u < kSelectLoads; ++u) key[u] = i0 + u < hi ? descending_key(z[i0 + u]) : 0u;
#pragma unroll
    for (int u = 0; u < kSelectLoads; ++u)
      if (i0 + u < hi) below += key[u] < prefix, ties += key[u] == prefix;
  }
  sh.count_a[t] = below;
  sh.count_b[t] = ties;
  __syncthreads();
  if (t == 0) {
    int a = 0, b = 0;
    for (int i = 0; i < nt; ++i) {
      const int ca = sh.count_a[i], cb = sh.count_b[i];
      sh.count_a[i] = a;
      sh.count_b[i] = b;
      a += ca;
      b += cb;
    }
  }
  __syncthreads();
  int at_below = sh.count_a[t], at_tie = sh.count_b[t];
  const int n_below = k - krem;
  for (int i0 = lo; i0 < hi; i0 += kSelectLoads) {
    float v[kSelectLoads];
#pragma unroll
    for (int u = 0; u < kSelectLoads; ++u) v[u] = i0 + u < hi ? z[i0 + u] : 0.f;
#pragma unroll
    for (int u = 0; u < kSelectLoads; ++u) {
      const int i = i0 + u;
      const uint32_t key = descending_key(v[u]);
      if (i >= hi) break;
      if (key < prefix) {
        sh.v[at_below] = v[u], sh.id[at_below] = i;
        ++at_below;
      } else if (key == prefix) {
        if (at_tie < krem) sh.v[n_below + at_tie] = v[u], sh.id[n_below + at_tie] = i;
        ++at_tie;
      }
    }
  }
  // Bitonic sort of the k candidates, padded to a power of two with entries that sort last.
  int n = 1;
  while (n < k) n <<= 1;
  for (int i = k + t; i < n; i += nt) sh.v[i] = -INFINITY, sh.id[i] = 0x7fffffff;
  __syncthreads();
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = t; i < n; i += nt) {
        const int j = i ^ stride;
        if (j <= i) continue;
        const bool first = (i & size) == 0;  // this pair's run is ascending in cand_before order
        const bool swap = first ? cand_before(sh.v[j], sh.id[j], sh.v[i], sh.id[i]) : cand_before(sh.v[i], sh.id[i], sh.v[j], sh.id[j]);
        if (swap) {
          const float tv = sh.v[i];
          const int ti = sh.id[i];
          sh.v[i] = sh.v[j], sh.id[i] = sh.id[j];
          sh.v[j] = tv, sh.id[j] = ti;
        }
      }
      __syncthreads();
    }
}

// (m, at) wins over (m2, at2): the larger logit, on a tie the first position (torch.argmax's rule).
__device__ __forceinline__ bool max_before(float m, int at, float m2, int at2) { return m > m2 || (m == m2 && at < at2); }

// The maximum over the block and its first position (every thread gets them): per-thread pairs
// in smax / sidx [blockDim.x], a power of two.
__device__ void block_argmax(float& mx, int& at, float* smax, int* sidx) {
  const int t = threadIdx.x;
  smax[t] = mx;
  sidx[t] = at;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s && max_before(smax[t + s], sidx[t + s], smax[t], sidx[t])) {
      smax[t] = smax[t + s];
      sidx[t] = sidx[t + s];
    }
    __syncthreads();
  }
  mx = smax[0];
  at = sidx[0];
  __syncthreads();  // smax / sidx may be reused
}

// Step 1 of the pick: per slice of a row, its maximum, the maximum's first position and sum
// exp(z - that maximum) in f32. grid (rows, slices): a batch-1 decode's one row is read by
// pick_slices(vocab) blocks on as many SMs, not by one block (one SM's memory parallelism).
// stats [rows, slices].
__global__ void __launch_bounds__(kStatThreads) pick_stats_kernel(const float* logits, int vocab, PickStat* stats) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float smax[kStatThreads];
  __shared__ int sidx[kStatThreads];
  __shared__ float scratch[32];
  const float* z = logits + long(blockIdx.x) * vocab;
  const int per = (vocab + gridDim.y - 1) / gridDim.y;
  const int lo = min(vocab, int(blockIdx.y) * per), hi = min(vocab, lo + per);
  float mx = -FLT_MAX;
  int at = vocab;
#pragma unroll 4
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x)
    if (z[i] > mx) mx = z[i], at = i;  // strided ascending: the first maximum of this thread
  block_argmax(mx, at, smax, sidx);
  float se = 0.f;
#pragma unroll 4
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) se += expf(z[i] - mx);
  se = block_sum(se, scratch);
  if (threadIdx.x == 0) stats[long(blockIdx.x) * gridDim.y + blockIdx.y] = {mx, at, se};
}

// A sampled row's maximum, as pick_kernel takes it from its slices' statistics.
__device__ float row_max(const PickStat* st, int slices, int vocab) {
  float mx = -FLT_MAX;
  int at = vocab;
  for (int j = 0; j < slices; ++j)
    if (max_before(st[j].max, st[j].at, mx, at)) mx = st[j].max, at = st[j].at;
  return mx;
}

// A sampled row's weights are summed in kPickThreads contiguous chunks of pick_chunk(vocab)
// elements, thread (or chunk) t's being [lo, hi): the same split in pick_weights_kernel, which
// sums them, and in pick_kernel, which walks one, so the sums are the bits the walk expects.
__device__ __forceinline__ int pick_chunk(int vocab) { return (vocab + kPickThreads - 1) / kPickThreads; }
__device__ __forceinline__ void pick_chunk_range(int vocab, int t, int& lo, int& hi) {
  lo = min(vocab, t * pick_chunk(vocab)), hi = min(vocab, lo + pick_chunk(vocab));
}

// Step 2 of a sampled pick, before pick_kernel: the kPickThreads chunk sums of exp((z - max) / T)
// in double that pick_kernel's threads would each take (the same contiguous chunks, each summed
// in order: the same bits), 32 chunks a block, so one row's double exponentials (FP64 is a
// fraction of an SM's throughput) are spread over kPickThreads / 32 SMs instead of one.
// grid (rows, kPickThreads / 32), 32 threads; weights [rows, kPickThreads]; only the rows
// pick_draws_whole (ops.h) write theirs (pick_kernel reads no other's).
__global__ void pick_weights_kernel(const float* logits, int vocab, const PickStat* stats, int slices, const DevicePick* params,
                                    double* weights) {
  grid_dependents_launch();
  grid_dependency_wait();
  const DevicePick p = params[blockIdx.x];
  if (!pick_draws_whole(p)) return;
  const float mx = row_max(stats + long(blockIdx.x) * slices, slices, vocab), inv_t = 1.f / p.temperature;
  const int t = int(blockIdx.y) * 32 + int(threadIdx.x);  // pick_kernel's thread
  int lo, hi;
  pick_chunk_range(vocab, t, lo, hi);
  const float* z = logits + long(blockIdx.x) * vocab;
  double w = 0;
  for (int i = lo; i < hi; ++i) w += exp(double((z[i] - mx) * inv_t));
  weights[long(blockIdx.x) * kPickThreads + t] = w;
}

// One block per row, after pick_stats_kernel and pick_weights_kernel. Shared: per-thread chunk
// sums and their exclusive prefix, the total, and the picked id.
__global__ void pick_kernel(const float* logits, int vocab, const PickStat* stats, int slices, const double* weights,
                            const DevicePick* params, const int* flags, int n_flags, uint32_t* token, float* logprob, float* p_rf,
                            float* p_flags, int top_n, uint32_t* top_ids, float* top_logprobs) {
  grid_dependents_launch();
  grid_dependency_wait();
  extern __shared__ __align__(16) unsigned char nucleus_smem[];  // NucleusShared, for top-k / top-p rows
  __shared__ double sw[kPickThreads];
  __shared__ float s_lse, s_mx;
  __shared__ int s_at;
  __shared__ double stotal;
  __shared__ int spick, s_owner;
  __shared__ double s_rem, s_mass;
  const float* z = logits + long(blockIdx.x) * vocab;
  const int t = threadIdx.x;

  // 1 and 2. The row's maximum and its first position, and log-sum-exp at temperature 1 (f32, as
  // the CPU's sum_exp): the slices' maxima in order, then sum_s sum_s * exp(max_s - max).
  if (t < 32) {  // one warp, a slice or two per lane
    const PickStat* st = stats + long(blockIdx.x) * slices;
    float mx = -FLT_MAX;
    int at = vocab;
    for (int j = t; j < slices; j += 32)
      if (max_before(st[j].max, st[j].at, mx, at)) mx = st[j].max, at = st[j].at;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, mx, o);
      const int a2 = __shfl_xor_sync(0xffffffffu, at, o);
      if (max_before(m2, a2, mx, at)) mx = m2, at = a2;
    }
    float se = 0.f;
    for (int j = t; j < slices; j += 32) se += st[j].sum * expf(st[j].max - mx);
    se = warp_sum(se);
    if (t == 0) s_mx = mx, s_at = at, s_lse = mx + logf(se);
  }
  __syncthreads();
  const float mx = s_mx, lse = s_lse;
  const int argmax = s_at < vocab ? s_at : 0;

  // 3. The pick.
  const DevicePick p = params[blockIdx.x];
  int pick = argmax;
  const float inv_t = p.temperature > 0.f ? 1.f / p.temperature : INFINITY;
  const bool nucleus = p.top_k > 0 || p.top_p < 1.f;
  if (p.temperature > 0.f && isfinite(inv_t)) {
    // Weights exp((z - max) / T) in double as on the CPU: thread t's contiguous chunk's sum, from
    // pick_weights_kernel (for the whole-vocabulary draw, and the total that top-p alone measures
    // against).
    const int chunk = pick_chunk(vocab);
    int lo, hi;
    pick_chunk_range(vocab, t, lo, hi);
    const double w = pick_draws_whole(p) ? weights[long(blockIdx.x) * kPickThreads + t] : 0.0;
    sw[t] = w;
    __syncthreads();
    if (t == 0) {
      // The exclusive prefix in order, eight loads ahead of the dependent adds.
      double run = 0;
      for (int i = 0; i < kPickThreads; i += 8) {
        double c[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = sw[i + j];
#pragma unroll
        for (int j = 0; j < 8; ++j) sw[i + j] = run, run += c[j];
      }
      stotal = run;
      s_owner = -1;
      spick = vocab - 1;  // u * total beyond the total by rounding: the CPU returns the last id too
    }
    __syncthreads();
    const double u = rf::uniform_draw(p.seed, p.counter);  // the CPU's draw, bit for bit
    if (!nucleus) {
      // The chunk holding u * total (its owner), then the walk through it: its weights computed by
      // the whole block into shared memory, then subtracted in order by one thread (the same
      // numbers and order as the owner walking alone, without a chain of dependent exponentials).
      const double r = u * stotal;
      const double start = sw[t];
      if (hi > lo && r >= start && r < start + w) s_owner = t, s_rem = r - start;
      __syncthreads();
      const int owner = s_owner;
      if (owner >= 0 && chunk <= kPickMaxCandidates) {
        const int olo = owner * chunk, ohi = min(vocab, olo + chunk);
        double* wt = reinterpret_cast<NucleusShared*>(nucleus_smem)->prob;
        for (int i = olo + t; i < ohi; i += blockDim.x) wt[i - olo] = exp(double((z[i] - mx) * inv_t));
        __syncthreads();
        if (t == 0) {
          double rem = s_rem;
          int found = ohi - 1;
          for (int i = olo; i < ohi; ++i) {
            rem -= wt[i - olo];
            if (rem < 0) {
              found = i;
              break;
            }
          }
          spick = found;
        }
      } else if (owner == t) {  // a chunk past the buffer (a vocabulary past 2^20): the owner walks alone
        double rem = s_rem;
        int found = hi - 1;
        for (int i = lo; i < hi; ++i) {
          rem -= exp(double((z[i] - mx) * inv_t));
          if (rem < 0) {
            found = i;
            break;
          }
        }
        spick = found;
      }
      __syncthreads();
      pick = spick;
    } else {
      // rf::logits_pick's sample(): the top-k, or for top-p alone the best 256, then 2048, until
      // their mass reaches top_p of the total; past kPickMaxCandidates the host picks the row.
      NucleusShared& sh = *reinterpret_cast<NucleusShared*>(nucleus_smem);
      int k = p.top_k > 0 ? min(p.top_k, vocab) : min(256, vocab);
      for (;;) {
        if (k > kPickMaxCandidates) {
          pick = -1;
          break;
        }
        best_candidates(z, vocab, k, sh);
        // The candidates' weights, by every thread (the same expression wherever it is formed, so
        // the same bits when formed again below).
        const auto weigh = [&](int n) {
          for (int i = t; i < n; i += blockDim.x) sh.prob[i] = exp(double((sh.v[i] - mx) * inv_t));
        };
        weigh(k);
        __syncthreads();
        // Sequential sums in candidate order, as the CPU's, by thread 0; the divisions, which do
        // not depend on one another, by every thread first.
        if (t == 0) {
          double mass = 0;
          for (int i = 0; i < k; ++i) mass += sh.prob[i];
          s_mass = mass;
        }
        __syncthreads();
        const double mass = s_mass;
        if (!(p.top_k > 0 || k == vocab || mass >= double(p.top_p) * stotal)) {  // too little mass: grow
          __syncthreads();  // s_mass is read before it is written again
          k = min(vocab, k * 8);
          continue;
        }
        int keep = k;
        if (p.top_p < 1.f) {
          const double sum = p.top_k == 0 ? stotal : mass;
          for (int i = t; i < k; i += blockDim.x) sh.prob[i] /= sum;  // each candidate's share
          __syncthreads();
          if (t == 0) {
            double cumulative = 0;
            int n = k;
            for (int i = 0; i < k; ++i) {
              cumulative += sh.prob[i];
              if (cumulative >= double(p.top_p)) {
                n = i + 1;
                break;
              }
            }
            spick = n;
          }
          __syncthreads();
          keep = spick;
          weigh(keep);  // the weights again, over the shares
          __syncthreads();
        }
        if (t == 0) {
          double kept = 0;
          for (int i = 0; i < keep; ++i) kept += sh.prob[i];
          double r = u * kept;
          int result = sh.id[keep - 1];
          for (int i = 0; i < keep; ++i) {
            r -= sh.prob[i];
            if (r < 0) {
              result = sh.id[i];
              break;
            }
          }
          spick = result;
        }
        __syncthreads();
        pick = spick;
        break;
      }
    }
  }
  // 4. The top n, as rf::logits_pick's (descending, ties by the lower id; log-probabilities at
  //    temperature 1, -inf past the vocabulary), but for a row the host redoes.
  if (top_n > 0 && pick >= 0) {
    NucleusShared& sh = *reinterpret_cast<NucleusShared*>(nucleus_smem);
    const int k = min(top_n, vocab);
    best_candidates(z, vocab, k, sh);
    for (int i = t; i < top_n; i += blockDim.x) {
      const long o = long(blockIdx.x) * top_n + i;
      top_ids[o] = i < k ? uint32_t(sh.id[i]) : 0u;
      top_logprobs[o] = i < k ? sh.v[i] - lse : -INFINITY;
    }
  }
  if (t == 0) {
    if (pick < 0) {
      token[blockIdx.x] = kPickFallback;  // the host picks this row (logprob left unwritten)
    } else {
      token[blockIdx.x] = uint32_t(pick);
      logprob[blockIdx.x] = z[pick] - lse;
    }
    float total = 0.f;
    for (int k = 0; k < n_flags; ++k) {
      const int id = flags[k];
      const float p = id >= 0 && id < vocab ? expf(z[id] - lse) : 0.f;
      if (p_flags) p_flags[long(blockIdx.x) * n_flags + k] = p;
      total += p;
    }
    p_rf[blockIdx.x] = total;
  }
}

int blocks_for(long n, int threads) {
  const long b = (n + threads - 1) / threads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace

void rmsnorm_rows(float* out, const float* x, const float* w, int rows, int n, float eps, cudaStream_t stream,
                  __nv_bfloat16* out_bf16) {
  if (rows > 0) launch_dependent(rmsnorm_kernel, rows, kRowThreads, 0, stream, out, x, w, n, eps, out_bf16);
}

void layernorm_rows(float* out, const float* x, const float* w, const float* b, int rows, int n, float eps,
                    cudaStream_t stream, __nv_bfloat16* out_bf16) {
  if (rows > 0) launch_dependent(layernorm_kernel, rows, kRowThreads, 0, stream, out, x, w, b, n, eps, out_bf16);
}

void rope_rows(float* x, long row_stride, int rows, int n_heads, int head_dim, const float* cos, const float* sin,
               cudaStream_t stream) {
  if (rows > 0 && n_heads > 0) launch_dependent(rope_kernel, dim3(rows, n_heads), 64, 0, stream, x, row_stride, head_dim, cos, sin);
}

void qk_norm_rows(float* x, long row_stride, int rows, int n_q, int n_k, int head_dim, const float* wq, const float* wk,
                  float eps, cudaStream_t stream) {
  if (rows > 0 && n_q + n_k > 0)
    launch_dependent(qk_norm_kernel, dim3(rows, n_q + n_k), 64, 0, stream, x, row_stride, n_q, head_dim, wq, wk, eps);
}

void swiglu(float* out, const float* gate, const float* up, long n, cudaStream_t stream) {
  if (n > 0) launch_dependent(swiglu_kernel, blocks_for(n, 256), 256, 0, stream, out, gate, up, n);
}

void gelu_new(float* x, long n, cudaStream_t stream, __nv_bfloat16* out_bf16, __nv_bfloat16* in_bf16) {
  if (n > 0) launch_dependent(gelu_new_kernel<float>, blocks_for(n, 256), 256, 0, stream, x, x, n, out_bf16, in_bf16);
}

void gelu_new(float* out, const __nv_bfloat16* x, long n, cudaStream_t stream, __nv_bfloat16* out_bf16) {
  if (n > 0) launch_dependent(gelu_new_kernel<__nv_bfloat16>, blocks_for(n, 256), 256, 0, stream, out, x, n, out_bf16, nullptr);
}

// The scratch: the slices' statistics [rows, slices], then (256-byte aligned) the chunk weights
// [rows, kPickThreads] doubles.
size_t pick_weights_offset(int rows, int vocab) {
  return (size_t(std::max(rows, 1)) * pick_slices(vocab) * sizeof(PickStat) + 255) / 256 * 256;
}
size_t pick_scratch_bytes(int rows, int vocab) {
  return pick_weights_offset(rows, vocab) + size_t(std::max(rows, 1)) * kPickThreads * sizeof(double);
}

void pick_rows(const float* logits, int rows, int vocab, const DevicePick* params, const int* flags, int n_flags,
               uint32_t* token, float* logprob, float* p_rf, float* p_flags, int top_n, uint32_t* top_ids, float* top_logprobs,
               void* scratch, cudaStream_t stream, bool whole_draws) {
  if (rows <= 0) return;
  if (top_n < 0 || top_n > kPickMaxTopN) throw std::invalid_argument("pick_rows: top_n outside 0.." + std::to_string(kPickMaxTopN));
  const int slices = pick_slices(vocab);
  PickStat* stats = static_cast<PickStat*>(scratch);
  double* weights = reinterpret_cast<double*>(static_cast<char*>(scratch) + pick_weights_offset(rows, vocab));
  launch_dependent(pick_stats_kernel, dim3(rows, slices), kStatThreads, 0, stream, logits, vocab, stats);
  if (whole_draws)
    launch_dependent(pick_weights_kernel, dim3(rows, kPickThreads / 32), 32, 0, stream, logits, vocab, stats, slices, params, weights);
  // The candidates' arrays in dynamic shared memory: with the static arrays, under the 48 KiB a
  // kernel gets without opting in.
  launch_dependent(pick_kernel, rows, kPickThreads, sizeof(NucleusShared), stream, logits, vocab, stats, slices, weights, params,
                   flags, n_flags, token, logprob, p_rf, p_flags, top_n, top_ids, top_logprobs);
}

}  // namespace rf::cuda
