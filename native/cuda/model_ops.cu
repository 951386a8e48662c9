// The engine's glue kernels (see model_ops.h). Elementwise ones run a grid-stride loop; the
// row reductions take one block per row and sum in the block's order, so results equal the
// CPU's up to float rounding.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "cuda/bf16.h"
#include "cuda/model_ops.h"

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

template <class T>
__global__ void swiglu_rows_kernel(float* out, const T* in, long n, int inter, __nv_bfloat16* out_bf16, __nv_bfloat16* in_bf16) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const long r = i / inter, c = i % inter;
    const float g = as_f32(in[r * 2 * inter + c]), u = as_f32(in[r * 2 * inter + inter + c]);
    const float y = g / (1.0f + expf(-g)) * u;  // silu(g) * u, as the CPU's swiglu_forward
    out[i] = y;
    if (out_bf16) out_bf16[i] = bf16_round(y);
    if (in_bf16) in_bf16[r * 2 * inter + c] = bf16_round(g), in_bf16[r * 2 * inter + inter + c] = bf16_round(u);
  }
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
  const float* src = x + long(rows[blockIdx.x]) * width;
  float* dst = out + long(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// grid: (rows, n_flags); one dot product per block.
__global__ void flag_logits_kernel(float* logits, long ld, const float* xn, int hidden, const float* head,
                                   const int32_t* tokens) {
  __shared__ float scratch[32];
  const long r = blockIdx.x;
  const int k = blockIdx.y;
  float dot = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) dot += xn[r * hidden + i] * head[long(k) * hidden + i];
  dot = block_reduce(dot, scratch, false);
  if (threadIdx.x == 0) logits[r * ld + tokens[k]] = dot;
}

// grid: rows. The log-sum-exp with max subtraction in f32, as the CPU's logsumexp.
__global__ void row_scores_kernel(const float* logits, int vocab, const int32_t* flags, int n_flags, const int32_t* next,
                                  float* p_rf, float* p_flags, float* logprob_next) {
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
    embed_kernel<<<rows, kThreads, 0, stream>>>(x, table, table_bf16, tokens, hidden, flag_embed, flag_tokens, n_flags,
                                                pos_embed, positions, delta);
}

void swiglu_rows(float* out, const float* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16,
                 __nv_bfloat16* in_bf16) {
  const long n = long(rows) * inter;
  if (n > 0) swiglu_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(out, in, n, inter, out_bf16, in_bf16);
}

void swiglu_rows(float* out, const __nv_bfloat16* in, int rows, int inter, cudaStream_t stream, __nv_bfloat16* out_bf16) {
  const long n = long(rows) * inter;
  if (n > 0) swiglu_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(out, in, n, inter, out_bf16, nullptr);
}

void merge_lora_rows(void* w, bool w_bf16, int out, int in, const float* A, const float* B, int rank, float scale,
                     cudaStream_t stream) {
  const long n = long(out) * in;
  if (n > 0) merge_lora_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(w, w_bf16, in, n, A, B, rank, scale);
}

void gather_rows(float* out, const float* x, const int32_t* rows, int n, int width, cudaStream_t stream) {
  if (n > 0) gather_rows_kernel<<<n, kThreads, 0, stream>>>(out, x, rows, width);
}

void set_flag_logits(float* logits, long ld, const float* xn, int rows, int hidden, const float* head,
                     const int32_t* tokens, int n_flags, cudaStream_t stream) {
  if (rows > 0 && n_flags > 0)
    flag_logits_kernel<<<dim3(rows, n_flags), kThreads, 0, stream>>>(logits, ld, xn, hidden, head, tokens);
}

void row_scores(const float* logits, int rows, int vocab, const int32_t* flags, int n_flags, const int32_t* next,
                float* p_rf, float* p_flags, float* logprob_next, cudaStream_t stream) {
  if (rows > 0)
    row_scores_kernel<<<rows, 512, 0, stream>>>(logits, vocab, flags, n_flags, next, p_rf, p_flags, logprob_next);
}

}  // namespace rf::cuda
