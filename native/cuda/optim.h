// The optimizer on the device, for the GPU trainer: AdamW with decoupled weight decay, the CPU
// trainer's arithmetic operation for operation (native/model/train.cpp adamw_body: f32 moments,
// double bias correction and step, no fused multiply-adds), so an update is the same bits on
// both; and the squared norm of the gradients for global-norm clipping, summed in double in a
// fixed order (block partials, then one block over them), so it is the same bits every run.
// Tested in native/tests/cuda_optim.cpp. Pointers are device memory; one stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace rf::cuda {

// The tensors of one flat array of parameters: tensor t holds elements [end[t - 1], end[t])
// (end[-1] = 0; empty tensors allowed) and is decayed when decay[t] != 0. end and decay are
// device arrays of n; total = end[n - 1], given by the host so that nothing is read back.
struct AdamWTensors {
  const long* end;
  const int32_t* decay;
  int n;
  long total;
};

// One step's settings for adamw_tensors.
struct AdamWTensorsParams {
  float lr, beta1, beta2, eps;
  float decay;      // lr * weight_decay, for the decayed tensors
  float clip_norm;  // the norm to clip to (0: no clipping)
  double bc1, bc2;  // bias corrections 1 - beta^t
};

// One AdamW step (w, m1, m2 updated, g zeroed) over every tensor of a flat array in one launch
// (the trainer has one to a few hundred tensors; a launch each costs more than the update of a
// small one), each with p.decay or 0 by its flag, and the clip factor computed on the device
// from the squared norm *sum_sq (device memory: sum_squares_async's result), as the host would:
// with norm = sqrt(*sum_sq), clip_norm / (norm + 1e-6) in double rounded to f32 where clip_norm
// > 0 and norm > clip_norm, else 1. So no number crosses to the host between the norm and the
// update.
void adamw_tensors(float* w, float* g, float* m1, float* m2, const AdamWTensors& tensors, const AdamWTensorsParams& p,
                   const double* sum_sq, cudaStream_t stream);

// sum g^2 over n elements, in double; waits for the stream. scratch: sum_squares_scratch() doubles.
long sum_squares_scratch();
double sum_squares(const float* g, long n, double* scratch, cudaStream_t stream);
// The same sum left on the device, at sum_squares_result(scratch); does not wait.
void sum_squares_async(const float* g, long n, double* scratch, cudaStream_t stream);
const double* sum_squares_result(const double* scratch);

}  // namespace rf::cuda
