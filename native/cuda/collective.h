// Data-parallel training over several GPUs through NCCL (NVIDIA's collectives library; no
// all-reduce of our own): one process per GPU, each training its share of every optimizer step's
// micro-batches, the trainable gradients summed across the processes before the optimizer step
// (cuda::DeviceTrainer::set_collective), so every replica applies the same update. For LoRA only
// the adapters' gradients travel (a few MB per step).
//
// The processes meet through a unique id that one of them makes (new_collective_id) and hands to
// the others (lib/train: a file). Built with NCCL where CMake finds it (the CUDA toolkit's, a
// folder given as RF_NCCL_ROOT, or the pip wheel nvidia-nccl-cu12/-cu13 that PyTorch installs);
// elsewhere every call throws, naming the missing library.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include <cuda_runtime.h>

namespace rf::cuda {

// Whether this build has NCCL.
bool collective_available();

// A new unique id for a group, as hex (made by one process, given to all).
std::string new_collective_id();

class Collective {
 public:
  // Joins the group `id` as `rank` of `world` on GPU `device` (blocks until every rank joined).
  Collective(const std::string& id, int rank, int world, int device);
  ~Collective();
  Collective(const Collective&) = delete;
  Collective& operator=(const Collective&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  // data [n] = the sum of every rank's data [n], in place, on `stream`.
  void all_reduce_sum(float* data, long n, cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_, world_;
};

}  // namespace rf::cuda
