// The row-wise transformer ops (kernels/ops.h) against float64 references.
// Tolerances: each op is a short f32 computation, so results must agree with float64 to
// a few f32 ulps: relative L2 <= 1e-6 (exp-based ops: 2e-6, the polynomial exp's error).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/dtype.h"
#include "kernels/ops.h"
#include "tests/check.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

std::mt19937 rng(1234);

std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

void test_rmsnorm(int n) {
  auto x = randn(n, 3.f), w = randn(n);
  std::vector<float> out(n);
  rf::rmsnorm_forward(out.data(), x.data(), w.data(), n, 1e-5f);
  double ss = 0;
  for (float v : x) ss += double(v) * v;
  const double inv = 1.0 / std::sqrt(ss / n + 1e-5);
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) want[i] = double(w[i]) * x[i] * inv;
  check(rel_l2(out.data(), want.data(), n) <= 1e-6, "rmsnorm n=" + std::to_string(n));
}

void test_layernorm(int n) {
  auto x = randn(n, 2.f), w = randn(n), b = randn(n);
  for (float& v : x) v += 5.f;  // a large mean: the two-pass variance must stay accurate
  std::vector<float> out(n);
  rf::layernorm_forward(out.data(), x.data(), w.data(), b.data(), n, 1e-5f);
  double mean = 0, var = 0;
  for (float v : x) mean += v;
  mean /= n;
  for (float v : x) var += (v - mean) * (v - mean);
  var /= n;
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) want[i] = (x[i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
  check(rel_l2(out.data(), want.data(), n) <= 1e-6, "layernorm n=" + std::to_string(n));
}

void test_rope(int heads, int hd) {
  auto x = randn(size_t(heads) * hd);
  std::vector<float> cos(hd / 2), sin(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    cos[i] = std::cos(0.3 * (i + 1));
    sin[i] = std::sin(0.3 * (i + 1));
  }
  std::vector<double> want(x.size());
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < hd; ++i) {
      const int j = i % (hd / 2);
      const double rot = i < hd / 2 ? -double(x[h * hd + i + hd / 2]) : double(x[h * hd + i - hd / 2]);
      want[h * hd + i] = x[h * hd + i] * double(cos[j]) + rot * double(sin[j]);
    }
  rf::rope_forward(x.data(), heads, hd, cos.data(), sin.data());
  check(rel_l2(x.data(), want.data(), x.size()) <= 1e-6, "rope heads=" + std::to_string(heads) + " hd=" + std::to_string(hd));
}

void test_swiglu(int n) {
  auto g = randn(n, 4.f), u = randn(n);
  std::vector<float> out(n);
  rf::swiglu_forward(out.data(), g.data(), u.data(), n);
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) want[i] = double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i];
  check(rel_l2(out.data(), want.data(), n) <= 2e-6, "swiglu n=" + std::to_string(n));
}

void test_gelu(int n) {
  auto x = randn(n, 3.f);
  x[0] = 1e-4f;  // small-argument branch of tanh
  x[1] = -30.f;  // saturation
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) {
    const double v = x[i];
    want[i] = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
  }
  rf::gelu_new_forward(x.data(), n);
  check(rel_l2(x.data(), want.data(), n) <= 2e-6, "gelu_new n=" + std::to_string(n));
  double worst = 0;
  for (int i = 0; i < n; ++i) worst = std::fmax(worst, std::fabs(x[i] - want[i]));
  check(worst <= 1e-5, "gelu_new max abs error n=" + std::to_string(n));
}

void test_attention(int n_keys, int hd, long stride) {
  auto q = randn(hd), k = randn(size_t(n_keys) * stride, 1.5f), v = randn(size_t(n_keys) * stride);
  std::vector<float> out(hd), scores(n_keys);
  const float scale = 1.0f / std::sqrt(float(hd));
  rf::attention_row(out.data(), q.data(), k.data(), v.data(), stride, n_keys, hd, scale, scores.data());
  std::vector<double> s(n_keys), want(hd, 0.0);
  double mx = -1e300, sum = 0;
  for (int j = 0; j < n_keys; ++j) {
    double d = 0;
    for (int i = 0; i < hd; ++i) d += double(q[i]) * k[j * stride + i];
    s[j] = d * scale;
    mx = std::fmax(mx, s[j]);
  }
  for (int j = 0; j < n_keys; ++j) sum += (s[j] = std::exp(s[j] - mx));
  for (int j = 0; j < n_keys; ++j)
    for (int i = 0; i < hd; ++i) want[i] += s[j] / sum * v[j * stride + i];
  check(rel_l2(out.data(), want.data(), hd) <= 2e-6,
        "attention keys=" + std::to_string(n_keys) + " hd=" + std::to_string(hd) + " stride=" + std::to_string(stride));
}

void test_softmax(int n) {
  auto z = randn(n, 6.f);
  z[n / 2] = 40.f;  // a dominant logit: max subtraction must keep it finite
  double mx = -1e300, sum = 0;
  for (float v : z) mx = std::fmax(mx, v);
  for (float v : z) sum += std::exp(double(v) - mx);
  const double lse = mx + std::log(sum);
  const float got = rf::logsumexp(z.data(), n);
  check(std::fabs(got - lse) <= 2e-6 * std::fmax(1.0, std::fabs(lse)), "logsumexp n=" + std::to_string(n));
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) want[i] = 0.5 * std::exp(double(z[i]) - lse);
  rf::softmax_scale(z.data(), n, float(lse), 0.5f);
  check(rel_l2(z.data(), want.data(), n) <= 2e-6, "softmax_scale n=" + std::to_string(n));
}

// f32 -> bf16 against bit patterns worked by hand (round to nearest, ties to even; NaN stays a
// quiet NaN; overflow rounds to infinity), since every bf16 test elsewhere builds its reference
// with this same function.
void test_bf16_rounding() {
  struct Case {
    uint32_t f32;
    uint16_t bf16;
    const char* what;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80u, "1.0 exactly"},
      {0x3f808000u, 0x3f80u, "a tie below an even mantissa stays"},
      {0x3f818000u, 0x3f82u, "a tie below an odd mantissa rounds up to even"},
      {0x3f808001u, 0x3f81u, "just past a tie rounds up"},
      {0x3f807fffu, 0x3f80u, "just below a tie rounds down"},
      {0xbf818000u, 0xbf82u, "negative ties alike"},
      {0x7f7fffffu, 0x7f80u, "the largest float rounds to infinity"},
      {0x7f800000u, 0x7f80u, "infinity"},
      {0x00000001u, 0x0000u, "the smallest denormal rounds to zero"},
      {0x00008000u, 0x0000u, "a denormal tie to even zero"},
      {0x00018000u, 0x0002u, "a denormal tie to even two"},
      {0x7f800001u, 0x7fc0u, "a signalling NaN becomes quiet, not infinity"},
      {0xffc00000u, 0xffc0u, "a negative quiet NaN"},
  };
  for (const Case& c : cases) {
    float f;
    std::memcpy(&f, &c.f32, 4);
    const uint16_t got = rf::f32_to_bf16(f);
    char msg[160];
    std::snprintf(msg, sizeof msg, "f32_to_bf16(0x%08x) = 0x%04x, want 0x%04x (%s)", c.f32, got, c.bf16, c.what);
    check(got == c.bf16, msg);
  }
}

}  // namespace

int main() {
  std::printf("test_ops: isa %s\n", rf::isa_name(rf::active_isa()));
  for (int n : {1, 7, 16, 64, 576, 1000}) {
    test_rmsnorm(n);
    test_layernorm(n);
    test_swiglu(n);
    test_gelu(n < 2 ? 2 : n);
  }
  test_bf16_rounding();
  for (int hd : {2, 16, 64, 128}) test_rope(3, hd);
  for (int n : {1, 3, 17, 1000, 32001}) test_softmax(n);
  for (int keys : {1, 2, 17, 300}) {
    test_attention(keys, 64, 64);
    test_attention(keys, 24, 24);
    test_attention(keys, 16, 48);
  }
  return rf::test::finish("test_ops");
}
