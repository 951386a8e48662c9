#include "model/decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/ops.h"
#include "model/draw.h"

namespace rf {

namespace {

// Descending by value, then ascending by id: the order torch.topk / argmax agree with.
bool before(const std::pair<float, int>& a, const std::pair<float, int>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// The k largest (value, id) pairs of z, sorted with before().
void top_candidates(const float* z, int n, int k, std::vector<std::pair<float, int>>& out) {
  out.clear();
  k = std::min(k, n);
  // A min-heap (under before()) of the best k so far: most rows reject almost every element
  // with one comparison against the heap's worst.
  for (int i = 0; i < n; ++i) {
    if (int(out.size()) < k) {
      out.emplace_back(z[i], i);
      std::push_heap(out.begin(), out.end(), before);
    } else if (z[i] > out.front().first) {
      std::pop_heap(out.begin(), out.end(), before);
      out.back() = {z[i], i};
      std::push_heap(out.begin(), out.end(), before);
    }
  }
  std::sort_heap(out.begin(), out.end(), before);
}

// The vector max first, then a scan for its first position: cheaper than one scalar
// compare-and-select chain over the whole row.
int first_argmax(const float* z, int n, float mx) {
  for (int i = 0; i < n; ++i)
    if (z[i] == mx) return i;
  return 0;  // unreachable unless the row holds NaN
}
int first_argmax(const float* z, int n) { return first_argmax(z, n, row_max(z, n)); }

// Samples from softmax(z / T) restricted by top-k / top-p; returns the token id.
int sample(const float* z, int n, const PickParams& p, double u, std::vector<std::pair<float, int>>& cand) {
  const float inv_t = 1.f / p.temperature;
  // A temperature so small that 1/T overflows is the greedy limit.
  if (!std::isfinite(inv_t)) return first_argmax(z, n);
  if (p.top_k == 0 && p.top_p >= 1.f) {
    // The whole vocabulary in id order: no sort needed.
    const float mx = row_max(z, n);
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += std::exp(double((z[i] - mx) * inv_t));
    double r = u * sum;
    for (int i = 0; i < n; ++i) {
      r -= std::exp(double((z[i] - mx) * inv_t));
      if (r < 0) return i;
    }
    return n - 1;
  }
  // Candidates in descending order: the top-k, or for top-p alone a growing prefix that is
  // large enough once its mass reaches top_p of the total.
  double total = 0;
  const float mx = row_max(z, n);
  if (p.top_k == 0)
    for (int i = 0; i < n; ++i) total += std::exp(double((z[i] - mx) * inv_t));
  int k = p.top_k > 0 ? std::min(p.top_k, n) : std::min(256, n);
  for (;;) {
    top_candidates(z, n, k, cand);
    if (p.top_k > 0 || k == n) break;
    double mass = 0;
    for (auto& c : cand) mass += std::exp(double((c.first - mx) * inv_t));
    if (mass >= double(p.top_p) * total) break;
    k = std::min(n, k * 8);
  }
  std::vector<double> probs(cand.size());
  double sum = 0;
  for (size_t i = 0; i < cand.size(); ++i) sum += probs[i] = std::exp(double((cand[i].first - mx) * inv_t));
  if (p.top_k == 0) sum = total;
  size_t keep = cand.size();
  if (p.top_p < 1.f) {
    double cumulative = 0;
    for (size_t i = 0; i < cand.size(); ++i) {
      cumulative += probs[i] / sum;
      if (cumulative >= double(p.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += probs[i];
  double r = u * kept;
  for (size_t i = 0; i < keep; ++i) {
    r -= probs[i];
    if (r < 0) return cand[i].second;
  }
  return cand[keep - 1].second;
}

}  // namespace

// Writes each flag's p to p_flags [K] (when given) and returns their total.
static float flags_read(const float* z, int n, float lse, const Flags& flags, float* p_flags) {
  float total = 0.f;
  for (int k = 0; k < flags.size(); ++k) {
    const int id = flags.ids[k];
    const float p = id >= 0 && id < n ? std::exp(z[id] - lse) : 0.f;
    if (p_flags) p_flags[k] = p;
    total += p;
  }
  return total;
}

// The flag ids must name distinct tokens of the vocabulary.
static void flags_check(const Flags& flags, int V, const char* who) {
  for (int k = 0; k < flags.size(); ++k) {
    if (flags.ids[k] < 0 || flags.ids[k] >= V)
      throw std::invalid_argument(std::string(who) + ": the red-flag token is outside the vocabulary");
    for (int j = 0; j < k; ++j)
      if (flags.ids[j] == flags.ids[k]) throw std::invalid_argument(std::string(who) + ": a flag token is listed twice");
  }
}

Pick logits_pick(const float* z, int n, const PickParams& params, uint64_t counter, const Flags& flags, int top_n,
                 uint32_t* top_ids, float* top_logprobs, PickScratch& scratch, bool scores) {
  Pick pick;
  // One vector max serves the greedy pick and the log-sum-exp: the red-flag extraction then
  // costs one exp pass over the row.
  const float mx = row_max(z, n);
  const int token = params.temperature > 0.f
                        ? sample(z, n, params, uniform_draw(params.seed, counter), scratch.cand)
                        : first_argmax(z, n, mx);
  pick.token = uint32_t(token);
  if (!scores) {
    pick.logprob = NAN;
    return pick;
  }
  const float lse = mx + std::log(sum_exp(z, n, mx));
  pick.logprob = z[token] - lse;
  pick.p_rf = flags_read(z, n, lse, flags, flags.p);
  if (top_n > 0) {
    top_candidates(z, n, top_n, scratch.cand);
    for (int i = 0; i < top_n; ++i) {
      const bool have = i < int(scratch.cand.size());
      top_ids[i] = have ? uint32_t(scratch.cand[i].second) : 0;
      top_logprobs[i] = have ? scratch.cand[i].first - lse : -INFINITY;
    }
  }
  return pick;
}

void decode_step(Model& model, const std::vector<ForwardItem>& items, const std::vector<PickParams>& params,
                 const Flags& flags, int top_n, Pick* picks, uint32_t* top_ids, float* top_logprobs,
                 std::vector<float>& logits, const std::atomic<int>* cancel, bool scores) {
  if (params.size() != items.size()) throw std::invalid_argument("decode_step: one PickParams per item is required");
  flags_check(flags, model.vocab(), "decode_step");
  for (const ForwardItem& it : items)
    if (it.n_tokens < 1) throw std::invalid_argument("decode_step: every sequence needs at least one new token");
  const int V = model.vocab();
  const long B = long(items.size());
  logits.resize(size_t(B) * V);
  model.forward(items, LogitsMode::last, logits.data(), cancel);
  // Rows are independent; a row costs a few passes over the vocabulary, so split them across
  // the pool only when there are several.
  auto pick_rows = [&](long begin, long end) {
    PickScratch scratch;
    Flags row_flags(flags.ids);  // one copy of the ids per range; each row points p at its outputs
    for (long b = begin; b < end; ++b) {
      // The counter is the position the new token will take: the same whatever the batch.
      const uint64_t counter = uint64_t(items[b].cache->length());
      row_flags.p = flags.p ? flags.p + b * flags.size() : nullptr;
      picks[b] = logits_pick(logits.data() + b * V, V, params[b], counter, row_flags, top_n,
                             top_n > 0 ? top_ids + b * top_n : nullptr, top_n > 0 ? top_logprobs + b * top_n : nullptr,
                             scratch, scores);
    }
  };
  if (B == 1 || model.threads() == 1) {
    pick_rows(0, B);
  } else {
    model.pool().parallel_for(B, [&](long begin, long end, int) { pick_rows(begin, end); });
  }
}

void token_scores(Model& model, const std::vector<ForwardItem>& items, const Flags& flags, float* p_rf,
                  const std::atomic<int>* cancel, float* logprob_next) {
  const int V = model.vocab();
  flags_check(flags, V, "token_scores");
  if (flags.size() == 0 && !logprob_next)
    throw std::invalid_argument("token_scores: the red-flag token is outside the vocabulary");
  const int K = flags.size();
  const long H = model.config().hidden;
  const long R = Model::logits_rows(items, LogitsMode::all);
  // Each row's next token within its item, -1 after an item's last token.
  std::vector<int64_t> next;
  if (logprob_next) {
    next.reserve(size_t(R));
    for (const ForwardItem& it : items)
      for (int t = 0; t < it.n_tokens; ++t) next.push_back(t + 1 < it.n_tokens ? int64_t(it.tokens[t + 1]) : -1);
  }
  std::vector<float> hidden(size_t(R) * H);
  model.forward(items, LogitsMode::hidden, hidden.data(), cancel);
  // 64 rows of logits at a time: enough rows for the GEMM to reuse each weight panel.
  constexpr long kChunk = 64;
  std::vector<float> logits(size_t(std::min(R, kChunk)) * V);
  for (long r0 = 0; r0 < R; r0 += kChunk) {
    if (cancel && cancel->load(std::memory_order_relaxed)) {
      // Cancelled calls leave the sequences as they were, as a cancelled forward does.
      for (const ForwardItem& it : items) it.cache->truncate(it.cache->length() - it.n_tokens);
      throw Cancelled();
    }
    const long rows = std::min(kChunk, R - r0);
    model.head_logits(hidden.data() + r0 * H, rows, logits.data());
    auto score = [&](long begin, long end) {
      for (long r = begin; r < end; ++r) {
        const float* z = logits.data() + r * V;
        const float lse = logsumexp(z, V);
        p_rf[r0 + r] = flags_read(z, V, lse, flags, flags.p ? flags.p + (r0 + r) * K : nullptr);
        if (logprob_next) {
          const int64_t n = next[size_t(r0 + r)];
          logprob_next[r0 + r] = n >= 0 && n < V ? z[n] - lse : std::numeric_limits<float>::quiet_NaN();
        }
      }
    };
    if (model.threads() == 1) score(0, rows);
    else model.pool().parallel_for(rows, [&](long b, long e, int) { score(b, e); });
  }
}

}  // namespace rf
