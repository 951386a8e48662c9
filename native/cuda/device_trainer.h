// Training on the GPU: the CPU trainer (native/model/train.h) on a DeviceModel, with the same
// options, loss rows, loss terms and parameters. LoRA adapters (every PEFT option the CPU trainer
// takes: targets, rank, alpha, rsLoRA, dropout) and the trainable flag-token rows, or full
// fine-tuning (cross-entropy rows: every tensor has an f32 master, and the engine's copies, bf16
// or f32, are rewritten from them after each update); the frozen weights stay in the engine's
// dtype on the device (bf16 by default), every trainable tensor, its gradient and AdamW's moments
// are f32 on the device.
//
// One step, as the CPU's:
//   1. reference forward (adapter and flag rows off) when KL rows exist   -> h_ref [Rref, H]
//   2. traced forward of the trained batch (adapter on, LoRA dropout)     -> h [R, H], the trace
//   3. the loss rows: the fused red-flag loss (cuda/rf_loss.h) and cross-entropy rows, their
//      dL/dh scattered into dH [R, H]
//   4. backward through the final norm and every layer (cuBLASLt products; norms, SwiGLU /
//      gelu_new, rope and attention backward kernels), LoRA's dA and dB, the flag rows' gradients
//      (head rows from the loss, embedding rows from dL/d(input embeddings)); in full fine-tuning
//      every weight's dW = dy^T x, biases, norms, the LM head, the embedding and position rows
// optimizer_step: global-norm clipping and AdamW with the CPU's arithmetic (cuda/optim.h), then
// the engine's copies of the adapters are refreshed so the next forward uses the new values.
//
// Deterministic: every sum runs in a fixed order (no atomics), so a step repeated from the same
// state gives the same bits, and a resumed run equals an uninterrupted one.
//
// The parameters are also kept as host Params with the CPU trainer's names, shapes, decay flags
// and (from the same seed) initial values, for checkpoints and adapter files: download() copies
// the device's values, gradients and moments into them; after writing them, params_changed()
// uploads them.
#pragma once
#include <atomic>
#include <memory>
#include <vector>

#include "model/train.h"

namespace rf::cuda {

class DeviceModel;
class Collective;

class DeviceTrainer {
 public:
  // Attaches to model (which must outlive the trainer and have no adapter yet) and adds the
  // adapters and flag rows it trains; they stay on the model afterwards, for inference.
  DeviceTrainer(DeviceModel& model, const TrainOptions& options);
  ~DeviceTrainer();
  DeviceTrainer(const DeviceTrainer&) = delete;
  DeviceTrainer& operator=(const DeviceTrainer&) = delete;

  // As Trainer::step: adds this micro-batch's gradients into the parameters' gradients.
  LossTerms step(const std::vector<Sequence>& batch, const std::vector<Sequence>& reference,
                 const std::vector<LossRow>& rows, const LossOptions& options, const std::atomic<int>* cancel = nullptr);
  // As Trainer::optimizer_step: clipping, AdamW, gradients zeroed; returns the norm before clipping.
  double optimizer_step(const AdamWOptions& options);

  std::vector<Param*> params();
  void download();
  void params_changed();

  const TrainOptions& options() const { return options_; }
  long step_count() const { return adam_step_; }
  void set_step_count(long n) { adam_step_ = n; }
  long trainable_count() const;
  // Bytes of device memory the forward's trace holds: what the last step kept for its backward
  // (DeviceLayerTrace per layer, the final norm's input), the largest batch's so far.
  size_t trace_bytes() const;

  // Where a step's device time goes, for the benchmarks: with profiling on, each step records an
  // event at the start of every phase (cuda/phase_clock.h: TrainPhase; a few hundred per step)
  // and phase_seconds()[p] is phase p's device time in the last step and the optimizer step
  // after it. Off (the default), nothing is recorded; turning it on starts from zero, turning it
  // off keeps the figures of the steps it timed.
  void set_profiling(bool on);
  std::vector<double> phase_seconds() const;

  // Data-parallel training (cuda/collective.h): from now on optimizer_step first sums the
  // gradients over the group's processes (each then scales its share of the step's micro-batches
  // by 1 / (micro-batches of all processes), as gradient accumulation does).
  void set_collective(std::shared_ptr<Collective> collective) { collective_ = std::move(collective); }

 private:
  void sync_engine();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  DeviceModel& model_;
  TrainOptions options_;
  long adam_step_ = 0;
  std::shared_ptr<Collective> collective_;
};

}  // namespace rf::cuda
