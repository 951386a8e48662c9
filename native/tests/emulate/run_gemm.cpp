// native/tests/cuda_gemm.cpp under the CPU emulation: cuda/gemm.cu itself over the emulated
// cuBLASLt (cublaslt.cpp), every test but the timings, with the shapes grid cut to what plain
// loops run in seconds (M up to 64; the views, transposed forms, strides and bf16
// outputs keep their shapes, up to 333 x 4096 x 1000).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_gemm.cpp"
#undef main
int main() {
  run_tests({1, 7, 64}, false);
  return rf::test::finish("cuda_gemm (emulated)");
}
