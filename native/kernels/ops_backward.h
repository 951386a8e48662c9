// Backward passes of the row-wise forward ops in kernels/ops.h, one row (token) at a time,
// for training. Same conventions as the forwards: compiled once per instruction set
// (rf::avx2, rf::avx512) and dispatched by native/dispatch/ops_backward.cpp.
//
// Gradients that belong to the row itself (dx, dq, dgate, ...) are written (=); gradients of
// parameters or tensors shared by many rows (norm weights dw/db, attention keys/values dk/dv)
// are accumulated (+=), so a caller zeroes them once per step and runs rows in any order.
// Nothing from the forward is stored except its inputs: statistics (rms, mean, softmax
// probabilities) are recomputed, which costs one extra pass over a row that is in cache.
#pragma once

#define RF_DECLARE_BACKWARD_KERNELS                                                              \
  /* rmsnorm_forward: y = w * x * r, r = 1 / sqrt(mean(x^2) + eps).                            \
     dx [n] = r * (dout*w) - r^3 / n * x * sum(dout*w*x)   (written);                          \
     dw [n] += dout * x * r   (accumulated). */                                                  \
  void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, \
                        int n, float eps);                                                       \
  /* layernorm_forward: y = xhat * w + b, xhat = (x - mean) * rstd. With g = dout * w:          \
     dx [n] = rstd * (g - mean(g) - xhat * mean(g * xhat))   (written);                        \
     dw [n] += dout * xhat, db [n] += dout   (accumulated). */                                   \
  void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,   \
                          const float* w, int n, float eps);                                     \
  /* dx [n_heads, head_dim]: on entry dL/d(rotated x), on return dL/dx, in place. The rotation \
     is orthogonal, so this is rope_forward with sin negated. cos, sin [head_dim / 2]. */         \
  void rope_backward(float* dx, int n_heads, int head_dim, const float* cos, const float* sin);  \
  /* swiglu_forward: out = silu(gate) * up.  dup [n] = dout * silu(gate);                       \
     dgate [n] = dout * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))   (written). */   \
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,           \
                       const float* up, int n);                                                  \
  /* gelu_new_forward: x is the pre-activation [n]; dx [n] = dout * gelu_new'(x) (written).    \
     dx may alias dout (not x). */                                                               \
  void gelu_new_backward(float* dx, const float* dout, const float* x, int n);                   \
  /* attention_row: one query row of causal softmax attention, out = sum_j p_j v_j with        \
     p = softmax(scale * q.k_j), j < n_keys, k_j = k + j * kv_stride (same for v, dk, dv).     \
     p is recomputed from q and k. dq [head_dim] = scale * sum_j ds_j k_j (written), where      \
     ds_j = p_j (dout.v_j - dout.out); dk_j += scale * ds_j * q, dv_j += p_j * dout           \
     (accumulated: several query rows, and GQA's grouped heads, share a key row).             \
     scratch [2 * n_keys]. */                                                                    \
  void attention_row_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, \
                              const float* k, const float* v, long kv_stride, int n_keys,        \
                              int head_dim, float scale, float* scratch);

namespace rf {
namespace avx2 { RF_DECLARE_BACKWARD_KERNELS }
namespace avx512 { RF_DECLARE_BACKWARD_KERNELS }
RF_DECLARE_BACKWARD_KERNELS
}  // namespace rf
