#!/usr/bin/env python3
"""Generate the training-step fixtures in test/fixtures/train/<case>/.

    /usr/bin/python3 test/reference/make_train_fixtures.py [--out DIR]

Each case is ONE training step of the native trainer (native/model/train.h) on a tiny model
fixture of test/fixtures/models/, recomputed in float64 with PyTorch autograd by
reference_train.py (reference.py's forward + PEFT-style LoRA + red-flag rows). Deterministic:
values come from numpy's legacy RandomState seeded with crc32 of the case name, torch runs on
one thread; reruns are byte-identical. Needs torch (>= 1.13) and numpy; never transformers/peft.

Files per case
  case.json            what to run:
      fixture      folder under test/fixtures/models/
      mode         "lora" | "full";  lora: {rank, alpha, rslora, targets, dropout 0} or null
      rf_token     the red-flag token (-1 in full mode); aggregation "any" | "mean" | "single"
      alphas       {benign, red_flag, after, ce}: total = sum alpha * term
      sequences    the trained batch; reference: the reference batch (base model, KL rows)
      rows         [kind, row, ref_row, group, target] (kinds in row_kinds: 0 benign_kl,
                   1 red_flag, 2 after_kl, 3 ce); row / ref_row index the concatenated batch
      params       every trainable parameter in the engine's order: engine name, engine shape,
                   value (true when expected.safetensors holds a value.<name> to set)
      terms        the expected terms in float64 (for reading; the test uses `terms` below)
  expected.safetensors F32:
      value.<name>  initial value to load with setParam (LoRA mode: every parameter; full
                    mode: the perturbed ones, the rest are the checkpoint's own weights)
      grad.<name>   d total / d param after one step (engine naming and layout)
      terms         [benign, red_flag, after, ce, total]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

import torch

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
import reference_train as rt  # noqa: E402
import make_fixtures  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
MODELS = os.path.join(REPO, "test", "fixtures", "models")
DEFAULT_OUT = os.path.join(REPO, "test", "fixtures", "train")

F64 = torch.float64
BENIGN, RED_FLAG, AFTER, CE = rt.KIND_BENIGN_KL, rt.KIND_RED_FLAG, rt.KIND_AFTER_KL, rt.KIND_CE

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Rng(make_fixtures.Rng):
    """make_fixtures' named generator; token ids here avoid one id (the red-flag token)."""

    def ids(self, n: int, vocab: int, avoid: int) -> List[int]:  # type: ignore[override]
        out = []
        while len(out) < n:
            v = int(self.rs.randint(0, vocab))
            if v != avoid:
                out.append(v)
        return out


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round to float32 (what the fixture stores and the engine uses), back to float64."""
    return t.to(torch.float32).to(F64)


# ----------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------

CASES = [
    dict(name="llama-gqa-lora-any", fixture="llama-gqa", mode="lora", seed_name="llama-gqa-lora",
         rank=4, alpha=8.0, rslora=False, targets=LLAMA_ALL, rf_token=200, aggregation="any",
         alphas={"benign": 1.5, "red_flag": 0.75, "after": 2.0, "ce": 0.5},
         layout="one-harmful"),
    dict(name="llama-gqa-lora-mean", fixture="llama-gqa", mode="lora", seed_name="llama-gqa-lora",
         rank=4, alpha=8.0, rslora=False, targets=LLAMA_ALL, rf_token=200, aggregation="mean",
         alphas={"benign": 1.5, "red_flag": 0.75, "after": 2.0, "ce": 0.5},
         layout="one-harmful"),
    dict(name="qwen2-bias-lora-rslora", fixture="qwen2-bias", mode="lora", seed_name="qwen2-bias-lora-rslora",
         rank=4, alpha=8.0, rslora=True, targets=["q_proj", "v_proj", "up_proj", "down_proj"], rf_token=150,
         aggregation="any", alphas={"benign": 0.5, "red_flag": 1.25, "after": 1.0, "ce": 0.25},
         layout="two-harmful"),
    dict(name="qwen3-qk-norm-lora", fixture="qwen3-qk-norm", mode="lora", seed_name="qwen3-qk-norm-lora",
         rank=4, alpha=8.0, rslora=False, targets=LLAMA_ALL, rf_token=170, aggregation="any",
         alphas={"benign": 1.0, "red_flag": 1.0, "after": 1.5, "ce": 0.5},
         layout="two-harmful"),
    dict(name="gpt2-lora", fixture="gpt2", mode="lora", seed_name="gpt2-lora",
         rank=3, alpha=6.0, rslora=False, targets=["c_attn", "c_proj", "c_fc"], rf_token=100,
         aggregation="single", alphas={"benign": 1.0, "red_flag": 0.5, "after": 1.5, "ce": 2.0},
         layout="single-groups"),
    dict(name="llama-gqa-full", fixture="llama-gqa", mode="full", seed_name="llama-gqa-full",
         alphas={"benign": 1.0, "red_flag": 1.0, "after": 1.0, "ce": 0.75}),
    dict(name="qwen3-qk-norm-full", fixture="qwen3-qk-norm", mode="full", seed_name="qwen3-qk-norm-full",
         alphas={"benign": 1.0, "red_flag": 1.0, "after": 1.0, "ce": 1.0}),
    dict(name="gpt2-full", fixture="gpt2", mode="full", seed_name="gpt2-full",
         alphas={"benign": 1.0, "red_flag": 1.0, "after": 1.0, "ce": 1.25}),
]

# LoRA B ~ N(0, B_STD): large enough that the adapted model is clearly not the base one (KL
# terms ~0.1-1, so f32 cancellation in the engine's KL stays far below the 1e-5 term tolerance).
B_STD = 0.1
RF_ROW_NOISE = 0.3  # red-flag rows start at the base rows + this * row std * N(0, 1)


def lora_batch(rng: Rng, V: int, rf: int, layout: str):
    """Sequences, reference sequences and loss rows of a red-flag step.

    A harmful sequence is a random sequence with rf inserted at position s; its reference is
    the same sequence without rf. Row t of a sequence predicts token t + 1, so:
      red_flag rows: positions where rf should be likely (s - 1 predicts rf itself, and later ones);
      after_kl rows t >= s (rf and after) match reference row t - 1 (same next token);
      benign_kl rows of a benign sequence match the same rows of its (identical) reference."""
    seqs, refs, rows = [], [], []
    off = ref_off = 0

    def add_benign(n, n_kl, ce_at):
        nonlocal off, ref_off
        s = rng.ids(n, V, rf)
        seqs.append(s)
        refs.append(list(s))
        for t in range(n - n_kl, n):
            rows.append([BENIGN, off + t, ref_off + t, -1, -1])
        for t in ce_at:
            rows.append([CE, off + t, -1, -1, s[t + 1]])
        off += n
        ref_off += n

    def add_harmful(n, s_at, rf_rows, group_of, after_from, ce_rows):
        """n: length without rf; rf inserted at s_at; rf_rows: rows (in the rf sequence) of
        red_flag groups given by group_of(i); ce_rows: [(row, target or 'rf' or 'next')]."""
        nonlocal off, ref_off
        plain = rng.ids(n, V, rf)
        s = plain[:s_at] + [rf] + plain[s_at:]
        seqs.append(s)
        refs.append(plain)
        for i, t in enumerate(rf_rows):
            rows.append([RED_FLAG, off + t, -1, group_of(i), -1])
        for t in range(after_from, len(s) - 1):
            rows.append([AFTER, off + t, ref_off + t - 1, -1, -1])
        for t, target in ce_rows:
            rows.append([CE, off + t, -1, -1, rf if target == "rf" else s[t + 1]])
        off += len(s)
        ref_off += len(plain)

    if layout == "one-harmful":
        add_benign(12, 6, ce_at=[2])
        add_harmful(12, 6, rf_rows=[5, 8, 10], group_of=lambda i: 0, after_from=6,
                    ce_rows=[(5, "rf"), (7, "next")])
    elif layout == "two-harmful":
        add_benign(10, 6, ce_at=[1, 4])
        add_harmful(11, 5, rf_rows=[4, 7, 9], group_of=lambda i: 3, after_from=5, ce_rows=[(4, "rf")])
        add_harmful(9, 4, rf_rows=[3, 6], group_of=lambda i: 7, after_from=4, ce_rows=[(6, "next")])
    elif layout == "single-groups":
        add_benign(11, 5, ce_at=[3])
        add_harmful(10, 4, rf_rows=[3, 7], group_of=lambda i: i, after_from=4,
                    ce_rows=[(3, "rf"), (5, "next")])
    else:
        raise ValueError(layout)
    return seqs, refs, rows


def full_batch(rng: Rng, V: int):
    """Two sequences, cross-entropy on every next token plus one arbitrary target."""
    seqs = [rng.ids(10, V, -1), rng.ids(8, V, -1)]
    rows = []
    off = 0
    for s in seqs:
        for t in range(len(s) - 1):
            rows.append([CE, off + t, -1, -1, s[t + 1]])
        off += len(s)
    rows.append([CE, 4, -1, -1, int(rng.rs.randint(0, V))])
    return seqs, [], rows


def perturb_full(rng: Rng, tensors: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Full mode: new values (f32) for every norm, every bias and layer 1's attention output
    projection, so the test also exercises setParam + paramsChanged (rebuilt packs)."""
    out = {}
    for k in sorted(tensors):
        v = tensors[k].to(F64)
        kk = k[len("transformer."):] if k.startswith("transformer.") else k
        is_norm = any(n in kk for n in ("layernorm", "model.norm", "ln_1", "ln_2", "ln_f", "q_norm", "k_norm"))
        is_bias = kk.endswith(".bias")
        is_o1 = kk in ("model.layers.1.self_attn.o_proj.weight", "h.1.attn.c_proj.weight")
        if is_norm or is_bias:
            out[k] = f32(v + rng.normal(tuple(v.shape), 0.1))
        elif is_o1:
            out[k] = f32(v + rng.normal(tuple(v.shape), float(v.std()) * 0.3))
    return out


# ----------------------------------------------------------------------------------
# self-checks
# ----------------------------------------------------------------------------------


def merged_logits(tensors, config, spec, values, seqs):
    """Logits with LoRA merged into the weights the PEFT way (W += B @ A * scaling; Conv1D:
    the transpose) and the rf rows written into the tables: must equal the hooked forward."""
    scaling = spec["alpha"] / math.sqrt(spec["rank"]) if spec["rslora"] else spec["alpha"] / spec["rank"]
    t = {k: v.to(F64).clone() for k, v in tensors.items()}
    gpt2 = rt.is_gpt2(config)
    for layer, site in rt.lora_sites(config, spec["targets"]):
        d = values[rt.lora_name(layer, site, "lora_B")] @ values[rt.lora_name(layer, site, "lora_A")] * scaling
        if gpt2:
            key = next(k for k in t if k.endswith(f"h.{layer}.{site}.weight"))
            t[key] = t[key] + d.t()
        else:
            key = f"model.layers.{layer}.{site}.weight"
            t[key] = t[key] + d
    rf = spec["rf_token"]
    if gpt2:
        key = next(k for k in t if k.endswith("wte.weight"))
        t[key][rf] = values["rf.embed"]
    else:
        t["model.embed_tokens.weight"][rf] = values["rf.embed"]
        if not rt.tied(config):
            t["lm_head.weight"][rf] = values["rf.head"]
    model = ref.build_model(t, config, F64)
    with torch.no_grad():
        return torch.cat([model.forward(torch.tensor(s)) for s in seqs], dim=0)


def check_lora(tensors, config, spec, values, seqs, refs, rows, grads, terms):
    # (1) the hooked forward equals the merged-weight forward
    leaves = {k: v.clone() for k, v in values.items()}
    model = ref.build_model({k: v.to(F64) for k, v in tensors.items()}, config, F64)
    scaling = spec["alpha"] / math.sqrt(spec["rank"]) if spec["rslora"] else spec["alpha"] / spec["rank"]
    adapters = [(rt._site_weight(model, config, l, s), leaves[rt.lora_name(l, s, "lora_A")],
                 leaves[rt.lora_name(l, s, "lora_B")], scaling, f"{l}.{s}") for l, s in rt.lora_sites(config, spec["targets"])]
    rt._set_rf_rows(model, config, spec["rf_token"], leaves["rf.embed"], leaves.get("rf.head"))
    with torch.no_grad(), rt._LoraPatch(adapters):
        hooked = rt._logits(model, seqs)
    merged = merged_logits(tensors, config, spec, values, seqs)
    err = ref.rel_l2(hooked, merged)
    assert err < 1e-12, f"hooked vs merged LoRA forward: {err}"
    # (2) with B = 0 and the base rows, the adapted model is the base model: KL terms vanish
    zero = dict(values)
    for k in zero:
        if k.endswith("lora_B"):
            zero[k] = torch.zeros_like(zero[k])
    if rt.is_gpt2(config):
        base_embed = tensors["transformer.wte.weight"].to(F64)
        zero["rf.embed"] = base_embed[spec["rf_token"]].clone()
    else:
        zero["rf.embed"] = tensors["model.embed_tokens.weight"].to(F64)[spec["rf_token"]].clone()
        if "rf.head" in zero:
            zero["rf.head"] = tensors["lm_head.weight"].to(F64)[spec["rf_token"]].clone()
    t0, _ = step(tensors, config, spec, zero, seqs, refs, rows)
    assert abs(t0["benign"]) < 1e-13 and abs(t0["after"]) > 0, t0
    # (3) directional finite difference of total
    fd_check(lambda v: step(tensors, config, spec, v, seqs, refs, rows)[0]["total"], values, grads, spec["name"])


def fd_check(fn, values, grads, name):
    rng = Rng("fd/" + name)
    d = {k: rng.normal(tuple(v.shape), 1.0) for k, v in values.items()}
    eps = 1e-6
    plus = fn({k: values[k] + eps * d[k] for k in values})
    minus = fn({k: values[k] - eps * d[k] for k in values})
    fd = (plus - minus) / (2 * eps)
    an = sum(float((grads[k] * d[k]).sum()) for k in values)
    rel = abs(fd - an) / max(abs(an), 1e-30)
    assert rel < 1e-6, f"{name}: finite difference {fd} vs autograd {an} (rel {rel})"
    return rel


def step(tensors, config, spec, values, seqs, refs, rows):
    return rt.train_step_lora(tensors, config, rank=spec["rank"], alpha=spec["alpha"], rslora=spec["rslora"],
                              targets=spec["targets"], rf_token=spec["rf_token"], values=values, sequences=seqs,
                              reference=refs, rows=rows, aggregation=spec["aggregation"], alphas=spec["alphas"])


# ----------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------


def build_case(spec: dict, out_root: str) -> dict:
    fixture_dir = os.path.join(MODELS, spec["fixture"])
    tensors, config = ref.load_model_dir(fixture_dir)
    V = int(config["vocab_size"])
    rng = Rng("train/" + spec["seed_name"])
    params: List[dict] = []
    st: Dict[str, torch.Tensor] = {}
    case = {
        "name": spec["name"],
        "fixture": spec["fixture"],
        "mode": spec["mode"],
        "alphas": spec["alphas"],
    }
    if spec["mode"] == "lora":
        values: Dict[str, torch.Tensor] = {}
        for name, shape in rt.lora_shapes(config, tensors, spec["rank"], spec["targets"]):
            if name.endswith("lora_A"):
                bound = 1.0 / math.sqrt(shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) range
                values[name] = f32(rng.uniform(tuple(shape), -bound, bound))
            else:
                values[name] = f32(rng.normal(tuple(shape), B_STD))
            params.append({"name": name, "shape": shape, "value": True})
        rf = spec["rf_token"]
        if rt.is_gpt2(config):
            embed = ref.normalize_gpt2_keys(tensors)["wte.weight"].to(F64)
            head = None
        else:
            embed = tensors["model.embed_tokens.weight"].to(F64)
            head = None if rt.tied(config) else tensors["lm_head.weight"].to(F64)
        H = embed.shape[1]
        values["rf.embed"] = f32(embed[rf] + rng.normal((H,), RF_ROW_NOISE * float(embed[rf].std())))
        params.append({"name": "rf.embed", "shape": [H], "value": True})
        if head is not None:
            values["rf.head"] = f32(head[rf] + rng.normal((H,), RF_ROW_NOISE * float(head[rf].std())))
            params.append({"name": "rf.head", "shape": [H], "value": True})
        # both llama-gqa LoRA cases share their batch (same seed_name): draw it after the values
        seqs, refs, rows = lora_batch(rng, V, rf, spec["layout"])
        terms, grads = step(tensors, config, spec, values, seqs, refs, rows)
        check_lora(tensors, config, spec, values, seqs, refs, rows, grads, terms)
        for k, v in values.items():
            st["value." + k] = v.to(torch.float32)
        for k, g in grads.items():
            st["grad." + k] = g.to(torch.float32)
        case.update({
            "lora": {"rank": spec["rank"], "alpha": spec["alpha"], "rslora": spec["rslora"],
                     "targets": spec["targets"], "dropout": 0.0},
            "rf_token": rf,
            "aggregation": spec["aggregation"],
        })
    else:
        new = perturb_full(rng, tensors, config)
        seqs, refs, rows = full_batch(rng, V)
        work = {k: (new[k] if k in new else v.to(F64)) for k, v in tensors.items()}
        terms, grads = rt.train_step_full(work, config, sequences=seqs, rows=rows, alphas=spec["alphas"])
        # directional finite difference over every tensor
        hf_names = sorted(grads)
        fd_check(lambda v: rt.train_step_full({**work, **v}, config, sequences=seqs, rows=rows,
                                              alphas=spec["alphas"])[0]["total"],
                 {k: work[k] for k in hf_names}, grads, spec["name"])
        eng_grads = rt.engine_full_layout(grads, config)
        eng_values = rt.engine_full_layout(work, config)
        # which engine tensors contain perturbed values: compare against the unperturbed layout
        base_layout = rt.engine_full_layout({k: v.to(F64) for k, v in tensors.items() if k in grads}, config)
        eng_new = {k for k in eng_values if not torch.equal(eng_values[k], base_layout[k])}
        for name in rt.engine_full_order(config, list(eng_grads)):
            g = eng_grads[name]
            params.append({"name": name, "shape": list(g.shape), "value": name in eng_new})
            st["grad." + name] = g.to(torch.float32)
            if name in eng_new:
                st["value." + name] = eng_values[name].to(torch.float32)
        case.update({"lora": None, "rf_token": -1, "aggregation": "any"})

    case["sequences"] = seqs
    case["reference"] = refs
    case["rows"] = rows
    case["row_kinds"] = {str(k): v for k, v in rt.KIND_NAMES.items()}
    case["params"] = params
    case["terms"] = {k: terms[k] for k in rt.TERM_ORDER}
    st["terms"] = torch.tensor([terms[k] for k in rt.TERM_ORDER], dtype=F64).to(torch.float32)

    folder = os.path.join(out_root, spec["name"])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "case.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(case, indent=1, sort_keys=True) + "\n")
    ref.write_safetensors(os.path.join(folder, "expected.safetensors"), st,
                          {"format": "pt", "case": spec["name"], "compute": "float64",
                           "generator": "test/reference/make_train_fixtures.py"})
    n_rows = {n: sum(1 for r in rows if r[0] == k) for k, n in rt.KIND_NAMES.items()}
    print(f"{spec['name']}: {len(params)} params, rows {n_rows}, "
          + ", ".join(f"{k} {terms[k]:.6g}" for k in rt.TERM_ORDER))
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # fixed reduction order: byte-identical reruns
    os.makedirs(args.out, exist_ok=True)
    for spec in CASES:
        build_case(spec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
