// Decode-sized products: y [rows, N] = x [rows, K] . W^T for a few rows (rows <= kGemvMaxRows),
// W row-major [N, K] as nn.Linear stores it, what matmul (gemm.h) computes, by a kernel of our own
// with the projection's neighbours fused into it.
//
// Why not cuBLASLt at these rows: a decode step's product uses each weight once per row (rows
// FLOPs per byte of W), so its time is W's bytes over the memory bandwidth plus a launch, and what
// pays is fewer launches and fewer passes over activations. Fused into gemv_rows:
//   - before the product, the block's RMSNorm, applied to the rows as they are read (norm_w);
//   - in its epilogue, per output: the bias, each LoRA adapter's up product (u B^T on its slice
//     of the outputs), the residual (y +=), SwiGLU (one warp reads an output's gate row and up
//     row: no activation launch, no f32 gate|up buffer), or, for the QKV product, rope and the
//     paged cache's append (GemvAppend: no kv_append launch).
// lora_down_rows makes all of a projection's adapters' u = x A^T in one launch (the norm fused
// too). A Llama block's decode step then runs 5 launches without an adapter (9 before) and 9 with
// an unmerged one on all seven projections (23) (device_model.cu). Larger batches are a GEMM's
// regime and stay on cuBLASLt, but up to kLoraMaxRows rows their adapters still take two
// launches a projection (lora_down_rows, lora_up_rows) instead of two cuBLASLt products per
// adapter: 17 a block. The model takes these paths unless set_gemv(false) or RF_CUDA_GEMV=0,
// which the benchmark uses to measure both in one run.
//
// Numerics: f32 products of the bf16 (or f32) operands summed in f32, as matmul's, in a fixed
// order (each lane a strided partial sum, then the same xor tree over the warp): the same bits on
// every run and every GPU, equal to matmul's up to summation order.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/dtype.h"

namespace rf::cuda {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvMaxLora = 4;
// lora_down_rows' and lora_up_rows' most rows: a batched decode step's, where per-adapter
// cuBLASLt products would be launches of almost no work.
constexpr int kLoraMaxRows = 64;

// One adapter's up product on y's columns [offset, offset + out): y[r, offset + o] +=
// sum_q u[r, q] B[o, q], summed in q order.
struct GemvLora {
  const float* u = nullptr;  // [rows, rank]
  const float* B = nullptr;  // [out, rank], the adapter's scale folded in
  int offset = 0, out = 0, rank = 0;
};

// The QKV product's epilogue in place of kv_append (paged_cache.h) at a decode step: each q and
// k head's rope pairs (i, i + head_dim / 2) are one warp's two outputs, turned by rope_rotate as
// kv_append turns them (the same bits); the turned q and k and v go to y (columns: q heads, k
// heads, v heads), and k and v into the paged cache at each row's position, as kv_append stores
// them. Set k_cache to use it (GemvArgs::append); everything else as kv_append's arguments.
struct GemvAppend {
  int n_q_heads = 0, n_kv_heads = 0, head_dim = 0, block_tokens = 0;
  const float* cos = nullptr;  // [rows, head_dim / 2], as rope_rows'
  const float* sin = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  bool cache_bf16 = false;
  const int32_t *row_seq = nullptr, *row_pos = nullptr, *tables = nullptr, *table_offsets = nullptr;
};

struct GemvArgs {
  const void* x = nullptr;  // [rows, K], rows ldx elements apart (0: K)
  long ldx = 0;
  const void* w = nullptr;  // [N, K]
  DType type = DType::bf16;  // x's and W's: both bf16 (f32 sums) or both f32
  int rows = 0, N = 0, K = 0;
  // RMSNorm first (norm_w [K]; null: none): x is then f32 (the residual stream, ldx floats apart)
  // and each element enters as rmsnorm_rows(norm_w, norm_eps) writes it (its bf16 copy for bf16 W),
  // the same bits, so the norm's launch goes. Each block takes the rows' 1 / rms itself.
  const float* norm_w = nullptr;
  float norm_eps = 0.f;
  const float* bias = nullptr;  // [N] or null
  GemvLora lora[kGemvMaxLora];  // columns of the N outputs (before SwiGLU pairs them)
  int n_lora = 0;
  // y [rows, Ny], rows ldy elements apart (0: Ny), Ny = N, or N / 2 with glu: W's rows are gate
  // then up (N = 2 I) and y[r, j] = silu(z[r, j]) z[r, I + j], as swiglu_rows computes it.
  float* y = nullptr;
  long ldy = 0;
  bool accumulate = false;  // y = y + z (the residual) instead of y = z; z with the bias, then the adapters
  bool glu = false;
  __nv_bfloat16* y_bf16 = nullptr;  // optional: y's values rounded as f32_to_bf16 does, rows ldy apart
  GemvAppend append;                 // k_cache set: rope and the cache append (no glu, residual or y_bf16)
};

// Whether gemv_rows takes x and W as they are: 1 <= rows <= kGemvMaxRows, x's and W's rows 16-byte
// aligned (K a multiple of 8 bf16 or 4 f32 elements, ldx of x's, pointers 16-byte aligned); norm:
// x is f32 (GemvArgs::norm_w). Otherwise use matmul.
bool gemv_supports(const void* x, long ldx, const void* w, DType type, int rows, int K, bool norm = false);

// The product above on `stream`. Throws std::invalid_argument on shapes gemv_supports refuses,
// an odd N with glu, more than kGemvMaxLora adapters or an adapter's columns outside the N.
void gemv_rows(const GemvArgs& a, cudaStream_t stream);

// One adapter's down product for lora_down_rows: u [rows, rank] = x A^T, A [rank, K] f32.
struct GemvDown {
  const float* A = nullptr;
  float* u = nullptr;
  int rank = 0;
};

// Each term's u from x [rows, K] f32 (rows ldx apart): one launch, one block per row of every A,
// each summed in a fixed order (per thread, then the block's tree). norm_w (optional, [K]): x's
// rows go through RMSNorm first, as GemvArgs::norm_w (in f32, rmsnorm_rows' f32 output).
// 1 <= rows <= kLoraMaxRows, 1 <= n <= kGemvMaxLora; throws std::invalid_argument otherwise.
void lora_down_rows(const GemvDown* terms, int n, const float* x, long ldx, int rows, int K, cudaStream_t stream,
                    const float* norm_w = nullptr, float norm_eps = 0.f);

// The adapters' up products for rows past gemv_rows' (its epilogue does them up to
// kGemvMaxRows): y [rows, ldy] += each term's u B^T on its columns, one launch for them all (each
// sum in rank order, then added). 1 <= rows <= kLoraMaxRows, 1 <= n <= kGemvMaxLora, columns
// within ldy; throws std::invalid_argument otherwise.
void lora_up_rows(const GemvLora* terms, int n, int rows, float* y, long ldy, cudaStream_t stream);

}  // namespace rf::cuda
