// GEMM kernels: C [M, N] = A [M, K] . W^T with W packed into 32-column panels.
// Compiled twice (RF_ISA=avx2 and RF_ISA=avx512); native/dispatch/gemm.cpp picks one.
//
// Packed layout (identical for both compilations):
//   panels of 32 output columns, panel p covering n in [32p, 32p+32), zero-padded past N;
//   f32:  panel = [K][32] floats                      (K-major: one 128-byte row per k)
//   bf16: panel = [Kp/2][32][2] bf16, Kp = K rounded up to even, the pad k is zero;
//         each (k, k+1) pair of a column is one 32-bit word, the operand vdpbf16ps wants.
//   Panels follow each other; a panel is Kp * 32 elements (a multiple of 64 bytes).
//
// Blocking: threads claim tasks of (rows x panels) from a counter, split along N first (M
// too when there are few panels). A task walks its rows in M blocks whose A block stays in
// L2 and, per block, every panel with an MR x 32 register-tiled micro-kernel (AVX-512:
// 8 x 32, 16 zmm accumulators; AVX2: 6 x 16 f32 / 4 x 16 bf16, or 1-2 x 32 for decode).
// K is blocked only when a K x 32 weight slice exceeds ~192 KB (K > 1536 f32 / 3072 bf16),
// so C is normally written once. M = 1 (decode) streams each thread's panels front to back.
#include "kernels/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#ifndef RF_ISA
#error "RF_ISA must be defined (avx2 or avx512)"
#endif

namespace rf {
namespace RF_ISA {

namespace {

constexpr int kPanel = 32;  // output columns per packed panel

int panel_count(int N) { return (N + kPanel - 1) / kPanel; }
int k_padded(int K, DType dt) { return dt == DType::bf16 ? K + (K & 1) : K; }
size_t elem_size(DType dt) { return dt == DType::bf16 ? 2 : 4; }
// Elements in one panel.
size_t panel_elems(int K, DType dt) { return size_t(k_padded(K, dt)) * kPanel; }

void aligned_free_bytes(uint8_t* p) { std::free(p); }

// ---------------------------------------------------------------------------------------
// Packing (load time)

// out[i] = float(src[offset + i]) for i < count.
void src_row_convert(const void* src, SrcType st, size_t offset, int count, float* out) {
  switch (st) {
    case SrcType::f32:
      std::memcpy(out, static_cast<const float*>(src) + offset, size_t(count) * 4);
      return;
    case SrcType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      int i = 0;
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      for (; i < count; ++i) out[i] = f16_to_f32(s[i]);
      return;
    }
    case SrcType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int i = 0; i < count; ++i) out[i] = bf16_to_f32(s[i]);
      return;
    }
  }
}

// Fills panel [K][32] (f32) with columns n0..n0+31 of W, zeros past N.
void panel_gather(const void* src, SrcType st, int N, int K, bool src_is_kn, int n0, float* panel,
                  std::vector<float>& row) {
  int cols = std::min(kPanel, N - n0);
  if (src_is_kn) {  // src [K, N]: each k holds the panel's 32 columns contiguously
    for (int k = 0; k < K; ++k) {
      float* dst = panel + size_t(k) * kPanel;
      src_row_convert(src, st, size_t(k) * N + n0, cols, dst);
      for (int j = cols; j < kPanel; ++j) dst[j] = 0.f;
    }
    return;
  }
  // src [N, K]: read each row contiguously, scatter it down one panel column.
  for (int j = 0; j < kPanel; ++j) {
    if (j < cols) {
      src_row_convert(src, st, size_t(n0 + j) * K, K, row.data());
      for (int k = 0; k < K; ++k) panel[size_t(k) * kPanel + j] = row[k];
    } else {
      for (int k = 0; k < K; ++k) panel[size_t(k) * kPanel + j] = 0.f;
    }
  }
}

// panel f32 [K][32] -> bf16 [Kp/2][32][2], the odd pad k zero.
void panel_encode_bf16(const float* panel, int K, uint16_t* out) {
  int kp = (K + 1) / 2;
  for (int p = 0; p < kp; ++p) {
    const float* even = panel + size_t(2 * p) * kPanel;
    const float* odd = even + kPanel;
    bool has_odd = 2 * p + 1 < K;
    uint16_t* o = out + size_t(p) * kPanel * 2;
    for (int j = 0; j < kPanel; ++j) {
      o[2 * j] = f32_to_bf16(even[j]);
      o[2 * j + 1] = has_odd ? f32_to_bf16(odd[j]) : 0;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Work partition

// The (M, N-panel) space is cut into tasks of m_chunk rows x p_chunk panels that threads
// claim from a shared counter. A few tasks per thread rather than one static share each:
// on oversubscribed or virtualised CPUs a thread can lose its core for milliseconds, and
// the others then take over its remaining tasks instead of waiting.
constexpr int kTasksPerThread = 4;
// Smallest task worth a counter claim (~10 µs of compute).
constexpr double kMinTaskMacs = 256.0 * 1024;

struct TaskGrid {
  int p_chunk = 1, n_p = 1;  // panels per task, tasks along N
  int m_chunk = 1, n_m = 1;  // rows per task (multiple of MR), tasks along M
  int count() const { return n_p * n_m; }
};

// Weight bytes per task at most: a task re-reads its panels once per M block (gemm_block),
// and with a few MB per task those re-reads come from L2/L3 instead of DRAM.
constexpr size_t kTaskWeightBytes = size_t(4) << 20;

TaskGrid grid_make(int threads, int M, int MR, int panels, size_t panel_bytes, double macs) {
  int target = threads == 1 ? 1 : threads * kTasksPerThread;
  target = int(std::max<double>(threads, std::min<double>(target, macs / kMinTaskMacs)));
  TaskGrid g;
  g.n_p = std::min(panels, target);
  g.p_chunk = (panels + g.n_p - 1) / g.n_p;
  g.p_chunk = int(std::max<size_t>(1, std::min<size_t>(g.p_chunk, kTaskWeightBytes / panel_bytes)));
  g.n_p = (panels + g.p_chunk - 1) / g.p_chunk;
  // Too few panels (small N): cut M as well.
  const int m_tiles = (M + MR - 1) / MR;
  g.n_m = std::min(m_tiles, (target + g.n_p - 1) / g.n_p);
  g.m_chunk = (m_tiles + g.n_m - 1) / g.n_m * MR;
  g.n_m = (M + g.m_chunk - 1) / g.m_chunk;
  return g;
}

// Splits K into near-equal blocks of at most kc_max (even, so bf16 pairs never straddle).
int kc_choose(int K, int kc_max) {
  if (K <= kc_max) return K;
  int blocks = (K + kc_max - 1) / kc_max;
  int kc = (K + blocks - 1) / blocks;
  return kc + (kc & 1);
}

// Per-call description shared by the threads.
struct GemmJob {
  int M, N, K;
  const float* A;   // f32 activations [M, lda]
  long lda;
  const uint16_t* A16;  // AVX-512 bf16 path: A rounded to bf16 [M, lda16], K padded even
  long lda16;
  const PackedWeight* W;
  const float* bias;
  float* C;
  long ldc;
  bool accumulate;
};

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr double kMinParallelMacs = 48.0 * 1024;

#if defined(__AVX512F__)
// =======================================================================================
// AVX-512: MR x 32 tiles, two zmm accumulators per row.
constexpr int kMR = 8;

__mmask16 mask_cols(int n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// Adds C (when add_c) and bias to the 16-column accumulator and stores the valid columns.
inline void vec_store(float* c, const float* bias, __m512 acc, __mmask16 m, bool add_c) {
  if (add_c) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, c));
  if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, bias));
  _mm512_mask_storeu_ps(c, m, acc);
}

// Requests the C tile early: with large N its rows are far apart in memory and would
// otherwise miss at the end of every tile (C is read when accumulating, else written).
template <int MR>
inline void c_prefetch(const float* C, long ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 31), _MM_HINT_T0);
  }
}

// acc sets: rows of 1 or 2 have too few independent FMA chains to hide the FMA latency,
// so they accumulate even and odd k into separate sets (summed at the end).
template <int MR>
constexpr int sets_for() {
  return MR <= 2 ? 2 : 1;
}

// C [MR, 32] (+)= A [MR, kc] (row stride lda) . B [kc][32].
template <int MR>
void tile_f32(int kc, const float* A, long lda, const float* B, float* C, long ldc,
              const float* bias, int n_valid, bool add_c) {
  constexpr int S = sets_for<MR>();
  c_prefetch<MR>(C, ldc);
  __m512 acc[S][MR][2];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
  int k = 0;
  for (; k + S <= kc; k += S) {
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      __m512 b0 = _mm512_load_ps(B + size_t(k + s) * kPanel);
      __m512 b1 = _mm512_load_ps(B + size_t(k + s) * kPanel + 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        __m512 a = _mm512_set1_ps(A[r * lda + k + s]);
        acc[s][r][0] = _mm512_fmadd_ps(a, b0, acc[s][r][0]);
        acc[s][r][1] = _mm512_fmadd_ps(a, b1, acc[s][r][1]);
      }
    }
  }
  for (; k < kc; ++k) {
    __m512 b0 = _mm512_load_ps(B + size_t(k) * kPanel);
    __m512 b1 = _mm512_load_ps(B + size_t(k) * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512 a = _mm512_set1_ps(A[r * lda + k]);
      acc[0][r][0] = _mm512_fmadd_ps(a, b0, acc[0][r][0]);
      acc[0][r][1] = _mm512_fmadd_ps(a, b1, acc[0][r][1]);
    }
  }
  __mmask16 m0 = mask_cols(n_valid), m1 = mask_cols(n_valid - 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    __m512 x0 = acc[0][r][0], x1 = acc[0][r][1];
    if (S == 2) {
      x0 = _mm512_add_ps(x0, acc[S - 1][r][0]);
      x1 = _mm512_add_ps(x1, acc[S - 1][r][1]);
    }
    vec_store(C + r * ldc, bias, x0, m0, add_c);
    vec_store(C + r * ldc + 16, bias ? bias + 16 : nullptr, x1, m1, add_c);
  }
}

// C [MR, 32] (+)= A16 [MR, 2*kp] (bf16, row stride lda16) . B [kp][32][2] with vdpbf16ps.
template <int MR>
void tile_bf16(int kp, const uint16_t* A, long lda, const uint16_t* Bw, float* C, long ldc,
               const float* bias, int n_valid, bool add_c) {
  constexpr int S = sets_for<MR>();
  const uint32_t* B = reinterpret_cast<const uint32_t*>(Bw);
  c_prefetch<MR>(C, ldc);
  __m512 acc[S][MR][2];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
  auto step = [&](int p, int s) __attribute__((always_inline)) {
    __m512bh b0 = (__m512bh)_mm512_load_si512(B + size_t(p) * kPanel);
    __m512bh b1 = (__m512bh)_mm512_load_si512(B + size_t(p) * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(int(pair));
      acc[s][r][0] = _mm512_dpbf16_ps(acc[s][r][0], a, b0);
      acc[s][r][1] = _mm512_dpbf16_ps(acc[s][r][1], a, b1);
    }
  };
  int p = 0;
  for (; p + S <= kp; p += S) {
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) step(p + s, s);
  }
  for (; p < kp; ++p) step(p, 0);
  __mmask16 m0 = mask_cols(n_valid), m1 = mask_cols(n_valid - 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    __m512 x0 = acc[0][r][0], x1 = acc[0][r][1];
    if (S == 2) {
      x0 = _mm512_add_ps(x0, acc[S - 1][r][0]);
      x1 = _mm512_add_ps(x1, acc[S - 1][r][1]);
    }
    vec_store(C + r * ldc, bias, x0, m0, add_c);
    vec_store(C + r * ldc + 16, bias ? bias + 16 : nullptr, x1, m1, add_c);
  }
}

using TileF32 = void (*)(int, const float*, long, const float*, float*, long, const float*, int, bool);
using TileBf16 = void (*)(int, const uint16_t*, long, const uint16_t*, float*, long, const float*, int, bool);
const TileF32 kTileF32[kMR + 1] = {nullptr, tile_f32<1>, tile_f32<2>, tile_f32<3>, tile_f32<4>,
                                   tile_f32<5>, tile_f32<6>, tile_f32<7>, tile_f32<8>};
const TileBf16 kTileBf16[kMR + 1] = {nullptr, tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>,
                                     tile_bf16<5>, tile_bf16<6>, tile_bf16<7>, tile_bf16<8>};

// Rounds rows [m0, m1) of A to bf16 (RNE, as core/dtype.h) into A16 [M, lda16], zero pad to lda16.
void rows_to_bf16(const float* A, long lda, int K, int m0, int m1, uint16_t* A16, long lda16) {
  for (int m = m0; m < m1; ++m) {
    const float* a = A + m * lda;
    uint16_t* o = A16 + m * lda16;
    for (long k = 0; k < lda16; k += 32) {
      long left = K - k;
      __mmask16 lo = mask_cols(int(std::min<long>(std::max<long>(left, 0), 16)));
      __mmask16 hi = mask_cols(int(std::min<long>(std::max<long>(left - 16, 0), 16)));
      __m512 x0 = _mm512_maskz_loadu_ps(lo, a + k);
      __m512 x1 = _mm512_maskz_loadu_ps(hi, a + k + 16);
      __m512bh h = _mm512_cvtne2ps_pbh(x1, x0);  // low half from x0: elements in order
      _mm512_store_si512(o + k, (__m512i)h);
    }
  }
}

#else
// =======================================================================================
// AVX2: a tile is MR rows x NV ymm vectors (8 columns each). Row tiles of 3+ rows take
// half a panel at a time (NV = 2: MR=6 -> 12 accumulators + 2 weight vectors + broadcast,
// the 16 ymm registers); 1-2 rows (decode) take the whole 32-column panel (NV = 4) so the
// weight stream is read once, front to back.
constexpr int kMR = 6;      // f32 row tile
constexpr int kMRb16 = 4;   // bf16 row tile: the widened weights need 4 more registers
constexpr int kWideRows = 2;  // tiles of at most this many rows use NV = 4

__m256i mask_cols8(int n) {
  n = std::max(0, std::min(8, n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline void vec_store(float* c, const float* bias, __m256 acc, int n, bool add_c) {
  if (n >= 8) {
    if (add_c) acc = _mm256_add_ps(acc, _mm256_loadu_ps(c));
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(c, acc);
  } else if (n > 0) {
    __m256i m = mask_cols8(n);
    if (add_c) acc = _mm256_add_ps(acc, _mm256_maskload_ps(c, m));
    if (bias) acc = _mm256_add_ps(acc, _mm256_maskload_ps(bias, m));
    _mm256_maskstore_ps(c, m, acc);
  }
}

template <int MR>
inline void c_prefetch(const float* C, long ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 31), _MM_HINT_T0);
  }
}

// Small tiles have too few independent accumulators to cover the FMA latency (4 cycles x 2
// per cycle), so they keep a second set for odd k (summed at the end).
template <int MR, int NV>
constexpr int sets_for() {
  return MR * NV <= 4 ? 2 : 1;
}

template <int MR, int NV, int S>
inline void tile_finish(__m256 (&acc)[S][MR][NV], float* C, long ldc, const float* bias, int n_valid,
                        bool add_c) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m256 x = acc[0][r][v];
      if (S == 2) x = _mm256_add_ps(x, acc[S - 1][r][v]);
      vec_store(C + r * ldc + 8 * v, bias ? bias + 8 * v : nullptr, x, n_valid - 8 * v, add_c);
    }
}

// C [MR, 8 NV] (+)= A [MR, kc] . B [kc][32-stride] (B at the tile's first column).
template <int MR, int NV>
void tile_f32(int kc, const float* A, long lda, const float* B, float* C, long ldc,
              const float* bias, int n_valid, bool add_c) {
  constexpr int S = sets_for<MR, NV>();
  c_prefetch<MR>(C, ldc);
  __m256 acc[S][MR][NV];
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][r][v] = _mm256_setzero_ps();
  auto step = [&](int k, int s) __attribute__((always_inline)) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm256_load_ps(B + size_t(k) * kPanel + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][r][v] = _mm256_fmadd_ps(a, b[v], acc[s][r][v]);
    }
  };
  int k = 0;
  for (; k + S <= kc; k += S) {
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) step(k + s, s);
  }
  for (; k < kc; ++k) step(k, 0);
  tile_finish<MR, NV, S>(acc, C, ldc, bias, n_valid, add_c);
}

// C [MR, 8 NV] (+)= A [MR, kc] (f32) . B [kc/2][32][2] bf16 (B at the tile's first pair);
// the bf16 weights are widened to f32 by shifting / masking each 32-bit pair word:
// the low half (even k) << 16, the high half (odd k) & 0xffff0000.
template <int MR, int NV>
void tile_bf16(int kc, const float* A, long lda, const uint16_t* Bw, float* C, long ldc,
               const float* bias, int n_valid, bool add_c) {
  constexpr int S = sets_for<MR, NV>();  // with 2 sets: set 0 takes even k, set 1 odd k
  const uint32_t* B = reinterpret_cast<const uint32_t*>(Bw);
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  c_prefetch<MR>(C, ldc);
  __m256 acc[S][MR][NV];
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][r][v] = _mm256_setzero_ps();
  const int kp_full = kc / 2;
  for (int p = 0; p < kp_full; ++p) {
    if constexpr (MR < NV) {
      // Few rows: widen one vector at a time, the 2 MR broadcasts stay in registers.
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + size_t(p) * kPanel + 8 * v));
        __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          acc[0][r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + 2 * p), even, acc[0][r][v]);
          acc[S - 1][r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + 2 * p + 1), odd, acc[S - 1][r][v]);
        }
      }
    } else {
      // Many rows: widen all NV vectors first (2 NV registers), then two broadcasts per row.
      __m256 even[NV], odd[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + size_t(p) * kPanel + 8 * v));
        even[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        odd[v] = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
      }
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        __m256 a0 = _mm256_broadcast_ss(A + r * lda + 2 * p);
        __m256 a1 = _mm256_broadcast_ss(A + r * lda + 2 * p + 1);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          acc[0][r][v] = _mm256_fmadd_ps(a0, even[v], acc[0][r][v]);
          acc[S - 1][r][v] = _mm256_fmadd_ps(a1, odd[v], acc[S - 1][r][v]);
        }
      }
    }
  }
  if (kc & 1) {  // last k alone: its pair partner is the zero pad (A has no element there)
    const int p = kp_full;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + size_t(p) * kPanel + 8 * v));
      __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
        acc[0][r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + 2 * p), even, acc[0][r][v]);
    }
  }
  tile_finish<MR, NV, S>(acc, C, ldc, bias, n_valid, add_c);
}

using TileF32 = void (*)(int, const float*, long, const float*, float*, long, const float*, int, bool);
using TileBf16 = void (*)(int, const float*, long, const uint16_t*, float*, long, const float*, int, bool);
// Indexed by row count: 1-2 rows whole-panel (NV = 4) tiles, more rows half-panel tiles.
const TileF32 kTileF32[kMR + 1] = {nullptr,          tile_f32<1, 4>, tile_f32<2, 4>, tile_f32<3, 2>,
                                   tile_f32<4, 2>, tile_f32<5, 2>, tile_f32<6, 2>};
const TileBf16 kTileBf16[kMRb16 + 1] = {nullptr, tile_bf16<1, 4>, tile_bf16<2, 4>, tile_bf16<3, 2>,
                                        tile_bf16<4, 2>};
#endif

// ---------------------------------------------------------------------------------------
// Blocked driver, run by each thread over its share [m_begin, m_end) x [p_begin, p_end).

// K is only blocked when a whole-K weight slice (K x 32) would outgrow ~192 KB of L2:
// unblocked, every C tile is written exactly once (with K blocks C is re-read and
// re-written per block, which costs ~15% when C is large, e.g. logits [512, 49152]).
constexpr long kSliceBytes = 192 * 1024;
// K block when blocking: a 32 KB weight slice.
constexpr int kKcF32 = 256;
constexpr int kKcBf16 = 512;
// M block: the mc x kc block of A stays in L2 while the task's panels stream past it.
constexpr long kABlockBytes = 384 * 1024;

#if defined(__AVX512F__)
int tile_rows(DType) { return kMR; }
#else
int tile_rows(DType dt) { return dt == DType::bf16 ? kMRb16 : kMR; }
#endif

void gemm_block(const GemmJob& job, int m_begin, int m_end, int p_begin, int p_end) {
  const PackedWeight& W = *job.W;
  const bool is_bf16 = W.dtype == DType::bf16;
  const int MR = tile_rows(W.dtype);
  const int K = job.K;
  const size_t pelems = panel_elems(K, W.dtype);
  const int rows = m_end - m_begin;
  // Element size of the A rows the kernels read (the AVX-512 bf16 path reads bf16 copies).
#if defined(__AVX512F__)
  const long a_bytes = is_bf16 ? 2 : 4;
#else
  const long a_bytes = 4;
#endif
  const long w_bytes = is_bf16 ? 2 : 4;
  // One row tile (decode) reuses no weight slice, so it never blocks K: each panel is then
  // one contiguous stream.
  const bool whole_k = rows <= MR || long(K) * kPanel * w_bytes <= kSliceBytes;
  const int kc_step = whole_k ? K : kc_choose(K, is_bf16 ? kKcBf16 : kKcF32);
  // Equal M blocks of at most kABlockBytes, whole row tiles.
  const int mc_max = int(std::max<long>(MR, kABlockBytes / (long(kc_step) * a_bytes) / MR * MR));
  const int m_blocks = (rows + mc_max - 1) / mc_max;
  const int mc_step = ((rows + m_blocks - 1) / m_blocks + MR - 1) / MR * MR;

  for (int pc = 0; pc < K; pc += kc_step) {
    const int kc = std::min(kc_step, K - pc);
    const bool add_c = job.accumulate || pc > 0;
    for (int ic = m_begin; ic < m_end; ic += mc_step) {
      const int mc = std::min(mc_step, m_end - ic);
      for (int p = p_begin; p < p_end; ++p) {
        const int n0 = p * kPanel;
        const int n_valid = std::min(kPanel, job.N - n0);
        const float* bias = (job.bias && pc == 0) ? job.bias + n0 : nullptr;
        if (!is_bf16) {
          const float* B = reinterpret_cast<const float*>(W.data.get()) + p * pelems + size_t(pc) * kPanel;
          for (int ir = ic; ir < ic + mc; ir += MR) {
            int mr = std::min(MR, ic + mc - ir);
            const float* A = job.A + ir * job.lda + pc;
            float* C = job.C + ir * job.ldc + n0;
#if defined(__AVX512F__)
            kTileF32[mr](kc, A, job.lda, B, C, job.ldc, bias, n_valid, add_c);
#else
            kTileF32[mr](kc, A, job.lda, B, C, job.ldc, bias, n_valid, add_c);
            if (mr > kWideRows && n_valid > 16)
              kTileF32[mr](kc, A, job.lda, B + 16, C + 16, job.ldc, bias ? bias + 16 : nullptr,
                           n_valid - 16, add_c);
#endif
          }
        } else {
          const uint16_t* B = reinterpret_cast<const uint16_t*>(W.data.get()) + p * pelems + size_t(pc) * kPanel;
          for (int ir = ic; ir < ic + mc; ir += MR) {
            int mr = std::min(MR, ic + mc - ir);
            float* C = job.C + ir * job.ldc + n0;
#if defined(__AVX512F__)
            const uint16_t* A = job.A16 + ir * job.lda16 + pc;
            kTileBf16[mr]((kc + 1) / 2, A, job.lda16, B, C, job.ldc, bias, n_valid, add_c);
#else
            const float* A = job.A + ir * job.lda + pc;
            kTileBf16[mr](kc, A, job.lda, B, C, job.ldc, bias, n_valid, add_c);
            if (mr > kWideRows && n_valid > 16)
              kTileBf16[mr](kc, A, job.lda, B + 32, C + 16, job.ldc, bias ? bias + 16 : nullptr,
                            n_valid - 16, add_c);
#endif
          }
        }
      }
    }
  }
}

#if defined(__AVX512F__)
// Caller-thread scratch for the bf16-rounded activations (grown, never shrunk).
struct Bf16Scratch {
  uint16_t* data = nullptr;
  size_t elems = 0;
  ~Bf16Scratch() { std::free(data); }
  uint16_t* reserve(size_t n) {
    if (n > elems) {
      std::free(data);
      size_t bytes = (n * 2 + 63) / 64 * 64;
      data = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
      elems = data ? n : 0;
    }
    return data;
  }
};
#endif

}  // namespace

// =========================================================================================

void pack_weight(PackedWeight& dst, const void* src, SrcType src_type, int N, int K, bool src_is_kn,
                 DType dtype) {
  if (N <= 0 || K <= 0) throw std::runtime_error("pack_weight: N and K must be positive");
  const int panels = panel_count(N);
  const size_t pelems = panel_elems(K, dtype);
  size_t bytes = size_t(panels) * pelems * elem_size(dtype);
  size_t alloc = (bytes + 63) / 64 * 64;
  uint8_t* mem = static_cast<uint8_t*>(std::aligned_alloc(64, alloc));
  if (!mem) throw std::bad_alloc();
  dst.data = std::unique_ptr<uint8_t[], void (*)(uint8_t*)>(mem, aligned_free_bytes);
  dst.N = N;
  dst.K = K;
  dst.dtype = dtype;
  dst.bytes = bytes;

  std::vector<float> row(static_cast<size_t>(K));
  std::vector<float> panel(size_t(K) * kPanel);
  for (int p = 0; p < panels; ++p) {
    panel_gather(src, src_type, N, K, src_is_kn, p * kPanel, panel.data(), row);
    if (dtype == DType::f32) {
      std::memcpy(mem + p * pelems * 4, panel.data(), pelems * 4);
    } else {
      panel_encode_bf16(panel.data(), K, reinterpret_cast<uint16_t*>(mem) + p * pelems);
    }
  }
}

void packed_row(const PackedWeight& W, int n, float* out) {
  const int p = n / kPanel, j = n % kPanel;
  const size_t pelems = panel_elems(W.K, W.dtype);
  if (W.dtype == DType::f32) {
    const float* panel = reinterpret_cast<const float*>(W.data.get()) + p * pelems;
    for (int k = 0; k < W.K; ++k) out[k] = panel[size_t(k) * kPanel + j];
  } else {
    const uint16_t* panel = reinterpret_cast<const uint16_t*>(W.data.get()) + p * pelems;
    for (int k = 0; k < W.K; ++k) out[k] = bf16_to_f32(panel[size_t(k / 2) * kPanel * 2 + j * 2 + (k & 1)]);
  }
}

void gemm(ThreadPool& pool, int M, const float* A, long lda, const PackedWeight& W, const float* bias,
          float* C, long ldc, bool accumulate) {
  if (M <= 0) return;
  GemmJob job{M, W.N, W.K, A, lda, nullptr, 0, &W, bias, C, ldc, accumulate};
  const int panels = panel_count(W.N);
  const int MR = tile_rows(W.dtype);
  const double macs = double(M) * W.N * W.K;
  const int threads = macs < kMinParallelMacs ? 1 : pool.size();

#if defined(__AVX512F__)
  static thread_local Bf16Scratch scratch;
  if (W.dtype == DType::bf16) {
    // vdpbf16ps takes bf16 activations: round A once per call, rows padded to 32 elements.
    job.lda16 = (long(W.K) + 31) / 32 * 32;
    uint16_t* a16 = scratch.reserve(size_t(M) * job.lda16);
    if (!a16) throw std::bad_alloc();
    job.A16 = a16;
    if (threads > 1 && long(M) * W.K >= 64 * 1024) {
      pool.parallel_for(M, [&](long b, long e, int) { rows_to_bf16(A, lda, W.K, int(b), int(e), a16, job.lda16); });
    } else {
      rows_to_bf16(A, lda, W.K, 0, M, a16, job.lda16);
    }
  }
#endif

  const TaskGrid grid =
      grid_make(threads, M, MR, panels, panel_elems(W.K, W.dtype) * elem_size(W.dtype), macs);
  auto task_run = [&](int task) {
    const int pi = task % grid.n_p, mi = task / grid.n_p;
    const int p_begin = pi * grid.p_chunk, p_end = std::min(panels, p_begin + grid.p_chunk);
    const int m_begin = mi * grid.m_chunk, m_end = std::min(M, m_begin + grid.m_chunk);
    gemm_block(job, m_begin, m_end, p_begin, p_end);
  };
  if (threads == 1) {
    for (int task = 0; task < grid.count(); ++task) task_run(task);
    return;
  }
  std::atomic<int> next_task{0};
  pool.run([&](int, int) {
    for (int task; (task = next_task.fetch_add(1, std::memory_order_relaxed)) < grid.count();) task_run(task);
  });
}

}  // namespace RF_ISA
}  // namespace rf
