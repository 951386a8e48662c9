// The paged KV cache's block bookkeeping (native/model/block_pool.h) against a simple model:
// random grow / shrink / release sequences over many tables, checking after every operation
// that no block is in two tables, that free + used = capacity, that each table holds exactly
// the blocks its token count needs, and that a refused grow changed nothing; plus the error
// cases (double free, a foreign block id, negative counts) and the slot arithmetic.
#include <algorithm>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/block_pool.h"
#include "tests/check.h"

using rf::test::check;

namespace {

void test_random_walk(int n_blocks, int block_tokens, unsigned seed) {
  rf::BlockPool pool(n_blocks, block_tokens);
  std::mt19937 rng(seed);
  std::vector<rf::BlockTable> tables(9);
  std::vector<long> tokens(9, 0);
  bool ok = true;
  std::string first;
  auto fail = [&](const std::string& what) {
    if (ok) first = what;
    ok = false;
  };
  int refused = 0;
  for (int step = 0; step < 4000; ++step) {
    const size_t s = rng() % tables.size();
    const int op = int(rng() % 10);
    if (op < 6) {
      const long want = tokens[s] + long(rng() % (3 * block_tokens));
      const rf::BlockTable before = tables[s];
      const int free_before = pool.free_count();
      if (pool.grow(tables[s], want)) {
        tokens[s] = want;
      } else {
        ++refused;
        if (tables[s] != before || pool.free_count() != free_before) fail("a refused grow changed the table or the pool");
        if (rf::BlockPool::blocks_for(want, block_tokens) - int(before.size()) <= free_before) fail("grow refused although blocks were free");
      }
    } else if (op < 9) {
      const long want = tokens[s] == 0 ? 0 : long(rng() % (tokens[s] + 1));
      pool.shrink(tables[s], want);
      tokens[s] = want;
    } else {
      pool.release(tables[s]);
      tokens[s] = 0;
    }
    std::set<int32_t> seen;
    int used = 0;
    for (size_t i = 0; i < tables.size(); ++i) {
      if (int(tables[i].size()) != rf::BlockPool::blocks_for(tokens[i], block_tokens)) fail("table " + std::to_string(i) + " holds the wrong block count");
      for (int32_t b : tables[i]) {
        if (!seen.insert(b).second) fail("block " + std::to_string(b) + " is in two tables");
        if (b < 0 || b >= n_blocks) fail("block id out of range");
      }
      used += int(tables[i].size());
    }
    if (used + pool.free_count() != pool.capacity()) fail("free + used != capacity at step " + std::to_string(step));
    if (!ok) break;
  }
  check(ok, "random walk blocks=" + std::to_string(n_blocks) + " x " + std::to_string(block_tokens) + " tokens: bookkeeping holds" +
                (ok ? "" : " (" + first + ")"));
  check(refused > 0, "random walk blocks=" + std::to_string(n_blocks) + ": the pool ran full and refused (" + std::to_string(refused) + " times)");
}

template <class F>
bool throws(F f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_errors() {
  rf::BlockPool pool(4, 16);
  rf::BlockTable a;
  check(pool.grow(a, 33) && a.size() == 3 && pool.free_count() == 1, "33 tokens take 3 blocks of 16");
  check(a[0] == 0 && a[1] == 1 && a[2] == 2, "blocks are handed out from 0 up on a fresh pool");
  rf::BlockTable copy = a;
  pool.release(a);
  check(a.empty() && pool.free_count() == 4, "release returns every block");
  check(throws([&] { pool.release(copy); }) && pool.free_count() == 4, "releasing a table twice throws and changes nothing");
  rf::BlockTable foreign{7};
  check(throws([&] { pool.release(foreign); }), "a block id outside the pool throws");
  check(throws([&] { pool.grow(a, -1); }) && throws([] { rf::BlockPool(2, 0); }), "negative counts and empty blocks throw");
  rf::BlockTable b;
  check(!pool.grow(b, 65) && b.empty() && pool.free_count() == 4, "65 tokens do not fit 4 x 16: refused whole");
  check(pool.grow(b, 64) && pool.free_count() == 0, "64 tokens fill the pool exactly");
  // Position t lives in block table[t / 16], slot t % 16.
  const long t = 37;
  check(b[size_t(t / 16)] * 16 + t % 16 == b[2] * 16 + 5, "slot arithmetic");
}

}  // namespace

int main() {
  test_random_walk(64, 16, 1);
  test_random_walk(7, 3, 2);
  test_random_walk(1, 1, 3);
  test_errors();
  return rf::test::finish("test_block_pool");
}
