#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "cuda/error.h"

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

const char* built_architectures() {
#if defined(RF_CUDA_EMULATION)
  return emu_architectures();  // the emulated build's (RF_EMU_ARCHITECTURES)
#elif defined(RF_CUDA_ARCHITECTURES)
  return RF_CUDA_ARCHITECTURES;  // CMake's list (CMakeLists.txt)
#else
  return "(not recorded)";
#endif
}

namespace {
// device_support for a device whose properties were read (p).
std::string support_of(int device, const cudaDeviceProp& p) {
  const std::string cc = std::to_string(p.major) + "." + std::to_string(p.minor);
  const std::string gpu = "cuda:" + std::to_string(device) + " (" + p.name + ", compute capability " + cc + ")";
  if (p.major < 8)
    return "the GPU " + gpu + " is older than redflag's CUDA engine supports: its kernels need compute capability 8.0 or " +
           "newer (Ampere and later: bf16 tensor cores)";
  // The runtime knows which of the build's cubins and PTX the device runs: ask it about a kernel
  // (every kernel of the build is compiled for the same architectures).
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFuncAttributes attributes;
  const cudaError_t e = cudaFuncGetAttributes(&attributes, saxpy_kernel);
  cudaSetDevice(previous);
  if (e == cudaSuccess) return "";
  const std::string rebuild = "`npm run build:cuda -- --CDCMAKE_CUDA_ARCHITECTURES=" + std::to_string(p.major) + std::to_string(p.minor) + "`";
  // Only the build's PTX would run there, and the driver cannot compile it: PTX from a newer
  // toolkit than the driver (CUDA's minor version compatibility runs cubins, not PTX), or no JIT.
  if (e == cudaErrorUnsupportedPtxVersion || e == cudaErrorInvalidPtx || e == cudaErrorJitCompilerNotFound ||
      e == cudaErrorJitCompilationDisabled) {
    cudaGetLastError();
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    const auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
    return std::string("the NVIDIA driver (CUDA ") + version(driver) + ") cannot compile this build's PTX for " + gpu + " (" +
           cudaGetErrorName(e) + "): of the GPU code the build holds (" + built_architectures() + "), only PTX from CUDA " +
           version(runtime) + " would run there; update the driver, or rebuild with machine code for that GPU: " + rebuild;
  }
  if (e != cudaErrorNoKernelImageForDevice && e != cudaErrorInvalidDeviceFunction)
    throw_cuda_error(e, "cudaFuncGetAttributes");  // on `device`, which its message names
  cudaGetLastError();
  return std::string("this build holds GPU code for ") + built_architectures() + " (CMake's CUDA_ARCHITECTURES), none of which runs on " +
           gpu + ": rebuild it on that machine with `npm run build:cuda` (it builds for the GPUs it finds), or for that GPU with " + rebuild;
}
}  // namespace

std::string device_support(int device) {
  cudaDeviceProp p;
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return support_of(device, p);
}

DeviceInfo device_info(int device) {
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
  if (device >= 0 && device < info.count) {
    cudaDeviceProp p;
    check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
    info.name = p.name;
    info.sm_major = p.major;
    info.sm_minor = p.minor;
    info.memory_gib = double(p.totalGlobalMem) / double(1ull << 30);
    info.unsupported = support_of(device, p);
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
