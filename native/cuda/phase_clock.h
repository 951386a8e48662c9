// Device time per phase of a stream's work, for a benchmark's breakdown of where a step goes.
// mark(p) records an event on the stream: the work queued from there until the next mark counts
// as phase p. collect() (after the work: it synchronizes the last event) adds the intervals into
// seconds() and forgets the marks. Off (the default) it records nothing and costs nothing.
#pragma once
#include <cuda_runtime.h>

#include <vector>

namespace rf::cuda {

// A training step's phases (DeviceTrainer::phase_seconds). The trained forward's are marked by
// DeviceModel::layer_forward when its trace carries a clock.
enum TrainPhase {
  kReferenceForward,
  kForwardLinear,  // the projections' products
  kForwardLora,    // the adapters' products and kernels
  kForwardAttention,
  kForwardOther,  // embeddings, norms, rope, activations, the trace's copies
  kLoss,
  kBackwardRecompute,  // --recompute: a block's forward again
  kBackwardLinear,     // the frozen (or fully trained) projections' products
  kBackwardLora,
  kBackwardAttention,
  kBackwardOther,  // norms, activations, rope, conversions
  kEmbeddings,
  kOptimizer,  // gradient norm, clipping, AdamW (and the all-reduce when data-parallel)
  kTrainPhases
};
const char* train_phase_name(int phase);

class PhaseClock {
 public:
  explicit PhaseClock(int n_phases) : seconds_(size_t(n_phases), 0.0) {}
  ~PhaseClock();
  PhaseClock(const PhaseClock&) = delete;
  PhaseClock& operator=(const PhaseClock&) = delete;

  void set_enabled(bool on) { on_ = on; }
  bool enabled() const { return on_; }
  void mark(int phase, cudaStream_t stream);
  void collect(cudaStream_t stream);  // ends the last interval, then adds every interval up
  void reset();                       // seconds back to zero
  const std::vector<double>& seconds() const { return seconds_; }

 private:
  void record(size_t i, cudaStream_t stream);
  bool on_ = false;
  std::vector<cudaEvent_t> events_;  // created on first use, reused
  std::vector<int> phase_of_mark_;
  std::vector<double> seconds_;
};

}  // namespace rf::cuda
