// The fused decode step: one forward over a batch of sequences (new prompts and one-token
// continuations alike), then, per sequence and from the same logits row, the next token
// (greedy or sampled), its log-probability, p(<rf>) and optionally the top-n log-probabilities.
// Logits stay in native memory: only a few numbers per sequence go back to JavaScript.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace rf {

// How to choose a token from one logits row.
struct PickParams {
  float temperature = 0.f;  // 0 = greedy (first maximum on ties, as torch.argmax)
  int top_k = 0;            // keep the k most likely (0 = all)
  float top_p = 1.f;        // keep the smallest most-likely set reaching this mass (1 = all)
  uint64_t seed = 0;        // with the counter, gives the uniform draw (batch-independent)
};

struct Pick {
  uint32_t token = 0;
  float logprob = 0.f;  // log p(token) at temperature 1 (the model's distribution)
  float p_rf = 0.f;     // p(any flag token) at temperature 1; 0 when there is none
};

// The flag tokens whose probabilities a step reads: none, the red-flag token <rf>, or several
// (<rf> and one per risk category). p_rf is their total, the probability that the model emits
// some flag; `p`, when given, receives each one's [rows, K] (row-major, flags in order). An
// int converts: -1 is none, anything else one token (validated by the callee).
struct Flags {
  std::vector<int> ids;
  float* p = nullptr;
  Flags() = default;
  Flags(int id) { if (id != -1) ids.push_back(id); }  // NOLINT: implicit, so one token reads as before
  Flags(std::vector<int> list, float* out = nullptr) : ids(std::move(list)), p(out) {}
  int size() const { return int(ids.size()); }
};

// Scratch of logits_pick, reused across calls.
struct PickScratch {
  std::vector<std::pair<float, int>> cand;
};

// Chooses the next token from logits [vocab]. `counter` (e.g. the sequence position) and the
// seed make the random draw depend only on the sequence, never on what else is in the batch.
// top_n > 0 writes the n most likely tokens (descending, ties by lower id) and their
// log-probabilities to top_ids / top_logprobs. scores = false skips the log-sum-exp (a plain
// decode: logprob NaN, p_rf 0, no top_n), which is what the red-flag extraction is measured against.
Pick logits_pick(const float* logits, int vocab, const PickParams& params, uint64_t counter, const Flags& flags,
                 int top_n, uint32_t* top_ids, float* top_logprobs, PickScratch& scratch, bool scores = true);

// One decode step over items (each item's new tokens: a prompt or one token); writes one Pick
// per item and, with top_n > 0, [items, top_n] top tokens. `logits` is scratch [items, vocab].
void decode_step(Model& model, const std::vector<ForwardItem>& items, const std::vector<PickParams>& params,
                 const Flags& flags, int top_n, Pick* picks, uint32_t* top_ids, float* top_logprobs,
                 std::vector<float>& logits, const std::atomic<int>* cancel = nullptr, bool scores = true);

// Teacher-forced red-flag scores: appends every item's tokens and writes p(<rf>) after each
// token to p_rf [total tokens], computing the LM head in row chunks so memory stays
// O(chunk x vocab) however long the input. With logprob_next [total tokens], also the
// log-probability of each item's next token (NaN after an item's last token): the
// teacher-forced likelihood (perplexity, multiple-choice scoring, attack objectives) from the
// same log-sum-exp. flags may be empty (p_rf is then 0) when logprob_next is given.
void token_scores(Model& model, const std::vector<ForwardItem>& items, const Flags& flags, float* p_rf,
                  const std::atomic<int>* cancel = nullptr, float* logprob_next = nullptr);

}  // namespace rf
