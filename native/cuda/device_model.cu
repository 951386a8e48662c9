// The CUDA model engine (see device_model.h). One forward, as Model::run_forward:
//   x = embed(tokens) (+ flag rows, + learned positions)                         [R, H]
//   per layer:  xn = norm(x); qkv = xn Wqkv^T (+ b, + LoRA)                       [R, QKV]
//               rope(q, k); append k, v to the paged cache; att = attention(q)   [R, Q]
//               x += att Wo^T;  xn = norm(x);  x += act(xn Wmlp_in^T) Wmlp_out^T
//   final norm on the rows wanted, then the LM head (the flag rows replaced)     [rows, V]
// R: the new tokens of all sequences; rows: R, or one per sequence. Everything runs on one
// stream; the host waits once, at the end (or per layer when progress is asked for).
#include "cuda/device_model.h"
#include "cuda/device_model_impl.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>

#include "cuda/attention.h"
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "cuda/gemv.h"
#include "cuda/launch.h"
#include "cuda/model_ops.h"
#include "cuda/ops.h"
#include "cuda/paged_cache.h"
#include "cuda/train_ops.h"
#include "model/layout.h"
#include "model/rope.h"

namespace rf::cuda {

namespace {

constexpr int kBlockTokens = DeviceModel::kBlockTokens;
constexpr long kScoreChunk = 256;  // LM-head rows per chunk in token_scores

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// A traced forward's phase, on the trainer's clock when it has one (the profiled step).
void mark(const DeviceTrace* trace, TrainPhase phase, cudaStream_t st) {
  if (trace && trace->clock) trace->clock->mark(phase, st);
}

}  // namespace

// The KV blocks of every layer: per layer, K then V, each [n_blocks][n_kv_heads][block][head_dim]
// (PagedLayer's layout), bf16 for bf16 models and f32 for f32 ones. The block pool's bookkeeping
// is shared by the JavaScript thread (new, reserve, dispose) and the worker running a forward,
// so it takes a lock.
class KvPool {
 public:
  KvPool(const ModelConfig& c, DType dtype, size_t bytes)
      : layers_(c.n_layers), per_block_(long(c.n_kv_heads) * kBlockTokens * c.head_dim), elem_(elem_bytes(dtype)),
        bf16_(dtype == DType::bf16), blocks_(int(bytes / block_bytes_of(c, dtype)), kBlockTokens) {
    if (blocks_.capacity() == 0)
      throw std::invalid_argument("a KV cache of " + std::to_string(bytes) + " bytes (kvCacheBytes) holds no block of " +
                                  std::to_string(kBlockTokens) + " positions (" + std::to_string(block_bytes_of(c, dtype)) +
                                  " bytes)");
    mem_.ensure(size_t(blocks_.capacity()) * block_bytes(), "the KV cache (kvCacheBytes)");
  }
  static size_t elem_bytes(DType dtype) { return dtype == DType::bf16 ? 2 : 4; }
  static size_t block_bytes_of(const ModelConfig& c, DType dtype) {
    return size_t(2) * c.n_layers * c.n_kv_heads * kBlockTokens * c.head_dim * elem_bytes(dtype);
  }
  size_t block_bytes() const { return size_t(2) * layers_ * per_block_ * elem_; }
  bool bf16() const { return bf16_; }
  void* k(int layer) const { return mem_.get<char>() + size_t(2 * layer) * blocks_.capacity() * per_block_ * elem_; }
  void* v(int layer) const { return mem_.get<char>() + size_t(2 * layer + 1) * blocks_.capacity() * per_block_ * elem_; }
  bool grow(BlockTable& t, long tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    return blocks_.grow(t, tokens);
  }
  void shrink(BlockTable& t, long tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    blocks_.shrink(t, tokens);
  }
  int free_blocks() {
    std::lock_guard<std::mutex> lock(mu_);
    return blocks_.free_count();
  }

 private:
  int layers_;
  long per_block_;
  size_t elem_;
  bool bf16_;
  std::mutex mu_;
  BlockPool blocks_;
  Buffer mem_;
};

DeviceSequence::~DeviceSequence() { pool_->shrink(table_, 0); }
long DeviceSequence::capacity() const { return long(table_.size()) * kBlockTokens; }
size_t DeviceSequence::bytes() const { return table_.size() * pool_->block_bytes(); }
void DeviceSequence::reserve(long n) {
  if (!pool_->grow(table_, n))
    throw std::runtime_error("the GPU KV pool is full: " + std::to_string(n) + " positions need " +
                             std::to_string(BlockPool::blocks_for(n, kBlockTokens) - long(table_.size())) +
                             " more blocks, " + std::to_string(pool_->free_blocks()) + " are free");
}
void DeviceSequence::truncate(long n) {
  if (n < 0 || n > length_) throw std::out_of_range("truncate: length out of range");
  length_ = n;
  pool_->shrink(table_, n);
}

DeviceModel::DeviceModel(const ModelConfig& config, DType dtype, int device)
    : config_(config), dtype_(dtype), device_(device) {
  config_.validate();
  check(cudaSetDevice(device_), "cudaSetDevice");
  // A GPU this build has no code for fails every launch: say so, and what to rebuild, first.
  if (const std::string why = device_support(device_); !why.empty()) throw std::runtime_error(why);
  w_ = std::make_unique<DeviceWeights>();
  w_->layers.resize(config_.n_layers);
  s_ = std::make_unique<DeviceScratch>();
  gemm_ = std::make_unique<GemmContext>();  // may fail (cuBLASLt, its workspace): before the stream, which nothing would free
  graphs_ = std::make_unique<DecodeGraphs>();
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  stream_ = s;
  const char* env = std::getenv("RF_CUDA_GRAPHS");
  graphs_on_ = !(env && std::strcmp(env, "0") == 0);
  const char* gemv = std::getenv("RF_CUDA_GEMV");
  gemv_on_ = !(gemv && std::strcmp(gemv, "0") == 0);
}

DeviceModel::~DeviceModel() {
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(as_stream(stream_));
  graphs_.reset();
  gemm_.reset();
  s_.reset();
  w_.reset();
  pool_.reset();  // the sequences still alive keep the pool's memory until they go
  if (stream_) cudaStreamDestroy(as_stream(stream_));
}

size_t DeviceModel::weight_bytes() const {
  size_t total = w_->embed.bytes() + w_->lm_head.bytes() + w_->pos_embed.bytes() + w_->final_norm.w.bytes() +
                 w_->final_norm.b.bytes();
  for (const DLayer& l : w_->layers) {
    for (const DNorm* n : {&l.attn_norm, &l.mlp_norm, &l.q_norm, &l.k_norm}) total += n->w.bytes() + n->b.bytes();
    for (const DLinear* lin : {&l.qkv, &l.o, &l.mlp_in, &l.mlp_out}) total += lin->w.bytes() + lin->bias.bytes();
  }
  return total;
}

namespace {

// [rows, cols] row-major in the engine's dtype, from the source ([cols, rows] when src_is_kn).
void upload_matrix(Buffer& dst, const void* data, SrcType type, long rows, long cols, bool src_is_kn, DType dtype) {
  const long n = rows * cols;
  auto at = [&](long r, long c) { return src_load(data, type, src_is_kn ? c * rows + r : r * cols + c); };
  if (dtype == DType::f32) {
    std::vector<float> h(static_cast<size_t>(n));
    for (long r = 0; r < rows; ++r)
      for (long c = 0; c < cols; ++c) h[size_t(r * cols + c)] = at(r, c);
    dst.upload(h.data(), h.size() * sizeof(float));
  } else {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (long r = 0; r < rows; ++r)
      for (long c = 0; c < cols; ++c) h[size_t(r * cols + c)] = rf::f32_to_bf16(at(r, c));
    dst.upload(h.data(), h.size() * sizeof(uint16_t));
  }
}

void upload_vector(Buffer& dst, const void* data, SrcType type, long n) {
  std::vector<float> h(static_cast<size_t>(n));
  for (long i = 0; i < n; ++i) h[size_t(i)] = src_load(data, type, i);
  dst.upload(h.data(), h.size() * sizeof(float));
}

}  // namespace

void DeviceModel::load_tensor(const std::string& name, const void* data, SrcType type, const std::vector<long>& shape,
                              bool src_is_kn) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  const long H = config_.hidden;
  DeviceWeights& w = *w_;
  const TensorSlot slot = tensor_slot(config_, name, shape, src_is_kn);  // model/layout.h
  switch (slot.kind) {
    case TensorSlot::embed:
    case TensorSlot::lm_head:
      upload_matrix(slot.kind == TensorSlot::embed ? w.embed : w.lm_head, data, type, slot.rows, H, false, dtype_);
      (slot.kind == TensorSlot::embed ? w.embed_rows : w.head_rows) = slot.rows;
      config_.vocab = int(slot.rows);
      return;
    case TensorSlot::pos_embed:
      return upload_vector(w.pos_embed, data, type, slot.rows * H);
    case TensorSlot::norm_weight:
    case TensorSlot::norm_bias: {
      DNorm& n = slot.layer < 0 ? w.final_norm : w.layers[size_t(slot.layer)].norm(slot.index);
      return upload_vector(slot.kind == TensorSlot::norm_weight ? n.w : n.b, data, type, slot.rows);
    }
    case TensorSlot::linear_weight: {
      DLinear& lin = linear(slot.layer, slot.index);
      upload_matrix(lin.w, data, type, slot.rows, slot.cols, src_is_kn, dtype_);
      lin.out = int(slot.rows);
      lin.in = int(slot.cols);
      return;
    }
    case TensorSlot::linear_bias:
      return upload_vector(linear(slot.layer, slot.index).bias, data, type, slot.rows);
  }
}

bool DeviceModel::tc_attention() const { return dtype_ == DType::bf16 && prefill_attention_tc_supports(config_.head_dim); }

DLinear& DeviceModel::linear(int layer, int index) const {
  DLayer& L = w_->layers[size_t(layer)];
  DLinear* lin[] = {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out};
  return *lin[index];
}

void DeviceModel::check_complete() const {
  const ModelConfig& c = config_;
  const DeviceWeights& w = *w_;
  if (!c.tied_embeddings && !w.embed.empty() && !w.lm_head.empty() && w.embed_rows != w.head_rows)
    throw std::invalid_argument("embed has " + std::to_string(w.embed_rows) + " rows but lm_head has " + std::to_string(w.head_rows));
  check_tensors(c, [&](const std::string& name) {
    const TensorSlot slot = parse_tensor_name(c, name);
    switch (slot.kind) {
      case TensorSlot::embed: return !w.embed.empty();
      case TensorSlot::lm_head: return !w.lm_head.empty();
      case TensorSlot::pos_embed: return !w.pos_embed.empty();
      case TensorSlot::norm_weight:
      case TensorSlot::norm_bias: {
        const DNorm& n = slot.layer < 0 ? w.final_norm : w.layers[size_t(slot.layer)].norm(slot.index);
        return !(slot.kind == TensorSlot::norm_weight ? n.w : n.b).empty();
      }
      case TensorSlot::linear_weight: return !linear(slot.layer, slot.index).w.empty();
      case TensorSlot::linear_bias: return !linear(slot.layer, slot.index).bias.empty();
    }
    return false;
  });
}

void DeviceModel::set_kv_pool_bytes(size_t bytes) {
  if (pool_ && pool_.use_count() > 1)
    throw std::invalid_argument("the KV pool cannot be resized while sequences hold blocks of it");
  pool_.reset();  // freed before the new one is allocated
  kv_pool_bytes_ = bytes;
  // Allocated now, so that a pool the device cannot hold fails here (when a detector is created)
  // rather than at its first request; after a failure the next sequence tries again.
  check(cudaSetDevice(device_), "cudaSetDevice");
  pool_ = std::make_shared<KvPool>(config_, dtype_, kv_pool_bytes_);
}

size_t DeviceModel::kv_bytes_per_position() const { return KvPool::block_bytes_of(config_, dtype_) / kBlockTokens; }

std::shared_ptr<DeviceSequence> DeviceModel::new_sequence() {
  check(cudaSetDevice(device_), "cudaSetDevice");
  if (!pool_) pool_ = std::make_shared<KvPool>(config_, dtype_, kv_pool_bytes_);
  return std::shared_ptr<DeviceSequence>(new DeviceSequence(pool_));
}

void DeviceModel::check_items(const std::vector<DeviceItem>& items) const {
  const ModelConfig& c = config_;
  for (size_t i = 0; i < items.size(); ++i) {
    const DeviceItem& it = items[i];
    if (!it.seq || it.seq->pool_ != pool_) throw std::invalid_argument("a sequence belongs to another model");
    for (size_t j = 0; j < i; ++j)
      if (items[j].seq == it.seq) throw std::invalid_argument("the same sequence is given twice");
    if (it.n_tokens < 0) throw std::invalid_argument("negative token count");
    for (int t = 0; t < it.n_tokens; ++t)
      if (it.tokens[t] >= uint32_t(c.vocab))
        throw std::out_of_range("token id " + std::to_string(it.tokens[t]) + " is outside the vocabulary (size " +
                                std::to_string(c.vocab) + ")");
    if (c.arch == Arch::gpt2 && it.seq->length() + it.n_tokens > c.max_positions)
      throw std::out_of_range("sequence of " + std::to_string(it.seq->length() + it.n_tokens) +
                              " tokens exceeds the model's " + std::to_string(c.max_positions) + " positions");
  }
}

void DeviceModel::plan_forward(const std::vector<DeviceItem>& items) {
  const ModelConfig& c = config_;
  const cudaStream_t st = as_stream(stream_);
  DeviceScratch& s = *s_;
  ForwardPlan& p = s.plan;
  const int n = int(items.size());
  long R = 0;
  for (const DeviceItem& it : items) R += it.n_tokens;
  const long H = c.hidden, hd = c.head_dim;

  // Room in the pool for every new token, before anything runs (a full pool fails here whole).
  for (const DeviceItem& it : items) it.seq->reserve(it.seq->length() + it.n_tokens);

  // Per-row and per-sequence tables on the host.
  std::vector<int32_t> tokens, positions, row_seq, row_pos, tables, table_offsets, lengths, row_offsets, n_new, last_rows;
  tokens.reserve(size_t(R));
  int max_new = 0, max_length = 0;
  bool all_one = true;
  for (int i = 0; i < n; ++i) {
    const DeviceItem& it = items[size_t(i)];
    const long L0 = it.seq->length();
    row_offsets.push_back(int32_t(tokens.size()));
    for (int t = 0; t < it.n_tokens; ++t) {
      tokens.push_back(int32_t(it.tokens[t]));
      positions.push_back(int32_t(L0 + t));
      row_seq.push_back(i);
      row_pos.push_back(int32_t(L0 + t));
    }
    if (it.n_tokens > 0) last_rows.push_back(int32_t(tokens.size() - 1));
    else last_rows.push_back(std::max(0, int32_t(tokens.size()) - 1));  // no new token: no logits row of its own
    table_offsets.push_back(int32_t(tables.size()));
    tables.insert(tables.end(), it.seq->table_.begin(), it.seq->table_.end());
    lengths.push_back(int32_t(L0 + it.n_tokens));
    n_new.push_back(it.n_tokens);
    max_new = std::max(max_new, it.n_tokens);
    max_length = std::max(max_length, int(L0 + it.n_tokens));
    all_one &= it.n_tokens == 1;
  }
  // Rotary tables per new row, computed as the CPU does (every rope variant, the dynamic NTK
  // base from the sequence's last position).
  std::vector<float> cos, sin;
  if (c.rope) {
    cos.resize(size_t(R * hd / 2));
    sin.resize(size_t(R * hd / 2));
    long r = 0;
    for (const DeviceItem& it : items) {
      const std::vector<double> inv_freq = rope_inv_freq(c, it.seq->length() + it.n_tokens - 1);
      for (int t = 0; t < it.n_tokens; ++t, ++r)
        rope_angles(inv_freq, it.seq->length() + t, cos.data() + r * hd / 2, sin.data() + r * hd / 2);
    }
  }
  std::vector<float> delta;
  for (size_t i = 0, r = 0; i < items.size(); r += size_t(items[i].n_tokens), ++i) {
    if (!items[i].embed_delta) continue;
    if (delta.empty()) delta.assign(size_t(R * H), 0.f);
    std::memcpy(delta.data() + r * H, items[i].embed_delta, size_t(items[i].n_tokens) * H * sizeof(float));
  }

  // Every table in one staging array and one upload (a copy from pageable memory waits for the
  // stream anyway; fifteen of them cost a decode step more than the copy itself).
  std::vector<uint32_t>& host = s.plan_host;
  host.clear();
  const auto put = [&host](const void* data, size_t n) {
    const size_t at = host.size();
    host.resize(at + (n + 15) / 16 * 16);  // each table on a 64-byte boundary
    if (n) std::memcpy(host.data() + at, data, n * sizeof(uint32_t));
    return at;
  };
  // The block tables go last: their length changes as sequences grow or a batch's members change
  // at the same size, and a table placed after them would move, while a decode graph captured
  // earlier keeps reading it where it was (graph_signature hashes every table's place as well).
  const size_t o_tokens = put(tokens.data(), tokens.size()), o_positions = put(positions.data(), positions.size()),
               o_row_seq = put(row_seq.data(), row_seq.size()), o_row_pos = put(row_pos.data(), row_pos.size()),
               o_table_offsets = put(table_offsets.data(), table_offsets.size()),
               o_lengths = put(lengths.data(), lengths.size()), o_row_offsets = put(row_offsets.data(), row_offsets.size()),
               o_n_new = put(n_new.data(), n_new.size()), o_last_rows = put(last_rows.data(), last_rows.size()),
               o_cos = put(cos.data(), cos.size()), o_sin = put(sin.data(), sin.size()), o_delta = put(delta.data(), delta.size()),
               o_tables = put(tables.data(), tables.size());
  // Grown by doubling: the tables grow a little every 16 tokens, and a new buffer would retire
  // the decode graphs that read the old one.
  const size_t bytes = std::max<size_t>(1, host.size()) * sizeof(uint32_t);
  if (bytes > s.plan_dev.bytes()) s.plan_dev.ensure(std::max(bytes, 2 * s.plan_dev.bytes()));
  check(cudaMemcpyAsync(s.plan_dev.get(), host.data(), host.size() * sizeof(uint32_t), cudaMemcpyHostToDevice, st),
        "cudaMemcpyAsync (plan)");
  const uint32_t* dev = s.plan_dev.get<uint32_t>();
  const auto ints = [dev](size_t at) { return reinterpret_cast<const int32_t*>(dev + at); };
  const auto floats = [dev](size_t at) { return reinterpret_cast<const float*>(dev + at); };

  p.R = R;
  p.n = n;
  p.max_new = max_new;
  p.max_length = max_length;
  // Decode attention's split grid covers a power-of-two number of 256-key splits (the kernels
  // skip splits past a sequence's end), so a decode graph serves every length up to it.
  p.attn_length = max_length;
  if (all_one) {
    int splits = 1;
    while (splits * kDecodeSplitKeys < max_length) splits *= 2;
    p.attn_length = splits * kDecodeSplitKeys;
  }
  p.all_one = all_one;
  p.tokens = ints(o_tokens);
  p.positions = ints(o_positions);
  p.row_seq = ints(o_row_seq);
  p.row_pos = ints(o_row_pos);
  p.tables = ints(o_tables);
  p.table_offsets = ints(o_table_offsets);
  p.lengths = ints(o_lengths);
  p.row_offsets = ints(o_row_offsets);
  p.n_new = ints(o_n_new);
  p.last_rows = ints(o_last_rows);
  p.cos = c.rope ? floats(o_cos) : nullptr;
  p.sin = c.rope ? floats(o_sin) : nullptr;
  p.delta = delta.empty() ? nullptr : floats(o_delta);
  if (all_one)
    s.attn.ensure(size_t(std::max(1L, decode_attention_scratch(n, c.n_heads, int(hd), p.attn_length))) * sizeof(float));
}

void DeviceModel::keep_rows(Buffer& b, const float* src, long n) {
  b.ensure(size_t(n) * sizeof(float));
  check(cudaMemcpyAsync(b.get(), src, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, as_stream(stream_)),
        "cudaMemcpyAsync (trace)");
}

void DeviceModel::keep_values(Buffer& b, const float* src, long n) {
  if (dtype_ != DType::bf16) return keep_rows(b, src, n);
  b.ensure(size_t(n) * sizeof(__nv_bfloat16));
  f32_to_bf16(b.get<__nv_bfloat16>(), src, n, as_stream(stream_));
}

void DeviceModel::norm_rows(const DNorm& nm, const float* in, float* out, long rows, __nv_bfloat16* out_bf16) {
  const ModelConfig& c = config_;
  if (c.norm == NormType::rms) rmsnorm_rows(out, in, nm.w.get(), int(rows), c.hidden, c.norm_eps, as_stream(stream_), out_bf16);
  else layernorm_rows(out, in, nm.w.get(), nm.b.get(), int(rows), c.hidden, c.norm_eps, as_stream(stream_), out_bf16);
}

// y = [addend +] x W^T + b, then each LoRA adapter's ((x A^T) (scale B)^T) added on its slice of
// y; addend: null (y written), y itself (in place), or a buffer of y's shape apart from it (the
// product's C apart from its D: a residual stream's next state without a copy); in_bf16:
// x already rounded to bf16 by the kernel that made it (null: rounded here, bf16 weights); in:
// x in f32, null where reads_f32_input says nothing reads it (in_bf16 is then given). Traced,
// the adapters read dropout(x) (PEFT's lora_dropout; adapter id as the CPU's: index * 16 + a)
// and lt keeps u = dropout(x) A^T (its lora_u from *u_next on). y and y16 both null (traced): a
// recomputation that needs the adapters' u alone; no product runs.
void DeviceModel::linear_rows(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows, float* y,
                              const float* addend, int layer, int index, const DeviceTrace* trace, DeviceLayerTrace* lt,
                              size_t* u_next, SwigluLora* glu_up, __nv_bfloat16* y16) {
  if (gemv_applies(lin, in, in_bf16, rows, trace)) {
    if (addend && addend != y) throw std::logic_error("linear_rows: the decode products add in place only");
    return linear_rows_gemv(lin, in, in_bf16, rows, y, addend != nullptr, false);
  }
  DeviceScratch& s = *s_;
  const cudaStream_t st = as_stream(stream_);
  const void* xin = in;
  DType xt = DType::f32;
  if (!in && (dtype_ != DType::bf16 || !in_bf16)) throw std::logic_error("linear_rows: no input");
  if (dtype_ == DType::bf16) {
    if (!in_bf16) f32_to_bf16(s.xb.get<__nv_bfloat16>(), in, rows * lin.in, st);
    xin = in_bf16 ? in_bf16 : s.xb.get<__nv_bfloat16>();
    xt = DType::bf16;
  }
  const bool product = y || y16;
  if (!product && !lt) throw std::logic_error("linear_rows: no output");
  mark(trace, kForwardLinear, st);
  if (y16) {
    if (!glu_up || addend || !lin.bias.empty() || xt != DType::bf16 ||
        (adapter_enabled_ && !lin.lora.empty() && !swiglu_lora_applies(lin)))
      throw std::logic_error("linear_rows: a bf16 y needs bf16 weights, no bias, no accumulation and deferred adapters");
    matmul_bf16(*gemm_, y16, xin, xt, lin.w.get<void>(), dtype_, int(rows), lin.out, lin.in, st);
  } else if (y) {
    matmul(*gemm_, y, xin, xt, lin.w.get<void>(), dtype_, int(rows), lin.out, lin.in, lin.bias.empty() ? nullptr : lin.bias.get(),
           addend ? 1.f : 0.f, st, {}, addend);
  }
  if (!adapter_enabled_ || lin.lora.empty()) {
    mark(trace, kForwardOther, st);
    return;
  }
  mark(trace, kForwardLora, st);
  // The gate|up projection of a SwiGLU block, every adapter on one half with a rank swiglu_rows
  // takes: the up products are left to it (glu_up), which adds them as it reads y, instead of a
  // product's read and write of all of y here (at 16k rows and I = 8192, 2 GB per layer).
  const bool defer_up = glu_up && swiglu_lora_applies(lin);
  if (lora_batched(lin, rows, trace)) {
    // A batched decode step's rows, untraced: the adapters' down products in one launch, their up
    // products in one more (gemv.h), not two cuBLASLt products per adapter of almost no work.
    GemvLora up[kGemvMaxLora];
    const int n = lora_down_all(lin, in, rows, nullptr, up);
    if (defer_up)
      for (int i = 0; i < n; ++i) glu_up[up[i].offset == 0 ? 0 : 1] = {up[i].u, up[i].B, up[i].rank};
    else
      lora_up_rows(up, n, int(rows), y, lin.out, st);
    mark(trace, kForwardOther, st);
    return;
  }
  // Every rank within the fused kernel's: all the adapters' u from one read of x (q, k and v; gate
  // and up), the mask, if any, applied as x is read; bf16 models read the product's own bf16
  // operand (as PEFT under autocast gives lora_A the bf16 activation), so no f32 copy of x need
  // exist. Else each adapter alone, from the f32 x.
  const float p = trace ? trace->dropout : 0.f;
  const uint64_t seed = trace ? trace->dropout_seed : 0;
  bool down_fused = true;
  for (const DLinear::Lora& a : lin.lora) down_fused &= a.rank <= kLoraFusedMaxRank;
  // Each adapter's u [rows, rank]: kept by the trace, or side by side in lora_u.
  long u_cols = 0;
  for (const DLinear::Lora& a : lin.lora) u_cols += a.rank;
  float* u_all = lt ? nullptr : static_cast<float*>(s.lora_u.ensure(size_t(std::max(1L, rows * u_cols)) * sizeof(float)));
  std::vector<float*> us(lin.lora.size());
  std::vector<LoraDownTerm> down_terms;
  for (size_t ai = 0, col = 0; ai < lin.lora.size(); col += size_t(lin.lora[ai].rank), ++ai) {
    const DLinear::Lora& a = lin.lora[ai];
    if (lt) {
      if (lt->lora_u.size() <= *u_next) lt->lora_u.resize(*u_next + 1);
      us[ai] = static_cast<float*>(lt->lora_u[(*u_next)++].ensure(size_t(rows * a.rank) * sizeof(float)));
    } else {
      us[ai] = u_all + rows * long(col);
    }
    if (down_fused) down_terms.push_back({us[ai], a.A.get(), a.rank, index * 16 + int(ai)});
  }
  if (down_fused && xt == DType::bf16)
    lora_down_dropout(down_terms.data(), int(down_terms.size()), static_cast<const __nv_bfloat16*>(xin), int(rows), lin.in, seed,
                      layer, p, st);
  else if (down_fused)
    lora_down_dropout(down_terms.data(), int(down_terms.size()), in, int(rows), lin.in, seed, layer, p, st);
  for (size_t ai = 0; ai < lin.lora.size(); ++ai) {
    const DLinear::Lora& a = lin.lora[ai];
    float* u = us[ai];
    // A projection with a rank past the fused kernel's: u alone, from f32 x (reads_f32_input).
    if (!down_fused && p > 0.f && a.rank <= kLoraFusedMaxRank) {  // the mask applied as x is read: no dropped-out copy
      lora_down_dropout(u, in, a.A.get(), int(rows), lin.in, a.rank, seed, layer, index * 16 + int(ai), p, st);
    } else if (!down_fused) {
      const float* xa = in;
      if (p > 0.f) {
        float* xd = static_cast<float*>(s.lora_x.ensure(size_t(rows * lin.in) * sizeof(float)));
        dropout_rows(xd, in, int(rows), lin.in, seed, layer, index * 16 + int(ai), p, st);
        xa = xd;
      }
      matmul(*gemm_, u, xa, DType::f32, a.A.get<void>(), DType::f32, int(rows), a.rank, lin.in, nullptr, 0.f, st);
    }
    if (!product) continue;
    if (defer_up) {
      glu_up[a.offset == 0 ? 0 : 1] = {u, a.B.get(), a.rank};
      continue;
    }
    // y's slice (rows lin.out apart) += u (scale B)^T: the product's beta 1 adds in place.
    matmul(*gemm_, y + a.offset, u, DType::f32, a.B.get<void>(), DType::f32, int(rows), a.out, a.rank, nullptr, 1.f, st,
           {0, 0, lin.out});
  }
  mark(trace, kForwardOther, st);
}

bool DeviceModel::mlp_bf16_applies(const DLinear& lin, long rows, const DeviceTrace* trace) const {
  if (!bf16_mlp_ || dtype_ != DType::bf16 || config_.act != Activation::silu || !lin.bias.empty()) return false;
  if (adapter_enabled_ && !lin.lora.empty() && !swiglu_lora_applies(lin)) return false;
  return !gemv_applies(lin, nullptr, s_->xb.get<__nv_bfloat16>(), rows, trace);
}

// A batched decode step's adapters (untraced, up to kLoraMaxRows rows): lora_down_all's path.
bool DeviceModel::lora_batched(const DLinear& lin, long rows, const DeviceTrace* trace) const {
  return !trace && gemv_on_ && rows <= kLoraMaxRows && lin.lora.size() <= size_t(kGemvMaxLora);
}

bool DeviceModel::reads_f32_input(const DLinear& lin, long rows, const DeviceTrace* trace) const {
  if (dtype_ != DType::bf16) return true;
  if (!adapter_enabled_ || lin.lora.empty()) return false;
  if (lora_batched(lin, rows, trace)) return true;
  for (const DLinear::Lora& a : lin.lora)
    if (a.rank > kLoraFusedMaxRank) return true;
  return false;
}

// Whether swiglu_rows can add lin's adapters (SwigluLora): each one on all of the gate half or
// all of the up half, one per half, ranks within kSwigluLoraMaxRank.
bool DeviceModel::swiglu_lora_applies(const DLinear& lin) const {
  const long I = config_.intermediate;
  if (config_.act != Activation::silu || lin.out != 2 * I || lin.lora.size() > 2) return false;
  bool half[2] = {false, false};
  for (const DLinear::Lora& a : lin.lora) {
    if (a.out != I || (a.offset != 0 && a.offset != I) || a.rank > kSwigluLoraMaxRank) return false;
    bool& h = half[a.offset == 0 ? 0 : 1];
    if (h) return false;
    h = true;
  }
  return true;
}

bool DeviceModel::gemv_applies(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows,
                               const DeviceTrace* trace, bool norm) const {
  if (!gemv_on_ || trace || rows > kGemvMaxRows) return false;
  if (norm && config_.norm != NormType::rms) return false;
  if (adapter_enabled_ && lin.lora.size() > size_t(kGemvMaxLora)) return false;
  const void* x = dtype_ == DType::bf16 && !norm ? (in_bf16 ? static_cast<const void*>(in_bf16) : s_->xb.get<void>()) : in;
  return gemv_supports(x, lin.in, lin.w.get<void>(), dtype_, int(rows), lin.in, norm);
}

// The adapters' u from the f32 input in one launch (side by side in lora_u), then the product
// with their up products, the bias, the residual and the SwiGLU in its epilogue; with norm, both
// launches normalize the rows as they read them (no norm launch, no xn).
void DeviceModel::linear_rows_gemv(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows, float* y,
                                   bool accumulate, bool glu, __nv_bfloat16* y_bf16, const DNorm* norm,
                                   const GemvAppend* append) {
  DeviceScratch& s = *s_;
  const cudaStream_t st = as_stream(stream_);
  GemvArgs g;
  g.x = in;
  g.type = dtype_;
  const float* norm_w = norm ? norm->w.get() : nullptr;
  if (norm) {
    g.norm_w = norm_w, g.norm_eps = config_.norm_eps;
  } else if (dtype_ == DType::bf16) {
    if (!in_bf16) f32_to_bf16(s.xb.get<__nv_bfloat16>(), in, rows * lin.in, st);
    g.x = in_bf16 ? in_bf16 : s.xb.get<__nv_bfloat16>();
  }
  g.w = lin.w.get<void>();
  g.rows = int(rows), g.N = lin.out, g.K = lin.in;
  g.bias = lin.bias.empty() ? nullptr : lin.bias.get();
  g.y = y, g.accumulate = accumulate, g.glu = glu, g.y_bf16 = y_bf16;
  if (append) g.append = *append;
  if (adapter_enabled_ && !lin.lora.empty()) g.n_lora = lora_down_all(lin, in, rows, norm_w, g.lora);
  gemv_rows(g, st);
}

// The adapters' u [rows, rank] side by side in lora_u.
int DeviceModel::lora_down_all(const DLinear& lin, const float* in, long rows, const float* norm_w, GemvLora* up) {
  long u_cols = 0;
  for (const DLinear::Lora& a : lin.lora) u_cols += a.rank;
  float* u = static_cast<float*>(s_->lora_u.ensure(size_t(rows * u_cols) * sizeof(float)));
  GemvDown down[kGemvMaxLora];
  const int n = int(lin.lora.size());
  for (int i = 0; i < n; ++i) {
    const DLinear::Lora& a = lin.lora[size_t(i)];
    down[i] = {a.A.get(), u, a.rank};
    up[i] = {u, a.B.get(), a.offset, a.out, a.rank};
    u += rows * a.rank;
  }
  lora_down_rows(down, n, in, lin.in, int(rows), lin.in, as_stream(stream_), norm_w, config_.norm_eps);
  return n;
}

// logits [rows, V] = xn . head^T, the flag rows' logits from their own head rows when flags is set;
// xn_bf16 as linear_rows' in_bf16.
void DeviceModel::head_rows(const float* xn, long rows, float* logits, bool flags, const __nv_bfloat16* xn_bf16,
                            const DNorm* norm) {
  const ModelConfig& c = config_;
  const DeviceWeights& w = *w_;
  const cudaStream_t st = as_stream(stream_);
  const Buffer& table = c.tied_embeddings ? w.embed : w.lm_head;
  if (norm) {  // a decode step's rows, normalized as the product and the flag rows read them
    if (!head_fuses_norm(xn, rows)) throw std::logic_error("head_rows: the norm is fused into decode products only");
    GemvArgs g;
    g.x = xn, g.norm_w = norm->w.get(), g.norm_eps = c.norm_eps;
    g.w = table.get<void>(), g.type = dtype_;
    g.rows = int(rows), g.N = c.vocab, g.K = c.hidden, g.y = logits;
    gemv_rows(g, st);
    if (flags && !w.flag_head.empty())
      set_flag_logits(logits, c.vocab, xn, int(rows), c.hidden, w.flag_head.get(), w.flag_ids.get<int32_t>(),
                      int(w.flag_tokens.size()), st, norm->w.get(), c.norm_eps);
    return;
  }
  const void* xin = xn;
  DType xt = DType::f32;
  if (dtype_ == DType::bf16) {
    if (!xn_bf16) f32_to_bf16(s_->xb.get<__nv_bfloat16>(), xn, rows * c.hidden, st);
    xin = xn_bf16 ? xn_bf16 : s_->xb.get<__nv_bfloat16>();
    xt = DType::bf16;
  }
  // A decode step's few rows: gemv_rows (gemv.h).
  if (gemv_on_ && gemv_supports(xin, c.hidden, table.get<void>(), dtype_, int(rows), c.hidden)) {
    GemvArgs g;
    g.x = xin, g.w = table.get<void>(), g.type = dtype_;
    g.rows = int(rows), g.N = c.vocab, g.K = c.hidden, g.y = logits;
    gemv_rows(g, st);
  } else {
    matmul(*gemm_, logits, xin, xt, table.get<void>(), dtype_, int(rows), c.vocab, c.hidden, nullptr, 0.f, st);
  }
  if (flags && !w.flag_head.empty())
    set_flag_logits(logits, c.vocab, xn, int(rows), c.hidden, w.flag_head.get(), w.flag_ids.get<int32_t>(), int(w.flag_tokens.size()),
                    st);
}

bool DeviceModel::head_fuses_norm(const float* x, long rows) const {
  const ModelConfig& c = config_;
  const Buffer& table = c.tied_embeddings ? w_->embed : w_->lm_head;
  return gemv_on_ && c.norm == NormType::rms && gemv_supports(x, c.hidden, table.get<void>(), dtype_, int(rows), c.hidden, true);
}

void DeviceModel::layer_forward(int l, const float* x, float* x_out, DeviceLayerTrace* lt, const DeviceTrace* trace,
                                bool append_kv) {
  const ModelConfig& c = config_;
  const cudaStream_t st = as_stream(stream_);
  DeviceScratch& s = *s_;
  const ForwardPlan& p = s.plan;
  const DLayer& L = w_->layers[size_t(l)];
  const long R = p.R, H = c.hidden, QKV = c.qkv_dim(), Q = c.q_dim(), KV = c.kv_dim(), hd = c.head_dim;
  const long I = c.intermediate, MLP_IN = c.act == Activation::silu ? 2 * I : I;
  float* xn = static_cast<float*>(s.xn.ensure(size_t(R * H) * sizeof(float)));
  float* qkv = static_cast<float*>(s.qkv.ensure(size_t(R * QKV) * sizeof(float)));
  float* att = static_cast<float*>(s.att.ensure(size_t(R * Q) * sizeof(float)));
  float* mlp = static_cast<float*>(s.mlp.ensure(size_t(R * MLP_IN) * sizeof(float)));
  float* act = c.act == Activation::silu ? static_cast<float*>(s.act.ensure(size_t(R * I) * sizeof(float))) : mlp;
  // bf16 weights: the norms and the SwiGLU also write their output in bf16 here, the operand of
  // the product that follows (one kernel instead of two); the others are rounded in linear_rows.
  __nv_bfloat16* xb =
      dtype_ == DType::bf16 ? static_cast<__nv_bfloat16*>(s.xb.ensure(size_t(R * std::max({H, Q, I})) * sizeof(__nv_bfloat16)))
                            : nullptr;
  // What the trace keeps (DeviceLayerTrace) besides the block's input (the caller's x: see run):
  // everything, or with recomputation nothing. The residual stream after attention, x_mid, is
  // the o product's output (its C the input, apart from its D): kept, or straight in x_out.
  // x_out null: a recomputation, which wants the trace alone (the mlp_out product is skipped).
  DeviceLayerTrace* keep = lt && !trace->inputs_only ? lt : nullptr;
  if (!x_out && !keep) throw std::logic_error("layer_forward: no output and nothing traced");
  float* x_mid = keep ? static_cast<float*>(keep->x_mid.ensure(size_t(R * H) * sizeof(float))) : x_out;
  size_t u_next = 0;

  // Attention block: x_mid = x + o(attn(rope(qkv(norm(x))))). A decode step's few rows (gemv.h):
  // the product normalizes the rows as it reads them (no norm launch), and with rope turns q and
  // k and appends k and v to the cache in its epilogue (no kv_append launch).
  // Qwen3's per-head norms come between the product and rope: not in the gemv's epilogue, which
  // turns and appends each value as it is made; rope then goes with the append (kv_append).
  const bool rope_in_append = c.rope && append_kv;
  const bool fused_append = rope_in_append && !c.qk_norm;
  bool appended = false;
  if (gemv_applies(L.qkv, x, nullptr, R, trace, true)) {
    GemvAppend ap;
    if (fused_append)
      ap = {c.n_heads,  c.n_kv_heads, int(hd), kBlockTokens, p.cos,    p.sin,           pool_->k(l),
            pool_->v(l), pool_->bf16(), p.row_seq, p.row_pos,  p.tables, p.table_offsets};
    linear_rows_gemv(L.qkv, x, nullptr, R, qkv, false, false, nullptr, &L.attn_norm, fused_append ? &ap : nullptr);
    appended = fused_append;
  } else {
    // bf16 models: the f32 norm output only where an adapter reads it (reads_f32_input).
    float* xn_qkv = reads_f32_input(L.qkv, R, trace) ? xn : nullptr;
    norm_rows(L.attn_norm, x, xn_qkv, R, xb);
    linear_rows(L.qkv, xn_qkv, xb, R, qkv, nullptr, l, 0, trace, keep, &u_next);
  }
  if (c.qk_norm) {
    if (keep) keep_rows(keep->qk_pre, qkv, R * QKV);  // f32 whatever the engine's dtype: the norms' backward reads it
    qk_norm_rows(qkv, QKV, int(R), c.n_heads, c.n_kv_heads, int(hd), L.q_norm.w.get(), L.k_norm.w.get(), c.norm_eps, st);
  }
  // Rope on q's heads, then k's, and the keys and values into the cache: one launch when both,
  // which for bf16 models also writes the trace's bf16 copy of the rows.
  __nv_bfloat16* keep_qkv16 = rope_in_append && keep && dtype_ == DType::bf16
                                  ? static_cast<__nv_bfloat16*>(keep->qkv.ensure(size_t(R * QKV) * sizeof(__nv_bfloat16)))
                                  : nullptr;
  if (c.rope && !append_kv) rope_rows(qkv, QKV, int(R), c.n_heads + c.n_kv_heads, int(hd), p.cos, p.sin, st);
  if (append_kv && !appended)
    kv_append(pool_->k(l), pool_->v(l), pool_->bf16(), qkv, QKV, int(Q), int(Q + KV), p.row_seq, p.row_pos, p.tables,
              p.table_offsets, int(R), c.n_kv_heads, int(hd), kBlockTokens, st,
              rope_in_append ? AppendRope{c.n_heads, p.cos, p.sin, keep_qkv16} : AppendRope{});
  if (keep && !keep_qkv16) keep_values(keep->qkv, qkv, R * QKV);
  const PagedLayer layer{pool_->k(l), pool_->v(l), kBlockTokens, c.n_kv_heads, int(hd), pool_->bf16()};
  const PagedBatch batch{p.tables, p.table_offsets, p.lengths, p.n, p.attn_length};
  const float scale = 1.0f / std::sqrt(float(hd));
  mark(trace, kForwardAttention, st);
  // bf16 models: the attention kernels write their output rounded to bf16 as well, the o
  // projection's operand (into the trace when it keeps att); the f32 fallback's is rounded below.
  __nv_bfloat16* att_bf16 = nullptr;
  if (xb && (p.all_one || tc_attention()))
    att_bf16 = keep ? static_cast<__nv_bfloat16*>(keep->att.ensure(size_t(R * Q) * sizeof(__nv_bfloat16))) : xb;
  // Attention reads q in place: the first Q floats of each qkv row.
  if (p.all_one) {
    decode_attention(att, qkv, QKV, layer, batch, c.n_heads, scale, c.sliding_window, s.attn.get(), st, att_bf16);
  } else if (tc_attention()) {
    // Its f32 output only where the o projection reads it (reads_f32_input): else the bf16 alone.
    if (!reads_f32_input(L.o, R, trace)) att = nullptr;
    prefill_attention_tc(att, qkv, QKV, layer, batch, p.row_offsets, p.n_new, int(R), p.max_new, c.n_heads, scale,
                         c.sliding_window, st,
                         keep ? static_cast<float*>(keep->lse.ensure(size_t(R * c.n_heads) * sizeof(float))) : nullptr, att_bf16);
  } else {
    prefill_attention(att, qkv, QKV, layer, batch, p.row_offsets, p.n_new, int(R), p.max_new, c.n_heads, scale,
                      c.sliding_window, st);
  }
  mark(trace, kForwardOther, st);
  if (keep && !att_bf16) {
    keep_values(keep->att, att, R * Q);
    if (xb) att_bf16 = keep->att.get<__nv_bfloat16>();
  }
  linear_rows(L.o, att, att_bf16, R, x_mid, x, l, 1, trace, keep, &u_next);

  // MLP block: x_out = x_mid + mlp_out(act(mlp_in(norm(x_mid)))). A decode step's few rows: the
  // norm, the gate|up product and the SwiGLU in one launch (gemv.h); its bf16 output goes beside
  // xb.
  if (c.act == Activation::silu && gemv_applies(L.mlp_in, x_mid, nullptr, R, trace, true)) {
    __nv_bfloat16* actb = xb ? static_cast<__nv_bfloat16*>(s.actb.ensure(size_t(R * I) * sizeof(__nv_bfloat16))) : nullptr;
    linear_rows_gemv(L.mlp_in, x_mid, nullptr, R, act, false, true, actb, &L.mlp_norm);
    linear_rows(L.mlp_out, act, actb, R, x_out, x_mid, l, 3, trace, keep, &u_next);
    return;
  }
  float* xn_mlp = reads_f32_input(L.mlp_in, R, trace) ? xn : nullptr;
  norm_rows(L.mlp_norm, x_mid, xn_mlp, R, xb);
  // SwiGLU: the gate|up adapters' up products, when linear_rows leaves them to swiglu_rows. The
  // trace's mlp then keeps the product before their terms (the backward adds them again as it
  // reads it, swiglu_backward_rows): no pass writes the sums back.
  SwigluLora glu_up[2];
  // SwiGLU of a bf16 model: the f32 activation only where an adapter of mlp_out reads it.
  float* act_f32 = c.act != Activation::silu || reads_f32_input(L.mlp_out, R, trace) ? act : nullptr;
  if (mlp_bf16_applies(L.mlp_in, R, trace)) {
    // The gate|up product in bf16, the widest output of the block: half the bytes to write and for
    // the SwiGLU to read. Traced, it goes straight into the trace's mlp (no copy of its own).
    __nv_bfloat16* mlp16 = keep ? static_cast<__nv_bfloat16*>(keep->mlp.ensure(size_t(R * MLP_IN) * sizeof(__nv_bfloat16)))
                                : reinterpret_cast<__nv_bfloat16*>(mlp);  // s.mlp holds R * MLP_IN floats
    linear_rows(L.mlp_in, xn_mlp, xb, R, nullptr, nullptr, l, 2, trace, keep, &u_next, glu_up, mlp16);
    activation_rows(mlp16, act_f32, R, xb, glu_up);
    linear_rows(L.mlp_out, act_f32, xb, R, x_out, x_mid, l, 3, trace, keep, &u_next);
    return;
  }
  // The trace's mlp, as the product wrote it: f32 SwiGLU, the product straight into it; bf16,
  // rounded by the activation as it reads mlp (its bf16 copy of mlp is the sums with any adapter
  // left to it: then a pass of its own, f32_to_bf16); f32 gelu_new (in place on mlp), copied.
  const bool silu = c.act == Activation::silu;
  if (keep && silu && dtype_ != DType::bf16) mlp = static_cast<float*>(keep->mlp.ensure(size_t(R * MLP_IN) * sizeof(float)));
  linear_rows(L.mlp_in, xn_mlp, xb, R, mlp, nullptr, l, 2, trace, keep, &u_next, silu ? glu_up : nullptr);
  const bool deferred = glu_up[0].u || glu_up[1].u;
  __nv_bfloat16* keep_mlp = nullptr;
  if (keep && dtype_ == DType::bf16 && !deferred)
    keep_mlp = static_cast<__nv_bfloat16*>(keep->mlp.ensure(size_t(R * MLP_IN) * sizeof(__nv_bfloat16)));
  else if (keep && (dtype_ == DType::bf16 || !silu))
    keep_values(keep->mlp, mlp, R * MLP_IN);
  activation_rows(mlp, act_f32, R, xb, glu_up, keep_mlp);
  linear_rows(L.mlp_out, act_f32, xb, R, x_out, x_mid, l, 3, trace, keep, &u_next);
}

// act [R, I] = the MLP's activation of mlp [R, MLP_IN]: silu(gate) * up of gate | up, or
// gelu_new(mlp) (act may be mlp: in place); act_bf16 (optional): act rounded to bf16 as well.
void DeviceModel::activation_rows(const float* mlp, float* act, long rows, __nv_bfloat16* act_bf16, const SwigluLora* glu_up,
                                  __nv_bfloat16* mlp_bf16) {
  const ModelConfig& c = config_;
  const cudaStream_t st = as_stream(stream_);
  if (c.act == Activation::silu)
    return swiglu_rows(act, mlp, int(rows), int(c.intermediate), st, act_bf16, mlp_bf16, glu_up ? glu_up[0] : SwigluLora{},
                       glu_up ? glu_up[1] : SwigluLora{});
  const long n = rows * c.intermediate;
  if (act != mlp) check(cudaMemcpyAsync(act, mlp, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync (mlp)");
  gelu_new(act, n, st, act_bf16, mlp_bf16);
}

void DeviceModel::activation_rows(const __nv_bfloat16* mlp, float* act, long rows, __nv_bfloat16* act_bf16,
                                  const SwigluLora* glu_up) {
  const ModelConfig& c = config_;
  const cudaStream_t st = as_stream(stream_);
  if (c.act == Activation::silu)
    return swiglu_rows(act, mlp, int(rows), int(c.intermediate), st, act_bf16, glu_up ? glu_up[0] : SwigluLora{},
                       glu_up ? glu_up[1] : SwigluLora{});
  gelu_new(act, mlp, rows * c.intermediate, st, act_bf16);
}

const float* DeviceModel::run(const std::vector<DeviceItem>& items, LogitsMode mode, const std::atomic<int>* cancel,
                              const std::function<void(int, int)>& progress, DeviceTrace* trace, const Tail* tail) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  check_complete();
  check_items(items);
  const ModelConfig& c = config_;
  const cudaStream_t st = as_stream(stream_);
  DeviceScratch& s = *s_;
  const DeviceWeights& w = *w_;
  const int n = int(items.size());
  long R = 0;
  for (const DeviceItem& it : items) R += it.n_tokens;
  if (R == 0) return nullptr;
  if (trace && mode != LogitsMode::hidden) throw std::invalid_argument("a traced forward returns hidden states");
  const long H = c.hidden, Q = c.q_dim(), V = c.vocab, I = c.intermediate;

  plan_forward(items);
  if (trace && s.plan.all_one) {
    // A traced forward keeps what the backward reads, the attention's log-sum-exp among it, and
    // only the prefill kernels write that: a batch of one-token sequences takes their path too.
    s.plan.all_one = false;
    s.plan.attn_length = s.plan.max_length;
  }
  const ForwardPlan& p = s.plan;
  // Every buffer outside the layers, sized before any work is queued (a decode graph's capture
  // must not allocate).
  const long rows = mode == LogitsMode::last ? n : R;
  if (trace && trace->layers.size() < size_t(c.n_layers)) trace->layers.resize(size_t(c.n_layers));
  // The residual stream: untraced, x in place through every block; traced, the trace's buffers,
  // each block reading its input where the trace keeps it and writing its output straight into
  // the next block's (the last's into x_final), so that nothing is copied into the trace.
  std::vector<float*> xs(size_t(c.n_layers) + 1);
  for (int l = 0; l <= c.n_layers; ++l) {
    Buffer& b = !trace ? s.x : l < c.n_layers ? trace->layers[size_t(l)].x_in : trace->x_final;
    xs[size_t(l)] = static_cast<float*>(b.ensure(size_t(R * H) * sizeof(float)));
  }
  float* x = xs.back();  // the last block's output
  float* xn = static_cast<float*>(s.xn.ensure(size_t(R * H) * sizeof(float)));
  // bf16 copies of a product's input: the widest input is max(H, Q, I) per row (the LM head's H too).
  if (dtype_ == DType::bf16) s.xb.ensure(size_t(R * std::max({H, Q, I})) * sizeof(__nv_bfloat16));
  // Each sequence's last row gathered, unless every sequence has one row (a decode step): then the
  // last rows are all the rows, in order, and the head reads x itself (no gather launch).
  float* last =
      mode == LogitsMode::last && !p.all_one ? static_cast<float*>(s.last.ensure(size_t(n * H) * sizeof(float))) : nullptr;
  float* logits = mode == LogitsMode::hidden ? nullptr : static_cast<float*>(s.logits.ensure(size_t(rows * V) * sizeof(float)));
  const bool flags_on = adapter_enabled_ && !w.flag_tokens.empty();

  // The device work, queued on the stream (or captured into a decode graph).
  const auto enqueue = [&](bool capturing) {
    embed_rows(xs[0], w.embed.get<void>(), dtype_ == DType::bf16, p.tokens, int(R), int(H),
               flags_on && !w.flag_embed.empty() ? w.flag_embed.get() : nullptr, w.flag_ids.get<int32_t>(),
               int(w.flag_tokens.size()), c.arch == Arch::gpt2 ? w.pos_embed.get() : nullptr, p.positions, p.delta, st);
    for (int l = 0; l < c.n_layers; ++l) {
      if (!capturing && cancel && cancel->load(std::memory_order_relaxed)) {
        cudaStreamSynchronize(st);
        throw Cancelled();
      }
      layer_forward(l, xs[size_t(l)], xs[size_t(l) + 1], trace ? &trace->layers[size_t(l)] : nullptr, trace, true);
      if (progress) {
        check(cudaStreamSynchronize(st), "forward (layer)");
        progress(l + 1, c.n_layers);
      }
    }
    const float* head_in = x;
    if (last) {
      gather_rows(last, x, p.last_rows, n, int(H), st);
      head_in = last;
    }
    if (logits && head_fuses_norm(head_in, rows)) {
      // A decode step's few rows: the head product and the flag rows normalize them as they read
      // them (no norm launch, no xn).
      head_rows(head_in, rows, logits, flags_on, nullptr, &w.final_norm);
    } else {
      // R >= rows: xn and the bf16 scratch have room.
      __nv_bfloat16* xb = logits && dtype_ == DType::bf16 ? s.xb.get<__nv_bfloat16>() : nullptr;
      norm_rows(w.final_norm, head_in, xn, rows, xb);
      if (logits) head_rows(xn, rows, logits, flags_on, xb);
    }
    if (tail) tail->enqueue(logits);
  };
  if (graphs_on_ && p.all_one && mode == LogitsMode::last && !trace && !progress && !p.delta) {
    if (cancel && cancel->load(std::memory_order_relaxed)) throw Cancelled();
    launch_decode_graph(n, p.attn_length, tail ? tail->key : 0, enqueue);
  } else {
    enqueue(false);
  }
  check(cudaStreamSynchronize(st), "forward");
  for (const DeviceItem& it : items) it.seq->length_ += it.n_tokens;
  return logits ? logits : xn;
}

// The decode graphs of one model: per shape, its instantiated graph and the signature of what it
// reads; shapes seen once (their scratch sized by an eager run) are captured the next time.
struct DecodeGraphs {
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    uint64_t signature = 0, used = 0;
  };
  static constexpr size_t kMaxGraphs = 64;  // the least recently used beyond this are dropped
  std::map<std::array<int, 3>, Graph> graphs;
  // Shapes whose eager first run sized every scratch buffer, with the signature after it: a step
  // of that shape under another signature (an adapter added, the pool resized) runs eagerly
  // again, since capturing would allocate inside the capture.
  std::map<std::array<int, 3>, uint64_t> warm;
  uint64_t clock = 0;
  DeviceModel::GraphStats stats;

  ~DecodeGraphs() { clear(); }
  void clear() {
    for (auto& g : graphs) cudaGraphExecDestroy(g.second.exec);
    graphs.clear();
  }
  void drop(std::map<std::array<int, 3>, Graph>::iterator it) {
    cudaGraphExecDestroy(it->second.exec);
    graphs.erase(it);
  }
};

void DeviceModel::set_graphs(bool on) {
  graphs_on_ = on;
  if (!on) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamSynchronize(as_stream(stream_)), "set_graphs");
    graphs_->clear();
  }
}

DeviceModel::GraphStats DeviceModel::graph_stats() const { return graphs_->stats; }

void DeviceModel::set_gemv(bool on) {
  if (on == gemv_on_) return;
  check(cudaSetDevice(device_), "cudaSetDevice");
  check(cudaStreamSynchronize(as_stream(stream_)), "set_gemv");
  gemv_on_ = on;
  graphs_->clear();  // they launch the other path's kernels
}

uint64_t DeviceModel::graph_signature() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over 64-bit words
  const auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  const auto buf = [&mix](const Buffer& b) { mix(reinterpret_cast<uintptr_t>(b.get<void>())), mix(b.bytes()); };
  const DeviceScratch& s = *s_;
  for (const Buffer* b : {&s.x, &s.xn, &s.xb, &s.qkv, &s.att, &s.mlp, &s.act, &s.lora_u, &s.lora_x, &s.last, &s.actb,
                          &s.logits, &s.attn, &s.plan_dev, &s.pick_params, &s.flags, &s.picked, &s.logprob, &s.p_rf, &s.p_flags,
                          &s.pick_scratch, &s.top_ids, &s.top_logprobs})
    buf(*b);
  const DeviceWeights& w = *w_;
  for (const Buffer* b : {&w.embed, &w.lm_head, &w.pos_embed, &w.final_norm.w, &w.final_norm.b, &w.flag_ids, &w.flag_embed, &w.flag_head})
    buf(*b);
  mix(w.flag_tokens.size());
  for (const DLayer& L : w.layers) {
    for (const DNorm* nm : {&L.attn_norm, &L.mlp_norm, &L.q_norm, &L.k_norm}) buf(nm->w), buf(nm->b);
    for (const DLinear* lin : {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out}) {
      buf(lin->w), buf(lin->bias);
      mix(lin->lora.size());
      for (const DLinear::Lora& a : lin->lora) mix(uint64_t(a.offset) << 32 | uint32_t(a.rank)), mix(uint64_t(a.out)), buf(a.A), buf(a.B);
    }
  }
  // Where the step's tables sit in plan_dev (a graph reads them there), and the KV pool's every
  // layer (k(l) for l > 0 moves with the pool's capacity even where its base does not).
  for (const void* q : {static_cast<const void*>(s.plan.tokens), static_cast<const void*>(s.plan.positions), static_cast<const void*>(s.plan.row_seq),
                        static_cast<const void*>(s.plan.row_pos), static_cast<const void*>(s.plan.tables), static_cast<const void*>(s.plan.table_offsets),
                        static_cast<const void*>(s.plan.lengths), static_cast<const void*>(s.plan.row_offsets), static_cast<const void*>(s.plan.n_new),
                        static_cast<const void*>(s.plan.last_rows), static_cast<const void*>(s.plan.cos), static_cast<const void*>(s.plan.sin),
                        static_cast<const void*>(s.plan.delta)})
    mix(reinterpret_cast<uintptr_t>(q));
  mix(pool_ ? reinterpret_cast<uintptr_t>(pool_->k(0)) : 0);
  mix(pool_ ? reinterpret_cast<uintptr_t>(pool_->v(0)) : 0);
  mix(uint64_t(adapter_enabled_));
  mix(uint64_t(dependent_launch_on()));  // how its kernels were launched (cuda/launch.h)
  return h;
}

void DeviceModel::launch_decode_graph(int n, int attn_length, int tail_key, const std::function<void(bool)>& enqueue) {
  const cudaStream_t st = as_stream(stream_);
  DecodeGraphs& g = *graphs_;
  const std::array<int, 3> key{n, attn_length, tail_key};
  const uint64_t signature = graph_signature();
  auto it = g.graphs.find(key);
  if (it != g.graphs.end()) {
    if (it->second.signature == signature) {
      it->second.used = ++g.clock;
      ++g.stats.replays;
      check(cudaGraphLaunch(it->second.exec, st), "cudaGraphLaunch (decode)");
      return;
    }
    g.drop(it);  // something it reads has moved or changed shape
  }
  const auto warmed = g.warm.find(key);
  if (warmed == g.warm.end() || warmed->second != signature) {  // eager first, which sizes every scratch buffer it uses
    ++g.stats.eager;
    enqueue(false);
    g.warm[key] = graph_signature();  // only once it ran: a failed run leaves the shape cold
    return;
  }
  check(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  cudaGraph_t graph = nullptr;
  try {
    enqueue(true);
  } catch (...) {
    cudaStreamEndCapture(st, &graph);  // leaves the stream usable
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  check(cudaStreamEndCapture(st, &graph), "cudaStreamEndCapture");
  size_t nodes = 0;
  g.stats.last_nodes = cudaGraphGetNodes(graph, nullptr, &nodes) == cudaSuccess ? long(nodes) : -1;
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check(e, "cudaGraphInstantiate");
  if (g.graphs.size() >= DecodeGraphs::kMaxGraphs) {
    auto oldest = g.graphs.begin();
    for (auto i = g.graphs.begin(); i != g.graphs.end(); ++i)
      if (i->second.used < oldest->second.used) oldest = i;
    g.drop(oldest);
  }
  g.graphs[key] = {exec, signature, ++g.clock};
  ++g.stats.captures;
  check(cudaGraphLaunch(exec, st), "cudaGraphLaunch (decode)");
}

void DeviceModel::forward(const std::vector<DeviceItem>& items, LogitsMode mode, float* out,
                          const std::atomic<int>* cancel, const std::function<void(int, int)>& progress) {
  long R = 0;
  for (const DeviceItem& it : items) R += it.n_tokens;
  const float* d = run(items, mode, cancel, progress);
  if (!d) return;
  const long rows = mode == LogitsMode::last ? long(items.size()) : R;
  const long width = mode == LogitsMode::hidden ? config_.hidden : config_.vocab;
  check(cudaMemcpy(out, d, size_t(rows * width) * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy (logits)");
}

namespace {

// As the CPU engine's (decode.cpp): a flag listed twice would count twice in p_rf.
void check_flags(const Flags& flags, int vocab, const char* what) {
  for (size_t j = 0; j < flags.ids.size(); ++j) {
    if (flags.ids[j] < 0 || flags.ids[j] >= vocab) throw std::invalid_argument(std::string(what) + ": a flag token is outside the vocabulary");
    for (size_t k = 0; k < j; ++k)
      if (flags.ids[j] == flags.ids[k]) throw std::invalid_argument(std::string(what) + ": a flag token is listed twice");
  }
}

}  // namespace

void DeviceModel::decode_step(const std::vector<DeviceItem>& items, const std::vector<PickParams>& params,
                              const Flags& flags, int top_n, Pick* picks, uint32_t* top_ids, float* top_logprobs,
                              const std::atomic<int>* cancel, bool scores) {
  if (params.size() != items.size()) throw std::invalid_argument("decode_step: one PickParams per item is required");
  if (top_n < 0 || top_n > kPickMaxTopN)
    throw std::invalid_argument("decode_step: top_n outside 0.." + std::to_string(kPickMaxTopN));
  check_flags(flags, vocab(), "decode_step");
  for (const DeviceItem& it : items)
    if (it.n_tokens < 1) throw std::invalid_argument("decode_step: every sequence needs at least one new token");
  check_items(items);
  check(cudaSetDevice(device_), "cudaSetDevice");
  const cudaStream_t st = as_stream(stream_);
  DeviceScratch& s = *s_;
  const int n = int(items.size()), V = vocab(), K = flags.size();
  if (n == 0) return;

  // Every row is picked on the device (greedy, the whole-vocabulary draw at a temperature, or
  // top-k / top-p over up to kPickMaxCandidates sorted candidates), with its top_n; rows whose
  // nucleus is larger are redone below on the host from their logits row. Its inputs are
  // uploaded before the forward, so the pick is part of the decode graph.
  std::vector<DevicePick> dp(static_cast<size_t>(n));
  bool whole_draws = false;  // any row drawn from the whole vocabulary: the pick's weights launch
  for (int b = 0; b < n; ++b) {
    const PickParams& p = params[size_t(b)];
    // The counter is the position the new token will take, as on the CPU (the forward has not
    // appended this step's tokens yet).
    const DeviceItem& it = items[size_t(b)];
    dp[size_t(b)] = {p.temperature, p.seed, uint64_t(it.seq->length() + it.n_tokens), p.top_k, p.top_p};
    whole_draws |= pick_draws_whole(dp[size_t(b)]);
  }
  const DevicePick* d_params = upload_async(s.pick_params, dp, st);
  const int32_t* d_flags = upload_async(s.flags, std::vector<int32_t>(flags.ids.begin(), flags.ids.end()), st);
  uint32_t* d_token = static_cast<uint32_t*>(s.picked.ensure(size_t(n) * sizeof(uint32_t)));
  float* d_logprob = static_cast<float*>(s.logprob.ensure(size_t(n) * sizeof(float)));
  float* d_p_rf = static_cast<float*>(s.p_rf.ensure(size_t(n) * sizeof(float)));
  float* d_p_flags = K > 0 ? static_cast<float*>(s.p_flags.ensure(size_t(n) * K * sizeof(float))) : nullptr;
  void* d_pick_scratch = s.pick_scratch.ensure(pick_scratch_bytes(n, V));
  // The top n only with scores, as the CPU's (a plain decode writes none).
  const int dev_top_n = scores ? top_n : 0;
  uint32_t* d_top_ids = static_cast<uint32_t*>(s.top_ids.ensure(size_t(std::max(1, n * dev_top_n)) * sizeof(uint32_t)));
  float* d_top_logprobs = static_cast<float*>(s.top_logprobs.ensure(size_t(std::max(1, n * dev_top_n)) * sizeof(float)));
  // The tail's key tells the decode graphs apart by what they launch: the flags, the top n, and
  // whether the weights' launch runs (a greedy step has none).
  const Tail pick{1 + K + 4096 * dev_top_n + (whole_draws ? 1 << 20 : 0), [&](const float* logits) {
                    pick_rows(logits, n, V, d_params, d_flags, K, d_token, d_logprob, d_p_rf, d_p_flags, dev_top_n, d_top_ids,
                              d_top_logprobs, d_pick_scratch, st, whole_draws);
                  }};
  const float* logits = run(items, LogitsMode::last, cancel, nullptr, nullptr, &pick);
  if (!logits) return;
  std::vector<uint32_t> token(static_cast<size_t>(n));
  std::vector<float> logprob(static_cast<size_t>(n)), p_rf(static_cast<size_t>(n)), p_flags(static_cast<size_t>(n) * K);
  check(cudaMemcpyAsync(token.data(), d_token, token.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  check(cudaMemcpyAsync(logprob.data(), d_logprob, logprob.size() * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  check(cudaMemcpyAsync(p_rf.data(), d_p_rf, p_rf.size() * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  if (K > 0) check(cudaMemcpyAsync(p_flags.data(), d_p_flags, p_flags.size() * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  std::vector<uint32_t> dev_top_ids(size_t(n) * dev_top_n);
  std::vector<float> dev_top_logprobs(size_t(n) * dev_top_n);
  if (dev_top_n > 0) {
    check(cudaMemcpyAsync(dev_top_ids.data(), d_top_ids, dev_top_ids.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost, st),
          "cudaMemcpyAsync");
    check(cudaMemcpyAsync(dev_top_logprobs.data(), d_top_logprobs, dev_top_logprobs.size() * sizeof(float), cudaMemcpyDeviceToHost,
                          st),
          "cudaMemcpyAsync");
  }
  check(cudaStreamSynchronize(st), "decode_step (pick)");

  PickScratch scratch;
  std::vector<float> row;
  Flags row_flags(flags.ids);
  for (int b = 0; b < n; ++b) {
    const PickParams& p = params[size_t(b)];
    if (token[size_t(b)] == kPickFallback) {
      row.resize(size_t(V));
      check(cudaMemcpy(row.data(), logits + long(b) * V, size_t(V) * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy (row)");
      row_flags.p = flags.p ? flags.p + long(b) * K : nullptr;
      picks[b] = logits_pick(row.data(), V, p, uint64_t(items[size_t(b)].seq->length()), row_flags, top_n,
                             top_n > 0 ? top_ids + long(b) * top_n : nullptr, top_n > 0 ? top_logprobs + long(b) * top_n : nullptr,
                             scratch, scores);
      continue;
    }
    picks[b].token = token[size_t(b)];
    if (dev_top_n > 0) {
      std::copy_n(dev_top_ids.begin() + long(b) * top_n, top_n, top_ids + long(b) * top_n);
      std::copy_n(dev_top_logprobs.begin() + long(b) * top_n, top_n, top_logprobs + long(b) * top_n);
    }
    // scores = false is the plain decode: no log-probability, no flag p (as the CPU reports it).
    picks[b].logprob = scores ? logprob[size_t(b)] : std::numeric_limits<float>::quiet_NaN();
    picks[b].p_rf = scores ? p_rf[size_t(b)] : 0.f;
    if (flags.p)
      for (int k = 0; k < K; ++k) flags.p[long(b) * K + k] = scores ? p_flags[size_t(b) * K + k] : 0.f;
  }
}

void DeviceModel::token_scores(const std::vector<DeviceItem>& items, const Flags& flags, float* p_rf,
                               const std::atomic<int>* cancel, float* logprob_next) {
  const int V = vocab(), K = flags.size();
  check_flags(flags, V, "token_scores");
  if (K == 0 && !logprob_next) throw std::invalid_argument("token_scores: the red-flag token is outside the vocabulary");
  std::vector<int32_t> next;
  for (const DeviceItem& it : items)
    for (int t = 0; t < it.n_tokens; ++t) next.push_back(t + 1 < it.n_tokens ? int32_t(it.tokens[t + 1]) : -1);
  const long R = long(next.size());
  const float* hidden = run(items, LogitsMode::hidden, cancel, nullptr);
  if (!hidden) return;
  const cudaStream_t st = as_stream(stream_);
  DeviceScratch& s = *s_;
  const DeviceWeights& w = *w_;
  const long H = config_.hidden;
  const int32_t* d_next = upload_async(s.next, next, st);
  const int32_t* d_flags = upload_async(s.flags, std::vector<int32_t>(flags.ids.begin(), flags.ids.end()), st);
  float* d_p_rf = static_cast<float*>(s.p_rf.ensure(size_t(R) * sizeof(float)));
  float* d_p_flags = flags.p && K > 0 ? static_cast<float*>(s.p_flags.ensure(size_t(R) * K * sizeof(float))) : nullptr;
  float* d_logprob = logprob_next ? static_cast<float*>(s.logprob.ensure(size_t(R) * sizeof(float))) : nullptr;
  const long chunk = std::min(R, kScoreChunk);
  float* logits = static_cast<float*>(s.logits.ensure(size_t(chunk * V) * sizeof(float)));
  const bool flags_on = adapter_enabled_ && !w.flag_tokens.empty();
  // The LM head in chunks of rows: memory stays [chunk, vocab] however long the input.
  for (long r0 = 0; r0 < R; r0 += chunk) {
    if (cancel && cancel->load(std::memory_order_relaxed)) {
      // Cancelled calls leave the sequences as they were, as a cancelled forward does.
      check(cudaStreamSynchronize(st), "token_scores");
      for (const DeviceItem& it : items) it.seq->truncate(it.seq->length() - it.n_tokens);
      throw Cancelled();
    }
    const long rows = std::min(chunk, R - r0);
    head_rows(hidden + r0 * H, rows, logits, flags_on);
    row_scores(logits, int(rows), V, d_flags, K, d_next + r0, d_p_rf + r0, d_p_flags ? d_p_flags + r0 * K : nullptr,
               d_logprob ? d_logprob + r0 : nullptr, st);
  }
  check(cudaMemcpyAsync(p_rf, d_p_rf, size_t(R) * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  if (d_p_flags) check(cudaMemcpyAsync(flags.p, d_p_flags, size_t(R) * K * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  if (d_logprob) check(cudaMemcpyAsync(logprob_next, d_logprob, size_t(R) * sizeof(float), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(st), "token_scores");
}

// The projection an adapter of (layer, target) with these shapes goes on, and its rows there.
DLinear& DeviceModel::lora_target(int layer, const std::string& target, long a_in, long b_out, int rank, LoraSite* site) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  if (layer < 0 || layer >= config_.n_layers) throw std::invalid_argument("LoRA layer out of range");
  *site = lora_site(config_, target);  // model/layout.h
  DLinear& lin = linear(layer, site->index);
  if (lin.w.empty()) throw std::invalid_argument("LoRA " + target + " of layer " + std::to_string(layer) + ": load the weights first");
  if (rank <= 0 || a_in != lin.in || b_out != site->out)
    throw std::invalid_argument("LoRA " + target + " of layer " + std::to_string(layer) + ": A must be [rank, " +
                                std::to_string(lin.in) + "] and B [" + std::to_string(site->out) + ", rank]");
  return lin;
}

void DeviceModel::add_lora(int layer, const std::string& target, const float* A, long a_in, const float* B, long b_out, int rank,
                           float scale) {
  LoraSite site;
  DLinear& lin = lora_target(layer, target, a_in, b_out, rank, &site);
  DLinear::Lora a;
  a.offset = int(site.offset);
  a.out = int(site.out);
  a.rank = rank;
  a.scale = scale;
  a.A.upload(A, size_t(rank) * lin.in * sizeof(float), "a LoRA adapter");
  std::vector<float> b(B, B + size_t(site.out) * rank);
  for (float& v : b) v *= scale;  // (x A^T)(scale B)^T = scale (x A^T) B^T
  a.B.upload(b.data(), b.size() * sizeof(float), "a LoRA adapter");
  lin.lora.push_back(std::move(a));
}

void DeviceModel::merge_lora(int layer, const std::string& target, const float* A, long a_in, const float* B, long b_out,
                             int rank, float scale) {
  LoraSite site;
  DLinear& lin = lora_target(layer, target, a_in, b_out, rank, &site);
  Buffer a, b;
  a.upload(A, size_t(rank) * lin.in * sizeof(float), "a LoRA adapter");
  b.upload(B, size_t(site.out) * rank * sizeof(float), "a LoRA adapter");
  const bool bf16 = dtype_ == DType::bf16;
  char* w = static_cast<char*>(lin.w.get<void>()) + size_t(site.offset) * lin.in * (bf16 ? 2 : 4);  // the target's rows
  const cudaStream_t st = as_stream(stream_);
  merge_lora_rows(w, bf16, int(site.out), lin.in, a.get(), b.get(), rank, scale, st);
  check(cudaGetLastError(), "merge_lora_rows launch");
  check(cudaStreamSynchronize(st), "merge_lora");  // before a and b are freed
  merged_ = true;
}

void DeviceModel::set_adapter_enabled(bool enabled) {
  if (!enabled && merged_)
    throw std::invalid_argument("the model has an adapter merged into its weights: the base model cannot be restored (reload it)");
  adapter_enabled_ = enabled;
}

void DeviceModel::set_token_rows(const std::vector<int>& tokens, const float* embed, const float* head) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  if (tokens.empty()) throw std::invalid_argument("set_token_rows: no token");
  for (size_t k = 0; k < tokens.size(); ++k) {
    if (tokens[k] < 0 || tokens[k] >= config_.vocab) throw std::invalid_argument("red-flag token outside the vocabulary");
    for (size_t j = 0; j < k; ++j)
      if (tokens[j] == tokens[k]) throw std::invalid_argument("red-flag token listed twice");
  }
  DeviceWeights& w = *w_;
  const size_t bytes = tokens.size() * size_t(config_.hidden) * sizeof(float);
  // Every new buffer first, then swapped in: out of memory midway leaves the old rows in place
  // (as the CPU engine's), not flags with no rows.
  const std::vector<int32_t> ids(tokens.begin(), tokens.end());
  Buffer new_ids, new_embed, new_head;
  new_ids.upload(ids.data(), ids.size() * sizeof(int32_t));
  if (embed) new_embed.upload(embed, bytes);
  if (head) new_head.upload(head, bytes);
  w.flag_tokens = tokens;
  w.flag_ids = std::move(new_ids);
  w.flag_embed = std::move(new_embed);
  w.flag_head = std::move(new_head);
}

void DeviceModel::clear_adapters() {
  check(cudaSetDevice(device_), "cudaSetDevice");
  if (merged_)
    throw std::invalid_argument("the model has an adapter merged into its weights: it cannot be removed (reload the model)");
  for (DLayer& L : w_->layers)
    for (DLinear* lin : {&L.qkv, &L.o, &L.mlp_in, &L.mlp_out}) lin->lora.clear();
  w_->flag_tokens.clear();
  w_->flag_ids.reset();
  w_->flag_embed.reset();
  w_->flag_head.reset();
}

}  // namespace rf::cuda
