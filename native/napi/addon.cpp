// The Node-API surface of the engine. Bindings only: argument checks that need native
// knowledge, then work handed to model/ on a worker thread. lib/native.ts is the one
// typed module that calls this; it validates arguments before they get here.
#include <napi.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "core/cpu.h"
#include "model/decode.h"
#include "model/engine.h"
#include "model/model.h"
#include "model/train.h"
#include "napi/bench.h"
#include "napi/worker.h"
#ifdef RF_HAVE_CUDA
#include "cuda/collective.h"
#include "cuda/cuda.h"
#endif

namespace rf::napi {
namespace {

// Ends a worker's hold on the model however the work ends: clears the busy flag (so the next
// call may start) and releases the progress callback, if there is one.
struct BusyRelease {
  std::shared_ptr<std::atomic<bool>> busy;
  std::shared_ptr<Napi::ThreadSafeFunction> progress = nullptr;
  ~BusyRelease() {
    busy->store(false);
    if (progress) progress->Release();
  }
};

// The sequences a call works on, marked in use from the moment it takes them until its work ends
// (or it fails to start): their caches must not be re-laid-out (reserve) or cut (truncate) while
// the worker thread writes them.
struct SequencesInUse {
  std::vector<std::shared_ptr<std::atomic<int>>> calls;
  std::atomic<bool> released{false};
  void release() {
    if (released.exchange(true)) return;
    for (auto& c : calls) c->fetch_sub(1);
  }
  ~SequencesInUse() { release(); }
};
struct InUseRelease {
  std::shared_ptr<SequencesInUse> in_use;
  ~InUseRelease() { in_use->release(); }
};

int get_int(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw std::invalid_argument(std::string("config.") + key + " must be a number");
  return v.As<Napi::Number>().Int32Value();
}
double get_double(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw std::invalid_argument(std::string("config.") + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}
bool get_bool(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) throw std::invalid_argument(std::string("config.") + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}
std::string get_string(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsString()) throw std::invalid_argument(std::string("config.") + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

ModelConfig parse_config(const Napi::Object& o) {
  ModelConfig c;
  const std::string arch = get_string(o, "arch");
  if (arch == "llama") c.arch = Arch::llama;
  else if (arch == "gpt2") c.arch = Arch::gpt2;
  else throw std::invalid_argument("config.arch must be llama or gpt2");
  c.vocab = get_int(o, "vocab");
  c.hidden = get_int(o, "hidden");
  c.intermediate = get_int(o, "intermediate");
  c.n_layers = get_int(o, "nLayers");
  c.n_heads = get_int(o, "nHeads");
  c.n_kv_heads = get_int(o, "nKvHeads");
  c.head_dim = get_int(o, "headDim");
  c.max_positions = get_int(o, "maxPositions");
  c.norm = get_string(o, "norm") == "layer" ? NormType::layer : NormType::rms;
  c.norm_eps = float(get_double(o, "normEps"));
  c.act = get_string(o, "act") == "gelu_new" ? Activation::gelu_new : Activation::silu;
  c.rope = get_bool(o, "rope");
  c.rope_theta = get_double(o, "ropeTheta");
  const std::string scaling = get_string(o, "ropeScaling");
  if (scaling == "none") c.rope_scaling = RopeScaling::none;
  else if (scaling == "linear") c.rope_scaling = RopeScaling::linear;
  else if (scaling == "dynamic") c.rope_scaling = RopeScaling::dynamic;
  else if (scaling == "llama3") c.rope_scaling = RopeScaling::llama3;
  else throw std::invalid_argument("config.ropeScaling must be none, linear, dynamic or llama3");
  c.rope_factor = get_double(o, "ropeFactor");
  c.rope_low_freq_factor = get_double(o, "ropeLowFreqFactor");
  c.rope_high_freq_factor = get_double(o, "ropeHighFreqFactor");
  c.rope_original_max_positions = get_int(o, "ropeOriginalMaxPositions");
  c.qkv_bias = get_bool(o, "qkvBias");
  c.qk_norm = get_bool(o, "qkNorm");
  c.o_bias = get_bool(o, "oBias");
  c.mlp_bias = get_bool(o, "mlpBias");
  c.tied_embeddings = get_bool(o, "tiedEmbeddings");
  c.sliding_window = get_int(o, "slidingWindow");
  return c;
}

// KV caches made by newSequence() and not yet freed, in every model of the process: a leak
// check for the scheduler's paths (disconnects, cancels, errors) that RSS cannot give.
std::atomic<long> g_live_sequences{0};

class SequenceWrap : public Napi::ObjectWrap<SequenceWrap> {
 public:
  // The class of this Node environment (the main thread's, or a worker_thread's): each loads
  // the addon for itself, so the constructor is per-environment instance data, not a static.
  static Napi::Function Ctor(Napi::Env env) { return env.GetInstanceData<Napi::FunctionReference>()->Value(); }

  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeSequence",
                       {InstanceAccessor<&SequenceWrap::Length>("length"),
                        InstanceAccessor<&SequenceWrap::Bytes>("bytes"),
                        InstanceMethod<&SequenceWrap::Truncate>("truncate"),
                        InstanceMethod<&SequenceWrap::Reserve>("reserve"),
                        InstanceMethod<&SequenceWrap::Dispose>("dispose")});
  }

  explicit SequenceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SequenceWrap>(info) {}

  std::shared_ptr<EngineSequence> seq;  // null once disposed
  const void* owner = nullptr;          // the Engine it was made for

 private:
  Napi::Value Length(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq ? double(seq->length()) : 0.0);
  }
  Napi::Value Bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq ? double(seq->bytes()) : 0.0);
  }
  void Truncate(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      check_idle("truncate");
      seq->truncate(long(info[0].As<Napi::Number>().Int64Value()));
    });
  }
  // reserve(n): allocates room for n positions now, so a budgeted generation never grows its
  // cache later (the memory accounting of the detector relies on it).
  void Reserve(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      check_idle("reserve");
      seq->reserve(long(info[0].As<Napi::Number>().Int64Value()));
    });
  }
  void check_idle(const char* what) {
    if (!seq) throw std::invalid_argument("the sequence was disposed");
    if (calls->load() > 0) throw std::invalid_argument(std::string(what) + ": the sequence is in use by a call in flight; change it once that call has settled");
  }

 public:
  // Calls in flight on this sequence (see SequencesInUse).
  std::shared_ptr<std::atomic<int>> calls = std::make_shared<std::atomic<int>>(0);

 private:
  // A forward in flight holds its own reference, so the memory goes when that finishes.
  void Dispose(const Napi::CallbackInfo&) { seq.reset(); }
};

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod<&ModelWrap::LoadTensor>("loadTensor"),
                        InstanceMethod<&ModelWrap::CheckComplete>("checkComplete"),
                        InstanceMethod<&ModelWrap::NewSequence>("newSequence"),
                        InstanceMethod<&ModelWrap::Forward>("forward"),
                        InstanceMethod<&ModelWrap::DecodeStep>("decodeStep"),
                        InstanceMethod<&ModelWrap::TokenScores>("tokenScores"),
                        InstanceMethod<&ModelWrap::Info>("info"),
                        InstanceMethod<&ModelWrap::SetKvPoolBytes>("setKvPoolBytes"),
                        InstanceMethod<&ModelWrap::Dispose>("dispose"),
                        InstanceMethod<&ModelWrap::TrainInit>("trainInit"),
                        InstanceMethod<&ModelWrap::TrainStep>("trainStep"),
                        InstanceMethod<&ModelWrap::OptimizerStep>("optimizerStep"),
                        InstanceMethod<&ModelWrap::TrainEnd>("trainEnd"),
                        InstanceMethod<&ModelWrap::Params>("params"),
                        InstanceMethod<&ModelWrap::GetParam>("getParam"),
                        InstanceMethod<&ModelWrap::SetParam>("setParam"),
                        InstanceMethod<&ModelWrap::AddLora>("addLora"),
                        InstanceMethod<&ModelWrap::MergeLora>("mergeLora"),
                        InstanceMethod<&ModelWrap::SetTokenRows>("setTokenRows"),
                        InstanceMethod<&ModelWrap::ClearAdapters>("clearAdapters"),
                        InstanceMethod<&ModelWrap::SetAdapterEnabled>("setAdapterEnabled"),
                        InstanceMethod<&ModelWrap::SetOptimizerStep>("setOptimizerStep"),
                        InstanceMethod<&ModelWrap::ParamsChanged>("paramsChanged")});
  }

  // new NativeModel(config, dtype: 'f32' | 'bf16', threads, device = -1): device -1 is the CPU
  // engine, N >= 0 the CUDA engine on GPU N (lib/model/device.ts has checked that it exists).
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    guard(info.Env(), [&] {
      const ModelConfig config = parse_config(info[0].As<Napi::Object>());
      const DType dtype = info[1].As<Napi::String>().Utf8Value() == "bf16" ? DType::bf16 : DType::f32;
      const int threads = info[2].As<Napi::Number>().Int32Value();
      const int device = info.Length() > 3 && info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : -1;
      if (device >= 0) {
#if defined(RF_HAVE_CUBLASLT)
        engine_ = make_cuda_engine(config, dtype, device);
        return;
#elif defined(RF_HAVE_CUDA)
        throw std::invalid_argument("device 'cuda:" + std::to_string(device) +
                                    "': this addon was built without cuBLASLt, which the CUDA engine needs (rebuild with `npm run build:cuda` where the CUDA toolkit has cuBLAS)");
#else
        throw std::invalid_argument("device 'cuda:" + std::to_string(device) +
                                    "': this addon was built without CUDA (run `npm run build:cuda` with nvcc)");
#endif
      }
      active_isa();  // fails clearly on a CPU without AVX2
      model_ = std::make_shared<Model>(config, dtype, threads);
      engine_ = make_cpu_engine(model_);
    });
  }

 private:
  Engine& engine() {
    if (!engine_) throw std::invalid_argument("the model was disposed");
    return *engine_;
  }
  // The CPU engine's Model: its parameters outside training (adapters loaded for inference).
  Model& model() {
    engine();
    if (!model_) throw std::invalid_argument("parameter access outside training needs the CPU engine (device 'cpu'); this model is on " + engine_->device());
    return *model_;
  }
  void begin_work() {
    if (busy_->exchange(true)) throw std::invalid_argument("the model is busy: calls must not overlap");
  }
  // Values written by setParam during training reach the engine before its next use: the CPU
  // trainer rebuilds its packed weights (full fine-tuning), the GPU trainer uploads them. Every
  // call that reads the parameters on a worker flushes first, so no caller can forget to.
  void flush_params() {
    if (params_dirty_ && trainer_) trainer_->trainer->params_changed();
    params_dirty_ = false;
  }

  // loadTensor(name, srcType: 0 f32 | 1 f16 | 2 bf16, shape: number[], srcIsKN, data: Uint8Array) -> Promise<void>
  Napi::Value LoadTensor(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine();
      std::string name = info[0].As<Napi::String>().Utf8Value();
      auto type = SrcType(info[1].As<Napi::Number>().Int32Value());
      Napi::Array shape_js = info[2].As<Napi::Array>();
      std::vector<long> shape;
      for (uint32_t i = 0; i < shape_js.Length(); ++i) shape.push_back(long(shape_js.Get(i).As<Napi::Number>().Int64Value()));
      bool kn = info[3].As<Napi::Boolean>().Value();
      Napi::Uint8Array data = info[4].As<Napi::Uint8Array>();
      long n = 1;
      for (long d : shape) n *= d;
      const long elem = type == SrcType::f32 ? 4 : 2;
      if (long(data.ByteLength()) != n * elem)
        throw std::invalid_argument("tensor " + name + ": data has " + std::to_string(data.ByteLength()) +
                                    " bytes, shape needs " + std::to_string(n * elem));
      begin_work();
      auto keep = std::make_shared<Napi::ObjectReference>(Napi::Persistent(data.As<Napi::Object>()));
      const uint8_t* bytes = data.Data();
      auto engine = engine_;
      auto busy = busy_;
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            if (const long at = first_non_finite(bytes, type, n); at >= 0)
              throw std::invalid_argument("tensor " + name + " holds " + (std::isnan(src_load(bytes, type, at)) ? "NaN" : "an infinity") +
                                          " at element " + std::to_string(at) + ": the weights are corrupt");
            engine->load_tensor(name, bytes, type, shape, kn);
          },
          [keep](Napi::Env e) -> Napi::Value { keep->Reset(); return e.Undefined(); });
    });
  }

  void CheckComplete(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] { engine().check_complete(); });
  }

  Napi::Value NewSequence(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Napi::Object obj = SequenceWrap::Ctor(info.Env()).New({});
      SequenceWrap* s = SequenceWrap::Unwrap(obj);
      // The count goes down when the last holder (the wrapper, or a call in flight) lets go.
      std::shared_ptr<EngineSequence> made = engine().new_sequence();
      EngineSequence* raw = made.get();
      s->seq = std::shared_ptr<EngineSequence>(raw, [made](EngineSequence*) mutable {
        made.reset();
        g_live_sequences.fetch_sub(1, std::memory_order_relaxed);
      });
      g_live_sequences.fetch_add(1, std::memory_order_relaxed);
      s->owner = engine_.get();
      return obj;
    });
  }

  // forward(sequences: NativeSequence[], tokens: Uint32Array, counts: Uint32Array,
  //         allLogits: boolean, cancel?: Int32Array, onProgress?: (done, total) => void) -> Promise<Float32Array>
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine();
      flush_params();
      Napi::Array seqs = info[0].As<Napi::Array>();
      Napi::Uint32Array tokens_js = info[1].As<Napi::Uint32Array>();
      Napi::Uint32Array counts_js = info[2].As<Napi::Uint32Array>();
      const LogitsMode mode = info[3].As<Napi::Boolean>().Value() ? LogitsMode::all : LogitsMode::last;

      Batch batch = parse_batch(seqs, tokens_js, counts_js);
      auto tokens = batch.tokens;
      auto seqs_held = batch.seqs;
      auto items = batch.items;
      auto in_use = batch.in_use;
      CancelFlag flag = parse_cancel(info, 4);
      auto cancel_ref = flag.ref;
      const std::atomic<int>* cancel = flag.flag;
      std::shared_ptr<Napi::ThreadSafeFunction> progress_fn;
      if (info.Length() > 5 && info[5].IsFunction()) {
        progress_fn = std::make_shared<Napi::ThreadSafeFunction>(
            Napi::ThreadSafeFunction::New(env, info[5].As<Napi::Function>(), "redflag-progress", 0, 1));
      }

      long rows = 0;
      for (const EngineItem& it : items) rows += mode == LogitsMode::all ? it.n_tokens : 1;
      auto out = std::make_shared<std::vector<float>>();
      begin_work();
      auto engine = engine_;
      auto busy = busy_;
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy, progress_fn};
            const InUseRelease in_use_release{in_use};
            out->resize(size_t(rows) * engine->vocab());
            std::function<void(int, int)> progress;
            if (progress_fn) {
              progress = [progress_fn](int done, int total) {
                progress_fn->NonBlockingCall([done, total](Napi::Env e, Napi::Function cb) {
                  cb.Call({Napi::Number::New(e, done), Napi::Number::New(e, total)});
                });
              };
            }
            engine->forward(items, mode, out->data(), cancel, progress);
            (void)seqs_held;
            (void)tokens;
          },
          [out, cancel_ref](Napi::Env e) -> Napi::Value {
            Napi::Float32Array arr = Napi::Float32Array::New(e, out->size());
            std::copy(out->begin(), out->end(), arr.Data());
            if (cancel_ref) cancel_ref->Reset();
            return arr;
          });
    });
  }

  // The sequences of one engine call, their new tokens (kept alive with the call) and the
  // caches they append to (held so a dispose() from JavaScript cannot free them mid-call).
  struct Batch {
    std::shared_ptr<std::vector<uint32_t>> tokens;
    std::vector<std::shared_ptr<EngineSequence>> seqs;
    std::vector<EngineItem> items;
    std::shared_ptr<SequencesInUse> in_use = std::make_shared<SequencesInUse>();
  };
  Batch parse_batch(const Napi::Array& seqs, const Napi::Uint32Array& tokens_js, const Napi::Uint32Array& counts_js) {
    if (counts_js.ElementLength() != seqs.Length()) throw std::invalid_argument("one token count per sequence is required");
    Batch b;
    b.tokens = std::make_shared<std::vector<uint32_t>>(tokens_js.Data(), tokens_js.Data() + tokens_js.ElementLength());
    size_t offset = 0;
    for (uint32_t i = 0; i < seqs.Length(); ++i) {
      Napi::Value v = seqs.Get(i);
      if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(SequenceWrap::Ctor(seqs.Env())))
        throw std::invalid_argument("sequences[" + std::to_string(i) + "] is not a sequence");
      SequenceWrap* s = SequenceWrap::Unwrap(v.As<Napi::Object>());
      if (!s->seq) throw std::invalid_argument("sequences[" + std::to_string(i) + "] was disposed");
      if (s->owner != engine_.get()) throw std::invalid_argument("sequences[" + std::to_string(i) + "] belongs to another model");
      for (auto& c : b.seqs)
        if (c == s->seq) throw std::invalid_argument("a sequence appears twice in one forward call");
      const uint32_t n = counts_js[i];
      // The engines read a sequence's last new row: every sequence brings at least one token.
      if (n == 0) throw std::invalid_argument("sequences[" + std::to_string(i) + "] has no tokens");
      if (offset + n > b.tokens->size()) throw std::invalid_argument("token counts exceed the tokens given");
      s->calls->fetch_add(1);
      b.in_use->calls.push_back(s->calls);
      b.seqs.push_back(s->seq);
      b.items.push_back({s->seq.get(), b.tokens->data() + offset, int(n)});
      offset += n;
    }
    if (offset != b.tokens->size()) throw std::invalid_argument("token counts do not add up to the tokens given");
    return b;
  }

  // An Int32Array cancel flag (written with Atomics.store from JavaScript; an aligned int32 is
  // read atomically), referenced for the duration of the call.
  struct CancelFlag {
    std::shared_ptr<Napi::ObjectReference> ref;
    const std::atomic<int>* flag = nullptr;
  };
  static CancelFlag parse_cancel(const Napi::CallbackInfo& info, size_t index) {
    CancelFlag c;
    if (info.Length() > index && info[index].IsTypedArray()) {
      Napi::Int32Array a = info[index].As<Napi::Int32Array>();
      c.ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(a.As<Napi::Object>()));
      c.flag = reinterpret_cast<const std::atomic<int>*>(a.Data());
    }
    return c;
  }

  // The flag tokens of a call: a number (one token, or -1 for none) or an Int32Array (several).
  static std::vector<int> parse_flags(const Napi::Value& v) {
    if (v.IsTypedArray()) {
      Napi::Int32Array a = v.As<Napi::Int32Array>();
      return std::vector<int>(a.Data(), a.Data() + a.ElementLength());
    }
    const int id = v.As<Napi::Number>().Int32Value();
    return id == -1 ? std::vector<int>{} : std::vector<int>{id};
  }

  // decodeStep(sequences, tokens: Uint32Array, counts: Uint32Array, params: Float64Array
  //            [n * 4: temperature, topK, topP, seed], rfToken | flagTokens: Int32Array, topN, cancel?, scores = true)
  //   -> Promise<{ tokens: Uint32Array, logprobs: Float32Array, pRf: Float32Array (the flags' total),
  //                topIds: Uint32Array [n * topN], topLogprobs: Float32Array [n * topN],
  //                pFlags: Float32Array [n * K] (with flagTokens) }>
  Napi::Value DecodeStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine();
      flush_params();
      Batch batch = parse_batch(info[0].As<Napi::Array>(), info[1].As<Napi::Uint32Array>(), info[2].As<Napi::Uint32Array>());
      Napi::Float64Array params_js = info[3].As<Napi::Float64Array>();
      const size_t n = batch.items.size();
      if (params_js.ElementLength() != n * 4) throw std::invalid_argument("decodeStep: 4 sampling parameters per sequence are required");
      std::vector<PickParams> params(n);
      for (size_t i = 0; i < n; ++i) {
        params[i].temperature = float(params_js[i * 4]);
        // top_k at or past the vocabulary keeps every token (0), and never overflows an int.
        const double k = params_js[i * 4 + 1];
        params[i].top_k = k >= double(engine().vocab()) ? 0 : int(k);
        params[i].top_p = float(params_js[i * 4 + 2]);
        params[i].seed = uint64_t(params_js[i * 4 + 3]);
      }
      const bool flag_list = info[4].IsTypedArray();
      const std::vector<int> flag_ids = parse_flags(info[4]);
      const int top_n = info[5].As<Napi::Number>().Int32Value();
      if (top_n < 0 || top_n > 64) throw std::invalid_argument("decodeStep: topN must be 0 to 64");
      CancelFlag flag = parse_cancel(info, 6);
      const bool scores = !(info.Length() > 7 && info[7].IsBoolean()) || info[7].As<Napi::Boolean>().Value();
      struct Out {
        std::vector<Pick> picks;
        std::vector<uint32_t> top_ids;
        std::vector<float> top_lp;
        std::vector<float> p_flags;
      };
      auto out = std::make_shared<Out>();
      out->p_flags.resize(n * flag_ids.size());
      out->picks.resize(n);
      out->top_ids.resize(n * top_n);
      out->top_lp.resize(n * top_n);
      begin_work();
      auto engine = engine_;
      auto busy = busy_;
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            const InUseRelease in_use_release{batch.in_use};
            engine->decode_step(batch.items, params, Flags(flag_ids, out->p_flags.data()), top_n, out->picks.data(),
                                out->top_ids.data(), out->top_lp.data(), flag.flag, scores);
            (void)batch;
          },
          [out, flag, n, flag_list](Napi::Env e) -> Napi::Value {
            Napi::Object o = Napi::Object::New(e);
            Napi::Uint32Array tokens = Napi::Uint32Array::New(e, n);
            Napi::Float32Array logprobs = Napi::Float32Array::New(e, n);
            Napi::Float32Array p_rf = Napi::Float32Array::New(e, n);
            for (size_t i = 0; i < n; ++i) {
              tokens[i] = out->picks[i].token;
              logprobs[i] = out->picks[i].logprob;
              p_rf[i] = out->picks[i].p_rf;
            }
            Napi::Uint32Array top_ids = Napi::Uint32Array::New(e, out->top_ids.size());
            Napi::Float32Array top_lp = Napi::Float32Array::New(e, out->top_lp.size());
            if (!out->top_ids.empty()) {  // an empty typed array may have no data pointer
              std::copy(out->top_ids.begin(), out->top_ids.end(), top_ids.Data());
              std::copy(out->top_lp.begin(), out->top_lp.end(), top_lp.Data());
            }
            o.Set("tokens", tokens);
            o.Set("logprobs", logprobs);
            o.Set("pRf", p_rf);
            o.Set("topIds", top_ids);
            o.Set("topLogprobs", top_lp);
            if (flag_list) {
              Napi::Float32Array p_flags = Napi::Float32Array::New(e, out->p_flags.size());
              if (!out->p_flags.empty()) std::copy(out->p_flags.begin(), out->p_flags.end(), p_flags.Data());
              o.Set("pFlags", p_flags);
            }
            if (flag.ref) flag.ref->Reset();
            return o;
          });
    });
  }

  // tokenScores(sequences, tokens, counts, rfToken | flagTokens: Int32Array, cancel?, embedDelta?, logprobs?)
  //   -> Promise<Float32Array>: p(<rf>) after every token (items in order), teacher-forced; logits
  // never leave native memory. With logprobs: Promise<{ pRf, logprobs }>, logprobs[r] = log p(next
  // token of the item) (NaN after an item's last token), and rfToken may be -1 (pRf then 0). With
  // flagTokens: Promise<{ pRf (the flags' total), pFlags [tokens * K], logprobs? }>.
  Napi::Value TokenScores(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine();
      flush_params();
      Batch batch = parse_batch(info[0].As<Napi::Array>(), info[1].As<Napi::Uint32Array>(), info[2].As<Napi::Uint32Array>());
      const bool flag_list = info[3].IsTypedArray();
      const std::vector<int> flag_ids = parse_flags(info[3]);
      const bool logprobs = info.Length() > 6 && info[6].ToBoolean();
      for (int id : flag_ids)
        if (id < 0 || id >= engine().vocab()) throw std::invalid_argument("tokenScores: rfToken is outside the vocabulary");
      if (flag_ids.empty() && !logprobs) throw std::invalid_argument("tokenScores: rfToken is outside the vocabulary");
      CancelFlag flag = parse_cancel(info, 4);
      // Optional perturbation of the input embeddings [tokens x hidden] (embedding-space attacks).
      auto delta = std::make_shared<std::vector<float>>();
      if (info.Length() > 5 && info[5].IsTypedArray()) {
        Napi::Float32Array d = info[5].As<Napi::Float32Array>();
        const size_t H = size_t(engine().config().hidden);
        if (d.ElementLength() != batch.tokens->size() * H) throw std::invalid_argument("tokenScores: embedDelta must hold tokens x hidden floats");
        delta->assign(d.Data(), d.Data() + d.ElementLength());
        size_t offset = 0;
        for (EngineItem& it : batch.items) {
          it.embed_delta = delta->data() + offset * H;
          offset += size_t(it.n_tokens);
        }
      }
      auto out = std::make_shared<std::vector<float>>(batch.tokens->size());
      auto lp = std::make_shared<std::vector<float>>(logprobs ? batch.tokens->size() : 0);
      auto each = std::make_shared<std::vector<float>>(flag_list ? batch.tokens->size() * flag_ids.size() : 0);
      begin_work();
      auto engine = engine_;
      auto busy = busy_;
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            const InUseRelease in_use_release{batch.in_use};
            engine->token_scores(batch.items, Flags(flag_ids, flag_list ? each->data() : nullptr), out->data(), flag.flag,
                         logprobs ? lp->data() : nullptr);
            (void)batch;
            (void)delta;
          },
          [out, lp, each, logprobs, flag_list, flag](Napi::Env e) -> Napi::Value {
            if (flag.ref) flag.ref->Reset();
            auto array = [&](const std::vector<float>& v) {
              Napi::Float32Array arr = Napi::Float32Array::New(e, v.size());
              if (!v.empty()) std::copy(v.begin(), v.end(), arr.Data());
              return arr;
            };
            if (!logprobs && !flag_list) return array(*out);
            Napi::Object r = Napi::Object::New(e);
            r.Set("pRf", array(*out));
            if (logprobs) r.Set("logprobs", array(*lp));
            if (flag_list) r.Set("pFlags", array(*each));
            return r;
          });
    });
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Engine& m = engine();
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("vocab", m.vocab());
      o.Set("threads", m.threads());
      o.Set("dtype", m.dtype() == DType::bf16 ? "bf16" : "f32");
      o.Set("weightBytes", double(m.weight_bytes()));
      o.Set("isa", isa_name(active_isa()));
      o.Set("device", m.device());
      o.Set("kvBlockTokens", m.kv_block_tokens());
      o.Set("kvBytesPerPosition", double(m.kv_bytes_per_position()));
      return o;
    });
  }

  // setKvPoolBytes(bytes): the paged cache's pool (the GPU engine), while no sequence is alive.
  void SetKvPoolBytes(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      const double bytes = info[0].As<Napi::Number>().DoubleValue();
      if (!(bytes >= 1)) throw std::invalid_argument("setKvPoolBytes: bytes must be >= 1");
      engine().set_kv_pool_bytes(size_t(bytes));
    });
  }

  // Frees the weights and threads; work in flight keeps its own reference and finishes first.
  void Dispose(const Napi::CallbackInfo&) {
    trainer_.reset();
    engine_.reset();
    model_.reset();
  }

  // --- training ---------------------------------------------------------------------------
  struct TrainerHandle {
    std::shared_ptr<Engine> engine;  // kept alive while the trainer uses it
    std::unique_ptr<EngineTrainer> trainer;
    ~TrainerHandle() { trainer.reset(); }
  };

  TrainerHandle& trainer() {
    engine();  // disposed: says so
    if (!trainer_) throw std::invalid_argument("training was not started (call trainInit)");
    return *trainer_;
  }

  static std::vector<Sequence> sequences_of(const Napi::Uint32Array& tokens, const Napi::Uint32Array& counts) {
    std::vector<Sequence> out;
    size_t offset = 0;
    for (size_t i = 0; i < counts.ElementLength(); ++i) {
      const uint32_t n = counts[i];
      if (n == 0 || offset + n > tokens.ElementLength()) throw std::invalid_argument("token counts do not match the tokens");
      out.push_back({tokens.Data() + offset, int(n)});
      offset += n;
    }
    if (offset != tokens.ElementLength()) throw std::invalid_argument("token counts do not add up to the tokens given");
    return out;
  }

  // trainInit({ mode: 'lora' | 'full', rank, alpha, dropout, rslora, targets: string[], rfToken, flagTokens?: number[],
  //             seed }) -> Promise<{ trainable }>
  Napi::Value TrainInit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine();
      if (trainer_) throw std::invalid_argument("training already started on this model");
      Napi::Object o = info[0].As<Napi::Object>();
      TrainOptions opt;
      opt.mode = get_string(o, "mode") == "full" ? TrainMode::full : TrainMode::lora;
      opt.lora.rank = get_int(o, "rank");
      opt.lora.alpha = float(get_double(o, "alpha"));
      opt.lora.dropout = float(get_double(o, "dropout"));
      opt.lora.rslora = get_bool(o, "rslora");
      Napi::Array targets = o.Get("targets").As<Napi::Array>();
      for (uint32_t i = 0; i < targets.Length(); ++i) opt.lora.targets.push_back(targets.Get(i).As<Napi::String>().Utf8Value());
      opt.rf_token = get_int(o, "rfToken");
      if (o.Has("flagTokens") && o.Get("flagTokens").IsArray()) {
        Napi::Array flags = o.Get("flagTokens").As<Napi::Array>();
        for (uint32_t i = 0; i < flags.Length(); ++i) opt.flag_tokens.push_back(flags.Get(i).As<Napi::Number>().Int32Value());
      }
      opt.seed = uint64_t(get_double(o, "seed"));
      if (o.Has("recompute")) opt.recompute = get_bool(o, "recompute");
      // group: { id, rank, world }: data-parallel training (join_group blocks until every rank joined).
      std::string group_id;
      int group_rank = 0, group_world = 1;
      if (o.Has("group") && o.Get("group").IsObject()) {
        Napi::Object g = o.Get("group").As<Napi::Object>();
        group_id = get_string(g, "id");
        group_rank = get_int(g, "rank");
        group_world = get_int(g, "world");
      }
      begin_work();
      auto handle = std::make_shared<TrainerHandle>();
      handle->engine = engine_;
      auto busy = busy_;
      auto* self = this;
      auto keep = std::make_shared<Napi::ObjectReference>(Napi::Persistent(Value()));
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            handle->trainer = handle->engine->new_trainer(opt);
            if (!group_id.empty()) {
              try {
                handle->trainer->join_group(group_id, group_rank, group_world);
              } catch (...) {
                handle->trainer.reset();  // not training after all: the adapters it added go too
                handle->engine->clear_adapters();
                throw;
              }
            }
          },
          [=](Napi::Env e) -> Napi::Value {
            keep->Reset();
            // Disposed meanwhile: the trainer goes too, never attached to a disposed model.
            if (!self->engine_) {
              handle->trainer.reset();
              throw make_error(e, "INVALID_ARGUMENT", "the model was disposed");
            }
            self->trainer_ = handle;
            Napi::Object r = Napi::Object::New(e);
            r.Set("trainable", double(handle->trainer->trainable_count()));
            return r;
          });
    });
  }

  // trainStep(tokens, counts, refTokens, refCounts, rows: Int32Array [n x 5: kind, row, refRow, group, target],
  //           { aggregation, alphaBenign, alphaRf, alphaAfter, alphaCe, gradScale }, cancel?,
  //           { embedDelta?: Float32Array [tokens x hidden], embedGrad?: boolean }?) -> Promise<terms>
  // embedDelta perturbs the trained batch's input embeddings; with embedGrad the terms carry
  // embedGrad: Float32Array [tokens x hidden], dL/d(input embeddings).
  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto handle = trainer_;
      trainer();
      flush_params();
      auto tokens = std::make_shared<std::vector<uint32_t>>();
      auto ref_tokens = std::make_shared<std::vector<uint32_t>>();
      Napi::Uint32Array t_js = info[0].As<Napi::Uint32Array>(), c_js = info[1].As<Napi::Uint32Array>();
      Napi::Uint32Array rt_js = info[2].As<Napi::Uint32Array>(), rc_js = info[3].As<Napi::Uint32Array>();
      // Copy the inputs: the worker must not read JavaScript memory.
      tokens->assign(t_js.Data(), t_js.Data() + t_js.ElementLength());
      ref_tokens->assign(rt_js.Data(), rt_js.Data() + rt_js.ElementLength());
      std::vector<uint32_t> counts(c_js.Data(), c_js.Data() + c_js.ElementLength());
      std::vector<uint32_t> ref_counts(rc_js.Data(), rc_js.Data() + rc_js.ElementLength());
      sequences_of(t_js, c_js);
      sequences_of(rt_js, rc_js);
      Napi::Int32Array rows_js = info[4].As<Napi::Int32Array>();
      if (rows_js.ElementLength() % 5 != 0) throw std::invalid_argument("loss rows must hold 5 integers each");
      std::vector<LossRow> rows;
      for (size_t i = 0; i < rows_js.ElementLength(); i += 5) {
        const int kind = rows_js[i];
        if (kind < 0 || kind > 3) throw std::invalid_argument("unknown loss row kind");
        rows.push_back({LossRow::Kind(kind), rows_js[i + 1], rows_js[i + 2], rows_js[i + 3], rows_js[i + 4]});
      }
      Napi::Object o = info[5].As<Napi::Object>();
      LossOptions lo;
      const std::string agg = get_string(o, "aggregation");
      lo.aggregation = agg == "mean" ? Aggregation::mean : agg == "single" ? Aggregation::single : Aggregation::any;
      lo.alpha_benign = float(get_double(o, "alphaBenign"));
      lo.alpha_rf = float(get_double(o, "alphaRf"));
      lo.alpha_after = float(get_double(o, "alphaAfter"));
      lo.alpha_ce = float(get_double(o, "alphaCe"));
      lo.grad_scale = float(get_double(o, "gradScale"));
      lo.dropout_seed = uint64_t(get_double(o, "dropoutSeed"));
      if (o.Has("paramGrads")) lo.param_grads = get_bool(o, "paramGrads");
      std::shared_ptr<Napi::ObjectReference> cancel_ref;
      const std::atomic<int>* cancel = nullptr;
      if (info.Length() > 6 && info[6].IsTypedArray()) {
        Napi::Int32Array flag = info[6].As<Napi::Int32Array>();
        cancel_ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(flag.As<Napi::Object>()));
        cancel = reinterpret_cast<const std::atomic<int>*>(flag.Data());
      }
      auto embed_delta = std::make_shared<std::vector<float>>();
      auto embed_grad = std::make_shared<std::vector<float>>();
      if (info.Length() > 7 && info[7].IsObject()) {
        Napi::Object e = info[7].As<Napi::Object>();
        const size_t n = tokens->size() * size_t(handle->engine->config().hidden);
        if (e.Has("embedDelta") && e.Get("embedDelta").IsTypedArray()) {
          Napi::Float32Array d = e.Get("embedDelta").As<Napi::Float32Array>();
          if (d.ElementLength() != n) throw std::invalid_argument("embedDelta must hold tokens x hidden floats");
          embed_delta->assign(d.Data(), d.Data() + n);
        }
        if (e.Has("embedGrad") && e.Get("embedGrad").ToBoolean()) embed_grad->assign(n, 0.f);
      }
      begin_work();
      auto busy = busy_;
      auto terms = std::make_shared<LossTerms>();
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            std::vector<Sequence> batch, reference;
            const size_t H = size_t(handle->engine->config().hidden);
            size_t off = 0;
            for (uint32_t n : counts) {
              Sequence q{tokens->data() + off, int(n)};
              if (!embed_delta->empty()) q.embed_delta = embed_delta->data() + off * H;
              if (!embed_grad->empty()) q.embed_grad = embed_grad->data() + off * H;
              batch.push_back(q);
              off += n;
            }
            off = 0;
            for (uint32_t n : ref_counts) { reference.push_back({ref_tokens->data() + off, int(n)}); off += n; }
            *terms = handle->trainer->step(batch, reference, rows, lo, cancel);
          },
          [terms, cancel_ref, embed_grad](Napi::Env e) -> Napi::Value {
            if (cancel_ref) cancel_ref->Reset();
            Napi::Object r = Napi::Object::New(e);
            if (!embed_grad->empty()) {
              Napi::Float32Array g = Napi::Float32Array::New(e, embed_grad->size());
              std::memcpy(g.Data(), embed_grad->data(), embed_grad->size() * sizeof(float));
              r.Set("embedGrad", g);
            }
            r.Set("benign", terms->benign);
            r.Set("redFlag", terms->red_flag);
            r.Set("after", terms->after);
            r.Set("ce", terms->ce);
            r.Set("total", terms->total);
            r.Set("nBenign", terms->n_benign);
            r.Set("nGroups", terms->n_groups);
            r.Set("nAfter", terms->n_after);
            r.Set("nCe", terms->n_ce);
            r.Set("tokens", double(terms->tokens));
            return r;
          });
    });
  }

  // optimizerStep({ lr, beta1, beta2, eps, weightDecay, clipNorm }) -> Promise<gradient norm>
  Napi::Value OptimizerStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto handle = trainer_;
      trainer();
      flush_params();
      Napi::Object o = info[0].As<Napi::Object>();
      AdamWOptions a;
      a.lr = float(get_double(o, "lr"));
      a.beta1 = float(get_double(o, "beta1"));
      a.beta2 = float(get_double(o, "beta2"));
      a.eps = float(get_double(o, "eps"));
      a.weight_decay = float(get_double(o, "weightDecay"));
      a.clip_norm = float(get_double(o, "clipNorm"));
      begin_work();
      auto busy = busy_;
      auto norm = std::make_shared<double>(0);
      return PromiseWorker::start(
          env,
          [=] {
            const BusyRelease release{busy};
            *norm = handle->trainer->optimizer_step(a);
          },
          [norm](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, *norm); });
    });
  }

  // Ends training; LoRA adapters and red-flag rows stay on the model for inference.
  void TrainEnd(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      flush_params();  // the adapters stay on the model with the values last written
      trainer_.reset();
    });
  }

  // params() -> [{ name, shape }]
  Napi::Value Params(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      std::vector<Param*> ps = trainer_ ? trainer_->trainer->params() : model().params();
      Napi::Array out = Napi::Array::New(info.Env(), ps.size());
      for (size_t i = 0; i < ps.size(); ++i) {
        Napi::Object o = Napi::Object::New(info.Env());
        o.Set("name", ps[i]->name);
        Napi::Array shape = Napi::Array::New(info.Env(), ps[i]->shape.size());
        for (size_t j = 0; j < ps[i]->shape.size(); ++j) shape.Set(uint32_t(j), double(ps[i]->shape[j]));
        o.Set("shape", shape);
        out.Set(uint32_t(i), o);
      }
      return out;
    });
  }

  // During training the trainer's parameters (host copies current), else the CPU model's.
  Param& param_named(const std::string& name) {
    Param* p = nullptr;
    if (trainer_) {
      for (Param* q : trainer_->trainer->params())
        if (q->name == name) p = q;
    } else {
      p = model().find_param(name);
    }
    if (!p) throw std::invalid_argument("no parameter named " + name);
    return *p;
  }

  // getParam(name, part: 'value' | 'grad' | 'm' | 'v') -> Float32Array (a copy)
  Napi::Value GetParam(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      Param& p = param_named(info[0].As<Napi::String>().Utf8Value());
      const std::string part = info.Length() > 1 ? info[1].As<Napi::String>().Utf8Value() : "value";
      const std::vector<float>& v = part == "grad" ? p.grad : part == "m" ? p.m : part == "v" ? p.v : p.value;
      Napi::Float32Array out = Napi::Float32Array::New(info.Env(), v.size());
      std::copy(v.begin(), v.end(), out.Data());
      return out;
    });
  }

  // setParam(name, part, Float32Array)
  void SetParam(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      Param& p = param_named(info[0].As<Napi::String>().Utf8Value());
      const std::string part = info[1].As<Napi::String>().Utf8Value();
      Napi::Float32Array data = info[2].As<Napi::Float32Array>();
      std::vector<float>& v = part == "grad" ? p.grad : part == "m" ? p.m : part == "v" ? p.v : p.value;
      if (long(data.ElementLength()) != p.numel())
        throw std::invalid_argument(p.name + ": expected " + std::to_string(p.numel()) + " values, got " +
                                    std::to_string(data.ElementLength()));
      v.assign(data.Data(), data.Data() + data.ElementLength());
      if (trainer_) params_dirty_ = true;
    });
  }

  // addLora(layer, target, A: Float32Array [rank*in], B: Float32Array [out*rank], rank, scale)
  void AddLora(const Napi::CallbackInfo& info) { ApplyLora(info, false); }
  // mergeLora(layer, target, A, B, rank, scale): addLora's arguments, folded into the weight.
  void MergeLora(const Napi::CallbackInfo& info) { ApplyLora(info, true); }

  void ApplyLora(const Napi::CallbackInfo& info, bool merge) {
    guard(info.Env(), [&] {
      if (busy_->load() || trainer_) throw std::invalid_argument("the model is busy or training");
      const int layer = info[0].As<Napi::Number>().Int32Value();
      const std::string target = info[1].As<Napi::String>().Utf8Value();
      Napi::Float32Array a = info[2].As<Napi::Float32Array>(), b = info[3].As<Napi::Float32Array>();
      const int rank = int(info[4].As<Napi::Number>().Int64Value());
      const float scale = float(info[5].As<Napi::Number>().DoubleValue());
      const long a_size = long(a.ElementLength()), b_size = long(b.ElementLength());
      if (merge) engine().merge_lora(layer, target, a.Data(), a_size, b.Data(), b_size, rank, scale);
      else engine().add_lora(layer, target, a.Data(), a_size, b.Data(), b_size, rank, scale);
    });
  }

  // setTokenRows(token | tokens: Int32Array, embed: Float32Array | null, head: Float32Array | null): rows [K * hidden]
  void SetTokenRows(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load() || trainer_) throw std::invalid_argument("the model is busy or training");
      Engine& m = engine();
      const std::vector<int> tokens = parse_flags(info[0]);
      const float* rows[2] = {nullptr, nullptr};
      for (int i = 0; i < 2; ++i) {
        if (!info[1 + i].IsTypedArray()) continue;
        Napi::Float32Array d = info[1 + i].As<Napi::Float32Array>();
        if (long(d.ElementLength()) != long(tokens.size()) * m.config().hidden)
          throw std::invalid_argument("red-flag rows must have hidden_size elements per token");
        rows[i] = d.Data();
      }
      m.set_token_rows(tokens, rows[0], rows[1]);
    });
  }

  void ClearAdapters(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load() || trainer_) throw std::invalid_argument("the model is busy or training");
      engine().clear_adapters();
    });
  }

  void SetAdapterEnabled(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      engine().set_adapter_enabled(info[0].As<Napi::Boolean>().Value());
    });
  }

  // setOptimizerStep(n): AdamW's step count (bias correction), restored when resuming.
  void SetOptimizerStep(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      trainer().trainer->set_step_count(long(info[0].As<Napi::Number>().Int64Value()));
    });
  }

  // paramsChanged(): what the next forward, step or trainEnd does anyway (flush_params), now.
  void ParamsChanged(const Napi::CallbackInfo& info) {
    guard(info.Env(), [&] {
      if (busy_->load()) throw std::invalid_argument("the model is busy");
      flush_params();
    });
  }

  std::shared_ptr<TrainerHandle> trainer_;
  bool params_dirty_ = false;  // setParam wrote training parameters the engine has not taken yet

  std::shared_ptr<Engine> engine_;  // what inference calls go to (the CPU or the CUDA engine)
  std::shared_ptr<Model> model_;    // the CPU engine's model (training, parameters); null on a GPU
  std::shared_ptr<std::atomic<bool>> busy_ = std::make_shared<std::atomic<bool>>(false);
};

Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const CpuFeatures& f = cpu_features();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("avx2", f.avx2 && f.fma && f.f16c);
    o.Set("avx512", f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq);
    o.Set("avx512bf16", f.avx512bf16);
    o.Set("isa", isa_name(active_isa()));
    return o;
  });
}

// memoryInfo() -> { liveSequences, mallocInUseBytes }: bytes the C allocator has handed out
// and not taken back (glibc's mallinfo2: null elsewhere). Unlike RSS it does not move with
// fragmentation or with arenas kept for reuse, so a leak of native memory shows in it alone.
Napi::Value MemoryInfo(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("liveSequences", double(g_live_sequences.load(std::memory_order_relaxed)));
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    const struct ::mallinfo2 m = ::mallinfo2();
    o.Set("mallocInUseBytes", double(m.uordblks + m.hblkhd));
#else
    o.Set("mallocInUseBytes", info.Env().Null());
#endif
    return o;
  });
}

#ifdef RF_HAVE_CUDA
// cudaInfo(device = 0) -> { count, name, smMajor, smMinor, memoryGiB, error, unsupported,
// architectures, cublasLt, nccl }: the GPUs the CUDA build sees and one of them (count 0 and
// `error` saying why where none is usable; `unsupported` saying why this build cannot run on that
// one); cublasLt: whether the build has the CUDA engine, which needs cuBLASLt.
Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    if (info.Length() > 0 && !info[0].IsUndefined() && !info[0].IsNumber()) throw std::invalid_argument("cudaInfo: the device must be a number");
    const int device = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
    const cuda::DeviceInfo d = cuda::device_info(device);
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("count", d.count);
    o.Set("name", d.name);
    o.Set("smMajor", d.sm_major);
    o.Set("smMinor", d.sm_minor);
    o.Set("memoryGiB", d.memory_gib);
    o.Set("error", d.error);
    o.Set("unsupported", d.unsupported);
    o.Set("architectures", cuda::built_architectures());
#ifdef RF_HAVE_CUBLASLT
    o.Set("cublasLt", true);
#else
    o.Set("cublasLt", false);
#endif
    o.Set("nccl", cuda::collective_available());
    return o;
  });
}

// cudaMemory(device) -> { free, total, held, limit }: bytes (cuda::device_memory).
Napi::Value CudaMemory(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    if (!info[0].IsNumber()) throw std::invalid_argument("cudaMemory: the device must be a number");
    const cuda::DeviceMemory m = cuda::device_memory(info[0].As<Napi::Number>().Int32Value());
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("free", double(m.free));
    o.Set("total", double(m.total));
    o.Set("held", double(m.held));
    o.Set("limit", double(m.limit));
    return o;
  });
}

// cudaSetMemoryLimit(bytes): caps redflag's device memory (0: no cap); see cuda::set_memory_limit.
Napi::Value CudaSetMemoryLimit(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const double bytes = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (!(bytes >= 0 && bytes <= 9007199254740991.0)) throw std::invalid_argument("cudaSetMemoryLimit: bytes must be a number from 0 to 2^53 - 1");
    cuda::set_memory_limit(size_t(bytes));
    return info.Env().Undefined();
  });
}

// cudaLoseContext(device) -> string: traps a kernel, losing the process's CUDA context for good
// (cuda::lose_context; for tests of a failed GPU); the synchronization's error name.
Napi::Value CudaLoseContext(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    if (!info[0].IsNumber()) throw std::invalid_argument("cudaLoseContext: the device must be a number");
    return Napi::String::New(info.Env(), cuda::lose_context(info[0].As<Napi::Number>().Int32Value()));
  });
}

// collectiveId() -> string: a new NCCL unique id (hex) for a data-parallel group; throws where
// the build has no NCCL.
Napi::Value CollectiveId(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value { return Napi::String::New(info.Env(), cuda::new_collective_id()); });
}
#endif

}  // namespace

Napi::Object InitAddon(Napi::Env env, Napi::Object exports) {
  Napi::Function seq = SequenceWrap::Init(env);
  env.SetInstanceData(new Napi::FunctionReference(Napi::Persistent(seq)));  // freed with the environment
  exports.Set("NativeSequence", seq);
  exports.Set("NativeModel", ModelWrap::Init(env));
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo));
  exports.Set("memoryInfo", Napi::Function::New(env, MemoryInfo));
  init_bench(env, exports);
#ifdef RF_HAVE_CUDA
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("collectiveId", Napi::Function::New(env, CollectiveId));
  exports.Set("cudaMemory", Napi::Function::New(env, CudaMemory));
  exports.Set("cudaSetMemoryLimit", Napi::Function::New(env, CudaSetMemoryLimit));
  exports.Set("cudaLoseContext", Napi::Function::New(env, CudaLoseContext));
#endif
  return exports;
}

}  // namespace rf::napi

static Napi::Object InitRedflag(Napi::Env env, Napi::Object exports) {
  return rf::napi::InitAddon(env, exports);
}
NODE_API_MODULE(redflag, InitRedflag)
