#include "model/layout.h"

#include <cstdio>
#include <sstream>
#include <stdexcept>

namespace rf {

std::string shape_str(const std::vector<long>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

namespace {

void expect_shape(const std::string& name, const std::vector<long>& got, const std::vector<long>& want) {
  if (got != want)
    throw std::invalid_argument("tensor " + name + " has shape " + shape_str(got) + ", expected " + shape_str(want));
}

// A block's projections in TensorSlot index order: out, in, and whether the config gives it a bias.
struct LinearSpec {
  const char* part;
  long out, in;
  bool bias;
};
void block_linears(const ModelConfig& c, LinearSpec (&out)[4]) {
  const long H = c.hidden, mlp_in_rows = c.act == Activation::silu ? 2L * c.intermediate : c.intermediate;
  out[0] = {"qkv", c.qkv_dim(), H, c.qkv_bias};
  out[1] = {"o", H, c.q_dim(), c.o_bias};
  out[2] = {"mlp_in", mlp_in_rows, H, c.mlp_bias};
  out[3] = {"mlp_out", H, c.intermediate, c.mlp_bias};
}

}  // namespace

TensorSlot parse_tensor_name(const ModelConfig& c, const std::string& name) {
  const long H = c.hidden;
  if (name == "embed") return {TensorSlot::embed, -1, 0, 0, H};
  if (name == "lm_head") {
    if (c.tied_embeddings) throw std::invalid_argument("tensor lm_head given for a model with tied embeddings");
    return {TensorSlot::lm_head, -1, 0, 0, H};
  }
  if (name == "pos_embed") return {TensorSlot::pos_embed, -1, 0, c.max_positions, H};
  if (name == "final_norm.weight") return {TensorSlot::norm_weight, -1, 0, H, 0};
  if (name == "final_norm.bias") return {TensorSlot::norm_bias, -1, 0, H, 0};
  // layers.N.part.kind
  int layer = -1;
  char part[32] = {0}, kind[16] = {0};
  if (std::sscanf(name.c_str(), "layers.%d.%31[a-z_].%15s", &layer, part, kind) != 3 || layer < 0 || layer >= c.n_layers)
    throw std::invalid_argument("unknown tensor name " + name);
  const std::string p = part, k = kind;
  if ((p == "attn_norm" || p == "mlp_norm") && (k == "weight" || k == "bias"))
    return {k == "weight" ? TensorSlot::norm_weight : TensorSlot::norm_bias, layer, p == "attn_norm" ? 0 : 1, H, 0};
  if (c.qk_norm && (p == "q_norm" || p == "k_norm") && k == "weight")
    return {TensorSlot::norm_weight, layer, p == "q_norm" ? 2 : 3, long(c.head_dim), 0};
  LinearSpec linears[4];
  block_linears(c, linears);
  for (int i = 0; i < 4; ++i) {
    const LinearSpec& e = linears[i];
    if (p != e.part) continue;
    if (k == "weight") return {TensorSlot::linear_weight, layer, i, e.out, e.in};
    if (k == "bias") return {TensorSlot::linear_bias, layer, i, e.out, 0};
  }
  throw std::invalid_argument("unknown tensor name " + name);
}

TensorSlot tensor_slot(const ModelConfig& c, const std::string& name, const std::vector<long>& shape, bool src_is_kn) {
  TensorSlot slot = parse_tensor_name(c, name);
  switch (slot.kind) {
    case TensorSlot::embed:
    case TensorSlot::lm_head:
      if (shape.size() != 2 || shape[1] != slot.cols || shape[0] <= 0)
        throw std::invalid_argument("tensor " + name + " has shape " + shape_str(shape) + ", expected [vocab, " +
                                    std::to_string(slot.cols) + "]");
      slot.rows = shape[0];
      break;
    case TensorSlot::pos_embed:
      expect_shape(name, shape, {slot.rows, slot.cols});
      break;
    case TensorSlot::linear_weight:
      expect_shape(name, shape, src_is_kn ? std::vector<long>{slot.cols, slot.rows} : std::vector<long>{slot.rows, slot.cols});
      break;
    default:  // vectors
      expect_shape(name, shape, {slot.rows});
  }
  return slot;
}

void check_tensors(const ModelConfig& c, const std::function<bool(const std::string&)>& loaded) {
  std::vector<std::string> missing;
  const bool layer_norm = c.norm == NormType::layer;
  auto need = [&](const std::string& name) {
    if (!loaded(name)) missing.push_back(name);
  };
  need("embed");
  if (!c.tied_embeddings) need("lm_head");
  if (c.arch == Arch::gpt2) need("pos_embed");
  need("final_norm.weight");
  if (layer_norm) need("final_norm.bias");
  LinearSpec linears[4];
  block_linears(c, linears);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string pre = "layers." + std::to_string(i) + ".";
    for (const char* n : {"attn_norm", "mlp_norm"}) {
      need(pre + n + ".weight");
      if (layer_norm) need(pre + n + ".bias");
    }
    if (c.qk_norm) need(pre + "q_norm.weight"), need(pre + "k_norm.weight");
    for (const LinearSpec& e : linears) {
      need(pre + e.part + ".weight");
      if (e.bias) need(pre + e.part + ".bias");
    }
  }
  if (missing.empty()) return;
  std::string msg = "model weights incomplete, missing:";
  for (size_t i = 0; i < missing.size() && i < 12; ++i) msg += " " + missing[i];
  if (missing.size() > 12) msg += " (and " + std::to_string(missing.size() - 12) + " more)";
  throw std::invalid_argument(msg);
}

LoraSite lora_site(const ModelConfig& c, const std::string& target) {
  struct Named {
    const char* name;
    LoraSite site;
  };
  const long Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate, H = c.hidden;
  const Named gpt2[] = {{"attn.c_attn", {0, 0, 3 * H}}, {"attn.c_proj", {1, 0, H}}, {"mlp.c_fc", {2, 0, I}}, {"mlp.c_proj", {3, 0, H}}};
  const Named llama[] = {{"q_proj", {0, 0, Q}},     {"k_proj", {0, Q, KV}}, {"v_proj", {0, Q + KV, KV}}, {"o_proj", {1, 0, H}},
                         {"gate_proj", {2, 0, I}}, {"up_proj", {2, I, I}}, {"down_proj", {3, 0, H}}};
  const bool is_gpt2 = c.arch == Arch::gpt2;
  const Named* first = is_gpt2 ? gpt2 : llama;
  const int n = is_gpt2 ? 4 : 7;
  for (int i = 0; i < n; ++i)
    if (target == first[i].name) return first[i].site;
  throw std::invalid_argument("no projection named " + target + " in a " + std::string(is_gpt2 ? "GPT-2" : "Llama-family") +
                              " block");
}

}  // namespace rf
