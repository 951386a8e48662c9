// Row-wise transformer operations: norms, rotary embedding, activations, attention.
// Each works on one row (one token) so the model code chooses how to parallelise;
// native/kernels/*.cpp are compiled once per instruction set (rf::avx2, rf::avx512)
// and native/dispatch/ops.cpp forwards rf::name to the active one.
#pragma once

#define RF_DECLARE_OP_KERNELS                                                                    \
  /* out [n] = w * x / sqrt(mean(x^2) + eps)   (LlamaRMSNorm, computed in f32) */                \
  void rmsnorm_forward(float* out, const float* x, const float* w, int n, float eps);           \
  /* out [n] = (x - mean) / sqrt(var + eps) * w + b   (nn.LayerNorm, biased variance) */        \
  void layernorm_forward(float* out, const float* x, const float* w, const float* b, int n,     \
                         float eps);                                                             \
  /* x [n_heads, head_dim] rotated in place, rotate_half convention: pairs (i, i + head_dim/2)   \
     use angle index i; cos, sin [head_dim / 2] for this token's position. */                    \
  void rope_forward(float* x, int n_heads, int head_dim, const float* cos, const float* sin);    \
  /* out [n] = silu(gate) * up */                                                                \
  void swiglu_forward(float* out, const float* gate, const float* up, int n);                    \
  /* x [n] = gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place */          \
  void gelu_new_forward(float* x, int n);                                                        \
  /* y [n] += x [n] */                                                                           \
  void add_forward(float* y, const float* x, int n);                                             \
  /* max_i z_i over z [n] (n >= 1), vectorised. */                                               \
  float row_max(const float* z, int n);                                                          \
  /* sum_i exp(z_i - shift) over z [n] (f32, vectorised exp). */                                  \
  float sum_exp(const float* z, int n, float shift);                                             \
  /* z [n] = exp(z - shift) in place, returning their sum: softmax numerators (f32, vectorised). */\
  float exp_shift(float* z, int n, float shift);                                                 \
  /* log(sum_i exp(z_i)) over z [n], with max subtraction (f32, vectorised exp). */               \
  float logsumexp(const float* z, int n);                                                        \
  /* z [n] = scale * exp(z - lse) in place: a softmax row times scale. */                        \
  void softmax_scale(float* z, int n, float lse, float scale);                                   \
  /* One query row of causal attention over keys j in [0, n_keys):                               \
     out [head_dim] = sum_j softmax_j(scale * q.k_j) v_j, with k_j = k + j * kv_stride (same     \
     for v). scores [n_keys] is scratch. Softmax in f32 with max subtraction. */                 \
  void attention_row(float* out, const float* q, const float* k, const float* v, long kv_stride, \
                     int n_keys, int head_dim, float scale, float* scores);

namespace rf {
namespace avx2 { RF_DECLARE_OP_KERNELS }
namespace avx512 { RF_DECLARE_OP_KERNELS }
RF_DECLARE_OP_KERNELS
}  // namespace rf
