// The device red-flag loss (native/cuda/rf_loss.h) against the CPU's rf::rf_loss (itself checked
// against float64 and finite differences in test_rf_loss) on the same inputs, on a GPU machine
// (elsewhere: "no CUDA device visible; skipped", exit 0). Built where cuBLASLt links.
//
// Also ce_loss (cross-entropy rows) against float64: see ce_case.
// Cases: one flag and three, aggregations any / mean / single, KL rows sharing reference rows,
// a negative red-flag weight (the white-box attacks'),
// groups split across chunks (chunk 8 with 41 rows), 600 rows (dw_rf's sum over parts of 256
// rows), vocabulary 1001 (odd) and 128256 (Llama-3's; the test the issue asks for: the fused loss
// at full vocabulary against a reference), f32 and bf16 W, and flags so unlikely (p ~ 1e-30)
// that log(1 - p) must be formed from the log-odds.
// Tolerances. f32 W: both sides sum f32 products in different orders with float64 per-row
// scalars: loss terms within 1e-5 relative (+1e-7 absolute), dh and dw_rf within 1e-4 relative
// L2. bf16 W on an AVX-512 host: both round h to bf16 for the streamed logits; the device rounds
// dz to bf16 for the product back through W where the CPU rounds p, so dh within 1e-2 relative
// L2 (the rounding of a 2^-8 relative error, far above f32 noise and far below a wrong term);
// the red-flag term and dw_rf (which never see that rounding) within 1e-4; the KL terms within
// 1e-3, because the CPU forms them from its bf16-rounded p (test_rf_loss bounds that by 4 sigma;
// 3e-4 was seen under emulation). On an AVX2 host the CPU does not round h at all: then 3e-2 for
// everything, test_rf_loss's bound for that difference.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/threadpool.h"
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "cuda/rf_loss.h"
#include "kernels/gemm.h"
#include "kernels/rf_loss.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

std::mt19937 rng(7);

template <class T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  if (!v.empty()) cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

bool close(double got, double want, double rel) { return std::fabs(got - want) <= rel * std::fabs(want) + 1e-7; }

// tiny_p: every flag logit near -60 (h's first column 1, w_rf's -60), so p(flag) ~ 1e-30: the
// red-flag term's log(1 - p) must come from the log-odds (log(s_rest) - log(s) rounds it to 0,
// and the any-aggregation's loss -log(1 - prod(1 - p)) to infinity).
// alpha_rf < 0: the red-flag term maximised, as the white-box attacks weigh it (their objective
// is ce - lambda red_flag); every coefficient changes sign with it.
void run_case(int V, int H, int K, rf::RfAggregation agg, rf::DType dtype, int chunk, bool tiny_p = false, int n_rows = 41,
              float alpha_rf = 1.f) {
  // n_rows trained rows: benign KL, after KL, and red-flag groups of 1 to 4 rows (single: 1).
  const int Nr = 9;
  std::vector<rf::RfLossRow> rows;
  int group = 0;
  while (rows.size() < size_t(n_rows)) {
    const int kind = int(rows.size()) % 3;
    if (kind == 2) {
      const int size = agg == rf::RfAggregation::single ? 1 : 1 + int(rng() % 4);
      const int flag = int(rng() % uint32_t(K));
      for (int j = 0; j < size && rows.size() < size_t(n_rows); ++j) rows.push_back({rf::RfLossKind::red_flag, -1, group, flag});
      ++group;
    } else {
      rows.push_back({kind == 0 ? rf::RfLossKind::benign_kl : rf::RfLossKind::after_kl, int32_t(rng() % Nr), -1, 0});
    }
  }
  const int N = int(rows.size());
  std::vector<float> h = rf::test::randn(rng, size_t(N) * H, 1.f), h_ref = rf::test::randn(rng, size_t(Nr) * H, 1.f);
  std::vector<float> W = rf::test::randn(rng, size_t(V) * H, 1.f / std::sqrt(float(H)) * 2.5f);
  std::vector<float> w_rf = rf::test::randn(rng, size_t(K) * H, 1.f / std::sqrt(float(H)) * 2.5f);
  if (tiny_p) {
    for (int r = 0; r < N; ++r) h[size_t(r) * H] = 1.f;
    for (int r = 0; r < Nr; ++r) h_ref[size_t(r) * H] = 1.f;
    for (int k = 0; k < K; ++k) w_rf[size_t(k) * H] = -60.f;
  }
  rf::RfLossOptions opt;
  for (int k = 0; k < K; ++k) opt.flag_tokens.push_back(V - 1 - 7 * k);
  opt.aggregation = agg;
  opt.alpha_benign = 2.f, opt.alpha_rf = alpha_rf, opt.alpha_after = 0.5f;
  opt.chunk = chunk;

  // CPU.
  rf::ThreadPool pool(2);
  rf::PackedWeight packed;
  rf::pack_weight(packed, W.data(), rf::SrcType::f32, V, H, false, dtype);
  std::vector<float> dh_cpu(size_t(N) * H), dw_cpu(size_t(K) * H, 0.f);
  rf::RfLossOptions cpu_opt = opt;
  cpu_opt.chunk = 0;
  const rf::RfLossResult cpu = rf::rf_loss(pool, h.data(), N, h_ref.data(), Nr, H, packed, w_rf.data(), rows.data(), cpu_opt,
                                           dh_cpu.data(), dw_cpu.data());

  // Device: W in the same element type.
  void* dW = nullptr;
  if (dtype == rf::DType::f32) {
    dW = to_device(W);
  } else {
    std::vector<uint16_t> wb(W.size());
    for (size_t i = 0; i < W.size(); ++i) wb[i] = rf::f32_to_bf16(W[i]);
    dW = to_device(wb);
  }
  float *dh_d = to_device(std::vector<float>(size_t(N) * H, NAN)), *dw_d = to_device(std::vector<float>(size_t(K) * H, 0.f));
  float *h_d = to_device(h), *href_d = to_device(h_ref), *wrf_d = to_device(w_rf);
  rf::cuda::GemmContext gemm;
  rf::cuda::LossScratch scratch;
  const rf::RfLossResult gpu =
      rf::cuda::rf_loss(gemm, h_d, N, href_d, Nr, H, dW, dtype, V, wrf_d, rows.data(), opt, dh_d, dw_d, nullptr, &scratch);
  const std::vector<float> dh_gpu = to_host(dh_d, size_t(N) * H), dw_gpu = to_host(dw_d, size_t(K) * H);
  for (void* p : {dW, static_cast<void*>(dh_d), static_cast<void*>(dw_d), static_cast<void*>(h_d), static_cast<void*>(href_d),
                  static_cast<void*>(wrf_d)})
    cudaFree(p);

  const bool b16 = dtype == rf::DType::bf16;
  const std::string tag = "V " + std::to_string(V) + " H " + std::to_string(H) + " K " + std::to_string(K) + " " +
                          (agg == rf::RfAggregation::any ? "any" : agg == rf::RfAggregation::mean ? "mean" : "single") +
                          (b16 ? " bf16" : " f32") + " chunk " + std::to_string(chunk) + (tiny_p ? " p(flag) ~ 1e-30" : "") +
                          (n_rows != 41 ? " rows " + std::to_string(n_rows) : "") +
                          (alpha_rf != 1.f ? " alpha_rf " + std::to_string(alpha_rf) : "");
  const bool same_rounding = rf::active_isa() == rf::Isa::avx512;
  const double rel = !b16 ? 1e-5 : same_rounding ? 1e-4 : 3e-2;
  const double rel_kl = !b16 ? 1e-5 : same_rounding ? 1e-3 : 3e-2;
  check(close(gpu.benign, cpu.benign, rel_kl) && close(gpu.after, cpu.after, rel_kl) && close(gpu.red_flag, cpu.red_flag, rel) &&
            close(gpu.total, cpu.total, rel_kl) && gpu.n_groups == cpu.n_groups,
        tag + ": loss terms equal the CPU's (benign " + std::to_string(gpu.benign) + " / " + std::to_string(cpu.benign) +
            ", red_flag " + std::to_string(gpu.red_flag) + " / " + std::to_string(cpu.red_flag) + ", after " +
            std::to_string(gpu.after) + " / " + std::to_string(cpu.after) + ")");
  const double e_dh = rel_l2(dh_gpu, dh_cpu), e_dw = rel_l2(dw_gpu, dw_cpu);
  check(e_dh <= (!b16 ? 1e-4 : same_rounding ? 1e-2 : 3e-2), tag + ": dh equals the CPU's (rel L2 " + std::to_string(e_dh) + ")");
  check(e_dw <= (!b16 || same_rounding ? 1e-4 : 3e-2), tag + ": dw_rf equals the CPU's (rel L2 " + std::to_string(e_dw) + ")");
  // The scratch the call reports (and the bench's memory figure relies on) is what it allocated.
  check(gpu.scratch_bytes == scratch.bytes(), tag + ": scratch_bytes " + std::to_string(gpu.scratch_bytes) +
                                                  " is the scratch allocated, " + std::to_string(scratch.bytes()));
}

// ce_loss (cross-entropy rows: the lm objective and full fine-tuning) against float64 on the same
// inputs: 41 rows in chunks of 8, a trained flag row or none, with and without the LM head's own
// gradient dW. The reference follows the device's roundings of its inputs: with bf16 W the
// logits' product reads h rounded to bf16 (the flag columns h itself, through w_rf), so the loss
// and dw_rf (formed from the f32 logits) within 1e-5 / 1e-4; dh and dW read dz rounded to bf16
// (and dW h too): 3e-3 relative L2 (7e-4 seen under the emulation; a bf16 rounding is up to
// 2^-9 relative). f32 W: 1e-5 for the loss, 1e-4 for the rest (under 1e-6 seen).
void ce_case(rf::DType dtype, int K, bool with_dW) {
  const int N = 41, V = 1001, H = 80, chunk = 8;
  const float weight = 0.5f;
  const bool b16 = dtype == rf::DType::bf16;
  std::vector<float> h = rf::test::randn(rng, size_t(N) * H, 1.f);
  std::vector<float> W = rf::test::randn(rng, size_t(V) * H, 2.5f / std::sqrt(float(H)));
  const std::vector<float> w_rf = rf::test::randn(rng, size_t(K) * H, 2.5f / std::sqrt(float(H)));
  const std::vector<int> flags = K > 0 ? std::vector<int>{V - 3} : std::vector<int>{};
  std::vector<int32_t> targets(static_cast<size_t>(N));
  for (int32_t& t : targets) t = int32_t(rng() % uint32_t(V));
  targets[0] = V - 3;  // a row whose target is the flag column
  auto q = [&](float x) { return b16 ? double(rf::bf16_to_f32(rf::f32_to_bf16(x))) : double(x); };

  // Reference: z, p, loss, dz; dh = dz W* (flag rows w_rf), dw_rf += dz[:, flag] h, dW += dz^T h.
  double loss = 0;
  std::vector<double> dh(size_t(N) * H, 0.0), dw(size_t(K) * H, 0.0), dWr(size_t(V) * H, 0.0), z(size_t(V), 0.0);
  for (int r = 0; r < N; ++r) {
    const float* hr = h.data() + size_t(r) * H;
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; ++v) {
      double acc = 0;
      for (int i = 0; i < H; ++i) acc += K > 0 && v == flags[0] ? double(hr[i]) * w_rf[size_t(i)] : q(hr[i]) * q(W[size_t(v) * H + i]);
      z[size_t(v)] = acc;
      mx = std::max(mx, acc);
    }
    for (int v = 0; v < V; ++v) sum += std::exp(z[size_t(v)] - mx);
    const double lse = mx + std::log(sum);
    loss += lse - z[size_t(targets[size_t(r)])];
    for (int v = 0; v < V; ++v) {
      const double dz = weight * (std::exp(z[size_t(v)] - lse) - (v == targets[size_t(r)] ? 1.0 : 0.0));
      const bool flag = K > 0 && v == flags[0];
      for (int i = 0; i < H; ++i) {
        dh[size_t(r) * H + i] += dz * (flag ? double(w_rf[size_t(i)]) : q(W[size_t(v) * H + i]));
        if (with_dW) dWr[size_t(v) * H + i] += dz * q(hr[i]);
        if (flag) dw[size_t(i)] += dz * hr[i];
      }
    }
  }

  void* dWt = nullptr;
  if (b16) {
    std::vector<uint16_t> wb(W.size());
    for (size_t i = 0; i < W.size(); ++i) wb[i] = rf::f32_to_bf16(W[i]);
    dWt = to_device(wb);
  } else {
    dWt = to_device(W);
  }
  float *h_d = to_device(h), *dh_d = to_device(std::vector<float>(size_t(N) * H, NAN)), *wrf_d = to_device(w_rf),
        *dw_d = to_device(std::vector<float>(size_t(K) * H, 0.f)), *dW_d = to_device(std::vector<float>(with_dW ? size_t(V) * H : 0, 0.f));
  rf::cuda::GemmContext gemm;
  const double got = rf::cuda::ce_loss(gemm, h_d, N, H, dWt, dtype, V, K > 0 ? wrf_d : nullptr, flags, targets.data(), weight, dh_d,
                                       K > 0 ? dw_d : nullptr, chunk, nullptr, with_dW ? dW_d : nullptr);
  const std::vector<float> dh_g = to_host(dh_d, dh.size()), dw_g = to_host(dw_d, dw.size()), dW_g = to_host(dW_d, with_dW ? dWr.size() : 0);
  for (void* p : {dWt, static_cast<void*>(h_d), static_cast<void*>(dh_d), static_cast<void*>(wrf_d), static_cast<void*>(dw_d),
                  static_cast<void*>(dW_d)})
    cudaFree(p);
  const double e_dh = rf::test::rel_l2(dh_g.data(), dh.data(), dh.size());
  const double e_dw = K > 0 ? rf::test::rel_l2(dw_g.data(), dw.data(), dw.size()) : 0.0;
  const double e_dW = with_dW ? rf::test::rel_l2(dW_g.data(), dWr.data(), dWr.size()) : 0.0;
  const std::string tag = std::string("ce_loss ") + (b16 ? "bf16" : "f32") + " K " + std::to_string(K) + (with_dW ? " with dW" : "") +
                          " chunk 8";
  char buf[160];
  std::snprintf(buf, sizeof buf, ": loss %.9g / %.9g, dh %.3g, dw_rf %.3g, dW %.3g", got, loss, e_dh, e_dw, e_dW);
  check(close(got, loss, 1e-5) && e_dh <= (b16 ? 3e-3 : 1e-4) && e_dw <= 1e-4 && e_dW <= (b16 ? 3e-3 : 1e-4),
        tag + " against float64" + buf);
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_rf_loss: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  for (rf::DType dtype : {rf::DType::f32, rf::DType::bf16})
    for (int K : {1, 3})
      for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean, rf::RfAggregation::single})
        run_case(1001, 80, K, agg, dtype, 8);
  run_case(1001, 80, 3, rf::RfAggregation::mean, rf::DType::f32, 64, false, 600);  // dw_rf over 3 parts of rows
  run_case(128256, 256, 1, rf::RfAggregation::any, rf::DType::bf16, 0);
  run_case(128256, 256, 3, rf::RfAggregation::mean, rf::DType::f32, 16);
  for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean}) run_case(1001, 80, 3, agg, rf::DType::f32, 8, true);
  for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean, rf::RfAggregation::single})
    run_case(1001, 80, 3, agg, rf::DType::f32, 8, false, 41, -0.75f);
  for (rf::DType dtype : {rf::DType::f32, rf::DType::bf16})
    for (int K : {0, 1})
      for (bool with_dW : {false, true}) ce_case(dtype, K, with_dW);
  return rf::test::finish("cuda_rf_loss");
}
