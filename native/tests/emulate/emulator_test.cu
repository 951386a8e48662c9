// Kernels that break the rules the CPU emulation of CUDA enforces (emu.cpp), one rule each, for
// run_emulator.cpp, which checks that the emulation catches every one of them. Never built by nvcc.
#include <cuda_runtime.h>

#include "cuda/launch.cuh"

namespace emutest {

// Thread 0 of each block reads a static shared value before anyone writes it, then writes it.
__global__ void read_shared_before_write_kernel(float* out) {
  __shared__ float s[4];
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[1];
    s[1] = 1.f;
  }
}

// The same with dynamic shared memory.
__global__ void read_dynamic_shared_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[0];
    s[0] = 1.f;
  }
}

// Each thread takes a ticket in the order the threads run.
__global__ void ticket_kernel(int* order, int* counter) { order[threadIdx.x] = atomicAdd(counter, 1); }

// Block 1 reads what block 0 writes in the same launch: right only when block 0 runs first.
__global__ void cross_block_kernel(float* x) {
  if (blockIdx.x == 0) x[0] = 2.f;
  if (blockIdx.x == 1) x[1] = x[0];
}

// Thread 1 reads what thread 0 writes with no barrier between: right only when thread 0 runs first.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float s;
  if (threadIdx.x == 0) s = 2.f;
  if (threadIdx.x == 1) out[0] = s;
}

// Writes x[i] for i < n + extra: past the end by `extra` elements.
__global__ void write_kernel(float* x, int n, int extra) {
  for (int i = threadIdx.x; i < n + extra; i += blockDim.x) x[i] = 3.f;
}

// Reads x[i] for i < n (into nothing that matters).
__global__ void read_kernel(const float* x, int n, float* sink) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  if (threadIdx.x == 0) sink[0] = s;
}

// Sums x[offset..offset + 4) by one float4 load: misaligned unless offset is a multiple of 4.
__global__ void load4_kernel(const float* x, int offset, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(x + offset);
  out[0] = v.x + v.y + v.z + v.w;
}

__global__ void __launch_bounds__(64) bounded_kernel(float* x) { x[threadIdx.x] = 1.f; }

__global__ void big_smem_kernel(float* x) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (threadIdx.x == 0) x[0] = float(smem[0]);
}

// A warp sum by shuffles over `threads` threads, of which those at or past `live` return first.
__global__ void warp_sum_kernel(float* out, int live) {
  if (int(threadIdx.x) >= live) return;
  float v = 1.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) out[0] = v;
}

// Launched as a dependent kernel: threads at or past `skip` return before waiting for the kernels
// before them, the rest wait and write.
__global__ void dependent_kernel(float* x, int skip) {
  rf::cuda::grid_dependents_launch();
  if (int(threadIdx.x) >= skip) return;
  rf::cuda::grid_dependency_wait();
  x[threadIdx.x] = 1.f;
}

void read_shared_before_write(float* out, int blocks) { read_shared_before_write_kernel<<<blocks, 32>>>(out); }
void read_dynamic_shared(float* out, int blocks) { read_dynamic_shared_kernel<<<blocks, 32, 64>>>(out); }
void ticket(int* order, int* counter, int threads) { ticket_kernel<<<1, threads>>>(order, counter); }
void cross_block(float* x) { cross_block_kernel<<<2, 1>>>(x); }
void missing_barrier(float* out) { missing_barrier_kernel<<<1, 32>>>(out); }
void write(float* x, int n, int extra) { write_kernel<<<1, 64>>>(x, n, extra); }
void read(const float* x, int n, float* sink) { read_kernel<<<1, 64>>>(x, n, sink); }
void load4(const float* x, int offset, float* out) { load4_kernel<<<1, 1>>>(x, offset, out); }
void bounded(float* x, int threads) { bounded_kernel<<<1, threads>>>(x); }
void big_smem(float* x, int smem, bool raise) {
  if (raise) cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  big_smem_kernel<<<1, 32, smem>>>(x);
}
void warp_sum(float* out, int threads, int live) { warp_sum_kernel<<<1, threads>>>(out, live); }
void grid_y(float* x, unsigned y) { bounded_kernel<<<dim3(1, y), 32>>>(x); }
void dependent(float* x, int threads, int skip) { rf::cuda::launch_dependent(dependent_kernel, 2, threads, 0, nullptr, x, skip); }

}  // namespace emutest
