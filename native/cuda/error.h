// The error a failed CUDA runtime call throws, the same everywhere: rf::DeviceFailed
// (model/model.h) when the failure leaves the CUDA context unusable, else std::runtime_error;
// both name the call.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "model/model.h"

namespace rf::cuda {

// Whether e is one of the errors after which, as CUDA's documentation says of each, "the process
// is left in an inconsistent state and any further CUDA work will return the same error": a fault
// inside a kernel, a watchdog timeout, an uncorrectable memory or link error. Only a new process
// recovers.
inline bool error_is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
      return true;
    default:
      return false;
  }
}

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const std::string& what) {
  const std::string text = std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
  if (error_is_sticky(e)) {
    int device = 0;
    cudaGetDevice(&device);
    throw DeviceFailed("the GPU cuda:" + std::to_string(device) + " failed (" + what + ": " + text +
                       "); its CUDA context is lost: every later call on it fails, and only a new process can use it again");
  }
  cudaGetLastError();  // not sticky: cleared, so that the next launch check does not see it again
  throw std::runtime_error("CUDA " + what + ": " + text);
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_cuda_error(e, what);
}

// After a launch: the launch's own error (bad configuration), or a sticky one from earlier work.
inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda_error(e, std::string(what) + " launch");
}

}  // namespace rf::cuda
