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

// A GPU this build cannot run on (the emulated device as a 7.5 one, then as an 8.6 one with a
// build for 9.0 alone): the engine refuses it with device_support's reason before it allocates.
void check_unsupported_device(const rf::ModelConfig& c) {
  const size_t held = rf::cuda::device_memory(0).held;
  auto refused = [&](int major, int minor, const char* archs, const char* part) {
    emu_set_device(major, minor);
    emu_set_architectures(archs);
    std::string message;
    try {
      rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
    } catch (const std::exception& e) {
      message = e.what();
    }
    emu_set_device(9, 0);
    emu_set_architectures("80-real,90");
    check(message.find(part) != std::string::npos && rf::cuda::device_memory(0).held == held && cudaGetLastError() == cudaSuccess,
          std::string("the engine on an unsupported ") + std::to_string(major) + "." + std::to_string(minor) +
              " device: refused before allocating ('" + message + "')");
  };
  refused(7, 5, "80-real,90", "need compute capability 8.0 or newer");
  refused(8, 6, "90", "none of which runs on cuda:0");
}

int main() {
  const rf::ModelConfig llama = rf::test::small_llama();
  run_config("llama GQA 2", llama);
  run_config("mistral window 7", rf::test::mistral_of(llama));
  run_config("llama3 rope, tied", rf::test::llama3_tied_of(llama));
  run_config("qwen3 per-head q/k norms", rf::test::qwen3_of(llama));
  run_config("gpt2", rf::test::gpt2_of(llama));
  check_pool(llama);
  check_memory(with(llama, 64, 4, 2, 16));
  check_pick_fallback(llama);
  check_graph_eviction(llama);
  check_out_of_memory(llama);
  check_device_full(llama);
  check_unsupported_device(llama);
  check_device_failure(llama);  // last: the context stays lost
  return rf::test::finish("cuda_model (emulated)");
}
