// The CPU engine behind the Engine interface (model/engine.h): a thin forwarding layer over
// rf::Model, rf::decode_step and rf::token_scores, whose sequences are contiguous KvCaches.
#include <stdexcept>

#include "model/decode.h"
#include "model/engine.h"

namespace rf {

namespace {

class CpuSequence : public EngineSequence {
 public:
  explicit CpuSequence(KvCache cache) : cache_(std::move(cache)) {}
  long length() const override { return cache_.length(); }
  size_t bytes() const override { return cache_.bytes(); }
  void reserve(long n) override { cache_.reserve(n, true); }
  void truncate(long n) override { cache_.truncate(n); }
  KvCache& cache() { return cache_; }

 private:
  KvCache cache_;
};

class CpuTrainer : public EngineTrainer {
 public:
  CpuTrainer(Model& model, const TrainOptions& options) : t_(model, options) {}
  LossTerms step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference, const std::vector<LossRow>& rows,
                 const LossOptions& options, const std::atomic<int>* cancel) override {
    return t_.step(batch, reference, rows, options, cancel);
  }
  double optimizer_step(const AdamWOptions& options) override { return t_.optimizer_step(options); }
  std::vector<Param*> params() override { return t_.params(); }
  void params_changed() override { t_.params_changed(); }
  long trainable_count() const override { return t_.trainable_count(); }
  void set_step_count(long n) override { t_.set_step_count(n); }
  void join_group(const std::string&, int, int) override {
    throw std::invalid_argument("data-parallel training runs on GPUs (device 'cuda:N', one process per GPU), not on the CPU");
  }

 private:
  Trainer t_;
};

class CpuEngine : public Engine {
 public:
  explicit CpuEngine(std::shared_ptr<Model> model) : m_(std::move(model)) {}

  const ModelConfig& config() const override { return m_->config(); }
  DType dtype() const override { return m_->dtype(); }
  size_t weight_bytes() const override { return m_->weight_bytes(); }
  int threads() const override { return m_->threads(); }
  std::string device() const override { return "cpu"; }
  std::unique_ptr<EngineTrainer> new_trainer(const TrainOptions& options) override {
    return std::make_unique<CpuTrainer>(*m_, options);
  }

  void load_tensor(const std::string& name, const void* data, SrcType type, const std::vector<long>& shape,
                   bool src_is_kn) override {
    m_->load_tensor(name, data, type, shape, src_is_kn);
  }
  void check_complete() const override { m_->check_complete(); }
  std::shared_ptr<EngineSequence> new_sequence() override { return std::make_shared<CpuSequence>(m_->new_cache()); }

  void forward(const std::vector<EngineItem>& items, LogitsMode mode, float* out, const std::atomic<int>* cancel,
               const std::function<void(int, int)>& progress) override {
    m_->forward(cpu_items(items), mode, out, cancel, progress);
  }
  void decode_step(const std::vector<EngineItem>& items, const std::vector<PickParams>& params, const Flags& flags, int top_n,
                   Pick* picks, uint32_t* top_ids, float* top_logprobs, const std::atomic<int>* cancel, bool scores) override {
    rf::decode_step(*m_, cpu_items(items), params, flags, top_n, picks, top_ids, top_logprobs, logits_, cancel, scores);
  }
  void token_scores(const std::vector<EngineItem>& items, const Flags& flags, float* p_rf, const std::atomic<int>* cancel,
                    float* logprob_next) override {
    rf::token_scores(*m_, cpu_items(items), flags, p_rf, cancel, logprob_next);
  }

  void add_lora(int layer, const std::string& target, const float* A, long a_size, const float* B, long b_size, int rank,
                float scale) override {
    if (rank <= 0 || a_size % rank || b_size % rank) throw std::invalid_argument("LoRA shapes do not match the rank");
    const std::string pre = "layers." + std::to_string(layer) + "." + target + ".";
    const size_t before = m_->param_count();
    try {
      Param* a = m_->new_param(pre + "lora_A", {rank, a_size / rank});
      Param* b = m_->new_param(pre + "lora_B", {b_size / rank, rank});
      a->value.assign(A, A + a_size);
      b->value.assign(B, B + b_size);
      m_->add_lora(layer, target, a, b, scale);
    } catch (...) {
      m_->drop_params_from(before);  // refused: nothing of it stays
      throw;
    }
  }
  void set_token_rows(const std::vector<int>& tokens, const float* embed, const float* head) override {
    const long n = long(tokens.size()) * m_->config().hidden;
    Param* rows[2] = {nullptr, nullptr};
    const float* data[2] = {embed, head};
    const char* names[2] = {"rf.embed", "rf.head"};
    const size_t before = m_->param_count();
    try {
      for (int i = 0; i < 2; ++i) {
        if (!data[i]) continue;
        rows[i] = m_->new_param(names[i], {n}, false);
        rows[i]->value.assign(data[i], data[i] + n);
      }
      m_->set_token_rows(tokens, rows[0], rows[1]);
    } catch (...) {
      m_->drop_params_from(before);  // refused: nothing of it stays
      throw;
    }
  }
  void clear_adapters() override { m_->clear_adapters(); }
  void set_adapter_enabled(bool enabled) override { m_->set_adapter_enabled(enabled); }

 private:
  // The callers (the addon) pass only sequences this engine made.
  static std::vector<ForwardItem> cpu_items(const std::vector<EngineItem>& items) {
    std::vector<ForwardItem> out;
    out.reserve(items.size());
    for (const EngineItem& it : items)
      out.push_back({&static_cast<CpuSequence*>(it.seq)->cache(), it.tokens, it.n_tokens, it.embed_delta});
    return out;
  }

  std::shared_ptr<Model> m_;
  std::vector<float> logits_;  // decode_step's logits rows, kept between steps
};

}  // namespace

std::shared_ptr<Engine> make_cpu_engine(std::shared_ptr<Model> model) { return std::make_shared<CpuEngine>(std::move(model)); }

}  // namespace rf
