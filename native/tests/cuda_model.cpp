// The CUDA model engine (native/cuda/device_model.h) against the CPU engine, both loaded with
// the same random weights through load_tensor, on a GPU machine (elsewhere: "no CUDA device
// visible; skipped", exit 0). Built where cuBLASLt links.
//
// Per config (Llama with GQA and q/k/v biases, head_dim 64 / 80 / 128 with GQA ratios 1 / 3 / 8,
// Mistral's sliding window, llama3 rope scaling with tied embeddings, GPT-2 with learned
// positions, LayerNorm, gelu_new and [in, out] weights):
//  - f32 logits of a batch of mixed-length prompts equal the CPU's: relative L2 <= 1e-4 per row
//    (both sum in f32, in different orders; cuBLASLt in f32 compute, never TF32);
//  - decode one token at a time through the paged cache (crossing 16-token block boundaries)
//    and a chunked prefill that continues a cache equal the CPU's full prefill, same bound;
//  - with LoRA on every projection and trained flag rows, decode_step's greedy tokens equal the
//    CPU's (rows whose top two logits are within 1e-3 are near-ties: counted, not compared),
//    log-probabilities and p(flags) within 1e-4 absolute; a seeded temperature draw picks the
//    CPU's token (same counter-based draw; near-ties in the CDF excepted the same way); every
//    third step's top 4 tokens the CPU's at each place 1e-3 clear of its neighbours, their
//    log-probabilities within 1e-4;
//  - token_scores' p(flags) and next-token log-probabilities within 1e-4;
//  - bf16 weights (prefill attention on the tensor cores) against the CPU's f32: relative L2
//    <= 2e-2 for a batch's logits, decode steps and a continuing chunk (3e-2 with Qwen3's per-head
//    q/k norms: see run_config); batch independence as below;
//  - a batch of 32 mixed-length sequences equals each sequence alone (device against device):
//    relative L2 <= 1e-5 (the batch's products through cuBLASLt, each alone's through gemv_rows);
//  - decode steps replayed from CUDA graphs equal the same steps run eagerly, bit for bit, as
//    the step's block tables change length at one batch size (graph_table_growth), as the batch
//    shrinks, the adapter is switched off and on, the flag count changes and the
//    decode products move from gemv_rows (cuda/gemv.h, the default at <= 8 rows) to cuBLASLt,
//    the graphs captured with dependent launches (cuda/launch.h) and the eager steps without;
//  - a captured decode step has the launches the README counts (check_launches), bf16 alone
//    and f32 with adapters on every projection;
//  - a full pool refuses a sequence with a clear error, and freeing sequences gives the blocks
//    back; loading and freeing a model 20 times leaves device memory within 1 MiB of its start;
//  - out of device memory (check_out_of_memory), every call fails cleanly and changes nothing;
//  - a lost CUDA context (check_device_failure, last): every call throws DeviceFailed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "cuda/device_model.h"
#include "cuda/launch.h"
#include "cuda/memory.h"
#include "cuda/ops.h"
#include "core/dtype.h"
#include "model/decode.h"
#include "model/layout.h"
#include "model/model.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

struct Pair {
  std::unique_ptr<rf::Model> cpu;
  std::unique_ptr<rf::cuda::DeviceModel> gpu;
};

Pair make_pair(const rf::ModelConfig& c, rf::DType gpu_dtype, unsigned seed) {
  Pair p;
  p.cpu = std::make_unique<rf::Model>(c, rf::DType::f32, 2);
  rf::test::load_random(*p.cpu, seed);
  p.gpu = std::make_unique<rf::cuda::DeviceModel>(c, gpu_dtype, 0);
  rf::test::load_random(*p.gpu, seed);
  p.gpu->set_kv_pool_bytes(size_t(256) << 20);
  return p;
}

std::vector<uint32_t> random_ids(std::mt19937& rng, int n, int vocab) {
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (auto& t : ids) t = rng() % uint32_t(vocab);
  return ids;
}

// Worst per-row relative L2 of [rows, width] arrays.
double worst_row(const std::vector<float>& got, const std::vector<float>& want, long width) {
  double worst = 0;
  for (size_t r = 0; r * width < want.size(); ++r) {
    std::vector<float> a(got.begin() + long(r) * width, got.begin() + long(r + 1) * width);
    std::vector<float> b(want.begin() + long(r) * width, want.begin() + long(r + 1) * width);
    worst = std::max(worst, rel_l2(a, b));
  }
  return worst;
}

std::vector<float> cpu_all(rf::Model& m, const std::vector<std::vector<uint32_t>>& seqs) {
  std::vector<rf::KvCache> caches;
  for (size_t i = 0; i < seqs.size(); ++i) caches.push_back(m.new_cache());
  std::vector<rf::ForwardItem> items;
  for (size_t i = 0; i < seqs.size(); ++i) items.push_back({&caches[i], seqs[i].data(), int(seqs[i].size())});
  std::vector<float> out(size_t(rf::Model::logits_rows(items, rf::LogitsMode::all)) * m.vocab());
  m.forward(items, rf::LogitsMode::all, out.data());
  return out;
}

std::vector<float> gpu_all(rf::cuda::DeviceModel& m, const std::vector<std::vector<uint32_t>>& seqs) {
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> s;
  std::vector<rf::cuda::DeviceItem> items;
  long rows = 0;
  for (const auto& ids : seqs) {
    s.push_back(m.new_sequence());
    items.push_back({s.back().get(), ids.data(), int(ids.size())});
    rows += long(ids.size());
  }
  std::vector<float> out(size_t(rows) * m.vocab());
  m.forward(items, rf::LogitsMode::all, out.data());
  return out;
}

void check_logits(const std::string& tag, Pair& p, double bound) {
  std::mt19937 rng(5);
  const int V = p.cpu->vocab();
  const std::vector<std::vector<uint32_t>> seqs{random_ids(rng, 1, V), random_ids(rng, 5, V), random_ids(rng, 17, V),
                                                 random_ids(rng, 40, V)};
  const double e = worst_row(gpu_all(*p.gpu, seqs), cpu_all(*p.cpu, seqs), V);
  check(e <= bound, tag + ": batched prefill logits equal the CPU's (worst row rel L2 " + std::to_string(e) + ")");
}

void check_decode(const std::string& tag, Pair& p, double bound = 1e-4) {
  std::mt19937 rng(9);
  const int V = p.cpu->vocab();
  const std::vector<uint32_t> ids = random_ids(rng, 37, V);
  const std::vector<float> full = cpu_all(*p.cpu, {ids});
  auto seq = p.gpu->new_sequence();
  std::vector<float> step(size_t(5) * V);
  p.gpu->forward({{seq.get(), ids.data(), 5}}, rf::LogitsMode::all, step.data());
  double worst = worst_row(step, std::vector<float>(full.begin(), full.begin() + 5L * V), V);
  std::vector<float> one(static_cast<size_t>(V));
  for (size_t t = 5; t < 20; ++t) {
    p.gpu->forward({{seq.get(), ids.data() + t, 1}}, rf::LogitsMode::last, one.data());
    worst = std::max(worst, rel_l2(one, std::vector<float>(full.begin() + long(t) * V, full.begin() + long(t + 1) * V)));
  }
  // The rest as a chunk that continues the cache.
  std::vector<float> rest(size_t(ids.size() - 20) * V);
  p.gpu->forward({{seq.get(), ids.data() + 20, int(ids.size() - 20)}}, rf::LogitsMode::all, rest.data());
  worst = std::max(worst, worst_row(rest, std::vector<float>(full.begin() + 20L * V, full.end()), V));
  check(worst <= bound && seq->length() == long(ids.size()),
        tag + ": decode and a continuing chunk equal the CPU's prefill (worst rel L2 " + std::to_string(worst) + ")");
}

// LoRA factors on every projection and flag rows, drawn from one seed. The ranks and scales
// differ from one projection to the next (PEFT's rank_pattern and alpha_pattern), so the fused
// q|k|v and gate|up products see adapters of different ranks side by side.
struct AdapterSet {
  struct Module {
    int layer;
    std::string name;
    long in, out;
    int rank;
    float scale;               // alpha / rank, alpha 8
    std::vector<float> A, B;  // [rank, in], [out, rank]
  };
  std::vector<Module> modules;
  std::vector<int> flags;
  std::vector<float> embed, head;
};

AdapterSet random_adapters(const rf::ModelConfig& c, unsigned seed) {
  std::mt19937 rng(seed);
  const long H = c.hidden, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate;
  struct Site { const char* name; long in, out; };
  const std::vector<Site> sites =
      c.arch == rf::Arch::gpt2
          ? std::vector<Site>{{"attn.c_attn", H, 3 * H}, {"attn.c_proj", H, H}, {"mlp.c_fc", H, I}, {"mlp.c_proj", I, H}}
          : std::vector<Site>{{"q_proj", H, Q},     {"k_proj", H, KV}, {"v_proj", H, KV},  {"o_proj", Q, H},
                              {"gate_proj", H, I}, {"up_proj", H, I}, {"down_proj", I, H}};
  AdapterSet a;
  const int ranks[] = {4, 2, 5, 3, 6, 1, 4};  // by site; the layers shift them
  for (int l = 0; l < c.n_layers; ++l)
    for (size_t si = 0; si < sites.size(); ++si) {
      const Site& s = sites[si];
      const int rank = ranks[(si + size_t(l)) % 7];
      std::vector<float> A = rf::test::randn(rng, size_t(rank * s.in), 0.1f);
      std::vector<float> B = rf::test::randn(rng, size_t(s.out * rank), 0.1f);
      a.modules.push_back({l, s.name, s.in, s.out, rank, 8.f / float(rank), std::move(A), std::move(B)});
    }
  a.flags = {c.vocab - 1, c.vocab - 2, c.vocab - 3};
  a.embed = rf::test::randn(rng, a.flags.size() * H, 0.5f);
  a.head = rf::test::randn(rng, a.flags.size() * H, 0.5f);
  return a;
}

// LoRA on every projection and trained flag rows, the same on both engines.
void add_adapters(Pair& p, unsigned seed) {
  const AdapterSet a = random_adapters(p.cpu->config(), seed);
  for (const AdapterSet::Module& m : a.modules) {
    const std::string pre = "layers." + std::to_string(m.layer) + "." + m.name + ".";
    rf::Param* pa = p.cpu->new_param(pre + "lora_A", {m.rank, m.in});
    rf::Param* pb = p.cpu->new_param(pre + "lora_B", {m.out, m.rank});
    pa->value = m.A;
    pb->value = m.B;
    p.cpu->add_lora(m.layer, m.name, pa, pb, m.scale);
    p.gpu->add_lora(m.layer, m.name, m.A.data(), m.in, m.B.data(), m.out, m.rank, m.scale);
  }
  rf::Param* e = p.cpu->new_param("rf.embed", {long(a.embed.size())}, false);
  rf::Param* h = p.cpu->new_param("rf.head", {long(a.head.size())}, false);
  e->value = a.embed;
  h->value = a.head;
  p.cpu->set_token_rows(a.flags, e, h);
  p.gpu->set_token_rows(a.flags, a.embed.data(), a.head.data());
}

// The merged checkpoint as lib/train/merge.ts writes it, loaded: load_random's tensors with the
// adapters folded into the projections on the host (checkpoint layout, GPT-2's [in, out]
// included), in the engine's dtype first (a bf16 checkpoint), rounded once more after.
struct HostMergedLoader {
  rf::cuda::DeviceModel& m;
  const AdapterSet& a;
  const rf::ModelConfig& config() const { return m.config(); }
  void load_tensor(const std::string& name, const void* data, rf::SrcType type, const std::vector<long>& shape, bool kn) {
    const bool bf16 = m.dtype() == rf::DType::bf16;
    const rf::ModelConfig& c = m.config();
    static const char* const linears[] = {"qkv", "o", "mlp_in", "mlp_out"};
    int layer = -1, index = -1;
    for (int l = 0; l < c.n_layers && index < 0; ++l)
      for (int k = 0; k < 4; ++k)
        if (name == "layers." + std::to_string(l) + "." + linears[k] + ".weight") layer = l, index = k;
    if (index < 0) return m.load_tensor(name, data, type, shape, kn);
    std::vector<float> w(static_cast<const float*>(data), static_cast<const float*>(data) + shape[0] * shape[1]);
    const auto round = [&] {
      if (bf16)
        for (float& v : w) v = rf::bf16_to_f32(rf::f32_to_bf16(v));
    };
    round();
    const long total_out = kn ? shape[1] : shape[0], in = kn ? shape[0] : shape[1];
    for (const AdapterSet::Module& mod : a.modules) {
      const rf::LoraSite site = rf::lora_site(c, mod.name);
      if (mod.layer != layer || site.index != index) continue;
      for (long o = 0; o < mod.out; ++o)
        for (long i = 0; i < in; ++i) {
          double acc = 0.0;
          for (int k = 0; k < mod.rank; ++k) {
            const float b = mod.B[size_t(o) * mod.rank + k];
            if (b != 0.f) acc += double(b) * double(mod.A[size_t(k) * in + i]);
          }
          const volatile float delta = float(acc) * mod.scale;
          float& v = kn ? w[size_t(i) * total_out + site.offset + o] : w[size_t(site.offset + o) * in + i];
          v = v + delta;
        }
    }
    round();
    m.load_tensor(name, w.data(), rf::SrcType::f32, shape, kn);
  }
};

// An adapter merged on the device (DeviceModel::merge_lora) gives the same logits, bit for bit,
// as the merged checkpoint loaded (HostMergedLoader), and the live adapter's up to rounding; once
// merged, the adapter can be neither switched off nor removed (cuda_train: nor trained).
void check_merge(const std::string& name, const rf::ModelConfig& c, rf::DType dtype, double bound) {
  const AdapterSet a = random_adapters(c, 31);
  auto model = [&](bool host_merged) {
    auto m = std::make_unique<rf::cuda::DeviceModel>(c, dtype, 0);
    if (host_merged) {
      HostMergedLoader loader{*m, a};
      rf::test::load_random(loader, 7);
    } else {
      rf::test::load_random(*m, 7);
    }
    m->set_kv_pool_bytes(size_t(64) << 20);
    m->set_token_rows(a.flags, a.embed.data(), a.head.data());
    return m;
  };
  auto live = model(false), merged = model(false), host = model(true);
  for (const AdapterSet::Module& mod : a.modules) {
    live->add_lora(mod.layer, mod.name, mod.A.data(), mod.in, mod.B.data(), mod.out, mod.rank, mod.scale);
    merged->merge_lora(mod.layer, mod.name, mod.A.data(), mod.in, mod.B.data(), mod.out, mod.rank, mod.scale);
  }
  std::mt19937 rng(5);
  const std::vector<std::vector<uint32_t>> seqs{random_ids(rng, 3, c.vocab), random_ids(rng, 19, c.vocab)};
  const std::vector<float> got = gpu_all(*merged, seqs), want = gpu_all(*host, seqs), with_lora = gpu_all(*live, seqs);
  long differ = 0;
  for (size_t i = 0; i < got.size(); ++i) differ += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
  check(differ == 0, name + ": merged on the device = the merged checkpoint loaded, bit for bit (" + std::to_string(differ) +
                         " of " + std::to_string(got.size()) + " logits differ)");
  const double e = worst_row(got, with_lora, c.vocab);
  check(e <= bound, name + ": merged logits equal the live adapter's (worst row rel L2 " + std::to_string(e) + ")");
  auto throws = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const std::invalid_argument& ex) {
      return std::string(ex.what()).find("merged") != std::string::npos;
    }
    return false;
  };
  check(throws([&] { merged->set_adapter_enabled(false); }) && throws([&] { merged->clear_adapters(); }),
        name + ": a merged adapter can be neither switched off nor removed (clear errors)");
}

// Sequences decoded step by step on both engines of a pair: at step 0 each one's prompt, then
// the token picked for it last (next).
struct Lockstep {
  std::vector<std::vector<uint32_t>> prompts;
  std::vector<uint32_t> next;
  std::vector<rf::KvCache> caches;
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> seqs;
  Lockstep(Pair& p, std::vector<std::vector<uint32_t>> prompts_) : prompts(std::move(prompts_)), next(prompts.size()) {
    for (size_t i = 0; i < prompts.size(); ++i) caches.push_back(p.cpu->new_cache()), seqs.push_back(p.gpu->new_sequence());
  }
  void items(int step, std::vector<rf::ForwardItem>& ci, std::vector<rf::cuda::DeviceItem>& gi) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      const uint32_t* t = step == 0 ? prompts[i].data() : &next[i];
      const int nt = step == 0 ? int(prompts[i].size()) : 1;
      ci.push_back({&caches[i], t, nt});
      gi.push_back({seqs[i].get(), t, nt});
    }
  }
};

void check_decode_step(const std::string& tag, Pair& p) {
  std::mt19937 rng(13);
  const int V = p.cpu->vocab(), n = 6, K = 3;
  const rf::ModelConfig& c = p.cpu->config();
  const std::vector<int> flag_ids{c.vocab - 1, c.vocab - 2, c.vocab - 3};
  std::vector<std::vector<uint32_t>> prompts;
  for (int i = 0; i < n; ++i) prompts.push_back(random_ids(rng, 1 + 7 * i, V));
  Lockstep run(p, prompts);
  std::vector<rf::PickParams> params(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    if (i % 2) params[size_t(i)].temperature = 0.8f;  // odd rows sample with a seed
    params[size_t(i)].seed = 100 + uint64_t(i);
  }
  int compared = 0, ties = 0, token_diff = 0, top_compared = 0, top_diff = 0;
  double worst_lp = 0, worst_p = 0, worst_top_lp = 0;
  for (int step = 0; step < 12; ++step) {
    // Every third step also asks for each row's 4 most likely tokens (picked on the device).
    const int top_n = step % 3 == 2 ? 4 : 0;
    std::vector<uint32_t> cti(size_t(n) * 4), gti(size_t(n) * 4);
    std::vector<float> ctl(size_t(n) * 4), gtl(size_t(n) * 4);
    std::vector<rf::ForwardItem> ci;
    std::vector<rf::cuda::DeviceItem> gi;
    run.items(step, ci, gi);
    std::vector<rf::Pick> cp(static_cast<size_t>(n)), gp(static_cast<size_t>(n));
    std::vector<float> cf(size_t(n) * K), gf(size_t(n) * K), logits;
    rf::decode_step(*p.cpu, ci, params, rf::Flags(flag_ids, cf.data()), top_n, cp.data(), cti.data(), ctl.data(), logits);
    p.gpu->decode_step(gi, params, rf::Flags(flag_ids, gf.data()), top_n, gp.data(), gti.data(), gtl.data());
    for (int i = 0; i < n; ++i) {
      // A near-tie: the CPU's top two logits within 1e-3 (greedy), or the draw landing within
      // 1e-4 of a CDF boundary is not checked here (sampled rows take the CPU's token afterwards).
      const float* z = logits.data() + long(i) * V;
      std::vector<float> sorted(z, z + V);
      std::partial_sort(sorted.begin(), sorted.begin() + 5, sorted.end(), std::greater<float>());
      // The top n: each place whose logit is 1e-3 clear of its neighbours names the CPU's token.
      for (int j = 0; j < top_n; ++j) {
        if (sorted[j] - sorted[j + 1] < 1e-3f || (j > 0 && sorted[j - 1] - sorted[j] < 1e-3f)) continue;
        ++top_compared;
        const size_t o = size_t(i) * 4 + size_t(j);
        if (cti[o] != gti[o]) ++top_diff;
        else worst_top_lp = std::max(worst_top_lp, double(std::fabs(ctl[o] - gtl[o])));
      }
      const bool tie = params[size_t(i)].temperature == 0.f && sorted[0] - sorted[1] < 1e-3f;
      if (tie) {
        ++ties;
      } else {
        ++compared;
        token_diff += cp[size_t(i)].token != gp[size_t(i)].token;
        if (cp[size_t(i)].token == gp[size_t(i)].token)
          worst_lp = std::max(worst_lp, double(std::fabs(cp[size_t(i)].logprob - gp[size_t(i)].logprob)));
      }
      worst_p = std::max(worst_p, double(std::fabs(cp[size_t(i)].p_rf - gp[size_t(i)].p_rf)));
      for (int k = 0; k < K; ++k) worst_p = std::max(worst_p, double(std::fabs(cf[size_t(i) * K + k] - gf[size_t(i) * K + k])));
      run.next[size_t(i)] = cp[size_t(i)].token;  // both continue with the CPU's token
    }
  }
  // A sampled row whose draw falls next to a CDF boundary may differ by rounding: allow 1 in 36.
  check(token_diff <= 1 && compared > 0,
        tag + ": decode_step picks the CPU's tokens (" + std::to_string(token_diff) + " differ of " + std::to_string(compared) +
            ", " + std::to_string(ties) + " near-ties)");
  check(worst_lp <= 1e-4 && worst_p <= 1e-4, tag + ": decode_step log-probs and flag p's equal the CPU's (worst " +
                                                 std::to_string(worst_lp) + ", " + std::to_string(worst_p) + ")");
  check(top_compared > 0 && top_diff == 0 && worst_top_lp <= 1e-4,
        tag + ": decode_step's top 4 equal the CPU's (" + std::to_string(top_diff) + " of " + std::to_string(top_compared) +
            " places differ, worst log-prob " + std::to_string(worst_top_lp) + ")");
}

// Rows the device leaves to the host (kPickFallback: a top_k, or a top-p nucleus, past
// kPickMaxCandidates = 2048 candidates), in one batch with rows it picks itself: a vocabulary of
// 4099, where a flat random model's 0.999 nucleus holds about 4000 tokens. Tokens, log-probs,
// flag p's and the top 3 as the CPU's decode_step, as in check_decode_step.
void check_pick_fallback(rf::ModelConfig c) {
  c.vocab = 4099;
  Pair p = make_pair(c, rf::DType::f32, 9);
  std::mt19937 rng(23);
  const int V = c.vocab, n = 4, K = 2, top_n = 3;
  const std::vector<int> flag_ids{V - 1, V - 2};
  std::vector<rf::PickParams> params(static_cast<size_t>(n));
  params[1].temperature = 1.f, params[1].top_p = 0.999f;  // the nucleus: past 2048
  params[2].temperature = 1.f, params[2].top_k = 3000;    // top_k past 2048
  params[3].temperature = 0.7f, params[3].top_k = 40, params[3].top_p = 0.9f;  // on the device
  for (int i = 0; i < n; ++i) params[size_t(i)].seed = 40 + uint64_t(i);
  std::vector<std::vector<uint32_t>> prompts;
  for (int i = 0; i < n; ++i) prompts.push_back(random_ids(rng, 2 + 3 * i, V));
  Lockstep run(p, prompts);
  int token_diff = 0, compared = 0, smallest_nucleus = V;
  double worst = 0;
  for (int step = 0; step < 3; ++step) {
    std::vector<rf::ForwardItem> ci;
    std::vector<rf::cuda::DeviceItem> gi;
    run.items(step, ci, gi);
    std::vector<rf::Pick> cp(static_cast<size_t>(n)), gp(static_cast<size_t>(n));
    std::vector<float> cf(size_t(n) * K), gf(size_t(n) * K), ctl(size_t(n) * top_n), gtl(size_t(n) * top_n), logits;
    std::vector<uint32_t> cti(size_t(n) * top_n), gti(size_t(n) * top_n);
    rf::decode_step(*p.cpu, ci, params, rf::Flags(flag_ids, cf.data()), top_n, cp.data(), cti.data(), ctl.data(), logits);
    p.gpu->decode_step(gi, params, rf::Flags(flag_ids, gf.data()), top_n, gp.data(), gti.data(), gtl.data());
    {  // row 1's nucleus, from the CPU's logits: the test is only what it says while it passes 2048
      const float* z = logits.data() + V;
      std::vector<double> pr(z, z + V);
      const double mx = *std::max_element(pr.begin(), pr.end());
      double total = 0, mass = 0;
      for (double& x : pr) total += (x = std::exp(x - mx));
      std::sort(pr.begin(), pr.end(), std::greater<double>());
      int k = 0;
      while (mass < 0.999 * total) mass += pr[size_t(k++)];
      smallest_nucleus = std::min(smallest_nucleus, k);
    }
    for (int i = 0; i < n; ++i) {
      // Near-ties as in check_decode_step: a greedy row whose top two logits are within 1e-3,
      // and each top-3 place not 1e-3 clear of its neighbours, are not compared.
      std::vector<float> sorted(logits.begin() + long(i) * V, logits.begin() + long(i + 1) * V);
      std::partial_sort(sorted.begin(), sorted.begin() + top_n + 1, sorted.end(), std::greater<float>());
      if (params[size_t(i)].temperature > 0.f || sorted[0] - sorted[1] >= 1e-3f) {
        ++compared;
        token_diff += cp[size_t(i)].token != gp[size_t(i)].token;
        if (cp[size_t(i)].token == gp[size_t(i)].token)
          worst = std::max(worst, double(std::fabs(cp[size_t(i)].logprob - gp[size_t(i)].logprob)));
      }
      worst = std::max(worst, double(std::fabs(cp[size_t(i)].p_rf - gp[size_t(i)].p_rf)));
      for (int k = 0; k < K; ++k) worst = std::max(worst, double(std::fabs(cf[size_t(i) * K + k] - gf[size_t(i) * K + k])));
      for (int j = 0; j < top_n; ++j) {
        if (sorted[j] - sorted[j + 1] < 1e-3f || (j > 0 && sorted[j - 1] - sorted[j] < 1e-3f)) continue;
        const size_t o = size_t(i) * top_n + size_t(j);
        ++compared;
        token_diff += cti[o] != gti[o];
        worst = std::max(worst, double(std::fabs(ctl[o] - gtl[o])));
      }
      run.next[size_t(i)] = cp[size_t(i)].token;
    }
  }
  check(smallest_nucleus > rf::cuda::kPickMaxCandidates,
        "pick fallback: the 0.999 nucleus holds " + std::to_string(smallest_nucleus) + " tokens, past the device's 2048");
  check(token_diff <= 1 && compared >= 12 && worst <= 1e-4, "pick fallback: rows the host picks (top_k and a nucleus past 2048) beside rows the "
                                          "device picks equal the CPU's decode_step (" + std::to_string(token_diff) + " of " +
                                          std::to_string(compared) + " tokens or top-3 places differ, worst " + std::to_string(worst) + ")");
}

// More decode shapes than the graph cache keeps (DecodeGraphs::kMaxGraphs = 64): 6 batch sizes x
// 11 flag counts, each run twice (eager once, then captured); the least recently used graphs are
// dropped, and a dropped shape is captured again when it comes back. Every step bit for bit as a
// second engine running eagerly; the counts of captures and replays pin which graphs were kept.
void check_graph_eviction(const rf::ModelConfig& c) {
  rf::cuda::DeviceModel graphed(c, rf::DType::f32, 0), eager(c, rf::DType::f32, 0);
  rf::test::load_random(graphed, 5);
  rf::test::load_random(eager, 5);
  graphed.set_kv_pool_bytes(size_t(64) << 20);
  eager.set_kv_pool_bytes(size_t(64) << 20);
  graphed.set_graphs(true);
  eager.set_graphs(false);
  const int V = c.vocab, seqs_n = 6, flags_n = 11;
  std::mt19937 rng(31);
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> a, b;
  std::vector<uint32_t> next(seqs_n);
  long differ = 0;
  // A greedy step of sequences first .. first + n - 1 with K flags: their prompts, or next.
  const auto step = [&](int first, int n, int K, const std::vector<uint32_t>* prompt = nullptr) {
    std::vector<int> flag_ids;
    for (int k = 0; k < K; ++k) flag_ids.push_back(V - 1 - k);
    std::vector<rf::PickParams> params(static_cast<size_t>(n));
    std::vector<rf::cuda::DeviceItem> ia, ib;
    for (int i = first; i < first + n; ++i) {
      const uint32_t* t = prompt ? prompt->data() : &next[size_t(i)];
      const int nt = prompt ? int(prompt->size()) : 1;
      ia.push_back({a[size_t(i)].get(), t, nt});
      ib.push_back({b[size_t(i)].get(), t, nt});
    }
    std::vector<rf::Pick> pa(static_cast<size_t>(n)), pb(static_cast<size_t>(n));
    std::vector<float> fa(size_t(n) * K), fb(size_t(n) * K);
    eager.decode_step(ia, params, rf::Flags(flag_ids, fa.data()), 0, pa.data(), nullptr, nullptr);
    graphed.decode_step(ib, params, rf::Flags(flag_ids, fb.data()), 0, pb.data(), nullptr, nullptr);
    for (int i = 0; i < n; ++i) {
      differ += pa[size_t(i)].token != pb[size_t(i)].token || std::memcmp(&pa[size_t(i)].logprob, &pb[size_t(i)].logprob, 4) != 0 ||
                std::memcmp(fa.data() + i * K, fb.data() + i * K, size_t(K) * 4) != 0;
      next[size_t(first + i)] = pa[size_t(i)].token;
    }
  };
  for (int i = 0; i < seqs_n; ++i) {
    a.push_back(eager.new_sequence()), b.push_back(graphed.new_sequence());
    const std::vector<uint32_t> prompt = random_ids(rng, 4, V);
    step(i, 1, 1, &prompt);  // each sequence's prompt, alone
  }
  // The largest shape first, eagerly: it sizes every scratch buffer, so that no graph is retired
  // below because a buffer it reads moved (only because it was dropped).
  step(0, seqs_n, flags_n);
  const rf::cuda::DeviceModel::GraphStats before = graphed.graph_stats();
  for (int n = 1; n <= seqs_n; ++n)
    for (int K = 1; K <= flags_n; ++K) step(0, n, K), step(0, n, K);  // 66 shapes: eager (but the first), then captured
  const rf::cuda::DeviceModel::GraphStats full = graphed.graph_stats();
  for (int K = 1; K <= 3; ++K) step(0, 1, K);  // the two dropped first come back, then a third
  const rf::cuda::DeviceModel::GraphStats back = graphed.graph_stats();
  step(0, 1, 1);  // kept since: replayed
  const rf::cuda::DeviceModel::GraphStats last = graphed.graph_stats();
  check(differ == 0, "graph cache past 64 shapes: every step bit for bit as the eager engine's (" + std::to_string(differ) + " rows differ)");
  check(full.captures - before.captures == 66 && full.replays == before.replays + 1 && back.captures - full.captures == 3 &&
            back.replays == full.replays && last.replays == back.replays + 1,
        "graph cache past 64 shapes: the least recently used dropped and captured again on return (captures " +
            std::to_string(full.captures - before.captures) + " then " + std::to_string(back.captures - full.captures) +
            ", replays " + std::to_string(back.replays - before.replays) + " then " + std::to_string(last.replays - back.replays) + ")");
}

// Decode steps replayed from CUDA graphs against the same steps run eagerly (a second engine with
// the same weights and adapters, graphs off): tokens, log-probs and flag p's bit for bit, while
// the batch shrinks, the adapter is switched off and on (the graphs' signature changes), the
// flag count changes (another graph), steps turn all greedy and back (another graph, without the
// pick's weights launch), sequences cross 16-token blocks (the tables grow), and the
// few-row products move from gemv_rows to cuBLASLt (set_gemv(false): the graphs are retired).
// The graphs are captured with dependent launches where the GPU has them (cuda/launch.h), the
// eager steps run without: a kernel that reads its predecessor's output before waiting for it
// differs here.
void check_graphs(const std::string& tag, rf::cuda::DeviceModel& graphed, rf::cuda::DeviceModel& eager, int steps) {
  eager.set_graphs(false);
  graphed.set_graphs(true);
  const bool dependent = rf::cuda::dependent_launch_on();
  std::mt19937 rng(17);
  const int V = graphed.vocab();
  std::vector<std::vector<uint32_t>> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back(random_ids(rng, 3 + 5 * i, V));
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> a, b;
  for (int i = 0; i < 4; ++i) a.push_back(eager.new_sequence()), b.push_back(graphed.new_sequence());
  std::vector<uint32_t> next(4);
  long differ = 0, compared = 0;
  for (int step = 0; step < steps; ++step) {
    const int n = step < steps / 2 ? 4 : 3;  // the last sequence stops half-way
    if (step == steps / 2 + 2) eager.set_adapter_enabled(false), graphed.set_adapter_enabled(false);
    if (step == steps / 2 + 5) eager.set_adapter_enabled(true), graphed.set_adapter_enabled(true);
    if (step == steps / 2 + 7) eager.set_gemv(false), graphed.set_gemv(false);  // cuBLASLt's products: new graphs
    const std::vector<int> flag_ids = step % 4 == 3 ? std::vector<int>{V - 1} : std::vector<int>{V - 1, V - 2, V - 3};
    const int K = int(flag_ids.size());
    std::vector<rf::PickParams> params(static_cast<size_t>(n));
    // Every other row sampled, but for runs of three steps with every row greedy, whose graphs
    // leave out the pick's weights launch: a sampled step of the same shape must not replay them.
    for (int i = 0; i < n; ++i)
      params[size_t(i)].temperature = i % 2 && step % 6 >= 3 ? 0.9f : 0.f, params[size_t(i)].seed = 5 + uint64_t(i);
    std::vector<rf::cuda::DeviceItem> ia, ib;
    for (int i = 0; i < n; ++i) {
      const uint32_t* t = step == 0 ? prompts[size_t(i)].data() : &next[size_t(i)];
      const int nt = step == 0 ? int(prompts[size_t(i)].size()) : 1;
      ia.push_back({a[size_t(i)].get(), t, nt});
      ib.push_back({b[size_t(i)].get(), t, nt});
    }
    std::vector<rf::Pick> pa(static_cast<size_t>(n)), pb(static_cast<size_t>(n));
    std::vector<float> fa(size_t(n) * K), fb(size_t(n) * K);
    rf::cuda::set_dependent_launch(false);
    eager.decode_step(ia, params, rf::Flags(flag_ids, fa.data()), 0, pa.data(), nullptr, nullptr);
    rf::cuda::set_dependent_launch(dependent);
    graphed.decode_step(ib, params, rf::Flags(flag_ids, fb.data()), 0, pb.data(), nullptr, nullptr);
    for (int i = 0; i < n; ++i) {
      ++compared;
      differ += pa[size_t(i)].token != pb[size_t(i)].token || std::memcmp(&pa[size_t(i)].logprob, &pb[size_t(i)].logprob, 4) != 0 ||
                std::memcmp(&pa[size_t(i)].p_rf, &pb[size_t(i)].p_rf, 4) != 0 ||
                std::memcmp(fa.data() + i * K, fb.data() + i * K, size_t(K) * 4) != 0;
      next[size_t(i)] = pa[size_t(i)].token;
    }
  }
  const rf::cuda::DeviceModel::GraphStats g = graphed.graph_stats(), e = eager.graph_stats();
  check(differ == 0 && compared > 0, tag + ": decode steps replayed from CUDA graphs equal eager ones bit for bit (" +
                                         std::to_string(differ) + " of " + std::to_string(compared) + " rows differ)");
  // Shapes: 4 and 3 sequences, each with 3 and 1 flags, and the adapter-off signature: each
  // runs eagerly once, is captured the next time, then replays.
  check(g.captures >= 5 && g.replays >= steps / 2 && e.captures == 0 && e.replays == 0,
        tag + ": graphs captured " + std::to_string(g.captures) + ", replayed " + std::to_string(g.replays) + ", eager first runs " +
            std::to_string(g.eager) + " (the engine with graphs off: none)");
}

// The launches of a captured decode step (greedy, one sequence, one flag row): the graph's nodes.
long decode_launches(rf::cuda::DeviceModel& m) {
  m.set_gemv(true);     // the few-row products' own path, whatever an earlier test left
  m.set_graphs(false);  // retires any graph, so the one read below is this shape's
  m.set_graphs(true);
  std::mt19937 rng(29);
  auto seq = m.new_sequence();
  const std::vector<uint32_t> prompt = random_ids(rng, 5, m.vocab());
  std::vector<rf::PickParams> params(1);
  std::vector<rf::Pick> pick(1);
  float p_flag = 0.f;
  uint32_t next = 0;
  for (int step = 0; step < 4; ++step) {  // the prompt, then one eager step, the capture and a replay
    const rf::cuda::DeviceItem item{seq.get(), step == 0 ? prompt.data() : &next, step == 0 ? 5 : 1};
    m.decode_step({item}, params, rf::Flags(std::vector<int>{m.vocab() - 1}, &p_flag), 0, pick.data(), nullptr, nullptr);
    next = pick[0].token;
  }
  return m.graph_stats().last_nodes;
}

// A decode step's launches, as the README counts them (up to 256 cached tokens, gemv_rows on):
// the embedding, then per layer
//   Llama family: the QKV product (norm, rope and cache append fused), attention, o, gate|up
//     (norm and SwiGLU fused), down: 5; with an adapter on all seven projections, a launch of
//     each projection's down products more: 9;
//   GPT-2: ln_1, c_attn, the cache append, attention, c_proj, ln_2, c_fc, gelu_new, c_proj: 9;
//     with adapters on its four projections, 13;
//   Qwen3: the Llama count and two: the per-head q/k norms, and the cache append (with rope),
//     which the QKV product's epilogue cannot do once the norms come between;
// then the final norm (GPT-2's LayerNorm; RMSNorm is fused into the head's product), the LM head,
// the trained flag rows' logits (with adapters), and the greedy pick's two launches.
void check_launches(const std::string& tag, rf::cuda::DeviceModel& m, bool adapters) {
  const rf::ModelConfig& c = m.config();
  const bool gpt2 = c.arch == rf::Arch::gpt2;
  const long per_layer = (gpt2 ? (adapters ? 13 : 9) : (adapters ? 9 : 5)) + (c.qk_norm ? 2 : 0);
  const long want = 1 + per_layer * c.n_layers + (gpt2 ? 1 : 0) + 1 + (adapters ? 1 : 0) + 2;
  const long got = decode_launches(m);
  check(got == want, tag + ": a captured decode step is " + std::to_string(got) + " launches (" + std::to_string(want) + " expected)");
}

void check_token_scores(const std::string& tag, Pair& p) {
  std::mt19937 rng(17);
  const int V = p.cpu->vocab(), K = 3;
  const rf::ModelConfig& c = p.cpu->config();
  const std::vector<int> flag_ids{c.vocab - 1, c.vocab - 2, c.vocab - 3};
  const std::vector<uint32_t> a = random_ids(rng, 30, V), b = random_ids(rng, 3, V);
  rf::KvCache ca = p.cpu->new_cache(), cb = p.cpu->new_cache();
  auto ga = p.gpu->new_sequence(), gb = p.gpu->new_sequence();
  const size_t R = a.size() + b.size();
  std::vector<float> cp(R), gp(R), cf(R * K), gf(R * K), cl(R), gl(R);
  rf::token_scores(*p.cpu, {{&ca, a.data(), int(a.size())}, {&cb, b.data(), int(b.size())}}, rf::Flags(flag_ids, cf.data()),
                   cp.data(), nullptr, cl.data());
  p.gpu->token_scores({{ga.get(), a.data(), int(a.size())}, {gb.get(), b.data(), int(b.size())}}, rf::Flags(flag_ids, gf.data()),
                      gp.data(), nullptr, gl.data());
  double worst = 0;
  for (size_t i = 0; i < R; ++i) {
    worst = std::max(worst, double(std::fabs(cp[i] - gp[i])));
    if (!std::isnan(cl[i]) || !std::isnan(gl[i])) worst = std::max(worst, double(std::fabs(cl[i] - gl[i])));
  }
  for (size_t i = 0; i < R * K; ++i) worst = std::max(worst, double(std::fabs(cf[i] - gf[i])));
  check(worst <= 1e-4, tag + ": token_scores equal the CPU's (worst abs " + std::to_string(worst) + ")");
}

void check_batch_independence(const std::string& tag, rf::cuda::DeviceModel& m) {
  std::mt19937 rng(21);
  const int V = m.vocab();
  std::vector<std::vector<uint32_t>> seqs;
  for (int i = 0; i < 32; ++i) seqs.push_back(random_ids(rng, 1 + int(rng() % 50), V));
  const std::vector<float> together = gpu_all(m, seqs);
  double worst = 0;
  long offset = 0;
  for (const auto& s : seqs) {
    const std::vector<float> alone = gpu_all(m, {s});
    const std::vector<float> part(together.begin() + offset * V, together.begin() + (offset + long(s.size())) * V);
    worst = std::max(worst, worst_row(part, alone, V));
    offset += long(s.size());
  }
  check(worst <= 1e-5, tag + ": a batch of 32 mixed-length sequences equals each alone (worst rel L2 " + std::to_string(worst) + ")");
}

void check_pool(const rf::ModelConfig& c) {
  rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
  rf::test::load_random(m, 3);
  m.set_kv_pool_bytes(size_t(64) << 10);  // a few blocks only
  auto a = m.new_sequence();
  bool refused = false;
  try {
    a->reserve(1 << 20);
  } catch (const std::exception& e) {
    refused = std::string(e.what()).find("KV pool is full") != std::string::npos;
  }
  check(refused && a->capacity() == 0, "a full KV pool refuses a sequence, naming why, and grants nothing");
  long most = 0;
  while (true) {
    try {
      a->reserve(most + 16);
      most += 16;
    } catch (const std::exception&) {
      break;
    }
  }
  auto b = m.new_sequence();
  bool b_refused = false;
  try {
    b->reserve(1);
  } catch (const std::exception&) {
    b_refused = true;
  }
  a.reset();  // its blocks go back
  bool b_fits = true;
  try {
    b->reserve(most);
  } catch (const std::exception&) {
    b_fits = false;
  }
  check(most > 0 && b_refused && b_fits, "freeing a sequence returns its blocks to the pool (" + std::to_string(most) + " positions)");
}

void check_memory(const rf::ModelConfig& c) {
  size_t free0 = 0, total = 0, free1 = 0;
  {
    rf::cuda::DeviceModel warm(c, rf::DType::bf16, 0);  // the context and cuBLASLt's own state
    rf::test::load_random(warm, 3);
  }
  cudaMemGetInfo(&free0, &total);
  for (int i = 0; i < 20; ++i) {
    rf::cuda::DeviceModel m(c, rf::DType::bf16, 0);
    rf::test::load_random(m, 3);
    auto s = m.new_sequence();
    std::vector<uint32_t> ids{1, 2, 3, 4};
    std::vector<float> out(size_t(m.vocab()));
    m.forward({{s.get(), ids.data(), 4}}, rf::LogitsMode::last, out.data());
  }
  cudaMemGetInfo(&free1, &total);
  const double diff = (double(free0) - double(free1)) / double(1 << 20);
  check(std::fabs(diff) <= 1.0, "20 loads and disposals leave device memory where it was (" + std::to_string(diff) + " MiB)");
}

// Running out of device memory, on purpose (cuda::set_memory_limit: past it an allocation fails
// as on a full device): loading weights, sizing the KV pool, a prefill and a decode step of more
// rows each throw rf::OutOfMemory naming what it was allocating, and change nothing: once memory
// is back, the same calls give, bit for bit, what a twin engine that never ran out gives. The
// sequences keep their lengths meanwhile, and everything is freed afterwards.
void check_out_of_memory(const rf::ModelConfig& c) {
  const size_t start = rf::cuda::memory_stats().current;
  const auto held = [] { return rf::cuda::memory_stats().current; };
  // Whether f throws OutOfMemory whose message names `what` and the device.
  const auto out_of_memory = [](const std::function<void()>& f, const std::string& what) {
    try {
      f();
    } catch (const rf::OutOfMemory& e) {
      const std::string m = e.what();
      return m.find("allocating " + what) != std::string::npos && m.find("cuda:0") != std::string::npos;
    } catch (const std::exception& e) {
      std::printf("  unexpected: %s\n", e.what());
    }
    return false;
  };
  {
    rf::cuda::DeviceModel a(c, rf::DType::f32, 0), b(c, rf::DType::f32, 0);
    rf::cuda::set_memory_limit(held() + 4096);
    const bool weights = out_of_memory([&] { rf::test::load_random(a, 8); }, "weights");
    rf::cuda::set_memory_limit(0);
    rf::test::load_random(a, 8);
    rf::test::load_random(b, 8);
    rf::cuda::set_memory_limit(held() + (size_t(1) << 20));
    const bool pool = out_of_memory([&] { a.set_kv_pool_bytes(size_t(16) << 20); }, "the KV cache");
    rf::cuda::set_memory_limit(0);
    a.set_kv_pool_bytes(size_t(16) << 20);
    b.set_kv_pool_bytes(size_t(16) << 20);
    check(weights && pool, "out of device memory: loading weights and sizing the KV pool throw OutOfMemory naming them");

    const int V = c.vocab;
    std::mt19937 rng(41);
    std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> sa, sb;
    std::vector<std::vector<uint32_t>> prompts;
    for (int i = 0; i < 3; ++i) {
      sa.push_back(a.new_sequence()), sb.push_back(b.new_sequence());
      prompts.push_back(random_ids(rng, 3 + i, V));
    }
    std::vector<float> la(static_cast<size_t>(V)), lb(static_cast<size_t>(V));
    a.forward({{sa[0].get(), prompts[0].data(), 3}}, rf::LogitsMode::last, la.data());
    b.forward({{sb[0].get(), prompts[0].data(), 3}}, rf::LogitsMode::last, lb.data());
    // A batched prefill of more rows than any before: its scratch cannot grow.
    const std::vector<uint32_t> more = random_ids(rng, 40, V);
    const auto items = [&](std::vector<std::shared_ptr<rf::cuda::DeviceSequence>>& s) {
      return std::vector<rf::cuda::DeviceItem>{{s[0].get(), more.data(), 40}, {s[1].get(), prompts[1].data(), 4}, {s[2].get(), prompts[2].data(), 5}};
    };
    std::vector<float> pa(size_t(3) * V), pb(size_t(3) * V);
    rf::cuda::set_memory_limit(held());
    const bool prefill = out_of_memory([&] { a.forward(items(sa), rf::LogitsMode::last, pa.data()); }, "scratch");
    const bool kept = sa[0]->length() == 3 && sa[1]->length() == 0 && sa[2]->length() == 0;
    rf::cuda::set_memory_limit(0);
    a.forward(items(sa), rf::LogitsMode::last, pa.data());
    b.forward(items(sb), rf::LogitsMode::last, pb.data());
    check(prefill && kept && std::memcmp(pa.data(), pb.data(), pa.size() * 4) == 0,
          "out of device memory: a prefill throws, the sequences keep their lengths, and the retry equals a twin's bit for bit");

    // Decode steps of the three, then of six (new sequences with one-token prompts): the pick's
    // buffers for six rows cannot grow.
    for (int i = 0; i < 3; ++i) sa.push_back(a.new_sequence()), sb.push_back(b.new_sequence());
    std::vector<uint32_t> next(6, 1);
    bool step_oom = true, step_kept = true;
    long differ = 0;
    for (int n : {3, 6, 6}) {
      std::vector<rf::cuda::DeviceItem> ia, ib;
      for (int i = 0; i < n; ++i) ia.push_back({sa[size_t(i)].get(), &next[size_t(i)], 1}), ib.push_back({sb[size_t(i)].get(), &next[size_t(i)], 1});
      std::vector<rf::PickParams> params(static_cast<size_t>(n));
      std::vector<rf::Pick> ka(static_cast<size_t>(n)), kb(static_cast<size_t>(n));
      std::vector<float> fa(static_cast<size_t>(n)), fb(static_cast<size_t>(n));
      const std::vector<int> flag{V - 1};
      if (n == 6 && sa[5]->length() == 0) {  // the first step of six
        std::vector<long> lengths;
        for (auto& s : sa) lengths.push_back(s->length());
        rf::cuda::set_memory_limit(held());
        step_oom = out_of_memory([&] { a.decode_step(ia, params, rf::Flags(flag, fa.data()), 0, ka.data(), nullptr, nullptr); }, "scratch");
        rf::cuda::set_memory_limit(0);
        for (size_t i = 0; i < sa.size(); ++i) step_kept &= sa[i]->length() == lengths[i];
      }
      a.decode_step(ia, params, rf::Flags(flag, fa.data()), 0, ka.data(), nullptr, nullptr);
      b.decode_step(ib, params, rf::Flags(flag, fb.data()), 0, kb.data(), nullptr, nullptr);
      for (int i = 0; i < n; ++i) {
        differ += ka[size_t(i)].token != kb[size_t(i)].token || std::memcmp(&ka[size_t(i)].logprob, &kb[size_t(i)].logprob, 4) != 0 ||
                  std::memcmp(&fa[size_t(i)], &fb[size_t(i)], 4) != 0;
        next[size_t(i)] = ka[size_t(i)].token;
      }
    }
    check(step_oom && step_kept && differ == 0,
          "out of device memory: a decode step throws, changes no sequence, and the steps after equal a twin's bit for bit (" +
              std::to_string(differ) + " rows differ)");
  }
  check(held() == start, "out of device memory: everything is freed afterwards (" + std::to_string(long(held() - start)) + " bytes left)");
}

rf::ModelConfig with(rf::ModelConfig c, int hidden, int heads, int kv, int head_dim) {
  c.hidden = hidden;
  c.n_heads = heads;
  c.n_kv_heads = kv;
  c.head_dim = head_dim;
  c.intermediate = 2 * hidden + 16;
  c.vocab = 1001;  // not a multiple of 64
  c.max_positions = 128;
  return c;
}

void run_config(const std::string& name, const rf::ModelConfig& c) {
  {
    Pair p = make_pair(c, rf::DType::f32, 7);
    check_logits(name + " f32", p, 1e-4);
    check_decode(name + " f32", p);
    add_adapters(p, 31);
    check_logits(name + " f32 + adapters", p, 1e-4);
    check_decode_step(name + " f32 + adapters", p);
    check_token_scores(name + " f32 + adapters", p);
    check_batch_independence(name + " f32 + adapters", *p.gpu);
    Pair q = make_pair(c, rf::DType::f32, 7);
    add_adapters(q, 31);
    check_graphs(name + " f32 + adapters", *p.gpu, *q.gpu, 24);
    check_launches(name + " f32 + adapters", *p.gpu, true);
  }
  {
    Pair p = make_pair(c, rf::DType::bf16, 7);
    // Qwen3's per-head norms give every head's q and k unit RMS, so the tensor-core attention's
    // bf16 rounding of q and k moves its scores more than in the plain random Llama: measured
    // under the emulation, batched prefill 0.0146, decode steps at most 0.0095, the chunk that
    // continues the cache 0.0207 (0.0192 with the norms' weights all 1), while f32 agrees to 1e-6.
    const double bf16_bound = c.qk_norm ? 3e-2 : 2e-2;
    check_logits(name + " bf16", p, bf16_bound);
    check_decode(name + " bf16", p, bf16_bound);  // prefill on the tensor cores, decode in f32 attention
    check_batch_independence(name + " bf16", *p.gpu);
    check_launches(name + " bf16", *p.gpu, false);
  }
  check_merge(name + " f32 merged", c, rf::DType::f32, 1e-4);
  check_merge(name + " bf16 merged", c, rf::DType::bf16, 2e-2);
}

}  // namespace

// A lost CUDA context (cuda::lose_context: a kernel traps, as after any fault in a kernel): the
// next forward, decode step, allocation and weight upload each throw rf::DeviceFailed naming the
// call, the error and the device (not a plain error that could pass for a bad input), and the
// models and sequences are freed afterwards without a crash. Run last: on a GPU the process's
// context stays lost.
void check_device_failure(const rf::ModelConfig& c) {
  auto m = std::make_unique<rf::cuda::DeviceModel>(c, rf::DType::f32, 0);
  rf::test::load_random(*m, 12);
  m->set_kv_pool_bytes(size_t(8) << 20);
  auto seq = m->new_sequence();
  std::mt19937 rng(47);
  const std::vector<uint32_t> ids = random_ids(rng, 5, c.vocab);
  std::vector<float> logits(size_t(c.vocab));
  m->forward({{seq.get(), ids.data(), 5}}, rf::LogitsMode::last, logits.data());
  const std::string trapped = rf::cuda::lose_context(0);
  std::vector<std::string> messages;
  auto failed = [&](const std::function<void()>& f) {
    try {
      f();
    } catch (const rf::DeviceFailed& e) {
      messages.push_back(e.what());
      return std::string(e.what()).find("cudaErrorLaunchFailure") != std::string::npos &&
             std::string(e.what()).find("cuda:0 failed") != std::string::npos;
    } catch (const std::exception& e) {
      std::printf("  not DeviceFailed: %s\n", e.what());
    }
    return false;
  };
  const uint32_t one = ids[0];
  std::vector<rf::PickParams> params(1);
  rf::Pick pick;
  float flag = 0;
  const std::vector<int> flags{c.vocab - 1};
  const bool forward = failed([&] { m->forward({{seq.get(), ids.data(), 5}}, rf::LogitsMode::last, logits.data()); });
  const bool decode = failed([&] { m->decode_step({{seq.get(), &one, 1}}, params, rf::Flags(flags, &flag), 0, &pick, nullptr, nullptr); });
  seq.reset();  // (a pool with sequences is not resized)
  const bool pool = failed([&] { m->set_kv_pool_bytes(size_t(16) << 20); });
  const bool load = failed([&] {
    rf::cuda::DeviceModel other(c, rf::DType::f32, 0);
    rf::test::load_random(other, 12);
  });
  for (const std::string& s : messages) std::printf("  %s\n", s.c_str());
  m.reset();
  check(trapped == "cudaErrorLaunchFailure" && forward && decode && pool && load,
        "a lost CUDA context: forward, decode, the KV pool and loading weights throw DeviceFailed naming it; freeing is clean");
}

// Greedy decode on two engines with the same weights, graphs on and off, while the step's block
// tables change length at one batch size: one sequence growing past 48 blocks (a 760-token prompt,
// then steps through length 768), and two sequences of which one reserves 13 more blocks midway
// (the detector's reservations). A replayed graph must read this step's tables, not where an
// earlier step's layout put them; bit for bit, as check_graphs.
long graph_table_growth(const rf::ModelConfig& c, int n, int prompt, int steps, int reserve_at, long reserve) {
  rf::cuda::DeviceModel graphed(c, rf::DType::f32, 0), eager(c, rf::DType::f32, 0);
  rf::test::load_random(graphed, 7);
  rf::test::load_random(eager, 7);
  graphed.set_kv_pool_bytes(size_t(64) << 20);
  eager.set_kv_pool_bytes(size_t(64) << 20);
  graphed.set_graphs(true);
  eager.set_graphs(false);
  std::mt19937 rng(3);
  std::vector<std::shared_ptr<rf::cuda::DeviceSequence>> a, b;
  std::vector<std::vector<uint32_t>> prompts;
  for (int i = 0; i < n; ++i) {
    a.push_back(eager.new_sequence()), b.push_back(graphed.new_sequence());
    prompts.emplace_back(size_t(prompt));
    for (uint32_t& t : prompts.back()) t = rng() % uint32_t(c.vocab);
  }
  std::vector<uint32_t> next(static_cast<size_t>(n), 0);
  long differ = 0;
  for (int step = 0; step < steps; ++step) {
    if (step == reserve_at) a.back()->reserve(reserve), b.back()->reserve(reserve);
    std::vector<rf::cuda::DeviceItem> ia, ib;
    for (int i = 0; i < n; ++i) {
      const uint32_t* t = step == 0 ? prompts[size_t(i)].data() : &next[size_t(i)];
      ia.push_back({a[size_t(i)].get(), t, step == 0 ? prompt : 1});
      ib.push_back({b[size_t(i)].get(), t, step == 0 ? prompt : 1});
    }
    std::vector<rf::PickParams> params(static_cast<size_t>(n));
    std::vector<rf::Pick> pa(static_cast<size_t>(n)), pb(static_cast<size_t>(n));
    eager.decode_step(ia, params, rf::Flags(), 0, pa.data(), nullptr, nullptr);
    graphed.decode_step(ib, params, rf::Flags(), 0, pb.data(), nullptr, nullptr);
    for (int i = 0; i < n; ++i)
      differ += pa[size_t(i)].token != pb[size_t(i)].token || std::memcmp(&pa[size_t(i)].logprob, &pb[size_t(i)].logprob, sizeof(float)) != 0;
    for (int i = 0; i < n; ++i) next[size_t(i)] = pa[size_t(i)].token;
  }
  check(graphed.graph_stats().replays > 0, "block tables of changing length: some steps replayed from graphs");
  return differ;
}

// A shape run once eagerly, then an adapter added (the step needs buffers its first run did not
// size): the next step of that shape runs eagerly again rather than allocating inside a capture.
void check_capture_after_adapter(const rf::ModelConfig& c) {
  rf::cuda::DeviceModel m(c, rf::DType::f32, 0);
  rf::test::load_random(m, 7);
  m.set_kv_pool_bytes(size_t(64) << 20);
  m.set_graphs(true);
  auto seq = m.new_sequence();
  const std::vector<uint32_t> prompt{3, 1, 4, 1, 5};
  std::vector<rf::PickParams> params(1);
  std::vector<rf::Pick> pick(1);
  uint32_t next = 0;
  int failures = 0;
  for (int step = 0; step < 6; ++step) {
    if (step == 2) {
      std::vector<float> A(size_t(4) * c.hidden, 0.01f), B(size_t(c.q_dim()) * 4, 0.02f);
      m.add_lora(0, "q_proj", A.data(), c.hidden, B.data(), int(c.q_dim()), 4, 1.f);
    }
    const rf::cuda::DeviceItem item{seq.get(), step == 0 ? prompt.data() : &next, step == 0 ? 5 : 1};
    try {
      m.decode_step({item}, params, rf::Flags(), 0, pick.data(), nullptr, nullptr);
      next = pick[0].token;
    } catch (const std::exception& e) {
      ++failures;
      std::printf("  step %d after add_lora: %s\n", step, e.what());
    }
  }
  check(failures == 0 && m.graph_stats().replays > 0, "decode steps of a warmed shape after add_lora: eager again, then captured and replayed (" + std::to_string(failures) + " failed)");
}

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_model: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  rf::ModelConfig llama = rf::test::small_llama();
  run_config("llama GQA 2", llama);
  run_config("llama hd64 GQA1", with(llama, 128, 2, 2, 64));
  run_config("llama hd80 GQA3", with(llama, 240, 3, 1, 80));
  run_config("llama hd128 GQA8", with(llama, 256, 8, 1, 128));
  run_config("mistral window 7", rf::test::mistral_of(llama));
  run_config("llama3 rope, tied", rf::test::llama3_tied_of(llama));
  run_config("qwen3 per-head q/k norms", rf::test::qwen3_of(llama));
  const rf::ModelConfig gpt2 = rf::test::gpt2_of(llama);
  run_config("gpt2", gpt2);
  check_pool(llama);
  check_memory(with(llama, 256, 8, 2, 32));
  check_pick_fallback(llama);
  check_graph_eviction(llama);
  check(graph_table_growth(llama, 1, 760, 14, -1, 0) == 0, "graphed decode equals eager bit for bit as one sequence grows past 48 blocks");
  check(graph_table_growth(llama, 2, 3, 10, 5, 16 * 13) == 0, "graphed decode equals eager bit for bit when a batch member reserves more blocks");
  check_capture_after_adapter(llama);
  check_out_of_memory(llama);
  check_device_failure(llama);  // last: the context stays lost
  return rf::test::finish("cuda_model");
}
