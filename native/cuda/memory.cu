// Counted device allocations (see memory.h).
#include "cuda/memory.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "cuda/cuda.h"
#include "cuda/error.h"
#include "model/model.h"

namespace rf::cuda {

namespace {
std::atomic<size_t> g_current{0}, g_peak{0}, g_limit{0};

// A size for a message: KiB below a MiB, MiB below a GiB.
std::string size_text(size_t bytes) {
  char b[32];
  if (bytes < (size_t(1) << 20)) std::snprintf(b, sizeof b, "%.1f KiB", double(bytes) / 1024.0);
  else if (bytes < (size_t(1) << 30)) std::snprintf(b, sizeof b, "%.1f MiB", double(bytes) / double(1 << 20));
  else std::snprintf(b, sizeof b, "%.2f GiB", double(bytes) / double(size_t(1) << 30));
  return b;
}
}  // namespace

cudaError_t device_alloc(void** p, size_t bytes) {
  // Counted first, so that two threads cannot both pass the limit; undone if cudaMalloc fails.
  const size_t now = g_current.fetch_add(bytes) + bytes;
  const size_t limit = g_limit.load();
  const cudaError_t e = limit && now > limit ? cudaErrorMemoryAllocation : cudaMalloc(p, bytes);
  if (e != cudaSuccess) {
    g_current.fetch_sub(bytes);
    *p = nullptr;
    return e;
  }
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

DeviceMemory device_memory(int device) {
  DeviceMemory m;
  int was = 0;
  cudaGetDevice(&was);
  if (cudaSetDevice(device) == cudaSuccess && cudaMemGetInfo(&m.free, &m.total) != cudaSuccess) m.free = m.total = 0;
  cudaGetLastError();
  cudaSetDevice(was);
  m.held = g_current.load(), m.limit = g_limit.load();
  if (m.limit) m.free = std::min(m.free, m.limit > m.held ? m.limit - m.held : 0);
  return m;
}

void device_alloc_or_throw(void** p, size_t bytes, const char* what) {
  const cudaError_t e = device_alloc(p, bytes);
  if (e == cudaSuccess) return;
  if (e != cudaErrorMemoryAllocation) throw_cuda_error(e, std::string("cudaMalloc (") + what + ")");
  cudaGetLastError();  // cudaMalloc's error is not sticky; clear it for the calls after
  int device = 0;
  cudaGetDevice(&device);
  const DeviceMemory m = device_memory(device);
  throw OutOfMemory("out of GPU memory on cuda:" + std::to_string(device) + " allocating " + what + " (" + size_text(bytes) +
                    "): redflag holds " + size_text(m.held) + (m.limit ? " of the " + size_text(m.limit) + " it may use" : std::string()) +
                    ", the device has " + size_text(m.free) + " free of " + size_text(m.total));
}

void set_memory_limit(size_t bytes) { g_limit.store(bytes); }

MemoryStats memory_stats() { return {g_current.load(), g_peak.load(), g_limit.load()}; }

void reset_memory_peak() { g_peak.store(g_current.load()); }

}  // namespace rf::cuda
