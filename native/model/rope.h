// Rotary-embedding frequency tables, following transformers' modeling_rope_utils.py.
#pragma once
#include <vector>

#include "model/config.h"

namespace rf {

// inv_freq [head_dim / 2] for a forward pass whose largest position is max_position.
// Only dynamic NTK scaling depends on max_position: transformers recomputes the base
// when max_position + 1 exceeds max_position_embeddings (for a model that has not seen
// a longer sequence before; we model that stateless behaviour per sequence).
std::vector<double> rope_inv_freq(const ModelConfig& c, long max_position);

// cos/sin tables [head_dim / 2] for one position.
void rope_angles(const std::vector<double>& inv_freq, long position, float* cos, float* sin);

}  // namespace rf
