#include "napi/bench.h"

#include <algorithm>
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

// fmaPeak(threads, bf16, seconds) -> Promise<GFLOP/s>
Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  const int threads = info[0].As<Napi::Number>().Int32Value();
  const bool bf16 = info[1].As<Napi::Boolean>().Value();
  const double seconds = info[2].As<Napi::Number>().DoubleValue();
  auto result = std::make_shared<double>(0);
  return PromiseWorker::start(
      info.Env(), [=] { ThreadPool pool(threads); *result = fma_peak_gflops(pool, bf16, seconds); },
      [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
}

// memBandwidth(threads, bytesPerArray, copy) -> Promise<GB/s>
Napi::Value MemBandwidth(const Napi::CallbackInfo& info) {
  const int threads = info[0].As<Napi::Number>().Int32Value();
  const double bytes = info[1].As<Napi::Number>().DoubleValue();
  const bool copy = info[2].As<Napi::Boolean>().Value();
  auto result = std::make_shared<double>(0);
  return PromiseWorker::start(
      info.Env(), [=] { ThreadPool pool(threads); *result = mem_bandwidth_gbps(pool, size_t(bytes), copy); },
      [result](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *result); });
}

// gemmTime(M, N, K, dtype: 'f32' | 'bf16', threads, minSeconds) -> Promise<median seconds per call>
Napi::Value GemmTime(const Napi::CallbackInfo& info) {
  const int M = info[0].As<Napi::Number>().Int32Value();
  const int N = info[1].As<Napi::Number>().Int32Value();
  const int K = info[2].As<Napi::Number>().Int32Value();
  const DType dtype = info[3].As<Napi::String>().Utf8Value() == "bf16" ? DType::bf16 : DType::f32;
  const int threads = info[4].As<Napi::Number>().Int32Value();
  const double min_seconds = info[5].As<Napi::Number>().DoubleValue();
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
}

// pickTime(vocab, scores, minSeconds) -> Promise<median seconds per row>: logits_pick on one
// random row, greedy, with (scores) or without the log-sum-exp and p(<rf>): the red-flag
// extraction's own cost, resolved far below the noise of whole decode steps.
Napi::Value PickTime(const Napi::CallbackInfo& info) {
  const int vocab = info[0].As<Napi::Number>().Int32Value();
  const bool scores = info[1].As<Napi::Boolean>().Value();
  const double min_seconds = info[2].As<Napi::Number>().DoubleValue();
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
