#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda/cuda.h"

namespace rf::cuda {

namespace {
__global__ void saxpy_kernel(int n, float a, const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

__global__ void trap_kernel() { __trap(); }
}  // namespace

std::string lose_context(int device) {
  cudaSetDevice(device);
  trap_kernel<<<1, 1>>>();
  return cudaGetErrorName(cudaDeviceSynchronize());
}

DeviceInfo device_info() {
  DeviceInfo info;
  const cudaError_t e = cudaGetDeviceCount(&info.count);
  if (e != cudaSuccess) {
    // cudaErrorNoDevice (no GPU), cudaErrorInsufficientDriver / cudaErrorNoKernelImageForDevice
    // (driver missing or too old): the reason the user must see.
    info.error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();
    info.count = 0;
    return info;
  }
  if (info.count > 0) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) {
      info.name = p.name;
      info.sm_major = p.major;
      info.sm_minor = p.minor;
      info.memory_gib = double(p.totalGlobalMem) / double(1ull << 30);
    }
  }
  return info;
}

double smoke_saxpy(int n) {
  if (device_info().count == 0) return -1;
  std::vector<float> x(n), y(n), expect(n);
  for (int i = 0; i < n; ++i) {
    x[i] = float(i % 97) * 0.5f;
    y[i] = float(i % 13);
    expect[i] = 2.0f * x[i] + y[i];
  }
  float *dx = nullptr, *dy = nullptr;
  if (cudaMalloc(&dx, n * sizeof(float)) != cudaSuccess) return -1;
  if (cudaMalloc(&dy, n * sizeof(float)) != cudaSuccess) { cudaFree(dx); return -1; }
  cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(dy, y.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  saxpy_kernel<<<(n + 255) / 256, 256>>>(n, 2.0f, dx, dy);
  cudaMemcpy(y.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(dx);
  cudaFree(dy);
  double err = 0;
  for (int i = 0; i < n; ++i) err = std::fmax(err, std::fabs(double(y[i]) - double(expect[i])));
  return err;
}

}  // namespace rf::cuda
