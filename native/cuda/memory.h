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
};

// cudaMalloc / cudaFree, counted. device_free takes the size that was allocated.
cudaError_t device_alloc(void** p, size_t bytes);
void device_free(void* p, size_t bytes);

MemoryStats memory_stats();
// The peak becomes the current figure.
void reset_memory_peak();

}  // namespace rf::cuda
