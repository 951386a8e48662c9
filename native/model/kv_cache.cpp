#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace rf {

void KvCache::reserve(long n, bool exact) {
  if (n <= capacity_) return;
  long cap = n;
  if (!exact) {
    cap = std::max<long>(capacity_ * 2, 64);
    while (cap < n) cap *= 2;
  }
  const size_t per_head_old = size_t(capacity_) * head_dim_, per_head_new = size_t(cap) * head_dim_;
  // Every layer's new buffers first: out of memory part way then leaves the cache as it was
  // (never some layers at the new stride and some at the old).
  std::vector<std::vector<float>> grown(size_t(2) * n_layers_);
  for (auto& g : grown) g.resize(size_t(n_kv_heads_) * per_head_new);
  for (int l = 0; l < n_layers_; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      std::vector<float>& store = kv == 0 ? k_[l] : v_[l];
      std::vector<float>& into = grown[size_t(2) * l + kv];
      if (length_ > 0)
        for (int h = 0; h < n_kv_heads_; ++h)
          std::memcpy(into.data() + h * per_head_new, store.data() + h * per_head_old, size_t(length_) * head_dim_ * sizeof(float));
      store.swap(into);
    }
  }
  capacity_ = cap;
}

void KvCache::truncate(long n) {
  if (n < 0 || n > length_) throw std::out_of_range("truncate: length out of range");
  length_ = n;
}

void KvCache::clear() {
  for (auto& s : k_) std::vector<float>().swap(s);
  for (auto& s : v_) std::vector<float>().swap(s);
  length_ = capacity_ = 0;
}

}  // namespace rf
