// Runs native/tests/cuda_optim.cpp whole under the CPU emulation (scripts/cuda-emulate.sh).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_optim.cpp"
#undef main
int main() { return test_main(); }
