// Decode-sized products and their fused epilogue (see gemv.h).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/bf16.h"
#include "cuda/block_sum.cuh"
#include "cuda/error.h"
#include "cuda/gemv.h"
#include "cuda/launch.cuh"
#include "cuda/paged_cache.cuh"
#include "cuda/rope.cuh"

namespace rf::cuda {

namespace {

constexpr int kWarps = 8;    // a block's warps: gemv_rows gives each an output (or a gate|up pair)
constexpr int kThreads = 32 * kWarps;
constexpr int kUnroll = 4;   // 16-byte chunks of W each lane has in flight: 2 KB a warp
// gemv_rows' most blocks: past them a warp takes several outputs (grid stride), so the LM head's
// 128256 outputs do not make 16032 blocks that each normalize the same rows again.
constexpr int kMaxBlocks = 2048;

// The RMSNorm the rows go through before the product (w null: none; see GemvArgs::norm_w).
struct Norm {
  const float* w;
  float eps;
};

struct Terms {
  GemvLora t[kGemvMaxLora];
  int n;
};

// acc + the dot product of 16 bytes of W and x, element by element in order.
__device__ __forceinline__ float dot_chunk(const uint4& w, const uint4& x, float acc) {  // 8 bf16
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w}, xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(__uint_as_float(wv[i] << 16), __uint_as_float(xv[i] << 16), acc);
    acc = fmaf(__uint_as_float(wv[i] & 0xffff0000u), __uint_as_float(xv[i] & 0xffff0000u), acc);
  }
  return acc;
}
__device__ __forceinline__ float dot_chunk(const float4& w, const float4& x, float acc) {  // 4 f32
  acc = fmaf(w.x, x.x, acc);
  acc = fmaf(w.y, x.y, acc);
  acc = fmaf(w.z, x.z, acc);
  return fmaf(w.w, x.w, acc);
}

// Chunk c (16 bytes of W's type) of row r of the product's input: with NORM, from the f32 row
// (ldx floats apart) and the norm's weights, each element as rmsnorm_rows writes it (its bf16
// copy for bf16 W: the bits the unfused path reads); else straight from x (ldx chunks apart). The
// unused last argument picks the overload by W's type.
template <bool NORM>
__device__ __forceinline__ uint4 x_chunk(const void* x, long ldx, int r, int c, const float* nw, float inv, uint4*) {
  if (!NORM) return static_cast<const uint4*>(x)[r * ldx + c];
  const float4* xr = reinterpret_cast<const float4*>(static_cast<const float*>(x) + r * ldx) + 2 * c;
  const float4* wr = reinterpret_cast<const float4*>(nw) + 2 * c;
  const float4 a = xr[0], b = xr[1], wa = wr[0], wb = wr[1];
  uint4 o;
  o.x = bf16_bits(wa.x * (a.x * inv)) | (bf16_bits(wa.y * (a.y * inv)) << 16);
  o.y = bf16_bits(wa.z * (a.z * inv)) | (bf16_bits(wa.w * (a.w * inv)) << 16);
  o.z = bf16_bits(wb.x * (b.x * inv)) | (bf16_bits(wb.y * (b.y * inv)) << 16);
  o.w = bf16_bits(wb.z * (b.z * inv)) | (bf16_bits(wb.w * (b.w * inv)) << 16);
  return o;
}
template <bool NORM>
__device__ __forceinline__ float4 x_chunk(const void* x, long ldx, int r, int c, const float* nw, float inv, float4*) {
  if (!NORM) return static_cast<const float4*>(x)[r * ldx + c];
  const float4 a = reinterpret_cast<const float4*>(static_cast<const float*>(x) + r * ldx)[c];
  const float4 wa = reinterpret_cast<const float4*>(nw)[c];
  return make_float4(wa.x * (a.x * inv), wa.y * (a.y * inv), wa.z * (a.z * inv), wa.w * (a.w * inv));
}

// Output column `col` of row r from its dot product z: the bias, then each adapter whose slice
// holds the column (its u B^T summed in rank order).
__device__ __forceinline__ float finish(float z, int col, int r, const float* bias, const Terms& terms) {
  if (bias) z += bias[col];
  for (int a = 0; a < terms.n; ++a) {
    const GemvLora& t = terms.t[a];
    if (col < t.offset || col >= t.offset + t.out) continue;
    const float* u = t.u + long(r) * t.rank;
    const float* b = t.B + long(col - t.offset) * t.rank;
    float s = 0.f;
    for (int q = 0; q < t.rank; ++q) s = fmaf(u[q], b[q], s);
    z += s;
  }
  return z;
}

// What gemv_kernel's epilogue does with its outputs: write them (plain), pair gate and up rows
// into SwiGLU (glu), or turn q and k pairs by rope and append k and v to the paged cache (rope).
enum class Epilogue { plain, glu, rope };

// A key or value element into the cache (f32 or bf16), as kv_append stores it.
__device__ __forceinline__ void store(void* cache, bool bf16, long at, float v) {
  if (bf16) cache_store(static_cast<__nv_bfloat16*>(cache) + at, v);
  else cache_store(static_cast<float*>(cache) + at, v);
}

// grid: up to kMaxBlocks blocks of kWarps warps; warp w of block b takes units j = b kWarps + w,
// then j + gridDim.x kWarps, ..., for every row of x. A unit is one row of W (plain; with rope, a
// value column), or two: with glu, gate row j and up row half + j; with rope, the pair (a, a +
// head_dim / 2) of a q or k head (unit j < pairs: head j / (head_dim / 2)). V: 16 bytes of W's
// type; kv: V chunks per row of W. With NORM the block first takes each row's 1 / rms as
// rmsnorm_rows does (same reduction, same bits), its first weights already requested. Lane l
// sums chunks l, l + 32, ... (kUnroll of W's loaded ahead), then the warp's xor tree; lane r
// writes row r.
template <class V, Epilogue E, bool NORM>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const void* __restrict__ x, long ldx, const V* __restrict__ w, int rows,
                                                       int units, int kv, long half, Norm norm, int K, const float* bias,
                                                       Terms terms, float* y, long ldy, bool accumulate, __nv_bfloat16* y_bf16,
                                                       GemvAppend ap) {
  constexpr bool PAIRS = E != Epilogue::plain;
  const int lane = threadIdx.x & 31;
  const int hh = ap.head_dim / 2, pairs = (ap.n_q_heads + ap.n_kv_heads) * hh;  // rope only
  // Unit j's rows of W: j0, and j1 when it has two (the same for the whole warp).
  const auto unit_rows = [&](int j, long& j0, long& j1, bool& two) {
    j0 = j, j1 = j + half, two = E == Epilogue::glu;
    if (E == Epilogue::rope) {
      two = j < pairs;
      j0 = two ? long(j / hh) * ap.head_dim + j % hh : long(pairs) * 2 + (j - pairs);
      j1 = j0 + hh;
    }
  };
  // kUnroll chunks of W's row(s) from chunk c0 on (zeros past the row).
  V a[kUnroll], b[kUnroll];
  const auto load = [&](const V* w0, const V* w1, bool two, int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      a[u] = c < kv ? w0[c] : V{};
      if (PAIRS) b[u] = two && c < kv ? w1[c] : V{};
    }
  };
  grid_dependents_launch();
  // The first chunks of W go out first: before the wait for the kernels this one follows (W is
  // weights, which no kernel in flight writes: cuda/launch.h), so that with a dependent launch
  // they load while the previous kernel finishes, and before the rows' 1 / rms is taken, whose
  // reads of x and reduction then overlap the weights' latency instead of preceding it.
  int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  bool loaded = false;  // a and b hold the first unit's first chunks
  if (j < units) {
    long j0, j1;
    bool two;
    unit_rows(j, j0, j1, two);
    load(w + j0 * kv, w + j1 * kv, two, lane);
    loaded = true;
  }
  grid_dependency_wait();
  __shared__ float scratch[kWarps];
  float inv[kGemvMaxRows];
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) inv[r] = 1.f;
  if (NORM) {
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r)
      if (r < rows) inv[r] = rms_inv(static_cast<const float*>(x) + r * ldx, K, norm.eps, scratch);
  }
  for (; j < units; j += gridDim.x * kWarps) {
    long j0, j1;
    bool two;
    unit_rows(j, j0, j1, two);
    float acc[PAIRS ? 2 : 1][kGemvMaxRows];
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
      acc[0][r] = 0.f;
      if (PAIRS) acc[PAIRS ? 1 : 0][r] = 0.f;
    }
    const V* w0 = w + j0 * kv;
    const V* w1 = w + j1 * kv;  // read only when two
    for (int c0 = lane; c0 < kv; c0 += 32 * kUnroll) {
      if (!loaded) load(w0, w1, two, c0);
      loaded = false;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c < kv) {
#pragma unroll
          for (int r = 0; r < kGemvMaxRows; ++r) {
            if (r < rows) {
              const V xv = x_chunk<NORM>(x, ldx, r, c, norm.w, inv[r], static_cast<V*>(nullptr));
              acc[0][r] = dot_chunk(a[u], xv, acc[0][r]);
              if (PAIRS && two) acc[PAIRS ? 1 : 0][r] = dot_chunk(b[u], xv, acc[PAIRS ? 1 : 0][r]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int p = 0; p < (PAIRS ? 2 : 1); ++p)
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r)
        if (r < rows && (p == 0 || two)) acc[p][r] = warp_sum(acc[p][r]);
    if (lane < rows) {
      const int r = lane;
      float z0 = 0.f, z1 = 0.f;
#pragma unroll
      for (int q = 0; q < kGemvMaxRows; ++q)
        if (q == r) z0 = acc[0][q], z1 = acc[PAIRS ? 1 : 0][q];
      float v = finish(z0, int(j0), r, bias, terms);
      if (E == Epilogue::rope) {
        // kv_append's work for this unit: the pair turned (q and k) or the value, into y and,
        // for k and v, into the cache at the row's position.
        const long row = cache_row(ap.tables, ap.table_offsets, ap.row_seq[r], ap.row_pos[r], ap.n_kv_heads, ap.block_tokens);
        const long q_cols = long(ap.n_q_heads) * ap.head_dim, kv_cols = long(ap.n_kv_heads) * ap.head_dim;
        if (two) {
          float v1 = finish(z1, int(j1), r, bias, terms);
          const int i = j % hh;
          rope_rotate(v, v1, ap.cos[long(r) * hh + i], ap.sin[long(r) * hh + i]);
          y[r * ldy + j0] = v, y[r * ldy + j1] = v1;
          if (j0 >= q_cols) {
            const long at = cache_at(row, int((j0 - q_cols) / ap.head_dim), i, ap.block_tokens, ap.head_dim);
            store(ap.k_cache, ap.cache_bf16, at, v), store(ap.k_cache, ap.cache_bf16, at + hh, v1);
          }
        } else {
          y[r * ldy + j0] = v;
          const long e = j0 - q_cols - kv_cols;  // the value's element within the kv heads
          store(ap.v_cache, ap.cache_bf16, cache_at(row, int(e / ap.head_dim), int(e % ap.head_dim), ap.block_tokens, ap.head_dim), v);
        }
        continue;
      }
      if (E == Epilogue::glu) {
        const float up = finish(z1, int(j1), r, bias, terms);
        v = v / (1.0f + expf(-v)) * up;  // silu(gate) * up, as swiglu_rows
      }
      float* out = y + r * ldy + j;
      if (accumulate) v = *out + v;
      *out = v;
      if (y_bf16) y_bf16[r * ldy + j] = bf16_round(v);
    }
  }
}

struct DownTerms {
  const float* A[kGemvMaxLora];
  float* u[kGemvMaxLora];
  int rank[kGemvMaxLora];
  int n;
};

// grid: one block per row of the terms' A, in term order; the rows of x in groups of
// kGemvMaxRows, and per group its threads stride over K (thread t: elements t, t + kThreads, ...),
// then the warps' xor trees, then warp sums in order. With the norm, x's rows are normalized as
// read, as rmsnorm_rows writes them (the same 1 / rms bits).
__global__ void __launch_bounds__(kThreads) lora_down_rows_kernel(DownTerms t, const float* __restrict__ x, long ldx, int rows,
                                                                 int K, Norm norm) {
  grid_dependents_launch();
  grid_dependency_wait();
  __shared__ float scratch[kWarps];
  __shared__ float part[kWarps][kGemvMaxRows];
  // This block's term and row of its A (unrolled, so the parameters are not indexed at run time).
  const float* A = nullptr;
  float* u = nullptr;
  int rank = 0, q = 0;
#pragma unroll
  for (int i = 0, first = 0; i < kGemvMaxLora; first += t.rank[i], ++i)
    if (i < t.n && int(blockIdx.x) >= first && int(blockIdx.x) < first + t.rank[i])
      A = t.A[i], u = t.u[i], rank = t.rank[i], q = int(blockIdx.x) - first;
  A += long(q) * K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r0 = 0; r0 < rows; r0 += kGemvMaxRows) {
    const int n = min(kGemvMaxRows, rows - r0);
    const float* xg = x + r0 * ldx;
    float inv[kGemvMaxRows];
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) inv[r] = 1.f;
    if (norm.w) {
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r)
        if (r < n) inv[r] = rms_inv(xg + r * ldx, K, norm.eps, scratch);
    }
    float acc[kGemvMaxRows];
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) acc[r] = 0.f;
#pragma unroll 4
    for (int k = threadIdx.x; k < K; k += kThreads) {
      const float av = A[k];
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r)
        if (r < n) acc[r] = fmaf(av, norm.w ? norm.w[k] * (xg[r * ldx + k] * inv[r]) : xg[r * ldx + k], acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
      if (r < n) {
        acc[r] = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = acc[r];
      }
    }
    __syncthreads();
    if (int(threadIdx.x) < n) {
      float s = 0.f;
      for (int wi = 0; wi < kWarps; ++wi) s += part[wi][threadIdx.x];
      u[long(r0 + threadIdx.x) * rank + q] = s;
    }
    __syncthreads();  // part is read before the next group writes it
  }
}

// grid (column blocks of kThreads over the terms' columns side by side, row blocks of kUpRows):
// thread o adds its column's up product to each row of its block, summed in rank order.
constexpr int kUpRows = 16;
__global__ void __launch_bounds__(kThreads) lora_up_rows_kernel(Terms terms, int rows, float* y, long ldy) {
  grid_dependents_launch();
  grid_dependency_wait();
  int col = int(blockIdx.x) * kThreads + int(threadIdx.x);
  GemvLora t{};
  bool found = false;
#pragma unroll
  for (int i = 0; i < kGemvMaxLora; ++i) {
    if (!found && i < terms.n) {
      if (col < terms.t[i].out) t = terms.t[i], found = true;
      else col -= terms.t[i].out;
    }
  }
  if (!found) return;
  const float* b = t.B + long(col) * t.rank;
  const int r1 = min(rows, int(blockIdx.y + 1) * kUpRows);
  for (int r = int(blockIdx.y) * kUpRows; r < r1; ++r) {
    const float* u = t.u + long(r) * t.rank;
    float s = 0.f;
    for (int q = 0; q < t.rank; ++q) s = fmaf(u[q], b[q], s);
    y[r * ldy + t.offset + col] += s;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// gemv_kernel's instance for the arguments (V: 16 bytes of W's type).
template <class V, Epilogue E, bool NORM>
void launch(const GemvArgs& a, unsigned grid, long ldx, int kv, int units, long half, Norm nm, const Terms& terms, long ldy,
            cudaStream_t stream) {
  launch_dependent(gemv_kernel<V, E, NORM>, grid, kThreads, 0, stream, a.x, ldx, static_cast<const V*>(a.w), a.rows, units, kv, half,
                   nm, a.K, a.bias, terms, a.y, ldy, a.accumulate, a.y_bf16, a.append);
}
template <class V, Epilogue E>
void launch(const GemvArgs& a, bool norm, unsigned grid, long ldx, int kv, int units, long half, Norm nm, const Terms& terms,
            long ldy, cudaStream_t stream) {
  if (norm) launch<V, E, true>(a, grid, ldx, kv, units, half, nm, terms, ldy, stream);
  else launch<V, E, false>(a, grid, ldx, kv, units, half, nm, terms, ldy, stream);
}
template <class V>
void launch(const GemvArgs& a, bool norm, unsigned grid, long ldx, int kv, int units, long half, Norm nm, const Terms& terms,
            long ldy, cudaStream_t stream) {
  if (a.append.k_cache) launch<V, Epilogue::rope>(a, norm, grid, ldx, kv, units, half, nm, terms, ldy, stream);
  else if (a.glu) launch<V, Epilogue::glu>(a, norm, grid, ldx, kv, units, half, nm, terms, ldy, stream);
  else launch<V, Epilogue::plain>(a, norm, grid, ldx, kv, units, half, nm, terms, ldy, stream);
}

}  // namespace

bool gemv_supports(const void* x, long ldx, const void* w, DType type, int rows, int K, bool norm) {
  if (type != DType::bf16 && type != DType::f32) return false;
  const int vec = type == DType::bf16 ? 8 : 4, xvec = norm ? 4 : vec;  // normalized as read: x is f32
  if (ldx == 0) ldx = K;
  return rows >= 1 && rows <= kGemvMaxRows && K > 0 && K % vec == 0 && ldx % xvec == 0 && ldx >= K && aligned16(x) &&
         aligned16(w);
}

void gemv_rows(const GemvArgs& a, cudaStream_t stream) {
  const bool norm = a.norm_w != nullptr;
  if (!gemv_supports(a.x, a.ldx, a.w, a.type, a.rows, a.K, norm))
    throw std::invalid_argument("gemv_rows: rows must be 1.." + std::to_string(kGemvMaxRows) +
                                " and x's and W's rows 16-byte aligned (K = " + std::to_string(a.K) + ")");
  if (a.N <= 0 || (a.glu && a.N % 2 != 0)) throw std::invalid_argument("gemv_rows: N must be positive (even with glu)");
  if (a.n_lora < 0 || a.n_lora > kGemvMaxLora)
    throw std::invalid_argument("gemv_rows: at most " + std::to_string(kGemvMaxLora) + " adapters");
  Terms terms{};
  terms.n = a.n_lora;
  for (int i = 0; i < a.n_lora; ++i) {
    const GemvLora& t = a.lora[i];
    if (!t.u || !t.B || t.rank <= 0 || t.out <= 0 || t.offset < 0 || long(t.offset) + t.out > a.N)
      throw std::invalid_argument("gemv_rows: adapter " + std::to_string(i) + " needs u, B, a rank and columns within N");
    terms.t[i] = t;
  }
  const GemvAppend& ap = a.append;
  if (ap.k_cache) {
    if (a.glu || a.accumulate || a.y_bf16 || !ap.v_cache || !ap.cos || !ap.sin || !ap.row_seq || !ap.row_pos || !ap.tables ||
        !ap.table_offsets || ap.head_dim <= 0 || ap.head_dim % 2 != 0 || ap.block_tokens <= 0 || ap.n_q_heads <= 0 ||
        ap.n_kv_heads <= 0 || long(a.N) != long(ap.n_q_heads + 2 * ap.n_kv_heads) * ap.head_dim)
      throw std::invalid_argument("gemv_rows: the append epilogue needs the QKV product (N = (q heads + 2 kv heads) x head_dim, "
                                  "an even head_dim), rope tables, the cache and its tables, and no glu, residual or bf16 copy");
  }
  // Units: y's columns (gate|up pairs with glu), or the rope pairs of q and k heads, then v's columns.
  const int outputs = a.glu ? a.N / 2 : a.N;
  const int units = ap.k_cache ? (ap.n_q_heads + ap.n_kv_heads) * (ap.head_dim / 2) + ap.n_kv_heads * ap.head_dim : outputs;
  const long ldy = a.ldy ? a.ldy : outputs;
  if (ldy < outputs) throw std::invalid_argument("gemv_rows: ldy is shorter than a row of y");
  const int vec = a.type == DType::bf16 ? 8 : 4;
  const long ldx = (a.ldx ? a.ldx : a.K) / (norm ? 1 : vec);  // the kernel's unit: floats with the norm, else chunks
  const int kv = a.K / vec;
  const Norm nm{a.norm_w, a.norm_eps};
  const unsigned grid = unsigned(std::min<long>(kMaxBlocks, (units + kWarps - 1) / kWarps));
  const long half = a.glu ? units : 0;
  if (a.type == DType::bf16) launch<uint4>(a, norm, grid, ldx, kv, units, half, nm, terms, ldy, stream);
  else launch<float4>(a, norm, grid, ldx, kv, units, half, nm, terms, ldy, stream);
  check_launch("gemv_rows");
}

void lora_down_rows(const GemvDown* terms, int n, const float* x, long ldx, int rows, int K, cudaStream_t stream,
                    const float* norm_w, float norm_eps) {
  if (rows < 1 || rows > kLoraMaxRows || n < 1 || n > kGemvMaxLora || K <= 0)
    throw std::invalid_argument("lora_down_rows: 1.." + std::to_string(kLoraMaxRows) + " rows and 1.." +
                                std::to_string(kGemvMaxLora) + " adapters");
  if (ldx == 0) ldx = K;
  if (ldx < K) throw std::invalid_argument("lora_down_rows: ldx is shorter than a row of x");
  DownTerms t{};
  t.n = n;
  int blocks = 0;
  for (int i = 0; i < n; ++i) {
    if (!terms[i].A || !terms[i].u || terms[i].rank <= 0)
      throw std::invalid_argument("lora_down_rows: adapter " + std::to_string(i) + " needs A, u and a rank");
    t.A[i] = terms[i].A, t.u[i] = terms[i].u, t.rank[i] = terms[i].rank;
    blocks += terms[i].rank;
  }
  launch_dependent(lora_down_rows_kernel, blocks, kThreads, 0, stream, t, x, ldx, rows, K, Norm{norm_w, norm_eps});
  check_launch("lora_down_rows");
}

void lora_up_rows(const GemvLora* terms, int n, int rows, float* y, long ldy, cudaStream_t stream) {
  if (rows < 1 || rows > kLoraMaxRows || n < 1 || n > kGemvMaxLora)
    throw std::invalid_argument("lora_up_rows: 1.." + std::to_string(kLoraMaxRows) + " rows and 1.." +
                                std::to_string(kGemvMaxLora) + " adapters");
  Terms t{};
  t.n = n;
  long cols = 0;
  for (int i = 0; i < n; ++i) {
    const GemvLora& a = terms[i];
    if (!a.u || !a.B || a.rank <= 0 || a.out <= 0 || a.offset < 0 || long(a.offset) + a.out > ldy)
      throw std::invalid_argument("lora_up_rows: adapter " + std::to_string(i) + " needs u, B, a rank and columns within ldy");
    t.t[i] = a;
    cols += a.out;
  }
  const dim3 grid(unsigned((cols + kThreads - 1) / kThreads), unsigned((rows + kUpRows - 1) / kUpRows));
  launch_dependent(lora_up_rows_kernel, grid, kThreads, 0, stream, t, rows, y, ldy);
  check_launch("lora_up_rows");
}

}  // namespace rf::cuda
