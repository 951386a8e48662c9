// The optimizer on the device, for the GPU trainer: AdamW with decoupled weight decay, the CPU
// trainer's arithmetic operation for operation (native/model/train.cpp adamw_body: f32 moments,
// double bias correction and step, no fused multiply-adds), so an update is the same bits on
// both; and the squared norm of the gradients for global-norm clipping, summed in double in a
// fixed order (block partials, then one block over them), so it is the same bits every run.
// Tested in native/tests/cuda_optim.cpp. Pointers are device memory; one stream.
#pragma once
#include <cuda_runtime.h>

namespace rf::cuda {

struct AdamWStepParams {
  float lr, beta1, beta2, eps;
  float decay;  // lr * weight_decay for decayed parameters, else 0
  float clip;   // the gradient's scale from clipping (1: none)
  double bc1, bc2;  // bias corrections 1 - beta^t
};

// w, m1, m2 updated and g zeroed, n elements.
void adamw(float* w, float* g, float* m1, float* m2, long n, const AdamWStepParams& p, cudaStream_t stream);

// sum g^2 over n elements, in double; waits for the stream. scratch: sum_squares_scratch() doubles.
long sum_squares_scratch();
double sum_squares(const float* g, long n, double* scratch, cudaStream_t stream);

}  // namespace rf::cuda
