// A CPU emulation of the CUDA runtime subset the kernels use, so that their tests run where no
// GPU is (CI): every CUDA thread of a block is a fiber of one OS thread (a stack of its own,
// switched by the few instructions of emu_switch below; ucontext's swapcontext made a system call
// per switch, which was most of the emulation's time); blocks run one after another, every
// other launch from the last block to the first (EMU_BLOCKS=forward or reverse fixes one order),
// so a block that reads what another block of its launch writes gives a wrong result in one of
// the two orders;
// __syncthreads and the warp shuffles switch fibers until every thread has arrived. The last
// thread to arrive at a barrier runs on first, so threads interleave in an order no GPU promises
// either, and a thread that reads what another overwrites without a barrier between shows up (it
// found such a race in cuda/rf_loss.cu). Every other block runs its threads from the last to the
// first, which turns the other half of such races (a read that the forward order happens to
// place after the write it needs) into wrong results too; EMU_SCHEDULE=forward or reverse fixes
// one order for every block.
// Memory a GPU leaves undefined is poisoned (0xff bytes: NaN as f32 and bf16, -1 as integers):
// fresh device allocations (each page on first touch), and shared memory, dynamic and static,
// at the start of every block.
// Each device allocation ends at a guard page, so a read or write past its end (beyond the
// 256-byte granule cudaMalloc rounds to) stops the test with the kernel's name; writes within
// the granule's slack are caught by a canary checked after every launch and at cudaFree. A freed
// allocation is unmapped, so a use after free stops the test too. Launches a GPU refuses abort:
// over 1024 threads or the kernel's __launch_bounds__, a grid over its limits, dynamic shared
// memory over 48 KiB without the kernel's attribute, or over the device's opt-in limit (227 KiB on
// the default compute capability 9.0; see emu_set_device). A block whose threads all
// wait with none arriving anywhere (a warp shuffle in a warp with exited lanes or under 32
// threads) stops the test with the kernel's name instead of hanging it. A vector load or store
// off its type's alignment (a float4 or uint4 not on 16 bytes, a uint2 not on 8), which a GPU
// stops as a misaligned address while x86 just runs it, stops the test with the source line:
// scripts/cuda-emulate.sh compiles with -fsanitize=alignment, and float4 / uint4 / uint2 here
// carry the GPU's alignments.
// A kernel launched with launch_dependent (cuda/launch.cuh), which a GPU may start before the
// kernel it follows has ended, stops the test when one of its threads ends without having called
// grid_dependency_wait (the emulation runs launches one after another, so it cannot show a read
// placed before the wait; the contract in cuda/launch.h keeps those to the weights).
// What it cannot catch: races between real warps that need true concurrency, memory-model and
// coalescing effects, the real hardware limits beyond these, and speed.
// A warp's tensor-core product (mma.sync, cuda/mma.h) is formed from the 32 lanes' fragments by
// the PTX layout, between two warp barriers. A stream capture (CUDA graphs) records launches,
// async copies and cuBLASLt products in order and replays them at cudaGraphLaunch; allocating,
// freeing, synchronizing or copying to or from host memory (pageable, as all of ours is) inside
// one fails as on a GPU. A failing runtime call stays the last error until cudaGetLastError reads
// it, and emu_set_device_memory gives the device a size past which cudaMalloc fails (a full GPU).
// The device is an H100's or H200's 9.0 unless RF_EMU_DEVICE names another compute capability,
// and the build holds code for RF_EMU_ARCHITECTURES (default 80-real,90): a device none of it runs
// on fails every launch with cudaErrorNoKernelImageForDevice, as on a GPU, and one that only its
// PTX serves with cudaErrorUnsupportedPtxVersion when the driver is older than the runtime
// (emu_set_versions).
// Kernel launches (<<<...>>>) are rewritten to emu_launch by translate.py; cuBLASLt's API is
// emulated (cublaslt.cpp), its products by plain loops. scripts/cuda-emulate.sh builds and runs
// the emulated tests.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>
#include "cuda_runtime.h"
// Saves the callee-saved registers and the floating-point control words on the current stack,
// stores its pointer in *from, and resumes the stack `to` (System V x86-64).
extern "C" void emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
dim3 threadIdx, blockIdx, gridDim, blockDim;
unsigned char* emu_smem;
namespace {
constexpr unsigned char kPoison = 0xff, kCanary = 0xfd;
constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;  // the most any device opts in to
const char* running = "(no kernel)";  // the kernel now running, for the messages
bool running_dependent = false;       // whether it was launched with launch_dependent
unsigned long block_serial = 0;       // counts blocks, so that each poisons its shared memory once
std::map<const void*, size_t> smem_limit;
}  // namespace
namespace {
EmuDevice device_cc{-1, 0};     // emu_device's; major -1: not yet read from RF_EMU_DEVICE
std::string architectures;      // emu_architectures'; empty: not yet read from RF_EMU_ARCHITECTURES
int image_error = -1;           // emu_image_error's answer; -1: not yet decided
int runtime_version = 13000, driver_version = 13000;
}  // namespace
EmuDevice emu_device() {
  if (device_cc.major < 0) {
    device_cc = {9, 0};
    const char* env = getenv("RF_EMU_DEVICE");
    int major = 0, minor = 0;
    if (env && sscanf(env, "%d.%d", &major, &minor) == 2) device_cc = {major, minor};
  }
  return device_cc;
}
void emu_set_device(int major, int minor) { device_cc = {major, minor}, image_error = -1; }
const char* emu_architectures() {
  if (architectures.empty()) {
    const char* env = getenv("RF_EMU_ARCHITECTURES");
    architectures = env && *env ? env : "80-real,90";
  }
  return architectures.c_str();
}
void emu_set_architectures(const char* archs) { architectures = archs, image_error = -1; }
void emu_set_versions(int runtime, int driver) { runtime_version = runtime, driver_version = driver, image_error = -1; }
int emu_runtime_version() { return runtime_version; }
int emu_driver_version() { return driver_version; }
cudaError_t emu_image_error() {
  if (image_error < 0) {
    const EmuDevice d = emu_device();
    image_error = !emu_image_runs(emu_architectures(), d.major, d.minor)                                      ? cudaErrorNoKernelImageForDevice
                  : emu_image_cubin(emu_architectures(), d.major, d.minor) || driver_version >= runtime_version ? cudaSuccess
                                                                                                                : cudaErrorUnsupportedPtxVersion;
  }
  return cudaError_t(image_error);
}
namespace {
// Whether a cubin (kinds & 1) or the PTX (kinds & 2) of archs runs on the device.
bool image_kinds(const char* archs, int major, int minor, int kinds) {
  const int device = 10 * major + minor;
  for (const char* p = archs; *p;) {
    const char* end = strchr(p, ',');
    const std::string item(p, end ? size_t(end - p) : strlen(p));
    p = end ? end + 1 : p + item.size();
    int arch = 0, used = 0;
    if (sscanf(item.c_str(), "%d%n", &arch, &used) != 1) continue;
    const std::string kind = item.substr(size_t(used));  // "", "a", "-real", "-virtual", "a-real", ...
    const bool specific = !kind.empty() && kind[0] == 'a';
    const bool cubin = kind.find("-virtual") == std::string::npos, ptx = kind.find("-real") == std::string::npos;
    if ((kinds & 1) && cubin && arch / 10 == major && (specific ? arch == device : arch <= device)) return true;
    if ((kinds & 2) && ptx && !specific && arch <= device) return true;
  }
  return false;
}
}  // namespace
bool emu_image_runs(const char* archs, int major, int minor) { return image_kinds(archs, major, minor, 3); }
bool emu_image_cubin(const char* archs, int major, int minor) { return image_kinds(archs, major, minor, 1); }
size_t emu_opt_in_smem() {
  const EmuDevice d = emu_device();
  const int cc = 10 * d.major + d.minor;
  return size_t(cc == 80 || cc == 87 ? 163 : cc >= 90 && cc < 120 ? 227 : 99) * 1024;
}
cudaError_t emu_set_max_smem(const void* key, int bytes) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (bytes < 0 || size_t(bytes) > emu_opt_in_smem()) return emu_fail(cudaErrorInvalidValue);
  if (key) smem_limit[key] = size_t(bytes);
  return cudaSuccess;
}
void emu_poison_shared(void* p, size_t bytes) {
  static std::map<void*, unsigned long> poisoned;
  unsigned long& at = poisoned[p];
  if (at != block_serial) memset(p, kPoison, bytes), at = block_serial;
}
namespace {
struct Fiber { void* sp; char* stack; bool done, waited; };
std::vector<Fiber> fibers;
void* sched_sp;  // the scheduler's stack pointer while a fiber runs
int cur, n_alive, block_arrived, block_gen;
unsigned long arrivals = 0;  // barrier arrivals and finished threads: a pass over the block without one is a deadlock
int warp_arrived[64], warp_gen[64];
float shfl_buf[2048];
double shfl_dbuf[2048];
std::function<void()>* body_ptr;
void yield() { emu_switch(&fibers[cur].sp, sched_sp); }
void fiber_main() {
  (*body_ptr)();
  if (running_dependent && !fibers[cur].waited) {
    std::printf("EMU: kernel %s: thread %u of block (%u, %u, %u) ended without grid_dependency_wait, which every thread of a kernel "
                "launched with launch_dependent must call (cuda/launch.cuh)\n",
                running, threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
    std::fflush(stdout);
    std::abort();
  }
  fibers[cur].done = true;
  --n_alive;
  ++arrivals;
  if (block_arrived > 0 && block_arrived == n_alive) block_arrived = 0, ++block_gen;
  emu_switch(&fibers[cur].sp, sched_sp);  // never resumed
}
constexpr size_t kStack = 1 << 17;
// A fresh fiber's stack, laid out as emu_switch leaves a suspended one: the control words, the
// six callee-saved registers, and the "return address" fiber_main, at a 16-byte boundary so that
// fiber_main starts with the stack aligned as after a call.
void* fiber_start(char* stack) {
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + kStack) & ~uintptr_t(15));
  top -= 2;  // the return address' slot at 16-byte alignment, and one slot of padding above it
  top[0] = reinterpret_cast<uint64_t>(&fiber_main);
  top -= 6;  // rbp, rbx, r12 .. r15: zero
  for (int i = 0; i < 6; ++i) top[i] = 0;
  top -= 1;
  top[0] = 0x1F80u | (uint64_t(0x037Fu) << 32);  // MXCSR (round to nearest, exceptions masked), x87 control word
  return top;
}
void warp_sync() {
  const int w = int(threadIdx.x) / 32, gen = warp_gen[w];
  ++arrivals;
  if (++warp_arrived[w] == 32) { warp_arrived[w] = 0; ++warp_gen[w]; return; }
  while (warp_gen[w] == gen) yield();
}
}  // namespace
void emu_grid_dependency_wait() { fibers[cur].waited = true; }
void __syncthreads() {
  const int gen = block_gen;
  ++arrivals;
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
int __shfl_xor_sync(unsigned m, int v, int o) { return int(__shfl_xor_sync(m, double(v), o)); }  // exact in a double
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
  if (emu_lost()) return emu_fail(emu_context_error);
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
cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes, size_t* count) {
  if (nodes) return cudaErrorInvalidValue;
  *count = graph->ops.size();
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  if (emu_lost()) return emu_fail(emu_context_error);
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
namespace {
[[noreturn]] void refuse(const EmuKernel& k, const char* why, size_t a, size_t b) {
  std::printf("EMU: kernel %s: %s (%zu, limit %zu)\n", k.name, why, a, b);
  std::fflush(stdout);
  std::abort();
}
void check_canaries(const char* after);
}  // namespace
void emu_launch(dim3 grid, dim3 block, size_t smem, EmuKernel kernel, std::function<void()> body) {
  if (emu_lost()) {
    emu_fail(emu_context_error);
    return;
  }
  // A device none of the build's code runs on fails every launch, as on a GPU (and one only its
  // PTX serves, when the driver cannot compile that PTX).
  if (const cudaError_t e = emu_image_error(); e != cudaSuccess) {
    emu_fail(e);
    return;
  }
  // What the GPU checks at launch, checked when the launch is made (a capture's too).
  const auto it = kernel.key ? smem_limit.find(kernel.key) : smem_limit.end();
  const size_t limit = it == smem_limit.end() ? kDefaultSmem : std::max(kDefaultSmem, it->second);
  if (smem > limit) refuse(kernel, "dynamic shared memory over the kernel's limit", smem, limit);
  if (block.y != 1 || block.z != 1) refuse(kernel, "a 2-D or 3-D block (the emulation runs 1-D ones)", block.y * block.z, 1);
  if (block.x == 0 || block.x > 1024) refuse(kernel, "threads per block", block.x, 1024);
  if (kernel.bounds > 0 && block.x > unsigned(kernel.bounds)) refuse(kernel, "threads per block over __launch_bounds__", block.x, kernel.bounds);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse(kernel, "an empty grid", 0, 1);
  if (grid.y > 65535 || grid.z > 65535) refuse(kernel, "grid.y or grid.z", std::max(grid.y, grid.z), 65535);
  emu_enqueue([=] {
    running = kernel.name, running_dependent = kernel.dependent;
    launch_now(grid, block, smem, body);
    check_canaries(kernel.name);
    running = "(no kernel)", running_dependent = false;
  });
}
namespace {
// Whether a launch's blocks run their threads from the last to the first: EMU_SCHEDULE=forward
// or reverse for every block; by default, odd blocks reverse. Read at each launch, so a test may
// switch. Returns +1 (every block forward), -1 (every block reversed) or 0 (alternate).
int schedule() {
  const char* s = getenv("EMU_SCHEDULE");
  return s && strcmp(s, "forward") == 0 ? 1 : s && strcmp(s, "reverse") == 0 ? -1 : 0;
}
// Whether a launch runs its blocks from the last to the first: EMU_BLOCKS=forward or reverse for
// every launch; by default every other launch. No launch may read what another of its blocks
// writes (a GPU runs them in any order, at once), and one order alone hides half of such reads.
bool blocks_reversed() {
  static unsigned long launches = 0;
  const char* s = getenv("EMU_BLOCKS");
  ++launches;
  return s && strcmp(s, "forward") == 0 ? false : s && strcmp(s, "reverse") == 0 ? true : launches % 2 == 0;
}
void launch_now(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  const int n = block.x, order = schedule();
  const bool blocks_back = blocks_reversed();
  body_ptr = &body;
  gridDim = grid, blockDim = block;
  // The stacks stay from launch to launch (each malloc of one would map and unmap its pages).
  static std::vector<char*> stacks;
  while (stacks.size() < size_t(n)) stacks.push_back(static_cast<char*>(malloc(kStack)));
  fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) fibers[i].stack = stacks[i];
  const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
  for (unsigned long b = 0; b < blocks; ++b) {
    const unsigned long lin = blocks_back ? blocks - 1 - b : b;
    const unsigned x = unsigned(lin % grid.x), y = unsigned(lin / grid.x % grid.y), z = unsigned(lin / grid.x / grid.y);
    blockIdx = dim3(x, y, z);
    ++block_serial;
    const bool reverse = order == 0 ? block_serial % 2 == 1 : order < 0;
    alignas(128) static unsigned char shared[kMaxSmem];  // the launch checks kept smem within it
    memset(shared, kPoison, smem);
    emu_smem = shared;
    for (int i = 0; i < n; ++i) {
      fibers[i].sp = fiber_start(fibers[i].stack);
      fibers[i].done = fibers[i].waited = false;
    }
    n_alive = n, block_arrived = 0;
    for (auto& a : warp_arrived) a = 0;
    while (n_alive > 0) {
      const unsigned long before = arrivals;
      for (int j = 0; j < n; ++j) {
        const int i = reverse ? n - 1 - j : j;
        if (fibers[i].done) continue;
        cur = i;
        threadIdx = dim3(i);
        emu_switch(&sched_sp, fibers[i].sp);
      }
      // Every live thread waited and none arrived anywhere: on a GPU, a hang or undefined.
      if (arrivals == before) {
        std::printf("EMU: kernel %s: block (%u, %u, %u) deadlocks: %d threads wait at a warp shuffle or __syncthreads that "
                    "the rest never reach (a warp with exited lanes or under 32 threads)\n",
                    running, x, y, z, n_alive);
        std::fflush(stdout);
        std::abort();
      }
    }
  }
}
}  // namespace
// Device memory: each allocation rounded up to cudaMalloc's 256-byte granule and placed so that
// the granule ends where an inaccessible guard page begins. Its pages are poisoned on first touch
// (mapped inaccessible, made accessible and poisoned by the fault handler): poisoning them all at
// cudaMalloc would write every page of the engine's 2 GiB KV pool, most of which a test never uses.
namespace {
struct Allocation {
  char* map;
  size_t map_bytes, bytes, granule;
};
std::map<char*, Allocation> allocations;  // by the address handed out
size_t allocated_bytes = 0;
const size_t page = size_t(sysconf(_SC_PAGESIZE));
// The first byte of the granule's slack that is no longer the canary, or null.
const char* slack_written(const char* p, const Allocation& a) {
  for (size_t i = a.bytes; i < a.granule; ++i)
    if ((unsigned char)p[i] != kCanary) return p + i;
  return nullptr;
}
void check_canaries(const char* after) {
  for (const auto& [p, a] : allocations)
    if (const char* bad = slack_written(p, a)) {
      std::printf("EMU: %s wrote past the end of a %zu-byte device allocation (byte %zu)\n", after, a.bytes, size_t(bad - p));
      std::fflush(stdout);
      std::abort();
    }
}
// The allocation whose pages hold address a (between its mapping's start and its guard page), or null.
const Allocation* allocation_at(const char* a) {
  auto it = allocations.upper_bound(const_cast<char*>(a));  // the first handed out above a: a may be in its first page
  if (it != allocations.end() && a >= it->second.map) return &it->second;
  if (it == allocations.begin()) return nullptr;
  --it;
  return a < it->second.map + it->second.map_bytes - page ? &it->second : nullptr;
}
void on_fault(int, siginfo_t* info, void*) {
  // A first touch of a device page: make it accessible, poisoned, and let the access run again.
  // (mprotect and memset only; the allocation table is not being changed by the faulting code.)
  char* a = static_cast<char*>(info->si_addr);
  if (allocation_at(a)) {
    char* pg = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(a) & ~uintptr_t(page - 1));
    if (mprotect(pg, page, PROT_READ | PROT_WRITE) == 0) {
      memset(pg, kPoison, page);
      return;
    }
  }
  // Only async-signal-safe calls here.
  char msg[256];
  const int n = snprintf(msg, sizeof msg, "EMU: invalid memory access at %p in %s (past the end of a device allocation, freed memory, or a host bug)\n", info->si_addr, running);
  if (n > 0) (void)!write(2, msg, size_t(n));
  _exit(134);
}
// The fibers run on stacks of their own, so the handler gets an alternate stack.
const bool fault_handler_installed = [] {
  static char alt[1 << 16];
  stack_t ss{};
  ss.ss_sp = alt, ss.ss_size = sizeof alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  return true;
}();
}  // namespace
namespace {
size_t device_bytes = 0;  // emu_set_device_memory's; 0: the host's physical memory
}  // namespace
void emu_set_device_memory(size_t bytes) { device_bytes = bytes; }
size_t emu_device_memory() {
  static const size_t host = size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE));
  return device_bytes ? device_bytes : host;
}
void* emu_malloc(size_t n) {
  if (allocated_bytes + n > emu_device_memory()) return nullptr;  // the device is full
  const size_t granule = (std::max<size_t>(n, 1) + 255) / 256 * 256, data = (granule + page - 1) / page * page;
  void* m = mmap(nullptr, data + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* map = static_cast<char*>(m);
  // The last data page now: it holds the canary, which must be there before any kernel runs.
  char* last = map + data - page;
  if (mprotect(last, page, PROT_READ | PROT_WRITE) != 0) { munmap(map, data + page); return nullptr; }
  memset(last, kPoison, page);
  char* p = map + data - granule;
  memset(p + n, kCanary, granule - n);
  allocations[p] = Allocation{map, data + page, n, granule};
  allocated_bytes += n;
  return p;
}
void emu_free(void* ptr) {
  if (!ptr) return;
  const auto it = allocations.find(static_cast<char*>(ptr));
  if (it == allocations.end()) {
    std::printf("EMU: cudaFree of %p, which is not a device allocation (or freed twice)\n", ptr);
    std::fflush(stdout);
    std::abort();
  }
  if (const char* bad = slack_written(it->first, it->second)) {
    std::printf("EMU: a %zu-byte device allocation was written past its end (byte %zu), found at cudaFree\n", it->second.bytes, size_t(bad - it->first));
    std::fflush(stdout);
    std::abort();
  }
  allocated_bytes -= it->second.bytes;
  munmap(it->second.map, it->second.map_bytes);
  allocations.erase(it);
}
size_t emu_allocated() { return allocated_bytes; }
// A kernel's trap: the GPU stops it and the context is lost (cudaErrorLaunchFailure, sticky).
void __trap() { emu_context_error = emu_last_error = cudaErrorLaunchFailure; }

double emu_now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
