#!/usr/bin/env python3
"""PyTorch CPU training peers for the redflag `train` bench (random weights, no download).

Two training steps, each = forward + backward + AdamW step, timed end to end:

  lora  LoRA fine-tuning of a SmolLM2-135M-shaped Llama (the model of torch_model.py: hidden
        576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, head_dim 64, vocab 49152, tied
        embeddings, RMSNorm eps 1e-5, rope_theta 100000), PEFT-style adapters r=8, alpha=16
        (scale 2) on q_proj and v_proj, B=4 sequences of T=128 tokens, loss = mean
        cross-entropy of the next token at every position (T-1 per sequence, as HF's
        `labels=input_ids`), backward into the adapters only, torch.optim.AdamW on them.
          f32:  everything fp32.
          bf16: frozen base weights and activations bf16 (RMSNorm statistics, RoPE tables,
                softmax and the loss in fp32, as transformers does); the adapters and their
                AdamW state are fp32: the adapter input is cast to fp32 and its output back to
                bf16, which is what PEFT does for a bf16 base with fp32 adapters (torch 1.13
                has no mixed-dtype matmul, so the casts are explicit).
  full  full fine-tuning of a GPT-2-124M-shaped model (vocab 50257, 1024 positions, 12 layers,
        hidden 768, 12 heads, MLP 3072, gelu tanh, LayerNorm, biases, tied wte), B=4, T=64,
        fp32, mean next-token cross-entropy, torch.optim.AdamW over all 124M parameters.
  lora_rf  (optional, not in the default --jobs) the lora step with native/bench/bench_train.cpp's
        red-flag loss mix on the same rows instead of cross-entropy: even items benign (KL to the
        reference model at every position), odd items harmful (noisy-OR red-flag rows for
        T/4 <= t < T/2, KL for t >= T/2); the reference model is the base with the adapters off,
        one extra no-grad forward over the batch, as the native trainer does. This is the
        like-for-like peer of bench_train's LoRA mode.

Median of --steps (>= 3) timed steps after --warmup (>= 1) warm-up steps. Prints ONE JSON
object on stdout:
  {"peer": "pytorch", "torch_version": ..., "threads": N,
   "lora": {"f32": {"tokens_per_second": ..., "seconds_per_step": ..., ...}, "bf16": {...}},
   "lora_rf": {...}, "full": {"f32": {...}}, "omp_wait_policy": {...}, ...}
Exit 3 with {"skipped": "reason"} when torch cannot be imported.

Model code: the Llama is the structure of torch_model.py's inference model (fused q/k/v and
gate/up GEMMs, RoPE via rotate_half, query heads grouped per KV head so repeat_kv is never
materialised, tied head), rewritten for a batch and for autograd (torch_model.py's model is a
batch-1 KV-cache decoder under inference_mode); its config and skip() are imported from there.
Attention is matmul + causal mask + softmax (torch 1.13 has no scaled_dot_product_attention).

GEMMs: Debian's torch 1.13 (BLAS_INFO=generic) sends fp32 GEMMs - forward and backward - to
the libblas.so.3 that is installed. With netlib's reference BLAS (Debian's default libblas3)
it is ~40x slower than with OpenBLAS; the fair setting is `apt-get install
libopenblas0-pthread`. The library in use is reported in "blas". bf16 GEMMs go to oneDNN.
OpenBLAS's pthread build sizes its own thread pool from OPENBLAS_NUM_THREADS (not from
torch.set_num_threads), so this script sets OPENBLAS_NUM_THREADS=--threads before importing
torch.

OpenMP: PyTorch 1.13 fp32 on 2 threads collapses unless OMP_WAIT_POLICY=PASSIVE (OpenMP
workers spinning while OpenBLAS's own threads want the cores); bf16 is better with the default
policy (../../shared/PEERS.md). The variable must be set before torch is imported, so
  --best-settings  runs each (step, dtype) in a child process at its best setting and merges
                   the results: f32 with OMP_WAIT_POLICY=PASSIVE; bf16 under both the default
                   policy and PASSIVE, keeping the faster (the default wins on a quiet machine,
                   PASSIVE when other jobs share the cores; "policy_probe" reports both);
                   recommended for the harness:
      python3 bench/peers/torch_train.py --threads 2 --best-settings
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import SMOLLM2_135M, openblas_core, release_openblas_overrides, run_child, skip, strip_args  # noqa: E402  (no torch import at module level)

GPT2_124M = dict(vocab=50257, positions=1024, layers=12, hidden=768, heads=12, eps=1e-5)
JOBS = ("lora:f32", "lora:bf16", "full:f32", "lora_rf:f32", "lora_rf:bf16")
DEFAULT_JOBS = JOBS[:3]


def parse_args(argv):
    ap = argparse.ArgumentParser(description="PyTorch CPU training-step peer (LoRA SmolLM2, full GPT-2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (>= 3); the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--jobs", default=",".join(DEFAULT_JOBS),
                    help=f"comma list of {', '.join(JOBS)} (default: the first three)")
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--lora-seq", type=int, default=128)
    ap.add_argument("--full-batch", type=int, default=4)
    ap.add_argument("--full-seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--layers", type=int, default=0, help="override both models' layer count (smoke tests)")
    ap.add_argument("--best-settings", action="store_true",
                    help="each job in a child: f32 with OMP_WAIT_POLICY=PASSIVE, bf16 with the default")
    ap.add_argument("--omp-passive", action="store_true", help="set OMP_WAIT_POLICY=PASSIVE and re-exec")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.steps = max(3, args.steps)
    args.warmup = max(1, args.warmup)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    for j in args.jobs:
        if j not in JOBS:
            ap.error(f"unknown job {j}; choose from {', '.join(JOBS)}")
    return args


# ----------------------------------------------------------------------------------
# orchestration (no torch import here: OMP_WAIT_POLICY / OPENBLAS_NUM_THREADS come first)
# ----------------------------------------------------------------------------------


def merge(into, res):
    for k, v in res.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into.setdefault(k, v)


def run_best_settings(args, argv) -> int:
    """f32 jobs run with OMP_WAIT_POLICY=PASSIVE (without it fp32 collapses: OpenMP workers spin
    while OpenBLAS's threads want the cores). bf16 jobs run under both the default policy and
    PASSIVE and keep the faster: the default is better for bf16 on a quiet machine, PASSIVE when
    other processes share the cores. Both figures are kept in "policy_probe"."""
    passthrough = strip_args(argv, ("--best-settings", "--omp-passive"), ("--jobs",))
    merged = None
    probe = {}
    for job in args.jobs:
        kind, d = job.split(":")
        best = None
        for policy in (["PASSIVE"] if d == "f32" else ["default", "PASSIVE"]):
            rc, res = run_child(__file__, passthrough, ["--jobs", job], policy)
            if rc != 0:
                print(json.dumps(res))
                return rc
            tok = res[kind][d]["tokens_per_second"]
            probe.setdefault(job, {})[policy] = tok
            if best is None or tok > best[kind][d]["tokens_per_second"]:
                best = res
        if merged is None:
            merged = best
        else:
            merge(merged, best)
    merged["policy_probe"] = probe
    merged["settings"] = ("best: f32 with OMP_WAIT_POLICY=PASSIVE; bf16 the faster of the default policy "
                          "and PASSIVE (policy_probe has both)")
    print(json.dumps(merged))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.best_settings:
        return run_best_settings(args, argv)
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *argv])
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # read by libopenblas at load
    release_openblas_overrides()
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        skip(f"torch unavailable: {type(e).__name__}: {e}")
    return bench(args)


# ----------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------


def build_llama_lora(cfg: dict, dtype, rank: int, alpha: float, seed: int):
    """SmolLM2-shaped Llama with frozen (random) base weights in `dtype` and fp32 LoRA
    adapters on q_proj and v_proj. Returns (loss_fn(ids) -> scalar, trainable params)."""
    import torch
    import torch.nn.functional as F

    H, I, L = cfg["hidden"], cfg["intermediate"], cfg["layers"]
    nh, nkv, hd, V = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["vocab"]
    n_rep, eps = nh // nkv, cfg["eps"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    embed = rnd(V, H)  # tied: also the lm_head (std 0.02 so the initial loss is ~ln V)
    layers, params = [], []
    scale_lora = alpha / rank
    for _ in range(L):
        Ly = dict(
            ln1=(1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
            qkv=rnd((nh + 2 * nkv) * hd, H, std=H ** -0.5),
            o=rnd(H, nh * hd, std=(nh * hd) ** -0.5),
            ln2=(1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
            gate_up=rnd(2 * I, H, std=H ** -0.5),
            down=rnd(H, I, std=I ** -0.5),
        )
        # PEFT init: A kaiming-uniform, B zeros. B is made small-random instead so the step's
        # gradients are not trivially structured (same FLOPs either way).
        for name, out in (("q", nh * hd), ("v", nkv * hd)):
            a = ((torch.rand(rank, H, generator=g) * 2 - 1) * (H ** -0.5)).requires_grad_()
            b = (torch.randn(out, rank, generator=g) * 1e-3).requires_grad_()
            Ly[f"{name}_A"], Ly[f"{name}_B"] = a, b
            params += [a, b]
        layers.append(Ly)
    norm = torch.ones(H, dtype=dtype)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scale = hd ** -0.5

    def rms(x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(dtype)

    def lora(x, a, b):
        # PEFT: lora_B(lora_A(dropout(x.to(lora_A.dtype)))) * scaling, added to the base output
        return (F.linear(F.linear(x.float(), a), b) * scale_lora).to(dtype)

    def rotate(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def hidden(ids, adapter=True):
        """Final-normed hidden states [B, T, H]; adapter=False is the frozen base model."""
        B, T = ids.shape
        t = torch.arange(T, dtype=torch.float32)
        emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        mask = torch.full((T, T), float("-inf"), dtype=dtype).triu_(1).repeat(n_rep, 1)  # [n_rep*T, T]
        h = F.embedding(ids, embed)  # [B, T, H]
        for Ly in layers:
            x = rms(h, Ly["ln1"])
            qkv = F.linear(x, Ly["qkv"])
            q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
            if adapter:
                q = q + lora(x, Ly["q_A"], Ly["q_B"])
                v = v + lora(x, Ly["v_A"], Ly["v_B"])
            q = rotate(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)  # [B, nh, T, hd]
            k = rotate(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin)  # [B, nkv, T, hd]
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            qg = q.reshape(B, nkv, n_rep * T, hd)  # head kv*n_rep + r -> group kv, rows r-major
            s = torch.matmul(qg, k.transpose(-1, -2)) * scale + mask
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
            a = torch.matmul(p, v).view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)
            h = h + F.linear(a, Ly["o"])
            x = rms(h, Ly["ln2"])
            gt, up = F.linear(x, Ly["gate_up"]).split(I, dim=-1)
            h = h + F.linear(F.silu(gt) * up, Ly["down"])
        return rms(h, norm)

    def ce_loss(ids):
        logits = F.linear(hidden(ids)[:, :-1], embed).float()  # HF upcasts logits for the loss
        return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))

    def rf_loss(ids, rf_token=7):
        """bench_train.cpp's red-flag loss mix on the same rows: even items benign (KL to the
        reference model at every position), odd items harmful (red-flag rows T/4 <= t < T/2
        combined by noisy-OR of p(rf_token), KL after the flag for t >= T/2). The reference
        model is the base with the adapters off, run under no_grad."""
        B, T = ids.shape
        kl_rows, rf_rows, rf_group = [], [], []
        for b in range(B):
            for t in range(T - 1):
                r = b * T + t
                if b % 2 == 0 or t >= T // 2:
                    kl_rows.append(r)
                elif t >= T // 4:
                    rf_rows.append(r)
                    rf_group.append(b // 2)
        kl_rows, rf_rows = torch.tensor(kl_rows), torch.tensor(rf_rows)
        h = hidden(ids).reshape(B * T, H)
        with torch.no_grad():
            h_ref = hidden(ids, adapter=False).reshape(B * T, H)
            logp_ref = torch.log_softmax(F.linear(h_ref[kl_rows], embed).float(), dim=-1)
        logp = torch.log_softmax(F.linear(h[kl_rows], embed).float(), dim=-1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()
        p_rf = torch.softmax(F.linear(h[rf_rows], embed).float(), dim=-1)[:, rf_token]
        groups = torch.tensor(rf_group)
        n_groups = int(groups.max()) + 1
        log_none = torch.zeros(n_groups).index_add(0, groups, torch.log1p(-p_rf.clamp(max=1 - 1e-6)))
        rf = -torch.log1p(-log_none.exp().clamp(max=1 - 1e-6)).mean()  # -log P(flag at least once)
        return kl + rf

    return ce_loss, rf_loss, params


def build_gpt2(cfg: dict, seed: int):
    """GPT-2-124M-shaped model, fp32, every parameter trainable. Returns (loss_fn, params)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    V, P, L, H, nh, eps = cfg["vocab"], cfg["positions"], cfg["layers"], cfg["hidden"], cfg["heads"], cfg["eps"]
    hd = H // nh
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(H, eps=eps), nn.LayerNorm(H, eps=eps)
            self.c_attn, self.c_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
            self.c_fc, self.mlp_proj = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

        def forward(self, x, mask):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(H, dim=-1)
            q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
            s = torch.matmul(q, k.transpose(-1, -2)) * hd ** -0.5 + mask
            a = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B, T, H)
            x = x + self.c_proj(a)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, H), nn.Embedding(P, H)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(H, eps=eps)
            for n, p in self.named_parameters():  # GPT-2 init: N(0, 0.02), LayerNorm 1/0, biases 0
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02)
                elif "bias" in n:
                    nn.init.zeros_(p)

        def forward(self, ids):
            B, T = ids.shape
            mask = torch.full((T, T), float("-inf")).triu_(1)
            x = self.wte(ids) + self.wpe(torch.arange(T))
            for blk in self.h:
                x = blk(x, mask)
            logits = F.linear(self.ln_f(x[:, :-1]), self.wte.weight)  # tied lm_head
            return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))

    model = GPT2()
    return model, list(model.parameters())


def blas_in_use() -> str:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
        real = sorted({os.path.realpath(p) for p in libs})
        return ", ".join(real) or "none mapped"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------
# the bench
# ----------------------------------------------------------------------------------


def bench(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    res = {
        "peer": "pytorch",
        "torch_version": torch.__version__,
        "threads": args.threads,
        "lora": {},
        "lora_rf": {},
        "full": {},
        "omp_wait_policy": {},
        "steps": args.steps,
        "warmup": args.warmup,
    }
    g = torch.Generator().manual_seed(args.seed + 1)
    for job in args.jobs:
        kind, d = job.split(":")
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[d]
        if kind in ("lora", "lora_rf"):
            cfg = dict(SMOLLM2_135M, layers=args.layers or SMOLLM2_135M["layers"])
            B, T = args.lora_batch, args.lora_seq
            ce_loss, rf_loss, params = build_llama_lora(cfg, dtype, args.rank, args.alpha, args.seed)
            loss_fn = ce_loss if kind == "lora" else rf_loss
            module = None
            desc = (f"random Llama, SmolLM2-135M shapes ({cfg['layers']} layers), LoRA r={args.rank} "
                    f"alpha={args.alpha:g} on q_proj,v_proj, base {d}, adapters f32, "
                    + ("CE on all tokens" if kind == "lora" else
                       "bench_train's red-flag loss mix (reference forward with adapters off, KL + noisy-OR)"))
        else:
            cfg = dict(GPT2_124M, layers=args.layers or GPT2_124M["layers"])
            B, T = args.full_batch, args.full_seq
            module, params = build_gpt2(cfg, args.seed)
            loss_fn = module
            desc = f"random GPT-2-124M shapes ({cfg['layers']} layers), full fine-tuning f32, CE on all tokens"
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        ids = torch.randint(0, cfg["vocab"], (B, T), generator=g)

        def step():
            t0 = time.perf_counter()
            loss = loss_fn(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, float(loss)

        for _ in range(args.warmup):
            step()
        times, losses = [], []
        for _ in range(args.steps):
            dt, lv = step()
            times.append(dt)
            losses.append(lv)
        sec = statistics.median(times)
        res[kind][d] = {
            "tokens_per_second": round(B * T / sec, 1),
            "seconds_per_step": round(sec, 4),
            "step_seconds": [round(x, 4) for x in times],
            "batch": B,
            "seq": T,
            "trainable_params": sum(p.numel() for p in params),
            "loss": round(losses[-1], 4),
            "model": desc,
        }
        res["omp_wait_policy"][job] = os.environ.get("OMP_WAIT_POLICY", "default")
        del loss_fn, params, opt, module
    res["blas"] = blas_in_use()
    res["openblas_core"] = openblas_core()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
