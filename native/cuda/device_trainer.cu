// The GPU trainer (see device_trainer.h). The backward walks the layers top down as the CPU's
// Trainer::step does (native/model/train.cpp), with the same names for the same quantities:
//   dx    [R, H]       dL/d(residual stream) below the current point
//   dact  [R, I]       dL/d(mlp_out's input)        dmlp [R, MLP_IN] dL/d(mlp_in's output)
//   dxn   [R, H]       dL/d(a norm's output)        datt [R, Q]      dL/d(attention output)
//   dqkv  [R, QKV]     dL/d(qkv projection output), rope undone
// and each projection's backward: din = dy W (cuBLASLt, bf16 inputs when the weights are bf16),
// plus for each LoRA adapter on it, with u = dropout(x) A^T from the trace and B* = scale B (the
// engine keeps B premultiplied):
//   dB += scale dy_s^T u    du = dy_s B*    dA += du^T dropout(x)    din += dropout'(du A)
// where dy_s is the adapter's slice of dy.
#include "cuda/device_trainer.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>

#include "cuda/attention_backward.h"
#include "cuda/collective.h"
#include "cuda/device_model.h"
#include "cuda/device_model_impl.h"
#include "cuda/gemm.h"
#include "cuda/model_ops.h"
#include "cuda/ops_backward.h"
#include "cuda/optim.h"
#include "cuda/phase_clock.h"
#include "cuda/rf_loss.h"
#include "cuda/train_ops.h"

namespace rf::cuda {

namespace {

float* floats(Buffer& b, long n) { return static_cast<float*>(b.ensure(size_t(std::max(1L, n)) * sizeof(float), "the trainer's buffers")); }

// Elements [first, first + n) of a device buffer in the engine's dtype (or f32), as f32 on the host.
std::vector<float> download_floats(const Buffer& b, DType dtype, long first, long n) {
  std::vector<float> out(static_cast<size_t>(n));
  if (n == 0) return out;
  if (dtype == DType::f32) {
    check(cudaMemcpy(out.data(), b.get() + first, size_t(n) * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy (weights)");
  } else {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    check(cudaMemcpy(h.data(), b.get<uint16_t>() + first, size_t(n) * sizeof(uint16_t), cudaMemcpyDeviceToHost),
          "cudaMemcpy (weights)");
    for (long i = 0; i < n; ++i) out[size_t(i)] = bf16_to_f32(h[size_t(i)]);
  }
  return out;
}

// Groups (source index -> destination row) pairs by destination, sources in their order, for
// add_rows_grouped.
struct Scatter {
  std::vector<int32_t> dst_rows, first, index;
  explicit Scatter(const std::vector<int32_t>& dst_of_src) {
    std::vector<int32_t> order(dst_of_src.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return dst_of_src[size_t(a)] < dst_of_src[size_t(b)]; });
    first.push_back(0);
    for (size_t j = 0; j < order.size(); ++j) {
      const int32_t d = dst_of_src[size_t(order[j])];
      if (dst_rows.empty() || dst_rows.back() != d) {
        if (!dst_rows.empty()) first.push_back(int32_t(j));
        dst_rows.push_back(d);
      }
      index.push_back(order[j]);
    }
    first.push_back(int32_t(index.size()));
    if (dst_rows.empty()) first.assign(1, 0);
  }
};

}  // namespace

struct DeviceTrainer::Impl {
  // Host mirrors of the parameters, and where each lives in the flat device arrays.
  std::vector<std::unique_ptr<Param>> host;
  std::vector<long> offset;
  long total = 0;
  Buffer value, grad, m1, m2, saved_grad, sum_scratch;
  Buffer tensor_end, tensor_decay;  // the parameters' ends in the flat arrays and decay flags (adamw_tensors)

  // The adapters in the engine's order: per (layer, projection index), the A parameter of each
  // entry of that DLinear's lora list (B is the next parameter).
  std::vector<std::vector<int>> lora_params;  // [layer * 4 + index] -> parameter index of A
  int rf_embed = -1, rf_head = -1;            // parameter indices (equal when embeddings are tied)
  // Full fine-tuning: the parameter index of every engine tensor (-1: none), in the CPU's order.
  // norm_w: attn_norm, mlp_norm, q_norm, k_norm (DLayer::norm order; the last two Qwen3's only).
  struct FullLayer { int w[4] = {-1, -1, -1, -1}, b[4] = {-1, -1, -1, -1}, norm_w[4] = {-1, -1, -1, -1}, norm_b[2] = {-1, -1}; };
  std::vector<FullLayer> full;
  int full_final_w = -1, full_final_b = -1, full_embed = -1, full_head = -1, full_pos = -1;
  std::vector<int> flags;
  Buffer flag_ids;
  Buffer base_row0;  // f32 [H]: the LM head's row 0 (the KL-only loss's stand-in flag, no flag trained)

  DeviceTrace trace;
  LossScratch loss_scratch;      // the losses' device scratch, kept from step to step
  PhaseClock clock{kTrainPhases};
  DeviceLayerTrace recomputed;  // one block's activations, recomputed in the backward
  // The backward's recomputed and widened activations of one block, and an adapter's dropped-out
  // input: the model's idle forward scratch stands in for xn, act, wide_a and xa unless the
  // backward recomputes blocks (see the backward).
  Buffer xn, act, wide_a, wide_b, xa;
  Buffer h, h_ref, dH, dx, dact, dmlp, dxn, datt, dqkv, du, da_parts, colsum, tmp_in, xb, xw, rows_h, rows_href, dh_rows,
      dw_scratch, lora16;
  Buffer norm_scratch, attn_scratch, idx_a, idx_b, sc_rows, sc_first, sc_index;

  float* val(int p) const { return value.get() + offset[size_t(p)]; }
  float* grd(int p) const { return grad.get() + offset[size_t(p)]; }
};

DeviceTrainer::DeviceTrainer(DeviceModel& model, const TrainOptions& options)
    : impl_(new Impl), model_(model), options_(options) {
  check(cudaSetDevice(model.device()), "cudaSetDevice");
  model.check_complete();
  if (model.merged())
    throw std::invalid_argument("training needs the base weights, but an adapter is merged into this model's (reload it)");
  const ModelConfig& c = model.config();
  for (const DLayer& L : model.w_->layers)
    for (const DLinear* lin : {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out})
      if (!lin->lora.empty()) throw std::invalid_argument("the model already has an adapter; remove it before training a new one");
  if (!model.w_->flag_tokens.empty())
    throw std::invalid_argument("the model already has flag-token rows; remove them before training new ones");
  Impl& s = *impl_;
  const long H = c.hidden;
  std::mt19937_64 rng(options.seed ^ 0x5eedULL);  // the CPU trainer's stream: the same initial values
  auto add_param = [&](const std::string& name, std::vector<long> shape, bool decay) {
    auto p = std::make_unique<Param>();
    p->name = name;
    p->shape = std::move(shape);
    p->decay = decay;
    p->value.assign(size_t(p->numel()), 0.f);
    s.offset.push_back(s.total);
    s.total += p->numel();
    s.host.push_back(std::move(p));
    return int(s.host.size() - 1);
  };

  // The device arrays of values, gradients and moments, and zero host gradients and moments.
  auto allocate_state = [&] {
    floats(s.value, s.total);
    floats(s.grad, s.total);
    floats(s.m1, s.total);
    floats(s.m2, s.total);
    std::vector<long> end;
    std::vector<int32_t> decay;
    for (size_t i = 0; i < s.host.size(); ++i) {
      end.push_back(s.offset[i] + s.host[i]->numel());
      decay.push_back(s.host[i]->decay ? 1 : 0);
    }
    s.tensor_end.upload(end.data(), end.size() * sizeof(long));
    s.tensor_decay.upload(decay.data(), decay.size() * sizeof(int32_t));
    for (Param* p : params()) {
      p->grad.assign(p->value.size(), 0.f);
      p->m.assign(p->value.size(), 0.f);
      p->v.assign(p->value.size(), 0.f);
    }
  };
  s.lora_params.resize(size_t(c.n_layers) * 4);
  if (options.mode == TrainMode::full) {
    // Every tensor gets an f32 master, from the engine's copy (bf16 weights: their rounded values,
    // as the CPU's unpacked masters).
    DeviceWeights& w = *model.w_;
    auto master = [&](const std::string& name, const Buffer& b, DType dtype, std::vector<long> shape, bool decay) {
      if (b.empty()) return -1;
      const int i = add_param(name, shape, decay);
      s.host[size_t(i)]->value = download_floats(b, dtype, 0, s.host[size_t(i)]->numel());
      return i;
    };
    static const char* names[4] = {"qkv", "o", "mlp_in", "mlp_out"};
    s.full.resize(size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string pre = "layers." + std::to_string(l) + ".";
      for (int i = 0; i < 4; ++i) {
        const DLinear& lin = model.linear(l, i);
        s.full[size_t(l)].w[i] = master(pre + names[i] + ".weight", lin.w, model.dtype(), {long(lin.out), long(lin.in)}, true);
        s.full[size_t(l)].b[i] = master(pre + names[i] + ".bias", lin.bias, DType::f32, {long(lin.out)}, false);
      }
      static const char* norm_names[4] = {"attn_norm", "mlp_norm", "q_norm", "k_norm"};
      for (int j = 0; j < 2; ++j) {
        const DNorm& nm = w.layers[size_t(l)].norm(j);
        s.full[size_t(l)].norm_w[j] = master(pre + norm_names[j] + ".weight", nm.w, DType::f32, {H}, false);
        s.full[size_t(l)].norm_b[j] = master(pre + norm_names[j] + ".bias", nm.b, DType::f32, {H}, false);
      }
      // Qwen3's per-head norms (empty otherwise: no parameter), after the block norms as on the CPU.
      for (int j = 2; j < 4; ++j)
        s.full[size_t(l)].norm_w[j] = master(pre + norm_names[j] + ".weight", w.layers[size_t(l)].norm(j).w, DType::f32, {long(c.head_dim)}, false);
    }
    s.full_final_w = master("final_norm.weight", w.final_norm.w, DType::f32, {H}, false);
    s.full_final_b = master("final_norm.bias", w.final_norm.b, DType::f32, {H}, false);
    s.full_embed = master("embed", w.embed, model.dtype(), {long(c.vocab), H}, true);
    if (!c.tied_embeddings) s.full_head = master("lm_head", w.lm_head, model.dtype(), {long(c.vocab), H}, true);
    if (c.arch == Arch::gpt2) s.full_pos = master("pos_embed", w.pos_embed, DType::f32, {long(w.pos_embed.bytes() / sizeof(float))}, true);
    allocate_state();
    params_changed();
    return;
  }
  const LoraOptions& lo = options.lora;
  for (const LoraSitePlan& site : plan_lora_sites(c, lo)) {
    const std::string pre = "layers." + std::to_string(site.layer) + "." + site.site + ".";
    const int a = add_param(pre + "lora_A", {long(lo.rank), site.in}, true);
    add_param(pre + "lora_B", {site.out, long(lo.rank)}, true);
    init_lora_a(rng, s.host[size_t(a)]->value, site.in);
    s.lora_params[size_t(site.layer) * 4 + size_t(site.index)].push_back(a);
  }
  s.flags = options.flags();
  std::vector<float> head_base;
  if (!s.flags.empty()) {
    const long K = long(s.flags.size());
    for (size_t k = 0; k < s.flags.size(); ++k) {
      if (s.flags[k] < 0 || s.flags[k] >= c.vocab) throw std::invalid_argument("red-flag token outside the vocabulary");
      for (size_t j = 0; j < k; ++j)
        if (s.flags[j] == s.flags[k]) throw std::invalid_argument("a flag token is listed twice");
    }
    const std::vector<long> shape = K == 1 ? std::vector<long>{H} : std::vector<long>{K, H};
    s.rf_embed = add_param("rf.embed", shape, false);
    const Buffer& head_table = c.tied_embeddings ? model.w_->embed : model.w_->lm_head;
    for (long k = 0; k < K; ++k) {
      const std::vector<float> e = download_floats(model.w_->embed, model.dtype(), s.flags[size_t(k)] * H, H);
      std::copy(e.begin(), e.end(), s.host[size_t(s.rf_embed)]->value.begin() + k * H);
      const std::vector<float> hrow = download_floats(head_table, model.dtype(), s.flags[size_t(k)] * H, H);
      head_base.insert(head_base.end(), hrow.begin(), hrow.end());
    }
    if (c.tied_embeddings) {
      s.rf_head = s.rf_embed;
    } else {
      s.rf_head = add_param("rf.head", shape, false);
      s.host[size_t(s.rf_head)]->value = head_base;
    }
    const std::vector<int32_t> ids(s.flags.begin(), s.flags.end());
    s.flag_ids.upload(ids.data(), ids.size() * sizeof(int32_t));
  } else {
    const std::vector<float> row0 = download_floats(c.tied_embeddings ? model.w_->embed : model.w_->lm_head, model.dtype(), 0, H);
    s.base_row0.upload(row0.data(), row0.size() * sizeof(float));
  }

  allocate_state();
  // The engine's copies: adapters (B premultiplied by the scale: B is 0 at the start) and rows.
  // A failure part way leaves the model as it was.
  try {
    size_t next = 0;
    for (const LoraSitePlan& site : plan_lora_sites(c, lo)) {
      const Param& A = *s.host[next];
      const Param& B = *s.host[next + 1];
      model.add_lora(site.layer, site.target, A.value.data(), site.in, B.value.data(), site.out, lo.rank, site.scale);
      next += 2;
    }
    if (!s.flags.empty())
      model.set_token_rows(s.flags, s.host[size_t(s.rf_embed)]->value.data(), s.host[size_t(s.rf_head)]->value.data());
    params_changed();  // uploads values, zero gradients and moments
  } catch (...) {
    model.clear_adapters();
    throw;
  }
}

DeviceTrainer::~DeviceTrainer() = default;

std::vector<Param*> DeviceTrainer::params() {
  std::vector<Param*> out;
  for (auto& p : impl_->host) out.push_back(p.get());
  return out;
}

size_t DeviceTrainer::trace_bytes() const {
  const DeviceTrace& t = impl_->trace;
  size_t n = t.x_final.bytes();
  for (const DeviceLayerTrace& lt : t.layers) {
    for (const Buffer* b : {&lt.x_in, &lt.x_mid, &lt.qkv, &lt.att, &lt.mlp, &lt.lse}) n += b->bytes();
    for (const Buffer& u : lt.lora_u) n += u.bytes();
  }
  return n;
}

long DeviceTrainer::trainable_count() const { return impl_->total; }

void DeviceTrainer::download() {
  Impl& s = *impl_;
  check(cudaSetDevice(model_.device()), "cudaSetDevice");
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(model_.stream_)), "trainer (download)");
  for (size_t i = 0; i < s.host.size(); ++i) {
    Param& p = *s.host[i];
    const size_t bytes = size_t(p.numel()) * sizeof(float);
    const long off = s.offset[i];
    check(cudaMemcpy(p.value.data(), s.value.get() + off, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (value)");
    check(cudaMemcpy(p.grad.data(), s.grad.get() + off, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (grad)");
    check(cudaMemcpy(p.m.data(), s.m1.get() + off, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (m)");
    check(cudaMemcpy(p.v.data(), s.m2.get() + off, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (v)");
  }
}

// Host values, gradients and moments to the device, then the engine's copies of the adapters.
void DeviceTrainer::params_changed() {
  Impl& s = *impl_;
  check(cudaSetDevice(model_.device()), "cudaSetDevice");
  const cudaStream_t st = static_cast<cudaStream_t>(model_.stream_);
  check(cudaStreamSynchronize(st), "trainer (upload)");
  for (size_t i = 0; i < s.host.size(); ++i) {
    Param& p = *s.host[i];
    const size_t n = size_t(p.numel());
    if (p.value.size() != n || p.grad.size() != n || p.m.size() != n || p.v.size() != n)
      throw std::invalid_argument(p.name + ": expected " + std::to_string(n) + " values in each of value, grad, m and v");
    const long off = s.offset[i];
    check(cudaMemcpy(s.value.get() + off, p.value.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy (value)");
    check(cudaMemcpy(s.grad.get() + off, p.grad.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy (grad)");
    check(cudaMemcpy(s.m1.get() + off, p.m.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy (m)");
    check(cudaMemcpy(s.m2.get() + off, p.v.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy (v)");
  }
  sync_engine();
}

LossTerms DeviceTrainer::step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                              const std::vector<LossRow>& rows, const LossOptions& lopt, const std::atomic<int>* cancel) {
  DeviceModel& m = model_;
  check(cudaSetDevice(m.device()), "cudaSetDevice");
  const ModelConfig& c = m.config();
  const cudaStream_t st = static_cast<cudaStream_t>(m.stream_);
  GemmContext& gemm = *m.gemm_;
  Impl& s = *impl_;
  const DeviceWeights& w = *m.w_;
  const long H = c.hidden, QKV = c.qkv_dim(), Q = c.q_dim(), hd = c.head_dim, V = c.vocab;
  const long I = c.intermediate, MLP_IN = c.act == Activation::silu ? 2 * I : I;
  const DType dtype = m.dtype();
  const bool bf16 = dtype == DType::bf16;
  const std::vector<int>& flags = s.flags;

  long R = 0, Rref = 0;
  for (const Sequence& q : batch) R += q.n_tokens;
  for (const Sequence& q : reference) Rref += q.n_tokens;
  const bool full = options_.mode == TrainMode::full;
  check_loss_rows(rows, R, Rref, flags, c.vocab, full);
  if (full)
    for (const LossRow& r : rows)
      if (r.kind != LossRow::ce)
        throw std::invalid_argument("full fine-tuning on the GPU trains cross-entropy rows (the lm objective); red-flag rows need LoRA");

  // Without parameter gradients the step puts the gradients accumulated so far back afterwards,
  // also when it throws.
  struct GradGuard {
    Impl* s = nullptr;
    cudaStream_t st = nullptr;
    ~GradGuard() {
      if (!s) return;
      cudaMemcpyAsync(s->grad.get(), s->saved_grad.get(), size_t(s->total) * sizeof(float), cudaMemcpyDeviceToDevice, st);
      cudaStreamSynchronize(st);
    }
  } grad_guard;
  if (!lopt.param_grads) {
    floats(s.saved_grad, s.total);
    check(cudaMemcpyAsync(s.saved_grad.get(), s.grad.get(), size_t(s.total) * sizeof(float), cudaMemcpyDeviceToDevice, st),
          "cudaMemcpyAsync (save gradients)");
    grad_guard.s = &s;
    grad_guard.st = st;
  }

  // A forward of fresh sequences, kept in `owned` (their KV blocks return to the pool when they go).
  auto forward = [&](const std::vector<Sequence>& seqs, float* out, DeviceTrace* trace,
                     std::vector<std::shared_ptr<DeviceSequence>>& owned) {
    std::vector<DeviceItem> items;
    long rows_n = 0;
    for (const Sequence& q : seqs) {
      owned.push_back(m.new_sequence());
      items.push_back({owned.back().get(), q.tokens, q.n_tokens, q.embed_delta});
      rows_n += q.n_tokens;
    }
    const float* hidden = m.run(items, LogitsMode::hidden, cancel, nullptr, trace);
    check(cudaMemcpyAsync(out, hidden, size_t(rows_n * H) * sizeof(float), cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync (h)");
  };

  // The step's forwards in training's mixed precision (DeviceModel::bf16_mlp_), the model back
  // to inference's after it, however the step ends.
  struct Bf16MlpGuard {
    DeviceModel& m;
    explicit Bf16MlpGuard(DeviceModel& model) : m(model) { m.bf16_mlp_ = true; }
    ~Bf16MlpGuard() { m.bf16_mlp_ = false; }
  } bf16_mlp_guard(m);

  // Profiling: the device time from each mark to the next counts as the marked phase.
  s.clock.reset();
  auto phase = [&](TrainPhase p) { s.clock.mark(p, st); };
  s.trace.clock = &s.clock;  // the trained forward marks its own phases

  // 1. Reference forward first: the base model (adapter and flag rows off), hidden states only;
  //    its sequences go at once. (First, so that the trained batch's forward plan and keys and
  //    values are the model's last: the backward's recomputation reads them.)
  bool any_kl = false;
  for (const LossRow& r : rows) any_kl |= r.kind == LossRow::benign_kl || r.kind == LossRow::after_kl;
  float* h_ref = nullptr;
  if (any_kl) {
    phase(kReferenceForward);
    h_ref = floats(s.h_ref, Rref * H);
    m.set_adapter_enabled(false);
    try {
      std::vector<std::shared_ptr<DeviceSequence>> ref_seqs;
      forward(reference, h_ref, nullptr, ref_seqs);
    } catch (...) {
      m.set_adapter_enabled(true);
      throw;
    }
  }
  m.set_adapter_enabled(true);

  // 2. Forward with activations (adapter on, LoRA dropout) -> h [R, H]. With recomputation the
  //    trace keeps each block's input only; the sequences (keys and values) stay for the backward.
  s.trace.dropout = full ? 0.f : options_.lora.dropout;  // as the CPU: no dropout without adapters
  s.trace.dropout_seed = options_.seed * 0x9e3779b97f4a7c15ULL + lopt.dropout_seed;
  s.trace.inputs_only = options_.recompute;
  phase(kForwardOther);
  float* h = floats(s.h, R * H);
  std::vector<std::shared_ptr<DeviceSequence>> trained_seqs;
  forward(batch, h, &s.trace, trained_seqs);

  // 3. Losses -> dL/dh of the scored rows, added into dH [R, H].
  phase(kLoss);
  LossTerms terms;
  terms.tokens = R;
  float* dH = floats(s.dH, R * H);
  check(cudaMemsetAsync(dH, 0, size_t(R * H) * sizeof(float), st), "cudaMemsetAsync (dH)");
  const void* W = c.tied_embeddings ? w.embed.get<void>() : w.lm_head.get<void>();
  float* head_grad = s.rf_head >= 0 ? s.grd(s.rf_head) : nullptr;
  // Full fine-tuning: the LM head's own gradient (the embedding's when tied).
  float* full_head_grad = !full ? nullptr : s.grd(s.full_head >= 0 ? s.full_head : s.full_embed);
  auto scatter_into_dH = [&](const float* src, const std::vector<int32_t>& dst_of_src) {
    const Scatter sc(dst_of_src);
    const int32_t* d_rows = upload_async(s.sc_rows, sc.dst_rows, st);
    const int32_t* d_first = upload_async(s.sc_first, sc.first, st);
    const int32_t* d_index = upload_async(s.sc_index, sc.index, st);
    add_rows_grouped(dH, src, int(H), d_rows, d_first, d_index, int(sc.dst_rows.size()), st);
    check(cudaStreamSynchronize(st), "loss rows");  // the host lists above must outlive the copies
  };
  {
    const SplitRows split = split_loss_rows(rows, flags);
    const std::vector<RfLossRow>& rf_rows = split.rf;
    const std::vector<int32_t>& rf_src = split.rf_src;
    const std::vector<int32_t>& ref_src = split.ref_src;
    const std::vector<int32_t>& ce_src = split.ce_src;
    const std::vector<int32_t>& ce_targets = split.ce_targets;
    if (!rf_rows.empty()) {
      const int n = int(rf_rows.size()), nr = int(ref_src.size());
      const RfLossOptions o = rf_loss_options(lopt, flags);  // no flag trained: token 0's base row (s.base_row0)
      float* hr = floats(s.rows_h, long(n) * H);
      gather_rows(hr, h, upload_async(s.idx_a, rf_src, st), n, int(H), st);
      float* hrr = nullptr;
      if (nr > 0) {
        hrr = floats(s.rows_href, long(nr) * H);
        gather_rows(hrr, h_ref, upload_async(s.idx_b, ref_src, st), nr, int(H), st);
      }
      float* dh_rows = floats(s.dh_rows, long(n) * H);
      const float* w_rf = flags.empty() ? s.base_row0.get() : s.val(s.rf_head);
      float* dw_rf = flags.empty() ? floats(s.dw_scratch, H) : head_grad;
      const RfLossResult res =
          rf_loss(gemm, hr, n, hrr, nr, int(H), W, dtype, int(V), w_rf, rf_rows.data(), o, dh_rows, dw_rf, st, &s.loss_scratch);
      terms.benign = res.benign;
      terms.red_flag = res.red_flag;
      terms.after = res.after;
      terms.n_benign = res.n_benign_rows;
      terms.n_groups = res.n_groups;
      terms.n_after = res.n_after_rows;
      scatter_into_dH(dh_rows, rf_src);
    }
    if (!ce_src.empty()) {
      const int n = int(ce_src.size());
      float* hc = floats(s.rows_h, long(n) * H);
      gather_rows(hc, h, upload_async(s.idx_a, ce_src, st), n, int(H), st);
      float* dh_rows = floats(s.dh_rows, long(n) * H);
      const float weight = lopt.alpha_ce * lopt.grad_scale / float(n);
      const double loss = ce_loss(gemm, hc, n, int(H), W, dtype, int(V), flags.empty() ? nullptr : s.val(s.rf_head), flags,
                                  ce_targets.data(), weight, dh_rows, head_grad, 0, st, full_head_grad, &s.loss_scratch);
      terms.ce = loss / n;
      terms.n_ce = n;
      scatter_into_dH(dh_rows, ce_src);
    }
  }
  terms.total = lopt.alpha_benign * terms.benign + lopt.alpha_rf * terms.red_flag + lopt.alpha_after * terms.after +
                lopt.alpha_ce * terms.ce;
  auto cancelled = [&] {
    if (cancel && cancel->load(std::memory_order_relaxed)) {
      cudaStreamSynchronize(st);
      throw Cancelled();
    }
  };
  cancelled();

  // 4. Backward.
  phase(kBackwardOther);
  float* norm_scratch = floats(s.norm_scratch, std::max(norm_backward_scratch_floats(int(R), int(H)),
                                                       c.qk_norm ? qk_norm_backward_scratch_floats(int(R), int(hd)) : 0L));
  // bf16 models: a product's dy rounded to bf16 (see linear_backward), written by the kernel that
  // makes dy where it can.
  __nv_bfloat16* dy_bf16 =
      bf16 ? static_cast<__nv_bfloat16*>(s.xb.ensure(size_t(R * std::max({QKV, MLP_IN, H})) * sizeof(__nv_bfloat16))) : nullptr;
  // dst (+)= norm'(x) . dout for every row, in one pass (the add in the norm's kernel); the norm's
  // weight and bias gradients when trained (parameter indices pw, pb; -1: frozen). bf16 models:
  // dst as written, rounded into dy_bf16 too: the operand of the next product's backward (the o
  // projection's, or the layer below's down projection's), without a conversion pass over dst.
  auto norm_backward = [&](const DNorm& nm, int pw, int pb, const float* x, const float* dout, float* dst, bool accumulate) {
    float* dw = pw >= 0 ? s.grd(pw) : nullptr;
    float* db = pb >= 0 ? s.grd(pb) : nullptr;
    __nv_bfloat16* dst16 = bf16 ? dy_bf16 : nullptr;
    if (c.norm == NormType::rms)
      rmsnorm_backward_rows(dst, dw, dout, x, nm.w.get(), int(R), int(H), c.norm_eps, norm_scratch, st, accumulate, dst16);
    else
      layernorm_backward_rows(dst, dw, db, dout, x, nm.w.get(), int(R), int(H), c.norm_eps, norm_scratch, st, accumulate, dst16);
  };
  float* dx = floats(s.dx, R * H);
  norm_backward(w.final_norm, s.full_final_w, s.full_final_b, s.trace.x_final.get(), dH, dx, false);
  float* dxn = floats(s.dxn, R * H);
  float* dact = floats(s.dact, R * I);
  float* dmlp = floats(s.dmlp, R * MLP_IN);
  float* datt = floats(s.datt, R * Q);
  float* dqkv = floats(s.dqkv, R * QKV);

  // Per row its token, sequence and rope angles, per sequence its first row and length: the
  // trained forward's plan (the model's last: the reference forward ran before it), on the device.
  const ForwardPlan& plan = m.s_->plan;
  const int32_t* d_tokens = plan.tokens;
  const float* d_cos = plan.cos;
  const float* d_sin = plan.sin;
  // Fresh sequences: each one's first row and its new rows are its start and its length.
  AttentionRows arows{plan.row_offsets, plan.n_new, plan.row_seq, int(batch.size()), int(R), c.n_heads, c.n_kv_heads, int(hd),
                      c.sliding_window};
  // bf16 weights: the forward's attention ran on the tensor cores, and so does its backward.
  const bool tc = m.tc_attention();
  float* attn_scratch =
      floats(s.attn_scratch, tc ? attention_backward_tc_scratch(arows) : attention_backward_scratch(arows));
  const float scale = 1.0f / std::sqrt(float(hd));

  // Scratch the backward can borrow from the forward's: without recomputation the model's buffers
  // of the same shapes lie idle until the next step (with it, the block's forward reuses them).
  DeviceScratch& fs = *m.s_;
  const bool borrow = !options_.recompute;
  Buffer& xn_buf = borrow ? fs.xn : s.xn;          // [R, H]
  Buffer& act_buf = borrow ? fs.act : s.act;       // [R, I]
  Buffer& wide_buf = borrow ? fs.mlp : s.wide_a;   // [R, QKV]
  Buffer& xa_buf = borrow ? fs.lora_x : s.xa;      // [R, in] an adapter's dropped-out input

  // bf16 models: a projection's input in bf16, written by the kernel that makes it (a recomputed
  // norm or activation): dW's operand in full fine-tuning, and what an adapter's dA reads, as its
  // forward's down product read it (DeviceModel::reads_f32_input). The f32 input is made only
  // where something reads it (f32_input below).
  __nv_bfloat16* xw = bf16 ? static_cast<__nv_bfloat16*>(s.xw.ensure(size_t(R * std::max({H, Q, I})) * sizeof(__nv_bfloat16)))
                           : nullptr;
  // Whether projection (l, index)'s backward reads its input in f32: f32 models, and an adapter
  // whose rank the fused kernels do not take (its forward read f32 x, and its dA does too).
  auto f32_input = [&](int l, int index) {
    if (!bf16) return true;
    for (const DLinear::Lora& a : m.linear(l, index).lora)
      if (a.rank > kLoraFusedMaxRank) return true;
    return false;
  };

  // A projection's input as its backward reads it: in f32 (for dA, and dW of f32 models) and in
  // bf16 (dW of bf16 models). Either may be absent; it is made on first use: f32 widened from
  // bf16 into wide, bf16 rounded from f32 into xw. Nothing is made that no product reads (a
  // frozen projection without adapters reads neither).
  struct Input {
    const float* f32;
    const __nv_bfloat16* bf16;
    Buffer* wide;
  };
  // bf16 models: an adapter's dB and du read dy in bf16, the dX product's operand (as autocast's
  // LoRA backward does), with bf16 copies of u and of its scaled B: half the bytes of dy's f32
  // slice, read twice. Where a bf16 operand's rows (dy's slice, u's and B's rank columns) would
  // sit under 16 bytes aligned, dy is read in f32 (cuBLASLt's bf16 tensor-core kernels want 16).
  auto lora_dy_bf16 = [&](const DLinear::Lora& lora, long out) {
    return bf16 && lora.offset % 8 == 0 && out % 8 == 0 && lora.rank % 8 == 0;
  };
  // Whether projection (l, index)'s backward reads dy in f32 (if not, the kernel that makes dy
  // may write its bf16 copy alone): f32 models, full fine-tuning (dW and a bias's column sums),
  // and an adapter's slice lora_dy_bf16 refuses.
  auto f32_dy = [&](int l, int index) {
    if (!bf16 || full) return true;
    const DLinear& lin = m.linear(l, index);
    for (const DLinear::Lora& a : lin.lora)
      if (!lora_dy_bf16(a, lin.out)) return true;
    return false;
  };
  // din = dy W for projection (l, index), plus its adapters' input gradients and their dA, dB.
  // bf16 models: dy16 is dy rounded to bf16 when the kernel that wrote dy wrote it too (else null:
  // rounded here into dy_bf16); dy may then be null where f32_dy says nothing reads it. defer_up
  // (optional): a lone adapter's input gradient, if the SwiGLU backward can add it (DoutLora), is
  // left to it instead of read and written into din here.
  auto linear_backward = [&](int l, int index, Input x, long in, const float* dy, const __nv_bfloat16* dy16, long out, float* din,
                             const DeviceLayerTrace& lt, DoutLora* defer_up = nullptr) {
    phase(kBackwardLinear);
    const DLinear& lin = m.linear(l, index);
    auto x_f32 = [&]() -> const float* {
      if (!x.f32) {
        float* w = floats(*x.wide, R * in);
        widen_bf16(w, reinterpret_cast<const uint16_t*>(x.bf16), R * in, st);
        x.f32 = w;
      }
      return x.f32;
    };
    const void* dy_in = dy;
    if (bf16) {
      if (!dy16) {
        f32_to_bf16(dy_bf16, dy, R * out, st);
        dy16 = dy_bf16;
      }
      dy_in = dy16;
    }
    matmul_nn(gemm, din, dy_in, dtype, lin.w.get<void>(), dtype, int(R), int(in), int(out), 0.f, st);
    if (full) {  // dW += dy^T x, db += the column sums of dy
      const Impl::FullLayer& f = s.full[size_t(l)];
      if (bf16) {  // mixed precision, as autocast does: bf16 dy and x, the products summed in f32
        if (!x.bf16) {
          f32_to_bf16(xw, x.f32, R * in, st);
          x.bf16 = xw;
        }
        matmul_tn(gemm, s.grd(f.w[index]), dy16, DType::bf16, x.bf16, DType::bf16, int(out), int(in), int(R), 1.f, 1.f, st);
      } else {
        matmul_tn(gemm, s.grd(f.w[index]), dy, DType::f32, x_f32(), DType::f32, int(out), int(in), int(R), 1.f, 1.f, st);
      }
      if (f.b[index] >= 0)
        add_column_sums(s.grd(f.b[index]), dy, int(R), int(out), floats(s.colsum, column_sum_scratch_floats(int(R), int(out))), st);
    }
    size_t ui = 0;  // this projection's first traced u: after the adapters of the projections before it
    for (int i = 0; i < index; ++i) ui += m.linear(l, i).lora.size();
    const std::vector<int>& ps = s.lora_params[size_t(l) * 4 + size_t(index)];
    if (!lin.lora.empty()) phase(kBackwardLora);
    // din += each adapter's (masked) du A. With every adapter's rank within the fused kernel's, one
    // pass over din after the loop takes them all (q, k and v of the fused projection; gate and
    // up), in order, the same bits as one pass each; each du is kept until then.
    long du_cols = 0;
    bool up_fused = true;
    for (const DLinear::Lora& lora : lin.lora) du_cols += lora.rank, up_fused &= lora.rank <= kLoraFusedMaxRank;
    float* du_all = floats(s.du, R * du_cols);
    std::vector<LoraUpTerm> up_terms;
    for (size_t a = 0, du_col = 0; a < lin.lora.size(); du_col += size_t(lin.lora[a].rank), ++a) {
      const DLinear::Lora& lora = lin.lora[a];
      const int r = lora.rank, o = lora.out;
      const float p = s.trace.dropout;
      const int adapter_id = index * 16 + int(a);
      // Ranks the fused kernels take (any dropout; p = 0: no mask): they apply the mask as they
      // read x, so the dropped-out input [R, in] and the product du A [R, in] are never written;
      // dA reads the trace's bf16 x as it is (no widened f32 copy written and read back).
      const bool fused_da = r <= kLoraFusedMaxRank;
      const float* u = lt.lora_u[ui + a].get();
      float* du = du_all + R * long(du_col);  // [R, r]
      if (lora_dy_bf16(lora, out)) {
        const long u_len = (R * r + 127) / 128 * 128;  // B's copy at a 256-byte boundary
        __nv_bfloat16* u16 = static_cast<__nv_bfloat16*>(s.lora16.ensure(size_t(u_len + long(o) * r) * sizeof(__nv_bfloat16)));
        __nv_bfloat16* b16 = u16 + u_len;
        f32_to_bf16(u16, u, R * r, st);
        f32_to_bf16(b16, lora.B.get(), long(o) * r, st);
        const __nv_bfloat16* dys16 = dy16 + lora.offset;  // its slice of dy in bf16
        matmul_tn(gemm, s.grd(ps[a] + 1), dys16, DType::bf16, u16, DType::bf16, o, r, int(R), lora.scale, 1.f, st,
                  {out, 0, 0});  // dB
        matmul_nn(gemm, du, dys16, DType::bf16, b16, DType::bf16, int(R), r, o, 0.f, st, {out, 0, 0});  // du = dy B*
      } else {
        const float* dys = dy + lora.offset;  // the adapter's slice of dy: [R, o], rows out apart
        matmul_tn(gemm, s.grd(ps[a] + 1), dys, DType::f32, u, DType::f32, o, r, int(R), lora.scale, 1.f, st, {out, 0, 0});  // dB
        matmul_nn(gemm, du, dys, DType::f32, lora.B.get<void>(), DType::f32, int(R), r, o, 0.f, st, {out, 0, 0});  // du = dy B*
      }
      if (fused_da) {  // dA += du^T dropout(x)
        float* parts = floats(s.da_parts, lora_da_scratch_floats(int(R), int(in), r));
        if (x.f32 || !x.bf16)
          lora_da_dropout(s.grd(ps[a]), du, x_f32(), int(R), int(in), r, s.trace.dropout_seed, l, adapter_id, p, parts, st);
        else
          lora_da_dropout(s.grd(ps[a]), du, x.bf16, int(R), int(in), r, s.trace.dropout_seed, l, adapter_id, p, parts, st);
      } else {
        const float* xa = x_f32();
        if (p > 0.f) {
          float* b = floats(xa_buf, R * in);
          dropout_rows(b, xa, int(R), int(in), s.trace.dropout_seed, l, adapter_id, p, st);
          xa = b;
        }
        matmul_tn(gemm, s.grd(ps[a]), du, DType::f32, xa, DType::f32, r, int(in), int(R), 1.f, 1.f, st);  // dA
      }
      if (defer_up && lin.lora.size() == 1 && r <= kDoutLoraMaxRank) {
        *defer_up = {du, lora.A.get(), r, adapter_id, s.trace.dropout_seed, l, p};
      } else if (up_fused) {  // din += mask (du A), after the loop
        up_terms.push_back({du, lora.A.get(), r, adapter_id});
      } else if (p > 0.f && r <= kLoraFusedMaxRank) {  // a projection with a rank past it: this one alone
        lora_up_dropout_add(din, du, lora.A.get(), int(R), int(in), r, s.trace.dropout_seed, l, adapter_id, p, st);
      } else if (p > 0.f) {
        float* t = floats(s.tmp_in, R * in);
        matmul_nn(gemm, t, du, DType::f32, lora.A.get<void>(), DType::f32, int(R), int(in), r, 0.f, st);
        dropout_add(din, t, int(R), int(in), s.trace.dropout_seed, l, adapter_id, p, st);
      } else {
        matmul_nn(gemm, din, du, DType::f32, lora.A.get<void>(), DType::f32, int(R), int(in), r, 1.f, st);
      }
    }
    if (!up_terms.empty())
      lora_up_dropout_add(din, up_terms.data(), int(up_terms.size()), int(R), int(in), s.trace.dropout_seed, l, s.trace.dropout, st);
  };

  // What the trace leaves out, recomputed by the forward's kernels from the forward's inputs (so
  // the same bits as the forward's): a norm's output, the MLP's activation.
  float* xn = floats(xn_buf, R * H);
  float* act = floats(act_buf, R * I);

  DeviceTrace recompute_trace;  // the same dropout masks
  recompute_trace.dropout = s.trace.dropout;
  recompute_trace.dropout_seed = s.trace.dropout_seed;
  for (int l = c.n_layers - 1; l >= 0; --l) {
    cancelled();
    if (options_.recompute) {
      phase(kBackwardRecompute);
      // The block again from its input, on the cache the forward filled: the same kernels on the
      // same inputs, so the same bits as the trace the forward would have kept; not its output
      // (no x_out), which the backward does not read: the mlp_out product is skipped.
      m.layer_forward(l, s.trace.layers[size_t(l)].x_in.get(), nullptr, &s.recomputed, &recompute_trace, false);
    }
    const DeviceLayerTrace& lt = options_.recompute ? s.recomputed : s.trace.layers[size_t(l)];
    const float* x_in = s.trace.layers[size_t(l)].x_in.get();  // the block's input: the forward's trace keeps it
    const DLayer& L = w.layers[size_t(l)];
    const Impl::FullLayer* fl = full ? &s.full[size_t(l)] : nullptr;
    // MLP: x_out = x_mid + mlp_out(act(mlp_in(norm(x_mid)))). The activation and its backward
    // read the trace's mlp as kept (bf16: widened in registers, the same bits as widened first).
    // mlp_in's dy: in f32 only where something reads it (f32_dy; gelu_new's backward writes it).
    float* dmlp_f32 = c.act != Activation::silu || f32_dy(l, 2) ? dmlp : nullptr;
    // The gate|up adapters the forward left to the SwiGLU (swiglu_lora_applies): the trace keeps
    // the product before their terms, which the activation and its backward add again as they
    // read it, from the trace's u, at the forward's bits.
    SwigluLora glu_up[2];
    const DLinear& mlp_in = m.linear(l, 2);
    if (c.act == Activation::silu && m.adapter_enabled_ && !mlp_in.lora.empty() && m.swiglu_lora_applies(mlp_in)) {
      const size_t ui = m.linear(l, 0).lora.size() + m.linear(l, 1).lora.size();  // mlp_in's first u
      for (size_t a = 0; a < mlp_in.lora.size(); ++a) {
        const DLinear::Lora& lora = mlp_in.lora[a];
        glu_up[lora.offset == 0 ? 0 : 1] = {lt.lora_u[ui + a].get(), lora.B.get(), lora.rank};
      }
    }
    auto mlp_backward = [&](const auto* mlp) {
      phase(kBackwardOther);
      const bool glu = c.act == Activation::silu;
      float* act_f32 = !glu || f32_input(l, 3) ? act : nullptr;  // gelu_new writes f32 always
      m.activation_rows(mlp, act_f32, R, xw, glu_up);
      // The down projection's adapter's input gradient: added by the SwiGLU backward as it reads
      // dact (the same bits), not by a pass of its own over dact.
      DoutLora down_lora;
      // dy: dx, rounded to bf16 by the norm backward that wrote it (bf16 models; dy_bf16 is null
      // otherwise).
      linear_backward(l, 3, {act_f32, xw, &act_buf}, I, dx, dy_bf16, H, dact, lt, glu ? &down_lora : nullptr);
      // dmlp, and in bf16 models dmlp rounded: mlp_in's dy in both forms, from one kernel.
      phase(kBackwardOther);
      if (glu) swiglu_backward_rows(dmlp_f32, dact, mlp, int(R), int(I), st, dy_bf16, down_lora, glu_up[0], glu_up[1]);
      else gelu_new_backward(dmlp, dact, mlp, R * I, st, dy_bf16);
    };
    if (bf16) mlp_backward(lt.mlp.get<__nv_bfloat16>());
    else mlp_backward(lt.mlp.get<float>());
    float* xn_mlp = f32_input(l, 2) ? xn : nullptr;
    m.norm_rows(L.mlp_norm, lt.x_mid.get(), xn_mlp, R, xw);
    linear_backward(l, 2, {xn_mlp, xw, &xn_buf}, H, dmlp_f32, dy_bf16, MLP_IN, dxn, lt);
    phase(kBackwardOther);
    norm_backward(L.mlp_norm, fl ? fl->norm_w[1] : -1, fl ? fl->norm_b[1] : -1, lt.x_mid.get(), dxn, dx, true);
    // Attention: x_mid = x_in + o(attn(rope(qkv(norm(x_in)))))
    // The trace keeps att and qkv in the model's dtype; the tensor-core backward reads bf16 as kept.
    if (bf16) linear_backward(l, 1, {nullptr, lt.att.get<__nv_bfloat16>(), &s.wide_b}, Q, dx, dy_bf16, H, datt, lt);
    else linear_backward(l, 1, {lt.att.get(), nullptr, nullptr}, Q, dx, nullptr, H, datt, lt);
    phase(kBackwardAttention);
    if (tc) {
      attention_backward_tc(dqkv, datt, lt.qkv.get<__nv_bfloat16>(), lt.att.get<__nv_bfloat16>(), lt.lse.get(), arows, plan.max_new,
                            scale, attn_scratch, st);
    } else if (bf16) {  // a head_dim the tensor-core kernels do not take
      float* qkv = floats(wide_buf, R * QKV);
      widen_bf16(qkv, lt.qkv.get<uint16_t>(), R * QKV, st);
      attention_backward(dqkv, datt, qkv, arows, scale, attn_scratch, st);
    } else {
      attention_backward(dqkv, datt, lt.qkv.get(), arows, scale, attn_scratch, st);
    }
    phase(kBackwardOther);
    if (c.rope) rope_backward_rows(dqkv, QKV, int(R), c.n_heads + c.n_kv_heads, int(hd), d_cos, d_sin, st);  // q's heads, then k's
    if (c.qk_norm) {
      const int pq = fl ? fl->norm_w[2] : -1, pk = fl ? fl->norm_w[3] : -1;
      qk_norm_backward_rows(dqkv, QKV, lt.qk_pre.get(), QKV, int(R), c.n_heads, c.n_kv_heads, int(hd), L.q_norm.w.get(),
                            L.k_norm.w.get(), c.norm_eps, pq >= 0 ? s.grd(pq) : nullptr, pk >= 0 ? s.grd(pk) : nullptr,
                            norm_scratch, st);
    }
    float* xn_qkv = f32_input(l, 0) ? xn : nullptr;
    m.norm_rows(L.attn_norm, x_in, xn_qkv, R, xw);
    linear_backward(l, 0, {xn_qkv, xw, &xn_buf}, H, dqkv, nullptr, QKV, dxn, lt);
    phase(kBackwardOther);
    norm_backward(L.attn_norm, fl ? fl->norm_w[0] : -1, fl ? fl->norm_b[0] : -1, x_in, dxn, dx, true);
  }

  // 5. Embeddings: dx is dL/d(input embeddings); the flag rows that were looked up collect theirs.
  phase(kEmbeddings);
  if (s.rf_embed >= 0)
    token_rows_grad(s.grd(s.rf_embed), dx, d_tokens, int(R), int(H), s.flag_ids.get<int32_t>(), int(flags.size()),
                    floats(s.colsum, column_sum_scratch_floats(int(R), int(H))), st);
  if (full) {
    // Every looked-up row collects its rows' gradients (and GPT-2's position rows theirs), in row
    // order per destination.
    auto scatter = [&](float* grad, const std::vector<int32_t>& dst_of_row) {
      const Scatter sc(dst_of_row);
      add_rows_grouped(grad, dx, int(H), upload_async(s.sc_rows, sc.dst_rows, st), upload_async(s.sc_first, sc.first, st),
                       upload_async(s.sc_index, sc.index, st), int(sc.dst_rows.size()), st);
      check(cudaStreamSynchronize(st), "embedding gradients");  // the host lists must outlive the copies
    };
    std::vector<int32_t> tokens, positions;
    for (const Sequence& q : batch)
      for (int t = 0; t < q.n_tokens; ++t) {
        tokens.push_back(int32_t(q.tokens[t]));
        positions.push_back(t);
      }
    scatter(s.grd(s.full_embed), tokens);
    if (s.full_pos >= 0) scatter(s.grd(s.full_pos), positions);
  }
  long r0 = 0;
  for (const Sequence& q : batch) {
    if (q.embed_grad)
      check(cudaMemcpyAsync(q.embed_grad, dx + r0 * H, size_t(q.n_tokens) * H * sizeof(float), cudaMemcpyDeviceToHost, st),
            "cudaMemcpyAsync (embed_grad)");
    r0 += q.n_tokens;
  }
  check(cudaStreamSynchronize(st), "train step");
  s.clock.collect(st);
  return terms;
}

// The engine reads A as it is, B times the adapter's scale, and its own flag-row buffers: copy
// the trainer's values there (after an update or an upload).
void DeviceTrainer::sync_engine() {
  Impl& s = *impl_;
  const cudaStream_t st = static_cast<cudaStream_t>(model_.stream_);
  const ModelConfig& c = model_.config();
  for (int l = 0; l < c.n_layers; ++l)
    for (int index = 0; index < 4; ++index) {
      DLinear& lin = model_.linear(l, index);
      const std::vector<int>& ps = s.lora_params[size_t(l) * 4 + size_t(index)];
      for (size_t a = 0; a < ps.size(); ++a) {
        DLinear::Lora& lora = lin.lora[a];
        check(cudaMemcpyAsync(lora.A.get(), s.val(ps[a]), size_t(lora.rank) * lin.in * sizeof(float), cudaMemcpyDeviceToDevice, st),
              "cudaMemcpyAsync (A)");
        scale_copy(lora.B.get(), s.val(ps[a] + 1), lora.scale, long(lora.out) * lora.rank, st);
      }
    }
  if (!s.flags.empty()) {
    DeviceWeights& w = *model_.w_;
    const size_t bytes = s.flags.size() * size_t(c.hidden) * sizeof(float);
    if (!w.flag_embed.empty())
      check(cudaMemcpyAsync(w.flag_embed.get(), s.val(s.rf_embed), bytes, cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync (rows)");
    if (!w.flag_head.empty())
      check(cudaMemcpyAsync(w.flag_head.get(), s.val(s.rf_head), bytes, cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync (rows)");
  }
  if (options_.mode == TrainMode::full) {
    // The engine's tensors from the f32 masters: weights in the engine's dtype (bf16: rounded as
    // the CPU rounds its packs), vectors as they are.
    DeviceWeights& w = *model_.w_;
    auto write = [&](Buffer& dst, int p, DType dtype) {
      if (p < 0) return;
      const long n = s.host[size_t(p)]->numel();
      if (dtype == DType::bf16) f32_to_bf16(dst.get<__nv_bfloat16>(), s.val(p), n, st);
      else check(cudaMemcpyAsync(dst.get(), s.val(p), size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync (weights)");
    };
    for (int l = 0; l < c.n_layers; ++l) {
      const Impl::FullLayer& f = s.full[size_t(l)];
      for (int i = 0; i < 4; ++i) {
        DLinear& lin = model_.linear(l, i);
        write(lin.w, f.w[i], model_.dtype());
        write(lin.bias, f.b[i], DType::f32);
      }
      for (int j = 0; j < 4; ++j) write(w.layers[size_t(l)].norm(j).w, f.norm_w[j], DType::f32);
      for (int j = 0; j < 2; ++j) write(w.layers[size_t(l)].norm(j).b, f.norm_b[j], DType::f32);
    }
    write(w.final_norm.w, s.full_final_w, DType::f32);
    write(w.final_norm.b, s.full_final_b, DType::f32);
    write(w.embed, s.full_embed, model_.dtype());
    write(w.lm_head, s.full_head, model_.dtype());
    write(w.pos_embed, s.full_pos, DType::f32);
  }
  check(cudaStreamSynchronize(st), "trainer (engine copies)");
}

double DeviceTrainer::optimizer_step(const AdamWOptions& o) {
  Impl& s = *impl_;
  check(cudaSetDevice(model_.device()), "cudaSetDevice");
  const cudaStream_t st = static_cast<cudaStream_t>(model_.stream_);
  s.clock.mark(kOptimizer, st);
  if (collective_) collective_->all_reduce_sum(s.grad.get(), s.total, st);  // every replica: the step's whole gradient
  // The norm, the clip factor and every tensor's update stay on the device (one launch for all
  // tensors); the norm comes back once the step is done.
  double* scratch = static_cast<double*>(s.sum_scratch.ensure(size_t(sum_squares_scratch()) * sizeof(double)));
  sum_squares_async(s.grad.get(), s.total, scratch, st);
  ++adam_step_;
  const double bc1 = 1.0 - std::pow(double(o.beta1), double(adam_step_)), bc2 = 1.0 - std::pow(double(o.beta2), double(adam_step_));
  const AdamWTensorsParams a{o.lr, o.beta1, o.beta2, o.eps, o.lr * o.weight_decay, o.clip_norm, bc1, bc2};
  adamw_tensors(s.value.get(), s.grad.get(), s.m1.get(), s.m2.get(),
                {s.tensor_end.get<long>(), s.tensor_decay.get<int32_t>(), int(s.host.size()), s.total}, a, sum_squares_result(scratch), st);
  sync_engine();  // the engine's copies follow the new values; waits for the stream
  double sum_sq = 0;
  check(cudaMemcpy(&sum_sq, sum_squares_result(scratch), sizeof(double), cudaMemcpyDeviceToHost), "cudaMemcpy (gradient norm)");
  s.clock.collect(st);
  return std::sqrt(sum_sq);
}

void DeviceTrainer::set_profiling(bool on) {
  impl_->clock.set_enabled(on);
  if (on) impl_->clock.reset();  // off keeps the last figures for phase_seconds()
}

std::vector<double> DeviceTrainer::phase_seconds() const { return impl_->clock.seconds(); }

}  // namespace rf::cuda
