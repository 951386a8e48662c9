// Whole-model consistency on small random models, without files or Node.js:
//  - incremental decode through the KV cache equals a full-sequence prefill at every step;
//  - a batched prefill of sequences of different lengths equals each run alone;
//  - bf16 weights stay within 2e-2 relative L2 of f32;
//  - bad input (unknown token, missing weights) throws instead of crashing.
// Agreement with Hugging Face itself is checked against golden fixtures in test/model.test.ts.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;
using rf::test::rel_l2;

namespace {

// The shared random weights with this test's own head scale (0.2; the default is 0.3).
std::unique_ptr<rf::Model> build(const rf::ModelConfig& c, rf::DType dtype, int threads, unsigned seed) {
  rf::test::WeightScales s;
  s.lm_head = 0.2f;
  return rf::test::random_model(c, dtype, threads, seed, s);
}

std::vector<float> prefill(rf::Model& m, const std::vector<uint32_t>& ids) {
  rf::KvCache cache = m.new_cache();
  std::vector<float> out(ids.size() * m.vocab());
  m.forward({{&cache, ids.data(), int(ids.size())}}, rf::LogitsMode::all, out.data());
  return out;
}

void check_model(const std::string& name, const rf::ModelConfig& c) {
  for (int threads : {1, 2}) {
    auto m = build(c, rf::DType::f32, threads, 7);
    const std::string tag = name + " threads=" + std::to_string(threads);
    std::mt19937 rng(11);
    std::vector<uint32_t> ids(20);
    for (auto& t : ids) t = rng() % c.vocab;
    const std::vector<float> full = prefill(*m, ids);
    const long V = m->vocab();

    // Prefill 5 tokens, then decode one token per call.
    rf::KvCache cache = m->new_cache();
    std::vector<float> step(5 * V);
    m->forward({{&cache, ids.data(), 5}}, rf::LogitsMode::all, step.data());
    double worst = rel_l2(std::vector<float>(step.begin(), step.end()),
                          std::vector<float>(full.begin(), full.begin() + 5 * V));
    std::vector<float> one(V);
    for (size_t t = 5; t < ids.size(); ++t) {
      m->forward({{&cache, ids.data() + t, 1}}, rf::LogitsMode::last, one.data());
      worst = std::max(worst, rel_l2(one, std::vector<float>(full.begin() + t * V, full.begin() + (t + 1) * V)));
    }
    check(worst <= 1e-5, tag + ": decode through the KV cache equals prefill (rel L2 " + std::to_string(worst) + ")");

    // Batched prefill of three sequences of different lengths equals each alone.
    std::vector<uint32_t> a(ids.begin(), ids.begin() + 3), b(ids.begin() + 3, ids.end()), d(ids.begin() + 1, ids.begin() + 12);
    rf::KvCache ca = m->new_cache(), cb = m->new_cache(), cd = m->new_cache();
    std::vector<float> batched((a.size() + b.size() + d.size()) * V);
    m->forward({{&ca, a.data(), int(a.size())}, {&cb, b.data(), int(b.size())}, {&cd, d.data(), int(d.size())}},
               rf::LogitsMode::all, batched.data());
    std::vector<float> alone;
    for (auto* s : {&a, &b, &d}) {
      auto l = prefill(*m, *s);
      alone.insert(alone.end(), l.begin(), l.end());
    }
    const double batch_err = rel_l2(batched, alone);
    check(batch_err <= 1e-6, tag + ": batched prefill equals single prefill (rel L2 " + std::to_string(batch_err) + ")");

    // Last-token mode returns the last row of each item.
    rf::KvCache c1 = m->new_cache(), c2 = m->new_cache();
    std::vector<float> last(2 * V);
    m->forward({{&c1, a.data(), int(a.size())}, {&c2, b.data(), int(b.size())}}, rf::LogitsMode::last, last.data());
    const auto la = prefill(*m, a), lb = prefill(*m, b);
    std::vector<float> want(la.end() - V, la.end());
    want.insert(want.end(), lb.end() - V, lb.end());
    check(rel_l2(last, want) <= 1e-6, tag + ": last-token logits");

    // bf16 weights stay close to f32.
    auto mb = build(c, rf::DType::bf16, threads, 7);
    const double bf16_err = rel_l2(prefill(*mb, ids), full);
    check(bf16_err <= 2e-2, tag + ": bf16 within 2e-2 of f32 (rel L2 " + std::to_string(bf16_err) + ")");
  }

  // Bad input throws.
  auto m = build(c, rf::DType::f32, 1, 7);
  rf::KvCache cache = m->new_cache();
  uint32_t bad = uint32_t(c.vocab);
  bool threw = false;
  try {
    std::vector<float> out(c.vocab);
    m->forward({{&cache, &bad, 1}}, rf::LogitsMode::last, out.data());
  } catch (const std::out_of_range&) {
    threw = true;
  }
  check(threw && cache.length() == 0, name + ": token outside the vocabulary throws and leaves the cache alone");
  rf::Model empty(c, rf::DType::f32, 1);
  threw = false;
  try {
    empty.check_complete();
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("embed") != std::string::npos;
  }
  check(threw, name + ": missing weights are named");
  threw = false;
  try {
    std::vector<float> w(7);
    empty.load_tensor("layers.0.qkv.weight", w.data(), rf::SrcType::f32, {7}, false);
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("layers.0.qkv.weight") != std::string::npos;
  }
  check(threw, name + ": wrong shape is named");
  if (c.qk_norm) {
    // Every tensor but the q/k norms: the model is incomplete and names them.
    rf::ModelConfig plain = c;
    plain.qk_norm = false;
    struct WithoutQkNorm {
      rf::Model& m;
      const rf::ModelConfig& c;
      const rf::ModelConfig& config() const { return c; }
      void load_tensor(const std::string& n, const float* d, rf::SrcType t, const std::vector<long>& s, bool kn) {
        m.load_tensor(n, d, t, s, kn);
      }
    };
    rf::Model partial(c, rf::DType::f32, 1);
    WithoutQkNorm loader{partial, plain};
    rf::test::load_random(loader, 7);
    threw = false;
    try {
      partial.check_complete();
    } catch (const std::invalid_argument& e) {
      threw = std::string(e.what()).find("layers.0.q_norm.weight layers.0.k_norm.weight") != std::string::npos;
    }
    check(threw, name + ": missing q/k norms are named");
    rf::Model other(plain, rf::DType::f32, 1);
    threw = false;
    try {
      std::vector<float> w(c.head_dim, 1.f);
      other.load_tensor("layers.0.q_norm.weight", w.data(), rf::SrcType::f32, {long(c.head_dim)}, false);
    } catch (const std::invalid_argument& e) {
      threw = std::string(e.what()).find("unknown tensor name layers.0.q_norm.weight") != std::string::npos;
    }
    check(threw, name + ": a model without qk_norm refuses q_norm");
  }
}

}  // namespace

int main() {
  check_model("llama-gqa", rf::test::small_llama());

  rf::ModelConfig swa = rf::test::small_llama();
  swa.sliding_window = 6;
  swa.qkv_bias = false;
  swa.tied_embeddings = true;
  check_model("mistral-window-6", swa);

  rf::ModelConfig l3 = rf::test::small_llama();
  l3.rope_scaling = rf::RopeScaling::llama3;
  l3.rope_factor = 8;
  l3.rope_low_freq_factor = 1;
  l3.rope_high_freq_factor = 4;
  l3.rope_original_max_positions = 16;
  check_model("llama3-rope", l3);
  check_model("qwen3-qk-norm", rf::test::qwen3_of(rf::test::small_llama()));

  rf::ModelConfig g;
  g.arch = rf::Arch::gpt2;
  g.vocab = 101;
  g.hidden = 48;
  g.intermediate = 192;
  g.n_layers = 2;
  g.n_heads = 4;
  g.n_kv_heads = 4;
  g.head_dim = 12;
  g.max_positions = 32;
  g.norm = rf::NormType::layer;
  g.act = rf::Activation::gelu_new;
  g.rope = false;
  g.qkv_bias = g.o_bias = g.mlp_bias = true;
  g.tied_embeddings = true;
  check_model("gpt2", g);
  return rf::test::finish("test_model");
}
