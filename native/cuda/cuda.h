// The CUDA backend's entry points, compiled only when nvcc is found (RF_HAVE_CUDA).
#pragma once
#include <cstddef>
#include <string>

namespace rf::cuda {

struct DeviceInfo {
  int count = 0;              // CUDA devices visible
  std::string name;           // the device asked about (none past the last)
  int sm_major = 0, sm_minor = 0;
  double memory_gib = 0;
  std::string error;          // why no device is usable (no GPU, no or old driver); empty when count > 0
  std::string unsupported;    // device_support's reason, empty when this build runs on the device
};

// Devices visible to the runtime, and one of them; count 0 (and no throw, `error` saying why)
// when there is no driver or GPU.
DeviceInfo device_info(int device = 0);

// The GPU architectures this build holds code for, as CMake's CUDA_ARCHITECTURES named them
// ("80-real,90": a cubin for compute capability 8.0, which every 8.x GPU runs, and one for 9.0
// with its PTX, which the driver compiles for newer GPUs).
const char* built_architectures();

// Why this build cannot run on `device`, or "" when it can: a GPU older than compute capability
// 8.0 (the kernels use bf16 tensor-core mma.sync), or one the build holds no code for (the
// runtime's verdict on one of our kernels), with what to rebuild. The CUDA engine checks it
// before it allocates anything. A CUDA call that fails otherwise throws (DeviceFailed on a lost
// context: cuda/error.h), and so does device_info, which calls it for a device that exists.
std::string device_support(int device);

// y[i] = a * x[i] + y[i] on device 0, copying in and out; returns max |error| against the
// host result, or -1 when no device is available. Proves the toolchain and runtime work.
double smoke_saxpy(int n);

// One device's memory: free and total as cudaMemGetInfo gives them (free cut to what the limit
// leaves), and the bytes redflag holds on all devices together with its limit (0: none).
struct DeviceMemory {
  size_t free = 0, total = 0, held = 0, limit = 0;
};
DeviceMemory device_memory(int device);

// Caps the bytes redflag holds on the devices (0: no cap): an allocation past it fails as one on a
// full device does (rf::OutOfMemory). Tests use it to run out of memory on purpose, on a GPU as
// under the emulation; a process that shares its GPU may use it to leave room for the others (as
// PyTorch's set_per_process_memory_fraction does).
void set_memory_limit(size_t bytes);

// Runs a kernel that traps on `device`: the process's CUDA context is lost, as after any fault in
// a kernel (every later call fails with cudaErrorLaunchFailure, and only a new process recovers).
// For tests: how the engine, the detector and the server report a failed GPU. Returns the error
// the synchronization after the kernel gave.
std::string lose_context(int device);

}  // namespace rf::cuda
