#!/usr/bin/env python3
"""PyTorch + Hugging Face transformers peer of the CUDA engine's benchmark (native/bench/cuda_bench.cu),
run on the same GPU with the same shapes: random-weight Llama-3.2-1B and Llama-3.1-8B in bf16,
sdpa attention.

  * decode: batch-1 greedy tokens/s at contexts 128 and 4096: `generate` with a static cache
    and `torch.compile` (mode "reduce-overhead"), as transformers' docs recommend for speed;
    where compiling fails, the same without it ("eager"); the JSON says which. The figure is
    (N new tokens) / (time of generate(N + 1) - time of generate(1)), so the prefill is not counted;
  * prefill: one forward over 2048 tokens, logits of the last position only (logits_to_keep=1).

Prints ONE JSON object on stdout; progress on stderr. Exit 3 with {"skipped": reason} when
torch, transformers or a GPU is missing.

    python3 bench/peers/torch_gpu.py [--model 1b|8b] [--new-tokens 64] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="1b or 8b (default: both)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    try:
        import torch
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(json.dumps({"peer": "transformers", "skipped": f"cannot import: {e}"}))
        return 3
    if not torch.cuda.is_available():
        print(json.dumps({"peer": "transformers", "skipped": "no CUDA device"}))
        return 3

    def timed(fn, reps=3) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out = {"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0), "models": []}
    for name, shape in SHAPES.items():
        if args.model and args.model not in name:
            continue
        log(f"{name}: building random bf16 weights on the GPU")
        config = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                             attn_implementation="sdpa", torch_dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            model = LlamaForCausalLM(config).eval()
            torch.set_default_dtype(torch.float32)
        result = {"model": name, "params": sum(p.numel() for p in model.parameters())}
        gen = torch.Generator(device="cuda").manual_seed(1)

        # Prefill: 2048 tokens, last-position logits.
        ids = torch.randint(0, shape["vocab_size"], (1, 2048), device="cuda", generator=gen)
        with torch.inference_mode():
            t = timed(lambda: model(ids, logits_to_keep=1, use_cache=False))
        result["prefill"] = {"tokens": 2048, "seconds": t, "tokensPerSecond": 2048 / t}
        log(f"{name}: prefill 2048 in {t:.3f} s")

        # Batch-1 decode with a static cache, compiled where it works.
        mode = "eager"
        if not args.no_compile:
            try:
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                mode = "torch.compile"
            except Exception as e:  # noqa: BLE001
                log(f"{name}: torch.compile failed ({e}); eager")
        decode = []
        for ctx in (128, 4096):
            prompt = torch.randint(0, shape["vocab_size"], (1, ctx), device="cuda", generator=gen)

            def run(n: int):
                with torch.inference_mode():
                    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          cache_implementation="static", pad_token_id=0)
            try:
                t_long = timed(lambda: run(args.new_tokens + 1), reps=2)
                t_one = timed(lambda: run(1), reps=2)
            except Exception as e:  # noqa: BLE001
                if mode == "eager":
                    raise
                log(f"{name}: compiled generate failed ({e}); eager")
                model.forward = model.__class__.forward.__get__(model)
                mode = "eager"
                t_long = timed(lambda: run(args.new_tokens + 1), reps=2)
                t_one = timed(lambda: run(1), reps=2)
            rate = args.new_tokens / max(1e-9, t_long - t_one)
            decode.append({"batch": 1, "context": ctx, "tokensPerSecond": rate})
            log(f"{name}: decode at context {ctx}: {rate:.1f} tokens/s ({mode})")
        result["decode"] = decode
        result["decodeMode"] = mode
        out["models"].append(result)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
