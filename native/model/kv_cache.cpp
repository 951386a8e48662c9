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
  for (int l = 0; l < n_layers_; ++l) {
    for (auto* store : {&k_[l], &v_[l]}) {
      std::vector<float> grown(size_t(n_kv_heads_) * per_head_new);
      for (int h = 0; h < n_kv_heads_; ++h)
        std::memcpy(grown.data() + h * per_head_new, store->data() + h * per_head_old,
                    size_t(length_) * head_dim_ * sizeof(float));
      store->swap(grown);
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
