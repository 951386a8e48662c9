// Runs native/tests/cuda_train.cpp whole under the CPU emulation (scripts/cuda-emulate.sh): the GPU
// trainer against the CPU trainer, over the emulated cuBLASLt (cublaslt.cpp).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_train.cpp"
#undef main
int main() { return test_main(); }
