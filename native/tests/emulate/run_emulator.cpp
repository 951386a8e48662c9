// Tests the CPU emulation of CUDA itself (emu.cpp): every rule it enforces is broken once by a
// kernel of emulator_test.cu and must be caught, and the legal neighbour of each case must pass,
// so that a kernel test passing under the emulation means what emu.cpp says it means. The
// emulated cuBLASLt (cublaslt.cpp) is checked the same way: a small product worked by hand in
// each operand form, then each call it must refuse.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include <cublasLt.h>

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


// One cuBLASLt product of f32 matrices through the emulated API: descriptor, layouts (rows,
// cols, ld of A, B and C = D as stored, column-major), the heuristic's algorithm (for `for_m`
// rows of D when given: an algorithm of another problem), then the call. Returns the first status
// that is not success.
struct LtCall {
  int32_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  uint64_t a[3], b[3], d[3];
  cudaDataType_t d_type = CUDA_R_32F;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  uint64_t workspace_pref = 0;
  size_t workspace_given = 0;
  uint32_t align_a = 256;
  float alpha = 1.f, beta = 0.f;
  bool other_problem = false;
  cublasStatus_t run(const void* A, const void* B, const void* C, void* D) const {
    cublasLtHandle_t h;
    cublasLtCreate(&h);
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue);
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    cublasLtMatrixLayout_t la, lb, ld, lo;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, a[0], a[1], int64_t(a[2]));
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, b[0], b[1], int64_t(b[2]));
    cublasLtMatrixLayoutCreate(&ld, d_type, d[0], d[1], int64_t(d[2]));
    cublasLtMatrixLayoutCreate(&lo, CUDA_R_32F, d[0], d[1] + 1, int64_t(d[2]));  // D with one more column
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_pref, sizeof workspace_pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof align_a);
    cublasLtMatmulHeuristicResult_t r[1];
    int found = 0;
    // Another problem: B and D with one more column.
    cublasLtMatrixLayout_t lb2 = nullptr;
    if (other_problem) cublasLtMatrixLayoutCreate(&lb2, CUDA_R_32F, b[0], b[1] + 1, int64_t(b[2]));
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h, desc, la, other_problem ? lb2 : lb, other_problem ? lo : ld,
                                                      other_problem ? lo : ld, pref, 1, r, &found);
    void* ws = nullptr;
    if (s == CUBLAS_STATUS_SUCCESS) {
      if (workspace_given) cudaMalloc(&ws, workspace_given);
      s = cublasLtMatmul(h, desc, &alpha, A, la, B, lb, &beta, C, ld, D, ld, &r[0].algo, ws, workspace_given, nullptr);
      cudaFree(ws);
    }
    if (lb2) cublasLtMatrixLayoutDestroy(lb2);
    for (cublasLtMatrixLayout_t l : {la, lb, ld, lo}) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(h);
    return s;
  }
};

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
  // A stream capture refuses what a GPU's refuses: allocating, synchronizing, and copying to or
  // from pageable host memory (every host buffer of ours); a copy between device buffers and a
  // set are captured.
  {
    float* x = device<float>(4);
    float host[4] = {1, 2, 3, 4};
    cudaStream_t st = nullptr;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    float* y = nullptr;
    const bool refused = cudaMalloc(&y, 16) == cudaErrorStreamCaptureUnsupported && cudaStreamSynchronize(st) == cudaErrorStreamCaptureUnsupported &&
                         cudaMemcpyAsync(x, host, 16, cudaMemcpyHostToDevice, st) == cudaErrorStreamCaptureUnsupported &&
                         cudaMemcpyAsync(host, x, 16, cudaMemcpyDeviceToHost, st) == cudaErrorStreamCaptureUnsupported;
    const bool taken = cudaMemcpyAsync(x + 2, x, 8, cudaMemcpyDeviceToDevice, st) == cudaSuccess && cudaMemsetAsync(x, 0, 4, st) == cudaSuccess;
    // The refusals are the runtime's last error until read, as on a GPU.
    const bool recorded = cudaGetLastError() == cudaErrorStreamCaptureUnsupported && cudaGetLastError() == cudaSuccess;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(st, &graph);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(st);
    cudaFree(x);
    check(refused && taken && recorded, "a stream capture refuses allocating, synchronizing and host copies (the last error until read); takes device copies and sets");
  }
  // The emulated cuBLASLt. A = [[1, 3, 5], [2, 4, 6]] (2 x 3), B = [[1, 0], [0, 1], [2, 1]]
  // (3 x 2): A B = [[11, 8], [14, 10]], column-major 11, 14, 8, 10; stored as given, or each as
  // its transpose with TRANSA / TRANSB = T; plus a bias per row of D (100, 200), alpha 2 and
  // beta 1 over D in place.
  {
    // At 64 floats (256 bytes: the alignment an algorithm asks for by default) the transposes.
    float* A = device<float>(128);  // A column-major [2 x 3] (ld 2), and its transpose [3 x 2] (ld 3)
    float* B = device<float>(128);  // B column-major [3 x 2] (ld 3), and its transpose [2 x 3] (ld 2)
    float* D = device<float>(64);
    float* C = device<float>(64);
    float* bias = device<float>(4);
    const float a[6] = {1, 2, 3, 4, 5, 6}, at[6] = {1, 3, 5, 2, 4, 6}, b[6] = {1, 0, 2, 0, 1, 1}, bt[6] = {1, 0, 0, 1, 2, 1};
    for (int i = 0; i < 6; ++i) A[i] = a[i], A[64 + i] = at[i], B[i] = b[i], B[64 + i] = bt[i];
    bias[0] = 100, bias[1] = 200;
    const auto result = [&](const LtCall& c, const float* Ap, const float* Bp) {
      for (int i = 0; i < 4; ++i) D[i] = 1.f;
      return c.run(Ap, Bp, D, D) == CUBLAS_STATUS_SUCCESS ? std::vector<float>(D, D + 4) : std::vector<float>{};
    };
    LtCall nn;
    nn.a[0] = 2, nn.a[1] = 3, nn.a[2] = 2, nn.b[0] = 3, nn.b[1] = 2, nn.b[2] = 3, nn.d[0] = 2, nn.d[1] = 2, nn.d[2] = 2;
    check(result(nn, A, B) == std::vector<float>{11, 14, 8, 10}, "cuBLASLt: A B, column-major");
    LtCall tt = nn;
    tt.ta = tt.tb = CUBLAS_OP_T;
    tt.a[0] = 3, tt.a[1] = 2, tt.a[2] = 3, tt.b[0] = 2, tt.b[1] = 3, tt.b[2] = 2;
    check(result(tt, A + 64, B + 64) == std::vector<float>{11, 14, 8, 10}, "cuBLASLt: TRANSA and TRANSB = T read the stored transposes");
    LtCall fused = nn;
    fused.epilogue = CUBLASLT_EPILOGUE_BIAS, fused.bias = bias, fused.alpha = 2.f, fused.beta = 1.f;
    check(result(fused, A, B) == std::vector<float>{123, 229, 117, 221}, "cuBLASLt: alpha A B + beta C + a bias per row of D");
    const auto status = [&](LtCall c, const float* Ap = nullptr, const float* C = nullptr) {
      return c.run(Ap ? Ap : A, B, C ? C : D, D);
    };
    LtCall bad = nn;
    bad.a[2] = 1;
    check(status(bad) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses a leading dimension under its rows");
    bad = nn, bad.a[1] = 4;
    check(status(bad) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses op(A) and op(B) whose k differ");
    bad = nn, bad.other_problem = true;
    check(status(bad) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses an algorithm chosen for another problem");
    bad = nn, bad.workspace_pref = 4096, bad.workspace_given = 1024;
    check(status(bad) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses a workspace smaller than the algorithm's");
    bad.workspace_given = 4096;
    check(status(bad) == CUBLAS_STATUS_SUCCESS, "cuBLASLt takes the workspace the algorithm asked for");
    check(status(nn, A + 1) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses A less aligned than the algorithm was chosen for");
    bad = nn, bad.align_a = 4;
    check(status(bad, A + 1) == CUBLAS_STATUS_SUCCESS, "cuBLASLt takes A on 4 bytes for an algorithm chosen for 4");
    bad = nn, bad.beta = 1.f;
    check(status(bad, nullptr, C) == CUBLAS_STATUS_SUCCESS, "cuBLASLt takes a C apart from D that does not overlap it");
    {
      // D's columns 64 floats apart: its second column (256 bytes in, aligned) is where this C starts.
      float* wide = device<float>(256);
      bad.d[2] = 64;
      check(bad.run(A, B, wide + 64, wide) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt refuses a C apart from D that overlaps it");
      check(bad.run(A, B, wide + 128, wide) == CUBLAS_STATUS_SUCCESS, "cuBLASLt takes that C past D's last column");
      cudaFree(wide);
    }
    bad = nn, bad.d_type = CUDA_R_16BF;
    check(status(bad) == CUBLAS_STATUS_NOT_SUPPORTED, "cuBLASLt has no bf16 D from f32 inputs");
    bad = nn, bad.epilogue = CUBLASLT_EPILOGUE_BIAS, bad.bias = bias + 1;
    check(status(bad) == CUBLAS_STATUS_INVALID_VALUE, "cuBLASLt (as gemm.cu assumes) refuses a bias under 16 bytes aligned");
    for (float* p : {A, B, C, D, bias}) cudaFree(p);
  }
  return finish("emulator");
}
