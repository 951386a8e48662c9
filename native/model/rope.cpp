#include "model/rope.h"

#include <cmath>

namespace rf {

std::vector<double> rope_inv_freq(const ModelConfig& c, long max_position) {
  const int half = c.head_dim / 2;
  double base = c.rope_theta;
  if (c.rope_scaling == RopeScaling::dynamic) {
    // _compute_dynamic_ntk_parameters: base *= (factor * seq_len / max_pos - (factor - 1)) ^ (dim / (dim - 2))
    const double seq_len = double(max_position + 1);
    const double max_pos = double(c.rope_original_max_positions);
    if (seq_len > max_pos) {
      const double dim = double(c.head_dim);
      base *= std::pow(c.rope_factor * seq_len / max_pos - (c.rope_factor - 1.0), dim / (dim - 2.0));
    }
  }
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) inv[i] = 1.0 / std::pow(base, double(2 * i) / double(c.head_dim));

  if (c.rope_scaling == RopeScaling::linear) {
    for (double& f : inv) f /= c.rope_factor;
  } else if (c.rope_scaling == RopeScaling::llama3) {
    // _compute_llama3_parameters: long wavelengths are divided by factor, short ones kept,
    // and the band between is interpolated smoothly.
    const double old_ctx = double(c.rope_original_max_positions);
    const double low_wavelen = old_ctx / c.rope_low_freq_factor;
    const double high_wavelen = old_ctx / c.rope_high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / c.rope_factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - c.rope_low_freq_factor) /
                              (c.rope_high_freq_factor - c.rope_low_freq_factor);
        f = (1.0 - smooth) * f / c.rope_factor + smooth * f;
      }
    }
  }
  return inv;
}

void rope_angles(const std::vector<double>& inv_freq, long position, float* cos, float* sin) {
  // transformers forms the angle as float32(inv_freq) * float32(position) in float32; we round
  // the same way so long contexts see the same angles, then take cos/sin accurately.
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const float a = float(inv_freq[i]) * float(position);
    cos[i] = float(std::cos(double(a)));
    sin[i] = float(std::sin(double(a)));
  }
}

}  // namespace rf
