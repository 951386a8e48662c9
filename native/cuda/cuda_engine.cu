// The CUDA engine behind the Engine interface (model/engine.h): DeviceModel's calls, with
// DeviceSequence as the engine's sequences. Needs cuBLASLt (it links gemm.cu through
// DeviceModel), so it builds only with it.
#include "cuda/collective.h"
#include "cuda/device_model.h"
#include "cuda/device_trainer.h"
#include "model/engine.h"

namespace rf {

namespace {

class CudaSequence : public EngineSequence {
 public:
  explicit CudaSequence(std::shared_ptr<cuda::DeviceSequence> s) : s_(std::move(s)) {}
  long length() const override { return s_->length(); }
  size_t bytes() const override { return s_->bytes(); }
  void reserve(long n) override { s_->reserve(n); }
  void truncate(long n) override { s_->truncate(n); }
  cuda::DeviceSequence* get() { return s_.get(); }

 private:
  std::shared_ptr<cuda::DeviceSequence> s_;
};

// The host copies of the parameters are refreshed from the device when asked for after a change.
class CudaTrainer : public EngineTrainer {
 public:
  CudaTrainer(cuda::DeviceModel& model, const TrainOptions& options) : t_(model, options), device_(model.device()) {}
  LossTerms step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference, const std::vector<LossRow>& rows,
                 const LossOptions& options, const std::atomic<int>* cancel) override {
    host_current_ = false;
    return t_.step(batch, reference, rows, options, cancel);
  }
  double optimizer_step(const AdamWOptions& options) override {
    host_current_ = false;
    return t_.optimizer_step(options);
  }
  std::vector<Param*> params() override {
    if (!host_current_) {
      t_.download();
      host_current_ = true;
    }
    return t_.params();
  }
  // Writes go through params(), which makes the host copies current first: stale copies mean
  // nothing was written since, and there is nothing to upload.
  void params_changed() override {
    if (host_current_) t_.params_changed();
  }
  long trainable_count() const override { return t_.trainable_count(); }
  void set_step_count(long n) override { t_.set_step_count(n); }
  void join_group(const std::string& id, int rank, int world) override {
    t_.set_collective(std::make_shared<cuda::Collective>(id, rank, world, device_));
  }

 private:
  cuda::DeviceTrainer t_;
  int device_;
  bool host_current_ = true;  // the trainer starts with its host values uploaded
};

class CudaEngine : public Engine {
 public:
  CudaEngine(const ModelConfig& config, DType dtype, int device) : m_(config, dtype, device) {}

  const ModelConfig& config() const override { return m_.config(); }
  DType dtype() const override { return m_.dtype(); }
  size_t weight_bytes() const override { return m_.weight_bytes(); }
  int threads() const override { return 1; }
  std::string device() const override { return "cuda:" + std::to_string(m_.device()); }
  int kv_block_tokens() const override { return cuda::DeviceModel::kBlockTokens; }
  size_t kv_bytes_per_position() const override { return m_.kv_bytes_per_position(); }
  void set_kv_pool_bytes(size_t bytes) override { m_.set_kv_pool_bytes(bytes); }

  void load_tensor(const std::string& name, const void* data, SrcType type, const std::vector<long>& shape,
                   bool src_is_kn) override {
    m_.load_tensor(name, data, type, shape, src_is_kn);
  }
  void check_complete() const override { m_.check_complete(); }
  std::shared_ptr<EngineSequence> new_sequence() override { return std::make_shared<CudaSequence>(m_.new_sequence()); }

  void forward(const std::vector<EngineItem>& items, LogitsMode mode, float* out, const std::atomic<int>* cancel,
               const std::function<void(int, int)>& progress) override {
    m_.forward(device_items(items), mode, out, cancel, progress);
  }
  void decode_step(const std::vector<EngineItem>& items, const std::vector<PickParams>& params, const Flags& flags, int top_n,
                   Pick* picks, uint32_t* top_ids, float* top_logprobs, const std::atomic<int>* cancel, bool scores) override {
    m_.decode_step(device_items(items), params, flags, top_n, picks, top_ids, top_logprobs, cancel, scores);
  }
  void token_scores(const std::vector<EngineItem>& items, const Flags& flags, float* p_rf, const std::atomic<int>* cancel,
                    float* logprob_next) override {
    m_.token_scores(device_items(items), flags, p_rf, cancel, logprob_next);
  }

  void add_lora(int layer, const std::string& target, const float* A, long a_size, const float* B, long b_size, int rank,
                float scale) override {
    if (rank <= 0 || a_size % rank || b_size % rank) throw std::invalid_argument("LoRA shapes do not match the rank");
    m_.add_lora(layer, target, A, a_size / rank, B, b_size / rank, rank, scale);
  }
  void set_token_rows(const std::vector<int>& tokens, const float* embed, const float* head) override {
    m_.set_token_rows(tokens, embed, head);
  }
  void merge_lora(int layer, const std::string& target, const float* A, long a_size, const float* B, long b_size, int rank,
                  float scale) override {
    if (rank <= 0 || a_size % rank || b_size % rank) throw std::invalid_argument("LoRA shapes do not match the rank");
    m_.merge_lora(layer, target, A, a_size / rank, B, b_size / rank, rank, scale);
  }
  void clear_adapters() override { m_.clear_adapters(); }
  void set_adapter_enabled(bool enabled) override { m_.set_adapter_enabled(enabled); }
  std::unique_ptr<EngineTrainer> new_trainer(const TrainOptions& options) override {
    return std::make_unique<CudaTrainer>(m_, options);
  }

 private:
  static std::vector<cuda::DeviceItem> device_items(const std::vector<EngineItem>& items) {
    std::vector<cuda::DeviceItem> out;
    out.reserve(items.size());
    for (const EngineItem& it : items)
      out.push_back({static_cast<CudaSequence*>(it.seq)->get(), it.tokens, it.n_tokens, it.embed_delta});
    return out;
  }

  cuda::DeviceModel m_;
};

}  // namespace

std::shared_ptr<Engine> make_cuda_engine(const ModelConfig& config, DType dtype, int device) {
  return std::make_shared<CudaEngine>(config, dtype, device);
}

}  // namespace rf
