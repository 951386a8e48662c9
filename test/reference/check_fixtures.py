#!/usr/bin/env python3
"""Self-check of the fixtures in test/fixtures/models/ (run after make_fixtures.py).

    /usr/bin/python3 test/reference/check_fixtures.py [--root DIR] [--no-regen]

For every fixture it
  1. validates the files: safetensors layout (header length multiple of 8, sorted keys,
     contiguous offsets), exact tensor-name set for the architecture, no lm_head.weight
     when tied, the shard index (total_size, weight_map), config/generation_config fields;
  2. re-reads the weights with reference.read_safetensors and recomputes every case with
     reference.py (float64): must equal the stored logits (rel-L2 < 1e-6);
  3. recomputes every case with a second, independent implementation written here in
     numpy (explicit per-head / per-position loops, RoPE as explicit pair rotations,
     window as an explicit i - j < W test): rel-L2 < 1e-9 against reference.py in float64;
  4. mutation tests: the same naive model with one deliberate bug (no RoPE scaling,
     interleaved RoPE pairs, wrong GQA head mapping, window off / off by one, no biases,
     head_dim from hidden/heads, ...) must move the logits by rel-L2 > 1e-3, so a 1e-4
     check in the engine tests catches each bug; logits must also differ strongly
     between positions;
  5. KV-cache consistency: cached generation == full forward for every non-dynamic
     fixture; for llama-rope-dynamic the stored logits_cached.t20 is reproduced and
     equals the full forward exactly where HF semantics say so (positions < 16);
  6. for the bf16/f16 fixtures: the stored values are exactly representable, the
     float32 (transformers dtype semantics) forward of the upcast weights matches the
     expected logits (< 1e-5), and a forward in bf16/f16 (transformers half semantics)
     is close (< 5e-2) but not equal;
  7. regenerates all fixtures into a temp dir and checks byte-identity (skip: --no-regen).
Exit status 0 when everything passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from typing import Dict, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, HERE)
import reference as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DEFAULT_ROOT = os.path.join(REPO, "test", "fixtures", "models")

EXPECTED = [
    "llama-gqa", "llama3-rope-tied", "llama-rope-linear", "llama-rope-dynamic",
    "llama-bf16-sharded", "llama-f16", "mistral-swa", "qwen2-bias", "qwen3-qk-norm", "gpt2", "gpt2-noprefix",
]

FAILURES = []


def check(cond: bool, msg: str) -> None:
    if not cond:
        FAILURES.append(msg)
        print("  FAIL:", msg)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------------
# independent naive implementation (numpy float64)
# ----------------------------------------------------------------------------------


def naive_inv_freq(c: dict, T: int, opts: dict) -> np.ndarray:
    hd = c["hidden_size"] // c["num_attention_heads"] if opts.get("head_dim_from_hidden") else (
        c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    base = float(c.get("rope_theta", 10000.0))
    rs = c.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if opts.get("no_rope_scaling"):
        kind = "default"
    half = hd // 2
    if kind == "dynamic":
        mp = c["max_position_embeddings"]
        f = rs["factor"]
        L = max(T + opts.get("dyn_seq_len_offset", 0), mp)
        base = base * ((f * L / mp) - (f - 1)) ** (hd / (hd - 2))
    out = []
    for i in range(half):
        w = 1.0 / base ** (2 * i / hd)
        if kind == "linear":
            w = w / rs["factor"]
        elif kind == "llama3":
            wl = 2 * math.pi / w
            oc = rs["original_max_position_embeddings"]
            lo, hi, f = rs["low_freq_factor"], rs["high_freq_factor"], rs["factor"]
            if wl < oc / hi:
                pass
            elif wl > oc / lo:
                w = w / f
            else:
                s = (oc / wl - lo) / (hi - lo)
                w = (1 - s) * w / f + s * w
        out.append(w)
    return np.array(out)


def rotate(vec: np.ndarray, pos: int, inv: np.ndarray, style: str) -> np.ndarray:
    d = vec.shape[0]
    half = d // 2
    o = vec.copy()
    for i in range(half):
        a = pos * inv[i]
        cs, sn = math.cos(a), math.sin(a)
        if style == "half":  # pairs (i, i + d/2), as rotate_half does
            x, y = vec[i], vec[i + half]
            o[i], o[i + half] = x * cs - y * sn, y * cs + x * sn
        elif style == "interleaved":  # pairs (2i, 2i+1): the GPT-J / Meta-checkpoint layout
            x, y = vec[2 * i], vec[2 * i + 1]
            o[2 * i], o[2 * i + 1] = x * cs - y * sn, y * cs + x * sn
    return o


def naive_decoder(W: Dict[str, np.ndarray], c: dict, ids, opts: Optional[dict] = None) -> np.ndarray:
    opts = opts or {}
    mt = c["model_type"]
    H = c["hidden_size"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = H // nh if opts.get("head_dim_from_hidden") else (c.get("head_dim") or H // nh)
    eps = c["rms_norm_eps"]
    T = len(ids)
    inv = naive_inv_freq(c, T, opts)
    style = opts.get("rope", "half")
    window = None
    if mt == "mistral":
        window = c.get("sliding_window")
    elif mt in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        window = c.get("sliding_window")
    if opts.get("window") == "off":
        window = None
    elif opts.get("window") == "inclusive" and window is not None:
        window = window + 1  # the flash-attn style i - j <= W

    def rms(x, w):
        return w * (x / math.sqrt(float(np.mean(x * x)) + eps))

    def lin(x, name):
        y = W[name + ".weight"] @ x
        b = W.get(name + ".bias")
        if b is not None and not opts.get("no_bias"):
            y = y + b
        return y

    tied = c.get("tie_word_embeddings", False)
    head = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    hs = [W["model.embed_tokens.weight"][t].copy() for t in ids]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        xs = [rms(h, W[p + "input_layernorm.weight"]) for h in hs]
        Q = [lin(x, p + "self_attn.q_proj").reshape(nh, hd) for x in xs]
        K = [lin(x, p + "self_attn.k_proj").reshape(nkv, hd) for x in xs]
        qk_norm = mt == "qwen3" and not opts.get("no_qk_norm")

        def norm_heads():
            # Each head's row through its own RMSNorm (before the rotation, unless mutated).
            for t in range(T):
                Q[t] = np.stack([rms(q, W[p + "self_attn.q_norm.weight"]) for q in Q[t]])
                K[t] = np.stack([rms(k, W[p + "self_attn.k_norm.weight"]) for k in K[t]])

        if qk_norm and not opts.get("qk_norm_after_rope"):
            norm_heads()
        V = [lin(x, p + "self_attn.v_proj").reshape(nkv, hd) for x in xs]
        for t in range(T):
            for h in range(nh):
                Q[t][h] = rotate(Q[t][h], t, inv, style)
            for h in range(nkv):
                K[t][h] = rotate(K[t][h], t, inv, style)
        if qk_norm and opts.get("qk_norm_after_rope"):
            norm_heads()
        new = []
        for i in range(T):
            outs = []
            for h in range(nh):
                g = (h % nkv) if opts.get("kv_map") == "mod" else h // (nh // nkv)
                keys = [j for j in range(T) if j <= i and (window is None or i - j < window)]
                if opts.get("no_causal"):
                    keys = list(range(T))
                s = np.array([float(Q[i][h] @ K[j][g]) / math.sqrt(hd) for j in keys])
                s = np.exp(s - s.max())
                s /= s.sum()
                outs.append(sum(s[n] * V[j][g] for n, j in enumerate(keys)))
            a = np.concatenate(outs)
            new.append(hs[i] + lin(a, p + "self_attn.o_proj"))
        hs = new
        out = []
        for h in hs:
            x = rms(h, W[p + "post_attention_layernorm.weight"])
            gte = lin(x, p + "mlp.gate_proj")
            m = (gte / (1.0 + np.exp(-gte))) * lin(x, p + "mlp.up_proj")
            out.append(h + lin(m, p + "mlp.down_proj"))
        hs = out
    return np.stack([head @ rms(h, W["model.norm.weight"]) for h in hs])


def naive_gpt2(W: Dict[str, np.ndarray], c: dict, ids, opts: Optional[dict] = None) -> np.ndarray:
    opts = opts or {}
    W = {(k[12:] if k.startswith("transformer.") else k): v for k, v in W.items()}
    E, nh = c["n_embd"], c["n_head"]
    hd = E // nh
    eps = c["layer_norm_epsilon"]

    def ln(x, n):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / math.sqrt(var + eps) * W[n + ".weight"] + W[n + ".bias"]

    def act(x):
        if opts.get("gelu") == "exact":
            return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
        return np.array([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x])

    T = len(ids)
    hs = [W["wte.weight"][t] + (0 if opts.get("no_wpe") else W["wpe.weight"][i]) for i, t in enumerate(ids)]
    for l in range(c["n_layer"]):
        p = f"h.{l}."
        qkv = [ln(h, p + "ln_1") @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"] for h in hs]
        new = []
        for i in range(T):
            outs = []
            for h in range(nh):
                q = qkv[i][h * hd:(h + 1) * hd]
                s = []
                for j in range(i + 1):
                    k = qkv[j][E + h * hd:E + (h + 1) * hd]
                    sc = float(q @ k)
                    if not opts.get("no_scale"):
                        sc /= math.sqrt(hd)
                    s.append(sc)
                s = np.exp(np.array(s) - max(s))
                s /= s.sum()
                outs.append(sum(s[j] * qkv[j][2 * E + h * hd:2 * E + (h + 1) * hd] for j in range(i + 1)))
            a = np.concatenate(outs)
            new.append(hs[i] + a @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"])
        hs = new
        hs = [h + act(ln(h, p + "ln_2") @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"]) @ W[p + "mlp.c_proj.weight"]
              + W[p + "mlp.c_proj.bias"] for h in hs]
    return np.stack([W["wte.weight"] @ ln(h, "ln_f") for h in hs])


def naive(W, c, ids, opts=None):
    if c["model_type"] == "gpt2":
        return naive_gpt2(W, c, ids, opts)
    return naive_decoder(W, c, ids, opts)


# mutations per fixture: (label, opts, cases that must move, cases that must NOT move)
MUTATIONS = {
    "llama-gqa": [("interleaved RoPE pairs", {"rope": "interleaved"}), ("no RoPE", {"rope": "none"}),
                  ("GQA head h -> kv h % n_kv", {"kv_map": "mod"}), ("no causal mask", {"no_causal": True})],
    "llama3-rope-tied": [("llama3 scaling ignored", {"no_rope_scaling": True}),
                         ("head_dim = hidden/heads", None)],
    "llama-rope-linear": [("linear scaling ignored", {"no_rope_scaling": True}),
                          ("biases ignored", {"no_bias": True})],
    "llama-rope-dynamic": [("dynamic NTK ignored", {"no_rope_scaling": True}),
                           ("dynamic seq_len = max position (T - 1)", {"dyn_seq_len_offset": -1})],
    "llama-bf16-sharded": [("interleaved RoPE pairs", {"rope": "interleaved"})],
    "llama-f16": [("GQA head h -> kv h % n_kv", {"kv_map": "mod"})],
    "mistral-swa": [("sliding window ignored", {"window": "off"}),
                    ("window i - j <= W (off by one)", {"window": "inclusive"})],
    "qwen2-bias": [("q/k/v biases ignored", {"no_bias": True})],
    "qwen3-qk-norm": [("q/k norms ignored", {"no_qk_norm": True}),
                      ("q/k norms after RoPE", {"qk_norm_after_rope": True})],
    # erf-GELU and gelu_new differ by <= ~5e-4 absolute, so this bug moves the logits by only
    # ~1.6e-4: engine tests on GPT-2 should use a tolerance of ~2e-5 (f32 engines reach ~1e-6)
    "gpt2": [("exact erf GELU instead of gelu_new", {"gelu": "exact", "min": 1e-4}),
             ("no 1/sqrt(head_dim) scaling", {"no_scale": True}),
             ("no position embeddings", {"no_wpe": True})],
    "gpt2-noprefix": [("no 1/sqrt(head_dim) scaling", {"no_scale": True})],
}


# ----------------------------------------------------------------------------------
# file-level checks
# ----------------------------------------------------------------------------------


def check_safetensors_layout(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    check(n % 8 == 0, f"{path}: header length {n} is not a multiple of 8")
    raw = data[8:8 + n]
    check(raw.rstrip(b" ") + b" " * (n - len(raw.rstrip(b" "))) == raw, f"{path}: header padding is not spaces")
    header = json.loads(raw)
    names = [k for k in header if k != "__metadata__"]
    check(names == sorted(names), f"{path}: tensor keys are not sorted")
    pos = 0
    for k in names:
        b, e = header[k]["data_offsets"]
        check(b == pos, f"{path}: {k} not contiguous")
        pos = e
    check(8 + n + pos == len(data), f"{path}: file size mismatch")
    check(header.get("__metadata__", {}).get("format") == "pt", f"{path}: __metadata__.format != pt")
    ref.read_safetensors(path)  # raises on inconsistency
    return header


def expected_names(c: dict, fx: str) -> set:
    names = set()
    if c["model_type"] == "gpt2":
        pre = "" if fx == "gpt2-noprefix" else "transformer."
        names |= {pre + "wte.weight", pre + "wpe.weight", pre + "ln_f.weight", pre + "ln_f.bias"}
        for i in range(c["n_layer"]):
            for n in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                names |= {f"{pre}h.{i}.{n}.weight", f"{pre}h.{i}.{n}.bias"}
            if fx == "gpt2-noprefix":
                names.add(f"h.{i}.attn.bias")
        return names
    mt = c["model_type"]
    names |= {"model.embed_tokens.weight", "model.norm.weight"}
    if not c.get("tie_word_embeddings"):
        names.add("lm_head.weight")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(p + f"self_attn.{n}.weight")
            if (mt == "qwen2" and n != "o_proj") or (mt in ("llama", "qwen3") and c.get("attention_bias")):
                names.add(p + f"self_attn.{n}.bias")
        if mt == "qwen3":
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        for n in ("gate_proj", "up_proj", "down_proj"):
            names.add(p + f"mlp.{n}.weight")
            if mt == "llama" and c.get("mlp_bias"):
                names.add(p + f"mlp.{n}.bias")
    return names


def check_fixture(root: str, name: str) -> None:
    print(f"[{name}]")
    d = os.path.join(root, name)
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    with open(os.path.join(d, "generation_config.json")) as f:
        g = json.load(f)
    check("eos_token_id" in g and "bos_token_id" in g, "generation_config lacks bos/eos")
    for k in (["n_embd", "n_layer", "n_head", "n_positions", "n_ctx", "layer_norm_epsilon",
               "activation_function", "vocab_size"] if c["model_type"] == "gpt2" else
              ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "vocab_size", "tie_word_embeddings", "hidden_act"]):
        check(k in c, f"config.json lacks {k}")
    check(c.get("architectures") and c.get("model_type") and c.get("torch_dtype"), "config lacks architectures/model_type/torch_dtype")

    # weights
    stored_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["torch_dtype"]]
    if os.path.exists(os.path.join(d, "model.safetensors")):
        check_safetensors_layout(os.path.join(d, "model.safetensors"))
    else:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            idx = json.load(f)
        shards = sorted(set(idx["weight_map"].values()))
        check(shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], f"shards {shards}")
        total = 0
        for s in shards:
            h = check_safetensors_layout(os.path.join(d, s))
            for k, v in h.items():
                if k == "__metadata__":
                    continue
                check(idx["weight_map"].get(k) == s, f"index maps {k} to {idx['weight_map'].get(k)}, found in {s}")
                total += v["data_offsets"][1] - v["data_offsets"][0]
        check(idx["metadata"]["total_size"] == total, f"total_size {idx['metadata']['total_size']} != {total}")
    tensors, config = ref.load_model_dir(d)
    check(set(tensors) == expected_names(c, name),
          f"tensor names differ: extra {sorted(set(tensors) - expected_names(c, name))[:5]}, "
          f"missing {sorted(expected_names(c, name) - set(tensors))[:5]}")
    for k, v in tensors.items():
        if not k.endswith("attn.bias") or c["model_type"] != "gpt2":
            check(v.dtype == stored_dtype, f"{k} stored as {v.dtype}, config says {stored_dtype}")

    # reference.safetensors
    hdr = check_safetensors_layout(os.path.join(d, "reference.safetensors"))
    out, meta = ref.read_safetensors(os.path.join(d, "reference.safetensors"))
    cases = meta["cases"].split(",")
    check(len(cases) >= 3, "fewer than 3 cases")
    lens = [out["ids." + cs].shape[0] for cs in cases]
    check(1 in lens and max(lens) >= 16 and any(5 <= n <= 9 for n in lens), f"case lengths {lens}")
    V = c["vocab_size"]
    Wnp = {k: v.to(torch.float64).numpy() for k, v in tensors.items()}
    for cs in cases:
        ids = out["ids." + cs]
        exp = out["logits." + cs]
        check(ids.dtype == torch.int64 and exp.dtype == torch.float32, f"{cs}: dtypes {ids.dtype} {exp.dtype}")
        check(list(exp.shape) == [ids.shape[0], V], f"{cs}: logits shape {list(exp.shape)}")
        check(int(ids.min()) >= 0 and int(ids.max()) < V, f"{cs}: ids out of range")
        got = ref.reference_logits(tensors, config, ids, torch.float64)
        r1 = ref.rel_l2(got.float(), exp)
        check(r1 < 1e-6, f"{cs}: recomputed (reference.py) rel-L2 {r1:.3g}")
        nv = naive(Wnp, config, ids.tolist())
        r2 = rel(got.numpy(), nv)
        check(r2 < 1e-9, f"{cs}: independent numpy implementation rel-L2 {r2:.3g}")
        # positions must differ strongly
        if ids.shape[0] > 1:
            e = exp.double()
            dif = [float((e[t + 1] - e[t]).norm() / e[t].norm()) for t in range(e.shape[0] - 1)]
            check(min(dif) > 0.2, f"{cs}: adjacent positions too similar (min rel diff {min(dif):.3g})")
        print(f"  {cs:<4} T={ids.shape[0]:<3} reference {r1:.1e}  numpy {r2:.1e}  logit std {float(exp.std()):.2f}")

    # mutations: every bug must move the longest case by > 1e-3 (10x the engine tolerance)
    longest = max(cases, key=lambda cs: out["ids." + cs].shape[0])
    ids_l = out["ids." + longest].tolist()
    exp_l = out["logits." + longest].double().numpy()
    for label, opts in MUTATIONS.get(name, []):
        if opts is None:  # head_dim from hidden/heads: weights no longer fit -> structural bug
            hd_exp = c.get("head_dim")
            check(hd_exp and hd_exp != c["hidden_size"] // c["num_attention_heads"], "head_dim should differ from hidden/heads")
            print(f"  mutation {label:<40} impossible with these shapes (q_proj is [{c['num_attention_heads'] * hd_exp}, {c['hidden_size']}])")
            continue
        r = rel(naive(Wnp, config, ids_l, opts), exp_l)
        check(r > opts.get("min", 1e-3), f"mutation '{label}' moves logits only by {r:.3g}")
        print(f"  mutation {label:<40} rel-L2 {r:.3g}")

    # KV cache
    if "logits_cached." + longest in out:
        prefill = int(meta["cached_prefill"])
        lc = ref.cached_logits(tensors, config, out["ids." + longest], prefill, torch.float64)
        stored = out["logits_cached." + longest]
        check(ref.rel_l2(lc.float(), stored) < 1e-6, "logits_cached not reproduced")
        full = out["logits." + longest].double()
        mp = c["max_position_embeddings"]
        # rows < max_position_embeddings: computed with the original inv_freq, i.e. equal to
        # a full forward over the first max_position_embeddings tokens (no NTK scaling)
        prefix = ref.reference_logits(tensors, config, out["ids." + longest][:mp], torch.float64)
        same = ref.rel_l2(stored[:mp], prefix)
        d_lo = ref.rel_l2(stored[:mp].double(), full[:mp])
        d_hi = ref.rel_l2(stored[mp:].double(), full[mp:])
        check(same < 1e-6, f"cached rows < {mp} differ from the unscaled prefix forward ({same:.3g})")
        check(d_lo > 1e-3 and d_hi > 1e-3, f"cached vs full forward should differ ({d_lo:.3g}, {d_hi:.3g})")
        print(f"  cached (prefill {prefill}): rows < {mp} == unscaled prefix forward ({same:.1e}); "
              f"vs full t{len(full)} forward: rows < {mp} differ {d_lo:.3g}, rows >= {mp} differ {d_hi:.3g}")
        # short case after the long one: the rotary module resets to the original inv_freq
        m = ref.build_model(tensors, config, torch.float64)
        m.forward(out["ids." + longest])
        for cs in cases:
            if out["ids." + cs].shape[0] < mp:
                r = ref.rel_l2(m.forward(out["ids." + cs]).float(), out["logits." + cs])
                check(r < 1e-6, f"short case after long: {r:.3g}")
    else:
        for cs in cases:
            ids = out["ids." + cs]
            if ids.shape[0] >= 4:
                lc = ref.cached_logits(tensors, config, ids, 3, torch.float64)
                r = ref.rel_l2(lc.float(), out["logits." + cs])
                check(r < 1e-6, f"{cs}: cached generation differs from the full forward ({r:.3g})")

    # half-precision fixtures
    if stored_dtype != torch.float32:
        for k, v in tensors.items():
            check(torch.equal(v.float().to(stored_dtype), v), f"{k} not representable")
        exp_l_t = out["logits." + longest]
        f32 = ref.reference_logits(tensors, config, out["ids." + longest], torch.float32)
        r32 = ref.rel_l2(f32, exp_l_t)
        check(r32 < 1e-5, f"float32 forward of upcast weights: {r32:.3g}")
        half = ref.reference_logits(tensors, config, out["ids." + longest], stored_dtype)
        rh = ref.rel_l2(half.float(), exp_l_t)
        check(1e-5 < rh < 5e-2, f"{stored_dtype} forward rel-L2 {rh:.3g} not in (1e-5, 5e-2)")
        print(f"  float32-semantics forward {r32:.1e}; {str(stored_dtype)[6:]}-semantics forward {rh:.2e}")


def tree_digest(root: str) -> Dict[str, str]:
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            if f.endswith(".md"):
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--no-regen", action="store_true", help="skip the byte-identical regeneration check")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    # writer / reader round trip on every dtype
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "x.safetensors")
        tens = {
            "a": torch.randn(3, 5), "b16": torch.randn(7).to(torch.bfloat16), "h": torch.randn(2, 3).half(),
            "i": torch.arange(-3, 4, dtype=torch.int64), "j": torch.arange(5, dtype=torch.int32).view(5, 1),
            "e": torch.zeros(0, 4),
        }
        ref.write_safetensors(p, tens, {"k": "v"})
        back, meta = ref.read_safetensors(p)
        check(meta == {"k": "v"}, "metadata round trip")
        for k, v in tens.items():
            check(back[k].dtype == v.dtype and torch.equal(back[k], v), f"round trip of {k}")
        check_safetensors_layout_meta = json.loads(open(p, "rb").read()[8:8 + struct.unpack("<Q", open(p, "rb").read(8))[0]])
        check(list(check_safetensors_layout_meta)[0] == "__metadata__", "__metadata__ first")

    present = sorted(x for x in os.listdir(args.root) if os.path.isdir(os.path.join(args.root, x)))
    check(present == sorted(EXPECTED), f"fixture folders {present}")
    for name in EXPECTED:
        check_fixture(args.root, name)

    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.root) for f in fs)
    check(total < 3 * 1024 * 1024, f"fixtures take {total} bytes (>= 3 MiB)")
    print(f"total size {total / 1024:.1f} KiB")

    if not args.no_regen:
        with tempfile.TemporaryDirectory() as td:
            subprocess.run([sys.executable, os.path.join(HERE, "make_fixtures.py"), "--out", td],
                           check=True, stdout=subprocess.DEVNULL)
            a, b = tree_digest(args.root), tree_digest(td)
            check(a == b, f"regeneration is not byte-identical: {sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}")
            print("regeneration: byte-identical" if a == b else "regeneration: DIFFERS")

    if FAILURES:
        print(f"\n{len(FAILURES)} FAILURE(S)")
        return 1
    print("\nall fixture checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
