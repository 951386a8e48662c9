// Device twins of the CPU's row-wise backward kernels (native/kernels/ops_backward.h), for the GPU
// trainer, tested against them in native/tests/cuda_ops_backward.cpp. Same conventions: a row's
// own gradients (dx, dgate, ...) are written; parameter gradients shared by all rows (norm
// weights dw, db) are accumulated (+=), here by a second kernel that sums the rows of each column
// in row order, so a step's result is the same bits every time (no atomics). Statistics (rms,
// mean) are recomputed from the forward's input. Pointers are device memory; one stream.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/model_ops.h"  // SwigluLora

namespace rf::cuda {

// Per row of x [rows, n]: the backward of out = w * x * r (r = 1 / sqrt(mean(x^2) + eps)).
// dx [rows, n] written, or with accumulate added to (the residual stream's gradient: each element
// its own gradient rounded to f32, then one add, the bits of writing it and adding it in a second
// pass); dx_bf16 (optional): dx as written, rounded to bf16 (the next product's operand). dw [n]
// accumulated over the rows (null: not wanted, e.g. a frozen norm under LoRA), in parallel over
// row parts summed in a fixed order (cuda/column_reduce.cuh).
// scratch: norm_backward_scratch_floats(rows, n).
long norm_backward_scratch_floats(int rows, int n);
void rmsnorm_backward_rows(float* dx, float* dw, const float* dout, const float* x, const float* w, int rows, int n, float eps,
                           float* scratch, cudaStream_t stream, bool accumulate = false, __nv_bfloat16* dx_bf16 = nullptr);

// Per row: the backward of out = (x - mean) * rstd * w + b. dx, accumulate and dx_bf16 as above;
// dw, db accumulated (both null: not wanted; dw and db both or neither). scratch as above.
void layernorm_backward_rows(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int rows,
                             int n, float eps, float* scratch, cudaStream_t stream, bool accumulate = false,
                             __nv_bfloat16* dx_bf16 = nullptr);

// dx [rows, n_heads, head_dim] (rows row_stride floats apart): on entry dL/d(rotated x), on return
// dL/dx, in place (the rotation transposed). cos, sin [rows, head_dim / 2]: the forward's tables.
void rope_backward_rows(float* dx, long row_stride, int rows, int n_heads, int head_dim, const float* cos, const float* sin,
                        cudaStream_t stream);

// The backward of qk_norm_rows (ops.h), in place: dx's rows (row_stride floats apart) hold, on
// entry, dL/d(normed head) for n_q heads then n_k heads, on return dL/d(head before the norm);
// x [rows, x_stride]: the heads before the norm, in the same layout. dwq, dwk [head_dim]
// accumulated (null: not wanted): each row's heads summed in order, then the rows summed as the
// block norms' are (column_reduce.cuh). scratch: qk_norm_backward_scratch_floats(rows, head_dim).
long qk_norm_backward_scratch_floats(int rows, int head_dim);
void qk_norm_backward_rows(float* dx, long row_stride, const float* x, long x_stride, int rows, int n_q, int n_k, int head_dim,
                           const float* wq, const float* wk, float eps, float* dwq, float* dwk, float* scratch,
                           cudaStream_t stream);

// The MLP's down projection's adapter, whose input gradient swiglu_backward_rows adds to dout as
// it reads it: the dropout mask applied to du A (du [rows, rank], A [rank, inter]) with
// lora_up_dropout_add's arithmetic and order (train_ops.h), so the same bits as that call on dout
// first, without its read and write of dout. du null: none.
struct DoutLora {
  const float* du = nullptr;
  const float* A = nullptr;
  int rank = 0;
  int adapter = 0;  // the mask's adapter id
  uint64_t seed = 0;
  int layer = 0;
  float p = 0.f;  // 0: no mask
};
constexpr int kDoutLoraMaxRank = 32;

// The backward of swiglu_rows (model_ops.h): for in [rows, 2 inter] = gate | up and dout
// [rows, inter], din [rows, 2 inter] = dgate | dup (written).
// in may be the trainer's bf16 copy (the same result as on its f32 widening, without one).
// din_bf16 (optional): din rounded to bf16 as well (the bits f32_to_bf16 gives), the operand of
// the next product in a bf16 model, without a conversion pass over din; din may then be null
// (only bf16 is read). lora (optional, rank up to kDoutLoraMaxRank): added to dout as it is read
// (dout itself is not written). gate, up (optional): the gate|up adapters' terms, added to in as
// it is read with swiglu_rows' arithmetic (model_ops.h), so that a trace of the product before
// them (the forward left them to swiglu_rows and kept in as the product wrote it) is
// differentiated at the forward's own sums, bit for bit.
void swiglu_backward_rows(float* din, const float* dout, const float* in, int rows, int inter, cudaStream_t stream,
                          __nv_bfloat16* din_bf16 = nullptr, const DoutLora& lora = {}, const SwigluLora& gate = {},
                          const SwigluLora& up = {});
void swiglu_backward_rows(float* din, const float* dout, const __nv_bfloat16* in, int rows, int inter, cudaStream_t stream,
                          __nv_bfloat16* din_bf16 = nullptr, const DoutLora& lora = {}, const SwigluLora& gate = {},
                          const SwigluLora& up = {});

// dx [n] = dout * gelu_new'(x) (written; dx may alias dout); x f32 or bf16, dx_bf16 as above.
void gelu_new_backward(float* dx, const float* dout, const float* x, long n, cudaStream_t stream, __nv_bfloat16* dx_bf16 = nullptr);
void gelu_new_backward(float* dx, const float* dout, const __nv_bfloat16* x, long n, cudaStream_t stream,
                       __nv_bfloat16* dx_bf16 = nullptr);

}  // namespace rf::cuda
