// native/tests/cuda_gemm.cpp under the CPU emulation: cuda/gemm.cu itself over the emulated
// cuBLASLt (cublaslt.cpp), every test but the timings, with the shapes grid cut to what plain
// loops run in seconds (M up to 64; the views, transposed forms, strides and bf16
// outputs keep their shapes, up to 333 x 4096 x 1000).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_gemm.cpp"
#undef main
int main() {
  try {
    rf::cuda::GemmContext ctx;
    test_convert();
    for (DType type : {DType::f32, DType::bf16})
      for (int M : {1, 7, 64})
        for (int N : {1, 63, 257, 4096})
          for (int K : {64, 80, 1000}) run_shape(ctx, type, M, N, K);
    test_views(ctx);
    test_transposed_forms(ctx);
    test_strides(ctx);
    test_bf16_output(ctx);
    test_k_zero_and_errors(ctx);
    test_plan_cache(ctx);
    char buf[256];
    std::snprintf(buf, sizeof buf, "f32 pooled over %d cases: error %.3g (limit %.3g)", g_f32.cases, g_f32.pooled.rel(), kF32Pooled);
    check(g_f32.pooled.rel() <= kF32Pooled, buf);
    const rf::cuda::GemmStats st = ctx.stats();
    std::printf("cuda_gemm: %ld products, %ld plans (heuristic queries), %ld bias-kernel adds\n", st.calls, st.plans, st.bias_kernel);
  } catch (const std::exception& e) {
    check(false, std::string("threw ") + e.what());
  }
  return rf::test::finish("cuda_gemm (emulated)");
}
