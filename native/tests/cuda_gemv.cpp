// The decode-sized products (native/cuda/gemv.h) against float64 on the same inputs, on a GPU
// machine (and in CI under the CPU emulation); elsewhere it says no device was found and exits 0.
//
// Cases: bf16 and f32 operands; rows 1, 3, 5 and 8; N 37, 300 and 1001 (not multiples of the
// block's 8 warps); K 64, 80, 2048 and 8192 (K not a multiple of the 32 lanes' 4-chunk stride,
// a chunk loop that ends mid-stride); x a slice of wider rows (ldx > K) and y too (ldy > N: the
// columns between rows must stay untouched); with and without bias, residual (y +=), up to four
// LoRA adapters on overlapping-free slices (ranks 16, 8, 5, 1, like q, k and v of a fused
// projection), SwiGLU pairs, and the bf16 copy of y.
//
// Tolerances, and why:
//   - gemv_rows: bf16 operands multiply exactly in f32, so the only error is the f32 summation:
//     each lane sums K / 256 (bf16) or K / 128 (f32) chunks of 8 or 4 products in sequence, then a
//     5-level tree, then the bias, adapters and residual: at most (K / 32 + 5 + 4) roundings,
//     each within 2^-24 of the running magnitude, bounded by S = sum |x w| + |bias| + sum |u B| +
//     |y0|. Checked as |got - ref| <= (K / 32 + 16) * 2^-24 * S against the double sum (f32
//     operands add one rounding per product, inside the same bound's margin). With SwiGLU, the
//     gate's and the up's bounds propagate through silu(g) u (|d silu / dg| <= 1.1), and expf's
//     few ulps and the divide add 4e-7 relative.
//   - y_bf16: the kernel's own f32 result rounded as rf::f32_to_bf16 does: bit-identical.
//   - a second run: bit-identical (a fixed summation order); nothing written past an output's end
//     or between its rows.
//   - lora_down_rows: f32 sums of K products: each thread K / 256 of them, the warp's 5-level
//     tree, then 8 warps in order: checked as |got - ref| <= (K / 256 + 16) * 2^-24 * sum |a x|.
//   - lora_up_rows: y0 + (the rank-long f32 sum): within (rank + 2) * 2^-24 * (|y0| + sum |u B|)
//     of double; columns outside every adapter's slice, and the padding past the rows' width,
//     bit-identical (untouched); rows 1, 16, 17 and 64 (the 16-row blocks' edges).
//   - the append epilogue (GemvArgs::append): y and both paged caches (bf16 and f32) bit-identical
//     to the plain product followed by kv_append with its fused rope, for rows of three sequences
//     at positions in different cache blocks, GQA 2, with the norm, a bias and adapters; the
//     caches' other slots untouched.
//   - the fused RMSNorm (GemvArgs::norm_w, lora_down_rows' norm_w): bit-identical to rmsnorm_rows
//     (ops.h) followed by the unfused products on its output (its bf16 copy for bf16 W), since
//     the kernels share the reduction (block_sum.cuh) and the element's arithmetic; rows 1, 4
//     and 8, K 80, 2048 and 8192, with SwiGLU, adapters and the LM head's grid stride (N past
//     2048 blocks of 8 outputs).
#include <cuda_runtime.h>

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
#include "cuda/gemv.h"
#include "cuda/ops.h"
#include "cuda/paged_cache.h"
#include "tests/check.h"
#include "tests/cuda_test.h"

using rf::test::check;
using namespace rf::test::cuda;

namespace {

struct Case {
  bool bf16;
  int rows, N, K;
  int x_pad = 0, y_pad = 0;  // extra elements per row of x and y
  bool bias = false, accumulate = false, glu = false, y_bf16 = false;
  std::vector<int> ranks;  // adapters, side by side over the N columns (split evenly; with glu, gate then up)
};

std::string name(const Case& c) {
  std::string s = std::string(c.bf16 ? "bf16" : "f32") + " rows " + std::to_string(c.rows) + " N " + std::to_string(c.N) + " K " +
                  std::to_string(c.K);
  if (c.x_pad) s += " ldx+" + std::to_string(c.x_pad);
  if (c.y_pad) s += " ldy+" + std::to_string(c.y_pad);
  if (c.bias) s += " bias";
  if (c.accumulate) s += " +=";
  if (c.glu) s += " glu";
  if (!c.ranks.empty()) s += " lora x" + std::to_string(c.ranks.size());
  return s;
}

void test_gemv(const Case& c) {
  const std::string what = "gemv_rows " + name(c);
  const long ldx = c.K + c.x_pad, units = c.glu ? c.N / 2 : c.N, ldy = units + c.y_pad;
  // Operands, rounded to bf16 on the host for the bf16 case so the double reference sees the same values.
  std::vector<float> x = randn(size_t(c.rows) * ldx), w = randn(size_t(c.N) * c.K, 0.05f);
  if (c.bf16) {
    for (float& v : x) v = rf::bf16_to_f32(rf::f32_to_bf16(v));
    for (float& v : w) v = rf::bf16_to_f32(rf::f32_to_bf16(v));
  }
  const std::vector<float> bias = randn(size_t(c.N), 0.5f);
  std::vector<float> y0 = randn(size_t(c.rows) * ldy);
  for (long r = 0; r < c.rows; ++r)
    for (long j = units; j < ldy; ++j) y0[size_t(r * ldy + j)] = sentinel();  // between rows: untouched
  y0.push_back(sentinel());                                                   // past the end
  // Adapters on consecutive slices of the N columns.
  struct Ad {
    int offset, out, rank;
    std::vector<float> u, B;
  };
  std::vector<Ad> ads;
  for (size_t i = 0, off = 0; i < c.ranks.size(); ++i) {
    const int out = int(i + 1 == c.ranks.size() ? c.N - long(off) : std::min<long>(c.N / long(c.ranks.size()), c.N - long(off)));
    ads.push_back({int(off), out, c.ranks[i], randn(size_t(c.rows) * c.ranks[i]), randn(size_t(out) * c.ranks[i], 0.1f)});
    off += size_t(out);
  }

  Dev dx(x.size() * 4), dw(w.size() * 4), db(bias.size() * 4), dy(y0.size() * 4), dyb(y0.size() * 2);
  if (c.bf16) {
    std::vector<uint16_t> xb(x.size()), wb(w.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = rf::f32_to_bf16(x[i]);
    for (size_t i = 0; i < w.size(); ++i) wb[i] = rf::f32_to_bf16(w[i]);
    put(dx, xb), put(dw, wb);
  } else {
    put(dx, x), put(dw, w);
  }
  put(db, bias);
  std::vector<uint16_t> yb0(y0.size(), 0xffffu);
  put(dyb, yb0);
  std::vector<Dev*> keep;
  rf::cuda::GemvArgs a;
  a.x = dx.p, a.ldx = ldx, a.w = dw.p, a.type = c.bf16 ? rf::DType::bf16 : rf::DType::f32;
  a.rows = c.rows, a.N = c.N, a.K = c.K, a.bias = c.bias ? static_cast<const float*>(db.p) : nullptr;
  a.y = static_cast<float*>(dy.p), a.ldy = ldy, a.accumulate = c.accumulate, a.glu = c.glu;
  a.y_bf16 = c.y_bf16 ? static_cast<__nv_bfloat16*>(dyb.p) : nullptr;
  a.n_lora = int(ads.size());
  for (size_t i = 0; i < ads.size(); ++i) {
    Dev* du = new Dev(ads[i].u.size() * 4);
    Dev* dB = new Dev(ads[i].B.size() * 4);
    put(*du, ads[i].u), put(*dB, ads[i].B);
    keep.push_back(du), keep.push_back(dB);
    a.lora[i] = {static_cast<const float*>(du->p), static_cast<const float*>(dB->p), ads[i].offset, ads[i].out, ads[i].rank};
  }
  std::vector<float> got, again;
  std::vector<uint16_t> got_b;
  for (int run = 0; run < 2; ++run) {
    put(dy, y0);
    rf::cuda::gemv_rows(a, nullptr);
    if (!ran(what)) break;
    (run == 0 ? got : again) = download<float>(dy, y0.size());
    if (run == 0) got_b = download<uint16_t>(dyb, y0.size());
  }
  for (Dev* d : keep) delete d;
  if (got.size() != y0.size() || again.size() != y0.size()) return;

  // z and its error bound S per (row, column of W), in double.
  const auto column = [&](long r, long col, double* bound) {
    double z = 0, s = 0;
    for (long k = 0; k < c.K; ++k) {
      const double p = double(x[size_t(r * ldx + k)]) * w[size_t(col * c.K + k)];
      z += p, s += std::fabs(p);
    }
    if (c.bias) z += bias[size_t(col)], s += std::fabs(bias[size_t(col)]);
    for (const Ad& ad : ads) {
      if (col < ad.offset || col >= ad.offset + ad.out) continue;
      for (int q = 0; q < ad.rank; ++q) {
        const double p = double(ad.u[size_t(r * ad.rank + q)]) * ad.B[size_t((col - ad.offset) * ad.rank + q)];
        z += p, s += std::fabs(p);
      }
    }
    *bound = (double(c.K) / 32 + 16) * std::ldexp(1.0, -24) * s;
    return z;
  };
  double worst = 0;  // the largest error over its tolerance
  bool bf16_ok = true, same = true;
  for (long r = 0; r < c.rows; ++r) {
    for (long j = 0; j < units; ++j) {
      const size_t i = size_t(r * ldy + j);
      double bound, ref = column(r, j, &bound);
      if (c.glu) {
        double bu;
        const double g = ref, up = column(r, units + j, &bu), sg = g / (1 + std::exp(-g));
        ref = sg * up;
        bound = 1.1 * bound * std::fabs(up) + bu * std::fabs(sg) + 4e-7 * std::fabs(ref);
      }
      if (c.accumulate) ref += y0[i], bound += std::ldexp(1.0, -24) * (std::fabs(y0[i]) + std::fabs(ref));
      worst = std::max(worst, std::fabs(got[i] - ref) / std::max(bound, 1e-30));
      if (c.y_bf16 && got_b[i] != rf::f32_to_bf16(got[i])) bf16_ok = false;
    }
  }
  for (size_t i = 0; i < got.size(); ++i) same &= bits(got[i]) == bits(again[i]);
  bool untouched = true;
  for (long r = 0; r < c.rows; ++r)
    for (long j = units; j < ldy; ++j) untouched &= bits(got[size_t(r * ldy + j)]) == kSentinelBits;
  untouched &= bits(got.back()) == kSentinelBits;
  if (c.y_bf16) {
    for (long r = 0; r < c.rows; ++r)
      for (long j = units; j < ldy; ++j) untouched &= got_b[size_t(r * ldy + j)] == 0xffffu;
    untouched &= got_b.back() == 0xffffu;
  }
  check(worst <= 1.0, what + ": within tolerance (worst error / bound " + fmt(worst) + ")");
  check(same, what + ": the same bits on a second run");
  check(untouched, what + ": nothing written between rows or past the end");
  if (c.y_bf16) check(bf16_ok, what + ": y_bf16 is y rounded as f32_to_bf16");
}

void test_lora_down(int rows, int K, const std::vector<int>& ranks, int x_pad) {
  std::string what = "lora_down_rows rows " + std::to_string(rows) + " K " + std::to_string(K) + " ranks";
  for (int r : ranks) what += " " + std::to_string(r);
  const long ldx = K + x_pad;
  const std::vector<float> x = randn(size_t(rows) * ldx);
  Dev dx(x.size() * 4);
  put(dx, x);
  std::vector<std::vector<float>> As;
  std::vector<Dev*> keep;
  std::vector<rf::cuda::GemvDown> terms;
  for (int rank : ranks) {
    As.push_back(randn(size_t(rank) * K, 0.05f));
    Dev* dA = new Dev(As.back().size() * 4);
    Dev* du = new Dev((size_t(rows) * rank + 1) * 4);
    put(*dA, As.back());
    std::vector<float> init(size_t(rows) * rank + 1, sentinel());
    put(*du, init);
    keep.push_back(dA), keep.push_back(du);
    terms.push_back({static_cast<const float*>(dA->p), static_cast<float*>(du->p), rank});
  }
  rf::cuda::lora_down_rows(terms.data(), int(terms.size()), static_cast<const float*>(dx.p), ldx, rows, K, nullptr);
  if (ran(what)) {
    double worst = 0;
    bool tail = true;
    for (size_t t = 0; t < ranks.size(); ++t) {
      const std::vector<float> u = download<float>(*keep[2 * t + 1], size_t(rows) * ranks[t] + 1);
      tail &= bits(u.back()) == kSentinelBits;
      for (int r = 0; r < rows; ++r)
        for (int q = 0; q < ranks[t]; ++q) {
          double z = 0, s = 0;
          for (int k = 0; k < K; ++k) {
            const double p = double(As[t][size_t(q) * K + k]) * x[size_t(r * ldx + k)];
            z += p, s += std::fabs(p);
          }
          const double bound = (double(K) / 256 + 16) * std::ldexp(1.0, -24) * s;
          worst = std::max(worst, std::fabs(u[size_t(r * ranks[t] + q)] - z) / std::max(bound, 1e-30));
        }
    }
    check(worst <= 1.0, what + ": within tolerance (worst error / bound " + fmt(worst) + ")");
    check(tail, what + ": nothing written past u's end");
  }
  for (Dev* d : keep) delete d;
}

// gemv_rows and lora_down_rows with the norm fused against rmsnorm_rows, then the same products.
void test_norm_fused(bool bf16, int rows, int N, int K, bool glu, const std::vector<int>& ranks) {
  std::string what = std::string("fused RMSNorm ") + (bf16 ? "bf16" : "f32") + " rows " + std::to_string(rows) + " N " +
                     std::to_string(N) + " K " + std::to_string(K) + (glu ? " glu" : "") + " lora x" + std::to_string(ranks.size());
  const float eps = 1e-5f;
  std::vector<float> x = randn(size_t(rows) * K, 3.f), nw = randn(size_t(K), 0.2f), w = randn(size_t(N) * K, 0.05f);
  for (float& v : nw) v += 1.f;
  Dev dx(x.size() * 4), dnw(nw.size() * 4), dw(w.size() * 4), dxn(x.size() * 4), dxb(x.size() * 2);
  put(dx, x), put(dnw, nw);
  if (bf16) {
    std::vector<uint16_t> wb(w.size());
    for (size_t i = 0; i < w.size(); ++i) wb[i] = rf::f32_to_bf16(w[i]);
    put(dw, wb);
  } else {
    put(dw, w);
  }
  const long units = glu ? N / 2 : N;
  Dev y_ref(size_t(rows) * units * 4), y_got(size_t(rows) * units * 4);
  std::vector<Dev*> keep;
  std::vector<rf::cuda::GemvDown> down_ref, down_got;
  rf::cuda::GemvArgs a;
  a.w = dw.p, a.type = bf16 ? rf::DType::bf16 : rf::DType::f32, a.rows = rows, a.N = N, a.K = K, a.glu = glu;
  a.n_lora = int(ranks.size());
  for (size_t i = 0, off = 0; i < ranks.size(); ++i) {
    const int out = int(N / long(ranks.size()));
    const std::vector<float> A = randn(size_t(ranks[i]) * K, 0.05f), B = randn(size_t(out) * ranks[i], 0.1f);
    Dev* dA = new Dev(A.size() * 4);
    Dev* dB = new Dev(B.size() * 4);
    Dev* ur = new Dev(size_t(rows) * ranks[i] * 4);
    Dev* ug = new Dev(size_t(rows) * ranks[i] * 4);
    put(*dA, A), put(*dB, B);
    keep.insert(keep.end(), {dA, dB, ur, ug});
    down_ref.push_back({static_cast<const float*>(dA->p), static_cast<float*>(ur->p), ranks[i]});
    down_got.push_back({static_cast<const float*>(dA->p), static_cast<float*>(ug->p), ranks[i]});
    a.lora[i] = {nullptr, static_cast<const float*>(dB->p), int(off), out, ranks[i]};
    off += size_t(out);
  }
  // Unfused: the norm's launch, then the products on its output.
  rf::cuda::rmsnorm_rows(static_cast<float*>(dxn.p), static_cast<const float*>(dx.p), static_cast<const float*>(dnw.p), rows, K, eps,
                         nullptr, static_cast<__nv_bfloat16*>(dxb.p));
  if (!ranks.empty()) rf::cuda::lora_down_rows(down_ref.data(), int(ranks.size()), static_cast<const float*>(dxn.p), K, rows, K, nullptr);
  rf::cuda::GemvArgs r = a;
  for (size_t i = 0; i < ranks.size(); ++i) r.lora[i].u = down_ref[i].u;
  r.x = bf16 ? dxb.p : dxn.p, r.y = static_cast<float*>(y_ref.p);
  rf::cuda::gemv_rows(r, nullptr);
  // Fused.
  if (!ranks.empty())
    rf::cuda::lora_down_rows(down_got.data(), int(ranks.size()), static_cast<const float*>(dx.p), K, rows, K, nullptr,
                             static_cast<const float*>(dnw.p), eps);
  rf::cuda::GemvArgs g = a;
  for (size_t i = 0; i < ranks.size(); ++i) g.lora[i].u = down_got[i].u;
  g.x = dx.p, g.norm_w = static_cast<const float*>(dnw.p), g.norm_eps = eps, g.y = static_cast<float*>(y_got.p);
  rf::cuda::gemv_rows(g, nullptr);
  if (ran(what)) {
    const std::vector<float> yr = download<float>(y_ref, size_t(rows) * units), yg = download<float>(y_got, size_t(rows) * units);
    long differ = 0;
    for (size_t i = 0; i < yr.size(); ++i) differ += bits(yr[i]) != bits(yg[i]);
    for (size_t i = 0; i < ranks.size(); ++i) {
      const std::vector<float> ur = download<float>(*keep[4 * i + 2], size_t(rows) * ranks[i]),
                               ug = download<float>(*keep[4 * i + 3], size_t(rows) * ranks[i]);
      for (size_t k = 0; k < ur.size(); ++k) differ += bits(ur[k]) != bits(ug[k]);
    }
    check(differ == 0, what + ": bit-identical to rmsnorm_rows then the products (" + std::to_string(differ) + " values differ)");
  }
  for (Dev* d : keep) delete d;
}

void test_lora_up(int rows, const std::vector<int>& ranks, const std::vector<int>& outs, long ldy) {
  std::string what = "lora_up_rows rows " + std::to_string(rows) + " ldy " + std::to_string(ldy) + " ranks";
  for (int r : ranks) what += " " + std::to_string(r);
  std::vector<float> y0 = randn(size_t(rows) * ldy);
  Dev dy(y0.size() * 4);
  put(dy, y0);
  std::vector<Dev*> keep;
  std::vector<rf::cuda::GemvLora> terms;
  std::vector<std::vector<float>> us, Bs;
  long off = 3;  // the slices start past column 0, with gaps between them
  for (size_t i = 0; i < ranks.size(); ++i) {
    us.push_back(randn(size_t(rows) * ranks[i]));
    Bs.push_back(randn(size_t(outs[i]) * ranks[i], 0.1f));
    Dev* du = new Dev(us.back().size() * 4);
    Dev* dB = new Dev(Bs.back().size() * 4);
    put(*du, us.back()), put(*dB, Bs.back());
    keep.push_back(du), keep.push_back(dB);
    terms.push_back({static_cast<const float*>(du->p), static_cast<const float*>(dB->p), int(off), outs[i], ranks[i]});
    off += outs[i] + 2;
  }
  rf::cuda::lora_up_rows(terms.data(), int(terms.size()), rows, static_cast<float*>(dy.p), ldy, nullptr);
  if (ran(what)) {
    const std::vector<float> y = download<float>(dy, y0.size());
    double worst = 0;
    long touched = 0;
    for (long r = 0; r < rows; ++r) {
      for (long j = 0; j < ldy; ++j) {
        const size_t i = size_t(r * ldy + j);
        double ref = y0[i], sum_abs = std::fabs(y0[i]);
        int rank = 0;
        bool in_slice = false;
        for (size_t a = 0; a < terms.size(); ++a) {
          if (j < terms[a].offset || j >= terms[a].offset + terms[a].out) continue;
          in_slice = true, rank = terms[a].rank;
          for (int q = 0; q < rank; ++q) {
            const double p = double(us[a][size_t(r * rank + q)]) * Bs[a][size_t((j - terms[a].offset) * rank + q)];
            ref += p, sum_abs += std::fabs(p);
          }
        }
        if (!in_slice) {
          touched += bits(y[i]) != bits(y0[i]);
          continue;
        }
        const double bound = (rank + 2) * std::ldexp(1.0, -24) * sum_abs;
        worst = std::max(worst, std::fabs(y[i] - ref) / std::max(bound, 1e-30));
      }
    }
    check(worst <= 1.0, what + ": within tolerance (worst error / bound " + fmt(worst) + ")");
    check(touched == 0, what + ": columns outside the adapters' slices untouched (" + std::to_string(touched) + " changed)");
  }
  for (Dev* d : keep) delete d;
}

// lora_down_rows past one group of kGemvMaxRows rows with the norm fused: bit-identical to
// rmsnorm_rows and then the unfused call.
void test_down_norm_rows(int rows, int K) {
  const std::string what = "lora_down_rows with RMSNorm, rows " + std::to_string(rows) + " K " + std::to_string(K);
  const std::vector<float> x = randn(size_t(rows) * K, 2.f), nw = randn(size_t(K), 0.3f), A = randn(size_t(16) * K, 0.05f);
  Dev dx(x.size() * 4), dnw(nw.size() * 4), dA(A.size() * 4), dxn(x.size() * 4), ur(size_t(rows) * 16 * 4), ug(size_t(rows) * 16 * 4);
  put(dx, x), put(dnw, nw), put(dA, A);
  rf::cuda::rmsnorm_rows(static_cast<float*>(dxn.p), static_cast<const float*>(dx.p), static_cast<const float*>(dnw.p), rows, K, 1e-6f,
                         nullptr);
  const rf::cuda::GemvDown tr{static_cast<const float*>(dA.p), static_cast<float*>(ur.p), 16};
  const rf::cuda::GemvDown tg{static_cast<const float*>(dA.p), static_cast<float*>(ug.p), 16};
  rf::cuda::lora_down_rows(&tr, 1, static_cast<const float*>(dxn.p), K, rows, K, nullptr);
  rf::cuda::lora_down_rows(&tg, 1, static_cast<const float*>(dx.p), K, rows, K, nullptr, static_cast<const float*>(dnw.p), 1e-6f);
  if (ran(what)) {
    const std::vector<float> a = download<float>(ur, size_t(rows) * 16), b = download<float>(ug, size_t(rows) * 16);
    long differ = 0;
    for (size_t i = 0; i < a.size(); ++i) differ += bits(a[i]) != bits(b[i]);
    check(differ == 0, what + ": bit-identical to rmsnorm_rows then lora_down_rows (" + std::to_string(differ) + " differ)");
  }
}

// gemv_rows with the append epilogue against the plain product and then kv_append; with the
// norm fused (the model's QKV product) or without (x taken as it is).
void test_append(bool bf16_w, bool bf16_cache, bool norm = true) {
  const std::string what = std::string("gemv_rows append ") + (bf16_w ? "bf16" : "f32") + " W, " + (bf16_cache ? "bf16" : "f32") +
                           " cache" + (norm ? "" : ", no norm");
  const int nq = 4, nkv = 2, hd = 16, bt = 16, K = 64, rows = 3, n_blocks = 6;
  const int N = (nq + 2 * nkv) * hd, hh = hd / 2;
  std::vector<float> x = randn(size_t(rows) * K, 2.f), nw = randn(size_t(K), 0.2f), w = randn(size_t(N) * K, 0.1f),
                     bias = randn(size_t(N), 0.3f), cs = randn(size_t(rows) * hh), sn = randn(size_t(rows) * hh);
  for (float& v : nw) v += 1.f;
  Dev dx(x.size() * 4), dnw(nw.size() * 4), dw(w.size() * 4), db(bias.size() * 4), dc(cs.size() * 4), ds(sn.size() * 4);
  put(dx, x), put(dnw, nw), put(db, bias), put(dc, cs), put(ds, sn);
  if (bf16_w) {
    std::vector<uint16_t> wb(w.size());
    for (size_t i = 0; i < w.size(); ++i) wb[i] = rf::f32_to_bf16(w[i]);
    put(dw, wb);
  } else {
    put(dw, w);
  }
  // Three sequences of two blocks each; the rows at positions 17, 3 and 30.
  const std::vector<int32_t> ints{5, 1, 3, 0, 2, 4, /*offsets*/ 0, 2, 4, /*row_seq*/ 0, 1, 2, /*row_pos*/ 17, 3, 30};
  Dev di(ints.size() * 4);
  put(di, ints);
  const int32_t* tables = static_cast<const int32_t*>(di.p);
  const size_t cache_elems = size_t(n_blocks) * nkv * bt * hd, esize = bf16_cache ? 2 : 4;
  const std::vector<uint8_t> fill(cache_elems * esize, 0xab);
  Dev k_ref(cache_elems * esize), v_ref(cache_elems * esize), k_got(cache_elems * esize), v_got(cache_elems * esize);
  put(k_ref, fill), put(v_ref, fill), put(k_got, fill), put(v_got, fill);
  const std::vector<float> A = randn(size_t(8) * K, 0.1f), B = randn(size_t(nkv * hd) * 8, 0.1f);
  Dev dA(A.size() * 4), dB(B.size() * 4), du(size_t(rows) * 8 * 4);
  put(dA, A), put(dB, B);
  const rf::cuda::GemvDown down{static_cast<const float*>(dA.p), static_cast<float*>(du.p), 8};
  const float* norm_w = norm ? static_cast<const float*>(dnw.p) : nullptr;
  rf::cuda::lora_down_rows(&down, 1, static_cast<const float*>(dx.p), K, rows, K, nullptr, norm_w, 1e-5f);
  rf::cuda::GemvArgs a;
  a.x = dx.p, a.w = dw.p, a.type = bf16_w ? rf::DType::bf16 : rf::DType::f32, a.rows = rows, a.N = N, a.K = K;
  a.norm_w = norm_w, a.norm_eps = 1e-5f, a.bias = static_cast<const float*>(db.p);
  a.n_lora = 1, a.lora[0] = {static_cast<const float*>(du.p), static_cast<const float*>(dB.p), nq * hd, nkv * hd, 8};  // on k
  Dev y_ref(size_t(rows) * N * 4), y_got(size_t(rows) * N * 4);
  // Unfused: the product, then kv_append with the rope.
  a.y = static_cast<float*>(y_ref.p);
  rf::cuda::gemv_rows(a, nullptr);
  rf::cuda::kv_append(k_ref.p, v_ref.p, bf16_cache, static_cast<float*>(y_ref.p), N, nq * hd, (nq + nkv) * hd, tables + 9, tables + 12,
                      tables, tables + 6, rows, nkv, hd, bt, nullptr,
                      rf::cuda::AppendRope{nq, static_cast<const float*>(dc.p), static_cast<const float*>(ds.p), nullptr});
  // Fused.
  a.y = static_cast<float*>(y_got.p);
  a.append = {nq, nkv, hd, bt, static_cast<const float*>(dc.p), static_cast<const float*>(ds.p), k_got.p, v_got.p, bf16_cache,
              tables + 9, tables + 12, tables, tables + 6};
  rf::cuda::gemv_rows(a, nullptr);
  if (ran(what)) {
    long differ = 0;
    const std::vector<float> yr = download<float>(y_ref, size_t(rows) * N), yg = download<float>(y_got, size_t(rows) * N);
    for (size_t i = 0; i < yr.size(); ++i) differ += bits(yr[i]) != bits(yg[i]);
    for (const auto& [r, g] : {std::pair<const Dev*, const Dev*>{&k_ref, &k_got}, {&v_ref, &v_got}}) {
      const std::vector<uint8_t> cr = download<uint8_t>(*r, cache_elems * esize), cg = download<uint8_t>(*g, cache_elems * esize);
      differ += std::memcmp(cr.data(), cg.data(), cr.size()) != 0;
    }
    check(differ == 0, what + ": y and both caches bit-identical to the product then kv_append (" + std::to_string(differ) +
                           " differ)");
  }
}

void test_refusals() {
  Dev d(1 << 16);
  const char* p = static_cast<const char*>(d.p);
  using rf::cuda::gemv_supports;
  check(gemv_supports(p, 0, p, rf::DType::bf16, 1, 64) && gemv_supports(p, 0, p, rf::DType::f32, 8, 4),
        "gemv_supports: 1 to 8 rows of aligned rows");
  check(!gemv_supports(p, 0, p, rf::DType::bf16, 0, 64) && !gemv_supports(p, 0, p, rf::DType::bf16, 9, 64),
        "gemv_supports: refuses 0 and 9 rows");
  check(!gemv_supports(p, 0, p, rf::DType::bf16, 1, 68) && !gemv_supports(p, 66, p, rf::DType::bf16, 1, 64) &&
            !gemv_supports(p + 8, 0, p, rf::DType::bf16, 1, 64) && !gemv_supports(p, 0, p + 4, rf::DType::f32, 1, 64),
        "gemv_supports: refuses rows that are not 16-byte aligned");
  const auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  const float* f = static_cast<const float*>(d.p);
  rf::cuda::GemvArgs a;
  a.x = p, a.w = p, a.rows = 2, a.N = 5, a.K = 64, a.glu = true, a.y = static_cast<float*>(d.p);
  check(throws([&] { rf::cuda::gemv_rows(a, nullptr); }), "gemv_rows: an odd N with glu throws");
  a.glu = false, a.n_lora = 1, a.lora[0] = {f, f, 3, 3, 4};
  check(throws([&] { rf::cuda::gemv_rows(a, nullptr); }), "gemv_rows: an adapter's columns past N throw");
  rf::cuda::GemvDown t[5];
  check(throws([&] { rf::cuda::lora_down_rows(t, 5, f, 0, 1, 64, nullptr); }), "lora_down_rows: five adapters throw");
  check(throws([&] { rf::cuda::lora_down_rows(t, 1, f, 0, rf::cuda::kLoraMaxRows + 1, 64, nullptr); }),
        "lora_down_rows: more than kLoraMaxRows rows throw");
  const rf::cuda::GemvLora up{f, f, 10, 8, 4};
  check(throws([&] { rf::cuda::lora_up_rows(&up, 1, 2, static_cast<float*>(d.p), 16, nullptr); }),
        "lora_up_rows: an adapter's columns past ldy throw");
}

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_gemv: no CUDA device visible; skipped\n");
    return 0;
  }
  rng().seed(20261206);
  for (bool bf16 : {true, false}) {
    test_gemv({bf16, 1, 37, 64});
    test_gemv({bf16, 3, 1001, 80, 8, 0, true});
    test_gemv({bf16, 8, 300, 2048, 0, 5, true, true, false, true, {16, 8, 5}});
    test_gemv({bf16, 5, 300, 8192, 16, 3, false, false, true, true, {16, 1}});
    test_gemv({bf16, 2, 64, 128, 0, 0, true, true, true, false, {4, 4, 2, 1}});
  }
  test_lora_down(1, 2048, {16, 8, 8}, 0);
  test_lora_down(8, 80, {16}, 4);
  test_lora_down(3, 8192, {5, 1, 16, 2}, 0);
  test_lora_down(13, 2048, {16, 4}, 8);  // two groups of rows, the second short
  test_lora_down(64, 128, {8}, 0);
  test_down_norm_rows(20, 2048);
  test_lora_up(1, {16, 8, 8}, {256, 64, 64}, 400);
  test_lora_up(16, {16}, {1000}, 1003);
  test_lora_up(17, {5, 1, 32, 2}, {70, 300, 33, 257}, 700);
  test_lora_up(64, {16, 16}, {512, 512}, 1040);
  for (bool bf16 : {true, false}) {
    test_norm_fused(bf16, 1, 96, 2048, false, {});
    test_norm_fused(bf16, 4, 64, 80, true, {16, 8});
    test_norm_fused(bf16, 8, 200, 8192, false, {16, 4, 1});
  }
  test_norm_fused(true, 1, 2048 * 8 + 40, 64, false, {});  // more outputs than 2048 blocks: a warp takes several
  for (bool bf16_w : {true, false})
    for (bool bf16_cache : {true, false}) test_append(bf16_w, bf16_cache);
  for (bool bf16_w : {true, false}) test_append(bf16_w, false, false);
  test_refusals();
  return rf::test::finish("cuda_gemv");
}
