// The fused decode step (model/decode.h) against simple float64 references:
//  - logits_pick, greedy (V = 1, 7, 1000, 50257; plain rows, ties, all-equal rows, values of
//    magnitude 1e3 - 2e4): the token is the first maximum, logprob / p(<rf>) equal the float64
//    log-softmax / softmax of the row (p(<rf>) = 0 for rf_token = -1), top-n equals a float64
//    stable sort (value descending, id ascending on ties), padded with id 0 / -inf past the
//    vocabulary;
//  - logits_pick, sampling: reproducible per (seed, counter) whatever the scratch, top_k = 1 is
//    greedy, the token is always among the k largest / inside the float64 nucleus (of the
//    top-k with both), logprob / p(<rf>) are those of the temperature-1 softmax, and the
//    empirical frequencies over consecutive counters match the float64 (truncated,
//    renormalised) softmax(z / T) within 4 standard errors: per token on a 6-token row
//    (20000 draws), per rank bucket on flat 1000- and 5000-token rows (6000 / 1500 draws)
//    whose nucleus outgrows the first 256 candidates logits_pick examines;
//  - decode_step on a small random Llama-style model (threads 1 and 2): a batch of prompts of
//    lengths 3, 11, 7, then a second step of one-token continuations plus a new prompt, greedy
//    and sampled, with top_n 4 and top_n > vocab: bit-for-bit equal to forward(last) on the
//    same batch + logits_pick with counter = the new token's position; equal to each item run
//    alone; equal to forward(last) of the whole sequence + a float64 argmax / log-softmax;
//  - token_scores equals p(<rf>) and the next token's log-probability (NaN after each item's
//    last token) in float64 from Model::forward(LogitsMode::all), over 97, 64, 65 and 150 rows
//    (the LM head runs in chunks of 64), with and without a trained red-flag head row, with an
//    item whose cache already holds a prefix; without a red-flag token (-1) p is 0.
//
// Tolerances. logits_pick computes lse = logsumexp(z) in f32 (vectorised exp, f32 sum) and
// returns z[token] - lse in f32, so against float64 the log-probabilities may differ by the
// f32 rounding of lse and of the result plus the exp/sum error: we allow
//   tol(z) = 1e-5 * (1 + |ref|) + 2 * 2^-23 * max|z|
// (1e-5 absolute on ordinary rows; two f32 ulps of the largest magnitude on rows of values
// around 1e3 - 1e4, whose own f32 rounding is far above 1e-5). p(<rf>) = exp(log p) so its
// relative error is the log-probability's absolute error: |p - ref| <= tol * ref + 1e-37
// (the floor covers f32 underflow of tiny probabilities). Through the model, logits are of
// order 5 and the same bound gives ~1e-5 absolute on logprob and 1e-5 relative on p(<rf>).
// Batched vs alone: Model::forward itself is not bit-for-bit batch-invariant (its logits move
// by up to ~2e-6, a few f32 ulps, with the batch composition), so tokens must be equal and
// logprobs within 2 dz + 1e-6, dz being the measured max |logit difference| of the two
// forward(last) rows: the decode step may add at most 1e-6 of its own.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/decode.h"
#include "model/model.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::randn;

namespace {

std::mt19937 rng(20250301);

// ---------------------------------------------------------------------------------------
// float64 references over one f32 row.

double lse64(const float* z, int n) {
  double mx = z[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, double(z[i]));
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::exp(double(z[i]) - mx);
  return mx + std::log(s);
}

int argmax64(const float* z, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (double(z[i]) > double(z[best])) best = i;
  return best;
}

// Ids sorted by value descending, ties by ascending id (a stable sort of 0..n-1).
std::vector<int> order64(const float* z, int n) {
  std::vector<int> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return double(z[a]) > double(z[b]); });
  return ids;
}

double max_abs(const float* z, int n) {
  double m = 0;
  for (int i = 0; i < n; ++i) m = std::max(m, std::fabs(double(z[i])));
  return m;
}

double tol_lp(double ref, double zmax) { return 1e-5 * (1 + std::fabs(ref)) + 2 * std::ldexp(1.0, -23) * zmax; }

// The float64 sampling distribution: softmax(z / T) over the top-k (stable order), then the
// smallest descending prefix whose (renormalised) mass reaches top_p. Returns the allowed
// ids in descending order and their renormalised probabilities; `margin` is the distance of
// the prefix's cumulative masses on either side of the cut from top_p.
struct Dist {
  std::vector<int> ids;
  std::vector<double> p;
  double margin = 1;
};
Dist dist64(const float* z, int n, double T, int top_k, double top_p) {
  std::vector<int> ord = order64(z, n);
  if (top_k > 0 && top_k < n) ord.resize(top_k);
  const double mx = z[ord[0]];
  std::vector<double> w(ord.size());
  double sum = 0;
  for (size_t i = 0; i < ord.size(); ++i) sum += w[i] = std::exp((double(z[ord[i]]) - mx) / T);
  size_t keep = ord.size();
  Dist d;
  if (top_p < 1) {
    double cum = 0;
    for (size_t i = 0; i < ord.size(); ++i) {
      const double prev = cum;
      cum += w[i] / sum;
      if (cum >= top_p) {
        keep = i + 1;
        d.margin = std::min(cum - top_p, i > 0 ? top_p - prev : 1.0);
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += w[i];
  for (size_t i = 0; i < keep; ++i) {
    d.ids.push_back(ord[i]);
    d.p.push_back(w[i] / kept);
  }
  return d;
}

// ---------------------------------------------------------------------------------------
// 1. Greedy logits_pick: token, logprob, p(<rf>), top-n.

struct Worst {
  double lp_abs = 0;     // ordinary rows (|z| <= ~30): absolute error of log-probabilities
  double lp_ratio = 0;   // all rows: error / tolerance
  double prf_rel = 0;    // relative error of p(<rf>) (where the reference is >= 1e-30)
};

void check_greedy_row(const std::vector<float>& z, const std::string& tag, Worst& worst) {
  const int n = int(z.size());
  const double lse = lse64(z.data(), n), zmax = max_abs(z.data(), n);
  const std::vector<int> ord = order64(z.data(), n);
  rf::PickScratch scratch;
  bool ok_token = true, ok_lp = true, ok_prf = true, ok_ids = true, ok_top = true, ok_pad = true;
  for (int rf_token : {-1, 0, n - 1, ord[0], ord[n / 2]}) {
    for (int top_n : {0, 1, 5, 20, n + 3}) {
      std::vector<uint32_t> ids(std::max(top_n, 1), 12345);
      std::vector<float> lps(std::max(top_n, 1), 12345.f);
      rf::PickParams p;  // temperature 0: greedy
      const rf::Pick pick = rf::logits_pick(z.data(), n, p, 7, rf_token, top_n, ids.data(), lps.data(), scratch);
      const int want = argmax64(z.data(), n);
      ok_token &= int(pick.token) == want;
      const double ref_lp = double(z[want]) - lse;
      const double e = std::fabs(double(pick.logprob) - ref_lp), t = tol_lp(ref_lp, zmax);
      ok_lp &= e <= t;
      worst.lp_ratio = std::max(worst.lp_ratio, e / t);
      if (zmax <= 30) worst.lp_abs = std::max(worst.lp_abs, e);
      if (rf_token < 0) {
        ok_prf &= pick.p_rf == 0.f;
      } else {
        const double ref_lp_rf = double(z[rf_token]) - lse, ref = std::exp(ref_lp_rf);
        const double ep = std::fabs(double(pick.p_rf) - ref);
        ok_prf &= ep <= tol_lp(ref_lp_rf, zmax) * ref + 1e-37;
        if (ref >= 1e-30 && zmax <= 30) worst.prf_rel = std::max(worst.prf_rel, ep / ref);
      }
      for (int i = 0; i < top_n; ++i) {
        if (i < n) {
          ok_ids &= int(ids[i]) == ord[i];
          const double r = double(z[ord[i]]) - lse;
          const double ei = std::fabs(double(lps[i]) - r), ti = tol_lp(r, zmax);
          ok_top &= ei <= ti;
          worst.lp_ratio = std::max(worst.lp_ratio, ei / ti);
          if (zmax <= 30) worst.lp_abs = std::max(worst.lp_abs, ei);
        } else {
          // Past the vocabulary: id 0 and -inf, as logits_pick writes them.
          ok_pad &= ids[i] == 0 && std::isinf(lps[i]) && lps[i] < 0;
        }
      }
    }
  }
  check(ok_token, tag + ": greedy token is the first maximum");
  check(ok_lp, tag + ": logprob equals float64 log-softmax");
  check(ok_prf, tag + ": p(<rf>) equals float64 softmax (0 without a red-flag token)");
  check(ok_ids, tag + ": top-n ids equal a float64 stable sort");
  check(ok_top, tag + ": top-n logprobs equal float64 log-softmax");
  check(ok_pad, tag + ": top-n past the vocabulary is padded with id 0 / -inf");
}

// Rows of one vocabulary size: plain, with ties (quantised values, and the maximum repeated),
// large magnitudes (spread ~1e3) and a large offset (1e4 + small spread).
std::vector<std::pair<std::string, std::vector<float>>> test_rows(int n) {
  std::vector<std::pair<std::string, std::vector<float>>> rows;
  rows.push_back({"normal", randn(rng, n, 3.f)});
  std::vector<float> ties = randn(rng, n, 2.f);
  for (float& x : ties) x = std::round(x * 2.f) / 2.f;  // many equal values
  if (n > 2) {
    const int a = n / 3, b = n - 1;  // the maximum at a and again at b > a
    const float mx = *std::max_element(ties.begin(), ties.end()) + 1.f;
    ties[a] = ties[b] = mx;
  }
  rows.push_back({"ties", ties});
  rows.push_back({"all-equal", std::vector<float>(n, 0.25f)});
  rows.push_back({"large-spread", randn(rng, n, 1000.f)});
  rows.push_back({"large-offset", randn(rng, n, 3.f, 1e4f)});
  rows.push_back({"large-negative", randn(rng, n, 3.f, -2e4f)});
  return rows;
}

void test_greedy() {
  Worst worst;
  for (int n : {1, 7, 1000, 50257})
    for (auto& [kind, z] : test_rows(n)) check_greedy_row(z, "greedy V=" + std::to_string(n) + " " + kind, worst);
  std::printf("greedy: max |logprob err| %.3g on ordinary rows, max err/tol %.3g, max p(<rf>) rel err %.3g\n",
              worst.lp_abs, worst.lp_ratio, worst.prf_rel);
}

// ---------------------------------------------------------------------------------------
// 2. Sampling.

rf::PickParams sampling(float T, int top_k, float top_p, uint64_t seed) {
  rf::PickParams p;
  p.temperature = T;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

uint32_t pick_token(const std::vector<float>& z, const rf::PickParams& p, uint64_t counter, rf::PickScratch& s) {
  return rf::logits_pick(z.data(), int(z.size()), p, counter, -1, 0, nullptr, nullptr, s).token;
}

void test_sampling_rules() {
  rf::PickScratch s1, s2;
  for (int n : {1, 7, 1000, 50257}) {
    for (auto& [kind, z] : test_rows(n)) {
      if (kind == "large-spread") continue;  // at T ~ 1 a one-hot distribution: covered by the others
      const std::string tag = "sampling V=" + std::to_string(n) + " " + kind;
      const int draws = n > 10000 ? 12 : 200;
      const int greedy = argmax64(z.data(), n);
      bool same = true, k1 = true, in_k = true, in_p = true, in_kp = true, valid = true, lp_t1 = true;
      const double lse = lse64(z.data(), n), zmax = max_abs(z.data(), n);
      // The references do not depend on the counter: computed once per row. The nucleus is
      // taken at top_p + 1e-6 so a cut that float rounding moves by one token is not a failure.
      const std::vector<int> ord = order64(z.data(), n);
      const std::vector<std::pair<float, float>> tp_cases = {{1.f, 0.9f}, {0.7f, 0.5f}, {2.f, 0.95f}};
      std::vector<Dist> nuclei;
      size_t nucleus = 0;
      for (auto [T, top_p] : tp_cases) {
        nuclei.push_back(dist64(z.data(), n, T, 0, std::min(1.0, double(top_p) + 1e-6)));
        nucleus = std::max(nucleus, nuclei.back().ids.size());
      }
      const Dist kp = dist64(z.data(), n, 0.8, 10, 0.8 + 1e-6);
      auto inside = [](const Dist& d, uint32_t t) { return std::find(d.ids.begin(), d.ids.end(), int(t)) != d.ids.end(); };
      for (int c = 0; c < draws; ++c) {
        const uint64_t counter = uint64_t(c) * 7919 + 3;
        // Same (seed, counter): same token, whatever scratch and whatever came before.
        const rf::PickParams full = sampling(1.f, 0, 1.f, 99);
        const uint32_t t1 = pick_token(z, full, counter, s1);
        pick_token(z, sampling(0.5f, 3, 0.9f, 5), counter + 1, s2);
        rf::PickScratch fresh;
        same &= pick_token(z, full, counter, fresh) == t1 && pick_token(z, full, counter, s2) == t1;
        valid &= t1 < uint32_t(n);
        // top_k = 1 is greedy at any temperature.
        for (float T : {0.3f, 1.f, 5.f}) k1 &= int(pick_token(z, sampling(T, 1, 1.f, 11 + c), counter, s1)) == greedy;
        // top_k = k: the token's value is at least the k-th largest.
        for (int k : {2, 5, 40}) {
          const float kth = z[ord[std::min(k, n) - 1]];
          const uint32_t t = pick_token(z, sampling(1.f, k, 1.f, 123), counter, s1);
          in_k &= t < uint32_t(n) && z[t] >= kth;
        }
        // top_p: inside the float64 nucleus at the temperature; logprob / p(<rf>) stay those of
        // the temperature-1 distribution, whatever the sampling parameters.
        for (size_t i = 0; i < tp_cases.size(); ++i) {
          const rf::Pick pk = rf::logits_pick(z.data(), n, sampling(tp_cases[i].first, 0, tp_cases[i].second, 77),
                                              counter, ord[0], 0, nullptr, nullptr, s1);
          in_p &= inside(nuclei[i], pk.token);
          const double ref = double(z[pk.token]) - lse, ref_rf = double(z[ord[0]]) - lse;
          lp_t1 &= std::fabs(double(pk.logprob) - ref) <= tol_lp(ref, zmax) &&
                   std::fabs(double(pk.p_rf) - std::exp(ref_rf)) <= tol_lp(ref_rf, zmax) * std::exp(ref_rf) + 1e-37;
        }
        // top_k and top_p together: the nucleus of the renormalised top-k.
        in_kp &= inside(kp, pick_token(z, sampling(0.8f, 10, 0.8f, 31), counter, s1));
      }
      check(same && valid, tag + ": same (seed, counter) gives the same token");
      check(k1, tag + ": top_k = 1 equals greedy");
      check(in_k, tag + ": top_k = k draws among the k largest");
      check(in_p, tag + ": top_p draws inside the float64 nucleus (largest " + std::to_string(nucleus) + " tokens)");
      if (n == 50257 && kind == "normal") std::printf("sampling V=50257: largest top_p nucleus %zu tokens\n", nucleus);
      check(in_kp, tag + ": top_k + top_p draws inside the nucleus of the top-k");
      check(lp_t1, tag + ": sampled logprob and p(<rf>) are those of the temperature-1 softmax");
    }
  }
  // The seed matters: two seeds give different streams on a flat row.
  const std::vector<float> flat(1000, 0.f);
  int differ = 0;
  for (int c = 0; c < 50; ++c)
    differ += pick_token(flat, sampling(1.f, 0, 1.f, 1), c, s1) != pick_token(flat, sampling(1.f, 0, 1.f, 2), c, s1);
  check(differ >= 45, "sampling: different seeds give different draws (" + std::to_string(differ) + "/50 differ)");
}

// |f - want| in standard errors of a frequency over `draws` draws; an outcome of probability 0
// (or 1) has none, so any deviation from it counts as far outside.
double deviation_se(double f, double want, int draws) {
  const double se = std::sqrt(want * (1 - want) / draws);
  return se > 0 ? std::fabs(f - want) / se : (f == want ? 0 : 1e9);
}

// Empirical frequencies over counters 0..N-1 against the float64 distribution: each token
// within 4 standard errors sqrt(p (1 - p) / N), and no draw outside the allowed set.
void test_frequencies() {
  const std::vector<float> z = {1.0f, 2.5f, 0.3f, 2.5f, -1.0f, 1.7f};
  const int N = 20000;
  struct Case {
    float T;
    int top_k;
    float top_p;
  };
  double worst_se = 0;
  for (const Case& c : {Case{0.7f, 0, 1.f}, Case{1.f, 0, 1.f}, Case{0.7f, 3, 1.f}, Case{1.3f, 0, 0.85f},
                        Case{0.7f, 5, 0.95f}, Case{2.f, 4, 1.f}}) {
    const Dist d = dist64(z.data(), 6, c.T, c.top_k, c.top_p);
    char tag[96];
    std::snprintf(tag, sizeof tag, "frequencies T=%.1f top_k=%d top_p=%.2f", c.T, c.top_k, c.top_p);
    check(d.margin > 1e-3, std::string(tag) + ": the top-p cut is not a float near-tie (test design)");
    std::vector<int> count(6, 0);
    rf::PickScratch s;
    const rf::PickParams p = sampling(c.T, c.top_k, c.top_p, 20250301);
    for (int i = 0; i < N; ++i) ++count[pick_token(z, p, uint64_t(i), s)];
    std::vector<double> want(6, 0.0);
    for (size_t i = 0; i < d.ids.size(); ++i) want[d.ids[i]] = d.p[i];
    bool ok = true;
    double case_se = 0;
    for (int t = 0; t < 6; ++t) {
      const double k = deviation_se(double(count[t]) / N, want[t], N);
      case_se = std::max(case_se, k);
      ok &= k <= 4;
    }
    worst_se = std::max(worst_se, case_se);
    char what[64];
    std::snprintf(what, sizeof what, " within 4 SE (worst %.2f SE)", case_se);
    check(ok, std::string(tag) + what);
  }
  std::printf("frequencies: worst deviation %.2f standard errors over %d draws\n", worst_se, N);
}

// The same on large, flat rows whose top-p nucleus spans more than the first 256 candidates
// logits_pick examines (so its candidate set has to grow): frequencies by rank bucket
// (descending order) within 4 standard errors, and no draw outside the nucleus.
void test_nucleus_frequencies() {
  struct Case {
    int n, draws;
    float sd, T, top_p;
  };
  double worst_se = 0;
  for (const Case& c : {Case{1000, 6000, 0.5f, 1.f, 0.9f}, Case{5000, 1500, 0.3f, 1.f, 0.95f}}) {
    const std::vector<float> z = randn(rng, c.n, c.sd);
    const Dist d = dist64(z.data(), c.n, c.T, 0, c.top_p);
    char tag[96];
    std::snprintf(tag, sizeof tag, "nucleus frequencies V=%d top_p=%.2f (%zu tokens)", c.n, c.top_p, d.ids.size());
    check(d.margin > 1e-9 && d.ids.size() > 300, std::string(tag) + ": the nucleus is large and its cut clear (test design)");
    std::vector<int> rank(c.n, -1);
    for (size_t i = 0; i < d.ids.size(); ++i) rank[d.ids[i]] = int(i);
    const std::vector<size_t> edges = {0, 16, 64, 256, 1024, 4096, d.ids.size()};
    std::vector<int> count(edges.size(), 0);
    int outside = 0;
    rf::PickScratch s;
    const rf::PickParams p = sampling(c.T, 0, c.top_p, 4242);
    for (int i = 0; i < c.draws; ++i) {
      const int r = rank[pick_token(z, p, uint64_t(i), s)];
      if (r < 0) {
        ++outside;
        continue;
      }
      size_t bkt = 0;
      while (size_t(r) >= edges[bkt + 1]) ++bkt;
      ++count[bkt];
    }
    bool ok = outside == 0;
    double case_se = 0;
    for (size_t b = 0; b + 1 < edges.size() && edges[b] < d.ids.size(); ++b) {
      double want = 0;
      for (size_t i = edges[b]; i < std::min(edges[b + 1], d.ids.size()); ++i) want += d.p[i];
      const double k = deviation_se(double(count[b]) / c.draws, want, c.draws);
      case_se = std::max(case_se, k);
      ok &= k <= 4;
    }
    worst_se = std::max(worst_se, case_se);
    char what[64];
    std::snprintf(what, sizeof what, ": rank buckets within 4 SE (worst %.2f SE)", case_se);
    check(ok, std::string(tag) + what);
  }
  std::printf("nucleus frequencies: worst deviation %.2f standard errors\n", worst_se);
}

// ---------------------------------------------------------------------------------------
// 3 and 4. A small random Llama-style model.

// rf::test::small_llama with room for the longest sequence below (150 tokens).
rf::ModelConfig small_config() {
  rf::ModelConfig c = rf::test::small_llama();
  c.max_positions = 256;
  return c;
}

std::vector<uint32_t> random_tokens(int n, int vocab) {
  std::vector<uint32_t> t(n);
  for (auto& x : t) x = rng() % vocab;
  return t;
}

// Last-row logits of a sequence run alone through Model::forward on a fresh cache.
std::vector<float> last_logits(rf::Model& m, const std::vector<uint32_t>& ids) {
  rf::KvCache cache = m.new_cache();
  std::vector<float> out(m.vocab());
  m.forward({{&cache, ids.data(), int(ids.size())}}, rf::LogitsMode::last, out.data());
  return out;
}

struct StepErr {
  double lp_alone = 0, lp_ref = 0, prf_ref = 0, dz_batch = 0;
};

// Compares one item's pick (and top-n) with the float64 pick from its reference logits row.
bool matches_reference(const rf::Pick& pick, const uint32_t* top_ids, const float* top_lps, int top_n,
                       const std::vector<float>& z, int rf_token, StepErr& err) {
  const int V = int(z.size());
  const double lse = lse64(z.data(), V);
  const int want = argmax64(z.data(), V);
  bool ok = int(pick.token) == want;
  const double ref_lp = double(z[want]) - lse, e = std::fabs(double(pick.logprob) - ref_lp);
  ok &= e <= tol_lp(ref_lp, max_abs(z.data(), V));
  err.lp_ref = std::max(err.lp_ref, e);
  const double ref_prf = std::exp(double(z[rf_token]) - lse), ep = std::fabs(double(pick.p_rf) - ref_prf);
  ok &= ep <= 1e-5 * ref_prf + 1e-37;
  err.prf_ref = std::max(err.prf_ref, ep / ref_prf);
  const std::vector<int> ord = order64(z.data(), V);
  for (int i = 0; i < top_n; ++i) {
    if (i >= V) {  // past the vocabulary: id 0 / -inf
      ok &= top_ids[i] == 0 && std::isinf(top_lps[i]) && top_lps[i] < 0;
      continue;
    }
    ok &= int(top_ids[i]) == ord[i];
    const double r = double(z[ord[i]]) - lse, ei = std::fabs(double(top_lps[i]) - r);
    ok &= ei <= tol_lp(r, max_abs(z.data(), V));
    err.lp_ref = std::max(err.lp_ref, ei);
  }
  return ok;
}

// Bitwise equality of two picks and their top-n.
bool identical(const rf::Pick& a, const rf::Pick& b, const uint32_t* ta, const float* la, const uint32_t* tb,
               const float* lb, int top_n) {
  bool ok = a.token == b.token && a.logprob == b.logprob && a.p_rf == b.p_rf;
  for (int i = 0; i < top_n; ++i) ok &= ta[i] == tb[i] && la[i] == lb[i];
  return ok;
}

// The same sequence batched and alone. Model::forward is not bit-for-bit batch-invariant (its
// logits differ by a few f32 ulps with the batch composition; dz = max |logit difference|
// of the two forward(last) rows), and log p = z - lse moves by at most 2 dz from that, so
// the decode step itself may add at most 1e-6 on top: |logprob difference| <= 2 dz + 1e-6,
// p(<rf>) relative likewise. Tokens (greedy, top-n ids) must be equal.
bool same_pick(const rf::Pick& a, const rf::Pick& b, const uint32_t* ta, const float* la, const uint32_t* tb,
               const float* lb, int top_n, double dz, StepErr& err) {
  const double tol = 2 * dz + 1e-6;
  bool ok = a.token == b.token;
  const double e = std::fabs(double(a.logprob) - double(b.logprob));
  ok &= e <= tol;
  ok &= std::fabs(double(a.p_rf) - double(b.p_rf)) <= tol * double(b.p_rf);
  err.lp_alone = std::max(err.lp_alone, e);
  for (int i = 0; i < top_n; ++i) {
    ok &= ta[i] == tb[i];
    if (la[i] == lb[i]) continue;  // also the -inf padding
    const double ei = std::fabs(double(la[i]) - double(lb[i]));
    ok &= ei <= tol;
    err.lp_alone = std::max(err.lp_alone, ei);
  }
  return ok;
}

double max_diff(const float* a, const float* b, int n) {
  double m = 0;
  for (int i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

// One decode step over `items` checked three ways: (a) bit-for-bit equal to Model::forward
// (LogitsMode::last) on the same batch followed by logits_pick with counter = the new
// position; (b) equal to each item run alone through decode_step (see same_pick); (c) equal
// to the float64 pick from a forward(last) of the item's whole sequence on a fresh cache.
// `full[b]` is item b's whole sequence so far (cache contents + new tokens).
void check_step(rf::Model& m, std::vector<rf::ForwardItem> items, const std::vector<std::vector<uint32_t>>& full,
                const std::vector<rf::PickParams>& params, int rf_token, int top_n, const std::string& tag,
                StepErr& err, std::vector<rf::Pick>* out_picks = nullptr) {
  const int B = int(items.size()), V = m.vocab();
  // Copies of the caches before the step, for the reruns.
  std::vector<rf::KvCache> before;
  for (const auto& it : items) before.push_back(*it.cache);
  std::vector<rf::Pick> picks(B);
  std::vector<uint32_t> top_ids(std::max(1, B * top_n));
  std::vector<float> top_lps(std::max(1, B * top_n)), scratch;
  rf::decode_step(m, items, params, rf_token, top_n, picks.data(), top_ids.data(), top_lps.data(), scratch);
  bool lengths = true;
  for (int b = 0; b < B; ++b) lengths &= items[b].cache->length() == long(full[b].size());
  check(lengths, tag + ": appends each item's tokens to its cache");

  // (a) the same batch through forward(last) + logits_pick.
  std::vector<rf::KvCache> again = before;
  std::vector<rf::ForwardItem> again_items = items;
  for (int b = 0; b < B; ++b) again_items[b].cache = &again[b];
  std::vector<float> batch_logits(size_t(B) * V);
  m.forward(again_items, rf::LogitsMode::last, batch_logits.data());
  bool exact = true;
  for (int b = 0; b < B; ++b) {
    rf::PickScratch ps;
    std::vector<uint32_t> ids(std::max(1, top_n));
    std::vector<float> lps(std::max(1, top_n));
    const rf::Pick q = rf::logits_pick(batch_logits.data() + size_t(b) * V, V, params[b], full[b].size(), rf_token,
                                       top_n, ids.data(), lps.data(), ps);
    exact &= identical(picks[b], q, &top_ids[b * top_n], &top_lps[b * top_n], ids.data(), lps.data(), top_n);
  }
  check(exact, tag + ": equals forward(last) on the batch + logits_pick(counter = new position), bit for bit");

  // (b) each item alone, (c) the float64 reference.
  bool alone_ok = true, ref_ok = true;
  for (int b = 0; b < B; ++b) {
    rf::KvCache solo = before[b];
    rf::ForwardItem it = items[b];
    it.cache = &solo;
    rf::Pick p;
    std::vector<uint32_t> ids(std::max(1, top_n));
    std::vector<float> lps(std::max(1, top_n));
    rf::decode_step(m, {it}, {params[b]}, rf_token, top_n, &p, ids.data(), lps.data(), scratch);
    const std::vector<float> z = last_logits(m, full[b]);
    const double dz = max_diff(z.data(), batch_logits.data() + size_t(b) * V, V);
    err.dz_batch = std::max(err.dz_batch, dz);
    alone_ok &= same_pick(picks[b], p, &top_ids[b * top_n], &top_lps[b * top_n], ids.data(), lps.data(), top_n, dz, err);
    if (params[b].temperature == 0.f)
      ref_ok &= matches_reference(picks[b], &top_ids[b * top_n], &top_lps[b * top_n], top_n, z, rf_token, err);
  }
  check(alone_ok, tag + ": batched equals each item alone (same tokens, logprob within 2 dz + 1e-6)");
  if (params[0].temperature == 0.f)
    check(ref_ok, tag + ": equals forward(last) of the whole sequence + float64 argmax / log-softmax / top-n");
  if (out_picks) *out_picks = picks;
}

void test_decode_step(int threads) {
  const rf::ModelConfig c = small_config();
  auto m = rf::test::random_model(c, rf::DType::f32, threads, 5);
  const int V = c.vocab, rf_token = 5, top_n = 4;
  const std::string tag = "decode_step threads=" + std::to_string(threads);
  std::vector<std::vector<uint32_t>> prompts = {random_tokens(3, V), random_tokens(11, V), random_tokens(7, V)};
  const int B = int(prompts.size());
  StepErr err;

  // Step 1: the three prompts in one batch, greedy.
  std::vector<rf::KvCache> caches(B, m->new_cache());
  std::vector<rf::ForwardItem> items;
  for (int b = 0; b < B; ++b) items.push_back({&caches[b], prompts[b].data(), int(prompts[b].size())});
  std::vector<rf::Pick> picks;
  check_step(*m, items, prompts, std::vector<rf::PickParams>(B), rf_token, top_n, tag + " step 1 (greedy)", err,
             &picks);

  // Step 2: each sequence continues with its chosen token; a new prompt joins the batch.
  std::vector<uint32_t> next(B);
  std::vector<std::vector<uint32_t>> full = prompts;
  for (int b = 0; b < B; ++b) full[b].push_back(next[b] = picks[b].token);
  const std::vector<uint32_t> fresh_prompt = random_tokens(5, V);
  full.push_back(fresh_prompt);
  rf::KvCache fresh = m->new_cache();
  items.clear();
  for (int b = 0; b < B; ++b) items.push_back({&caches[b], &next[b], 1});
  items.push_back({&fresh, fresh_prompt.data(), int(fresh_prompt.size())});
  check_step(*m, items, full, std::vector<rf::PickParams>(B + 1), rf_token, top_n,
             tag + " step 2 (continuations + a new prompt)", err);

  // top_n larger than the vocabulary through decode_step (padding as in logits_pick).
  {
    std::vector<rf::KvCache> cs(B, m->new_cache());
    items.clear();
    for (int b = 0; b < B; ++b) items.push_back({&cs[b], prompts[b].data(), int(prompts[b].size())});
    check_step(*m, items, prompts, std::vector<rf::PickParams>(B), rf_token, V + 2, tag + " top_n > vocab", err);
  }

  // Sampling: the draw depends on (seed, position), not on the batch.
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<rf::PickParams> samp(B);
    for (int b = 0; b < B; ++b)
      samp[b] = sampling(1.2f, b == 1 ? 20 : 0, b == 2 ? 0.9f : 1.f, 1000 + 17 * trial + b);
    std::vector<rf::KvCache> cs(B, m->new_cache());
    items.clear();
    for (int b = 0; b < B; ++b) items.push_back({&cs[b], prompts[b].data(), int(prompts[b].size())});
    check_step(*m, items, prompts, samp, rf_token, 0, tag + " sampled trial " + std::to_string(trial), err);
  }

  // Bad input throws.
  std::vector<float> scratch;
  picks.resize(1);
  bool threw = false;
  try {
    rf::KvCache cc = m->new_cache();
    rf::decode_step(*m, {{&cc, prompts[0].data(), 3}}, {}, rf_token, 0, picks.data(), nullptr, nullptr, scratch);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, tag + ": missing PickParams throws");
  threw = false;
  try {
    rf::KvCache cc = m->new_cache();
    rf::decode_step(*m, {{&cc, prompts[0].data(), 0}}, {rf::PickParams{}}, rf_token, 0, picks.data(), nullptr, nullptr,
                    scratch);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, tag + ": an item without new tokens throws");

  std::printf(
      "%s: forward batched vs alone max |dlogit| %.3g; max |logprob| batched vs alone %.3g, vs float64 reference "
      "%.3g; p(<rf>) rel err %.3g\n",
      tag.c_str(), err.dz_batch, err.lp_alone, err.lp_ref, err.prf_ref);
}

void test_token_scores(int threads) {
  const rf::ModelConfig c = small_config();
  auto m = rf::test::random_model(c, rf::DType::f32, threads, 9);
  const int V = c.vocab, rf_token = 11;
  const long H = c.hidden;
  double worst = 0;
  for (bool adapter : {false, true}) {
    if (adapter) {
      // A trained red-flag head row replaces the base row, in forward() and token_scores alike.
      rf::Param* head = m->new_param("rf_head", {H});
      rf::test::fill_normal(rng, head->value.data(), head->value.size(), 0.5f);
      m->set_token_rows(rf_token, nullptr, head);
    }
    // Lengths: 97 rows in three items (one already holding a prefix), 64 rows exactly (one
    // chunk), 65 (a one-row second chunk) and 150 in one item (three chunks).
    for (const std::vector<int>& lens : std::vector<std::vector<int>>{{30, 50, 17}, {64}, {65}, {150}}) {
      const int n_items = int(lens.size());
      std::vector<std::vector<uint32_t>> seqs;
      std::vector<rf::KvCache> caches(n_items, m->new_cache());
      const std::vector<uint32_t> prefix = random_tokens(6, V);
      if (n_items > 1) {
        std::vector<float> tmp(V);
        m->forward({{&caches[1], prefix.data(), int(prefix.size())}}, rf::LogitsMode::last, tmp.data());
      }
      std::vector<rf::KvCache> ref_caches = caches;
      std::vector<rf::ForwardItem> items, ref_items;
      long R = 0;
      for (int i = 0; i < n_items; ++i) seqs.push_back(random_tokens(lens[i], V));
      for (int i = 0; i < n_items; ++i) {
        items.push_back({&caches[i], seqs[i].data(), lens[i]});
        ref_items.push_back({&ref_caches[i], seqs[i].data(), lens[i]});
        R += lens[i];
      }
      std::vector<float> p(R, -1.f), lp(R, -1.f), logits(R * V);
      rf::token_scores(*m, items, rf_token, p.data(), nullptr, lp.data());
      m->forward(ref_items, rf::LogitsMode::all, logits.data());
      bool ok = true, lengths = true, lp_ok = true;
      double e_max = 0, lp_max = 0;
      long r = 0;
      for (int i = 0; i < n_items; ++i) {
        for (int t = 0; t < lens[i]; ++t, ++r) {
          const float* z = logits.data() + r * V;
          const double lse = lse64(z, V);
          const double ref = std::exp(double(z[rf_token]) - lse);
          const double e = std::fabs(double(p[r]) - ref);
          ok &= e <= 1e-5 * ref + 1e-37;  // 1e-5 relative (p is exp of an f32 log-probability)
          e_max = std::max(e_max, e / ref);
          // The next token's log-probability within the item; NaN after the item's last token.
          if (t + 1 < lens[i]) {
            const double want = double(z[seqs[i][t + 1]]) - lse;
            const double d = std::fabs(double(lp[r]) - want);
            lp_ok &= d <= 1e-5 * (1 + std::fabs(want));
            lp_max = std::max(lp_max, d);
          } else {
            lp_ok &= std::isnan(lp[r]);
          }
        }
      }
      for (int i = 0; i < n_items; ++i) lengths &= caches[i].length() == ref_caches[i].length();
      worst = std::max(worst, e_max);
      const std::string tag = "token_scores threads=" + std::to_string(threads) + (adapter ? " rf-head" : "") +
                              " rows=" + std::to_string(R) + " items=" + std::to_string(n_items);
      check(ok, tag + ": equals float64 softmax of forward(all) (max rel err " + std::to_string(e_max) + ")");
      check(lengths, tag + ": caches advance by every token");
      check(lp_ok, tag + ": next-token log-probabilities equal float64 log-softmax, NaN at item ends (max abs err " +
                       std::to_string(lp_max) + ")");
    }
  }
  bool threw = false;
  try {
    rf::KvCache cc = m->new_cache();
    const uint32_t t = 1;
    float out;
    rf::token_scores(*m, {{&cc, &t, 1}}, V, &out);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "token_scores: a red-flag token outside the vocabulary throws");
  {
    // Without a red-flag token (-1), the likelihood alone; p(<rf>) is 0.
    rf::KvCache cc = m->new_cache();
    const uint32_t toks[2] = {1, 2};
    float pr[2] = {-1, -1}, lps[2] = {0, 0};
    rf::token_scores(*m, {{&cc, toks, 2}}, -1, pr, nullptr, lps);
    check(pr[0] == 0.f && pr[1] == 0.f && lps[0] < 0.f && std::isnan(lps[1]), "token_scores without a red-flag token: p 0, log-probabilities");
  }
  std::printf("token_scores threads=%d: max p(<rf>) rel err %.3g\n", threads, worst);
}

// Several flag tokens: each one's p (with its trained head row) and their total, from
// token_scores and decode_step alike, against float64 softmax of forward(all).
void test_flags(int threads) {
  const rf::ModelConfig c = small_config();
  auto m = rf::test::random_model(c, rf::DType::f32, threads, 9);
  const int V = c.vocab;
  const long H = c.hidden;
  const std::vector<int> ids = {11, 3, V - 1};
  const int K = int(ids.size());
  rf::Param* head = m->new_param("rf_head", {K, H});
  rf::test::fill_normal(rng, head->value.data(), head->value.size(), 0.5f);
  head->value[size_t(1) * H] += 40.f;  // flag 1 large somewhere, so the total is not one flag's
  m->set_token_rows(ids, nullptr, head);
  const std::vector<uint32_t> seq = random_tokens(40, V);
  rf::KvCache a = m->new_cache(), b = m->new_cache();
  std::vector<float> total(seq.size()), each(seq.size() * K), logits(seq.size() * V);
  rf::token_scores(*m, {{&a, seq.data(), int(seq.size())}}, rf::Flags(ids, each.data()), total.data());
  m->forward({{&b, seq.data(), int(seq.size())}}, rf::LogitsMode::all, logits.data());
  bool ok = true;
  double e_max = 0, p_max = 0;
  for (size_t r = 0; r < seq.size(); ++r) {
    const float* z = logits.data() + r * V;
    const double lse = lse64(z, V);
    double sum = 0;
    for (int k = 0; k < K; ++k) {
      const double want = std::exp(double(z[ids[k]]) - lse);
      sum += want;
      p_max = std::max(p_max, want);
      const double e = std::fabs(double(each[r * K + k]) - want);
      ok &= e <= 1e-5 * want + 1e-37;
      e_max = std::max(e_max, e / want);
    }
    ok &= std::fabs(double(total[r]) - sum) <= 1e-5 * sum;
  }
  const std::string tag = "flags threads=" + std::to_string(threads);
  check(ok && p_max > 0.1, tag + ": token_scores' per-flag p and total equal float64 (max rel err " +
                               std::to_string(e_max) + ", largest p " + std::to_string(p_max) + ")");
  // decode_step: the same numbers from the fused step, for a batch of two (tolerance as above).
  rf::KvCache c1 = m->new_cache(), c2 = m->new_cache();
  std::vector<rf::PickParams> params(2);
  rf::Pick picks[2];
  std::vector<float> scratch, step_each(2 * K);
  rf::decode_step(*m, {{&c1, seq.data(), 17}, {&c2, seq.data(), 40}}, params, rf::Flags(ids, step_each.data()), 0,
                  picks, nullptr, nullptr, scratch);
  bool step_ok = true;
  for (int i = 0; i < 2; ++i) {
    const size_t r = i == 0 ? 16 : 39;
    double sum = 0;
    for (int k = 0; k < K; ++k) {
      sum += each[r * K + k];
      // Two forwards (last row vs all rows) agree to f32 rounding of the logits: a relative error
      // of p that grows with |log p|.
      const double p = each[r * K + k];
      step_ok &= std::fabs(step_each[i * K + k] - p) <= 1e-5 * (1 - std::log(std::max(p, 1e-300))) * p + 1e-37;
    }
    step_ok &= std::fabs(double(picks[i].p_rf) - sum) <= 1e-5 * sum;
  }
  check(step_ok, tag + ": decode_step's per-flag p and total equal token_scores'");
  bool threw = false;
  try {
    rf::KvCache cc = m->new_cache();
    float out;
    rf::token_scores(*m, {{&cc, seq.data(), 1}}, rf::Flags({3, 3}), &out);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, tag + ": a flag listed twice throws");
}

}  // namespace

int main() {
  test_greedy();
  test_sampling_rules();
  test_frequencies();
  test_nucleus_frequencies();
  for (int threads : {1, 2}) {
    test_decode_step(threads);
    test_token_scores(threads);
    test_flags(threads);
  }
  return rf::test::finish("test_decode");
}
