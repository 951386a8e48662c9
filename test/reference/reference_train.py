"""Float64 PyTorch autograd reference of ONE red-flag training step (arXiv 2502.16366).

Independent of the native trainer (native/model/train.cpp) and of transformers/peft: the
model forward is reference.py's (`DecoderLM` / `GPT2LM`, which re-implement the
transformers modeling code), with

  * LoRA as PEFT applies it (peft/tuners/lora/layer.py: Linear.forward):
        result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling
    lora_A.weight A [rank, in], lora_B.weight B [out, rank], scaling = lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora; dropout is 0 here (identity). A module is adapted
    when a target name equals its full dotted name or is a suffix of it after a '.'
    (peft/tuners/tuners_utils.py: check_target_module_exists). On GPT-2's Conv1D (weight
    [in, out], fan_in_fan_out) PEFT uses in = weight.shape[0], out = weight.shape[1]: the
    adapter adds the same x A^T B^T * scaling to x W + b.
    The adapters are attached by wrapping reference.py's `_linear` / `_mm` for the duration
    of one forward: when the weight multiplied is an adapted module's weight (by object
    identity), the LoRA term is added to the product. Each adapter must fire exactly once per
    layer and forward (checked).
  * the red-flag token rf: the trained model's input-embedding row rf and LM-head row rf are
    replaced by trainable rows (tied embeddings: ONE row serves as both). The reference model
    (for the KL terms) is the base model: adapters off, its own rows.
  * full fine-tuning: every model tensor (HF names) is a float64 leaf requiring grad; tied
    heads accumulate both uses into the embedding's gradient.

Loss (native/kernels/rf_loss.h, native/model/train.h). Loss rows index rows of the trained
batch, its sequences concatenated (row r of a sequence is the next-token distribution after
its token r); KL rows name a row of the reference batch (concatenated likewise):
    benign   mean over benign_kl rows of KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta)
    red_flag mean over groups (red_flag rows sharing a group id) of
               any:    -log(1 - prod_j (1 - p_j)),  p_j = p_theta(rf | row j)
               mean:   mean_j -log p_j
               single: -log p_j (the group's only row)
    after    mean over after_kl rows of the same KL
    ce       mean over ce rows of -log p_theta(target)
    total    alpha_benign benign + alpha_rf red_flag + alpha_after after + alpha_ce ce
A term without rows (groups) is 0. p_theta uses the trained head row for rf; p_ref the base
model's own row. Everything is float64.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

F64 = torch.float64

KIND_BENIGN_KL, KIND_RED_FLAG, KIND_AFTER_KL, KIND_CE = 0, 1, 2, 3
KIND_NAMES = {0: "benign_kl", 1: "red_flag", 2: "after_kl", 3: "ce"}

LLAMA_SITES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GPT2_SITES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def is_gpt2(config: dict) -> bool:
    return config.get("model_type") == "gpt2"


def n_layers(config: dict) -> int:
    return int(config["n_layer"] if is_gpt2(config) else config["num_hidden_layers"])


def tied(config: dict) -> bool:
    # GPT2LMHeadModel always ties lm_head to wte; Llama-family per tie_word_embeddings.
    return True if is_gpt2(config) else bool(config.get("tie_word_embeddings", False))


def peft_target_matches(module_name: str, target: str) -> bool:
    """peft/tuners/tuners_utils.py: check_target_module_exists for a list of strings:
    key == target or key.endswith("." + target)."""
    return module_name == target or module_name.endswith("." + target)


def hf_module_name(config: dict, layer: int, site: str) -> str:
    """Full dotted module name in the HF model (what PEFT matches targets against)."""
    if is_gpt2(config):
        return f"transformer.h.{layer}.{site}"
    return f"model.layers.{layer}.{site}"


def lora_sites(config: dict, targets: Sequence[str]) -> List[Tuple[int, str]]:
    """(layer, site) of every adapted module, in layer order then the block's module order."""
    sites = GPT2_SITES if is_gpt2(config) else LLAMA_SITES
    out = []
    used = set()
    for layer in range(n_layers(config)):
        for site in sites:
            hits = [t for t in targets if peft_target_matches(hf_module_name(config, layer, site), t)]
            if hits:
                out.append((layer, site))
                used.update(hits)
    unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no module")
    return out


def lora_name(layer: int, site: str, which: str) -> str:
    """Engine parameter name of an adapter matrix (native/model/train.cpp)."""
    return f"layers.{layer}.{site}.{which}"


def _site_weight(model, config: dict, layer: int, site: str) -> torch.Tensor:
    """The tensor object reference.py's forward multiplies by for this module."""
    if is_gpt2(config):
        return model.blocks[layer][site + ".weight"]
    short = site.split(".", 1)[1]
    return model.layers[layer][short]


def lora_shapes(config: dict, tensors: Dict[str, torch.Tensor], rank: int, targets: Sequence[str]) -> List[Tuple[str, List[int]]]:
    """[(engine name, shape)] of the adapter matrices, A before B, in engine order."""
    t = ref.normalize_gpt2_keys(tensors) if is_gpt2(config) else tensors
    out = []
    for layer, site in lora_sites(config, targets):
        if is_gpt2(config):
            w = t[f"h.{layer}.{site}.weight"]  # Conv1D [in, out]
            fin, fout = int(w.shape[0]), int(w.shape[1])
        else:
            w = t[f"model.layers.{layer}.{site}.weight"]  # Linear [out, in]
            fout, fin = int(w.shape[0]), int(w.shape[1])
        out.append((lora_name(layer, site, "lora_A"), [rank, fin]))
        out.append((lora_name(layer, site, "lora_B"), [fout, rank]))
    return out


class _LoraPatch:
    """Wraps reference.py's `_linear` and `_mm` so that a product with an adapted weight gets
    + (x A^T) B^T * scaling (PEFT: lora_B(lora_A(dropout(x))) * scaling, dropout = identity)."""

    def __init__(self, adapters: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]]):
        self.adapters = adapters  # (weight object, A, B, scaling, name)
        self.hits: Dict[str, int] = {a[4]: 0 for a in adapters}

    def _find(self, w):
        for a in self.adapters:
            if w is a[0]:
                return a
        return None

    def __enter__(self):
        self.orig_linear, self.orig_mm = ref._linear, ref._mm
        orig_linear, orig_mm = self.orig_linear, self.orig_mm

        def linear(x, w, b):
            y = orig_linear(x, w, b)
            a = self._find(w)
            if a is not None:
                self.hits[a[4]] += 1
                y = y + (x @ a[1].t()) @ a[2].t() * a[3]
            return y

        def mm(x, w):
            y = orig_mm(x, w)
            a = self._find(w)
            if a is not None:  # GPT-2 Conv1D: x @ W [in, out]
                self.hits[a[4]] += 1
                y = y + (x @ a[1].t()) @ a[2].t() * a[3]
            return y

        ref._linear, ref._mm = linear, mm
        return self

    def __exit__(self, *exc):
        ref._linear, ref._mm = self.orig_linear, self.orig_mm
        return False


def _replace_row(table: torch.Tensor, row: int, value: torch.Tensor) -> torch.Tensor:
    """`table` with row `row` replaced by `value` (differentiable in `value`)."""
    return torch.cat((table[:row], value.reshape(1, -1), table[row + 1:]), dim=0)


def _set_rf_rows(model, config: dict, rf_token: int, embed_row: torch.Tensor, head_row: Optional[torch.Tensor]) -> None:
    if is_gpt2(config):
        e = _replace_row(model.wte, rf_token, embed_row)
        model.wte = e
        model.lm_head = e  # tied
        return
    e = _replace_row(model.embed, rf_token, embed_row)
    model.embed = e
    model.lm_head = e if tied(config) else _replace_row(model.lm_head, rf_token, head_row)


def _logits(model, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Concatenated logits [sum T, V] of fresh forwards (positions from 0) of each sequence."""
    return torch.cat([model.forward(torch.tensor(list(s), dtype=torch.int64)) for s in seqs], dim=0)


def loss_terms(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], rows: Sequence[Sequence[int]],
               rf_token: int, aggregation: str, alphas: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """The loss terms (module docstring) from the trained and reference logits (float64)."""
    logp = torch.log_softmax(logits, dim=-1)
    zero = logits.new_zeros(())
    benign, after, ce = [], [], []
    groups: Dict[int, List[torch.Tensor]] = {}
    ref_logp = torch.log_softmax(ref_logits, dim=-1) if ref_logits is not None else None
    for kind, row, ref_row, group, target in rows:
        if kind in (KIND_BENIGN_KL, KIND_AFTER_KL):
            lr = ref_logp[ref_row]
            kl = (lr.exp() * (lr - logp[row])).sum()
            (benign if kind == KIND_BENIGN_KL else after).append(kl)
        elif kind == KIND_RED_FLAG:
            groups.setdefault(group, []).append(logp[row, rf_token])
        elif kind == KIND_CE:
            ce.append(-logp[row, target])
        else:
            raise ValueError(f"unknown loss row kind {kind}")
    rf_terms = []
    for g in sorted(groups):
        lps = torch.stack(groups[g])
        if aggregation == "any":
            # -log(1 - prod(1 - p_j)); log(1 - p_j) = log1p(-exp(log p_j))
            s = torch.log1p(-lps.exp()).sum()
            rf_terms.append(-torch.log(-torch.expm1(s)))
        elif aggregation == "mean":
            rf_terms.append(-lps.mean())
        elif aggregation == "single":
            if lps.numel() != 1:
                raise ValueError("aggregation 'single' needs exactly one row per group")
            rf_terms.append(-lps[0])
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}")

    def mean(xs):
        return torch.stack(xs).mean() if xs else zero

    t = {"benign": mean(benign), "red_flag": mean(rf_terms), "after": mean(after), "ce": mean(ce)}
    t["total"] = (alphas["benign"] * t["benign"] + alphas["red_flag"] * t["red_flag"]
                  + alphas["after"] * t["after"] + alphas["ce"] * t["ce"])
    return t


TERM_ORDER = ["benign", "red_flag", "after", "ce", "total"]


def train_step_lora(tensors: Dict[str, torch.Tensor], config: dict, *, rank: int, alpha: float, rslora: bool,
                    targets: Sequence[str], rf_token: int, values: Dict[str, torch.Tensor],
                    sequences, reference, rows, aggregation: str, alphas: Dict[str, float]):
    """One LoRA step. `values`: engine name -> value of every adapter matrix and of `rf.embed`
    (and `rf.head` when untied) when rf_token >= 0. Returns (terms {name: float},
    grads {engine name: float64 tensor}) with the gradient of `total`."""
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    base = {k: v.to(F64) for k, v in tensors.items()}
    leaves = {k: v.detach().to(F64).clone().requires_grad_(True) for k, v in values.items()}

    model = ref.build_model(base, config, F64)
    adapters = []
    for layer, site in lora_sites(config, targets):
        a, b = lora_name(layer, site, "lora_A"), lora_name(layer, site, "lora_B")
        adapters.append((_site_weight(model, config, layer, site), leaves[a], leaves[b], scaling, f"{layer}.{site}"))
    expected_names = {n for n, _ in lora_shapes(config, tensors, rank, targets)}
    if rf_token >= 0:
        expected_names.add("rf.embed")
        if not tied(config):
            expected_names.add("rf.head")
        _set_rf_rows(model, config, rf_token, leaves["rf.embed"], leaves.get("rf.head"))
    if expected_names != set(leaves):
        raise ValueError(f"values hold {sorted(leaves)}, expected {sorted(expected_names)}")

    with _LoraPatch(adapters) as patch:
        logits = _logits(model, sequences)
    for name, n in patch.hits.items():
        if n != len(sequences):
            raise AssertionError(f"adapter {name} applied {n} times for {len(sequences)} forwards")

    needs_ref = any(r[0] in (KIND_BENIGN_KL, KIND_AFTER_KL) for r in rows)
    ref_logits = None
    if needs_ref:
        with torch.no_grad():
            ref_logits = _logits(ref.build_model(base, config, F64), reference)  # base model
    terms = loss_terms(logits, ref_logits, rows, rf_token, aggregation, alphas)
    terms["total"].backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach() for k, v in leaves.items()}
    return {k: float(v) for k, v in terms.items()}, grads


def train_step_full(tensors: Dict[str, torch.Tensor], config: dict, *, sequences, rows, alphas: Dict[str, float],
                    rf_token: int = -1, aggregation: str = "any"):
    """One full fine-tuning step (no reference model: ce and red_flag rows only). Every HF
    tensor of `tensors` (legacy GPT-2 buffers excepted) is a parameter. Returns (terms, grads
    {HF name: float64 tensor})."""
    leaves = {}
    for k, v in tensors.items():
        kk = k[len("transformer."):] if k.startswith("transformer.") else k
        if is_gpt2(config) and (kk.endswith(".attn.bias") or kk.endswith(".attn.masked_bias")):
            continue
        leaves[k] = v.detach().to(F64).clone().requires_grad_(True)
    # build_model's .to(float64) of a float64 tensor is the tensor itself, so the model's
    # weights are these leaves (tied heads included).
    model = ref.build_model(leaves, config, F64)
    if any(r[0] in (KIND_BENIGN_KL, KIND_AFTER_KL) for r in rows):
        raise ValueError("KL rows need a reference model: LoRA mode")
    logits = _logits(model, sequences)
    terms = loss_terms(logits, None, rows, rf_token, aggregation, alphas)
    terms["total"].backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach() for k, v in leaves.items()}
    return {k: float(v) for k, v in terms.items()}, grads


def engine_full_layout(t: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """HF tensors (values or gradients) -> the engine's full fine-tuning parameters
    (native/model/train.cpp), in the engine's layout:
      embed [V, H]; lm_head [V, H] (untied only); pos_embed [P * H] (GPT-2; flat);
      final_norm.weight / .bias; layers.L.{attn_norm, mlp_norm}.weight / .bias;
      layers.L.qkv.weight = q_proj, k_proj, v_proj rows stacked [q + 2 kv, H]
                            (GPT-2: c_attn.weight^T [3H, H]); .bias likewise;
      layers.L.o.weight   = o_proj [H, q] (GPT-2: attn.c_proj.weight^T);
      layers.L.mlp_in.weight = gate_proj rows then up_proj rows [2I, H] (GPT-2: c_fc.weight^T [I, H]);
      layers.L.mlp_out.weight = down_proj [H, I] (GPT-2: mlp.c_proj.weight^T); biases likewise;
      layers.L.{q_norm, k_norm}.weight = self_attn.q_norm / k_norm [head_dim] (Qwen3)."""
    out: Dict[str, torch.Tensor] = {}
    if is_gpt2(config):
        g = ref.normalize_gpt2_keys(t)
        out["embed"] = g["wte.weight"]
        out["pos_embed"] = g["wpe.weight"].reshape(-1)
        out["final_norm.weight"] = g["ln_f.weight"]
        out["final_norm.bias"] = g["ln_f.bias"]
        for layer in range(n_layers(config)):
            p, q = f"h.{layer}.", f"layers.{layer}."
            out[q + "attn_norm.weight"] = g[p + "ln_1.weight"]
            out[q + "attn_norm.bias"] = g[p + "ln_1.bias"]
            out[q + "mlp_norm.weight"] = g[p + "ln_2.weight"]
            out[q + "mlp_norm.bias"] = g[p + "ln_2.bias"]
            for eng, hf in (("qkv", "attn.c_attn"), ("o", "attn.c_proj"), ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
                out[q + eng + ".weight"] = g[p + hf + ".weight"].t()
                out[q + eng + ".bias"] = g[p + hf + ".bias"]
        if "lm_head.weight" in g:
            raise ValueError("GPT-2 with a separate lm_head.weight is not handled")
    else:
        out["embed"] = t["model.embed_tokens.weight"]
        if not tied(config):
            out["lm_head"] = t["lm_head.weight"]
        out["final_norm.weight"] = t["model.norm.weight"]
        for layer in range(n_layers(config)):
            p, q = f"model.layers.{layer}.", f"layers.{layer}."
            out[q + "attn_norm.weight"] = t[p + "input_layernorm.weight"]
            out[q + "mlp_norm.weight"] = t[p + "post_attention_layernorm.weight"]
            for n in ("q_norm", "k_norm"):
                if p + f"self_attn.{n}.weight" in t:
                    out[q + n + ".weight"] = t[p + f"self_attn.{n}.weight"]
            groups = (("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), ("o", ["self_attn.o_proj"]),
                      ("mlp_in", ["mlp.gate_proj", "mlp.up_proj"]), ("mlp_out", ["mlp.down_proj"]))
            for eng, parts in groups:
                out[q + eng + ".weight"] = torch.cat([t[p + s + ".weight"] for s in parts], dim=0)
                if p + parts[0] + ".bias" in t:
                    out[q + eng + ".bias"] = torch.cat([t[p + s + ".bias"] for s in parts], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def engine_full_order(config: dict, names: Sequence[str]) -> List[str]:
    """The engine's parameter order (native/model/train.cpp, full mode): per layer qkv, o,
    mlp_in, mlp_out (weight then bias), attn_norm w/b, mlp_norm w/b, q_norm, k_norm; then final_norm w/b,
    embed, lm_head, pos_embed."""
    order = []
    for layer in range(n_layers(config)):
        q = f"layers.{layer}."
        for eng in ("qkv", "o", "mlp_in", "mlp_out"):
            order += [q + eng + ".weight", q + eng + ".bias"]
        order += [q + "attn_norm.weight", q + "attn_norm.bias", q + "mlp_norm.weight", q + "mlp_norm.bias",
                  q + "q_norm.weight", q + "k_norm.weight"]
    order += ["final_norm.weight", "final_norm.bias", "embed", "lm_head", "pos_embed"]
    present = set(names)
    out = [n for n in order if n in present]
    if set(out) != present:
        raise ValueError(f"unexpected names {sorted(present - set(out))}")
    return out
