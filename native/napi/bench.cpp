#include "napi/bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <chrono>
#include <memory>
#include <random>
#include <vector>

#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/peak.h"
#include "model/decode.h"
#include "napi/worker.h"

namespace rf::napi {
namespace {

// The benchmarks' numeric arguments, checked before any work (a negative size wrapped to a huge
// size_t and overran a small buffer): a number in [lo, hi], else INVALID_ARGUMENT naming it.
std::string show(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.15g", v);
  return text;
}
double arg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, double lo, double hi) {
  const double v = info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : std::nan("");
  if (!(v >= lo && v <= hi))
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be a number from " + show(lo) + " to " + show(hi));
  return v;
}

// fmaPeak(threads, bf16, seconds) -> Promise<GFLOP/s>
Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const int threads = int(arg(info, 0, "fmaPeak", "threads", 1, 1024));
    const bool bf16 = info[1].ToBoolean().Value();
    const double seconds = arg(info, 2, "fmaPeak", "seconds", 0, 3600);
    auto result = std::make_shared<double>(0);
    return PromiseWorker::start(
        info.Env(), [=] { ThreadPool pool(threads); *result = fma_peak_gflops(pool, bf16, seconds); },
        [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
  });
}

// memBandwidth(threads, bytesPerArray, copy) -> Promise<GB/s>
Napi::Value MemBandwidth(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const int threads = int(arg(info, 0, "memBandwidth", "threads", 1, 1024));
    const double bytes = arg(info, 1, "memBandwidth", "bytesPerArray", 4096, double(1ull << 40));
    const bool copy = info[2].ToBoolean().Value();
    auto result = std::make_shared<double>(0);
    return PromiseWorker::start(
        info.Env(), [=] { ThreadPool pool(threads); *result = mem_bandwidth_gbps(pool, size_t(bytes), copy); },
        [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
  });
}

// gemmTime(M, N, K, dtype: 'f32' | 'bf16', threads, minSeconds) -> Promise<median seconds per call>
Napi::Value GemmTime(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const int M = int(arg(info, 0, "gemmTime", "M", 1, 1 << 16));
    const int N = int(arg(info, 1, "gemmTime", "N", 1, 1 << 20));
    const int K = int(arg(info, 2, "gemmTime", "K", 1, 1 << 16));
    const DType dtype = info[3].IsString() && info[3].As<Napi::String>().Utf8Value() == "bf16" ? DType::bf16 : DType::f32;
    const int threads = int(arg(info, 4, "gemmTime", "threads", 1, 1024));
    const double min_seconds = arg(info, 5, "gemmTime", "minSeconds", 0, 3600);
    auto result = std::make_shared<double>(0);
    return PromiseWorker::start(
        info.Env(),
        [=] {
          ThreadPool pool(threads);
          std::mt19937 rng(42);
          std::normal_distribution<float> dist(0.f, 1.f);
          std::vector<float> w(size_t(N) * K), a(size_t(M) * K), c(size_t(M) * N);
          for (float& v : w) v = dist(rng);
          for (float& v : a) v = dist(rng);
          PackedWeight pw;
          pack_weight(pw, w.data(), SrcType::f32, N, K, false, dtype);
          std::vector<double> times;
          gemm(pool, M, a.data(), K, pw, nullptr, c.data(), N, false);  // warm-up
          auto start = std::chrono::steady_clock::now();
          double elapsed = 0;
          while (elapsed < min_seconds || times.size() < 5) {
            auto t0 = std::chrono::steady_clock::now();
            gemm(pool, M, a.data(), K, pw, nullptr, c.data(), N, false);
            auto t1 = std::chrono::steady_clock::now();
            times.push_back(std::chrono::duration<double>(t1 - t0).count());
            elapsed = std::chrono::duration<double>(t1 - start).count();
          }
          std::sort(times.begin(), times.end());
          *result = times[times.size() / 2];
        },
        [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
  });
}

// pickTime(vocab, scores, minSeconds) -> Promise<median seconds per row>: logits_pick on one
// random row, greedy, with (scores) or without the log-sum-exp and p(<rf>): the red-flag
// extraction's own cost, resolved far below the noise of whole decode steps.
Napi::Value PickTime(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const int vocab = int(arg(info, 0, "pickTime", "vocab", 1, 1 << 24));
    const bool scores = info[1].ToBoolean().Value();
    const double min_seconds = arg(info, 2, "pickTime", "minSeconds", 0, 3600);
    auto result = std::make_shared<double>(0);
    return PromiseWorker::start(
        info.Env(),
        [=] {
          if (vocab < 1) throw std::invalid_argument("pickTime: vocab must be >= 1");
          std::mt19937 rng(7);
          std::normal_distribution<float> dist(0.f, 3.f);
          std::vector<float> z(static_cast<size_t>(vocab));
          for (float& v : z) v = dist(rng);
          PickScratch scratch;
          const PickParams params;
          std::vector<double> times;
          double elapsed = 0, sink = 0;
          const auto start = std::chrono::steady_clock::now();
          for (uint64_t i = 0; elapsed < min_seconds || times.size() < 5; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int r = 0; r < 100; ++r) sink += logits_pick(z.data(), vocab, params, i, vocab / 2, 0, nullptr, nullptr, scratch, scores).p_rf;
            const auto t1 = std::chrono::steady_clock::now();
            times.push_back(std::chrono::duration<double>(t1 - t0).count() / 100);
            elapsed = std::chrono::duration<double>(t1 - start).count();
          }
          std::sort(times.begin(), times.end());
          *result = times[times.size() / 2] + sink * 0;  // sink keeps the calls from being elided
        },
        [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
  });
}

}  // namespace

void init_bench(Napi::Env env, Napi::Object exports) {
  Napi::Object bench = Napi::Object::New(env);
  bench.Set("fmaPeak", Napi::Function::New(env, FmaPeak));
  bench.Set("memBandwidth", Napi::Function::New(env, MemBandwidth));
  bench.Set("gemmTime", Napi::Function::New(env, GemmTime));
  bench.Set("pickTime", Napi::Function::New(env, PickTime));
  exports.Set("bench", bench);
}

}  // namespace rf::napi
