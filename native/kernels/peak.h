// Machine-ceiling measurements for the benchmarks: register-only FMA throughput and
// STREAM-like memory bandwidth, run on every thread of a pool. Compiled per instruction
// set like the other kernels; rf::fma_peak_gflops etc. dispatch to the active one.
#pragma once
#include <cstddef>

#include "core/threadpool.h"

#define RF_DECLARE_PEAK_KERNELS                                                                   \
  /* GFLOP/s of a register-only multiply-add loop summed over the pool's threads, each running  \
     for about `seconds`. bf16: vdpbf16ps on zmm counted as 64 FLOP each (16 lanes x 2 pairs x  \
     2); the AVX2 path has no bf16 dot product and returns its f32 figure (its bf16 kernels     \
     widen to f32). f32 counts an FMA as 2 FLOP/lane. */                                          \
  double fma_peak_gflops(rf::ThreadPool& pool, bool bf16, double seconds);                         \
  /* GB/s of a STREAM-like loop over two arrays of bytes_per_array, split across the pool's       \
     threads (each first-touches its own part). copy: b[i] = a[i] with plain stores (as STREAM), \
     counting bytes read + written; else a read-only sum. Best of several repetitions. */           \
  double mem_bandwidth_gbps(rf::ThreadPool& pool, size_t bytes_per_array, bool copy);

namespace rf {
namespace avx2 { RF_DECLARE_PEAK_KERNELS }
namespace avx512 { RF_DECLARE_PEAK_KERNELS }
RF_DECLARE_PEAK_KERNELS
}  // namespace rf
