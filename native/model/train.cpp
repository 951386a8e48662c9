#include "model/train.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "core/cpu.h"
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

// Rows per panel of the packed GEMM layout (gemm.cpp's kPanel).
constexpr int kPackPanel = 32;

// Writes rows [n0, n1) of w [N, K] (row-major f32, n0 a multiple of 32) into the engine's
// packed copies of W [N, K] and W^T [K, N] in place: the optimizer's alternative to
// pack_weight + pack_weight_transposed of the whole matrix, which would allocate (and fault
// in) both packs afresh every step. The layout is gemm.cpp's (see its top comment):
// panels of 32 rows, an f32 panel is [K][32], a bf16 panel [Kp/2][32][2] with Kp = K rounded
// up to even; W^T likewise with N and K swapped. The bytes equal what pack_weight writes
// (bf16: the same f32_to_bf16 rounding). Pads (rows past N, bf16's odd pad k) are never
// written, so they keep the zeros the first pack left.
void write_packed_rows(const float* w, int N, int K, int n0, int n1, PackedWeight& W, PackedWeight& WT) {
  constexpr int P = kPackPanel;
  const bool bf16 = W.dtype == DType::bf16;
  const size_t w_panel = size_t(bf16 ? K + (K & 1) : K) * P;  // elements per panel of W
  const size_t t_panel = size_t(bf16 ? N + (N & 1) : N) * P;  // of W^T
  // 32 x 32 tiles: a tile of W's panel and one of W^T's are each one contiguous 4 KB (f32)
  // block, so both writes stay in L1.
  for (int nb = n0; nb < n1; nb += P) {
    const int rows = std::min(P, n1 - nb);
    for (int kb = 0; kb < K; kb += P) {
      const int cols = std::min(P, K - kb);
      if (!bf16) {
        float* wp = reinterpret_cast<float*>(W.data.get()) + size_t(nb / P) * w_panel + size_t(kb) * P;
        float* tp = reinterpret_cast<float*>(WT.data.get()) + size_t(kb / P) * t_panel + size_t(nb) * P;
#if defined(__SSE2__)
        if (rows == P && cols == P) {
          // Full tile, both 64-byte aligned. Streaming stores: the packs (8 bytes an element)
          // are far larger than the caches and are next read by the following forward pass,
          // so fetching their old lines first (write-allocate) would only add traffic. Each
          // pass fills whole cache lines one after another, as write-combining needs.
          for (int j = 0; j < P; ++j) {  // W^T: the tile's rows as they are
            const float* src = w + size_t(nb + j) * K + kb;
            for (int i = 0; i < P; i += 4) _mm_stream_ps(tp + j * P + i, _mm_loadu_ps(src + i));
          }
          for (int i = 0; i < P; i += 4) {  // W: 4 x 4 transposes, 4 rows of the panel at a time
            for (int j = 0; j < P; j += 4) {
              const float* src = w + size_t(nb + j) * K + kb + i;
              __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + K);
              __m128 r2 = _mm_loadu_ps(src + 2 * K), r3 = _mm_loadu_ps(src + 3 * K);
              _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
              _mm_stream_ps(wp + i * P + j, r0);
              _mm_stream_ps(wp + (i + 1) * P + j, r1);
              _mm_stream_ps(wp + (i + 2) * P + j, r2);
              _mm_stream_ps(wp + (i + 3) * P + j, r3);
            }
          }
          continue;
        }
#endif
        for (int j = 0; j < rows; ++j) {
          const float* src = w + size_t(nb + j) * K + kb;
          for (int i = 0; i < cols; ++i) wp[i * P + j] = src[i];
          std::memcpy(tp + j * P, src, size_t(cols) * 4);
        }
      } else {
        uint16_t* wp = reinterpret_cast<uint16_t*>(W.data.get()) + size_t(nb / P) * w_panel + size_t(kb) * P;
        uint16_t* tp = reinterpret_cast<uint16_t*>(WT.data.get()) + size_t(kb / P) * t_panel + size_t(nb) * P;
        for (int j = 0; j < rows; ++j) {
          const float* src = w + size_t(nb + j) * K + kb;
          for (int i = 0; i < cols; ++i) {
            const uint16_t b = f32_to_bf16(src[i]);
            wp[(i / 2) * 2 * P + j * 2 + (i & 1)] = b;
            tp[(j / 2) * 2 * P + i * 2 + (j & 1)] = b;
          }
        }
      }
    }
  }
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores are weakly ordered: complete them before the pool's join
#endif
}

// Sum of g[i]^2 in double over four interleaved partial sums (one serial chain of double
// adds would cost ~4 cycles an element).
double sum_squares(const float* g, long n) {
  double a[4] = {0, 0, 0, 0};
  long i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) a[j] += double(g[i + j]) * g[i + j];
  for (; i < n; ++i) a[0] += double(g[i]) * g[i];
  return (a[0] + a[1]) + (a[2] + a[3]);
}

struct AdamWStep {
  float lr, beta1, beta2, eps, decay, clip;
  double bc1, bc2;  // bias corrections 1 - beta^t
};

// AdamW with decoupled weight decay on n elements; zeroes the gradient. The arithmetic
// (float moments, double bias correction and step) is the reference the tests and resumed
// runs compare against bit for bit: keep it.
__attribute__((always_inline)) inline void adamw_body(float* w, float* g, float* m1, float* m2, long n,
                                                      const AdamWStep& a) {
  for (long i = 0; i < n; ++i) {
    const float gi = g[i] * a.clip;
    m1[i] = a.beta1 * m1[i] + (1.f - a.beta1) * gi;
    m2[i] = a.beta2 * m2[i] + (1.f - a.beta2) * gi * gi;
    const double mhat = m1[i] / a.bc1, vhat = m2[i] / a.bc2;
    w[i] -= a.decay * w[i];
    w[i] -= float(a.lr * mhat / (std::sqrt(vhat) + a.eps));
    g[i] = 0.f;
  }
}

// The double divisions and square root dominate; this file is built for baseline x86-64,
// where they vectorise two at a time. The AVX2 copy does four (measured 1.9x faster).
// Deliberately AVX2 without FMA: nothing to contract into, so every element is bit-identical
// to the baseline copy (a target("avx512f") copy built with GCC 12 used FMAs, which round
// differently).
__attribute__((target("avx2"))) void adamw_avx2(float* w, float* g, float* m1, float* m2, long n, const AdamWStep& a) {
  adamw_body(w, g, m1, m2, n, a);
}

void adamw(float* w, float* g, float* m1, float* m2, long n, const AdamWStep& a) {
  static const bool avx2 = cpu_features().avx2;
  if (avx2) adamw_avx2(w, g, m1, m2, n, a);
  else adamw_body(w, g, m1, m2, n, a);
}

// Runs fn(begin, end, thread) over [0, n) in blocks of `block` that the pool's threads claim
// from a shared counter: on a shared machine a thread can lose its core for milliseconds,
// and the other threads then take over its remaining blocks instead of waiting at the join
// (pool.parallel_for's fixed shares wait). Inline when there is only one block.
void parallel_blocks(ThreadPool& pool, long n, long block, const std::function<void(long, long, int)>& fn) {
  if (n <= 0) return;
  block = std::max<long>(1, block);
  if (n <= block || pool.size() == 1) {
    fn(0, n, 0);
    return;
  }
  std::atomic<long> next{0};
  pool.run([&](int tid, int) {
    for (long b; (b = next.fetch_add(block, std::memory_order_relaxed)) < n;) fn(b, std::min(n, b + block), tid);
  });
}

// Row loops of the backward pass: ~8 blocks a thread, none under ~16K floats of work
// (below that a parallel region costs more than it saves).
void parallel_rows(ThreadPool& pool, long rows, long width, const std::function<void(long, long, int)>& fn) {
  const long min_rows = std::max<long>(1, (16L << 10) / std::max<long>(1, width));
  parallel_blocks(pool, rows, std::max(min_rows, rows / (8L * pool.size())), fn);
}

// Query rows per block of the attention backward: the score products of a block only reach
// keys up to its last row (causality skips the rest), and its [block, keys] scratch stays small.
constexpr int kAttnBlock = 32;

// Attention backward of one sequence and one query head, in matrix products per block of
// query rows (the row-by-row kernel attention_row_backward streams the dK and dV rows once per
// query row; this measured ~3x faster at T = 128, ~2x at T = 64). For each query head hq of the group, with P the causal (sliding-window) softmax of
// scale * Q K^T:
//   dP = dO V^T,  D_t = sum_j P_tj dP_tj (= dO_t . O_t),  dS = scale * P o (dP - D)
//   dQ = dS K (written),  dK += dS^T Q,  dV += P^T dO.
// q, dout, dq: the sequence's rows of head hq (row strides ldq, ldo, ldq); k, v [T, hd] the
// cache; dk, dv [T, hd] accumulated. `solo` is a one-thread pool: this runs inside a task of
// the model's pool, whose region must not be re-entered. sp, dsp: scratch [kAttnBlock * T].
void attention_head_backward(ThreadPool& solo, int T, int hd, float scale, int window, const float* q, long ldq,
                             const float* dout, long ldo, const float* k, const float* v, float* dq, float* dk,
                             float* dv, float* sp, float* dsp) {
  for (int t0 = 0; t0 < T; t0 += kAttnBlock) {
    const int t1 = std::min(T, t0 + kAttnBlock), bq = t1 - t0;
    const int k0 = window > 0 ? std::max(0, t0 - window + 1) : 0, nk = t1 - k0;  // keys of the block
    const float* qb = q + size_t(t0) * ldq;
    const float* ob = dout + size_t(t0) * ldo;
    gemm_nt_f32(solo, bq, nk, hd, qb, ldq, k + size_t(k0) * hd, hd, sp, nk, false);    // S = Q K^T
    gemm_nt_f32(solo, bq, nk, hd, ob, ldo, v + size_t(k0) * hd, hd, dsp, nk, false);   // dP = dO V^T
    for (int i = 0; i < bq; ++i) {
      const int t = t0 + i;
      const int j0 = (window > 0 ? std::max(0, t - window + 1) : 0) - k0, j1 = t - k0 + 1;  // keys [j0, j1)
      float* p = sp + size_t(i) * nk;
      float* ds = dsp + size_t(i) * nk;
      for (int j = j0; j < j1; ++j) p[j] *= scale;
      softmax_scale(p + j0, j1 - j0, logsumexp(p + j0, j1 - j0), 1.f);
      float D = 0.f;
      for (int j = j0; j < j1; ++j) D += p[j] * ds[j];
      for (int j = j0; j < j1; ++j) ds[j] = scale * p[j] * (ds[j] - D);
      // Masked keys take no part in the products below.
      std::fill(p, p + j0, 0.f);
      std::fill(ds, ds + j0, 0.f);
      std::fill(p + j1, p + nk, 0.f);
      std::fill(ds + j1, ds + nk, 0.f);
    }
    gemm_nn_f32(solo, bq, hd, nk, dsp, nk, k + size_t(k0) * hd, hd, dq + size_t(t0) * ldq, ldq, false);  // dQ
    gemm_tn_f32(solo, nk, hd, bq, dsp, nk, qb, ldq, dk + size_t(k0) * hd, hd, true);                      // dK
    gemm_tn_f32(solo, nk, hd, bq, sp, nk, ob, ldo, dv + size_t(k0) * hd, hd, true);                       // dV
  }
}

}  // namespace

struct Trainer::Impl {
  // Kept from step to step, like the scratch below: training repeats the same shapes, and
  // buffers allocated afresh each step cost their page faults (the kernel clearing every
  // page) again and again. The forward reuses the trace's capacity.
  ForwardTrace trace;
  std::vector<KvCache> caches, ref_caches;  // K, V of the trained batch (read by the backward), of the reference
  std::vector<Param*> params;  // trainable, in a fixed order (checkpoints rely on it)

  // Full fine-tuning: f32 masters of every model tensor, by engine name.
  struct FullLinear { Param* w = nullptr; Param* b = nullptr; };
  struct FullLayer {
    FullLinear lin[4];
    Param* norm_w[4] = {nullptr, nullptr, nullptr, nullptr};  // attn_norm, mlp_norm, q_norm, k_norm (Layer::norm order)
    Param* norm_b[2] = {nullptr, nullptr};
  };
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

  // Where the engine keeps its own copy of a parameter, rewritten after each update (full
  // mode; LoRA values are read by the engine as they are): a packed matrix with its packed
  // transpose, or an f32 vector. The untied embedding has neither (sync_untied_embed).
  struct Mirror {
    Param* p = nullptr;
    PackedWeight* w = nullptr;   // [N, K] = p's shape
    PackedWeight* wt = nullptr;  // [K, N]
    std::vector<float>* vec = nullptr;
  };
  std::vector<Mirror> mirrors;   // one per trainable parameter, in params order
  // The optimizer's units of work, claimed by the pool's threads: elements [begin, end) of
  // mirrors[m].p. A packed matrix is cut at whole 32-row panels, so each chunk rewrites its
  // own panels of W and W^T and no two threads write the same memory. Fixed at construction,
  // so the gradient norm (summed per chunk, then over chunks in order) does not depend on
  // the number of threads.
  struct Chunk { int m; long begin, end; };
  std::vector<Chunk> chunks;
  std::vector<double> chunk_sq;  // per chunk: sum of squared gradients

  // Runs fn(chunk index) for every chunk on the pool, threads claiming chunks from a counter
  // (a thread that loses its core for a while leaves its share to the others).
  void parallel_chunks(ThreadPool& pool, const std::function<void(size_t)>& fn) {
    const size_t n = chunks.size();
    std::atomic<size_t> next{0};
    pool.run([&](int, int) {
      for (size_t ci; (ci = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(ci);
    });
  }

  // The packs are written in place: (re)build any whose shape or type does not match its
  // parameter first (never, unless the engine's tensors were replaced behind the trainer's back).
  void check_mirrors(DType dtype) {
    for (Mirror& mr : mirrors) {
      if (mr.w) {
        const int N = int(mr.p->shape[0]), K = int(mr.p->shape[1]);
        if (!mr.w->data || mr.w->N != N || mr.w->K != K || mr.w->dtype != dtype) {
          pack_weight(*mr.w, mr.p->value.data(), SrcType::f32, N, K, false, dtype);
          mr.wt->data.reset();
        }
        if (!mr.wt->data || mr.wt->N != K || mr.wt->K != N || mr.wt->dtype != dtype) pack_weight_transposed(*mr.wt, *mr.w);
      } else if (mr.vec) {
        mr.vec->resize(mr.p->value.size());
      }
    }
  }

  // Copies a chunk of its parameter's values into the engine's copy (full mode).
  void write_mirror(const Chunk& ch) {
    const Mirror& mr = mirrors[ch.m];
    const float* v = mr.p->value.data();
    if (mr.w) {
      const int K = int(mr.p->shape[1]);
      write_packed_rows(v, int(mr.p->shape[0]), K, int(ch.begin / K), int(ch.end / K), *mr.w, *mr.wt);
    } else if (mr.vec) {
      std::memcpy(mr.vec->data() + ch.begin, v + ch.begin, size_t(ch.end - ch.begin) * 4);
    }
  }

  // Scratch. Sized with resize(): only what a step accumulates into is zeroed explicitly.
  std::vector<float> h, h_ref, dh_rows, dx, dfinal, dact, dxn, dmlp, datt, dqkv, dK, dV, tmp_in, du, xd, z;
  std::vector<float> rf_h, rf_href, hc, rcos, rsin, norm_row, norm_dw, norm_db, qk_norm_dw, attn_p, attn_ds;
  std::vector<std::unique_ptr<ThreadPool>> solo;  // one-thread pools for products inside pool tasks
};

// Frees the W^T packs the backward pass keeps beside each projection (only training needs them).
static void drop_transposed_packs(Model& model) {
  for (int l = 0; l < model.config().n_layers; ++l)
    for (int i = 0; i < 4; ++i) model.linear(l, i).wt = PackedWeight();
}

Trainer::Trainer(Model& model, const TrainOptions& options) : impl_(new Impl), model_(model), options_(options) {
  const ModelConfig& c = model.config();
  model.check_complete();
  if (model.has_adapters()) throw std::invalid_argument("the model already has an adapter; remove it before training a new one");
  // A bad option found part way (a flag token outside the vocabulary, memory) leaves the model
  // as it came: without the parameters and transposed packs made so far.
  struct Undo {
    Model& model;
    bool armed = true;
    ~Undo() {
      if (!armed) return;
      model.clear_adapters();
      drop_transposed_packs(model);
    }
  } undo{model};
  const long H = c.hidden;
  std::mt19937_64 rng(options.seed ^ 0x5eedULL);
  Impl& s = *impl_;

  if (options.mode == TrainMode::lora) {
    const LoraOptions& lo = options.lora;
    for (const LoraSitePlan& site : plan_lora_sites(c, lo)) {
      const std::string pre = "layers." + std::to_string(site.layer) + "." + site.site + ".";
      Param* A = model.new_param(pre + "lora_A", {long(lo.rank), site.in});
      Param* B = model.new_param(pre + "lora_B", {site.out, long(lo.rank)});
      init_lora_a(rng, A->value, site.in);
      model.add_lora(site.layer, site.target, A, B, site.scale);
      s.params.push_back(A);
      s.params.push_back(B);
    }
    const std::vector<int> flags = options.flags();
    if (!flags.empty()) {
      const long K = long(flags.size());
      for (size_t k = 0; k < flags.size(); ++k) {
        if (flags[k] < 0 || flags[k] >= c.vocab) throw std::invalid_argument("red-flag token outside the vocabulary");
        for (size_t j = 0; j < k; ++j)
          if (flags[j] == flags[k]) throw std::invalid_argument("a flag token is listed twice");
      }
      // One token: rows of shape [H] as before; several: [K, H], a row per flag in order.
      const std::vector<long> shape = K == 1 ? std::vector<long>{H} : std::vector<long>{K, H};
      s.rf_embed = model.new_param("rf.embed", shape, false);
      s.rf_head_base.resize(size_t(K) * H);
      for (long k = 0; k < K; ++k) {
        model.embed_row(uint32_t(flags[k]), s.rf_embed->value.data() + k * H);
        packed_row(model.lm_head().w, flags[k], s.rf_head_base.data() + k * H);
      }
      if (c.tied_embeddings) {
        s.rf_head = s.rf_embed;  // tied: one row serves as both
      } else {
        s.rf_head = model.new_param("rf.head", shape, false);
        s.rf_head->value = s.rf_head_base;
      }
      model.set_token_rows(flags, s.rf_embed, s.rf_head);
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
      s.full[l].norm_w[2] = vec(pre + "q_norm.weight", L.q_norm.weight, false);  // qk_norm only (else empty: none)
      s.full[l].norm_w[3] = vec(pre + "k_norm.weight", L.k_norm.weight, false);
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

  // The engine copies each parameter is written to after an update (full mode).
  for (Param* p : s.params) s.mirrors.push_back({p});
  auto mirror = [&](Param* p) -> Impl::Mirror& {
    for (Impl::Mirror& mi : s.mirrors)
      if (mi.p == p) return mi;
    throw std::logic_error("trainer: parameter without a slot");
  };
  if (options.mode == TrainMode::full) {
    for (int l = 0; l < c.n_layers; ++l) {
      Layer& L = model.layer(l);
      for (int i = 0; i < 4; ++i) {
        Linear& lin = model.linear(l, i);
        Impl::Mirror& mw = mirror(s.full[l].lin[i].w);
        mw.w = &lin.w;
        mw.wt = &lin.wt;
        if (s.full[l].lin[i].b) mirror(s.full[l].lin[i].b).vec = &lin.bias;
      }
      for (int j = 0; j < 4; ++j)
        if (s.full[l].norm_w[j]) mirror(s.full[l].norm_w[j]).vec = &L.norm(j).weight;
      for (int j = 0; j < 2; ++j)
        if (s.full[l].norm_b[j]) mirror(s.full[l].norm_b[j]).vec = &L.norm(j).bias;
    }
    if (s.full_final_w) mirror(s.full_final_w).vec = &model.final_norm().weight;
    if (s.full_final_b) mirror(s.full_final_b).vec = &model.final_norm().bias;
    if (s.full_pos) mirror(s.full_pos).vec = &model.pos_embed();
    // The LM head: the embedding itself when tied, else its own matrix. An untied embedding
    // is reloaded through Model::load_tensor (sync_full_weights).
    Impl::Mirror& mh = mirror(s.full_head ? s.full_head : s.full_embed);
    mh.w = &model.lm_head().w;
    mh.wt = &s.head_t;
  }
  // ~64K elements a chunk: a few thousand for a 124M model, each a few tens of µs of work.
  constexpr long kChunkElems = 1L << 16;
  for (size_t mi = 0; mi < s.mirrors.size(); ++mi) {
    const Impl::Mirror& mr = s.mirrors[mi];
    const long n = mr.p->numel();
    long step = kChunkElems;
    if (mr.w) {
      const long K = mr.p->shape[1];
      step = std::max<long>(1, kChunkElems / (kPackPanel * K)) * kPackPanel * K;
    }
    for (long b = 0; b < n; b += step) s.chunks.push_back({int(mi), b, std::min(n, b + step)});
  }
  s.chunk_sq.assign(s.chunks.size(), 0.0);
  undo.armed = false;
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
  drop_transposed_packs(model_);
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
               const PackedWeight& head, const PackedWeight& head_t, const std::vector<int>& flags, const float* rf_head,
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
        for (size_t k = 0; k < flags.size(); ++k) {
          float dot = 0.f;
          for (long i = 0; i < H; ++i) dot += hr[i] * rf_head[k * H + i];
          zr[flags[k]] = dot;
        }
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
        // The head rows in use for the flags are the trained ones: correct W^T's base rows' contribution.
        const float* hr = h + size_t(r0 + r) * H;
        for (size_t k = 0; k < flags.size(); ++k) {
          const float g = z[size_t(r) * V + flags[k]];
          for (long i = 0; i < H; ++i) {
            dh[size_t(r0 + r) * H + i] += g * (rf_head[k * H + i] - rf_head_base[k * H + i]);
            rf_head_grad[k * H + i] += g * hr[i];
          }
        }
      }
    }
    gemm(pool, rows, z.data(), V, head_t, nullptr, dh + size_t(r0) * H, H, true);
    if (head_grad) gemm_tn_f32(pool, int(V), int(H), rows, z.data(), V, h + size_t(r0) * H, H, head_grad, H, true);
  }
  return loss;
}

}  // namespace

std::vector<LoraSitePlan> plan_lora_sites(const ModelConfig& c, const LoraOptions& lo) {
  if (lo.rank <= 0) throw std::invalid_argument("LoRA rank must be positive");
  if (lo.dropout < 0.f || lo.dropout >= 1.f) throw std::invalid_argument("LoRA dropout must be in [0, 1)");
  const float scale = lo.rslora ? lo.alpha / std::sqrt(float(lo.rank)) : lo.alpha / float(lo.rank);
  const long H = c.hidden;
  std::vector<LoraSitePlan> out;
  std::vector<bool> used(lo.targets.size(), false);
  for (int l = 0; l < c.n_layers; ++l) {
    for (const Site& site : block_sites(c.arch)) {
      bool match = false;
      for (size_t t = 0; t < lo.targets.size(); ++t)
        if (target_matches(site.name, lo.targets[t])) match = used[t] = true;
      if (!match) continue;
      LoraSitePlan p;
      p.layer = l;
      p.index = site.index;
      p.site = site.name;
      p.target = c.arch == Arch::gpt2 ? site.name : short_name(site.name);
      // Output rows of this site within the fused projection; the projection's input size.
      if (c.arch == Arch::gpt2) p.out = site.index == 0 ? 3 * H : site.index == 2 ? c.intermediate : H;
      else if (site.index == 0) p.out = std::string(site.name) == "self_attn.q_proj" ? c.q_dim() : c.kv_dim();
      else p.out = site.index == 2 ? c.intermediate : H;
      p.in = site.index == 1 ? c.q_dim() : site.index == 3 ? c.intermediate : H;
      p.scale = scale;
      out.push_back(p);
    }
  }
  for (size_t t = 0; t < lo.targets.size(); ++t) {
    if (!used[t]) {
      std::string names;
      for (const Site& site : block_sites(c.arch)) names += std::string(names.empty() ? "" : ", ") + short_name(site.name);
      throw std::invalid_argument("LoRA target " + lo.targets[t] + " matches no projection; this architecture has " + names);
    }
  }
  return out;
}

void init_lora_a(std::mt19937_64& rng, std::vector<float>& A, long in) {
  // PEFT's default: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
  // adapted model starts exactly at the base model.
  const float bound = 1.0f / std::sqrt(float(in));
  std::uniform_real_distribution<float> u(-bound, bound);
  for (float& v : A) v = u(rng);
}

SplitRows split_loss_rows(const std::vector<LossRow>& rows, const std::vector<int>& flags) {
  SplitRows out;
  for (const LossRow& r : rows) {
    if (r.kind == LossRow::ce) {
      out.ce_src.push_back(r.row);
      out.ce_targets.push_back(r.target);
      continue;
    }
    RfLossRow q{};
    q.kind = r.kind == LossRow::benign_kl ? RfLossKind::benign_kl
             : r.kind == LossRow::red_flag ? RfLossKind::red_flag
                                           : RfLossKind::after_kl;
    q.group = r.group;
    q.flag = r.kind == LossRow::red_flag && r.target >= 0
                 ? int32_t(std::find(flags.begin(), flags.end(), r.target) - flags.begin())
                 : 0;
    q.ref_row = -1;
    if (r.ref_row >= 0 && r.kind != LossRow::red_flag) {
      q.ref_row = int32_t(out.ref_src.size());
      out.ref_src.push_back(r.ref_row);
    }
    out.rf_src.push_back(r.row);
    out.rf.push_back(q);
  }
  return out;
}

RfLossOptions rf_loss_options(const LossOptions& lopt, const std::vector<int>& flags) {
  RfLossOptions o;
  o.flag_tokens = flags.empty() ? std::vector<int>{0} : flags;
  o.aggregation = lopt.aggregation == Aggregation::any    ? RfAggregation::any
                  : lopt.aggregation == Aggregation::mean ? RfAggregation::mean
                                                          : RfAggregation::single;
  o.alpha_benign = lopt.alpha_benign * lopt.grad_scale;
  o.alpha_rf = lopt.alpha_rf * lopt.grad_scale;
  o.alpha_after = lopt.alpha_after * lopt.grad_scale;
  return o;
}

void check_loss_rows(const std::vector<LossRow>& rows, long R, long Rref, const std::vector<int>& flags, int vocab, bool full) {
  if (R == 0) throw std::invalid_argument("empty training batch");
  for (const LossRow& r : rows) {
    if (r.row < 0 || r.row >= R) throw std::out_of_range("loss row outside the batch");
    const bool kl = r.kind == LossRow::benign_kl || r.kind == LossRow::after_kl;
    if (kl && (r.ref_row < 0 || r.ref_row >= Rref)) throw std::out_of_range("KL loss row without a reference row");
    if (kl && full) throw std::invalid_argument("KL terms need the reference model: use LoRA mode");
    if (r.kind == LossRow::red_flag && flags.empty()) throw std::invalid_argument("red-flag rows need rf_token");
    if (r.kind == LossRow::red_flag && r.target >= 0 && std::find(flags.begin(), flags.end(), r.target) == flags.end())
      throw std::invalid_argument("red-flag row target " + std::to_string(r.target) + " is not a flag token");
    if (r.kind == LossRow::ce && (r.target < 0 || r.target >= vocab)) throw std::out_of_range("ce target outside the vocabulary");
  }
}

LossTerms Trainer::step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                        const std::vector<LossRow>& rows, const LossOptions& lopt, const std::atomic<int>* cancel) {
  Model& m = model_;
  const ModelConfig& c = m.config();
  ThreadPool& pool = m.pool();
  Impl& s = *impl_;
  const long H = c.hidden, QKV = c.qkv_dim(), Q = c.q_dim(), KV = c.kv_dim(), hd = c.head_dim;
  const long I = c.intermediate, MLP_IN = c.act == Activation::silu ? 2 * I : I;
  const bool full = options_.mode == TrainMode::full;

  const std::vector<int> flags = options_.flags();
  long R = 0, Rref = 0;
  for (const Sequence& q : batch) R += q.n_tokens;
  for (const Sequence& q : reference) Rref += q.n_tokens;
  check_loss_rows(rows, R, Rref, flags, c.vocab, full);

  // Without parameter gradients the step still runs the whole backward (the input-embedding
  // gradient needs it) and puts the gradients accumulated so far back afterwards, also when it
  // throws. Cheap for LoRA (the only mode adversarial training uses); a full copy in full mode.
  struct GradGuard {
    std::vector<Param*> params;
    std::vector<std::vector<float>> saved;
    ~GradGuard() {
      for (size_t i = 0; i < saved.size(); ++i) params[i]->grad.swap(saved[i]);
    }
  } grad_guard;
  if (!lopt.param_grads) {
    grad_guard.params = s.params;
    for (Param* p : s.params) grad_guard.saved.push_back(p->grad);
  }

  // 1. Forward with activations (adapter on, LoRA dropout) -> final hidden states [R, H].
  auto items_for = [&](const std::vector<Sequence>& seqs, std::vector<KvCache>& caches) {
    while (caches.size() < seqs.size()) caches.push_back(m.new_cache());
    std::vector<ForwardItem> items;
    for (size_t i = 0; i < seqs.size(); ++i) {
      caches[i].truncate(0);  // keeps its memory
      items.push_back({&caches[i], seqs[i].tokens, seqs[i].n_tokens, seqs[i].embed_delta});
    }
    return items;
  };
  s.trace.dropout = full ? 0.f : options_.lora.dropout;
  s.trace.dropout_seed = options_.seed * 0x9e3779b97f4a7c15ULL + lopt.dropout_seed;
  s.h.resize(size_t(R) * H);
  m.set_adapter_enabled(true);
  {
    std::vector<ForwardItem> items = items_for(batch, s.caches);
    m.forward_traced(items, LogitsMode::hidden, s.h.data(), &s.trace, cancel);
  }
  std::vector<KvCache>& caches = s.caches;

  // 2. Reference forward: the base model (adapter and red-flag rows off), hidden states only.
  bool any_kl = false;
  for (const LossRow& r : rows) any_kl |= r.kind == LossRow::benign_kl || r.kind == LossRow::after_kl;
  if (any_kl) {
    s.h_ref.resize(size_t(Rref) * H);
    std::vector<ForwardItem> items = items_for(reference, s.ref_caches);
    m.set_adapter_enabled(false);
    try {
      m.forward(items, LogitsMode::hidden, s.h_ref.data(), cancel);
    } catch (...) {
      m.set_adapter_enabled(true);
      throw;
    }
    m.set_adapter_enabled(true);
  }

  // 3. Losses -> dL/dh for the scored rows, scattered into dH [R, H].
  LossTerms terms;
  terms.tokens = R;
  std::vector<float>& dH = s.dx;
  dH.assign(size_t(R) * H, 0.f);
  const SplitRows split = split_loss_rows(rows, flags);
  const std::vector<RfLossRow>& rf_rows = split.rf;
  const std::vector<int32_t>& rf_src = split.rf_src;
  const std::vector<int32_t>& ce_src = split.ce_src;
  const std::vector<int32_t>& ce_targets = split.ce_targets;
  std::vector<float>& rf_h = s.rf_h;
  std::vector<float>& rf_href = s.rf_href;
  rf_h.resize(rf_src.size() * size_t(H));
  rf_href.resize(split.ref_src.size() * size_t(H));
  for (size_t i = 0; i < rf_src.size(); ++i) std::memcpy(rf_h.data() + i * H, s.h.data() + size_t(rf_src[i]) * H, H * 4);
  for (size_t i = 0; i < split.ref_src.size(); ++i)
    std::memcpy(rf_href.data() + i * H, s.h_ref.data() + size_t(split.ref_src[i]) * H, H * 4);
  if (!rf_rows.empty()) {
    const RfLossOptions o = rf_loss_options(lopt, flags);
    if (flags.empty()) {
      // No red-flag token (refusal baseline): token 0's base row as the "trained" row (rf_loss_options).
      s.rf_head_base.resize(H);
      packed_row(m.lm_head().w, 0, s.rf_head_base.data());
    }
    const int n = int(rf_rows.size());
    s.dh_rows.resize(size_t(n) * H);  // written by rf_loss
    std::vector<float> dw_rf(size_t(o.flag_tokens.size()) * H, 0.f);
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
      for (size_t j = 0; j < dw_rf.size(); ++j) s.rf_head->grad[j] += dw_rf[j];
  }
  if (!ce_src.empty()) {
    const int n = int(ce_src.size());
    std::vector<float>& hc = s.hc;
    hc.resize(size_t(n) * H);
    for (int i = 0; i < n; ++i) std::memcpy(hc.data() + size_t(i) * H, s.h.data() + size_t(ce_src[i]) * H, H * 4);
    s.dh_rows.assign(size_t(n) * H, 0.f);
    const float weight = lopt.alpha_ce * lopt.grad_scale / float(n);
    float* head_grad = nullptr;
    if (full) head_grad = s.full_head ? s.full_head->grad.data() : s.full_embed->grad.data();
    const double loss = ce_loss(pool, m, hc.data(), n, ce_targets.data(), m.lm_head().w, s.head_t, flags,
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
  auto norm_backward_rows = [&](const Norm& n, Param* pw, Param* pb, const float* x, const float* dout, float* dst,
                                bool accumulate) {
    // dst (+)= d norm(x) / dx . dout for every row, rows in parallel. The weight and bias
    // gradients (when trained) take each row's contribution from [R, H] buffers afterwards,
    // rows in order for every element as a serial loop would, with the columns in parallel.
    const int nt = pool.size();
    s.norm_row.resize(size_t(nt) * H);
    s.norm_dw.resize(size_t(R) * H);
    s.norm_db.resize(size_t(R) * H);
    parallel_rows(pool, R, H, [&](long r0, long r1, int tid) {
      float* row = s.norm_row.data() + size_t(tid) * H;
      for (long r = r0; r < r1; ++r) {
        float* dwr = s.norm_dw.data() + r * H;  // the kernels accumulate into these
        float* dbr = s.norm_db.data() + r * H;
        std::fill(dwr, dwr + H, 0.f);
        if (c.norm == NormType::rms) {
          rmsnorm_backward(row, dwr, dout + r * H, x + r * H, n.weight.data(), int(H), c.norm_eps);
        } else {
          std::fill(dbr, dbr + H, 0.f);
          layernorm_backward(row, dwr, dbr, dout + r * H, x + r * H, n.weight.data(), int(H), c.norm_eps);
        }
        if (accumulate) {
          for (long i = 0; i < H; ++i) dst[r * H + i] += row[i];
        } else {
          std::memcpy(dst + r * H, row, H * sizeof(float));
        }
      }
    });
    if (!pw && !pb) return;
    parallel_rows(pool, H, R, [&](long i0, long i1, int) {
      for (long r = 0; r < R; ++r) {
        if (pw) for (long i = i0; i < i1; ++i) pw->grad[i] += s.norm_dw[r * H + i];
        if (pb) for (long i = i0; i < i1; ++i) pb->grad[i] += s.norm_db[r * H + i];
      }
    });
  };

  // Final norm: d x_final = norm'(x_final) . dH
  s.dfinal.resize(size_t(R) * H);
  norm_backward_rows(m.final_norm(), s.full_final_w, s.full_final_b, s.trace.x_final.data(), dH.data(), s.dfinal.data(),
                     false);
  dx.swap(s.dfinal);  // both buffers stay with the trainer

  // Input gradient through a projection: din (+)= dy . W, plus its adapters; weight gradients
  // (full mode) dW += dy^T x, db += sum dy; adapter gradients dA, dB.
  auto linear_backward = [&](int l, int index, const float* x, long in, const float* dy, long out, float* din,
                             const LayerTrace& lt, size_t& u_index, bool accumulate) {
    Linear& lin = m.linear(l, index);
    gemm(pool, int(R), dy, out, lin.wt, nullptr, din, in, accumulate);
    if (full) {
      Impl::FullLinear& f = s.full[l].lin[index];
      gemm_tn_f32(pool, int(out), int(in), int(R), dy, out, x, in, f.w->grad.data(), in, true);
      if (f.b) {
        // Columns in parallel, rows in order within each (the serial loop's sums).
        float* db = f.b->grad.data();
        parallel_rows(pool, out, R, [&](long j0, long j1, int) {
          for (long r = 0; r < R; ++r)
            for (long j = j0; j < j1; ++j) db[j] += dy[r * out + j];
        });
      }
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
        // Row by row: R * in passes 2^31 for an 8B model's down_proj at 150k tokens a micro-batch.
        for (long i = 0; i < R; ++i) add_forward(din + i * in, s.tmp_in.data() + i * in, int(in));
      }
    }
  };
  auto u_start = [&](int l, int index) {
    size_t n = 0;
    for (int i = 0; i < index; ++i) n += m.linear(l, i).lora.size();
    return n;
  };

  // Rope tables for the trained rows (sequences start at position 0).
  std::vector<float>& rcos = s.rcos;
  std::vector<float>& rsin = s.rsin;
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
    // Each buffer below is written whole before it is read (the input-gradient GEMMs run
    // with accumulate = false, the activation and attention backward write their outputs).
    s.dmlp.resize(size_t(R) * MLP_IN);
    std::vector<float>& dact = s.dact;
    dact.resize(size_t(R) * I);
    {
      size_t ui = u_start(l, 3);
      linear_backward(l, 3, lt.act.data(), I, dx.data(), H, dact.data(), lt, ui, false);
    }
    parallel_rows(pool, R, I, [&](long r0, long r1, int) {
      for (long r = r0; r < r1; ++r) {
        if (c.act == Activation::silu) {
          swiglu_backward(s.dmlp.data() + r * MLP_IN, s.dmlp.data() + r * MLP_IN + I, dact.data() + r * I,
                          lt.mlp.data() + r * MLP_IN, lt.mlp.data() + r * MLP_IN + I, int(I));
        } else {
          gelu_new_backward(s.dmlp.data() + r * I, dact.data() + r * I, lt.mlp.data() + r * I, int(I));
        }
      }
    });
    std::vector<float>& dxn = s.dxn;
    dxn.resize(size_t(R) * H);
    {
      size_t ui = u_start(l, 2);
      linear_backward(l, 2, lt.xn2.data(), H, s.dmlp.data(), MLP_IN, dxn.data(), lt, ui, false);
    }
    norm_backward_rows(L.mlp_norm, full ? s.full[l].norm_w[1] : nullptr, full ? s.full[l].norm_b[1] : nullptr,
                       lt.x_mid.data(), dxn.data(), dx.data(), true);

    // Attention: x_mid = x_in + o(attn(rope(qkv(norm(x_in)))))
    s.datt.resize(size_t(R) * Q);
    {
      size_t ui = u_start(l, 1);
      linear_backward(l, 1, lt.att.data(), Q, dx.data(), H, s.datt.data(), lt, ui, false);
    }
    s.dqkv.resize(size_t(R) * QKV);
    {
      // One task per (sequence, KV head): it owns that head's dK, dV, so no two threads write
      // the same memory; dq rows of the group's query heads are disjoint too. Threads claim
      // tasks from a counter, longest sequences first.
      struct Task { int item; long row0; int g; };
      std::vector<Task> tasks;
      long row0 = 0;
      for (size_t i = 0; i < batch.size(); ++i) {
        for (int g = 0; g < c.n_kv_heads; ++g) tasks.push_back({int(i), row0, g});
        row0 += batch[i].n_tokens;
      }
      std::stable_sort(tasks.begin(), tasks.end(),
                       [&](const Task& a, const Task& b) { return batch[a.item].n_tokens > batch[b.item].n_tokens; });
      long max_t = 0;
      for (const Sequence& q : batch) max_t = std::max<long>(max_t, q.n_tokens);
      const int nt = pool.size();
      while (int(s.solo.size()) < nt) s.solo.push_back(std::make_unique<ThreadPool>(1));
      s.dK.resize(size_t(nt) * max_t * hd);  // each task zeroes its rows
      s.dV.resize(size_t(nt) * max_t * hd);
      const size_t block_elems = size_t(std::min<long>(max_t, kAttnBlock)) * max_t;
      s.attn_p.resize(size_t(nt) * block_elems);
      s.attn_ds.resize(size_t(nt) * block_elems);
      parallel_blocks(pool, long(tasks.size()), 1, [&](long w0, long w1, int tid) {
        float* dK = s.dK.data() + size_t(tid) * max_t * hd;
        float* dV = s.dV.data() + size_t(tid) * max_t * hd;
        for (long w = w0; w < w1; ++w) {
          const Task& tk = tasks[w];
          const int T = batch[tk.item].n_tokens;
          KvCache& cache = caches[tk.item];
          std::fill(dK, dK + size_t(T) * hd, 0.f);
          std::fill(dV, dV + size_t(T) * hd, 0.f);
          for (int hq = tk.g * group; hq < (tk.g + 1) * group; ++hq) {
            attention_head_backward(*s.solo[tid], T, int(hd), scale, c.sliding_window,
                                    lt.qkv.data() + tk.row0 * QKV + hq * hd, QKV, s.datt.data() + tk.row0 * Q + hq * hd, Q,
                                    cache.k(l, tk.g), cache.v(l, tk.g), s.dqkv.data() + tk.row0 * QKV + hq * hd, dK, dV,
                                    s.attn_p.data() + size_t(tid) * block_elems, s.attn_ds.data() + size_t(tid) * block_elems);
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
      parallel_rows(pool, R, Q + KV, [&](long r0, long r1, int) {
        for (long r = r0; r < r1; ++r) {
          rope_backward(s.dqkv.data() + r * QKV, c.n_heads, int(hd), rcos.data() + r * hd / 2, rsin.data() + r * hd / 2);
          rope_backward(s.dqkv.data() + r * QKV + Q, c.n_kv_heads, int(hd), rcos.data() + r * hd / 2,
                        rsin.data() + r * hd / 2);
        }
      });
    }
    if (c.qk_norm) {
      // Qwen3's per-head norms, in place: d(q, k before the norms) from d(q, k after them).
      // Each row's weight gradients (summed over its heads in order) go to [R, 2, head_dim]
      // and into the trained weights in row order, as the block norms' do.
      Param* pw[2] = {full ? s.full[l].norm_w[2] : nullptr, full ? s.full[l].norm_w[3] : nullptr};
      s.qk_norm_dw.resize(size_t(R) * 2 * hd);
      parallel_rows(pool, R, Q + KV, [&](long r0, long r1, int) {
        for (long r = r0; r < r1; ++r) {
          float* d = s.dqkv.data() + r * QKV;
          const float* x = lt.qk_pre.data() + r * (Q + KV);
          float* dw = s.qk_norm_dw.data() + r * 2 * hd;
          std::fill(dw, dw + 2 * hd, 0.f);
          for (int h = 0; h < c.n_heads; ++h)
            rmsnorm_backward(d + h * hd, dw, d + h * hd, x + h * hd, L.q_norm.weight.data(), int(hd), c.norm_eps);
          for (int g = 0; g < c.n_kv_heads; ++g)
            rmsnorm_backward(d + Q + g * hd, dw + hd, d + Q + g * hd, x + Q + g * hd, L.k_norm.weight.data(), int(hd),
                             c.norm_eps);
        }
      });
      for (int j = 0; j < 2; ++j)
        if (pw[j])
          for (long r = 0; r < R; ++r)
            for (long i = 0; i < hd; ++i) pw[j]->grad[i] += s.qk_norm_dw[size_t(r) * 2 * hd + j * hd + i];
    }
    {
      size_t ui = u_start(l, 0);
      linear_backward(l, 0, lt.xn1.data(), H, s.dqkv.data(), QKV, dxn.data(), lt, ui, false);
    }
    norm_backward_rows(L.attn_norm, full ? s.full[l].norm_w[0] : nullptr, full ? s.full[l].norm_b[0] : nullptr,
                       lt.x_in.data(), dxn.data(), dx.data(), true);
  }

  // 5. Embeddings: the rows that were looked up collect their gradient, which is also the
  //    gradient with respect to the input embeddings (and their perturbation).
  {
    long r = 0;
    for (const Sequence& q : batch) {
      if (q.embed_grad) std::memcpy(q.embed_grad, dx.data() + r * H, size_t(q.n_tokens) * H * sizeof(float));
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
        } else if (const int k = s.rf_embed ? m.token_rows_index(tok) : -1; k >= 0) {
          float* e = s.rf_embed->grad.data() + size_t(k) * H;
          for (long i = 0; i < H; ++i) e[i] += g[i];
        }
      }
    }
  }
  return terms;
}

double Trainer::optimizer_step(const AdamWOptions& o) {
  Impl& s = *impl_;
  ThreadPool& pool = model_.pool();
  // Clipping needs the norm before any update: a pass of its own. Without clipping the norm
  // is only reported, and each chunk sums its gradient just before updating it.
  const bool clipping = o.clip_norm > 0.f;
  auto total_norm = [&] {
    double sq = 0;
    for (double v : s.chunk_sq) sq += v;
    return std::sqrt(sq);
  };
  double norm = 0;
  float clip = 1.f;
  if (clipping) {
    s.parallel_chunks(pool, [&](size_t ci) {
      const Impl::Chunk& ch = s.chunks[ci];
      s.chunk_sq[ci] = sum_squares(s.mirrors[ch.m].p->grad.data() + ch.begin, ch.end - ch.begin);
    });
    norm = total_norm();
    if (norm > o.clip_norm) clip = float(o.clip_norm / (norm + 1e-6));
  }
  ++adam_step_;
  s.check_mirrors(model_.dtype());
  AdamWStep a{o.lr, o.beta1, o.beta2, o.eps, 0.f, clip,
              1.0 - std::pow(double(o.beta1), double(adam_step_)), 1.0 - std::pow(double(o.beta2), double(adam_step_))};
  // AdamW and the engine's copies chunk by chunk, while the chunk's values are in cache.
  s.parallel_chunks(pool, [&](size_t ci) {
    const Impl::Chunk& ch = s.chunks[ci];
    Param* p = s.mirrors[ch.m].p;
    const long n = ch.end - ch.begin;
    if (!clipping) s.chunk_sq[ci] = sum_squares(p->grad.data() + ch.begin, n);
    AdamWStep pa = a;
    pa.decay = p->decay ? o.lr * o.weight_decay : 0.f;
    adamw(p->value.data() + ch.begin, p->grad.data() + ch.begin, p->m.data() + ch.begin, p->v.data() + ch.begin, n, pa);
    s.write_mirror(ch);
  });
  if (!clipping) norm = total_norm();
  if (options_.mode == TrainMode::full) sync_untied_embed();
  return norm;
}

void Trainer::sync_full_weights() {
  // Rewrites the engine's copies from the f32 masters (after a checkpoint restore).
  Impl& s = *impl_;
  s.check_mirrors(model_.dtype());
  s.parallel_chunks(model_.pool(), [&](size_t ci) { s.write_mirror(s.chunks[ci]); });
  sync_untied_embed();
}

// The untied embedding's engine copy (private to Model) goes through load_tensor.
void Trainer::sync_untied_embed() {
  Impl& s = *impl_;
  if (options_.mode == TrainMode::full && !model_.config().tied_embeddings)
    model_.load_tensor("embed", s.full_embed->value.data(), SrcType::f32, s.full_embed->shape, false);
}

}  // namespace rf
