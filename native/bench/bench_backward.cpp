// Training GEMM benchmark (kernels/gemm_backward.h), printed as ONE JSON object on stdout
// (progress on stderr). For a linear layer out = N, in = K over M = 512 rows (SmolLM2-135M
// training shapes, and LoRA's rank-8 thin ones) it times the three products of a trainable
// weight and the input gradient through a frozen one:
//
//   "nt"        Y  [M, N] = X [M, K] . W^T      gemm_nt_f32 (packs W every call)
//   "nn"        dX [M, K] = dY [M, N] . W       gemm_nn_f32 (packs W every call)
//   "tn"        dW [N, K] += dY^T . X           gemm_tn_f32 (transposes dY, packs X every call)
//   "packed_t"  dX [M, K] = dY . W              gemm with pack_weight_transposed (packed once), f32 and bf16
//   "packed"    Y  [M, N] = X . W^T             plain gemm with W packed once: the kernel's own speed,
//                                               what the *_f32 figures lose to per-call packing
//
// Each figure comes with its ratio to the FMA ceiling (kernels/peak.h) measured at the start
// of the run ("ratio_fma_peak") and, since the 2-thread ceiling on the 2-vCPU VMs swings
// from second to second, to FMA-peak loops run right after each repetition
// ("ratio_adjacent_peak", median over repetitions). bf16 figures compare with the bf16 peak
// on AVX-512 (vdpbf16ps) and the f32 peak on AVX2.
//
//   bench_backward [--quick] [--threads=1|2]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/gemm_backward.h"
#include "kernels/peak.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs fn() and ceiling(seconds) alternately for about `budget` seconds of fn after a
// warm-up; returns fn's median seconds and the median per-repetition ratio
// (flops / fn seconds) / ceiling GFLOP/s.
struct Paired {
  double sec = 0, ratio = 0;
};
template <class Fn, class Ceiling>
Paired time_paired(Fn&& fn, Ceiling&& ceiling, double gflop, double budget, int min_reps = 5) {
  fn();
  std::vector<double> t, r;
  double spent = 0;
  while (int(t.size()) < min_reps || spent < budget) {
    auto t0 = Clock::now();
    fn();
    const double sec = seconds_since(t0);
    spent += sec;
    t.push_back(sec);
    r.push_back(gflop / sec / ceiling(sec));
    if (t.size() >= 1000) break;
  }
  return {median(t), median(r)};
}

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

std::string json_num(double x) {
  char b[64];
  std::snprintf(b, sizeof b, "%.4g", x);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::vector<int> thread_counts = {1, 2};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a.rfind("--threads=", 0) == 0 && (a[10] == '1' || a[10] == '2')) {
      thread_counts = {a[10] - '0'};
    } else {
      std::fprintf(stderr, "usage: bench_backward [--quick] [--threads=1|2]\n");
      return 2;
    }
  }
  const bool avx512 = rf::active_isa() == rf::Isa::avx512;
  rf::ThreadPool pool1(1), pool2(2);
  auto pool_for = [&](int t) -> rf::ThreadPool& { return t == 1 ? pool1 : pool2; };
  std::mt19937 rng(11);
  const double budget = quick ? 0.1 : 0.3;

  // ---- ceilings
  double peak_f32[3] = {0, 0, 0}, peak_bf16[3] = {0, 0, 0};
  for (int t : thread_counts) {
    std::fprintf(stderr, "ceilings, %d thread(s)...\n", t);
    peak_f32[t] = rf::fma_peak_gflops(pool_for(t), false, quick ? 0.1 : 0.4);
    peak_bf16[t] = avx512 ? rf::fma_peak_gflops(pool_for(t), true, quick ? 0.1 : 0.4) : peak_f32[t];
  }
  std::string out = "{\n  \"isa\": \"" + std::string(rf::isa_name(rf::active_isa())) + "\",\n  \"rows\": 512,\n";
  out += "  \"ceilings\": {\"fma_f32_gflops\": {";
  for (size_t i = 0; i < thread_counts.size(); ++i)
    out += (i ? ", \"" : "\"") + std::to_string(thread_counts[i]) + "\": " + json_num(peak_f32[thread_counts[i]]);
  out += "}, \"fma_bf16_gflops\": {";
  for (size_t i = 0; i < thread_counts.size(); ++i)
    out += (i ? ", \"" : "\"") + std::to_string(thread_counts[i]) + "\": " + json_num(peak_bf16[thread_counts[i]]);
  out += "}}";

  // ---- products of a linear layer out = N, in = K over M rows
  const int M = 512;
  const int layers[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {8, 576}, {576, 8}};
  std::string gemm_json, pack_json;
  for (auto& layer : layers) {
    const int N = layer[0], K = layer[1];
    std::vector<float> X = random_floats(size_t(M) * K, rng), W = random_floats(size_t(N) * K, rng);
    std::vector<float> dY = random_floats(size_t(M) * N, rng);
    std::vector<float> Y(size_t(M) * N), dX(size_t(M) * K), dW(size_t(N) * K, 0.f);
    rf::PackedWeight Wp, WTf32, WTbf16, Wbf16;
    rf::pack_weight(Wp, W.data(), rf::SrcType::f32, N, K, false, rf::DType::f32);
    rf::pack_weight(Wbf16, W.data(), rf::SrcType::f32, N, K, false, rf::DType::bf16);
    // pack_weight_transposed: once per frozen weight (single-threaded).
    for (const rf::PackedWeight* src : {&Wp, &Wbf16}) {
      rf::PackedWeight& dst = src == &Wp ? WTf32 : WTbf16;
      std::vector<double> t;
      for (int r = 0; r < 5; ++r) {
        auto t0 = Clock::now();
        rf::pack_weight_transposed(dst, *src);
        t.push_back(seconds_since(t0));
      }
      const double sec = median(t);
      pack_json += std::string(pack_json.empty() ? "" : ",") + "\n    {\"n\": " + std::to_string(N) +
                   ", \"k\": " + std::to_string(K) + ", \"dtype\": \"" + (src == &Wp ? "f32" : "bf16") +
                   "\", \"ms\": " + json_num(sec * 1e3) + ", \"ns_per_element\": " +
                   json_num(sec * 1e9 / (double(N) * K)) + "}";
    }

    struct Case {
      const char* op;
      const char* dtype;
      int m, n, k;  // of the product C [m, n] = A [m, k] B [k, n]
      std::function<void(rf::ThreadPool&)> run;
    };
    const std::vector<Case> cases = {
        {"nt", "f32", M, N, K,
         [&](rf::ThreadPool& p) {
           rf::gemm_nt_f32(p, M, N, K, X.data(), K, W.data(), K, Y.data(), N, false);
         }},
        {"nn", "f32", M, K, N,
         [&](rf::ThreadPool& p) {
           rf::gemm_nn_f32(p, M, K, N, dY.data(), N, W.data(), K, dX.data(), K, false);
         }},
        {"tn", "f32", N, K, M,
         [&](rf::ThreadPool& p) {
           rf::gemm_tn_f32(p, N, K, M, dY.data(), N, X.data(), K, dW.data(), K, true);
         }},
        {"packed_t", "f32", M, K, N,
         [&](rf::ThreadPool& p) { rf::gemm(p, M, dY.data(), N, WTf32, nullptr, dX.data(), K, false); }},
        {"packed_t", "bf16", M, K, N,
         [&](rf::ThreadPool& p) { rf::gemm(p, M, dY.data(), N, WTbf16, nullptr, dX.data(), K, false); }},
        {"packed", "f32", M, N, K,
         [&](rf::ThreadPool& p) { rf::gemm(p, M, X.data(), K, Wp, nullptr, Y.data(), N, false); }},
    };
    for (const Case& c : cases) {
      for (int t : thread_counts) {
        std::fprintf(stderr, "%s %s linear %dx%d: m=%d n=%d k=%d, %d thread(s)\n", c.op, c.dtype, N, K, c.m, c.n,
                     c.k, t);
        const bool bf16_peak = avx512 && std::string(c.dtype) == "bf16";
        const double gflop = 2e-9 * c.m * c.n * c.k;
        rf::ThreadPool& pool = pool_for(t);
        Paired m = time_paired([&] { c.run(pool); },
                               [&](double sec) { return rf::fma_peak_gflops(pool, bf16_peak, std::max(sec, 0.002)); },
                               gflop, budget);
        const double gflops = gflop / m.sec;
        const double ceiling = bf16_peak ? peak_bf16[t] : peak_f32[t];
        gemm_json += std::string(gemm_json.empty() ? "" : ",") + "\n    {\"op\": \"" + c.op + "\", \"dtype\": \"" +
                     c.dtype + "\", \"linear\": [" + std::to_string(N) + ", " + std::to_string(K) +
                     "], \"m\": " + std::to_string(c.m) + ", \"n\": " + std::to_string(c.n) +
                     ", \"k\": " + std::to_string(c.k) + ", \"threads\": " + std::to_string(t) +
                     ", \"ms\": " + json_num(m.sec * 1e3) + ", \"gflops\": " + json_num(gflops) +
                     ", \"ratio_fma_peak\": " + json_num(gflops / ceiling) +
                     ", \"ratio_adjacent_peak\": " + json_num(m.ratio) + "}";
      }
    }
  }
  out += ",\n  \"gemm\": [" + gemm_json + "\n  ]";
  out += ",\n  \"pack_weight_transposed\": [" + pack_json + "\n  ]\n}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
