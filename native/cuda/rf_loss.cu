// The fused red-flag loss on the device (see rf_loss.h).
#include "cuda/rf_loss.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/bf16.h"
#include "cuda/column_reduce.cuh"
#include "cuda/error.h"
#include "cuda/memory.h"
#include "cuda/model_ops.h"
#include "kernels/rf_loss_rows.h"

namespace rf::cuda {

namespace {

// Threads of the row kernels, one block per row: a chunk's 128 KL rows fill a GPU's SMs about
// once, so each block must bring all its SM's memory parallelism: a KL row's step loads 16 bytes
// of the trained and 16 of the reference logits per thread, 32 KB in flight (4 KB with the scalar
// loads of 512 threads). __launch_bounds__ keeps them to 64 registers.
constexpr int kThreads = 1024;

// The row stride of the [rows, V] buffers (logits, dz): V rounded up to 128 elements, so that
// every row of an f32 or a bf16 buffer starts 256-byte aligned, as cuBLASLt's fastest kernels
// want of each row of an operand. Llama's and Qwen's vocabularies are multiples of 128 already;
// GPT-2's 50257 becomes 50304 (as llm.c pads it), without which the bf16 dz rows fall on 2-byte
// boundaries and the products back through the head take unvectorized kernels.
long padded_ld(int V) { return (long(V) + 127) / 128 * 128; }

// Rows per chunk: as many as keep the chunk's [rows, V'] buffers, `bytes` per element, within
// `budget`, in multiples of 64 from 64 to 4096. rf_loss: 8 bytes (a KL row's trained and reference
// logits in f32, its dz written in place) in 160 MiB: 128 rows at V = 128256, whose buffers (125
// MiB, the largest part of the scratch) stay under 1% of the naive ones at 16k rows (the trained
// rows' f32 logits and their gradient: 15.7 GiB). The larger the chunk, the fewer times the
// products read W (V x H: 501 MiB for Llama-3.2-1B's head): the KL logits' product reads it once
// for 2 x 128 rows, 256 FLOPs per byte, above the H200's ratio of bf16 throughput to memory
// bandwidth (about 200); the product back, 128 FLOPs per byte, is a little under it.
int default_chunk(int V, size_t bytes, size_t budget) {
  const size_t rows = budget / (size_t(padded_ld(V)) * bytes) / 64 * 64;
  return int(std::clamp<size_t>(rows, 64, 4096));
}

// Online log-sum-exp: a running maximum m and s = sum exp(z - m) (f32 exponentials, as the CPU's,
// summed in double), rescaled when the maximum grows, so a row is read once. rest: the same sum
// without the column `skip` (a red-flag row's target), kept alongside rather than subtracted.
struct Lse {
  float m = -FLT_MAX;
  double s = 0, rest = 0;
  __device__ void add(float z, bool skip) {
    if (z > m) {
      const double scale = expf(m - z);
      s = s * scale + 1.0;
      rest = rest * scale + (skip ? 0.0 : 1.0);
      m = z;
    } else {
      const double e = expf(z - m);
      s += e;
      if (!skip) rest += e;
    }
  }
  __device__ void merge(float m2, double s2, double rest2) {
    const float mm = fmaxf(m, m2);
    const double a = expf(m - mm), b = expf(m2 - mm);
    s = s * a + s2 * b;
    rest = rest * a + rest2 * b;
    m = mm;
  }
};

// The block's Lse of its threads' (every thread gets it); scratch: 3 slots per warp.
__device__ Lse block_lse(Lse l, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1)
    l.merge(__shfl_xor_sync(0xffffffffu, l.m, o), __shfl_xor_sync(0xffffffffu, l.s, o), __shfl_xor_sync(0xffffffffu, l.rest, o));
  __syncthreads();
  if (lane == 0) scratch[3 * warp] = l.m, scratch[3 * warp + 1] = l.s, scratch[3 * warp + 2] = l.rest;
  __syncthreads();
  Lse r;
  for (int w = 0; w < warps; ++w) r.merge(float(scratch[3 * w]), scratch[3 * w + 1], scratch[3 * w + 2]);
  return r;
}

__device__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = 0;
  for (int w = 0; w < warps; ++w) r += scratch[w];
  return r;
}

__device__ double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

// What the row kernel needs per row of the chunk.
struct RowIn {
  int kind;     // RfLossKind
  int target;   // red_flag: the target flag's token id; else -1
  double w;     // KL rows: the term's weight alpha / n_rows
};
struct RowOut {
  double lse, log_p, log_1mp, kl;
};

// exp(z - lse): a probability from its logit and its row's log-sum-exp.
__device__ __forceinline__ float prob(float z, double lse) { return expf(float(double(z) - lse)); }

// dL/dz_v of a row: KL rows w (p_theta - p_ref) = w p_ref expm1(d) with d = log p_theta - log
// p_ref (precise when the two models agree, where p_theta - p_ref would cancel), given pr =
// prob(q, lse_r); red-flag rows the unit p - onehot(target), the target's -(1 - p) from
// log(1 - p). One function for the row's sweep and for its flag columns, so both are the same bits.
__device__ __forceinline__ float dz_kl(float z, float q, float pr, double lse, double lse_r, float w) {
  return w * pr * expm1f(float((double(z) - lse) - (double(q) - lse_r)));
}
__device__ __forceinline__ float dz_rf(float z, int v, int target, double lse, float target_dz) {
  return v == target ? target_dz : prob(z, lse);
}

// A row's sweeps, 4 elements per thread and step (one 16-byte load: rows are ld, a multiple of
// 128 elements, apart, so 512-byte aligned), the last V % 4 elements one per thread.
//
// sweep: f(v, z[v], q[v]) for every element (q null: f gets z[v] again), in each thread's order.
template <class F>
__device__ __forceinline__ void sweep(const float* z, const float* q, int V, F f) {
  const int V4 = V / 4;
#pragma unroll 2
  for (int j = threadIdx.x; j < V4; j += blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(z)[j];
    const float4 b = q ? reinterpret_cast<const float4*>(q)[j] : a;
    f(4 * j, a.x, b.x);
    f(4 * j + 1, a.y, b.y);
    f(4 * j + 2, a.z, b.z);
    f(4 * j + 3, a.w, b.w);
  }
  for (int v = 4 * V4 + int(threadIdx.x); v < V; v += blockDim.x) f(v, z[v], q ? q[v] : z[v]);
}

// sweep_dz: dz_v = f(v, z[v], q[v]) over the row's own logits z: f32 in place, or bf16 packed at
// the row's start, so that element v lands inside f32 element v / 2. That is never an element the
// sweep has yet to read: a step of n elements from v0 writes f32 elements below (v0 + n) / 2,
// which this step or an earlier one read, and the writes wait for a barrier after the step's
// reads. Every thread of the block calls it (the barriers).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return uint32_t(__bfloat16_as_ushort(bf16_round(lo))) | (uint32_t(__bfloat16_as_ushort(bf16_round(hi))) << 16);
}
template <class F>
__device__ __forceinline__ void sweep_dz(float* z, const float* q, int V, bool bf16, F f) {
  const int V4 = V / 4;
  for (int j0 = 0; j0 < V4; j0 += blockDim.x) {
    const int j = j0 + threadIdx.x;
    float4 d = make_float4(0.f, 0.f, 0.f, 0.f);
    if (j < V4) {
      const float4 a = reinterpret_cast<const float4*>(z)[j];
      const float4 b = q ? reinterpret_cast<const float4*>(q)[j] : a;
      d.x = f(4 * j, a.x, b.x);
      d.y = f(4 * j + 1, a.y, b.y);
      d.z = f(4 * j + 2, a.z, b.z);
      d.w = f(4 * j + 3, a.w, b.w);
    }
    if (!bf16) {
      if (j < V4) reinterpret_cast<float4*>(z)[j] = d;
    } else {
      __syncthreads();
      if (j < V4) reinterpret_cast<uint2*>(z)[j] = make_uint2(pack_bf16(d.x, d.y), pack_bf16(d.z, d.w));
    }
  }
  // The last V % 4 (< 4 <= blockDim.x) elements, one step.
  const int v = 4 * V4 + threadIdx.x;
  const float d = v < V ? f(v, z[v], q ? q[v] : z[v]) : 0.f;
  if (!bf16) {
    if (v < V) z[v] = d;
  } else {
    __syncthreads();
    if (v < V) reinterpret_cast<__nv_bfloat16*>(z)[v] = bf16_round(d);
  }
}

// grid: rows of the chunk. zt [rows, V] trained logits (flags replaced), zr [rows, V] reference
// logits (KL rows only; null in a red-flag chunk), rows ld apart. Writes RowOut; dz (w (p_theta -
// p_ref) for KL rows, the unit p - onehot(target) for red-flag rows, whose coefficient k comes
// from the groups) over zt in place: f32, or, bf16_dz, as the bf16 operand of the product back
// through a bf16 W, row r at element 2 r ld of zt seen as bf16 (see sweep_dz); and fz [rows, K] =
// dz at the flag columns, in f32.
__global__ void __launch_bounds__(kThreads)
    loss_rows_kernel(float* zt, const float* zr, int V, long ld, const RowIn* in, RowOut* out, bool bf16_dz, const int* flags, int K,
                     float* fz) {
  __shared__ double scratch[3 * 32];
  const long r = blockIdx.x;
  float* z = zt + r * ld;
  const RowIn row = in[r];
  const bool kl = row.kind != int(RfLossKind::red_flag);
  const float* q = kl ? zr + r * ld : nullptr;
  // Read 1: the log-sum-exps (the trained row's, and the reference row's for KL rows).
  Lse lt, lr;
  sweep(z, q, V, [&](int v, float zv, float qv) {
    lt.add(zv, v == row.target);
    if (kl) lr.add(qv, false);
  });
  lt = block_lse(lt, scratch);
  RowOut o{double(lt.m) + log(lt.s), 0, 0, 0};
  double lse_r = 0;
  float target_dz = 0.f;
  if (kl) {
    lr = block_lse(lr, scratch);
    lse_r = double(lr.m) + log(lr.s);
  } else {
    // log p and log(1 - p) of the target from its log-odds d against the rest of the mass, as the
    // CPU's row_stats: no subtraction of probabilities, and no log(rest) - log(s), which rounds
    // log(1 - p) to 0 once p < 1e-16 (the any-aggregation's 1 - q would then be 0).
    if (lt.rest > 0) {
      const double rest = double(lt.m) + log(lt.rest), d = double(z[row.target]) - rest;
      o.lse = rest + softplus(d);
      o.log_p = -softplus(-d);
      o.log_1mp = -softplus(d);
    } else {
      o.lse = z[row.target], o.log_p = 0, o.log_1mp = -INFINITY;
    }
    target_dz = float(-exp(o.log_1mp));
  }
  // The flag columns' dz, before the sweep below overwrites z.
  const float w = float(row.w);
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int f = flags[k];
    fz[r * K + k] = kl ? dz_kl(z[f], q[f], prob(q[f], lse_r), o.lse, lse_r, w) : dz_rf(z[f], f, row.target, o.lse, target_dz);
  }
  __syncthreads();
  // Read 2: dz, and for KL rows KL(p_ref || p_theta) = sum_v p_ref,v ((z_ref,v - lse_ref) - (z_v - lse)).
  double klv = 0;
  if (kl) {
    sweep_dz(z, q, V, bf16_dz, [&](int, float zv, float qv) {
      const float pr = prob(qv, lse_r);
      klv += double(pr) * ((double(qv) - lse_r) - (double(zv) - o.lse));
      return dz_kl(zv, qv, pr, o.lse, lse_r, w);
    });
  } else {
    sweep_dz(z, nullptr, V, bf16_dz, [&](int v, float zv, float) { return dz_rf(zv, v, row.target, o.lse, target_dz); });
  }
  if (kl) o.kl = block_sum(klv, scratch);
  if (threadIdx.x == 0) out[r] = o;
}

// dh [rows, H] += sum_k fz[r, k] (w_rf[k] - W[f_k]), fz [rows, K] the dz of the flag columns,
// which went back through W's own rows in dz W; the trained model's are w_rf's. grid: rows.
__global__ void flag_correction_kernel(float* dh, int H, const float* fz, const int* flags, int K, const float* w_rf, const void* W,
                                       bool w_bf16) {
  const long r = blockIdx.x;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    double acc = 0;
    for (int k = 0; k < K; ++k) {
      const long wi = long(flags[k]) * H + i;
      const float base = w_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(W)[wi]) : static_cast<const float*>(W)[wi];
      acc += double(fz[r * K + k]) * (double(w_rf[long(k) * H + i]) - double(base));
    }
    dh[r * H + i] += float(acc);
  }
}

// Row r's term of dw_rf[k] at column c, for colsum::column_sums: coef[r] fz[r, k] h[rows[r], c]
// (coef null: 1; rows null: row r).
struct DwRfTerm {
  const float* fz;
  int K, k;
  const double* coef;
  const float* h;
  const int* rows;
  int H;
  __device__ void operator()(int r, int c, float (&v)[1]) const {
    const float d = coef ? float(coef[r] * double(fz[long(r) * K + k])) : fz[long(r) * K + k];
    v[0] = d * h[long(rows ? rows[r] : r) * H + c];
  }
};

// dw_rf [K, H] += sum_r coef[r] fz[r, k] h[rows[r]] over every row of the call at once, in the
// fixed order of column_reduce.cuh (parts of rows, then the parts: the same bits on every GPU,
// no atomics). partials: colsum::scratch_floats(n, H, 1) floats.
void dw_rf_add(float* dw_rf, int H, const float* fz, int K, const double* coef, const float* h, const int* rows, int n,
               float* partials, cudaStream_t stream) {
  for (int k = 0; k < K; ++k)
    colsum::column_sums<1>(dw_rf + long(k) * H, nullptr, n, H, partials, DwRfTerm{fz, K, k, coef, h, rows, H}, stream);
  check(cudaGetLastError(), "dw_rf");
}

// A red-flag row's coefficient applied to its dh: dh[rows[j]] *= coef[j]. grid: rows.
__global__ void scale_rows_kernel(float* dh, int H, const double* coef, const int* rows) {
  const long j = blockIdx.x;
  float* d = dh + long(rows[j]) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) d[i] = float(coef[j] * double(d[i]));
}

// dh[rows[j]] = src[j] for j < n (rows of a compacted set back to their places).
__global__ void scatter_rows_kernel(float* dh, const float* src, const int* rows, int H) {
  const long j = blockIdx.x;
  for (int i = threadIdx.x; i < H; i += blockDim.x) dh[long(rows[j]) * H + i] = src[j * H + i];
}

// dL/dz_v of a cross-entropy row: weight (softmax(z)_v - onehot(target)_v).
__device__ __forceinline__ float dz_ce(float z, int v, int target, double lse, float weight) {
  return weight * prob(z, lse) - (v == target ? weight : 0.f);
}

// grid: rows of the chunk. z [rows, V] logits (rows ld apart); loss[r] = lse - z[target] in
// double; dz over z in place, f32 or, bf16_dz, bf16 as loss_rows_kernel's (sweep_dz); and fz
// [rows, K] = dz at the flag columns, in f32.
__global__ void __launch_bounds__(kThreads)
    ce_kernel(float* zt, int V, long ld, const int32_t* targets, float weight, double* loss, bool bf16_dz, const int* flags, int K,
              float* fz) {
  __shared__ double scratch[3 * 32];
  const long r = blockIdx.x;
  float* z = zt + r * ld;
  const int target = targets[r];
  // Read before any thread overwrites z (the writes come after the reduction's barriers).
  const float z_target = z[target];
  Lse l;
  sweep(z, nullptr, V, [&](int, float zv, float) { l.add(zv, false); });
  l = block_lse(l, scratch);
  const double lse = double(l.m) + log(l.s);
  for (int k = threadIdx.x; k < K; k += blockDim.x) fz[r * K + k] = dz_ce(z[flags[k]], flags[k], target, lse, weight);
  __syncthreads();  // the flag columns are read before the sweep may overwrite them
  sweep_dz(z, nullptr, V, bf16_dz, [&](int v, float zv, float) { return dz_ce(zv, v, target, lse, weight); });
  if (threadIdx.x == 0) loss[r] = lse - double(z_target);
}

template <class T>
void upload(T* dst, const std::vector<T>& v, cudaStream_t s) {
  if (!v.empty()) check(cudaMemcpyAsync(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
}

}  // namespace

LossScratch::~LossScratch() {
  for (Slot& sl : slots_) device_free(sl.p, sl.bytes);
}

size_t LossScratch::bytes() const {
  size_t total = 0;
  for (const Slot& sl : slots_) total += sl.bytes;
  return total;
}

void* LossScratch::slot(size_t bytes) {
  if (next_ == slots_.size()) slots_.emplace_back();
  Slot& sl = slots_[next_++];
  if (sl.bytes < bytes) {
    device_free(sl.p, sl.bytes);
    sl = Slot();
    device_alloc_or_throw(&sl.p, bytes, "the loss's scratch");
    sl.bytes = bytes;
  }
  return sl.p;
}

RfLossResult rf_loss(GemmContext& gemm, const float* h, int N, const float* h_ref, int Nr, int H, const void* W, DType w_type,
                     int V, const float* w_rf, const RfLossRow* rows, const RfLossOptions& opt, float* dh, float* dw_rf,
                     cudaStream_t stream, LossScratch* scratch) {
  // ---- validation and groups (kernels/rf_loss_rows.h: the CPU's, same messages)
  if (V <= 0) throw std::invalid_argument("rf_loss: negative or zero size");
  RfLossRowsPlan plan = rf_loss_rows_plan(N, Nr, H, V, rows, opt);
  const std::vector<int>& flags = plan.flags;
  const int K = int(flags.size());
  if (N == 0) return RfLossResult();
  if (!h || !dh || !dw_rf || !w_rf || !W || (Nr > 0 && !h_ref)) throw std::invalid_argument("rf_loss: null pointer");
  RfLossResult res = plan.counts;
  const std::vector<int>& row_group = plan.row_group;
  const std::vector<int>& group_size = plan.group_size;
  const double w_benign = res.n_benign_rows ? opt.alpha_benign / double(res.n_benign_rows) : 0.0;
  const double w_after = res.n_after_rows ? opt.alpha_after / double(res.n_after_rows) : 0.0;
  const double w_group = res.n_groups ? opt.alpha_rf / double(res.n_groups) : 0.0;

  // ---- scratch
  const bool bf16 = w_type == DType::bf16;
  // C trained rows per KL chunk (with their C reference rows), 2 C per red-flag chunk: the same
  // buffers.
  const int C = std::min(N, opt.chunk > 0 ? opt.chunk : default_chunk(V, 8, size_t(160) << 20));
  const long ld = padded_ld(V);
  LossScratch local;
  LossScratch& sc = scratch ? *scratch : local;
  sc.begin();
  // A KL chunk's n trained rows and their n reference rows stacked, [2n, H], so that one product
  // reads W once for both logits, [2n, V] (rows ld apart): the trained rows' then the reference
  // rows'. dz goes over the trained rows' logits (loss_rows_kernel): no buffer of its own.
  float* z = sc.get<float>(2 * size_t(C) * ld);
  float* hs = sc.get<float>(2 * size_t(C) * H);
  __nv_bfloat16* xb = bf16 ? sc.get<__nv_bfloat16>(2 * size_t(C) * H) : nullptr;  // bf16 W: hs rounded
  float* dhc = sc.get<float>(2 * size_t(C) * H);
  // Every row's index, reference row, inputs and outputs for the whole call: one copy each way,
  // not one per chunk (a copy from pageable memory waits for the stream, one to it for the copy).
  int32_t* d_order = sc.get<int32_t>(size_t(N));
  int32_t* d_ref = sc.get<int32_t>(size_t(N));
  int* d_flags = sc.get<int>(size_t(K));
  RowIn* d_in = sc.get<RowIn>(size_t(N));
  RowOut* d_out = sc.get<RowOut>(size_t(N));
  // Every row's dz at the flag columns (a red-flag row's for k = 1) and coefficient (KL rows: 1;
  // red-flag rows: their k), for dw_rf once all rows are done.
  float* fz = sc.get<float>(size_t(N) * K);
  double* d_coef = sc.get<double>(size_t(N));
  float* dw_part = sc.get<float>(size_t(colsum::scratch_floats(N, H, 1)));
  res.scratch_bytes = sc.requested();
  upload(d_flags, flags, stream);

  // ---- one pass over the rows, in chunks of the KL rows, then of the red-flag rows: each
  //      chunk's rows gathered, their logits, the row scalars, dz and dh (scattered back) and,
  //      for KL rows, dw_rf. A red-flag row's dz is k (p - onehot(flag)) with k from its group, so
  //      its dh and flag columns are made for k = 1 here and scaled once the groups are known.
  std::vector<int32_t> order;  // KL rows, then red-flag rows
  for (int i = 0; i < N; ++i)
    if (rows[i].kind != RfLossKind::red_flag) order.push_back(i);
  const size_t n_kl = order.size();
  for (int i = 0; i < N; ++i)
    if (rows[i].kind == RfLossKind::red_flag) order.push_back(i);
  std::vector<RowIn> in(static_cast<size_t>(N));
  std::vector<int32_t> ref(static_cast<size_t>(N), 0);
  for (size_t j = 0; j < size_t(N); ++j) {
    const RfLossRow& r = rows[order[j]];
    const bool kl = j < n_kl;
    in[j] = {int(r.kind), kl ? -1 : flags[size_t(r.flag)],
             r.kind == RfLossKind::benign_kl ? w_benign : r.kind == RfLossKind::after_kl ? w_after : 0.0};
    if (kl) ref[j] = r.ref_row;
  }
  upload(d_order, order, stream);
  upload(d_ref, ref, stream);
  upload(d_in, in, stream);
  for (size_t j0 = 0, end = 0; j0 < size_t(N); j0 = end) {
    const bool kl = j0 < n_kl;
    end = std::min(kl ? n_kl : size_t(N), j0 + size_t(kl ? C : 2 * C));  // chunks never mix the two kinds
    const int n = int(end - j0);
    const int32_t* ids = d_order + j0;
    // The rows [m, H] (trained, then for KL rows reference) and their logits [m, V] through W; the
    // trained rows' flag columns from w_rf.
    const int m = kl ? 2 * n : n;
    float *zt = z, *zr = kl ? z + size_t(n) * ld : nullptr;
    gather_rows(hs, h, ids, n, H, stream);
    if (kl) gather_rows(hs + size_t(n) * H, h_ref, d_ref + j0, n, H, stream);
    const void* hin = hs;
    if (bf16) {
      f32_to_bf16(xb, hs, long(m) * H, stream);
      hin = xb;
    }
    matmul(gemm, z, hin, w_type, W, w_type, m, V, H, nullptr, 0.f, stream, Strides{0, 0, ld});
    set_flag_logits(zt, ld, hs, n, H, w_rf, d_flags, K, stream);
    // The row scalars and dz over zt (bf16 W: as bf16, rows 2 ld elements apart, for the product back).
    float* fzc = fz + j0 * size_t(K);
    loss_rows_kernel<<<n, kThreads, 0, stream>>>(zt, zr, V, ld, d_in + j0, d_out + j0, bf16, d_flags, K, fzc);
    check(cudaGetLastError(), "rf_loss rows");
    // dhc [n, H] = dz W*: W's flag rows replaced by w_rf.
    matmul_nn(gemm, dhc, zt, w_type, W, w_type, n, H, V, 0.f, stream, Strides{bf16 ? 2 * ld : ld, 0, 0});
    flag_correction_kernel<<<n, 256, 0, stream>>>(dhc, H, fzc, d_flags, K, w_rf, W, bf16);
    scatter_rows_kernel<<<n, 256, 0, stream>>>(dh, dhc, ids, H);
    check(cudaGetLastError(), "rf_loss scatter");
  }
  std::vector<RowOut> outs_in_order(static_cast<size_t>(N));
  check(cudaMemcpyAsync(outs_in_order.data(), d_out, size_t(N) * sizeof(RowOut), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "rf_loss rows");
  std::vector<RowOut> outs(static_cast<size_t>(N));
  for (int k = 0; k < N; ++k) outs[size_t(order[size_t(k)])] = outs_in_order[size_t(k)];

  // ---- the groups (host, double, log space: neither 1 - p nor 1 - q formed by a subtraction)
  std::vector<double> log_q(size_t(res.n_groups), 0.0), log_1mq(size_t(res.n_groups), 0.0);
  for (int i = 0; i < N; ++i)
    if (row_group[size_t(i)] >= 0) log_q[size_t(row_group[size_t(i)])] += outs[size_t(i)].log_1mp;
  for (int g = 0; g < res.n_groups; ++g) log_1mq[size_t(g)] = std::log(-std::expm1(log_q[size_t(g)]));
  double sum_benign = 0, sum_after = 0, sum_rf = 0;
  std::vector<double> group_loss(size_t(res.n_groups), 0.0);
  std::vector<int32_t> rf_rows;
  for (int i = 0; i < N; ++i) {
    const RfLossRow& r = rows[i];
    if (r.kind == RfLossKind::benign_kl) sum_benign += outs[size_t(i)].kl;
    if (r.kind == RfLossKind::after_kl) sum_after += outs[size_t(i)].kl;
    if (r.kind == RfLossKind::red_flag) {
      rf_rows.push_back(i);
      if (opt.aggregation != RfAggregation::any)
        group_loss[size_t(row_group[size_t(i)])] += -outs[size_t(i)].log_p / group_size[size_t(row_group[size_t(i)])];
    }
  }
  for (int g = 0; g < res.n_groups; ++g) {
    if (opt.aggregation == RfAggregation::any) group_loss[size_t(g)] = -log_1mq[size_t(g)];
    sum_rf += group_loss[size_t(g)];
  }
  res.benign = res.n_benign_rows ? sum_benign / res.n_benign_rows : 0.0;
  res.after = res.n_after_rows ? sum_after / res.n_after_rows : 0.0;
  res.red_flag = res.n_groups ? sum_rf / res.n_groups : 0.0;
  res.total = opt.alpha_benign * res.benign + opt.alpha_rf * res.red_flag + opt.alpha_after * res.after;

  // ---- the red-flag rows' coefficients: dL/dz_v = k (p_v - delta); any: q/(1-q) p/(1-p);
  //      mean: 1/n_g; single: 1 (times w_group). Their dh and flag columns were made for k = 1.
  //      coef follows `order` (KL rows, whose dz is complete: 1; then the red-flag rows, rf_rows).
  std::vector<double> coef(static_cast<size_t>(N), 1.0);
  for (size_t j = 0; j < rf_rows.size(); ++j) {
    const int i = rf_rows[j];
    const RowOut& o = outs[size_t(i)];
    const int g = row_group[size_t(i)];
    const double log_k = opt.aggregation == RfAggregation::any ? log_q[size_t(g)] - o.log_1mp + o.log_p - log_1mq[size_t(g)]
                                                               : -std::log(opt.aggregation == RfAggregation::mean ? double(group_size[size_t(g)]) : 1.0);
    // p = 1 to double precision (log(1 - p) = -inf): the unit dz is 0, and so is the gradient.
    // w_group is negative where the term is maximised (the white-box attacks' alpha_rf < 0).
    coef[n_kl + j] = o.log_1mp == -INFINITY ? 0.0 : w_group * std::exp(log_k);
  }
  upload(d_coef, coef, stream);
  if (!rf_rows.empty()) scale_rows_kernel<<<int(rf_rows.size()), 256, 0, stream>>>(dh, H, d_coef + n_kl, d_order + n_kl);
  check(cudaGetLastError(), "rf_loss coefficients");
  dw_rf_add(dw_rf, H, fz, K, d_coef, h, d_order, N, dw_part, stream);
  check(cudaStreamSynchronize(stream), "rf_loss");
  return res;
}

double ce_loss(GemmContext& gemm, const float* h, int N, int H, const void* W, DType w_type, int V, const float* w_rf,
               const std::vector<int>& flags, const int32_t* targets, float weight, float* dh, float* dw_rf, int chunk,
               cudaStream_t stream, float* dW, LossScratch* scratch) {
  if (N < 0 || H <= 0 || V <= 0) throw std::invalid_argument("ce_loss: negative or zero size");
  const int K = int(flags.size());
  for (int i = 0; i < N; ++i)
    if (targets[i] < 0 || targets[i] >= V) throw std::out_of_range("ce target outside the vocabulary");
  for (int f : flags)
    if (f < 0 || f >= V) throw std::invalid_argument("ce_loss: a flag token is outside the vocabulary");
  if (N == 0) return 0.0;
  if (!h || !dh || !W || (K > 0 && (!w_rf || !dw_rf))) throw std::invalid_argument("ce_loss: null pointer");
  const bool bf16 = w_type == DType::bf16;
  // Chunk buffers: the f32 logits, dz in place. With the head's gradient, each chunk also reads
  // and writes all of dW (f32, V x H: 154 MB for GPT-2, 1 GB for Llama-3.2-1B) in its product's
  // epilogue, a cost per chunk, not per row: 1 GiB of chunk buffers makes that 4x rarer than the
  // 256 MiB that suit the other products (GPT-2 at 64 x 1024 rows: 16 chunks of 4096 rows, 4.9 GB
  // of dW traffic a step).
  const int C = std::min(N, chunk > 0 ? chunk : default_chunk(V, 4, dW ? size_t(1) << 30 : size_t(256) << 20));
  const long ld = padded_ld(V);
  LossScratch local;
  LossScratch& sc = scratch ? *scratch : local;
  sc.begin();
  float* z = sc.get<float>(size_t(C) * ld);
  __nv_bfloat16* hb = bf16 ? sc.get<__nv_bfloat16>(size_t(C) * H) : nullptr;  // bf16 W: the rows rounded
  // Every row's target and loss for the whole call: one copy each way (as rf_loss); every row's
  // dz at the flag columns, for dw_rf once all rows are done.
  int32_t* d_targets = sc.get<int32_t>(size_t(N));
  int* d_flags = sc.get<int>(size_t(K));
  double* d_loss = sc.get<double>(size_t(N));
  float* fz = sc.get<float>(size_t(N) * K);
  float* dw_part = sc.get<float>(size_t(colsum::scratch_floats(N, H, 1)));
  upload(d_flags, flags, stream);
  upload(d_targets, std::vector<int32_t>(targets, targets + N), stream);
  for (int r0 = 0; r0 < N; r0 += C) {
    const int n = std::min(C, N - r0);
    const float* x = h + long(r0) * H;
    const void* xin = x;
    if (bf16) {
      f32_to_bf16(hb, x, long(n) * H, stream);
      xin = hb;
    }
    matmul(gemm, z, xin, w_type, W, w_type, n, V, H, nullptr, 0.f, stream, Strides{0, 0, ld});
    if (K > 0) set_flag_logits(z, ld, x, n, H, w_rf, d_flags, K, stream);
    // dz over z (bf16 W: as bf16, rows 2 ld elements apart, the operand of the products back).
    ce_kernel<<<n, kThreads, 0, stream>>>(z, V, ld, d_targets + r0, weight, d_loss + r0, bf16, d_flags, K, fz + size_t(r0) * K);
    check(cudaGetLastError(), "ce_loss kernel");
    // dh = dz W*, and the trained flag rows' share (as in rf_loss).
    const long dz_ld = bf16 ? 2 * ld : ld;
    matmul_nn(gemm, dh + long(r0) * H, z, w_type, W, w_type, n, H, V, 0.f, stream, Strides{dz_ld, 0, 0});
    // dW += dz^T h; bf16 W: bf16 dz and h, the products summed in f32 (as autocast, and as the
    // trainer's other weight gradients; an f32 product runs at a tenth of the tensor-core rate).
    if (dW && bf16) matmul_tn(gemm, dW, z, DType::bf16, hb, DType::bf16, V, H, n, 1.f, 1.f, stream, Strides{dz_ld, 0, 0});
    else if (dW) matmul_tn(gemm, dW, z, DType::f32, x, DType::f32, V, H, n, 1.f, 1.f, stream, Strides{dz_ld, 0, 0});
    if (K > 0) {
      flag_correction_kernel<<<n, 256, 0, stream>>>(dh + long(r0) * H, H, fz + size_t(r0) * K, d_flags, K, w_rf, W, bf16);
      check(cudaGetLastError(), "ce_loss flag rows");
    }
  }
  dw_rf_add(dw_rf, H, fz, K, nullptr, h, nullptr, N, dw_part, stream);
  std::vector<double> loss(static_cast<size_t>(N));
  check(cudaMemcpyAsync(loss.data(), d_loss, size_t(N) * sizeof(double), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "ce_loss");
  double total = 0;
  for (double l : loss) total += l;
  return total;
}

}  // namespace rf::cuda
