// The engines' shared description of a checkpoint's tensors (Model::load_tensor's names): which
// slot a name fills and the shape it must have, which names a complete model needs, and where
// each LoRA target sits in a block's projections. The CPU engine (model/model.cpp) and the CUDA
// engine (cuda/device_model.cu) each store weights their own way, but read this one map, so a
// name, a shape or an error message cannot drift between them.
//
// Engine tensor names (lib/model/weights-map.ts maps Hugging Face names onto these):
//   embed [vocab, hidden]   pos_embed [positions, hidden]   lm_head [vocab, hidden]
//   final_norm.weight/.bias [hidden]
//   layers.N.{attn_norm,mlp_norm}.weight/.bias [hidden]
//   layers.N.{q_norm,k_norm}.weight [head_dim] (qk_norm: Qwen3)
//   layers.N.{qkv,o,mlp_in,mlp_out}.weight [out, in] (or [in, out] with src_is_kn) and .bias [out]
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"

namespace rf {

struct TensorSlot {
  enum Kind { embed, lm_head, pos_embed, norm_weight, norm_bias, linear_weight, linear_bias } kind;
  int layer = -1;  // the block; -1 outside the blocks (the final norm is a norm of layer -1)
  int index = 0;   // norms: 0 attn_norm, 1 mlp_norm, 2 q_norm, 3 k_norm; linears: 0 qkv, 1 o, 2 mlp_in, 3 mlp_out
  long rows = 0;   // embed / lm_head: the vocabulary; linears: out; vectors: their length
  long cols = 0;   // the hidden size, or a linear's in
};

// The slot `name` fills and the shape it must have (embed and lm_head: rows 0, any vocabulary).
// Throws std::invalid_argument for a name the config has no slot for.
TensorSlot parse_tensor_name(const ModelConfig& c, const std::string& name);

// The same, for `name` given with `shape` (a linear stored [in, out] when src_is_kn). Throws
// std::invalid_argument naming the tensor: an unknown name, a wrong shape, lm_head for a model
// with tied embeddings.
TensorSlot tensor_slot(const ModelConfig& c, const std::string& name, const std::vector<long>& shape, bool src_is_kn);

// Throws std::invalid_argument listing (up to 12 of) the tensors the config needs that
// loaded(name) says are missing.
void check_tensors(const ModelConfig& c, const std::function<bool(const std::string&)>& loaded);

// A LoRA target (PEFT's module name) inside a block: the projection (its index as in
// TensorSlot) and the slice of its output rows it adapts. Throws std::invalid_argument for a
// name the block does not have.
struct LoraSite {
  int index;
  long offset, out;
};
LoraSite lora_site(const ModelConfig& c, const std::string& target);

// "[2, 3]".
std::string shape_str(const std::vector<long>& shape);

}  // namespace rf
