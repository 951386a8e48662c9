// AdamW and the gradients' squared norm on the device (see optim.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/optim.h"

namespace rf::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 1024;  // fixed: the partial sums' order, and so the result, never changes

// __fmul_rn / __fadd_rn / __fsub_rn are never contracted into FMAs: each operation rounds as the
// CPU's separate multiply and add do.
__global__ void adamw_kernel(float* w, float* g, float* m1, float* m2, long n, AdamWStepParams a) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    const float gi = __fmul_rn(g[i], a.clip);
    m1[i] = __fadd_rn(__fmul_rn(a.beta1, m1[i]), __fmul_rn(__fsub_rn(1.f, a.beta1), gi));
    m2[i] = __fadd_rn(__fmul_rn(a.beta2, m2[i]), __fmul_rn(__fmul_rn(__fsub_rn(1.f, a.beta2), gi), gi));
    const double mhat = __ddiv_rn(double(m1[i]), a.bc1), vhat = __ddiv_rn(double(m2[i]), a.bc2);
    float wi = __fsub_rn(w[i], __fmul_rn(a.decay, w[i]));
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

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace

void adamw(float* w, float* g, float* m1, float* m2, long n, const AdamWStepParams& p, cudaStream_t stream) {
  if (n <= 0) return;
  const long blocks = (n + kThreads - 1) / kThreads;
  adamw_kernel<<<int(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(w, g, m1, m2, n, p);
  check(cudaGetLastError(), "adamw launch");
}

long sum_squares_scratch() { return kBlocks + 1; }

double sum_squares(const float* g, long n, double* scratch, cudaStream_t stream) {
  if (n <= 0) return 0;
  sum_squares_partial<<<kBlocks, kThreads, 0, stream>>>(g, n, scratch);
  sum_partials<<<1, 32, 0, stream>>>(scratch, kBlocks);
  check(cudaGetLastError(), "sum_squares launch");
  double total = 0;
  check(cudaMemcpyAsync(&total, scratch + kBlocks, sizeof(double), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "sum_squares");
  return total;
}

}  // namespace rf::cuda
