// AdamW and the gradients' squared norm on the device (see optim.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/error.h"
#include "cuda/optim.h"

namespace rf::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 1024;  // fixed: the partial sums' order, and so the result, never changes

// n = t.total = t.end[t.n - 1]. A thread's elements only grow, so its tensor index only moves
// forward. __fmul_rn / __fadd_rn / __fsub_rn are never contracted into FMAs: each operation
// rounds as the CPU's separate multiply and add do.
__global__ void adamw_tensors_kernel(float* w, float* g, float* m1, float* m2, long n, AdamWTensors t, AdamWTensorsParams a,
                                     const double* sum_sq) {
  const double norm = __dsqrt_rn(*sum_sq);
  const float clip = a.clip_norm > 0.f && norm > double(a.clip_norm) ? float(__ddiv_rn(double(a.clip_norm), __dadd_rn(norm, 1e-6))) : 1.f;
  int k = 0;
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    while (t.end[k] <= i) ++k;
    const float decay = t.decay[k] ? a.decay : 0.f;
    const float gi = __fmul_rn(g[i], clip);
    m1[i] = __fadd_rn(__fmul_rn(a.beta1, m1[i]), __fmul_rn(__fsub_rn(1.f, a.beta1), gi));
    m2[i] = __fadd_rn(__fmul_rn(a.beta2, m2[i]), __fmul_rn(__fmul_rn(__fsub_rn(1.f, a.beta2), gi), gi));
    const double mhat = __ddiv_rn(double(m1[i]), a.bc1), vhat = __ddiv_rn(double(m2[i]), a.bc2);
    float wi = __fsub_rn(w[i], __fmul_rn(decay, w[i]));
    wi = __fsub_rn(wi, float(__ddiv_rn(__dmul_rn(double(a.lr), mhat), __dadd_rn(__dsqrt_rn(vhat), double(a.eps)))));
    w[i] = wi;
    g[i] = 0.f;
  }
}

__global__ void sum_squares_partial(const float* g, long n, double* partial) {
  __shared__ double s[kThreads];
  double acc = 0;
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x)
    acc += double(g[i]) * double(g[i]);
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (int(threadIdx.x) < k) s[threadIdx.x] += s[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

__global__ void sum_partials(double* partial, int n) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double total = 0;
  for (int i = 0; i < n; ++i) total += partial[i];
  partial[n] = total;
}

}  // namespace

void adamw_tensors(float* w, float* g, float* m1, float* m2, const AdamWTensors& tensors, const AdamWTensorsParams& p,
                   const double* sum_sq, cudaStream_t stream) {
  const long n = tensors.total;
  if (tensors.n <= 0 || n <= 0) return;
  const long blocks = (n + kThreads - 1) / kThreads;
  adamw_tensors_kernel<<<int(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(w, g, m1, m2, n, tensors, p, sum_sq);
  check(cudaGetLastError(), "adamw_tensors launch");
}

long sum_squares_scratch() { return kBlocks + 1; }

void sum_squares_async(const float* g, long n, double* scratch, cudaStream_t stream) {
  if (n <= 0) {
    check(cudaMemsetAsync(scratch + kBlocks, 0, sizeof(double), stream), "cudaMemsetAsync");
    return;
  }
  sum_squares_partial<<<kBlocks, kThreads, 0, stream>>>(g, n, scratch);
  sum_partials<<<1, 32, 0, stream>>>(scratch, kBlocks);
  check(cudaGetLastError(), "sum_squares launch");
}

const double* sum_squares_result(const double* scratch) { return scratch + kBlocks; }

double sum_squares(const float* g, long n, double* scratch, cudaStream_t stream) {
  if (n <= 0) return 0;
  sum_squares_async(g, n, scratch, stream);
  double total = 0;
  check(cudaMemcpyAsync(&total, sum_squares_result(scratch), sizeof(double), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "sum_squares");
  return total;
}

}  // namespace rf::cuda
