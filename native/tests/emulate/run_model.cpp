// native/tests/cuda_model.cpp under the CPU emulation (over the emulated cuBLASLt, cublaslt.cpp):
// the whole CUDA engine against the CPU engine on the small configs.
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_model.cpp"
#undef main
int main() {
  const rf::ModelConfig llama = rf::test::small_llama();
  run_config("llama GQA 2", llama);
  run_config("mistral window 7", rf::test::mistral_of(llama));
  run_config("llama3 rope, tied", rf::test::llama3_tied_of(llama));
  run_config("gpt2", rf::test::gpt2_of(llama));
  check_pool(llama);
  check_memory(with(llama, 64, 4, 2, 16));
  check_pick_fallback(llama);
  check_graph_eviction(llama);
  check_out_of_memory(llama);
  return rf::test::finish("cuda_model (emulated)");
}
