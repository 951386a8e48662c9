// The bookkeeping both red-flag loss implementations (the CPU's kernels/rf_loss.cpp, the GPU's
// cuda/rf_loss.cu) start from: the options' flag tokens and the rows, validated with the same
// messages, and the rows' groups. Header-only: the CPU kernels are compiled once per
// instruction set and the CUDA one by nvcc, and each includes it.
#pragma once
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/rf_loss.h"

namespace rf {
// Internal to each unit that includes it: the CPU kernels' copies are compiled once per
// instruction set, and a shared inline definition would leave the linker to keep one of them
// (the AVX-512 unit's would then run on AVX2-only machines).
namespace {

struct RfLossRowsPlan {
  std::vector<int> flags;       // the flag token ids: options.flag_tokens, or {rf_token}
  std::vector<int> row_group;   // per row: its group's dense index, -1 for KL rows
  std::vector<int> group_size;  // rows per group
  RfLossResult counts;          // n_benign_rows, n_groups, n_after_rows set
};

// Throws std::invalid_argument("rf_loss: ...") on sizes, flags, chunk or rows that rf_loss
// (kernels/rf_loss.h) does not accept. With N == 0 the rows are not read.
inline RfLossRowsPlan rf_loss_rows_plan(int N, int Nr, int H, int V, const RfLossRow* rows, const RfLossOptions& opt) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("rf_loss: " + what); };
  if (N < 0 || Nr < 0 || H <= 0) fail("negative or zero size");
  RfLossRowsPlan p;
  p.flags = opt.flag_tokens.empty() ? std::vector<int>{opt.rf_token} : opt.flag_tokens;
  const int K = int(p.flags.size());
  for (int k = 0; k < K; ++k) {
    if (p.flags[k] < 0 || p.flags[k] >= V) fail(opt.flag_tokens.empty() ? "rf_token out of range" : "flag token out of range");
    for (int j = 0; j < k; ++j)
      if (p.flags[j] == p.flags[k]) fail("flag token " + std::to_string(p.flags[k]) + " listed twice");
  }
  if (opt.chunk < 0) fail("negative chunk");
  if (N == 0) return p;
  if (!rows) fail("null pointer");
  std::map<int32_t, int> group_index;  // group id -> dense index
  p.row_group.assign(size_t(N), -1);
  for (int i = 0; i < N; ++i) {
    const RfLossRow& r = rows[i];
    switch (r.kind) {
      case RfLossKind::benign_kl:
      case RfLossKind::after_kl:
        if (r.ref_row < 0 || r.ref_row >= Nr) fail("row " + std::to_string(i) + ": ref_row out of range");
        (r.kind == RfLossKind::benign_kl ? p.counts.n_benign_rows : p.counts.n_after_rows)++;
        break;
      case RfLossKind::red_flag:
        if (r.group < 0) fail("row " + std::to_string(i) + ": red_flag row without a group");
        if (r.flag < 0 || r.flag >= K) fail("row " + std::to_string(i) + ": flag index out of range");
        p.row_group[size_t(i)] = group_index.emplace(r.group, int(group_index.size())).first->second;
        break;
      default:
        fail("row " + std::to_string(i) + ": unknown kind");
    }
  }
  p.counts.n_groups = int(group_index.size());
  p.group_size.assign(size_t(p.counts.n_groups), 0);
  for (int i = 0; i < N; ++i)
    if (p.row_group[size_t(i)] >= 0) p.group_size[size_t(p.row_group[size_t(i)])]++;
  if (opt.aggregation == RfAggregation::single)
    for (int g = 0; g < p.counts.n_groups; ++g)
      if (p.group_size[size_t(g)] != 1) fail("aggregation 'single' needs exactly one row per group");
  return p;
}

}  // namespace
}  // namespace rf
