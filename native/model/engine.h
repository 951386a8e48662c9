// The inference surface that both engines offer: the CPU's rf::Model (native/model) and the
// CUDA rf::cuda::DeviceModel (native/cuda). The Node-API layer (native/napi/addon.cpp) is written
// once against it; which engine a model gets is chosen when it is made (device -1: the CPU).
// Each engine also makes the trainer that works on its weights (EngineTrainer).
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/config.h"
#include "model/decode.h"
#include "model/model.h"
#include "model/train.h"

namespace rf {

// One sequence's keys and values in an engine: a contiguous cache on the CPU, a block table
// into the device's paged pool on the GPU.
class EngineSequence {
 public:
  virtual ~EngineSequence() = default;
  virtual long length() const = 0;
  // Bytes its cache holds now (for the scheduler's memory accounting).
  virtual size_t bytes() const = 0;
  // Room for at least n positions now, so a generation that reserved its budget never grows
  // later (the CPU allocates exactly n; the paged cache whole blocks). Throws when it cannot.
  virtual void reserve(long n) = 0;
  // Forgets positions from n on (n <= length).
  virtual void truncate(long n) = 0;
};

// One sequence to advance and its new tokens (host memory), with an optional [n_tokens, hidden]
// perturbation of their input embeddings.
struct EngineItem {
  EngineSequence* seq;
  const uint32_t* tokens;
  int n_tokens;
  const float* embed_delta = nullptr;
};

// A trainer on an engine's weights: rf::Trainer (model/train.h) on the CPU,
// rf::cuda::DeviceTrainer (cuda/device_trainer.h) on a GPU. The same options, loss rows, terms
// and parameter names on both.
class EngineTrainer {
 public:
  virtual ~EngineTrainer() = default;
  virtual LossTerms step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                         const std::vector<LossRow>& rows, const LossOptions& options, const std::atomic<int>* cancel) = 0;
  virtual double optimizer_step(const AdamWOptions& options) = 0;
  // The trainable parameters with current host values, gradients and moments (a GPU trainer
  // copies them from the device first, once per change).
  virtual std::vector<Param*> params() = 0;
  // After writing through params(): the trainer takes the new values (and the engine's copies).
  virtual void params_changed() = 0;
  virtual long trainable_count() const = 0;
  virtual void set_step_count(long n) = 0;
  // Data-parallel training: joins the group `id` (cuda::new_collective_id) as `rank` of `world`;
  // from then on each optimizer step sums the gradients over the group. GPU trainers only.
  virtual void join_group(const std::string& id, int rank, int world) = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const ModelConfig& config() const = 0;
  int vocab() const { return config().vocab; }
  virtual DType dtype() const = 0;
  virtual size_t weight_bytes() const = 0;
  // Host threads the engine runs on (the GPU engine: 1).
  virtual int threads() const = 0;
  // "cpu" or "cuda:N".
  virtual std::string device() const = 0;
  // Positions a sequence's cache grows by: 1 for the CPU's exact caches, the block size of a
  // paged cache (what a reservation of n positions really takes is n rounded up to it).
  virtual int kv_block_tokens() const { return 1; }
  // Bytes one position takes in a sequence's cache, every layer's K and V: f32 on the CPU; the
  // GPU's cache holds the weights' dtype.
  virtual size_t kv_bytes_per_position() const {
    const ModelConfig& c = config();
    return size_t(2) * c.n_layers * c.n_kv_heads * c.head_dim * sizeof(float);
  }
  // The paged cache's pool for all sequences together (the GPU's; the CPU allocates per
  // sequence and ignores it). Only while no sequence is alive.
  virtual void set_kv_pool_bytes(size_t /*bytes*/) {}

  // Model::load_tensor's names and shapes.
  virtual void load_tensor(const std::string& name, const void* data, SrcType type, const std::vector<long>& shape,
                           bool src_is_kn) = 0;
  virtual void check_complete() const = 0;
  virtual std::shared_ptr<EngineSequence> new_sequence() = 0;

  // As Model::forward, rf::decode_step and rf::token_scores (model/model.h, model/decode.h).
  virtual void forward(const std::vector<EngineItem>& items, LogitsMode mode, float* out, const std::atomic<int>* cancel,
                       const std::function<void(int, int)>& progress) = 0;
  virtual void decode_step(const std::vector<EngineItem>& items, const std::vector<PickParams>& params, const Flags& flags,
                           int top_n, Pick* picks, uint32_t* top_ids, float* top_logprobs, const std::atomic<int>* cancel,
                           bool scores) = 0;
  virtual void token_scores(const std::vector<EngineItem>& items, const Flags& flags, float* p_rf,
                            const std::atomic<int>* cancel, float* logprob_next) = 0;

  // Adapters (host arrays, copied): LoRA A [rank, in] and B [out, rank] on `target` (PEFT name)
  // of block `layer`; the flag rows [K, hidden] each (either may be null).
  virtual void add_lora(int layer, const std::string& target, const float* A, long a_size, const float* B, long b_size,
                        int rank, float scale) = 0;
  virtual void set_token_rows(const std::vector<int>& tokens, const float* embed, const float* head) = 0;
  virtual void clear_adapters() = 0;
  virtual void set_adapter_enabled(bool enabled) = 0;
  // The LoRA adapter folded into the weight instead of applied live (PEFT's merge_and_unload;
  // add_lora's arguments): irreversible. Only the CUDA engine merges (where a live adapter costs
  // two small products per projection and step); the CPU engine applies adapters live.
  virtual void merge_lora(int layer, const std::string& target, const float* A, long a_size, const float* B, long b_size,
                          int rank, float scale) {
    (void)layer, (void)target, (void)A, (void)a_size, (void)B, (void)b_size, (void)rank, (void)scale;
    throw std::invalid_argument("merging an adapter into the weights is done on the CUDA engine only (the CPU engine applies it live)");
  }

  // A trainer on this engine's weights (the engine must outlive it).
  virtual std::unique_ptr<EngineTrainer> new_trainer(const TrainOptions& options) = 0;
};

// The CPU engine over a Model (shared with the trainer, which works on the same weights).
std::shared_ptr<Engine> make_cpu_engine(std::shared_ptr<Model> model);

// The CUDA engine on GPU `device` (native/cuda/cuda_engine.cu; only in builds with cuBLASLt,
// RF_HAVE_CUBLASLT).
std::shared_ptr<Engine> make_cuda_engine(const ModelConfig& config, DType dtype, int device);

}  // namespace rf
