// Training GEMMs (see gemm_backward.h) on top of the packed gemm kernel of gemm.cpp.
// Compiled twice (RF_ISA=avx2 and RF_ISA=avx512); native/dispatch/gemm_backward.cpp picks one.
//
// Every product here is reduced to the one gemm() computes, C [M, N] (+)= A [M, K] . W^T with
// A row-major (unit stride along K) and W packed in panels of 32 rows n, K-major inside:
//   f32  panel = [K][32]                  (element (n, k) at k * 32 + n % 32)
//   bf16 panel = [Kp/2][32][2], Kp = K rounded up to even, the pad k zero
//                                          (element (n, k) at (k / 2) * 64 + (n % 32) * 2 + k % 2)
// pack_weight_transposed depends on this layout (gemm.cpp's top comment); test_gemm_backward
// compares its bytes with pack_weight of the transposed matrix, so a layout change shows there.
//
// The two operands are described as L [M, K] and R [N, K] (C = L . R^T), each stored either
// K-contiguous ([rows, K] row-major) or K-major ([K, rows] row-major, as B in nn and A and B
// in tn). L must reach gemm K-contiguous, so a K-major L is transposed into scratch; R is
// packed into panels, a plain copy of 32-float row pieces when it is K-major and an 8 x 8
// block transpose when it is K-contiguous.
#include "kernels/gemm_backward.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#ifndef RF_ISA
#error "RF_ISA must be defined (avx2 or avx512)"
#endif

namespace rf {
namespace RF_ISA {

namespace {

constexpr int kPanel = 32;  // rows n per packed panel (gemm.cpp's kPanel)

// Below this many multiply-adds a plain loop beats packing + the kernel's call overhead.
constexpr double kNaiveMacs = 8 * 1024;
// Moving fewer floats than this is not worth a parallel region (a few µs).
constexpr long kParallelFloats = 32 * 1024;

// Cost model for choosing C = L R^T or (C^T = R L^T, then transposed), in multiply-add units:
// the kernel does ~16 multiply-adds a cycle on Zen4 (either path); moving a float into a panel
// was measured at ~0.35 cycle (copy) and ~0.4-1.2 cycles (8 x 8 transposes). Row and column
// tiles are what the kernel computes whether valid or not (AVX-512: 8 x 32; AVX2 f32: 6 x 16).
// On the LoRA shapes the model picks the faster variant, or one within 6% of it.
#if defined(__AVX512F__)
constexpr int kRowTile = 8, kColTile = 32;
#else
constexpr int kRowTile = 6, kColTile = 16;
#endif
constexpr double kCopyCost = 6, kTransposeCost = 12;

void bytes_keep(uint8_t*) {}  // deleter of a PackedWeight viewing scratch memory
void bytes_free(uint8_t* p) { std::free(p); }

// Scratch owned by the calling thread: grown to the largest request, reused afterwards
// (training calls the same shapes every step, so it stops growing after the first).
struct Scratch {
  float* data = nullptr;
  size_t elems = 0;
  ~Scratch() { std::free(data); }
  float* reserve(size_t n) {
    if (n > elems) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64));
      elems = data ? n : 0;
      if (!data) throw std::bad_alloc();
    }
    return data;
  }
};
thread_local Scratch g_panels;  // R packed into panels
thread_local Scratch g_rows;    // L transposed to K-contiguous rows
thread_local Scratch g_result;  // C^T of the swapped product

// A matrix of logical shape [rows, K]: element (r, k) at p[r * ld + k] when k_contig,
// else at p[k * ld + r].
struct Operand {
  const float* p;
  long ld;
  bool k_contig;
};

// ---------------------------------------------------------------------------------------
// Transposes

// dst [8][ldd] (+)= the transpose of src [8][lds] (8 x 8 floats). AVX2 only, so both
// compilations share it.
inline void block8_transpose(const float* src, long lds, float* dst, long ldd, bool add) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 o[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                 _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                 _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                 _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  for (int i = 0; i < 8; ++i) {
    float* d = dst + i * ldd;
    _mm256_storeu_ps(d, add ? _mm256_add_ps(o[i], _mm256_loadu_ps(d)) : o[i]);
  }
}

// dst [c * ldd + r] (+)= src [r * lds + c] for r < rows, c in [c0, c1), in 64 x 64 tiles of
// 8 x 8 blocks. Inside a tile the blocks run along the rows of whichever side has the stride
// with more factors of two: rows 2 KB apart share few L1 sets, and walking across them
// instead of along them was measured 2-3x slower (e.g. dY [512, 576] -> [576, 512]).
void transpose_cols(const float* src, long lds, int rows, int c0, int c1, float* dst, long ldd, bool add) {
  constexpr int kTile = 64;
  const bool along_dst = __builtin_ctzl(ldd) >= __builtin_ctzl(lds);
  for (int rt = 0; rt < rows; rt += kTile) {
    const int rt_end = std::min(rows, rt + kTile);
    const int r8_end = rt + (rt_end - rt) / 8 * 8;
    for (int ct = c0; ct < c1; ct += kTile) {
      const int ct_end = std::min(c1, ct + kTile);
      const int c8_end = ct + (ct_end - ct) / 8 * 8;
      if (along_dst) {
        for (int c = ct; c < c8_end; c += 8)
          for (int r = rt; r < r8_end; r += 8) block8_transpose(src + r * lds + c, lds, dst + c * ldd + r, ldd, add);
      } else {
        for (int r = rt; r < r8_end; r += 8)
          for (int c = ct; c < c8_end; c += 8) block8_transpose(src + r * lds + c, lds, dst + c * ldd + r, ldd, add);
      }
      // Edges: columns past the last 8-block, then rows past it.
      for (int c = c8_end; c < ct_end; ++c)
        for (int r = rt; r < r8_end; ++r) dst[c * ldd + r] = (add ? dst[c * ldd + r] : 0.f) + src[r * lds + c];
      for (int r = r8_end; r < rt_end; ++r)
        for (int c = ct; c < ct_end; ++c) dst[c * ldd + r] = (add ? dst[c * ldd + r] : 0.f) + src[r * lds + c];
    }
  }
}

// dst [cols, ldd] (+)= src [rows, lds]^T, split over the pool by dst rows.
void transpose_par(ThreadPool& pool, const float* src, long lds, int rows, int cols, float* dst, long ldd,
                   bool add) {
  const int blocks = (cols + 7) / 8;
  if (pool.size() == 1 || long(rows) * cols < kParallelFloats || blocks < 2) {
    transpose_cols(src, lds, rows, 0, cols, dst, ldd, add);
    return;
  }
  pool.parallel_for(blocks, [&](long b, long e, int) {
    transpose_cols(src, lds, rows, int(b * 8), int(std::min<long>(cols, e * 8)), dst, ldd, add);
  });
}

// ---------------------------------------------------------------------------------------
// Packing R [N, K] into f32 panels

// Panel p: [K][32] with element (k, j) = R(32p + j, k), zero where 32p + j >= N.
void panel_fill(const Operand& R, int N, int K, int p, float* panel) {
  const int n0 = p * kPanel, valid = std::min(kPanel, N - n0);
  if (R.k_contig) {
    transpose_cols(R.p + n0 * R.ld, R.ld, valid, 0, K, panel, kPanel, false);
    if (valid < kPanel)
      for (int k = 0; k < K; ++k) std::memset(panel + size_t(k) * kPanel + valid, 0, (kPanel - valid) * 4);
  } else if (valid == kPanel) {
    // 32 floats a row. Explicit vector moves: GCC inlines a memcpy here as `rep movsq`,
    // whose start-up cost made this copy 10x slower.
    for (int k = 0; k < K; ++k) {
      const float* s = R.p + k * R.ld + n0;
      float* d = panel + size_t(k) * kPanel;
      for (int i = 0; i < kPanel; i += 8) _mm256_store_ps(d + i, _mm256_loadu_ps(s + i));
    }
  } else {
    for (int k = 0; k < K; ++k) {
      const float* s = R.p + k * R.ld + n0;
      float* d = panel + size_t(k) * kPanel;
      for (int i = 0; i < kPanel; ++i) d[i] = i < valid ? s[i] : 0.f;
    }
  }
}

// W: a PackedWeight (f32) viewing thread scratch that holds R packed.
void panels_pack(ThreadPool& pool, const Operand& R, int N, int K, PackedWeight& W) {
  const int panels = (N + kPanel - 1) / kPanel;
  const size_t pelems = size_t(K) * kPanel;
  float* mem = g_panels.reserve(panels * pelems);
  if (pool.size() == 1 || long(N) * K < kParallelFloats || panels < 2) {
    for (int p = 0; p < panels; ++p) panel_fill(R, N, K, p, mem + p * pelems);
  } else {
    pool.parallel_for(panels, [&](long b, long e, int) {
      for (long p = b; p < e; ++p) panel_fill(R, N, K, int(p), mem + p * pelems);
    });
  }
  W.N = N;
  W.K = K;
  W.dtype = DType::f32;
  W.bytes = panels * pelems * 4;
  W.data = std::unique_ptr<uint8_t[], void (*)(uint8_t*)>(reinterpret_cast<uint8_t*>(mem), bytes_keep);
}

// ---------------------------------------------------------------------------------------
// Products

// C [M, N] (+)= L . R^T through gemm(): L rows K-contiguous (transposed into scratch if
// needed), R packed.
void product_packed(ThreadPool& pool, int M, int N, int K, const Operand& L, const Operand& R, float* C,
                    long ldc, bool accumulate) {
  const float* A = L.p;
  long lda = L.ld;
  if (!L.k_contig) {
    float* rows = g_rows.reserve(size_t(M) * K);
    transpose_par(pool, L.p, L.ld, K, M, rows, K, false);
    A = rows;
    lda = K;
  }
  PackedWeight W;
  panels_pack(pool, R, N, K, W);
  rf::RF_ISA::gemm(pool, M, A, lda, W, nullptr, C, ldc, accumulate);
}

double round_up(int x, int to) { return double((x + to - 1) / to * to); }

double product_cost(int M, int N, int K, const Operand& L, const Operand& R) {
  const double compute = round_up(M, kRowTile) * round_up(N, kColTile) * K;
  const double pack_r = (R.k_contig ? kTransposeCost : kCopyCost) * double(N) * K;
  const double rows_l = L.k_contig ? 0.0 : kTransposeCost * double(M) * K;
  return compute + pack_r + rows_l;
}

// Plain loops for tiny products (a few thousand multiply-adds).
void product_naive(int M, int N, int K, const Operand& L, const Operand& R, float* C, long ldc, bool accumulate) {
  const long lm = L.k_contig ? L.ld : 1, lk = L.k_contig ? 1 : L.ld;
  const long rn = R.k_contig ? R.ld : 1, rk = R.k_contig ? 1 : R.ld;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += L.p[m * lm + k * lk] * R.p[n * rn + k * rk];
      C[m * ldc + n] = accumulate ? C[m * ldc + n] + s : s;
    }
}

// C [M, N] (+)= L [M, K] . R [N, K]^T.
void product(ThreadPool& pool, int M, int N, int K, const Operand& L, const Operand& R, float* C, long ldc,
             bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int m = 0; m < M; ++m) std::memset(C + m * ldc, 0, size_t(N) * 4);
    return;
  }
  if (double(M) * N * K <= kNaiveMacs) {
    product_naive(M, N, K, L, R, C, ldc, accumulate);
    return;
  }
  // A thin N fills a fraction of each 32-column panel; computing C^T = R . L^T turns it into
  // a thin M instead, which the kernel's row tiles (8 or 6) waste far less of. E.g. LoRA's
  // X [512, 576] . A^T [576, 8]: 164 us direct, 73 us swapped (1 thread, AVX-512).
  const double direct = product_cost(M, N, K, L, R);
  const double swapped = product_cost(N, M, K, R, L) + kTransposeCost * double(M) * N;
  if (direct <= swapped) {
    product_packed(pool, M, N, K, L, R, C, ldc, accumulate);
    return;
  }
  float* T = g_result.reserve(size_t(N) * M);  // C^T [N, M]
  product_packed(pool, N, M, K, R, L, T, M, false);
  transpose_par(pool, T, M, N, M, C, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------
// Transposing a packed weight

// Offset of element (n, k) of a packed W inside its panel (n % 32 and k only).
inline size_t offset_f32(int j, int k) { return size_t(k) * kPanel + j; }
inline size_t offset_bf16(int j, int k) { return size_t(k >> 1) * (2 * kPanel) + 2 * j + (k & 1); }

}  // namespace

// =========================================================================================

void pack_weight_transposed(PackedWeight& dst, const PackedWeight& src) {
  const int N = src.N, K = src.K;  // src W [N, K]; dst W^T [K, N]
  if (N <= 0 || K <= 0 || !src.data) throw std::runtime_error("pack_weight_transposed: empty source");
  const bool bf16 = src.dtype == DType::bf16;
  const int src_kp = bf16 ? K + (K & 1) : K;  // rows per src panel (k, including the bf16 pad)
  const int dst_kp = bf16 ? N + (N & 1) : N;  // rows per dst panel (n)
  const int src_panels = (N + kPanel - 1) / kPanel, dst_panels = (K + kPanel - 1) / kPanel;
  const size_t src_pelems = size_t(src_kp) * kPanel, dst_pelems = size_t(dst_kp) * kPanel;
  const size_t esize = bf16 ? 2 : 4;
  const size_t bytes = size_t(dst_panels) * dst_pelems * esize;
  uint8_t* mem = static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
  if (!mem) throw std::bad_alloc();
  dst.data = std::unique_ptr<uint8_t[], void (*)(uint8_t*)>(mem, bytes_free);
  dst.N = K;
  dst.K = N;
  dst.dtype = src.dtype;
  dst.bytes = bytes;

  // dst element (k, n) = src element (n, k). Walk 32 x 32 blocks: src panel sp holds rows
  // n in [32 sp, 32 sp + 32) and dst panel dp rows k in [32 dp, 32 dp + 32); inside a block
  // both sides are one contiguous piece of a panel (4 KB f32, 2 KB bf16), so it stays in L1.
  // Pads come out right by construction: src columns n >= N are zero in src (they give the
  // bf16 dst's pad row n = N when N is odd), dst columns k >= K are written as zero.
  for (int dp = 0; dp < dst_panels; ++dp) {
    const int k0 = dp * kPanel, k_valid = std::min(kPanel, K - k0);
    for (int sp = 0; sp < src_panels; ++sp) {
      const int n0 = sp * kPanel, n_rows = std::min(kPanel, dst_kp - n0);  // dst rows in this block
      if (!bf16) {
        const float* s = reinterpret_cast<const float*>(src.data.get()) + sp * src_pelems;
        float* d = reinterpret_cast<float*>(mem) + dp * dst_pelems;
        if (n_rows == kPanel && k_valid == kPanel) {
          // Full block: s rows k0..k0+31 ([k][32]) -> d rows n0..n0+31 ([n][32]).
          for (int i = 0; i < kPanel; i += 8)
            for (int j = 0; j < kPanel; j += 8)
              block8_transpose(s + offset_f32(j, k0 + i), kPanel, d + offset_f32(i, n0 + j), kPanel, false);
          continue;
        }
        for (int jn = 0; jn < n_rows; ++jn)
          for (int jk = 0; jk < kPanel; ++jk)
            d[offset_f32(jk, n0 + jn)] = jk < k_valid ? s[offset_f32(jn, k0 + jk)] : 0.f;
      } else {
        const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data.get()) + sp * src_pelems;
        uint16_t* d = reinterpret_cast<uint16_t*>(mem) + dp * dst_pelems;
        for (int jn = 0; jn < n_rows; ++jn)
          for (int jk = 0; jk < kPanel; ++jk)
            d[offset_bf16(jk, n0 + jn)] = jk < k_valid ? s[offset_bf16(jn, k0 + jk)] : uint16_t(0);
      }
    }
  }
}

void gemm_nt_f32(ThreadPool& pool, int M, int N, int K, const float* A, long lda, const float* B, long ldb,
                 float* C, long ldc, bool accumulate) {
  product(pool, M, N, K, Operand{A, lda, true}, Operand{B, ldb, true}, C, ldc, accumulate);
}

void gemm_nn_f32(ThreadPool& pool, int M, int N, int K, const float* A, long lda, const float* B, long ldb,
                 float* C, long ldc, bool accumulate) {
  product(pool, M, N, K, Operand{A, lda, true}, Operand{B, ldb, false}, C, ldc, accumulate);
}

void gemm_tn_f32(ThreadPool& pool, int M, int N, int K, const float* A, long lda, const float* B, long ldb,
                 float* C, long ldc, bool accumulate) {
  product(pool, M, N, K, Operand{A, lda, false}, Operand{B, ldb, false}, C, ldc, accumulate);
}

}  // namespace RF_ISA
}  // namespace rf
