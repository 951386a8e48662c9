// The GPU trainer's glue kernels (native/cuda/train_ops.h) against host loops on the same inputs,
// on a GPU machine (and under the CPU emulation in CI); without a device it says so and exits 0.
//
// Every kernel here either copies, selects or adds f32 values in a stated order, so each result
// is checked bit for bit against the host doing the same f32 operations in the same order:
//   - dropout_rows / dropout_add: the mask must be rf::dropout_keep's (model/dropout_keep.h), element
//     for element (the backward regenerates it), and x * (1 / (1 - p)) is one f32 product;
//   - scale_copy: one f32 product per element;
//   - widen_bf16: every one of the 65536 bit patterns (NaNs, infinities, subnormals), as the
//     CPU's rf::bf16_to_f32;
//   - add_rows_grouped: each destination row's sources added in list order; rows not named keep
//     their bits;
//   - token_rows_grad: each flag's rows added in add_column_sums' order (the other rows as zeros);
//   - add_column_sums: each column's rows added in the stated order of parts and lanes
//     (train_ops.h), the host following it with column_sum_rows_per_part.
// Outputs carry a tail of sentinel floats that must come back unchanged. Shapes are odd (cols 1,
// 77, 4099; rows 1, 13, 300) and one elementwise case passes 65535 blocks of 256 threads (the
// grid-stride loops' second turn).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda.h"
#include "cuda/train_ops.h"
#include "model/model.h"
#include "tests/check.h"

using rf::test::check;

namespace {

std::mt19937 rng(4242);

std::vector<float> randn(size_t n) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

constexpr size_t kTail = 19;
constexpr uint32_t kSentinel = 0x7fc0beefu;

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// A device copy of host floats with a sentinel tail; back() returns all of it.
// x rounded to bf16 in place (so that f32 and bf16 calls read the same values), its bits on the
// device with `pad` bytes more, freed with it.
struct DevBf16 {
  __nv_bfloat16* p = nullptr;
  explicit DevBf16(std::vector<float>& x, size_t pad = 0) {
    std::vector<uint16_t> bits(x.size());
    for (size_t i = 0; i < x.size(); ++i) bits[i] = rf::f32_to_bf16(x[i]), x[i] = rf::bf16_to_f32(bits[i]);
    cudaMalloc(&p, bits.size() * 2 + pad);
    cudaMemcpy(p, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice);
  }
  DevBf16(const DevBf16&) = delete;
  DevBf16& operator=(const DevBf16&) = delete;
  ~DevBf16() { cudaFree(p); }
};

struct DevFloats {
  float* p = nullptr;
  size_t n;
  explicit DevFloats(const std::vector<float>& v) : n(v.size()) {
    std::vector<float> h(v);
    float s;
    std::memcpy(&s, &kSentinel, 4);
    h.resize(n + kTail, s);
    cudaMalloc(&p, h.size() * 4);
    cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  }
  ~DevFloats() { cudaFree(p); }
  std::vector<float> back() const {
    std::vector<float> h(n + kTail);
    cudaDeviceSynchronize();
    cudaMemcpy(h.data(), p, h.size() * 4, cudaMemcpyDeviceToHost);
    return h;
  }
};

struct DevInts {
  int32_t* p = nullptr;
  explicit DevInts(const std::vector<int32_t>& v) {
    cudaMalloc(&p, std::max<size_t>(1, v.size()) * 4);
    if (!v.empty()) cudaMemcpy(p, v.data(), v.size() * 4, cudaMemcpyHostToDevice);
  }
  ~DevInts() { cudaFree(p); }
};

// got (with its tail) against want, bit for bit; the tail must be the sentinel.
void expect_bits(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (!same_bits(got[i], want[i]) && bad++ == 0) first = i;
  check(bad == 0, what + ": " + std::to_string(bad) + " elements differ (first at " + std::to_string(first) + ")");
  bool tail = true;
  for (size_t i = want.size(); i < got.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &got[i], 4);
    tail &= u == kSentinel;
  }
  check(tail, what + ": nothing written past the end");
}

void test_dropout() {
  for (int rows : {1, 13, 300})
    for (int cols : {1, 77, 4099})
      for (float p : {0.1f, 0.5f}) {
        const uint64_t seed = rng();
        const int layer = int(rng() % 40), adapter = int(rng() % 64);
        const std::vector<float> x = randn(size_t(rows) * cols), y0 = randn(size_t(rows) * cols);
        std::vector<float> drop(x.size()), add(y0);
        const float keep = 1.0f / (1.0f - p);
        long kept = 0;
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) {
            const size_t i = size_t(r) * cols + c;
            const bool k = rf::dropout_keep(seed, layer, adapter, r, c, p);
            kept += k;
            drop[i] = k ? x[i] * keep : 0.f;
            add[i] = y0[i] + (k ? x[i] * keep : 0.f);
          }
        const std::string name = "rows " + std::to_string(rows) + " cols " + std::to_string(cols) + " p " + std::to_string(p);
        DevFloats dx(x), dout(std::vector<float>(x.size(), 0.f)), dy(y0);
        rf::cuda::dropout_rows(dout.p, dx.p, rows, cols, seed, layer, adapter, p, nullptr);
        rf::cuda::dropout_add(dy.p, dx.p, rows, cols, seed, layer, adapter, p, nullptr);
        expect_bits(dout.back(), drop, "dropout_rows " + name);
        expect_bits(dy.back(), add, "dropout_add " + name);
        if (rows * cols >= 1000) {  // the mask is a real draw: about 1 - p kept
          const double frac = double(kept) / (double(rows) * cols);
          check(frac > 1 - p - 0.05 && frac < 1 - p + 0.05, "dropout " + name + ": kept fraction " + std::to_string(frac));
        }
      }
}

// lora_down_dropout: u = dropout(x) A^T, each output's columns in order with fused
// multiply-adds (the dropped-out x rounded first, as dropout_rows makes it; columns past in
// padded to the 32-column tile with zeros): bit for bit this host loop.
// The adapter groups the several-adapter LoRA calls are checked with: three in one launch (16/4/7,
// 8/8/8), two (32/17), one alone (20), and ranks too wide to share one (33/2: a launch each).
const std::vector<std::vector<int>> kTermRankSets{{16, 4, 7}, {32, 17}, {33, 2}, {8, 8, 8}, {20}};

std::string terms_name(const char* what, const std::vector<int>& ranks, float p) {
  std::string name = std::string(what) + " of ranks";
  for (int r : ranks) name += " " + std::to_string(r);
  return name + " p " + std::to_string(p) + " in one call";
}

void test_lora_down_dropout() {
  for (int rows : {1, 13, 300})
    for (int in : {1, 77, 300})
      for (int rank : {1, 4, 16, 17, 33, 64}) {
        const float p = rank % 2 ? 0.5f : 0.1f, keep = 1.0f / (1.0f - p);
        const uint64_t seed = rng();
        const int layer = int(rng() % 40), adapter = int(rng() % 64);
        const std::vector<float> x = randn(size_t(rows) * in), A = randn(size_t(rank) * in);
        std::vector<float> want(size_t(rows) * rank);
        const int padded = (in + 31) / 32 * 32;
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < rank; ++j) {
            float acc = 0.f;
            for (int c = 0; c < padded; ++c) {
              volatile float v = 0.f;
              if (c < in && rf::dropout_keep(seed, layer, adapter, r, c, p)) v = x[size_t(r) * in + c] * keep;
              acc = std::fma(v, c < in ? A[size_t(j) * in + c] : 0.f, acc);
            }
            want[size_t(r) * rank + j] = acc;
          }
        DevFloats dx(x), dA(A), du(std::vector<float>(want.size(), 0.f));
        rf::cuda::lora_down_dropout(du.p, dx.p, dA.p, rows, in, rank, seed, layer, adapter, p, nullptr);
        expect_bits(du.back(), want,
                    "lora_down_dropout rows " + std::to_string(rows) + " in " + std::to_string(in) + " rank " + std::to_string(rank));
      }
  // Several adapters of one input, each its own mask, in one call (one read of x when they fit: 3
  // of rank <= 16, 2 of <= 32; else one each): each u the bits of its own call. Without dropout
  // too. x holds bf16 values, so that the call from its bf16 copy (a bf16 model's activation)
  // must give the same bits.
  for (const std::vector<int>& ranks : kTermRankSets)
    for (float p : {0.f, 0.3f}) {
      const int rows = 130, in = 300, layer = 9;
      const uint64_t seed = rng();
      std::vector<float> x = randn(size_t(rows) * in);
      const DevBf16 dxb(x);
      DevFloats dx(x);
      std::vector<std::unique_ptr<DevFloats>> dA, alone, together;
      std::vector<rf::cuda::LoraDownTerm> terms;
      for (size_t j = 0; j < ranks.size(); ++j) {
        const int r = ranks[j];
        dA.push_back(std::make_unique<DevFloats>(randn(size_t(r) * in)));
        alone.push_back(std::make_unique<DevFloats>(std::vector<float>(size_t(rows) * r, 0.f)));
        together.push_back(std::make_unique<DevFloats>(std::vector<float>(size_t(rows) * r, 0.f)));
        terms.push_back({together.back()->p, dA.back()->p, r, int(j) + 3});
        rf::cuda::lora_down_dropout(alone.back()->p, dx.p, dA.back()->p, rows, in, r, seed, layer, int(j) + 3, p, nullptr);
      }
      rf::cuda::lora_down_dropout(terms.data(), int(terms.size()), dx.p, rows, in, seed, layer, p, nullptr);
      for (size_t j = 0; j < ranks.size(); ++j)
        expect_bits(together[j]->back(), alone[j]->back(), terms_name("lora_down_dropout", ranks, p) + ": adapter " + std::to_string(j));
      std::vector<std::unique_ptr<DevFloats>> from_bf16;
      for (size_t j = 0; j < ranks.size(); ++j) {
        from_bf16.push_back(std::make_unique<DevFloats>(std::vector<float>(size_t(rows) * ranks[j], 0.f)));
        terms[j].u = from_bf16.back()->p;
      }
      rf::cuda::lora_down_dropout(terms.data(), int(terms.size()), dxb.p, rows, in, seed, layer, p, nullptr);
      for (size_t j = 0; j < ranks.size(); ++j)
        expect_bits(from_bf16[j]->back(), alone[j]->back(),
                    terms_name("lora_down_dropout", ranks, p) + " from bf16 x: adapter " + std::to_string(j));
    }
}

// lora_da_dropout: dA += du^T dropout(x), each part of lora_da_rows_per_part rows summed in row
// order with fused multiply-adds (padded to whole 32-row tiles with zeros), the parts then added
// in order: bit for bit this host loop, with one part and with many, without dropout (p = 0) and
// with, from f32 x and from the same values in bf16 (the trainer's trace).
void test_lora_da_dropout() {
  for (int rows : {1, 13, 300, 1000})
    for (int in : {1, 77, 300})
      for (int rank : {1, 4, 17, 64}) {
        const float p = in == 77 ? 0.f : rank % 2 ? 0.5f : 0.1f, keep = 1.0f / (1.0f - p);
        const uint64_t seed = rng();
        const int layer = int(rng() % 40), adapter = int(rng() % 64);
        std::vector<float> x = randn(size_t(rows) * in);
        const DevBf16 dxb(x, 2);  // x now holds bf16 values
        const std::vector<float> du = randn(size_t(rows) * rank), dA0 = randn(size_t(rank) * in);
        const int per = rf::cuda::lora_da_rows_per_part(rows, in, rank);
        std::vector<float> want(dA0);
        for (int j = 0; j < rank; ++j)
          for (int c = 0; c < in; ++c) {
            float total = 0.f;
            for (int first = 0; first < rows; first += per) {
              const int last = std::min(rows, first + per);
              float acc = 0.f;
              for (int r0 = first; r0 < last; r0 += 32)
                for (int r = r0; r < r0 + 32; ++r) {
                  volatile float v = 0.f;
                  if (r < last && rf::dropout_keep(seed, layer, adapter, r, c, p)) v = x[size_t(r) * in + c] * keep;
                  acc = std::fma(r < last ? du[size_t(r) * rank + j] : 0.f, v, acc);
                }
              total += acc;
            }
            want[size_t(j) * in + c] = dA0[size_t(j) * in + c] + total;
          }
        const std::string name = "lora_da_dropout rows " + std::to_string(rows) + " in " + std::to_string(in) + " rank " +
                                 std::to_string(rank) + " p " + std::to_string(p) + " (" + std::to_string((rows + per - 1) / per) +
                                 " parts)";
        DevFloats dx(x), ddu(du), dA(dA0), dA_b(dA0),
            scratch(std::vector<float>(size_t(rf::cuda::lora_da_scratch_floats(rows, in, rank)), 0.f));
        rf::cuda::lora_da_dropout(dA.p, ddu.p, dx.p, rows, in, rank, seed, layer, adapter, p, scratch.p, nullptr);
        expect_bits(dA.back(), want, name);
        rf::cuda::lora_da_dropout(dA_b.p, ddu.p, dxb.p, rows, in, rank, seed, layer, adapter, p, scratch.p, nullptr);
        expect_bits(dA_b.back(), want, name + ", bf16 x");
      }
}

// lora_up_dropout_add: the mask of dropout_add on du A, each element's rank products fused in k
// order (zero-padded to the kernel's 16, 32 or 64, which adds exact zeros), then scaled and added
// with one rounding each: bit for bit this host loop; dropped elements untouched.
void test_lora_up_dropout_add() {
  for (int rows : {1, 13, 130})
    for (int in : {1, 77, 300})
      for (int rank : {1, 4, 16, 17, 33, 64}) {
        const float p = rank % 2 ? 0.5f : 0.1f;
        const uint64_t seed = rng();
        const int layer = int(rng() % 40), adapter = int(rng() % 64);
        const std::vector<float> du = randn(size_t(rows) * rank), A = randn(size_t(rank) * in), y0 = randn(size_t(rows) * in);
        const int kmax = rank <= 16 ? 16 : rank <= 32 ? 32 : 64;
        const float keep = 1.0f / (1.0f - p);
        std::vector<float> want(y0);
        for (int r = 0; r < rows; ++r)
          for (int i = 0; i < in; ++i) {
            if (!rf::dropout_keep(seed, layer, adapter, r, i, p)) continue;
            float acc = 0.f;
            for (int k = 0; k < kmax; ++k)
              acc = std::fma(k < rank ? du[size_t(r) * rank + k] : 0.f, k < rank ? A[size_t(k) * in + i] : 0.f, acc);
            const volatile float scaled = acc * keep;
            want[size_t(r) * in + i] = y0[size_t(r) * in + i] + scaled;
          }
        DevFloats ddu(du), dA(A), dy(y0);
        rf::cuda::lora_up_dropout_add(dy.p, ddu.p, dA.p, rows, in, rank, seed, layer, adapter, p, nullptr);
        expect_bits(dy.back(), want,
                    "lora_up_dropout_add rows " + std::to_string(rows) + " in " + std::to_string(in) + " rank " + std::to_string(rank));
      }
  bool threw = false;
  try {
    rf::cuda::lora_up_dropout_add(nullptr, nullptr, nullptr, 1, 1, rf::cuda::kLoraFusedMaxRank + 1, 0, 0, 0, 0.1f, nullptr);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "lora_up_dropout_add refuses a rank past kLoraFusedMaxRank");
  // Several adapters of one input in one call (one pass over din when they fit: 3 of rank <= 16, 2
  // of <= 32; else one each): the same bits as one call per adapter in order. Without dropout too.
  for (const std::vector<int>& ranks : kTermRankSets)
    for (float p : {0.f, 0.3f}) {
      const int rows = 130, in = 300, layer = 5;
      const uint64_t seed = rng();
      const std::vector<float> y0 = randn(size_t(rows) * in);
      std::vector<std::vector<float>> du, A;
      for (int r : ranks) du.push_back(randn(size_t(rows) * r)), A.push_back(randn(size_t(r) * in));
      std::vector<std::unique_ptr<DevFloats>> ddu, dA;
      std::vector<rf::cuda::LoraUpTerm> terms;
      for (size_t j = 0; j < ranks.size(); ++j) {
        ddu.push_back(std::make_unique<DevFloats>(du[j])), dA.push_back(std::make_unique<DevFloats>(A[j]));
        terms.push_back({ddu.back()->p, dA.back()->p, ranks[j], int(j) + 1});
      }
      DevFloats one_each(y0), together(y0);
      for (const rf::cuda::LoraUpTerm& t : terms)
        rf::cuda::lora_up_dropout_add(one_each.p, t.du, t.A, rows, in, t.rank, seed, layer, t.adapter, p, nullptr);
      rf::cuda::lora_up_dropout_add(together.p, terms.data(), int(terms.size()), rows, in, seed, layer, p, nullptr);
      expect_bits(together.back(), one_each.back(), terms_name("lora_up_dropout_add", ranks, p));
    }
}

void test_elementwise() {
  for (long n : {1L, 1000L, 65535L * 256 + 3001}) {
    const std::vector<float> x = randn(size_t(n));
    std::vector<float> scaled(x.size());
    for (long i = 0; i < n; ++i) scaled[size_t(i)] = 0.375f * x[size_t(i)];
    DevFloats dx(x), ds(std::vector<float>(x.size(), 0.f));
    rf::cuda::scale_copy(ds.p, dx.p, 0.375f, n, nullptr);
    expect_bits(ds.back(), scaled, "scale_copy n " + std::to_string(n));
  }
}

void test_widen_bf16() {
  std::vector<uint16_t> bits(65536 + 3);  // every pattern, and a tail past a block
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = uint16_t(i * 40503u);  // odd multiplier: a permutation, then wraps
  std::vector<float> want(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) want[i] = rf::bf16_to_f32(bits[i]);
  uint16_t* din = nullptr;
  cudaMalloc(&din, bits.size() * 2);
  cudaMemcpy(din, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice);
  DevFloats out(std::vector<float>(bits.size(), 0.f));
  rf::cuda::widen_bf16(out.p, din, long(bits.size()), nullptr);
  expect_bits(out.back(), want, "widen_bf16 of every bf16 bit pattern");
  cudaFree(din);
}

void test_add_rows_grouped() {
  for (int width : {1, 77, 2048}) {
    const int n_src = 50, n_dst_total = 40;
    const std::vector<float> src = randn(size_t(n_src) * width), dst0 = randn(size_t(n_dst_total) * width);
    // Sources go to random rows, some rows getting several (in the order listed), some none.
    std::vector<std::vector<int32_t>> lists(n_dst_total);
    for (int j = 0; j < n_src; ++j) lists[rng() % 17].push_back(j);  // only rows 0..16 receive
    std::vector<int32_t> dst_rows, first{0}, index;
    for (int d = 0; d < n_dst_total; ++d) {
      if (lists[size_t(d)].empty()) continue;
      dst_rows.push_back(d);
      for (int32_t j : lists[size_t(d)]) index.push_back(j);
      first.push_back(int32_t(index.size()));
    }
    std::vector<float> want(dst0);
    for (size_t d = 0; d < dst_rows.size(); ++d)
      for (int i = 0; i < width; ++i) {
        float v = want[size_t(dst_rows[d]) * width + i];
        for (int32_t j = first[d]; j < first[d + 1]; ++j) v += src[size_t(index[size_t(j)]) * width + i];
        want[size_t(dst_rows[d]) * width + i] = v;
      }
    DevFloats ddst(dst0), dsrc(src);
    DevInts drows(dst_rows), dfirst(first), dindex(index);
    rf::cuda::add_rows_grouped(ddst.p, dsrc.p, width, drows.p, dfirst.p, dindex.p, int(dst_rows.size()), nullptr);
    expect_bits(ddst.back(), want, "add_rows_grouped width " + std::to_string(width));
  }
}

// y [cols] += the column sums of x [rows, cols] in add_column_sums' order: parts of
// column_sum_rows_per_part rows, each the sum of 8 lanes (rows r0 + j, r0 + j + 8, ...) in order,
// then the parts in order.
void column_sums_ref(std::vector<float>& y, const std::vector<float>& x, int rows, int cols) {
  const int per = rf::cuda::column_sum_rows_per_part(rows, cols), lanes = 8;
  for (int c = 0; c < cols; ++c) {
    float total = 0.f;
    for (int r0 = 0; r0 < rows; r0 += per) {
      const int r1 = std::min(rows, r0 + per);
      float part = 0.f;
      for (int j = 0; j < lanes; ++j) {
        float lane = 0.f;
        for (int r = r0 + j; r < r1; r += lanes) lane += x[size_t(r) * cols + c];
        part = j == 0 ? lane : part + lane;
      }
      total = r0 == 0 ? part : total + part;
    }
    y[size_t(c)] += total;
  }
}

void test_column_sums() {
  for (int cols : {1, 77, 4099})
    for (int rows : {1, 13, 300}) {
      const std::vector<float> x = randn(size_t(rows) * cols), y0 = randn(size_t(cols));
      std::vector<float> want(y0);
      column_sums_ref(want, x, rows, cols);
      DevFloats dy(y0), dx(x), scratch(std::vector<float>(size_t(rf::cuda::column_sum_scratch_floats(rows, cols)) + 1, 0.f));
      rf::cuda::add_column_sums(dy.p, dx.p, rows, cols, scratch.p, nullptr);
      expect_bits(dy.back(), want, "add_column_sums rows " + std::to_string(rows) + " cols " + std::to_string(cols));
    }
}

void test_token_rows_grad() {
  for (int width : {1, 77, 4099})
    for (int rows : {1, 13, 300}) {
      const std::vector<int32_t> flags{5, 9, 2};
      std::vector<int32_t> tokens(static_cast<size_t>(rows));
      for (int32_t& t : tokens) t = int32_t(rng() % 12);
      const std::vector<float> dx = randn(size_t(rows) * width), g0 = randn(flags.size() * width);
      // Each flag's column sums of dx with the other tokens' rows zeroed, in add_column_sums' order.
      std::vector<float> want;
      for (size_t k = 0; k < flags.size(); ++k) {
        std::vector<float> masked(dx.size(), 0.f), y(g0.begin() + long(k) * width, g0.begin() + long(k + 1) * width);
        for (int r = 0; r < rows; ++r)
          if (tokens[size_t(r)] == flags[k])
            std::copy(dx.begin() + long(r) * width, dx.begin() + long(r + 1) * width, masked.begin() + long(r) * width);
        column_sums_ref(y, masked, rows, width);
        want.insert(want.end(), y.begin(), y.end());
      }
      DevFloats dg(g0), ddx(dx), scratch(std::vector<float>(size_t(rf::cuda::column_sum_scratch_floats(rows, width)) + 1, 0.f));
      DevInts dt(tokens), df(flags);
      rf::cuda::token_rows_grad(dg.p, ddx.p, dt.p, rows, width, df.p, int(flags.size()), scratch.p, nullptr);
      expect_bits(dg.back(), want, "token_rows_grad rows " + std::to_string(rows) + " width " + std::to_string(width));
    }
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_train_ops: no CUDA device visible; skipped\n");
    return 0;
  }
  test_dropout();
  test_lora_down_dropout();
  test_lora_da_dropout();
  test_lora_up_dropout_add();
  test_elementwise();
  test_widen_bf16();
  test_add_rows_grouped();
  test_token_rows_grad();
  test_column_sums();
  return rf::test::finish("cuda_train_ops");
}
