// The engine's glue kernels (see model_ops.h). Elementwise ones run a grid-stride loop; the
// row reductions take one block per row and sum in the block's order, so results equal the
// CPU's up to float rounding.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/bf16.h"
#include "cuda/block_sum.cuh"
#include "cuda/launch.cuh"
#include "cuda/model_ops.h"
#include "cuda/rank_rows.cuh"

namespace rf::cuda {

namespace {

constexpr int kThreads = 256;

int grid_for(long n, int threads) {
  const long b = (n + threads - 1) / threads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

// Block-wide reductions; every thread gets the result. `scratch` holds one float per warp.
__device__ float block_reduce(float v, float* scratch, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = is_max ? -FLT_MAX : 0.f;
  for (int w = 0; w < warps; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// grid: rows; threads over the hidden size.
__global__ void embed_kernel(float* x, const void* table, bool table_bf16, const int32_t* tokens, int hidden,
                             const float* flag_embed, const int32_t* flag_tokens, int n_flags, const float* pos_embed,
                             const int32_t* positions, const float* delta) {
  grid_dependents_launch();
  grid_dependency_wait();
  const long r = blockIdx.x;
  const int tok = tokens[r];
  int k = -1;
  if (flag_embed)
    for (int j = 0; j < n_flags; ++j)
      if (flag_tokens[j] == tok) k = j;
  float* row = x + r * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v;
    if (k >= 0) v = flag_embed[long(k) * hidden + i];
    else if (table_bf16) v = __bfloat162float(static_cast<const __nv_bfloat16*>(table)[long(tok) * hidden + i]);
    else v = static_cast<const float*>(table)[long(tok) * hidden + i];
    if (pos_embed) v += pos_embed[long(positions[r]) * hidden + i];
    if (delta) v += delta[r * hidden + i];
    row[i] = v;
  }
}

// grid: (column blocks, row tiles of kSwigluRows); a thread owns one column c of the gate and of
// the up half and walks the tile's rows, so no index is divided. KMAX > 0: the adapters' up
// products are added as in is read, each from its u rows (shared, zero past the rank) and the
// thread's B row (registers): g = g + sum_k u[r, k] B[c, k], the sum in k order (fused
// multiply-adds; the zero padding adds exact zeros), one rounding for the add. A half without an
// adapter is read as it is.
// Three blocks per SM up to rank 16 (their registers fit 85 per thread without spilling; rank
// 32's B rows alone take 64).
constexpr int kSwigluRows = 32, kSwigluLoads = 4;

template <class T, int KMAX>
__global__ void __launch_bounds__(kThreads, KMAX <= 16 ? 3 : 1)
    swiglu_rows_kernel(float* out, const T* in, int rows, int inter, __nv_bfloat16* out_bf16, __nv_bfloat16* in_bf16,
                       float* in_f32, SwigluLora gate, SwigluLora up) {
  constexpr int K4 = KMAX > 0 ? KMAX / 4 : 1;
  __shared__ float4 u_s[2][kSwigluRows][K4];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bool live = c < inter;
  const SwigluLora terms[2] = {gate, up};
  float b[2][KMAX > 0 ? KMAX : 1];
  if constexpr (KMAX > 0)
#pragma unroll
    for (int h = 0; h < 2; ++h) load_rank_row(b[h], terms[h].u ? terms[h].B : nullptr, terms[h].rank, c, live);
  for (long r0 = long(blockIdx.y) * kSwigluRows; r0 < rows; r0 += long(gridDim.y) * kSwigluRows) {
    const int n_rows = rows - r0 < kSwigluRows ? int(rows - r0) : kSwigluRows;
    if constexpr (KMAX > 0) {
      __syncthreads();  // the previous tile's u is read
      for (int h = 0; h < 2; ++h) load_rank_rows<KMAX, kSwigluRows>(u_s[h], terms[h].u, terms[h].rank, r0, n_rows);
      __syncthreads();
    }
    if (!live) continue;
    // kSwigluLoads rows' loads issued before any of their stores (in_f32 may alias in, so the
    // compiler would not hoist a row's loads above the previous row's stores): loads in flight.
    for (int r1 = 0; r1 < n_rows; r1 += kSwigluLoads) {
      const long first = (r0 + r1) * inter + c;  // the group's first output; its input at 2 first - c
      float v[kSwigluLoads][2];
#pragma unroll
      for (int j = 0; j < kSwigluLoads; ++j)
        if (r1 + j < n_rows) {
          const T* g = in + 2 * (first + long(j) * inter) - c;
          v[j][0] = as_f32(g[0]);
          v[j][1] = as_f32(g[inter]);
        }
#pragma unroll
      for (int j = 0; j < kSwigluLoads; ++j) {
        const int r = r1 + j;
        if (r >= n_rows) continue;
        if constexpr (KMAX > 0)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (terms[h].u) v[j][h] = __fadd_rn(v[j][h], rank_dot(u_s[h][r], b[h]));
          }
        const float g = v[j][0], u = v[j][1];
        const float y = g / (1.0f + expf(-g)) * u;  // silu(g) * u, as the CPU's swiglu_forward
        const long o = first + long(j) * inter, i = 2 * o - c;
        if (out) out[o] = y;
        if (out_bf16) out_bf16[o] = bf16_round(y);
        if (in_bf16) in_bf16[i] = bf16_round(g), in_bf16[i + inter] = bf16_round(u);
        if (in_f32) in_f32[i] = g, in_f32[i + inter] = u;
      }
    }
  }
}

template <class T, int KMAX>
void swiglu_launch(float* out, const T* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16,
                   __nv_bfloat16* in_bf16, float* in_f32, SwigluLora gate, SwigluLora up) {
  const long tiles = (long(rows) + kSwigluRows - 1) / kSwigluRows;
  const dim3 grid((inter + kThreads - 1) / kThreads, unsigned(std::min<long>(65535, tiles)));
  swiglu_rows_kernel<T, KMAX><<<grid, kThreads, 0, stream>>>(out, in, rows, inter, out_bf16, in_bf16, in_f32, gate, up);
}

// The smallest instance that holds both adapters' ranks (swiglu_lora_width).
template <class T>
void swiglu_any(float* out, const T* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16, __nv_bfloat16* in_bf16,
                float* in_f32, SwigluLora gate, SwigluLora up) {
  const int width = swiglu_lora_width(gate, up, "swiglu_rows");
  if (rows <= 0 || inter <= 0) return;
  if (width == 0) swiglu_launch<T, 0>(out, in, rows, inter, stream, out_bf16, in_bf16, in_f32, gate, up);
  else if (width == 8) swiglu_launch<T, 8>(out, in, rows, inter, stream, out_bf16, in_bf16, in_f32, gate, up);
  else if (width == 16) swiglu_launch<T, 16>(out, in, rows, inter, stream, out_bf16, in_bf16, in_f32, gate, up);
  else swiglu_launch<T, 32>(out, in, rows, inter, stream, out_bf16, in_bf16, in_f32, gate, up);
}

__global__ void merge_lora_kernel(void* w, bool w_bf16, int in, long n, const float* A, const float* B, int rank,
                                  float scale) {
  for (long idx = long(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += long(gridDim.x) * blockDim.x) {
    const long o = idx / in, i = idx % in;
    double acc = 0.0;  // a product of two floats is exact in double: fused or not, the same sum
    for (int k = 0; k < rank; ++k) {
      const float b = B[o * rank + k];
      if (b != 0.f) acc += double(b) * double(A[long(k) * in + i]);
    }
    const float delta = __fmul_rn(float(acc), scale);
    if (w_bf16) {
      __nv_bfloat16* p = static_cast<__nv_bfloat16*>(w) + idx;
      *p = bf16_round(__fadd_rn(__bfloat162float(*p), delta));
    } else {
      float* p = static_cast<float*>(w) + idx;
      *p = __fadd_rn(*p, delta);
    }
  }
}

__global__ void gather_rows_kernel(float* out, const float* x, const int32_t* rows, int width) {
  grid_dependents_launch();
  grid_dependency_wait();
  const float* src = x + long(rows[blockIdx.x]) * width;
  float* dst = out + long(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// grid: (rows, n_flags); one dot product per block.
// norm_w set: x is the final norm's input, each element normalized as rmsnorm_rows does it (the
// row's rms_inv at the same block size, then w[i] * (x[i] * inv)): the same bits as on its output.
__global__ void flag_logits_kernel(float* logits, long ld, const float* x, int hidden, const float* head,
                                   const int32_t* tokens, const float* norm_w, float norm_eps) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[32], norm_scratch[32];
  const long r = blockIdx.x;
  const int k = blockIdx.y;
  const float* xr = x + r * hidden;
  const float inv = norm_w ? rms_inv(xr, hidden, norm_eps, norm_scratch) : 1.f;
  float dot = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    dot += (norm_w ? norm_w[i] * (xr[i] * inv) : xr[i]) * head[long(k) * hidden + i];
  dot = block_reduce(dot, scratch, false);
  if (threadIdx.x == 0) logits[r * ld + tokens[k]] = dot;
}

// grid: rows. The log-sum-exp with max subtraction in f32, as the CPU's logsumexp.
__global__ void row_scores_kernel(const float* logits, int vocab, const int32_t* flags, int n_flags, const int32_t* next,
                                  float* p_rf, float* p_flags, float* logprob_next) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[32];
  const long r = blockIdx.x;
  const float* z = logits + r * vocab;
  float mx = -FLT_MAX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, z[i]);
  mx = block_reduce(mx, scratch, true);
  float se = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) se += expf(z[i] - mx);
  const float lse = mx + logf(block_reduce(se, scratch, false));
  if (threadIdx.x != 0) return;
  float total = 0.f;
  for (int k = 0; k < n_flags; ++k) {
    const int id = flags[k];
    const float p = id >= 0 && id < vocab ? expf(z[id] - lse) : 0.f;
    if (p_flags) p_flags[r * n_flags + k] = p;
    total += p;
  }
  p_rf[r] = total;
  if (logprob_next) logprob_next[r] = next[r] >= 0 && next[r] < vocab ? z[next[r]] - lse : NAN;
}

}  // namespace

void embed_rows(float* x, const void* table, bool table_bf16, const int32_t* tokens, int rows, int hidden,
                const float* flag_embed, const int32_t* flag_tokens, int n_flags, const float* pos_embed,
                const int32_t* positions, const float* delta, cudaStream_t stream) {
  if (rows > 0)
    launch_dependent(embed_kernel, rows, kThreads, 0, stream, x, table, table_bf16, tokens, hidden, flag_embed, flag_tokens, n_flags,
                     pos_embed, positions, delta);
}

int swiglu_lora_width(const SwigluLora& gate, const SwigluLora& up, const char* who) {
  for (const SwigluLora& t : {gate, up})
    if (t.u && (t.rank < 1 || t.rank > kSwigluLoraMaxRank || !t.B))
      throw std::invalid_argument(std::string(who) + ": an adapter needs B and a rank in 1.." + std::to_string(kSwigluLoraMaxRank));
  const int rank = std::max(gate.u ? gate.rank : 0, up.u ? up.rank : 0);
  return rank == 0 ? 0 : rank <= 8 ? 8 : rank <= 16 ? 16 : 32;
}

void swiglu_rows(float* out, const float* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16,
                 __nv_bfloat16* in_bf16, SwigluLora gate, SwigluLora up, float* in_f32) {
  swiglu_any(out, in, rows, inter, stream, out_bf16, in_bf16, in_f32, gate, up);
}

void swiglu_rows(float* out, const __nv_bfloat16* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16,
                 SwigluLora gate, SwigluLora up) {
  swiglu_any(out, in, rows, inter, stream, out_bf16, nullptr, nullptr, gate, up);
}

void merge_lora_rows(void* w, bool w_bf16, int out, int in, const float* A, const float* B, int rank, float scale,
                     cudaStream_t stream) {
  const long n = long(out) * in;
  if (n > 0) merge_lora_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(w, w_bf16, in, n, A, B, rank, scale);
}

void gather_rows(float* out, const float* x, const int32_t* rows, int n, int width, cudaStream_t stream) {
  if (n > 0) launch_dependent(gather_rows_kernel, n, kThreads, 0, stream, out, x, rows, width);
}

void set_flag_logits(float* logits, long ld, const float* xn, int rows, int hidden, const float* head,
                     const int32_t* tokens, int n_flags, cudaStream_t stream, const float* norm_w, float norm_eps) {
  if (rows > 0 && n_flags > 0)
    launch_dependent(flag_logits_kernel, dim3(rows, n_flags), kThreads, 0, stream, logits, ld, xn, hidden, head, tokens, norm_w, norm_eps);
}

void row_scores(const float* logits, int rows, int vocab, const int32_t* flags, int n_flags, const int32_t* next,
                float* p_rf, float* p_flags, float* logprob_next, cudaStream_t stream) {
  if (rows > 0)
    launch_dependent(row_scores_kernel, rows, 512, 0, stream, logits, vocab, flags, n_flags, next, p_rf, p_flags, logprob_next);
}

}  // namespace rf::cuda
