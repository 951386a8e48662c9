// Fixed-size KV-cache blocks for paged attention (the CUDA backend's cache): a pool of
// n_blocks blocks of block_tokens token slots each, handed to sequences as block tables, so
// memory is committed as a sequence grows instead of for its worst case, and a finished
// sequence's blocks go straight to the next one. Position t of a sequence lives in block
// table[t / block_tokens], slot t % block_tokens. Host-side bookkeeping only: where the
// blocks' memory lives (device or host) is the backend's business.
#pragma once
#include <cstdint>
#include <vector>

namespace rf {

using BlockTable = std::vector<int32_t>;

class BlockPool {
 public:
  BlockPool(int n_blocks, int block_tokens);

  int block_tokens() const { return block_tokens_; }
  int capacity() const { return int(used_.size()); }
  int free_count() const { return int(free_.size()); }
  // Blocks needed for `tokens` tokens.
  static int blocks_for(long tokens, int block_tokens) { return int((tokens + block_tokens - 1) / block_tokens); }

  // Grows `table` to hold `tokens` tokens. All or nothing: when the pool has too few free
  // blocks it returns false and leaves the table unchanged (the scheduler then waits).
  bool grow(BlockTable& table, long tokens);
  // Shrinks `table` to hold `tokens` tokens, returning the blocks past them to the pool.
  void shrink(BlockTable& table, long tokens);
  // Returns every block of `table` to the pool and empties it.
  void release(BlockTable& table) { shrink(table, 0); }

 private:
  int block_tokens_;
  std::vector<int32_t> free_;   // a stack: the block freed last is reused first (still in cache)
  std::vector<uint8_t> used_;   // per block: handed out; catches double frees and foreign ids
};

}  // namespace rf
