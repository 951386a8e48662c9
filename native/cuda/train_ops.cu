// The GPU trainer's glue kernels (see train_ops.h).
#include "cuda/train_ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/bf16.h"
#include "cuda/column_reduce.cuh"
#include "cuda/error.h"
#include "cuda/rank_rows.cuh"
#include "model/dropout_keep.h"

namespace rf::cuda {

namespace {

constexpr int kThreads = 256;

int grid_for(long n, int threads) {
  const long b = (n + threads - 1) / threads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

__global__ void dropout_kernel(float* out, const float* x, int cols, long n, uint64_t seed, int layer, int adapter, float p,
                               bool accumulate) {
  const float keep_scale = 1.0f / (1.0f - p);
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const float v = dropout_keep(seed, layer, adapter, i / cols, i % cols, p) ? x[i] * keep_scale : 0.f;
    if (accumulate) out[i] += v;
    else out[i] = v;
  }
}

// The fused LoRA-with-dropout kernels (train_ops.h): a tile of kTile columns (lora_down) or
// rows (lora_da) of x goes into shared memory with the mask applied; each thread then computes a
// 4 x 4 block of outputs from one float4 of one operand and four floats of the other per step.
constexpr int kTile = 32;

// grid: blocks of kDownRows rows, 4 NA KMAX threads each (small blocks: 16k rows make 256 of them).
// Thread t: rows 4 (t / (KMAX / 4)) + 0..3, ranks 4 (t % (KMAX / 4)) + 0..3 of its block.
constexpr int kDownRows = 64;

// NA adapters of one input (1 to kMaxTerms; NA KMAX <= 64, so 4 NA KMAX <= 256 threads): thread
// t works for adapter t / (4 KMAX) exactly as it would alone (rows and ranks as above, within its
// adapter's 4 KMAX threads), on that adapter's masked copy of the x tile; x is read once for all.
constexpr int kMaxTerms = 3;
// The kernels' view of a group of adapters: m is each one's u (lora_down: written) or du
// (lora_up: read).
struct GroupTerms {
  float* m[kMaxTerms];
  const float* A[kMaxTerms];
  int rank[kMaxTerms];
  int adapter[kMaxTerms];
};

// x: f32, or bf16 (a bf16 model's activation, widened exactly as it is read).
template <int KMAX, int NA, class T>
__global__ void __launch_bounds__(256) lora_down_dropout_kernel(GroupTerms terms, const T* x, int rows, int in, uint64_t seed,
                                                                int layer, float p) {
  constexpr int TM = kDownRows, RG = KMAX / 4;
  __shared__ float xs[NA][TM][kTile + 1];                 // [row][column]: the odd stride spreads rows over banks
  __align__(16) __shared__ float as[NA][kTile][KMAX + 4];  // [column][rank]
  const int t = threadIdx.x, ad = t / (4 * KMAX), rg = t % RG, mg = (t % (4 * KMAX)) / RG;
  const long r0 = long(blockIdx.x) * TM;
  const float keep_scale = 1.0f / (1.0f - p);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int c0 = 0; c0 < in; c0 += kTile) {
    for (int e = t; e < TM * kTile; e += blockDim.x) {
      const int m = e / kTile, k = e % kTile, col = c0 + k;
      const long row = r0 + m;
      const bool inside = row < rows && col < in;
      const float xv = inside ? as_f32(x[row * in + col]) : 0.f;
#pragma unroll
      for (int a = 0; a < NA; ++a)
        xs[a][m][k] = inside && (p == 0.f || dropout_keep(seed, layer, terms.adapter[a], row, col, p)) ? xv * keep_scale : 0.f;
    }
    for (int e = t; e < NA * KMAX * kTile; e += blockDim.x) {
      const int a = e / (KMAX * kTile), j = (e / kTile) % KMAX, k = e % kTile, col = c0 + k;
      as[a][k][j] = j < terms.rank[a] && col < in ? terms.A[a][long(j) * in + col] : 0.f;
    }
    __syncthreads();
    for (int k = 0; k < kTile; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&as[ad][k][4 * rg]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float v = xs[ad][4 * mg + i][k];
        acc[i][0] = fmaf(v, a.x, acc[i][0]);
        acc[i][1] = fmaf(v, a.y, acc[i][1]);
        acc[i][2] = fmaf(v, a.z, acc[i][2]);
        acc[i][3] = fmaf(v, a.w, acc[i][3]);
      }
    }
    __syncthreads();
  }
  const int rank = terms.rank[ad];
  float* u = terms.m[ad];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long row = r0 + 4 * mg + i;
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * rg + j < rank) u[row * rank + 4 * rg + j] = acc[i][j];
  }
}

// grid (column blocks of 4096 / KMAX, row parts). Thread t: ranks 4 (t / (TN / 4)) + 0..3,
// columns 4 (t % (TN / 4)) + 0..3 of its block; the part's rows in order, into part [KMAX, in].
// x: f32, or bf16 (the trace's copy, widened exactly as it is read: the same sums as from f32).
template <int KMAX, class T>
__global__ void __launch_bounds__(256) lora_da_dropout_kernel(float* parts, const float* du, const T* x, int rows, int in,
                                                              int rank, int rows_per_part, uint64_t seed, int layer,
                                                              int adapter, float p) {
  constexpr int TN = 4096 / KMAX, CG = TN / 4;
  __align__(16) __shared__ float xs[kTile][TN + 4];    // [row][column]
  __align__(16) __shared__ float ds[kTile][KMAX + 4];  // [row][rank]
  const int t = threadIdx.x, cg = t % CG, jg = t / CG;
  const int c0 = blockIdx.x * TN;
  const long first = long(blockIdx.y) * rows_per_part;
  const long last = first + rows_per_part < rows ? first + rows_per_part : rows;
  const float keep_scale = 1.0f / (1.0f - p);
  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
  for (long r0 = first; r0 < last; r0 += kTile) {
    for (int e = t; e < kTile * TN; e += blockDim.x) {
      const int m = e / TN, c = e % TN, col = c0 + c;
      const long row = r0 + m;
      float v = 0.f;
      if (row < last && col < in && (p == 0.f || dropout_keep(seed, layer, adapter, row, col, p)))
        v = as_f32(x[row * in + col]) * keep_scale;
      xs[m][c] = v;
    }
    for (int e = t; e < kTile * KMAX; e += blockDim.x) {
      const int m = e / KMAX, j = e % KMAX;
      const long row = r0 + m;
      ds[m][j] = row < last && j < rank ? du[row * rank + j] : 0.f;
    }
    __syncthreads();
    for (int m = 0; m < kTile; ++m) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[m][4 * cg]);
      const float4 dv = *reinterpret_cast<const float4*>(&ds[m][4 * jg]);
      const float d[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[j][0] = fmaf(d[j], xv.x, acc[j][0]);
        acc[j][1] = fmaf(d[j], xv.y, acc[j][1]);
        acc[j][2] = fmaf(d[j], xv.z, acc[j][2]);
        acc[j][3] = fmaf(d[j], xv.w, acc[j][3]);
      }
    }
    __syncthreads();
  }
  float* part = parts + long(blockIdx.y) * KMAX * in;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = c0 + 4 * cg + c;
      if (col < in) part[long(4 * jg + j) * in + col] = acc[j][c];
    }
}

// dA [rank, in] += the parts [n_parts][KMAX, in] summed in order.
__global__ void lora_da_reduce_kernel(float* dA, const float* parts, int rank, int in, int kmax, int n_parts) {
  const long n = long(rank) * in;
  for (long e = long(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += long(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < n_parts; ++s) acc += parts[long(s) * kmax * in + e];
    dA[e] += acc;
  }
}

// grid (column blocks of kThreads, row blocks of kUpRows); a thread keeps its column of each
// adapter's A in registers and walks the block's rows, the adapters' du rows read from shared
// memory as float4 (broadcast). NA adapters (1 to 3, NA KMAX <= 64 registers of A): each row's
// din is read once, gets the adapters' terms in order with one rounding each, as NA launches of
// one adapter would give it (the same bits), and is written once.
constexpr int kUpRows = 64;

template <int KMAX, int NA>
__global__ void lora_up_dropout_add_kernel(float* din, GroupTerms terms, int rows, int in, uint64_t seed, int layer, float p) {
  __shared__ float4 du_s[NA][kUpRows][KMAX / 4];
  const int r0 = blockIdx.y * kUpRows;
  const int n_rows = rows - r0 < kUpRows ? rows - r0 : kUpRows;
  for (int a = 0; a < NA; ++a) load_rank_rows<KMAX, kUpRows>(du_s[a], terms.m[a], terms.rank[a], r0, n_rows);
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= in) return;
  float w[NA][KMAX];
#pragma unroll
  for (int a = 0; a < NA; ++a)
#pragma unroll
    for (int k = 0; k < KMAX; ++k) w[a][k] = k < terms.rank[a] ? terms.A[a][long(k) * in + i] : 0.f;
  const float keep_scale = 1.0f / (1.0f - p);
  for (int r = 0; r < n_rows; ++r) {
    const long row = r0 + r;
    float v = din[row * in + i];
#pragma unroll
    for (int a = 0; a < NA; ++a) {
      const float acc = rank_dot(du_s[a][r], w[a]);
      // Two roundings, as dropout_add of the product (no fused multiply-add of them).
      if (p == 0.f || dropout_keep(seed, layer, terms.adapter[a], row, i, p)) v = __fadd_rn(v, __fmul_rn(acc, keep_scale));
    }
    din[row * in + i] = v;
  }
}

__global__ void widen_bf16_kernel(float* out, const uint16_t* in, long n) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(uint32_t(in[i]) << 16);
}

__global__ void scale_copy_kernel(float* y, const float* x, float a, long n) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) y[i] = a * x[i];
}

// grid: destination rows; threads over the width.
__global__ void add_rows_grouped_kernel(float* dst, const float* src, int width, const int32_t* dst_rows,
                                        const int32_t* first, const int32_t* src_index) {
  const int d = blockIdx.x;
  float* out = dst + long(dst_rows[d]) * width;
  const int j0 = first[d], j1 = first[d + 1];
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = out[i];
    for (int j = j0; j < j1; ++j) v += src[long(src_index[j]) * width + i];
    out[i] = v;
  }
}

// A row's value for column_sums: x [r, c].
struct RowValue {
  const float* x;
  int cols;
  __device__ void operator()(int r, int c, float (&v)[1]) const { v[0] = x[long(r) * cols + c]; }
};

// A row's value for token_rows_grad's column_sums: dx [r, c] where the row's token is the flag.
struct TokenRowValue {
  const float* dx;
  const int32_t* tokens;
  const int32_t* flags;
  int k, width;
  __device__ void operator()(int r, int c, float (&v)[1]) const { v[0] = tokens[r] == flags[k] ? dx[long(r) * width + c] : 0.f; }
};

}  // namespace

void dropout_rows(float* out, const float* x, int rows, int cols, uint64_t seed, int layer, int adapter, float p,
                  cudaStream_t stream) {
  const long n = long(rows) * cols;
  if (n == 0) return;
  dropout_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(out, x, cols, n, seed, layer, adapter, p, false);
  check_launch("dropout_rows");
}

void dropout_add(float* y, const float* x, int rows, int cols, uint64_t seed, int layer, int adapter, float p,
                 cudaStream_t stream) {
  const long n = long(rows) * cols;
  if (n == 0) return;
  dropout_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(y, x, cols, n, seed, layer, adapter, p, true);
  check_launch("dropout_add");
}

namespace {

int lora_kmax(const char* what, int rank) {
  if (rank < 1 || rank > kLoraFusedMaxRank)
    throw std::invalid_argument(std::string(what) + ": rank " + std::to_string(rank) + " outside 1.." +
                                std::to_string(kLoraFusedMaxRank));
  return rank <= 16 ? 16 : rank <= 32 ? 32 : 64;
}

// Row parts for lora_da: enough blocks for a large GPU (a fixed target, not the device's count,
// so the sums' order, and so the bits, are the same on every GPU), in whole tiles.
constexpr int kDaTargetBlocks = 264;

int da_rows_per_part(int rows, int in, int kmax) {
  const int col_blocks = (in + 4096 / kmax - 1) / (4096 / kmax);
  const int tiles = (rows + kTile - 1) / kTile;
  int parts = (kDaTargetBlocks + col_blocks - 1) / col_blocks;
  parts = parts < tiles ? parts : tiles;
  parts = parts > 0 ? parts : 1;
  return ((tiles + parts - 1) / parts) * kTile;
}

}  // namespace

void lora_down_dropout(float* u, const float* x, const float* A, int rows, int in, int rank, uint64_t seed, int layer,
                       int adapter, float p, cudaStream_t stream) {
  const LoraDownTerm one{u, A, rank, adapter};
  lora_down_dropout(&one, 1, x, rows, in, seed, layer, p, stream);
}

namespace {

// The widest kernel (KMAX 16, 32 or 64) the terms' ranks need; a rank outside 1..kLoraFusedMaxRank
// throws, naming who.
template <class Term>
int terms_kmax(const Term* terms, int n, const char* who) {
  int kmax = 16;
  for (int j = 0; j < n; ++j) kmax = std::max(kmax, lora_kmax(who, terms[j].rank));
  return kmax;
}

// Several adapters' terms in launches of up to kMaxTerms whose A columns fit 64 registers (3 of
// rank <= 16, 2 of <= 32), else one per term: launch.template run<KMAX, NA>(first term) for each
// group. kmax: terms_kmax's.
template <class Term, class Launch>
void run_groups(const Term* terms, int n, int kmax, const char* who, const Launch& launch) {
  const int na = n <= kMaxTerms && n * kmax <= 64 ? n : 1;
  for (int j0 = 0; j0 < n; j0 += na) {
    const int km = na == 1 ? lora_kmax(who, terms[j0].rank) : kmax;
    if (na == 3) launch.template run<16, 3>(j0);
    else if (na == 2 && km == 16) launch.template run<16, 2>(j0);
    else if (na == 2) launch.template run<32, 2>(j0);
    else if (km == 16) launch.template run<16, 1>(j0);
    else if (km == 32) launch.template run<32, 1>(j0);
    else launch.template run<64, 1>(j0);
    check_launch(who);
  }
}

// The terms j0 .. j0 + na as the kernels take them.
float* group_m(const LoraDownTerm& t) { return t.u; }
float* group_m(const LoraUpTerm& t) { return const_cast<float*>(t.du); }  // read only by lora_up
template <class Term>
GroupTerms group(const Term* terms, int j0, int na) {
  GroupTerms g{};
  for (int j = 0; j < na; ++j)
    g.m[j] = group_m(terms[j0 + j]), g.A[j] = terms[j0 + j].A, g.rank[j] = terms[j0 + j].rank, g.adapter[j] = terms[j0 + j].adapter;
  return g;
}

struct GroupArgs {
  int rows, in;
  uint64_t seed;
  int layer;
  float p;
  cudaStream_t stream;
};

template <class T>
struct DownLaunch : GroupArgs {
  const LoraDownTerm* terms;
  const T* x;
  template <int KMAX, int NA>
  void run(int j0) const {
    const int grid = (rows + kDownRows - 1) / kDownRows;  // 4 NA KMAX threads: 16 outputs each
    lora_down_dropout_kernel<KMAX, NA, T><<<grid, 4 * KMAX * NA, 0, stream>>>(group(terms, j0, NA), x, rows, in, seed, layer, p);
  }
};

template <class T>
void lora_down_groups(const LoraDownTerm* terms, int n, const T* x, int rows, int in, uint64_t seed, int layer, float p,
                      cudaStream_t stream) {
  const int kmax = terms_kmax(terms, n, "lora_down_dropout");  // the ranks checked before any early return
  if (rows <= 0 || n <= 0) return;
  run_groups(terms, n, kmax, "lora_down_dropout", DownLaunch<T>{{rows, in, seed, layer, p, stream}, terms, x});
}

struct UpLaunch : GroupArgs {
  const LoraUpTerm* terms;
  float* din;
  template <int KMAX, int NA>
  void run(int j0) const {
    const dim3 grid(unsigned((in + kThreads - 1) / kThreads), unsigned((rows + kUpRows - 1) / kUpRows));
    lora_up_dropout_add_kernel<KMAX, NA><<<grid, kThreads, 0, stream>>>(din, group(terms, j0, NA), rows, in, seed, layer, p);
  }
};

}  // namespace

void lora_down_dropout(const LoraDownTerm* terms, int n, const float* x, int rows, int in, uint64_t seed, int layer, float p,
                       cudaStream_t stream) {
  lora_down_groups(terms, n, x, rows, in, seed, layer, p, stream);
}

void lora_down_dropout(const LoraDownTerm* terms, int n, const __nv_bfloat16* x, int rows, int in, uint64_t seed, int layer,
                       float p, cudaStream_t stream) {
  lora_down_groups(terms, n, x, rows, in, seed, layer, p, stream);
}

int lora_da_rows_per_part(int rows, int in, int rank) {
  return da_rows_per_part(rows, in, lora_kmax("lora_da_rows_per_part", rank));
}

long lora_da_scratch_floats(int rows, int in, int rank) {
  const int kmax = lora_kmax("lora_da_scratch_floats", rank);
  if (rows <= 0 || in <= 0) return 0;
  const int per = da_rows_per_part(rows, in, kmax);
  return long((rows + per - 1) / per) * kmax * in;
}

namespace {

template <class T>
void lora_da_launch(float* dA, const float* du, const T* x, int rows, int in, int rank, uint64_t seed, int layer, int adapter,
                    float p, float* scratch, cudaStream_t stream) {
  const int kmax = lora_kmax("lora_da_dropout", rank);
  if (rows <= 0 || in <= 0) return;
  const int per = da_rows_per_part(rows, in, kmax), parts = (rows + per - 1) / per;
  const dim3 grid(unsigned((in + 4096 / kmax - 1) / (4096 / kmax)), unsigned(parts));
  if (kmax == 16)
    lora_da_dropout_kernel<16, T><<<grid, kThreads, 0, stream>>>(scratch, du, x, rows, in, rank, per, seed, layer, adapter, p);
  else if (kmax == 32)
    lora_da_dropout_kernel<32, T><<<grid, kThreads, 0, stream>>>(scratch, du, x, rows, in, rank, per, seed, layer, adapter, p);
  else
    lora_da_dropout_kernel<64, T><<<grid, kThreads, 0, stream>>>(scratch, du, x, rows, in, rank, per, seed, layer, adapter, p);
  check_launch("lora_da_dropout");
  lora_da_reduce_kernel<<<grid_for(long(rank) * in, kThreads), kThreads, 0, stream>>>(dA, scratch, rank, in, kmax, parts);
  check_launch("lora_da_dropout (sum of parts)");
}

}  // namespace

void lora_da_dropout(float* dA, const float* du, const float* x, int rows, int in, int rank, uint64_t seed, int layer,
                     int adapter, float p, float* scratch, cudaStream_t stream) {
  lora_da_launch(dA, du, x, rows, in, rank, seed, layer, adapter, p, scratch, stream);
}

void lora_da_dropout(float* dA, const float* du, const __nv_bfloat16* x, int rows, int in, int rank, uint64_t seed, int layer,
                     int adapter, float p, float* scratch, cudaStream_t stream) {
  lora_da_launch(dA, du, x, rows, in, rank, seed, layer, adapter, p, scratch, stream);
}

void lora_up_dropout_add(float* din, const float* du, const float* A, int rows, int in, int rank, uint64_t seed, int layer,
                         int adapter, float p, cudaStream_t stream) {
  const LoraUpTerm one{du, A, rank, adapter};
  lora_up_dropout_add(din, &one, 1, rows, in, seed, layer, p, stream);
}

void lora_up_dropout_add(float* din, const LoraUpTerm* terms, int n, int rows, int in, uint64_t seed, int layer, float p,
                         cudaStream_t stream) {
  const int kmax = terms_kmax(terms, n, "lora_up_dropout_add");  // the ranks checked before any early return
  if (rows <= 0 || in <= 0 || n <= 0) return;
  run_groups(terms, n, kmax, "lora_up_dropout_add", UpLaunch{{rows, in, seed, layer, p, stream}, terms, din});
}

void widen_bf16(float* out, const uint16_t* in, long n, cudaStream_t stream) {
  if (n == 0) return;
  widen_bf16_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(out, in, n);
  check_launch("widen_bf16");
}

void scale_copy(float* y, const float* x, float a, long n, cudaStream_t stream) {
  if (n == 0) return;
  scale_copy_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(y, x, a, n);
  check_launch("scale_copy");
}

void add_rows_grouped(float* dst, const float* src, int width, const int32_t* dst_rows, const int32_t* first,
                      const int32_t* src_index, int n_dst, cudaStream_t stream) {
  if (n_dst == 0) return;
  add_rows_grouped_kernel<<<n_dst, kThreads, 0, stream>>>(dst, src, width, dst_rows, first, src_index);
  check_launch("add_rows_grouped");
}

int column_sum_rows_per_part(int rows, int cols) { return colsum::rows_per_part(rows, cols); }

long column_sum_scratch_floats(int rows, int cols) { return colsum::scratch_floats(rows, cols, 1); }

void add_column_sums(float* y, const float* x, int rows, int cols, float* scratch, cudaStream_t stream) {
  colsum::column_sums<1>(y, nullptr, rows, cols, scratch, RowValue{x, cols}, stream);
  check_launch("add_column_sums");
}

void token_rows_grad(float* grad, const float* dx, const int32_t* tokens, int rows, int width, const int32_t* flags,
                     int n_flags, float* scratch, cudaStream_t stream) {
  for (int k = 0; k < n_flags; ++k)
    colsum::column_sums<1>(grad + long(k) * width, nullptr, rows, width, scratch, TokenRowValue{dx, tokens, flags, k, width}, stream);
  check_launch("token_rows_grad");
}

}  // namespace rf::cuda
