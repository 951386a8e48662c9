// Paged attention and the paged-cache append on the device (native/cuda/attention.h,
// native/cuda/paged_cache.h) against the CPU's attention_row over the same keys gathered into a
// contiguous copy, on a GPU machine; elsewhere it says no device was found and exits 0.
//
// Decode cases: head_dim 64 / 80 / 128 (and 32 and 256 once); GQA ratios 1, 3 and 8; sequences
// of 1, 15, 16, 17, 300 and 1000 tokens in blocks of 16 (crossing block and 256-key split
// boundaries) whose block tables come shuffled out of a BlockPool; no window and a 37-token
// sliding window.
// Prefill cases: the same grid of head_dim / GQA / window, plus head_dim 96 and 256 (the
// widest register tile and the > 48 KiB shared-memory opt-in) and a 1-token window, over the
// same six sequences with 1, 15, 7, 17, 300 and 129 new rows (so 16-token and 1000-token
// caches are continued by a chunk, the others prefilled whole; 300 rows span ten 32-row query
// tiles, and the 37-token window makes query tiles skip most key tiles); every new row of every
// head is checked. Prefill with one new row per sequence is checked against decode_attention
// on the same inputs. Outputs start as NaN, so a row the kernel forgot fails.
// Both sides are f32 with max-subtracted softmaxes summed in different orders: outputs agree to
// 2e-5 * (1 + |ref|) per element.
// Tensor-core prefill (prefill_attention_tc): head_dim 32 / 64 / 80 / 96 / 128, GQA 1 / 3 / 8,
// windows 0 / 37 / 1 (and 16, 48 and 112 once: every instance of the kernel), the same
// sequences (300 rows: five 64-row query tiles), against
// attention_row on the bf16-rounded q, keys and values, within the kernel's stated bound
// 2^-8 max_j |v_j| per element on top of the f32 slack.
// A bf16 cache: the f32 and tensor-core prefill kernels (every tensor-core instance) against
// attention_row on its rounded values, prefill against decode on it (head_dim 32 to 256: every
// decode instance), and kv_append's bf16 bits.
// kv_append: rows of five sequences (empty, mid-block, block-aligned and long caches; one to
// forty new tokens each), in shuffled order, from a padded fused-QKV buffer into a pool
// prefilled with a sentinel; the whole pool must equal the host's placement bit for bit (the
// slots it should not touch included); with the fused rope, of the rows rope_rows turns.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/attention.h"
#include "cuda/cuda.h"
#include "cuda/ops.h"
#include "cuda/paged_cache.h"
#include "kernels/ops.h"
#include "model/block_pool.h"
#include "tests/check.h"

using rf::test::check;

namespace {

std::mt19937 rng(77);

template <class T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

// q's rows (width floats each) on the device kStridePad floats apart, the gaps NaN: the kernels
// read q in place from a fused QKV buffer, so a row must be found by its stride, and a read
// past its width fails.
constexpr int kStridePad = 24;
float* to_device_strided(const std::vector<float>& q, int width) {
  const size_t rows = q.size() / size_t(width), stride = size_t(width) + kStridePad;
  std::vector<float> h(rows * stride, std::nanf(""));
  for (size_t r = 0; r < rows; ++r) std::copy(q.begin() + long(r * width), q.begin() + long((r + 1) * width), h.begin() + long(r * stride));
  float* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(float));
  cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}

void run_case(int head_dim, int n_kv_heads, int group, int window, const std::vector<int>& lengths = {1, 15, 16, 17, 300, 1000}) {
  const int n_heads = n_kv_heads * group, B = 16;
  int total_blocks = 0;
  for (int L : lengths) total_blocks += rf::BlockPool::blocks_for(L, B);
  rf::BlockPool pool(total_blocks + 9, B);
  // Interleaved growth so each table's blocks are scattered through the pool.
  std::vector<rf::BlockTable> tables(lengths.size());
  for (int step = 1; step <= *std::max_element(lengths.begin(), lengths.end()); step += 13)
    for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], std::min(step, lengths[s]));
  for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], lengths[s]);

  std::normal_distribution<float> d(0.f, 1.f);
  const size_t pool_floats = size_t(pool.capacity()) * n_kv_heads * B * head_dim;
  std::vector<float> k(pool_floats), v(pool_floats), q(lengths.size() * n_heads * head_dim);
  for (float& x : k) x = d(rng);
  for (float& x : v) x = d(rng);
  for (float& x : q) x = d(rng);
  std::vector<int32_t> flat, offsets, lens;
  for (size_t s = 0; s < lengths.size(); ++s) {
    offsets.push_back(int32_t(flat.size()));
    flat.insert(flat.end(), tables[s].begin(), tables[s].end());
    lens.push_back(lengths[s]);
  }
  const float scale = 1.f / std::sqrt(float(head_dim));
  const int max_length = *std::max_element(lengths.begin(), lengths.end());

  float *dk = to_device(k), *dv = to_device(v), *dq = to_device_strided(q, n_heads * head_dim), *dout = nullptr, *dscratch = nullptr;
  int32_t *dtables = to_device(flat), *doffsets = to_device(offsets), *dlens = to_device(lens);
  const size_t out_n = lengths.size() * n_heads * head_dim;
  cudaMalloc(&dout, out_n * sizeof(float));
  // Scratch for a split more than the lengths need (the one-split check below).
  cudaMalloc(&dscratch, rf::cuda::decode_attention_scratch(int(lengths.size()), n_heads, head_dim,
                                                           std::max(max_length, rf::cuda::kDecodeSplitKeys + 1)) *
                            sizeof(float));
  rf::cuda::PagedLayer layer{dk, dv, B, n_kv_heads, head_dim};
  rf::cuda::PagedBatch batch{dtables, doffsets, dlens, int(lengths.size()), max_length};
  rf::cuda::decode_attention(dout, dq, n_heads * head_dim + kStridePad, layer, batch, n_heads, scale, window, dscratch, nullptr);
  std::vector<float> out(out_n), out2(out_n);
  cudaMemcpy(out.data(), dout, out_n * sizeof(float), cudaMemcpyDeviceToHost);
  // Again with the bf16 output: the f32 output the same bits, the bf16 one rf::f32_to_bf16 of it.
  uint16_t* dbf16 = nullptr;
  cudaMalloc(&dbf16, out_n * 2);
  rf::cuda::decode_attention(dout, dq, n_heads * head_dim + kStridePad, layer, batch, n_heads, scale, window, dscratch, nullptr,
                             reinterpret_cast<__nv_bfloat16*>(dbf16));
  std::vector<uint16_t> bits(out_n);
  cudaMemcpy(out2.data(), dout, out_n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(bits.data(), dbf16, out_n * 2, cudaMemcpyDeviceToHost);
  long differ = 0;
  for (size_t i = 0; i < out_n; ++i) differ += std::memcmp(&out[i], &out2[i], 4) != 0 || bits[i] != rf::f32_to_bf16(out[i]);
  check(differ == 0, "decode attention head_dim=" + std::to_string(head_dim) + " GQA " + std::to_string(group) +
                         " with a bf16 output: f32 the same bits, bf16 = f32_to_bf16 of it (" + std::to_string(differ) + " differ)");
  if (max_length <= rf::cuda::kDecodeSplitKeys) {
    // One split writes the output itself: the same bits as its merge by decode_combine, which a
    // batch claiming one key more (a second, empty split) takes.
    rf::cuda::PagedBatch two{dtables, doffsets, dlens, int(lengths.size()), rf::cuda::kDecodeSplitKeys + 1};
    rf::cuda::decode_attention(dout, dq, n_heads * head_dim + kStridePad, layer, two, n_heads, scale, window, dscratch, nullptr);
    cudaMemcpy(out2.data(), dout, out_n * sizeof(float), cudaMemcpyDeviceToHost);
    check(std::memcmp(out.data(), out2.data(), out_n * sizeof(float)) == 0,
          "decode attention head_dim=" + std::to_string(head_dim) + ", one split: decode_combine's bits");
  }
  for (void* p : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dq), static_cast<void*>(dout),
                  static_cast<void*>(dscratch), static_cast<void*>(dtables), static_cast<void*>(doffsets), static_cast<void*>(dlens),
                  static_cast<void*>(dbf16)})
    cudaFree(p);

  double worst = 0;
  bool ok = true;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const int L = lengths[s], first = window > 0 && L > window ? L - window : 0, n = L - first;
    for (int h = 0; h < n_heads; ++h) {
      const int kvh = h / group;
      std::vector<float> kc(size_t(n) * head_dim), vc(size_t(n) * head_dim), scores(n), ref(head_dim);
      for (int j = first; j < L; ++j) {
        const size_t base = ((size_t(tables[s][size_t(j / B)]) * n_kv_heads + kvh) * B + j % B) * head_dim;
        std::copy_n(k.data() + base, head_dim, kc.data() + size_t(j - first) * head_dim);
        std::copy_n(v.data() + base, head_dim, vc.data() + size_t(j - first) * head_dim);
      }
      rf::attention_row(ref.data(), q.data() + (s * n_heads + h) * head_dim, kc.data(), vc.data(), head_dim, n, head_dim, scale, scores.data());
      const float* got = out.data() + (s * n_heads + h) * head_dim;
      for (int i = 0; i < head_dim; ++i) {
        const double e = std::fabs(double(got[i]) - ref[i]);
        worst = std::max(worst, e);
        ok &= e <= 2e-5 * (1 + std::fabs(ref[i]));
      }
    }
  }
  check(ok, "paged decode attention head_dim=" + std::to_string(head_dim) + " GQA " + std::to_string(group) + " window " +
                std::to_string(window) + ": equals attention_row (max abs err " + std::to_string(worst) + ")");
}

// A paged cache of random keys and values for sequences of the given lengths, block tables
// scattered through a BlockPool by interleaved growth (as in run_case), on host and device.
struct Cache {
  int B = 16, n_kv_heads = 0, head_dim = 0;
  std::vector<int> lengths;
  std::vector<rf::BlockTable> tables;
  std::vector<float> k, v;
  std::vector<int32_t> flat, offsets, lens;
  void *dk = nullptr, *dv = nullptr;
  int32_t *dtables = nullptr, *doffsets = nullptr, *dlens = nullptr;

  bool bf16 = false;  // the device copy holds bf16 (k and v here are its values, rounded)

  Cache(const std::vector<int>& lengths_, int n_kv_heads_, int head_dim_, bool bf16_ = false)
      : n_kv_heads(n_kv_heads_), head_dim(head_dim_), lengths(lengths_), tables(lengths_.size()), bf16(bf16_) {
    int total_blocks = 0, longest = 0;
    for (int L : lengths) total_blocks += rf::BlockPool::blocks_for(L, B), longest = std::max(longest, L);
    rf::BlockPool pool(total_blocks + 9, B);
    for (int step = 1; step <= longest; step += 13)
      for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], std::min(step, lengths[s]));
    for (size_t s = 0; s < lengths.size(); ++s) pool.grow(tables[s], lengths[s]);
    std::normal_distribution<float> d(0.f, 1.f);
    k.resize(size_t(pool.capacity()) * n_kv_heads * B * head_dim);
    v.resize(k.size());
    for (float& x : k) x = d(rng);
    for (float& x : v) x = d(rng);
    for (size_t s = 0; s < lengths.size(); ++s) {
      offsets.push_back(int32_t(flat.size()));
      flat.insert(flat.end(), tables[s].begin(), tables[s].end());
      lens.push_back(lengths[s]);
    }
    if (bf16) {
      std::vector<uint16_t> kb(k.size()), vb(v.size());
      for (size_t i = 0; i < k.size(); ++i) kb[i] = rf::f32_to_bf16(k[i]), k[i] = rf::bf16_to_f32(kb[i]);
      for (size_t i = 0; i < v.size(); ++i) vb[i] = rf::f32_to_bf16(v[i]), v[i] = rf::bf16_to_f32(vb[i]);
      dk = to_device(kb), dv = to_device(vb);
    } else {
      dk = to_device(k), dv = to_device(v);
    }
    dtables = to_device(flat), doffsets = to_device(offsets), dlens = to_device(lens);
  }
  ~Cache() {
    cudaFree(dk), cudaFree(dv), cudaFree(dtables), cudaFree(doffsets), cudaFree(dlens);
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  rf::cuda::PagedLayer layer() const { return {dk, dv, B, n_kv_heads, head_dim, bf16}; }
  rf::cuda::PagedBatch batch() const {
    return {dtables, doffsets, dlens, int(lengths.size()), *std::max_element(lengths.begin(), lengths.end())};
  }
  // Sequence s's keys (or values) of kv head kvh as a contiguous [lengths[s], head_dim] copy.
  std::vector<float> gather(const std::vector<float>& kv, size_t s, int kvh) const {
    std::vector<float> c(size_t(lengths[s]) * head_dim);
    for (int j = 0; j < lengths[s]; ++j) {
      const size_t base = ((size_t(tables[s][size_t(j / B)]) * n_kv_heads + kvh) * B + j % B) * head_dim;
      std::copy_n(kv.data() + base, head_dim, c.data() + size_t(j) * head_dim);
    }
    return c;
  }
};

// Whether the launches so far ran: a bad launch (too much shared memory, an illegal address)
// shows here instead of as a wrong number.
bool device_ok(const std::string& what) {
  const cudaError_t e = cudaDeviceSynchronize();
  const cudaError_t last = cudaGetLastError();
  const cudaError_t err = e != cudaSuccess ? e : last;
  check(err == cudaSuccess, what + ": kernels ran (" + cudaGetErrorString(err) + ")");
  return err == cudaSuccess;
}

float* device_nan(size_t n) {
  float* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, n) * sizeof(float));
  cudaMemset(d, 0xff, n * sizeof(float));  // all-ones bits: a NaN, so an unwritten output fails
  return d;
}

// Prefill attention of n_new[s] new rows at the end of each sequence's cache against
// attention_row over each row's visible keys.
// With tc, prefill_attention_tc against attention_row on the bf16-rounded q, keys and values:
// each output element within 2^-8 max_j |v_j| (the kernel's rounding of the probabilities, see
// attention.h) plus the f32 slack above.
// bf16_cache: the cache holds bf16 (the reference reads the same rounded keys and values).
void prefill_case(int head_dim, int n_kv_heads, int group, int window, const std::vector<int>& lengths,
                  const std::vector<int>& n_new, bool tc = false, bool bf16_cache = false) {
  const int n_heads = n_kv_heads * group;
  const std::string name = std::string(tc ? "tensor-core " : "") + "paged prefill attention head_dim=" + std::to_string(head_dim) +
                           " GQA " + std::to_string(group) + " window " + std::to_string(window) + (bf16_cache ? " bf16 cache" : "");
  Cache cache(lengths, n_kv_heads, head_dim, bf16_cache);
  std::vector<int32_t> row_offsets, news;
  int total_rows = 0;
  for (int n : n_new) row_offsets.push_back(total_rows), news.push_back(n), total_rows += n;
  const int max_new = *std::max_element(n_new.begin(), n_new.end());
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> q(size_t(total_rows) * n_heads * head_dim);
  for (float& x : q) x = d(rng);
  const float scale = 1.f / std::sqrt(float(head_dim));

  float *dq = to_device_strided(q, n_heads * head_dim), *dout = device_nan(q.size()),
        *dlse = tc ? device_nan(size_t(total_rows) * n_heads) : nullptr;
  __nv_bfloat16* dout16 = nullptr;  // tc: the output's bf16 copy too
  if (tc) cudaMalloc(&dout16, q.size() * sizeof(uint16_t));
  const long q_stride = n_heads * head_dim + kStridePad;
  int32_t *drow_offsets = to_device(row_offsets), *dn_new = to_device(news);
  // tc: a second run with no f32 output (a bf16 model's o projection reads the bf16 copy alone).
  __nv_bfloat16* dalone16 = nullptr;
  if (tc) {
    rf::cuda::prefill_attention_tc(dout, dq, q_stride, cache.layer(), cache.batch(), drow_offsets, dn_new, total_rows, max_new, n_heads, scale,
                                   window, nullptr, dlse, dout16);
    cudaMalloc(&dalone16, q.size() * sizeof(uint16_t));
    rf::cuda::prefill_attention_tc(nullptr, dq, q_stride, cache.layer(), cache.batch(), drow_offsets, dn_new, total_rows, max_new, n_heads,
                                   scale, window, nullptr, nullptr, dalone16);
  } else
    rf::cuda::prefill_attention(dout, dq, q_stride, cache.layer(), cache.batch(), drow_offsets, dn_new, total_rows, max_new, n_heads, scale,
                                window, nullptr);
  const bool ran = device_ok(name);
  std::vector<float> out(q.size()), lse(tc ? size_t(total_rows) * n_heads : 0);
  std::vector<uint16_t> out16(tc ? q.size() : 0), alone16(out16.size());
  cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  if (tc) cudaMemcpy(lse.data(), dlse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost);
  if (tc) cudaMemcpy(out16.data(), dout16, out16.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost);
  if (tc) cudaMemcpy(alone16.data(), dalone16, alone16.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost);
  cudaFree(dq), cudaFree(dout), cudaFree(dlse), cudaFree(drow_offsets), cudaFree(dn_new), cudaFree(dout16), cudaFree(dalone16);
  if (!ran) return;
  if (tc) {
    long differ = 0;
    for (size_t i = 0; i < out.size(); ++i) differ += out16[i] != rf::f32_to_bf16(out[i]);
    check(differ == 0, name + ": its bf16 output is f32_to_bf16 of its f32 output (" + std::to_string(differ) + " differ)");
    check(alone16 == out16, name + ": with no f32 output, the same bf16 output");
  }
  double worst_lse = 0;

  const auto round_bf16 = [](std::vector<float>& v) {
    for (float& x : v) x = rf::bf16_to_f32(rf::f32_to_bf16(x));
  };
  if (tc) round_bf16(q);
  double worst = 0;
  bool ok = true;
  std::vector<float> ref(head_dim), scores, vmax(head_dim);
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (int kvh = 0; kvh < n_kv_heads; ++kvh) {
      std::vector<float> kc = cache.gather(cache.k, s, kvh), vc = cache.gather(cache.v, s, kvh);
      if (tc) round_bf16(kc), round_bf16(vc);
      for (int r = 0; r < n_new[s]; ++r) {
        const int p = lengths[s] - n_new[s] + r, first = window > 0 ? std::max(0, p + 1 - window) : 0, n = p + 1 - first;
        scores.resize(size_t(n));
        std::fill(vmax.begin(), vmax.end(), 0.f);
        for (int j = first; tc && j <= p; ++j)
          for (int i = 0; i < head_dim; ++i) vmax[i] = std::max(vmax[i], std::fabs(vc[size_t(j) * head_dim + i]));
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
          const size_t row = (size_t(row_offsets[s] + r) * n_heads + h) * head_dim;
          rf::attention_row(ref.data(), q.data() + row, kc.data() + size_t(first) * head_dim, vc.data() + size_t(first) * head_dim,
                            head_dim, n, head_dim, scale, scores.data());
          if (tc) {  // the log-sum-exp (base 2) of the scaled scores, in double
            double mx = -INFINITY, sum = 0;
            std::vector<double> sc(static_cast<size_t>(n));
            for (int j = 0; j < n; ++j) {
              double d = 0;
              for (int i = 0; i < head_dim; ++i) d += double(q[row + i]) * kc[size_t(first + j) * head_dim + i];
              mx = std::max(mx, sc[size_t(j)] = d * scale);
            }
            for (double x : sc) sum += std::exp(x - mx);
            const double want = (mx + std::log(sum)) / std::log(2.0), got = lse[size_t(row_offsets[s] + r) * n_heads + h];
            worst_lse = std::max(worst_lse, std::isnan(got) ? INFINITY : std::fabs(got - want) / (1 + std::fabs(want)));
          }
          for (int i = 0; i < head_dim; ++i) {
            const double e = std::fabs(double(out[row + i]) - ref[i]);
            worst = std::max(worst, std::isnan(e) ? INFINITY : e);
            ok &= e <= 2e-5 * (1 + std::fabs(ref[i])) + std::ldexp(double(vmax[i]), -8);
          }
        }
      }
    }
  }
  check(ok, name + ": equals attention_row on every new row (max abs err " + std::to_string(worst) + ")");
  if (tc) check(worst_lse <= 1e-5, name + ": its log-sum-exp output (worst rel err " + std::to_string(worst_lse) + ")");
}

// Prefill with one new row per sequence is a decode step: both kernels on the same cache and q.
void prefill_decode_case(int head_dim, int n_kv_heads, int group, int window, bool bf16_cache = false) {
  const int n_heads = n_kv_heads * group;
  const std::vector<int> lengths{1, 15, 16, 17, 300, 1000};
  const int n_seqs = int(lengths.size());
  Cache cache(lengths, n_kv_heads, head_dim, bf16_cache);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> q(size_t(n_seqs) * n_heads * head_dim);
  for (float& x : q) x = d(rng);
  std::vector<int32_t> row_offsets, ones(size_t(n_seqs), 1);
  for (int s = 0; s < n_seqs; ++s) row_offsets.push_back(s);
  const float scale = 1.f / std::sqrt(float(head_dim));
  const rf::cuda::PagedBatch batch = cache.batch();

  float *dq = to_device_strided(q, n_heads * head_dim), *dprefill = device_nan(q.size()), *ddecode = device_nan(q.size()),
        *dscratch = nullptr;
  const long q_stride = n_heads * head_dim + kStridePad;
  int32_t *drow_offsets = to_device(row_offsets), *dones = to_device(ones);
  cudaMalloc(&dscratch, rf::cuda::decode_attention_scratch(n_seqs, n_heads, head_dim, batch.max_length) * sizeof(float));
  rf::cuda::prefill_attention(dprefill, dq, q_stride, cache.layer(), batch, drow_offsets, dones, n_seqs, 1, n_heads, scale, window, nullptr);
  rf::cuda::decode_attention(ddecode, dq, q_stride, cache.layer(), batch, n_heads, scale, window, dscratch, nullptr);
  const std::string name = "paged prefill with n_new 1 head_dim=" + std::to_string(head_dim) + " GQA " + std::to_string(group) +
                           " window " + std::to_string(window) + (bf16_cache ? " bf16 cache" : "");
  const bool ran = device_ok(name);
  std::vector<float> pre(q.size()), dec(q.size());
  cudaMemcpy(pre.data(), dprefill, pre.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(dec.data(), ddecode, dec.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(dq), cudaFree(dprefill), cudaFree(ddecode), cudaFree(dscratch), cudaFree(drow_offsets), cudaFree(dones);
  if (!ran) return;
  // Different tilings sum in different orders: the same 2e-5 * (1 + |decode|) as against the CPU.
  double worst = 0;
  bool ok = true;
  for (size_t i = 0; i < pre.size(); ++i) {
    const double e = std::fabs(double(pre[i]) - dec[i]);
    worst = std::max(worst, std::isnan(e) ? INFINITY : e);
    ok &= e <= 2e-5 * (1 + std::fabs(dec[i]));
  }
  check(ok, name + ": equals decode_attention (max abs err " + std::to_string(worst) + ")");
}

// kv_append: every new row's k and v land in their (block, slot), nothing else changes.
// bf16: the cache holds bf16, each value the nearest-even rounding of the f32 row (bit for bit).
// rope: the fused rotation, against rope_rows on the same rows bit for bit: the rows of qkv
// after (q and k turned in place, v and the padding untouched) and the turned keys in the cache.
void kv_append_case(bool bf16 = false, bool rope = false) {
  const int n_kv_heads = 2, head_dim = 80, n_heads = 4, B = 16;
  const std::vector<int> before{0, 5, 16, 31, 200}, added{3, 12, 1, 40, 1};
  const int n_seqs = int(before.size());
  int total_blocks = 0, longest = 0;
  for (int s = 0; s < n_seqs; ++s) {
    total_blocks += rf::BlockPool::blocks_for(before[s] + added[s], B);
    longest = std::max(longest, before[s] + added[s]);
  }
  rf::BlockPool pool(total_blocks + 5, B);
  std::vector<rf::BlockTable> tables(before.size());
  for (int step = 1; step <= longest; step += 7)
    for (int s = 0; s < n_seqs; ++s) pool.grow(tables[size_t(s)], std::min(step, before[s] + added[s]));
  std::vector<int32_t> flat, offsets;
  for (int s = 0; s < n_seqs; ++s) {
    offsets.push_back(int32_t(flat.size()));
    flat.insert(flat.end(), tables[size_t(s)].begin(), tables[size_t(s)].end());
  }
  // The batch's rows: every new token of every sequence, shuffled (the kernel takes any order).
  std::vector<int32_t> row_seq, row_pos;
  for (int s = 0; s < n_seqs; ++s)
    for (int p = before[s]; p < before[s] + added[s]; ++p) row_seq.push_back(s), row_pos.push_back(p);
  std::vector<size_t> order(row_seq.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> seq_shuffled, pos_shuffled;
  for (size_t i : order) seq_shuffled.push_back(row_seq[i]), pos_shuffled.push_back(row_pos[i]);
  const int rows = int(order.size());

  // A fused QKV buffer with q first, then k, then v, and 3 floats of padding per row (an odd
  // stride: no alignment assumed).
  const int k_offset = n_heads * head_dim, v_offset = k_offset + n_kv_heads * head_dim;
  const long row_stride = v_offset + n_kv_heads * head_dim + 3;
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> qkv(size_t(rows) * row_stride);
  for (float& x : qkv) x = d(rng);
  const size_t pool_floats = size_t(pool.capacity()) * n_kv_heads * B * head_dim;
  std::vector<float> k_want(pool_floats, -1234.5f), v_want(pool_floats, -1234.5f);
  const auto bits = [](const std::vector<float>& v) {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = rf::f32_to_bf16(v[i]);
    return b;
  };
  // rope: each row's tables (angles of any size), and the rows as rope_rows turns them.
  const int half = head_dim / 2;
  std::vector<float> cos_t(size_t(rows) * half), sin_t(size_t(rows) * half);
  for (size_t i = 0; i < cos_t.size(); ++i) {
    const float angle = 3.f * d(rng);
    cos_t[i] = std::cos(angle), sin_t[i] = std::sin(angle);
  }
  float *dcos = to_device(cos_t), *dsin = to_device(sin_t);
  std::vector<float> turned = qkv;
  if (rope) {
    float* dref = to_device(qkv);
    rf::cuda::rope_rows(dref, row_stride, rows, n_heads + n_kv_heads, head_dim, dcos, dsin, nullptr);
    cudaMemcpy(turned.data(), dref, turned.size() * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(dref);
  }
  void* dk = bf16 ? static_cast<void*>(to_device(bits(k_want))) : static_cast<void*>(to_device(k_want));
  void* dv = bf16 ? static_cast<void*>(to_device(bits(v_want))) : static_cast<void*>(to_device(v_want));
  float* dqkv = to_device(qkv);
  for (int r = 0; r < rows; ++r) {
    const int s = seq_shuffled[size_t(r)], p = pos_shuffled[size_t(r)];
    for (int h = 0; h < n_kv_heads; ++h) {
      const size_t dst = ((size_t(tables[size_t(s)][size_t(p / B)]) * n_kv_heads + h) * B + p % B) * head_dim;
      const size_t src = size_t(r) * row_stride + size_t(h) * head_dim;
      std::copy_n(turned.data() + src + k_offset, head_dim, k_want.data() + dst);
      std::copy_n(qkv.data() + src + v_offset, head_dim, v_want.data() + dst);
    }
  }
  int32_t *dseq = to_device(seq_shuffled), *dpos = to_device(pos_shuffled), *dtables = to_device(flat),
          *doffsets = to_device(offsets);
  // With rope, also the rows' bf16 copy (the trainer's trace), into a buffer of sentinels.
  uint16_t* dqkv16 = nullptr;
  cudaMalloc(&dqkv16, qkv.size() * 2);
  cudaMemset(dqkv16, 0xff, qkv.size() * 2);
  rf::cuda::kv_append(dk, dv, bf16, dqkv, row_stride, k_offset, v_offset, dseq, dpos, dtables, doffsets, rows, n_kv_heads, head_dim,
                      B, nullptr,
                      rope ? rf::cuda::AppendRope{n_heads, dcos, dsin, reinterpret_cast<__nv_bfloat16*>(dqkv16)} : rf::cuda::AppendRope{});
  const std::string name = std::string("kv_append") + (rope ? " with rope" : "") + (bf16 ? " (bf16 cache)" : "");
  const bool ran = device_ok(name);
  const size_t elem = bf16 ? 2 : 4;
  std::vector<unsigned char> k_got(pool_floats * elem), v_got(pool_floats * elem);
  cudaMemcpy(k_got.data(), dk, k_got.size(), cudaMemcpyDeviceToHost);
  cudaMemcpy(v_got.data(), dv, v_got.size(), cudaMemcpyDeviceToHost);
  std::vector<float> qkv_got(qkv.size());
  cudaMemcpy(qkv_got.data(), dqkv, qkv_got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  std::vector<uint16_t> qkv16_got(qkv.size());
  cudaMemcpy(qkv16_got.data(), dqkv16, qkv16_got.size() * 2, cudaMemcpyDeviceToHost);
  cudaFree(dqkv16);
  for (void* p : {dk, dv, static_cast<void*>(dqkv), static_cast<void*>(dseq), static_cast<void*>(dpos), static_cast<void*>(dtables),
                  static_cast<void*>(doffsets), static_cast<void*>(dcos), static_cast<void*>(dsin)})
    cudaFree(p);
  if (!ran) return;
  const std::vector<uint16_t> kb = bits(k_want), vb = bits(v_want);
  const void* kw = bf16 ? static_cast<const void*>(kb.data()) : static_cast<const void*>(k_want.data());
  const void* vw = bf16 ? static_cast<const void*>(vb.data()) : static_cast<const void*>(v_want.data());
  size_t wrong = 0;
  for (size_t i = 0; i < pool_floats; ++i)
    wrong += std::memcmp(k_got.data() + i * elem, static_cast<const char*>(kw) + i * elem, elem) != 0 ||
             std::memcmp(v_got.data() + i * elem, static_cast<const char*>(vw) + i * elem, elem) != 0;
  check(wrong == 0, name + ": " + std::to_string(rows) + " rows of 5 sequences land in their slots exactly, nothing else written (" +
                        std::to_string(wrong) + " of " + std::to_string(pool_floats) + " values differ)");
  check(std::memcmp(qkv_got.data(), turned.data(), turned.size() * sizeof(float)) == 0,
        name + ": the qkv rows after are " + (rope ? "rope_rows' bit for bit" : "unchanged"));
  if (rope) {
    // The bf16 copy: f32_to_bf16 of the turned rows, the padding past v left alone.
    size_t bad = 0;
    for (int r = 0; r < rows; ++r)
      for (long col = 0; col < row_stride; ++col) {
        const size_t i = size_t(r) * size_t(row_stride) + size_t(col);
        bad += qkv16_got[i] != (col < v_offset + n_kv_heads * head_dim ? rf::f32_to_bf16(turned[i]) : uint16_t(0xffff));
      }
    check(bad == 0, name + ": the rows' bf16 copy is f32_to_bf16 of them (" + std::to_string(bad) + " values differ)");
  }
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_attention: no CUDA device visible; skipped\n");
    return 0;
  }
  for (int hd : {64, 80, 128})
    for (int group : {1, 3, 8})
      for (int window : {0, 37}) run_case(hd, 2, group, window);
  // The narrowest and widest instances of the decode kernel (one and eight dimensions a lane).
  run_case(32, 2, 3, 0);
  run_case(256, 2, 3, 37);

  const std::vector<int> lengths{1, 15, 16, 17, 300, 1000}, n_new{1, 15, 7, 17, 300, 129};
  for (int hd : {64, 80, 128})
    for (int group : {1, 3, 8})
      for (int window : {0, 37}) prefill_case(hd, 2, group, window, lengths, n_new);
  prefill_case(96, 2, 2, 0, lengths, n_new);
  prefill_case(256, 2, 4, 37, lengths, n_new);
  prefill_case(64, 2, 1, 1, lengths, n_new);
  for (int hd : {64, 128})
    for (int window : {0, 37}) prefill_decode_case(hd, 2, 3, window);
  for (int hd : {32, 64, 80, 96, 128})
    for (int group : {1, 3, 8})
      for (int window : {0, 37}) prefill_case(hd, 2, group, window, lengths, n_new, true);
  for (int hd : {16, 48, 112}) prefill_case(hd, 2, 3, 37, lengths, n_new, true);  // every other instance
  prefill_case(64, 2, 1, 1, lengths, n_new, true);
  // A bf16 cache (bf16 models): every kernel reading it, and the append writing it.
  for (int hd : {64, 128}) {
    prefill_case(hd, 2, 3, 37, lengths, n_new, false, true);
    prefill_case(hd, 2, 3, 0, lengths, n_new, true, true);
    prefill_decode_case(hd, 2, 3, 37, true);
  }
  for (int hd : {16, 48, 80, 96, 112}) prefill_case(hd, 2, 3, 0, lengths, n_new, true, true);
  prefill_decode_case(32, 2, 3, 0, true);    // one dimension a lane
  prefill_decode_case(256, 1, 2, 37, true);  // eight a lane; the scalar prefill past 48 KiB of shared memory
  run_case(64, 2, 3, 0, {1, 15, 16, 17, 200, 256});  // one split
  kv_append_case();
  kv_append_case(true);
  kv_append_case(false, true);
  kv_append_case(true, true);
  return rf::test::finish("cuda_attention");
}
