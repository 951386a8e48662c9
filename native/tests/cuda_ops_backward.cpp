// The device backward kernels (native/cuda/ops_backward.h) against the CPU's (kernels/
// ops_backward.h, themselves checked against finite differences in test_backward) on the same
// inputs, on a GPU machine; elsewhere "no CUDA device visible; skipped", exit 0.
//
// Shapes: rows 1, 7 and 33 of widths 80, 576 and 4097 (not multiples of a block), and 1000 rows
// of 80 (the parameter gradients' sums split into row parts), head_dim 64/128, and the activations
// at 2097157 rows (past the SwiGLU backward's grid of row tiles). The SwiGLU backward with the
// down projection's adapter term must give the bits of the two launches it replaces, and with the
// gate|up adapters' terms the bits of the backward on the forward's sums.
// Tolerances: row reductions sum in another order than the CPU's vectorised loops and the device's
// expf differs from the CPU's exp_f32 by an ulp or two, so every written gradient agrees to
// 2e-5 * (1 + |ref|) per element. The accumulated dw / db (sums over rows in parts, in f32) are
// held to a float64 sum of the CPU's formula: |got - ref| <= 2e-6 * (1 + sum over rows of
// |term|): 10x the worst seen under the emulation (1.9e-7), far below one row's term. dw and db start
// from a non-zero value to check that they are accumulated, not written.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda.h"
#include "cuda/ops_backward.h"
#include "cuda/train_ops.h"
#include "kernels/ops_backward.h"
#include "tests/check.h"
#include "tests/random_model.h"

using rf::test::check;

namespace {

std::mt19937 rng(99);

std::vector<float> randn(size_t n, float sd = 1.f, float mean = 0.f) { return rf::test::randn(rng, n, sd, mean); }

float* up(const std::vector<float>& v) {
  float* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(float));
  cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}

std::vector<float> down(const float* d, size_t n) {
  std::vector<float> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
  return v;
}

// Worst |got - want| / (1 + |want|).
double worst(const std::vector<float>& got, const std::vector<float>& want) {
  double w = 0;
  for (size_t i = 0; i < want.size(); ++i) w = std::max(w, std::fabs(double(got[i]) - want[i]) / (1 + std::fabs(double(want[i]))));
  return w;
}

void check_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  const double e = worst(got, want);
  check(e <= 2e-5, what + " (worst " + std::to_string(e) + ")");
}

void norms(int rows, int n) {
  const float eps = 1e-5f;
  const std::vector<float> x = randn(size_t(rows) * n), dout = randn(size_t(rows) * n), w = randn(size_t(n), 0.2f, 1.f),
                           dw0 = randn(size_t(n)), db0 = randn(size_t(n));
  const std::string shape = " rows " + std::to_string(rows) + " n " + std::to_string(n);
  for (bool layer : {false, true}) {
    std::vector<float> dx(x.size()), dw = dw0, db = db0;
    for (int r = 0; r < rows; ++r) {
      const size_t o = size_t(r) * n;
      if (layer) rf::layernorm_backward(dx.data() + o, dw.data(), db.data(), dout.data() + o, x.data() + o, w.data(), n, eps);
      else rf::rmsnorm_backward(dx.data() + o, dw.data(), dout.data() + o, x.data() + o, w.data(), n, eps);
    }
    float *d_dx = up(std::vector<float>(x.size(), NAN)), *d_dw = up(dw0), *d_db = up(db0), *d_dout = up(dout), *d_x = up(x),
          *d_w = up(w), *d_s = up(std::vector<float>(size_t(rf::cuda::norm_backward_scratch_floats(rows, n))));
    if (layer) rf::cuda::layernorm_backward_rows(d_dx, d_dw, d_db, d_dout, d_x, d_w, rows, n, eps, d_s, nullptr);
    else rf::cuda::rmsnorm_backward_rows(d_dx, d_dw, d_dout, d_x, d_w, rows, n, eps, d_s, nullptr);
    const std::string name = layer ? "layernorm" : "rmsnorm";
    check(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess, name + shape + ": kernels ran");
    check_close(down(d_dx, x.size()), dx, name + "_backward_rows dx" + shape);
    // dw, db in float64: dw0 + sum_r dout * xhat, db0 + sum_r dout, with the sums of |term|.
    std::vector<double> rw(dw0.begin(), dw0.end()), rb(db0.begin(), db0.end()), aw(size_t(n), 0.0), ab(size_t(n), 0.0);
    for (int r = 0; r < rows; ++r) {
      const float* xr = x.data() + size_t(r) * n;
      double mean = 0, var = 0;
      for (int i = 0; i < n; ++i) mean += layer ? xr[i] / double(n) : 0.0;
      for (int i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean) / n;
      const double scale = 1 / std::sqrt(var + eps);
      for (int i = 0; i < n; ++i) {
        const double d = dout[size_t(r) * n + i], t = d * (xr[i] - mean) * scale;
        rw[size_t(i)] += t, aw[size_t(i)] += std::fabs(t), rb[size_t(i)] += d, ab[size_t(i)] += std::fabs(d);
      }
    }
    auto close_sums = [&](const std::vector<float>& got, const std::vector<double>& ref, const std::vector<double>& abs_sum,
                          const std::string& what) {
      double worst = 0;
      for (int i = 0; i < n; ++i) worst = std::max(worst, std::fabs(got[size_t(i)] - ref[size_t(i)]) / (1 + abs_sum[size_t(i)]));
      char buf[64];
      std::snprintf(buf, sizeof buf, " (worst %.3g of 1 + sum |term|)", worst);
      check(worst <= 2e-6, what + buf);
    };
    close_sums(down(d_dw, size_t(n)), rw, aw, name + "_backward_rows dw (accumulated)" + shape);
    // Added to dx (the residual stream's gradient) with its bf16 copy, in one pass: the bits of
    // the written dx added in f32 on the host, and f32_to_bf16 of the sum.
    {
      const std::vector<float> dx0 = randn(x.size()), written = down(d_dx, x.size());
      float* d_acc = up(dx0);
      __nv_bfloat16* d_acc16 = nullptr;
      cudaMalloc(&d_acc16, x.size() * sizeof(uint16_t));
      if (layer) rf::cuda::layernorm_backward_rows(d_acc, nullptr, nullptr, d_dout, d_x, d_w, rows, n, eps, d_s, nullptr, true, d_acc16);
      else rf::cuda::rmsnorm_backward_rows(d_acc, nullptr, d_dout, d_x, d_w, rows, n, eps, d_s, nullptr, true, d_acc16);
      const std::vector<float> got = down(d_acc, x.size());
      std::vector<uint16_t> got16(x.size());
      cudaMemcpy(got16.data(), d_acc16, x.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost);
      long differ = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const float want = dx0[i] + written[i];
        differ += std::memcmp(&got[i], &want, 4) != 0 || got16[i] != rf::f32_to_bf16(want);
      }
      check(differ == 0, name + "_backward_rows accumulating into dx with a bf16 copy" + shape +
                             ": dx0 + the written dx, bit for bit, and its bf16 rounding (" + std::to_string(differ) + " differ)");
      cudaFree(d_acc);
      cudaFree(d_acc16);
    }
    if (layer) close_sums(down(d_db, size_t(n)), rb, ab, name + "_backward_rows db (accumulated)" + shape);
    for (float* p : {d_dx, d_dw, d_db, d_dout, d_x, d_w, d_s}) cudaFree(p);
  }
}

void rope(int rows, int heads, int head_dim) {
  const long stride = long(heads) * head_dim + 3;  // rows of a wider buffer, as the fused QKV
  const int half = head_dim / 2;
  std::vector<float> dx = randn(size_t(rows) * stride), c(size_t(rows) * half), s(size_t(rows) * half);
  for (size_t i = 0; i < c.size(); ++i) {
    const float a = float(i % 97) * 0.37f;
    c[i] = std::cos(a), s[i] = std::sin(a);
  }
  std::vector<float> want = dx;
  for (int r = 0; r < rows; ++r) rf::rope_backward(want.data() + r * stride, heads, head_dim, c.data() + r * half, s.data() + r * half);
  float *d = up(dx), *dc = up(c), *ds = up(s);
  rf::cuda::rope_backward_rows(d, stride, rows, heads, head_dim, dc, ds, nullptr);
  check_close(down(d, dx.size()), want, "rope_backward_rows rows " + std::to_string(rows) + " head_dim " + std::to_string(head_dim));
  for (float* p : {d, dc, ds}) cudaFree(p);
}

// Qwen3's per-head norms: dx in place on a fused row's q and k heads (v's gradient untouched),
// against the CPU's rmsnorm_backward per head; dwq, dwk accumulated, held to a float64 sum as the
// block norms' dw.
void qk_norm(int rows, int head_dim) {
  const int nq = 4, nk = 2;
  const float eps = 1e-6f;
  const long stride = long(nq + 2 * nk) * head_dim + 3, x_stride = long(nq + nk) * head_dim + 5;
  const std::vector<float> dx = randn(size_t(rows) * stride), x = randn(size_t(rows) * x_stride, 2.f),
                           wq = randn(size_t(head_dim), 0.3f, 1.f), wk = randn(size_t(head_dim), 0.3f, 1.f),
                           dwq0 = randn(size_t(head_dim)), dwk0 = randn(size_t(head_dim));
  std::vector<float> want = dx;
  std::vector<double> rq(dwq0.begin(), dwq0.end()), rk(dwk0.begin(), dwk0.end()), aq(size_t(head_dim), 0.0), ak(size_t(head_dim), 0.0);
  std::vector<float> scratch_dw(static_cast<size_t>(head_dim));
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < nq + nk; ++h) {
      float* d = want.data() + r * stride + long(h) * head_dim;
      const float* xh = x.data() + r * x_stride + long(h) * head_dim;
      const std::vector<float> dout(d, d + head_dim);
      std::fill(scratch_dw.begin(), scratch_dw.end(), 0.f);
      rf::rmsnorm_backward(d, scratch_dw.data(), dout.data(), xh, h < nq ? wq.data() : wk.data(), head_dim, eps);
      double ss = 0;
      for (int i = 0; i < head_dim; ++i) ss += double(xh[i]) * xh[i];
      const double inv = 1 / std::sqrt(ss / head_dim + eps);
      for (int i = 0; i < head_dim; ++i) {
        const double t = double(dout[size_t(i)]) * xh[i] * inv;
        (h < nq ? rq : rk)[size_t(i)] += t, (h < nq ? aq : ak)[size_t(i)] += std::fabs(t);
      }
    }
  float *d = up(dx), *d_x = up(x), *d_wq = up(wq), *d_wk = up(wk), *d_dwq = up(dwq0), *d_dwk = up(dwk0),
        *d_s = up(std::vector<float>(size_t(rf::cuda::qk_norm_backward_scratch_floats(rows, head_dim))));
  rf::cuda::qk_norm_backward_rows(d, stride, d_x, x_stride, rows, nq, nk, head_dim, d_wq, d_wk, eps, d_dwq, d_dwk, d_s, nullptr);
  const std::string shape = " rows " + std::to_string(rows) + " head_dim " + std::to_string(head_dim);
  check(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess, "qk_norm_backward_rows" + shape + ": kernels ran");
  check_close(down(d, dx.size()), want, "qk_norm_backward_rows dx (v's gradient untouched)" + shape);
  for (int k = 0; k < 2; ++k) {
    const std::vector<float> got = down(k ? d_dwk : d_dwq, size_t(head_dim));
    const std::vector<double>& ref = k ? rk : rq;
    const std::vector<double>& abs_sum = k ? ak : aq;
    double worst = 0;
    for (int i = 0; i < head_dim; ++i) worst = std::max(worst, std::fabs(got[size_t(i)] - ref[size_t(i)]) / (1 + abs_sum[size_t(i)]));
    char buf[64];
    std::snprintf(buf, sizeof buf, " (worst %.3g of 1 + sum |term|)", worst);
    check(worst <= 2e-6, std::string("qk_norm_backward_rows ") + (k ? "dwk" : "dwq") + " (accumulated)" + shape + buf);
  }
  for (float* p : {d, d_x, d_wq, d_wk, d_dwq, d_dwk, d_s}) cudaFree(p);
}

// The bf16-input overloads (the trainer's bf16 trace) give the f32 versions' bits on the widened
// values; their bf16 outputs (the next product's operand) are f32_to_bf16 of their f32 outputs.
void activations_bf16_input(int rows, int inter) {
  std::vector<float> in = randn(size_t(rows) * 2 * inter, 3.f);
  std::vector<uint16_t> bits(in.size());
  for (size_t i = 0; i < in.size(); ++i) bits[i] = rf::f32_to_bf16(in[i]), in[i] = rf::bf16_to_f32(bits[i]);
  const std::vector<float> dout = randn(in.size());  // enough for both products
  __nv_bfloat16* d_bits = nullptr;
  cudaMalloc(&d_bits, bits.size() * sizeof(uint16_t));
  cudaMemcpy(d_bits, bits.data(), bits.size() * sizeof(uint16_t), cudaMemcpyHostToDevice);
  float *d_in = up(in), *d_dout = up(dout), *a = up(std::vector<float>(in.size(), NAN)), *b = up(std::vector<float>(in.size(), NAN));
  __nv_bfloat16* d_out16 = nullptr;
  cudaMalloc(&d_out16, in.size() * sizeof(uint16_t));
  auto same = [&](size_t n, const std::string& what) {
    const std::vector<float> x = down(a, n), y = down(b, n);
    check(std::memcmp(x.data(), y.data(), n * sizeof(float)) == 0, what + " from bf16 equals the f32 version on the widened values, bit for bit");
    std::vector<uint16_t> y16(n);
    cudaMemcpy(y16.data(), d_out16, n * sizeof(uint16_t), cudaMemcpyDeviceToHost);
    long differ = 0;
    for (size_t i = 0; i < n; ++i) differ += y16[i] != rf::f32_to_bf16(y[i]);
    check(differ == 0, what + ": its bf16 output is f32_to_bf16 of its f32 output (" + std::to_string(differ) + " differ)");
  };
  const std::string shape = " rows " + std::to_string(rows) + " inter " + std::to_string(inter);
  rf::cuda::swiglu_backward_rows(a, d_dout, d_in, rows, inter, nullptr);
  rf::cuda::swiglu_backward_rows(b, d_dout, d_bits, rows, inter, nullptr, d_out16);
  same(in.size(), "swiglu_backward_rows" + shape);
  rf::cuda::gelu_new_backward(a, d_dout, d_in, long(in.size()), nullptr);
  rf::cuda::gelu_new_backward(b, d_dout, d_bits, long(in.size()), nullptr, d_out16);
  same(in.size(), "gelu_new_backward" + shape);
  for (float* p : {d_in, d_dout, a, b}) cudaFree(p);
  cudaFree(d_bits);
  cudaFree(d_out16);
}

// swiglu_backward_rows with the down projection's adapter term (DoutLora) against the two
// launches it replaces: lora_up_dropout_add into a copy of dout, then swiglu_backward_rows: the
// same bits in din and its bf16 copy (ranks 4, 16, 17 and 32: both kernel widths; with and
// without dropout; a partial last row tile), and dout left as it was.
void activations_down_lora(int rows, int inter, int rank, float p) {
  const uint64_t seed = 0x5eed1234abcdull;
  const int layer = 3, adapter = 3 * 16;
  const std::vector<float> in = randn(size_t(rows) * 2 * inter, 3.f), dout = randn(size_t(rows) * inter),
                           du = randn(size_t(rows) * rank), A = randn(size_t(rank) * inter, 0.3f);
  float *d_in = up(in), *d_dout = up(dout), *d_dout2 = up(dout), *d_du = up(du), *d_A = up(A),
        *d_a = up(std::vector<float>(in.size(), NAN)), *d_b = up(std::vector<float>(in.size(), NAN));
  __nv_bfloat16 *d_a16 = nullptr, *d_b16 = nullptr;
  cudaMalloc(&d_a16, in.size() * sizeof(uint16_t));
  cudaMalloc(&d_b16, in.size() * sizeof(uint16_t));
  rf::cuda::lora_up_dropout_add(d_dout2, d_du, d_A, rows, inter, rank, seed, layer, adapter, p, nullptr);
  rf::cuda::swiglu_backward_rows(d_a, d_dout2, d_in, rows, inter, nullptr, d_a16);
  rf::cuda::swiglu_backward_rows(d_b, d_dout, d_in, rows, inter, nullptr, d_b16, {d_du, d_A, rank, adapter, seed, layer, p});
  const std::string what = "swiglu_backward_rows + the down adapter's term rows " + std::to_string(rows) + " inter " +
                           std::to_string(inter) + " rank " + std::to_string(rank) + " p " + std::to_string(p);
  check(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess, what + ": kernels ran");
  const std::vector<float> a = down(d_a, in.size()), b = down(d_b, in.size()), kept = down(d_dout, dout.size()),
                           added = down(d_dout2, dout.size());
  std::vector<uint16_t> a16(in.size()), b16(in.size());
  cudaMemcpy(a16.data(), d_a16, in.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(b16.data(), d_b16, in.size() * 2, cudaMemcpyDeviceToHost);
  check(std::memcmp(a.data(), b.data(), a.size() * 4) == 0 && std::memcmp(a16.data(), b16.data(), a16.size() * 2) == 0,
        what + ": din and its bf16 copy the bits of lora_up_dropout_add then swiglu_backward_rows");
  check(std::memcmp(kept.data(), dout.data(), dout.size() * 4) == 0 && std::memcmp(added.data(), dout.data(), dout.size() * 4) != 0,
        what + ": dout left as it was (and the term not zero)");
  for (float* q : {d_in, d_dout, d_dout2, d_du, d_A, d_a, d_b}) cudaFree(q);
  cudaFree(d_a16);
  cudaFree(d_b16);
}

// swiglu_backward_rows with the gate|up adapters' terms (SwigluLora) on the product before them
// against swiglu_backward_rows on the forward's sums (swiglu_rows' in_f32, the same terms): the
// same bits in din and its bf16 copy, from an f32 and from a bf16 in (whose sums are those of its
// widening), with the down adapter's term at once or not; ranks on either half, both, uneven.
void activations_glu_lora(int rows, int inter, int gate_rank, int up_rank, int down_rank) {
  const uint64_t seed = 0x5eed1234abcdull;
  std::vector<float> in = randn(size_t(rows) * 2 * inter, 3.f);
  std::vector<uint16_t> bits(in.size());
  for (size_t i = 0; i < in.size(); ++i) bits[i] = rf::f32_to_bf16(in[i]), in[i] = rf::bf16_to_f32(bits[i]);
  const std::vector<float> dout = randn(size_t(rows) * inter), du = randn(size_t(rows) * std::max(1, down_rank)),
                           A = randn(size_t(std::max(1, down_rank)) * inter, 0.3f);
  const int ranks[2] = {gate_rank, up_rank};
  float *d_in = up(in), *d_dout = up(dout), *d_du = up(du), *d_A = up(A), *d_sums = up(std::vector<float>(in.size(), NAN)),
        *d_act = up(std::vector<float>(size_t(rows) * inter, NAN));
  float* d_u[2];
  float* d_B[2];
  rf::cuda::SwigluLora terms[2];
  for (int h = 0; h < 2; ++h) {
    d_u[h] = up(randn(size_t(rows) * std::max(1, ranks[h])));
    d_B[h] = up(randn(size_t(inter) * std::max(1, ranks[h]), 0.3f));
    if (ranks[h]) terms[h] = {d_u[h], d_B[h], ranks[h]};
  }
  __nv_bfloat16* d_bits = nullptr;
  cudaMalloc(&d_bits, bits.size() * sizeof(uint16_t));
  cudaMemcpy(d_bits, bits.data(), bits.size() * sizeof(uint16_t), cudaMemcpyHostToDevice);
  const rf::cuda::DoutLora down_lora =
      down_rank ? rf::cuda::DoutLora{d_du, d_A, down_rank, 48, seed, 2, 0.25f} : rf::cuda::DoutLora{};
  rf::cuda::swiglu_rows(d_act, d_in, rows, inter, nullptr, nullptr, nullptr, terms[0], terms[1], d_sums);  // the forward's sums
  std::vector<float*> outs;
  std::vector<__nv_bfloat16*> outs16;
  for (int k = 0; k < 3; ++k) {
    outs.push_back(up(std::vector<float>(in.size(), NAN)));
    __nv_bfloat16* p16 = nullptr;
    cudaMalloc(&p16, in.size() * sizeof(uint16_t));
    outs16.push_back(p16);
  }
  rf::cuda::swiglu_backward_rows(outs[0], d_dout, d_sums, rows, inter, nullptr, outs16[0], down_lora);
  rf::cuda::swiglu_backward_rows(outs[1], d_dout, d_in, rows, inter, nullptr, outs16[1], down_lora, terms[0], terms[1]);
  rf::cuda::swiglu_backward_rows(outs[2], d_dout, d_bits, rows, inter, nullptr, outs16[2], down_lora, terms[0], terms[1]);
  const std::string what = "swiglu_backward_rows + the gate|up adapters' terms rows " + std::to_string(rows) + " inter " +
                           std::to_string(inter) + " ranks " + std::to_string(gate_rank) + "," + std::to_string(up_rank) +
                           " down " + std::to_string(down_rank);
  check(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess, what + ": kernels ran");
  const std::vector<float> want = down(outs[0], in.size());
  std::vector<uint16_t> want16(in.size()), got16(in.size());
  cudaMemcpy(want16.data(), outs16[0], in.size() * 2, cudaMemcpyDeviceToHost);
  for (int k = 1; k < 3; ++k) {
    const std::vector<float> got = down(outs[k], in.size());
    cudaMemcpy(got16.data(), outs16[k], in.size() * 2, cudaMemcpyDeviceToHost);
    check(std::memcmp(got.data(), want.data(), want.size() * 4) == 0 && got16 == want16,
          what + (k == 1 ? " (f32 in)" : " (bf16 in)") + ": din and its bf16 copy the bits of the backward on the forward's sums");
  }
  for (float* q : {d_in, d_dout, d_du, d_A, d_sums, d_act, d_u[0], d_u[1], d_B[0], d_B[1]}) cudaFree(q);
  for (float* q : outs) cudaFree(q);
  for (__nv_bfloat16* q : outs16) cudaFree(q);
  cudaFree(d_bits);
}

void activations(int rows, int inter) {
  const std::vector<float> in = randn(size_t(rows) * 2 * inter, 3.f), dout = randn(size_t(rows) * inter);
  std::vector<float> want(in.size());
  for (int r = 0; r < rows; ++r) {
    const size_t o = size_t(r) * 2 * inter;
    rf::swiglu_backward(want.data() + o, want.data() + o + inter, dout.data() + size_t(r) * inter, in.data() + o, in.data() + o + inter, inter);
  }
  float *d_in = up(in), *d_dout = up(dout), *d_din = up(std::vector<float>(in.size(), NAN));
  rf::cuda::swiglu_backward_rows(d_din, d_dout, d_in, rows, inter, nullptr);
  check_close(down(d_din, in.size()), want, "swiglu_backward_rows rows " + std::to_string(rows) + " inter " + std::to_string(inter));

  const long n = long(rows) * inter;
  const std::vector<float> x = randn(size_t(n), 3.f);
  std::vector<float> gw(static_cast<size_t>(n));
  rf::gelu_new_backward(gw.data(), dout.data(), x.data(), int(n));
  float* d_x = up(x);
  rf::cuda::gelu_new_backward(d_dout, d_dout, d_x, n, nullptr);  // in place, as allowed
  check_close(down(d_dout, size_t(n)), gw, "gelu_new_backward in place, n " + std::to_string(n));
  for (float* p : {d_in, d_dout, d_din, d_x}) cudaFree(p);
  activations_bf16_input(rows, inter);
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_ops_backward: no CUDA device visible; skipped (%s)\n", info.error.c_str());
    return 0;
  }
  for (int rows : {1, 7, 33})
    for (int n : {80, 576, 4097}) norms(rows, n);
  norms(1000, 80);  // parameter gradients summed over several row parts
  for (int hd : {64, 128}) rope(9, 5, hd);
  for (int hd : {64, 128}) qk_norm(9, hd);
  qk_norm(700, 80);  // the weight gradients summed over several row parts
  for (int inter : {80, 4097}) activations(7, inter);
  // Past swiglu_backward_rows' grid of 65535 tiles of 32 rows: the tile loop's second turn, its
  // last tile partial.
  activations(65535 * 32 + 37, 2);
  for (int rank : {4, 16, 17, 32})
    for (float p : {0.f, 0.3f}) activations_down_lora(45, 300, rank, p);
  // Every width the forward takes (8, 16, 32), each half alone and both, with and without the
  // down adapter's term (its widths 16 and 32), and the down adapter's alone: every instance of
  // the kernel, from f32 and bf16 sums; a partial last row tile.
  for (const auto& r : std::vector<std::array<int, 3>>{{4, 0, 0}, {0, 16, 0}, {8, 8, 16}, {3, 17, 0}, {32, 32, 32}, {16, 16, 16},
                                                       {8, 8, 32}, {16, 0, 32}, {0, 32, 16}, {0, 0, 16}, {0, 0, 32}})
    activations_glu_lora(45, 300, r[0], r[1], r[2]);
  bool refused = false;
  try {
    float* d = up(std::vector<float>(8));
    rf::cuda::swiglu_backward_rows(d, d, d, 1, 4, nullptr, nullptr, {d, d, rf::cuda::kDoutLoraMaxRank + 1});
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  check(refused, "swiglu_backward_rows refuses an adapter rank past kDoutLoraMaxRank");
  refused = false;
  try {
    float* d = up(std::vector<float>(8));
    rf::cuda::swiglu_backward_rows(d, d, d, 1, 4, nullptr, nullptr, {}, {d, d, rf::cuda::kSwigluLoraMaxRank + 1});
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  check(refused, "swiglu_backward_rows refuses a gate adapter rank past kSwigluLoraMaxRank");
  return rf::test::finish("cuda_ops_backward");
}
