// The CUDA backend's entry points, compiled only when nvcc is found (RF_HAVE_CUDA).
#pragma once
#include <string>

namespace rf::cuda {

struct DeviceInfo {
  int count = 0;              // CUDA devices visible
  std::string name;           // device 0
  int sm_major = 0, sm_minor = 0;
  double memory_gib = 0;
  std::string error;          // why no device is usable (no GPU, no or old driver); empty when count > 0
};

// Devices visible to the runtime; count 0 (and no throw, `error` saying why) when there is no driver or GPU.
DeviceInfo device_info();

// y[i] = a * x[i] + y[i] on device 0, copying in and out; returns max |error| against the
// host result, or -1 when no device is available. Proves the toolchain and runtime work.
double smoke_saxpy(int n);

}  // namespace rf::cuda
