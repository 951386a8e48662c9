// Row-wise backward kernels on the device (see ops_backward.h for the contract and
// native/kernels/ops_backward.cpp for the formulas, which these follow line for line).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/bf16.h"
#include "cuda/column_reduce.cuh"
#include "cuda/rank_rows.cuh"
#include "model/dropout_keep.h"
#include "cuda/ops_backward.h"

namespace rf::cuda {

namespace {

constexpr int kRowThreads = 256;

int grid_for(long n, int threads) {
  const long b = (n + threads - 1) / threads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// dx[i] = v, or with accumulate dx[i] + v (one rounding, never contracted with v's product: the
// bits of v stored and added by a second pass), and its bf16 copy.
__device__ __forceinline__ void store_dx(float* dx, __nv_bfloat16* dx_bf16, long i, float v, bool accumulate) {
  const float o = accumulate ? __fadd_rn(dx[i], v) : v;
  dx[i] = o;
  if (dx_bf16) dx_bf16[i] = bf16_round(o);
}

// One RMSNorm row's backward statistics, over the block: inv = 1 / sqrt(mean(x^2) + eps) and
// c = mean(dout * w * x * inv); then dx[i] = inv * (dout[i] * w[i] - x[i] * inv * c). Every
// thread's reads of dout are done when it returns (block_sum synchronizes): dx may overwrite it.
__device__ void rms_backward_stats(const float* xr, const float* dr, const float* w, int n, float eps, float* scratch, float& inv,
                                   float& c) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  inv = 1.0f / sqrtf(block_sum(ss, scratch) / float(n) + eps);
  float gx = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) gx += dr[i] * w[i] * (xr[i] * inv);
  c = block_sum(gx, scratch) / float(n);
}

// grid: rows. Writes (or adds to) dx and the row's inv (r) to stats[row].
__global__ void rmsnorm_dx_kernel(float* dx, const float* dout, const float* x, const float* w, int n, float eps, float* stats,
                                  bool accumulate, __nv_bfloat16* dx_bf16) {
  __shared__ float scratch[32];
  const long r = blockIdx.x;
  const float* xr = x + r * n;
  const float* dr = dout + r * n;
  float inv, c;
  rms_backward_stats(xr, dr, w, n, eps, scratch, inv, c);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = inv * (dr[i] * w[i] - xr[i] * inv * c);
    store_dx(dx, dx_bf16, r * n + i, v, accumulate);
  }
  if (threadIdx.x == 0) stats[r] = inv;
}

// grid: rows. Each head of the row in order: dx in place (the CPU's rmsnorm_backward per head),
// and the row's weight-gradient terms summed over its q heads into part[r][0] and over its k
// heads into part[r][1] ([rows, 2, head_dim]); thread t owns columns t, t + blockDim.x, ...
__global__ void qk_norm_dx_kernel(float* dx, long row_stride, const float* x, long x_stride, int n_q, int n_k, int head_dim,
                                  const float* wq, const float* wk, float eps, float* part) {
  __shared__ float scratch[32];
  const long r = blockIdx.x;
  float* pr = part + r * 2 * head_dim;
  for (int i = threadIdx.x; i < 2 * head_dim; i += blockDim.x) pr[i] = 0.f;
  for (int h = 0; h < n_q + n_k; ++h) {
    const bool is_q = h < n_q;
    const float* w = is_q ? wq : wk;
    const float* xr = x + r * x_stride + long(h) * head_dim;
    float* dr = dx + r * row_stride + long(h) * head_dim;
    float* pw = pr + (is_q ? 0 : head_dim);
    float inv, c;
    rms_backward_stats(xr, dr, w, head_dim, eps, scratch, inv, c);
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
      const float xhat = xr[i] * inv;
      pw[i] += dr[i] * xhat;
      dr[i] = inv * (dr[i] * w[i] - xr[i] * inv * c);
    }
  }
}

// Row r's q and k weight-gradient terms at column i (qk_norm_dx_kernel's part).
struct QkNormTerms {
  const float* part;
  int head_dim;
  __device__ void operator()(int r, int i, float (&v)[2]) const {
    v[0] = part[long(r) * 2 * head_dim + i];
    v[1] = part[long(r) * 2 * head_dim + head_dim + i];
  }
};

// Row r's terms of the norm's parameter gradients at column i, for colsum::column_sums:
// dout[r, i] * xhat[r, i] (dw) and dout[r, i] (db, layernorm). xhat = (x - mean) * scale with
// mean = stats[2r] and scale = stats[2r + 1] (layernorm), mean 0 and scale stats[r] (rmsnorm).
template <int K>
struct NormTerms {
  const float *dout, *x, *stats;
  int n;
  __device__ void operator()(int r, int i, float (&v)[K]) const {
    const float mean = K == 2 ? stats[2 * r] : 0.f;
    const float scale = K == 2 ? stats[2 * r + 1] : stats[r];
    const float d = dout[long(r) * n + i];
    v[0] = d * ((x[long(r) * n + i] - mean) * scale);
    if (K == 2) v[K - 1] = d;
  }
};

// grid: rows. Writes (or adds to) dx and (mean, rstd) to stats[2 row ...].
__global__ void layernorm_dx_kernel(float* dx, const float* dout, const float* x, const float* w, int n, float eps, float* stats,
                                    bool accumulate, __nv_bfloat16* dx_bf16) {
  __shared__ float scratch[32];
  const long r = blockIdx.x;
  const float* xr = x + r * n;
  const float* dr = dout + r * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
  const float mean = block_sum(s, scratch) / float(n);
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (xr[i] - mean) * (xr[i] - mean);
  const float rstd = 1.0f / sqrtf(block_sum(ss, scratch) / float(n) + eps);
  float g_sum = 0.f, gx_sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float g = dr[i] * w[i];
    g_sum += g;
    gx_sum += g * ((xr[i] - mean) * rstd);
  }
  const float g_mean = block_sum(g_sum, scratch) / float(n);
  const float gx_mean = block_sum(gx_sum, scratch) / float(n);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float xhat = (xr[i] - mean) * rstd;
    const float v = rstd * (dr[i] * w[i] - g_mean - xhat * gx_mean);
    store_dx(dx, dx_bf16, r * n + i, v, accumulate);
  }
  if (threadIdx.x == 0) stats[2 * r] = mean, stats[2 * r + 1] = rstd;
}

// grid (rows, heads). The forward's rotation transposed: da = da' c + db' s, db = db' c - da' s.
__global__ void rope_backward_kernel(float* dx, long row_stride, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  float* a = dx + long(blockIdx.x) * row_stride + long(blockIdx.y) * head_dim;
  float* b = a + half;
  const float* c = cos + long(blockIdx.x) * half;
  const float* s = sin + long(blockIdx.x) * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float da = a[i], dbv = b[i];
    a[i] = da * c[i] + dbv * s[i];
    b[i] = dbv * c[i] - da * s[i];
  }
}

// grid: (column blocks, tiles of kSwigluRows rows); a thread owns one column and walks the tile's
// rows (no index divided), issuing kSwigluLoads rows' loads before their stores. KMAX > 0: the
// adapter's term added to dout as lora_up_dropout_add_kernel adds it (its A column in registers,
// the tile's du rows in shared memory, zero past the rank: the same k-ordered fused sums over
// KMAX through rank_rows.cuh, the same two roundings), so the same bits. GMAX > 0: the gate and
// up adapters' terms added to in as swiglu_rows_kernel (model_ops.cu) adds them, at the same
// width (swiglu_lora_width), so the backward differentiates at the forward's sums, bit for bit.
constexpr int kSwigluRows = 32, kSwigluLoads = 4;

template <class T, int KMAX, int GMAX>
__global__ void __launch_bounds__(256, KMAX + 2 * GMAX <= 32 ? 3 : KMAX + 2 * GMAX <= 64 ? 2 : 1)
    swiglu_backward_kernel(float* din, const float* dout, const T* in, int rows, int inter, __nv_bfloat16* din_bf16,
                           DoutLora lora, SwigluLora gate, SwigluLora up) {
  constexpr int K4 = KMAX > 0 ? KMAX / 4 : 1, G4 = GMAX > 0 ? GMAX / 4 : 1;
  __shared__ float4 du_s[kSwigluRows][K4];
  __shared__ float4 u_s[2][kSwigluRows][G4];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bool live = c < inter;
  const SwigluLora terms[2] = {gate, up};
  float a[KMAX > 0 ? KMAX : 1];
  if constexpr (KMAX > 0)
#pragma unroll
    for (int k = 0; k < KMAX; ++k) a[k] = live && k < lora.rank ? lora.A[long(k) * inter + c] : 0.f;
  float b[2][GMAX > 0 ? GMAX : 1];
  if constexpr (GMAX > 0)
#pragma unroll
    for (int h = 0; h < 2; ++h) load_rank_row(b[h], terms[h].u ? terms[h].B : nullptr, terms[h].rank, c, live);
  const float keep_scale = 1.0f / (1.0f - lora.p);
  for (long r0 = long(blockIdx.y) * kSwigluRows; r0 < rows; r0 += long(gridDim.y) * kSwigluRows) {
    const int n_rows = rows - r0 < kSwigluRows ? int(rows - r0) : kSwigluRows;
    if constexpr (KMAX > 0 || GMAX > 0) __syncthreads();  // the previous tile's du and u are read
    if constexpr (KMAX > 0) load_rank_rows<KMAX, kSwigluRows>(du_s, lora.du, lora.rank, r0, n_rows);
    if constexpr (GMAX > 0)
      for (int h = 0; h < 2; ++h) load_rank_rows<GMAX, kSwigluRows>(u_s[h], terms[h].u, terms[h].rank, r0, n_rows);
    if constexpr (KMAX > 0 || GMAX > 0) __syncthreads();
    if (!live) continue;
    for (int r1 = 0; r1 < n_rows; r1 += kSwigluLoads) {
      const long first = (r0 + r1) * inter + c;  // the group's first dout; its in at 2 first - c
      float g[kSwigluLoads], u[kSwigluLoads], d[kSwigluLoads];
#pragma unroll
      for (int j = 0; j < kSwigluLoads; ++j)
        if (r1 + j < n_rows) {
          const long o = first + long(j) * inter, i = 2 * o - c;
          g[j] = as_f32(in[i]), u[j] = as_f32(in[i + inter]), d[j] = dout[o];
        }
#pragma unroll
      for (int j = 0; j < kSwigluLoads; ++j) {
        if (r1 + j >= n_rows) continue;
        if constexpr (GMAX > 0) {
          if (terms[0].u) g[j] = __fadd_rn(g[j], rank_dot(u_s[0][r1 + j], b[0]));
          if (terms[1].u) u[j] = __fadd_rn(u[j], rank_dot(u_s[1][r1 + j], b[1]));
        }
        if constexpr (KMAX > 0) {
          const float acc = rank_dot(du_s[r1 + j], a);
          if (lora.p == 0.f || dropout_keep(lora.seed, lora.layer, lora.adapter, r0 + r1 + j, c, lora.p))
            d[j] = __fadd_rn(d[j], __fmul_rn(acc, keep_scale));
        }
        const long i = 2 * (first + long(j) * inter) - c;
        const float e = expf(-g[j]);
        const float s = 1.0f / (1.0f + e);  // sigmoid(g); 1 - s as e * s
        const float dg = d[j] * u[j] * s * (1.0f + g[j] * (e * s)), du = d[j] * g[j] * s;
        if (din) din[i] = dg, din[i + inter] = du;
        if (din_bf16) din_bf16[i] = bf16_round(dg), din_bf16[i + inter] = bf16_round(du);
      }
    }
  }
}

template <class T>
__global__ void gelu_new_backward_kernel(float* dx, const float* dout, const T* x, long n, __nv_bfloat16* dx_bf16) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  const float c = 0.044715f;
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const float v = as_f32(x[i]);
    const float u = k * (v + c * v * v * v);
    const float e = expf(-2.0f * u);
    const float s = 1.0f / (1.0f + e);
    const float d = dout[i] * (s + 2.0f * v * s * (e * s) * k * (1.0f + 3.0f * c * v * v));
    dx[i] = d;
    if (dx_bf16) dx_bf16[i] = bf16_round(d);
  }
}

}  // namespace

long norm_backward_scratch_floats(int rows, int n) { return 2 * long(rows) + colsum::scratch_floats(rows, n, 2); }

void rmsnorm_backward_rows(float* dx, float* dw, const float* dout, const float* x, const float* w, int rows, int n, float eps,
                           float* scratch, cudaStream_t stream, bool accumulate, __nv_bfloat16* dx_bf16) {
  if (rows <= 0) return;
  rmsnorm_dx_kernel<<<rows, kRowThreads, 0, stream>>>(dx, dout, x, w, n, eps, scratch, accumulate, dx_bf16);
  if (dw) colsum::column_sums<1>(dw, nullptr, rows, n, scratch + 2 * long(rows), NormTerms<1>{dout, x, scratch, n}, stream);
}

void layernorm_backward_rows(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int rows,
                             int n, float eps, float* scratch, cudaStream_t stream, bool accumulate, __nv_bfloat16* dx_bf16) {
  if (rows <= 0) return;
  layernorm_dx_kernel<<<rows, kRowThreads, 0, stream>>>(dx, dout, x, w, n, eps, scratch, accumulate, dx_bf16);
  if (dw) colsum::column_sums<2>(dw, db, rows, n, scratch + 2 * long(rows), NormTerms<2>{dout, x, scratch, n}, stream);
}

long qk_norm_backward_scratch_floats(int rows, int head_dim) {
  return 2 * long(rows) * head_dim + colsum::scratch_floats(rows, head_dim, 2);
}

void qk_norm_backward_rows(float* dx, long row_stride, const float* x, long x_stride, int rows, int n_q, int n_k, int head_dim,
                           const float* wq, const float* wk, float eps, float* dwq, float* dwk, float* scratch,
                           cudaStream_t stream) {
  if (rows <= 0 || n_q + n_k <= 0) return;
  qk_norm_dx_kernel<<<rows, 128, 0, stream>>>(dx, row_stride, x, x_stride, n_q, n_k, head_dim, wq, wk, eps, scratch);
  if (dwq || dwk)
    colsum::column_sums<2>(dwq, dwk, rows, head_dim, scratch + 2 * long(rows) * head_dim, QkNormTerms{scratch, head_dim}, stream);
}

void rope_backward_rows(float* dx, long row_stride, int rows, int n_heads, int head_dim, const float* cos, const float* sin,
                        cudaStream_t stream) {
  if (rows > 0 && n_heads > 0) rope_backward_kernel<<<dim3(rows, n_heads), 64, 0, stream>>>(dx, row_stride, head_dim, cos, sin);
}

template <class T, int KMAX>
void swiglu_backward_width(dim3 grid, float* din, const float* dout, const T* in, int rows, int inter, cudaStream_t stream,
                           __nv_bfloat16* din_bf16, const DoutLora& lora, const SwigluLora& gate, const SwigluLora& up, int width) {
  if (width == 0)
    swiglu_backward_kernel<T, KMAX, 0><<<grid, 256, 0, stream>>>(din, dout, in, rows, inter, din_bf16, lora, gate, up);
  else if (width == 8)
    swiglu_backward_kernel<T, KMAX, 8><<<grid, 256, 0, stream>>>(din, dout, in, rows, inter, din_bf16, lora, gate, up);
  else if (width == 16)
    swiglu_backward_kernel<T, KMAX, 16><<<grid, 256, 0, stream>>>(din, dout, in, rows, inter, din_bf16, lora, gate, up);
  else
    swiglu_backward_kernel<T, KMAX, 32><<<grid, 256, 0, stream>>>(din, dout, in, rows, inter, din_bf16, lora, gate, up);
}

template <class T>
void swiglu_backward_launch(float* din, const float* dout, const T* in, int rows, int inter, cudaStream_t stream,
                            __nv_bfloat16* din_bf16, const DoutLora& lora, const SwigluLora& gate, const SwigluLora& up) {
  if (lora.du && (lora.rank < 1 || lora.rank > kDoutLoraMaxRank || !lora.A))
    throw std::invalid_argument("swiglu_backward_rows: an adapter needs A and a rank in 1.." + std::to_string(kDoutLoraMaxRank));
  const int width = swiglu_lora_width(gate, up, "swiglu_backward_rows");  // the forward's instance
  if (rows <= 0 || inter <= 0) return;
  const dim3 grid((inter + 255) / 256, unsigned(std::min<long>(65535, (long(rows) + kSwigluRows - 1) / kSwigluRows)));
  // The widths lora_up_dropout_add takes for these ranks (16 or 32), for its bits.
  if (!lora.du) swiglu_backward_width<T, 0>(grid, din, dout, in, rows, inter, stream, din_bf16, lora, gate, up, width);
  else if (lora.rank <= 16) swiglu_backward_width<T, 16>(grid, din, dout, in, rows, inter, stream, din_bf16, lora, gate, up, width);
  else swiglu_backward_width<T, 32>(grid, din, dout, in, rows, inter, stream, din_bf16, lora, gate, up, width);
}

void swiglu_backward_rows(float* din, const float* dout, const float* in, int rows, int inter, cudaStream_t stream,
                          __nv_bfloat16* din_bf16, const DoutLora& lora, const SwigluLora& gate, const SwigluLora& up) {
  swiglu_backward_launch(din, dout, in, rows, inter, stream, din_bf16, lora, gate, up);
}

void swiglu_backward_rows(float* din, const float* dout, const __nv_bfloat16* in, int rows, int inter, cudaStream_t stream,
                          __nv_bfloat16* din_bf16, const DoutLora& lora, const SwigluLora& gate, const SwigluLora& up) {
  swiglu_backward_launch(din, dout, in, rows, inter, stream, din_bf16, lora, gate, up);
}

void gelu_new_backward(float* dx, const float* dout, const float* x, long n, cudaStream_t stream, __nv_bfloat16* dx_bf16) {
  if (n > 0) gelu_new_backward_kernel<<<grid_for(n, 256), 256, 0, stream>>>(dx, dout, x, n, dx_bf16);
}

void gelu_new_backward(float* dx, const float* dout, const __nv_bfloat16* x, long n, cudaStream_t stream, __nv_bfloat16* dx_bf16) {
  if (n > 0) gelu_new_backward_kernel<<<grid_for(n, 256), 256, 0, stream>>>(dx, dout, x, n, dx_bf16);
}

}  // namespace rf::cuda
