// Counted device allocations (see memory.h).
#include "cuda/memory.h"

#include <algorithm>
#include <atomic>

namespace rf::cuda {

namespace {
std::atomic<size_t> g_current{0}, g_peak{0};
}  // namespace

cudaError_t device_alloc(void** p, size_t bytes) {
  const cudaError_t e = cudaMalloc(p, bytes);
  if (e != cudaSuccess) return e;
  const size_t now = g_current.fetch_add(bytes) + bytes;
  size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
  return e;
}

void device_free(void* p, size_t bytes) {
  if (!p) return;
  cudaFree(p);
  g_current.fetch_sub(bytes);
}

MemoryStats memory_stats() { return {g_current.load(), g_peak.load()}; }

void reset_memory_peak() { g_peak.store(g_current.load()); }

}  // namespace rf::cuda
