// Whole-model gradients of the training step against central finite differences of its own
// loss, for LoRA (all targets, red-flag rows, every loss kind) and full fine-tuning, on small
// random Llama-family and GPT-2 models. The step runs in f32, so the numeric derivative of a
// loss of order 1 with h = 1e-2 carries ~1e-4 absolute noise: we compare elements whose
// gradient is not tiny with a relative tolerance of 3e-2 and require the relative L2 error over
// the sampled set below 1e-2. (Agreement with PyTorch autograd in float64 is checked against
// fixtures in test/train.test.ts.)
//
// Also:
//  - full fine-tuning writes the optimizer's updates straight into the engine's packed GEMM
//    layout (train.cpp write_packed_rows): after each optimizer step (with and without
//    clipping) and after params_changed(), every packed matrix (W and the W^T the backward
//    multiplies by) must be byte for byte a fresh pack_weight / pack_weight_transposed of
//    its f32 master, and every vector the engine keeps (norms, biases, positions, untied
//    embedding) its master (bf16: rounded as load_tensor rounds). Matrices whose sides are not
//    multiples of the 32-row panel (and odd, for bf16's pair padding), tied and untied heads,
//    an embedding split over two optimizer chunks; f32 and bf16 engines. A second model loaded
//    from the masters must then give the same logits (rel L2 <= 1e-6: the packs are the same
//    bytes, so in practice 0) and, under a fresh full-mode trainer, the same loss and
//    gradients (rel L2 <= 1e-6 per tensor), which covers the transposed LM head too;
//  - the blocked attention backward (blocks of 32 query rows) on sequences of 70 and 37
//    tokens with GQA, without and with a 20-token sliding window, by whole-model LoRA
//    gradients against central finite differences (the same check_grads tolerances).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels/gemm_backward.h"
#include "model/dropout_keep.h"
#include "model/model.h"
#include "model/train.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::load_random;

namespace {

struct Batch {
  std::vector<std::vector<uint32_t>> seqs, refs;
  std::vector<rf::LossRow> rows;
};

std::vector<rf::Sequence> view(const std::vector<std::vector<uint32_t>>& s) {
  std::vector<rf::Sequence> out;
  for (const auto& q : s) out.push_back({q.data(), int(q.size())});
  return out;
}

// Checks d total / d p for a sample of each parameter's elements.
void check_grads(const std::string& tag, rf::Trainer& t, const Batch& b, const rf::LossOptions& o, int per_param) {
  auto loss = [&] { return t.step(view(b.seqs), view(b.refs), b.rows, o).total; };
  for (rf::Param* p : t.params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
  loss();
  // The finite-difference calls accumulate gradients too: keep the analytic ones first.
  std::vector<std::vector<float>> analytic_all;
  for (rf::Param* p : t.params()) analytic_all.push_back(p->grad);
  std::mt19937 rng(5);
  double num = 0, den = 0;
  int bad = 0, n = 0;
  std::string worst;
  size_t param_index = 0;
  for (rf::Param* p : t.params()) {
    const std::vector<float>& analytic = analytic_all[param_index++];
    std::vector<long> idx;
    for (int k = 0; k < per_param; ++k) idx.push_back(long(rng() % p->value.size()));
    for (long i : idx) {
      const float saved = p->value[i];
      const float h = 1e-2f;
      p->value[i] = saved + h;
      t.params_changed();
      const double lp = loss();
      p->value[i] = saved - h;
      t.params_changed();
      const double lm = loss();
      p->value[i] = saved;
      t.params_changed();
      const double g = (lp - lm) / (2.0 * h);
      const double a = analytic[i];
      num += (a - g) * (a - g);
      den += g * g;
      ++n;
      if (std::fabs(g) > 1e-3 && std::fabs(a - g) > 3e-2 * std::fabs(g) + 2e-4) {
        ++bad;
        worst = p->name + "[" + std::to_string(i) + "] analytic " + std::to_string(a) + " numeric " + std::to_string(g);
      }
    }
  }
  for (rf::Param* q : t.params()) std::fill(q->grad.begin(), q->grad.end(), 0.f);
  const double rel = std::sqrt(num / (den > 0 ? den : 1));
  check(rel < 1e-2 && bad == 0, tag + ": gradients vs finite differences over " + std::to_string(n) +
                                     " elements, rel L2 " + std::to_string(rel) + (bad ? ", e.g. " + worst : ""));
}

rf::ModelConfig llama() {
  rf::ModelConfig c;
  c.vocab = 41;
  c.hidden = 16;
  c.intermediate = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.max_positions = 64;
  c.qkv_bias = true;
  return c;
}

rf::ModelConfig gpt2() {
  rf::ModelConfig c;
  c.arch = rf::Arch::gpt2;
  c.vocab = 37;
  c.hidden = 16;
  c.intermediate = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.max_positions = 32;
  c.norm = rf::NormType::layer;
  c.act = rf::Activation::gelu_new;
  c.rope = false;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.tied_embeddings = true;
  return c;
}

Batch mixed_batch(int rf_token) {
  // Trained: a benign sequence, a harmful one with <rf> inserted at position 5.
  Batch b;
  b.seqs = {{1, 7, 3, 9, 12, 4, 8}, {2, 6, 11, 5, 10, uint32_t(rf_token), 13, 14, 15}};
  b.refs = {{1, 7, 3, 9, 12, 4, 8}, {2, 6, 11, 5, 10, 13, 14, 15}};
  using K = rf::LossRow;
  for (int j = 3; j < 6; ++j) b.rows.push_back({K::benign_kl, j, j, -1, -1});
  for (int j = 2; j < 5; ++j) b.rows.push_back({K::red_flag, 7 + j, -1, 0, -1});  // rows predicting positions 3..5
  for (int j = 5; j < 8; ++j) b.rows.push_back({K::after_kl, 7 + j, 7 + j - 1, -1, -1});
  b.rows.push_back({K::ce, 2, -1, -1, 9});
  return b;
}

void run_lora(const std::string& name, const rf::ModelConfig& c, std::vector<std::string> targets, bool rslora, float dropout) {
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 3);
  rf::TrainOptions opt;
  opt.lora.rank = 3;
  opt.lora.alpha = 6;
  opt.lora.rslora = rslora;
  opt.lora.dropout = dropout;
  opt.lora.targets = targets;
  opt.rf_token = 20;
  opt.seed = 9;
  rf::Trainer t(m, opt);
  // B starts at zero (the adapter starts as the base model); give it values so every path has gradient.
  std::mt19937 rng(4);
  std::normal_distribution<float> d(0.f, 0.3f);
  for (rf::Param* p : t.params())
    if (p->name.find("lora_B") != std::string::npos) for (float& v : p->value) v = d(rng);
  for (auto agg : {rf::Aggregation::any, rf::Aggregation::mean}) {
    rf::LossOptions o;
    o.aggregation = agg;
    o.alpha_benign = 1.3f;
    o.alpha_rf = 0.7f;
    o.alpha_after = 1.1f;
    o.alpha_ce = 0.5f;
    o.dropout_seed = 17;
    check_grads(name + (agg == rf::Aggregation::any ? " any" : " mean"), t, mixed_batch(20), o, 6);
  }
  // The loss is deterministic for a dropout seed, and the adapter-off model is the base model.
  rf::LossOptions o;
  const double a = t.step(view(mixed_batch(20).seqs), view(mixed_batch(20).refs), mixed_batch(20).rows, o).total;
  const double b = t.step(view(mixed_batch(20).seqs), view(mixed_batch(20).refs), mixed_batch(20).rows, o).total;
  check(a == b, name + ": same inputs, same loss");
}

// Several flag tokens (one per risk category): every flag's embedding and head rows train;
// red-flag rows name their flag (target), a flag inserted in the text trains its embedding row.
void run_flags(const std::string& name, const rf::ModelConfig& c) {
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 3);
  rf::TrainOptions opt;
  opt.lora.rank = 3;
  opt.lora.alpha = 6;
  opt.lora.targets = {"q_proj", "v_proj", "down_proj"};
  opt.flag_tokens = {20, 33, 7};
  opt.seed = 9;
  rf::Trainer t(m, opt);
  std::mt19937 rng(4);
  std::normal_distribution<float> d(0.f, 0.3f);
  for (rf::Param* p : t.params())
    if (p->name.find("lora_B") != std::string::npos) for (float& v : p->value) v = d(rng);
  // Move the flag rows off their base rows, so the KL terms see them.
  for (rf::Param* p : t.params())
    if (p->name.rfind("rf.", 0) == 0) for (float& v : p->value) v += d(rng);
  Batch b = mixed_batch(33);  // <rf:33> inserted in the harmful sequence
  using K = rf::LossRow;
  for (K& r : b.rows)
    if (r.kind == K::red_flag) r.target = 33;
  b.rows.push_back({K::red_flag, 7 + 6, -1, 1, 7});   // a second group training flag 7
  b.rows.push_back({K::red_flag, 7 + 7, -1, 1, 7});
  b.rows.push_back({K::red_flag, 3, -1, 2, -1});       // a third, the first flag (<rf>)
  for (auto agg : {rf::Aggregation::any, rf::Aggregation::mean}) {
    rf::LossOptions o;
    o.aggregation = agg;
    o.alpha_benign = 1.3f, o.alpha_rf = 0.7f, o.alpha_after = 1.1f, o.alpha_ce = 0.5f;
    check_grads(name + (agg == rf::Aggregation::any ? " any" : " mean"), t, b, o, 8);
  }
  // A target that is not a flag is refused.
  Batch bad = b;
  bad.rows.push_back({K::red_flag, 2, -1, 3, 21});
  bool thrown = false;
  try {
    t.step(view(bad.seqs), view(bad.refs), bad.rows, rf::LossOptions());
  } catch (const std::invalid_argument&) {
    thrown = true;
  }
  check(thrown, name + ": a red-flag target that is not a flag token throws");

  // One flag given as a list trains exactly as rf_token.
  rf::Model m1(c, rf::DType::f32, 2), m2(c, rf::DType::f32, 2);
  load_random(m1, 3);
  load_random(m2, 3);
  rf::TrainOptions o1 = opt, o2 = opt;
  o1.flag_tokens.clear();
  o1.rf_token = 20;
  o2.flag_tokens = {20};
  rf::Trainer t1(m1, o1), t2(m2, o2);
  Batch one = mixed_batch(20);
  const double l1 = t1.step(view(one.seqs), view(one.refs), one.rows, rf::LossOptions()).total;
  const double l2 = t2.step(view(one.seqs), view(one.refs), one.rows, rf::LossOptions()).total;
  check(l1 == l2, name + ": flag_tokens {20} gives rf_token 20's loss");
}

void run_full(const std::string& name, const rf::ModelConfig& c) {
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 3);
  rf::TrainOptions opt;
  opt.mode = rf::TrainMode::full;
  rf::Trainer t(m, opt);
  Batch b;
  b.seqs = {{1, 7, 3, 9, 12, 4, 8}, {2, 6, 11, 5, 10, 13}};
  for (int r = 0; r < 12; ++r) if (r != 6) b.rows.push_back({rf::LossRow::ce, r, -1, -1, int((r * 7 + 3) % c.vocab)});
  rf::LossOptions o;
  check_grads(name + " full fine-tuning", t, b, o, 4);
  // An optimizer step lowers the loss on the same batch (and repacks the engine's weights).
  const double before = t.step(view(b.seqs), view(b.refs), b.rows, o).total;
  rf::AdamWOptions a;
  a.lr = 1e-2f;
  t.optimizer_step(a);
  for (rf::Param* p : t.params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
  const double after = t.step(view(b.seqs), view(b.refs), b.rows, o).total;
  check(after < before, name + ": one AdamW step lowers the loss (" + std::to_string(before) + " -> " + std::to_string(after) + ")");
}

// dL/d(input embeddings) written by step() (Sequence::embed_grad) against central finite
// differences of the loss in the perturbation (Sequence::embed_delta), on every row of both
// sequences: the gradient embedding-space attacks follow. Same tolerances as check_grads. A
// zero perturbation must give exactly the unperturbed loss. The attacker's objective is
// covered too: a negative red-flag weight (lower p(<rf>) while keeping the answer likely).
void run_embed_grad(const std::string& name, const rf::ModelConfig& c, rf::TrainMode mode) {
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 3);
  rf::TrainOptions opt;
  opt.mode = mode;
  opt.lora.rank = 2;
  opt.lora.alpha = 4;
  opt.lora.targets = {c.arch == rf::Arch::gpt2 ? "c_attn" : "q_proj", c.arch == rf::Arch::gpt2 ? "c_fc" : "down_proj"};
  opt.rf_token = mode == rf::TrainMode::lora ? 20 : -1;
  rf::Trainer t(m, opt);
  Batch b = mixed_batch(20);
  if (mode == rf::TrainMode::full) {  // no reference model, no red-flag token: CE rows only
    b.refs.clear();
    b.rows.clear();
    for (int r = 0; r < 15; ++r) b.rows.push_back({rf::LossRow::ce, r, -1, -1, int((r * 5 + 2) % c.vocab)});
  }
  rf::LossOptions o;
  o.alpha_rf = -0.8f;
  o.alpha_ce = 1.f;
  const long H = c.hidden;
  std::vector<std::vector<float>> delta(b.seqs.size()), grad(b.seqs.size());
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.f, 0.05f);
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    delta[i].resize(b.seqs[i].size() * H);
    for (float& v : delta[i]) v = d(rng);
    grad[i].assign(delta[i].size(), NAN);
  }
  auto loss = [&](bool perturbed, bool want_grad) {
    std::vector<rf::Sequence> seqs = view(b.seqs);
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (perturbed) seqs[i].embed_delta = delta[i].data();
      if (want_grad) seqs[i].embed_grad = grad[i].data();
    }
    return t.step(seqs, view(b.refs), b.rows, o).total;
  };
  {
    const double plain = loss(false, false);
    std::vector<std::vector<float>> saved = delta;
    for (auto& v : delta) std::fill(v.begin(), v.end(), 0.f);
    const double zero = loss(true, false);
    delta = saved;
    check(plain == zero, name + ": a zero embedding perturbation leaves the loss unchanged");
  }
  loss(true, true);
  double num = 0, den = 0;
  int bad = 0, n = 0;
  std::string worst;
  for (size_t i = 0; i < delta.size(); ++i) {
    for (size_t k = 0; k < delta[i].size(); k += 3) {
      const float saved = delta[i][k];
      const float h = 1e-2f;
      delta[i][k] = saved + h;
      const double lp = loss(true, false);
      delta[i][k] = saved - h;
      const double lm = loss(true, false);
      delta[i][k] = saved;
      const double g = (lp - lm) / (2.0 * h), a = grad[i][k];
      num += (a - g) * (a - g);
      den += g * g;
      ++n;
      if (!(std::fabs(a - g) <= 3e-2 * std::fabs(g) + 2e-4)) {
        ++bad;
        worst = "seq " + std::to_string(i) + " [" + std::to_string(k) + "] analytic " + std::to_string(a) + " numeric " + std::to_string(g);
      }
    }
  }
  const double rel = std::sqrt(num / (den > 0 ? den : 1));
  check(den > 0 && rel < 1e-2 && bad == 0, name + ": input-embedding gradients vs finite differences over " + std::to_string(n) +
                                               " elements, rel L2 " + std::to_string(rel) + (bad ? ", e.g. " + worst : ""));

  // With the perturbation held fixed, the parameters' gradients still match finite differences
  // (what adversarial training's outer step relies on).
  {
    for (rf::Param* p : t.params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
    loss(true, false);
    std::vector<std::vector<float>> analytic;
    for (rf::Param* p : t.params()) analytic.push_back(p->grad);
    double pn = 0, pd = 0;
    int pbad = 0, pcount = 0;
    size_t pi = 0;
    for (rf::Param* p : t.params()) {
      for (int k = 0; k < 4; ++k) {
        const long i = long(rng() % p->value.size());
        const float saved = p->value[i];
        p->value[i] = saved + 1e-2f;
        t.params_changed();
        const double lp = loss(true, false);
        p->value[i] = saved - 1e-2f;
        t.params_changed();
        const double lm = loss(true, false);
        p->value[i] = saved;
        t.params_changed();
        const double g = (lp - lm) / 2e-2, a = analytic[pi][size_t(i)];
        pn += (a - g) * (a - g);
        pd += g * g;
        ++pcount;
        if (!(std::fabs(a - g) <= 3e-2 * std::fabs(g) + 2e-4)) ++pbad;
      }
      ++pi;
    }
    for (rf::Param* p : t.params()) std::fill(p->grad.begin(), p->grad.end(), 0.f);
    const double prel = std::sqrt(pn / (pd > 0 ? pd : 1));
    check(pd > 0 && prel < 1e-2 && pbad == 0, name + ": parameter gradients with a fixed input perturbation vs finite differences over " +
                                                  std::to_string(pcount) + " elements, rel L2 " + std::to_string(prel));
  }

  // param_grads = false: the same input-embedding gradient, the parameters' gradients untouched.
  std::vector<std::vector<float>> before;
  for (rf::Param* p : t.params()) before.push_back(p->grad);
  std::vector<std::vector<float>> with_params = grad;
  o.param_grads = false;
  loss(true, true);
  o.param_grads = true;
  bool same_input = grad == with_params, untouched = true;
  size_t i = 0;
  for (rf::Param* p : t.params()) untouched &= p->grad == before[i++];
  check(same_input && untouched, name + ": without parameter gradients, the same input-embedding gradient and the parameters' gradients as they were");
}


// ---------------------------------------------------------------------------------------
// Full fine-tuning: the packed weights the optimizer writes in place.

bool same_pack(const rf::PackedWeight& a, const rf::PackedWeight& b) {
  return a.N == b.N && a.K == b.K && a.dtype == b.dtype && a.bytes == b.bytes && a.data && b.data &&
         std::memcmp(a.data.get(), b.data.get(), a.bytes) == 0;
}

std::map<std::string, rf::Param*> params_by_name(rf::Trainer& t) {
  std::map<std::string, rf::Param*> out;
  for (rf::Param* p : t.params()) out[p->name] = p;
  return out;
}

// The engine's copies of every trained tensor against its f32 master, exactly: packed
// matrices byte for byte against pack_weight (and pack_weight_transposed of that), vectors
// element for element. The LM head's transposed pack is private to the trainer; the
// gradient comparison in run_full_packed covers it.
void check_engine_copies(const std::string& tag, rf::Model& m, rf::Trainer& t) {
  const rf::ModelConfig& c = m.config();
  std::map<std::string, rf::Param*> p = params_by_name(t);
  int n = 0, bad = 0;
  std::string first;
  auto fail = [&](const std::string& what) {
    if (!bad++) first = what;
  };
  auto matrix = [&](const std::string& name, const rf::PackedWeight& w, const rf::PackedWeight* wt) {
    if (!p.count(name)) return fail(name + " (no master)");
    const rf::Param* q = p[name];
    rf::PackedWeight fw, fwt;
    rf::pack_weight(fw, q->value.data(), rf::SrcType::f32, int(q->shape[0]), int(q->shape[1]), false, m.dtype());
    ++n;
    if (!same_pack(w, fw)) fail(name + " W");
    if (!wt) return;
    rf::pack_weight_transposed(fwt, fw);
    ++n;
    if (!same_pack(*wt, fwt)) fail(name + " W^T");
  };
  auto vec = [&](const std::string& name, const std::vector<float>& v) {
    if (!p.count(name)) return fail(name + " (no master)");
    ++n;
    const std::vector<float>& want = p[name]->value;
    if (v.size() != want.size() || std::memcmp(v.data(), want.data(), v.size() * 4) != 0) fail(name);
  };
  static const char* names[4] = {"qkv", "o", "mlp_in", "mlp_out"};
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    for (int i = 0; i < 4; ++i) {
      rf::Linear& lin = m.linear(l, i);
      matrix(pre + names[i] + ".weight", lin.w, &lin.wt);
      if (!lin.bias.empty()) vec(pre + names[i] + ".bias", lin.bias);
    }
    rf::Layer& L = m.layer(l);
    vec(pre + "attn_norm.weight", L.attn_norm.weight);
    vec(pre + "mlp_norm.weight", L.mlp_norm.weight);
    if (!L.attn_norm.bias.empty()) vec(pre + "attn_norm.bias", L.attn_norm.bias);
    if (!L.mlp_norm.bias.empty()) vec(pre + "mlp_norm.bias", L.mlp_norm.bias);
  }
  vec("final_norm.weight", m.final_norm().weight);
  if (!m.final_norm().bias.empty()) vec("final_norm.bias", m.final_norm().bias);
  if (c.arch == rf::Arch::gpt2) vec("pos_embed", m.pos_embed());
  matrix(c.tied_embeddings ? "embed" : "lm_head", m.lm_head().w, nullptr);
  if (!c.tied_embeddings && p.count("embed")) {
    // The untied embedding table (reloaded through load_tensor): its rows as the engine reads them.
    const rf::Param* e = p["embed"];
    std::vector<float> row(c.hidden);
    ++n;
    for (int v = 0; v < c.vocab; ++v) {
      m.embed_row(uint32_t(v), row.data());
      bool ok = true;
      for (int i = 0; i < c.hidden; ++i) {
        const float master = e->value[size_t(v) * c.hidden + i];
        const float want = m.dtype() == rf::DType::bf16 ? rf::bf16_to_f32(rf::f32_to_bf16(master)) : master;
        ok &= std::memcmp(&row[i], &want, 4) == 0;
      }
      if (!ok) {
        fail("embed row " + std::to_string(v));
        break;
      }
    }
  }
  check(bad == 0, tag + ": " + std::to_string(n) + " engine copies equal fresh packs of the f32 masters" +
                      (bad ? " (" + std::to_string(bad) + " differ, first " + first + ")" : ""));
}

// Logits of every token of every sequence (fresh caches).
std::vector<float> all_logits(rf::Model& m, const std::vector<std::vector<uint32_t>>& seqs) {
  std::vector<rf::KvCache> caches;
  for (size_t i = 0; i < seqs.size(); ++i) caches.push_back(m.new_cache());
  std::vector<rf::ForwardItem> items;
  for (size_t i = 0; i < seqs.size(); ++i) items.push_back({&caches[i], seqs[i].data(), int(seqs[i].size())});
  std::vector<float> out(size_t(rf::Model::logits_rows(items, rf::LogitsMode::all)) * m.vocab());
  m.forward(items, rf::LogitsMode::all, out.data());
  return out;
}

// Cross-entropy on every position but each sequence's last, to pseudo-random targets: every
// tensor gets a gradient.
Batch ce_batch(int vocab, std::vector<int> lengths, unsigned seed) {
  std::mt19937 rng(seed);
  Batch b;
  int row = 0;
  for (int len : lengths) {
    std::vector<uint32_t> s;
    for (int i = 0; i < len; ++i) s.push_back(uint32_t(rng() % vocab));
    b.seqs.push_back(s);
    for (int i = 0; i + 1 < len; ++i) b.rows.push_back({rf::LossRow::ce, row + i, -1, -1, int(rng() % vocab)});
    row += len;
  }
  return b;
}

void run_full_packed(const std::string& name, const rf::ModelConfig& c, rf::DType dtype) {
  const std::string tag = name + (dtype == rf::DType::bf16 ? " bf16" : " f32");
  rf::Model m(c, dtype, 2);
  load_random(m, 11);
  rf::TrainOptions opt;
  opt.mode = rf::TrainMode::full;
  rf::Trainer t(m, opt);
  const Batch b = ce_batch(c.vocab, {13, 9}, 21);
  rf::LossOptions lo;
  std::vector<uint8_t> w0(m.linear(0, 2).w.bytes), h0(m.lm_head().w.bytes);
  std::memcpy(w0.data(), m.linear(0, 2).w.data.get(), w0.size());
  std::memcpy(h0.data(), m.lm_head().w.data.get(), h0.size());
  check_engine_copies(tag + " before any step", m, t);
  rf::AdamWOptions a;
  a.lr = 1e-2f;
  a.weight_decay = 0.1f;
  for (int k = 0; k < 2; ++k) {
    // Step 1 clips (the norm pass of its own, then the updates); step 2 sums the norm while updating.
    a.clip_norm = k == 0 ? 0.5f : 0.f;
    t.step(view(b.seqs), view(b.refs), b.rows, lo);
    t.optimizer_step(a);
    check_engine_copies(tag + " after optimizer step " + std::to_string(k + 1), m, t);
  }
  // Not vacuous: the steps moved the packed weights.
  check(std::memcmp(w0.data(), m.linear(0, 2).w.data.get(), w0.size()) != 0 &&
            std::memcmp(h0.data(), m.lm_head().w.data.get(), h0.size()) != 0,
        tag + ": the optimizer steps changed the packed weights");

  // A second model loaded from the f32 masters: the same logits, and (under a fresh full-mode
  // trainer, whose transposed packs are built by pack_weight_transposed) the same loss and
  // gradients. Tolerance rel L2 1e-6 each (identical bytes give identical results up to
  // the order of parallel sums).
  rf::Model m2(c, dtype, 2);
  for (rf::Param* p : t.params()) {
    std::vector<long> shape = p->shape;
    if (p->name == "pos_embed") shape = {long(c.max_positions), long(c.hidden)};
    m2.load_tensor(p->name, p->value.data(), rf::SrcType::f32, shape, false);
  }
  m2.check_complete();
  const std::vector<std::vector<uint32_t>> eval = ce_batch(c.vocab, {17, 6, 11}, 33).seqs;
  const std::vector<float> l1 = all_logits(m, eval), l2 = all_logits(m2, eval);
  double max_abs = 0;
  for (size_t i = 0; i < l1.size(); ++i) max_abs = std::max(max_abs, std::fabs(double(l1[i]) - l2[i]));
  const double rel = rf::test::rel_l2(l1, l2);
  check(rel <= 1e-6, tag + ": logits after the steps = logits of a model loaded from the masters, rel L2 " +
                         std::to_string(rel) + ", max abs " + std::to_string(max_abs));
  {
    rf::Trainer t2(m2, opt);
    const double loss1 = t.step(view(b.seqs), view(b.refs), b.rows, lo).total;
    const double loss2 = t2.step(view(b.seqs), view(b.refs), b.rows, lo).total;
    std::map<std::string, rf::Param*> p2 = params_by_name(t2);
    double worst = 0;
    std::string worst_name;
    bool all = true;
    for (rf::Param* p : t.params()) {
      if (!p2.count(p->name)) {
        all = false;
        continue;
      }
      const double r = rf::test::rel_l2(p->grad, p2[p->name]->grad);
      if (std::isnan(r) || r > worst) {
        worst = std::isnan(r) ? 1e300 : r;
        worst_name = p->name;
      }
      std::fill(p->grad.begin(), p->grad.end(), 0.f);
    }
    check(all && worst <= 1e-6 && std::fabs(loss1 - loss2) <= 1e-6 * std::fabs(loss2),
          tag + ": loss and gradients after the steps = those of a fresh trainer on the reloaded model (loss " +
              std::to_string(loss1) + " vs " + std::to_string(loss2) + ", worst gradient rel L2 " + std::to_string(worst) +
              (worst_name.empty() ? "" : " in " + worst_name) + ")");
  }

  // Restoring values directly (a checkpoint) goes through the same in-place writes.
  std::mt19937 rng(8);
  std::normal_distribution<float> d(0.f, 0.02f);
  for (rf::Param* p : t.params())
    for (float& v : p->value) v += d(rng);
  t.params_changed();
  check_engine_copies(tag + " after params_changed", m, t);
}

// Llama-family, untied, sides that are not multiples of 32: qkv [80, 40], o [40, 40],
// mlp_in [144, 40], mlp_out [40, 72], lm_head [101, 40].
rf::ModelConfig llama_untied_odd() {
  rf::ModelConfig c;
  c.vocab = 101;
  c.hidden = 40;
  c.intermediate = 72;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 10;
  c.max_positions = 64;
  c.qkv_bias = true;
  return c;
}

// Llama-family, tied, odd sides everywhere (bf16 pads K to even, W^T pads N): qkv [50, 33],
// o [33, 30], mlp_in [74, 33], mlp_out [33, 37], embed/head [2049, 33] (two optimizer chunks:
// 65536 / (32 * 33) = 62 panels = 1984 rows, then 65).
rf::ModelConfig llama_tied_odd() {
  rf::ModelConfig c;
  c.vocab = 2049;
  c.hidden = 33;
  c.intermediate = 37;
  c.n_layers = 2;
  c.n_heads = 3;
  c.n_kv_heads = 1;
  c.head_dim = 10;
  c.max_positions = 64;
  c.tied_embeddings = true;
  return c;
}

// GPT-2, tied: c_attn [120, 40], c_proj [40, 40], c_fc [75, 40], mlp c_proj [40, 75], wte [101, 40].
rf::ModelConfig gpt2_odd() {
  rf::ModelConfig c = gpt2();
  c.vocab = 101;
  c.hidden = 40;
  c.intermediate = 75;
  c.n_heads = 5;
  c.n_kv_heads = 5;
  c.head_dim = 8;
  return c;
}

// ---------------------------------------------------------------------------------------
// The blocked attention backward on sequences longer than a block (32 query rows).

// Sequence 0 (70 tokens) carries the red-flag token at position 45, sequence 1 (37 tokens)
// is benign; the reference batch is the same without the red-flag token. Loss rows of every
// kind sit past the first block: red-flag rows at positions 42..44, after-KL at 45..48,
// benign KL at sequence 1's positions 5, 20, 33..36, cross-entropy every 4th position of both.
Batch long_batch(int vocab, int rf_token) {
  std::mt19937 rng(12);
  auto token = [&] { return uint32_t(1 + rng() % (vocab - 2)); };  // never rf_token (= vocab - 1)
  Batch b;
  std::vector<uint32_t> s0, s1;
  for (int i = 0; i < 70; ++i) s0.push_back(i == 45 ? uint32_t(rf_token) : token());
  for (int i = 0; i < 37; ++i) s1.push_back(token());
  std::vector<uint32_t> r0;
  for (int i = 0; i < 70; ++i)
    if (i != 45) r0.push_back(s0[i]);
  b.seqs = {s0, s1};
  b.refs = {r0, s1};
  using K = rf::LossRow;
  const int off1 = 70, ref_off1 = 69;
  for (int p = 42; p < 45; ++p) b.rows.push_back({K::red_flag, p, -1, 0, -1});
  for (int p = 45; p < 49; ++p) b.rows.push_back({K::after_kl, p, p - 1, -1, -1});
  for (int p : {5, 20, 33, 34, 35, 36}) b.rows.push_back({K::benign_kl, off1 + p, ref_off1 + p, -1, -1});
  for (int p = 1; p < 69; p += 4) b.rows.push_back({K::ce, p, -1, -1, int(s0[p + 1])});
  for (int p = 2; p < 36; p += 4) b.rows.push_back({K::ce, off1 + p, -1, -1, int(rng() % vocab)});
  return b;
}

rf::ModelConfig llama_long(int window) {
  rf::ModelConfig c;
  c.vocab = 41;
  c.hidden = 16;
  c.intermediate = 24;
  c.n_layers = 2;
  c.n_heads = 6;
  c.n_kv_heads = 2;  // GQA, 3 query heads a KV head
  c.head_dim = 6;
  c.max_positions = 128;
  c.qkv_bias = true;
  c.sliding_window = window;
  return c;
}

// LoRA gradients (q/k/v adapters reach every query, key and value row of the attention
// backward; the red-flag rows too) against central differences (l(+h) - l(-h)) / 2h formed in
// float64 from the step's loss, h = 1e-2, with check_grads' tolerances: per element
// |analytic - numeric| <= 3e-2 |numeric| + 2e-4 where |numeric| > 1e-3, and rel L2 < 1e-2 over
// the 6 sampled elements of every parameter. check_grads has no size limit; at T = 107 rows
// each of its ~2 x 6 x (params) losses is a forward, a reference forward and a backward.
void run_long_attention(const std::string& name, const rf::ModelConfig& c, std::vector<std::string> targets) {
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 5);
  const int rf_token = c.vocab - 1;
  if (c.sliding_window > 0) {
    // The window is in effect: with 2 layers a position sees tokens up to 2 (window - 1)
    // back, so changing token 5 leaves positions > 5 + 2 (window - 1) exactly as they were
    // (per-row arithmetic only; tolerance 1e-6) and moves the positions before.
    std::vector<uint32_t> a(70), bb(70);
    for (int i = 0; i < 70; ++i) a[i] = bb[i] = uint32_t(1 + (i * 7) % 37);
    bb[5] = a[5] + 1;
    const std::vector<float> la = all_logits(m, {a}), lb = all_logits(m, {bb});
    const int reach = 5 + 2 * (c.sliding_window - 1) + 1, V = c.vocab;  // first position out of reach
    double far = 0, near = 0;
    for (int t = 5; t < 70; ++t)
      for (int v = 0; v < V; ++v) {
        const double dlt = std::fabs(double(la[size_t(t) * V + v]) - lb[size_t(t) * V + v]);
        (t >= reach ? far : near) = std::max(t >= reach ? far : near, dlt);
      }
    check(far <= 1e-6 && near > 1e-3, name + ": sliding window in the forward (change beyond reach " + std::to_string(far) +
                                          ", within " + std::to_string(near) + ")");
  }
  rf::TrainOptions opt;
  opt.lora.rank = 3;
  opt.lora.alpha = 6;
  opt.lora.targets = targets;
  opt.rf_token = rf_token;
  opt.seed = 4;
  rf::Trainer t(m, opt);
  std::mt19937 rng(6);
  std::normal_distribution<float> d(0.f, 0.3f);
  for (rf::Param* p : t.params())
    if (p->name.find("lora_B") != std::string::npos) for (float& v : p->value) v = d(rng);
  rf::LossOptions o;
  o.aggregation = rf::Aggregation::any;
  o.alpha_benign = 1.3f;
  o.alpha_rf = 0.7f;
  o.alpha_after = 1.1f;
  o.alpha_ce = 0.5f;
  check_grads(name, t, long_batch(c.vocab, rf_token), o, 6);
}

// LoRA dropout keeps each element with probability 1 - p: the finite-difference checks only show
// that the forward and backward use one mask, not which share it keeps. 2^17 elements per p, the
// kept share within 4 standard errors of 1 - p; the mask varies along every coordinate.
void check_dropout_share() {
  for (float p : {0.05f, 0.1f, 0.3f, 0.5f}) {
    long kept = 0, n = 0;
    for (int layer = 0; layer < 2; ++layer)
      for (int adapter = 0; adapter < 2; ++adapter)
        for (long row = 0; row < 128; ++row)
          for (long col = 0; col < 256; ++col, ++n) kept += rf::dropout_keep(99, layer, adapter, row, col, p);
    const double share = double(kept) / double(n), se = std::sqrt(double(p) * (1 - p) / double(n));
    char msg[160];
    std::snprintf(msg, sizeof msg, "dropout p=%.2f keeps %.4f of the elements (want %.4f within %.4f)", p, share, 1 - p, 4 * se);
    check(std::fabs(share - (1 - p)) <= 4 * se, msg);
  }
  // Along each coordinate the decisions differ (a mask constant in one of them would pass the share test).
  long flips[4] = {0, 0, 0, 0};
  for (long i = 0; i < 4096; ++i) {
    const bool k = rf::dropout_keep(7, 1, 1, i, i, 0.5f);
    flips[0] += k != rf::dropout_keep(7, 2, 1, i, i, 0.5f);
    flips[1] += k != rf::dropout_keep(7, 1, 2, i, i, 0.5f);
    flips[2] += k != rf::dropout_keep(7, 1, 1, i + 1, i, 0.5f);
    flips[3] += k != rf::dropout_keep(7, 1, 1, i, i + 1, 0.5f);
  }
  for (long f : flips) check(f > 1700 && f < 2400, "dropout masks of neighbouring layers, adapters, rows and columns differ in about half the elements");
}

// AdamW with global-norm clipping against a float64 restatement of PyTorch's documented update
// (torch.optim.AdamW, amsgrad off: p -= lr wd p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps); torch.nn.utils.clip_grad_norm_: g *=
// max / (norm + 1e-6) when that is below 1), three steps with new gradients, the first two
// clipped, weight decay on the parameters that take it. The trainer keeps its moments in f32:
// values within 1e-5 relative (measured 3e-6). The other tests of the optimizer only see a loss
// go down.
void check_adamw_reference() {
  const rf::ModelConfig c = llama();
  rf::Model m(c, rf::DType::f32, 2);
  load_random(m, 3);
  rf::TrainOptions opt;
  opt.lora.rank = 3;
  opt.lora.alpha = 6;
  opt.lora.targets = {"q_proj", "down_proj"};
  opt.rf_token = c.vocab - 1;
  rf::Trainer t(m, opt);
  std::vector<rf::Param*> ps = t.params();
  struct Ref { std::vector<double> p, m, v; };
  std::vector<Ref> ref;
  for (rf::Param* p : ps) ref.push_back({std::vector<double>(p->value.begin(), p->value.end()), std::vector<double>(p->value.size(), 0.0), std::vector<double>(p->value.size(), 0.0)});
  rf::AdamWOptions a;
  a.lr = 3e-2f, a.beta1 = 0.8f, a.beta2 = 0.95f, a.eps = 1e-6f, a.weight_decay = 0.1f, a.clip_norm = 1.f;
  std::mt19937 rng(17);
  std::normal_distribution<float> d(0.f, 1.f);
  double worst = 0;
  bool decayed = false;
  for (int step = 1; step <= 3; ++step) {
    // Gradients of norm about 10, 3 and 0.1: the first two are clipped, the last is not.
    const float scale = step == 1 ? 0.05f : step == 2 ? 0.015f : 0.0005f;
    double sq = 0;
    for (rf::Param* p : ps)
      for (float& g : p->grad) g = scale * d(rng), sq += double(g) * g;
    const double norm = std::sqrt(sq), coef = std::min(1.0, double(a.clip_norm) / (norm + 1e-6));
    const double lr = a.lr, b1 = a.beta1, b2 = a.beta2, eps = a.eps;
    for (size_t k = 0; k < ps.size(); ++k) {
      Ref& r = ref[k];
      decayed |= ps[k]->decay;
      for (size_t i = 0; i < r.p.size(); ++i) {
        const double g = double(ps[k]->grad[i]) * coef;
        if (ps[k]->decay) r.p[i] -= lr * a.weight_decay * r.p[i];
        r.m[i] = b1 * r.m[i] + (1 - b1) * g;
        r.v[i] = b2 * r.v[i] + (1 - b2) * g * g;
        r.p[i] -= lr * (r.m[i] / (1 - std::pow(b1, step))) / (std::sqrt(r.v[i] / (1 - std::pow(b2, step))) + eps);
      }
    }
    const double reported = t.optimizer_step(a);
    check(std::fabs(reported - norm) <= 1e-9 * norm, "optimizer_step returns the gradient norm before clipping");
    for (size_t k = 0; k < ps.size(); ++k)
      for (size_t i = 0; i < ref[k].p.size(); ++i)
        worst = std::max(worst, std::fabs(ps[k]->value[i] - ref[k].p[i]) / std::max(1e-3, std::fabs(ref[k].p[i])));
  }
  std::printf("test_train: AdamW against PyTorch's update in float64: worst relative error %.2e\n", worst);
  check(worst <= 1e-5, "AdamW with clipping and decoupled weight decay equals PyTorch's update (3 steps)");
  check(decayed, "some parameters take weight decay");
}

}  // namespace

int main() {
  check_dropout_share();
  check_adamw_reference();
  run_lora("llama lora", llama(), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, false, 0.f);
  run_lora("llama lora rslora dropout", llama(), {"q_proj", "v_proj"}, true, 0.3f);
  rf::ModelConfig swa = llama();
  swa.sliding_window = 3;
  swa.tied_embeddings = true;
  run_lora("llama tied window-3 lora", swa, {"o_proj", "down_proj", "k_proj"}, false, 0.f);
  run_lora("gpt2 lora", gpt2(), {"c_attn", "c_proj", "c_fc"}, false, 0.f);
  run_lora("qwen3 qk-norm lora", rf::test::qwen3_of(llama()), {"q_proj", "k_proj", "v_proj", "o_proj"}, false, 0.f);
  run_flags("llama untied 3 flags", llama());
  run_flags("llama tied 3 flags", swa);
  run_full("llama", llama());
  run_full("gpt2", gpt2());
  run_full("qwen3 qk-norm", rf::test::qwen3_of(llama()));
  run_embed_grad("llama lora", llama(), rf::TrainMode::lora);
  run_embed_grad("gpt2 lora", gpt2(), rf::TrainMode::lora);
  run_embed_grad("llama full", llama(), rf::TrainMode::full);
  run_embed_grad("qwen3 qk-norm full", rf::test::qwen3_of(llama()), rf::TrainMode::full);
  for (rf::DType dt : {rf::DType::f32, rf::DType::bf16}) {
    run_full_packed("llama untied 40/72/101", llama_untied_odd(), dt);
    run_full_packed("llama tied 33/37/2049", llama_tied_odd(), dt);
    run_full_packed("gpt2 tied 40/75/101", gpt2_odd(), dt);
  }
  run_long_attention("llama GQA T=70+37 lora", llama_long(0),
                     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
  run_long_attention("llama GQA T=70+37 window-20 lora", llama_long(20), {"q_proj", "k_proj", "v_proj", "o_proj"});
  return rf::test::finish("test_train");
}
