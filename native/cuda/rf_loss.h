// The fused red-flag loss on the device: the same terms, rows, options and results as the CPU's
// rf::rf_loss (native/kernels/rf_loss.h, which documents the loss), with the gradients dL/dh and
// dL/dw_rf, never holding [N x V] logits. The rows go through the LM head in chunks
// (options.chunk; 0: 128 at V = 128256, see default_chunk): C trained rows with their reference
// rows in a KL chunk, 2 C rows in a red-flag chunk, so both fill the same buffers:
//   - each chunk's trained and reference logits [rows x V] come from cuBLASLt, their rows V'
//     apart (V rounded up to 128 elements: 256-byte aligned rows for the products, see rf_loss.cu);
//   - one block per row reduces them: log-sum-exp, KL, and log p and log(1 - p) of the target
//     flag from its log-odds (f32 exponentials, as the CPU's, summed in double). The row is read
//     twice: an online log-sum-exp, then dz;
//   - dL/dz is written over the trained row's logits, in f32, or for bf16 W straight as the bf16
//     operand of the product back (2 bytes in place of each 4, as the row is read);
//   - dh = dz W* (W with the flag rows replaced by w_rf) is a second product.
// A KL row's dz = w (p_theta - p_ref) is complete there. A red-flag row's dz = k (p -
// onehot(flag)) needs its group's coefficient k (the noisy-OR / mean / single aggregation over
// rows that may lie in other chunks). So its chunk makes dz, dh and the flag columns for k = 1;
// once every row's log p and log(1 - p) are known, the host forms the coefficients in log space,
// as the CPU does, and two kernels scale those dh rows and add their dw_rf.
// dw_rf[k] += sum_r dz[r, f_k] h[r] is summed once all rows are done, over parts of rows and
// then over the parts (column_reduce.cuh), an order fixed by the shapes (no atomics): a call
// gives the same bits every time, on every GPU.
//
// Products: logits of the N trained and Nr reference rows and dh of the N rows: 2N + Nr row
// products, the exact computation's.
// Peak scratch (RfLossResult::scratch_bytes): 2 C x V' f32 logits + 2 C x H x (20 bytes for
// bf16 W, 16 for f32), 64 + 4 K bytes per row, and dw_rf's partial sums (H floats per part of
// rows, at most 1056 / ceil(H / 32) parts: 128 KB at H = 2048). With V = 128256 and bf16 W, C =
// 128: 131 MiB at H = 2048 and 16k rows, 0.82% of the naive f32 logits of the trained rows and
// their gradient (2 x N x V x 4 bytes: 15.7 GiB).
//
// Numerics differ from the CPU's in summation order only: logits through cuBLASLt (bf16 W:
// h rounded to bf16, f32 sums), flag logits as f32 dot products of the unrounded rows, dz rounded
// to bf16 for the product back through a bf16 W (the CPU's AVX-512 path rounds p the same way; a
// red-flag row's is rounded at k = 1 and the product scaled by k, the same relative rounding).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "cuda/gemm.h"
#include "kernels/rf_loss.h"

namespace rf::cuda {

// Device scratch the losses reuse from call to call: each slot grows to the largest request it
// has seen and stays, so a trainer that keeps one allocates nothing in its steady state (cudaMalloc
// and cudaFree synchronize the device). A call without one allocates and frees its own. One call
// at a time; freed by the destructor.
class LossScratch {
 public:
  LossScratch() = default;
  ~LossScratch();
  LossScratch(const LossScratch&) = delete;
  LossScratch& operator=(const LossScratch&) = delete;
  // Starts a call: its requests take the slots from the first on.
  void begin() { next_ = 0, requested_ = 0; }
  // The next slot, holding at least n elements of T.
  template <class T>
  T* get(size_t n) {
    const size_t b = std::max<size_t>(1, n) * sizeof(T);
    requested_ += b;
    return static_cast<T*>(slot(b));
  }
  // Bytes held, and bytes the current call asked for (what it allocates with a fresh scratch).
  size_t bytes() const;
  size_t requested() const { return requested_; }

 private:
  struct Slot {
    void* p = nullptr;
    size_t bytes = 0;
  };
  void* slot(size_t bytes);
  std::vector<Slot> slots_;
  size_t next_ = 0, requested_ = 0;
};

// h [N, H], h_ref [Nr, H], W [V, H] (dtype w_type), w_rf [K, H], dh [N, H] (written), dw_rf
// [K, H] (accumulated): device memory. rows [N]: host memory. Throws std::invalid_argument on
// the CPU's inconsistencies (same messages), std::runtime_error on CUDA errors.
RfLossResult rf_loss(GemmContext& gemm, const float* h, int N, const float* h_ref, int Nr, int H, const void* W, DType w_type,
                     int V, const float* w_rf, const RfLossRow* rows, const RfLossOptions& options, float* dh, float* dw_rf,
                     cudaStream_t stream, LossScratch* scratch = nullptr);

// Cross-entropy rows (language modelling, the refusal baseline), the CPU trainer's ce_loss
// (native/model/train.cpp) on the device: for h [N, H] and targets [N] (host), the summed loss
// sum_r (lse_r - z_r[target_r]) (returned), dh [N, H] = dz W* (written) with dz = weight
// (softmax(z) - onehot(target)), and dw_rf [K, H] += dz[:, flags]^T h (the trained flag rows,
// whose logits replace W's: w_rf [K, H]; flags empty: none), and, when dW is given (full
// fine-tuning), the LM head's gradient dW [V, H] += dz^T h (bf16 W: from bf16 dz and h, summed
// in f32). Rows go through the LM head in chunks of `chunk` rows (0: as many as keep their f32
// logits, dz written in place, within 256 MiB, or with dW 1 GiB, since each chunk's dW product
// reads and writes all of dW); no [N x V] buffer.
double ce_loss(GemmContext& gemm, const float* h, int N, int H, const void* W, DType w_type, int V, const float* w_rf,
               const std::vector<int>& flags, const int32_t* targets, float weight, float* dh, float* dw_rf, int chunk,
               cudaStream_t stream, float* dW = nullptr, LossScratch* scratch = nullptr);

}  // namespace rf::cuda
