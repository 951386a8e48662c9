// Keys and values of one sequence, for every layer: [n_kv_heads][capacity][head_dim] f32
// per layer, so one head's keys are contiguous for the attention dot products.
#pragma once
#include <cstddef>
#include <vector>

namespace rf {

class KvCache {
 public:
  KvCache(int n_layers, int n_kv_heads, int head_dim)
      : n_layers_(n_layers), n_kv_heads_(n_kv_heads), head_dim_(head_dim), k_(n_layers), v_(n_layers) {}

  long length() const { return length_; }
  long capacity() const { return capacity_; }
  // Bytes held, for memory accounting.
  size_t bytes() const { return size_t(2) * n_layers_ * n_kv_heads_ * capacity_ * head_dim_ * sizeof(float); }

  // Grows to hold at least n positions (doubling, so appends are amortised O(1)); `exact`
  // allocates exactly n, for callers that budget memory per sequence up front.
  void reserve(long n, bool exact = false);
  // Forgets positions from n on (n <= length), e.g. to reuse a shared prompt.
  void truncate(long n);
  void set_length(long n) { length_ = n; }
  // Frees the memory; the cache is then empty.
  void clear();

  float* k(int layer, int head) { return k_[layer].data() + long(head) * capacity_ * head_dim_; }
  float* v(int layer, int head) { return v_[layer].data() + long(head) * capacity_ * head_dim_; }
  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }

 private:
  int n_layers_, n_kv_heads_, head_dim_;
  long length_ = 0, capacity_ = 0;
  std::vector<std::vector<float>> k_, v_;
};

}  // namespace rf
