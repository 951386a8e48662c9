// Fused red-flag training loss (arXiv 2502.16366): forward and backward of the three loss
// terms over the LM head in ONE streaming pass over the vocabulary, never materialising the
// [rows x vocab] logits.
//
// Inputs are the final hidden states (after the final norm) at the scored positions:
//   h     [N, H]   trained model (adapter on), one row per RfLossRow
//   h_ref [Nr, H]  reference model (adapter off), the rows KL rows point at
//   W     [V, H]   the frozen LM head, packed (f32 or bf16)
//   w_rf  [K, H]   the TRAINABLE f32 head rows of the K flag tokens f_0 .. f_K-1 (one red-flag
//                  token rf, or one per risk category). The trained model's logits use W* = W
//                  with row f_k replaced by w_rf[k]; the reference model's use W itself.
// A red_flag row trains the flag its `flag` field names (p_j below is p_theta(f_flag | row j));
// a KL row compares the whole distributions, flags included.
// Loss terms (each a mean over its rows / groups in the call; total = weighted sum):
//   benign    mean over benign_kl rows of KL(p_ref || p_theta) = sum_v p_ref,v (log p_ref,v - log p_theta,v)
//   red_flag  mean over groups g (the red_flag rows sharing a group id) of
//               any:    -log(1 - prod_j (1 - p_j)),  p_j = p_theta(rf | row j)   (noisy-OR)
//               mean:   mean_j -log p_j
//               single: -log p_j of the group's only row (a group must have exactly one row)
//   after     mean over after_kl rows of the same KL (its reference row is the text without <rf>)
//   total     alpha_benign * benign + alpha_rf * red_flag + alpha_after * after
// A term with no rows (groups) is 0 and contributes no gradient.
//
// Numerics. Logits of the streamed vocabulary are h . W_v computed by gemm(): with bf16 W on
// the AVX-512 path that multiplies the bf16-rounded h (kernels/gemm.h); the rf logits are f32
// dot products of the unrounded rows (h . w_rf, h_ref . W_rf), and gradients treat that
// rounding as the identity. Every per-row scalar (log-sum-exp, log p_rf, log(1 - p_rf), group
// products) is formed in float64 in log space from f32 softmax sums of the unrounded p, so
// p_rf near 0 or 1 and large groups are exact to f32 logit precision. The softmax-weighted
// sums P = sum_{v != rf} p_v W_v (whence dh, and the KL values) accumulate in f32; with bf16 W
// on AVX-512 they multiply p_v rounded to bf16 (vdpbf16ps, whose bf16 products are exact in
// f32): p_v (1 + e_v), |e_v| <= 2^-8, rms about 2^-9. That gives up no accuracy the logits
// have not given up already: rounding h to bf16 (the same relative 2^-9) moves each logit by
// delta_h . W_v, i.e. each p_v by a relative 2^-9 times the logits' spread, more than rounding p
// itself once logits spread over more than a unit (an LM head's: several), and independently
// for p_theta and p_ref, so on their difference p_theta - p_ref (the KL gradient) too. In
// test_rf_loss (logit spread 2.5) rounding p moves dh by a relative 1e-4 to 1e-3, rounding h
// by 1e-3 to 6e-3. p_rf, the red-flag term and dw_rf never see p rounded. The AVX2 path
// (which widens bf16 W) and f32 W keep p f32.
//
// Cost: (N + Nr) x V x H multiply-adds for the logits plus as many for the softmax-weighted
// sums back through W, both at gemm speed: f32 FMAs for f32 W (and for bf16 W on AVX2),
// bf16 dot products (vdpbf16ps, twice the f32 FMA rate) for bf16 W on AVX-512. So the floor
// is 2 (N + Nr) / N times one plain gemm of the N rows with the same W: 3.5x with Nr = 3N/4,
// for either dtype.
// Scratch: Nr x H floats (the reference rows' sums) + 2 x chunk x H elements (the current and
// next chunk of W, transposed: f32, or bf16 for bf16 W on AVX-512) + threads x 48 x chunk
// floats (P, rounded to bf16 in place for the bf16 sums); dh holds the trained rows' sums
// during the pass. rf_loss runs parallel regions on pool, so it must not be called from
// inside one of that pool's regions.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/threadpool.h"
#include "kernels/gemm.h"

namespace rf {

enum class RfLossKind : int32_t { benign_kl = 0, red_flag = 1, after_kl = 2 };
enum class RfAggregation : int32_t { any = 0, mean = 1, single = 2 };

// One scored row of h.
struct RfLossRow {
  RfLossKind kind = RfLossKind::benign_kl;
  int32_t ref_row = -1;  // KL kinds: row of h_ref holding the reference state (several rows may share one)
  int32_t group = -1;    // red_flag: group id (any int >= 0; one harmful conversation's positions)
  int32_t flag = 0;      // red_flag: the flag it trains, an index into the options' flags
};

struct RfLossOptions {
  int rf_token = -1;                                // the red-flag token id, in [0, V) (K = 1)
  std::vector<int> flag_tokens;                     // or K >= 1 distinct flag token ids (then rf_token is unused)
  RfAggregation aggregation = RfAggregation::any;
  float alpha_benign = 1.f, alpha_rf = 1.f, alpha_after = 1.f;
  int chunk = 0;                                    // vocabulary rows per chunk (rounded up to 32);
                                                    // 0: auto, min(1024, 4 MB / (4 H)) (512 for H = 2048)
};

struct RfLossResult {
  double benign = 0, red_flag = 0, after = 0;       // unweighted term means
  double total = 0;                                 // with the alphas
  int n_benign_rows = 0, n_groups = 0, n_after_rows = 0;
  size_t scratch_bytes = 0;                         // peak scratch this call allocated (not counting gemm's own)
};

}  // namespace rf

// The per-instruction-set implementation (native/kernels/rf_loss.cpp); rf::rf_loss
// (native/dispatch/rf_loss.cpp) forwards to the active one.
#define RF_DECLARE_RF_LOSS_KERNELS                                                                   \
  /* Computes the loss terms and their gradients, with the alphas applied:                          \
       dh    [N, H]  written:      dL/dh                                                             \
       dw_rf [K, H]  accumulated:  += dL/dw_rf                                                       \
     Throws std::invalid_argument on inconsistent shapes, ids or row descriptions. */               \
  rf::RfLossResult rf_loss(rf::ThreadPool& pool, const float* h, int N, const float* h_ref, int Nr,  \
                           int H, const rf::PackedWeight& W, const float* w_rf,                      \
                           const rf::RfLossRow* rows, const rf::RfLossOptions& options, float* dh,   \
                           float* dw_rf);

namespace rf {
namespace avx2 { RF_DECLARE_RF_LOSS_KERNELS }
namespace avx512 { RF_DECLARE_RF_LOSS_KERNELS }
RF_DECLARE_RF_LOSS_KERNELS  // rf::rf_loss: dispatch to the active instruction set
}  // namespace rf
