// Whole-model gradients of the training step against central finite differences of its own
// loss, for LoRA (all targets, red-flag rows, every loss kind) and full fine-tuning, on small
// random Llama-family and GPT-2 models. The step runs in f32, so the numeric derivative of a
// loss of order 1 with h = 1e-2 carries ~1e-4 absolute noise: we compare elements whose
// gradient is not tiny with a relative tolerance of 3e-2 and require the relative L2 error over
// the sampled set below 1e-2. (Agreement with PyTorch autograd in float64 is checked against
// fixtures in test/train.test.ts.)
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/train.h"
#include "tests/check.h"

using rf::test::check;

namespace {

void load_random(rf::Model& m, unsigned seed) {
  const rf::ModelConfig& c = m.config();
  std::mt19937 rng(seed);
  auto add = [&](const std::string& name, std::vector<long> shape, float scale, float mean = 0.f, bool kn = false) {
    long n = 1;
    for (long d : shape) n *= d;
    std::normal_distribution<float> d(mean, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    m.load_tensor(name, v.data(), rf::SrcType::f32, shape, kn);
  };
  const long H = c.hidden, I = c.intermediate;
  const bool gpt2 = c.arch == rf::Arch::gpt2;
  add("embed", {c.vocab, H}, 0.5f);
  if (!c.tied_embeddings) add("lm_head", {c.vocab, H}, 0.3f);
  if (gpt2) add("pos_embed", {c.max_positions, H}, 0.3f);
  add("final_norm.weight", {H}, 0.2f, 1.f);
  if (c.norm == rf::NormType::layer) add("final_norm.bias", {H}, 0.1f);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* n : {"attn_norm", "mlp_norm"}) {
      add(p + n + ".weight", {H}, 0.2f, 1.f);
      if (c.norm == rf::NormType::layer) add(p + n + ".bias", {H}, 0.1f);
    }
    auto lin = [&](const char* n, long o, long i, bool bias) {
      add(p + n + ".weight", gpt2 ? std::vector<long>{i, o} : std::vector<long>{o, i}, 1.0f / std::sqrt(float(i)), 0.f, gpt2);
      if (bias) add(p + n + ".bias", {o}, 0.1f);
    };
    lin("qkv", c.qkv_dim(), H, c.qkv_bias);
    lin("o", H, c.q_dim(), c.o_bias);
    lin("mlp_in", gpt2 ? I : 2 * I, H, c.mlp_bias);
    lin("mlp_out", H, I, c.mlp_bias);
  }
}

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

}  // namespace

int main() {
  run_lora("llama lora", llama(), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, false, 0.f);
  run_lora("llama lora rslora dropout", llama(), {"q_proj", "v_proj"}, true, 0.3f);
  rf::ModelConfig swa = llama();
  swa.sliding_window = 3;
  swa.tied_embeddings = true;
  run_lora("llama tied window-3 lora", swa, {"o_proj", "down_proj", "k_proj"}, false, 0.f);
  run_lora("gpt2 lora", gpt2(), {"c_attn", "c_proj", "c_fc"}, false, 0.f);
  run_full("llama", llama());
  run_full("gpt2", gpt2());
  return rf::test::finish("test_train");
}
