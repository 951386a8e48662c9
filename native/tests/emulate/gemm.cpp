// Plain-loop stand-in for cuda/gemm (cuBLASLt) under the CPU emulation (see emu.cpp).

#include "cuda/gemm.h"
#include <stdexcept>
#include <string>
#include <vector>
namespace rf::cuda {
struct GemmContext::Impl { GemmStats stats; };
GemmContext::GemmContext(size_t) : impl_(std::make_unique<Impl>()) {}
GemmContext::~GemmContext() = default;
const GemmStats& GemmContext::stats() const { return impl_->stats; }
static float load(const void* p, DType t, long i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
// The leading dimensions as gemm.cu's leading_dims: 0 is dense, a shorter one throws.
static long ld_or(long given, long dense, const char* name) {
  if (given != 0 && given < dense) throw std::runtime_error(std::string(name) + ": row stride shorter than its rows");
  return given ? given : dense;
}
// Row m of x [M, K] (rows lx apart) dot row n of w [N, K] (rows lw apart), in k order.
static float dot_xwt(const void* x, DType xt, long lx, const void* w, DType wt, long lw, int m, int n, int K) {
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += load(x, xt, m * lx + k) * load(w, wt, n * lw + k);
  return acc;
}
// Each product is queued like a kernel (emu_enqueue: run now, or recorded into a graph's capture).
void matmul(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, const float* bias, float beta, cudaStream_t, Strides s,
            const float* c) {
  if (xt != wt) throw std::runtime_error("matmul: mixed types");
  const long lx = ld_or(s.x, K, "matmul"), lw = ld_or(s.w, K, "matmul"), ly = ld_or(s.y, N, "matmul");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const float acc = dot_xwt(x, xt, lx, w, wt, lw, m, n, K);
      float v = acc + (bias ? bias[n] : 0.f);
      if (beta != 0.f) v += beta * (c ? c : y)[m * ly + n];
      y[m * ly + n] = v;
    }
  });
}
void matmul_bf16(GemmContext&, __nv_bfloat16* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, cudaStream_t, Strides s) {
  if (xt != DType::bf16 || wt != DType::bf16) throw std::runtime_error("matmul_bf16: both bf16");
  const long lx = ld_or(s.x, K, "matmul_bf16"), lw = ld_or(s.w, K, "matmul_bf16"), ly = ld_or(s.y, N, "matmul_bf16");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      __nv_bfloat16_raw r;
      r.x = rf::f32_to_bf16(dot_xwt(x, xt, lx, w, wt, lw, m, n, K));
      y[m * ly + n] = __nv_bfloat16(r);
    }
  });
}
void matmul_nn(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, float beta, cudaStream_t, Strides s) {
  if (xt != wt) throw std::runtime_error("matmul_nn: mixed types");
  const long lx = ld_or(s.x, K, "matmul_nn"), lw = ld_or(s.w, N, "matmul_nn"), ly = ld_or(s.y, N, "matmul_nn");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += load(x, xt, m * lx + k) * load(w, wt, k * lw + n);
      y[m * ly + n] = acc + (beta != 0.f ? beta * y[m * ly + n] : 0.f);
    }
  });
}
void matmul_tn(GemmContext&, float* y, const void* x, DType xt, const void* w, DType wt, int M, int N, int K, float alpha, float beta, cudaStream_t, Strides s) {
  if (xt != wt) throw std::runtime_error("matmul_tn: mixed types");
  const long lx = ld_or(s.x, M, "matmul_tn"), lw = ld_or(s.w, N, "matmul_tn"), ly = ld_or(s.y, N, "matmul_tn");
  emu_enqueue([=] {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += load(x, xt, k * lx + m) * load(w, wt, k * lw + n);
      y[m * ly + n] = alpha * acc + (beta != 0.f ? beta * y[m * ly + n] : 0.f);
    }
  });
}
void f32_to_bf16(__nv_bfloat16* out, const float* in, long n, cudaStream_t) {
  emu_enqueue([=] {
    for (long i = 0; i < n; ++i) { __nv_bfloat16_raw r; r.x = rf::f32_to_bf16(in[i]); out[i] = __nv_bfloat16(r); }
  });
}
}  // namespace rf::cuda
