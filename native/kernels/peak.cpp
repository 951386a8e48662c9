// Ceiling measurements (see peak.h). Compiled per instruction set like gemm.cpp.
#include "kernels/peak.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifndef RF_ISA
#error "RF_ISA must be defined (avx2 or avx512)"
#endif

namespace rf {
namespace RF_ISA {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Keeps a value alive so the loops producing it are not removed.
volatile float g_sink;

// 12 independent accumulators: covers FMA latency (4 cycles) x throughput (2 ymm or 1 zmm
// per cycle on Zen4) with room to spare; each chain is acc = acc * x + y.
constexpr int kChains = 12;
constexpr long kItersPerCheck = 4096;

#if defined(__AVX512F__)
using VecF = __m512;
inline VecF vset1(float x) { return _mm512_set1_ps(x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
// (Not _mm512_reduce_add_ps: GCC 12 warns about its _mm256_undefined_pd.)
inline float vsum(VecF a) {
  float t[16];
  _mm512_storeu_ps(t, a);
  float s = 0;
  for (float x : t) s += x;
  return s;
}
constexpr int kLanes = 16;
#else
using VecF = __m256;
inline VecF vset1(float x) { return _mm256_set1_ps(x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline float vsum(VecF a) {
  float t[8];
  _mm256_storeu_ps(t, a);
  float s = 0;
  for (float x : t) s += x;
  return s;
}
constexpr int kLanes = 8;
#endif

// Runs FMA chains for about `seconds`; returns FLOP done.
double fma_loop_f32(double seconds) {
  VecF acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = vset1(float(i) * 1e-3f);
  const VecF x = vset1(0.999999f), y = vset1(1e-6f);
  long iters = 0;
  auto t0 = Clock::now();
  do {
    for (long i = 0; i < kItersPerCheck; ++i) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = vfma(acc[c], x, y);
    }
    iters += kItersPerCheck;
  } while (seconds_since(t0) < seconds);
  VecF s = acc[0];
  for (int c = 1; c < kChains; ++c) s = vadd(s, acc[c]);
  g_sink = vsum(s);
  return double(iters) * kChains * kLanes * 2;
}

#if defined(__AVX512F__)
// vdpbf16ps chains: each adds 16 lanes x 2 bf16 products, 64 FLOP.
double fma_loop_bf16(double seconds) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(3e-3f), _mm512_set1_ps(1e-3f));
  long iters = 0;
  auto t0 = Clock::now();
  do {
    for (long i = 0; i < kItersPerCheck; ++i) {
#pragma GCC unroll 16
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    iters += kItersPerCheck;
  } while (seconds_since(t0) < seconds);
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  g_sink = vsum(s);
  return double(iters) * kChains * 64;
}
#endif

// [begin, end) of n elements for thread t of nt, rounded to whole cache lines (16 floats).
void part_bounds(size_t n, int t, int nt, size_t& begin, size_t& end) {
  size_t lines = n / 16;
  begin = lines * t / nt * 16;
  end = (t + 1 == nt) ? n : lines * (t + 1) / nt * 16;
}

// Plain stores, as STREAM's copy: the destination lines are read for ownership first, so
// the bytes counted (read + write) are 2/3 of the bus traffic. This is the figure PEERS.md
// calls "memory copy"; non-temporal stores would report ~1.5x more.
void copy_part(float* dst, const float* src, size_t n) {
  size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 64 <= n; i += 64) {
    __m512 a = _mm512_load_ps(src + i), b = _mm512_load_ps(src + i + 16);
    __m512 c = _mm512_load_ps(src + i + 32), d = _mm512_load_ps(src + i + 48);
    _mm512_store_ps(dst + i, a);
    _mm512_store_ps(dst + i + 16, b);
    _mm512_store_ps(dst + i + 32, c);
    _mm512_store_ps(dst + i + 48, d);
  }
#else
  for (; i + 32 <= n; i += 32) {
    __m256 a = _mm256_load_ps(src + i), b = _mm256_load_ps(src + i + 8);
    __m256 c = _mm256_load_ps(src + i + 16), d = _mm256_load_ps(src + i + 24);
    _mm256_store_ps(dst + i, a);
    _mm256_store_ps(dst + i + 8, b);
    _mm256_store_ps(dst + i + 16, c);
    _mm256_store_ps(dst + i + 24, d);
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

float read_part(const float* src, size_t n) {
  constexpr int kAcc = 8;  // independent adds keep enough loads in flight
  VecF acc[kAcc];
  for (auto& a : acc) a = vset1(0.f);
  size_t i = 0;
  for (; i + kAcc * kLanes <= n; i += kAcc * kLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kAcc; ++j) {
#if defined(__AVX512F__)
      acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(src + i + j * kLanes));
#else
      acc[j] = _mm256_add_ps(acc[j], _mm256_load_ps(src + i + j * kLanes));
#endif
    }
  }
  for (int j = 1; j < kAcc; ++j) acc[0] = vadd(acc[0], acc[j]);
  float s = vsum(acc[0]);
  for (; i < n; ++i) s += src[i];
  return s;
}

}  // namespace

double fma_peak_gflops(ThreadPool& pool, bool bf16, double seconds) {
  // The AVX2 path has no bf16 dot-product instruction: its bf16 kernels widen to f32 and run
  // f32 FMAs, whose peak is therefore theirs too (below, the f32 loop either way).
  (void)bf16;
  std::vector<double> rate(size_t(pool.size()), 0.0);
  pool.run([&](int t, int) {
    auto t0 = Clock::now();
#if defined(__AVX512F__)
    double flop = bf16 ? fma_loop_bf16(seconds) : fma_loop_f32(seconds);
#else
    double flop = fma_loop_f32(seconds);
#endif
    rate[size_t(t)] = flop / seconds_since(t0);
  });
  double total = 0;
  for (double r : rate) total += r;
  return total * 1e-9;
}

double mem_bandwidth_gbps(ThreadPool& pool, size_t bytes_per_array, bool copy) {
  const size_t n = std::max<size_t>(bytes_per_array / 4, 64);
  const size_t bytes = (n * 4 + 63) / 64 * 64;
  float* a = static_cast<float*>(std::aligned_alloc(64, bytes));
  float* b = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!a || !b) {
    std::free(a);
    std::free(b);
    return 0.0;
  }
  // First touch by the thread that streams the part later (page placement).
  pool.run([&](int t, int nt) {
    size_t lo, hi;
    part_bounds(n, t, nt, lo, hi);
    for (size_t i = lo; i < hi; ++i) a[i] = float(i & 1023);
    std::memset(b + lo, 0, (hi - lo) * 4);
  });
  std::vector<float> sums(size_t(pool.size()));
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {
    auto t0 = Clock::now();
    pool.run([&](int t, int nt) {
      size_t lo, hi;
      part_bounds(n, t, nt, lo, hi);
      if (copy)
        copy_part(b + lo, a + lo, hi - lo);
      else
        sums[size_t(t)] = read_part(a + lo, hi - lo);
    });
    double s = seconds_since(t0);
    double moved = double(n) * 4 * (copy ? 2 : 1);
    if (rep > 0) best = std::max(best, moved / s * 1e-9);  // rep 0 is a warm-up
  }
  g_sink = sums[0] + b[n / 2];
  std::free(a);
  std::free(b);
  return best;
}

}  // namespace RF_ISA
}  // namespace rf
