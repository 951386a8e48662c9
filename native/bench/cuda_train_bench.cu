// The GPU trainer's benchmark (issue "CUDA backend, part 2", item 5), printed as ONE JSON object
// on stdout (progress on stderr), every figure with its ratio to a ceiling measured in the same
// run (bf16 tensor throughput: cuBLASLt at 8192^3).
//
// train: a red-flag LoRA step (rank 16 on all seven projections, dropout 0.05, <rf> rows) on
// random bf16 models with the shapes of Llama-3.2-1B and Llama-3.2-3B, B sequences of T tokens
// (default 8 x 2048 = 16k tokens): half benign, whose second half is scored by the benign KL; half
// harmful, with <rf> inserted at T/2, four windows of four red-flag positions before it and the
// after-flag KL on every position after it; the reference batch (the same conversations, the
// harmful ones without <rf>) runs forward with the adapter off in the same step. Timed: step +
// optimizer step, median of the timed steps after one warm-up. Model FLOPs counted:
//   trained forward 2 P R, its input gradients through the frozen weights 2 P R, LoRA 6 L R
//   (forward, dA, dB, and its input gradient), reference forward 2 P Rref, attention
//   2 T^2 hd heads layers per sequence forward (causal half of QK^T and PV), 2.5x that backward,
//   the LM head 2 H V per product: 3 per KL row (trained and reference logits, dh), 2 per
//   red-flag row;
// with P the non-embedding parameters, L the LoRA parameters, R and Rref the two batches' tokens.
// MFU = those FLOPs / step time / the in-run bf16 throughput (recomputation's extra forward is
// work done, not counted). Each model runs without and with activation recomputation. Memory: the peak of the device
// memory redflag allocated (cuda/memory.h: weights, KV pool, trace, scratch, loss scratch,
// cuBLASLt workspace), comparable with PyTorch's torch.cuda.max_memory_allocated(), and the part
// of it the forward's trace holds (the activations kept for the backward).
//
// loss: the fused red-flag loss alone (cuda/rf_loss.h) at V = 128256, H = 2048 and 3072, N = 16384
// scored rows (half benign KL, a quarter red flag in groups of 16, a quarter after-flag KL, Nr =
// 3N/4 reference rows), bf16 W. Its arithmetic floor: the products the exact computation needs,
// trained logits (N rows), reference logits (Nr) and dh back through W (N), timed as cuBLASLt
// products of those shapes in the same run; the ratio is the loss's time over that. Peak extra
// memory (the allocations during the call) against the naive logits-and-gradient buffers, counted
// at their smallest: the trained rows' f32 logits and their gradient, 2 x N x V x 4 bytes (none
// for the reference rows' logits).
//
// full: full fine-tuning of a GPT-2-124M-shaped model (bf16 weights, f32 masters), B x T = 64 x
// 1024, cross-entropy on every next token: tokens/s for the comparison with llm.c's CUDA trainer
// (bench/peers/llmc.md: measured separately, its source is not in this repository).
//
// attention: the training attention alone at B x T with the 1B and 3B shapes: the tensor-core
// forward and backward against the bf16 throughput, and the f32 backward they replace.
//
//   cuda_train_bench [--quick] [--only=train,attention,full,loss] [--model=1b|3b] [--batch=B] [--tokens=T] [--steps=S]
//   cuda_train_bench --tiny     (every part on tiny shapes, 2 x 64 tokens, one step: the CPU emulation's smoke run)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench/cuda_bench_common.h"
#include "cuda/attention.h"
#include "cuda/attention_backward.h"
#include "cuda/cuda.h"
#include "cuda/device_model.h"
#include "cuda/device_trainer.h"
#include "cuda/gemm.h"
#include "cuda/memory.h"
#include "cuda/phase_clock.h"
#include "cuda/rf_loss.h"

namespace {

using namespace rf::bench;

// One micro-batch of the red-flag mix (see the top of the file).
struct Mix {
  std::vector<std::vector<uint32_t>> trained, ref;
  std::vector<rf::LossRow> rows;
  long kl_rows = 0, rf_rows = 0;
};

Mix make_mix(int B, int T, int vocab) {
  Mix m;
  const uint32_t rf = uint32_t(vocab - 1);
  long row0 = 0, ref0 = 0;
  for (int b = 0; b < B; ++b) {
    std::vector<uint32_t> ids(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) ids[size_t(t)] = uint32_t((long(t) * 7919 + long(b) * 104729) % (vocab - 1));
    using K = rf::LossRow;
    if (b % 2 == 0) {  // benign: KL on the second half
      for (int t = T / 2; t < T; ++t) m.rows.push_back({K::benign_kl, int32_t(row0 + t), int32_t(ref0 + t), -1, -1});
      m.kl_rows += T - T / 2;
      m.trained.push_back(ids);
      m.ref.push_back(ids);
      row0 += T;
      ref0 += T;
    } else {  // harmful: <rf> at T/2, red-flag windows before it, after-flag KL after it
      std::vector<uint32_t> with(ids.begin(), ids.begin() + T / 2);
      with.push_back(rf);
      with.insert(with.end(), ids.begin() + T / 2, ids.end() - 1);  // T tokens in all
      // Windows of 4 positions ending T/8 apart, the last at T/2 - 1 (whose next token is <rf>).
      const int group = int(m.rf_rows / 16);
      for (int w = 0; w < 4; ++w) {
        const int end = T / 2 - 1 - (3 - w) * (T / 8);
        for (int j = 3; j >= 0; --j) m.rows.push_back({K::red_flag, int32_t(row0 + end - j), -1, group, -1});
      }
      m.rf_rows += 16;
      for (int t = T / 2 + 1; t < T; ++t) m.rows.push_back({K::after_kl, int32_t(row0 + t), int32_t(ref0 + t - 1), -1, -1});
      m.kl_rows += T - T / 2 - 1;
      m.trained.push_back(with);
      m.ref.push_back(std::vector<uint32_t>(ids.begin(), ids.end() - 1));
      row0 += T;
      ref0 += T - 1;
    }
  }
  return m;
}

std::vector<rf::Sequence> seqs(std::vector<std::vector<uint32_t>>& v) {
  std::vector<rf::Sequence> out;
  for (auto& s : v) out.push_back({s.data(), int(s.size())});
  return out;
}

// The train part for one model shape, with and without activation recomputation: JSON objects.
std::string bench_train_one(const std::string& name, rf::cuda::DeviceModel& m, int B, int T, int steps, double peak_flops,
                            bool recompute);

// One more step and optimizer step with the trainer's phase clock on (after the timed ones, so
// its events never touch them): where the step's device time goes, as JSON fields in seconds,
// and one line on stderr in percent of their sum.
template <class StepFn>
std::string profile_phases(const std::string& tag, rf::cuda::DeviceTrainer& trainer, StepFn step_once) {
  trainer.set_profiling(true);
  step_once();
  trainer.set_profiling(false);
  const std::vector<double> ph = trainer.phase_seconds();
  double total = 0;
  for (double v : ph) total += v;
  std::string json = ", \"phaseSeconds\": {", line;
  for (size_t p = 0; p < ph.size(); ++p) {
    const char* name = rf::cuda::train_phase_name(int(p));
    json += std::string(p ? ", " : "") + "\"" + name + "\": " + num(ph[p]);
    if (ph[p] > 0) line += std::string(" ") + name + " " + std::to_string(int(std::lround(100 * ph[p] / total))) + "%";
  }
  std::fprintf(stderr, "%s phases (%.3f s):%s\n", tag.c_str(), total, line.c_str());
  return json + "}";
}

std::string bench_train(const std::string& name, const rf::ModelConfig& c, int B, int T, int steps, double peak_flops) {
  std::fprintf(stderr, "%s: loading random bf16 weights\n", name.c_str());
  rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
  load_random(m);
  std::string out = bench_train_one(name, m, B, T, steps, peak_flops, false);
  m.clear_adapters();
  return out + ", " + bench_train_one(name, m, B, T, steps, peak_flops, true);
}

std::string bench_train_one(const std::string& name, rf::cuda::DeviceModel& m, int B, int T, int steps, double peak_flops,
                            bool recompute) {
  const rf::ModelConfig& c = m.config();
  rf::cuda::reset_memory_peak();
  Mix mix = make_mix(B, T, c.vocab);
  long R = 0, Rref = 0;
  for (const auto& s : mix.trained) R += long(s.size());
  for (const auto& s : mix.ref) Rref += long(s.size());
  // The pool holds one batch's keys and values at a time (the trained forward's sequences go
  // before the reference forward's come): whole 16-token blocks per sequence.
  const double kv_token = double(m.kv_bytes_per_position());
  long blocks = 0;
  for (const auto& s : mix.trained) blocks += (long(s.size()) + 15) / 16;
  m.set_kv_pool_bytes(size_t(double(blocks) * 16 * kv_token) + (size_t(1) << 20));

  rf::TrainOptions o;
  o.lora.rank = 16;
  o.lora.alpha = 32;
  o.lora.dropout = 0.05f;
  o.lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.rf_token = c.vocab - 1;
  o.recompute = recompute;
  rf::cuda::DeviceTrainer trainer(m, o);
  rf::LossOptions lo;
  rf::AdamWOptions ao;
  ao.lr = 1e-4f;
  ao.clip_norm = 1.f;
  std::vector<double> times;
  for (int s = 0; s <= steps; ++s) {  // step 0: warm-up (plans, scratch)
    lo.dropout_seed = uint64_t(s);
    const auto t0 = Clock::now();
    trainer.step(seqs(mix.trained), seqs(mix.ref), mix.rows, lo);
    trainer.optimizer_step(ao);
    if (s > 0) times.push_back(seconds_since(t0));
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  const std::string phases = profile_phases(name + (recompute ? " (recompute)" : ""), trainer, [&] {
    trainer.step(seqs(mix.trained), seqs(mix.ref), mix.rows, lo);
    trainer.optimizer_step(ao);
  });
  const double P = non_embedding_params(c), L = double(trainer.trainable_count()), H = c.hidden, V = c.vocab;
  double attention = 0;
  for (const auto& s : mix.trained) attention += 2.0 * double(s.size()) * double(s.size()) * c.head_dim * c.n_heads * c.n_layers;
  double attention_ref = 0;
  for (const auto& s : mix.ref) attention_ref += 2.0 * double(s.size()) * double(s.size()) * c.head_dim * c.n_heads * c.n_layers;
  const double flops = 4 * P * R + 6 * L * R + 2 * P * Rref + 3.5 * attention + attention_ref +
                       2 * H * V * (3.0 * mix.kl_rows + 2.0 * mix.rf_rows);
  const rf::cuda::MemoryStats mem = rf::cuda::memory_stats();
  const double trace = double(trainer.trace_bytes());
  std::fprintf(stderr, "%s%s: %d x %d: %.3f s/step, %.0f tokens/s, MFU %.1f%%, peak %.1f GiB (trace %.1f GiB)\n", name.c_str(),
               recompute ? " (recompute)" : "", B, T, t, R / t, 100 * flops / t / peak_flops, double(mem.peak) / (1 << 30),
               trace / (1 << 30));
  return "{\"model\": \"" + name + "\", \"recompute\": " + (recompute ? "true" : "false") + ", \"batch\": " + std::to_string(B) + ", \"tokens\": " + std::to_string(T) +
         ", \"trainedTokens\": " + std::to_string(R) + ", \"referenceTokens\": " + std::to_string(Rref) +
         ", \"klRows\": " + std::to_string(mix.kl_rows) + ", \"redFlagRows\": " + std::to_string(mix.rf_rows) +
         ", \"trainable\": " + num(L) + ", \"secondsPerStep\": " + num(t) + ", \"tokensPerSecond\": " + num(R / t) +
         ", \"modelTflops\": " + num(flops / t / 1e12) + ", \"mfu\": " + num(flops / t / peak_flops) +
         ", \"peakDeviceBytes\": " + num(double(mem.peak)) + ", \"traceBytes\": " + num(trace) + phases + "}";
}

// GPT-2 124M shapes (the comparison with llm.c's CUDA trainer, train_gpt2cu: bench/peers/llmc.md).
rf::ModelConfig gpt2_124m() {
  rf::ModelConfig c;
  c.arch = rf::Arch::gpt2;
  c.vocab = 50257;
  c.hidden = 768;
  c.intermediate = 3072;
  c.n_layers = 12;
  c.n_heads = 12;
  c.n_kv_heads = 12;
  c.head_dim = 64;
  c.max_positions = 1024;
  c.norm = rf::NormType::layer;
  c.act = rf::Activation::gelu_new;
  c.rope = false;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.tied_embeddings = true;
  c.norm_eps = 1e-5f;
  return c;
}

// Full fine-tuning of GPT-2 124M, B sequences of T tokens, cross-entropy on every next token:
// tokens/s and MFU (6 P R for the non-embedding weights, the attention's 3.5 x 2 T^2 hd heads
// layers per sequence, 6 H V R for the tied LM head), as llm.c counts a step.
std::string bench_full(const rf::ModelConfig& c, int B, int T, int steps, double peak_flops) {
  std::fprintf(stderr, "gpt2-124m: loading random bf16 weights\n");
  rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
  load_random(m);
  m.set_kv_pool_bytes(size_t(double(B) * ((T + 15) / 16 * 16) * 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * 4) + (size_t(1) << 20));
  std::vector<std::vector<uint32_t>> ids(static_cast<size_t>(B));
  std::vector<rf::LossRow> rows;
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) ids[size_t(b)].push_back(uint32_t((long(t) * 7919 + long(b) * 104729) % c.vocab));
    for (int t = 0; t + 1 < T; ++t) rows.push_back({rf::LossRow::ce, int32_t(b * T + t), -1, -1, int32_t(ids[size_t(b)][size_t(t + 1)])});
  }
  rf::TrainOptions o;
  o.mode = rf::TrainMode::full;
  rf::cuda::reset_memory_peak();
  rf::cuda::DeviceTrainer trainer(m, o);
  rf::LossOptions lo;
  rf::AdamWOptions ao;
  ao.lr = 1e-4f;
  std::vector<double> times;
  for (int s = 0; s <= steps; ++s) {
    const auto t0 = Clock::now();
    trainer.step(seqs(ids), {}, rows, lo);
    trainer.optimizer_step(ao);
    if (s > 0) times.push_back(seconds_since(t0));
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2], R = double(B) * T;
  const std::string phases = profile_phases("gpt2-124m full", trainer, [&] {
    trainer.step(seqs(ids), {}, rows, lo);
    trainer.optimizer_step(ao);
  });
  const double flops = 6 * non_embedding_params(c) * R + 3.5 * 2.0 * double(T) * T * c.head_dim * c.n_heads * c.n_layers * B +
                       6.0 * c.hidden * c.vocab * R;
  const rf::cuda::MemoryStats mem = rf::cuda::memory_stats();
  std::fprintf(stderr, "gpt2-124m full: %d x %d: %.3f s/step, %.0f tokens/s, MFU %.1f%%\n", B, T, t, R / t, 100 * flops / t / peak_flops);
  return "{\"model\": \"gpt2-124m\", \"mode\": \"full\", \"batch\": " + std::to_string(B) + ", \"tokens\": " + std::to_string(T) +
         ", \"secondsPerStep\": " + num(t) + ", \"tokensPerSecond\": " + num(R / t) + ", \"modelTflops\": " + num(flops / t / 1e12) +
         ", \"mfu\": " + num(flops / t / peak_flops) + ", \"peakDeviceBytes\": " + num(double(mem.peak)) + phases + "}";
}

// The loss part for one hidden size: JSON fields.
std::string bench_loss(int V, int H, int N, double peak_flops) {
  const int Nr = 3 * N / 4;
  std::fprintf(stderr, "loss: V %d, H %d, N %d\n", V, H, N);
  rf::cuda::GemmContext gemm;
  uint64_t state = 0x2545f4914f6cdd1dull;
  auto fill = [&](std::vector<uint16_t>& v, float sd) {
    for (auto& x : v) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      x = rf::f32_to_bf16(sd * 3.46f * (float(state >> 40) / float(1 << 24) - 0.5f));
    }
  };
  std::vector<uint16_t> w(size_t(V) * H), hb(size_t(N) * H), hrb(size_t(Nr) * H);
  fill(w, 0.02f);
  fill(hb, 1.f);
  fill(hrb, 1.f);
  std::vector<float> h(hb.size()), hr(hrb.size()), wrf(static_cast<size_t>(H));
  for (size_t i = 0; i < h.size(); ++i) h[i] = rf::bf16_to_f32(hb[i]);
  for (size_t i = 0; i < hr.size(); ++i) hr[i] = rf::bf16_to_f32(hrb[i]);
  for (int i = 0; i < H; ++i) wrf[size_t(i)] = rf::bf16_to_f32(w[size_t(V - 1) * H + i]);
  void *dW, *dh, *dhr, *dwrf, *ddh, *ddw;
  check(rf::cuda::device_alloc(&dW, w.size() * 2), "cudaMalloc");
  check(rf::cuda::device_alloc(&dh, h.size() * 4), "cudaMalloc");
  check(rf::cuda::device_alloc(&dhr, hr.size() * 4), "cudaMalloc");
  check(rf::cuda::device_alloc(&dwrf, size_t(H) * 4), "cudaMalloc");
  check(rf::cuda::device_alloc(&ddh, h.size() * 4), "cudaMalloc");
  check(rf::cuda::device_alloc(&ddw, size_t(H) * 4), "cudaMalloc");
  cudaMemcpy(dW, w.data(), w.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dh, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dhr, hr.data(), hr.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dwrf, wrf.data(), wrf.size() * 4, cudaMemcpyHostToDevice);
  // Rows: half benign KL, a quarter red flag (groups of 16), a quarter after-flag KL.
  std::vector<rf::RfLossRow> rows(static_cast<size_t>(N));
  int ref = 0;
  for (int i = 0; i < N; ++i) {
    rf::RfLossRow& r = rows[size_t(i)];
    if (i % 4 == 1) {
      r.kind = rf::RfLossKind::red_flag, r.group = i / 64, r.ref_row = -1;
    } else {
      r.kind = i % 4 == 3 ? rf::RfLossKind::after_kl : rf::RfLossKind::benign_kl, r.group = -1, r.ref_row = ref++ % Nr;
    }
    r.flag = 0;
  }
  rf::RfLossOptions o;
  o.flag_tokens = {V - 1};
  // The floor's products, as cuBLASLt runs them: logits of N and of Nr rows, and N rows back.
  void *zb, *hbuf;
  check(rf::cuda::device_alloc(&zb, size_t(N) * V * 4), "cudaMalloc");
  check(rf::cuda::device_alloc(&hbuf, size_t(N) * std::max<size_t>(H, V) * 2), "cudaMalloc");
  cudaMemset(hbuf, 0, size_t(N) * std::max<size_t>(H, V) * 2);
  const double floor = median_time(3, [&] {
    rf::cuda::matmul(gemm, static_cast<float*>(zb), hbuf, rf::DType::bf16, dW, rf::DType::bf16, N, V, H, nullptr, 0.f, nullptr);
    rf::cuda::matmul(gemm, static_cast<float*>(zb), hbuf, rf::DType::bf16, dW, rf::DType::bf16, Nr, V, H, nullptr, 0.f, nullptr);
    rf::cuda::matmul_nn(gemm, static_cast<float*>(ddh), hbuf, rf::DType::bf16, dW, rf::DType::bf16, N, H, V, 0.f, nullptr);
  });
  rf::cuda::device_free(zb, size_t(N) * V * 4);
  rf::cuda::device_free(hbuf, size_t(N) * std::max<size_t>(H, V) * 2);
  const size_t before = rf::cuda::memory_stats().current;
  rf::cuda::reset_memory_peak();
  double extra = 0;
  const double t = median_time(3, [&] {
    rf::cuda::rf_loss(gemm, static_cast<float*>(dh), N, static_cast<float*>(dhr), Nr, H, dW, rf::DType::bf16, V,
                      static_cast<float*>(dwrf), rows.data(), o, static_cast<float*>(ddh), static_cast<float*>(ddw), nullptr);
    extra = std::max(extra, double(rf::cuda::memory_stats().peak - before));
  });
  const double naive = 2.0 * double(N) * V * 4;
  for (auto [p, b] : {std::pair<void*, size_t>{dW, w.size() * 2}, {dh, h.size() * 4}, {dhr, hr.size() * 4}, {dwrf, size_t(H) * 4},
                      {ddh, h.size() * 4}, {ddw, size_t(H) * 4}})
    rf::cuda::device_free(p, b);
  const double flops = 2.0 * H * V * (2.0 * N + Nr);
  std::fprintf(stderr, "loss: H %d: %.1f ms (floor %.1f ms, %.2fx), extra memory %.2f%% of naive\n", H, t * 1e3, floor * 1e3,
               t / floor, 100 * extra / naive);
  return "{\"vocab\": " + std::to_string(V) + ", \"hidden\": " + std::to_string(H) + ", \"rows\": " + std::to_string(N) +
         ", \"referenceRows\": " + std::to_string(Nr) + ", \"seconds\": " + num(t) + ", \"floorSeconds\": " + num(floor) +
         ", \"ratioToFloor\": " + num(t / floor) + ", \"floorTflops\": " + num(flops / floor / 1e12) +
         ", \"floorRatioToBf16\": " + num(flops / floor / peak_flops) + ", \"peakExtraBytes\": " + num(extra) +
         ", \"naiveBytes\": " + num(naive) + ", \"extraFractionOfNaive\": " + num(extra / naive) + "}";
}

// The training attention alone: B sequences of T rows in a fused QKV buffer, the model's heads
// and head_dim. The f32 backward (attention_backward) against the tensor-core one
// (attention_backward_tc, given the forward's lse and output), and the tensor-core forward
// (prefill_attention_tc over a cache holding the same keys). FLOPs as the train part counts
// them: forward 2 T^2 hd heads per sequence, backward 2.5x that.
std::string bench_attention(const std::string& name, const rf::ModelConfig& c, int B, int T, double peak_flops) {
  const int hd = c.head_dim, Hq = c.n_heads, Hk = c.n_kv_heads, Q = Hq * hd, KV = Hk * hd, QKV = Q + 2 * KV, R = B * T;
  const int Bt = rf::cuda::DeviceModel::kBlockTokens, blocks = (T + Bt - 1) / Bt;
  std::vector<int32_t> first, len, row_seq, tables, offsets, n_new;
  for (int b = 0; b < B; ++b) {
    first.push_back(b * T), len.push_back(T), offsets.push_back(b * blocks), n_new.push_back(T);
    for (int t = 0; t < T; ++t) row_seq.push_back(b);
    for (int i = 0; i < blocks; ++i) tables.push_back(b * blocks + i);
  }
  const auto up = [](const std::vector<int32_t>& v) {
    void* d = nullptr;
    check(rf::cuda::device_alloc(&d, v.size() * 4), "cudaMalloc");
    cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice);
    return static_cast<int32_t*>(d);
  };
  const auto zeros = [](size_t floats) {
    void* d = nullptr;
    check(rf::cuda::device_alloc(&d, floats * 4), "cudaMalloc");
    cudaMemset(d, 0, floats * 4);
    return static_cast<float*>(d);
  };
  int32_t *d_first = up(first), *d_len = up(len), *d_row_seq = up(row_seq), *d_tables = up(tables), *d_offsets = up(offsets),
          *d_n_new = up(n_new);
  const size_t cache = size_t(B) * blocks * Hk * Bt * hd;
  float *qkv = zeros(size_t(R) * QKV), *dout = zeros(size_t(R) * Q), *out = zeros(size_t(R) * Q), *lse = zeros(size_t(R) * Hq),
        *dqkv = zeros(size_t(R) * QKV), *k = zeros(cache), *v = zeros(cache), *q = zeros(size_t(R) * Q);
  const rf::cuda::AttentionRows a{d_first, d_len, d_row_seq, B, R, Hq, Hk, hd, 0};
  float* scratch = zeros(size_t(std::max(rf::cuda::attention_backward_scratch(a), rf::cuda::attention_backward_tc_scratch(a))));
  const float scale = 1.f / std::sqrt(float(hd));
  const rf::cuda::PagedLayer layer{k, v, Bt, Hk, hd, true};  // a bf16 cache, as the bf16 model keeps
  const rf::cuda::PagedBatch batch{d_tables, d_offsets, d_len, B, T};
  const double fwd = median_time(5, [&] {
    rf::cuda::prefill_attention_tc(out, q, Q, layer, batch, d_first, d_n_new, R, T, Hq, scale, 0, nullptr, lse);
  });
  const double bwd_tc = median_time(5, [&] { rf::cuda::attention_backward_tc(dqkv, dout, qkv, out, lse, a, T, scale, scratch, nullptr); });
  const double bwd_f32 = median_time(2, [&] { rf::cuda::attention_backward(dqkv, dout, qkv, a, scale, scratch, nullptr); });
  for (void* p : {static_cast<void*>(d_first), static_cast<void*>(d_len), static_cast<void*>(d_row_seq), static_cast<void*>(d_tables),
                  static_cast<void*>(d_offsets), static_cast<void*>(d_n_new)})
    cudaFree(p);
  for (float* p : {qkv, dout, out, lse, dqkv, k, v, q, scratch}) cudaFree(p);
  const double f = 2.0 * double(T) * T * hd * Hq * B;
  std::fprintf(stderr, "attention %s: forward %.2f ms (%.0f TFLOP/s), backward %.2f ms (%.0f TFLOP/s), f32 backward %.2f ms (%.1fx)\n",
               name.c_str(), fwd * 1e3, f / fwd / 1e12, bwd_tc * 1e3, 2.5 * f / bwd_tc / 1e12, bwd_f32 * 1e3, bwd_f32 / bwd_tc);
  return "{\"model\": \"" + name + "\", \"batch\": " + std::to_string(B) + ", \"tokens\": " + std::to_string(T) +
         ", \"forwardSeconds\": " + num(fwd) + ", \"forwardRatioToBf16\": " + num(f / fwd / peak_flops) +
         ", \"backwardSeconds\": " + num(bwd_tc) + ", \"backwardRatioToBf16\": " + num(2.5 * f / bwd_tc / peak_flops) +
         ", \"f32BackwardSeconds\": " + num(bwd_f32) + ", \"backwardSpeedup\": " + num(bwd_f32 / bwd_tc) + "}";
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, tiny = false;
  std::string only, model;
  int B = 8, T = 2048, steps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--tiny") tiny = quick = true;
    else if (a.rfind("--only=", 0) == 0) only = a.substr(7);
    else if (a.rfind("--model=", 0) == 0) model = a.substr(8);
    else if (a.rfind("--batch=", 0) == 0) B = std::atoi(a.c_str() + 8);
    else if (a.rfind("--tokens=", 0) == 0) T = std::atoi(a.c_str() + 9);
    else if (a.rfind("--steps=", 0) == 0) steps = std::atoi(a.c_str() + 8);
  }
  if (quick) B = std::min(B, 4), T = std::min(T, 512), steps = std::min(steps, 2);
  if (tiny) B = 2, T = 64, steps = 1;
  if (B < 2 || T < 64 || steps < 1) {
    std::fprintf(stderr, "cuda_train_bench: --batch >= 2, --tokens >= 64 and --steps >= 1\n");
    return 2;
  }
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("{\"bench\": \"cuda-train\", \"skipped\": \"no CUDA device visible (%s)\"}\n", info.error.c_str());
    return 0;
  }
  std::fprintf(stderr, "cuda_train_bench: %s\n", info.name.c_str());
  const double peak = tiny ? bf16_flops(64) : bf16_flops();
  std::fprintf(stderr, "ceiling: bf16 %.0f TFLOP/s\n", peak / 1e12);
  std::string json = "{\"bench\": \"cuda-train\", \"device\": \"" + info.name + "\", \"ceilings\": {\"bf16Tflops\": " +
                     num(peak / 1e12) + "}";
  // --only=a,b: the parts named.
  auto wants = [&](const char* part) { return only.empty() || ("," + only + ",").find(std::string(",") + part + ",") != std::string::npos; };
  const std::vector<std::pair<std::string, rf::ModelConfig>> shapes =
      tiny ? std::vector<std::pair<std::string, rf::ModelConfig>>{{"tiny-tied", tiny_llama(1000, 64, 2, 1, 32, true)},
                                                                 {"tiny", tiny_llama(1003, 128, 4, 2, 32, false)}}
           : std::vector<std::pair<std::string, rf::ModelConfig>>{
                 {"llama-3.2-1b", llama(128256, 2048, 8192, 16, 32, 8, 64, true, 32.0)},
                 {"llama-3.2-3b", llama(128256, 3072, 8192, 28, 24, 8, 128, true, 32.0)},
             };
  if (wants("train")) {
    json += ", \"train\": [";
    bool first = true;
    for (const auto& [name, c] : shapes) {
      if (!model.empty() && name.find(model) == std::string::npos) continue;
      json += std::string(first ? "" : ", ") + bench_train(name, c, B, T, steps, peak);
      first = false;
    }
    json += "]";
  }
  if (wants("attention")) {
    json += ", \"attention\": [" + bench_attention(shapes[0].first, shapes[0].second, B, T, peak) + ", " +
            bench_attention(shapes[1].first, shapes[1].second, B, T, peak) + "]";
  }
  if (wants("full")) {
    rf::ModelConfig c = gpt2_124m();
    if (tiny) c.vocab = 1003, c.hidden = 64, c.intermediate = 256, c.n_layers = 2, c.n_heads = c.n_kv_heads = 2, c.head_dim = 32;
    json += ", \"full\": " + bench_full(c, tiny ? 2 : quick ? 4 : 64, tiny ? 64 : quick ? 256 : 1024, steps, peak);
  }
  if (wants("loss")) {
    const int N = tiny ? 256 : quick ? 2048 : 16384, V = tiny ? 1003 : 128256;
    json += ", \"loss\": [" + bench_loss(V, tiny ? 64 : 2048, N, peak) + ", " + bench_loss(V, tiny ? 96 : 3072, N, peak) + "]";
  }
  std::printf("%s}\n", json.c_str());
  return 0;
}
