// native/tests/cuda_model.cpp under the CPU emulation (over the emulated cuBLASLt, cublaslt.cpp):
// the whole CUDA engine against the CPU engine on the small configs.
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_model.cpp"
#undef main

// The emulated device itself full (not redflag's cap): cudaMalloc fails and, as a GPU's runtime
// does, leaves cudaErrorMemoryAllocation as the last error. The engine throws OutOfMemory and
// clears that error, so the next forward's launch checks (cudaGetLastError) see nothing stale and
// it gives the logits of a twin that never ran out.
void check_device_full(const rf::ModelConfig& c) {
  rf::cuda::DeviceModel a(c, rf::DType::f32, 0), b(c, rf::DType::f32, 0);
  rf::test::load_random(a, 9);
  rf::test::load_random(b, 9);
  a.set_kv_pool_bytes(size_t(8) << 20);
  b.set_kv_pool_bytes(size_t(8) << 20);
  auto sa = a.new_sequence(), sb = b.new_sequence();
  std::mt19937 rng(43);
  const std::vector<uint32_t> first = random_ids(rng, 3, c.vocab), more = random_ids(rng, 30, c.vocab);
  std::vector<float> la(size_t(c.vocab)), lb(size_t(c.vocab));
  a.forward({{sa.get(), first.data(), 3}}, rf::LogitsMode::last, la.data());
  b.forward({{sb.get(), first.data(), 3}}, rf::LogitsMode::last, lb.data());
  emu_set_device_memory(emu_allocated());
  std::string message;
  try {
    a.forward({{sa.get(), more.data(), 30}}, rf::LogitsMode::last, la.data());
  } catch (const rf::OutOfMemory& e) {
    message = e.what();
  }
  emu_set_device_memory(0);
  bool clean = true;
  try {
    a.forward({{sa.get(), more.data(), 30}}, rf::LogitsMode::last, la.data());
  } catch (const std::exception& e) {
    clean = false;
    std::printf("  after the device was full: %s\n", e.what());
  }
  b.forward({{sb.get(), more.data(), 30}}, rf::LogitsMode::last, lb.data());
  check(message.find("out of GPU memory on cuda:0 allocating scratch") != std::string::npos && clean &&
            std::memcmp(la.data(), lb.data(), la.size() * 4) == 0,
        "a full device: OutOfMemory, its error cleared, and the retry equals a twin's bit for bit");
}

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
  check_device_full(llama);
  check_device_failure(llama);  // last: the context stays lost
  return rf::test::finish("cuda_model (emulated)");
}
