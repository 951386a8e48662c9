#!/usr/bin/env python3
"""PyTorch CPU peer for the redflag benchmarks.

Builds a random-weight Llama with SmolLM2-135M shapes (hidden 576, intermediate 1536,
30 layers, 9 heads, 3 KV heads, head_dim 64, vocab 49152, tied embeddings, RMSNorm eps
1e-5, rope_theta 100000) as a plain, efficient batch-1 PyTorch module and measures,
under torch.inference_mode:
  * prefill: tokens/s of one forward over a --prefill-tokens prompt (default 512),
    computing logits for the last position only (as generation does);
  * decode: tokens/s of batch-1 greedy decoding with a preallocated KV cache,
    --new-tokens (default 128) single-token steps after a --prompt-tokens (default 16)
    prompt (the prompt's prefill is not timed);
in fp32 and bf16 (weights and activations bf16; RMSNorm statistics, RoPE tables and softmax
in fp32, as transformers does). Median of --runs (>= 3) timed runs after a warm-up.
Prints ONE JSON object on stdout:
  {"peer": "pytorch", "torch_version": ..., "threads": N,
   "prefill": {"f32": tok_s, "bf16": tok_s}, "decode": {"f32": tok_s, "bf16": tok_s}, ...}
Exit 3 with {"skipped": "reason"} when torch cannot be imported.

The model mirrors modeling_llama.py (rotate_half RoPE, GQA, SiLU MLP, tied lm_head) but
fuses q/k/v and gate/up into one GEMM each and never materialises repeat_kv: query heads
are grouped per KV head ([n_kv, n_rep*T, d] @ [n_kv, d, S]). torch 1.13 has no
F.scaled_dot_product_attention, so attention is matmul + softmax.

GEMMs: with --gemm-backend auto (default) each dtype and phase uses the faster of
"linear" (F.linear / torch.matmul as torch dispatches them) and "mkldnn" (oneDNN inner
product on pre-packed weights, also used for the attention products; fp32 only), chosen by
timing one GEMM of the model's shape (prefill) and 4 real decode steps (decode). This
matters because Debian's torch (BLAS_INFO=generic) sends fp32 GEMMs to whatever
libblas.so.3 is installed: OpenBLAS on the machine PEERS.md describes, netlib's reference
BLAS (~2.5 GFLOP/s) where libopenblas0 is absent. The choice and the probe figures are
reported in "gemm_backend" and "backend_probe".

OpenMP: PyTorch 1.13 fp32 on 2 threads collapses unless OMP_WAIT_POLICY=PASSIVE, while bf16
is faster without it (../shared/PEERS.md). The variable must be set before torch is
imported, so:
  --omp-passive    set OMP_WAIT_POLICY=PASSIVE and re-exec this script
  --best-settings  run each dtype in a child process at its best setting (f32 PASSIVE,
                   bf16 default) and merge the results; recommended for the harness:
      python3 bench/peers/torch_model.py --threads 2 --best-settings
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SMOLLM2_135M = dict(
    hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64,
    vocab=49152, eps=1e-5, rope_theta=100000.0,
)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="PyTorch CPU peer benchmark (SmolLM2-135M shapes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16", help="comma list of f32, bf16")
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M["layers"], help="override layer count (smoke tests)")
    ap.add_argument("--omp-passive", action="store_true", help="set OMP_WAIT_POLICY=PASSIVE and re-exec")
    ap.add_argument("--best-settings", action="store_true",
                    help="f32 with OMP_WAIT_POLICY=PASSIVE, bf16 without, each in a child process")
    ap.add_argument("--gemm-backend", default="auto", choices=["auto", "linear", "mkldnn"],
                    help="GEMM path: F.linear (linear), oneDNN on pre-packed weights (mkldnn, fp32 "
                         "only), or the faster of the two measured per phase and dtype (auto, default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.runs = max(3, args.runs)
    return args


def skip(reason: str) -> None:
    print(json.dumps({"skipped": reason}))
    sys.stdout.flush()
    sys.exit(3)


# ----------------------------------------------------------------------------------
# orchestration (no torch import here: OMP_WAIT_POLICY must be set before it)
# ----------------------------------------------------------------------------------


def strip_args(argv, drop_flags, drop_valued):
    """argv without the flags in drop_flags and the options (with their values) in drop_valued."""
    out, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        if a in drop_flags:
            continue
        if a in drop_valued:
            skip_next = True
            continue
        if any(a.startswith(f"{v}=") for v in drop_valued):
            continue
        out.append(a)
    return out


def release_openblas_overrides() -> None:
    """These machines set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (safe defaults for old OpenBLAS
    builds), which force slower fp32 kernels on PyTorch's OpenBLAS path (../../shared/PEERS.md):
    the peer runs without them, in its own process only. Before torch is imported."""
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        os.environ.pop(name, None)


def openblas_core():
    """The kernel set the loaded OpenBLAS chose (openblas_get_corename), or None."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        for path in libs:
            lib = ctypes.CDLL(path)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None
    return None


def run_child(script, passthrough, extra, policy):
    """Runs `script` again with passthrough + extra under an OpenMP wait policy ("PASSIVE" or
    the default); returns (0, its JSON), (3, a skip object) or (1, an error object)."""
    env = dict(os.environ)
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(name, None)
    if policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    p = subprocess.run([sys.executable, os.path.abspath(script), *passthrough, *extra],
                       env=env, stdout=subprocess.PIPE, text=True)
    line = (p.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        res = json.loads(line)
    except json.JSONDecodeError:
        res = {"skipped": f"child {' '.join(extra)} printed no JSON (exit {p.returncode})"}
    if p.returncode == 3 or "skipped" in res:
        return 3, res
    if p.returncode != 0 or "error" in res:
        return 1, {"error": f"child {' '.join(extra)} failed with exit {p.returncode}: {res.get('error', '')}"}
    return 0, res


def run_best_settings(args, argv) -> int:
    """One child per dtype at its best OpenMP setting; merge their JSON objects."""
    passthrough = strip_args(argv, ("--best-settings", "--omp-passive"), ("--dtypes",))
    merged = None
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        rc, res = run_child(__file__, passthrough, ["--dtypes", dt], "PASSIVE" if dt == "f32" else "default")
        if rc != 0:
            print(json.dumps(res))
            return rc
        if merged is None:
            merged = res
        else:
            for key in ("prefill", "decode", "prefill_runs", "decode_runs", "omp_wait_policy",
                        "gemm_backend", "backend_probe"):
                merged[key].update(res[key])
    merged["settings"] = "best: f32 with OMP_WAIT_POLICY=PASSIVE, bf16 with the default policy"
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
    release_openblas_overrides()
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        skip(f"torch unavailable: {type(e).__name__}: {e}")
    return bench(args)


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------


def linear_backends(dtype):
    """Candidate GEMM paths for `dtype`: name -> (prepack(W), linear(x, W) = x @ W^T,
    qk(Q, K) = Q @ K^T batched over KV groups, pv(P, V) = P @ V batched).

    "linear": F.linear as torch dispatches it (Debian's torch 1.13 sends fp32 to the
    libblas.so.3 it links: OpenBLAS where installed, netlib's reference BLAS otherwise,
    which is ~40x slower; bf16 goes to oneDNN); "mkldnn": oneDNN inner product on weights
    pre-packed with to_mkldnn() (fp32 only)."""
    import torch
    import torch.nn.functional as F

    out = {"linear": (lambda w: w, lambda x, w: F.linear(x, w),
                      lambda q, k: torch.matmul(q, k.transpose(1, 2)), torch.matmul)}
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        mk = torch._C._nn.mkldnn_linear

        def lin(x, w):
            return mk(x.to_mkldnn(), w, None).to_dense()

        def qk(q, k):  # [G, M, d] x [G, N, d] -> [G, M, N]
            return torch.stack([lin(q[g], k[g].contiguous().to_mkldnn()) for g in range(q.shape[0])])

        def pv(p, v):  # [G, M, N] x [G, N, d] -> [G, M, d]
            return torch.stack([lin(p[g], v[g].t().contiguous().to_mkldnn()) for g in range(p.shape[0])])

        out["mkldnn"] = (lambda w: w.to_mkldnn(), lin, qk, pv)
    return out


def pick_backend(dtype, rows: int, threads: int) -> tuple:
    """Time each backend on a GEMM of the model's shape ([rows, 576] @ [576, 1536]) and
    return (fastest name, {name: GFLOP/s})."""
    import torch

    g = torch.Generator().manual_seed(123)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    w = torch.randn(1536, 576, generator=g).to(dtype)
    flops = 2.0 * rows * 576 * 1536
    speeds = {}
    for name, (prep, lin, _, _) in linear_backends(dtype).items():
        pw = prep(w)
        lin(x, pw)
        reps = 3 if rows > 1 else 50
        t0 = time.perf_counter()
        for _ in range(reps):
            lin(x, pw)
        speeds[name] = round(flops * reps / (time.perf_counter() - t0) / 1e9, 1)
    return max(speeds, key=speeds.get), speeds


def build(cfg: dict, dtype, seed: int, backends=("linear",)):
    import torch
    import torch.nn.functional as F

    impls = linear_backends(dtype)

    H, I, L = cfg["hidden"], cfg["intermediate"], cfg["layers"]
    nh, nkv, hd, V = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["vocab"]
    n_rep = nh // nkv
    eps = cfg["eps"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    embed = rnd(V, H, std=0.5)  # tied: also the lm_head
    layers = []
    for _ in range(L):
        layers.append(dict(
            ln1=(1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
            qkv=rnd((nh + 2 * nkv) * hd, H, std=H ** -0.5),
            o=rnd(H, nh * hd, std=(nh * hd) ** -0.5),
            ln2=(1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
            gate_up=rnd(2 * I, H, std=H ** -0.5),
            down=rnd(H, I, std=I ** -0.5),
        ))
    norm = torch.ones(H, dtype=dtype)
    packed = {}  # backend -> (per-layer dicts of packed matrices, packed lm_head)
    for b in backends:
        prep = impls[b][0]
        if b == "linear":
            packed[b] = (layers, embed)
        else:
            packed[b] = ([{k: (prep(v) if k in ("qkv", "o", "gate_up", "down") else v) for k, v in Ly.items()}
                          for Ly in layers], prep(embed))
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scale = hd ** -0.5

    def rms(x, w):
        # LlamaRMSNorm: statistics in float32, cast back, then * weight
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(dtype)

    def rope_tables(max_len):
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(x, cos, sin):
        # x [heads, T, hd]; cos/sin [T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Model:
        def __init__(self, max_len):
            self.max_len = max_len
            self.use(backends[0])
            self.cos, self.sin = rope_tables(max_len)
            self.k = torch.zeros(L, nkv, max_len, hd, dtype=dtype)
            self.v = torch.zeros(L, nkv, max_len, hd, dtype=dtype)
            self.pos = 0
            self.weights = dict(embed=embed, layers=layers, norm=norm)  # for tests

        def reset(self):
            self.pos = 0

        def use(self, backend):
            """Select the GEMM backend for the following forwards."""
            self.backend = backend
            self.lin, self.qk, self.pv = impls[backend][1:]
            self.mats, self.head = packed[backend]

        def forward(self, ids):
            """ids [T] -> logits [1, V] of the last position; appends to the KV cache."""
            T = ids.shape[0]
            p0 = self.pos
            S = p0 + T
            cos, sin = self.cos[p0:S], self.sin[p0:S]
            mask = None
            if T > 1:
                qpos = torch.arange(p0, S)[:, None]
                kpos = torch.arange(S)[None, :]
                mask = torch.zeros(T, S, dtype=dtype).masked_fill_(kpos > qpos, float("-inf"))
                mask = mask.repeat(n_rep, 1)[None]  # [1, n_rep*T, S] (rows grouped r-major)
            lin = self.lin
            h = F.embedding(ids, embed)
            for li, Ly in enumerate(self.mats):
                x = rms(h, Ly["ln1"])
                qkv = lin(x, Ly["qkv"])
                q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
                q = rotate(q.view(T, nh, hd).transpose(0, 1), cos, sin)  # [nh, T, hd]
                k = rotate(k.view(T, nkv, hd).transpose(0, 1), cos, sin)  # [nkv, T, hd]
                self.k[li, :, p0:S] = k
                self.v[li, :, p0:S] = v.view(T, nkv, hd).transpose(0, 1)
                K = self.k[li, :, :S]
                Vc = self.v[li, :, :S]
                qg = q.reshape(nkv, n_rep * T, hd)  # head h = kv*n_rep + r -> kv group
                s = self.qk(qg, K) * scale
                if mask is not None:
                    s = s + mask
                pr = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
                a = self.pv(pr, Vc)  # [nkv, n_rep*T, hd]
                a = a.view(nh, T, hd).transpose(0, 1).reshape(T, nh * hd)
                h = h + lin(a, Ly["o"])
                x = rms(h, Ly["ln2"])
                gu = lin(x, Ly["gate_up"])
                gt, up = gu.split(I, dim=-1)
                h = h + lin(F.silu(gt) * up, Ly["down"])
            self.pos = S
            return lin(rms(h[-1:], norm), self.head)

    n_params = V * H + L * (2 * H + (nh + 2 * nkv) * hd * H + H * nh * hd + 3 * H * I) + H
    return Model, n_params


def bench(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cfg = dict(SMOLLM2_135M, layers=args.layers)
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    want = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in want:
        if d not in dtypes:
            print(json.dumps({"error": f"unknown dtype {d}"}))
            return 2
    g = torch.Generator().manual_seed(args.seed + 1)
    prefill_ids = torch.randint(0, cfg["vocab"], (args.prefill_tokens,), generator=g)
    prompt_ids = torch.randint(0, cfg["vocab"], (args.prompt_tokens,), generator=g)
    res = {
        "peer": "pytorch",
        "torch_version": torch.__version__,
        "threads": args.threads,
        "prefill": {},
        "decode": {},
        "prefill_runs": {},
        "decode_runs": {},
        "omp_wait_policy": {},
        "gemm_backend": {},
        "backend_probe": {},
        "prefill_tokens": args.prefill_tokens,
        "decode_prompt_tokens": args.prompt_tokens,
        "decode_new_tokens": args.new_tokens,
        "runs": args.runs,
        "model": "random Llama, SmolLM2-135M shapes" + ("" if args.layers == 30 else f" ({args.layers} layers)"),
    }
    with torch.inference_mode():
        for d in want:
            cands = list(linear_backends(dtypes[d]))
            if args.gemm_backend != "auto":
                if args.gemm_backend not in cands:
                    print(json.dumps({"error": f"backend {args.gemm_backend} unavailable for {d}"}))
                    return 2
                cands = [args.gemm_backend]
            Model, n_params = build(cfg, dtypes[d], args.seed, tuple(cands))
            res["params"] = n_params
            m = Model(max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 1)

            def prefill_once():
                m.reset()
                t0 = time.perf_counter()
                m.forward(prefill_ids)
                return time.perf_counter() - t0

            def decode_once(n):
                m.reset()
                logits = m.forward(prompt_ids)
                tok = logits.argmax(-1)
                t0 = time.perf_counter()
                for _ in range(n):
                    tok = m.forward(tok).argmax(-1)
                return time.perf_counter() - t0

            pre_b = dec_b = cands[0]
            if len(cands) > 1:
                # prefill: one GEMM of the model's shape per backend (a whole 512-token forward on
                # reference BLAS would take a minute); decode: 4 real decode steps per backend
                pre_b, pre_speed = pick_backend(dtypes[d], 128, args.threads)
                dec_speed = {}
                for b in cands:
                    m.use(b)
                    decode_once(1)
                    dec_speed[b] = round(4 / decode_once(4), 2)
                dec_b = max(dec_speed, key=dec_speed.get)
                res["backend_probe"][d] = {"prefill_gemm_gflops": pre_speed, "decode_tok_s": dec_speed}
            res["gemm_backend"][d] = {"prefill": pre_b, "decode": dec_b}

            m.use(pre_b)
            prefill_once()  # warm-up (allocations, oneDNN primitive creation)
            pre = [args.prefill_tokens / prefill_once() for _ in range(args.runs)]
            m.use(dec_b)
            decode_once(min(16, args.new_tokens))  # warm-up
            dec = [args.new_tokens / decode_once(args.new_tokens) for _ in range(args.runs)]
            res["prefill"][d] = round(statistics.median(pre), 1)
            res["decode"][d] = round(statistics.median(dec), 2)
            res["prefill_runs"][d] = [round(x, 1) for x in pre]
            res["decode_runs"][d] = [round(x, 2) for x in dec]
            res["omp_wait_policy"][d] = os.environ.get("OMP_WAIT_POLICY", "default")
            del m, Model
    res["openblas_core"] = openblas_core()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
