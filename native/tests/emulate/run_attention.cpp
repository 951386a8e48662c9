// native/tests/cuda_attention.cpp under the CPU emulation (scripts/cuda-emulate.sh), with
// shorter sequences than on a GPU (the emulation runs a thread at a time); still crossing the
// 16-token blocks, chunked prefills continuing a cache, GQA, windows and odd head_dims.
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_attention.cpp"
#undef main
int main() {
  const std::vector<int> lengths{1, 15, 16, 17, 70, 100}, n_new{1, 15, 7, 17, 70, 40};
  for (int hd : {64, 80})
    for (int window : {0, 37}) prefill_case(hd, 2, 3, window, lengths, n_new);
  prefill_case(256, 1, 2, 5, lengths, n_new);
  prefill_case(96, 1, 1, 1, lengths, n_new);
  for (int hd : {32, 80})
    for (int window : {0, 37}) prefill_case(hd, 2, 3, window, lengths, n_new, true);
  prefill_case(128, 1, 1, 1, lengths, n_new, true);
  // Every other instance of the tensor-core kernel (head_dim / 16 of 1 to 8), f32 and bf16 caches.
  for (int hd : {16, 48, 64, 96, 112}) prefill_case(hd, 1, 2, 37, lengths, n_new, true);
  for (int hd : {16, 48, 64, 80, 96, 112, 128}) prefill_case(hd, 1, 2, 0, lengths, n_new, true, true);
  run_case(80, 2, 3, 37);
  prefill_decode_case(64, 2, 1, 0);
  prefill_decode_case(128, 1, 2, 37);
  prefill_case(80, 2, 3, 37, lengths, n_new, false, true);
  prefill_case(32, 2, 3, 0, lengths, n_new, true, true);
  prefill_decode_case(64, 2, 3, 37, true);
  prefill_decode_case(32, 1, 3, 0, true);    // bf16 cache, one dimension a lane
  prefill_decode_case(128, 1, 2, 37, true);
  prefill_decode_case(256, 1, 2, 37, true);  // eight a lane; the scalar prefill past 48 KiB of shared memory
  run_case(64, 2, 3, 0, {1, 15, 16, 17, 200, 256});  // one split
  run_case(32, 2, 3, 0, {1, 15, 16, 17, 70, 300});   // one dimension a lane, two splits
  run_case(256, 1, 2, 37, {1, 15, 16, 17, 70, 300}); // eight a lane, a window
  kv_append_case();
  kv_append_case(true);
  kv_append_case(false, true);
  kv_append_case(true, true);
  return rf::test::finish("cuda_attention (emulated)");
}
