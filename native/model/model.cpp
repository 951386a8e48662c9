#include "model/model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "kernels/gemm_backward.h"
#include "kernels/ops.h"
#include "model/layout.h"
#include "model/rope.h"

namespace rf {

namespace {

// Below this many floats of work a row-wise op runs on the calling thread: waking the
// pool costs more than it saves (decode of one sequence touches a few hundred floats).
constexpr long kParallelMinFloats = 1 << 15;

// Attention (Model::attention): items with at least kBlockMinRows new rows take the blocked
// path, kAttnBlockRows query rows per matrix product.
constexpr int kBlockMinRows = 16;
constexpr int kAttnBlockRows = 32;

void for_rows(ThreadPool& pool, long rows, long width, const std::function<void(long)>& fn) {
  if (rows * width < kParallelMinFloats || pool.size() == 1) {
    for (long r = 0; r < rows; ++r) fn(r);
    return;
  }
  pool.parallel_for(rows, [&](long begin, long end, int) {
    for (long r = begin; r < end; ++r) fn(r);
  });
}

std::vector<float> to_f32(const void* data, SrcType type, long n) {
  std::vector<float> out(n);
  for (long i = 0; i < n; ++i) out[i] = src_load(data, type, i);
  return out;
}

}  // namespace

Model::Model(const ModelConfig& config, DType dtype, int n_threads)
    : config_(config), dtype_(dtype), pool_(n_threads), layers_(config.n_layers) {
  config_.validate();
}

size_t Model::weight_bytes() const {
  size_t total = lm_head_.w.bytes + embed_f32_.size() * 4 + embed_bf16_.size() * 2 + pos_embed_.size() * 4;
  for (const Layer& l : layers_)
    for (const Linear* lin : {&l.qkv, &l.o, &l.mlp_in, &l.mlp_out}) total += lin->w.bytes + lin->bias.size() * 4;
  return total;
}

// Tensor names and shapes: model/layout.h.
void Model::load_tensor(const std::string& name, const void* data, SrcType type,
                        const std::vector<long>& shape, bool src_is_kn) {
  const ModelConfig& c = config_;
  const long H = c.hidden;
  const TensorSlot slot = tensor_slot(c, name, shape, src_is_kn);
  switch (slot.kind) {
    case TensorSlot::embed:
    case TensorSlot::lm_head: {
      const long V = slot.rows;
      if (slot.kind == TensorSlot::lm_head || c.tied_embeddings) pack_weight(lm_head_.w, data, type, int(V), int(H), false, dtype_);
      if (slot.kind == TensorSlot::embed) {
        embed_f32_.clear();
        embed_bf16_.clear();
        if (!c.tied_embeddings) {
          if (dtype_ == DType::f32) {
            embed_f32_ = to_f32(data, type, V * H);
          } else {
            embed_bf16_.resize(V * H);
            for (long i = 0; i < V * H; ++i) embed_bf16_[i] = f32_to_bf16(src_load(data, type, i));
          }
        }
        embed_loaded_ = true;
      }
      config_.vocab = int(V);
      return;
    }
    case TensorSlot::pos_embed:
      pos_embed_ = to_f32(data, type, slot.rows * H);
      return;
    case TensorSlot::norm_weight:
    case TensorSlot::norm_bias: {
      Norm& n = slot.layer < 0 ? final_norm_ : layers_[slot.layer].norm(slot.index);
      (slot.kind == TensorSlot::norm_weight ? n.weight : n.bias) = to_f32(data, type, slot.rows);
      return;
    }
    case TensorSlot::linear_weight:
      pack_weight(linear(slot.layer, slot.index).w, data, type, int(slot.rows), int(slot.cols), src_is_kn, dtype_);
      return;
    case TensorSlot::linear_bias:
      linear(slot.layer, slot.index).bias = to_f32(data, type, slot.rows);
      return;
  }
}

void Model::check_complete() const {
  const ModelConfig& c = config_;
  if (lm_head_.loaded() && embed_loaded_ && !c.tied_embeddings) {
    const long embed_rows = long(embed_f32_.size() + embed_bf16_.size()) / c.hidden;
    if (embed_rows != lm_head_.w.N)
      throw std::invalid_argument("embed has " + std::to_string(embed_rows) + " rows but lm_head has " +
                                  std::to_string(lm_head_.w.N));
  }
  check_tensors(c, [&](const std::string& name) {
    const TensorSlot slot = parse_tensor_name(c, name);
    switch (slot.kind) {
      case TensorSlot::embed: return embed_loaded_;
      case TensorSlot::lm_head: return lm_head_.loaded();
      case TensorSlot::pos_embed: return !pos_embed_.empty();
      case TensorSlot::norm_weight:
      case TensorSlot::norm_bias: {
        const Norm& n = slot.layer < 0 ? final_norm_ : layers_[slot.layer].norm(slot.index);
        return !(slot.kind == TensorSlot::norm_weight ? n.weight : n.bias).empty();
      }
      case TensorSlot::linear_weight:
      case TensorSlot::linear_bias: {
        const Layer& L = layers_[slot.layer];
        const Linear* lin[] = {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out};
        return slot.kind == TensorSlot::linear_weight ? lin[slot.index]->loaded() : !lin[slot.index]->bias.empty();
      }
    }
    return false;
  });
}

long Model::logits_rows(const std::vector<ForwardItem>& items, LogitsMode mode) {
  if (mode == LogitsMode::last) return long(items.size());
  long rows = 0;
  for (const ForwardItem& it : items) rows += it.n_tokens;
  return rows;
}

void Model::embed_row(uint32_t tok, float* row) const {
  const long H = config_.hidden;
  if (!embed_f32_.empty()) {
    std::memcpy(row, embed_f32_.data() + long(tok) * H, H * sizeof(float));
  } else if (!embed_bf16_.empty()) {
    const uint16_t* src = embed_bf16_.data() + long(tok) * H;
    for (long i = 0; i < H; ++i) row[i] = bf16_to_f32(src[i]);
  } else {
    packed_row(lm_head_.w, int(tok), row);
  }
}

void Model::embed_rows(const std::vector<ForwardItem>& items, float* x) {
  const ModelConfig& c = config_;
  const long H = c.hidden;
  long r = 0;
  for (const ForwardItem& it : items) {
    for (int t = 0; t < it.n_tokens; ++t, ++r) {
      const uint32_t tok = it.tokens[t];
      float* row = x + r * H;
      const int k = adapter_enabled_ && rf_embed_ ? token_rows_index(tok) : -1;
      if (k >= 0) {
        std::memcpy(row, rf_embed_->value.data() + size_t(k) * H, H * sizeof(float));
      } else {
        embed_row(tok, row);
      }
      if (c.arch == Arch::gpt2) {
        const float* pe = pos_embed_.data() + (it.cache->length() + t) * H;
        for (long i = 0; i < H; ++i) row[i] += pe[i];
      }
      if (it.embed_delta) {
        const float* d = it.embed_delta + size_t(t) * H;
        for (long i = 0; i < H; ++i) row[i] += d[i];
      }
    }
  }
}

// Causal (optionally sliding-window) attention of the new rows against each item's cache,
// which already holds this layer's keys and values for the new positions.
// qkv [rows, qkv_dim] (q at offset 0), out [rows, q_dim].
//
// Two paths, chosen per item (so a sequence's result never depends on what it is batched with):
//   - an item of kBlockMinRows new rows or more (prefill, training) goes by blocks of
//     kAttnBlockRows query rows per head: S = Q K^T and O = P V as matrix products over the
//     block's keys, the causal softmax row by row in between. At T = 128 this is several times
//     faster than one query row at a time, which streams every key and value row once per
//     query row with a dot product or an axpy of head_dim;
//   - fewer rows (a decode step) go one query row at a time (attention_row).
// The two differ by float rounding only (the sums run in another order).
void Model::attention(const std::vector<ForwardItem>& items, int layer, const float* qkv, float* out) {
  const ModelConfig& c = config_;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const long QKV = c.qkv_dim(), Q = c.q_dim();
  const float scale = 1.0f / std::sqrt(float(hd));
  // Work units: a block of query rows [t0, t1) of one head of one item (t1 - t0 = 1 on the row
  // path), with the row of the batch its first query row is.
  struct Unit { int item, head, t0, t1; long row0; long keys; };
  std::vector<Unit> units;
  long max_keys = 0, max_block_keys = 0, row0 = 0, work = 0;
  bool any_row = false;
  for (size_t i = 0; i < items.size(); ++i) {
    const ForwardItem& it = items[i];
    const long L0 = it.cache->length();
    max_keys = std::max(max_keys, L0 + it.n_tokens);
    const int step = it.n_tokens >= kBlockMinRows ? kAttnBlockRows : 1;
    for (int t0 = 0; t0 < it.n_tokens; t0 += step) {
      const int t1 = std::min(it.n_tokens, t0 + step);
      const long first = c.sliding_window > 0 ? std::max(0L, L0 + t0 - c.sliding_window + 1) : 0;
      const long keys = L0 + t1 - first;
      if (step > 1) max_block_keys = std::max(max_block_keys, keys);
      any_row |= step == 1;
      for (int h = 0; h < c.n_heads; ++h) units.push_back({int(i), h, t0, t1, row0 + t0, keys});
      work += long(t1 - t0) * keys * c.n_heads;
    }
    row0 += it.n_tokens;
  }
  // Costliest units first, so the last ones claimed are small and the threads finish together.
  std::stable_sort(units.begin(), units.end(),
                   [](const Unit& a, const Unit& b) { return long(a.t1 - a.t0) * a.keys > long(b.t1 - b.t0) * b.keys; });
  const int nt = pool_.size();
  const size_t per_thread = size_t(std::max(any_row ? max_keys : 0L, long(kAttnBlockRows) * max_block_keys));
  scores_.resize(size_t(nt) * per_thread);
  while (int(solo_.size()) < nt) solo_.push_back(std::make_unique<ThreadPool>(1));

  std::atomic<size_t> next{0};
  auto run_units = [&](int tid, int) {
    float* scores = scores_.data() + size_t(tid) * per_thread;
    for (size_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units.size();) {
      const Unit& w = units[u];
      const ForwardItem& it = items[w.item];
      const int g = w.head / group;
      const long L0 = it.cache->length();
      const long first = c.sliding_window > 0 ? std::max(0L, L0 + w.t0 - c.sliding_window + 1) : 0;
      const float* k = it.cache->k(layer, g) + first * hd;
      const float* v = it.cache->v(layer, g) + first * hd;
      const float* q = qkv + w.row0 * QKV + long(w.head) * hd;
      float* o = out + w.row0 * Q + long(w.head) * hd;
      const int nk = int(w.keys);
      if (it.n_tokens < kBlockMinRows) {  // the row path
        attention_row(o, q, k, v, hd, nk, hd, scale, scores);
        continue;
      }
      const int bq = w.t1 - w.t0;
      gemm_nt_f32(*solo_[tid], bq, nk, hd, q, QKV, k, hd, scores, nk, false);  // S = Q K^T
      for (int i = 0; i < bq; ++i) {
        // Query position L0 + t0 + i sees keys [j0, j1) of the block's first..last.
        const long pos = L0 + w.t0 + i;
        const int j0 = int((c.sliding_window > 0 ? std::max(0L, pos - c.sliding_window + 1) : 0) - first);
        const int j1 = int(pos - first + 1);
        float* p = scores + size_t(i) * nk;
        for (int j = j0; j < j1; ++j) p[j] *= scale;
        softmax_scale(p + j0, j1 - j0, logsumexp(p + j0, j1 - j0), 1.f);
        std::fill(p, p + j0, 0.f);  // masked keys take no part in O = P V
        std::fill(p + j1, p + nk, 0.f);
      }
      gemm_nn_f32(*solo_[tid], bq, hd, nk, scores, nk, v, hd, o, Q, false);  // O = P V
    }
  };
  if (work * hd < kParallelMinFloats || nt == 1) {
    run_units(0, 1);
  } else {
    pool_.run(run_units);
  }
}

void Model::forward(const std::vector<ForwardItem>& items, LogitsMode mode, float* out,
                    const std::atomic<int>* cancel, const std::function<void(int, int)>& progress) {
  run_forward(items, mode, out, nullptr, cancel, progress);
}

void Model::forward_traced(const std::vector<ForwardItem>& items, LogitsMode mode, float* out, ForwardTrace* trace,
                           const std::atomic<int>* cancel) {
  run_forward(items, mode, out, trace, cancel, nullptr);
}

// y (+)= x W^T + bias, then each LoRA adapter's scale * (dropout(x) A^T) B^T on its slice of y.
// With a trace, the adapters' (dropout(x) A^T) [rows, rank] are kept for the backward pass.
void Model::linear_forward(const Linear& lin, int layer, int index, const float* x, long ldx, int rows, float* y,
                           long ldy, bool accumulate, LayerTrace* trace, float dropout, uint64_t seed) {
  gemm(pool_, rows, x, ldx, lin.w, lin.bias.empty() ? nullptr : lin.bias.data(), y, ldy, accumulate);
  if (!adapter_enabled_) return;
  const int in = lin.w.K;
  for (size_t a = 0; a < lin.lora.size(); ++a) {
    const LoraDelta& d = lin.lora[a];
    const int r = d.rank();
    const float* xa = x;
    long ldxa = ldx;
    if (trace && dropout > 0.f) {
      // Inverted dropout on the adapter's input only, as PEFT's lora_dropout.
      lora_x_.resize(size_t(rows) * in);
      const float keep_scale = 1.0f / (1.0f - dropout);
      const int adapter_id = index * 16 + int(a);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < in; ++j)
          lora_x_[size_t(i) * in + j] =
              dropout_keep(seed, layer, adapter_id, i, j, dropout) ? x[i * ldx + j] * keep_scale : 0.f;
      xa = lora_x_.data();
      ldxa = in;
    }
    lora_u_.resize(size_t(rows) * r);
    gemm_nt_f32(pool_, rows, r, in, xa, ldxa, d.A->value.data(), in, lora_u_.data(), r, false);
    for (float& u : lora_u_) u *= d.scale;
    if (trace) trace->lora_u.push_back(lora_u_);
    gemm_nt_f32(pool_, rows, d.out_size(), r, lora_u_.data(), r, d.B->value.data(), r, y + d.out_offset, ldy, true);
  }
}

void Model::run_forward(const std::vector<ForwardItem>& items, LogitsMode mode, float* out, ForwardTrace* trace,
                        const std::atomic<int>* cancel, const std::function<void(int, int)>& progress) {
  check_complete();
  const ModelConfig& c = config_;
  const long H = c.hidden, R = logits_rows(items, LogitsMode::all);
  if (R == 0) return;
  for (const ForwardItem& it : items) {
    if (it.cache->n_layers() != c.n_layers || it.cache->n_kv_heads() != c.n_kv_heads ||
        it.cache->head_dim() != c.head_dim)
      throw std::invalid_argument("sequence cache belongs to a model of another shape");
    for (int t = 0; t < it.n_tokens; ++t)
      if (it.tokens[t] >= uint32_t(c.vocab))
        throw std::out_of_range("token id " + std::to_string(it.tokens[t]) + " is outside the vocabulary (size " +
                                std::to_string(c.vocab) + ")");
    if (c.arch == Arch::gpt2 && it.cache->length() + it.n_tokens > c.max_positions)
      throw std::out_of_range("sequence of " + std::to_string(it.cache->length() + it.n_tokens) +
                              " tokens exceeds the model's " + std::to_string(c.max_positions) + " positions");
  }
  for (const ForwardItem& it : items) it.cache->reserve(it.cache->length() + it.n_tokens);

  const long QKV = c.qkv_dim(), Q = c.q_dim(), KV = c.kv_dim(), hd = c.head_dim;
  const long I = c.intermediate, MLP_IN = c.act == Activation::silu ? 2 * I : I;
  x_.resize(R * H);
  xn_.resize(R * H);
  qkv_.resize(R * QKV);
  att_.resize(R * Q);
  mlp_.resize(R * MLP_IN);
  act_.resize(c.act == Activation::silu ? R * I : 0);
  if (trace) {
    // A trace passed again (training, step after step) keeps its buffers: the assign() calls
    // below reuse their capacity instead of allocating (and faulting in) fresh memory.
    trace->layers.resize(c.n_layers);
    for (LayerTrace& lt : trace->layers) lt.lora_u.clear();
  }
  const float dropout = trace ? trace->dropout : 0.f;
  const uint64_t seed = trace ? trace->dropout_seed : 0;

  // Rotary tables per new row: cos/sin [rows, head_dim / 2].
  if (c.rope) {
    rope_cos_.resize(R * hd / 2);
    rope_sin_.resize(R * hd / 2);
    long r = 0;
    for (const ForwardItem& it : items) {
      const long last = it.cache->length() + it.n_tokens - 1;
      const std::vector<double> inv_freq = rope_inv_freq(c, last);
      for (int t = 0; t < it.n_tokens; ++t, ++r)
        rope_angles(inv_freq, it.cache->length() + t, rope_cos_.data() + r * hd / 2, rope_sin_.data() + r * hd / 2);
    }
  }

  float* x = x_.data();
  float* xn = xn_.data();
  embed_rows(items, x);

  auto norm_rows = [&](const Norm& n, const float* in, float* o, long n_rows) {
    for_rows(pool_, n_rows, H, [&](long r) {
      if (c.norm == NormType::rms) rmsnorm_forward(o + r * H, in + r * H, n.weight.data(), int(H), c.norm_eps);
      else layernorm_forward(o + r * H, in + r * H, n.weight.data(), n.bias.data(), int(H), c.norm_eps);
    });
  };

  for (int l = 0; l < c.n_layers; ++l) {
    if (cancel && cancel->load(std::memory_order_relaxed)) throw Cancelled();
    const Layer& L = layers_[l];
    LayerTrace* lt = trace ? &trace->layers[l] : nullptr;
    if (lt) lt->x_in.assign(x, x + R * H);

    // Attention block: x += o(attn(rope(qkv(norm(x)))))
    norm_rows(L.attn_norm, x, xn, R);
    if (lt) lt->xn1.assign(xn, xn + R * H);
    linear_forward(L.qkv, l, 0, xn, H, int(R), qkv_.data(), QKV, false, lt, dropout, seed);
    if (c.qk_norm) {
      // Qwen3: every head of q and of k through an RMSNorm of its own weights [head_dim], before rope.
      if (lt) {
        lt->qk_pre.resize(R * (Q + KV));
        for (long r = 0; r < R; ++r) std::memcpy(lt->qk_pre.data() + r * (Q + KV), qkv_.data() + r * QKV, (Q + KV) * sizeof(float));
      }
      for_rows(pool_, R, QKV, [&](long r) {
        float* q = qkv_.data() + r * QKV;
        for (int h = 0; h < c.n_heads; ++h) rmsnorm_forward(q + h * hd, q + h * hd, L.q_norm.weight.data(), int(hd), c.norm_eps);
        for (int g = 0; g < c.n_kv_heads; ++g)
          rmsnorm_forward(q + Q + g * hd, q + Q + g * hd, L.k_norm.weight.data(), int(hd), c.norm_eps);
      });
    }
    {
      long r = 0;
      for (const ForwardItem& it : items) {
        for (int t = 0; t < it.n_tokens; ++t, ++r) {
          float* q = qkv_.data() + r * QKV;
          float* k = q + Q;
          const float* v = k + KV;
          if (c.rope) {
            rope_forward(q, c.n_heads, int(hd), rope_cos_.data() + r * hd / 2, rope_sin_.data() + r * hd / 2);
            rope_forward(k, c.n_kv_heads, int(hd), rope_cos_.data() + r * hd / 2, rope_sin_.data() + r * hd / 2);
          }
          const long pos = it.cache->length() + t;
          for (int g = 0; g < c.n_kv_heads; ++g) {
            std::memcpy(it.cache->k(l, g) + pos * hd, k + g * hd, hd * sizeof(float));
            std::memcpy(it.cache->v(l, g) + pos * hd, v + g * hd, hd * sizeof(float));
          }
        }
      }
    }
    if (lt) lt->qkv.assign(qkv_.begin(), qkv_.begin() + R * QKV);
    attention(items, l, qkv_.data(), att_.data());
    if (lt) lt->att.assign(att_.begin(), att_.begin() + R * Q);
    linear_forward(L.o, l, 1, att_.data(), Q, int(R), x, H, true, lt, dropout, seed);
    if (lt) lt->x_mid.assign(x, x + R * H);

    // MLP block: x += mlp_out(act(mlp_in(norm(x))))
    norm_rows(L.mlp_norm, x, xn, R);
    if (lt) lt->xn2.assign(xn, xn + R * H);
    linear_forward(L.mlp_in, l, 2, xn, H, int(R), mlp_.data(), MLP_IN, false, lt, dropout, seed);
    if (lt) lt->mlp.assign(mlp_.begin(), mlp_.begin() + R * MLP_IN);
    if (c.act == Activation::silu) {
      for_rows(pool_, R, I, [&](long r) {
        swiglu_forward(act_.data() + r * I, mlp_.data() + r * MLP_IN, mlp_.data() + r * MLP_IN + I, int(I));
      });
      if (lt) lt->act.assign(act_.begin(), act_.begin() + R * I);
      linear_forward(L.mlp_out, l, 3, act_.data(), I, int(R), x, H, true, lt, dropout, seed);
    } else {
      for_rows(pool_, R, I, [&](long r) { gelu_new_forward(mlp_.data() + r * I, int(I)); });
      if (lt) lt->act.assign(mlp_.begin(), mlp_.begin() + R * I);
      linear_forward(L.mlp_out, l, 3, mlp_.data(), I, int(R), x, H, true, lt, dropout, seed);
    }
    if (progress) progress(l + 1, c.n_layers);
  }
  if (cancel && cancel->load(std::memory_order_relaxed)) throw Cancelled();
  if (trace) trace->x_final.assign(x, x + R * H);

  if (mode == LogitsMode::hidden) {
    norm_rows(final_norm_, x, out, R);
  } else {
    // Final norm on the rows whose logits are wanted, then the LM head.
    const float* head_in = x;
    long rows = R;
    if (mode == LogitsMode::last) {
      rows = long(items.size());
      rows_.resize(rows * H);
      long r = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        r += items[i].n_tokens;
        std::memcpy(rows_.data() + i * H, x + (r - 1) * H, H * sizeof(float));
      }
      head_in = rows_.data();
    }
    norm_rows(final_norm_, head_in, xn, rows);  // R >= rows, so xn has room
    head_logits(xn, rows, out);
  }
  for (const ForwardItem& it : items) it.cache->set_length(it.cache->length() + it.n_tokens);
}

void Model::head_logits(const float* xn, long rows, float* out) {
  const long H = config_.hidden;
  gemm(pool_, int(rows), xn, H, lm_head_.w, nullptr, out, config_.vocab, false);
  if (adapter_enabled_ && rf_head_) {
    // The trained red-flag rows replace the base rows of the LM head.
    for (size_t k = 0; k < rf_tokens_.size(); ++k) {
      const float* w = rf_head_->value.data() + k * H;
      for (long r = 0; r < rows; ++r) {
        float dot = 0.f;
        for (long i = 0; i < H; ++i) dot += xn[r * H + i] * w[i];
        out[r * config_.vocab + rf_tokens_[k]] = dot;
      }
    }
  }
}

// --- adapters --------------------------------------------------------------------------------

Param* Model::new_param(const std::string& name, const std::vector<long>& shape, bool decay) {
  if (find_param(name)) throw std::invalid_argument("parameter " + name + " already exists");
  auto p = std::make_unique<Param>();
  p->name = name;
  p->shape = shape;
  p->value.assign(size_t(p->numel()), 0.f);
  p->decay = decay;
  params_.push_back(std::move(p));
  return params_.back().get();
}

Param* Model::find_param(const std::string& name) {
  for (auto& p : params_)
    if (p->name == name) return p.get();
  return nullptr;
}

std::vector<Param*> Model::params() {
  std::vector<Param*> out;
  for (auto& p : params_) out.push_back(p.get());
  return out;
}

Linear& Model::linear(int layer, int index) {
  Layer& L = layers_.at(layer);
  switch (index) {
    case 0: return L.qkv;
    case 1: return L.o;
    case 2: return L.mlp_in;
    default: return L.mlp_out;
  }
}

void Model::add_lora(int layer, const std::string& target, Param* A, Param* B, float scale) {
  if (layer < 0 || layer >= config_.n_layers) throw std::invalid_argument("LoRA layer out of range");
  const LoraSite site = lora_site(config_, target);
  Linear& lin = linear(layer, site.index);
  if (A->shape != std::vector<long>{A->shape[0], long(lin.w.K)} || B->shape != std::vector<long>{site.out, A->shape[0]})
    throw std::invalid_argument("LoRA " + target + " of layer " + std::to_string(layer) + ": A must be [rank, " +
                                std::to_string(lin.w.K) + "] and B [" + std::to_string(site.out) + ", rank]");
  lin.lora.push_back({target, A, B, int(site.offset), scale});
}

void Model::clear_adapters() {
  for (Layer& L : layers_)
    for (Linear* lin : {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out}) lin->lora.clear();
  rf_tokens_.clear();
  rf_embed_ = rf_head_ = nullptr;
  params_.clear();
}

void Model::set_token_rows(const std::vector<int>& tokens, Param* embed, Param* head) {
  if (tokens.empty()) throw std::invalid_argument("set_token_rows: no token");
  for (size_t k = 0; k < tokens.size(); ++k) {
    if (tokens[k] < 0 || tokens[k] >= config_.vocab) throw std::invalid_argument("red-flag token outside the vocabulary");
    for (size_t j = 0; j < k; ++j)
      if (tokens[j] == tokens[k]) throw std::invalid_argument("red-flag token listed twice");
  }
  for (Param* p : {embed, head})
    if (p && p->numel() != long(tokens.size()) * config_.hidden)
      throw std::invalid_argument("red-flag rows must have hidden_size elements per token");
  rf_tokens_ = tokens;
  rf_embed_ = embed;
  rf_head_ = head;
}

}  // namespace rf
