// The CUDA runtime as the CPU emulation provides it (see emu.cpp): the subset our sources use.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <tuple>
#define RF_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(x) alignas(x)
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
extern dim3 threadIdx, blockIdx, gridDim, blockDim;
typedef void* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoKernelImageForDevice = 209, cudaErrorECCUncorrectable = 214, cudaErrorInvalidPtx = 218,
  cudaErrorNvlinkUncorrectable = 220, cudaErrorJitCompilerNotFound = 221, cudaErrorUnsupportedPtxVersion = 222,
  cudaErrorJitCompilationDisabled = 223, cudaErrorIllegalAddress = 700, cudaErrorLaunchTimeout = 702, cudaErrorAssert = 710,
  cudaErrorHardwareStackError = 714, cudaErrorIllegalInstruction = 715, cudaErrorMisalignedAddress = 716,
  cudaErrorInvalidAddressSpace = 717, cudaErrorInvalidPc = 718, cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900, cudaErrorStreamCaptureInvalidated = 901
};
// Stream capture (CUDA graphs): while a capture is open, launches, async copies and sets are
// recorded instead of run (emu_enqueue), and what a real capture refuses (allocating, freeing,
// synchronizing, a synchronous copy) returns cudaErrorStreamCaptureUnsupported.
bool emu_capturing();
void emu_enqueue(std::function<void()> op);
struct EmuGraph;
typedef EmuGraph* cudaGraph_t;
typedef EmuGraph* cudaGraphExec_t;
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode);
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags);
// The count of a graph's recorded operations (each launch, copy, set and cuBLASLt product one
// node, as a GPU's capture makes a node of each launch and copy); nodes themselves: not emulated.
typedef void* cudaGraphNode_t;
cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes, size_t* count);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
// The runtime's last error, as on a GPU: a failing call records it, and cudaGetLastError returns
// and clears it (so that an error left uncleared shows at the next launch check).
inline cudaError_t emu_last_error = cudaSuccess;
inline cudaError_t emu_fail(cudaError_t e) { return emu_last_error = e; }
// A lost context, as after a kernel fault on a GPU (a kernel's __trap() here): from then on every
// runtime call returns the error, launches and queued work do nothing, cudaGetLastError returns
// it without clearing it, and cuBLASLt's products fail.
inline cudaError_t emu_context_error = cudaSuccess;
inline bool emu_lost() { return emu_context_error != cudaSuccess; }
void __trap();
void* emu_malloc(size_t n);
void emu_free(void* p);
// The emulated device's memory (0, the default: the host's physical memory, where it lives):
// past it cudaMalloc fails with cudaErrorMemoryAllocation, as on a full GPU, and cudaMemGetInfo
// reports it as the total.
void emu_set_device_memory(size_t bytes);
size_t emu_device_memory();
template <class T> cudaError_t cudaMalloc(T** p, size_t n) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing()) return emu_fail(cudaErrorStreamCaptureUnsupported);
  *p = (T*)emu_malloc(n);
  return *p ? cudaSuccess : emu_fail(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFree(void* p) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing()) return emu_fail(cudaErrorStreamCaptureUnsupported);
  emu_free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing()) return emu_fail(cudaErrorStreamCaptureUnsupported);
  memcpy(d, s, n);
  return cudaSuccess;
}
// A copy to or from the host inside a stream capture fails, as on a GPU for pageable host memory
// (every host buffer of ours: none is pinned), whose copies synchronize with the stream.
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing() && kind != cudaMemcpyDeviceToDevice) return emu_fail(cudaErrorStreamCaptureUnsupported);
  emu_enqueue([=] { memcpy(d, s, n); });
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, size_t n) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing()) return emu_fail(cudaErrorStreamCaptureUnsupported);
  memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) {
  if (emu_lost()) return emu_fail(emu_context_error);
  emu_enqueue([=] { memset(d, v, n); });
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  if (emu_lost()) return emu_fail(emu_context_error);
  return emu_capturing() ? emu_fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaDeviceSynchronize(); }
inline cudaError_t cudaGetLastError() {
  if (emu_lost()) return emu_context_error;
  const cudaError_t e = emu_last_error;
  emu_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu_lost() ? emu_context_error : emu_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorMemoryAllocation ? "out of memory" : e == cudaErrorInvalidValue ? "invalid argument"
       : e == cudaErrorLaunchFailure ? "unspecified launch failure" : e == cudaErrorIllegalAddress ? "an illegal memory access was encountered"
       : e == cudaErrorNoKernelImageForDevice ? "no kernel image is available for execution on the device"
       : e == cudaErrorUnsupportedPtxVersion ? "the provided PTX was compiled with an unsupported toolchain." : "emulated";
}
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation" : e == cudaErrorInvalidValue ? "cudaErrorInvalidValue"
       : e == cudaErrorLaunchFailure ? "cudaErrorLaunchFailure" : e == cudaErrorIllegalAddress ? "cudaErrorIllegalAddress"
       : e == cudaErrorNoKernelImageForDevice ? "cudaErrorNoKernelImageForDevice"
       : e == cudaErrorUnsupportedPtxVersion ? "cudaErrorUnsupportedPtxVersion" : "emulated";
}
// A kernel's dynamic shared memory over 48 KiB needs its own attribute, up to the GPU's opt-in
// limit (an H100's and H200's: 227 KiB); the key is the kernel's address (EmuKernel::key).
cudaError_t emu_set_max_smem(const void* key, int bytes);
template <class F> cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int v) { return emu_set_max_smem((const void*)f, v); }
void __syncthreads();
float __shfl_xor_sync(unsigned, float, int);
double __shfl_xor_sync(unsigned, double, int);
int __shfl_xor_sync(unsigned, int, int);
float __shfl_sync(unsigned, float, int);
// Fibers switch only at barriers and shuffles, so an atomic is a plain read-modify-write.
inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
using std::max;
using std::min;
// A launch names its kernel (for the emulation's messages), its address (the key of its
// shared-memory attribute; null when translate.py cannot take it) and its __launch_bounds__ (0:
// none known); translate.py writes them.
// dependent: launched with launch_dependent (cuda/launch.cuh), whose every thread must call
// grid_dependency_wait (emu_grid_dependency_wait) before it ends.
struct EmuKernel {
  const char* name;
  const void* key;
  int bounds;
  bool dependent = false;
};
void emu_grid_dependency_wait();
void emu_launch(dim3 grid, dim3 block, size_t smem, EmuKernel kernel, std::function<void()> body);
// Poisons a static __shared__ variable once per block (translate.py calls it after each one's
// declaration; the first thread of a block to get there poisons it, the rest leave it).
void emu_poison_shared(void* p, size_t bytes);
extern unsigned char* emu_smem;
enum { cudaStreamNonBlocking = 1 };
// One device, named for what it is, with an H100's or H200's compute capability (9.0) unless
// RF_EMU_DEVICE (for example 8.6) or emu_set_device names another: its opt-in shared memory per
// block follows (227 KiB on 9.0 and 10.0, 163 KiB on 8.0 and 8.7, 99 KiB on 8.6, 8.9 and 12.x),
// and so does which code of the emulated build it runs (emu_architectures).
struct EmuDevice { int major, minor; };
EmuDevice emu_device();
void emu_set_device(int major, int minor);
// The GPU architectures the emulated build holds, as CMake names them ("80-real,90", the default
// of a build without a GPU; RF_EMU_ARCHITECTURES or emu_set_architectures names others): a kernel
// runs on the device when one of them does, as the CUDA runtime decides (emu_image_runs).
const char* emu_architectures();
void emu_set_architectures(const char* archs);
// The runtime's rule: a cubin (N, N-real, Na) runs on the same major at the same or a later minor
// (an "a" cubin on its own minor only); PTX (N, N-virtual; not Na's) on any device at least as new.
bool emu_image_runs(const char* archs, int major, int minor);
// Whether a cubin of archs runs there (PTX aside): a device that only the PTX serves needs the
// driver to compile it, which a driver older than the toolkit that wrote it cannot do.
bool emu_image_cubin(const char* archs, int major, int minor);
// The CUDA runtime's and the driver's versions (1000 * major + 10 * minor; both 13.0 unless set):
// a driver older than the runtime (the same major: CUDA's minor version compatibility) runs its
// cubins but not its PTX, whose launches fail with cudaErrorUnsupportedPtxVersion.
void emu_set_versions(int runtime, int driver);
int emu_runtime_version();
int emu_driver_version();
// What a launch on the emulated device gets from the build's code: cudaSuccess,
// cudaErrorNoKernelImageForDevice (no code for it) or cudaErrorUnsupportedPtxVersion (PTX only,
// and a driver too old to compile it).
cudaError_t emu_image_error();
size_t emu_opt_in_smem();
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  size_t totalGlobalMem;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  *p = cudaDeviceProp{};
  strcpy(p->name, "emulated on the CPU");
  p->major = emu_device().major, p->minor = emu_device().minor;
  p->totalGlobalMem = emu_device_memory();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor, cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin
};
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 132  // an H100's or H200's SMs
     : a == cudaDevAttrComputeCapabilityMajor ? emu_device().major
     : a == cudaDevAttrComputeCapabilityMinor ? emu_device().minor : int(emu_opt_in_smem());
  return cudaSuccess;
}
// A kernel's attributes: only whether the device runs it (emu_image_error) and its binary's version.
struct cudaFuncAttributes { int binaryVersion, ptxVersion; };
inline cudaError_t emu_func_attributes(cudaFuncAttributes* a) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (const cudaError_t e = emu_image_error(); e != cudaSuccess) return emu_fail(e);
  *a = cudaFuncAttributes{10 * emu_device().major + emu_device().minor, 10 * emu_device().major + emu_device().minor};
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) { return emu_func_attributes(a); }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = emu_runtime_version(); return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = emu_driver_version(); return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, int) { *s = (void*)1; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemset2DAsync(void* d, size_t pitch, int v, size_t w, size_t h, cudaStream_t) {
  if (emu_lost()) return emu_fail(emu_context_error);
  emu_enqueue([=] {
    for (size_t r = 0; r < h; ++r) memset(static_cast<char*>(d) + r * pitch, v, w);
  });
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h, cudaMemcpyKind kind, cudaStream_t) {
  if (emu_lost()) return emu_fail(emu_context_error);
  if (emu_capturing() && kind != cudaMemcpyDeviceToDevice) return emu_fail(cudaErrorStreamCaptureUnsupported);
  emu_enqueue([=] {
    for (size_t r = 0; r < h; ++r) memcpy((char*)d + r * dp, (const char*)s + r * sp, w);
  });
  return cudaSuccess;
}
// Events: the host's clock when recorded (the emulation runs each call's work as it is queued).
struct EmuEvent { double ms = 0; };
typedef EmuEvent* cudaEvent_t;
double emu_now_ms();
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new EmuEvent; return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) { e->ms = emu_now_ms(); return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) { *ms = float(b->ms - a->ms); return cudaSuccess; }
size_t emu_allocated();
inline cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total) {
  if (emu_lost()) return emu_fail(emu_context_error);
  *total = emu_device_memory();
  *free_b = *total > emu_allocated() ? *total - emu_allocated() : 0;
  return cudaSuccess;
}
using std::isfinite; using std::isnan;
// mma.sync.m16n8k16 bf16 -> f32 (cuda/mma.h): every lane of the warp passes its fragments; the
// product is formed from all 32 lanes' registers by the PTX fragment layout.
void emu_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
