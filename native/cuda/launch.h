// Programmatic dependent launch (Hopper and later): a kernel launched with launch_dependent
// (cuda/launch.cuh, with the kernels' side) may start while the kernel before it on the stream is
// still finishing, so a decode step's hundred small launches overlap their launch latency and
// first weight loads with their predecessor's tail, instead of leaving the GPU idle between them
// (in a decode graph too: the capture keeps the launches' programmatic edges). This header: the
// switch, which host code (the tests, the benchmarks) may include without the device side.
//
// The contract, for every kernel launched with launch_dependent:
//   - every thread calls grid_dependency_wait() before it reads anything an earlier kernel on
//     the stream writes, and before it writes anything (an earlier kernel may still read it);
//     the CPU emulation stops a test whose thread ends without calling it;
//   - before the wait it may read only the model's weights: every write of them (an upload, a
//     merge, the trainer's copies after an optimizer step) ends in a synchronization of the
//     stream before the engine runs again, so no kernel still in flight writes them;
//   - it may call grid_dependents_launch() first thing, which lets the next dependent kernel be
//     scheduled as soon as all of this one's blocks have started (that one still waits for this
//     one to finish, and so for everything before it).
// A kernel launched this way after a kernel that never calls grid_dependents_launch (cuBLASLt's,
// or an ordinary one of ours) starts when that one ends, as any launch; a kernel launched the
// ordinary way after one of these waits for it as always. Off (an ordinary launch) on GPUs before
// compute capability 9.0, runtimes or drivers before CUDA 12.3, and with RF_CUDA_PDL=0.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace rf::cuda {

namespace detail {
// -1: not yet decided; else whether launch_dependent uses the attribute. One setting for the
// process: the library runs every model on GPUs of one kind.
inline std::atomic<int> dependent_launch{-1};
inline bool dependent_launch_supported() {
  int device = 0, major = 0, runtime = 0, driver = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaRuntimeGetVersion(&runtime) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major >= 9 && runtime >= 12030 && driver >= 12030;
}
}  // namespace detail

// Whether launch_dependent overlaps launches: what the GPU and CUDA support, unless RF_CUDA_PDL=0
// or set_dependent_launch(false) turned it off.
inline bool dependent_launch_on() {
  int s = detail::dependent_launch.load();
  if (s < 0) {
    const char* env = std::getenv("RF_CUDA_PDL");
    s = (env && std::strcmp(env, "0") == 0) ? 0 : int(detail::dependent_launch_supported());
    detail::dependent_launch.store(s);
  }
  return s == 1;
}

// Turns the overlap off, or back on where supported (the benchmarks' comparison). A decode graph
// keeps the launches it was captured with; DeviceModel's graphs are keyed by the setting.
inline void set_dependent_launch(bool on) {
  detail::dependent_launch.store(on && detail::dependent_launch_supported() ? 1 : 0);
}

}  // namespace rf::cuda
