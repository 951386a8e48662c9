// Programmatic dependent launch: the kernels' side and launch_dependent (see cuda/launch.h, which
// states the contract every kernel launched this way keeps).
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "cuda/launch.h"

namespace rf::cuda {

// Waits until the kernels before this one on the stream have finished and their writes are
// visible (a no-op when this kernel was launched the ordinary way).
__device__ __forceinline__ void grid_dependency_wait() {
#ifdef RF_CUDA_EMULATION
  emu_grid_dependency_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel, if launched with launch_dependent, start before this one ends.
__device__ __forceinline__ void grid_dependents_launch() {
#if !defined(RF_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#ifndef RF_CUDA_EMULATION
// The kernel launched on grid x block threads with smem bytes of dynamic shared memory on the
// stream, as a dependent launch where dependent_launch_on() says so (else the ordinary launch).
// The emulation's translate.py rewrites these calls as it rewrites the chevron launches; errors
// are left for cudaGetLastError, as a chevron launch leaves them.
template <class... P, class... A>
void launch_dependent(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = dependent_launch_on() ? 1 : 0;
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<A>(args)...);
}
#endif

}  // namespace rf::cuda
