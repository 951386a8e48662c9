// native/tests/cuda_model.cpp under the CPU emulation (the cuBLASLt products by plain loops,
// gemm.cpp): the whole CUDA engine against the CPU engine on the small configs.
#include "cuda/cuda.h"
// Under the emulation there is one device.
rf::cuda::DeviceInfo rf::cuda::device_info() {
  rf::cuda::DeviceInfo i;
  i.count = 1;
  i.name = "emulated";
  return i;
}
#define main test_main
#include "tests/cuda_model.cpp"
#undef main
int main() {
  const rf::ModelConfig llama = rf::test::small_llama();
  run_config("llama GQA 2", llama);
  rf::ModelConfig mistral = llama;
  mistral.sliding_window = 7;
  mistral.qkv_bias = false;
  run_config("mistral window 7", mistral);
  rf::ModelConfig l3 = llama;
  l3.tied_embeddings = true;
  l3.rope_scaling = rf::RopeScaling::llama3;
  l3.rope_factor = 8;
  l3.rope_original_max_positions = 16;
  run_config("llama3 rope, tied", l3);
  rf::ModelConfig gpt2 = llama;
  gpt2.arch = rf::Arch::gpt2;
  gpt2.norm = rf::NormType::layer;
  gpt2.act = rf::Activation::gelu_new;
  gpt2.rope = false;
  gpt2.n_kv_heads = gpt2.n_heads;
  gpt2.head_dim = gpt2.hidden / gpt2.n_heads;
  gpt2.qkv_bias = gpt2.o_bias = gpt2.mlp_bias = true;
  gpt2.tied_embeddings = true;
  run_config("gpt2", gpt2);
  check_pool(llama);
  check_memory(with(llama, 64, 4, 2, 16));
  return rf::test::finish("cuda_model (emulated)");
}
