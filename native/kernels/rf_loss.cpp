// Fused red-flag loss (kernels/rf_loss.h), compiled twice (RF_ISA=avx2 and RF_ISA=avx512);
// native/dispatch/rf_loss.cpp picks one.
//
// Algorithm (flash-attention style, one pass over W in vocabulary chunks):
//   Every "stream row" (the N trained rows h and the Nr reference rows h_ref alike) keeps a
//   running max m and sum S of exp(z_v - m) over the vocabulary seen so far, EXCLUDING the flag
//   columns (one rf, or K flags f_k: below "rf" stands for any of them and sums over them), and the softmax-weighted sum E = sum_v exp(z_v - m) W_v [H] (rescaled by
//   exp(m_old - m_new) whenever the max grows). After the pass, with the rf logit z_rf
//   computed apart (h . w_rf for the trained rows, h_ref . W_rf for the reference rows):
//     lse = logaddexp(m + log S, z_rf),  p_rf = exp(z_rf - lse),  and for v != rf
//     p_v = exp(z_v - m) exp(m - lse), so  P := sum_{v != rf} p_v W_v = exp(m - lse) E.
//   Every term's gradient has the form dL/dz_v = a p_theta,v - b p_ref,v - c delta_{v,rf}
//   with per-row scalars a, b, c (KL rows: a = b = weight, c = 0; red-flag rows: a = c =
//   dL/dlog p-ish factor k, b = 0; see the coefficient loop in rf_loss), hence
//     dL/dh = a P_theta - b P_ref + (a p_theta,rf - b p_ref,rf - c) w_rf,
//     dL/dw_rf += (a p_theta,rf - b p_ref,rf - c) h,
//   and the KL value needs no second pass either, since z_v = h . W_v is linear in h:
//     sum_{v != rf} p_ref,v (z_ref,v - z_theta,v) = (h_ref - h) . P_ref.
//   Keeping rf out of the streamed sums makes 1 - p_rf = S e^m / e^lse cancellation-free.
//
// Per chunk of Vc vocabulary rows (whole 32-row panels), ONE parallel region whose tasks are
//   - the transpose of the NEXT chunk into the other half of a double buffer
//     Wt [2][H/32 strips][Vc][32] f32 (bf16 widened on AVX2), or for bf16 W on AVX-512
//     [2][H/32 strips][Vc/2][32] bf16 pair words, word (j/2, kk) = (W[v0+j][32s+kk],
//     W[v0+j+1][32s+kk]) (the vocabulary paired as vdpbf16ps pairs its operands, an odd tail's
//     high half zero): the accumulation's layout, the packed panels being [H][32] (K-major, and
//     for bf16 paired along K); done once per chunk, shared by all rows;
//   - blocks of up to 48 stream rows (trained or reference), each: Z [rows, Vc] = A . W^T
//     by a single-threaded gemm() on a view of the chunk's panels, the online-softmax update
//     turning Z into P = exp(Z - m_new) in place (thread-private, L2-resident), and
//     E = E * exp(m_old - m_new) + P . Wt with an MR x 32 register-tiled micro-kernel (the
//     rescale fused into its store), strip by strip so a strip (Vc x 128 B f32, 64 B bf16)
//     stays in L2. For bf16 W on AVX-512, P is first rounded to bf16 pairs (p_j, p_j+1) in
//     place (row stride unchanged) and the micro-kernel is vdpbf16ps: acc += p_j W_j + p_j+1
//     W_j+1, two vocabulary rows per instruction, f32 accumulators.
// Small tasks claimed from a counter keep both threads busy to within one task per chunk
// (gemm's own split of a chunk is a few coarse tasks per thread), and there is one barrier
// per chunk. Work: the logits are (N + Nr) V H multiply-adds at gemm speed, the accumulation
// as many, also at gemm speed: f32 FMAs for f32 W (and bf16 W on AVX2), bf16 dot products
// for bf16 W on AVX-512, where rounding p to bf16 costs less accuracy than gemm's rounding of
// h already did (kernels/rf_loss.h, Numerics); transpose, softmax and the rounding of P are
// O((N + Nr + H) V) besides.
// The trained rows' E live in dh itself (it is written anyway), the reference rows' in
// scratch: Nr x H + 2 Vc x H (half that for bf16 pairs) + threads x 48 x Vc floats.
#include "kernels/rf_loss.h"
#include "kernels/rf_loss_rows.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/vmath.h"

#ifndef RF_ISA
#error "RF_ISA must be defined (avx2 or avx512)"
#endif

namespace rf {
namespace RF_ISA {

namespace {

constexpr int kPanel = 32;  // vocabulary rows per packed panel, and H columns per Wt strip
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Sizing

// Default chunk: Wt (Vc x H f32; half that as bf16 pairs) about 4 MB (two of them, this
// chunk's and the next's, stay in the 32 MB L3 with the chunk's panels while every row task
// streams past), at most 1024 rows so one Wt strip (Vc x 128 B) and a task's P block
// (48 x Vc x 4 B) share L2. Fewer, larger
// chunks mean fewer barriers and fewer re-reads of the rows' h and E (once per chunk).
int chunk_choose(int requested, int V, int H) {
  int vc = requested > 0 ? requested : int((4L << 20) / (long(H) * 4));
  vc = std::max(kPanel, std::min(vc, requested > 0 ? 1 << 20 : 1024));
  vc = (vc + kPanel - 1) / kPanel * kPanel;
  const int v_rounded = (V + kPanel - 1) / kPanel * kPanel;
  return std::min(vc, v_rounded);
}

// 64-byte aligned float buffer.
struct AlignedFloats {
  float* p = nullptr;
  size_t n = 0;
  explicit AlignedFloats(size_t count) : n(count) {
    if (count == 0) return;
    const size_t bytes = (count * 4 + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  size_t bytes() const { return n * 4; }
};

size_t panel_bytes(const PackedWeight& W) {
  const int kp = W.dtype == DType::bf16 ? W.K + (W.K & 1) : W.K;
  return size_t(kp) * kPanel * (W.dtype == DType::bf16 ? 2 : 4);
}

// A non-owning PackedWeight over panels [p0, p0 + ceil(n / 32)) of W: vocabulary rows
// [32 p0, 32 p0 + n) as a matrix of n rows, for gemm() over one chunk.
PackedWeight view_make(const PackedWeight& W, int p0, int n) {
  PackedWeight v;
  v.N = n;
  v.K = W.K;
  v.dtype = W.dtype;
  v.bytes = size_t((n + kPanel - 1) / kPanel) * panel_bytes(W);
  v.data = std::unique_ptr<uint8_t[], void (*)(uint8_t*)>(W.data.get() + size_t(p0) * panel_bytes(W),
                                                           [](uint8_t*) {});
  return v;
}

// ---------------------------------------------------------------------------------------
// 1. Chunk transpose: strip s of Wt = [Vc][32] f32 holding W[v0 + j][32 s + kk] at j * 32 + kk,
// columns past H zero (or, for bf16 W on AVX-512, [Vc/2][32] bf16 pair words: strip_fill_pairs).
// Panels are [H][32] (f32) or [Hp/2][32][2] (bf16).

// In-register 8 x 8 transpose (AVX: both instruction sets have it): r[i][j] -> r[j][i].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The 8 x 8 block of a panel at rows kk = kb .. kb + 7 of strip k0 (kn valid) and columns
// j = jb .. jb + 7, transposed: r[i] = W[jb + i][k0 + kb .. k0 + kb + 7] as f32 (bf16 widened,
// exactly), columns kk >= kn zero.
inline void block_load_t(const uint8_t* panel, bool is_f32, int k0, int kn, int kb, int jb, __m256 r[8]) {
  if (is_f32) {
    // Row k of the panel: 32 floats at k * 32.
    const float* src = reinterpret_cast<const float*>(panel) + size_t(k0 + kb) * kPanel + jb;
    for (int i = 0; i < 8; ++i) r[i] = kb + i < kn ? _mm256_load_ps(src + i * kPanel) : _mm256_setzero_ps();
  } else {
    // Pair word (k even, k + 1) of column j at (k / 2) * 32 + j: even k in the low half.
    const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
    const uint32_t* src = reinterpret_cast<const uint32_t*>(panel) + size_t((k0 + kb) / 2) * kPanel + jb;
    for (int i = 0; i < 8; i += 2) {
      if (kb + i < kn) {
        const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(src + (i / 2) * kPanel));
        r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        r[i + 1] = kb + i + 1 < kn ? _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask)) : _mm256_setzero_ps();
      } else {
        r[i] = r[i + 1] = _mm256_setzero_ps();
      }
    }
  }
  transpose8(r);
}

// Strip s of the chunk starting at panel p0 (n_panels panels) into dst [n_panels * 32][32],
// in 8 x 8 blocks: 8 rows kk of 8 columns j in, 8 rows j of 8 columns kk out.
void strip_fill(const PackedWeight& W, int p0, int n_panels, int s, float* dst) {
  const int H = W.K;
  const int k0 = s * kPanel, kn = std::min(kPanel, H - k0);
  const size_t pb = panel_bytes(W);
  const bool is_f32 = W.dtype == DType::f32;
  for (int p = 0; p < n_panels; ++p) {
    const uint8_t* panel = W.data.get() + size_t(p0 + p) * pb;
    float* out = dst + size_t(p) * kPanel * kPanel;  // rows j = 32 p .. 32 p + 31 of the strip
    for (int kb = 0; kb < kPanel; kb += 8) {
      for (int jb = 0; jb < kPanel; jb += 8) {
        __m256 r[8];
        block_load_t(panel, is_f32, k0, kn, kb, jb, r);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(out + (jb + i) * kPanel + kb, r[i]);
      }
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 W, for vdpbf16ps: strip s of the chunk (n valid vocabulary rows) into dst
// [n_panels * 16][32] pair words, word (j / 2, kk) = (W[v0 + j][32 s + kk] low half,
// W[v0 + j + 1][32 s + kk] high half), i.e. the vocabulary dimension paired as vdpbf16ps
// pairs its operands. Rows j >= n are zero (an odd tail's high half), columns past H zero.
// Exact: the widened f32 of a bf16 value keeps its bits in the high half.
void strip_fill_pairs(const PackedWeight& W, int p0, int n_panels, int n, int s, uint32_t* dst) {
  const int H = W.K;
  const int k0 = s * kPanel, kn = std::min(kPanel, H - k0);
  const size_t pb = panel_bytes(W);
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  for (int p = 0; p < n_panels; ++p) {
    const uint8_t* panel = W.data.get() + size_t(p0 + p) * pb;
    uint32_t* out = dst + size_t(p) * (kPanel / 2) * kPanel;  // pairs j / 2 = 16 p .. 16 p + 15
    const int valid = n - p * kPanel;                          // rows j < valid of this panel are W's
    for (int kb = 0; kb < kPanel; kb += 8) {
      for (int jb = 0; jb < kPanel; jb += 8) {
        __m256 r[8];
        block_load_t(panel, false, k0, kn, kb, jb, r);
        for (int i = 0; i < 8; i += 2) {
          const __m256i lo = jb + i < valid ? _mm256_srli_epi32(_mm256_castps_si256(r[i]), 16) : _mm256_setzero_si256();
          const __m256i hi = jb + i + 1 < valid ? _mm256_and_si256(_mm256_castps_si256(r[i + 1]), hi_mask)
                                                : _mm256_setzero_si256();
          _mm256_store_si256(reinterpret_cast<__m256i*>(out + size_t((jb + i) / 2) * kPanel + kb),
                             _mm256_or_si256(lo, hi));
        }
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------
// 2a. Online softmax update of one row over one chunk.

// z [n] (n >= 1: the chunk's logits, flags_local the flag columns in it) becomes exp(z - m_new)
// with the flag columns 0; (m, S) are updated; returns the factor exp(m_old - m_new) for E.
float row_softmax_update(float* z, int n, const std::vector<int>& flags_local, float& m, double& S) {
  for (int j : flags_local) z[j] = kNegInf;
  const float cm = row_max(z, n);
  const float m_new = std::max(m, cm);
  if (m_new == kNegInf) {  // nothing but flag columns seen yet
    for (int j = 0; j < n; ++j) z[j] = 0.f;
    return 1.f;
  }
  float s = exp_shift(z, n, m_new);
  for (int j : flags_local) {  // exp_f32 clamps -inf to e^-87: take it out exactly
    s -= z[j];
    z[j] = 0.f;
  }
  const float scale = m == kNegInf ? 0.f : float(std::exp(double(m) - double(m_new)));
  S = S * scale + s;
  m = m_new;
  return scale;
}

// ---------------------------------------------------------------------------------------
// 2b. E [rows, H] = E * scale[row] + P [rows, n] . Wt: the "dX = S W" direction.

#if defined(__AVX512F__)
constexpr int kMR = 8;  // rows per tile: 8 x 32 columns = 16 zmm accumulators

__mmask16 mask_cols(int n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// The tile's store, shared by the f32 and bf16 micro-kernels: E [MR, cols] (row stride lde)
// = E * scale[row] + acc, the online softmax's rescale fused in.
template <int MR>
inline void tile_store(const __m512 (&acc)[MR][2], float* E, long lde, const float* scale, int cols) {
  const __mmask16 m0 = mask_cols(cols), m1 = mask_cols(cols - 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 sc = _mm512_set1_ps(scale[r]);
    float* e = E + r * lde;
    _mm512_mask_storeu_ps(e, m0, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, e), sc, acc[r][0]));
    _mm512_mask_storeu_ps(e + 16, m1, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, e + 16), sc, acc[r][1]));
  }
}

// E [MR, cols] (row stride lde) = E * scale + P [MR, n] (row stride ldp) . B [n][32].
template <int MR>
void tile_acc(int n, const float* P, long ldp, const float* B, float* E, long lde, const float* scale, int cols) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const __m512 b0 = _mm512_load_ps(B + size_t(j) * kPanel);
    const __m512 b1 = _mm512_load_ps(B + size_t(j) * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(P[r * ldp + j]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  tile_store<MR>(acc, E, lde, scale, cols);
}

using TileAcc = void (*)(int, const float*, long, const float*, float*, long, const float*, int);
const TileAcc kTileAcc[kMR + 1] = {nullptr,     tile_acc<1>, tile_acc<2>, tile_acc<3>, tile_acc<4>,
                                   tile_acc<5>, tile_acc<6>, tile_acc<7>, tile_acc<8>};

// One strip (32 columns of H, cols valid) for rows [0, rows).
void strip_acc(int rows, int n, const float* P, long ldp, const float* B, float* E, long lde, const float* scale,
               int cols) {
  for (int r = 0; r < rows; r += kMR) {
    const int mr = std::min(kMR, rows - r);
    kTileAcc[mr](n, P + r * ldp, ldp, B, E + r * lde, lde, scale + r, cols);
  }
}

#if defined(__AVX512BF16__)
// bf16 W: P row [n] -> ceil(n / 2) bf16 pair words (p_j low, p_j+1 high; round to nearest
// even, as f32_to_bf16 and gemm's rows_to_bf16), an odd tail's high half zero. In place is
// allowed (dst == src): the stores of block k (bytes [2k, 2k + 64)) never reach the floats
// of a later block (bytes >= 4k + 128).
void row_to_bf16_pairs(const float* src, int n, uint16_t* dst) {
  for (int k = 0; k < n; k += 2 * 16) {
    const __m512 x0 = _mm512_maskz_loadu_ps(mask_cols(n - k), src + k);
    const __m512 x1 = _mm512_maskz_loadu_ps(mask_cols(n - k - 16), src + k + 16);
    _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));  // low half from x0
  }
}

// E [MR, cols] (row stride lde) = E * scale + P [MR, 2 np] . B [2 np][32] with vdpbf16ps:
// P as pair words [MR][np] (row stride ldp words), B as [np][32] pair words (strip_fill_pairs).
// Each step adds p_j W_j + p_j+1 W_j+1 (exact bf16 products, f32 sums) to 32 columns of MR rows.
template <int MR>
void tile_acc_bf16(int np, const uint32_t* P, long ldp, const uint32_t* B, float* E, long lde, const float* scale,
                   int cols) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int j = 0; j < np; ++j) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(B + size_t(j) * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(B + size_t(j) * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, P + r * ldp + j, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  tile_store<MR>(acc, E, lde, scale, cols);
}

using TileAccBf16 = void (*)(int, const uint32_t*, long, const uint32_t*, float*, long, const float*, int);
const TileAccBf16 kTileAccBf16[kMR + 1] = {nullptr,          tile_acc_bf16<1>, tile_acc_bf16<2>,
                                           tile_acc_bf16<3>, tile_acc_bf16<4>, tile_acc_bf16<5>,
                                           tile_acc_bf16<6>, tile_acc_bf16<7>, tile_acc_bf16<8>};

void strip_acc_bf16(int rows, int np, const uint32_t* P, long ldp, const uint32_t* B, float* E, long lde,
                    const float* scale, int cols) {
  for (int r = 0; r < rows; r += kMR) {
    const int mr = std::min(kMR, rows - r);
    kTileAccBf16[mr](np, P + r * ldp, ldp, B, E + r * lde, lde, scale + r, cols);
  }
}
#endif

#else
constexpr int kMR = 6;  // 6 rows x 16 columns = 12 ymm accumulators (of 16 registers)

__m256i mask_cols8(int n) {
  n = std::max(0, std::min(8, n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// E [MR, cols <= 16] = E * scale + P [MR, n] . B [n][32-stride] (B at the half-strip).
template <int MR>
void tile_acc(int n, const float* P, long ldp, const float* B, float* E, long lde, const float* scale, int cols) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_load_ps(B + size_t(j) * kPanel);
    const __m256 b1 = _mm256_load_ps(B + size_t(j) * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(P + r * ldp + j);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 sc = _mm256_set1_ps(scale[r]);
    float* e = E + r * lde;
    for (int v = 0; v < 2; ++v) {
      const int c = cols - 8 * v;
      if (c >= 8) {
        _mm256_storeu_ps(e + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(e + 8 * v), sc, acc[r][v]));
      } else if (c > 0) {
        const __m256i m = mask_cols8(c);
        _mm256_maskstore_ps(e + 8 * v, m, _mm256_fmadd_ps(_mm256_maskload_ps(e + 8 * v, m), sc, acc[r][v]));
      }
    }
  }
}

using TileAcc = void (*)(int, const float*, long, const float*, float*, long, const float*, int);
const TileAcc kTileAcc[kMR + 1] = {nullptr, tile_acc<1>, tile_acc<2>, tile_acc<3>, tile_acc<4>, tile_acc<5>, tile_acc<6>};

void strip_acc(int rows, int n, const float* P, long ldp, const float* B, float* E, long lde, const float* scale,
               int cols) {
  for (int half = 0; half < 2; ++half) {
    const int c = std::min(16, cols - 16 * half);
    if (c <= 0) break;
    for (int r = 0; r < rows; r += kMR) {
      const int mr = std::min(kMR, rows - r);
      kTileAcc[mr](n, P + r * ldp, ldp, B + 16 * half, E + r * lde + 16 * half, lde, scale + r, c);
    }
  }
}
#endif

// Rows of one stream (trained or reference): A [count, H] in, E [count, H] accumulated,
// the running (m, S) per row.
struct Stream {
  const float* A;
  float* E;
  int count;
  float* m;
  double* S;
};

// Rows a thread claims at a time: it computes their logits for the chunk, the softmax
// update, and the accumulation, its P block (rows x Vc) staying in L2 while the strips of
// Wt go by. 48 (whole row tiles of both instruction sets, 8 and 6 rows) unless that leaves
// fewer than kMinTasksPerThread tasks per chunk: every chunk ends with a barrier, where the
// threads wait for the last task, so small batches take smaller tasks.
constexpr int kMinTasksPerThread = 12;

int task_rows_choose(int rows, int threads) {
  for (int t : {48, 24}) {
    if ((rows + t - 1) / t >= kMinTasksPerThread * threads) return t;
  }
  return 8;
}

// ---------------------------------------------------------------------------------------
// Per-row scalars after the pass.

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

struct RowStats {
  double lse = 0;      // log sum_v exp(z_v), flags included
  double log_p = 0;    // log p of the row's target flag t
  double log_1mp = 0;  // log(1 - p_t)
  double f = 0;        // exp(m - lse): turns E into P = sum_{v not a flag} p_v W_v
  double log_f = -std::numeric_limits<double>::infinity();
};

// z [K]: the row's flag logits; t: its target flag (0 for rows without one). 1 - p_t is the
// mass of everything else, rest = log(e^{m} S + sum_{k != t} e^{z_k}), so log(1 - p_t) and
// log p_t come from the log-odds z_t - rest without a subtraction of probabilities.
RowStats row_stats(float m, double S, const double* z, int K, int t) {
  constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
  RowStats st;
  // lse over the streamed vocabulary; -inf when the vocabulary is flags alone.
  const double lse_x = S > 0 ? double(m) + std::log(S) : kNegInfD;
  double rest = lse_x;
  for (int k = 0; k < K; ++k) {
    if (k == t || z[k] == kNegInfD) continue;
    const double hi = std::max(rest, z[k]);
    rest = hi + std::log1p(std::exp(std::min(rest, z[k]) - hi));
  }
  if (rest == kNegInfD) {
    st.lse = z[t];
    st.log_p = 0;
    st.log_1mp = kNegInfD;
    st.f = 0;
    return st;
  }
  const double d = z[t] - rest;  // log-odds of the target flag
  st.lse = rest + softplus(d);
  st.log_p = -softplus(-d);
  st.log_1mp = -softplus(d);
  if (S > 0) {
    st.log_f = double(m) - st.lse;
    st.f = std::exp(st.log_f);
  }
  return st;
}

double dot_f64(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// The rows the streamed logits were computed from: gemm rounds activations to bf16 for bf16
// weights on the AVX-512 path (kernels/gemm.h), so the KL identity must use the same values.
inline float logit_input(float x, bool round_bf16) { return round_bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

}  // namespace

RfLossResult rf_loss(ThreadPool& pool, const float* h, int N, const float* h_ref, int Nr, int H,
                     const PackedWeight& W, const float* w_rf, const RfLossRow* rows,
                     const RfLossOptions& opt, float* dh, float* dw_rf) {
  // ---- validation
  if (N < 0 || Nr < 0 || H <= 0) throw std::invalid_argument("rf_loss: negative or zero size");
  if (H != W.K) throw std::invalid_argument("rf_loss: H (" + std::to_string(H) + ") != W.K (" + std::to_string(W.K) + ")");
  const int V = W.N;
  RfLossRowsPlan plan = rf_loss_rows_plan(N, Nr, H, V, rows, opt);  // validates, as the GPU's does
  const std::vector<int>& flags = plan.flags;
  const int K = int(flags.size());
  if (N == 0) return RfLossResult();
  if (!h || !dh || !dw_rf || !w_rf || (Nr > 0 && !h_ref)) throw std::invalid_argument("rf_loss: null pointer");
  RfLossResult res = plan.counts;
  const std::vector<int>& row_group = plan.row_group;
  const std::vector<int>& group_size = plan.group_size;

  // ---- scratch
  const int vc = chunk_choose(opt.chunk, V, H);
  const int strips = (H + kPanel - 1) / kPanel;
  const int threads = pool.size();
  // bf16 W on AVX-512: the accumulation runs on vdpbf16ps, Wt holding bf16 pairs.
#if defined(__AVX512BF16__)
  const bool pairs = W.dtype == DType::bf16;
#else
  const bool pairs = false;
#endif
  // Wt [2][strips][vc][32] f32, or [2][strips][vc / 2][32] bf16 pair words: this chunk's and
  // the next's. Strides in 4-byte units.
  const size_t strip_stride = size_t(vc) * kPanel / (pairs ? 2 : 1);
  const size_t wt_floats = size_t(strips) * strip_stride;
  AlignedFloats wt(2 * wt_floats);
  const int task_rows = task_rows_choose(N + Nr, threads);
  AlignedFloats z(size_t(threads) * task_rows * vc);    // per thread: Z / P [task_rows, vc]
  AlignedFloats e_ref(size_t(Nr) * H);
  std::vector<float> m_all(size_t(N) + Nr, kNegInf), scale_all(size_t(threads) * task_rows, 1.f);
  std::vector<double> s_all(size_t(N) + Nr, 0.0);
  res.scratch_bytes = wt.bytes() + z.bytes() + e_ref.bytes() + m_all.size() * (4 + 8) + scale_all.size() * 4;

  std::memset(dh, 0, size_t(N) * H * 4);
  if (Nr > 0) std::memset(e_ref.p, 0, e_ref.bytes());
  Stream streams[2] = {{h, dh, N, m_all.data(), s_all.data()},
                       {h_ref, e_ref.p, Nr, m_all.data() + N, s_all.data() + N}};
  const int tasks_theta = (N + task_rows - 1) / task_rows, tasks_ref = (Nr + task_rows - 1) / task_rows;
  const int row_tasks = tasks_theta + tasks_ref;
  // Inside a region every task runs gemm on its own rows single-threaded: one region per
  // chunk and tasks of task_rows rows keep both threads busy to within one small task, where
  // gemm's own split (a few tasks per thread over the chunk's panels) would not.
  std::vector<std::unique_ptr<ThreadPool>> solo(threads);
  for (auto& p : solo) p.reset(new ThreadPool(1));

  // ---- the pass over the vocabulary
  const int chunks = (V + vc - 1) / vc;
  auto chunk_panels = [&](int c, int& p0, int& n) {
    const int v0 = c * vc;
    n = std::min(vc, V - v0);
    p0 = v0 / kPanel;
  };
  // Wt pieces: strips split so the transpose of the next chunk spreads over the threads.
  const int pieces = std::min(strips, 2 * threads);
  auto transpose_piece = [&](int c, int piece) {
    int p0, n;
    chunk_panels(c, p0, n);
    float* dst = wt.p + size_t(c & 1) * wt_floats;
    const int s0 = piece * strips / pieces, s1 = (piece + 1) * strips / pieces;
    for (int s = s0; s < s1; ++s) {
#if defined(__AVX512BF16__)
      if (pairs) {
        strip_fill_pairs(W, p0, (n + kPanel - 1) / kPanel, n, s, reinterpret_cast<uint32_t*>(dst + s * strip_stride));
        continue;
      }
#endif
      strip_fill(W, p0, (n + kPanel - 1) / kPanel, s, dst + s * strip_stride);
    }
  };
  pool.parallel_for(pieces, [&](long b, long e, int) {
    for (long piece = b; piece < e; ++piece) transpose_piece(0, int(piece));
  });
  for (int c = 0; c < chunks; ++c) {
    int p0, n;
    chunk_panels(c, p0, n);
    std::vector<int> flags_local;
    for (int f : flags)
      if (f >= c * vc && f < c * vc + n) flags_local.push_back(f - c * vc);
    const PackedWeight view = view_make(W, p0, n);
    const float* wt_c = wt.p + size_t(c & 1) * wt_floats;
    // Tasks: first the next chunk's transpose pieces (into the other Wt buffer), then rows.
    const int pre = c + 1 < chunks ? pieces : 0;
    const int tasks = pre + row_tasks;
    std::atomic<int> next{0};
    pool.run([&](int tid, int) {
      float* zt = z.p + size_t(tid) * task_rows * vc;
      float* scale = scale_all.data() + size_t(tid) * task_rows;
      for (int t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
        if (t < pre) {
          transpose_piece(c + 1, t);
          continue;
        }
        const int rt = t - pre;
        const Stream& st = rt < tasks_theta ? streams[0] : streams[1];
        const int a = (rt < tasks_theta ? rt : rt - tasks_theta) * task_rows;
        const int rows_t = std::min(task_rows, st.count - a);
        RF_ISA::gemm(*solo[tid], rows_t, st.A + size_t(a) * H, H, view, nullptr, zt, vc, false);
        for (int r = 0; r < rows_t; ++r)
          scale[r] = row_softmax_update(zt + size_t(r) * vc, n, flags_local, st.m[a + r], st.S[a + r]);
        float* E = st.E + size_t(a) * H;
#if defined(__AVX512BF16__)
        if (pairs) {
          // P to bf16 pairs in place: row r's words at zt + r vc (row stride vc words).
          for (int r = 0; r < rows_t; ++r)
            row_to_bf16_pairs(zt + size_t(r) * vc, n, reinterpret_cast<uint16_t*>(zt + size_t(r) * vc));
          const uint32_t* p16 = reinterpret_cast<const uint32_t*>(zt);
          const uint32_t* wt16 = reinterpret_cast<const uint32_t*>(wt_c);
          for (int s = 0; s < strips; ++s)
            strip_acc_bf16(rows_t, (n + 1) / 2, p16, vc, wt16 + s * strip_stride, E + s * kPanel, H, scale,
                           std::min(kPanel, H - s * kPanel));
          continue;
        }
#endif
        for (int s = 0; s < strips; ++s)
          strip_acc(rows_t, n, zt, vc, wt_c + s * strip_stride, E + s * kPanel, H, scale,
                    std::min(kPanel, H - s * kPanel));
      }
    });
  }

  // ---- per-row scalars
#if defined(__AVX512F__)
  const bool round_a = W.dtype == DType::bf16;
#else
  const bool round_a = false;
#endif
  std::vector<float> w_flags_base(size_t(K) * H);  // the reference model's flag rows: W's own
  for (int k = 0; k < K; ++k) RF_ISA::packed_row(W, flags[k], w_flags_base.data() + size_t(k) * H);
  // Flag logits z [rows, K] and their log-probabilities lp [rows, K] (the target's from the
  // cancellation-free log-odds, the others as z - lse).
  std::vector<RowStats> st_theta(N), st_ref(Nr);
  std::vector<double> z_theta(size_t(N) * K), z_ref(size_t(Nr) * K), lp_theta(size_t(N) * K), lp_ref(size_t(Nr) * K);
  pool.parallel_for(long(N) + Nr, [&](long b, long e, int) {
    for (long i = b; i < e; ++i) {
      const bool trained = i < N;
      const long r = trained ? i : i - N;
      const float* x = trained ? h + size_t(r) * H : h_ref + size_t(r) * H;
      const float* w = trained ? w_rf : w_flags_base.data();
      double* z = (trained ? z_theta.data() : z_ref.data()) + size_t(r) * K;
      double* lp = (trained ? lp_theta.data() : lp_ref.data()) + size_t(r) * K;
      for (int k = 0; k < K; ++k) z[k] = dot_f64(x, w + size_t(k) * H, H);
      const int t = trained && rows[r].kind == RfLossKind::red_flag ? rows[r].flag : 0;
      RowStats& st = (trained ? st_theta : st_ref)[r];
      st = row_stats(m_all[i], s_all[i], z, K, t);
      for (int k = 0; k < K; ++k) lp[k] = k == t ? st.log_p : z[k] - st.lse;
    }
  });

  // Group products for 'any': log q_g = sum_j log(1 - p_j), and log(1 - q_g).
  std::vector<double> log_q(res.n_groups, 0.0), log_1mq(res.n_groups, 0.0);
  for (int i = 0; i < N; ++i)
    if (row_group[i] >= 0) log_q[row_group[i]] += st_theta[i].log_1mp;
  for (int g = 0; g < res.n_groups; ++g) log_1mq[g] = std::log(-std::expm1(log_q[g]));

  const double w_benign = res.n_benign_rows ? opt.alpha_benign / double(res.n_benign_rows) : 0.0;
  const double w_after = res.n_after_rows ? opt.alpha_after / double(res.n_after_rows) : 0.0;
  const double w_group = res.n_groups ? opt.alpha_rf / double(res.n_groups) : 0.0;

  // Per trained row: dh = a E_theta - b E_ref + sum_k c_k w_rf[k] and dw_rf[k] += c_k h (a, b
  // folded with f).
  std::vector<double> coef_a(N), coef_b(N), coef_c(size_t(N) * K), kl(N, 0.0);
  pool.parallel_for(N, [&](long b, long e, int) {
    for (long i = b; i < e; ++i) {
      const RfLossRow& r = rows[i];
      const RowStats& t = st_theta[i];
      double* c = coef_c.data() + size_t(i) * K;
      const double* lp = lp_theta.data() + size_t(i) * K;
      if (r.kind == RfLossKind::red_flag) {
        // dL/dz_v = k (p_v - delta_{v,f_t}) with k = w_group x
        //   any:    q/(1-q) p/(1-p)  (dL/dlog(1-p_j) = q/(1-q), dlog(1-p)/dz_v = p/(1-p) (p_v - delta))
        //   mean:   1 / n_g;   single: 1.
        // Summed in log space, so neither 1 - p nor 1 - q is ever formed by a subtraction.
        const int g = row_group[i];
        const double log_k = opt.aggregation == RfAggregation::any
                                 ? log_q[g] - t.log_1mp + t.log_p - log_1mq[g]
                                 : -std::log(opt.aggregation == RfAggregation::mean ? double(group_size[g]) : 1.0);
        coef_a[i] = w_group * std::exp(log_k + t.log_f);
        coef_b[i] = 0;
        for (int k = 0; k < K; ++k)
          c[k] = k == r.flag ? -w_group * std::exp(log_k + t.log_1mp)  // k (p_t - 1)
                             : w_group * std::exp(log_k + lp[k]);
      } else {
        const double w = r.kind == RfLossKind::benign_kl ? w_benign : w_after;
        const RowStats& q = st_ref[r.ref_row];
        const double* lq = lp_ref.data() + size_t(r.ref_row) * K;
        const double* zt = z_theta.data() + size_t(i) * K;
        const double* zq = z_ref.data() + size_t(r.ref_row) * K;
        coef_a[i] = w * t.f;
        coef_b[i] = w * q.f;
        // KL = (A'_ref - A') . P_ref + sum_k p_ref,k (z_ref,k - z_k) + lse - lse_ref
        double flag_part = 0;
        for (int k = 0; k < K; ++k) {
          const double p_r = std::exp(lq[k]);
          c[k] = w * (std::exp(lp[k]) - p_r);
          flag_part += p_r * (zq[k] - zt[k]);
        }
        const float* a = h + size_t(i) * H;
        const float* ar = h_ref + size_t(r.ref_row) * H;
        const float* er = e_ref.p + size_t(r.ref_row) * H;
        double cross = 0;
        for (int k = 0; k < H; ++k)
          cross += (double(logit_input(ar[k], round_a)) - double(logit_input(a[k], round_a))) * double(er[k]);
        kl[i] = q.f * cross + flag_part + t.lse - q.lse;
      }
    }
  });

  // ---- loss values
  double sum_benign = 0, sum_after = 0, sum_rf = 0;
  std::vector<double> group_loss(res.n_groups, 0.0);
  for (int i = 0; i < N; ++i) {
    if (rows[i].kind == RfLossKind::benign_kl) sum_benign += kl[i];
    if (rows[i].kind == RfLossKind::after_kl) sum_after += kl[i];
    if (rows[i].kind == RfLossKind::red_flag && opt.aggregation != RfAggregation::any)
      group_loss[row_group[i]] += -st_theta[i].log_p / group_size[row_group[i]];
  }
  for (int g = 0; g < res.n_groups; ++g) {
    if (opt.aggregation == RfAggregation::any) group_loss[g] = -log_1mq[g];
    sum_rf += group_loss[g];
  }
  res.benign = res.n_benign_rows ? sum_benign / res.n_benign_rows : 0.0;
  res.after = res.n_after_rows ? sum_after / res.n_after_rows : 0.0;
  res.red_flag = res.n_groups ? sum_rf / res.n_groups : 0.0;
  res.total = opt.alpha_benign * res.benign + opt.alpha_rf * res.red_flag + opt.alpha_after * res.after;

  // ---- gradients (coefficients applied in double: a = weight x exp(m - lse) may be far
  // below f32's range for a row whose p_rf is near 1, while a x E is not)
  pool.parallel_for(N, [&](long b, long e, int) {
    std::vector<double> acc(K == 1 ? 0 : H);  // several flags: the row's sum in double
    for (long i = b; i < e; ++i) {
      float* d = dh + size_t(i) * H;
      const double a = coef_a[i];
      const double* c = coef_c.data() + size_t(i) * K;
      if (K == 1) {
        const double bb = coef_b[i], c0 = c[0];
        const float* er = bb != 0 ? e_ref.p + size_t(rows[i].ref_row) * H : nullptr;
        if (er) {
#pragma omp simd
          for (int k = 0; k < H; ++k) d[k] = float(a * d[k] - bb * er[k] + c0 * w_rf[k]);
        } else {
#pragma omp simd
          for (int k = 0; k < H; ++k) d[k] = float(a * d[k] + c0 * w_rf[k]);
        }
        continue;
      }
      for (int k = 0; k < H; ++k) acc[k] = a * d[k];
      if (rows[i].kind != RfLossKind::red_flag) {
        const double bb = coef_b[i];
        const float* er = e_ref.p + size_t(rows[i].ref_row) * H;
        for (int k = 0; k < H; ++k) acc[k] -= bb * er[k];
      }
      for (int f = 0; f < K; ++f) {
        const float* w = w_rf + size_t(f) * H;
        for (int k = 0; k < H; ++k) acc[k] += c[f] * w[k];
      }
      for (int k = 0; k < H; ++k) d[k] = float(acc[k]);
    }
  });
  // dw_rf [K, H] += sum_i c_ik h_i (the flag logits use the unrounded rows), split over columns.
  pool.parallel_for(H, [&](long k0, long k1, int) {
    std::vector<double> acc(size_t(k1 - k0));
    for (int f = 0; f < K; ++f) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int i = 0; i < N; ++i) {
        const double c = coef_c[size_t(i) * K + f];
        if (c == 0) continue;
        const float* hi = h + size_t(i) * H;
        for (long k = k0; k < k1; ++k) acc[k - k0] += c * double(hi[k]);
      }
      for (long k = k0; k < k1; ++k) dw_rf[size_t(f) * H + k] += float(acc[k - k0]);
    }
  });
  return res;
}

}  // namespace RF_ISA
}  // namespace rf
