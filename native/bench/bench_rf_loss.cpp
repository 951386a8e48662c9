// Benchmark of the fused red-flag loss (kernels/rf_loss.h) against ONE plain gemm of the
// same rows over the LM head, printed as ONE JSON object on stdout (progress on stderr).
//
//   bench_rf_loss [--quick] [--n=ROWS] [--threads=T] [--reps=R] [--dtype=f32|bf16]
//                 [--shape=V,H ...] [--chunk=C]
//
// Default: V,H = 128256,2048 (Llama 3.2 1B head) and 49152,576 (SmolLM-135M), N = 4096 scored
// rows (half benign KL, a quarter red flag in groups of 16, a quarter after-flag KL; each KL
// row has its own reference row, Nr = 3N/4), bf16 and f32 W, 2 threads. --quick: N = 512.
//
// Timing: gemm and rf_loss alternate (R pairs, default 2-3) and the ratio is the median of the
// per-pair ratios, because on the 2-vCPU VMs the FMA throughput available to 2 threads swings from
// second to second (see bench_kernels.cpp), and other processes may share them: "ratio_cpu"
// is the same ratio of process CPU seconds (both threads, spin-waits included).
// The floor is arithmetic: "macs_ratio" = 2 (N + Nr) / N = 3.5 here, the logits of both
// models plus the softmax-weighted sums back through W, each as many multiply-adds as a gemm
// of its rows and at that gemm's rate, for both dtypes: with bf16 W on AVX-512 the plain gemm
// runs bf16 dot products at ~2x the f32 FMA rate, and so do the sums (vdpbf16ps on p rounded
// to bf16, f32 accumulation; see kernels/rf_loss.h). (While the sums were f32 FMAs the bf16
// floor was 3 (N + Nr) / N = 5.25.)
//
// Memory: "scratch_bytes" is what rf_loss allocates; "peak_extra_bytes" is the measured
// growth of the process's peak resident set over the call (VmHWM after resetting it with
// /proc/self/clear_refs), which also counts gemm's own bf16 activation buffer and page
// rounding. "naive_bytes" = logits + gradient buffers of both models as the brief defines
// them: 2 x N x V x 4 for the trained rows plus the same for the reference.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <malloc.h>
#include <ctime>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/rf_loss.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  bool quick = false;
  int n = 4096, threads = 2, reps = 0, chunk = 0;
  std::vector<rf::DType> dtypes = {rf::DType::bf16, rf::DType::f32};
  std::vector<std::pair<int, int>> shapes = {{128256, 2048}, {49152, 576}};
};

Options options_parse(int argc, char** argv) {
  Options o;
  bool shapes_given = false, n_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a.rfind("--n=", 0) == 0) {
      o.n = std::atoi(a.c_str() + 4), n_given = true;
    } else if (a.rfind("--threads=", 0) == 0) {
      o.threads = std::atoi(a.c_str() + 10);
    } else if (a.rfind("--reps=", 0) == 0) {
      o.reps = std::atoi(a.c_str() + 7);
    } else if (a.rfind("--chunk=", 0) == 0) {
      o.chunk = std::atoi(a.c_str() + 8);
    } else if (a == "--dtype=f32") {
      o.dtypes = {rf::DType::f32};
    } else if (a == "--dtype=bf16") {
      o.dtypes = {rf::DType::bf16};
    } else if (a.rfind("--shape=", 0) == 0) {
      int v = 0, h = 0;
      if (std::sscanf(a.c_str() + 8, "%d,%d", &v, &h) != 2 || v < 2 || h < 1) {
        std::fprintf(stderr, "bad shape %s\n", a.c_str());
        std::exit(2);
      }
      if (!shapes_given) o.shapes.clear();
      shapes_given = true;
      o.shapes.push_back({v, h});
    } else {
      std::fprintf(stderr,
                   "usage: bench_rf_loss [--quick] [--n=ROWS] [--threads=T] [--reps=R] [--dtype=f32|bf16] "
                   "[--shape=V,H ...] [--chunk=C]\n");
      std::exit(2);
    }
  }
  if (o.quick && !n_given) o.n = 512;
  if (o.n < 4) o.n = 4;
  return o;
}

// Fast deterministic pseudo-normal numbers (sum of uniforms): filling 262M weights with
// std::normal_distribution would take longer than the benchmark.
struct Rand {
  uint64_t s;
  explicit Rand(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ULL + 1) {}
  float uniform() {  // [-1, 1)
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return float(int32_t(s >> 32)) * (1.0f / 2147483648.0f);
  }
  float normal() { return (uniform() + uniform() + uniform()) * 1.0f; }  // variance 1
};

long status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::atol(line.c_str() + n + 1);
  return -1;
}

// Resets the peak-RSS mark to the current RSS (Linux >= 4.0); false when not permitted.
bool peak_reset() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  return bool(f);
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// CPU seconds of the whole process (all threads): less disturbed than wall time when other
// processes share the 2 vCPUs, though it counts the pool's spin-waits too.
double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Timing {
  double wall = 0, cpu = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string fmt(const char* f, double x) {
  char b[64];
  std::snprintf(b, sizeof b, f, x);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = options_parse(argc, argv);
  rf::ThreadPool pool(opt.threads);
  const int N = opt.n;
  const int n_benign = N / 2, n_rf = N / 4, n_after = N - n_benign - n_rf;
  const int Nr = n_benign + n_after;
  std::string out = "{\n  \"isa\": \"" + std::string(rf::isa_name(rf::active_isa())) + "\", \"threads\": " +
                    std::to_string(opt.threads) + ", \"n_rows\": " + std::to_string(N) + ", \"n_ref_rows\": " +
                    std::to_string(Nr) + ",\n  \"rows\": \"half benign KL, a quarter red flag in groups of 16, a quarter after-flag KL\"," +
                    "\n  \"macs_ratio\": " + fmt("%.3f", 2.0 * (N + Nr) / N) + ",\n  \"runs\": [";
  bool first = true;

  for (auto [V, H] : opt.shapes) {
    // Shared inputs for this shape.
    Rand rnd(uint64_t(V) * 31 + H);
    std::vector<float> h(size_t(N) * H), h_ref(size_t(Nr) * H), w_rf(H);
    for (float& x : h) x = rnd.normal();
    const float w_scale = 2.5f / std::sqrt(float(H));
    for (float& x : w_rf) x = w_scale * rnd.normal();
    std::vector<rf::RfLossRow> rows(N);
    for (int i = 0; i < N; ++i) {
      // Interleaved kinds, as a batch of conversations would give.
      if (i % 4 == 0 || i % 4 == 2) rows[i] = {rf::RfLossKind::benign_kl, -1, -1};
      else if (i % 4 == 1) rows[i] = {rf::RfLossKind::red_flag, -1, (i / 4) / 16};
      else rows[i] = {rf::RfLossKind::after_kl, -1, -1};
    }
    // Fix the counts exactly (N not a multiple of 4) and number the reference rows.
    int ref = 0;
    for (int i = 0; i < N; ++i)
      if (rows[i].kind != rf::RfLossKind::red_flag) rows[i].ref_row = ref++;
    const int nr_used = ref;
    // Reference states near the trained ones (adapter off vs on): moderate KL.
    for (int i = 0; i < N; ++i)
      if (rows[i].ref_row >= 0)
        for (int k = 0; k < H; ++k) h_ref[size_t(rows[i].ref_row) * H + k] = h[size_t(i) * H + k] + 0.3f * rnd.normal();
    std::vector<float> dh(size_t(N) * H), dw_rf(H, 0.f);
    const int rf_token = V - 5;

    for (rf::DType dt : opt.dtypes) {
      const char* dname = dt == rf::DType::f32 ? "f32" : "bf16";
      std::fprintf(stderr, "V=%d H=%d %s: packing\n", V, H, dname);
      rf::PackedWeight W;
      {
        std::vector<float> src(size_t(V) * H);
        for (float& x : src) x = w_scale * rnd.normal();
        rf::pack_weight(W, src.data(), rf::SrcType::f32, V, H, false, dt);
      }
      std::vector<float> logits(size_t(N) * V);
      std::memset(logits.data(), 0, logits.size() * 4);  // touched: not counted as rf_loss's peak
      rf::RfLossOptions o;
      o.rf_token = rf_token;
      o.chunk = opt.chunk;

      auto run_gemm = [&] {
        const double c0 = cpu_seconds();
        auto t0 = Clock::now();
        rf::gemm(pool, N, h.data(), H, W, nullptr, logits.data(), V, false);
        return Timing{seconds_since(t0), cpu_seconds() - c0};
      };
      rf::RfLossResult res;
      auto run_loss = [&] {
        const double c0 = cpu_seconds();
        auto t0 = Clock::now();
        res = rf::rf_loss(pool, h.data(), N, h_ref.data(), nr_used, H, W, w_rf.data(), rows.data(), o, dh.data(),
                          dw_rf.data());
        return Timing{seconds_since(t0), cpu_seconds() - c0};
      };

      // First rf_loss call with the peak-RSS mark reset; malloc_trim first returns the heap's
      // free pages (earlier runs' scratch) to the kernel, so the call's scratch is faulted in
      // afresh and shows in the peak.
      malloc_trim(0);
      const bool can_peak = peak_reset();
      const long rss0 = status_kb("VmRSS:");
      std::fprintf(stderr, "  rf_loss (first, memory)\n");
      const Timing t_first = run_loss();
      const long hwm = status_kb("VmHWM:");
      const double peak_extra = can_peak && rss0 >= 0 && hwm >= 0 ? double(hwm - rss0) * 1024.0 : -1.0;

      // Pairs of adjacent runs, the ratio taken within each pair. When rf_loss takes over 20 s
      // (the full Llama shape: about a minute in f32 on 2 cores) the first call above counts:
      // two pairs (first call, gemm) and (rf_loss, gemm); else R pairs (gemm, rf_loss).
      const int reps = opt.reps > 0 ? opt.reps : (t_first.wall > 20 ? 1 : t_first.wall > 5 ? 2 : 3);
      std::vector<double> tg, tl, ratio, ratio_cpu;
      if (reps == 1) {
        std::fprintf(stderr, "  gemm after it\n");
        const Timing g = run_gemm();
        std::fprintf(stderr, "  rf_loss again, gemm after it\n");
        const Timing l = run_loss();
        const Timing g2 = run_gemm();
        // Two loss timings, each next to a gemm: (first, g) and (l, g2).
        tg = {g.wall, g2.wall};
        tl = {t_first.wall, l.wall};
        ratio = {t_first.wall / g.wall, l.wall / g2.wall};
        ratio_cpu = {t_first.cpu / g.cpu, l.cpu / g2.cpu};
      } else {
        for (int r = 0; r < reps; ++r) {
          std::fprintf(stderr, "  pair %d/%d\n", r + 1, reps);
          const Timing g = run_gemm();
          const Timing l = run_loss();
          tg.push_back(g.wall), tl.push_back(l.wall);
          ratio.push_back(l.wall / g.wall), ratio_cpu.push_back(l.cpu / g.cpu);
        }
      }
      const double naive = 2.0 * N * V * 4 + 2.0 * N * V * 4;
      const double macs = double(N) * V * H;
      if (!first) out += ",";
      first = false;
      out += "\n    {\"V\": " + std::to_string(V) + ", \"H\": " + std::to_string(H) + ", \"dtype\": \"" + dname + "\"" +
             ", \"rf_loss_s\": " + fmt("%.3f", median(tl)) + ", \"gemm_s\": " + fmt("%.3f", median(tg)) +
             ", \"ratio\": " + fmt("%.3f", median(ratio)) + ", \"ratio_cpu\": " + fmt("%.3f", median(ratio_cpu)) + ", \"pairs\": " + std::to_string(ratio.size()) +
             ", \"gemm_gmacs\": " + fmt("%.1f", macs / median(tg) * 1e-9) +
             ", \"rf_loss_gmacs\": " + fmt("%.1f", 2.0 * (N + nr_used) * double(V) * H / median(tl) * 1e-9) +
             ",\n     \"scratch_bytes\": " + fmt("%.0f", double(res.scratch_bytes)) +
             ", \"peak_extra_bytes\": " + fmt("%.0f", peak_extra) + ", \"naive_bytes\": " + fmt("%.0f", naive) +
             ", \"scratch_ratio\": " + fmt("%.5f", double(res.scratch_bytes) / naive) +
             ", \"peak_extra_ratio\": " + fmt("%.5f", peak_extra / naive) +
             ",\n     \"loss\": {\"benign\": " + fmt("%.5g", res.benign) + ", \"red_flag\": " + fmt("%.5g", res.red_flag) +
             ", \"after\": " + fmt("%.5g", res.after) + ", \"total\": " + fmt("%.5g", res.total) + "}}";
    }
  }
  out += "\n  ]\n}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
