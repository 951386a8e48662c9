// The CUDA model engine: the inference half of rf::Model (native/model/model.h) on one GPU.
// Weights live on the device (bf16 by default, f32 on request; tied embeddings are one buffer),
// LoRA adapters and the flag rows are applied on the device, and keys and values (in the
// weights' dtype, bf16 or f32) live in a paged pool of fixed-size blocks (native/model/block_pool.h) that sequences take as they grow
// and give back when freed. The block is the same as the CPU's, op for op: norms, rope, the
// cuBLASLt products (native/cuda/gemm.h), paged attention (attention.h) and the glue kernels
// (model_ops.h); decode_step ends with the fused pick (ops.h: token, log-prob, flag p's on the
// device, so a few numbers per sequence cross to the host).
//
// Calls are not re-entrant (the addon serialises them per model, as for the CPU engine).
// Errors throw std::runtime_error / std::invalid_argument naming the call; nothing is left
// half-appended: a sequence's length changes only when a forward has finished.
#pragma once
#include <cuda_bf16.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/block_pool.h"
#include "model/config.h"
#include "model/decode.h"
#include "model/layout.h"
#include "model/model.h"

namespace rf::cuda {

class KvPool;
struct DLinear;
struct DeviceWeights;
struct DeviceScratch;
class GemmContext;
struct DeviceTrace;
struct DeviceLayerTrace;
struct DNorm;
struct GemvLora;
struct GemvAppend;
struct SwigluLora;
class Buffer;
class DeviceTrainer;
struct DecodeGraphs;

// One sequence's keys and values: its block table in the model's pool, and its length.
// Destroying it returns its blocks.
class DeviceSequence {
 public:
  ~DeviceSequence();
  long length() const { return length_; }
  // Token slots its blocks hold, and their bytes (every layer, K and V).
  long capacity() const;
  size_t bytes() const;
  // Holds at least n positions now (whole blocks); throws when the pool has too few free.
  void reserve(long n);
  // Forgets positions from n on (n <= length) and returns the blocks past them.
  void truncate(long n);

 private:
  friend class DeviceModel;
  explicit DeviceSequence(std::shared_ptr<KvPool> pool) : pool_(std::move(pool)) {}
  std::shared_ptr<KvPool> pool_;
  BlockTable table_;
  long length_ = 0;
};

// One sequence to advance: its new tokens (host memory), and an optional [n_tokens, hidden]
// host array added to their input embeddings.
struct DeviceItem {
  DeviceSequence* seq;
  const uint32_t* tokens;
  int n_tokens;
  const float* embed_delta = nullptr;
};

class DeviceModel {
 public:
  static constexpr int kBlockTokens = 16;  // token slots per KV block

  // Selects GPU `device` for this model (every call switches to it first).
  DeviceModel(const ModelConfig& config, DType dtype, int device);
  ~DeviceModel();
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  const ModelConfig& config() const { return config_; }
  DType dtype() const { return dtype_; }
  int vocab() const { return config_.vocab; }
  int device() const { return device_; }
  size_t weight_bytes() const;

  // The CPU engine's tensor names and shapes (Model::load_tensor); converted on the host to the
  // engine's dtype (and transposed from [in, out] when src_is_kn), then uploaded.
  void load_tensor(const std::string& name, const void* data, SrcType type, const std::vector<long>& shape,
                   bool src_is_kn);
  void check_complete() const;

  // Bytes of the KV pool, shared by all this model's sequences (default 2 GiB, allocated when the
  // first sequence is made); set here, allocated at once (rf::OutOfMemory now, not at the first
  // request). May change while no sequence is alive.
  void set_kv_pool_bytes(size_t bytes);
  // Bytes one position takes in the pool (K and V of every layer, in the weights' dtype).
  size_t kv_bytes_per_position() const;
  std::shared_ptr<DeviceSequence> new_sequence();

  // As Model::forward: appends every item's tokens, writes host logits [rows, vocab] (rows: all
  // new tokens, or the last of each item) or final-norm hidden states [rows, hidden].
  void forward(const std::vector<DeviceItem>& items, LogitsMode mode, float* out,
               const std::atomic<int>* cancel = nullptr, const std::function<void(int, int)>& progress = nullptr);
  // As rf::decode_step (model/decode.h): rows are picked on the device (greedy, temperature,
  // top-k and top-p up to cuda/ops.h's kPickMaxCandidates); rows with top_n, or a larger
  // nucleus, copy their logits row back and take the CPU pick, which draws the same numbers.
  void decode_step(const std::vector<DeviceItem>& items, const std::vector<PickParams>& params, const Flags& flags,
                   int top_n, Pick* picks, uint32_t* top_ids, float* top_logprobs,
                   const std::atomic<int>* cancel = nullptr, bool scores = true);
  // As rf::token_scores: teacher-forced flag p after every token (and the next token's
  // log-probability), the LM head in row chunks on the device.
  void token_scores(const std::vector<DeviceItem>& items, const Flags& flags, float* p_rf,
                    const std::atomic<int>* cancel = nullptr, float* logprob_next = nullptr);

  // Adapters, as Model::add_lora / set_token_rows (host arrays, copied): A [rank, a_in] and
  // B [b_out, rank], which must be the projection's input size and the target's output size.
  void add_lora(int layer, const std::string& target, const float* A, long a_in, const float* B, long b_out, int rank,
                float scale);
  void set_token_rows(const std::vector<int>& tokens, const float* embed, const float* head);
  // The adapter folded into the projection's weight instead (PEFT's merge_and_unload; same
  // arguments as add_lora): inference then runs no LoRA product at all. The weight becomes the
  // merged checkpoint's (lib/train/merge.ts) bit for bit when the checkpoint has the engine's
  // dtype. It cannot be undone: afterwards clear_adapters and set_adapter_enabled(false) throw
  // (the base model is gone; reload it), and so does a trainer's reference forward.
  void merge_lora(int layer, const std::string& target, const float* A, long a_in, const float* B, long b_out, int rank,
                  float scale);
  bool merged() const { return merged_; }
  void clear_adapters();
  void set_adapter_enabled(bool enabled);

  // Decode steps (one new token per sequence, logits of the last rows) run as CUDA graphs: the
  // first step of a shape runs eagerly (sizing the scratch), the second captures its launches
  // (embedding, every layer, the LM head and the fused pick) into a graph, later ones replay it
  // with one launch. A graph serves one (sequences, attention length bucket, flag count) and
  // is retired when any buffer, adapter or pool it reads changes. On by default;
  // RF_CUDA_GRAPHS=0 in the environment or set_graphs(false) turns it off.
  // last_nodes: the nodes (kernels, copies) of the graph captured last: a decode step's launches.
  struct GraphStats {
    long eager = 0, captures = 0, replays = 0, last_nodes = 0;
  };
  void set_graphs(bool on);
  GraphStats graph_stats() const;
  // Products of a step's few rows (up to cuda/gemv.h's kGemvMaxRows: decode) go through gemv_rows,
  // with the norm, the adapters' up products and the SwiGLU fused in, instead of cuBLASLt, and up
  // to kLoraMaxRows a projection's adapters take two launches (lora_down_rows, lora_up_rows), not
  // two cuBLASLt products each. On by default; RF_CUDA_GEMV=0 in the environment or
  // set_gemv(false) turns both off (the benchmark measures both ways).
  void set_gemv(bool on);

 private:
  friend class DeviceTrainer;  // runs traced forwards, reads the weights, keeps its adapters current
  // The forward on the device: returns device logits [rows, vocab] (or hidden [rows, hidden]).
  // With a trace (mode hidden only), also keeps what the backward needs (device_model_impl.h).
  // tail: more device work after the logits (decode_step's pick), part of a decode graph; key
  // tells tails apart (0: none).
  struct Tail {
    int key = 0;
    std::function<void(const float* logits)> enqueue;
  };
  const float* run(const std::vector<DeviceItem>& items, LogitsMode mode, const std::atomic<int>* cancel,
                   const std::function<void(int, int)>& progress, DeviceTrace* trace = nullptr, const Tail* tail = nullptr);
  // Runs enqueue (the device work of a decode step) as the graph of its shape (see set_graphs).
  void launch_decode_graph(int n, int attn_length, int tail_key, const std::function<void(bool capturing)>& enqueue);
  // A hash of everything a captured graph reads by address or bakes in: every scratch buffer,
  // weight, adapter and the KV pool; a graph replays only while it is unchanged.
  uint64_t graph_signature() const;
  void check_items(const std::vector<DeviceItem>& items) const;
  // The forward's pieces (device_model.cu): the device tables of a forward's rows (into the
  // scratch's plan, reserving the sequences' blocks first), one block from x [R, hidden] to x_out
  // (x itself: in place; traced, x is lt's x_in, and x_out must not be x; null: the trace alone,
  // the last product skipped) (appending the rows' keys and values to the cache, or, append_kv
  // false, reading the cache as it is: a recomputation after the forward; traced into lt), a
  // norm, a projection with its adapters, and a copy into a trace buffer (f32, or the engine's
  // dtype).
  void plan_forward(const std::vector<DeviceItem>& items);
  void layer_forward(int layer, const float* x, float* x_out, DeviceLayerTrace* lt, const DeviceTrace* trace, bool append_kv);
  void norm_rows(const DNorm& norm, const float* in, float* out, long rows, __nv_bfloat16* out_bf16 = nullptr);
  // norm (optional, where head_fuses_norm): xn is the final norm's input, which the decode
  // products normalize as they read it (gemv.h, set_flag_logits), the same bits as norm_rows first.
  void head_rows(const float* xn, long rows, float* logits, bool flags, const __nv_bfloat16* xn_bf16 = nullptr,
                 const DNorm* norm = nullptr);
  bool head_fuses_norm(const float* x, long rows) const;
  // glu_up (optional; SwiGLU's gate|up projection): where swiglu_lora_applies, the adapters' up
  // products are not added to y but left to swiglu_rows: glu_up[0] gets the gate half's, [1] the
  // up half's (a half without an adapter is left as it was).
  // y16 (optional; bf16 weights, no bias, not accumulated, the adapters left to glu_up): y written
  // in bf16 instead (matmul_bf16), y unused.
  void linear_rows(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows, float* y, const float* addend,
                   int layer, int index, const DeviceTrace* trace, DeviceLayerTrace* lt, size_t* u_next,
                   SwigluLora* glu_up = nullptr, __nv_bfloat16* y16 = nullptr);
  // Whether the SwiGLU block's gate|up product is written in bf16 (linear_rows' y16): a trainer's
  // forward (bf16_mlp_), bf16 weights, no bias, every adapter left to swiglu_rows.
  bool mlp_bf16_applies(const DLinear& lin, long rows, const DeviceTrace* trace) const;
  bool swiglu_lora_applies(const DLinear& lin) const;
  bool lora_batched(const DLinear& lin, long rows, const DeviceTrace* trace) const;
  // Whether linear_rows reads lin's f32 input at these rows: always for f32 weights; for bf16 only
  // where an adapter's down product does (a batched decode step's lora_down_all, or a rank past
  // the fused kernel's), the product and the fused down kernel reading its bf16 operand. Where it
  // does not, the kernel that makes the input writes its bf16 copy alone (in may be null).
  bool reads_f32_input(const DLinear& lin, long rows, const DeviceTrace* trace) const;
  // linear_rows through gemv_rows: whether it applies (untraced, few rows, operands it takes, at
  // most kGemvMaxLora adapters; norm: RMSNorm fused, in is then the f32 residual stream), and the
  // product with its adapters; glu: y [rows, I] is the SwiGLU of the gate|up outputs, y_bf16
  // (optional) y rounded to bf16 too; norm (optional): the block's RMSNorm applied to in first;
  // append (optional, QKV): rope and kv_append's cache writes in the product's epilogue.
  bool gemv_applies(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows, const DeviceTrace* trace,
                    bool norm = false) const;
  void linear_rows_gemv(const DLinear& lin, const float* in, const __nv_bfloat16* in_bf16, long rows, float* y, bool accumulate,
                        bool glu, __nv_bfloat16* y_bf16 = nullptr, const DNorm* norm = nullptr,
                        const GemvAppend* append = nullptr);
  // Every adapter's down product of lin from its f32 input in one launch (gemv.h's
  // lora_down_rows; norm_w: its RMSNorm fused); up[] gets their up-product terms; returns how many.
  int lora_down_all(const DLinear& lin, const float* in, long rows, const float* norm_w, GemvLora* up);
  void keep_rows(Buffer& b, const float* src, long n);
  // Into a trace buffer in the engine's dtype (bf16 models: rounded to bf16).
  void keep_values(Buffer& b, const float* src, long n);
  // The MLP's activation: act [rows, I] from mlp [rows, MLP_IN] (act may be mlp for gelu_new);
  // act_bf16 (optional): act rounded to bf16 as well. SwiGLU only: glu_up (optional) the
  // deferred adapters (linear_rows), added to mlp as it is read. mlp_bf16 (optional): mlp rounded
  // to bf16 as it is read (with glu_up's terms added).
  void activation_rows(const float* mlp, float* act, long rows, __nv_bfloat16* act_bf16 = nullptr,
                       const SwigluLora* glu_up = nullptr, __nv_bfloat16* mlp_bf16 = nullptr);
  // The same from a bf16 mlp (the trace's copy, or a bf16 gate|up product): the bits the f32
  // version gives on its widening.
  void activation_rows(const __nv_bfloat16* mlp, float* act, long rows, __nv_bfloat16* act_bf16 = nullptr,
                       const SwigluLora* glu_up = nullptr);
  // A block's projection by index (0 qkv, 1 o, 2 mlp_in, 3 mlp_out, as in model/layout.h).
  DLinear& linear(int layer, int index) const;
  // add_lora's and merge_lora's checks: the projection of (layer, target), its site in *site.
  DLinear& lora_target(int layer, const std::string& target, long a_in, long b_out, int rank, LoraSite* site);
  // Whether prefill attention runs on the tensor cores: bf16 weights (their activations carry
  // bf16 error already) and a head_dim the kernels take. Traced, it keeps its log-sum-exp for
  // the trainer's tensor-core backward, so forward and backward round alike.
  bool tc_attention() const;

  ModelConfig config_;
  DType dtype_;
  int device_;
  bool adapter_enabled_ = true;
  // Set by the trainer for its forwards (training's mixed precision, as autocast's): the SwiGLU's
  // gate|up product written in bf16 (mlp_bf16_applies). Inference keeps it in f32, so that a
  // batch's rows equal each sequence's alone (decode's gemv_rows keeps f32) up to f32 rounding.
  bool bf16_mlp_ = false;
  bool merged_ = false;  // an adapter was merged into the weights
  size_t kv_pool_bytes_ = size_t(2) << 30;
  std::shared_ptr<KvPool> pool_;
  std::unique_ptr<DeviceWeights> w_;
  std::unique_ptr<DeviceScratch> s_;
  std::unique_ptr<GemmContext> gemm_;
  std::unique_ptr<DecodeGraphs> graphs_;
  bool graphs_on_ = true;
  bool gemv_on_ = true;
  void* stream_ = nullptr;  // cudaStream_t
};

}  // namespace rf::cuda
