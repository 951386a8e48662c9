// rf_loss (kernels/rf_loss.h) against a naive float64 implementation that materialises the
// full logits, and that reference itself against central finite differences.
//
// Tolerances: the kernel is f32 throughout (logits, softmax sums, the softmax-weighted sums
// through W) with float64 per-row scalars, so every loss term must agree with float64 to a
// relative 1e-5, and dh, dw_rf to a relative L2 1e-5. For bf16 W the reference uses the
// bf16 values of W, and, on the AVX-512 path where gemm multiplies bf16-rounded activations,
// the rounded h for the streamed logits too (the kernel's documented semantics); against the
// unrounded reference (a different function) the AVX-512 bf16 results differ by the bf16
// rounding of h, checked at 3e-2.
// The AVX-512 bf16 path also rounds the softmax weights p_v (v != rf) to bf16 for its
// vdpbf16ps sums through W: p~ = p (1 + e_v), |e_v| <= u = 2^-8 (half a bf16 ulp of 2^-7), the
// rounding's absolute error spread evenly over the half ulp, so E[e_v^2] <= u^2 / 3 (the true
// rms is about 0.85 x 2^-9 = 0.74 x that bound). That error is the reference's own function
// plus sum_v e_v c_v (c_v the result's linear coefficient of p_v), with independent e_v, so
// the reference states its variance (RefOutput::dh_var, sigma_*), and the bf16 tolerances are
// 1e-5 as above PLUS 2 x the predicted L2 norm of the rounding error for dh (an L2 norm over
// N x H elements, concentrated at or below 0.74 x predicted: lower where the weights that
// dominate are exact, as each chunk's largest, exp(0) = 1; the cases here see 0.05 to 0.55)
// and 4 sigma for the KL terms and the total (at least 5.4 true sigma). A float64 reference
// fed with bf16-rounded p would only re-run the kernel's arithmetic; this keeps the exact
// function as the reference and derives the slack from 2^-8 alone. It is also tight enough
// to catch a broken accumulation: one misplaced pair or a dropped odd tail element is of
// order p_v |W_v|, against a predicted 2^-8 (sum_v p_v^2 W_v^2)^(1/2) / sqrt(3) (and even
// truncating p instead of rounding it fails the KL terms, its bias adding up). The red_flag
// term and dw_rf use only the rf logits and the softmax sums S (f32 of the unrounded p), so
// they stay at 1e-5.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/dtype.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/rf_loss.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::RfAggregation;
using rf::RfLossKind;
using rf::RfLossRow;
using rf::test::check;
using rf::test::rel_l2;
using rf::test::randn;

namespace {

std::mt19937 rng(20250216);

// ---------------------------------------------------------------------------------------
// Naive float64 reference.

struct RefInput {
  int N = 0, Nr = 0, H = 0, V = 0;
  std::vector<int> flags;          // the flag token ids (one: the red-flag token rf)
  std::vector<double> a, a_ref;    // rows the streamed logits use [N, H], [Nr, H]
  std::vector<double> h, h_ref;    // rows the flag logits use (and dw_rf)
  std::vector<double> W;           // [V, H], flag rows = the reference model's own rows
  std::vector<double> w_rf;        // [K, H]
  std::vector<RfLossRow> rows;
  RfAggregation agg = RfAggregation::any;
  double alpha_benign = 1, alpha_rf = 1, alpha_after = 1;
};

struct RefOutput {
  double benign = 0, red_flag = 0, after = 0, total = 0;
  int n_benign = 0, n_groups = 0, n_after = 0;
  double p_rf_min = 1, p_rf_max = 0;  // over the red-flag rows
  std::vector<double> dh, dw_rf;
  // Error model of rounding every streamed p_v (v != rf, theta and reference rows alike) to
  // bf16 before the sums through W (AVX-512, bf16 W): variance of each dh element, and sigma of
  // the KL terms and the total, for independent relative errors with E[e^2] <= kBf16RelVar.
  std::vector<double> dh_var;
  double sigma_benign = 0, sigma_after = 0, sigma_total = 0;
};

// (2^-8)^2 / 3: the bound on E[e^2] of a relative bf16 rounding error e (see the top comment).
const double kBf16RelVar = std::ldexp(1.0, -16) / 3.0;

// log-softmax of logits z [V].
std::vector<double> log_softmax(const std::vector<double>& z) {
  double mx = *std::max_element(z.begin(), z.end()), s = 0;
  for (double v : z) s += std::exp(v - mx);
  const double lse = mx + std::log(s);
  std::vector<double> out(z.size());
  for (size_t v = 0; v < z.size(); ++v) out[v] = z[v] - lse;
  return out;
}

RefOutput reference(const RefInput& in) {
  const int N = in.N, H = in.H, V = in.V, K = int(in.flags.size());
  std::vector<int> flag_of(V, -1);  // token -> its flag index, or -1
  for (int k = 0; k < K; ++k) flag_of[in.flags[k]] = k;
  auto dot = [&](const double* x, const double* y) {
    double s = 0;
    for (int k = 0; k < H; ++k) s += x[k] * y[k];
    return s;
  };
  // Full logits: trained model with W* (flag rows = w_rf), reference with W.
  std::vector<std::vector<double>> lp(N), lp_ref(in.Nr);
  for (int i = 0; i < N; ++i) {
    std::vector<double> z(V);
    for (int v = 0; v < V; ++v)
      z[v] = flag_of[v] >= 0 ? dot(&in.h[size_t(i) * H], &in.w_rf[size_t(flag_of[v]) * H]) : dot(&in.a[size_t(i) * H], &in.W[size_t(v) * H]);
    lp[i] = log_softmax(z);
  }
  for (int r = 0; r < in.Nr; ++r) {
    std::vector<double> z(V);
    for (int v = 0; v < V; ++v)
      z[v] = flag_of[v] >= 0 ? dot(&in.h_ref[size_t(r) * H], &in.W[size_t(v) * H]) : dot(&in.a_ref[size_t(r) * H], &in.W[size_t(v) * H]);
    lp_ref[r] = log_softmax(z);
  }
  RefOutput out;
  std::map<int, std::vector<int>> groups;
  for (int i = 0; i < N; ++i) {
    if (in.rows[i].kind == RfLossKind::benign_kl) out.n_benign++;
    if (in.rows[i].kind == RfLossKind::after_kl) out.n_after++;
    if (in.rows[i].kind == RfLossKind::red_flag) groups[in.rows[i].group].push_back(i);
  }
  out.n_groups = int(groups.size());
  // g [N, V] = dL/dz (alphas and means applied); g_ref [N, V] its p_ref part, g - g_ref its
  // p_theta part (for the bf16 error model).
  std::vector<std::vector<double>> g(N, std::vector<double>(V, 0.0)), g_ref(N, std::vector<double>(V, 0.0));
  // KL error model: per (reference row, v), the coefficient of p_ref,v in benign, after:
  // sum over the rows using it of (z_ref,v - z_theta,v) / n_term (streamed logits, v != rf).
  std::vector<std::vector<double>> c_benign(in.Nr, std::vector<double>(V, 0.0)), c_after = c_benign;
  for (int i = 0; i < N; ++i) {
    const RfLossRow& r = in.rows[i];
    if (r.kind == RfLossKind::red_flag) continue;
    const bool benign = r.kind == RfLossKind::benign_kl;
    const double w = (benign ? in.alpha_benign / out.n_benign : in.alpha_after / out.n_after);
    double kl = 0;
    std::vector<double> da(H);
    for (int k = 0; k < H; ++k) da[k] = in.a_ref[size_t(r.ref_row) * H + k] - in.a[size_t(i) * H + k];
    for (int v = 0; v < V; ++v) {
      const double pr = std::exp(lp_ref[r.ref_row][v]);
      kl += pr * (lp_ref[r.ref_row][v] - lp[i][v]);
      g[i][v] = w * (std::exp(lp[i][v]) - pr);
      g_ref[i][v] = -w * pr;
      if (flag_of[v] < 0)
        (benign ? c_benign : c_after)[r.ref_row][v] +=
            pr * dot(da.data(), &in.W[size_t(v) * H]) / (benign ? out.n_benign : out.n_after);
    }
    (benign ? out.benign : out.after) += kl / (benign ? out.n_benign : out.n_after);
  }
  const double wg = out.n_groups ? in.alpha_rf / out.n_groups : 0.0;
  for (auto& [id, members] : groups) {
    // log(1 - p_j): log1p(-p) while p is small, else the log of the other tokens' total mass.
    std::vector<double> l1m(members.size());
    double log_q = 0;
    for (size_t t = 0; t < members.size(); ++t) {
      const int i = members[t];
      const int rf = in.flags[in.rows[i].flag];
      const double p = std::exp(lp[i][rf]);
      out.p_rf_min = std::min(out.p_rf_min, p), out.p_rf_max = std::max(out.p_rf_max, p);
      if (p < 0.5) {
        l1m[t] = std::log1p(-p);
      } else {
        double rest = 0;
        for (int v = 0; v < V; ++v)
          if (v != rf) rest += std::exp(lp[i][v]);
        l1m[t] = std::log(rest);
      }
      log_q += l1m[t];
    }
    const double q = std::exp(log_q), one_minus_q = -std::expm1(log_q);
    double loss = 0;
    for (size_t t = 0; t < members.size(); ++t) {
      const int i = members[t];
      const int rf = in.flags[in.rows[i].flag];
      const double p = std::exp(lp[i][rf]);
      // dL/dz_v = k (p_v - delta_{v,rf})
      double k;
      if (in.agg == RfAggregation::any) {
        k = q / one_minus_q * p / std::exp(l1m[t]);
      } else {
        k = 1.0 / members.size();
        loss += -lp[i][rf] / members.size();
      }
      for (int v = 0; v < V; ++v) g[i][v] = wg * k * (std::exp(lp[i][v]) - (v == rf ? 1.0 : 0.0));
    }
    if (in.agg == RfAggregation::any) loss = -std::log(one_minus_q);
    out.red_flag += loss / out.n_groups;
  }
  out.total = in.alpha_benign * out.benign + in.alpha_rf * out.red_flag + in.alpha_after * out.after;
  // dh = g . W*, dw_rf[k] = sum_i g[i][f_k] h_i.
  out.dh.assign(size_t(N) * H, 0.0);
  out.dw_rf.assign(size_t(K) * H, 0.0);
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < V; ++v) {
      const double* wv = flag_of[v] >= 0 ? &in.w_rf[size_t(flag_of[v]) * H] : &in.W[size_t(v) * H];
      for (int k = 0; k < H; ++k) out.dh[size_t(i) * H + k] += g[i][v] * wv[k];
    }
  for (int f = 0; f < K; ++f)
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < H; ++k) out.dw_rf[size_t(f) * H + k] += g[i][in.flags[f]] * in.h[size_t(i) * H + k];
  // bf16 error model: dh_i gets sum_{v not a flag} (e_theta,v (g - g_ref)_v + e_ref,v g_ref_v) W_v.
  out.dh_var.assign(size_t(N) * H, 0.0);
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < V; ++v) {
      if (flag_of[v] >= 0) continue;
      const double gt = g[i][v] - g_ref[i][v], gr = g_ref[i][v];
      const double c2 = kBf16RelVar * (gt * gt + gr * gr);
      const double* wv = &in.W[size_t(v) * H];
      for (int k = 0; k < H; ++k) out.dh_var[size_t(i) * H + k] += c2 * wv[k] * wv[k];
    }
  double var_b = 0, var_a = 0, var_t = 0;
  for (int r = 0; r < in.Nr; ++r)
    for (int v = 0; v < V; ++v) {
      const double cb = c_benign[r][v], ca = c_after[r][v], ct = in.alpha_benign * cb + in.alpha_after * ca;
      var_b += cb * cb, var_a += ca * ca, var_t += ct * ct;
    }
  out.sigma_benign = std::sqrt(kBf16RelVar * var_b);
  out.sigma_after = std::sqrt(kBf16RelVar * var_a);
  out.sigma_total = std::sqrt(kBf16RelVar * var_t);
  return out;
}

// ---------------------------------------------------------------------------------------
// The reference's gradients against central differences of its own loss (a tiny problem,
// no rounding, a = h), for each aggregation.

void test_reference_gradients(RfAggregation agg, int n_flags) {
  RefInput in;
  in.N = 9;
  in.Nr = 4;
  in.H = 5;
  in.V = 7;
  in.flags = n_flags == 1 ? std::vector<int>{3} : std::vector<int>{3, 0, 6};
  in.agg = agg;
  in.alpha_benign = 0.7;
  in.alpha_rf = 1.3;
  in.alpha_after = 2.0;
  auto to_d = [](const std::vector<float>& f) { return std::vector<double>(f.begin(), f.end()); };
  in.h = to_d(randn(rng, size_t(in.N) * in.H, 1.f));
  in.h_ref = to_d(randn(rng, size_t(in.Nr) * in.H, 1.f));
  in.W = to_d(randn(rng, size_t(in.V) * in.H, 0.8f));
  in.w_rf = to_d(randn(rng, size_t(n_flags) * in.H, 0.8f));
  // 3 benign (two share ref row 0), 2 after, 4 red flag in groups {0, 0, 0} and {5} (one
  // row each for 'single').
  in.rows = {{RfLossKind::benign_kl, 0, -1}, {RfLossKind::benign_kl, 0, -1}, {RfLossKind::benign_kl, 1, -1},
             {RfLossKind::after_kl, 2, -1},  {RfLossKind::after_kl, 3, -1},  {RfLossKind::red_flag, -1, 0},
             {RfLossKind::red_flag, -1, 0},  {RfLossKind::red_flag, -1, 0},  {RfLossKind::red_flag, -1, 5}};
  if (agg == RfAggregation::single) in.rows[6].group = 1, in.rows[7].group = 2;
  // Several flags: the rows train different ones (row 6, pushed towards p near 1, trains flag 0).
  if (n_flags > 1) in.rows[5].flag = 1, in.rows[7].flag = 2, in.rows[8].flag = 1;
  // One red-flag row with p_rf near 1: its state pushed along w_rf.
  double n2 = 0;
  for (double x : in.w_rf) n2 += x * x;
  for (int k = 0; k < in.H; ++k) in.h[size_t(6) * in.H + k] += 6.0 * in.w_rf[k] / n2;
  in.a = in.h;
  in.a_ref = in.h_ref;
  const RefOutput base = reference(in);

  const double eps = 1e-5;
  auto total_at = [&](std::vector<double>& x, size_t idx, double delta) {
    const double keep = x[idx];
    x[idx] = keep + delta;
    in.a = in.h;  // a follows h
    const double t = reference(in).total;
    x[idx] = keep;
    in.a = in.h;
    return t;
  };
  std::vector<double> fd_dh(in.h.size()), fd_dw(in.w_rf.size());
  for (size_t j = 0; j < in.h.size(); ++j)
    fd_dh[j] = (total_at(in.h, j, eps) - total_at(in.h, j, -eps)) / (2 * eps);
  for (size_t k = 0; k < in.w_rf.size(); ++k) fd_dw[k] = (total_at(in.w_rf, k, eps) - total_at(in.w_rf, k, -eps)) / (2 * eps);
  auto rel = [](const std::vector<double>& got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
    return std::sqrt(num / std::max(den, 1e-300));
  };
  const double e_dh = rel(base.dh, fd_dh), e_dw = rel(base.dw_rf, fd_dw);
  const std::string name = std::string("reference finite differences agg=") +
                           (agg == RfAggregation::any ? "any" : agg == RfAggregation::mean ? "mean" : "single") +
                           " flags=" + std::to_string(n_flags);
  std::printf("%s: dh %.2e dw_rf %.2e\n", name.c_str(), e_dh, e_dw);
  check(e_dh <= 1e-7, name + " dh");
  check(e_dw <= 1e-7, name + " dw_rf");
}

// ---------------------------------------------------------------------------------------
// The kernel against the reference.

struct Case {
  std::string name;
  int N = 0, Nr = 0, H = 0, V = 0, rf = 0, chunk = 0, threads = 2;
  std::vector<int> flags;   // several flag tokens (then rf is unused); red-flag rows cycle through them
  rf::DType dtype = rf::DType::f32;
  RfAggregation agg = RfAggregation::any;
  float alpha_benign = 1.f, alpha_rf = 1.f, alpha_after = 1.f;
  std::vector<RfLossRow> rows;
  std::vector<float> push;  // per row: added multiple of w_rf / |w_rf|^2 (p_rf near 0 / 1), 0 = none
  bool extremes = false;    // some red-flag rows must have p_rf < 1e-6 and some > 1 - 1e-6
  float last_row_scale = 1.f;  // W row V - 1 scaled by this: a heavy token at the end of the vocabulary
};

// Rows: n_benign + n_after KL rows (each its own ref row, the last two KL rows sharing one
// when share_ref), then red-flag groups of the given sizes.
void rows_make(Case& c, int n_benign, int n_after, const std::vector<int>& group_sizes, bool share_ref = false) {
  c.rows.clear();
  int ref = 0;
  for (int i = 0; i < n_benign; ++i) c.rows.push_back({RfLossKind::benign_kl, ref++, -1});
  for (int i = 0; i < n_after; ++i) c.rows.push_back({RfLossKind::after_kl, ref++, -1});
  if (share_ref && ref >= 2) c.rows[ref - 1].ref_row = ref - 2, --ref;
  c.Nr = ref;
  int gid = 100;
  for (int size : group_sizes) {
    for (int j = 0; j < size; ++j) c.rows.push_back({RfLossKind::red_flag, -1, gid});
    gid += 7;  // ids need not be dense
  }
  // Interleave kinds so the row blocks mix them.
  std::shuffle(c.rows.begin(), c.rows.end(), rng);
  c.N = int(c.rows.size());
  c.push.assign(c.N, 0.f);
  // Several flags: each red-flag group trains one of them, in turn.
  if (c.flags.size() > 1)
    for (RfLossRow& r : c.rows)
      if (r.kind == RfLossKind::red_flag) r.flag = (r.group / 7) % int(c.flags.size());
}

// Every third red-flag row pushed to p near 1, the next to p near 0 (extremes the kernel must
// handle without cancellation).
void push_extremes(Case& c) {
  int k = 0;
  for (int i = 0; i < c.N; ++i)
    if (c.rows[i].kind == RfLossKind::red_flag) {
      const int j = k++;
      c.push[i] = j % 3 == 0 ? 40.f : j % 3 == 1 ? -40.f : 0.f;
    }
  c.extremes = true;
}

void run_case(rf::ThreadPool& pool2, const Case& c) {
  const int N = c.N, Nr = c.Nr, H = c.H, V = c.V;
  const float w_scale = 2.5f / std::sqrt(float(H));
  auto Wsrc = randn(rng, size_t(V) * H, w_scale);
  for (int k = 0; k < H; ++k) Wsrc[size_t(V - 1) * H + k] *= c.last_row_scale;
  const std::vector<int> flags = c.flags.empty() ? std::vector<int>{c.rf} : c.flags;
  const int K = int(flags.size());
  auto w_rf = randn(rng, size_t(K) * H, w_scale);
  auto h = randn(rng, size_t(N) * H, 1.f);
  auto h_ref = randn(rng, size_t(std::max(Nr, 1)) * H, 1.f);
  // Reference rows correlated with their trained rows, so KL is moderate, not huge.
  for (int i = 0; i < N; ++i) {
    const RfLossRow& r = c.rows[i];
    if (r.kind == RfLossKind::red_flag) continue;
    for (int k = 0; k < H; ++k) h_ref[size_t(r.ref_row) * H + k] = 0.7f * h[size_t(i) * H + k] + 0.7f * h_ref[size_t(r.ref_row) * H + k];
  }
  // Pushes along the row's own flag (KL rows: flag 0).
  for (int i = 0; i < N; ++i)
    if (c.push[i] != 0.f) {
      const float* w = w_rf.data() + size_t(c.rows[i].kind == RfLossKind::red_flag ? c.rows[i].flag : 0) * H;
      double n2 = 0;
      for (int k = 0; k < H; ++k) n2 += double(w[k]) * w[k];
      for (int k = 0; k < H; ++k) h[size_t(i) * H + k] += float(c.push[i] * w[k] / n2);
    }

  rf::PackedWeight W;
  rf::pack_weight(W, Wsrc.data(), rf::SrcType::f32, V, H, false, c.dtype);

  RefInput in;
  in.N = N, in.Nr = Nr, in.H = H, in.V = V, in.flags = flags, in.rows = c.rows, in.agg = c.agg;
  in.alpha_benign = c.alpha_benign, in.alpha_rf = c.alpha_rf, in.alpha_after = c.alpha_after;
  in.W.resize(size_t(V) * H);
  std::vector<float> row(H);
  for (int v = 0; v < V; ++v) {
    rf::packed_row(W, v, row.data());  // the values the kernel multiplies (bf16-rounded for bf16)
    for (int k = 0; k < H; ++k) in.W[size_t(v) * H + k] = row[k];
  }
  in.h.assign(h.begin(), h.end());
  in.h_ref.assign(h_ref.begin(), h_ref.begin() + size_t(Nr) * H);
  in.w_rf.assign(w_rf.begin(), w_rf.end());
  const bool round_a = c.dtype == rf::DType::bf16 && rf::active_isa() == rf::Isa::avx512;
  auto rounded = [](const std::vector<double>& x) {
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = rf::bf16_to_f32(rf::f32_to_bf16(float(x[i])));
    return y;
  };
  in.a = round_a ? rounded(in.h) : in.h;
  in.a_ref = round_a ? rounded(in.h_ref) : in.h_ref;
  const RefOutput want = reference(in);

  rf::RfLossOptions o;
  o.rf_token = c.rf;
  if (!c.flags.empty()) o.flag_tokens = c.flags;
  o.aggregation = c.agg;
  o.alpha_benign = c.alpha_benign, o.alpha_rf = c.alpha_rf, o.alpha_after = c.alpha_after;
  o.chunk = c.chunk;
  std::vector<float> dh(size_t(N) * H, 123.f);  // written, whatever it held
  std::vector<float> dw_prev = randn(rng, size_t(K) * H, 1.f);  // accumulated onto
  std::vector<float> dw_rf = dw_prev;
  rf::ThreadPool pool_other(c.threads == 2 ? 1 : c.threads);
  const rf::RfLossResult got = rf::rf_loss(c.threads == 2 ? pool2 : pool_other, h.data(), N, h_ref.data(), Nr, H, W,
                                           w_rf.data(), c.rows.data(), o, dh.data(), dw_rf.data());
  for (size_t k = 0; k < dw_rf.size(); ++k) dw_rf[k] -= dw_prev[k];

  auto rel_err = [](double g, double w) { return std::fabs(g - w) / std::max(std::fabs(w), 1e-12); };
  const double e_b = rel_err(got.benign, want.benign), e_r = rel_err(got.red_flag, want.red_flag),
               e_a = rel_err(got.after, want.after), e_t = rel_err(got.total, want.total);
  const double e_dh = rel_l2(dh.data(), want.dh.data(), dh.size());
  const double e_dw = rel_l2(dw_rf.data(), want.dw_rf.data(), dw_rf.size());
  std::printf("%-44s benign %.2e rf %.2e after %.2e total %.2e | dh %.2e dw_rf %.2e  (L = %.4g %.4g %.4g)\n",
              c.name.c_str(), e_b, e_r, e_a, e_t, e_dh, e_dw, want.benign, want.red_flag, want.after);
  const double tol = 1e-5;
  // The AVX-512 bf16 path's rounding of p to bf16 (top comment): relative slack of 4 sigma
  // for the KL terms and the total, 2 x the predicted L2 norm for dh; none elsewhere.
  const bool p_bf16 = round_a;
  double sd_dh = 0, n_dh = 0;
  for (size_t i = 0; i < dh.size(); ++i) sd_dh += want.dh_var[i], n_dh += want.dh[i] * want.dh[i];
  sd_dh = std::sqrt(sd_dh / std::max(n_dh, 1e-300));  // predicted relative L2 error of dh
  auto slack = [&](double sigma, double value) { return p_bf16 ? 4 * sigma / std::max(std::fabs(value), 1e-12) : 0.0; };
  const double tol_b = tol + slack(want.sigma_benign, want.benign), tol_a = tol + slack(want.sigma_after, want.after),
               tol_t = tol + slack(want.sigma_total, want.total), tol_dh = tol + (p_bf16 ? 2 * sd_dh : 0.0);
  if (p_bf16)
    std::printf("%-44s bf16 p: err / predicted sigma: benign %.2f after %.2f total %.2f dh %.2f"
                " (dh predicted %.2e)\n", "",
                want.sigma_benign > 0 ? std::fabs(got.benign - want.benign) / want.sigma_benign : 0.0,
                want.sigma_after > 0 ? std::fabs(got.after - want.after) / want.sigma_after : 0.0,
                want.sigma_total > 0 ? std::fabs(got.total - want.total) / want.sigma_total : 0.0,
                sd_dh > 0 ? e_dh / sd_dh : 0.0, sd_dh);
  check(got.n_benign_rows == want.n_benign && got.n_groups == want.n_groups && got.n_after_rows == want.n_after,
        c.name + " counts");
  check(e_b <= tol_b && (want.n_benign > 0 || got.benign == 0), c.name + " benign");
  check(e_r <= tol && (want.n_groups > 0 || got.red_flag == 0), c.name + " red_flag");
  check(e_a <= tol_a && (want.n_after > 0 || got.after == 0), c.name + " after");
  check(e_t <= tol_t, c.name + " total");
  if (c.extremes)
    check(want.p_rf_min < 1e-6 && want.p_rf_max > 1 - 1e-6,
          c.name + " has p_rf near 0 and near 1 (" + std::to_string(want.p_rf_min) + ", " + std::to_string(want.p_rf_max) + ")");
  check(e_dh <= tol_dh, c.name + " dh");
  check(e_dw <= tol, c.name + " dw_rf");

  if (round_a) {
    // The unrounded function: differs by the bf16 rounding of h only.
    in.a = in.h;
    in.a_ref = in.h_ref;
    const RefOutput exact = reference(in);
    const double u_t = rel_err(got.total, exact.total), u_dh = rel_l2(dh.data(), exact.dh.data(), dh.size());
    std::printf("%-44s vs unrounded h: total %.2e dh %.2e\n", "", u_t, u_dh);
    check(u_t <= 3e-2 && u_dh <= 3e-2, c.name + " vs unrounded reference");
  }
}

void test_cases(rf::ThreadPool& pool) {
  std::vector<Case> cases;
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
    const std::string d = dt == rf::DType::f32 ? " f32" : " bf16";
    for (RfAggregation agg : {RfAggregation::any, RfAggregation::mean}) {
      Case c;
      c.name = std::string("mixed V=1000 chunk=256 ") + (agg == RfAggregation::any ? "any" : "mean") + d;
      c.H = 64, c.V = 1000, c.rf = 517, c.chunk = 256, c.dtype = dt, c.agg = agg;
      c.alpha_benign = 0.7f, c.alpha_rf = 1.3f, c.alpha_after = 2.f;
      rows_make(c, 24, 16, {1, 2, 3, 5, 8, 3}, true);
      push_extremes(c);
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "single V=517 chunk=64 H=37" + d;  // odd H: bf16 pair padding
      c.H = 37, c.V = 517, c.rf = 0, c.chunk = 64, c.dtype = dt, c.agg = RfAggregation::single;
      rows_make(c, 5, 6, {1, 1, 1, 1, 1, 1, 1});
      c.push[0] = 25.f;
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "groups 1..20 any V=300 rf=V-1" + d;
      c.H = 48, c.V = 300, c.rf = 299, c.chunk = 96, c.dtype = dt;
      std::vector<int> sizes;
      for (int s = 1; s <= 20; ++s) sizes.push_back(s);
      rows_make(c, 3, 3, sizes);
      // Mix: some groups all near 0 (large loss), some with one row near 1 (tiny loss).
      for (int i = 0; i < c.N; ++i)
        if (c.rows[i].kind == RfLossKind::red_flag) {
          const int g = c.rows[i].group;
          c.push[i] = g % 3 == 0 ? -20.f : (g % 3 == 1 && i % 5 == 0 ? 28.f : 0.f);
        }
      c.extremes = true;
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "groups 1..20 mean V=300" + d;
      c.H = 48, c.V = 300, c.rf = 150, c.chunk = 0, c.dtype = dt, c.agg = RfAggregation::mean;
      std::vector<int> sizes;
      for (int s = 1; s <= 20; ++s) sizes.push_back(s);
      rows_make(c, 0, 0, sizes);
      for (int i = 0; i < c.N; i += 4) c.push[i] = i % 8 ? 30.f : -30.f;
      c.extremes = true;
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "N=1 red flag V=33 chunk=32 1 thread" + d;
      c.H = 16, c.V = 33, c.rf = 32, c.chunk = 32, c.dtype = dt, c.threads = 1;
      rows_make(c, 0, 0, {1});
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "N=1 benign V=33 rf=0" + d;
      c.H = 16, c.V = 33, c.rf = 0, c.chunk = 0, c.dtype = dt;
      rows_make(c, 1, 0, {});
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "default chunk V=5003 H=96, 300 rows" + d;  // several row blocks per chunk
      c.H = 96, c.V = 5003, c.rf = 4000, c.chunk = 0, c.dtype = dt;
      c.alpha_after = 0.f;  // a zero alpha: its term is reported, adds no gradient
      rows_make(c, 150, 75, std::vector<int>(5, 15));
      cases.push_back(c);
    }
    {
      // 800 + 600 stream rows: tasks of 48 rows (the large-batch path).
      Case c;
      c.name = "1400 stream rows V=333 H=40 any" + d;
      c.H = 40, c.V = 333, c.rf = 7, c.chunk = 0, c.dtype = dt;
      rows_make(c, 400, 200, std::vector<int>(20, 10));
      for (int i = 0; i < c.N; i += 9) c.push[i] = i % 2 ? 25.f : -25.f;
      cases.push_back(c);
    }
    {
      // 500 + 300 stream rows on 3 threads: tasks of 24 rows.
      Case c;
      c.name = "800 stream rows V=290 H=24 mean 3 threads" + d;
      c.H = 24, c.V = 290, c.rf = 100, c.chunk = 64, c.dtype = dt, c.threads = 3, c.agg = RfAggregation::mean;
      rows_make(c, 200, 100, std::vector<int>(25, 8));
      cases.push_back(c);
    }
  }
  for (const Case& c : cases) run_case(pool, c);
}

// Odd shapes for the AVX-512 bf16 path's vocabulary-pair layout (and both ISAs, both dtypes).
// Built and run after test_cases, so the shared rng gives the cases above their usual data.
void test_odd_tails(rf::ThreadPool& pool) {
  std::vector<Case> cases;
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
    const std::string d = dt == rf::DType::f32 ? " f32" : " bf16";
    {
      // Odd lengths everywhere for the bf16 pair layout (vocabulary pairs (j, j + 1)): the last
      // chunk holds 41 rows (an odd pair tail, the second panel 9 rows), rf at local column 1
      // (the high half of the chunk's first pair), H = 100 (a last strip of 4 columns), 43
      // rows (partial row tiles). The last token is heavy (W row x 4: p near 1 for some rows),
      // so dropping or misplacing the odd tail is far outside the rounding slack.
      Case c;
      c.name = "odd tail V=1001 chunk=96 H=100 heavy last" + d;
      c.H = 100, c.V = 1001, c.rf = 961, c.chunk = 96, c.dtype = dt, c.last_row_scale = 4.f;
      rows_make(c, 20, 13, {1, 3, 4, 2}, true);
      cases.push_back(c);
    }
    {
      // Chunks of 32 and 31 rows, rf the last of the first chunk (high half of its last pair),
      // H = 33 (a one-column strip), heavy last token (the odd tail's lone low half).
      Case c;
      c.name = "odd tail V=63 chunk=32 H=33 rf=31 heavy last" + d;
      c.H = 33, c.V = 63, c.rf = 31, c.chunk = 32, c.dtype = dt, c.last_row_scale = 4.f, c.agg = RfAggregation::mean;
      rows_make(c, 7, 4, {2, 5, 1});
      cases.push_back(c);
    }
  }
  for (const Case& c : cases) run_case(pool, c);
}

// Several flag tokens (one per risk category): each red-flag group trains its own flag, the
// KL rows compare whole distributions with every flag row replaced.
void test_flags(rf::ThreadPool& pool) {
  std::vector<Case> cases;
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
    const std::string d = dt == rf::DType::f32 ? " f32" : " bf16";
    for (RfAggregation agg : {RfAggregation::any, RfAggregation::mean}) {
      Case c;
      c.name = std::string("4 flags V=1000 chunk=256 ") + (agg == RfAggregation::any ? "any" : "mean") + d;
      c.H = 64, c.V = 1000, c.chunk = 256, c.dtype = dt, c.agg = agg;
      c.flags = {517, 3, 999, 518};  // two in one chunk, the first and last chunks
      c.alpha_benign = 0.7f, c.alpha_rf = 1.3f, c.alpha_after = 2.f;
      rows_make(c, 24, 16, {1, 2, 3, 5, 8, 3, 4, 2}, true);
      push_extremes(c);
      cases.push_back(c);
    }
    {
      Case c;
      c.name = "3 flags single V=63 chunk=32 H=33" + d;
      c.H = 33, c.V = 63, c.chunk = 32, c.dtype = dt, c.agg = RfAggregation::single;
      c.flags = {31, 32, 62};
      rows_make(c, 7, 4, {1, 1, 1, 1, 1, 1});
      cases.push_back(c);
    }
  }
  for (const Case& c : cases) run_case(pool, c);
}

void test_errors(rf::ThreadPool& pool) {
  const int H = 8, V = 40;
  auto Wsrc = randn(rng, size_t(V) * H, 0.5f);
  rf::PackedWeight W;
  rf::pack_weight(W, Wsrc.data(), rf::SrcType::f32, V, H, false, rf::DType::f32);
  std::vector<float> h(4 * H, 0.1f), href(2 * H, 0.1f), w(H, 0.1f), dh(4 * H), dw(H);
  auto throws = [&](std::vector<RfLossRow> rows, rf::RfLossOptions o, int Nr, const std::string& name) {
    bool thrown = false;
    try {
      rf::rf_loss(pool, h.data(), int(rows.size()), href.data(), Nr, H, W, w.data(), rows.data(), o, dh.data(), dw.data());
    } catch (const std::invalid_argument&) {
      thrown = true;
    }
    check(thrown, "throws: " + name);
  };
  rf::RfLossOptions o;
  o.rf_token = 3;
  throws({{RfLossKind::benign_kl, 2, -1}}, o, 2, "ref_row out of range");
  throws({{RfLossKind::red_flag, -1, -1}}, o, 0, "red_flag without group");
  rf::RfLossOptions bad = o;
  bad.rf_token = V;
  throws({{RfLossKind::red_flag, -1, 0}}, bad, 0, "rf_token out of range");
  bad = o;
  bad.aggregation = RfAggregation::single;
  throws({{RfLossKind::red_flag, -1, 0}, {RfLossKind::red_flag, -1, 0}}, bad, 0, "single with a group of 2");
  bad = o;
  bad.flag_tokens = {3, 5, 3};
  throws({{RfLossKind::red_flag, -1, 0}}, bad, 0, "a flag listed twice");
  bad.flag_tokens = {3, 5};
  throws({{RfLossKind::red_flag, -1, 0, 2}}, bad, 0, "flag index out of range");
  bad.flag_tokens = {3, V};
  throws({{RfLossKind::red_flag, -1, 0}}, bad, 0, "flag token out of range");
}

}  // namespace

int main() {
  std::printf("isa %s\n", rf::isa_name(rf::active_isa()));
  for (RfAggregation agg : {RfAggregation::any, RfAggregation::mean, RfAggregation::single})
    test_reference_gradients(agg, 1);
  rf::ThreadPool pool(2);
  test_cases(pool);
  test_odd_tails(pool);
  // Several flags last, so the shared rng gives the cases above their usual data.
  for (RfAggregation agg : {RfAggregation::any, RfAggregation::mean, RfAggregation::single})
    test_reference_gradients(agg, 3);
  test_flags(pool);
  test_errors(pool);
  return rf::test::finish("test_rf_loss");
}
