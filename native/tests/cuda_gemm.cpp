// The cuBLASLt products (native/cuda/gemm.h) against a double-precision naive reference, on a
// GPU machine where cuBLASLt links; elsewhere CMake only compiles this file, and without a
// device it says so and exits 0. scripts/cuda-emulate.sh runs it on the CPU over an emulated
// cuBLASLt (native/tests/emulate/run_gemm.cpp: all but the timings, a smaller shapes grid).
//
// Products y [M, N] = x [M, K] . W^T (+ bias) (+ beta * y) for M in {1, 7, 64, 333}, N in
// {1, 63, 257, 4096}, K in {64, 80, 1000} (every combination), each with and without a bias and
// with beta 0 (y starts as NaN: it must not be read), beta 1 (y starts random) and beta 1 with
// c apart from y (y starts as NaN, c random and left unchanged), for f32 and for bf16 inputs; then views into buffers (pointers 4 and 16 bytes aligned, a bias only 4-byte
// aligned, which goes to the bias-add kernel), an odd K = 33, K = 0, the pair of types that
// must throw, that a repeated shape reuses its plan, matmul_nn and matmul_tn (the backward's
// products: y = x w and y = alpha x^T w), matmul_bf16 (a bf16 y: within half an ulp of the sum),
// and the f32 -> bf16 conversion bit for bit
// against the CPU's rf::f32_to_bf16 (ties, overflow to inf, NaN, subnormals, random patterns).
// Timings of 8192^3 (bf16 and f32) and of decode-sized products are printed as information.
//
// Error measure: ||got - want|| / S, with want = sum_k x w + bias + beta y0 in double, and S^2 =
// sum over elements of (sum_k (x w)^2 + bias^2 + (beta y0)^2), the sum of squares of the terms
// added. For these zero-mean random inputs S equals ||want|| in expectation (the relative L2
// error), but unlike ||want|| it cannot be made arbitrarily small by chance cancellation, which
// a single-element output (M = N = 1) would otherwise risk.
// f32 (CUBLAS_COMPUTE_32F: f32 products, f32 sums, no TF32): summing K terms in f32 leaves a
// relative error near 2^-24 * sqrt(K / 2) * 0.6, about 5e-7 for K = 1000 summed in one chain
// (less when cuBLASLt splits K). Over all f32 cases pooled the error must be <= 1e-6; per case
// <= max(1e-6, 2 * 2^-24 * sqrt(K)) (3.8e-6 at K = 1000), which leaves room for one unlucky
// element of a 1 x 1 output. TF32 (10-bit mantissa) would show 1e-4 or more, so both bounds tell
// it apart.
// bf16: the reference multiplies the same bf16-rounded inputs (the rounding is not the error
// measured); the products of two bf16 values are exact in f32 and the tensor cores sum them in
// f32, with truncation inside each MMA step: expected about 1e-6..4e-6 at K = 1000; per case
// <= 1e-5.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/threadpool.h"
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "tests/check.h"

using rf::DType;
using rf::test::check;

namespace {

std::mt19937 rng(8191);

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device allocation that frees itself.
struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { cuda_ok(cudaMalloc(&p, std::max<size_t>(bytes, 1)), "cudaMalloc"); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  template <class T>
  T* at(size_t offset_elems = 0) {
    return static_cast<T*>(p) + offset_elems;
  }
};

template <class T>
void upload(T* dst, const std::vector<T>& v) {
  cuda_ok(cudaMemcpy(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

template <class T>
std::vector<T> download(const T* src, size_t n) {
  std::vector<T> v(n);
  cuda_ok(cudaMemcpy(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  return v;
}

std::vector<float> randn(size_t n, float sd) {
  std::normal_distribution<float> d(0.f, sd);
  std::vector<float> v(n);
  for (auto& f : v) f = d(rng);
  return v;
}

float bf16_round(float f) { return rf::bf16_to_f32(rf::f32_to_bf16(f)); }

std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = rf::f32_to_bf16(v[i]);
  return b;
}

// An operand in the product's type: f32 as is, bf16 rounded to nearest even.
void upload_as(Dev& dst, const std::vector<float>& v, DType type) {
  if (type == DType::bf16) upload(dst.at<uint16_t>(), to_bf16_bits(v));
  else upload(dst.at<float>(), v);
}

rf::ThreadPool& pool() {
  static rf::ThreadPool p(int(std::max(1u, std::min(32u, std::thread::hardware_concurrency()))));
  return p;
}

// prod [M, N] = sum_k x w and sq [M, N] = sum_k (x w)^2, in double.
struct Reference {
  std::vector<double> prod, sq;
};

Reference reference(const std::vector<float>& x, const std::vector<float>& w, int M, int N, int K) {
  Reference r;
  r.prod.assign(size_t(M) * N, 0.0);
  r.sq.assign(size_t(M) * N, 0.0);
  pool().parallel_for(long(M) * N, [&](long begin, long end, int) {
    for (long i = begin; i < end; ++i) {
      const float* xr = x.data() + size_t(i / N) * K;
      const float* wr = w.data() + size_t(i % N) * K;
      double s = 0, q = 0;
      for (int k = 0; k < K; ++k) {
        const double p = double(xr[k]) * double(wr[k]);
        s += p;
        q += p * p;
      }
      r.prod[size_t(i)] = s;
      r.sq[size_t(i)] = q;
    }
  });
  return r;
}

// Squared error and squared scale of one result (see the top of the file).
struct Error {
  double err2 = 0, scale2 = 0;
  double rel() const { return std::sqrt(err2 / (scale2 > 0 ? scale2 : 1e-300)); }
  void add(const Error& e) {
    err2 += e.err2;
    scale2 += e.scale2;
  }
};

Error measure(const std::vector<float>& got, const Reference& ref, const float* bias, const std::vector<float>& y0, float beta,
              int M, int N) {
  Error e;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const size_t i = size_t(m) * N + n;
      double want = ref.prod[i], scale2 = ref.sq[i];
      if (bias) want += bias[n], scale2 += double(bias[n]) * bias[n];
      if (beta != 0.f) {
        const double b = double(beta) * y0[i];
        want += b, scale2 += b * b;
      }
      const double d = double(got[i]) - want;
      e.err2 += std::isfinite(got[i]) ? d * d : std::numeric_limits<double>::infinity();
      e.scale2 += scale2;
    }
  return e;
}

double f32_case_tol(int K) { return std::max(1e-6, 2.0 * std::ldexp(1.0, -24) * std::sqrt(double(K))); }
constexpr double kF32Pooled = 1e-6, kBf16Tol = 1e-5;

struct Tally {
  Error pooled;
  double worst = 0;
  std::string worst_case;
  int cases = 0;
};
Tally g_f32, g_bf16;

std::string case_name(DType t, int M, int N, int K, bool bias, float beta, const char* extra = "") {
  return std::string(t == DType::bf16 ? "bf16" : "f32") + " M=" + std::to_string(M) + " N=" + std::to_string(N) +
         " K=" + std::to_string(K) + (bias ? " +bias" : "") + (beta != 0.f ? " beta=1" : " beta=0") + extra;
}

// One shape and type: x, W, bias, y0 drawn once; the four (bias, beta) variants against one
// reference. offsets (in elements) place x, W, y, bias inside larger buffers (views).
struct Offsets {
  size_t x = 0, w = 0, y = 0, bias = 0;
};

void run_shape(rf::cuda::GemmContext& ctx, DType type, int M, int N, int K, Offsets off = {}, const char* extra = "") {
  std::vector<float> x = randn(size_t(M) * K, 1.f), w = randn(size_t(N) * K, 1.f / std::sqrt(float(std::max(K, 1))));
  const std::vector<float> bias = randn(N, 1.f), y0 = randn(size_t(M) * N, 1.f);
  if (type == DType::bf16) {
    for (auto& v : x) v = bf16_round(v);
    for (auto& v : w) v = bf16_round(v);
  }
  const Reference ref = reference(x, w, M, N, K);

  const size_t esz = type == DType::bf16 ? 2 : 4;
  Dev dx_f32(size_t(M) * K * 4 + 64), dx((size_t(M) * K + off.x) * esz + 64), dw((size_t(N) * K + off.w) * esz + 64),
      dy((size_t(M) * N + off.y) * 4 + 64), db((N + off.bias) * 4 + 64), dc((size_t(M) * N + off.y) * 4 + 64);
  const void* xp;
  const void* wp;
  if (type == DType::bf16) {
    // Activations go through the device conversion, as the engine's will; weights arrive as bf16.
    upload(dx_f32.at<float>(), x);
    rf::cuda::f32_to_bf16(dx.at<__nv_bfloat16>(off.x), dx_f32.at<float>(), long(x.size()), nullptr);
    upload(dw.at<uint16_t>(off.w), to_bf16_bits(w));
    xp = dx.at<__nv_bfloat16>(off.x);
    wp = dw.at<uint16_t>(off.w);
  } else {
    upload(dx.at<float>(off.x), x);
    upload(dw.at<float>(off.w), w);
    xp = dx.at<float>(off.x);
    wp = dw.at<float>(off.w);
  }
  upload(db.at<float>(off.bias), bias);
  float* yp = dy.at<float>(off.y);
  float* cp = dc.at<float>(off.y);  // beta's operand apart from y (matmul's c), at y's alignment

  Tally& tally = type == DType::bf16 ? g_bf16 : g_f32;
  const double tol = type == DType::bf16 ? kBf16Tol : f32_case_tol(K);
  for (bool with_bias : {false, true})
    for (float beta : {0.f, 1.f, -1.f}) {
      // beta -1 stands for beta 1 with c apart from y: y starts NaN (not to be read), c holds y0
      // and must come back unchanged.
      const bool apart = beta < 0.f;
      if (apart) beta = 1.f;
      const std::string name = case_name(type, M, N, K, with_bias, beta, apart ? " c apart from y" : "") + extra;
      try {
        if (beta == 0.f || apart) cuda_ok(cudaMemset(yp, 0xff, size_t(M) * N * 4), "cudaMemset");  // NaN: must not be read
        else upload(yp, y0);
        if (apart) upload(cp, y0);
        rf::cuda::matmul(ctx, yp, xp, type, wp, type, M, N, K, with_bias ? db.at<float>(off.bias) : nullptr, beta, nullptr, {},
                         apart ? cp : nullptr);
        cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        if (apart) check(download(cp, size_t(M) * N) == y0, name + ": c unchanged");
        const Error e = measure(download(yp, size_t(M) * N), ref, with_bias ? bias.data() : nullptr, y0, beta, M, N);
        const double rel = e.rel();
        tally.pooled.add(e);
        ++tally.cases;
        if (!(rel <= tally.worst)) {
          tally.worst = rel;
          tally.worst_case = name;
        }
        char buf[64];
        std::snprintf(buf, sizeof buf, ": error %.3g (limit %.3g)", rel, tol);
        check(rel <= tol, name + buf);
      } catch (const std::exception& ex) {
        check(false, name + ": threw " + ex.what());
        cudaGetLastError();
      }
    }
}

// Ms: the grid's row counts (the emulation's stops at 64: plain loops).
void test_shapes(rf::cuda::GemmContext& ctx, const std::vector<int>& Ms) {
  for (DType type : {DType::f32, DType::bf16})
    for (int M : Ms)
      for (int N : {1, 63, 257, 4096})
        for (int K : {64, 80, 1000}) run_shape(ctx, type, M, N, K);
}

// Views into larger buffers and an odd K (no leading dimension a multiple of 8 elements).
void test_views(rf::cuda::GemmContext& ctx) {
  const long kernel_before = ctx.stats().bias_kernel;
  // f32 at 4-byte alignment (one element in): x, W, y, and the bias, which then skips the epilogue.
  run_shape(ctx, DType::f32, 7, 63, 80, Offsets{1, 1, 1, 1}, " [x, W, y, bias 4-byte aligned]");
  run_shape(ctx, DType::f32, 5, 37, 33, Offsets{1, 3, 1, 1}, " [odd K, 4-byte aligned views]");
  // bf16 at 16-byte alignment (eight elements in), as slices of a fused buffer would be.
  run_shape(ctx, DType::bf16, 64, 257, 1000, Offsets{8, 8, 4, 4}, " [x, W, y, bias 16-byte aligned]");
  run_shape(ctx, DType::bf16, 5, 37, 33, Offsets{}, " [odd K]");
  check(ctx.stats().bias_kernel > kernel_before, "a 4-byte-aligned bias was added by the bias kernel (" +
                                                     std::to_string(ctx.stats().bias_kernel - kernel_before) + " calls)");
}

void test_k_zero_and_errors(rf::cuda::GemmContext& ctx) {
  const int M = 3, N = 5;
  const std::vector<float> bias = randn(N, 1.f), y0 = randn(M * N, 1.f);
  Dev dy(M * N * 4), db(N * 4), dx(64), dw(64);
  try {
    upload(dy.at<float>(), y0);
    upload(db.at<float>(), bias);
    rf::cuda::matmul(ctx, dy.at<float>(), dx.p, DType::f32, dw.p, DType::f32, M, N, 0, db.at<float>(), 1.f, nullptr);
    std::vector<float> got = download(dy.at<float>(), M * N);
    bool ok = true;
    for (int i = 0; i < M * N; ++i) ok = ok && got[i] == y0[i] + bias[i % N];
    cuda_ok(cudaMemset(dy.p, 0xff, M * N * 4), "cudaMemset");
    rf::cuda::matmul(ctx, dy.at<float>(), dx.p, DType::bf16, dw.p, DType::bf16, M, N, 0, nullptr, 0.f, nullptr);
    got = download(dy.at<float>(), M * N);
    for (int i = 0; i < M * N; ++i) ok = ok && got[i] == 0.f;
    // With c apart from y: y = bias + beta c, y's NaN unread.
    Dev dc(M * N * 4);
    upload(dc.at<float>(), y0);
    cuda_ok(cudaMemset(dy.p, 0xff, M * N * 4), "cudaMemset");
    rf::cuda::matmul(ctx, dy.at<float>(), dx.p, DType::f32, dw.p, DType::f32, M, N, 0, db.at<float>(), 1.f, nullptr, {},
                     dc.at<float>());
    got = download(dy.at<float>(), M * N);
    for (int i = 0; i < M * N; ++i) ok = ok && got[i] == y0[i] + bias[i % N];
    check(ok, "K = 0: y = bias + beta y, or + beta c apart from y (and 0 over NaN with beta 0, no bias)");
  } catch (const std::exception& e) {
    check(false, std::string("K = 0 threw ") + e.what());
  }
  bool threw = false;
  try {
    rf::cuda::matmul(ctx, dy.at<float>(), dx.p, DType::f32, dw.p, DType::bf16, M, N, 4, nullptr, 0.f, nullptr);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("f32_to_bf16") != std::string::npos;
  }
  check(threw, "x f32 with W bf16 throws a runtime_error that says to convert x");
  threw = false;
  try {
    rf::cuda::matmul(ctx, dy.at<float>(), dx.p, DType::f32, dw.p, DType::f32, -1, N, 4, nullptr, 0.f, nullptr);
  } catch (const std::runtime_error&) {
    threw = true;
  }
  check(threw, "a negative size throws");
}

// A shape seen before runs on its plan: no new heuristic query.
void test_plan_cache(rf::cuda::GemmContext& ctx) {
  const rf::cuda::GemmStats before = ctx.stats();
  run_shape(ctx, DType::f32, 64, 257, 80);
  run_shape(ctx, DType::bf16, 7, 4096, 1000);
  const rf::cuda::GemmStats after = ctx.stats();
  // run_shape's 6 products a shape: with and without a bias, each with beta 0, 1 and c apart from y.
  check(after.plans == before.plans && after.calls == before.calls + 2 * 6,
        "repeated shapes reuse their plans (" + std::to_string(after.plans - before.plans) + " new heuristic queries, " +
            std::to_string(after.calls - before.calls) + " calls)");
}

void test_convert() {
  std::vector<uint32_t> bits = {
      0x00000000u, 0x80000000u, 0x3f800000u, 0xbf800000u,
      0x3f808000u,  // 1 + 2^-8: a tie between 1 and 1 + 2^-7, to even (down)
      0x3f818000u,  // a tie with an odd lower neighbour: up
      0x3f808001u, 0x3f807fffu,  // just above / below a tie
      0x7f7fffffu, 0xff7fffffu,  // the largest finite floats: round to +-inf
      0x7f7f7fffu,               // just below the rounding boundary: stays finite
      0x7f800000u, 0xff800000u,  // inf
      0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x7fffffffu,  // NaNs (signalling ones too): stay NaN
      0x00000001u, 0x00008000u, 0x00018000u, 0x807fffffu, 0x00800000u};  // subnormals, the smallest normal
  std::uniform_int_distribution<uint32_t> any;
  const size_t n = 1000003;  // not a multiple of the block
  while (bits.size() < n) bits.push_back(any(rng));
  std::vector<float> in(n);
  std::memcpy(in.data(), bits.data(), n * 4);
  Dev din(n * 4), dout(n * 2);
  upload(din.at<float>(), in);
  rf::cuda::f32_to_bf16(dout.at<__nv_bfloat16>(), din.at<float>(), long(n), nullptr);
  const std::vector<uint16_t> got = download(dout.at<uint16_t>(), n);
  long differ = 0;
  for (size_t i = 0; i < n; ++i) differ += got[i] != rf::f32_to_bf16(in[i]);
  check(differ == 0, "f32_to_bf16 equals the CPU's rf::f32_to_bf16 bit for bit on " + std::to_string(n) + " values (" +
                         std::to_string(differ) + " differ)");
}

// Milliseconds per call of fn, from CUDA events around `reps` calls after `warm` calls.
template <class F>
double time_ms(F fn, int warm, int reps) {
  for (int i = 0; i < warm; ++i) fn();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < reps; ++i) fn();
  cudaEventRecord(b);
  cuda_ok(cudaEventSynchronize(b), "cudaEventSynchronize");
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return double(ms) / reps;
}

void print_timings(rf::cuda::GemmContext& ctx) {
  try {
    const int S = 8192;
    const size_t n = size_t(S) * S;
    std::vector<float> host(n);
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (auto& f : host) {  // xorshift uniform in [-1, 1): fast enough for 2 x 67M values
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      f = float(int64_t(s >> 40) - (int64_t(1) << 23)) * (1.0f / float(1 << 23));
    }
    Dev x32(n * 4), w32(n * 4), x16(n * 2), w16(n * 2), y(n * 4);
    upload(x32.at<float>(), host);
    for (auto& f : host) f *= 0.5f;
    upload(w32.at<float>(), host);
    host = {};
    const double conv_ms = time_ms([&] { rf::cuda::f32_to_bf16(x16.at<__nv_bfloat16>(), x32.at<float>(), long(n), nullptr); }, 1, 5);
    rf::cuda::f32_to_bf16(w16.at<__nv_bfloat16>(), w32.at<float>(), long(n), nullptr);
    std::printf("cuda_gemm: f32_to_bf16 of %d x %d: %.3f ms, %.0f GB/s (information)\n", S, S, conv_ms, 6.0 * n / conv_ms / 1e6);
    const double flop = 2.0 * S * S * S;
    const double bf16_ms = time_ms([&] { rf::cuda::matmul(ctx, y.at<float>(), x16.p, DType::bf16, w16.p, DType::bf16, S, S, S, nullptr, 0.f, nullptr); }, 3, 20);
    std::printf("cuda_gemm: bf16 %d^3 (f32 out): %.3f ms, %.1f TFLOP/s (information)\n", S, bf16_ms, flop / bf16_ms / 1e9);
    const double f32_ms = time_ms([&] { rf::cuda::matmul(ctx, y.at<float>(), x32.p, DType::f32, w32.p, DType::f32, S, S, S, nullptr, 0.f, nullptr); }, 1, 5);
    std::printf("cuda_gemm: f32 %d^3: %.3f ms, %.1f TFLOP/s (information)\n", S, f32_ms, flop / f32_ms / 1e9);
    // Decode-sized: a few rows against a 4096 x 4096 weight (memory-bound: weight bytes per time).
    for (int M : {1, 16, 128}) {
      const int N = 4096, K = 4096;
      const double ms = time_ms([&] { rf::cuda::matmul(ctx, y.at<float>(), x16.p, DType::bf16, w16.p, DType::bf16, M, N, K, nullptr, 0.f, nullptr); }, 3, 50);
      std::printf("cuda_gemm: bf16 M=%d N=%d K=%d: %.1f us, weights read at %.0f GB/s (information)\n", M, N, K, ms * 1e3,
                  2.0 * N * K / ms / 1e6);
    }
  } catch (const std::exception& e) {
    check(false, std::string("timings threw ") + e.what());
  }
}

// x [M, K], w [N, K] (bf16 values for bf16), y0 [M, N] and the product's reference.
struct Operands {
  std::vector<float> x, w, y0;
  Reference ref;
};

Operands draw(DType type, int M, int N, int K) {
  Operands o;
  o.x = randn(size_t(M) * K, 1.f);
  o.w = randn(size_t(N) * K, 1.f / std::sqrt(float(K)));
  o.y0 = randn(size_t(M) * N, 1.f);
  if (type == DType::bf16) {
    for (auto& v : o.x) v = bf16_round(v);
    for (auto& v : o.w) v = bf16_round(v);
  }
  o.ref = reference(o.x, o.w, M, N, K);
  return o;
}

// matmul_nn (y = x w, w stored [K, N]) and matmul_tn (y = alpha x^T w, x stored [K, M]): the
// backward's products. Same reference (on transposed copies) and bounds as matmul's, with beta 0
// (y NaN first) and beta 1, alpha 1 and 0.25 for matmul_tn, f32 and bf16.
void test_transposed_forms(rf::cuda::GemmContext& ctx) {
  auto transpose = [](const std::vector<float>& a, int rows, int cols) {
    std::vector<float> t(a.size());
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) t[size_t(c) * rows + r] = a[size_t(r) * cols + c];
    return t;
  };
  for (DType type : {DType::f32, DType::bf16})
    for (int M : {1, 16, 257})
      for (int N : {1, 63, 1000})
        for (int K : {8, 80, 777})
          for (bool tn : {false, true}) {
            const Operands op = draw(type, M, N, K);
            const std::vector<float>&x = op.x, &w = op.w, &y0 = op.y0;
            const Reference& ref = op.ref;
            const std::vector<float> xs = tn ? transpose(x, M, K) : x;  // as stored: [K, M] for tn
            const std::vector<float> ws = transpose(w, N, K);           // [K, N]
            const size_t esz = type == DType::bf16 ? 2 : 4;
            Dev dx(xs.size() * esz), dw(ws.size() * esz), dy(size_t(M) * N * 4);
            upload_as(dx, xs, type);
            upload_as(dw, ws, type);
            const double tol = type == DType::bf16 ? kBf16Tol : f32_case_tol(K);
            for (float beta : {0.f, 1.f})
              for (float alpha : {1.f, 0.25f}) {
                if (!tn && alpha != 1.f) continue;
                const std::string name = std::string(tn ? "matmul_tn " : "matmul_nn ") + case_name(type, M, N, K, false, beta) +
                                         (alpha != 1.f ? " alpha=0.25" : "");
                try {
                  if (beta == 0.f) cuda_ok(cudaMemset(dy.p, 0xff, size_t(M) * N * 4), "cudaMemset");
                  else upload(dy.at<float>(), y0);
                  if (tn) rf::cuda::matmul_tn(ctx, dy.at<float>(), dx.p, type, dw.p, type, M, N, K, alpha, beta, nullptr);
                  else rf::cuda::matmul_nn(ctx, dy.at<float>(), dx.p, type, dw.p, type, M, N, K, beta, nullptr);
                  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
                  std::vector<float> got = download(dy.at<float>(), size_t(M) * N);
                  // Compare alpha x^T w + beta y0 with the reference scaled by alpha.
                  Reference scaled = ref;
                  for (size_t i = 0; i < scaled.prod.size(); ++i) {
                    scaled.prod[i] *= alpha;
                    scaled.sq[i] *= double(alpha) * alpha;
                  }
                  const double rel = measure(got, scaled, nullptr, y0, beta, M, N).rel();
                  char buf[64];
                  std::snprintf(buf, sizeof buf, ": error %.3g (limit %.3g)", rel, tol);
                  check(rel <= tol, name + buf);
                } catch (const std::exception& ex) {
                  check(false, name + ": threw " + ex.what());
                  cudaGetLastError();
                }
              }
          }
}

// Strided operands (rows of x, w and y further apart than the shapes say, as for a slice of a
// fused projection's columns), all three and each alone, for each form and type, beta 0 and 1:
// the results match the dense reference, y's gaps keep their NaN, the dense shape after them
// gets a plan of its own, and a stride shorter than its rows throws.
void test_strides(rf::cuda::GemmContext& ctx) {
  // Every stride a multiple of 8 elements (16 bytes of bf16), as the engine's are (it strides f32
  // operands only: LoRA's slices of a fused projection's output and of its gradient).
  const int M = 40, N = 48, K = 72, pad = 24;
  for (DType type : {DType::f32, DType::bf16})
    for (int form = 0; form < 3; ++form)  // y = x w^T, x w, x^T w
      for (float beta : {0.f, 1.f})
        for (int padded = 0; padded < 4; ++padded) {  // all three strided, then x, w or y alone
          const Operands op = draw(type, M, N, K);
          const std::vector<float>&x = op.x, &w = op.w, &y0 = op.y0;
          const Reference& ref = op.ref;
          // As stored: x [M, K] (or [K, M] for x^T w), w [N, K] (or [K, N] for x w and x^T w).
          const int xr = form == 2 ? K : M, xc = form == 2 ? M : K, wr = form == 0 ? N : K, wc = form == 0 ? K : N;
          const long lx = xc + (padded == 0 || padded == 1 ? pad : 0), lw = wc + (padded == 0 || padded == 2 ? pad : 0),
                     ly = N + (padded == 0 || padded == 3 ? pad : 0);
          std::vector<float> xs(size_t(xr) * lx, NAN), ws(size_t(wr) * lw, NAN), ys(size_t(M) * ly, NAN);
          for (int r = 0; r < xr; ++r)
            for (int c = 0; c < xc; ++c) xs[size_t(r) * lx + c] = form == 2 ? x[size_t(c) * K + r] : x[size_t(r) * K + c];
          for (int r = 0; r < wr; ++r)
            for (int c = 0; c < wc; ++c) ws[size_t(r) * lw + c] = form == 0 ? w[size_t(r) * K + c] : w[size_t(c) * K + r];
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) ys[size_t(m) * ly + n] = beta != 0.f ? y0[size_t(m) * N + n] : NAN;
          const size_t esz = type == DType::bf16 ? 2 : 4;
          Dev dx(xs.size() * esz), dw(ws.size() * esz), dy(ys.size() * 4);
          upload_as(dx, xs, type);
          upload_as(dw, ws, type);
          upload(dy.at<float>(), ys);
          static const char* const names[] = {"matmul", "matmul_nn", "matmul_tn"};
          static const char* const which[] = {"x, w, y", "x", "w", "y"};
          const std::string name = std::string(names[form]) + " strided " + which[padded] + " " + case_name(type, M, N, K, false, beta);
          try {
            const rf::cuda::Strides st{lx, lw, ly};
            if (form == 0) rf::cuda::matmul(ctx, dy.at<float>(), dx.p, type, dw.p, type, M, N, K, nullptr, beta, nullptr, st);
            if (form == 1) rf::cuda::matmul_nn(ctx, dy.at<float>(), dx.p, type, dw.p, type, M, N, K, beta, nullptr, st);
            if (form == 2) rf::cuda::matmul_tn(ctx, dy.at<float>(), dx.p, type, dw.p, type, M, N, K, 1.f, beta, nullptr, st);
            cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
            const std::vector<float> got = download(dy.at<float>(), ys.size());
            std::vector<float> dense(size_t(M) * N);
            bool gaps = true;
            for (int m = 0; m < M; ++m)
              for (int c = 0; c < ly; ++c) {
                const float v = got[size_t(m) * ly + c];
                if (c < N) dense[size_t(m) * N + c] = v;
                else gaps = gaps && std::isnan(v);
              }
            const double tol = type == DType::bf16 ? kBf16Tol : f32_case_tol(K);
            const double rel = measure(dense, ref, nullptr, y0, beta, M, N).rel();
            char buf[96];
            std::snprintf(buf, sizeof buf, ": error %.3g (limit %.3g), gaps %s", rel, tol, gaps ? "untouched" : "WRITTEN");
            check(rel <= tol && gaps, name + buf);
          } catch (const std::exception& ex) {
            check(false, name + ": threw " + ex.what());
            cudaGetLastError();
          }
        }
  // The same shape dense after its strided plans: a plan is keyed by all three strides, or this
  // one would run on a plan whose layouts have one of them padded.
  for (DType type : {DType::f32, DType::bf16}) run_shape(ctx, type, M, N, K, {}, " [dense after strided]");
  bool threw = false;
  try {
    Dev d(size_t(64) * 64 * 4);
    rf::cuda::matmul(ctx, d.at<float>(), d.p, DType::f32, d.p, DType::f32, 4, 8, 16, nullptr, 0.f, nullptr, {8, 0, 0});
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("row stride 8") != std::string::npos;
  }
  check(threw, "a row stride shorter than its rows throws and names it");
}

// matmul_bf16 (y in bf16): per element within half a bf16 ulp of the double sum (2^-8 |want|:
// the one rounding) plus the f32 sum's own error (kBf16Tol of the terms' scale, as above); y as a
// strided view whose gaps keep their NaN; K = 0 writes zeros; f32 operands throw.
void test_bf16_output(rf::cuda::GemmContext& ctx) {
  const int pad = 8;
  for (int M : {1, 7, 333})
    for (int N : {64, 4096})
      for (int K : {80, 1000}) {
        const Operands op = draw(DType::bf16, M, N, K);
        const long ly = N + pad;
        Dev dx(op.x.size() * 2), dw(op.w.size() * 2), dy(size_t(M) * ly * 2);
        upload_as(dx, op.x, DType::bf16);
        upload_as(dw, op.w, DType::bf16);
        cuda_ok(cudaMemset(dy.p, 0xff, size_t(M) * ly * 2), "cudaMemset");  // NaN
        const std::string name = "matmul_bf16 M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
        try {
          rf::cuda::matmul_bf16(ctx, dy.at<__nv_bfloat16>(), dx.p, DType::bf16, dw.p, DType::bf16, M, N, K, nullptr, {0, 0, ly});
          cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
          const std::vector<uint16_t> got = download(dy.at<uint16_t>(), size_t(M) * ly);
          double worst = 0;  // in units of the bound
          bool gaps = true;
          for (int m = 0; m < M; ++m)
            for (int c = 0; c < ly; ++c) {
              const float v = rf::bf16_to_f32(got[size_t(m) * ly + c]);
              if (c >= N) {
                gaps = gaps && std::isnan(v);
                continue;
              }
              const size_t i = size_t(m) * N + c;
              const double want = op.ref.prod[i];
              const double bound = std::ldexp(std::fabs(want), -8) + kBf16Tol * std::sqrt(op.ref.sq[i]) + 1e-30;
              worst = std::max(worst, std::isfinite(v) ? std::fabs(v - want) / bound : INFINITY);
            }
          char buf[96];
          std::snprintf(buf, sizeof buf, ": worst %.3g of (half an ulp + the sum's error), gaps %s", worst,
                        gaps ? "untouched" : "WRITTEN");
          check(worst <= 1 && gaps, name + buf);
        } catch (const std::exception& ex) {
          check(false, name + ": threw " + ex.what());
          cudaGetLastError();
        }
      }
  Dev d(size_t(64) * 64 * 4);
  cuda_ok(cudaMemset(d.p, 0xff, size_t(64) * 64 * 4), "cudaMemset");
  rf::cuda::matmul_bf16(ctx, d.at<__nv_bfloat16>(), d.p, DType::bf16, d.p, DType::bf16, 3, 5, 0, nullptr, {0, 0, 8});
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const std::vector<uint16_t> z = download(d.at<uint16_t>(), 24);
  bool zeros = true;
  for (int i = 0; i < 24; ++i) zeros = zeros && (i % 8 < 5 ? z[size_t(i)] == 0 : z[size_t(i)] == 0xffff);
  check(zeros, "matmul_bf16 with K = 0 writes zeros, and only within the rows");
  bool threw = false;
  try {
    rf::cuda::matmul_bf16(ctx, d.at<__nv_bfloat16>(), d.p, DType::f32, d.p, DType::f32, 4, 8, 16, nullptr);
  } catch (const std::runtime_error&) {
    threw = true;
  }
  check(threw, "matmul_bf16 refuses f32 operands");
}

// Every test on one context, then the pooled bound; Ms as test_shapes'; timings: print them (a
// GPU's: the emulation would take hours at 8192^3).
void run_tests(const std::vector<int>& Ms, bool timings) {
  try {
    rf::cuda::GemmContext ctx;
    test_convert();
    test_shapes(ctx, Ms);
    test_views(ctx);
    test_transposed_forms(ctx);
    test_strides(ctx);
    test_bf16_output(ctx);
    test_k_zero_and_errors(ctx);
    test_plan_cache(ctx);
    char buf[256];
    std::snprintf(buf, sizeof buf, "f32 pooled over %d cases: error %.3g (limit %.3g); worst case %.3g (%s)", g_f32.cases,
                  g_f32.pooled.rel(), kF32Pooled, g_f32.worst, g_f32.worst_case.c_str());
    std::printf("cuda_gemm: %s\n", buf);
    check(g_f32.pooled.rel() <= kF32Pooled, buf);
    std::printf("cuda_gemm: bf16 pooled over %d cases: error %.3g; worst case %.3g (%s), limit per case %.3g\n", g_bf16.cases,
                g_bf16.pooled.rel(), g_bf16.worst, g_bf16.worst_case.c_str(), kBf16Tol);
    if (timings) print_timings(ctx);
    const rf::cuda::GemmStats st = ctx.stats();
    std::printf("cuda_gemm: %ld products, %ld plans (heuristic queries), %ld bias-kernel adds\n", st.calls, st.plans,
                st.bias_kernel);
  } catch (const std::exception& e) {
    check(false, std::string("threw ") + e.what());
  }
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_gemm: no CUDA device visible; skipped\n");
    return 0;
  }
  std::printf("cuda_gemm: %s (sm_%d%d)\n", info.name.c_str(), info.sm_major, info.sm_minor);
  run_tests({1, 7, 64, 333}, true);
  return rf::test::finish("cuda_gemm");
}
