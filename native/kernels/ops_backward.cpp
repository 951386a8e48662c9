// Backward passes of the row-wise ops (see ops_backward.h for the formulas).
// Compiled once per instruction set like the forwards; every loop over a row is a
// `#pragma omp simd` loop so GCC vectorises it for the ISA of this compilation.
#include "kernels/ops_backward.h"

#include "kernels/attention_scores.h"

#include <cmath>

#include "kernels/vmath.h"

namespace rf {
namespace RF_ISA {

void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, int n,
                      float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
  // With xhat = x * inv and g = dout * w: dx = inv * (g - xhat * mean(g * xhat)); the mean
  // term is the gradient through inv, which every element of the row shares.
  float gx = 0.f;
#pragma omp simd reduction(+ : gx)
  for (int i = 0; i < n; ++i) {
    const float xhat = x[i] * inv;
    gx += dout[i] * w[i] * xhat;
    dw[i] += dout[i] * xhat;
  }
  const float c = gx / float(n);
#pragma omp simd
  for (int i = 0; i < n; ++i) dx[i] = inv * (dout[i] * w[i] - x[i] * inv * c);
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                        int n, float eps) {
  // Mean and variance exactly as layernorm_forward computes them (two passes).
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / float(n);
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(ss / float(n) + eps);
  // g = dout * w; the mean(g) term is the gradient through the mean, mean(g * xhat) the one
  // through rstd.
  float g_sum = 0.f, gx_sum = 0.f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
  for (int i = 0; i < n; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    const float g = dout[i] * w[i];
    g_sum += g;
    gx_sum += g * xhat;
    dw[i] += dout[i] * xhat;
    db[i] += dout[i];
  }
  const float g_mean = g_sum / float(n), gx_mean = gx_sum / float(n);
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    dx[i] = rstd * (dout[i] * w[i] - g_mean - xhat * gx_mean);
  }
}

// Forward per pair (a, b) = (x_i, x_{i+half}): a' = a c - b s, b' = b c + a s. The transpose:
// da = da' c + db' s, db = db' c - da' s.
void rope_backward(float* dx, int n_heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* a = dx + long(h) * head_dim;
    float* b = a + half;
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float ga = a[i], gb = b[i];
      a[i] = ga * cos[i] + gb * sin[i];
      b[i] = gb * cos[i] - ga * sin[i];
    }
  }
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float g = gate[i];
    const float e = exp_f32(-g);
    const float s = 1.0f / (1.0f + e);  // sigmoid(g)
    // 1 - s as e * s: no cancellation when g is large and positive.
    const float d = dout[i];
    dgate[i] = d * up[i] * s * (1.0f + g * (e * s));
    dup[i] = d * g * s;
  }
}

// gelu_new(x) = 0.5 x (1 + tanh(u)), u = k (x + c x^3). With s = sigmoid(2u), 0.5 (1 + tanh u) = s
// and 1 - tanh(u)^2 = 4 s (1 - s), so gelu_new'(x) = s + 2 x s (1 - s) k (1 + 3 c x^2). Written
// with e = exp(-2u) (1 - s = e s) it has no cancellation in either tail, unlike 1 - tanh^2.
void gelu_new_backward(float* dx, const float* dout, const float* x, int n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  const float c = 0.044715f;
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = k * (v + c * v * v * v);
    const float e = exp_f32(-2.0f * u);
    const float s = 1.0f / (1.0f + e);
    const float grad = s + 2.0f * v * s * (e * s) * k * (1.0f + 3.0f * c * v * v);
    dx[i] = dout[i] * grad;
  }
}

void attention_row_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                            const float* v, long kv_stride, int n_keys, int head_dim, float scale,
                            float* scratch) {
  float* p = scratch;            // [n_keys] softmax probabilities
  float* dp = scratch + n_keys;  // [n_keys] dL/dp_j = dout . v_j
  // Probabilities exactly as attention_row computes them.
  const float sum = attention_scores(q, k, kv_stride, n_keys, head_dim, scale, p);
  const float inv = 1.0f / sum;
  // dp_j = dout . v_j and dv_j += p_j dout in one pass over v_j; D = sum_j p_j dp_j (= dout . out)
  // is the softmax Jacobian's shared term.
  float D = 0.f;
  for (int j = 0; j < n_keys; ++j) {
    const float pj = p[j] * inv;
    p[j] = pj;
    const float* vj = v + j * kv_stride;
    float* dvj = dv + j * kv_stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < head_dim; ++d) {
      s += dout[d] * vj[d];
      dvj[d] += pj * dout[d];
    }
    dp[j] = s;
    D += pj * s;
  }
  // ds_j = p_j (dp_j - D) is dL/d(score_j); the score is scale * q . k_j.
#pragma omp simd
  for (int d = 0; d < head_dim; ++d) dq[d] = 0.f;
  for (int j = 0; j < n_keys; ++j) {
    const float ds = scale * p[j] * (dp[j] - D);
    const float* kj = k + j * kv_stride;
    float* dkj = dk + j * kv_stride;
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) {
      dq[d] += ds * kj[d];
      dkj[d] += ds * q[d];
    }
  }
}

}  // namespace RF_ISA
}  // namespace rf
