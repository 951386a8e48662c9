// The GPU trainer's glue kernels (native/cuda/device_trainer.h): what the CPU trainer does in
// loops between its products (native/model/train.cpp): LoRA dropout on an adapter's input and
// its backward (alone, or fused with the adapter's products), the scaled copy that refreshes the
// forward's premultiplied LoRA B, the scatter-add of loss rows' gradients into the batch's rows,
// the gradient of the trained flag-token embedding rows, and the widening of the trace's bf16
// activations. Sums run in a fixed order (no atomics): a step gives the same bits every run.
// Tested against host loops in native/tests/cuda_train_ops.cpp. Pointers are device memory; one
// stream.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace rf::cuda {

// LoRA dropout (PEFT's lora_dropout, inverted): element (r, c) of x [rows, cols] is kept, and
// scaled by 1 / (1 - p), when rf::dropout_keep(seed, layer, adapter, r, c, p) says so
// (model/dropout_keep.h: the CPU's own function, compiled for the device). out [rows, cols] = the
// dropped-out x.
void dropout_rows(float* out, const float* x, int rows, int cols, uint64_t seed, int layer, int adapter, float p,
                  cudaStream_t stream);
// Its backward into an accumulated gradient: y [rows, cols] += the same mask applied to x.
void dropout_add(float* y, const float* x, int rows, int cols, uint64_t seed, int layer, int adapter, float p,
                 cudaStream_t stream);

// LoRA with dropout, fused: the adapter's dropped-out input ([rows, in], as dropout_rows makes
// it) is never written; each kernel applies the mask as it reads x. Ranks up to
// kLoraFusedMaxRank; every sum runs in a fixed order (the same bits every run, on any GPU).
constexpr int kLoraFusedMaxRank = 64;

// The forward's u [rows, rank] = dropout(x) A^T (x [rows, in], A [rank, in]). Each output sums
// its in products in column order (fused multiply-adds; columns past in add zeros).
void lora_down_dropout(float* u, const float* x, const float* A, int rows, int in, int rank, uint64_t seed, int layer,
                       int adapter, float p, cudaStream_t stream);
// The same for several adapters of one input (q, k and v; gate and up), each with its own mask:
// up to 3 of rank <= 16 (or 2 of <= 32) from one read of x, the same bits as one call each.
// p = 0: no mask. x f32, or bf16 (a bf16 model's activation as its product reads it: the same
// sums as from its exact f32 widening).
struct LoraDownTerm {
  float* u;         // [rows, rank]
  const float* A;   // [rank, in]
  int rank;
  int adapter;  // the dropout mask's adapter id
};
void lora_down_dropout(const LoraDownTerm* terms, int n, const float* x, int rows, int in, uint64_t seed, int layer, float p,
                       cudaStream_t stream);
void lora_down_dropout(const LoraDownTerm* terms, int n, const __nv_bfloat16* x, int rows, int in, uint64_t seed, int layer,
                       float p, cudaStream_t stream);

// dA [rank, in] += du^T dropout(x) (du [rows, rank]): the rows split into consecutive parts of
// lora_da_rows_per_part(rows, in, rank) rows (whole 32-row tiles; rows past the end add zeros),
// each part summed in row order (fused multiply-adds) into scratch (lora_da_scratch_floats), then
// the parts summed in order and added.
int lora_da_rows_per_part(int rows, int in, int rank);
long lora_da_scratch_floats(int rows, int in, int rank);
// x f32, or bf16 (the trace's copy: the same sums as from its exact f32 widening). p = 0: no
// mask (every element kept, as dropout_rows with p = 0 leaves x).
void lora_da_dropout(float* dA, const float* du, const float* x, int rows, int in, int rank, uint64_t seed, int layer,
                     int adapter, float p, float* scratch, cudaStream_t stream);
void lora_da_dropout(float* dA, const float* du, const __nv_bfloat16* x, int rows, int in, int rank, uint64_t seed, int layer,
                     int adapter, float p, float* scratch, cudaStream_t stream);

// The input gradient: din [rows, in] += the mask applied to du A, the product never written
// (dropout_add of matmul's du A, without its [rows, in] buffer and second pass). Each element
// sums its rank products in k order. p = 0: no mask.
void lora_up_dropout_add(float* din, const float* du, const float* A, int rows, int in, int rank, uint64_t seed, int layer,
                         int adapter, float p, cudaStream_t stream);
// The same for several adapters of one input (q, k and v of a fused projection; gate and up):
// din += each term in order, one rounding each, the same bits as one call per term; up to 3
// terms of rank <= 16 (or 2 of rank <= 32) in one pass over din, which is read and written once.
struct LoraUpTerm {
  const float* du;  // [rows, rank]
  const float* A;   // [rank, in]
  int rank;
  int adapter;  // the dropout mask's adapter id
};
void lora_up_dropout_add(float* din, const LoraUpTerm* terms, int n, int rows, int in, uint64_t seed, int layer, float p,
                         cudaStream_t stream);

// out [n] = the bf16 values in [n] (bit patterns) as f32: exact, the CPU's rf::bf16_to_f32.
void widen_bf16(float* out, const uint16_t* in, long n, cudaStream_t stream);

// y [n] = a x [n].
void scale_copy(float* y, const float* x, float a, long n, cudaStream_t stream);

// Rows of src [n_src, width] added into rows of dst [*, width]: destination row dst_rows[d]
// (d < n_dst) receives src rows src_index[first[d] .. first[d + 1]) in that order. The host
// builds the lists, so a destination row named by several sources sums them in a fixed order.
void add_rows_grouped(float* dst, const float* src, int width, const int32_t* dst_rows, const int32_t* first,
                      const int32_t* src_index, int n_dst, cudaStream_t stream);

// y [cols] += sum over r < rows of x [r, :]: a bias's gradient. The order (cuda/column_reduce.cuh):
// parts of column_sum_rows_per_part rows; in a part, lane j of 8 sums its rows j, j + 8, ... in
// order, then lanes 0..7 in order; then the parts in order; then y + that total.
// scratch: column_sum_scratch_floats(rows, cols).
int column_sum_rows_per_part(int rows, int cols);
long column_sum_scratch_floats(int rows, int cols);
void add_column_sums(float* y, const float* x, int rows, int cols, float* scratch, cudaStream_t stream);

// grad [n_flags, width] += sum over r < rows with tokens[r] == flags[k] of dx [r, :]: the
// gradient of trained embedding rows (the flag tokens) from dL/d(input embeddings). Summed as
// add_column_sums sums (the other rows adding zeros); scratch: column_sum_scratch_floats(rows,
// width) floats.
void token_rows_grad(float* grad, const float* dx, const int32_t* tokens, int rows, int width, const int32_t* flags,
                     int n_flags, float* scratch, cudaStream_t stream);

}  // namespace rf::cuda
