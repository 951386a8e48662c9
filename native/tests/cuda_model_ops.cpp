// The CUDA engine's glue kernels (native/cuda/model_ops.h) against host references computed in
// double on the same inputs, on a GPU machine; elsewhere it says no device was found and exits 0.
//
// Shapes are odd on purpose: hidden 80, 129 (and 4096 for the flag-row dot products), rows 1, 7,
// 33, vocabularies 97, 1001 and 128256, and one case per elementwise kernel past its grid's
// limit (65535 blocks of 256 threads; swiglu_rows: 65535 tiles of 32 rows) so that their loops
// take a second turn. Outputs are allocated with a
// tail of sentinel floats that must come back bit-identical (nothing written past the end).
//
// Tolerances, and why:
//   - embed_rows: a pure copy (table row, flag row) and bf16 -> f32 (exact: a shift of the bits)
//     must be bit-identical. With pos_embed and/or delta the result is at most two f32 additions,
//     each correctly rounded, so it is within 2 * 2^-24 * (|row| + |pos| + |delta|) of the exact
//     sum: checked as |got - ref| <= 1e-6 * (|row| + |pos| + |delta|) against the double sum
//     (relative to the terms' magnitudes, not |ref|: the terms may cancel).
//   - swiglu_rows: g / (1 + expf(-g)) * u in f32; device expf is within 2 ulps, the add, divide
//     and multiply add one rounding each: a few 1e-7 relative. Checked as
//     |got - ref| <= 2e-6 * (1 + |ref|) against double (2e-6 rather than 1e-6 to leave room for
//     the host/device expf difference near g = 0, where the quotient is sensitive to it). With
//     the adapters' up products added as in is read, the sums are checked first, through the
//     in_f32 copy, within their f32 bound (swiglu_lora_case), and out against the device's sums.
//   - gather_rows: a copy: bit-identical.
//   - merge_lora_rows: lib/train/merge.ts's arithmetic (double sums of exact products, then f32
//     roundings in a fixed order, then one rounding to the weight's dtype): bit-identical to the
//     host's.
//   - set_flag_logits: a dot product of `hidden` f32 products summed per thread and then in a
//     tree: within (depth of the sum) * 2^-24 * sum|x_i w_i|. Checked as
//     |got - ref| <= 1e-5 * sum_i |x_i w_i| against the double dot (relative to the terms'
//     magnitudes: the dot itself may be near zero); every other logit bit-identical; with
//     norm_w (normalizing its input as it reads it) the bits it gives on rmsnorm_rows' output.
//   - row_scores: the log-sum-exp is in f32 (max subtraction, then a sum of up to 128256 exps in
//     512 per-thread partial sums and a tree): its error is a few 1e-6 relative to the sum, plus
//     the rounding of lse itself (3e-5 / 2 at |lse| ~ 300, the offset row). Probabilities must be
//     within 1e-5 absolute of double, log-probabilities within 1e-4 absolute; NaN exactly where
//     the next token is -1; p_rf exactly 0 when there are no flags.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda.h"
#include "cuda/model_ops.h"
#include "cuda/ops.h"
#include "tests/check.h"
#include "tests/cuda_test.h"

using rf::test::check;
using namespace rf::test::cuda;

namespace {

// Cheaper draws for the large grid-stride cases.
std::vector<float> uniform(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng());
  return v;
}

int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng()); }

// --- embed_rows --------------------------------------------------------------------------------

void test_embed_rows() {
  const int vocab = 1000, max_pos = 64;
  const std::vector<int32_t> flag_tokens = {vocab - 2, 5, 123};
  const int K = int(flag_tokens.size());
  int cases = 0;
  for (int hidden : {80, 129}) {
    const std::vector<float> table = randn(size_t(vocab) * hidden, 0.05f);
    std::vector<uint16_t> table_bf16(table.size());
    for (size_t i = 0; i < table.size(); ++i) table_bf16[i] = rf::f32_to_bf16(table[i]);
    const std::vector<float> flag_embed = randn(size_t(K) * hidden, 0.05f);
    const std::vector<float> pos_embed = randn(size_t(max_pos) * hidden, 0.02f);
    Dev d_table = upload(table), d_table_bf16 = upload(table_bf16), d_flag_embed = upload(flag_embed),
        d_flag_tokens = upload(flag_tokens), d_pos = upload(pos_embed);
    for (int rows : {1, 7, 33}) {
      // Every third token a flag token (row 0 is one); the vocabulary's ends on some rows.
      std::vector<int32_t> tokens(static_cast<size_t>(rows)), positions(static_cast<size_t>(rows));
      for (int r = 0; r < rows; ++r) {
        tokens[r] = r % 3 == 0 ? flag_tokens[(r / 3) % K] : randint(0, vocab - 1);
        positions[r] = (r * 7 + 3) % max_pos;
      }
      if (rows > 2) tokens[1] = vocab - 1, tokens[2] = 0;
      const std::vector<float> delta = randn(size_t(rows) * hidden, 0.01f);
      Dev d_tokens = upload(tokens), d_positions = upload(positions), d_delta = upload(delta);
      for (bool bf16 : {false, true})
        for (int flags_mode : {0, 1, 2})  // 0: no flags; 1: flag tokens but flag_embed null; 2: flag rows
          for (bool pos : {false, true})
            for (bool with_delta : {false, true}) {
              const std::string tag = std::string("embed_rows ") + (bf16 ? "bf16" : "f32") + " hidden=" + std::to_string(hidden) +
                                      " rows=" + std::to_string(rows) + " flags=" + std::to_string(flags_mode) +
                                      (pos ? " pos" : "") + (with_delta ? " delta" : "");
              const size_t n = size_t(rows) * hidden;
              Dev d_x = output(n);
              rf::cuda::embed_rows(d_x.f(), bf16 ? d_table_bf16.p : d_table.p, bf16, d_tokens.i(), rows, hidden,
                                   flags_mode == 2 ? d_flag_embed.f() : nullptr, flags_mode >= 1 ? d_flag_tokens.i() : nullptr,
                                   flags_mode >= 1 ? K : 0, pos ? d_pos.f() : nullptr, pos ? d_positions.i() : nullptr,
                                   with_delta ? d_delta.f() : nullptr, nullptr);
              if (!ran(tag)) continue;
              const std::vector<float> x = download<float>(d_x, n + kTail);
              long bad_copy = 0;
              double worst = 0;  // |got - ref| / (|row| + |pos| + |delta|)
              for (int r = 0; r < rows; ++r) {
                int k = -1;
                if (flags_mode == 2)
                  for (int j = 0; j < K; ++j)
                    if (flag_tokens[j] == tokens[r]) k = j;
                for (int i = 0; i < hidden; ++i) {
                  const size_t ti = size_t(tokens[r]) * hidden + i;
                  const float base = k >= 0 ? flag_embed[size_t(k) * hidden + i]
                                            : bf16 ? rf::bf16_to_f32(table_bf16[ti]) : table[ti];
                  const float p = pos ? pos_embed[size_t(positions[r]) * hidden + i] : 0.f;
                  const float d = with_delta ? delta[size_t(r) * hidden + i] : 0.f;
                  const float got = x[size_t(r) * hidden + i];
                  if (!pos && !with_delta) {
                    if (bits(got) != bits(base)) ++bad_copy;
                  } else {
                    const double ref = double(base) + double(p) + double(d);
                    const double mag = std::fabs(double(base)) + std::fabs(double(p)) + std::fabs(double(d));
                    const double err = std::fabs(double(got) - ref);
                    worst = std::max(worst, mag > 0 ? err / mag : (err > 0 ? INFINITY : 0.0));
                    if (std::isnan(got)) worst = INFINITY;
                  }
                }
              }
              if (!pos && !with_delta)
                check(bad_copy == 0, tag + ": rows bit-identical to the table/flag rows (" + std::to_string(bad_copy) + " differ)");
              else
                check(worst <= 1e-6, tag + ": |got - ref| / (|row|+|pos|+|delta|) = " + fmt(worst) + " <= 1e-6");
              check(tail_intact(x, n), tag + ": nothing written past the output");
              ++cases;
            }
    }
  }
  check(cases == 144, "embed_rows: all " + std::to_string(cases) + " of 144 cases ran");
}

// --- swiglu_rows -------------------------------------------------------------------------------

double silu_mul(double g, double u) { return g / (1.0 + std::exp(-g)) * u; }

// x rounded to bf16: its bits, and those bits widened back to f32 (the values a bf16 input holds).
struct Bf16Copy {
  std::vector<uint16_t> bits;
  std::vector<float> widened;
};
Bf16Copy bf16_copy(const std::vector<float>& x) {
  Bf16Copy c{std::vector<uint16_t>(x.size()), std::vector<float>(x.size())};
  for (size_t i = 0; i < x.size(); ++i) c.bits[i] = rf::f32_to_bf16(x[i]), c.widened[i] = rf::bf16_to_f32(c.bits[i]);
  return c;
}

void swiglu_case(int rows, int inter, bool large) {
  const size_t n = size_t(rows) * inter;
  std::vector<float> in = large ? uniform(2 * n, -8.f, 8.f) : randn(2 * n, 3.f);
  if (!large) {
    // Extremes of the gate on row 0: silu saturates (and expf(-g) overflows to inf at g = -100).
    const float extremes[] = {0.f, -0.f, 100.f, -100.f, 20.f, -20.f, 1e-7f, -1e-7f, 88.f, -88.f};
    for (int j = 0; j < 10 && j < inter; ++j) in[j] = extremes[j];
  }
  const std::string tag = "swiglu_rows rows=" + std::to_string(rows) + " inter=" + std::to_string(inter);
  Dev d_in = upload(in), d_out = output(n);
  rf::cuda::swiglu_rows(d_out.f(), d_in.f(), rows, inter, nullptr);
  if (!ran(tag)) return;
  const std::vector<float> out = download<float>(d_out, n + kTail);
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < inter; ++c) {
      const double ref = silu_mul(in[size_t(r) * 2 * inter + c], in[size_t(r) * 2 * inter + inter + c]);
      const float got = out[size_t(r) * inter + c];
      const double e = std::isnan(got) ? INFINITY : std::fabs(double(got) - ref) / (1 + std::fabs(ref));
      worst = std::max(worst, e);
    }
  check(worst <= 2e-6, tag + ": |got - ref| / (1 + |ref|) = " + fmt(worst) + " <= 2e-6");
  check(tail_intact(out, n), tag + ": nothing written past the output");
  if (large) return;
  // With a bf16 output as well: the f32 output the same bits, the bf16 one rf::f32_to_bf16 of it;
  // and the input rounded to bf16 as it is read (the trainer's trace copy): f32_to_bf16 of in.
  Dev d_out2 = output(n), d_bf16(n * 2), d_in16(in.size() * 2);
  rf::cuda::swiglu_rows(d_out2.f(), d_in.f(), rows, inter, nullptr, static_cast<__nv_bfloat16*>(d_bf16.p),
                        static_cast<__nv_bfloat16*>(d_in16.p));
  const std::vector<float> out2 = download<float>(d_out2, n);
  const std::vector<uint16_t> bits = download<uint16_t>(d_bf16, n), in16 = download<uint16_t>(d_in16, in.size());
  long differ = 0;
  for (size_t i = 0; i < n; ++i) differ += std::memcmp(&out[i], &out2[i], 4) != 0 || bits[i] != rf::f32_to_bf16(out[i]);
  for (size_t i = 0; i < in.size(); ++i) differ += in16[i] != rf::f32_to_bf16(in[i]);
  check(differ == 0, tag + " with bf16 copies: f32 the same bits, bf16 out = f32_to_bf16 of it, bf16 in = f32_to_bf16 of in (" +
                         std::to_string(differ) + " differ)");
  // From a bf16 input (the trainer's trace): the f32 version's bits on the widened values.
  const Bf16Copy in_copy = bf16_copy(in);
  Dev d_wide = upload(in_copy.widened), d_bits = upload(in_copy.bits), d_a = output(n), d_b = output(n), d_b16(n * 2);
  rf::cuda::swiglu_rows(d_a.f(), d_wide.f(), rows, inter, nullptr);
  rf::cuda::swiglu_rows(d_b.f(), static_cast<const __nv_bfloat16*>(d_bits.p), rows, inter, nullptr,
                        static_cast<__nv_bfloat16*>(d_b16.p));
  if (!ran(tag + " from bf16")) return;
  const std::vector<float> a = download<float>(d_a, n + kTail), b = download<float>(d_b, n + kTail);
  check(std::memcmp(a.data(), b.data(), (n + kTail) * 4) == 0,
        tag + " from a bf16 input: the f32 version's bits on the widened values, nothing past the output");
  const std::vector<uint16_t> b16 = download<uint16_t>(d_b16, n);
  differ = 0;
  for (size_t i = 0; i < n; ++i) differ += b16[i] != rf::f32_to_bf16(b[i]);
  check(differ == 0, tag + " from a bf16 input with a bf16 output: f32_to_bf16 of the f32 one (" + std::to_string(differ) + " differ)");
}

// With the gate|up adapters' up products added as in is read (SwigluLora): ranks gate_rank and
// up_rank (0: no adapter on that half). The sums first, through in_f32: g = in + sum_k u_k B_k
// in f32 (fused multiply-adds in k order, then one add), so within (rank + 1) * 2^-24 *
// (|in| + sum_k |u_k B_k|) of the double sum, that bound checked (a half without an adapter:
// in's bits exactly). Then out against silu_mul of the device's own
// sums in double (swiglu_case's 2e-6 bound), the bf16 copies as f32_to_bf16 of the f32 ones, and
// in place (in_f32 = in) the same bits.
void swiglu_lora_case(int rows, int inter, int gate_rank, int up_rank) {
  const size_t n = size_t(rows) * inter;
  const std::vector<float> in = randn(2 * n, 2.f);
  const int ranks[2] = {gate_rank, up_rank};
  std::vector<float> u[2], B[2];
  for (int h = 0; h < 2; ++h) u[h] = randn(size_t(rows) * std::max(1, ranks[h])), B[h] = randn(size_t(inter) * std::max(1, ranks[h]), 0.3f);
  const std::string tag = "swiglu_rows + lora rows=" + std::to_string(rows) + " inter=" + std::to_string(inter) +
                          " ranks=" + std::to_string(gate_rank) + "," + std::to_string(up_rank);
  Dev d_in = upload(in), d_out = output(n), d_out16(n * 2), d_in32 = output(2 * n), d_in16(2 * n * 2);
  Dev d_u0 = upload(u[0]), d_u1 = upload(u[1]), d_b0 = upload(B[0]), d_b1 = upload(B[1]);
  rf::cuda::SwigluLora terms[2];
  if (gate_rank) terms[0] = {d_u0.f(), d_b0.f(), gate_rank};
  if (up_rank) terms[1] = {d_u1.f(), d_b1.f(), up_rank};
  rf::cuda::swiglu_rows(d_out.f(), d_in.f(), rows, inter, nullptr, static_cast<__nv_bfloat16*>(d_out16.p),
                        static_cast<__nv_bfloat16*>(d_in16.p), terms[0], terms[1], d_in32.f());
  if (!ran(tag)) return;
  const std::vector<float> out = download<float>(d_out, n + kTail), sums = download<float>(d_in32, 2 * n + kTail);
  double worst_sum = 0, worst = 0;
  long exact_differ = 0;
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < inter; ++c) {
        const size_t i = size_t(r) * 2 * inter + size_t(h) * inter + c;
        if (!ranks[h]) {
          exact_differ += bits(sums[i]) != bits(in[i]);
          continue;
        }
        double ref = in[i], mag = std::fabs(in[i]);
        for (int k = 0; k < ranks[h]; ++k) {
          const double t = double(u[h][size_t(r) * ranks[h] + k]) * B[h][size_t(c) * ranks[h] + k];
          ref += t, mag += std::fabs(t);
        }
        const double bound = (ranks[h] + 1) * std::ldexp(1.0, -24) * mag;  // in units of the bound
        worst_sum = std::max(worst_sum, std::isnan(sums[i]) ? INFINITY : std::fabs(sums[i] - ref) / bound);
      }
  check(worst_sum <= 1 && exact_differ == 0, tag + ": the sums within (rank + 1) 2^-24 (|in| + sum |u B|) (" + fmt(worst_sum) +
                                                 " of it), halves without an adapter as they were (" + std::to_string(exact_differ) +
                                                 " differ)");
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < inter; ++c) {
      const size_t i = size_t(r) * 2 * inter + c;
      const double ref = silu_mul(sums[i], sums[i + inter]);
      const float got = out[size_t(r) * inter + c];
      worst = std::max(worst, std::isnan(got) ? INFINITY : std::fabs(double(got) - ref) / (1 + std::fabs(ref)));
    }
  check(worst <= 2e-6, tag + ": out against the device's sums, |got - ref| / (1 + |ref|) = " + fmt(worst) + " <= 2e-6");
  check(tail_intact(out, n) && tail_intact(sums, 2 * n), tag + ": nothing written past out or in_f32");
  const std::vector<uint16_t> out16 = download<uint16_t>(d_out16, n), in16 = download<uint16_t>(d_in16, 2 * n);
  long differ = 0;
  for (size_t i = 0; i < n; ++i) differ += out16[i] != rf::f32_to_bf16(out[i]);
  for (size_t i = 0; i < 2 * n; ++i) differ += in16[i] != rf::f32_to_bf16(sums[i]);
  check(differ == 0, tag + ": the bf16 copies f32_to_bf16 of out and of the sums (" + std::to_string(differ) + " differ)");
  // The bf16 output alone (out null): the same bf16 bits.
  Dev d_alone16(n * 2);
  rf::cuda::swiglu_rows(nullptr, d_in.f(), rows, inter, nullptr, static_cast<__nv_bfloat16*>(d_alone16.p), nullptr, terms[0],
                        terms[1]);
  check(download<uint16_t>(d_alone16, n) == out16, tag + " with the bf16 output alone: the same bits");
  // In place: in_f32 = in, the same bits.
  Dev d_out2 = output(n);
  rf::cuda::swiglu_rows(d_out2.f(), d_in.f(), rows, inter, nullptr, nullptr, nullptr, terms[0], terms[1], d_in.f());
  const std::vector<float> out2 = download<float>(d_out2, n), sums2 = download<float>(d_in, 2 * n);
  check(std::memcmp(out.data(), out2.data(), n * 4) == 0 && std::memcmp(sums.data(), sums2.data(), 2 * n * 4) == 0,
        tag + " in place (in_f32 = in): the same bits");
  // From a bf16 in (a bf16 model's gate|up product): the f32 version's bits on its widening.
  const Bf16Copy in_copy = bf16_copy(in);
  Dev d_wide = upload(in_copy.widened), d_bits = upload(in_copy.bits), d_a = output(n), d_b = output(n), d_a16(n * 2), d_b16(n * 2);
  rf::cuda::swiglu_rows(d_a.f(), d_wide.f(), rows, inter, nullptr, static_cast<__nv_bfloat16*>(d_a16.p), nullptr, terms[0], terms[1]);
  rf::cuda::swiglu_rows(d_b.f(), static_cast<const __nv_bfloat16*>(d_bits.p), rows, inter, nullptr,
                        static_cast<__nv_bfloat16*>(d_b16.p), terms[0], terms[1]);
  const std::vector<float> wa = download<float>(d_a, n + kTail), wb = download<float>(d_b, n + kTail);  // the tails: NaN bits
  check(std::memcmp(wa.data(), wb.data(), (n + kTail) * 4) == 0 && download<uint16_t>(d_a16, n) == download<uint16_t>(d_b16, n),
        tag + " from a bf16 input: the f32 version's bits on the widened values, nothing past the output");
}

void test_swiglu_rows() {
  for (int rows : {1, 7, 33})
    for (int inter : {80, 129, 1000}) swiglu_case(rows, inter, false);
  // 65535 * 32 + 67 rows: past the grid's 65535 tiles of 32 rows, the tile loop's second turn.
  swiglu_case(65535 * 32 + 67, 3, true);
  // Each instance (ranks up to 8, 16, 32), partial ranks, one half or both, a partial last tile
  // of rows and a partial block of columns.
  for (const auto& rk : std::vector<std::pair<int, int>>{{8, 8}, {16, 0}, {0, 16}, {3, 13}, {32, 32}, {20, 1}})
    for (int rows : {1, 45}) swiglu_lora_case(rows, 129, rk.first, rk.second);
  swiglu_lora_case(70, 300, 16, 16);
  // Refused: a rank past kSwigluLoraMaxRank, an adapter without B.
  Dev d(64);
  bool refused = false;
  try {
    rf::cuda::swiglu_rows(d.f(), d.f(), 1, 4, nullptr, nullptr, nullptr, {d.f(), d.f(), rf::cuda::kSwigluLoraMaxRank + 1});
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  bool refused_b = false;
  try {
    rf::cuda::swiglu_rows(d.f(), d.f(), 1, 4, nullptr, nullptr, nullptr, {}, {d.f(), nullptr, 4});
  } catch (const std::invalid_argument&) {
    refused_b = true;
  }
  check(refused && refused_b, "swiglu_rows refuses an adapter rank past kSwigluLoraMaxRank and an adapter without B");
}

// --- gather_rows -------------------------------------------------------------------------------

void test_gather_rows() {
  const int src_rows = 50;
  for (int width : {80, 129, 4099})
    for (int n : {1, 7, 33}) {
      const std::vector<float> x = randn(size_t(src_rows) * width);
      std::vector<int32_t> idx(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) idx[i] = randint(0, src_rows - 1);
      idx[0] = src_rows - 1;
      if (n > 2) idx[1] = 0, idx[2] = idx[0];  // both ends, and a repeat
      const std::string tag = "gather_rows width=" + std::to_string(width) + " n=" + std::to_string(n);
      const size_t m = size_t(n) * width;
      Dev d_x = upload(x), d_idx = upload(idx), d_out = output(m);
      rf::cuda::gather_rows(d_out.f(), d_x.f(), d_idx.i(), n, width, nullptr);
      if (!ran(tag)) continue;
      const std::vector<float> out = download<float>(d_out, m + kTail);
      long bad = 0;
      for (int i = 0; i < n; ++i)
        for (int c = 0; c < width; ++c)
          if (bits(out[size_t(i) * width + c]) != bits(x[size_t(idx[i]) * width + c])) ++bad;
      check(bad == 0, tag + ": rows bit-identical to the source rows (" + std::to_string(bad) + " differ)");
      check(tail_intact(out, m), tag + ": nothing written past the output");
    }
}

// --- set_flag_logits ---------------------------------------------------------------------------

void test_set_flag_logits() {
  const int vocab = 1001;
  for (int hidden : {80, 129, 4096})
    for (int rows : {1, 7, 33})
      for (const std::vector<int32_t>& tokens : {std::vector<int32_t>{517}, std::vector<int32_t>{vocab - 1, 0, 517}}) {
        const int K = int(tokens.size());
        const std::vector<float> xn = randn(size_t(rows) * hidden), head = randn(size_t(K) * hidden, 0.05f);
        // The base logits are random markers that must come back bit for bit outside the flag columns.
        const std::vector<float> logits0 = randn(size_t(rows) * vocab, 4.f);
        const std::string tag = "set_flag_logits hidden=" + std::to_string(hidden) + " rows=" + std::to_string(rows) +
                                " flags=" + std::to_string(K);
        Dev d_xn = upload(xn), d_head = upload(head), d_tokens = upload(tokens), d_logits = upload(logits0);
        rf::cuda::set_flag_logits(d_logits.f(), vocab, d_xn.f(), rows, hidden, d_head.f(), d_tokens.i(), K, nullptr);
        if (!ran(tag)) continue;
        const std::vector<float> logits = download<float>(d_logits, logits0.size());
        long bad_other = 0;
        double worst = 0;  // |got - ref| / sum |x_i w_i|
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < vocab; ++v) {
            const size_t li = size_t(r) * vocab + v;
            const int k = int(std::find(tokens.begin(), tokens.end(), v) - tokens.begin());
            if (k == K) {
              if (bits(logits[li]) != bits(logits0[li])) ++bad_other;
              continue;
            }
            double ref = 0, mag = 0;
            for (int i = 0; i < hidden; ++i) {
              const double t = double(xn[size_t(r) * hidden + i]) * head[size_t(k) * hidden + i];
              ref += t;
              mag += std::fabs(t);
            }
            const double e = std::isnan(logits[li]) ? INFINITY : std::fabs(double(logits[li]) - ref) / (mag > 0 ? mag : 1.0);
            worst = std::max(worst, e);
          }
        check(worst <= 1e-5, tag + ": flag logits |got - ref| / sum|x_i w_i| = " + fmt(worst) + " <= 1e-5");
        check(bad_other == 0, tag + ": every other logit unchanged (" + std::to_string(bad_other) + " changed)");
        // Normalizing as it reads (norm_w: a decode step's head): the bits of set_flag_logits on
        // rmsnorm_rows' output.
        const std::vector<float> x = randn(size_t(rows) * hidden, 3.f), norm_w = randn(size_t(hidden), 0.5f, 1.f);
        Dev d_x = upload(x), d_norm = upload(norm_w), d_normed(x.size() * 4), d_a = upload(logits0), d_b = upload(logits0);
        rf::cuda::rmsnorm_rows(d_normed.f(), d_x.f(), d_norm.f(), rows, hidden, 1e-5f, nullptr);
        rf::cuda::set_flag_logits(d_a.f(), vocab, d_normed.f(), rows, hidden, d_head.f(), d_tokens.i(), K, nullptr);
        rf::cuda::set_flag_logits(d_b.f(), vocab, d_x.f(), rows, hidden, d_head.f(), d_tokens.i(), K, nullptr, d_norm.f(), 1e-5f);
        if (!ran(tag + " normalizing")) continue;
        const std::vector<float> a = download<float>(d_a, logits0.size()), b = download<float>(d_b, logits0.size());
        check(std::memcmp(a.data(), b.data(), a.size() * 4) == 0,
              tag + " normalizing its input: the bits of set_flag_logits on rmsnorm_rows' output");
      }
}

// --- row_scores --------------------------------------------------------------------------------

double row_lse(const float* z, int vocab) {
  double m = -INFINITY;
  for (int i = 0; i < vocab; ++i) m = std::max(m, double(z[i]));
  double s = 0;
  for (int i = 0; i < vocab; ++i) s += std::exp(double(z[i]) - m);
  return m + std::log(s);
}

void row_scores_case(int vocab, int rows) {
  const std::vector<std::vector<int32_t>> flag_sets = {{}, {vocab / 2}, {3, vocab - 1, vocab / 3}};
  // Next tokens: -1 on every fourth row and the last (an item's last token), both ends of the
  // vocabulary on some rows, random elsewhere.
  std::vector<int32_t> next(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r) next[r] = r % 4 == 3 || r == rows - 1 ? -1 : randint(0, vocab - 1);
  if (rows > 2) next[0] = 0, next[1] = vocab - 1;
  // Rows of random logits, with special rows by r % 5: 1 one token (vocab / 2, a flag of two
  // sets) 20 above the rest (p ~ 1); 2 all logits offset by 300 (exp without max subtraction
  // would overflow); 3 all equal (p = 1 / vocab); 4 half the logits -1e30 (masked).
  std::vector<float> z = randn(size_t(rows) * vocab, 2.5f);
  for (int r = 0; r < rows; ++r) {
    float* row = z.data() + size_t(r) * vocab;
    switch (r % 5) {
      case 1: row[vocab / 2] = *std::max_element(row, row + vocab) + 20.f; break;
      case 2:
        for (int i = 0; i < vocab; ++i) row[i] += 300.f;
        break;
      case 3: std::fill(row, row + vocab, 0.25f); break;
      case 4:
        for (int i = 1; i < vocab; i += 2) {
          const bool keep = i == next[r] || i == 3 || i == vocab - 1 || i == vocab / 3 || i == vocab / 2;
          if (!keep) row[i] = -1e30f;
        }
        break;
      default: break;
    }
  }
  std::vector<double> lse(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r) lse[r] = row_lse(z.data() + size_t(r) * vocab, vocab);
  Dev d_z = upload(z), d_next = upload(next);
  for (const std::vector<int32_t>& flags : flag_sets) {
    const int K = int(flags.size());
    Dev d_flags = upload(flags);
    for (bool want_p_flags : {true, false})
      for (bool want_next : {true, false}) {
        if (K == 0 && want_p_flags) continue;  // p_flags [rows, 0]: nothing to write
        const std::string tag = "row_scores vocab=" + std::to_string(vocab) + " rows=" + std::to_string(rows) + " flags=" +
                                std::to_string(K) + (want_p_flags ? " p_flags" : "") + (want_next ? " logprob_next" : "");
        Dev d_prf = output(size_t(rows)), d_pf = output(size_t(rows) * K), d_lp = output(size_t(rows));
        rf::cuda::row_scores(d_z.f(), rows, vocab, K ? d_flags.i() : nullptr, K, want_next ? d_next.i() : nullptr, d_prf.f(),
                             want_p_flags ? d_pf.f() : nullptr, want_next ? d_lp.f() : nullptr, nullptr);
        if (!ran(tag)) continue;
        const std::vector<float> prf = download<float>(d_prf, rows + kTail), pf = download<float>(d_pf, size_t(rows) * K + kTail),
                                 lp = download<float>(d_lp, rows + kTail);
        double worst_p = 0, worst_lp = 0;
        long bad_nan = 0, bad_zero = 0;
        for (int r = 0; r < rows; ++r) {
          const float* row = z.data() + size_t(r) * vocab;
          double total = 0;
          for (int k = 0; k < K; ++k) {
            const double p = std::exp(double(row[flags[k]]) - lse[r]);
            total += p;
            if (want_p_flags) {
              const float got = pf[size_t(r) * K + k];
              worst_p = std::max(worst_p, std::isnan(got) ? INFINITY : std::fabs(double(got) - p));
            }
          }
          if (K == 0 && bits(prf[r]) != bits(0.f)) ++bad_zero;
          worst_p = std::max(worst_p, std::isnan(prf[r]) ? INFINITY : std::fabs(double(prf[r]) - total));
          if (want_next) {
            if (next[r] < 0) {
              if (!std::isnan(lp[r])) ++bad_nan;
            } else {
              const double ref = double(row[next[r]]) - lse[r];
              worst_lp = std::max(worst_lp, std::isnan(lp[r]) ? INFINITY : std::fabs(double(lp[r]) - ref));
            }
          }
        }
        check(worst_p <= 1e-5, tag + ": p_rf and each flag's p |got - ref| = " + fmt(worst_p) + " <= 1e-5");
        if (K == 0) check(bad_zero == 0, tag + ": p_rf exactly 0 without flags (" + std::to_string(bad_zero) + " rows not)");
        if (want_next) {
          check(worst_lp <= 1e-4, tag + ": log p(next) |got - ref| = " + fmt(worst_lp) + " <= 1e-4");
          check(bad_nan == 0, tag + ": log p(next) NaN where next is -1 (" + std::to_string(bad_nan) + " rows not)");
        }
        check(tail_intact(prf, size_t(rows)) && tail_intact(pf, want_p_flags ? size_t(rows) * K : 0) &&
                  tail_intact(lp, want_next ? size_t(rows) : 0),
              tag + ": nothing written past the outputs, nor into those not passed");
      }
  }
}

void test_row_scores() {
  row_scores_case(97, 7);  // fewer logits than the block's threads
  for (int rows : {1, 7, 33}) row_scores_case(1001, rows);
  row_scores_case(128256, 2);
  row_scores_case(128256, 5);  // one row of each kind
}

}  // namespace

// --- merge_lora_rows ---------------------------------------------------------------------------

// w += scale (B A) with lib/train/merge.ts's arithmetic (see model_ops.h), on the host.
float merged_value(float w, const std::vector<float>& A, const std::vector<float>& B, int o, int i, int in, int rank,
                   float scale) {
  double acc = 0.0;
  for (int k = 0; k < rank; ++k) {
    const float b = B[size_t(o) * rank + k];
    if (b != 0.f) acc += double(b) * double(A[size_t(k) * in + i]);
  }
  const volatile float delta = float(acc) * scale;  // volatile: two separate roundings, as merge.ts
  return w + delta;
}

void merge_case(int out, int in, int rank, bool bf16) {
  const std::string tag = std::string("merge_lora_rows ") + (bf16 ? "bf16" : "f32") + " out=" + std::to_string(out) +
                          " in=" + std::to_string(in) + " rank=" + std::to_string(rank);
  std::vector<float> A = randn(size_t(rank) * in, 0.05f), B = randn(size_t(out) * rank, 0.05f);
  for (size_t j = 0; j < B.size(); j += 3) B[j] = 0.f;  // zero entries are skipped, as merge.ts does
  const float scale = 2.f;
  const std::vector<float> w0 = randn(size_t(out) * in, 0.02f);
  const size_t n = size_t(out) * in;
  Dev d_a = upload(A), d_b = upload(B);
  long bad = 0;
  bool tail = true;
  if (bf16) {
    std::vector<uint16_t> w(n + kTail, 0xbeef);
    for (size_t j = 0; j < n; ++j) w[j] = rf::f32_to_bf16(w0[j]);
    Dev d_w = upload(w);
    rf::cuda::merge_lora_rows(d_w.p, true, out, in, d_a.f(), d_b.f(), rank, scale, nullptr);
    if (!ran(tag)) return;
    const std::vector<uint16_t> got = download<uint16_t>(d_w, n + kTail);
    for (int o = 0; o < out; ++o)
      for (int i = 0; i < in; ++i) {
        const size_t j = size_t(o) * in + i;
        const uint16_t want = rf::f32_to_bf16(merged_value(rf::bf16_to_f32(w[j]), A, B, o, i, in, rank, scale));
        if (got[j] != want) ++bad;
      }
    for (size_t j = n; j < got.size(); ++j) tail = tail && got[j] == 0xbeef;
  } else {
    std::vector<float> w(w0);
    w.resize(n + kTail, sentinel());
    Dev d_w = upload(w);
    rf::cuda::merge_lora_rows(d_w.p, false, out, in, d_a.f(), d_b.f(), rank, scale, nullptr);
    if (!ran(tag)) return;
    const std::vector<float> got = download<float>(d_w, n + kTail);
    for (int o = 0; o < out; ++o)
      for (int i = 0; i < in; ++i) {
        const size_t j = size_t(o) * in + i;
        if (bits(got[j]) != bits(merged_value(w0[j], A, B, o, i, in, rank, scale))) ++bad;
      }
    tail = tail_intact(got, n);
  }
  check(bad == 0, tag + ": the merged checkpoint's arithmetic bit for bit (" + std::to_string(bad) + " differ)");
  check(tail, tag + ": nothing written past the weight");
}

void test_merge_lora_rows() {
  for (bool bf16 : {false, true}) {
    merge_case(7, 80, 4, bf16);
    merge_case(33, 129, 16, bf16);
    merge_case(64, 1000, 8, bf16);
  }
}

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_model_ops: no CUDA device visible; skipped\n");
    return 0;
  }
  rng().seed(8675309);
  test_embed_rows();
  test_swiglu_rows();
  test_gather_rows();
  test_set_flag_logits();
  test_row_scores();
  test_merge_lora_rows();
  return rf::test::finish("cuda_model_ops");
}
