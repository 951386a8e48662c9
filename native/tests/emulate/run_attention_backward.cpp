// native/tests/cuda_attention_backward.cpp under the CPU emulation, on fewer cases than on a GPU.
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_attention_backward.cpp"
#undef main
int main() {
  run_case(64, 2, 1, 0);
  run_case(80, 1, 3, 7);
  run_case(64, 2, 1, 0, true);
  run_case(80, 1, 3, 7, true);
  run_case(16, 2, 2, 0, true);
  for (int hd : {32, 48, 96, 112, 128}) run_case(hd, 1, 2, 7, true);  // every other instance
  return rf::test::finish("cuda_attention_backward (emulated)");
}
