// Plain-loop stand-in for cuda/gemm (cuBLASLt) under the CPU emulation (see emu.cpp).

#include "cuda/gemm.h"
#include <stdexcept>
#include <vector>
namespace rf::cuda {
struct GemmContext::Impl { GemmStats stats; };
GemmContext::GemmContext(size_t) : impl_(std::make_unique<Impl>()) {}
GemmContext::~GemmContext() = default;
const GemmStats& GemmContext::stats() const { return impl_->stats; }
static float load(const void* p, DType t, long i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
// Each product is queued like a kernel (emu_enqueue: run now, or recorded into a graph's capture).
void matmul(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, const float* bias, float beta, cudaStream_t) {
  if (xt != wt) throw std::runtime_error("matmul: mixed types");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += load(x, xt, long(m) * K + k) * load(w, wt, long(n) * K + k);
      float v = acc + (bias ? bias[n] : 0.f);
      if (beta != 0.f) v += beta * y[long(m) * N + n];
      y[long(m) * N + n] = v;
    }
  });
}
void matmul_nn(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, float beta, cudaStream_t) {
  if (xt != wt) throw std::runtime_error("matmul_nn: mixed types");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += load(x, xt, long(m) * K + k) * load(w, wt, long(k) * N + n);
      y[long(m) * N + n] = acc + (beta != 0.f ? beta * y[long(m) * N + n] : 0.f);
    }
  });
}
void matmul_tn(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, float alpha, float beta, cudaStream_t) {
  if (xt != wt) throw std::runtime_error("matmul_tn: mixed types");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += load(x, xt, long(k) * M + m) * load(w, wt, long(k) * N + n);
      y[long(m) * N + n] = alpha * acc + (beta != 0.f ? beta * y[long(m) * N + n] : 0.f);
    }
  });
}
void f32_to_bf16(__nv_bfloat16* out, const float* in, long n, cudaStream_t) {
  emu_enqueue([=] {
    for (long i = 0; i < n; ++i) { __nv_bfloat16_raw r; r.x = rf::f32_to_bf16(in[i]); out[i] = __nv_bfloat16(r); }
  });
}
}  // namespace rf::cuda
