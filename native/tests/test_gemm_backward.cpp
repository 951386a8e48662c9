// kernels/gemm_backward.h against naive float64 products, on both instruction-set paths
// (ctest also runs it with REDFLAG_ISA=avx2) and on pools of 1 and 2 threads.
//
// Tolerance, per output element: |got - want| <= 1e-5 * (sum_k |a_k b_k| + |C_before|), the
// scale of an f32 dot product's rounding (the worst case is K u, ~1e-5 for K = 100..576 once
// a typical sqrt(K) is taken; an indexing or transposition bug is off by O(1)).
// bf16 weights: the reference multiplies the bf16-rounded W and, on the AVX-512 path whose
// vdpbf16ps takes bf16 activations, the bf16-rounded dY; accumulation is f32 in both.
//
// Operands are stored with row strides larger than their rows and the gaps hold NaN, so an
// element read past a row poisons the result; the gaps of C hold a sentinel that must survive.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/dtype.h"
#include "core/threadpool.h"
#include "kernels/gemm.h"
#include "kernels/gemm_backward.h"
#include "tests/check.h"

using rf::test::check;

namespace {

std::mt19937 rng(99);
const float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kSentinel = -7777.f;
constexpr double kTol = 1e-5;

// rows x cols values in [-1, 1) with row stride ld >= cols; the gaps are NaN.
std::vector<float> matrix_random(int rows, int cols, long ld) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> m(size_t(rows) * ld, kNaN);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m[r * ld + c] = u(rng);
  return m;
}

std::string shape_name(const char* op, int M, int N, int K, int threads, bool acc) {
  return std::string(op) + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
         " threads=" + std::to_string(threads) + (acc ? " accumulate" : "");
}

std::string fmt(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g", x);
  return b;
}

enum class Op { nt, nn, tn };

// C [M, N] (+)= op(A) . op(B) in float64. Element accessors per op:
//   nt: A [M, K] (lda), B [N, K] (ldb);  nn: A [M, K], B [K, N];  tn: A [K, M], B [K, N].
struct Product {
  std::vector<double> value, absdot;
};

Product product_ref(Op op, int M, int N, int K, const float* A, long lda, const float* B, long ldb) {
  Product p;
  p.value.assign(size_t(M) * N, 0.0);
  p.absdot.assign(size_t(M) * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0, a_s = 0;
      for (int k = 0; k < K; ++k) {
        const double a = op == Op::tn ? A[k * lda + m] : A[m * lda + k];
        const double b = op == Op::nt ? B[n * ldb + k] : B[k * ldb + n];
        s += a * b;
        a_s += std::fabs(a * b);
      }
      p.value[m * N + n] = s;
      p.absdot[m * N + n] = a_s;
    }
  return p;
}

// Checks C [M, ldc] against before + ref (or ref) and that the gaps of C kept the sentinel.
void result_check(const std::string& what, const std::vector<float>& C, const std::vector<float>& before, long ldc,
                  int M, int N, const Product& ref, bool acc) {
  double worst = 0;
  bool gaps_ok = true;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      const double c0 = acc ? before[m * ldc + n] : 0.0;
      const double want = c0 + ref.value[m * N + n];
      const double err = std::fabs(C[m * ldc + n] - want) / (ref.absdot[m * N + n] + std::fabs(c0) + 1e-30);
      worst = std::isnan(err) ? INFINITY : std::fmax(worst, err);
    }
    for (long n = N; n < ldc; ++n) gaps_ok = gaps_ok && C[m * ldc + n] == kSentinel;
  }
  check(worst <= kTol, what + ": worst error " + fmt(worst));
  check(gaps_ok, what + ": C outside [M, N] untouched");
}

void test_gemm_f32(Op op, rf::ThreadPool& pool, int M, int N, int K, bool acc, int pad) {
  const char* name = op == Op::nt ? "gemm_nt_f32" : op == Op::nn ? "gemm_nn_f32" : "gemm_tn_f32";
  // Stored shapes of A and B for this op.
  const int a_rows = op == Op::tn ? K : M, a_cols = op == Op::tn ? M : K;
  const int b_rows = op == Op::nt ? N : K, b_cols = op == Op::nt ? K : N;
  const long lda = a_cols + pad, ldb = b_cols + 2 * pad, ldc = N + pad;
  std::vector<float> A = matrix_random(a_rows, a_cols, lda), B = matrix_random(b_rows, b_cols, ldb);
  std::vector<float> C = matrix_random(M, N, ldc);
  for (int m = 0; m < M; ++m)
    for (long n = N; n < ldc; ++n) C[m * ldc + n] = kSentinel;
  if (!acc)  // C is output only: NaN there must be overwritten, not added to
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) C[m * ldc + n] = kNaN;
  const std::vector<float> before = C;
  if (op == Op::nt) rf::gemm_nt_f32(pool, M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, acc);
  if (op == Op::nn) rf::gemm_nn_f32(pool, M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, acc);
  if (op == Op::tn) rf::gemm_tn_f32(pool, M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, acc);
  const Product ref = product_ref(op, M, N, K, A.data(), lda, B.data(), ldb);
  result_check(shape_name(name, M, N, K, pool.size(), acc) + " pad=" + std::to_string(pad), C, before, ldc, M, N,
               ref, acc);
}

// pack_weight_transposed: bytes identical to packing W^T directly, and gemm through it gives
// dX = dY . W.
void test_transposed(rf::DType dt, rf::ThreadPool& pool, int N, int K, const std::vector<int>& Ms) {
  const bool bf16 = dt == rf::DType::bf16;
  const std::string tag = std::string("pack_weight_transposed ") + (bf16 ? "bf16" : "f32") +
                          " N=" + std::to_string(N) + " K=" + std::to_string(K);
  std::vector<float> W = matrix_random(N, K, K);  // [N, K]
  rf::PackedWeight packed, transposed, direct;
  rf::pack_weight(packed, W.data(), rf::SrcType::f32, N, K, false, dt);
  rf::pack_weight_transposed(transposed, packed);
  // W^T [K, N] is W [N, K] read as [K', N'] = [N, K] with src_is_kn.
  rf::pack_weight(direct, W.data(), rf::SrcType::f32, K, N, true, dt);
  check(transposed.N == K && transposed.K == N && transposed.dtype == dt && transposed.bytes == direct.bytes,
        tag + ": shape, dtype and size");
  check(transposed.bytes == direct.bytes &&
            std::memcmp(transposed.data.get(), direct.data.get(), direct.bytes) == 0,
        tag + ": bytes equal pack_weight of W^T");

  // The values gemm sees: W rounded to bf16; dY too on the AVX-512 bf16 path.
  const bool round_act = bf16 && rf::active_isa() == rf::Isa::avx512;
  auto as_used = [](float x, bool round) { return round ? rf::bf16_to_f32(rf::f32_to_bf16(x)) : x; };
  std::vector<float> Wr(W.size());
  for (size_t i = 0; i < W.size(); ++i) Wr[i] = as_used(W[i], bf16);
  for (int M : Ms) {
    const bool acc = M % 2 == 1;
    const long ldy = N + 3, ldx = K + 1;
    std::vector<float> dY = matrix_random(M, N, ldy), dX = matrix_random(M, K, ldx);
    for (int m = 0; m < M; ++m) dX[m * ldx + K] = kSentinel;
    const std::vector<float> before = dX;
    rf::gemm(pool, M, dY.data(), ldy, transposed, nullptr, dX.data(), ldx, acc);
    std::vector<float> dYr(dY.size());
    for (size_t i = 0; i < dY.size(); ++i) dYr[i] = as_used(dY[i], round_act);
    // dX = dY . W is the nn product with B = W [N, K] (K' = N, N' = K).
    const Product ref = product_ref(Op::nn, M, K, N, dYr.data(), ldy, Wr.data(), K);
    result_check(tag + " gemm M=" + std::to_string(M) + " threads=" + std::to_string(pool.size()) +
                     (acc ? " accumulate" : ""),
                 dX, before, ldx, M, K, ref, acc);
  }
}

}  // namespace

int main() {
  std::printf("test_gemm_backward: isa %s\n", rf::isa_name(rf::active_isa()));
  rf::ThreadPool pool1(1), pool2(2);
  rf::ThreadPool* pools[] = {&pool1, &pool2};
  const Op ops[] = {Op::nt, Op::nn, Op::tn};

  // Every combination of small and awkward sizes (1, tile edges 8 / 32 +- 1, odd), both
  // accumulate modes and a strided and a packed-tight layout spread over them.
  const int dims[] = {1, 3, 8, 17, 32, 33, 100};
  int i = 0;
  for (Op op : ops)
    for (int M : dims)
      for (int N : dims)
        for (int K : dims) {
          ++i;
          test_gemm_f32(op, *pools[i % 2], M, N, K, (i / 2) % 2 == 1, (i / 4) % 2 == 0 ? 0 : 5);
        }
  // Training shapes (SmolLM2-135M: hidden 576, MLP 1536; 512 rows) and LoRA's thin ones
  // (rank 8), where one dimension is far smaller than the others.
  struct Shape {
    int M, N, K;
  };
  const Shape shapes[] = {{576, 576, 576}, {512, 8, 576},   {512, 576, 8},   {8, 576, 512},
                          {576, 8, 512},   {100, 1536, 33}, {33, 100, 1536}, {1, 576, 576},
                          {576, 1, 576},   {576, 576, 1},   {300, 64, 2000}};
  for (Op op : ops)
    for (const Shape& s : shapes)
      for (rf::ThreadPool* pool : pools) test_gemm_f32(op, *pool, s.M, s.N, s.K, pool->size() == 2, 3);

  const int nk[][2] = {{1, 1},   {3, 5},   {17, 33}, {32, 32},  {33, 17},  {64, 96},
                       {100, 576}, {576, 100}, {8, 576}, {576, 8}, {1536, 576}};
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16})
    for (auto& s : nk)
      for (rf::ThreadPool* pool : pools) test_transposed(dt, *pool, s[0], s[1], {1, 3, 17, 100});
  return rf::test::finish("test_gemm_backward");
}
