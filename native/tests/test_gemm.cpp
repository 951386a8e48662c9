// gemm / pack_weight / packed_row against a naive double-precision reference.
// Run with REDFLAG_ISA=avx2 as well (ctest does) so both kernel paths are covered.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/dtype.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& name, const std::string& detail) {
  std::printf("%s %s %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  (ok ? g_passed : g_failed)++;
}

const char* src_name(rf::SrcType t) {
  return t == rf::SrcType::f32 ? "f32" : t == rf::SrcType::f16 ? "f16" : "bf16";
}

// A weight source in its file type plus the float value of every element.
struct Source {
  std::vector<uint8_t> bytes;
  std::vector<float> value;  // W as float, in the source's own layout
};

// Random elements: f16/bf16 as random bit patterns with exponents kept in [2^-6, 2^1)
// (no subnormals, which AVX-512 BF16 flushes), f32 as uniform values.
Source source_make(rf::SrcType t, size_t n, std::mt19937& rng) {
  Source s;
  s.value.resize(n);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::uniform_int_distribution<int> bits(0, 0xffff);
  if (t == rf::SrcType::f32) {
    s.bytes.resize(n * 4);
    for (size_t i = 0; i < n; ++i) s.value[i] = uni(rng);
    std::memcpy(s.bytes.data(), s.value.data(), n * 4);
    return s;
  }
  s.bytes.resize(n * 2);
  uint16_t* h = reinterpret_cast<uint16_t*>(s.bytes.data());
  for (size_t i = 0; i < n; ++i) {
    int r = bits(rng);
    uint16_t sign = uint16_t(r & 1) << 15;
    if (t == rf::SrcType::f16) {
      uint16_t exp = uint16_t(9 + (r >> 1) % 7);  // 2^-6 .. 2^0
      h[i] = uint16_t(sign | exp << 10 | (bits(rng) & 0x3ff));
      s.value[i] = rf::f16_to_f32(h[i]);
    } else {
      uint16_t exp = uint16_t(121 + (r >> 1) % 7);
      h[i] = uint16_t(sign | exp << 7 | (bits(rng) & 0x7f));
      s.value[i] = rf::bf16_to_f32(h[i]);
    }
  }
  return s;
}

float bf16_round(float x) { return rf::bf16_to_f32(rf::f32_to_bf16(x)); }

struct Case {
  int M, N, K;
  rf::SrcType src = rf::SrcType::f32;
  rf::DType dtype = rf::DType::f32;
  bool kn = false, bias = false, accumulate = false;
  int lda_pad = 0, ldc_pad = 0;
  int threads = 1;
};

std::string case_name(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "M=%d N=%d K=%d src=%s dtype=%s%s%s%s lda+%d ldc+%d t=%d", c.M, c.N, c.K,
                src_name(c.src), c.dtype == rf::DType::f32 ? "f32" : "bf16", c.kn ? " kn" : "",
                c.bias ? " bias" : "", c.accumulate ? " acc" : "", c.lda_pad, c.ldc_pad, c.threads);
  return buf;
}

void case_run(const Case& c, rf::ThreadPool& pool, std::mt19937& rng) {
  const bool avx512 = rf::active_isa() == rf::Isa::avx512;
  const int M = c.M, N = c.N, K = c.K;
  const long lda = K + c.lda_pad, ldc = N + c.ldc_pad;
  Source src = source_make(c.src, size_t(N) * K, rng);
  // w[n][k]: the weight the kernel should use (bf16-rounded when packed as bf16).
  std::vector<float> w(size_t(N) * K);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      float v = c.kn ? src.value[size_t(k) * N + n] : src.value[size_t(n) * K + k];
      w[size_t(n) * K + k] = c.dtype == rf::DType::bf16 ? bf16_round(v) : v;
    }
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<float> A(size_t(M) * lda), bias(N), C(size_t(M) * ldc);
  for (auto& x : A) x = uni(rng);
  for (auto& x : bias) x = uni(rng);
  for (auto& x : C) x = uni(rng);
  const std::vector<float> C0 = C;

  rf::PackedWeight W;
  rf::pack_weight(W, src.bytes.data(), c.src, N, K, c.kn, c.dtype);
  rf::gemm(pool, M, A.data(), lda, W, c.bias ? bias.data() : nullptr, C.data(), ldc, c.accumulate);

  // Reference in double. The AVX-512 bf16 kernel rounds activations to bf16 (RNE) too.
  const bool round_a = c.dtype == rf::DType::bf16 && avx512;
  double max_err = 0, err2 = 0, ref2 = 0, max_a = 0, max_w = 0, max_c0 = 0;
  bool pad_ok = true;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) {
        float a = A[size_t(m) * lda + k];
        s += double(round_a ? bf16_round(a) : a) * w[size_t(n) * K + k];
      }
      double base = (c.bias ? bias[n] : 0.0) + (c.accumulate ? C0[size_t(m) * ldc + n] : 0.0);
      double ref = s + base;
      double got = C[size_t(m) * ldc + n];
      double e = std::fabs(got - ref);
      if (!(e <= max_err)) max_err = std::isnan(e) ? INFINITY : e;
      err2 += e * e;
      ref2 += ref * ref;
      max_c0 = std::fmax(max_c0, std::fabs(base));
    }
    for (long j = N; j < ldc; ++j)  // the ldc padding must be untouched
      if (C[size_t(m) * ldc + j] != C0[size_t(m) * ldc + j]) pad_ok = false;
  }
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) max_a = std::fmax(max_a, std::fabs(A[size_t(m) * lda + k]));
  for (float x : w) max_w = std::fmax(max_w, std::fabs(x));

  // Tolerances. Inputs are exactly what the kernel multiplies (rounded as it rounds), so
  // the only error is f32 accumulation, in a different order than the reference:
  //  - per element, rounding errors of a K-term sum grow like sqrt(K) ulps of the running
  //    sum (|sum| <~ sqrt(K) max|a||w| for random signs); 1e-5 sqrt(K) max|a||w| leaves a
  //    wide margin over eps_f32 = 6e-8 while catching any wrong term (>= ~1e-2 |a||w|);
  //    the bias/C addition adds one rounding of the base value;
  //  - relative L2 over the whole matrix <= 1e-5 (f32 and bf16 alike, both accumulate in f32).
  double tol_abs = 1e-5 * std::sqrt(double(K)) * max_a * max_w + 1e-6 * max_c0 + 1e-30;
  double rel_l2 = std::sqrt(err2 / (ref2 > 0 ? ref2 : 1));
  bool ok = max_err <= tol_abs && rel_l2 <= 1e-5 && pad_ok;

  // packed_row must return the stored weight row exactly.
  std::vector<float> row(K);
  bool rows_ok = true;
  for (int n : {0, N / 2, N - 1}) {
    rf::packed_row(W, n, row.data());
    if (std::memcmp(row.data(), &w[size_t(n) * K], size_t(K) * 4) != 0) rows_ok = false;
  }
  char detail[160];
  std::snprintf(detail, sizeof detail, "max_err=%.3g (tol %.3g) rel_l2=%.3g%s%s", max_err, tol_abs, rel_l2,
                pad_ok ? "" : " LDC-PAD-CLOBBERED", rows_ok ? "" : " PACKED_ROW-MISMATCH");
  report(ok && rows_ok, case_name(c), detail);
}

// Packing [K, N] must give the same bytes as packing the transposed [N, K] matrix.
void kn_layout_check(std::mt19937& rng) {
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
    const int N = 45, K = 37;
    Source kn = source_make(rf::SrcType::f32, size_t(N) * K, rng);
    std::vector<float> nk(size_t(N) * K);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) nk[size_t(n) * K + k] = kn.value[size_t(k) * N + n];
    rf::PackedWeight a, b;
    rf::pack_weight(a, kn.bytes.data(), rf::SrcType::f32, N, K, true, dt);
    rf::pack_weight(b, nk.data(), rf::SrcType::f32, N, K, false, dt);
    bool ok = a.bytes == b.bytes && std::memcmp(a.data.get(), b.data.get(), a.bytes) == 0;
    report(ok, std::string("pack kn == pack nk transposed dtype=") + (dt == rf::DType::f32 ? "f32" : "bf16"),
           "bytes=" + std::to_string(a.bytes));
  }
}

std::vector<Case> cases_build() {
  std::vector<Case> cases;
  // (M, N, K) covering tails of the 32-column panels, the row tiles (6/8 rows, 4 for AVX2
  // bf16; 1-2 row whole-panel tiles), odd K (bf16 pair padding), M blocks, K blocks.
  const int shapes[][3] = {
      {1, 1, 1},     {1, 5, 2},      {2, 31, 3},     {3, 32, 17},    {5, 33, 64},     {7, 63, 255},
      {8, 100, 576}, {13, 576, 1000}, {64, 1000, 17}, {100, 576, 576}, {257, 100, 255}, {1, 1000, 576},
      {1, 576, 1000}, {64, 32, 1},    {13, 31, 1000}, {257, 33, 64},  {100, 1, 3},     {5, 1000, 1},
      {2, 63, 577},  {64, 576, 1000}, {257, 5, 1000}, {3, 1000, 255}, {7, 33, 1024},   {100, 63, 2},
      // K blocking starts above K = 1536 (f32) / 3072 (bf16) weights; odd K across blocks.
      {33, 70, 1601}, {9, 40, 3101},  {70, 33, 3300}, {1, 100, 4097},
  };
  const rf::SrcType srcs[] = {rf::SrcType::f32, rf::SrcType::f16, rf::SrcType::bf16};
  int i = 0;
  for (auto& s : shapes) {
    for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
      for (int threads : {1, 2}) {
        Case c;
        c.M = s[0];
        c.N = s[1];
        c.K = s[2];
        c.dtype = dt;
        c.threads = threads;
        // Rotate the other options so each appears with many shapes.
        c.src = srcs[i % 3];
        c.kn = (i / 3) % 2 == 1;
        c.bias = (i % 4) < 2;
        c.accumulate = (i % 5) >= 3;
        c.lda_pad = (i % 7 == 2) ? 3 : (i % 7 == 5) ? 16 : 0;
        c.ldc_pad = (i % 6 == 1) ? 5 : (i % 6 == 4) ? 32 : 0;
        cases.push_back(c);
        ++i;
      }
    }
  }
  // Every option combination on one awkward shape.
  for (rf::SrcType st : srcs)
    for (rf::DType dt : {rf::DType::f32, rf::DType::bf16})
      for (int flags = 0; flags < 8; ++flags) {
        Case c;
        c.M = 11;
        c.N = 70;
        c.K = 133;
        c.src = st;
        c.dtype = dt;
        c.kn = flags & 1;
        c.bias = flags & 2;
        c.accumulate = flags & 4;
        c.lda_pad = 7;
        c.ldc_pad = 9;
        c.threads = 2;
        cases.push_back(c);
      }
  return cases;
}

}  // namespace

int main() {
  std::printf("isa: %s\n", rf::isa_name(rf::active_isa()));
  std::mt19937 rng(12345);
  rf::ThreadPool pool1(1), pool2(2);
  for (const Case& c : cases_build()) case_run(c, c.threads == 1 ? pool1 : pool2, rng);
  kn_layout_check(rng);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
