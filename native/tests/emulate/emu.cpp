// A CPU emulation of the CUDA runtime subset the kernels use, so that their tests run where no
// GPU is (CI): every CUDA thread of a block is a fiber (ucontext) of one OS thread; blocks run
// one after another; __syncthreads and the warp shuffles switch fibers until every thread has
// arrived. The last thread to arrive at a barrier runs on first, so threads interleave in an
// order no GPU promises either, and a thread that reads what another overwrites without a
// barrier between shows up (it found such a race in cuda/rf_loss.cu). Shared memory is
// poisoned (0xff bytes) per block; launches over 1024 threads or over the dynamic shared-memory
// limit abort. What it cannot catch: races between real warps that need true concurrency,
// memory-model and coalescing effects, the real hardware limits beyond these, and speed.
// A warp's tensor-core product (mma.sync, cuda/mma.h) is formed from the 32 lanes' fragments by
// the PTX layout, between two warp barriers. A stream capture (CUDA graphs) records launches,
// async copies and cuBLASLt stand-ins in order and replays them at cudaGraphLaunch; allocating,
// freeing or synchronizing inside one fails as on a GPU.
// Kernel launches (<<<...>>>) are rewritten to emu_launch by translate.py; cuBLASLt is replaced
// by plain loops (gemm.cpp). scripts/cuda-emulate.sh builds and runs the emulated tests.
#include <ucontext.h>
#include <chrono>
#include <cstdio>
#include <vector>
#include "cuda_runtime.h"
dim3 threadIdx, blockIdx, gridDim, blockDim;
unsigned char* emu_smem;
size_t emu_max_smem = 48 * 1024;
namespace {
struct Fiber { ucontext_t ctx; char* stack; bool done; };
std::vector<Fiber> fibers;
ucontext_t sched_ctx;
int cur, n_alive, block_arrived, block_gen;
int warp_arrived[64], warp_gen[64];
float shfl_buf[2048];
double shfl_dbuf[2048];
std::function<void()>* body_ptr;
void yield() { swapcontext(&fibers[cur].ctx, &sched_ctx); }
void fiber_main() {
  (*body_ptr)();
  fibers[cur].done = true;
  --n_alive;
  if (block_arrived > 0 && block_arrived == n_alive) block_arrived = 0, ++block_gen;
  swapcontext(&fibers[cur].ctx, &sched_ctx);
}
void warp_sync() {
  const int w = int(threadIdx.x) / 32, gen = warp_gen[w];
  if (++warp_arrived[w] == 32) { warp_arrived[w] = 0; ++warp_gen[w]; return; }
  while (warp_gen[w] == gen) yield();
}
}  // namespace
void __syncthreads() {
  const int gen = block_gen;
  if (++block_arrived == n_alive) { block_arrived = 0; ++block_gen; return; }
  while (block_gen == gen) yield();
}
float __shfl_sync(unsigned, float v, int src) {
  const int t = threadIdx.x;
  shfl_buf[t] = v;
  warp_sync();
  const float r = shfl_buf[(t & ~31) | (src & 31)];
  warp_sync();
  return r;
}
double __shfl_xor_sync(unsigned, double v, int o) {
  const int t = threadIdx.x;
  shfl_dbuf[t] = v;
  warp_sync();
  const double r = shfl_dbuf[(t & ~31) | ((t & 31) ^ o)];
  warp_sync();
  return r;
}
float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = threadIdx.x;
  shfl_buf[t] = v;
  warp_sync();
  const float r = shfl_buf[(t & ~31) | ((t & 31) ^ o)];
  warp_sync();
  return r;
}
namespace {
uint32_t mma_a[1024][4], mma_b[1024][2];
float bf16_at(uint32_t reg, int half) {
  const uint32_t u = (half ? reg >> 16 : reg & 0xffffu) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
}  // namespace
void emu_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int tid = threadIdx.x, base = tid & ~31, lane = tid & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) mma_a[tid][i] = a[i];
  mma_b[tid][0] = b[0], mma_b[tid][1] = b[1];
  warp_sync();
  // A[m][k] sits in lane 4 (m % 8) + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2;
  // B[k][n] in lane 4 n + (k % 8) / 2, register k >= 8, half k % 2.
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      const float av = bf16_at(mma_a[base + 4 * (m % 8) + (k % 8) / 2][(m >= 8) + 2 * (k >= 8)], k & 1);
      const float bv = bf16_at(mma_b[base + 4 * n + (k % 8) / 2][k >= 8], k & 1);
      sum += av * bv;
    }
    r[i] = d[i] + sum;
  }
  warp_sync();  // every lane has read the others' fragments before any reuses the buffers
  for (int i = 0; i < 4; ++i) d[i] = r[i];
}
struct EmuGraph {
  std::vector<std::function<void()>> ops;
};
namespace {
EmuGraph* capture = nullptr;  // the open capture, if any
void launch_now(dim3 grid, dim3 block, size_t smem, std::function<void()> body);
}  // namespace
bool emu_capturing() { return capture != nullptr; }
void emu_enqueue(std::function<void()> op) {
  if (capture) capture->ops.push_back(std::move(op));
  else op();
}
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  if (capture) return cudaErrorStreamCaptureUnsupported;
  capture = new EmuGraph;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* graph) {
  *graph = capture;
  capture = nullptr;
  return *graph ? cudaSuccess : cudaErrorStreamCaptureInvalidated;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = new EmuGraph(*graph);
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  for (auto& op : exec->ops) emu_enqueue(op);
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
void emu_launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  emu_enqueue([=] { launch_now(grid, block, smem, body); });
}
namespace {
void launch_now(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  if (smem > emu_max_smem) { std::printf("EMU: smem %zu over limit %zu\n", smem, emu_max_smem); std::abort(); }
  if (block.y != 1 || block.z != 1 || block.x > 1024) std::abort();
  const int n = block.x;
  body_ptr = &body;
  gridDim = grid, blockDim = block;
  fibers.assign(n, Fiber{});
  for (auto& f : fibers) f.stack = (char*)malloc(1 << 17);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        unsigned char* sm = (unsigned char*)malloc(smem ? smem : 1);
        memset(sm, 0xff, smem);
        emu_smem = sm;
        for (int i = 0; i < n; ++i) {
          getcontext(&fibers[i].ctx);
          fibers[i].ctx.uc_stack.ss_sp = fibers[i].stack;
          fibers[i].ctx.uc_stack.ss_size = 1 << 17;
          fibers[i].ctx.uc_link = nullptr;
          fibers[i].done = false;
          makecontext(&fibers[i].ctx, fiber_main, 0);
        }
        n_alive = n, block_arrived = 0;
        for (auto& a : warp_arrived) a = 0;
        while (n_alive > 0)
          for (int i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            cur = i;
            threadIdx = dim3(i);
            swapcontext(&sched_ctx, &fibers[i].ctx);
          }
        free(sm);
      }
  for (auto& f : fibers) free(f.stack);
}
}  // namespace
#include <map>
static std::map<void*, size_t> g_alloc;
static size_t g_bytes = 0;
void* emu_malloc(size_t n) { void* p = malloc(n ? n : 1); g_alloc[p] = n; g_bytes += n; return p; }
void emu_free(void* p) { if (!p) return; auto it = g_alloc.find(p); if (it != g_alloc.end()) { g_bytes -= it->second; g_alloc.erase(it); } free(p); }
size_t emu_allocated() { return g_bytes; }

double emu_now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
