#!/usr/bin/env python3
"""PyTorch + transformers + PEFT peer of the GPU trainer's benchmark (native/bench/cuda_train_bench.cu),
run on the same GPU with the same shapes, batch and loss mix: random-weight Llama-3.2-1B and
Llama-3.2-3B in bf16 (sdpa attention), PEFT LoRA r=16, alpha 32, dropout 0.05 on all seven
projections, the <rf> embedding and LM-head rows trainable (fp32 vectors patched into the
embedding lookup and the logits, as redflag trains them), AdamW (fused) on the trainable
parameters.

The step is the benchmark's red-flag mix (see cuda_train_bench.cu): B sequences of T tokens, even
ones benign (KL(p_ref || p_theta) on the second half), odd ones harmful with <rf> at T/2 (noisy-OR
red-flag term over four windows of four positions before it, KL after it against the reference
without <rf>); the reference forward runs in the same step with the adapters off
(`with model.disable_adapter()`, no grad). Logits are computed only at the scored rows (hidden
states gathered first), in fp32 for the softmaxes, the way a careful PyTorch user writes it.
`torch.compile` is tried on the base model's forward and dropped when it fails ("compiled" says
which).

Prints ONE JSON object on stdout (progress on stderr): per model tokens/s, seconds per step and
torch.cuda.max_memory_allocated(). Exit 3 with {"skipped": reason} without torch, transformers,
peft or a GPU.

    python3 bench/peers/torch_gpu_train.py [--model 1b|3b] [--batch 8] [--tokens 2048] [--steps 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
}
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def skip(reason: str):
    print(json.dumps({"peer": "pytorch-gpu-train", "skipped": reason}))
    sys.exit(3)


def mix(B: int, T: int, V: int, torch):
    """The benchmark's batch: trained and reference ids [B, T] (reference padded, masked rows never
    scored), and the scored rows as (sequence, position) index tensors."""
    rf = V - 1
    trained, ref = [], []
    benign_rows, after_rows, after_ref_rows, rf_rows = [], [], [], []
    for b in range(B):
        ids = [(t * 7919 + b * 104729) % (V - 1) for t in range(T)]
        if b % 2 == 0:
            trained.append(ids)
            ref.append(ids)
            benign_rows += [(b, t) for t in range(T // 2, T)]
        else:
            trained.append(ids[: T // 2] + [rf] + ids[T // 2: T - 1])
            ref.append(ids[: T - 1] + [0])  # padding at the end: never scored, causally invisible
            for w in range(4):
                end = T // 2 - 1 - (3 - w) * (T // 8)
                rf_rows += [(b, end - j) for j in range(3, -1, -1)]
            after_rows += [(b, t) for t in range(T // 2 + 1, T)]
            after_ref_rows += [(b, t - 1) for t in range(T // 2 + 1, T)]
    dev = "cuda"
    as_idx = lambda rows: (torch.tensor([r[0] for r in rows], device=dev), torch.tensor([r[1] for r in rows], device=dev))
    return dict(trained=torch.tensor(trained, device=dev), ref=torch.tensor(ref, device=dev), benign=as_idx(benign_rows),
                after=as_idx(after_rows), after_ref=as_idx(after_ref_rows), rf=as_idx(rf_rows), n_groups=len(rf_rows) // 16,
                rf_token=rf, kl_rows=len(benign_rows) + len(after_rows), rf_rows_n=len(rf_rows))


def run_model(name: str, shape: dict, args, torch, transformers, peft):
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=ROPE,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa",
                                   torch_dtype=torch.bfloat16)
    with torch.device("cuda"):
        base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    for n, p in model.named_parameters():  # adapters in fp32, as redflag keeps them
        if p.requires_grad:
            p.data = p.data.float()
    V, H = shape["vocab_size"], shape["hidden_size"]
    m = mix(args.batch, args.tokens, V, torch)
    rf = m["rf_token"]
    emb = base.get_input_embeddings().weight
    rf_embed = torch.nn.Parameter(emb[rf].float().clone())
    rf_head = torch.nn.Parameter(emb[rf].float().clone())
    inner = model.base_model.model.model  # LlamaModel under the PEFT wrapper
    compiled = False
    forward_hidden = inner
    if not args.no_compile:
        try:
            forward_hidden = torch.compile(inner)
            compiled = True
        except Exception as e:  # noqa: BLE001
            log(f"{name}: torch.compile failed ({e}); eager")
    params = [p for p in model.parameters() if p.requires_grad] + [rf_embed, rf_head]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    W = emb  # tied head [V, H] bf16

    def hidden(ids, with_rf):
        x = inner.embed_tokens(ids)
        if with_rf:
            x = torch.where((ids == rf).unsqueeze(-1), rf_embed.to(x.dtype), x)
        return forward_hidden(inputs_embeds=x).last_hidden_state

    def logits(h, trained):
        z = (h @ W.t()).float()
        if trained:
            z = z.clone()
            z[:, rf] = h.float() @ rf_head
        return z

    def step():
        h = hidden(m["trained"], True)
        with torch.no_grad(), model.disable_adapter():
            h_ref = hidden(m["ref"], False)
        loss = 0.0
        for rows, ref_rows in ((m["benign"], m["benign"]), (m["after"], m["after_ref"])):
            lt = F.log_softmax(logits(h[rows], True), -1)
            with torch.no_grad():
                lr = F.log_softmax(logits(h_ref[ref_rows], False), -1)
            loss = loss + (lr.exp() * (lr - lt)).sum(-1).mean()
        lp = F.log_softmax(logits(h[m["rf"]], True), -1)[:, rf]
        log1mp = torch.log1p(-lp.exp().clamp(max=1 - 1e-7)).view(m["n_groups"], 16).sum(-1)  # log(1 - q) per group
        loss = loss + (-torch.log(-torch.expm1(log1mp))).mean()  # -log(1 - q)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        step()  # warm-up (and compilation)
    except Exception as e:  # noqa: BLE001
        if not compiled:
            raise
        log(f"{name}: compiled step failed ({e}); eager")
        forward_hidden, compiled = inner, False
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    R = args.batch * args.tokens
    out = {"model": name, "batch": args.batch, "tokens": args.tokens, "trainedTokens": R, "klRows": m["kl_rows"],
           "redFlagRows": m["rf_rows_n"], "secondsPerStep": t, "tokensPerSecond": R / t, "compiled": compiled,
           "peakAllocatedBytes": torch.cuda.max_memory_allocated()}
    log(f"{name}: {t:.3f} s/step, {R / t:.0f} tokens/s, peak {out['peakAllocatedBytes'] / 2**30:.1f} GiB, compiled {compiled}")
    del model, base, opt, params
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    try:
        import torch
        import transformers
        import peft
    except Exception as e:  # noqa: BLE001
        skip(f"import failed: {e}")
    if not torch.cuda.is_available():
        skip("no CUDA device")
    results = []
    for name, shape in SHAPES.items():
        if args.model and args.model not in name:
            continue
        try:
            results.append(run_model(name, shape, args, torch, transformers, peft))
        except torch.cuda.OutOfMemoryError as e:
            results.append({"model": name, "error": f"out of memory: {e}"})
            torch.cuda.empty_cache()
    print(json.dumps({"peer": "pytorch-gpu-train", "torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "device": torch.cuda.get_device_name(0), "results": results}))


if __name__ == "__main__":
    main()
