// cuBLASLt under the CPU emulation (see emu.cpp): the calls that cuda/gemm.cu makes (declared in
// native/cuda/check/cublasLt.h), with the semantics NVIDIA documents for them, so that gemm.cu
// itself runs in the emulated tests: its row-major-onto-column-major layouts, its plans and their
// cache, the alignments it declares, and its bias-kernel, K = 0 and conversion paths.
//
// What a call computes: D = alpha op(A) op(B) + beta C, plus with CUBLASLT_EPILOGUE_BIAS a vector
// with one element per row of D (in D's type), broadcast over D's columns. Every matrix is
// column-major as its layout describes it as stored (rows x cols, leading dimension ld >= rows);
// op(X) is X, or X^T when the descriptor's TRANSA / TRANSB says CUBLAS_OP_T. f32 products summed
// in f32 (CUBLAS_COMPUTE_32F), in k order; a bf16 D rounded once, to nearest even. beta == 0
// does not read C. alpha and beta (host pointers: the default pointer mode) and the bias pointer
// are read when the call is made, as cuBLASLt reads them into its launch (and so into a graph
// capture); the product itself is queued like a kernel (emu_enqueue).
//
// What it refuses, with the status cuBLASLt documents for it:
//   - CUBLAS_STATUS_NOT_SUPPORTED: a compute or scale type other than 32F, A and B of different
//     types or other than f32 / bf16, C's type not D's, a bf16 D from f32 inputs, an epilogue
//     other than DEFAULT and BIAS;
//   - CUBLAS_STATUS_INVALID_VALUE: an attribute of the wrong size or value, op(A), op(B), C and D
//     whose shapes do not make a product (or an empty one: cuBLASLt's k must be positive), a
//     leading dimension under its rows, a C apart from D that overlaps it (C == D is in place,
//     with one layout), a workspace smaller than the algorithm's, a pointer less aligned than the
//     algorithm was chosen for (the heuristic's MIN_ALIGNMENT preferences, 256 bytes unless set),
//     an algorithm from a heuristic query of another problem, a bias epilogue without a bias
//     pointer or with one under 16 bytes aligned (gemm.cu's rule: the epilogue reads the vector
//     in 16-byte pieces and no preference tells the heuristic of a smaller alignment).
// The heuristic offers one algorithm for every problem it accepts; its workspace is what the
// preference allows, up to 1 MiB, and the product writes over it, so that a workspace freed or
// shared with a product still queued shows up.
// What it cannot show: which problems a real cuBLASLt has no algorithm for (gemm.cu then
// throws, or adds the bias with its own kernel), the real algorithms' summation orders, speed.
#include <cublasLt.h>

#include <cstring>
#include <vector>

#include "core/dtype.h"

struct cublasLtContext {
  int live = 1;
};
struct cublasLtMatmulDescOpaque_st {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  int32_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};
struct cublasLtMatrixLayoutOpaque_st {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};
struct cublasLtMatmulPreferenceOpaque_st {
  uint64_t max_workspace = 0;                     // the documented default
  uint32_t align[4] = {256, 256, 256, 256};       // A, B, C, D: the documented default
};

namespace {

constexpr uint64_t kAlgoMagic = 0x656d754c74616c67ull;  // marks an algorithm this emulation's heuristic made
constexpr uint64_t kMaxWorkspace = uint64_t(1) << 20;

// The product one call describes: op(A) m x k, op(B) k x n, C = D m x n.
struct Problem {
  uint64_t m = 0, n = 0, k = 0;
  bool ta = false, tb = false;
  cudaDataType_t ab = CUDA_R_32F, cd = CUDA_R_32F;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  // What an algorithm remembers of the problem it was chosen for.
  uint64_t fingerprint() const {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t v : {m, n, k, uint64_t(ta), uint64_t(tb), uint64_t(ab), uint64_t(cd), uint64_t(epilogue)})
      h = (h ^ v) * 1099511628211ull;
    return h;
  }
};

size_t type_bytes(cudaDataType_t t) { return t == CUDA_R_16BF ? 2 : 4; }

bool known_type(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16BF; }

cublasStatus_t describe(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                        cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, Problem* p) {
  if (!desc || !a || !b || !c || !d) return CUBLAS_STATUS_INVALID_VALUE;
  if (desc->compute != CUBLAS_COMPUTE_32F || desc->scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (a->type != b->type || !known_type(a->type) || c->type != d->type || !known_type(d->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (a->type == CUDA_R_32F && d->type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (desc->epilogue != CUBLASLT_EPILOGUE_DEFAULT && desc->epilogue != CUBLASLT_EPILOGUE_BIAS) return CUBLAS_STATUS_NOT_SUPPORTED;
  for (cublasLtMatrixLayout_t l : {a, b, c, d})
    if (l->ld < int64_t(std::max<uint64_t>(1, l->rows))) return CUBLAS_STATUS_INVALID_VALUE;
  p->ta = desc->trans_a == CUBLAS_OP_T, p->tb = desc->trans_b == CUBLAS_OP_T;
  p->m = p->ta ? a->cols : a->rows;
  p->k = p->ta ? a->rows : a->cols;
  const uint64_t kb = p->tb ? b->cols : b->rows;
  p->n = p->tb ? b->rows : b->cols;
  if (kb != p->k || c->rows != p->m || c->cols != p->n || d->rows != p->m || d->cols != p->n) return CUBLAS_STATUS_INVALID_VALUE;
  if (p->m == 0 || p->n == 0 || p->k == 0) return CUBLAS_STATUS_INVALID_VALUE;
  p->ab = a->type, p->cd = d->type, p->epilogue = desc->epilogue;
  return CUBLAS_STATUS_SUCCESS;
}

template <class T>
cublasStatus_t set_from(T* field, const void* buf, size_t size) {
  if (!buf || size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

bool aligned(const void* p, uint64_t to) { return to == 0 || reinterpret_cast<uintptr_t>(p) % to == 0; }

float load(const void* p, cudaDataType_t t, uint64_t i) {
  return t == CUDA_R_16BF ? rf::bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// The bytes a column-major matrix spans: from its first element to one past its last.
uint64_t span_bytes(cublasLtMatrixLayout_t l) { return ((l->cols - 1) * uint64_t(l->ld) + l->rows) * type_bytes(l->type); }

}  // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute_type, cudaDataType_t scale_type) {
  if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
  *desc = new cublasLtMatmulDescOpaque_st{compute_type, scale_type};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete desc;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t size) {
  if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB: {
      int32_t op;
      if (set_from(&op, buf, size) != CUBLAS_STATUS_SUCCESS || (op != CUBLAS_OP_N && op != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
      (attr == CUBLASLT_MATMUL_DESC_TRANSA ? desc->trans_a : desc->trans_b) = op;
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set_from(&desc->epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_from(&desc->bias, buf, size);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
  if (!layout) return CUBLAS_STATUS_INVALID_VALUE;
  *layout = new cublasLtMatrixLayoutOpaque_st{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete layout;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
  *pref = new cublasLtMatmulPreferenceOpaque_st;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete pref;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t size) {
  if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set_from(&pref->max_workspace, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return set_from(&pref->align[0], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return set_from(&pref->align[1], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return set_from(&pref->align[2], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return set_from(&pref->align[3], buf, size);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_desc,
                                              cublasLtMatrixLayout_t b_desc, cublasLtMatrixLayout_t c_desc,
                                              cublasLtMatrixLayout_t d_desc, cublasLtMatmulPreference_t pref, int requested_count,
                                              cublasLtMatmulHeuristicResult_t results[], int* returned_count) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!pref || requested_count < 1 || !results || !returned_count) return CUBLAS_STATUS_INVALID_VALUE;
  Problem p;
  const cublasStatus_t s = describe(desc, a_desc, b_desc, c_desc, d_desc, &p);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  cublasLtMatmulHeuristicResult_t r{};
  r.algo.data[0] = kAlgoMagic;
  r.algo.data[1] = p.fingerprint();
  for (int i = 0; i < 4; ++i) r.algo.data[2 + i] = pref->align[i];
  r.workspaceSize = size_t(std::min(pref->max_workspace, kMaxWorkspace));
  r.algo.data[6] = r.workspaceSize;
  r.state = CUBLAS_STATUS_SUCCESS;
  r.wavesCount = 1.f;
  results[0] = r;
  *returned_count = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha, const void* a,
                              cublasLtMatrixLayout_t a_desc, const void* b, cublasLtMatrixLayout_t b_desc, const void* beta,
                              const void* c, cublasLtMatrixLayout_t c_desc, void* d, cublasLtMatrixLayout_t d_desc,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_size, cudaStream_t) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (emu_lost()) return CUBLAS_STATUS_EXECUTION_FAILED;
  Problem p;
  const cublasStatus_t s = describe(desc, a_desc, b_desc, c_desc, d_desc, &p);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (!alpha || !beta || !a || !b || !d) return CUBLAS_STATUS_INVALID_VALUE;
  // No algorithm: the implicit query with the default preferences (256-byte alignment, no workspace).
  uint64_t need_align[4] = {256, 256, 256, 256}, need_workspace = 0;
  if (algo) {
    if (algo->data[0] != kAlgoMagic || algo->data[1] != p.fingerprint()) return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < 4; ++i) need_align[i] = algo->data[2 + i];
    need_workspace = algo->data[6];
  }
  const float alpha_v = *static_cast<const float*>(alpha), beta_v = *static_cast<const float*>(beta);
  if (beta_v != 0.f && !c) return CUBLAS_STATUS_INVALID_VALUE;
  const void* ptrs[4] = {a, b, c ? c : d, d};
  const cudaDataType_t types[4] = {p.ab, p.ab, p.cd, p.cd};
  for (int i = 0; i < 4; ++i)
    if (!aligned(ptrs[i], need_align[i]) || !aligned(ptrs[i], type_bytes(types[i]))) return CUBLAS_STATUS_INVALID_VALUE;
  if (c && c != d) {
    const uintptr_t c0 = reinterpret_cast<uintptr_t>(c), d0 = reinterpret_cast<uintptr_t>(d);
    if (c0 < d0 + span_bytes(d_desc) && d0 < c0 + span_bytes(c_desc)) return CUBLAS_STATUS_INVALID_VALUE;
  } else if (c == d && (c_desc->type != d_desc->type || c_desc->rows != d_desc->rows || c_desc->cols != d_desc->cols ||
                        c_desc->ld != d_desc->ld)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (workspace_size < need_workspace || (need_workspace > 0 && !workspace)) return CUBLAS_STATUS_INVALID_VALUE;
  const void* bias = desc->epilogue == CUBLASLT_EPILOGUE_BIAS ? desc->bias : nullptr;
  if (desc->epilogue == CUBLASLT_EPILOGUE_BIAS && (!bias || !aligned(bias, 16))) return CUBLAS_STATUS_INVALID_VALUE;

  const cublasLtMatrixLayoutOpaque_st la = *a_desc, lb = *b_desc, lc = *c_desc, ld = *d_desc;
  const void* cp = c ? c : d;
  emu_enqueue([=] {
    if (need_workspace) std::memset(workspace, 0xa5, need_workspace);
    const uint64_t m = p.m, n = p.n, k = p.k;
    // op(A) as m rows of k and op(B) as n columns of k, widened to f32, so that the sums below
    // read both contiguously.
    std::vector<float> ar(m * k), bc(n * k);
    for (uint64_t i = 0; i < m; ++i)
      for (uint64_t kk = 0; kk < k; ++kk) ar[i * k + kk] = load(a, la.type, p.ta ? i * la.ld + kk : kk * la.ld + i);
    for (uint64_t j = 0; j < n; ++j)
      for (uint64_t kk = 0; kk < k; ++kk) bc[j * k + kk] = load(b, lb.type, p.tb ? kk * lb.ld + j : j * lb.ld + kk);
    for (uint64_t j = 0; j < n; ++j)
      for (uint64_t i = 0; i < m; ++i) {
        float acc = 0.f;
        const float* x = &ar[i * k];
        const float* y = &bc[j * k];
        for (uint64_t kk = 0; kk < k; ++kk) acc += x[kk] * y[kk];
        float v = alpha_v * acc;
        if (beta_v != 0.f) v += beta_v * load(cp, lc.type, j * lc.ld + i);
        if (bias) v += load(bias, ld.type, i);
        if (ld.type == CUDA_R_16BF) static_cast<uint16_t*>(d)[j * ld.ld + i] = rf::f32_to_bf16(v);
        else static_cast<float*>(d)[j * ld.ld + i] = v;
      }
  });
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
