// Bytes of device memory redflag's CUDA code holds now and at most since the last reset: the
// engine's and trainer's buffers, the KV pool, the loss's scratch and cuBLASLt's workspace (every
// cudaMalloc of native/cuda goes through device_alloc). Benchmarks report the peak against
// PyTorch's torch.cuda.max_memory_allocated(), the same kind of figure (allocations, not the
// driver's reservations). Thread-safe; all devices together.
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

namespace rf::cuda {

struct MemoryStats {
  size_t current = 0, peak = 0;
  size_t limit = 0;  // set_memory_limit's (cuda/cuda.h); 0: none
};

// cudaMalloc / cudaFree, counted. device_free takes the size that was allocated. An allocation
// past the limit fails as cudaMalloc does when the device is full (cudaErrorMemoryAllocation).
cudaError_t device_alloc(void** p, size_t bytes);
void device_free(void* p, size_t bytes);
// device_alloc, or rf::OutOfMemory (model/model.h) naming `what`, its size, what redflag holds
// and what the device has free; any other CUDA error as std::runtime_error.
void device_alloc_or_throw(void** p, size_t bytes, const char* what);

MemoryStats memory_stats();
// The peak becomes the current figure.
void reset_memory_peak();

}  // namespace rf::cuda
