// Tests the CPU emulation of CUDA itself (emu.cpp): every rule it enforces is broken once by a
// kernel of emulator_test.cu and must be caught, and the legal neighbour of each case must pass,
// so that a kernel test passing under the emulation means what emu.cpp says it means.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "cuda_runtime.h"
#include "tests/check.h"

namespace emutest {
void read_shared_before_write(float* out, int blocks);
void read_dynamic_shared(float* out, int blocks);
void ticket(int* order, int* counter, int threads);
void missing_barrier(float* out);
void write(float* x, int n, int extra);
void read(const float* x, int n, float* sink);
void bounded(float* x, int threads);
void big_smem(float* x, int smem, bool raise);
void grid_y(float* x, unsigned y);
void cross_block(float* x);
void load4(const float* x, int offset, float* out);
void warp_sum(float* out, int threads, int live);
void dependent(float* x, int threads, int skip);
}  // namespace emutest

// Runs f in a child process: true when the child stopped abnormally (the emulation's abort or
// its fault handler), false when f returned.
static bool stops(const std::function<void()>& f) {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    // The child's own messages are what a failing test would print; keep them out of the log.
    if (!std::freopen("/dev/null", "w", stdout) || !std::freopen("/dev/null", "w", stderr)) _exit(3);
    f();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

template <class T>
static T* device(size_t n) {
  T* p = nullptr;
  if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) std::abort();
  return p;
}

int main() {
  using namespace emutest;
  using rf::test::check;
  using rf::test::finish;
  // Memory a GPU leaves undefined reads as poison: a fresh allocation, and shared memory, static
  // and dynamic, in every block (the second block would otherwise see the first one's 1).
  {
    float* out = device<float>(3);
    check(std::isnan(out[0]) && std::isnan(out[2]), "a fresh allocation is poisoned (NaN)");
    read_shared_before_write(out, 3);
    check(std::isnan(out[0]) && std::isnan(out[1]) && std::isnan(out[2]), "static shared memory is poisoned in every block");
    read_dynamic_shared(out, 2);
    check(std::isnan(out[0]) && std::isnan(out[1]), "dynamic shared memory is poisoned in every block");
    cudaFree(out);
  }
  // The schedule: forward runs thread 0 first, reverse the last first, and the default
  // alternates by block, so a read placed after its write by one order is placed before it by
  // the other and a missing barrier gives a wrong result.
  {
    int* order = device<int>(64);
    int* counter = device<int>(1);
    const auto first = [&](const char* schedule) {
      setenv("EMU_SCHEDULE", schedule, 1);
      *counter = 0;
      ticket(order, counter, 64);
      return order[0] == 0 ? 0 : order[63] == 0 ? 63 : -1;
    };
    check(first("forward") == 0, "forward schedule: thread 0 runs first");
    check(first("reverse") == 63, "reverse schedule: the last thread runs first");
    float* out = device<float>(1);
    setenv("EMU_SCHEDULE", "forward", 1);
    missing_barrier(out);
    check(out[0] == 2.f, "forward schedule: thread 1 happens to read thread 0's write");
    setenv("EMU_SCHEDULE", "reverse", 1);
    missing_barrier(out);
    check(std::isnan(out[0]), "reverse schedule: the missing barrier reads poison");
    unsetenv("EMU_SCHEDULE");
    cudaFree(out);
    cudaFree(order);
    // Blocks: forward runs block 0 first, reverse the last first, and the default alternates by
    // launch, so of two launches one gives a wrong result when a block reads another's write.
    float* x = device<float>(2);
    const auto read_back = [&](const char* blocks) {
      if (blocks) setenv("EMU_BLOCKS", blocks, 1);
      cudaMemset(x, 0, 2 * sizeof(float));
      cross_block(x);
      cudaDeviceSynchronize();
      return x[1];
    };
    check(read_back("forward") == 2.f, "forward blocks: block 1 happens to read block 0's write");
    check(read_back("reverse") == 0.f, "reverse blocks: block 1 runs first and reads the zero");
    unsetenv("EMU_BLOCKS");
    const float a = read_back(nullptr), b = read_back(nullptr);
    check((a == 2.f) != (b == 2.f), "by default, one of two launches runs the blocks in reverse");
    cudaFree(x);
    cudaFree(counter);
  }
  // Out-of-bounds and freed memory. 100 floats are 400 bytes in a 512-byte granule: one element
  // past the end lands in the granule's slack (the canary), 28 elements past it on the guard page.
  {
    check(!stops([] { float* x = device<float>(100); write(x, 100, 0); cudaFree(x); }), "a write within bounds passes");
    check(stops([] { float* x = device<float>(100); write(x, 100, 1); }), "a write one element past the end stops the test (canary)");
    check(stops([] { float* x = device<float>(128); write(x, 128, 1); }), "a write past a full granule stops the test (guard page)");
    check(stops([] { float* x = device<float>(128); float* s = device<float>(1); read(x, 129, s); }), "a read past a full granule stops the test");
    check(stops([] { float* x = device<float>(128); float* s = device<float>(1); cudaFree(x); read(x, 128, s); }), "a read after cudaFree stops the test");
    check(stops([] { float* x = device<float>(8); cudaFree(x); cudaFree(x); }), "freeing twice stops the test");
    // A float4 off 16 bytes: a GPU's misaligned address, x86's ordinary load (-fsanitize=alignment).
    check(!stops([] { float* x = device<float>(8); float* s = device<float>(1); load4(x, 4, s); }), "a float4 load on 16 bytes passes");
    check(stops([] { float* x = device<float>(8); float* s = device<float>(1); load4(x, 2, s); }), "a float4 load on 8 bytes stops the test");
  }
  // Launches a GPU refuses.
  {
    check(!stops([] { float* x = device<float>(1024); bounded(x, 64); }), "a launch within __launch_bounds__ passes");
    check(stops([] { float* x = device<float>(1024); bounded(x, 128); }), "a launch over __launch_bounds__ stops the test");
    check(stops([] { float* x = device<float>(1024); bounded(x, 0); }), "a launch of no threads stops the test");
    check(!stops([] { float* x = device<float>(1); big_smem(x, 48 * 1024, false); }), "48 KiB of dynamic shared memory need no attribute");
    check(stops([] { float* x = device<float>(1); big_smem(x, 64 * 1024, false); }), "64 KiB without the attribute stop the test");
    check(!stops([] { float* x = device<float>(1); big_smem(x, 64 * 1024, true); }), "64 KiB with the attribute pass");
    check(stops([] { float* x = device<float>(1); big_smem(x, 228 * 1024, true); }), "228 KiB, over the opt-in limit, stop the test");
    check(!stops([] { float* x = device<float>(1024); grid_y(x, 65535); }), "grid.y of 65535 passes");
    check(stops([] { float* x = device<float>(1024); grid_y(x, 65536); }), "grid.y of 65536 stops the test");
  }
  // A warp shuffle that not all 32 lanes reach (undefined on a GPU, a hang here before) stops the
  // test with the kernel's name. (Threads that exit are dropped from __syncthreads' count, as on
  // a GPU, so a barrier that the exited threads skip is no deadlock.)
  {
    float* out = device<float>(64);
    warp_sum(out, 32, 32);
    check(out[0] == 32.f, "a warp sum over a full warp gives 32");
    check(stops([] { float* o = device<float>(1); warp_sum(o, 32, 31); }), "a shuffle in a warp with an exited lane stops the test");
    check(stops([] { float* o = device<float>(1); warp_sum(o, 48, 48); }), "a shuffle in a warp of 16 threads stops the test");
    cudaFree(out);
  }
  // A kernel launched with launch_dependent may start before the kernels it follows have ended:
  // every thread must wait for them (grid_dependency_wait), which one returning early skips.
  {
    check(!stops([] { float* x = device<float>(64); dependent(x, 64, 64); }), "a dependent kernel whose every thread waits passes");
    check(stops([] { float* x = device<float>(64); dependent(x, 64, 63); }), "a dependent kernel with one thread that never waits stops the test");
  }
  return finish("emulator");
}
