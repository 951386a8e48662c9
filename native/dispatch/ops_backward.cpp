// Forwards rf::*_backward to the instruction set chosen at run time (see core/cpu.h).
#include "core/cpu.h"
#include "kernels/ops_backward.h"

namespace rf {

static bool use_avx512() {
  static const bool yes = active_isa() == Isa::avx512;
  return yes;
}

#define RF_FORWARD(name, params, args) \
  void name params { return use_avx512() ? avx512::name args : avx2::name args; }

RF_FORWARD(rmsnorm_backward,
           (float* dx, float* dw, const float* dout, const float* x, const float* w, int n, float eps),
           (dx, dw, dout, x, w, n, eps))
RF_FORWARD(layernorm_backward,
           (float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int n,
            float eps),
           (dx, dw, db, dout, x, w, n, eps))
RF_FORWARD(rope_backward, (float* dx, int n_heads, int head_dim, const float* cos, const float* sin),
           (dx, n_heads, head_dim, cos, sin))
RF_FORWARD(swiglu_backward,
           (float* dgate, float* dup, const float* dout, const float* gate, const float* up, int n),
           (dgate, dup, dout, gate, up, n))
RF_FORWARD(gelu_new_backward, (float* dx, const float* dout, const float* x, int n), (dx, dout, x, n))
RF_FORWARD(attention_row_backward,
           (float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k, const float* v,
            long kv_stride, int n_keys, int head_dim, float scale, float* scratch),
           (dq, dk, dv, dout, q, k, v, kv_stride, n_keys, head_dim, scale, scratch))

#undef RF_FORWARD

}  // namespace rf
