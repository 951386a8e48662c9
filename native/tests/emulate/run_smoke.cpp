// Runs native/tests/cuda_smoke.cpp whole under the CPU emulation (scripts/cuda-emulate.sh).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_smoke.cpp"
#undef main
int main() { return test_main(); }
