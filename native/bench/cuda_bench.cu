// The CUDA engine's benchmark (issue "CUDA backend, part 1", item 6), printed as ONE JSON object
// on stdout (progress on stderr). Every figure comes with its ratio to a ceiling measured in the
// same run:
//   - copy bandwidth: a device-to-device copy kernel over 2 x 1 GiB (bytes read + written / s);
//   - bf16 tensor throughput: cuBLASLt at 8192^3 (bf16 in, f32 sums and out).
// Models: random weights with the exact shapes of Llama-3.2-1B and Llama-3.1-8B, bf16 on the
// device, loaded through the engine's load_tensor (the same path as a checkpoint):
//   - batch-1 decode tokens/s at contexts 128 and 4096, against the bandwidth bound
//     (weight bytes + the KV bytes a token reads) / copy bandwidth, without decode graphs, with
//     the few-row products on cuBLASLt instead of gemv_rows (cuda/gemv.h), and without dependent
//     launches (cuda/launch.h: each kernel waits for the previous one to end): each one's gain;
//     and the launches of a step (its decode graph's nodes);
//   - batched decode at 8, 64 and 256 sequences (context 128): aggregate tokens/s (at 8, also
//     without gemv_rows);
//   - a 2048-token prefill: model FLOP/s (2 x non-embedding params x tokens + the causal
//     attention's 2 x 2 x layers x heads x head_dim x T^2 / 2, + the LM head for the last row)
//     over the in-run bf16 throughput;
//   - prefill attention alone at 2048 tokens, the f32 kernel against the tensor-core one
//     (bf16 mma.sync): seconds, the latter's FLOP/s over the bf16 throughput, and the speedup;
//   - the fused pick epilogue (token, log-prob, p(<rf>)) on one 128256-logit row, timed alone
//     with CUDA events, as a fraction of a batch-1 decode step: greedy (the target's figure),
//     and sampled (temperature alone, with top-p 0.9, with top-k 50);
//   - decode attention alone (one layer's launch) at 1 x 128, 1 x 4096 and 8 x 4096 cached tokens:
//     seconds, the key and value bytes over the copy bandwidth, and the n_layers launches of a step;
//   - each decode product alone (QKV, o, gate|up with its SwiGLU, down, LM head) at 1 and 8 rows,
//     gemv_rows against cuBLASLt's matmul on the same shapes: W's bytes per second over the copy
//     bandwidth (W rotated through copies past the 50 MB L2, 20 launches per timing);
//   - the detector as served by default: an unmerged LoRA adapter of rank 16 on all seven
//     projections with a flag row, decode at batch 1, 8 and 32, context 128, against the bound
//     (now with the adapter's f32 factors), with gemv_rows (adapters fused; at 32 sequences the
//     adapters' products in two launches a projection, lora_down_rows / lora_up_rows) and
//     without (cuBLASLt, two products per adapter).
//
//   cuda_bench [--quick] [--model=1b|8b]     (default: both; --quick: fewer steps)
//   cuda_bench --tiny                        (every part on two tiny models: the CPU emulation's smoke run)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/attention.h"
#include "cuda/cuda.h"
#include "cuda/device_model.h"
#include "cuda/gemm.h"
#include "cuda/gemv.h"
#include "cuda/launch.h"
#include "cuda/ops.h"
#include "bench/cuda_bench_common.h"

namespace {

using namespace rf::bench;

// tokens/s of `steps` greedy decode steps of n sequences at context `context`.
double decode_rate(rf::cuda::DeviceModel& m, int n, int context, int steps, int rf_token) {
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> seqs;
  std::vector<uint32_t> prompt(static_cast<size_t>(context));
  for (int i = 0; i < context; ++i) prompt[size_t(i)] = uint32_t((i * 7919) % m.vocab());
  for (int i = 0; i < n; ++i) seqs.push_back(m.new_sequence());
  std::vector<rf::PickParams> params(static_cast<size_t>(n));
  std::vector<rf::Pick> picks(static_cast<size_t>(n));
  // Prefill in groups so the activations of one forward stay modest.
  for (int i = 0; i < n; i += 8) {
    std::vector<rf::cuda::DeviceItem> items;
    for (int j = i; j < std::min(n, i + 8); ++j) items.push_back({seqs[size_t(j)].get(), prompt.data(), context});
    std::vector<rf::PickParams> p(items.size());
    std::vector<rf::Pick> k(items.size());
    m.decode_step(items, p, rf::Flags(rf_token), 0, k.data(), nullptr, nullptr);
  }
  std::vector<uint32_t> next(static_cast<size_t>(n), 1);
  auto step = [&] {
    std::vector<rf::cuda::DeviceItem> items;
    for (int i = 0; i < n; ++i) items.push_back({seqs[size_t(i)].get(), &next[size_t(i)], 1});
    m.decode_step(items, params, rf::Flags(rf_token), 0, picks.data(), nullptr, nullptr);
    for (int i = 0; i < n; ++i) next[size_t(i)] = picks[size_t(i)].token;
  };
  step();  // warm-up: plans, scratch (the decode graph's eager first run)
  step();  // its capture
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) step();
  return double(n) * steps / seconds_since(t0);
}

// decode_rate with the few-row products through gemv_rows, then through cuBLASLt: {on, off}.
std::pair<double, double> decode_rates(rf::cuda::DeviceModel& m, int n, int context, int steps, int rf_token) {
  const double on = decode_rate(m, n, context, steps, rf_token);
  m.set_gemv(false);
  const double off = decode_rate(m, n, context, steps, rf_token);
  m.set_gemv(true);
  return {on, off};
}

// A random LoRA adapter of rank r on all seven projections of every layer (PEFT's scale
// alpha / r = 2) and a flag row for <rf>: the detector's default serving setup. Returns the
// adapter's device bytes (f32 A and B), which a decode step reads.
double add_random_adapter(rf::cuda::DeviceModel& m, int r, int rf_token) {
  const rf::ModelConfig& c = m.config();
  const long H = c.hidden, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate;
  struct Target {
    const char* name;
    long in, out;
  };
  const Target targets[] = {{"q_proj", H, Q},     {"k_proj", H, KV},    {"v_proj", H, KV},   {"o_proj", Q, H},
                            {"gate_proj", H, I}, {"up_proj", H, I}, {"down_proj", I, H}};
  uint64_t state = 0x2545f4914f6cdd1dull;
  const auto draw = [&state](float sd) {  // uniform on [-sd, sd]: weights need only be finite and small
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return sd * (2.f * float(state >> 40) / float(1 << 24) - 1.f);
  };
  double bytes = 0;
  for (int l = 0; l < c.n_layers; ++l)
    for (const Target& t : targets) {
      std::vector<float> A(size_t(r) * t.in), B(size_t(t.out) * r);
      for (float& v : A) v = draw(0.02f);
      for (float& v : B) v = draw(0.02f);
      m.add_lora(l, t.name, A.data(), t.in, B.data(), t.out, r, 2.f);
      bytes += 4.0 * (A.size() + B.size());
    }
  std::vector<float> row(static_cast<size_t>(H));
  for (float& v : row) v = draw(0.02f);
  m.set_token_rows({rf_token}, row.data(), row.data());
  return bytes;
}

}  // namespace

// Prefill attention alone over one T-token sequence with the model's heads and head_dim: the
// f32 kernel and the tensor-core one (attention.h) on the same cache, so the tensor cores' gain
// shows by itself. FLOPs: the causal 2 x 2 x heads x head_dim x T^2 / 2.
std::string attention_alone(const rf::ModelConfig& c, int T, double tflops, int reps) {
  const int B = rf::cuda::DeviceModel::kBlockTokens, n_blocks = (T + B - 1) / B, hd = c.head_dim;
  const size_t kv = size_t(n_blocks) * c.n_kv_heads * B * hd, qn = size_t(T) * c.n_heads * hd;
  float *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
  int32_t* ints = nullptr;  // tables [n_blocks] (block i holds positions 16 i..), offset, length, row offset, n_new
  check(cudaMalloc(&k, kv * 4), "cudaMalloc");
  check(cudaMalloc(&v, kv * 4), "cudaMalloc");
  check(cudaMalloc(&q, qn * 4), "cudaMalloc");
  check(cudaMalloc(&out, qn * 4), "cudaMalloc");
  check(cudaMalloc(&ints, size_t(n_blocks + 4) * 4), "cudaMalloc");
  std::vector<int32_t> host(size_t(n_blocks + 4));
  for (int i = 0; i < n_blocks; ++i) host[size_t(i)] = i;
  host[size_t(n_blocks)] = 0, host[size_t(n_blocks) + 1] = T, host[size_t(n_blocks) + 2] = 0, host[size_t(n_blocks) + 3] = T;
  cudaMemcpy(ints, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
  cudaMemset(k, 0, kv * 4), cudaMemset(v, 0, kv * 4), cudaMemset(q, 0, qn * 4);
  const rf::cuda::PagedLayer layer{k, v, B, c.n_kv_heads, hd, true};  // a bf16 cache, as the bf16 model keeps
  const rf::cuda::PagedBatch batch{ints, ints + n_blocks, ints + n_blocks + 1, 1, T};
  const float scale = 1.f / std::sqrt(float(hd));
  const double t32 = median_time(reps, [&] {
    rf::cuda::prefill_attention(out, q, long(c.n_heads) * hd, layer, batch, ints + n_blocks + 2, ints + n_blocks + 3, T, T, c.n_heads, scale, 0, nullptr);
  });
  const double ttc = median_time(reps, [&] {
    rf::cuda::prefill_attention_tc(out, q, long(c.n_heads) * hd, layer, batch, ints + n_blocks + 2, ints + n_blocks + 3, T, T, c.n_heads, scale, 0, nullptr);
  });
  for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q), static_cast<void*>(out), static_cast<void*>(ints)})
    cudaFree(p);
  const double flops = 2.0 * 2.0 * c.n_heads * hd * double(T) * T / 2.0;
  std::fprintf(stderr, "attention alone (T %d, hd %d): f32 %.2f ms, tensor cores %.2f ms (%.0f TFLOP/s, %.1fx)\n", T, hd, t32 * 1e3,
               ttc * 1e3, flops / ttc / 1e12, t32 / ttc);
  return "{\"tokens\": " + num(T) + ", \"f32Seconds\": " + num(t32) + ", \"tensorCoreSeconds\": " +
         num(ttc) + ", \"tensorCoreTflops\": " + num(flops / ttc / 1e12) + ", \"tensorCoreRatioToBf16\": " +
         num(flops / ttc / tflops) + ", \"speedup\": " + num(t32 / ttc) + "}";
}

// Decode attention alone (one layer's launch, as a decode step makes it): S sequences of `context`
// cached tokens each in a bf16 paged cache (every sequence its own blocks), the model's heads and
// head_dim, 20 launches per timing over caches that together exceed the L2 (so the keys come from
// memory, as in a decode step of a large model). Bytes: every key and value row once, against the
// copy bandwidth; the step's share is n_layers launches.
// cases: {sequences, context}; l2_bytes: the bytes the copies must exceed.
std::string decode_attention_alone(const rf::ModelConfig& c, double bw, int reps, const std::vector<std::pair<int, int>>& cases,
                                   size_t l2_bytes) {
  const int B = rf::cuda::DeviceModel::kBlockTokens, hd = c.head_dim;
  const float scale = 1.f / std::sqrt(float(hd));
  std::string out = "[";
  for (const auto& [S, context] : cases) {
    const int per_seq = (context + B - 1) / B, n_blocks = S * per_seq;
    const size_t kv_bytes = size_t(n_blocks) * c.n_kv_heads * B * hd * 2;  // K or V, bf16
    const int copies = int(std::max<size_t>(1, l2_bytes / (2 * kv_bytes) + 1));
    std::vector<void*> caches(size_t(2 * copies));
    for (void*& p : caches) {
      check(cudaMalloc(&p, kv_bytes), "cudaMalloc");
      cudaMemset(p, 0x3c, kv_bytes);  // about 0.0115 in every bf16: not zeros
    }
    std::vector<int32_t> host(size_t(n_blocks + 2 * S));  // tables, table offsets, lengths
    for (int i = 0; i < n_blocks; ++i) host[size_t(i)] = i;
    for (int s = 0; s < S; ++s) host[size_t(n_blocks + s)] = s * per_seq, host[size_t(n_blocks + S + s)] = context;
    int32_t* ints = nullptr;
    float *q = nullptr, *o = nullptr, *scratch = nullptr;
    check(cudaMalloc(&ints, host.size() * 4), "cudaMalloc");
    cudaMemcpy(ints, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
    check(cudaMalloc(&q, size_t(S) * c.n_heads * hd * 4), "cudaMalloc");
    check(cudaMalloc(&o, size_t(S) * c.n_heads * hd * 4), "cudaMalloc");
    check(cudaMalloc(&scratch, size_t(rf::cuda::decode_attention_scratch(S, c.n_heads, hd, context)) * 4), "cudaMalloc");
    cudaMemset(q, 0x3c, size_t(S) * c.n_heads * hd * 4);
    const rf::cuda::PagedBatch batch{ints, ints + n_blocks, ints + n_blocks + S, S, context};
    constexpr int kLaunches = 20;
    const double t = median_time(reps, [&] {
                       for (int i = 0; i < kLaunches; ++i) {
                         const int j = i % copies;
                         const rf::cuda::PagedLayer layer{caches[size_t(2 * j)], caches[size_t(2 * j + 1)], B, c.n_kv_heads, hd, true};
                         rf::cuda::decode_attention(o, q, long(c.n_heads) * hd, layer, batch, c.n_heads, scale, 0, scratch, nullptr);
                       }
                     }) / kLaunches;
    check(cudaGetLastError(), "decode_attention");
    for (void* p : caches) cudaFree(p);
    for (void* p : {static_cast<void*>(ints), static_cast<void*>(q), static_cast<void*>(o), static_cast<void*>(scratch)}) cudaFree(p);
    const double bytes = 2.0 * double(S) * context * c.n_kv_heads * hd * 2;
    std::fprintf(stderr, "decode attention alone (%d x %d tokens, hd %d): %.1f us a layer (%.0f%% of copy), %.0f us a step\n", S, context,
                 hd, t * 1e6, 100 * bytes / t / bw, t * c.n_layers * 1e6);
    out += std::string(out.size() > 1 ? ", " : "") + "{\"sequences\": " + num(S) + ", \"context\": " +
           num(context) + ", \"seconds\": " + num(t) + ", \"bytes\": " + num(bytes) +
           ", \"ratioToCopy\": " + num(bytes / t / bw) + ", \"stepSeconds\": " + num(t * c.n_layers) + "}";
  }
  return out + "]";
}

// The decode step's products alone, gemv_rows against matmul (cuBLASLt), bf16 W and x, on W copies
// that together exceed the L2 (so W comes from memory, as in a decode step), 20 launches per
// timing (the launch gaps a graph replay also has). The gate|up product runs with its SwiGLU on
// gemv_rows and as the bare product on cuBLASLt (the unfused path adds a launch for the SwiGLU).
std::string gemv_alone(const rf::ModelConfig& c, double bw, int reps, size_t l2_bytes) {
  struct P {
    const char* name;
    int N, K;
    bool glu;
  };
  const int H = c.hidden, I = c.intermediate;
  const P products[] = {{"qkv", int(c.q_dim() + 2 * c.kv_dim()), H, false}, {"o", H, int(c.q_dim()), false}, {"mlp_in", 2 * I, H, true},
                        {"down", H, I, false}, {"head", c.vocab, H, false}};
  rf::cuda::GemmContext ctx;
  std::string out = "[";
  for (const P& p : products) {
    const size_t wbytes = size_t(p.N) * p.K * 2;
    const int copies = int(std::max<size_t>(1, l2_bytes / wbytes + 1));
    std::vector<void*> ws(static_cast<size_t>(copies));
    for (void*& w : ws) {
      check(cudaMalloc(&w, wbytes), "cudaMalloc");
      cudaMemset(w, 0, wbytes);
    }
    void *x = nullptr, *y = nullptr;
    check(cudaMalloc(&x, size_t(rf::cuda::kGemvMaxRows) * p.K * 2), "cudaMalloc");
    check(cudaMalloc(&y, size_t(rf::cuda::kGemvMaxRows) * p.N * 4), "cudaMalloc");
    cudaMemset(x, 0, size_t(rf::cuda::kGemvMaxRows) * p.K * 2);
    for (int rows : {1, rf::cuda::kGemvMaxRows}) {
      constexpr int kLaunches = 20;
      rf::cuda::GemvArgs a;
      a.x = x, a.type = rf::DType::bf16, a.rows = rows, a.N = p.N, a.K = p.K, a.glu = p.glu, a.y = static_cast<float*>(y);
      const double tg = median_time(reps, [&] {
                          for (int i = 0; i < kLaunches; ++i) {
                            a.w = ws[size_t(i % copies)];
                            rf::cuda::gemv_rows(a, nullptr);
                          }
                        }) / kLaunches;
      const double tl = median_time(reps, [&] {
                          for (int i = 0; i < kLaunches; ++i)
                            rf::cuda::matmul(ctx, static_cast<float*>(y), x, rf::DType::bf16, ws[size_t(i % copies)], rf::DType::bf16,
                                             rows, p.N, p.K, nullptr, 0.f, nullptr);
                        }) / kLaunches;
      std::fprintf(stderr, "%s alone, rows %d: gemv_rows %.1f us (%.0f%% of copy), cuBLASLt %.1f us (%.0f%%)\n", p.name, rows, tg * 1e6,
                   100 * wbytes / tg / bw, tl * 1e6, 100 * wbytes / tl / bw);
      out += std::string(out.size() > 1 ? ", " : "") + "{\"product\": \"" + p.name + "\", \"rows\": " + num(rows) +
             ", \"N\": " + num(p.N) + ", \"K\": " + num(p.K) + ", \"swiglu\": " + (p.glu ? "true" : "false") +
             ", \"gemvSeconds\": " + num(tg) + ", \"cublasLtSeconds\": " + num(tl) +
             ", \"gemvRatioToCopy\": " + num(wbytes / tg / bw) + ", \"cublasLtRatioToCopy\": " +
             num(wbytes / tl / bw) + "}";
    }
    for (void* w : ws) cudaFree(w);
    cudaFree(x);
    cudaFree(y);
  }
  return out + "]";
}

int main(int argc, char** argv) {
  bool quick = false, tiny = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--tiny") tiny = quick = true;
    else if (a.rfind("--model=", 0) == 0) only = a.substr(8);
  }
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("{\"bench\": \"cuda\", \"skipped\": \"no CUDA device visible (%s)\"}\n", info.error.c_str());
    return 0;
  }
  std::fprintf(stderr, "cuda_bench: %s\n", info.name.c_str());
  const double bw = tiny ? copy_bandwidth(1L << 20) : copy_bandwidth();
  const double tflops = tiny ? bf16_flops(64) : bf16_flops();
  std::fprintf(stderr, "ceilings: copy %.0f GB/s, bf16 %.0f TFLOP/s\n", bw / 1e9, tflops / 1e12);

  const std::vector<Shape> shapes =
      tiny ? std::vector<Shape>{{"tiny-tied", tiny_llama(1000, 64, 2, 1, 32, true)}, {"tiny", tiny_llama(1003, 128, 4, 2, 32, false)}}
           : std::vector<Shape>{
                 {"llama-3.2-1b", llama(128256, 2048, 8192, 16, 32, 8, 64, true, 32.0)},
                 {"llama-3.1-8b", llama(128256, 4096, 14336, 32, 32, 8, 128, false, 8.0)},
             };
  // The sizes of each part (--tiny: a few tokens and sequences, on either side of the kernels'
  // limits: kGemvMaxRows, a KV block).
  const std::vector<int> contexts = tiny ? std::vector<int>{16, 40} : std::vector<int>{128, 4096};
  const int short_context = contexts[0];
  const std::vector<int> batches = tiny ? std::vector<int>{2, rf::cuda::kGemvMaxRows + 1} : std::vector<int>{8, 64, 256};
  const std::vector<int> adapter_batches = tiny ? std::vector<int>{1, 2, rf::cuda::kGemvMaxRows + 1} : std::vector<int>{1, 8, 32};
  const std::vector<std::pair<int, int>> attention_cases =
      tiny ? std::vector<std::pair<int, int>>{{1, 16}, {2, 40}} : std::vector<std::pair<int, int>>{{1, 128}, {1, 4096}, {8, 4096}};
  const int prefill_tokens = tiny ? 40 : 2048;
  const size_t l2_bytes = tiny ? 0 : size_t(256) << 20;  // what the products' and attention's copies exceed
  std::string json = "{\"bench\": \"cuda\", \"device\": \"" + info.name + "\", \"ceilings\": {\"copyGBs\": " +
                     num(bw / 1e9) + ", \"bf16Tflops\": " + num(tflops / 1e12) + "}, \"models\": [";
  bool first = true;
  for (const Shape& shape : shapes) {
    if (!only.empty() && std::string(shape.name).find(only) == std::string::npos) continue;
    const rf::ModelConfig& c = shape.c;
    std::fprintf(stderr, "%s: loading random bf16 weights\n", shape.name);
    rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
    m.set_kv_pool_bytes(tiny ? size_t(64) << 20 : size_t(40) << 30);
    load_random(m);
    const int rf_token = c.vocab - 1;
    const int steps = tiny ? 2 : quick ? 16 : 64;
    const double kv_per_position = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * 2;  // bf16 K and V
    // Weight bytes a decode step reads: all of them, but of an input embedding apart from the
    // LM head (untied) only the rows of the tokens fed, one per sequence (8B: 1 GB it never reads).
    const double embed_unread = c.tied_embeddings ? 0.0 : (double(c.vocab) - 1.0) * c.hidden * 2;
    const double step_weight_bytes = double(m.weight_bytes()) - embed_unread;
    std::string r = std::string(first ? "" : ", ") + "{\"model\": \"" + shape.name + "\", \"weightBytes\": " +
                    num(double(m.weight_bytes())) + ", \"decode\": [";
    first = false;
    double step_seconds_1 = 0;
    for (int ctx : contexts) {
      const auto [rate, no_gemv] = decode_rates(m, 1, ctx, steps, rf_token);
      m.set_graphs(false);  // the same steps launched kernel by kernel: what the decode graphs gain
      const double eager = decode_rate(m, 1, ctx, steps, rf_token);
      m.set_graphs(true);
      // Every kernel waiting for the previous one to end (the graphs are keyed by the setting).
      const bool dependent = rf::cuda::dependent_launch_on();
      rf::cuda::set_dependent_launch(false);
      const double serial = decode_rate(m, 1, ctx, steps, rf_token);
      const long launches = m.graph_stats().last_nodes;  // that step's graph: gemv_rows, as by default
      rf::cuda::set_dependent_launch(dependent);
      const double bound = bw / (step_weight_bytes + kv_per_position * (ctx + steps / 2.0));
      if (ctx == short_context) step_seconds_1 = 1.0 / rate;
      std::fprintf(stderr, "%s: batch 1, context %d: %.1f tokens/s (bound %.1f; without graphs %.1f; without gemv %.1f; without "
                   "dependent launches %.1f)\n", shape.name, ctx, rate, bound, eager, no_gemv, serial);
      r += std::string(ctx == short_context ? "" : ", ") + "{\"batch\": 1, \"context\": " + num(ctx) + ", \"tokensPerSecond\": " +
           num(rate) + ", \"bandwidthBound\": " + num(bound) + ", \"ratioToBound\": " + num(rate / bound) +
           ", \"withoutGraphsTokensPerSecond\": " + num(eager) + ", \"withoutGemvTokensPerSecond\": " +
           num(no_gemv) + ", \"launchesPerStep\": " + num(launches) + ", \"dependentLaunch\": " +
           (dependent ? "true" : "false") +
           ", \"withoutDependentLaunchTokensPerSecond\": " + num(serial) + "}";
    }
    for (int n : batches) {
      const int batch_steps = tiny ? 2 : quick ? 8 : 32;
      const auto [rate, no_gemv] = n <= rf::cuda::kGemvMaxRows
                                       ? decode_rates(m, n, short_context, batch_steps, rf_token)
                                       : std::pair<double, double>{decode_rate(m, n, short_context, batch_steps, rf_token), 0};
      std::fprintf(stderr, "%s: batch %d: %.0f tokens/s\n", shape.name, n, rate);
      r += ", {\"batch\": " + num(n) + ", \"context\": " + num(short_context) + ", \"tokensPerSecond\": " +
           num(rate) +
           (no_gemv > 0 ? ", \"withoutGemvTokensPerSecond\": " + num(no_gemv) : std::string()) + "}";
    }
    r += "]";

    // Prefill of 2048 tokens (logits of the last row only).
    {
      const int T = prefill_tokens;
      std::vector<uint32_t> prompt(static_cast<size_t>(T));
      for (int i = 0; i < T; ++i) prompt[size_t(i)] = uint32_t((i * 104729) % c.vocab);
      std::vector<float> out(static_cast<size_t>(c.vocab));
      std::vector<double> times;
      for (int rep = 0; rep < (tiny ? 1 : quick ? 2 : 5); ++rep) {
        auto s = m.new_sequence();
        const auto t0 = Clock::now();
        m.forward({{s.get(), prompt.data(), T}}, rf::LogitsMode::last, out.data());
        times.push_back(seconds_since(t0));
      }
      std::sort(times.begin(), times.end());
      const double t = times[times.size() / 2];
      const double flops = 2.0 * non_embedding_params(c) * T + 2.0 * 2.0 * c.n_layers * c.n_heads * c.head_dim * double(T) * T / 2.0 +
                           2.0 * double(c.hidden) * c.vocab;
      std::fprintf(stderr, "%s: prefill %d: %.3f s, %.0f TFLOP/s\n", shape.name, T, t, flops / t / 1e12);
      r += ", \"prefill\": {\"tokens\": " + num(T) + ", \"seconds\": " + num(t) + ", \"tflops\": " +
           num(flops / t / 1e12) + ", \"ratioToBf16\": " + num(flops / t / tflops) + "}";
    }

    const int reps = tiny ? 1 : quick ? 5 : 20;
    r += ", \"prefillAttention\": " + attention_alone(c, prefill_tokens, tflops, tiny ? 1 : quick ? 3 : 10);
    r += ", \"gemvAlone\": " + gemv_alone(c, bw, reps, l2_bytes);
    r += ", \"decodeAttentionAlone\": " + decode_attention_alone(c, bw, reps, attention_cases, l2_bytes);

    // The fused pick epilogue alone on one row of logits.
    {
      float* logits = nullptr;
      rf::cuda::DevicePick* params = nullptr;
      int* flags = nullptr;
      uint32_t* token = nullptr;
      float *lp = nullptr, *p_rf = nullptr;
      check(cudaMalloc(&logits, size_t(c.vocab) * 4), "cudaMalloc");
      check(cudaMalloc(&params, sizeof(rf::cuda::DevicePick)), "cudaMalloc");
      check(cudaMalloc(&flags, sizeof(int)), "cudaMalloc");
      check(cudaMalloc(&token, 4), "cudaMalloc");
      check(cudaMalloc(&lp, 4), "cudaMalloc");
      check(cudaMalloc(&p_rf, 4), "cudaMalloc");
      void* pick_scratch = nullptr;
      check(cudaMalloc(&pick_scratch, rf::cuda::pick_scratch_bytes(1, c.vocab)), "cudaMalloc");
      // Logits spread like a model's (a sum of uniforms, sd about 3), so the sampled picks' sorts
      // and sums see realistic keys.
      std::vector<float> z(static_cast<size_t>(c.vocab));
      uint64_t state = 0x853c49e6748fea9bull;
      for (float& v : z) {
        float sum = 0.f;
        for (int k = 0; k < 4; ++k) {
          state ^= state << 13, state ^= state >> 7, state ^= state << 17;
          sum += float(state >> 40) / float(1 << 24) - 0.5f;
        }
        v = 5.2f * sum;
      }
      cudaMemcpy(logits, z.data(), z.size() * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(flags, &rf_token, sizeof(int), cudaMemcpyHostToDevice);
      const auto time_pick = [&](float temperature, int top_k, float top_p) {
        rf::cuda::DevicePick dp{temperature, 7, 1};
        dp.top_k = top_k, dp.top_p = top_p;
        cudaMemcpy(params, &dp, sizeof dp, cudaMemcpyHostToDevice);
        return median_time(tiny ? 1 : 50, [&] {
          rf::cuda::pick_rows(logits, 1, c.vocab, params, flags, 1, token, lp, p_rf, nullptr, 0, nullptr, nullptr, pick_scratch, nullptr,
                              rf::cuda::pick_draws_whole(dp));  // as decode_step: no weights' launch for a greedy row
        });
      };
      const double t = time_pick(0.f, 0, 1.f);  // greedy
      // Sampled: temperature alone, Llama-3's generation_config (0.6, top-p 0.9), and top-k 50.
      struct Sampled {
        float temperature;
        int top_k;
        float top_p;
      };
      std::string sampled;
      for (const Sampled& sp : {Sampled{1.f, 0, 1.f}, Sampled{0.6f, 0, 0.9f}, Sampled{0.7f, 50, 1.f}}) {
        const double ts = time_pick(sp.temperature, sp.top_k, sp.top_p);
        std::fprintf(stderr, "%s: pick epilogue, temperature %.1f top-k %d top-p %.1f: %.1f us, %.2f%% of a batch-1 step\n", shape.name,
                     sp.temperature, sp.top_k, sp.top_p, ts * 1e6, 100 * ts / step_seconds_1);
        sampled += std::string(sampled.empty() ? "" : ", ") + "{\"temperature\": " + num(sp.temperature) +
                   ", \"topK\": " + num(sp.top_k) + ", \"topP\": " + num(sp.top_p) + ", \"seconds\": " +
                   num(ts) + ", \"fractionOfDecodeStep\": " + num(ts / step_seconds_1) + "}";
      }
      for (void* p : {static_cast<void*>(logits), static_cast<void*>(params), static_cast<void*>(flags), static_cast<void*>(token),
                      static_cast<void*>(lp), static_cast<void*>(p_rf), pick_scratch})
        cudaFree(p);
      std::fprintf(stderr, "%s: pick epilogue %.1f us, %.2f%% of a batch-1 step\n", shape.name, t * 1e6, 100 * t / step_seconds_1);
      r += ", \"pickEpilogue\": {\"seconds\": " + num(t) + ", \"fractionOfDecodeStep\": " + num(t / step_seconds_1) +
           ", \"sampled\": [" + sampled + "]}";
    }

    // The detector's default: the adapter unmerged (last: it stays on the model). A failure here
    // is reported in the JSON and leaves the figures above standing.
    try {
      const double adapter_bytes = add_random_adapter(m, 16, rf_token);
      std::string a = ", \"adapterDecode\": {\"rank\": 16, \"adapterBytes\": " + num(adapter_bytes) + ", \"steps\": [";
      for (int n : adapter_batches) {
        const auto [rate, no_gemv] = decode_rates(m, n, short_context, steps, rf_token);
        const double bound =
            double(n) * bw / (step_weight_bytes + adapter_bytes + n * kv_per_position * (short_context + steps / 2.0));
        std::fprintf(stderr, "%s: with the adapter, batch %d: %.1f tokens/s (bound %.1f; without gemv %.1f)\n", shape.name, n, rate,
                     bound, no_gemv);
        a += std::string(n == 1 ? "" : ", ") + "{\"batch\": " + num(n) + ", \"context\": " + num(short_context) +
             ", \"tokensPerSecond\": " +
             num(rate) + ", \"bandwidthBound\": " + num(bound) + ", \"ratioToBound\": " +
             num(rate / bound) + ", \"withoutGemvTokensPerSecond\": " + num(no_gemv) + "}";
      }
      r += a + "]}";
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: adapter decode failed: %s\n", shape.name, e.what());
      std::string msg = e.what();
      std::replace(msg.begin(), msg.end(), '"', '\'');  // stays a JSON string
      r += ", \"adapterDecodeError\": \"" + msg + "\"";
    }
    json += r + "}";
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}
