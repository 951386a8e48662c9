#!/usr/bin/env python3
"""Generate the tiny Hugging Face-format model fixtures in test/fixtures/models/.

    /usr/bin/python3 test/reference/make_fixtures.py [--out DIR]

Deterministic: weights come from numpy's legacy RandomState (a bit stream numpy
guarantees stable), seeded from the fixture name; running twice gives byte-identical
files. Needs torch (Debian python3-torch 1.13 is enough) and numpy; never transformers.

Each fixture folder holds what `save_pretrained` writes: config.json,
generation_config.json and model.safetensors (or shards + model.safetensors.index.json),
plus reference.safetensors with the expected outputs:
    ids.<case>     I64 [T]          token ids (random in [0, vocab))
    logits.<case>  F32 [T, vocab]   logits of a fresh, cache-less forward over ids
                                    (positions 0..T-1), computed by reference.py in
                                    float64 from the stored weights upcast, rounded to f32
  and for llama-rope-dynamic additionally
    logits_cached.<case> F32 [T, vocab]  logits as produced by generation with a KV
                                    cache (prefill of `cached_prefill` tokens, then one
                                    token per forward), see README.md.
  __metadata__: format=pt, cases=<comma list>, compute=float64, plus notes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from typing import Dict, List, Optional

import numpy as np
import torch

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "test", "fixtures", "models")

# Cosmetic: transformers writes its version into config.json / generation_config.json.
# These files were NOT written by transformers; loaders must ignore the field anyway.
TRANSFORMERS_VERSION = "4.47.1"


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------


class Rng:
    def __init__(self, name: str):
        self.rs = np.random.RandomState(zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)

    def normal(self, shape, std: float) -> torch.Tensor:
        return torch.from_numpy(self.rs.standard_normal(size=shape) * std)

    def uniform(self, shape, lo: float, hi: float) -> torch.Tensor:
        return torch.from_numpy(self.rs.uniform(lo, hi, size=shape))

    def ids(self, n: int, vocab: int) -> torch.Tensor:
        return torch.from_numpy(self.rs.randint(0, vocab, size=n).astype(np.int64))


def json_dump(path: str, obj) -> None:
    # transformers: PretrainedConfig.to_json_string / GenerationConfig.to_json_string ->
    # json.dumps(d, indent=2, sort_keys=True) + "\n"; the shard index likewise.
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def to_storage(tensors: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Round the float64 master weights to the stored dtype (round-to-nearest-even)."""
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------
# weight generators
# ----------------------------------------------------------------------------------


def llama_like_weights(rng: Rng, c: dict) -> Dict[str, torch.Tensor]:
    """HF names for LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM."""
    H = c["hidden_size"]
    I = c["intermediate_size"]
    nh = c["num_attention_heads"]
    nkv = c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    V = c["vocab_size"]
    mt = c["model_type"]
    tied = c.get("tie_word_embeddings", False)
    if mt == "llama":
        qkv_bias = o_bias = c.get("attention_bias", False)
        mlp_bias = c.get("mlp_bias", False)
    elif mt == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif mt == "qwen3":
        qkv_bias = o_bias = c.get("attention_bias", False)
        mlp_bias = False
    else:
        qkv_bias = o_bias = mlp_bias = False

    t: Dict[str, torch.Tensor] = {}
    t["model.embed_tokens.weight"] = rng.normal((V, H), 0.6 if tied else 1.0)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rng.uniform((H,), 0.8, 1.2)
        # q/k gain 1.6 -> attention scores with std ~2.5: sharp, position-dependent attention
        t[p + "self_attn.q_proj.weight"] = rng.normal((nh * hd, H), 1.6 / H ** 0.5)
        t[p + "self_attn.k_proj.weight"] = rng.normal((nkv * hd, H), 1.6 / H ** 0.5)
        t[p + "self_attn.v_proj.weight"] = rng.normal((nkv * hd, H), 1.0 / H ** 0.5)
        t[p + "self_attn.o_proj.weight"] = rng.normal((H, nh * hd), 1.0 / (nh * hd) ** 0.5)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = rng.normal((nh * hd,), 0.3)
            t[p + "self_attn.k_proj.bias"] = rng.normal((nkv * hd,), 0.3)
            t[p + "self_attn.v_proj.bias"] = rng.normal((nkv * hd,), 0.3)
        if o_bias:
            t[p + "self_attn.o_proj.bias"] = rng.normal((H,), 0.2)
        t[p + "post_attention_layernorm.weight"] = rng.uniform((H,), 0.8, 1.2)
        t[p + "mlp.gate_proj.weight"] = rng.normal((I, H), 1.2 / H ** 0.5)
        t[p + "mlp.up_proj.weight"] = rng.normal((I, H), 1.0 / H ** 0.5)
        t[p + "mlp.down_proj.weight"] = rng.normal((H, I), 1.0 / I ** 0.5)
        if mlp_bias:
            t[p + "mlp.gate_proj.bias"] = rng.normal((I,), 0.2)
            t[p + "mlp.up_proj.bias"] = rng.normal((I,), 0.2)
            t[p + "mlp.down_proj.bias"] = rng.normal((H,), 0.2)
        if mt == "qwen3":
            # Drawn last in the layer, so no other fixture's weights move. Wider than the block
            # norms' range: the per-head norm weights set the attention's sharpness.
            t[p + "self_attn.q_norm.weight"] = rng.uniform((hd,), 0.5, 2.0)
            t[p + "self_attn.k_norm.weight"] = rng.uniform((hd,), 0.5, 2.0)
    t["model.norm.weight"] = rng.uniform((H,), 0.8, 1.2)
    if not tied:
        t["lm_head.weight"] = rng.normal((V, H), 3.0 / H ** 0.5)
    return t


def gpt2_weights(rng: Rng, c: dict, prefix: str, legacy_bias: bool) -> Dict[str, torch.Tensor]:
    """HF names for GPT2LMHeadModel (prefix "transformer.") or the original GPT2Model
    checkpoint layout (prefix ""), Conv1D weights stored [in, out]."""
    E = c["n_embd"]
    V = c["vocab_size"]
    P = c["n_positions"]
    inner = c.get("n_inner") or 4 * E
    t: Dict[str, torch.Tensor] = {}
    t[prefix + "wte.weight"] = rng.normal((V, E), 0.6)
    t[prefix + "wpe.weight"] = rng.normal((P, E), 0.4)
    for i in range(c["n_layer"]):
        p = f"{prefix}h.{i}."
        t[p + "ln_1.weight"] = rng.uniform((E,), 0.8, 1.2)
        t[p + "ln_1.bias"] = rng.normal((E,), 0.1)
        if legacy_bias:
            # legacy causal-mask buffer of the original checkpoint: tril(ones) [1, 1, P, P]
            t[p + "attn.bias"] = torch.tril(torch.ones(P, P, dtype=torch.float64)).view(1, 1, P, P)
        w_qk = rng.normal((E, 2 * E), 1.6 / E ** 0.5)
        w_v = rng.normal((E, E), 1.0 / E ** 0.5)
        t[p + "attn.c_attn.weight"] = torch.cat((w_qk, w_v), dim=1)  # [in, 3*E] = q | k | v
        t[p + "attn.c_attn.bias"] = rng.normal((3 * E,), 0.2)
        t[p + "attn.c_proj.weight"] = rng.normal((E, E), 1.0 / E ** 0.5)
        t[p + "attn.c_proj.bias"] = rng.normal((E,), 0.1)
        t[p + "ln_2.weight"] = rng.uniform((E,), 0.8, 1.2)
        t[p + "ln_2.bias"] = rng.normal((E,), 0.1)
        t[p + "mlp.c_fc.weight"] = rng.normal((E, inner), 1.2 / E ** 0.5)
        t[p + "mlp.c_fc.bias"] = rng.normal((inner,), 0.2)
        t[p + "mlp.c_proj.weight"] = rng.normal((inner, E), 1.0 / inner ** 0.5)
        t[p + "mlp.c_proj.bias"] = rng.normal((E,), 0.1)
    t[prefix + "ln_f.weight"] = rng.uniform((E,), 0.8, 1.2)
    t[prefix + "ln_f.bias"] = rng.normal((E,), 0.1)
    return t


# ----------------------------------------------------------------------------------
# configs (fields as transformers' to_dict() writes them for these model classes)
# ----------------------------------------------------------------------------------


def llama_config(**kw) -> dict:
    c = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }
    c.update(kw)
    return c


def mistral_config(**kw) -> dict:
    c = {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "mistral",
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }
    c.update(kw)
    return c


def qwen2_config(**kw) -> dict:
    c = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 3,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
    }
    c.update(kw)
    return c


def qwen3_config(**kw) -> dict:
    # Qwen2's config plus the keys Qwen3Config adds (key order is sorted when written).
    return qwen2_config(**{
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "sliding_window": None,
        **kw,
    })


def gpt2_config(**kw) -> dict:
    c = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_inner": None,
        "n_layer": 2,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }
    c.update(kw)
    return c


def generation_config(bos, eos, pad=None) -> dict:
    g = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
         "transformers_version": TRANSFORMERS_VERSION}
    if pad is not None:
        g["pad_token_id"] = pad
    return g


# ----------------------------------------------------------------------------------
# the fixtures
# ----------------------------------------------------------------------------------

FIXTURES: List[dict] = [
    dict(
        name="llama-gqa",
        doc="LlamaForCausalLM, 4 heads / 2 KV heads (GQA), untied lm_head, default RoPE; "
            "config.json has no head_dim (derive hidden_size / num_attention_heads).",
        config=llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, vocab_size=256),
        gen=generation_config(1, 2),
        lengths=[1, 7, 20],
    ),
    dict(
        name="llama3-rope-tied",
        doc="LlamaForCausalLM with explicit head_dim 16 != hidden/heads (48/4 = 12), tied "
            "embeddings (no lm_head.weight stored), llama3 rope_scaling; with rope_theta 1e4 and "
            "original_max_position_embeddings 256 the 8 frequencies split 3 unscaled "
            "(wavelen < 64), 1 smoothed (wavelen 198.7), 4 divided by factor (wavelen > 256).",
        config=llama_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                            vocab_size=192, tie_word_embeddings=True, bos_token_id=1,
                            eos_token_id=[2, 5],
                            rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                          "original_max_position_embeddings": 256, "rope_type": "llama3"}),
        gen=generation_config(1, [2, 5]),
        lengths=[1, 7, 20],
    ),
    dict(
        name="llama-rope-linear",
        doc="LlamaForCausalLM, MHA (4 heads = 4 KV heads), old-style rope_scaling "
            "{\"type\": \"linear\", \"factor\": 2.0}, attention_bias and mlp_bias true "
            "(q/k/v/o and gate/up/down biases stored).",
        config=llama_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=12, max_position_embeddings=64,
                            vocab_size=192, attention_bias=True, mlp_bias=True,
                            rope_scaling={"factor": 2.0, "type": "linear"}),
        gen=generation_config(1, 2, pad=0),
        lengths=[1, 7, 20],
    ),
    dict(
        name="llama-rope-dynamic",
        doc="LlamaForCausalLM, 4 heads / 1 KV head (MQA), rope_scaling {rope_type: dynamic, "
            "factor: 2.0}, max_position_embeddings 16: the t20 full forward uses the NTK base "
            "recomputed for seq_len 20, t16 and shorter use the plain base; logits_cached.t20 is "
            "cached generation (prefill 7, then 1 token per step).",
        config=llama_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=12, max_position_embeddings=16,
                            vocab_size=192, rope_scaling={"factor": 2.0, "rope_type": "dynamic"}),
        gen=generation_config(1, 2),
        lengths=[1, 7, 16, 20],
        cached={"t20": 7},
    ),
    dict(
        name="llama-bf16-sharded",
        doc="LlamaForCausalLM stored as BF16 in two shards + model.safetensors.index.json; "
            "expected logits from the bf16 values upcast (computed in float64).",
        config=llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            vocab_size=192, torch_dtype="bfloat16"),
        gen=generation_config(1, [2, 3]),
        lengths=[1, 7, 20],
        storage=torch.bfloat16,
        shards=2,
    ),
    dict(
        name="llama-f16",
        doc="LlamaForCausalLM stored as F16 in one file, 6 heads / 2 KV heads (head_dim 8, "
            "3 query heads per KV head); expected logits from the f16 values upcast.",
        config=llama_config(hidden_size=48, intermediate_size=96, num_attention_heads=6,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            vocab_size=192, torch_dtype="float16", rms_norm_eps=1e-06),
        gen=generation_config(1, 2),
        lengths=[1, 7, 20],
        storage=torch.float16,
    ),
    dict(
        name="mistral-swa",
        doc="MistralForCausalLM, 4 heads / 2 KV heads, sliding_window 6: a query at position i "
            "attends keys j with 0 <= i - j < 6 (6 keys including itself).",
        config=mistral_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                              vocab_size=192, sliding_window=6),
        gen=generation_config(1, 2),
        lengths=[1, 7, 20],
    ),
    dict(
        name="qwen2-bias",
        doc="Qwen2ForCausalLM: q/k/v biases (no o_proj bias), tied embeddings, "
            "use_sliding_window false (sliding_window 64 is inert, as in real Qwen2 configs).",
        config=qwen2_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, vocab_size=192,
                            sliding_window=64, max_window_layers=2),
        gen=generation_config(1, [3, 4], pad=3),
        lengths=[1, 7, 20],
    ),
    dict(
        name="qwen3-qk-norm",
        doc="Qwen3ForCausalLM: per-head RMSNorms q_norm / k_norm [head_dim] on q and k before "
            "RoPE, no biases, head_dim 16 with hidden 48 (q_proj [64, 48]), tied embeddings.",
        config=qwen3_config(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            vocab_size=192),
        gen=generation_config(1, [3, 4], pad=3),
        lengths=[1, 7, 20],
    ),
    dict(
        name="gpt2",
        doc="GPT2LMHeadModel, keys prefixed `transformer.`, lm_head tied to wte and not stored.",
        config=gpt2_config(vocab_size=192, n_embd=48, n_head=4, n_positions=32, n_ctx=32,
                           bos_token_id=191, eos_token_id=191),
        gen=generation_config(191, 191),
        lengths=[1, 7, 20],
        gpt2_prefix="transformer.",
    ),
    dict(
        name="gpt2-noprefix",
        doc="GPT-2 in the original openai-community/gpt2 checkpoint layout: GPT2Model keys "
            "without `transformer.`, plus the legacy h.N.attn.bias causal-mask buffers "
            "(F32 [1, 1, 32, 32]) that loaders must ignore; no lm_head.weight.",
        config=gpt2_config(vocab_size=192, n_embd=48, n_head=4, n_positions=32, n_ctx=32,
                           bos_token_id=191, eos_token_id=191),
        gen=generation_config(191, 191),
        lengths=[1, 7, 20],
        gpt2_prefix="",
        legacy_bias=True,
    ),
]


def make_weights(fx: dict) -> Dict[str, torch.Tensor]:
    rng = Rng("weights/" + fx["name"])
    c = fx["config"]
    if c["model_type"] == "gpt2":
        return gpt2_weights(rng, c, fx["gpt2_prefix"], fx.get("legacy_bias", False))
    return llama_like_weights(rng, c)


def make_cases(fx: dict) -> Dict[str, torch.Tensor]:
    rng = Rng("ids/" + fx["name"])
    V = fx["config"]["vocab_size"]
    return {f"t{n}": rng.ids(n, V) for n in fx["lengths"]}


def write_weights(folder: str, fx: dict, stored: Dict[str, torch.Tensor]) -> None:
    shards = fx.get("shards", 1)
    meta = {"format": "pt"}
    if shards == 1:
        ref.write_safetensors(os.path.join(folder, "model.safetensors"), stored, meta)
        return
    # save_pretrained shards in state-dict order, filling each shard up to a size limit;
    # here: split the ordered names into `shards` groups of about equal byte size.
    names = list(stored)  # insertion order = module order
    sizes = [stored[n].numel() * stored[n].element_size() for n in names]
    total = sum(sizes)
    groups: List[List[str]] = [[] for _ in range(shards)]
    acc = 0
    for n, s in zip(names, sizes):
        g = min(shards - 1, int(acc * shards // total))
        groups[g].append(n)
        acc += s
    weight_map = {}
    for gi, g in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{shards:05d}.safetensors"
        ref.write_safetensors(os.path.join(folder, fname), {n: stored[n] for n in g}, meta)
        for n in g:
            weight_map[n] = fname
    json_dump(os.path.join(folder, "model.safetensors.index.json"),
              {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_fixture(out_root: str, fx: dict) -> dict:
    folder = os.path.join(out_root, fx["name"])
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # remove stale files (e.g. a former single-file layout)
        if f.endswith(".safetensors") or f.endswith(".json"):
            os.remove(os.path.join(folder, f))
    c = fx["config"]
    master = make_weights(fx)
    storage = fx.get("storage", torch.float32)
    stored = to_storage(master, storage)
    json_dump(os.path.join(folder, "config.json"), c)
    json_dump(os.path.join(folder, "generation_config.json"), fx["gen"])
    write_weights(folder, fx, stored)

    cases = make_cases(fx)
    out: Dict[str, torch.Tensor] = {}
    for cname, ids in cases.items():
        logits = ref.reference_logits(stored, c, ids, dtype=torch.float64)
        out["ids." + cname] = ids
        out["logits." + cname] = logits.to(torch.float32)
    meta = {
        "format": "pt",
        "cases": ",".join(cases),
        "compute": "float64 (weights upcast from the stored dtype), rounded to float32",
        "semantics": "logits.<case>: fresh cache-less forward, positions 0..T-1",
    }
    for cname, prefill in fx.get("cached", {}).items():
        lc = ref.cached_logits(stored, c, cases[cname], prefill, dtype=torch.float64)
        out["logits_cached." + cname] = lc.to(torch.float32)
        meta["cached_prefill"] = str(prefill)
        meta["cached_semantics"] = (
            "logits_cached.<case>: KV-cached generation, one forward over ids[:cached_prefill] "
            "then one forward per token, stateful rotary module (transformers dynamic_rope_update)")
    ref.write_safetensors(os.path.join(folder, "reference.safetensors"), out, meta)
    return {"name": fx["name"], "cases": list(cases), "stored": storage}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output root (default test/fixtures/models)")
    ap.add_argument("--only", default=None, help="comma list of fixture names")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # deterministic reductions
    only = set(args.only.split(",")) if args.only else None
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for fx in FIXTURES:
        if only and fx["name"] not in only:
            continue
        info = build_fixture(args.out, fx)
        folder = os.path.join(args.out, fx["name"])
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        total += size
        print(f"{info['name']:<20} {size / 1024:7.1f} KiB  cases={','.join(info['cases'])}")
    print(f"total {total / 1024:.1f} KiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
