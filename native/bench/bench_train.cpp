// Training-step throughput of the native trainer on random models: LoRA (r=8 on q,v, the
// red-flag loss terms) and full fine-tuning (cross-entropy on every token), at SmolLM2-135M and
// GPT-2-124M shapes, B sequences of T tokens. Prints one JSON object with tokens/s and model
// FLOP utilisation against the FMA peak measured in the same run (FLOPs per token: 6N full,
// ~4N LoRA, N = parameters in the matmuls).
//   bench_train [--threads N] [--steps S] [--batch B] [--seq T] [--model smollm2|gpt2|tiny] [--mode lora|full]
//               [--dtype f32|bf16] [--clip-norm C]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/peak.h"
#include "model/model.h"
#include "model/train.h"
#include "tests/random_model.h"

namespace {

rf::ModelConfig config_named(const std::string& name) {
  rf::ModelConfig c;
  if (name == "gpt2") {
    c.arch = rf::Arch::gpt2;
    c.vocab = 50257;
    c.hidden = 768;
    c.intermediate = 3072;
    c.n_layers = 12;
    c.n_heads = c.n_kv_heads = 12;
    c.head_dim = 64;
    c.max_positions = 1024;
    c.norm = rf::NormType::layer;
    c.act = rf::Activation::gelu_new;
    c.rope = false;
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.tied_embeddings = true;
  } else if (name == "tiny") {
    c.vocab = 32000;
    c.hidden = 64;
    c.intermediate = 128;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.max_positions = 2048;
  } else {
    c.vocab = 49152;
    c.hidden = 576;
    c.intermediate = 1536;
    c.n_layers = 30;
    c.n_heads = 9;
    c.n_kv_heads = 3;
    c.head_dim = 64;
    c.max_positions = 8192;
    c.rope_theta = 100000;
    c.tied_embeddings = true;
  }
  return c;
}

// Every tensor uniform with a standard deviation of 0.02 (norm weights around 1), from
// splitmix64: the timings do not depend on the distribution, and this is ~10x faster than
// std::normal_distribution on mt19937 (seconds for 124M weights), which keeps back-to-back
// comparison runs close in time.
void load_random(rf::Model& m) {
  rf::test::WeightScales s;
  s.embed = s.lm_head = s.pos_embed = s.norm = s.bias = s.linear = 0.02f;
  uint64_t state = 1;
  auto uniform = [&] {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return float(double(z >> 40) * (1.0 / 16777216.0)) * 2.f - 1.f;  // [-1, 1)
  };
  rf::test::load_random(m, s, [&](float* v, size_t n, float mean, float sd) {
    const float half_width = sd * std::sqrt(3.f);  // a uniform on [-w, w) has sd w / sqrt(3)
    for (size_t i = 0; i < n; ++i) v[i] = mean + half_width * uniform();
  });
}

double matmul_params(const rf::ModelConfig& c) {
  const double H = c.hidden, I = c.intermediate;
  const double per_layer = H * c.qkv_dim() + double(c.q_dim()) * H + H * I * (c.act == rf::Activation::silu ? 3 : 2);
  return per_layer * c.n_layers + double(c.vocab) * H;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, steps = 3, B = 4, T = 128;
  float clip_norm = 0.f;
  std::string model = "smollm2", mode = "lora", dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf(
          "bench_train [--threads N=2] [--steps S=3] [--batch B=4] [--seq T=128] [--model smollm2|gpt2|tiny]\n"
          "            [--mode lora|full] [--dtype f32|bf16] [--clip-norm C=0]\n"
          "Times S training steps (after one warm-up) and prints the medians as JSON: seconds_per_step,\n"
          "fwd_bwd_seconds (forward + backward), optimizer_seconds (AdamW, and in full mode the repacking).\n");
      return 0;
    }
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--threads") threads = std::stoi(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--batch") B = std::stoi(v);
    else if (k == "--seq") T = std::stoi(v);
    else if (k == "--model") model = v;
    else if (k == "--mode") mode = v;
    else if (k == "--dtype") dtype = v;
    else if (k == "--clip-norm") clip_norm = std::stof(v);
  }
  const rf::ModelConfig c = config_named(model);
  rf::Model m(c, dtype == "bf16" ? rf::DType::bf16 : rf::DType::f32, threads);
  load_random(m);
  rf::TrainOptions opt;
  opt.mode = mode == "full" ? rf::TrainMode::full : rf::TrainMode::lora;
  opt.lora.rank = 8;
  opt.lora.alpha = 16;
  opt.lora.targets = c.arch == rf::Arch::gpt2 ? std::vector<std::string>{"c_attn"} : std::vector<std::string>{"q_proj", "v_proj"};
  opt.rf_token = opt.mode == rf::TrainMode::lora ? 7 : -1;
  rf::Trainer trainer(m, opt);

  std::mt19937 rng(3);
  std::vector<std::vector<uint32_t>> seqs(B), refs(B);
  std::vector<rf::LossRow> rows;
  long r0 = 0;
  for (int b = 0; b < B; ++b) {
    seqs[b].resize(T);
    for (auto& t : seqs[b]) t = rng() % c.vocab;
    refs[b] = seqs[b];
    for (int t = 0; t + 1 < T; ++t) {
      if (opt.mode == rf::TrainMode::full) {
        rows.push_back({rf::LossRow::ce, int(r0 + t), -1, -1, int(seqs[b][t + 1])});
      } else if (b % 2 == 0) {
        rows.push_back({rf::LossRow::benign_kl, int(r0 + t), int(r0 + t), -1, -1});  // benign: KL on every token
      } else if (t >= T / 2) {
        rows.push_back({rf::LossRow::after_kl, int(r0 + t), int(r0 + t), -1, -1});
      } else if (t >= T / 4) {
        rows.push_back({rf::LossRow::red_flag, int(r0 + t), -1, b, -1});
      }
    }
    r0 += T;
  }
  std::vector<rf::Sequence> batch, ref;
  for (int b = 0; b < B; ++b) {
    batch.push_back({seqs[b].data(), T});
    ref.push_back({refs[b].data(), T});
  }
  if (opt.mode == rf::TrainMode::full) ref.clear();
  rf::LossOptions lo;
  rf::AdamWOptions ao;
  ao.clip_norm = clip_norm;  // > 0: the optimizer makes a gradient-norm pass before updating (redflag train's default is 1)
  // Forward + backward and the optimizer are timed apart as well, so a change to either shows
  // in its own number (full mode: AdamW and the repacking of every weight are a large share).
  std::vector<double> times, fwd_bwd, opt_times;
  auto one = [&] {
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    trainer.step(batch, ref, rows, lo);
    auto t1 = clock::now();
    trainer.optimizer_step(ao);
    auto t2 = clock::now();
    times.push_back(std::chrono::duration<double>(t2 - t0).count());
    fwd_bwd.push_back(std::chrono::duration<double>(t1 - t0).count());
    opt_times.push_back(std::chrono::duration<double>(t2 - t1).count());
  };
  one();  // warm-up
  times.clear();
  fwd_bwd.clear();
  opt_times.clear();
  for (int s = 0; s < steps; ++s) one();
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double sec = median(times);
  const double tok_s = double(B) * T / sec;
  rf::ThreadPool pool(threads);
  const double peak = rf::fma_peak_gflops(pool, dtype == "bf16", 0.3);
  const double N = matmul_params(c);
  const double flops_per_token = (opt.mode == rf::TrainMode::full ? 6.0 : 4.0) * N;
  std::printf(
      "{\"bench\":\"train\",\"model\":\"%s\",\"mode\":\"%s\",\"dtype\":\"%s\",\"threads\":%d,\"batch\":%d,\"seq\":%d,"
      "\"seconds_per_step\":%.4f,\"fwd_bwd_seconds\":%.4f,\"optimizer_seconds\":%.4f,\"tokens_per_second\":%.1f,\"matmul_params\":%.0f,\"fma_peak_gflops\":%.1f,\"mfu\":%.4f}\n",
      model.c_str(), mode.c_str(), dtype.c_str(), threads, B, T, sec, median(fwd_bwd), median(opt_times), tok_s, N, peak, tok_s * flops_per_token / 1e9 / peak);
  return 0;
}
