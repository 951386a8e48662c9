// PhaseClock (see phase_clock.h).
#include "cuda/phase_clock.h"

#include <stdexcept>
#include <string>

#include "cuda/error.h"

namespace rf::cuda {

const char* train_phase_name(int phase) {
  static const char* const names[kTrainPhases] = {
      "referenceForward", "forwardLinear",     "forwardLora",   "forwardAttention",  "forwardOther",
      "loss",             "backwardRecompute", "backwardLinear", "backwardLora",     "backwardAttention",
      "backwardOther",    "embeddings",        "optimizer"};
  return phase >= 0 && phase < kTrainPhases ? names[phase] : "?";
}

PhaseClock::~PhaseClock() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

// Records event i (created on first use; i <= the events so far) on the stream.
void PhaseClock::record(size_t i, cudaStream_t stream) {
  if (i == events_.size()) {
    cudaEvent_t e;
    check(cudaEventCreate(&e), "cudaEventCreate");
    events_.push_back(e);
  }
  check(cudaEventRecord(events_[i], stream), "cudaEventRecord");
}

void PhaseClock::mark(int phase, cudaStream_t stream) {
  if (!on_) return;
  if (phase < 0 || size_t(phase) >= seconds_.size()) throw std::out_of_range("PhaseClock::mark: no phase " + std::to_string(phase));
  record(phase_of_mark_.size(), stream);
  phase_of_mark_.push_back(phase);
}

void PhaseClock::collect(cudaStream_t stream) {
  if (!on_ || phase_of_mark_.empty()) return;
  const size_t n = phase_of_mark_.size();
  record(n, stream);
  check(cudaEventSynchronize(events_[n]), "cudaEventSynchronize");
  for (size_t i = 0; i < n; ++i) {
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]), "cudaEventElapsedTime");
    seconds_[size_t(phase_of_mark_[i])] += double(ms) * 1e-3;
  }
  phase_of_mark_.clear();
}

void PhaseClock::reset() {
  phase_of_mark_.clear();
  for (double& s : seconds_) s = 0.0;
}

}  // namespace rf::cuda
