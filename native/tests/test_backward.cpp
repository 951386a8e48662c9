// The row-wise backward ops (kernels/ops_backward.h), each checked two ways:
//
//  1. Against central finite differences of a float64 reference forward: with a random
//     upstream gradient dout, L(inputs) = sum(dout * f(inputs)) in float64, every input
//     element (a random sample of them for the large attention cases, always including the
//     first and last keys) is moved by +-h, h = 1e-6, and dL/dx = (L(x+h) - L(x-h)) / 2h.
//     Tolerance: max |analytic - numeric| / (1 + |numeric|) <= 1e-4. The numeric gradient is
//     good to ~1e-9 (truncation h^2 ~ 1e-12, rounding 1e-16 |L| / h); the f32 analytic one to
//     ~1e-6, so 1e-4 leaves room for f32 while any wrong term in a formula is off by O(1).
//  2. Against the same backward formula evaluated in float64: relative L2 <= 1e-5 (a short f32
//     computation with sums over up to 576 elements or 300 keys).
//
// Parameter / key-value gradients are accumulated (+=): they are checked from zero, and once
// more from random contents, which must come out as contents + gradient (one f32 rounding).
// Gradients that are written (=) start as NaN so an element left unwritten fails.
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "kernels/ops_backward.h"
#include "kernels/ops.h"
#include "tests/check.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

using Vec = std::vector<double>;
using Floats = std::vector<float>;

constexpr double kStep = 1e-6;     // finite-difference step h
constexpr double kFdTol = 1e-4;    // max |a - n| / (1 + |n|)
constexpr double kFormulaTol = 1e-5;  // relative L2 against the float64 formula
const float kNaN = std::numeric_limits<float>::quiet_NaN();

std::mt19937 rng(4321);

Floats randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  Floats v(n);
  for (float& x : v) x = d(rng);
  return v;
}

Vec f64(const Floats& v) { return Vec(v.begin(), v.end()); }

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::vector<size_t> all_indices(size_t n) {
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  return idx;
}

std::string fmt(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g", x);
  return b;
}

// Compares analytic[i] with the central difference of loss() in x[i] for i in idx
// (x is the float64 input loss() reads; it is restored).
void check_numeric(const std::string& what, const float* analytic, Vec& x, const std::function<double()>& loss,
                   const std::vector<size_t>& idx) {
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i : idx) {
    const double saved = x[i];
    x[i] = saved + kStep;
    const double up = loss();
    x[i] = saved - kStep;
    const double down = loss();
    x[i] = saved;
    const double numeric = (up - down) / (2 * kStep);
    const double err = std::fabs(double(analytic[i]) - numeric) / (1 + std::fabs(numeric));
    if (!(err <= worst)) {  // also catches NaN
      worst = std::isnan(err) ? INFINITY : err;
      worst_i = i;
    }
  }
  check(worst <= kFdTol, what + " vs finite differences: worst " + fmt(worst) + " at " + std::to_string(worst_i));
}

// ||got - want|| <= 1e-5 * max(||want||, term_norm). term_norm: the size of the terms that
// cancel in the formula, where the result can be far smaller than they are (a norm over 1 or 2
// elements: the output barely depends on x, so f32 keeps only the terms' rounding error).
void check_formula(const std::string& what, const float* got, const Vec& want, double term_norm = 0) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += want[i] * want[i];
  }
  const double e = std::sqrt(num) / std::fmax(std::fmax(std::sqrt(den), term_norm), 1e-300);
  check(e <= kFormulaTol, what + " vs float64 formula: rel L2 " + fmt(e));
}

// ||scale * a * b|| (elementwise product).
double norm_of_product(const Vec& a, const Vec& b, double scale) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (scale * a[i] * b[i]) * (scale * a[i] * b[i]);
  return std::sqrt(s);
}

// after must equal before + fresh (the gradient from zero) up to one f32 rounding
// (FMA contraction may round once instead of twice).
void check_accumulated(const std::string& what, const Floats& before, const Floats& after, const Floats& fresh) {
  bool ok = true;
  for (size_t i = 0; i < after.size(); ++i) {
    const double want = double(before[i]) + double(fresh[i]);
    ok = ok && std::fabs(after[i] - want) <= 3e-7 * (std::fabs(before[i]) + std::fabs(fresh[i])) + 1e-37;
  }
  check(ok, what + " accumulates (+=)");
}

// ---------------------------------------------------------------------------------------
// float64 forwards (the functions being differentiated) and backward formulas

Vec rmsnorm_ref(const Vec& x, const Vec& w, double eps) {
  const size_t n = x.size();
  const double inv = 1.0 / std::sqrt(dot(x, x) / n + eps);
  Vec y(n);
  for (size_t i = 0; i < n; ++i) y[i] = w[i] * x[i] * inv;
  return y;
}

void rmsnorm_backward_ref(Vec& dx, Vec& dw, const Vec& dout, const Vec& x, const Vec& w, double eps) {
  const size_t n = x.size();
  const double inv = 1.0 / std::sqrt(dot(x, x) / n + eps);
  double gx = 0;
  for (size_t i = 0; i < n; ++i) gx += dout[i] * w[i] * x[i];
  dx.resize(n);
  dw.resize(n);
  for (size_t i = 0; i < n; ++i) {
    dx[i] = inv * dout[i] * w[i] - inv * inv * inv / n * x[i] * gx;
    dw[i] = dout[i] * x[i] * inv;
  }
}

Vec layernorm_ref(const Vec& x, const Vec& w, const Vec& b, double eps) {
  const size_t n = x.size();
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= n;
  for (double v : x) var += (v - mean) * (v - mean);
  const double rstd = 1.0 / std::sqrt(var / n + eps);
  Vec y(n);
  for (size_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
  return y;
}

void layernorm_backward_ref(Vec& dx, Vec& dw, Vec& db, const Vec& dout, const Vec& x, const Vec& w, double eps) {
  const size_t n = x.size();
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= n;
  for (double v : x) var += (v - mean) * (v - mean);
  const double rstd = 1.0 / std::sqrt(var / n + eps);
  double g_mean = 0, gx_mean = 0;
  for (size_t i = 0; i < n; ++i) {
    g_mean += dout[i] * w[i] / n;
    gx_mean += dout[i] * w[i] * (x[i] - mean) * rstd / n;
  }
  dx.resize(n);
  dw.resize(n);
  db.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const double xhat = (x[i] - mean) * rstd;
    dx[i] = rstd * (dout[i] * w[i] - g_mean - xhat * gx_mean);
    dw[i] = dout[i] * xhat;
    db[i] = dout[i];
  }
}

// transformers' rotate_half convention, as rope_forward.
Vec rope_ref(const Vec& x, int heads, int hd, const Vec& cos, const Vec& sin) {
  Vec y(x.size());
  const int half = hd / 2;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < half; ++i) {
      const double a = x[h * hd + i], b = x[h * hd + half + i];
      y[h * hd + i] = a * cos[i] - b * sin[i];
      y[h * hd + half + i] = b * cos[i] + a * sin[i];
    }
  return y;
}

double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }

Vec swiglu_ref(const Vec& gate, const Vec& up) {
  Vec y(gate.size());
  for (size_t i = 0; i < y.size(); ++i) y[i] = gate[i] * sigmoid(gate[i]) * up[i];
  return y;
}

constexpr double kGeluK = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluC = 0.044715;

Vec gelu_ref(const Vec& x) {
  Vec y(x.size());
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = x[i];
    y[i] = 0.5 * v * (1.0 + std::tanh(kGeluK * (v + kGeluC * v * v * v)));
  }
  return y;
}

// The textbook form, with tanh (the kernel uses the sigmoid form).
double gelu_grad_ref(double v) {
  const double t = std::tanh(kGeluK * (v + kGeluC * v * v * v));
  return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * kGeluK * (1.0 + 3.0 * kGeluC * v * v);
}

struct AttentionShape {
  int n_keys, hd;
  long stride;
};

// softmax_j(scale q.k_j) for the keys; k [n_keys, stride].
Vec attention_probs_ref(const AttentionShape& s, const Vec& q, const Vec& k, double scale) {
  Vec p(s.n_keys);
  double mx = -1e300, sum = 0;
  for (int j = 0; j < s.n_keys; ++j) {
    double d = 0;
    for (int i = 0; i < s.hd; ++i) d += q[i] * k[j * s.stride + i];
    p[j] = d * scale;
    mx = std::fmax(mx, p[j]);
  }
  for (double& x : p) sum += (x = std::exp(x - mx));
  for (double& x : p) x /= sum;
  return p;
}

Vec attention_ref(const AttentionShape& s, const Vec& q, const Vec& k, const Vec& v, double scale) {
  const Vec p = attention_probs_ref(s, q, k, scale);
  Vec out(s.hd, 0.0);
  for (int j = 0; j < s.n_keys; ++j)
    for (int i = 0; i < s.hd; ++i) out[i] += p[j] * v[j * s.stride + i];
  return out;
}

// dq (=), dk, dv (from zero; [n_keys, stride], gaps zero).
void attention_backward_ref(const AttentionShape& s, Vec& dq, Vec& dk, Vec& dv, const Vec& dout, const Vec& q,
                            const Vec& k, const Vec& v, double scale) {
  const Vec p = attention_probs_ref(s, q, k, scale);
  Vec dp(s.n_keys, 0.0);
  double D = 0;
  for (int j = 0; j < s.n_keys; ++j) {
    for (int i = 0; i < s.hd; ++i) dp[j] += dout[i] * v[j * s.stride + i];
    D += p[j] * dp[j];
  }
  dq.assign(s.hd, 0.0);
  dk.assign(k.size(), 0.0);
  dv.assign(v.size(), 0.0);
  for (int j = 0; j < s.n_keys; ++j) {
    const double ds = p[j] * (dp[j] - D) * scale;
    for (int i = 0; i < s.hd; ++i) {
      dq[i] += ds * k[j * s.stride + i];
      dk[j * s.stride + i] = ds * q[i];
      dv[j * s.stride + i] = p[j] * dout[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tests

void test_rmsnorm(int n) {
  const std::string tag = "rmsnorm n=" + std::to_string(n);
  const float eps = 1e-5f;
  Floats x = randn(n, 2.f), w = randn(n), dout = randn(n);
  Floats dx(n, kNaN), dw(n, 0.f);
  rf::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), n, eps);

  Vec X = f64(x), W = f64(w), G = f64(dout);
  auto loss = [&] { return dot(G, rmsnorm_ref(X, W, eps)); };
  check_numeric(tag + " dx", dx.data(), X, loss, all_indices(n));
  check_numeric(tag + " dw", dw.data(), W, loss, all_indices(n));
  Vec dx64, dw64;
  rmsnorm_backward_ref(dx64, dw64, G, X, W, eps);
  const double inv = 1.0 / std::sqrt(dot(X, X) / n + eps);
  check_formula(tag + " dx", dx.data(), dx64, norm_of_product(G, W, inv));
  check_formula(tag + " dw", dw.data(), dw64);

  Floats dw_before = randn(n), dw_after = dw_before, dx2(n, kNaN);
  rf::rmsnorm_backward(dx2.data(), dw_after.data(), dout.data(), x.data(), w.data(), n, eps);
  check_accumulated(tag + " dw", dw_before, dw_after, dw);
  check(dx2 == dx, tag + " dx is written (=), not accumulated");
}

void test_layernorm(int n) {
  const std::string tag = "layernorm n=" + std::to_string(n);
  const float eps = 1e-5f;
  Floats x = randn(n, 2.f), w = randn(n), b = randn(n), dout = randn(n);
  for (float& v : x) v += 3.f;  // a mean away from zero, as real activations have
  Floats dx(n, kNaN), dw(n, 0.f), db(n, 0.f);
  rf::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), n, eps);

  Vec X = f64(x), W = f64(w), B = f64(b), G = f64(dout);
  auto loss = [&] { return dot(G, layernorm_ref(X, W, B, eps)); };
  check_numeric(tag + " dx", dx.data(), X, loss, all_indices(n));
  check_numeric(tag + " dw", dw.data(), W, loss, all_indices(n));
  check_numeric(tag + " db", db.data(), B, loss, all_indices(n));
  Vec dx64, dw64, db64;
  layernorm_backward_ref(dx64, dw64, db64, G, X, W, eps);
  double var = 0, mean = 0;
  for (double v : X) mean += v / n;
  for (double v : X) var += (v - mean) * (v - mean) / n;
  check_formula(tag + " dx", dx.data(), dx64, norm_of_product(G, W, 1.0 / std::sqrt(var + eps)));
  check_formula(tag + " dw", dw.data(), dw64);
  check_formula(tag + " db", db.data(), db64);

  Floats dw_before = randn(n), db_before = randn(n), dx2(n, kNaN);
  Floats dw_after = dw_before, db_after = db_before;
  rf::layernorm_backward(dx2.data(), dw_after.data(), db_after.data(), dout.data(), x.data(), w.data(), n, eps);
  check_accumulated(tag + " dw", dw_before, dw_after, dw);
  check_accumulated(tag + " db", db_before, db_after, db);
  check(dx2 == dx, tag + " dx is written (=), not accumulated");
}

void test_rope(int heads, int hd) {
  const std::string tag = "rope heads=" + std::to_string(heads) + " hd=" + std::to_string(hd);
  const int n = heads * hd;
  Floats cos(hd / 2), sin(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {  // angles of a position ~ 7 under a range of frequencies
    const double theta = 7.0 * std::pow(10000.0, -2.0 * i / hd);
    cos[i] = float(std::cos(theta));
    sin[i] = float(std::sin(theta));
  }
  Floats x = randn(n), dout = randn(n);
  Floats dx = dout;
  rf::rope_backward(dx.data(), heads, hd, cos.data(), sin.data());

  Vec X = f64(x), G = f64(dout), C = f64(cos), S = f64(sin);
  auto loss = [&] { return dot(G, rope_ref(X, heads, hd, C, S)); };
  check_numeric(tag + " dx", dx.data(), X, loss, all_indices(n));
  // Formula: the transpose of the rotation, applied to dout.
  Vec dx64(n);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < hd / 2; ++i) {
      const double a = G[h * hd + i], b = G[h * hd + hd / 2 + i];
      dx64[h * hd + i] = a * C[i] + b * S[i];
      dx64[h * hd + hd / 2 + i] = b * C[i] - a * S[i];
    }
  check_formula(tag + " dx", dx.data(), dx64);
  // The rotation is orthogonal: backward undoes forward.
  Floats y = x;
  rf::rope_forward(y.data(), heads, hd, cos.data(), sin.data());
  rf::rope_backward(y.data(), heads, hd, cos.data(), sin.data());
  check(rel_l2(y.data(), X.data(), n) <= 1e-6, tag + " backward(forward(x)) = x");
}

void test_swiglu(int n) {
  const std::string tag = "swiglu n=" + std::to_string(n);
  Floats gate = randn(n, 3.f), up = randn(n), dout = randn(n);
  if (n >= 4) {  // saturated ends: exp_f32 clamps, sigmoid -> 0 / 1
    gate[0] = -60.f;
    gate[1] = 60.f;
    gate[2] = 1e-3f;
  }
  Floats dgate(n, kNaN), dup(n, kNaN);
  rf::swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), n);

  Vec Gt = f64(gate), U = f64(up), G = f64(dout);
  auto loss = [&] { return dot(G, swiglu_ref(Gt, U)); };
  check_numeric(tag + " dgate", dgate.data(), Gt, loss, all_indices(n));
  check_numeric(tag + " dup", dup.data(), U, loss, all_indices(n));
  Vec dgate64(n), dup64(n);
  for (int i = 0; i < n; ++i) {
    const double s = sigmoid(Gt[i]);
    dgate64[i] = G[i] * U[i] * s * (1 + Gt[i] * (1 - s));
    dup64[i] = G[i] * Gt[i] * s;
  }
  check_formula(tag + " dgate", dgate.data(), dgate64);
  check_formula(tag + " dup", dup.data(), dup64);
}

void test_gelu(int n) {
  const std::string tag = "gelu_new n=" + std::to_string(n);
  Floats x = randn(n, 2.5f), dout = randn(n);
  if (n >= 5) {
    x[0] = 1e-4f;  // tanh's small-argument range
    x[1] = -30.f;  // saturated: gelu ~ 0
    x[2] = 30.f;   // saturated: gelu ~ x
    x[3] = 0.f;
    x[4] = -3.f;   // the negative lobe, where the derivative changes sign
  }
  Floats dx(n, kNaN);
  rf::gelu_new_backward(dx.data(), dout.data(), x.data(), n);

  Vec X = f64(x), G = f64(dout);
  auto loss = [&] { return dot(G, gelu_ref(X)); };
  check_numeric(tag + " dx", dx.data(), X, loss, all_indices(n));
  Vec dx64(n);
  for (int i = 0; i < n; ++i) dx64[i] = G[i] * gelu_grad_ref(X[i]);
  check_formula(tag + " dx", dx.data(), dx64);
  // dx may alias dout.
  Floats inplace = dout;
  rf::gelu_new_backward(inplace.data(), inplace.data(), x.data(), n);
  check(inplace == dx, tag + " dx aliasing dout");
}

void test_attention(int n_keys, int hd, long stride) {
  const std::string tag = "attention keys=" + std::to_string(n_keys) + " hd=" + std::to_string(hd) +
                          " stride=" + std::to_string(stride);
  const AttentionShape s{n_keys, hd, stride};
  const size_t kv = size_t(n_keys) * stride;
  const float scale = 1.0f / std::sqrt(float(hd));
  Floats q = randn(hd, 1.5f), k = randn(kv, 1.5f), v = randn(kv), dout = randn(hd);
  // Gaps between key rows (stride > hd, e.g. other heads) hold values the op must not read
  // into the result nor write.
  for (int j = 0; j < n_keys; ++j)
    for (long i = hd; i < stride; ++i) k[j * stride + i] = v[j * stride + i] = kNaN;
  Floats dq(hd, kNaN), dk(kv, 0.f), dv(kv, 0.f);
  Floats scratch(2 * size_t(n_keys) + 16, 0.f);
  for (size_t i = 2 * size_t(n_keys); i < scratch.size(); ++i) scratch[i] = 12345.f;  // guard
  rf::attention_row_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), stride,
                             n_keys, hd, scale, scratch.data());
  bool guard_ok = true;
  for (size_t i = 2 * size_t(n_keys); i < scratch.size(); ++i) guard_ok = guard_ok && scratch[i] == 12345.f;
  check(guard_ok, tag + " scratch stays within 2 * n_keys");

  Vec Q = f64(q), K = f64(k), V = f64(v), G = f64(dout);
  auto loss = [&] { return dot(G, attention_ref(s, Q, K, V, scale)); };
  // Key/value elements to perturb: all of them when there are few; else every element of the
  // first two and last keys plus 600 random ones (the rest would cost minutes of float64).
  std::vector<size_t> kv_idx;
  if (size_t(n_keys) * hd <= 4096) {
    for (int j = 0; j < n_keys; ++j)
      for (int i = 0; i < hd; ++i) kv_idx.push_back(j * stride + i);
  } else {
    for (int j : {0, 1, n_keys - 1})
      for (int i = 0; i < hd; ++i) kv_idx.push_back(j * stride + i);
    std::uniform_int_distribution<int> key(0, n_keys - 1), dim(0, hd - 1);
    for (int t = 0; t < 600; ++t) kv_idx.push_back(key(rng) * stride + dim(rng));
  }
  check_numeric(tag + " dq", dq.data(), Q, loss, all_indices(hd));
  check_numeric(tag + " dk", dk.data(), K, loss, kv_idx);
  check_numeric(tag + " dv", dv.data(), V, loss, kv_idx);

  Vec dq64, dk64, dv64;
  attention_backward_ref(s, dq64, dk64, dv64, G, Q, K, V, scale);
  check_formula(tag + " dq", dq.data(), dq64);
  check_formula(tag + " dk", dk.data(), dk64);  // gaps: 0 in both
  check_formula(tag + " dv", dv.data(), dv64);

  // Accumulation into dk / dv with contents (gaps included: they must come back unchanged).
  Floats dk_before = randn(kv), dv_before = randn(kv), dq2(hd, kNaN);
  Floats dk_after = dk_before, dv_after = dv_before;
  rf::attention_row_backward(dq2.data(), dk_after.data(), dv_after.data(), dout.data(), q.data(), k.data(), v.data(),
                             stride, n_keys, hd, scale, scratch.data());
  check_accumulated(tag + " dk", dk_before, dk_after, dk);
  check_accumulated(tag + " dv", dv_before, dv_after, dv);
  check(dq2 == dq, tag + " dq is written (=), not accumulated");
}

}  // namespace

int main() {
  std::printf("test_backward: isa %s\n", rf::isa_name(rf::active_isa()));
  for (int n : {1, 2, 7, 64, 333, 576}) {
    test_rmsnorm(n);
    test_layernorm(n);
    test_swiglu(n);
    test_gelu(n);
  }
  for (int hd : {2, 16, 64, 128}) {
    test_rope(1, hd);
    test_rope(3, hd);
  }
  for (int hd : {16, 64, 128})
    for (int keys : {1, 2, 17, 300}) {
      test_attention(keys, hd, hd);
      test_attention(keys, hd, 3 * hd);  // rows of a [T, heads * hd] tensor, one head
    }
  test_attention(33, 24, 40);  // head_dim not a multiple of the vector width, odd stride
  return rf::test::finish("test_backward");
}
