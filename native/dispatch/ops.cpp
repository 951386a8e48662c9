// Forwards rf::op to the instruction set chosen at run time (see core/cpu.h).
#include "core/cpu.h"
#include "kernels/ops.h"

namespace rf {

static bool use_avx512() {
  static const bool yes = active_isa() == Isa::avx512;
  return yes;
}

#define RF_FORWARD(name, params, args) \
  void name params { return use_avx512() ? avx512::name args : avx2::name args; }

RF_FORWARD(rmsnorm_forward, (float* out, const float* x, const float* w, int n, float eps),
           (out, x, w, n, eps))
RF_FORWARD(layernorm_forward,
           (float* out, const float* x, const float* w, const float* b, int n, float eps),
           (out, x, w, b, n, eps))
RF_FORWARD(rope_forward, (float* x, int n_heads, int head_dim, const float* cos, const float* sin),
           (x, n_heads, head_dim, cos, sin))
RF_FORWARD(swiglu_forward, (float* out, const float* gate, const float* up, int n), (out, gate, up, n))
RF_FORWARD(gelu_new_forward, (float* x, int n), (x, n))
RF_FORWARD(add_forward, (float* y, const float* x, int n), (y, x, n))
float logsumexp(const float* z, int n) { return use_avx512() ? avx512::logsumexp(z, n) : avx2::logsumexp(z, n); }
float row_max(const float* z, int n) { return use_avx512() ? avx512::row_max(z, n) : avx2::row_max(z, n); }
float sum_exp(const float* z, int n, float shift) {
  return use_avx512() ? avx512::sum_exp(z, n, shift) : avx2::sum_exp(z, n, shift);
}
float exp_shift(float* z, int n, float shift) {
  return use_avx512() ? avx512::exp_shift(z, n, shift) : avx2::exp_shift(z, n, shift);
}
RF_FORWARD(softmax_scale, (float* z, int n, float lse, float scale), (z, n, lse, scale))
RF_FORWARD(attention_row,
           (float* out, const float* q, const float* k, const float* v, long kv_stride, int n_keys,
            int head_dim, float scale, float* scores),
           (out, q, k, v, kv_stride, n_keys, head_dim, scale, scores))

#undef RF_FORWARD

}  // namespace rf
