// The CUDA row kernels and the fused pick epilogue (native/cuda/ops.h) against the CPU kernels
// on the same inputs, on a GPU machine; elsewhere it says no device was found and exits 0.
//
// Shapes are odd on purpose: row widths not multiples of the block (576, 1000, 4097), head_dim
// 64/80/128, a vocabulary of 49157 (not a multiple of 64) and rows with many tied maxima, and one
// past 2^20 (the pick's other walk).
// Tolerances: reductions sum in another order than the CPU's vectorised loops, so norms agree to
// 1e-5 * (1 + |ref|) per element (a few f32 ulps of the statistics), rope/activations too
// (same formula, device expf/tanhf within 2 ulps); the pick's log-probabilities to
// 1e-5 * (1 + |x|) and p(<rf>) to 1e-5 relative of float64 (against the CPU's, whose f32 sum of a
// million logits is off by about that much itself, the large vocabulary failed). Greedy picks must be equal (the first maximum on both). Sampled picks use
// the same splitmix64 draw; the chunked inverse CDF sums in another order, so a draw within
// rounding of a boundary between two tokens may fall either side: at most 0.2% of rows may
// differ (observed: none is expected at these sizes).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda.h"
#include "cuda/ops.h"
#include "kernels/ops.h"
#include "model/decode.h"
#include "tests/check.h"
#include "tests/cuda_test.h"
#include "tests/random_model.h"

using rf::test::check;
using namespace rf::test::cuda;

namespace {

// Worst |a - b| / (1 + |b|): relative for large values, absolute for small ones. (A plain relative
// error with a 1e-6 floor failed under the CPU emulation on elements near zero: gelu_new of a
// large negative input, a layernorm output near the mean, where both sides agree to 1e-7.)
double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (1 + std::fabs(double(b[i]))));
  return worst;
}

void test_norms() {
  for (int n : {576, 1000, 4097}) {
    const int rows = 7;
    auto x = randn(size_t(rows) * n, 2.f), w = randn(n), b = randn(n);
    std::vector<float> want(x.size()), want_ln(x.size());
    for (int r = 0; r < rows; ++r) {
      rf::rmsnorm_forward(want.data() + size_t(r) * n, x.data() + size_t(r) * n, w.data(), n, 1e-5f);
      rf::layernorm_forward(want_ln.data() + size_t(r) * n, x.data() + size_t(r) * n, w.data(), b.data(), n, 1e-5f);
    }
    Dev dx = upload(x), dw = upload(w), db = upload(b), out(x.size() * 4);
    rf::cuda::rmsnorm_rows(out.f(), dx.f(), dw.f(), rows, n, 1e-5f, nullptr);
    const double e1 = max_rel(download<float>(out, x.size()), want);
    rf::cuda::layernorm_rows(out.f(), dx.f(), dw.f(), db.f(), rows, n, 1e-5f, nullptr);
    const double e2 = max_rel(download<float>(out, x.size()), want_ln);
    check(e1 < 1e-5 && e2 < 1e-5, "norms n=" + std::to_string(n) + ": rms rel " + std::to_string(e1) + ", layer rel " + std::to_string(e2));
    // With a bf16 output as well: the f32 output unchanged, the bf16 one its rf::f32_to_bf16 bits.
    Dev out2(x.size() * 4), outb(x.size() * 2);
    for (bool layer : {false, true}) {
      if (layer) {
        rf::cuda::layernorm_rows(out.f(), dx.f(), dw.f(), db.f(), rows, n, 1e-5f, nullptr);
        rf::cuda::layernorm_rows(out2.f(), dx.f(), dw.f(), db.f(), rows, n, 1e-5f, nullptr, static_cast<__nv_bfloat16*>(outb.p));
      } else {
        rf::cuda::rmsnorm_rows(out.f(), dx.f(), dw.f(), rows, n, 1e-5f, nullptr);
        rf::cuda::rmsnorm_rows(out2.f(), dx.f(), dw.f(), rows, n, 1e-5f, nullptr, static_cast<__nv_bfloat16*>(outb.p));
      }
      const std::vector<float> f = download<float>(out, x.size()), f2 = download<float>(out2, x.size());
      std::vector<uint16_t> bits(x.size());
      cudaMemcpy(bits.data(), outb.p, bits.size() * 2, cudaMemcpyDeviceToHost);
      long differ = 0;
      for (size_t i = 0; i < f.size(); ++i) differ += std::memcmp(&f[i], &f2[i], 4) != 0 || bits[i] != rf::f32_to_bf16(f[i]);
      check(differ == 0, std::string(layer ? "layernorm" : "rmsnorm") + " n=" + std::to_string(n) +
                             " with a bf16 output: f32 the same bits, bf16 = f32_to_bf16 of it (" + std::to_string(differ) +
                             " differ)");
      // The bf16 output alone (out null): the same bf16 bits.
      Dev outc(x.size() * 2);
      if (layer)
        rf::cuda::layernorm_rows(nullptr, dx.f(), dw.f(), db.f(), rows, n, 1e-5f, nullptr, static_cast<__nv_bfloat16*>(outc.p));
      else
        rf::cuda::rmsnorm_rows(nullptr, dx.f(), dw.f(), rows, n, 1e-5f, nullptr, static_cast<__nv_bfloat16*>(outc.p));
      std::vector<uint16_t> alone(x.size());
      cudaMemcpy(alone.data(), outc.p, alone.size() * 2, cudaMemcpyDeviceToHost);
      check(cudaGetLastError() == cudaSuccess && alone == bits,
            std::string(layer ? "layernorm" : "rmsnorm") + " n=" + std::to_string(n) + " with the bf16 output alone: the same bits");
    }
  }
}

void test_rope_and_activations() {
  for (int hd : {64, 80, 128}) {
    const int rows = 5, heads = 6;
    const long stride = long(heads) * hd + 17;  // rows of a wider (fused) buffer
    auto x = randn(size_t(rows) * stride), cs = randn(size_t(rows) * hd / 2), sn = randn(size_t(rows) * hd / 2);
    std::vector<float> want = x;
    for (int r = 0; r < rows; ++r) rf::rope_forward(want.data() + r * stride, heads, hd, cs.data() + r * hd / 2, sn.data() + r * hd / 2);
    Dev dx = upload(x), dc = upload(cs), ds = upload(sn);
    rf::cuda::rope_rows(dx.f(), stride, rows, heads, hd, dc.f(), ds.f(), nullptr);
    const double e = max_rel(download<float>(dx, x.size()), want);
    check(e < 1e-5, "rope head_dim=" + std::to_string(hd) + ": rel " + std::to_string(e));
  }
  // Qwen3's per-head norms in place on a fused row: q's 6 heads then k's 2, v untouched.
  for (int hd : {64, 128}) {
    const int rows = 5, nq = 6, nk = 2;
    const long stride = long(nq + 2 * nk) * hd + 17;
    auto x = randn(size_t(rows) * stride, 2.f), wq = randn(size_t(hd), 0.3f, 1.f), wk = randn(size_t(hd), 0.3f, 1.f);
    std::vector<float> want = x;
    for (int r = 0; r < rows; ++r)
      for (int h = 0; h < nq + nk; ++h) {
        float* head = want.data() + r * stride + long(h) * hd;
        rf::rmsnorm_forward(head, head, h < nq ? wq.data() : wk.data(), hd, 1e-6f);
      }
    Dev dx = upload(x), dq = upload(wq), dk = upload(wk);
    rf::cuda::qk_norm_rows(dx.f(), stride, rows, nq, nk, hd, dq.f(), dk.f(), 1e-6f, nullptr);
    const double e = max_rel(download<float>(dx, x.size()), want);
    check(e < 1e-5, "qk_norm_rows head_dim=" + std::to_string(hd) + " (v and the padding untouched): rel " + std::to_string(e));
  }
  const long n = 100003;
  auto g = randn(n, 3.f), u = randn(n), x = randn(n, 3.f);
  std::vector<float> want(n), want_gelu = x;
  rf::swiglu_forward(want.data(), g.data(), u.data(), int(n));
  rf::gelu_new_forward(want_gelu.data(), int(n));
  Dev dg = upload(g), du = upload(u), dx = upload(x), out(n * 4);
  rf::cuda::swiglu(out.f(), dg.f(), du.f(), n, nullptr);
  rf::cuda::gelu_new(dx.f(), n, nullptr);
  const double e1 = max_rel(download<float>(out, n), want), e2 = max_rel(download<float>(dx, n), want_gelu);
  check(e1 < 1e-5 && e2 < 1e-5, "swiglu rel " + std::to_string(e1) + ", gelu_new rel " + std::to_string(e2));
  // gelu_new of a bf16 input into its own output: in place on the widened values, bit for bit.
  std::vector<uint16_t> bits(static_cast<size_t>(n));
  std::vector<float> widened(static_cast<size_t>(n));
  for (long i = 0; i < n; ++i) bits[size_t(i)] = rf::f32_to_bf16(x[size_t(i)]), widened[size_t(i)] = rf::bf16_to_f32(bits[size_t(i)]);
  // Each also rounding its output to bf16 (the trainer's dW operand): f32_to_bf16 of its f32 output.
  // In place, the input's bf16 copy too (the trainer's trace copy): f32_to_bf16 of the input.
  Dev dw = upload(widened), db(n * 2), out2(n * 4), a16(n * 2), b16(n * 2), in16(n * 2);
  cudaMemcpy(db.p, bits.data(), size_t(n) * 2, cudaMemcpyHostToDevice);
  rf::cuda::gelu_new(dw.f(), n, nullptr, static_cast<__nv_bfloat16*>(a16.p), static_cast<__nv_bfloat16*>(in16.p));
  rf::cuda::gelu_new(out2.f(), static_cast<const __nv_bfloat16*>(db.p), n, nullptr, static_cast<__nv_bfloat16*>(b16.p));
  const std::vector<float> a = download<float>(dw, n), b = download<float>(out2, n);
  check(std::memcmp(a.data(), b.data(), size_t(n) * 4) == 0, "gelu_new of a bf16 input: in place on the widened values, bit for bit");
  std::vector<uint16_t> ra(static_cast<size_t>(n)), rb(static_cast<size_t>(n));
  cudaMemcpy(ra.data(), a16.p, size_t(n) * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(rb.data(), b16.p, size_t(n) * 2, cudaMemcpyDeviceToHost);
  std::vector<uint16_t> rin(static_cast<size_t>(n));
  cudaMemcpy(rin.data(), in16.p, size_t(n) * 2, cudaMemcpyDeviceToHost);
  long differ = 0;
  for (long i = 0; i < n; ++i)
    differ += ra[size_t(i)] != rf::f32_to_bf16(a[size_t(i)]) || rb[size_t(i)] != rf::f32_to_bf16(b[size_t(i)]) ||
              rin[size_t(i)] != bits[size_t(i)];
  check(differ == 0, "gelu_new's bf16 outputs and input copy: f32_to_bf16 of the f32 values (" + std::to_string(differ) + " differ)");
}

// rows rows of vocabulary V; past 2^20 (kPickThreads chunks of more than kPickMaxCandidates) the
// whole-vocabulary draw's walk runs in the owner thread alone, not through shared memory.
void test_pick(int V, int rows) {
  const std::vector<int> flags = {777, 5, V - 1};  // <rf> and two category flags
  const int K = int(flags.size());
  auto z = randn(size_t(rows) * V, 2.5f);
  // Tied maxima on some rows: the first one must win on both sides.
  for (int r = 0; r < rows; r += 50) {
    float* row = z.data() + size_t(r) * V;
    const float top = *std::max_element(row, row + V) + 1.f;
    row[V - 3] = row[V / 2] = row[11] = top;
  }
  for (bool sampled : {false, true}) {
    std::vector<rf::cuda::DevicePick> params(rows);
    for (int r = 0; r < rows; ++r) params[r] = {sampled ? (r % 3 == 0 ? 0.7f : 1.3f) : 0.f, 1234567ull + r % 7, uint64_t(r)};
    const int top_n = 5;  // each row's 5 most likely tokens too
    Dev dz = upload(z), dp(rows * sizeof(rf::cuda::DevicePick)), dt(rows * 4), dl(rows * 4), dr(rows * 4), df(K * 4),
        dpf(size_t(rows) * K * 4), dti(size_t(rows) * top_n * 4), dtl(size_t(rows) * top_n * 4);
    cudaMemcpy(dp.p, params.data(), rows * sizeof(rf::cuda::DevicePick), cudaMemcpyHostToDevice);
    cudaMemcpy(df.p, flags.data(), K * 4, cudaMemcpyHostToDevice);
    Dev dscratch(rf::cuda::pick_scratch_bytes(rows, V));
    // Greedy rows skip the weights' launch (whole_draws false), as a greedy decode step does.
    bool whole_draws = false;
    for (const rf::cuda::DevicePick& p : params) whole_draws |= rf::cuda::pick_draws_whole(p);
    check(whole_draws == sampled, std::string("pick ") + (sampled ? "sampled" : "greedy") + ": pick_draws_whole says so");
    rf::cuda::pick_rows(dz.f(), rows, V, static_cast<rf::cuda::DevicePick*>(dp.p), static_cast<const int*>(df.p), K,
                        static_cast<uint32_t*>(dt.p), dl.f(), dr.f(), dpf.f(), top_n, static_cast<uint32_t*>(dti.p), dtl.f(),
                        dscratch.p, nullptr, whole_draws);
    std::vector<uint32_t> tok(rows), top_ids(size_t(rows) * top_n);
    cudaMemcpy(tok.data(), dt.p, rows * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(top_ids.data(), dti.p, top_ids.size() * 4, cudaMemcpyDeviceToHost);
    const std::vector<float> top_lp = download<float>(dtl, size_t(rows) * top_n);
    int bad_top = 0;
    const std::vector<float> lp = download<float>(dl, rows), prf = download<float>(dr, rows), pf = download<float>(dpf, size_t(rows) * K);
    int differ = 0, bad_scores = 0;
    rf::PickScratch scratch;
    for (int r = 0; r < rows; ++r) {
      rf::PickParams pp;
      pp.temperature = params[r].temperature;
      pp.seed = params[r].seed;
      std::vector<float> want_flags(K);
      std::vector<uint32_t> want_ids(top_n);
      std::vector<float> want_lp(top_n);
      const float* row = z.data() + size_t(r) * V;
      const rf::Pick want = rf::logits_pick(row, V, pp, params[r].counter, rf::Flags(flags, want_flags.data()), top_n,
                                            want_ids.data(), want_lp.data(), scratch);
      // The scores against float64 (the CPU's f32 sum of a million terms is itself off by ~1e-5).
      const double mx = *std::max_element(row, row + V);
      double se = 0;
      for (int i = 0; i < V; ++i) se += std::exp(double(row[i]) - mx);
      const double lse = mx + std::log(se);
      const auto logp = [&](uint32_t id) { return double(row[id]) - lse; };
      for (int i = 0; i < top_n; ++i) {
        const double ref = logp(want_ids[i]);
        if (top_ids[size_t(r) * top_n + i] != want_ids[i] || std::fabs(top_lp[size_t(r) * top_n + i] - ref) > 1e-5 * (1 + std::fabs(ref)))
          ++bad_top;
      }
      double p_any = 0;
      for (int k = 0; k < K; ++k) {
        const double ref = std::exp(logp(uint32_t(flags[k])));
        p_any += ref;
        if (std::fabs(pf[size_t(r) * K + k] - ref) > 1e-5 * ref + 1e-30) ++bad_scores;
      }
      if (tok[r] != want.token) {
        ++differ;
        continue;
      }
      const double ref_lp = logp(tok[r]);
      if (std::fabs(lp[r] - ref_lp) > 1e-5 * (1 + std::fabs(ref_lp)) || std::fabs(prf[r] - p_any) > 1e-5 * p_any + 1e-30) ++bad_scores;
    }
    const std::string tag = std::string(sampled ? "sampled" : "greedy") + " (vocabulary " + std::to_string(V) + ")";
    check(sampled ? differ <= rows / 500 : differ == 0, "pick " + tag + ": " + std::to_string(differ) + " of " + std::to_string(rows) + " tokens differ from the CPU's");
    check(bad_scores == 0, "pick " + tag + ": log-probability, each flag's p and their total as float64's (" + std::to_string(bad_scores) + " off)");
    check(bad_top == 0, "pick " + tag + ": the top 5 tokens the CPU's, their log-probabilities float64's (" + std::to_string(bad_top) + " off)");
  }
}

// Top-k / top-p rows against rf::logits_pick: the same token except at near-ties of the inverse
// CDF (at most 1 in 500, as for the whole-vocabulary draw), the fallback token exactly where the
// CPU's candidates exceed kPickMaxCandidates (a top_k past it, or a top-p nucleus whose best 2048
// hold less than top_p of the mass), and the log-probability and flag p's as for every row.
void test_pick_nucleus() {
  const int V = 49157, rows = 600;
  const std::vector<int> flags = {777, V - 1};
  const int K = int(flags.size());
  auto z = randn(size_t(rows) * V, 2.5f);
  for (int r = 0; r < rows; r += 25) {  // ties inside the candidates: the lower id first
    float* row = z.data() + size_t(r) * V;
    const float top = *std::max_element(row, row + V);
    row[40] = row[V - 2] = row[9000] = top - 0.25f;
  }
  const int top_ks[] = {0, 1, 7, 40, 256, 2048, 3000};
  for (int r = 0; r < rows; r += 3) {  // the maximum tied four ways: with top-k 1, ties at the k-th key
    if (r % 7 != 1 && r % 7 != 2) continue;
    float* row = z.data() + size_t(r) * V;
    const float top = *std::max_element(row, row + V);
    row[12] = row[30000] = row[V - 9] = top;
  }
  const float top_ps[] = {1.f, 0.5f, 0.9f, 0.999f};
  std::vector<rf::cuda::DevicePick> params(rows);
  for (int r = 0; r < rows; ++r) {
    rf::cuda::DevicePick& p = params[size_t(r)];
    p = {r % 5 == 0 ? 0.6f : r % 5 == 1 ? 3.0f : 1.f, 99ull + uint64_t(r % 11), uint64_t(r)};
    p.top_k = top_ks[r % 7];
    p.top_p = top_ps[(r / 7) % 4];
    if (p.top_k == 0 && p.top_p == 1.f) p.top_p = 0.8f;  // every row here is a nucleus row
  }
  Dev dz = upload(z), dp(rows * sizeof(rf::cuda::DevicePick)), dt(rows * 4), dl(rows * 4), dr(rows * 4), df(K * 4),
      dpf(size_t(rows) * K * 4);
  cudaMemcpy(dp.p, params.data(), rows * sizeof(rf::cuda::DevicePick), cudaMemcpyHostToDevice);
  cudaMemcpy(df.p, flags.data(), K * 4, cudaMemcpyHostToDevice);
  Dev dscratch(rf::cuda::pick_scratch_bytes(rows, V));
  rf::cuda::pick_rows(dz.f(), rows, V, static_cast<rf::cuda::DevicePick*>(dp.p), static_cast<const int*>(df.p), K,
                      static_cast<uint32_t*>(dt.p), dl.f(), dr.f(), dpf.f(), 0, nullptr, nullptr, dscratch.p, nullptr);
  std::vector<uint32_t> tok(rows);
  cudaMemcpy(tok.data(), dt.p, rows * 4, cudaMemcpyDeviceToHost);
  const std::vector<float> lp = download<float>(dl, rows), prf = download<float>(dr, rows), pf = download<float>(dpf, size_t(rows) * K);
  int differ = 0, bad_scores = 0, bad_fallback = 0, fallbacks = 0, ambiguous = 0;
  rf::PickScratch scratch;
  for (int r = 0; r < rows; ++r) {
    const rf::cuda::DevicePick& d = params[size_t(r)];
    const float* row = z.data() + size_t(r) * V;
    rf::PickParams pp;
    pp.temperature = d.temperature;
    pp.seed = d.seed;
    pp.top_k = d.top_k;
    pp.top_p = d.top_p;
    std::vector<float> want_flags(K);
    const rf::Pick want = rf::logits_pick(row, V, pp, d.counter, rf::Flags(flags, want_flags.data()), 0, nullptr, nullptr, scratch);
    // Does the CPU's candidate set exceed the device's limit?
    bool over = d.top_k > rf::cuda::kPickMaxCandidates;
    if (d.top_k == 0) {
      const float mx = *std::max_element(row, row + V);
      const float inv_t = 1.f / d.temperature;
      std::vector<double> w(static_cast<size_t>(V));
      double total = 0;
      for (int i = 0; i < V; ++i) total += w[size_t(i)] = std::exp(double((row[i] - mx) * inv_t));
      std::sort(w.begin(), w.end(), std::greater<double>());
      double mass = 0;
      for (int i = 0; i < rf::cuda::kPickMaxCandidates; ++i) mass += w[size_t(i)];
      over = mass < double(d.top_p) * total;
      if (std::fabs(mass - double(d.top_p) * total) <= 1e-9 * total) {
        ++ambiguous;
        continue;
      }
    }
    const bool fell_back = tok[size_t(r)] == rf::cuda::kPickFallback;
    fallbacks += fell_back;
    if (fell_back != over) ++bad_fallback;
    for (int k = 0; k < K; ++k)
      if (std::fabs(pf[size_t(r) * K + k] - want_flags[size_t(k)]) > 1e-5 * want_flags[size_t(k)] + 1e-30) ++bad_scores;
    if (fell_back) continue;
    if (tok[size_t(r)] != want.token) {
      ++differ;
      continue;
    }
    if (std::fabs(lp[size_t(r)] - want.logprob) > 1e-5 * (1 + std::fabs(want.logprob))) ++bad_scores;
  }
  check(differ <= rows / 500 + 1, "pick top-k/top-p: " + std::to_string(differ) + " of " + std::to_string(rows) + " tokens differ from the CPU's");
  check(bad_fallback == 0 && fallbacks > 0, "pick top-k/top-p: the host fallback exactly where the candidates exceed " +
                                                std::to_string(rf::cuda::kPickMaxCandidates) + " (" + std::to_string(fallbacks) +
                                                " rows, " + std::to_string(bad_fallback) + " wrong, " + std::to_string(ambiguous) + " at the edge)");
  check(bad_scores == 0, "pick top-k/top-p: log-probability and flag p's equal the CPU's (" + std::to_string(bad_scores) + " off)");
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_ops: no CUDA device visible; skipped\n");
    return 0;
  }
  rng().seed(424242);
  test_norms();
  test_rope_and_activations();
  test_pick(49157, 2000);
  test_pick((1 << 20) + 4099, 24);
  test_pick_nucleus();
  return rf::test::finish("cuda_ops");
}
