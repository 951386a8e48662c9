#include "model/block_pool.h"

#include <stdexcept>
#include <string>

namespace rf {

BlockPool::BlockPool(int n_blocks, int block_tokens) : block_tokens_(block_tokens), used_(size_t(n_blocks > 0 ? n_blocks : 0), 0) {
  if (n_blocks < 0) throw std::invalid_argument("BlockPool: negative block count");
  if (block_tokens <= 0) throw std::invalid_argument("BlockPool: blocks must hold at least one token");
  free_.reserve(size_t(n_blocks));
  for (int b = n_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 first
}

bool BlockPool::grow(BlockTable& table, long tokens) {
  if (tokens < 0) throw std::invalid_argument("BlockPool::grow: negative token count");
  const int need = blocks_for(tokens, block_tokens_) - int(table.size());
  if (need <= 0) return true;
  if (need > int(free_.size())) return false;
  for (int i = 0; i < need; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    used_[size_t(b)] = 1;
    table.push_back(b);
  }
  return true;
}

void BlockPool::shrink(BlockTable& table, long tokens) {
  if (tokens < 0) throw std::invalid_argument("BlockPool::shrink: negative token count");
  const size_t keep = size_t(blocks_for(tokens, block_tokens_));
  // Check the whole tail before changing anything, so a bad table leaves the pool intact.
  for (size_t i = keep; i < table.size(); ++i) {
    const int32_t b = table[i];
    if (b < 0 || size_t(b) >= used_.size() || !used_[size_t(b)])
      throw std::invalid_argument("BlockPool: block " + std::to_string(b) + " is not in use (a table freed twice or from another pool)");
  }
  while (table.size() > keep) {
    const int32_t b = table.back();
    table.pop_back();
    used_[size_t(b)] = 0;
    free_.push_back(b);
  }
}

}  // namespace rf
