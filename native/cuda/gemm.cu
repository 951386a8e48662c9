// y [M, N] = x [M, K] . W^T (+ bias) (+ beta * y) through cuBLASLt (see gemm.h), and the f32 ->
// bf16 conversion of activations that bf16 weights need.
//
// Row-major onto column-major. cuBLASLt reads every matrix column-major. A row-major [R, C]
// matrix is, byte for byte, the column-major [C, R] matrix (its transpose) with leading
// dimension C. So our three buffers are, as cuBLASLt sees them:
//   x row-major [M, K]  = x^T column-major [K, M], ld K
//   W row-major [N, K]  = W^T column-major [K, N], ld K
//   y row-major [M, N]  = y^T column-major [N, M], ld N
// and y = x W^T is the same statement as y^T = W x^T: a column-major product
//   D (N x M) = op(A) (N x K) . op(B) (K x M)
// with A = the stored W^T [K, N] and TRANSA = T (op(A) = W, N x K), B = the stored x^T [K, M]
// and TRANSB = N (op(B) = x^T, K x M), C = D = the stored y^T [N, M] (in place; beta scales it).
// Layout descriptors describe matrices as stored (before op): A is K x N, B is K x M, D is N x M.
// In cuBLASLt's terms m = N, n = M, k = K. This "TN" form is also the one Hopper's tensor-core
// kernels prefer (both operands K-contiguous). matmul_nn's w is row-major [K, N], i.e. w^T
// column-major [N, K] with ld N: A = that with TRANSA = N, and D = w^T x^T = (x w)^T.
// matmul_tn's x is row-major [K, M], i.e. x^T column-major [M, K] with ld M: B = that with
// TRANSB = T (op(B) = x, K x M), A = w^T [N, K] as in matmul_nn, and D = w^T x = (x^T w)^T.
//
// Bias. CUBLASLT_EPILOGUE_BIAS adds a vector with one element per row of D, broadcast over D's
// columns: rows of D are our output features n, so bias [N] is exactly nn.Linear's bias. Its
// element type defaults to D's (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE unset: f32 here, for f32 and
// for bf16 inputs alike, which cuBLASLt allows for non-FP8 products), and it is added after
// alpha * A B + beta * C, so the fused result is the one we want. Two cases go to our own
// bias-add kernel instead, after the product: a bias pointer not 16-byte aligned (the epilogue
// reads the vector in 16-byte pieces, and no preference attribute lets the heuristic know about
// a smaller alignment), and a shape/type for which the heuristic offers no algorithm with the
// epilogue (then the plan is made without it). GemmStats::bias_kernel counts those calls.
//
// Precision. Compute type CUBLAS_COMPUTE_32F with scale type f32 for both pairs: f32 inputs are
// multiplied and summed in f32 (no TF32: that needs CUBLAS_COMPUTE_32F_FAST_TF32, never asked
// for here), bf16 inputs are multiplied exactly and summed in f32 on the tensor cores.
//
// Plans. Per (M, N, K, types, alignment of x / W / y, bias mode) one matmul descriptor, three
// layouts and the heuristic's first algorithm, kept until the context dies. The heuristic is
// told the workspace size and the pointers' real alignments (its default assumes 256-byte
// aligned buffers, and an algorithm chosen for those may refuse a view into a fused buffer).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/bf16.h"
#include "cuda/error.h"
#include "cuda/gemm.h"
#include "cuda/memory.h"

namespace rf::cuda {

namespace {

const char* lt_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "unknown cublasStatus_t";
  }
}

void check_lt(cublasStatus_t s, const char* call) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  // A product that failed because the context is lost (an earlier kernel faulted): say that.
  const cudaError_t e = cudaPeekAtLastError();
  if (error_is_sticky(e)) throw_cuda_error(e, call);
  throw std::runtime_error(std::string(call) + " failed: " + lt_status_name(s) + " (" + std::to_string(int(s)) + ")");
}

const char* dtype_name(DType t) { return t == DType::bf16 ? "bf16" : "f32"; }

cudaDataType_t cuda_type(DType t) { return t == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

// The largest power of two, at most 256, that divides the address (cuBLASLt's alignment unit).
uint32_t pointer_alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && (a & (align - 1)) != 0) align >>= 1;
  return align;
}

int blocks_for(long n, int threads) {
  const long b = (n + threads - 1) / threads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

__global__ void f32_to_bf16_kernel(__nv_bfloat16* out, const float* in, long n) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) out[i] = bf16_round(in[i]);
}

// y [rows, n] (rows ld apart) = (beta == 0 ? 0 : beta * c) + bias [n] (bias may be null; c has
// y's strides, and may be y). With beta 1 and c = y it is the bias-add after a product whose bias
// the epilogue could not take; with K == 0 it is the whole product. beta == 0 does not read c, as
// cuBLASLt does not.
__global__ void scale_add_bias_kernel(float* y, const float* c, const float* bias, float beta, int n, long ld, long total) {
  for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += long(gridDim.x) * blockDim.x) {
    const long at = i / n * ld + i % n;
    float v = beta == 0.f ? 0.f : beta * c[at];
    if (bias) v += bias[i % n];
    y[at] = v;
  }
}

void scale_add_bias(float* y, const float* bias, float beta, int rows, int n, long ld, cudaStream_t stream,
                    const float* c = nullptr) {
  const long total = long(rows) * n;
  scale_add_bias_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(y, c ? c : y, bias, beta, n, ld, total);
  check(cudaGetLastError(), "scale_add_bias_kernel launch");
}

// One chosen product: its descriptors (destroyed with it) and algorithm.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;  // W^T [K, N], x^T [K, M], y^T [N, M]
  cublasLtMatmulAlgo_t algo{};
  bool fused_bias = false;  // the epilogue adds the bias

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {  // statuses ignored: nothing to do about them while tearing down
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// A preference object that destroys itself (it is needed only while choosing).
struct Preference {
  cublasLtMatmulPreference_t p = nullptr;
  Preference() { check_lt(cublasLtMatmulPreferenceCreate(&p), "cublasLtMatmulPreferenceCreate"); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(p); }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  template <class T>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const T& v, const char* what) {
    check_lt(cublasLtMatmulPreferenceSetAttribute(p, attr, &v, sizeof(v)), what);
  }
};

template <class T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& v, const char* what) {
  check_lt(cublasLtMatmulDescSetAttribute(desc, attr, &v, sizeof(v)), what);
}

enum BiasMode { kNoBias = 0, kBiasEpilogue = 1, kBiasKernel = 2 };

// Which product: y = x w^T (matmul), x w (matmul_nn) or x^T w (matmul_tn).
enum Form { kXWt = 0, kXW = 1, kXtW = 2 };

// M, N, K, x type, w type, y type, alignments of x, w, y, bias mode, form, leading dimensions of x, w, y.
using PlanKey = std::tuple<int, int, int, int, int, int, uint32_t, uint32_t, uint32_t, int, int, long, long, long>;

// The leading dimensions (row strides) of x, w and y: the given ones, 0 replaced by the dense
// row lengths; one shorter than its row throws.
Strides leading_dims(const char* name, Form form, int M, int N, int K, Strides s) {
  const long dense_x = form == kXtW ? M : K, dense_w = form == kXWt ? K : N, dense_y = N;
  auto pick = [&](long given, long dense, const char* which) {
    if (given == 0) return dense;
    if (given < dense)
      throw std::runtime_error(std::string("rf::cuda::") + name + ": " + which + "'s row stride " + std::to_string(given) +
                               " is shorter than its rows (" + std::to_string(dense) + ")");
    return given;
  };
  return {pick(s.x, dense_x, "x"), pick(s.w, dense_w, "w"), pick(s.y, dense_y, "y")};
}

}  // namespace

struct GemmContext::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
  GemmStats stats;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    plans.clear();
    device_free(workspace, workspace_bytes);  // cudaFree waits for the device, so no queued product still uses it
    if (handle) cublasLtDestroy(handle);
  }

  std::unique_ptr<Plan> make_plan(int M, int N, int K, DType type, DType y_type, uint32_t align_x, uint32_t align_w,
                                  uint32_t align_y, const float* bias, BiasMode mode, Form form, Strides ld);
  // The plan for this key, made on first use; ld: leading_dims' result; y_type: y's (f32, or bf16
  // for matmul_bf16).
  Plan& plan(int M, int N, int K, DType type, const void* x, const void* w, const void* y, const float* bias, BiasMode mode,
             Form form, Strides ld, DType y_type = DType::f32, const void* c = nullptr);
};

std::unique_ptr<Plan> GemmContext::Impl::make_plan(int M, int N, int K, DType type, DType y_type, uint32_t align_x,
                                                   uint32_t align_w, uint32_t align_y, const float* bias, BiasMode mode,
                                                   Form form, Strides ld) {
  auto plan = std::make_unique<Plan>();
  // f32 sums for both input types; alpha and beta are host f32 (the default pointer mode).
  check_lt(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  // matmul_nn, matmul_tn: w row-major [K, N] is column-major [N, K] with ld N, already op(A)
  // (TRANSA = N). matmul_tn: x row-major [K, M] is column-major [M, K] with ld M, op(B) = its
  // transpose (TRANSB = T).
  const bool trans_w = form == kXWt;
  const cublasOperation_t trans_a = trans_w ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b = form == kXtW ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, trans_a, "cublasLtMatmulDescSetAttribute(TRANSA)");
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, trans_b, "cublasLtMatmulDescSetAttribute(TRANSB)");
  // As stored, column-major (see the top of this file): A = W^T [K, N], B = x^T [K, M], C = D = y^T [N, M].
  // A row-major operand's row stride is its column-major leading dimension.
  if (trans_w)
    check_lt(cublasLtMatrixLayoutCreate(&plan->a, cuda_type(type), uint64_t(K), uint64_t(N), int64_t(ld.w)),
             "cublasLtMatrixLayoutCreate(A = W)");
  else
    check_lt(cublasLtMatrixLayoutCreate(&plan->a, cuda_type(type), uint64_t(N), uint64_t(K), int64_t(ld.w)),
             "cublasLtMatrixLayoutCreate(A = w)");
  if (form == kXtW)
    check_lt(cublasLtMatrixLayoutCreate(&plan->b, cuda_type(type), uint64_t(M), uint64_t(K), int64_t(ld.x)),
             "cublasLtMatrixLayoutCreate(B = x^T)");
  else
    check_lt(cublasLtMatrixLayoutCreate(&plan->b, cuda_type(type), uint64_t(K), uint64_t(M), int64_t(ld.x)),
             "cublasLtMatrixLayoutCreate(B = x)");
  check_lt(cublasLtMatrixLayoutCreate(&plan->d, cuda_type(y_type), uint64_t(N), uint64_t(M), int64_t(ld.y)),
           "cublasLtMatrixLayoutCreate(C = D = y)");

  Preference pref;
  const uint64_t max_workspace = workspace_bytes;
  pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, max_workspace, "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)");
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)");
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_y, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)");
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y, "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)");

  // With a bias: first with the epilogue; if no algorithm takes it, without (our kernel adds it).
  const bool try_fused[2] = {mode == kBiasEpilogue, false};
  for (int attempt = mode == kBiasEpilogue ? 0 : 1; attempt < 2; ++attempt) {
    const bool fused = try_fused[attempt];
    const cublasLtEpilogue_t epilogue = fused ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, "cublasLtMatmulDescSetAttribute(EPILOGUE)");
    if (fused) {
      const void* bias_ptr = bias;
      set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
    }
    constexpr int kWanted = 4;
    cublasLtMatmulHeuristicResult_t results[kWanted] = {};
    int found = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->d, plan->d, pref.p,
                                                            kWanted, results, &found);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) found = 0;  // "no algorithm for this": try the next form
    else check_lt(s, "cublasLtMatmulAlgoGetHeuristic");
    for (int i = 0; i < found; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes) continue;
      plan->algo = results[i].algo;  // the heuristic lists its best first
      plan->fused_bias = fused;
      return plan;
    }
  }
  static const char* const forms[] = {"x [M, K] . W^T", "x [M, K] . w [K, N]", "x^T (x [K, M]) . w [K, N]"};
  throw std::runtime_error("cublasLtMatmulAlgoGetHeuristic found no algorithm for y [" + std::to_string(M) + ", " +
                           std::to_string(N) + "] = " + forms[form] + " with K " + std::to_string(K) + ", " +
                           dtype_name(type) + " inputs, " + dtype_name(y_type) + " output, alignments x " +
                           std::to_string(align_x) + " / W " +
                           std::to_string(align_w) + " / y " + std::to_string(align_y) + " bytes");
}

Plan& GemmContext::Impl::plan(int M, int N, int K, DType type, const void* x, const void* w, const void* y, const float* bias,
                              BiasMode mode, Form form, Strides ld, DType y_type, const void* c) {
  // C's alignment with D's: the plan is chosen for the lesser (C = D but for matmul's c).
  const uint32_t align_x = pointer_alignment(x), align_w = pointer_alignment(w),
                 align_y = std::min(pointer_alignment(y), c ? pointer_alignment(c) : 256u);
  const PlanKey key{M, N, K, int(type), int(type), int(y_type), align_x, align_w, align_y, int(mode), int(form), ld.x, ld.w, ld.y};
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, make_plan(M, N, K, type, y_type, align_x, align_w, align_y, bias, mode, form, ld)).first;
    ++stats.plans;
  }
  return *it->second;
}

GemmContext::GemmContext(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  // If anything below throws, impl_ is already a complete member and its destructor cleans up.
  check_lt(cublasLtCreate(&impl_->handle), "cublasLtCreate");
  if (workspace_bytes > 0) device_alloc_or_throw(&impl_->workspace, workspace_bytes, "the cuBLASLt workspace");
  impl_->workspace_bytes = workspace_bytes;
}

GemmContext::~GemmContext() = default;

const GemmStats& GemmContext::stats() const { return impl_->stats; }

void matmul(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
            const float* bias, float beta, cudaStream_t stream, Strides strides, const float* c) {
  if (M < 0 || N < 0 || K < 0)
    throw std::runtime_error("rf::cuda::matmul: negative size M " + std::to_string(M) + ", N " + std::to_string(N) + ", K " +
                             std::to_string(K));
  if (x_type != w_type)
    throw std::runtime_error(std::string("rf::cuda::matmul: x ") + dtype_name(x_type) + " with w " + dtype_name(w_type) +
                             " is not supported (both f32, or both bf16: convert activations with rf::cuda::f32_to_bf16)");
  const Strides ld = leading_dims("matmul", kXWt, M, N, K, strides);
  if (M == 0 || N == 0) return;
  GemmContext::Impl& im = *ctx.impl_;
  if (!c) c = y;
  if (K == 0) {  // an empty sum: cuBLASLt does not take k = 0
    scale_add_bias(y, bias, beta, M, N, ld.y, stream, c);
    return;
  }

  const BiasMode mode = !bias ? kNoBias : pointer_alignment(bias) >= 16 ? kBiasEpilogue : kBiasKernel;
  Plan& plan = im.plan(M, N, K, x_type, x, w, y, bias, mode, kXWt, ld, DType::f32, c);
  if (plan.fused_bias) {  // the descriptor keeps the pointer: set this call's
    const void* bias_ptr = bias;
    set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  }
  const float alpha = 1.f;
  // A = W, B = x, C = c (y unless given), D = y (see the top of this file); C and D share a layout.
  check_lt(cublasLtMatmul(im.handle, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, c, plan.d, y, plan.d, &plan.algo,
                          im.workspace, im.workspace_bytes, stream),
           "cublasLtMatmul");
  ++im.stats.calls;
  if (bias && !plan.fused_bias) {
    scale_add_bias(y, bias, 1.f, M, N, ld.y, stream);
    ++im.stats.bias_kernel;
  }
}

void matmul_bf16(GemmContext& ctx, __nv_bfloat16* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N,
                 int K, cudaStream_t stream, Strides strides) {
  if (M < 0 || N < 0 || K < 0)
    throw std::runtime_error("rf::cuda::matmul_bf16: negative size M " + std::to_string(M) + ", N " + std::to_string(N) + ", K " +
                             std::to_string(K));
  if (x_type != DType::bf16 || w_type != DType::bf16)
    throw std::runtime_error(std::string("rf::cuda::matmul_bf16: x ") + dtype_name(x_type) + " with w " + dtype_name(w_type) +
                             " is not supported (both bf16)");
  const Strides ld = leading_dims("matmul_bf16", kXWt, M, N, K, strides);
  if (M == 0 || N == 0) return;
  GemmContext::Impl& im = *ctx.impl_;
  if (K == 0) {  // an empty sum: zeros (bf16 +0 is all zero bits)
    check(cudaMemset2DAsync(y, size_t(ld.y) * sizeof(__nv_bfloat16), 0, size_t(N) * sizeof(__nv_bfloat16), size_t(M), stream),
          "cudaMemset2DAsync (matmul_bf16, K = 0)");
    return;
  }
  Plan& plan = im.plan(M, N, K, x_type, x, w, y, nullptr, kNoBias, kXWt, ld, DType::bf16);
  const float alpha = 1.f, beta = 0.f;
  check_lt(cublasLtMatmul(im.handle, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, y, plan.d, y, plan.d, &plan.algo,
                          im.workspace, im.workspace_bytes, stream),
           "cublasLtMatmul");
  ++im.stats.calls;
}

namespace {

// matmul_nn and matmul_tn: y = alpha op(x) w + beta y, no bias.
void matmul_plain(GemmContext::Impl& im, const char* name, Form form, float* y, const void* x, DType x_type, const void* w,
                  DType w_type, int M, int N, int K, float alpha, float beta, cudaStream_t stream, Strides strides) {
  if (M < 0 || N < 0 || K < 0)
    throw std::runtime_error(std::string("rf::cuda::") + name + ": negative size M " + std::to_string(M) + ", N " +
                             std::to_string(N) + ", K " + std::to_string(K));
  if (x_type != w_type)
    throw std::runtime_error(std::string("rf::cuda::") + name + ": x " + dtype_name(x_type) + " with w " + dtype_name(w_type) +
                             " is not supported (both f32, or both bf16)");
  const Strides ld = leading_dims(name, form, M, N, K, strides);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    scale_add_bias(y, nullptr, beta, M, N, ld.y, stream);
    return;
  }
  Plan& plan = im.plan(M, N, K, x_type, x, w, y, nullptr, kNoBias, form, ld);
  check_lt(cublasLtMatmul(im.handle, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, y, plan.d, y, plan.d, &plan.algo,
                          im.workspace, im.workspace_bytes, stream),
           "cublasLtMatmul");
  ++im.stats.calls;
}

}  // namespace

void matmul_nn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
               float beta, cudaStream_t stream, Strides strides) {
  matmul_plain(*ctx.impl_, "matmul_nn", kXW, y, x, x_type, w, w_type, M, N, K, 1.f, beta, stream, strides);
}

void matmul_tn(GemmContext& ctx, float* y, const void* x, DType x_type, const void* w, DType w_type, int M, int N, int K,
               float alpha, float beta, cudaStream_t stream, Strides strides) {
  matmul_plain(*ctx.impl_, "matmul_tn", kXtW, y, x, x_type, w, w_type, M, N, K, alpha, beta, stream, strides);
}

void f32_to_bf16(__nv_bfloat16* out, const float* in, long n, cudaStream_t stream) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(out, in, n);
  check(cudaGetLastError(), "f32_to_bf16_kernel launch");
}

}  // namespace rf::cuda
