// Kernel benchmark: machine ceilings, GEMM GFLOP/s and GEMV GB/s, printed as ONE JSON
// object on stdout (progress goes to stderr). Each figure comes with its ratio to the
// ceiling measured in the same run, since 2-thread figures vary between runs.
//
//   bench_kernels [--quick] [--threads=1|2] [--dtype=f32|bf16] [--no-gemm] [--no-gemv]
//                 [--shape=M,N,K ...]   (only these shapes; M=1 runs as GEMV)
//
// On the 2-vCPU VMs both vCPUs often share one physical core's FMA units, so the 2-thread
// FMA peak swings between ~1x and ~2x the 1-thread one from second to second. Each GEMM
// figure is therefore also compared, repetition by repetition, with an FMA-peak loop run
// right after it for as long ("ratio_adjacent_peak", the median of those ratios); GEMV
// likewise with copy and read-bandwidth runs (256 MB arrays, as the ceilings) before and
// after it ("ratio_adjacent_copy", "ratio_adjacent_read"; smaller arrays get help from the
// 32 MB L3). Memory bandwidth on these VMs also moves with the neighbours' load.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/peak.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  bool quick = false;
  std::vector<int> threads = {1, 2};
  std::vector<rf::DType> dtypes = {rf::DType::f32, rf::DType::bf16};
  bool gemm = true, gemv = true;
  std::vector<std::vector<int>> shapes;  // --shape=M,N,K
};

Options options_parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a.rfind("--threads=", 0) == 0) {
      o.threads = {std::atoi(a.c_str() + 10)};
    } else if (a == "--dtype=f32") {
      o.dtypes = {rf::DType::f32};
    } else if (a == "--dtype=bf16") {
      o.dtypes = {rf::DType::bf16};
    } else if (a == "--no-gemm") {
      o.gemm = false;
    } else if (a == "--no-gemv") {
      o.gemv = false;
    } else if (a.rfind("--shape=", 0) == 0) {
      int m = 0, n = 0, k = 0;
      if (std::sscanf(a.c_str() + 8, "%d,%d,%d", &m, &n, &k) != 3 || m < 1 || n < 1 || k < 1) {
        std::fprintf(stderr, "bad --shape (want M,N,K): %s\n", a.c_str());
        std::exit(2);
      }
      o.shapes.push_back({m, n, k});
    } else {
      std::fprintf(stderr,
                   "usage: bench_kernels [--quick] [--threads=N] [--dtype=f32|bf16] [--no-gemm] [--no-gemv] "
                   "[--shape=M,N,K ...]\n");
      std::exit(2);
    }
  }
  return o;
}

const char* dtype_name(rf::DType d) { return d == rf::DType::f32 ? "f32" : "bf16"; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs fn() and then ceiling() alternately for about `budget` seconds after a warm-up;
// returns the median seconds of fn() and the median of the per-pair ratio
// (work / fn seconds) / ceiling(fn seconds), so a ratio compares figures measured
// within milliseconds of each other.
struct Paired {
  double sec = 0, ratio = 0;
};
template <class Fn, class Ceiling>
Paired time_paired(Fn&& fn, Ceiling&& ceiling, double work, double budget, int min_reps = 5) {
  fn();
  std::vector<double> t, r;
  auto start = Clock::now();
  while (int(t.size()) < min_reps || std::chrono::duration<double>(Clock::now() - start).count() < 2 * budget) {
    auto t0 = Clock::now();
    fn();
    double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    t.push_back(sec);
    r.push_back(work / sec / ceiling(sec));
    if (t.size() >= 1000) break;
  }
  return {median(t), median(r)};
}

// Median seconds of fn() over repetitions lasting about `budget` seconds, after a warm-up.
template <class Fn>
double time_median(Fn&& fn, double budget, int min_reps = 5) {
  fn();
  std::vector<double> t;
  auto start = Clock::now();
  while (int(t.size()) < min_reps || std::chrono::duration<double>(Clock::now() - start).count() < budget) {
    auto t0 = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    if (t.size() >= 2000) break;
  }
  return median(t);
}

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// A packed copy of W in its own memory (GEMV rotates over copies to defeat the caches).
rf::PackedWeight packed_clone(const rf::PackedWeight& W) {
  rf::PackedWeight c;
  c.N = W.N;
  c.K = W.K;
  c.dtype = W.dtype;
  c.bytes = W.bytes;
  uint8_t* mem = static_cast<uint8_t*>(std::aligned_alloc(64, (W.bytes + 63) / 64 * 64));
  if (!mem) throw std::bad_alloc();
  std::memcpy(mem, W.data.get(), W.bytes);
  c.data = std::unique_ptr<uint8_t[], void (*)(uint8_t*)>(mem, [](uint8_t* p) { std::free(p); });
  return c;
}

struct Ceilings {
  double fma_f32[3] = {0, 0, 0}, fma_bf16[3] = {0, 0, 0};  // index = threads
  double copy[3] = {0, 0, 0}, read[3] = {0, 0, 0};
};

std::string json_num(double x) {
  char b[64];
  std::snprintf(b, sizeof b, "%.4g", x);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt = options_parse(argc, argv);
  const bool avx512 = rf::active_isa() == rf::Isa::avx512;
  rf::ThreadPool pool1(1), pool2(2);
  auto pool_for = [&](int t) -> rf::ThreadPool& { return t == 1 ? pool1 : pool2; };
  std::mt19937 rng(7);

  // ---- ceilings
  Ceilings peak;
  const double fma_secs = opt.quick ? 0.1 : 0.4;
  const size_t mem_bytes = size_t(256) << 20;
  std::string out = "{\n  \"isa\": \"" + std::string(rf::isa_name(rf::active_isa())) + "\",\n";
  out += "  \"ceilings\": {";
  for (int t : opt.threads) {
    std::fprintf(stderr, "ceilings, %d thread(s)...\n", t);
    peak.fma_f32[t] = rf::fma_peak_gflops(pool_for(t), false, fma_secs);
    peak.fma_bf16[t] = rf::fma_peak_gflops(pool_for(t), true, fma_secs);
    peak.copy[t] = rf::mem_bandwidth_gbps(pool_for(t), mem_bytes, true);
    peak.read[t] = rf::mem_bandwidth_gbps(pool_for(t), mem_bytes, false);
  }
  {
    std::string sep;
    auto field = [&](const char* name, const double* v) {
      out += sep + "\n    \"" + name + "\": {";
      std::string s2;
      for (int t : opt.threads) {
        out += s2 + "\"" + std::to_string(t) + "\": " + json_num(v[t]);
        s2 = ", ";
      }
      out += "}";
      sep = ",";
    };
    field("fma_f32_gflops", peak.fma_f32);
    field("fma_bf16_gflops", peak.fma_bf16);
    field("copy_gbps", peak.copy);
    field("read_gbps", peak.read);
    out += ",\n    \"array_mb\": " + std::to_string(mem_bytes >> 20);
    if (!avx512) out += ",\n    \"note\": \"AVX2 path: no bf16 dot product, bf16 GEMM ratios use the f32 peak\"";
    out += "\n  }";
  }

  // ---- GEMM (prefill shapes and 1024^3)
  struct Shape {
    int M, N, K;
  };
  std::vector<Shape> gemm_shapes = {{1024, 1024, 1024}};
  const int nk[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {49152, 576}};
  for (int M : {128, 256, 512})
    for (auto& s : nk) gemm_shapes.push_back({M, s[0], s[1]});
  if (opt.quick) gemm_shapes = {{1024, 1024, 1024}, {512, 1536, 576}, {128, 49152, 576}};
  std::vector<Shape> custom_gemv;
  if (!opt.shapes.empty()) {
    gemm_shapes.clear();
    for (auto& s : opt.shapes) (s[0] == 1 ? custom_gemv : gemm_shapes).push_back({s[0], s[1], s[2]});
    opt.gemm = !gemm_shapes.empty();
    opt.gemv = !custom_gemv.empty();
  }
  const double gemm_budget = opt.quick ? 0.1 : 0.3;

  if (opt.gemm) {
    out += ",\n  \"gemm\": [";
    std::string sep;
    for (const Shape& s : gemm_shapes) {
      std::vector<float> w = random_floats(size_t(s.N) * s.K, rng);
      std::vector<float> a = random_floats(size_t(s.M) * s.K, rng);
      std::vector<float> c(size_t(s.M) * s.N);
      for (rf::DType dt : opt.dtypes) {
        rf::PackedWeight W;
        rf::pack_weight(W, w.data(), rf::SrcType::f32, s.N, s.K, false, dt);
        for (int t : opt.threads) {
          std::fprintf(stderr, "gemm %dx%dx%d %s t=%d\n", s.M, s.N, s.K, dtype_name(dt), t);
          const bool bf16_peak = dt == rf::DType::bf16 && avx512;
          Paired m = time_paired(
              [&] { rf::gemm(pool_for(t), s.M, a.data(), s.K, W, nullptr, c.data(), s.N, false); },
              [&](double sec) { return rf::fma_peak_gflops(pool_for(t), bf16_peak, std::max(sec, 0.002)); },
              2e-9 * s.M * s.N * s.K, gemm_budget);
          double sec = m.sec;
          double gflops = 2.0 * s.M * s.N * s.K / sec * 1e-9;
          double ref = bf16_peak ? peak.fma_bf16[t] : peak.fma_f32[t];
          out += sep + "\n    {\"m\": " + std::to_string(s.M) + ", \"n\": " + std::to_string(s.N) +
                 ", \"k\": " + std::to_string(s.K) + ", \"dtype\": \"" + dtype_name(dt) +
                 "\", \"threads\": " + std::to_string(t) + ", \"ms\": " + json_num(sec * 1e3) +
                 ", \"gflops\": " + json_num(gflops) + ", \"ratio_fma_peak\": " + json_num(gflops / ref) +
                 ", \"ratio_adjacent_peak\": " + json_num(m.ratio) + "}";
          sep = ",";
        }
      }
    }
    out += "\n  ]";
  }

  // ---- GEMV (M = 1, decode): weights streamed from DRAM by rotating over enough copies
  // that together they exceed the caches ("gbps"); "hot_gbps" repeats one copy.
  if (opt.gemv) {
    std::vector<Shape> gemv_shapes;
    for (auto& s : nk) gemv_shapes.push_back({1, s[0], s[1]});
    gemv_shapes.push_back({1, 8192, 8192});
    if (opt.quick) gemv_shapes = {{1, 1536, 576}, {1, 49152, 576}};
    if (!custom_gemv.empty()) gemv_shapes = custom_gemv;
    out += ",\n  \"gemv\": [";
    std::string sep;
    for (const Shape& s : gemv_shapes) {
      std::vector<float> w = random_floats(size_t(s.N) * s.K, rng);
      std::vector<float> a = random_floats(size_t(s.K), rng);
      std::vector<float> c(size_t(s.N));
      for (rf::DType dt : opt.dtypes) {
        std::vector<rf::PackedWeight> copies(1);
        rf::pack_weight(copies[0], w.data(), rf::SrcType::f32, s.N, s.K, false, dt);
        const size_t bytes = copies[0].bytes;
        const size_t total_target = size_t(opt.quick ? 256 : 512) << 20;
        const size_t n_copies = std::max<size_t>(1, (total_target + bytes - 1) / bytes);
        for (size_t i = 1; i < n_copies; ++i) copies.push_back(packed_clone(copies[0]));
        for (int t : opt.threads) {
          std::fprintf(stderr, "gemv %dx%d %s t=%d (%zu copies)\n", s.N, s.K, dtype_name(dt), t, n_copies);
          rf::ThreadPool& pool = pool_for(t);
          double read_before = rf::mem_bandwidth_gbps(pool, mem_bytes, false);
          double copy_before = rf::mem_bandwidth_gbps(pool, mem_bytes, true);
          // One timed unit = a pass over all copies (>= 256 MB), like decode over all layers.
          double sec = time_median(
                           [&] {
                             for (auto& W : copies) rf::gemm(pool, 1, a.data(), s.K, W, nullptr, c.data(), s.N, false);
                           },
                           opt.quick ? 0.2 : 0.5, 3) /
                       double(n_copies);
          double read_adjacent = 0.5 * (read_before + rf::mem_bandwidth_gbps(pool, mem_bytes, false));
          double copy_adjacent = 0.5 * (copy_before + rf::mem_bandwidth_gbps(pool, mem_bytes, true));
          double hot = time_median([&] { rf::gemm(pool, 1, a.data(), s.K, copies[0], nullptr, c.data(), s.N, false); },
                                   0.1);
          double gbps = bytes / sec * 1e-9, hot_gbps = bytes / hot * 1e-9;
          out += sep + "\n    {\"n\": " + std::to_string(s.N) + ", \"k\": " + std::to_string(s.K) +
                 ", \"dtype\": \"" + dtype_name(dt) + "\", \"threads\": " + std::to_string(t) +
                 ", \"weight_mb\": " + json_num(bytes / 1048576.0) + ", \"us\": " + json_num(sec * 1e6) +
                 ", \"gbps\": " + json_num(gbps) + ", \"ratio_copy\": " + json_num(gbps / peak.copy[t]) +
                 ", \"ratio_read\": " + json_num(gbps / peak.read[t]) +
                 ", \"ratio_adjacent_copy\": " + json_num(gbps / copy_adjacent) +
                 ", \"ratio_adjacent_read\": " + json_num(gbps / read_adjacent) + ", \"hot_us\": " + json_num(hot * 1e6) +
                 ", \"hot_gbps\": " + json_num(hot_gbps) + "}";
          sep = ",";
        }
      }
    }
    out += "\n  ]";
  }
  out += "\n}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
