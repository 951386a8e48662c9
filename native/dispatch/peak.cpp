// rf::fma_peak_gflops / mem_bandwidth_gbps: forward to the active instruction set.
#include "kernels/peak.h"

#include "core/cpu.h"

namespace rf {

double fma_peak_gflops(ThreadPool& pool, bool bf16, double seconds) {
  return active_isa() == Isa::avx512 ? avx512::fma_peak_gflops(pool, bf16, seconds)
                                     : avx2::fma_peak_gflops(pool, bf16, seconds);
}

double mem_bandwidth_gbps(ThreadPool& pool, size_t bytes_per_array, bool copy) {
  return active_isa() == Isa::avx512 ? avx512::mem_bandwidth_gbps(pool, bytes_per_array, copy)
                                     : avx2::mem_bandwidth_gbps(pool, bytes_per_array, copy);
}

}  // namespace rf
