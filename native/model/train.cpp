#include "model/train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>

#include "kernels/gemm_backward.h"
#include "kernels/ops.h"
#include "kernels/ops_backward.h"
#include "kernels/rf_loss.h"
#include "model/rope.h"

namespace rf {

namespace {

// The projections of a block by index (Model::linear) and their PEFT names.
struct Site {
  const char* name;  // as in PEFT target_modules, matched by suffix
  int index;         // 0 qkv, 1 o, 2 mlp_in, 3 mlp_out
};

std::vector<Site> block_sites(Arch arch) {
  if (arch == Arch::gpt2) return {{"attn.c_attn", 0}, {"attn.c_proj", 1}, {"mlp.c_fc", 2}, {"mlp.c_proj", 3}};
  return {{"self_attn.q_proj", 0}, {"self_attn.k_proj", 0}, {"self_attn.v_proj", 0}, {"self_attn.o_proj", 1},
          {"mlp.gate_proj", 2},    {"mlp.up_proj", 2},      {"mlp.down_proj", 3}};
}

// PEFT matches a target name against the end of a module's dotted name.
bool target_matches(const std::string& site, const std::string& target) {
  if (site == target) return true;
  return site.size() > target.size() && site.compare(site.size() - target.size(), target.size(), target) == 0 &&
         site[site.size() - target.size() - 1] == '.';
}

std::string short_name(const std::string& site) { return site.substr(site.find('.') + 1); }

void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.f); }

}  // namespace

struct Trainer::Impl {
  ForwardTrace trace;
  std::vector<KvCache> caches;
  std::vector<Param*> params;  // trainable, in a fixed order (checkpoints rely on it)

  // Full fine-tuning: f32 masters of every model tensor, by engine name.
  struct FullLinear { Param* w = nullptr; Param* b = nullptr; };
  struct FullLayer { FullLinear lin[4]; Param* norm_w[2] = {nullptr, nullptr}; Param* norm_b[2] = {nullptr, nullptr}; };
  std::vector<FullLayer> full;
  Param* full_embed = nullptr;
  Param* full_head = nullptr;     // untied only
  Param* full_pos = nullptr;      // GPT-2 only
  Param* full_final_w = nullptr;
  Param* full_final_b = nullptr;

  // LoRA mode: the trainable red-flag rows and the base head row they replace.
  Param* rf_embed = nullptr;
  Param* rf_head = nullptr;
  std::vector<float> rf_head_base;

  PackedWeight head_t;            // LM head transposed, for the cross-entropy input gradient

  // Scratch.
  std::vector<float> h, h_ref, dh_rows, dx, dbuf, dmlp, datt, dqkv, dK, dV, tmp_in, du, xd, z;
};

Trainer::Trainer(Model& model, const TrainOptions& options) : impl_(new Impl), model_(model), options_(options) {
  const ModelConfig& c = model.config();
  model.check_complete();
  if (model.has_adapters()) throw std::invalid_argument("the model already has an adapter; remove it before training a new one");
  const long H = c.hidden;
  std::mt19937_64 rng(options.seed ^ 0x5eedULL);
  Impl& s = *impl_;

  if (options.mode == TrainMode::lora) {
    const LoraOptions& lo = options.lora;
    if (lo.rank <= 0) throw std::invalid_argument("LoRA rank must be positive");
    if (lo.dropout < 0.f || lo.dropout >= 1.f) throw std::invalid_argument("LoRA dropout must be in [0, 1)");
    const float scale = lo.rslora ? lo.alpha / std::sqrt(float(lo.rank)) : lo.alpha / float(lo.rank);
    std::vector<bool> used(lo.targets.size(), false);
    for (int l = 0; l < c.n_layers; ++l) {
      for (const Site& site : block_sites(c.arch)) {
        bool match = false;
        for (size_t t = 0; t < lo.targets.size(); ++t)
          if (target_matches(site.name, lo.targets[t])) match = used[t] = true;
        if (!match) continue;
        Linear& lin = model.linear(l, site.index);
        const std::string pre = "layers." + std::to_string(l) + "." + site.name + ".";
        long out = 0;
        // Output rows of this site within the fused projection.
        if (c.arch == Arch::gpt2) out = site.index == 0 ? 3 * H : site.index == 2 ? c.intermediate : H;
        else if (site.index == 0) out = std::string(site.name) == "self_attn.q_proj" ? c.q_dim() : c.kv_dim();
        else out = site.index == 2 ? c.intermediate : H;
        Param* A = model.new_param(pre + "lora_A", {long(lo.rank), long(lin.w.K)});
        Param* B = model.new_param(pre + "lora_B", {out, long(lo.rank)});
        // PEFT's default: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
        // so the adapted model starts exactly at the base model.
        const float bound = 1.0f / std::sqrt(float(lin.w.K));
        std::uniform_real_distribution<float> u(-bound, bound);
        for (float& v : A->value) v = u(rng);
        const std::string target = c.arch == Arch::gpt2 ? site.name : short_name(site.name);
        model.add_lora(l, target, A, B, scale);
        s.params.push_back(A);
        s.params.push_back(B);
      }
    }
    for (size_t t = 0; t < lo.targets.size(); ++t) {
      if (!used[t]) {
        std::string names;
        for (const Site& site : block_sites(c.arch)) names += std::string(names.empty() ? "" : ", ") + short_name(site.name);
        model.clear_adapters();
        throw std::invalid_argument("LoRA target " + lo.targets[t] + " matches no projection; this architecture has " + names);
      }
    }
    if (options.rf_token >= 0) {
      if (options.rf_token >= c.vocab) throw std::invalid_argument("red-flag token outside the vocabulary");
      s.rf_embed = model.new_param("rf.embed", {H}, false);
      model.embed_row(uint32_t(options.rf_token), s.rf_embed->value.data());
      s.rf_head_base.resize(H);
      packed_row(model.lm_head().w, options.rf_token, s.rf_head_base.data());
      if (c.tied_embeddings) {
        s.rf_head = s.rf_embed;  // tied: one row serves as both
      } else {
        s.rf_head = model.new_param("rf.head", {H}, false);
        s.rf_head->value = s.rf_head_base;
      }
      model.set_token_rows(options.rf_token, s.rf_embed, s.rf_head);
      s.params.push_back(s.rf_embed);
      if (s.rf_head != s.rf_embed) s.params.push_back(s.rf_head);
    }
  } else {
    // Full fine-tuning: every tensor gets an f32 master, unpacked from the engine's copy.
    auto unpack = [&](const std::string& name, const PackedWeight& w, bool decay) {
      Param* p = model.new_param(name, {long(w.N), long(w.K)}, decay);
      for (int n = 0; n < w.N; ++n) packed_row(w, n, p->value.data() + size_t(n) * w.K);
      s.params.push_back(p);
      return p;
    };
    auto vec = [&](const std::string& name, const std::vector<float>& v, bool decay) -> Param* {
      if (v.empty()) return nullptr;
      Param* p = model.new_param(name, {long(v.size())}, decay);
      p->value = v;
      s.params.push_back(p);
      return p;
    };
    s.full.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string pre = "layers." + std::to_string(l) + ".";
      Layer& L = model.layer(l);
      static const char* names[4] = {"qkv", "o", "mlp_in", "mlp_out"};
      for (int i = 0; i < 4; ++i) {
        Linear& lin = model.linear(l, i);
        s.full[l].lin[i].w = unpack(pre + names[i] + ".weight", lin.w, true);
        s.full[l].lin[i].b = vec(pre + names[i] + ".bias", lin.bias, false);
      }
      s.full[l].norm_w[0] = vec(pre + "attn_norm.weight", L.attn_norm.weight, false);
      s.full[l].norm_b[0] = vec(pre + "attn_norm.bias", L.attn_norm.bias, false);
      s.full[l].norm_w[1] = vec(pre + "mlp_norm.weight", L.mlp_norm.weight, false);
      s.full[l].norm_b[1] = vec(pre + "mlp_norm.bias", L.mlp_norm.bias, false);
    }
    s.full_final_w = vec("final_norm.weight", model.final_norm().weight, false);
    s.full_final_b = vec("final_norm.bias", model.final_norm().bias, false);
    s.full_embed = model.new_param("embed", {long(c.vocab), H}, true);
    for (int v = 0; v < c.vocab; ++v) model.embed_row(uint32_t(v), s.full_embed->value.data() + size_t(v) * H);
    s.params.push_back(s.full_embed);
    if (!c.tied_embeddings) s.full_head = unpack("lm_head", model.lm_head().w, true);
    if (c.arch == Arch::gpt2) s.full_pos = vec("pos_embed", model.pos_embed(), true);
  }

  for (Param* p : s.params) {
    p->grad.assign(p->value.size(), 0.f);
    p->m.assign(p->value.size(), 0.f);
    p->v.assign(p->value.size(), 0.f);
  }
  // The backward pass multiplies by W for every projection: keep W^T packed beside W.
  for (int l = 0; l < c.n_layers; ++l)
    for (int i = 0; i < 4; ++i) pack_weight_transposed(model.linear(l, i).wt, model.linear(l, i).w);
  pack_weight_transposed(s.head_t, model.lm_head().w);
}

// LoRA adapters and red-flag rows stay on the model (for inference and saving); the
// full-mode masters, gradients, moments and transposed packs go.
Trainer::~Trainer() {
  for (Param* p : impl_->params) {
    std::vector<float>().swap(p->grad);
    std::vector<float>().swap(p->m);
    std::vector<float>().swap(p->v);
  }
  if (options_.mode == TrainMode::full) model_.clear_adapters();
  for (int l = 0; l < model_.config().n_layers; ++l)
    for (int i = 0; i < 4; ++i) model_.linear(l, i).wt = PackedWeight();
}

std::vector<Param*> Trainer::params() { return impl_->params; }

long Trainer::trainable_count() const {
  long n = 0;
  for (Param* p : impl_->params) n += p->numel();
  return n;
}

namespace {

// Cross-entropy rows (language modelling, refusal baseline) over row chunks, so at most
// [chunk, vocab] logits exist at a time. Adds d loss / d h into dh [n, H] and the head's
// gradient (full mode: every row; LoRA mode: the red-flag row).
double ce_loss(ThreadPool& pool, const Model& model, const float* h, int n, const int32_t* targets,
               const PackedWeight& head, const PackedWeight& head_t, int rf_token, const float* rf_head,
               const float* rf_head_base, float* rf_head_grad, float* head_grad, float weight, float* dh,
               std::vector<float>& z) {
  const long H = model.config().hidden, V = head.N;
  const int chunk = int(std::max<long>(1, std::min<long>(n, (32L << 20) / (V * 4))));
  double loss = 0;
  z.resize(size_t(chunk) * V);
  for (int r0 = 0; r0 < n; r0 += chunk) {
    const int rows = std::min(chunk, n - r0);
    gemm(pool, rows, h + size_t(r0) * H, H, head, nullptr, z.data(), V, false);
    std::vector<double> row_loss(rows, 0.0);
    auto row_work = [&](long r) {
      float* zr = z.data() + size_t(r) * V;
      const float* hr = h + size_t(r0 + r) * H;
      if (rf_head) {
        float dot = 0.f;
        for (long i = 0; i < H; ++i) dot += hr[i] * rf_head[i];
        zr[rf_token] = dot;
      }
      const float lse = logsumexp(zr, int(V));
      const int target = targets[r0 + r];
      row_loss[r] = double(lse) - zr[target];
      softmax_scale(zr, int(V), lse, weight);  // dz = weight * (softmax - onehot)
      zr[target] -= weight;
    };
    if (rows > 1 && pool.size() > 1) {
      pool.parallel_for(rows, [&](long b, long e, int) { for (long r = b; r < e; ++r) row_work(r); });
    } else {
      for (long r = 0; r < rows; ++r) row_work(r);
    }
    for (int r = 0; r < rows; ++r) {
      loss += row_loss[r];
      if (rf_head) {
        // The head row in use for rf is the trained one: correct W^T's base row contribution.
        const float g = z[size_t(r) * V + rf_token];
        const float* hr = h + size_t(r0 + r) * H;
        for (long i = 0; i < H; ++i) {
          dh[size_t(r0 + r) * H + i] += g * (rf_head[i] - rf_head_base[i]);
          rf_head_grad[i] += g * hr[i];
        }
      }
    }
    gemm(pool, rows, z.data(), V, head_t, nullptr, dh + size_t(r0) * H, H, true);
    if (head_grad) gemm_tn_f32(pool, int(V), int(H), rows, z.data(), V, h + size_t(r0) * H, H, head_grad, H, true);
  }
  return loss;
}

}  // namespace

LossTerms Trainer::step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                        const std::vector<LossRow>& rows, const LossOptions& lopt, const std::atomic<int>* cancel) {
  Model& m = model_;
  const ModelConfig& c = m.config();
  ThreadPool& pool = m.pool();
  Impl& s = *impl_;
  const long H = c.hidden, QKV = c.qkv_dim(), Q = c.q_dim(), KV = c.kv_dim(), hd = c.head_dim;
  const long I = c.intermediate, MLP_IN = c.act == Activation::silu ? 2 * I : I;
  const bool full = options_.mode == TrainMode::full;

  long R = 0, Rref = 0;
  for (const Sequence& q : batch) R += q.n_tokens;
  for (const Sequence& q : reference) Rref += q.n_tokens;
  if (R == 0) throw std::invalid_argument("empty training batch");
  for (const LossRow& r : rows) {
    if (r.row < 0 || r.row >= R) throw std::out_of_range("loss row outside the batch");
    const bool kl = r.kind == LossRow::benign_kl || r.kind == LossRow::after_kl;
    if (kl && (r.ref_row < 0 || r.ref_row >= Rref)) throw std::out_of_range("KL loss row without a reference row");
    if (kl && full) throw std::invalid_argument("KL terms need the reference model: use LoRA mode");
    if (r.kind == LossRow::red_flag && options_.rf_token < 0) throw std::invalid_argument("red-flag rows need rf_token");
    if (r.kind == LossRow::ce && (r.target < 0 || r.target >= c.vocab)) throw std::out_of_range("ce target outside the vocabulary");
  }

  // 1. Forward with activations (adapter on, LoRA dropout) -> final hidden states [R, H].
  auto items_for = [&](const std::vector<Sequence>& seqs) {
    s.caches.clear();
    s.caches.reserve(seqs.size());
    std::vector<ForwardItem> items;
    for (const Sequence& q : seqs) {
      s.caches.push_back(m.new_cache());
      items.push_back({&s.caches.back(), q.tokens, q.n_tokens});
    }
    return items;
  };
  s.trace = ForwardTrace();
  s.trace.dropout = full ? 0.f : options_.lora.dropout;
  s.trace.dropout_seed = options_.seed * 0x9e3779b97f4a7c15ULL + lopt.dropout_seed;
  s.h.resize(size_t(R) * H);
  m.set_adapter_enabled(true);
  {
    std::vector<ForwardItem> items = items_for(batch);
    m.forward_traced(items, LogitsMode::hidden, s.h.data(), &s.trace, cancel);
  }
  std::vector<KvCache> caches = std::move(s.caches);  // K, V of the trained batch, for the backward

  // 2. Reference forward: the base model (adapter and red-flag rows off), hidden states only.
  bool any_kl = false;
  for (const LossRow& r : rows) any_kl |= r.kind == LossRow::benign_kl || r.kind == LossRow::after_kl;
  if (any_kl) {
    s.h_ref.resize(size_t(Rref) * H);
    std::vector<ForwardItem> items = items_for(reference);
    m.set_adapter_enabled(false);
    try {
      m.forward(items, LogitsMode::hidden, s.h_ref.data(), cancel);
    } catch (...) {
      m.set_adapter_enabled(true);
      throw;
    }
    m.set_adapter_enabled(true);
    s.caches.clear();
  }

  // 3. Losses -> dL/dh for the scored rows, scattered into dH [R, H].
  LossTerms terms;
  terms.tokens = R;
  std::vector<float>& dH = s.dx;
  dH.assign(size_t(R) * H, 0.f);
  std::vector<RfLossRow> rf_rows;
  std::vector<int32_t> rf_src, ce_src, ce_targets;
  std::vector<float> rf_h, rf_href;
  for (const LossRow& r : rows) {
    if (r.kind == LossRow::ce) {
      ce_src.push_back(r.row);
      ce_targets.push_back(r.target);
      continue;
    }
    RfLossRow q{};
    q.kind = r.kind == LossRow::benign_kl ? RfLossKind::benign_kl
             : r.kind == LossRow::red_flag ? RfLossKind::red_flag
                                           : RfLossKind::after_kl;
    q.group = r.group;
    q.ref_row = -1;
    if (r.ref_row >= 0 && r.kind != LossRow::red_flag) {
      q.ref_row = int32_t(rf_href.size() / H);
      rf_href.insert(rf_href.end(), s.h_ref.begin() + size_t(r.ref_row) * H, s.h_ref.begin() + size_t(r.ref_row + 1) * H);
    }
    rf_h.insert(rf_h.end(), s.h.begin() + size_t(r.row) * H, s.h.begin() + size_t(r.row + 1) * H);
    rf_src.push_back(r.row);
    rf_rows.push_back(q);
  }
  if (!rf_rows.empty()) {
    RfLossOptions o;
    o.rf_token = options_.rf_token;
    if (o.rf_token < 0) {
      // No red-flag token (refusal baseline): the KL terms need none; any token whose "trained"
      // row is its base row gives exactly the plain KL.
      o.rf_token = 0;
      s.rf_head_base.resize(H);
      packed_row(m.lm_head().w, 0, s.rf_head_base.data());
    }
    o.aggregation = lopt.aggregation == Aggregation::any    ? RfAggregation::any
                    : lopt.aggregation == Aggregation::mean ? RfAggregation::mean
                                                            : RfAggregation::single;
    o.alpha_benign = lopt.alpha_benign * lopt.grad_scale;
    o.alpha_rf = lopt.alpha_rf * lopt.grad_scale;
    o.alpha_after = lopt.alpha_after * lopt.grad_scale;
    const int n = int(rf_rows.size());
    s.dh_rows.assign(size_t(n) * H, 0.f);
    std::vector<float> dw_rf(H, 0.f);
    const float* w_rf = s.rf_head ? s.rf_head->value.data() : s.rf_head_base.data();
    RfLossResult res = rf_loss(pool, rf_h.data(), n, rf_href.data(), int(rf_href.size() / H), int(H), m.lm_head().w, w_rf,
                               rf_rows.data(), o, s.dh_rows.data(), dw_rf.data());
    terms.benign = res.benign;
    terms.red_flag = res.red_flag;
    terms.after = res.after;
    terms.n_benign = res.n_benign_rows;
    terms.n_groups = res.n_groups;
    terms.n_after = res.n_after_rows;
    for (int i = 0; i < n; ++i)
      for (long j = 0; j < H; ++j) dH[size_t(rf_src[i]) * H + j] += s.dh_rows[size_t(i) * H + j];
    if (s.rf_head)
      for (long j = 0; j < H; ++j) s.rf_head->grad[j] += dw_rf[j];
  }
  if (!ce_src.empty()) {
    const int n = int(ce_src.size());
    std::vector<float> hc(size_t(n) * H);
    for (int i = 0; i < n; ++i) std::memcpy(hc.data() + size_t(i) * H, s.h.data() + size_t(ce_src[i]) * H, H * 4);
    s.dh_rows.assign(size_t(n) * H, 0.f);
    const float weight = lopt.alpha_ce * lopt.grad_scale / float(n);
    float* head_grad = nullptr;
    if (full) head_grad = s.full_head ? s.full_head->grad.data() : s.full_embed->grad.data();
    const double loss = ce_loss(pool, m, hc.data(), n, ce_targets.data(), m.lm_head().w, s.head_t, options_.rf_token,
                                s.rf_head ? s.rf_head->value.data() : nullptr, s.rf_head_base.data(),
                                s.rf_head ? s.rf_head->grad.data() : nullptr, head_grad, weight, s.dh_rows.data(), s.z);
    terms.ce = loss / n;
    terms.n_ce = n;
    for (int i = 0; i < n; ++i)
      for (long j = 0; j < H; ++j) dH[size_t(ce_src[i]) * H + j] += s.dh_rows[size_t(i) * H + j];
  }
  terms.total = lopt.alpha_benign * terms.benign + lopt.alpha_rf * terms.red_flag + lopt.alpha_after * terms.after +
                lopt.alpha_ce * terms.ce;
  if (cancel && cancel->load(std::memory_order_relaxed)) throw Cancelled();

  // 4. Backward. dx holds dL/d(residual stream) as we walk down the layers.
  std::vector<float>& dx = s.dx;  // = dH on entry, through the final norm below
  s.dbuf.assign(size_t(R) * H, 0.f);
  auto norm_backward_rows = [&](const Norm& n, Param* pw, Param* pb, const float* x, const float* dout, float* dst) {
    // dst (+)= d norm(x) / dx . dout for every row; norm weight/bias gradients when trained.
    std::vector<float> dw_local(pw ? H : 0, 0.f), db_local(pb ? H : 0, 0.f);
    std::vector<float> row(H), dwr(H), dbr(H);
    for (long r = 0; r < R; ++r) {
      std::fill(dwr.begin(), dwr.end(), 0.f);
      std::fill(dbr.begin(), dbr.end(), 0.f);
      if (c.norm == NormType::rms) {
        rmsnorm_backward(row.data(), dwr.data(), dout + r * H, x + r * H, n.weight.data(), int(H), c.norm_eps);
      } else {
        layernorm_backward(row.data(), dwr.data(), dbr.data(), dout + r * H, x + r * H, n.weight.data(), int(H), c.norm_eps);
      }
      for (long i = 0; i < H; ++i) dst[r * H + i] += row[i];
      if (pw) for (long i = 0; i < H; ++i) pw->grad[i] += dwr[i];
      if (pb) for (long i = 0; i < H; ++i) pb->grad[i] += dbr[i];
    }
  };

  // Final norm: d x_final = norm'(x_final) . dH
  {
    std::vector<float> dfinal(size_t(R) * H, 0.f);
    norm_backward_rows(m.final_norm(), s.full_final_w, s.full_final_b, s.trace.x_final.data(), dH.data(), dfinal.data());
    dx.swap(dfinal);
  }

  // Input gradient through a projection: din (+)= dy . W, plus its adapters; weight gradients
  // (full mode) dW += dy^T x, db += sum dy; adapter gradients dA, dB.
  auto linear_backward = [&](int l, int index, const float* x, long in, const float* dy, long out, float* din,
                             const LayerTrace& lt, size_t& u_index, bool accumulate) {
    Linear& lin = m.linear(l, index);
    gemm(pool, int(R), dy, out, lin.wt, nullptr, din, in, accumulate);
    if (full) {
      Impl::FullLinear& f = s.full[l].lin[index];
      gemm_tn_f32(pool, int(out), int(in), int(R), dy, out, x, in, f.w->grad.data(), in, true);
      if (f.b)
        for (long r = 0; r < R; ++r)
          for (long j = 0; j < out; ++j) f.b->grad[j] += dy[r * out + j];
    }
    for (size_t a = 0; a < lin.lora.size(); ++a) {
      const LoraDelta& d = lin.lora[a];
      const int r = d.rank(), o = d.out_size();
      const std::vector<float>& u = lt.lora_u[u_index++];
      const float* dys = dy + d.out_offset;
      // Rebuild the adapter's (dropped-out) input.
      const float* xa = x;
      const float p = s.trace.dropout;
      const int adapter_id = index * 16 + int(a);
      if (p > 0.f) {
        s.xd.resize(size_t(R) * in);
        const float keep = 1.0f / (1.0f - p);
        for (long i = 0; i < R; ++i)
          for (long j = 0; j < in; ++j)
            s.xd[i * in + j] = dropout_keep(s.trace.dropout_seed, l, adapter_id, i, j, p) ? x[i * in + j] * keep : 0.f;
        xa = s.xd.data();
      }
      // y_slice += u B^T with u = scale * xa A^T:
      gemm_tn_f32(pool, o, r, int(R), dys, out, u.data(), r, d.B->grad.data(), r, true);   // dB += dy^T u
      s.du.resize(size_t(R) * r);
      gemm_nn_f32(pool, int(R), r, o, dys, out, d.B->value.data(), r, s.du.data(), r, false);  // du = dy B
      for (float& v : s.du) v *= d.scale;
      gemm_tn_f32(pool, r, int(in), int(R), s.du.data(), r, xa, in, d.A->grad.data(), in, true);  // dA += du^T xa
      s.tmp_in.resize(size_t(R) * in);
      gemm_nn_f32(pool, int(R), int(in), r, s.du.data(), r, d.A->value.data(), in, s.tmp_in.data(), in, false);
      if (p > 0.f) {
        const float keep = 1.0f / (1.0f - p);
        for (long i = 0; i < R; ++i)
          for (long j = 0; j < in; ++j)
            if (dropout_keep(s.trace.dropout_seed, l, adapter_id, i, j, p)) din[i * in + j] += s.tmp_in[i * in + j] * keep;
      } else {
        add_forward(din, s.tmp_in.data(), int(R * in));
      }
    }
  };
  auto u_start = [&](int l, int index) {
    size_t n = 0;
    for (int i = 0; i < index; ++i) n += m.linear(l, i).lora.size();
    return n;
  };

  // Rope tables for the trained rows (sequences start at position 0).
  std::vector<float> rcos, rsin;
  if (c.rope) {
    rcos.resize(size_t(R) * hd / 2);
    rsin.resize(size_t(R) * hd / 2);
    long r = 0;
    for (const Sequence& q : batch) {
      const std::vector<double> inv = rope_inv_freq(c, q.n_tokens - 1);
      for (int t = 0; t < q.n_tokens; ++t, ++r) rope_angles(inv, t, rcos.data() + r * hd / 2, rsin.data() + r * hd / 2);
    }
  }
  const float scale = 1.0f / std::sqrt(float(hd));
  const int group = c.n_heads / c.n_kv_heads;

  for (int l = c.n_layers - 1; l >= 0; --l) {
    if (cancel && cancel->load(std::memory_order_relaxed)) throw Cancelled();
    const LayerTrace& lt = s.trace.layers[l];
    Layer& L = m.layer(l);

    // MLP: x_out = x_mid + mlp_out(act(mlp_in(norm(x_mid))))
    s.dmlp.assign(size_t(R) * MLP_IN, 0.f);
    std::vector<float> dact(size_t(R) * I, 0.f);
    {
      size_t ui = u_start(l, 3);
      linear_backward(l, 3, lt.act.data(), I, dx.data(), H, dact.data(), lt, ui, false);
    }
    for (long r = 0; r < R; ++r) {
      if (c.act == Activation::silu) {
        swiglu_backward(s.dmlp.data() + r * MLP_IN, s.dmlp.data() + r * MLP_IN + I, dact.data() + r * I,
                        lt.mlp.data() + r * MLP_IN, lt.mlp.data() + r * MLP_IN + I, int(I));
      } else {
        gelu_new_backward(s.dmlp.data() + r * I, dact.data() + r * I, lt.mlp.data() + r * I, int(I));
      }
    }
    std::vector<float> dxn(size_t(R) * H, 0.f);
    {
      size_t ui = u_start(l, 2);
      linear_backward(l, 2, lt.xn2.data(), H, s.dmlp.data(), MLP_IN, dxn.data(), lt, ui, false);
    }
    norm_backward_rows(L.mlp_norm, full ? s.full[l].norm_w[1] : nullptr, full ? s.full[l].norm_b[1] : nullptr,
                       lt.x_mid.data(), dxn.data(), dx.data());

    // Attention: x_mid = x_in + o(attn(rope(qkv(norm(x_in)))))
    s.datt.assign(size_t(R) * Q, 0.f);
    {
      size_t ui = u_start(l, 1);
      linear_backward(l, 1, lt.att.data(), Q, dx.data(), H, s.datt.data(), lt, ui, false);
    }
    s.dqkv.assign(size_t(R) * QKV, 0.f);
    {
      // One task per (sequence, KV head): it owns that head's dK, dV, so no two threads write
      // the same memory; dq rows of the group's query heads are disjoint too.
      struct Task { int item; long row0; int g; };
      std::vector<Task> tasks;
      long row0 = 0;
      for (size_t i = 0; i < batch.size(); ++i) {
        for (int g = 0; g < c.n_kv_heads; ++g) tasks.push_back({int(i), row0, g});
        row0 += batch[i].n_tokens;
      }
      long max_t = 0;
      for (const Sequence& q : batch) max_t = std::max<long>(max_t, q.n_tokens);
      const int nt = pool.size();
      s.dK.assign(size_t(nt) * max_t * hd, 0.f);
      s.dV.assign(size_t(nt) * max_t * hd, 0.f);
      std::vector<float> scratch(size_t(nt) * 2 * max_t);
      pool.run([&](int tid, int n_threads) {
        float* dK = s.dK.data() + size_t(tid) * max_t * hd;
        float* dV = s.dV.data() + size_t(tid) * max_t * hd;
        float* sc = scratch.data() + size_t(tid) * 2 * max_t;
        for (size_t w = tid; w < tasks.size(); w += n_threads) {
          const Task& tk = tasks[w];
          const int T = batch[tk.item].n_tokens;
          KvCache& cache = caches[tk.item];
          std::fill(dK, dK + size_t(T) * hd, 0.f);
          std::fill(dV, dV + size_t(T) * hd, 0.f);
          for (int hq = tk.g * group; hq < (tk.g + 1) * group; ++hq) {
            for (int t = 0; t < T; ++t) {
              const long r = tk.row0 + t;
              long first = 0;
              if (c.sliding_window > 0) first = std::max(0L, long(t) - c.sliding_window + 1);
              attention_row_backward(s.dqkv.data() + r * QKV + hq * hd, dK + first * hd, dV + first * hd,
                                     s.datt.data() + r * Q + hq * hd, lt.qkv.data() + r * QKV + hq * hd,
                                     cache.k(l, tk.g) + first * hd, cache.v(l, tk.g) + first * hd, hd,
                                     int(t - first + 1), int(hd), scale, sc);
            }
          }
          for (int t = 0; t < T; ++t) {
            float* dst = s.dqkv.data() + (tk.row0 + t) * QKV;
            std::memcpy(dst + Q + tk.g * hd, dK + size_t(t) * hd, hd * 4);
            std::memcpy(dst + Q + KV + tk.g * hd, dV + size_t(t) * hd, hd * 4);
          }
        }
      });
    }
    if (c.rope) {
      for (long r = 0; r < R; ++r) {
        rope_backward(s.dqkv.data() + r * QKV, c.n_heads, int(hd), rcos.data() + r * hd / 2, rsin.data() + r * hd / 2);
        rope_backward(s.dqkv.data() + r * QKV + Q, c.n_kv_heads, int(hd), rcos.data() + r * hd / 2, rsin.data() + r * hd / 2);
      }
    }
    std::fill(dxn.begin(), dxn.end(), 0.f);
    {
      size_t ui = u_start(l, 0);
      linear_backward(l, 0, lt.xn1.data(), H, s.dqkv.data(), QKV, dxn.data(), lt, ui, false);
    }
    norm_backward_rows(L.attn_norm, full ? s.full[l].norm_w[0] : nullptr, full ? s.full[l].norm_b[0] : nullptr,
                       lt.x_in.data(), dxn.data(), dx.data());
  }

  // 5. Embeddings: the rows that were looked up collect their gradient.
  {
    long r = 0;
    for (const Sequence& q : batch) {
      for (int t = 0; t < q.n_tokens; ++t, ++r) {
        const uint32_t tok = q.tokens[t];
        const float* g = dx.data() + r * H;
        if (full) {
          float* e = s.full_embed->grad.data() + size_t(tok) * H;
          for (long i = 0; i < H; ++i) e[i] += g[i];
          if (s.full_pos) {
            float* pe = s.full_pos->grad.data() + size_t(t) * H;
            for (long i = 0; i < H; ++i) pe[i] += g[i];
          }
        } else if (s.rf_embed && int(tok) == options_.rf_token) {
          for (long i = 0; i < H; ++i) s.rf_embed->grad[i] += g[i];
        }
      }
    }
  }
  s.trace = ForwardTrace();
  return terms;
}

double Trainer::optimizer_step(const AdamWOptions& o) {
  Impl& s = *impl_;
  double sq = 0;
  for (Param* p : s.params)
    for (float g : p->grad) sq += double(g) * g;
  const double norm = std::sqrt(sq);
  const float clip = (o.clip_norm > 0.f && norm > o.clip_norm) ? float(o.clip_norm / (norm + 1e-6)) : 1.f;
  ++adam_step_;
  const double bc1 = 1.0 - std::pow(double(o.beta1), double(adam_step_));
  const double bc2 = 1.0 - std::pow(double(o.beta2), double(adam_step_));
  for (Param* p : s.params) {
    const long n = p->numel();
    float* w = p->value.data();
    float* g = p->grad.data();
    float* m1 = p->m.data();
    float* m2 = p->v.data();
    const float decay = p->decay ? o.lr * o.weight_decay : 0.f;
    for (long i = 0; i < n; ++i) {
      const float gi = g[i] * clip;
      m1[i] = o.beta1 * m1[i] + (1.f - o.beta1) * gi;
      m2[i] = o.beta2 * m2[i] + (1.f - o.beta2) * gi * gi;
      const double mhat = m1[i] / bc1, vhat = m2[i] / bc2;
      w[i] -= decay * w[i];
      w[i] -= float(o.lr * mhat / (std::sqrt(vhat) + o.eps));
      g[i] = 0.f;
    }
  }
  if (options_.mode == TrainMode::full) sync_full_weights();
  return norm;
}

void Trainer::sync_full_weights() {
  // The engine runs on packed copies: rebuild them from the f32 masters after each update.
  Impl& s = *impl_;
  Model& m = model_;
  const ModelConfig& c = m.config();
  for (int l = 0; l < c.n_layers; ++l) {
    for (int i = 0; i < 4; ++i) {
      Linear& lin = m.linear(l, i);
      const Impl::FullLinear& f = s.full[l].lin[i];
      pack_weight(lin.w, f.w->value.data(), SrcType::f32, lin.w.N, lin.w.K, false, m.dtype());
      pack_weight_transposed(lin.wt, lin.w);
      if (f.b) lin.bias = f.b->value;
    }
    Layer& L = m.layer(l);
    if (s.full[l].norm_w[0]) L.attn_norm.weight = s.full[l].norm_w[0]->value;
    if (s.full[l].norm_b[0]) L.attn_norm.bias = s.full[l].norm_b[0]->value;
    if (s.full[l].norm_w[1]) L.mlp_norm.weight = s.full[l].norm_w[1]->value;
    if (s.full[l].norm_b[1]) L.mlp_norm.bias = s.full[l].norm_b[1]->value;
  }
  if (s.full_final_w) m.final_norm().weight = s.full_final_w->value;
  if (s.full_final_b) m.final_norm().bias = s.full_final_b->value;
  m.load_tensor("embed", s.full_embed->value.data(), SrcType::f32, s.full_embed->shape, false);
  if (s.full_head) m.load_tensor("lm_head", s.full_head->value.data(), SrcType::f32, s.full_head->shape, false);
  if (s.full_pos) m.pos_embed() = s.full_pos->value;
  pack_weight_transposed(s.head_t, m.lm_head().w);
}

}  // namespace rf
