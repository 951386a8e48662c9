// The GPU trainer (native/cuda/device_trainer.h) against the CPU trainer (native/model/train.h):
// two models with the same random weights, two trainers with the same options and seed, the same
// micro-batches. On a GPU machine where cuBLASLt links, and in CI under the CPU emulation
// (native/tests/emulate/run_train.cpp); elsewhere "no CUDA device visible; skipped", exit 0.
//
// Per config (Llama with GQA 2 and q/k/v biases, Mistral's sliding window, llama3 rope with tied
// embeddings, GPT-2 with LayerNorm, gelu_new, biases and tied embeddings; sequences of 5, 17 and
// 23 tokens, crossing the 16-token KV blocks), LoRA on every projection with dropout 0.1, the
// flag-token rows trained:
//  - both trainers start from the same parameters (same names, shapes and values from the seed);
//  - with B and the flag rows moved off their start (the same random values on both), a red-flag
//    step (benign KL, red-flag rows in two groups, after-flag KL) and a cross-entropy step: the
//    loss terms within 1e-5 relative, every parameter's gradient within 1e-4 relative L2
//    (f32 on both: the sums differ in order only), dL/d(input embeddings) within 1e-4;
//  - two optimizer steps (the second clipped) from the CPU's gradients: the norm within 1e-12
//    (double sums in another order), the updated values bit-identical (cuda/optim.h's promise);
//  - the same step twice from the same state gives the same bits (no atomics), also after the
//    parameters went to the host and back (download / params_changed: a checkpoint's round trip);
//  - param_grads = false leaves the gradients as they were and still returns dL/d(embeddings);
//  - activation recomputation (TrainOptions::recompute) gives the same bits as keeping every
//    activation;
//  - full fine-tuning (cross-entropy rows): every tensor's gradient within 1e-4, AdamW bit for
//    bit, and the next step's losses (the engine's copies rewritten) within 1e-5;
//  - LoRA without flag-token rows (the refusal baseline's and the lm objective's cross-entropy
//    rows, with benign KL rows): the same bounds, f32 and bf16;
//  - a set cancel flag throws rf::Cancelled; an unknown LoRA target and a model that already has
//    an adapter are refused with a message;
//  - bf16 weights on the GPU against the CPU's bf16 model: loss terms within 2e-2 relative,
//    gradients within 5e-2 relative L2 (also for a batch of one-token sequences). The GPU's
//    attention then runs on the tensor cores in bf16 (forward and backward), the CPU's in f32:
//    that moves the loss by about 2.5e-3, most gradients by about 1e-2 and the flag embedding
//    row's (the smallest) by about 3.7e-2 here (6.6e-3 with f32 attention on both); recomputation gives the same bits there too. Full
//    fine-tuning in bf16 (weight gradients from bf16 products summed in f32): the same bounds;
//  - out of device memory in a step (check_out_of_memory): rf::OutOfMemory at every size the step
//    grows to, nothing of the completed steps changed, and the step afterwards bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "cuda/device_model.h"
#include "cuda/device_trainer.h"
#include "cuda/memory.h"
#include "cuda/phase_clock.h"
#include "cuda/train_ops.h"
#include "model/model.h"
#include "model/train.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double rel(double got, double want) { return std::fabs(got - want) / std::max(1e-12, std::fabs(want)); }

struct Setup {
  std::unique_ptr<rf::Model> cpu;
  std::unique_ptr<rf::cuda::DeviceModel> gpu;
  std::unique_ptr<rf::Trainer> ct;
  std::unique_ptr<rf::cuda::DeviceTrainer> gt;
};

rf::TrainOptions train_options(const rf::ModelConfig& c) {
  rf::TrainOptions o;
  o.mode = rf::TrainMode::lora;
  o.lora.rank = 4;
  o.lora.alpha = 8;
  o.lora.dropout = 0.1f;
  o.lora.targets = c.arch == rf::Arch::gpt2 ? std::vector<std::string>{"c_attn", "c_proj", "c_fc"}
                                            : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                       "up_proj", "down_proj"};
  o.rf_token = c.vocab - 1;
  o.seed = 11;
  return o;
}

Setup make_setup(const rf::ModelConfig& c, rf::DType dtype, unsigned seed, const rf::TrainOptions* options = nullptr) {
  Setup s;
  s.cpu = std::make_unique<rf::Model>(c, dtype, 2);
  rf::test::load_random(*s.cpu, seed);
  s.gpu = std::make_unique<rf::cuda::DeviceModel>(c, dtype, 0);
  rf::test::load_random(*s.gpu, seed);
  s.gpu->set_kv_pool_bytes(size_t(64) << 20);
  const rf::TrainOptions o = options ? *options : train_options(c);
  s.ct = std::make_unique<rf::Trainer>(*s.cpu, o);
  s.gt = std::make_unique<rf::cuda::DeviceTrainer>(*s.gpu, o);
  return s;
}

// Moves B and the flag rows off their start (B = 0 would leave A's gradient 0), the same on both.
void perturb(Setup& s, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<rf::Param*> cp = s.ct->params(), gp = s.gt->params();
  for (size_t i = 0; i < cp.size(); ++i) {
    const std::string& n = cp[i]->name;
    if (n.find("lora_B") != std::string::npos) rf::test::fill_normal(rng, cp[i]->value.data(), cp[i]->value.size(), 0.2f);
    if (n.rfind("rf.", 0) == 0)
      for (float& v : cp[i]->value) v += std::normal_distribution<float>(0.f, 0.1f)(rng);
    gp[i]->value = cp[i]->value;
  }
  s.ct->params_changed();
  s.gt->params_changed();
}

struct Batch {
  std::vector<std::vector<uint32_t>> trained, ref;
  std::vector<rf::LossRow> rows;
};

std::vector<rf::Sequence> seqs(std::vector<std::vector<uint32_t>>& v, std::vector<std::vector<float>>* grads = nullptr,
                               long hidden = 0) {
  std::vector<rf::Sequence> out;
  for (size_t i = 0; i < v.size(); ++i) {
    rf::Sequence q{v[i].data(), int(v[i].size())};
    if (grads) {
      (*grads)[i].assign(v[i].size() * size_t(hidden), 0.f);
      q.embed_grad = (*grads)[i].data();
    }
    out.push_back(q);
  }
  return out;
}

// Three trained sequences (5, 17, 23 tokens; the flag token inside the last), two reference ones,
// and rows of every red-flag kind, or cross-entropy rows.
Batch make_batch(const rf::ModelConfig& c, bool ce, unsigned seed) {
  std::mt19937 rng(seed);
  Batch b;
  for (int n : {5, 17, 23}) {
    std::vector<uint32_t> ids(static_cast<size_t>(n));
    for (auto& t : ids) t = rng() % uint32_t(c.vocab - 1);
    b.trained.push_back(ids);
  }
  b.trained[2][10] = uint32_t(c.vocab - 1);  // <rf> inserted: its embedding row trains
  b.ref.push_back(b.trained[0]);
  std::vector<uint32_t> r2(b.trained[2]);
  r2.erase(r2.begin() + 10);
  b.ref.push_back(r2);
  using K = rf::LossRow;
  if (ce) {
    for (int r = 0; r < 44; r += 3) b.rows.push_back({K::ce, r, -1, -1, int32_t(rng() % uint32_t(c.vocab))});
    return b;
  }
  for (int r = 0; r < 5; ++r) b.rows.push_back({K::benign_kl, r, r, -1, -1});
  for (int r = 8; r < 14; ++r) b.rows.push_back({K::red_flag, r, -1, 0, -1});
  for (int r = 16; r < 20; ++r) b.rows.push_back({K::red_flag, r, -1, 1, -1});
  for (int r = 33; r < 44; ++r) b.rows.push_back({K::after_kl, r, 5 + (r - 1 - 22), -1, -1});  // after <rf>: one earlier in ref
  return b;
}

rf::LossOptions loss_options() {
  rf::LossOptions o;
  o.alpha_benign = 1.f;
  o.alpha_rf = 2.f;
  o.alpha_after = 0.5f;
  o.grad_scale = 0.5f;
  o.dropout_seed = 3;
  return o;
}

void compare_params(const std::string& tag, Setup& s, const char* part, double bound) {
  s.gt->download();
  std::vector<rf::Param*> cp = s.ct->params(), gp = s.gt->params();
  double worst = 0;
  std::string worst_name;
  bool names = cp.size() == gp.size();
  for (size_t i = 0; names && i < cp.size(); ++i) {
    names &= cp[i]->name == gp[i]->name && cp[i]->shape == gp[i]->shape;
    const std::vector<float>& a = std::strcmp(part, "grad") == 0 ? gp[i]->grad : gp[i]->value;
    const std::vector<float>& b = std::strcmp(part, "grad") == 0 ? cp[i]->grad : cp[i]->value;
    const double e = rel_l2(a, b);
    if (!(e <= worst)) worst = e, worst_name = cp[i]->name;
  }
  check(names, tag + ": the same parameters, in the same order");
  std::printf("cuda_train: %s: %s worst rel L2 %s (%s)\n", tag.c_str(), part, fmt(worst).c_str(), worst_name.c_str());
  check(worst <= bound, tag + ": every parameter's " + part + " equals the CPU's (worst rel L2 " + fmt(worst) + ", " +
                            worst_name + "; bound " + fmt(bound) + ")");
}

void compare_terms(const std::string& tag, const rf::LossTerms& g, const rf::LossTerms& c, double bound) {
  const double e = std::max({rel(g.benign, c.benign), rel(g.red_flag, c.red_flag), rel(g.after, c.after), rel(g.ce, c.ce),
                             rel(g.total, c.total)});
  std::printf("cuda_train: %s: loss terms worst rel %s\n", tag.c_str(), fmt(e).c_str());
  check(e <= bound && g.n_benign == c.n_benign && g.n_groups == c.n_groups && g.n_after == c.n_after && g.n_ce == c.n_ce &&
            g.tokens == c.tokens,
        tag + ": loss terms equal the CPU's (worst rel " + fmt(e) + ", total " + fmt(g.total) + " vs " + fmt(c.total) + ")");
}

// One step of the same micro-batch on both trainers: loss terms, every gradient and
// dL/d(input embeddings) against the CPU's.
void compare_step(const std::string& tag, Setup& s, Batch& b, bool with_reference) {
  const long H = s.cpu->config().hidden;
  std::vector<std::vector<float>> cg(b.trained.size()), gg(b.trained.size());
  const rf::LossOptions lo = loss_options();
  const std::vector<rf::Sequence> ref = with_reference ? seqs(b.ref) : std::vector<rf::Sequence>();
  const rf::LossTerms tc = s.ct->step(seqs(b.trained, &cg, H), ref, b.rows, lo);
  const rf::LossTerms tg = s.gt->step(seqs(b.trained, &gg, H), ref, b.rows, lo);
  compare_terms(tag, tg, tc, 1e-5);
  compare_params(tag, s, "grad", 1e-4);
  double e = 0;
  for (size_t i = 0; i < cg.size(); ++i) e = std::max(e, rel_l2(gg[i], cg[i]));
  std::printf("cuda_train: %s: dL/d(embeddings) worst rel L2 %s\n", tag.c_str(), fmt(e).c_str());
  check(e <= 1e-4, tag + ": dL/d(input embeddings) equals the CPU's (worst rel L2 " + fmt(e) + ")");
}

// AdamW from the same gradients (the CPU's given to the GPU): Adam divides by sqrt(v), so the
// 1e-4 differences of a step would make elements whose gradient is near 0 move apart (up to 2 lr
// where the sign flips); from equal gradients the arithmetic is the same bits.
void compare_adamw(const std::string& tag, Setup& s, const rf::AdamWOptions& ao) {
  s.gt->download();
  std::vector<rf::Param*> cp = s.ct->params(), gp = s.gt->params();
  for (size_t i = 0; i < cp.size(); ++i) gp[i]->grad = cp[i]->grad;
  s.gt->params_changed();
  const double nc = s.ct->optimizer_step(ao), ng = s.gt->optimizer_step(ao);
  check(rel(ng, nc) <= 1e-12, tag + ": gradient norm " + fmt(ng) + " equals the CPU's " + fmt(nc) + " (double sums)");
  compare_params(tag + " + AdamW" + (ao.clip_norm > 0.f ? " clipped" : ""), s, "value", 0.0);
}

void run_config(const std::string& name, const rf::ModelConfig& c) {
  Setup s = make_setup(c, rf::DType::f32, 21);
  compare_params(name + " start", s, "value", 0.0);
  perturb(s, 5);
  const long H = c.hidden;
  for (bool ce : {false, true}) {
    const std::string tag = name + (ce ? " ce step" : " red-flag step");
    Batch b = make_batch(c, ce, ce ? 8 : 7);
    compare_step(tag, s, b, true);
    rf::AdamWOptions ao;
    ao.lr = 1e-2f;
    ao.weight_decay = 0.1f;
    ao.clip_norm = ce ? 1e-3f : 0.f;  // clipping on the second
    compare_adamw(tag, s, ao);
  }

  // Determinism, and the host round trip of a checkpoint.
  {
    Batch b = make_batch(c, false, 9);
    const rf::LossOptions lo = loss_options();
    auto grads = [&] {
      s.gt->download();
      std::vector<float> all;
      for (rf::Param* p : s.gt->params()) all.insert(all.end(), p->grad.begin(), p->grad.end());
      return all;
    };
    auto zero_grads = [&] {
      s.gt->download();
      for (rf::Param* p : s.gt->params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
      s.gt->params_changed();
    };
    s.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
    const std::vector<float> g1 = grads();
    zero_grads();
    s.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
    const std::vector<float> g2 = grads();
    check(same_bits(g1, g2), name + ": the same step from the same state gives the same bits (after a host round trip)");

    // param_grads = false: gradients kept, the embedding gradient still computed.
    rf::LossOptions no = lo;
    no.param_grads = false;
    std::vector<std::vector<float>> eg(b.trained.size());
    s.gt->step(seqs(b.trained, &eg, H), seqs(b.ref), b.rows, no);
    double norm = 0;
    for (const auto& v : eg)
      for (float x : v) norm += double(x) * x;
    check(same_bits(grads(), g2) && norm > 0, name + ": param_grads = false keeps the gradients and returns dL/d(embeddings)");

    std::atomic<int> cancel{1};
    bool cancelled = false;
    try {
      s.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo, &cancel);
    } catch (const rf::Cancelled&) {
      cancelled = true;
    }
    check(cancelled, name + ": a set cancel flag stops the step");
  }
}

// Full fine-tuning (cross-entropy rows, the lm objective): every tensor's master and gradient
// against the CPU's, AdamW from the CPU's gradients bit for bit, and a second step whose losses
// show the engine's copies were rewritten from the updated masters.
void run_full(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o;
  o.mode = rf::TrainMode::full;
  o.seed = 11;
  Setup s = make_setup(c, rf::DType::f32, 31, &o);
  compare_params(name + " full: start", s, "value", 0.0);
  for (int round = 0; round < 2; ++round) {
    const std::string tag = name + " full: step " + std::to_string(round + 1);
    Batch b = make_batch(c, true, 13 + round);
    compare_step(tag, s, b, false);
    rf::AdamWOptions ao;
    ao.lr = 1e-3f;
    ao.weight_decay = 0.1f;
    compare_adamw(tag, s, ao);
  }
}

// Full fine-tuning with bf16 weights: the weight gradients are bf16 products summed in f32 (the
// CPU's are f32), attention on the tensor cores: one step's losses and gradients within the
// bf16 bounds of run_bf16.
void run_full_bf16(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o;
  o.mode = rf::TrainMode::full;
  o.seed = 11;
  Setup s = make_setup(c, rf::DType::bf16, 31, &o);
  Batch b = make_batch(c, true, 13);
  const rf::LossOptions lo = loss_options();
  const rf::LossTerms tc = s.ct->step(seqs(b.trained), {}, b.rows, lo);
  const rf::LossTerms tg = s.gt->step(seqs(b.trained), {}, b.rows, lo);
  compare_terms(name + " full bf16", tg, tc, 2e-2);
  compare_params(name + " full bf16", s, "grad", 5e-2);
}

// Activation recomputation: the same step from the same state gives the same bits as keeping
// every activation (the same kernels on the same inputs), gradients and dL/d(embeddings) alike.
void check_recompute(const std::string& name, const rf::ModelConfig& c, rf::DType dtype = rf::DType::f32) {
  Setup a = make_setup(c, dtype, 21);
  perturb(a, 5);
  rf::cuda::DeviceModel gm(c, dtype, 0);
  rf::test::load_random(gm, 21);
  gm.set_kv_pool_bytes(size_t(64) << 20);
  rf::TrainOptions o = train_options(c);
  o.recompute = true;
  rf::cuda::DeviceTrainer gr(gm, o);
  a.gt->download();
  std::vector<rf::Param*> from = a.gt->params(), to = gr.params();
  for (size_t i = 0; i < from.size(); ++i) to[i]->value = from[i]->value;
  gr.params_changed();
  Batch b = make_batch(c, false, 12);
  const long H = c.hidden;
  std::vector<std::vector<float>> ea(b.trained.size()), er(b.trained.size());
  const rf::LossOptions lo = loss_options();
  gr.set_profiling(true);  // the recomputing trainer's step is timed by phase; a's is not
  const rf::LossTerms ta = a.gt->step(seqs(b.trained, &ea, H), seqs(b.ref), b.rows, lo);
  const rf::LossTerms tr = gr.step(seqs(b.trained, &er, H), seqs(b.ref), b.rows, lo);
  a.gt->download();
  gr.download();
  bool same = ta.total == tr.total;
  for (size_t i = 0; i < from.size(); ++i) same &= same_bits(from[i]->grad, to[i]->grad);
  for (size_t i = 0; i < ea.size(); ++i) same &= same_bits(ea[i], er[i]);
  check(same, name + ": activation recomputation (and profiling) gives the same bits (loss, gradients, dL/d(embeddings))");
  // Profiling: every phase this step ran has time, the optimizer's after its step; off, none.
  gr.optimizer_step(rf::AdamWOptions());
  const std::vector<double> ph = gr.phase_seconds(), off = a.gt->phase_seconds();
  gr.set_profiling(false);  // as the benchmark reads them: after turning profiling off
  check(gr.phase_seconds() == ph, name + ": turning profiling off keeps the phase times it measured");
  std::string missing;
  for (int p = 0; p < rf::cuda::kTrainPhases; ++p)
    if (!(ph[size_t(p)] > 0)) missing += std::string(" ") + rf::cuda::train_phase_name(p);
  bool off_zero = off.size() == size_t(rf::cuda::kTrainPhases);
  for (double v : off) off_zero &= v == 0;
  check(ph.size() == size_t(rf::cuda::kTrainPhases) && missing.empty() && off_zero,
        name + ": profiling times every phase of a LoRA step with recomputation" + (missing.empty() ? "" : ", not:" + missing) +
            (off_zero ? "" : "; unprofiled trainer has times"));

  // What the traces hold (DeviceLayerTrace): per row and layer the two residuals in f32; qkv,
  // attention's output and the MLP's input in the engine's dtype; the lse of tensor-core attention;
  // u = x A^T of every adapter in f32. Nothing else (the norms' outputs and the activation are
  // recomputed), and with recomputation each block's input alone. Plus the final norm's input.
  long R = 0;
  for (const auto& t : b.trained) R += long(t.size());
  long ranks = 0;  // the adapters' ranks, over all layers
  for (const rf::Param* p : to)
    if (p->name.find("lora_A") != std::string::npos) ranks += p->shape[0];
  const long e = dtype == rf::DType::bf16 ? 2 : 4;
  const bool tc = dtype == rf::DType::bf16;  // small_llama's head_dim is a tensor-core one
  const long per_layer = 8 * H + e * (c.qkv_dim() + c.q_dim() + (c.act == rf::Activation::silu ? 2 : 1) * c.intermediate) +
                         (tc ? 4 * c.n_heads : 0);
  const size_t want_full = size_t(R * (c.n_layers * per_layer + 4 * ranks + 4 * H));
  const size_t want_recompute = size_t(R * (c.n_layers + 1) * 4 * H);
  check(a.gt->trace_bytes() == want_full, name + ": the trace holds " + std::to_string(a.gt->trace_bytes()) + " bytes (want " +
                                              std::to_string(want_full) + ")");
  check(gr.trace_bytes() == want_recompute, name + ": with recomputation the trace holds " + std::to_string(gr.trace_bytes()) +
                                               " bytes (want " + std::to_string(want_recompute) + ")");
}

void check_refusals(const rf::ModelConfig& c) {
  rf::cuda::DeviceModel m(c, rf::DType::f32, 0);
  rf::test::load_random(m, 3);
  rf::TrainOptions o = train_options(c);
  std::string msg;
  o.mode = rf::TrainMode::lora;
  o.lora.targets = {"nonexistent"};
  msg.clear();
  try {
    rf::cuda::DeviceTrainer t(m, o);
  } catch (const std::invalid_argument& e) {
    msg = e.what();
  }
  check(msg.find("matches no projection") != std::string::npos, "an unknown LoRA target is named: " + msg);
  o = train_options(c);
  { rf::cuda::DeviceTrainer first(m, o); }  // its adapters stay on the model
  msg.clear();
  try {
    rf::cuda::DeviceTrainer t(m, o);
  } catch (const std::invalid_argument& e) {
    msg = e.what();
  }
  check(msg.find("already has an adapter") != std::string::npos, "a second trainer on an adapted model is refused: " + msg);
  // A model with an adapter merged into its weights has lost the base model training needs.
  rf::cuda::DeviceModel merged(c, rf::DType::f32, 0);
  rf::test::load_random(merged, 3);
  const std::vector<float> A(size_t(2) * c.q_dim(), 0.01f), B(size_t(c.hidden) * 2, 0.01f);
  merged.merge_lora(0, c.arch == rf::Arch::gpt2 ? "attn.c_proj" : "o_proj", A.data(), c.q_dim(), B.data(), c.hidden, 2, 1.f);
  msg.clear();
  try {
    rf::cuda::DeviceTrainer t(merged, train_options(c));
  } catch (const std::invalid_argument& e) {
    msg = e.what();
  }
  check(msg.find("merged") != std::string::npos, "a trainer on a model with a merged adapter is refused: " + msg);
}

// A rank past the fused dropout kernels' (kLoraFusedMaxRank): the adapters' dropout goes through
// a dropped-out copy and products, in the forward and the backward; one red-flag step. In bf16
// too: those adapters read the f32 input the other projections of a bf16 model do without.
void run_large_rank(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o = train_options(c);
  o.lora.rank = rf::cuda::kLoraFusedMaxRank + 1;
  o.lora.alpha = float(o.lora.rank);
  Setup s = make_setup(c, rf::DType::f32, 25, &o);
  perturb(s, 7);
  Batch b = make_batch(c, false, 12);
  compare_step(name + " rank " + std::to_string(o.lora.rank), s, b, true);
  Setup s16 = make_setup(c, rf::DType::bf16, 25, &o);
  perturb(s16, 7);
  const rf::LossOptions lo = loss_options();
  const rf::LossTerms tc = s16.ct->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
  const rf::LossTerms tg = s16.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
  compare_terms(name + " rank " + std::to_string(o.lora.rank) + " bf16", tg, tc, 2e-2);
  compare_params(name + " rank " + std::to_string(o.lora.rank) + " bf16", s16, "grad", 5e-2);
}

// LoRA without flag-token rows (the refusal baseline, and the lm objective): cross-entropy rows
// and benign KL rows (the refusal objective's retention term, whose loss then stands in token 0's
// frozen head row for the flag's), the LM head's rows all frozen. Loss, every gradient and
// dL/d(embeddings) as the CPU's, in f32 and in bf16, and no flag-row parameters on either.
void run_no_flags(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o = train_options(c);
  o.rf_token = -1;
  for (rf::DType dtype : {rf::DType::f32, rf::DType::bf16}) {
    const bool bf16 = dtype == rf::DType::bf16;
    const std::string tag = name + " LoRA without flag rows" + (bf16 ? " bf16" : "");
    Setup s = make_setup(c, dtype, 27, &o);
    perturb(s, 8);
    bool rows = false;
    for (rf::Param* p : s.gt->params()) rows |= p->name.rfind("rf.", 0) == 0;
    check(!rows && s.gt->params().size() == s.ct->params().size(), tag + ": no flag-row parameters");
    Batch b = make_batch(c, true, 13);
    for (int r : {1, 2, 4}) b.rows.push_back({rf::LossRow::benign_kl, r, r, -1, -1});  // not on a cross-entropy row
    if (!bf16) {
      compare_step(tag, s, b, true);
      continue;
    }
    const rf::LossOptions lo = loss_options();
    const rf::LossTerms tc = s.ct->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
    const rf::LossTerms tg = s.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
    compare_terms(tag, tg, tc, 2e-2);
    compare_params(tag, s, "grad", 5e-2);
  }
}

// bf16 LoRA at rank 8: its dB and du read dy in bf16 (the trainer does so for ranks that are
// multiples of 8; the rank-65 case below keeps f32).
void run_bf16(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o = train_options(c);
  o.lora.rank = 8;
  o.lora.alpha = 8.f;
  Setup s = make_setup(c, rf::DType::bf16, 23, &o);
  perturb(s, 6);
  Batch b = make_batch(c, false, 10);
  const rf::LossOptions lo = loss_options();
  const rf::LossTerms tc = s.ct->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
  const rf::LossTerms tg = s.gt->step(seqs(b.trained), seqs(b.ref), b.rows, lo);
  compare_terms(name + " bf16", tg, tc, 2e-2);
  compare_params(name + " bf16", s, "grad", 5e-2);
  // Cross-entropy rows on the bf16 head with the flag rows trained (the loss's bf16 dz and its
  // compact flag columns), from fresh gradients.
  Setup sc = make_setup(c, rf::DType::bf16, 23, &o);
  perturb(sc, 6);
  Batch bc = make_batch(c, true, 11);
  const rf::LossTerms cc = sc.ct->step(seqs(bc.trained), seqs(bc.ref), bc.rows, lo);
  const rf::LossTerms cg = sc.gt->step(seqs(bc.trained), seqs(bc.ref), bc.rows, lo);
  compare_terms(name + " bf16 ce", cg, cc, 2e-2);
  compare_params(name + " bf16 ce", sc, "grad", 5e-2);
}

// Out of device memory in a step, at every size the step grows to in turn: twins A and B take
// the same cross-entropy step and AdamW update; then B's red-flag step (which needs the reference
// forward and the loss's scratch besides) runs under a cap of what B holds plus a slack that
// doubles after each failure, until it completes. Every failure is rf::OutOfMemory naming what it
// allocated; it leaves the parameters, AdamW's moments and the step count as they were (a
// checkpoint written then is the completed steps'); with the gradients zeroed (the trainer
// stops: the TypeScript trainer checkpoints and resumes), the step then completes with A's
// gradients and update bit for bit.
void check_out_of_memory(const std::string& name, const rf::ModelConfig& c) {
  Setup a = make_setup(c, rf::DType::f32, 21), b = make_setup(c, rf::DType::f32, 21);
  perturb(a, 5);
  perturb(b, 5);
  const rf::LossOptions lo = loss_options();
  rf::AdamWOptions ao;
  ao.lr = 1e-2f;
  Batch ce = make_batch(c, true, 8), rfb = make_batch(c, false, 7);
  for (Setup* s : {&a, &b}) {
    s->gt->step(seqs(ce.trained), {}, ce.rows, lo);
    s->gt->optimizer_step(ao);
  }
  auto state = [](Setup& s, const char* part) {
    s.gt->download();
    std::vector<float> all;
    for (rf::Param* p : s.gt->params()) {
      const std::vector<float>& v = std::strcmp(part, "value") == 0 ? p->value : std::strcmp(part, "m") == 0 ? p->m : std::strcmp(part, "v") == 0 ? p->v : p->grad;
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  };
  const std::vector<float> values = state(b, "value"), m1 = state(b, "m"), m2 = state(b, "v");
  const long steps = b.gt->step_count();
  std::vector<std::string> sites;
  bool clean = true, kept = true, done = false;
  size_t slack = 1024;
  for (int attempt = 0; attempt < 40 && !done; ++attempt, slack *= 2) {
    rf::cuda::set_memory_limit(rf::cuda::memory_stats().current + slack);
    try {
      b.gt->step(seqs(rfb.trained), seqs(rfb.ref), rfb.rows, lo);
      done = true;
    } catch (const rf::OutOfMemory& e) {
      const std::string m = e.what();
      const size_t at = m.find("allocating "), end = m.find(" (", at);
      clean &= at != std::string::npos && end != std::string::npos;
      if (clean) sites.push_back(m.substr(at + 11, end - at - 11));
    } catch (const std::exception& e) {
      std::printf("cuda_train: %s: unexpected: %s\n", name.c_str(), e.what());
      clean = false;
    }
    rf::cuda::set_memory_limit(0);
    if (done) break;
    kept &= same_bits(state(b, "value"), values) && same_bits(state(b, "m"), m1) && same_bits(state(b, "v"), m2) &&
            b.gt->step_count() == steps;
    for (rf::Param* p : b.gt->params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
    b.gt->params_changed();
  }
  rf::cuda::set_memory_limit(0);
  std::string list;
  for (const std::string& site : sites) list += (list.empty() ? "" : "; ") + site;
  std::printf("cuda_train: %s: the red-flag step ran out of memory %zu times before it fit: %s\n", name.c_str(), sites.size(), list.c_str());
  check(clean && done && sites.size() >= 3, name + ": a step out of device memory throws OutOfMemory naming what it allocated, at each size in turn");
  check(kept, name + ": a step out of device memory leaves the parameters, AdamW's moments and the step count as they were");
  a.gt->step(seqs(rfb.trained), seqs(rfb.ref), rfb.rows, lo);
  check(same_bits(state(b, "grad"), state(a, "grad")), name + ": after the failures, the step gives its twin's gradients bit for bit");
  a.gt->optimizer_step(ao);
  b.gt->optimizer_step(ao);
  check(same_bits(state(b, "value"), state(a, "value")), name + ": and its twin's AdamW update bit for bit");
}

}  // namespace

// A bf16 step whose sequences are all one token long (the addon accepts them, as the CPU trainer
// does): the traced forward must take the attention path that keeps the log-sum-exp the backward
// reads (the decode kernels keep none: the backward read a null or stale buffer). Same bounds as
// run_bf16, against the CPU's bf16 model.
void run_one_token_bf16(const std::string& name, const rf::ModelConfig& c) {
  rf::TrainOptions o = train_options(c);
  o.lora.dropout = 0.f;
  Setup s = make_setup(c, rf::DType::bf16, 23, &o);
  perturb(s, 6);
  const std::vector<uint32_t> a{5}, b{9};
  const std::vector<rf::Sequence> batch{{a.data(), 1}, {b.data(), 1}};
  const std::vector<rf::LossRow> rows{{rf::LossRow::ce, 0, -1, -1, 7}, {rf::LossRow::ce, 1, -1, -1, 3}};
  const rf::LossOptions lo = loss_options();
  const rf::LossTerms tc = s.ct->step(batch, {}, rows, lo);
  const rf::LossTerms tg = s.gt->step(batch, {}, rows, lo);
  compare_terms(name + " bf16 one-token sequences", tg, tc, 2e-2);
  // Attention over one key is that key's value whatever q and k are: q's and k's gradients (their
  // adapters') are 0 exactly, and the GPU's are bf16 rounding (its stored output against the
  // stored values): those are held to 1e-2 of the largest gradient's norm (3.1e-3 under the
  // emulation, about bf16's unit roundoff), the rest to run_bf16's relative bound.
  s.gt->download();
  std::vector<rf::Param*> cp = s.ct->params(), gp = s.gt->params();
  double largest = 0;
  for (rf::Param* p : cp) largest = std::max(largest, rf::test::l2(p->grad));
  double worst = 0, worst_zero = 0;
  for (size_t i = 0; i < cp.size() && i < gp.size(); ++i) {
    if (rf::test::l2(cp[i]->grad) <= 1e-6 * largest) worst_zero = std::max(worst_zero, rf::test::l2(gp[i]->grad) / largest);
    else worst = std::max(worst, rel_l2(gp[i]->grad, cp[i]->grad));
  }
  check(cp.size() == gp.size(), name + " bf16 one-token sequences: the same parameters");
  check(worst <= 5e-2, name + " bf16 one-token sequences: every nonzero gradient equals the CPU's (worst rel L2 " + fmt(worst) + ")");
  check(worst_zero <= 1e-2, name + " bf16 one-token sequences: the gradients that are 0 stay near 0 (" + fmt(worst_zero) + " of the largest)");
}

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_train: no CUDA device visible; skipped\n");
    return 0;
  }
  try {
    using rf::test::gpt2_of;
    const rf::ModelConfig llama = rf::test::small_llama();
    run_config("llama GQA 2", llama);
    run_config("mistral window 7", rf::test::mistral_of(llama));
    run_config("llama3 rope, tied", rf::test::llama3_tied_of(llama));
    run_config("gpt2", gpt2_of(llama));
    run_config("qwen3 per-head q/k norms", rf::test::qwen3_of(llama));
    run_full("llama GQA 2", llama);
    run_full("qwen3 per-head q/k norms", rf::test::qwen3_of(llama));
    run_full("gpt2", gpt2_of(llama));
    run_full_bf16("llama GQA 2", llama);
    run_full_bf16("gpt2", gpt2_of(llama));
    check_recompute("llama GQA 2", llama);
    check_recompute("gpt2", gpt2_of(llama));
    check_recompute("qwen3 per-head q/k norms bf16", rf::test::qwen3_of(llama), rf::DType::bf16);
    check_recompute("llama GQA 2 bf16 (tensor-core attention)", llama, rf::DType::bf16);
    run_bf16("llama GQA 2", llama);
    run_one_token_bf16("llama GQA 2", llama);
    run_large_rank("llama GQA 2", llama);
    run_no_flags("llama GQA 2", llama);
    run_no_flags("gpt2", gpt2_of(llama));
    check_refusals(llama);
    check_out_of_memory("llama GQA 2", llama);
  } catch (const std::exception& e) {
    check(false, std::string("threw ") + e.what());
  }
  return rf::test::finish("cuda_train");
}
